//! Model lifecycle on the real broker and S3 store: the trainer labels a
//! winner `stable` and a loser `canary`; `fraudstream models label` promotes,
//! `models rollback` goes back; running scorers follow the label within a
//! poll interval (backwards too) without dropping or re-scoring an event,
//! pinned scorers do not move, and a label on a corrupt version is refused
//! by `models label` and skipped by scorers. Shadow scoring (`--shadow
//! canary`): every event scored by the canary too, checked against it, and a
//! shadow that fails costs its batches their shadow scores, nothing else.

mod common;
#[path = "faults/harness.rs"]
mod harness;

use std::process::Command;
use std::time::Duration;

use fraudstream::model::{Label, Model, ModelStore};
use fraudstream::training::{run_once, train::TrainConfig, TrainerOptions};
use fraudstream::{Payment, ScoredPayment};
use harness::{payments, read_outputs, records, topic_for, verify_outputs, Scorer};

/// `fraudstream models ...` against `store`: success and what it printed.
fn models(store: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fraudstream"))
        .args(["models", "--model-store", store])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fraudstream models");
    let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

async fn train(store: &str, seed: u64, weak: bool) -> fraudstream::training::RunOutcome {
    let train = match weak {
        false => TrainConfig { seed, max_epochs: 8, ..TrainConfig::default() },
        true => TrainConfig { seed, max_epochs: 1, learning_rate: 1e-5, ..TrainConfig::default() },
    };
    let options = TrainerOptions {
        data: fraudstream::training::data::DataSource::Simulator { rows: 20_000, seed },
        model_store: store.to_string(),
        device: fraudstream::model::Device::Cpu,
        train,
        ..TrainerOptions::default()
    };
    run_once(&options).await.expect("training run")
}

async fn serving(scorer: &Scorer) -> String {
    format!("{}", scorer.metric("fraudstream_model_version").await as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn labels_promote_roll_back_and_pin() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store_url = common::s3_store();
    let v1 = train(&store_url, 81, false).await;
    assert_eq!(v1.label, Some(Label::Stable), "{}", v1.verdict);
    let v2 = train(&store_url, 82, true).await;
    assert_eq!(v2.label, Some(Label::Canary), "a loser is published as canary: {}", v2.verdict);
    let store = ModelStore::open(&store_url).await.unwrap();
    assert_eq!(store.label(Label::Stable).await.unwrap(), Some(v1.version.clone()));

    let (ok, listed) = models(&store_url, &["list"]);
    assert!(ok && listed.contains(&v1.version) && listed.contains("stable") && listed.contains("canary"), "{listed}");

    let topic = topic_for(&kafka, 2).await;
    let group = common::unique("group");
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &[]);
    let pinned_dir = tempfile::tempdir().unwrap();
    let pinned_topic = topic_for(&kafka, 1).await;
    let mut pinned = Scorer::spawn(
        &kafka,
        &pinned_topic,
        &store_url,
        &common::unique("group"),
        pinned_dir.path(),
        &["--model-version", &v1.version],
    );
    for s in [&mut scorer, &mut pinned] {
        s.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    }
    assert_eq!(serving(&scorer).await, v1.version, "stable, not the newer canary, serves");

    let sent = payments(30_000, 83);
    let publishing = common::publish_paced(&topic, records(&sent), 3_000);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Promote the canary: the scorer follows within its poll interval (300 ms).
    let (ok, out) = models(&store_url, &["label", &v2.version, "stable"]);
    assert!(ok, "{out}");
    let v2_version = v2.version.clone();
    scorer
        .wait_until("the promoted version to serve", Duration::from_secs(10), async |s| serving(s).await == v2_version)
        .await;
    // TF Serving's label routes answer for the version the label names.
    let status: serde_json::Value =
        reqwest::get(format!("{}/v1/models/payfraud/labels/stable", scorer.http)).await.unwrap().json().await.unwrap();
    assert_eq!(status["model_version_status"][0]["version"], serde_json::json!(v2.version), "{status}");
    let row: Vec<f64> = (0..28).map(|i| if [0, 5, 19, 26].contains(&i) { 0.5 } else { 0.0 }).collect();
    let predicted = reqwest::Client::new()
        .post(format!("{}/v1/models/payfraud/labels/stable:predict", scorer.http))
        .body(serde_json::json!({ "instances": [row] }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(predicted.status(), reqwest::StatusCode::OK);
    let canary = reqwest::get(format!("{}/v1/models/payfraud/labels/canary", scorer.http)).await.unwrap();
    assert_eq!(canary.status(), reqwest::StatusCode::NOT_FOUND, "no shadow model is loaded");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Roll back: stable returns to v1, and so does the scorer.
    let (ok, out) = models(&store_url, &["rollback"]);
    assert!(ok && out.contains(&format!("{} -> {}", v2.version, v1.version)), "{out}");
    let v1_version = v1.version.clone();
    scorer
        .wait_until("the rolled-back version to serve", Duration::from_secs(10), async |s| {
            serving(s).await == v1_version
        })
        .await;

    // A corrupt version: `models label` refuses it; set behind its back, scorers skip it.
    let corrupt = (v2.version.parse::<u64>().unwrap() + 100).to_string();
    let (manifest_dir, bad) = (dir.path().join("corrupt"), b"not a TorchScript module".to_vec());
    std::fs::create_dir_all(&manifest_dir).unwrap();
    let mut manifest = store.fetch(&v1.version, &[], &manifest_dir).await.unwrap().manifest;
    manifest.version = corrupt.clone();
    store.publish(&manifest, &[("model.pt", bad)]).await.unwrap();
    let (ok, out) = models(&store_url, &["label", &corrupt, "stable"]);
    assert!(!ok && out.contains(&corrupt) && out.contains("cannot carry a label"), "{out}");
    assert_eq!(store.label(Label::Stable).await.unwrap(), Some(v1.version.clone()), "the refused label did not move");
    let failures = scorer.metric("fraudstream_model_load_failures_total").await;
    store.set_label(Label::Stable, &corrupt).await.unwrap();
    scorer
        .wait_until("the corrupt version to be skipped", Duration::from_secs(10), async |s| {
            s.metric("fraudstream_model_load_failures_total").await > failures
        })
        .await;
    assert_eq!(serving(&scorer).await, v1.version, "a corrupt stable is skipped; the current model keeps serving");
    assert_eq!(serving(&pinned).await, v1.version, "a pinned scorer never moves");
    // A scorer that starts while stable is corrupt serves where stable was
    // before (v1), not the newest loadable version (v2, the canary that lost).
    let fresh_dir = tempfile::tempdir().unwrap();
    let mut fresh = Scorer::spawn(&kafka, &pinned_topic, &store_url, &common::unique("group"), fresh_dir.path(), &[]);
    fresh.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    assert_eq!(serving(&fresh).await, v1.version, "a broken stable at start falls back along its history");
    fresh.stop();

    publishing.await.unwrap();
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    scorer.stop();
    pinned.stop();
    let verified = verify_outputs(&sent, &outputs, &store_local(&store_url, dir.path()).await, "labels");
    assert_eq!((verified.outputs, verified.duplicates), (sent.len(), 0), "an event dropped or scored twice");
    assert!(
        verified.versions.contains_key(&v1.version) && verified.versions.contains_key(&v2.version),
        "both versions scored across the swaps: {:?}",
        verified.versions
    );
}

/// A local copy of the versions in `store_url`, for `verify_outputs`.
async fn store_local(store_url: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let store = ModelStore::open(store_url).await.unwrap();
    let local = dir.join("local-store");
    for version in store.list_versions().await.unwrap() {
        store.fetch(&version, &["model.pt"], &local.join("versions")).await.unwrap();
    }
    local
}

/// Checks every output's `shadow` against an independent scoring: outputs
/// of `serving_with_shadow` carry the scores of version `shadow` (P(fraud)
/// from the version loaded here, within 1e-5, and the decision by its own
/// bands), except the payments in `without` (a batch the shadow failed on);
/// every other output carries none. Returns how many carried one.
fn verify_shadows(
    outputs: &[rdkafka::message::OwnedMessage],
    store: &std::path::Path,
    serving_with_shadow: &str,
    shadow: &str,
    without: &std::collections::HashSet<String>,
) -> usize {
    use rdkafka::Message;
    let model = Model::load(&store.join("versions").join(shadow), tch::Device::Cpu).unwrap();
    let bands = model.manifest().bands();
    let scored: Vec<ScoredPayment> =
        outputs.iter().map(|m| harness::CODEC.decode_scored(m.payload().unwrap()).unwrap()).collect();
    let shadowed: Vec<&ScoredPayment> = scored.iter().filter(|s| s.shadow.is_some()).collect();
    let payments: Vec<Payment> = shadowed.iter().map(|s| s.payment.clone()).collect();
    let expected = model.score_payments(&payments).unwrap();
    for (s, want) in shadowed.iter().zip(expected) {
        let got = s.shadow.as_ref().unwrap();
        let id = &s.payment.payment_id;
        assert_eq!(
            s.model_version, serving_with_shadow,
            "payment {id}: a shadow score beside version {}",
            s.model_version
        );
        assert_eq!(got.model_version, shadow, "payment {id}: the shadow score of the wrong version");
        assert!(
            (got.fraud_probability - f64::from(want)).abs() <= 1e-5,
            "payment {id}: shadow P(fraud) {} but version {shadow} gives {want}",
            got.fraud_probability
        );
        assert_eq!(got.decision, bands.decide(got.fraud_probability), "payment {id}: not the shadow's own decision");
        assert_eq!(got.is_fraud, got.fraud_probability >= model.manifest().threshold, "payment {id}: isFraud");
        assert!(!without.contains(id), "payment {id}: a shadow score from a batch the shadow failed on");
    }
    for s in scored.iter().filter(|s| s.shadow.is_none()) {
        let id = &s.payment.payment_id;
        assert!(
            s.model_version != serving_with_shadow || without.contains(id),
            "payment {id}, scored by {}, has no shadow score",
            s.model_version
        );
    }
    shadowed.len()
}

/// `fraudstream score --shadow canary`: v1 stable serves, v2 canary is scored
/// beside it for EVERY event (checked against v2 loaded here), the REST API
/// lists both and answers for the canary; promoting v2 to stable makes it
/// serve and leaves no shadow (the label names the serving version), without
/// dropping or re-scoring an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_model_scores_every_event_until_it_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store_url = common::s3_store();
    let v1 = train(&store_url, 91, false).await;
    let v2 = train(&store_url, 92, true).await;
    assert_eq!((v1.label, v2.label), (Some(Label::Stable), Some(Label::Canary)), "{} / {}", v1.verdict, v2.verdict);
    let local = store_local(&store_url, dir.path()).await;

    let topic = topic_for(&kafka, 2).await;
    let mut scorer =
        Scorer::spawn(&kafka, &topic, &store_url, &common::unique("group"), dir.path(), &["--shadow", "canary"]);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    assert_eq!(serving(&scorer).await, v1.version);
    assert_eq!(shadowing(&scorer).await, v2.version, "the canary is loaded as the shadow before anything is read");

    // REST: the status lists both versions; the canary's label route answers for the shadow.
    let get =
        |path: String| async move { reqwest::get(path).await.unwrap().json::<serde_json::Value>().await.unwrap() };
    let status = get(format!("{}/v1/models/payfraud", scorer.http)).await;
    let listed: Vec<(&str, &str)> = status["model_version_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_str().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, [(v1.version.as_str(), "AVAILABLE"), (v2.version.as_str(), "AVAILABLE")], "{status}");
    let canary = get(format!("{}/v1/models/payfraud/labels/canary", scorer.http)).await;
    assert_eq!(canary["model_version_status"][0]["version"], serde_json::json!(v2.version), "{canary}");
    let sample = payments(3, 94);
    let instances = serde_json::json!({ "instances": sample });
    let score = |route: &str| {
        let url = format!("{}/v1/models/payfraud{route}:score", scorer.http);
        let body = instances.to_string();
        async move {
            let response = reqwest::Client::new().post(url).body(body).send().await.unwrap();
            assert_eq!(response.status(), reqwest::StatusCode::OK);
            let body: serde_json::Value = response.json().await.unwrap();
            serde_json::from_value::<Vec<ScoredPayment>>(body["predictions"].clone()).unwrap()
        }
    };
    let v2_model = Model::load(&local.join("versions").join(&v2.version), tch::Device::Cpu).unwrap();
    let v2_scores = v2_model.score_payments(&sample).unwrap();
    for (scored, want) in score("").await.iter().zip(&v2_scores) {
        let shadow = scored.shadow.as_ref().expect(":score carries the shadow's score");
        assert_eq!(
            (scored.model_version.as_str(), shadow.model_version.as_str()),
            (v1.version.as_str(), v2.version.as_str())
        );
        assert!((shadow.fraud_probability - f64::from(*want)).abs() <= 1e-5, "{scored:?} vs {want}");
        assert_eq!(shadow.is_fraud, shadow.fraud_probability >= v2_model.manifest().threshold, "{scored:?}");
    }
    for (scored, want) in score("/labels/canary").await.iter().zip(&v2_scores) {
        assert_eq!(scored.model_version, v2.version, "the canary's route is scored by the canary");
        assert!((scored.fraud_probability - f64::from(*want)).abs() <= 1e-5 && scored.shadow.is_none(), "{scored:?}");
    }

    let sent = payments(20_000, 93);
    let publishing = common::publish_paced(&topic, records(&sent), 4_000);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, out) = models(&store_url, &["label", &v2.version, "stable"]);
    assert!(ok, "{out}");
    let v2_version = v2.version.clone();
    scorer
        .wait_until("the promoted canary to serve", Duration::from_secs(10), async |s| serving(s).await == v2_version)
        .await;
    scorer.wait_until("the shadow to go", Duration::from_secs(10), async |s| shadowing(s).await == "0").await;
    let status = get(format!("{}/v1/models/payfraud", scorer.http)).await;
    assert_eq!(status["model_version_status"].as_array().unwrap().len(), 1, "only v2 is loaded: {status}");
    publishing.await.unwrap();

    // The canary moved to a corrupt version: skipped like any other (logged, counted), and no shadow.
    let store = ModelStore::open(&store_url).await.unwrap();
    let corrupt = (v2.version.parse::<u64>().unwrap() + 100).to_string();
    let mut manifest = store.fetch(&v1.version, &[], &dir.path().join("corrupt")).await.unwrap().manifest;
    manifest.version = corrupt.clone();
    store.publish(&manifest, &[("model.pt", b"not a TorchScript module".to_vec())]).await.unwrap();
    let failures = scorer.metric("fraudstream_model_load_failures_total").await;
    store.set_label(Label::Canary, &corrupt).await.unwrap();
    scorer
        .wait_until("the corrupt canary to be skipped", Duration::from_secs(10), async |s| {
            s.metric("fraudstream_model_load_failures_total").await > failures
        })
        .await;
    assert_eq!(shadowing(&scorer).await, "0", "no shadow while the canary names a corrupt version");
    assert_eq!(serving(&scorer).await, v2.version, "the serving model is untouched");
    let log = scorer.log();
    assert!(
        log.lines().any(|l| l.contains("rejected model version") && l.contains(&corrupt)),
        "the skip is not logged:\n{log}"
    );

    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    scorer.stop();
    let verified = verify_outputs(&sent, &outputs, &local, "shadow scoring");
    assert_eq!((verified.outputs, verified.duplicates), (sent.len(), 0), "an event dropped or scored twice");
    let by_v1 = verified.versions.get(&v1.version).copied().unwrap_or(0);
    assert!(by_v1 > 0 && verified.versions.contains_key(&v2.version), "both versions served: {:?}", verified.versions);
    let shadowed = verify_shadows(&outputs, &local, &v1.version, &v2.version, &Default::default());
    assert_eq!(shadowed, by_v1, "every event v1 scored was also scored by the shadow");
}

/// A shadow model that fails on a batch (raises, or returns something that
/// is not a probability) is an experiment gone wrong, not a reason to stop:
/// the batch is emitted with `shadow: null`, counted and logged; the
/// serving model's outputs are all there and right, and the scorer stops
/// cleanly. Chosen with FRAUDSTREAM_SHADOW (the flag's environment fallback).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_shadow_leaves_its_batches_without_shadow_scores() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = harness::local_model(dir.path()).await;
    let (good, manifest) = harness::only_version(&store);
    // The shadow raises on amounts far above anything it was trained on and
    // doubles its outputs (not probabilities) on amounts a little less far.
    let amount_max = manifest["feature_spec"]["amount_max"].as_f64().unwrap();
    let failing = harness::python_model(
        &store.join("versions").join(good.to_string()).join("model.pt"),
        "        if bool((payments[:, 0] > 5.0).any()):\n            raise RuntimeError(\"injected shadow failure\")\n        \
         if bool((payments[:, 0] > 2.0).any()):\n            return self.inner(payments) * 2.0\n        return self.inner(payments)",
        &dir.path().join("failing.pt"),
    );
    // Unclipped amounts (as `--amount-scale fit` writes them), so the markers reach the failures.
    let shadow = good + 10;
    harness::publish_version(&store, &manifest, shadow, &failing, |m| {
        m["feature_spec"]["amount_clip"] = serde_json::json!(false)
    });
    let labels = ModelStore::open(&store.display().to_string()).await.unwrap();
    labels.set_label(Label::Stable, &good.to_string()).await.unwrap();
    labels.set_label(Label::Canary, &shadow.to_string()).await.unwrap();

    let topic = topic_for(&kafka, 2).await;
    let mut sent = payments(6_000, 95);
    let mut markers = std::collections::HashSet::new();
    for (at, times) in [(1_000, 10.0), (4_000, 3.0)] {
        let marker = Payment { amount: amount_max * times, ..sent[at].clone() };
        markers.insert(format!("{}-marker", marker.payment_id));
        sent.insert(at, Payment { payment_id: format!("{}-marker", marker.payment_id), ..marker });
    }
    let store_url = store.display().to_string();
    let group = common::unique("group");
    let env = [("FRAUDSTREAM_SHADOW", "canary")];
    let extra = ["--max-batch", "256"];
    let mut scorer = Scorer::spawn_with_env(&kafka, &topic, &store_url, &group, dir.path(), &extra, &env);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    assert_eq!(shadowing(&scorer).await, shadow.to_string());
    common::publish(&common::input_producer(), &topic, &records(&sent)).await;
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    let failures = scorer.metric("fraudstream_shadow_failures_total").await;
    let log = scorer.log();
    scorer.stop();
    assert!(failures >= 1.0, "no shadow failure counted:\n{log}");
    assert!(log.contains("the shadow model failed") && log.contains("injected shadow failure"), "{log}");
    let verified = verify_outputs(&sent, &outputs, &store, "a failing shadow");
    assert_eq!((verified.outputs, verified.duplicates), (sent.len(), 0));
    assert_eq!(verified.versions.keys().collect::<Vec<_>>(), [&good.to_string()], "only the serving model decides");

    // The batches of the markers leave without shadow scores; all others carry the shadow's.
    let scored: Vec<ScoredPayment> =
        outputs.iter().map(|m| harness::CODEC.decode_scored(rdkafka::Message::payload(m).unwrap()).unwrap()).collect();
    let without: std::collections::HashSet<String> =
        scored.iter().filter(|s| s.shadow.is_none()).map(|s| s.payment.payment_id.clone()).collect();
    assert!(markers.is_subset(&without), "a marker has a shadow score");
    // A forward pass takes jobs (of up to --max-batch payments each) while it holds fewer than
    // --max-batch: at most 2 x 256 - 1 payments.
    let (passes, most) = (markers.len(), 2 * 256 - 1);
    assert!(
        without.len() <= passes * most,
        "{} outputs lost their shadow scores, more than the markers' passes",
        without.len()
    );
    let shadowed = verify_shadows(&outputs, &store, &good.to_string(), &shadow.to_string(), &without);
    assert_eq!(shadowed + without.len(), sent.len());
    assert!(shadowed > 0, "no batch kept its shadow scores");
}

async fn shadowing(scorer: &Scorer) -> String {
    format!("{}", scorer.metric("fraudstream_shadow_model_version").await as u64)
}
