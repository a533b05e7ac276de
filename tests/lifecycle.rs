//! Model lifecycle on the real broker and S3 store: the trainer labels a
//! winner `stable` and a loser `canary`; `fraudstream models label` promotes,
//! `models rollback` goes back; running scorers follow the label within a
//! poll interval (backwards too) without dropping or re-scoring an event,
//! pinned scorers do not move, and a label on a corrupt version is refused
//! by `models label` and skipped by scorers.

mod common;
#[path = "faults/harness.rs"]
mod harness;

use std::process::Command;
use std::time::Duration;

use fraudstream::model::{Label, ModelStore};
use fraudstream::training::{run_once, train::TrainConfig, TrainerOptions};
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
