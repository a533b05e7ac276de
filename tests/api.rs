//! The TensorFlow-Serving-compatible REST API over real HTTP, with a real
//! model trained and published by the test.

mod common;
#[path = "rest/mod.rs"]
mod rest;

use fraudstream::decision::Decision;
use fraudstream::model::Model;
use fraudstream::scoring::{Explain, ScoringService};
use fraudstream::Payment;
use reqwest::StatusCode;
use rest::{call, demo_payment, demo_row, flood, get, post, serve, serve_with, start_http, Server};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tf_serving_endpoints_answer_like_tf_serving() {
    let s = serve(1 << 20).await;
    let v = &s.version;
    let available = json!({"model_version_status":[{"version":v,"state":"AVAILABLE","status":{"error_code":"OK","error_message":""}}]});
    assert_eq!(get(&format!("{}/v1/models/payfraud", s.base)).await, (StatusCode::OK, available.clone()));
    assert_eq!(get(&format!("{}/v1/models/payfraud/versions/{v}", s.base)).await, (StatusCode::OK, available));

    let metadata = get(&format!("{}/v1/models/payfraud/metadata", s.base)).await;
    assert_eq!(metadata.0, StatusCode::OK);
    let signature: Value = serde_json::from_str(
        r#"{"signature_def":{"serving_default":{"inputs":{"payments":{"dtype":"DT_FLOAT","tensor_shape":{"dim":[{"size":"-1","name":""},{"size":"28","name":""}],"unknown_rank":false},"name":"X_train:0"}},"outputs":{"classification":{"dtype":"DT_FLOAT","tensor_shape":{"dim":[{"size":"-1","name":""},{"size":"2","name":""}],"unknown_rank":false},"name":"Softmax:0"}},"method_name":"tensorflow/serving/predict"}}}"#,
    )
    .unwrap();
    assert_eq!(metadata.1["model_spec"], json!({"name": "payfraud", "signature_name": "", "version": v}));
    assert_eq!(metadata.1["metadata"]["signature_def"], signature);
    // Beside TF Serving's signature: what the 28 inputs mean for this version.
    let spec = &metadata.1["metadata"]["feature_spec"];
    assert_eq!(
        (spec["amount_min"].as_f64(), spec["amount_max"].as_f64(), &spec["amount_clip"]),
        (Some(0.0), Some(8329.96), &json!(true))
    );
    let features: Vec<String> = serde_json::from_value(spec["features"].clone()).unwrap();
    assert_eq!(
        (features.len(), features[0].as_str(), features[5].as_str(), features[19].as_str(), features[26].as_str()),
        (28, "amount_scaled", "category=es_health", "age=3", "gender=M")
    );
    assert_eq!(get(&format!("{}/v1/models/payfraud/versions/{v}/metadata", s.base)).await.1, metadata.1);

    // The original demo's request, columnar and row formats.
    let (status, body) = post(&format!("{}/v1/models/payfraud:predict", s.base), json!({"inputs": [demo_row()]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let row: Vec<f64> = serde_json::from_value(body["outputs"][0].clone()).unwrap();
    assert_eq!(row.len(), 2);
    assert!((row[0] + row[1] - 1.0).abs() < 1e-5, "{row:?}");
    let (status, body) = post(
        &format!("{}/v1/models/payfraud/versions/{v}:predict", s.base),
        json!({"signature_name": "serving_default", "instances": [demo_row(), demo_row()]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["predictions"].as_array().unwrap().len(), 2);
    // Same row, same model; a 2-row batch may take other float kernels than a 1-row one.
    let batched: Vec<f64> = serde_json::from_value(body["predictions"][0].clone()).unwrap();
    assert!(batched.iter().zip(&row).all(|(a, b)| (a - b).abs() < 1e-6), "{batched:?} vs {row:?}");

    // Equal to the stream's score for the same payment: encode it with the
    // model's own encoder, ask :predict, and compare with the scoring path.
    let batch = s.scoring.score_payments(vec![demo_payment()], Explain::AtReview).await.unwrap();
    let stream_score = batch.results[0].clone().unwrap();
    let features = common_features(&s, &demo_payment()).await;
    let (_, body) = post(&format!("{}/v1/models/payfraud:predict", s.base), json!({"instances": [features]})).await;
    let api: Vec<f32> = serde_json::from_value(body["predictions"][0].clone()).unwrap();
    assert!(api.iter().zip(stream_score).all(|(a, b)| (a - b).abs() < 1e-6), "{api:?} vs {stream_score:?}");
    assert_eq!(api.len(), 2);

    // :score takes raw payments and returns ScoredPayments.
    let payment = serde_json::to_value(demo_payment()).unwrap();
    let (status, body) = post(&format!("{}/v1/models/payfraud:score", s.base), json!({"instances": [payment]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let scored = &body["predictions"][0];
    assert_eq!(scored["modelVersion"], json!(v));
    assert!((scored["fraudProbability"].as_f64().unwrap() - f64::from(stream_score[1])).abs() < 1e-6);
    assert_eq!(scored["payment"]["paymentId"], json!("demo-1"));
    // A row pre-encoded as the original demo encodes (amount / 8329.96) means
    // the same payment to every version on the fixed amount scale: :predict
    // and :score agree (the demo's literal row, rounded to 0.005313, within 1e-4).
    let mut exact = demo_row();
    exact[0] = 44.26 / 8329.96;
    let (_, body) =
        post(&format!("{}/v1/models/payfraud:predict", s.base), json!({"instances": [exact, demo_row()]})).await;
    let demo: Vec<Vec<f64>> = serde_json::from_value(body["predictions"].clone()).unwrap();
    let p = scored["fraudProbability"].as_f64().unwrap();
    assert!((demo[0][1] - p).abs() < 1e-6 && (demo[1][1] - p).abs() < 1e-4, "{demo:?} vs {scored}");

    let metrics = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fraudstream_http_requests_total"), "{metrics}");
    assert!(metrics.contains("fraudstream_http_rows_scored_total"));
    assert_eq!(reqwest::get(format!("{}/healthz", s.base)).await.unwrap().status(), StatusCode::OK);
    assert_eq!(reqwest::get(format!("{}/readyz", s.base)).await.unwrap().status(), StatusCode::OK);
}

/// Every `:score` output has a decision by the version's bands; those at or
/// above review carry reasons, `?explain=true` and `:explain` give them for
/// every payment; all equal an independent computation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_and_reasons_over_rest() {
    let s = serve(4 << 20).await;
    let model = Model::load(&s.model_dir, tch::Device::Cpu).unwrap();
    let bands = model.manifest().bands();
    assert!(bands.review.threshold < bands.block.threshold, "{bands:?}");
    let payments: Vec<Payment> = fraudstream::Simulator::new(3_000, 11).collect();
    let instances = serde_json::to_value(&payments).unwrap();
    let (status, body) = post(&format!("{}/v1/models/payfraud:score", s.base), json!({"instances": instances})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let scored: Vec<fraudstream::ScoredPayment> = serde_json::from_value(body["predictions"].clone()).unwrap();
    let mut seen = std::collections::HashMap::new();
    for out in &scored {
        let decision = out.decision.expect("every output has a decision");
        assert_eq!(decision, bands.decide(out.fraud_probability), "{out:?}");
        *seen.entry(decision).or_insert(0) += 1;
        if decision == Decision::Allow {
            assert!(out.reasons.is_empty(), "{out:?}");
        } else {
            common::assert_reasons(
                &out.reasons,
                &common::independent_reasons(&model, &out.payment),
                "stream-like :score",
            );
        }
    }
    eprintln!("decisions of 3,000 simulated payments: {seen:?}");
    assert!(seen.len() == 3, "all three decisions among 3,000 payments: {seen:?}");

    // Asked for: reasons for every payment, allowed ones too.
    let few = serde_json::to_value(&payments[..50]).unwrap();
    let (status, body) =
        post(&format!("{}/v1/models/payfraud:score?explain=true", s.base), json!({"instances": few.clone()})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let explained: Vec<fraudstream::ScoredPayment> = serde_json::from_value(body["predictions"].clone()).unwrap();
    for out in &explained {
        assert_eq!(out.reasons.len(), 3, "{out:?}");
        common::assert_reasons(&out.reasons, &common::independent_reasons(&model, &out.payment), "?explain=true");
    }

    // KServe v1 :explain: predictions as :predict gives them, explanations with reasons.
    let (status, body) = post(&format!("{}/v1/models/payfraud:explain", s.base), json!({"instances": few})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let predictions: Vec<[f64; 2]> = serde_json::from_value(body["predictions"].clone()).unwrap();
    let explanations: Vec<fraudstream::ScoredPayment> = serde_json::from_value(body["explanations"].clone()).unwrap();
    assert_eq!((predictions.len(), explanations.len()), (50, 50));
    for ((p, e), asked) in predictions.iter().zip(&explanations).zip(&explained) {
        assert!((p[1] - e.fraud_probability).abs() < 1e-12 && (p[0] + p[1] - 1.0).abs() < 1e-9, "{p:?}");
        assert_eq!((&e.payment, &e.reasons, e.decision), (&asked.payment, &asked.reasons, asked.decision));
        let reason = &body["explanations"][0]["reasons"][0];
        assert!(
            reason["feature"].is_string() && reason["value"].is_string() && reason["contribution"].is_f64(),
            "{reason}"
        );
    }
    let (status, _) = call(reqwest::Method::GET, &format!("{}/v1/models/payfraud:explain", s.base), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

/// The features of a payment as the serving model encodes them (its own
/// feature spec, read from the fetched version).
async fn common_features(s: &Server, payment: &Payment) -> Vec<f32> {
    let model = Model::load(&s.model_dir, tch::Device::Cpu).unwrap();
    model.encoder().encode(payment).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_tf_serving_errors() {
    let s = serve(64 * 1024).await;
    let predict = format!("{}/v1/models/payfraud:predict", s.base);
    let cases = [
        (json!({"inputs": [[1.0, 2.0]]}), StatusCode::BAD_REQUEST, "28"),
        (json!({"instances": [demo_row()], "inputs": [demo_row()]}), StatusCode::BAD_REQUEST, "both"),
        (json!({}), StatusCode::BAD_REQUEST, "Missing"),
        (json!({"instances": [vec!["a"; 28]]}), StatusCode::BAD_REQUEST, "not a finite number"),
        (json!({"signature_name": "other", "instances": [demo_row()]}), StatusCode::BAD_REQUEST, "other"),
        (json!({"instances": "nope"}), StatusCode::BAD_REQUEST, "list"),
    ];
    for (body, status, needle) in cases {
        let (got, reply) = post(&predict, body.clone()).await;
        assert_eq!(got, status, "{body} -> {reply}");
        let error = reply["error"].as_str().unwrap_or_else(|| panic!("no JSON error for {body}: {reply}"));
        assert!(error.contains(needle), "{body}: {error}");
    }
    let (status, reply) = call(reqwest::Method::POST, &predict, Some("{not json".into())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reply["error"].as_str().unwrap().contains("JSON"));

    let (status, reply) = get(&format!("{}/v1/models/other", s.base)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(reply["error"].as_str().unwrap().contains("other"));
    let (status, _) = get(&format!("{}/v1/models/payfraud/versions/1", s.base)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) =
        post(&format!("{}/v1/models/payfraud/versions/1:predict", s.base), json!({"inputs": [demo_row()]})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let big: Vec<Vec<f64>> = vec![demo_row(); 2000];
    let (status, reply) = post(&predict, json!({"instances": big})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply["error"].is_string(), "{reply}");

    let bad_payment = json!({"instances": [{"customer":"C1","age":"3","gender":"M","merchant":"M1","category":"es_casino","amount":1.0}]});
    let (status, reply) = post(&format!("{}/v1/models/payfraud:score", s.base), bad_payment).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reply["error"].as_str().unwrap().contains("es_casino"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_model_yet_is_503() {
    let base = start_http(ScoringService::start(64, 4), 1 << 20).await;
    let (status, body) = post(&format!("{base}/v1/models/payfraud:predict"), json!({"inputs": [demo_row()]})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].is_string());
    let (status, body) = get(&format!("{base}/v1/models/payfraud")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["model_version_status"][0]["state"], json!("LOADING"));
    assert_eq!(reqwest::get(format!("{base}/readyz")).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// REST has a concurrency limit of its own: beyond it, 429 at once, so a
/// flood of requests cannot take the stream's places in the model's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_beyond_its_concurrency_limit_gets_429() {
    let s = serve_with(8 << 20, 1).await;
    let rows: Vec<Vec<f64>> = (0..4096).map(|_| demo_row()).collect();
    let body = json!({ "inputs": rows }).to_string();
    let url = format!("{}/v1/models/payfraud:predict", s.base);
    let refused = flood(&url, body, 16).await;
    assert!(refused.iter().all(|b| b.contains("--max-rest-concurrency")), "{refused:?}");
}

/// A model whose output is not a probability for some inputs: those requests
/// get 500 naming the version, never a NaN score (whose `p >= threshold` would
/// quietly say "not fraud"); other requests are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_that_is_not_a_probability_is_an_error_not_a_score() {
    let s = serve(1 << 20).await;
    let mut manifest = Model::load(&s.model_dir, tch::Device::Cpu).unwrap().manifest().clone();
    // An amount scale without the clip (`--amount-scale fit`), so a large amount reaches the NaN.
    manifest.feature_spec.amount_clip = false;
    // softmax(linear(x)) + 0 * log(5 - x[:, 0]): NaN where the amount feature exceeds 5.
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let linear = tch::nn::linear(vs.root(), 28, 2, Default::default());
    vs.freeze();
    let module = tch::CModule::create_by_tracing(
        "NanAbove5",
        "forward",
        &[tch::Tensor::zeros([2, 28], tch::kind::FLOAT_CPU)],
        &mut |x| {
            let probabilities = tch::nn::Module::forward(&linear, &x[0]).softmax(-1, tch::Kind::Float);
            let poison = (x[0].narrow(1, 0, 1).neg() + 5.0).log() * 0.0;
            vec![probabilities + poison]
        },
    )
    .unwrap();
    let path = s._dir.path().join("nan.pt");
    module.save(&path).unwrap();
    let model = Model::from_module_file(&path, manifest, tch::Device::Cpu).expect("the golden batch is fine");
    s.scoring.swap(model).await.unwrap();

    let url = format!("{}/v1/models/payfraud:predict", s.base);
    let (status, body) = post(&url, json!({"inputs": [demo_row()]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut poisoned = demo_row();
    poisoned[0] = 10.0;
    let (status, body) = post(&url, json!({"inputs": [poisoned]})).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("not a pair of probabilities")), "{body}");
    // The same through :score, with a payment whose amount lands there.
    let score = format!("{}/v1/models/payfraud:score", s.base);
    let big = Payment { amount: 1e6, ..demo_payment() };
    let (status, body) = post(&score, json!({"instances": [big]})).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    // The swap changed the feature spec (no clip): logged and counted.
    let metrics = reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap();
    let changes = metrics.lines().find(|l| l.starts_with("fraudstream_feature_spec_changes_total"));
    assert!(changes.is_some_and(|l| !l.ends_with(" 0")), "{changes:?}");
}

/// A model that fails only on the rows reason codes score (a one-hot block
/// replaced by its training shares): a request for reasons gets 500 naming
/// the version, never scores without their reasons; a request that needs no
/// reasons is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reasons_pass_fails_the_request() {
    let s = serve(1 << 20).await;
    let mut manifest = Model::load(&s.model_dir, tch::Device::Cpu).unwrap().manifest().clone();
    // Nothing reaches review by itself: only ?explain=true asks for reasons.
    let edge = fraudstream::decision::BandEdge { threshold: 1.0, precision: f64::NAN, recall: f64::NAN };
    manifest.decision_bands = Some(fraudstream::decision::DecisionBands {
        review: edge,
        block: edge,
        review_recall_target: 0.95,
        block_precision_target: 0.95,
    });
    // softmax(linear(x)) + 0 * log(max(category block) - 0.99): NaN unless the category is one-hot.
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let linear = tch::nn::linear(vs.root(), 28, 2, Default::default());
    vs.freeze();
    let golden = tch::Tensor::zeros([2, 28], tch::kind::FLOAT_CPU);
    let _ = golden.narrow(1, 1, 1).fill_(1.0);
    let module = tch::CModule::create_by_tracing("NanUnlessOneHot", "forward", &[golden], &mut |x| {
        let probabilities = tch::nn::Module::forward(&linear, &x[0]).softmax(-1, tch::Kind::Float);
        let poison = (x[0].narrow(1, 1, 15).amax([1i64].as_slice(), true) - 0.99).log() * 0.0;
        vec![probabilities + poison]
    })
    .unwrap();
    let path = s._dir.path().join("nan-reasons.pt");
    module.save(&path).unwrap();
    s.scoring.swap(Model::from_module_file(&path, manifest, tch::Device::Cpu).unwrap()).await.unwrap();

    let body = json!({"instances": [serde_json::to_value(demo_payment()).unwrap()]});
    let (status, reply) = post(&format!("{}/v1/models/payfraud:score", s.base), body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["predictions"][0]["decision"], json!("allow"));
    let (status, reply) = post(&format!("{}/v1/models/payfraud:score?explain=true", s.base), body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{reply}");
    assert!(reply["error"].as_str().is_some_and(|e| e.contains("not a pair of probabilities")), "{reply}");
}

/// The shadow model on the scoring thread, through REST: a shadow of the
/// serving version is refused; a loaded shadow scores beside the serving
/// model (`:score` carries its version, P(fraud) and its own decision), is
/// listed by the status and answers for its version; a batch the shadow
/// cannot score (NaN) is served with `shadow: null` and the failure counted;
/// a swap to the shadow's version leaves no shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_scores_beside_the_serving_model_and_its_failures_cost_only_its_scores() {
    let s = serve(1 << 20).await;
    let serving = Model::load(&s.model_dir, tch::Device::Cpu).unwrap();
    s.scoring.set_shadow(Some(Model::load(&s.model_dir, tch::Device::Cpu).unwrap())).await.unwrap();
    assert!(s.scoring.shadow().is_none(), "a shadow of the serving version is no shadow");

    // The shadow: another version, softmax(linear(x)) + 0 * log(5 - x[:, 0]), NaN above an amount feature of 5.
    let mut manifest = serving.manifest().clone();
    let shadow_version = (s.version.parse::<u64>().unwrap() + 1).to_string();
    manifest.version = shadow_version.clone();
    manifest.feature_spec.amount_clip = false;
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let linear = tch::nn::linear(vs.root(), 28, 2, Default::default());
    vs.freeze();
    let module = tch::CModule::create_by_tracing(
        "NanAbove5",
        "forward",
        &[tch::Tensor::zeros([2, 28], tch::kind::FLOAT_CPU)],
        &mut |x| {
            let probabilities = tch::nn::Module::forward(&linear, &x[0]).softmax(-1, tch::Kind::Float);
            vec![probabilities + (x[0].narrow(1, 0, 1).neg() + 5.0).log() * 0.0]
        },
    )
    .unwrap();
    let path = s._dir.path().join("shadow.pt");
    module.save(&path).unwrap();
    let load_shadow = || Model::from_module_file(&path, manifest.clone(), tch::Device::Cpu).unwrap();
    s.scoring.set_shadow(Some(load_shadow())).await.unwrap();
    assert_eq!(s.scoring.shadow().map(|m| m.version.clone()), Some(shadow_version.clone()));

    let (_, status) = get(&format!("{}/v1/models/payfraud", s.base)).await;
    let versions: Vec<&Value> =
        status["model_version_status"].as_array().unwrap().iter().map(|v| &v["version"]).collect();
    assert_eq!(versions, [&json!(s.version), &json!(shadow_version)], "{status}");

    let payment = Payment { amount: 2400.0, category: "es_travel".into(), ..demo_payment() };
    let (status, reply) = post(&format!("{}/v1/models/payfraud:score", s.base), json!({"instances": [payment]})).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let scored: fraudstream::ScoredPayment = serde_json::from_value(reply["predictions"][0].clone()).unwrap();
    let want = f64::from(serving.score_payments(std::slice::from_ref(&payment)).unwrap()[0]);
    assert!((scored.fraud_probability - want).abs() <= 1e-6 && scored.model_version == s.version, "{scored:?}");
    assert_eq!(scored.decision, Some(serving.manifest().bands().decide(scored.fraud_probability)));
    let shadow = scored.shadow.expect("the shadow's score");
    let shadow_model = load_shadow();
    let shadow_want = f64::from(shadow_model.score_payments(std::slice::from_ref(&payment)).unwrap()[0]);
    assert_eq!(shadow.model_version, shadow_version);
    assert!((shadow.fraud_probability - shadow_want).abs() <= 1e-6, "{shadow:?} vs {shadow_want}");
    assert_eq!(shadow.decision, shadow_model.manifest().bands().decide(shadow.fraud_probability));
    assert_eq!(shadow.is_fraud, shadow.fraud_probability >= shadow_model.manifest().threshold);
    // The shadow's own version route is scored by the shadow.
    let url = format!("{}/v1/models/payfraud/versions/{shadow_version}:score", s.base);
    let (status, reply) = post(&url, json!({"instances": [payment]})).await;
    assert_eq!((status, &reply["predictions"][0]["modelVersion"]), (StatusCode::OK, &json!(shadow_version)), "{reply}");
    assert_eq!(reply["predictions"][0]["shadow"], Value::Null);

    // An amount the shadow turns into NaN: served by the serving model, no shadow score, one failure counted.
    let failures =
        |text: &str| text.lines().find(|l| l.starts_with("fraudstream_shadow_failures_total")).map(str::to_string);
    let before = failures(&reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap());
    let big = Payment { amount: 1e6, ..demo_payment() };
    let (status, reply) = post(&format!("{}/v1/models/payfraud:score", s.base), json!({"instances": [big]})).await;
    assert_eq!(status, StatusCode::OK, "a failing shadow never fails a request: {reply}");
    assert_eq!(reply["predictions"][0]["shadow"], Value::Null, "{reply}");
    assert_eq!(reply["predictions"][0]["modelVersion"], json!(s.version));
    let after = failures(&reqwest::get(format!("{}/metrics", s.base)).await.unwrap().text().await.unwrap());
    assert_ne!(before, after, "the shadow failure was not counted: {after:?}");

    // Serving the shadow's version: the shadow goes with the swap.
    s.scoring.swap(load_shadow()).await.unwrap();
    assert!(s.scoring.shadow().is_none());
    let (_, status) = get(&format!("{}/v1/models/payfraud", s.base)).await;
    assert_eq!(status["model_version_status"].as_array().unwrap().len(), 1, "{status}");
}
