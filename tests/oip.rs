//! The Open Inference Protocol (KServe v2) REST API over real HTTP, with a
//! real model trained and published by the test: every endpoint answered as
//! the protocol's examples show, and `/infer` scoring as TF Serving's
//! `:predict` does.

mod common;
#[path = "rest/mod.rs"]
mod rest;

use fraudstream::scoring::ScoringService;
use reqwest::StatusCode;
use rest::{call, demo_row, flood, get, post, serve, serve_with, start_http};
use serde_json::{json, Value};

/// A second, different row: a small payment, another age and category.
fn other_row() -> Vec<f64> {
    let mut row = vec![0.0; 28];
    row[0] = 0.0002;
    row[3] = 1.0;
    row[12] = 1.0;
    row[27] = 1.0;
    row
}

/// An inference request for `rows`, their data flat (row-major).
fn infer_request(rows: &[Vec<f64>]) -> Value {
    let data: Vec<f64> = rows.concat();
    json!({"inputs": [{"name": "payments", "shape": [rows.len(), 28], "datatype": "FP32", "data": data}]})
}

/// The field names of a JSON object, sorted.
fn fields(object: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = object.as_object().expect("an object").keys().map(String::as_str).collect();
    names.sort_unstable();
    names
}

fn floats(value: &Value) -> Vec<f64> {
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{value} is not a list of numbers: {e}"))
}

/// The body is exactly the protocol's error object: `{"error": $string}`.
fn assert_error(body: &Value, needle: &str) {
    let object = body.as_object().unwrap_or_else(|| panic!("not a JSON object: {body}"));
    assert_eq!(object.len(), 1, "only \"error\" expected: {body}");
    let error = object["error"].as_str().unwrap_or_else(|| panic!("\"error\" is not a string: {body}"));
    assert!(error.contains(needle), "{error:?} does not say {needle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_endpoints_answer_as_the_protocol_shows() {
    let s = serve(1 << 20).await;
    let (base, v) = (&s.base, &s.version);

    assert_eq!(get(&format!("{base}/v2/health/live")).await, (StatusCode::OK, json!({"live": true})));
    assert_eq!(get(&format!("{base}/v2/health/ready")).await, (StatusCode::OK, json!({"ready": true})));
    let server = json!({"name": "fraudstream", "version": env!("CARGO_PKG_VERSION"), "extensions": []});
    assert_eq!(get(&format!("{base}/v2")).await, (StatusCode::OK, server.clone()));
    assert_eq!(get(&format!("{base}/v2/")).await, (StatusCode::OK, server));

    let metadata = json!({
        "name": "payfraud",
        "versions": [v],
        "platform": "pytorch_torchscript",
        "inputs": [{"name": "payments", "datatype": "FP32", "shape": [-1, 28]}],
        "outputs": [{"name": "classification", "datatype": "FP32", "shape": [-1, 2]}],
    });
    assert_eq!(get(&format!("{base}/v2/models/payfraud")).await, (StatusCode::OK, metadata.clone()));
    assert_eq!(get(&format!("{base}/v2/models/payfraud/versions/{v}")).await, (StatusCode::OK, metadata));
    let ready = json!({"name": "payfraud", "ready": true});
    assert_eq!(get(&format!("{base}/v2/models/payfraud/ready")).await, (StatusCode::OK, ready.clone()));
    assert_eq!(get(&format!("{base}/v2/models/payfraud/versions/{v}/ready")).await, (StatusCode::OK, ready));

    // The protocol's example request, for this model: an id, one input, one requested output.
    let rows = [demo_row(), other_row()];
    let mut request = infer_request(&rows);
    request["id"] = json!("42");
    request["outputs"] = json!([{"name": "classification"}]);
    let (status, body) = post(&format!("{base}/v2/models/payfraud/infer"), request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fields(&body), ["id", "model_name", "model_version", "outputs"], "{body}");
    assert_eq!(body["model_name"], json!("payfraud"));
    assert_eq!(body["model_version"], json!(v));
    assert_eq!(body["id"], json!("42"));
    let outputs = body["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{body}");
    let output = &outputs[0];
    assert_eq!(fields(output), ["data", "datatype", "name", "shape"], "{body}");
    assert_eq!(output["name"], json!("classification"));
    assert_eq!(output["datatype"], json!("FP32"));
    assert_eq!(output["shape"], json!([2, 2]));
    let data = floats(&output["data"]);
    assert_eq!(data.len(), 4);
    for pair in data.chunks(2) {
        assert!((pair[0] + pair[1] - 1.0).abs() < 1e-5, "{pair:?} is not [P(legit), P(fraud)]");
    }

    // The same rows through TF Serving's :predict: the same scores.
    let (status, predicted) = post(&format!("{base}/v1/models/payfraud:predict"), json!({"instances": rows})).await;
    assert_eq!(status, StatusCode::OK, "{predicted}");
    let predicted: Vec<f64> = predicted["predictions"].as_array().unwrap().iter().flat_map(floats).collect();
    assert_eq!(predicted.len(), data.len());
    assert!(data.iter().zip(&predicted).all(|(a, b)| (a - b).abs() < 1e-6), "{data:?} vs {predicted:?}");

    // Nested data, the serving version named, no id and no outputs asked for: the same scores, no "id".
    let nested = json!({"inputs": [{"name": "payments", "shape": [2, 28], "datatype": "FP32", "data": rows}]});
    let (status, body) = post(&format!("{base}/v2/models/payfraud/versions/{v}/infer"), nested).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("id").is_none(), "no id was given: {body}");
    assert_eq!(body["model_version"], json!(v));
    let again = floats(&body["outputs"][0]["data"]);
    assert!(again.iter().zip(&data).all(|(a, b)| (a - b).abs() < 1e-6), "{again:?} vs {data:?}");

    // An empty batch is a valid tensor: [0, 28] in, [0, 2] out.
    let (status, body) = post(&format!("{base}/v2/models/payfraud/infer"), infer_request(&[])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outputs"][0]["shape"], json!([0, 2]));
    assert_eq!(body["outputs"][0]["data"], json!([]));

    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    for label in ["v2-infer", "v2-metadata", "v2-model-ready", "v2-server-metadata"] {
        assert!(metrics.contains(&format!("endpoint=\"{label}\"")), "no {label} in {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_protocols_error_object() {
    let s = serve(64 * 1024).await;
    let (base, v) = (&s.base, &s.version);
    let infer = format!("{base}/v2/models/payfraud/infer");

    let input = |name: &str, datatype: &str, shape: Value, data: Value| json!({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]});
    let cases = [
        (input("input0", "FP32", json!([1, 28]), json!(demo_row())), "this model's input is \"payments\""),
        (input("payments", "FP64", json!([1, 28]), json!(demo_row())), "send \"datatype\": \"FP32\""),
        (input("payments", "FLOAT", json!([1, 28]), json!(demo_row())), "unknown variant `FLOAT`"),
        (input("payments", "FP32", json!([2, 28]), json!(demo_row())), "needs 56 numbers"),
        (input("payments", "FP32", json!([28]), json!(demo_row())), "send [rows, 28]"),
        (input("payments", "FP32", json!([1, 28]), json!(vec!["a"; 28])), "not a finite FP32 number"),
        (json!({"inputs": [], "id": "1"}), "\"inputs\" is empty"),
        (json!({"instances": [demo_row()]}), "missing field `inputs`"),
    ];
    for (body, needle) in cases {
        let (status, reply) = post(&infer, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {reply}");
        assert_error(&reply, needle);
    }
    let mut wrong_output = infer_request(&[demo_row()]);
    wrong_output["outputs"] = json!([{"name": "probabilities"}]);
    let (status, reply) = post(&infer, wrong_output).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&reply, "only output is \"classification\"");
    let (status, reply) = call(reqwest::Method::POST, &infer, Some("{not json".into())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&reply, "not an inference request");

    // Another model or version: 404, saying what is served.
    for path in ["other", "other/ready", "payfraud/versions/1", "payfraud/versions/1/ready"] {
        let (status, reply) = get(&format!("{base}/v2/models/{path}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {reply}");
        assert_error(&reply, "payfraud");
    }
    let (status, reply) = post(&format!("{base}/v2/models/other/infer"), infer_request(&[demo_row()])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&reply, "this server serves \"payfraud\"");
    let (status, reply) =
        post(&format!("{base}/v2/models/payfraud/versions/1/infer"), infer_request(&[demo_row()])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&reply, &format!("the serving version is \"{v}\""));

    let big: Vec<Vec<f64>> = vec![demo_row(); 2000];
    let (status, reply) = post(&infer, infer_request(&big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&reply, "body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_model_yet_is_not_ready_and_503() {
    let base = start_http(ScoringService::start(64, 4), 1 << 20).await;
    let (status, body) = post(&format!("{base}/v2/models/payfraud/infer"), infer_request(&[demo_row()])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_error(&body, "no model");
    let (status, body) = get(&format!("{base}/v2/models/payfraud")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_error(&body, "no model");
    let not_ready = json!({"name": "payfraud", "ready": false});
    assert_eq!(get(&format!("{base}/v2/models/payfraud/ready")).await, (StatusCode::SERVICE_UNAVAILABLE, not_ready));
    assert_eq!(
        get(&format!("{base}/v2/health/ready")).await,
        (StatusCode::SERVICE_UNAVAILABLE, json!({"ready": false}))
    );
    assert_eq!(get(&format!("{base}/v2/health/live")).await, (StatusCode::OK, json!({"live": true})));
    let (status, body) = get(&format!("{base}/v2/models/payfraud/versions/1/ready")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "no version in service yet");
}

/// `/infer` shares TF Serving's REST concurrency limit: beyond it, 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_beyond_the_rest_concurrency_limit_gets_429() {
    let s = serve_with(8 << 20, 1).await;
    let rows: Vec<Vec<f64>> = (0..4096).map(|_| demo_row()).collect();
    let body = infer_request(&rows).to_string();
    let url = format!("{}/v2/models/payfraud/infer", s.base);
    let refused = flood(&url, body, 16).await;
    for body in &refused {
        assert_error(&serde_json::from_str(body).unwrap(), "--max-rest-concurrency");
    }
}
