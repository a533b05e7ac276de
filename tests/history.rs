//! History features on the real broker: the features the scorer computes
//! online equal, exactly, those the trainer computes offline for the same
//! stream, across a rebalance (a second member joins), a crash (`kill -9`)
//! and a restart mid-stream, each of which makes a member rebuild the
//! partitions it gains from the input topic before scoring them.

mod common;
#[path = "faults/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use fraudstream::feature_log::FeatureLine;
use fraudstream::features::FeatureSet;
use fraudstream::model::{Model, ModelStore};
use fraudstream::training::{data::DataSource, run_once, train::TrainConfig, TrainerOptions};
use fraudstream::{Payment, Simulator};
use harness::{read_outputs, records, Scorer, CODEC};

/// A model on the history feature set, published to a local store.
async fn history_model(store: &Path) -> Model {
    let url = store.display().to_string();
    let outcome = run_once(&TrainerOptions {
        data: DataSource::Simulator { rows: 60_000, seed: 71 },
        model_store: url.clone(),
        device: fraudstream::model::Device::Cpu,
        features: FeatureSet::History,
        train: TrainConfig { seed: 71, max_epochs: 6, ..TrainConfig::default() },
        ..TrainerOptions::default()
    })
    .await
    .expect("training on history features");
    assert!(outcome.published);
    let dir = ModelStore::open(&url).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let files = dir.fetch(&outcome.version, &[fraudstream::model::MODEL_FILE], work.path()).await.unwrap();
    Model::load(&files.dir, tch::Device::Cpu).expect("loading the history model")
}

/// `:score` on each member for a new payment of the stream's last customer:
/// the member that owns the customer's partition answers from its history
/// (the trainer's features for that payment after the whole stream), twice
/// alike (REST does not record); `:predict` rows cannot carry the history.
async fn rest_reads_the_history_without_recording(model: &Model, sent: &[Payment], members: [&Scorer; 2]) -> f64 {
    let last = sent.last().unwrap();
    let next =
        Payment { payment_id: "rest-1".into(), event_time: last.event_time + 1000, amount: 321.0, ..last.clone() };
    let mut stream: Vec<Payment> = sent.to_vec();
    stream.push(next.clone());
    let want = f64::from(*model.score_payments(&stream).unwrap().last().unwrap());
    let as_new = f64::from(model.score_payments(std::slice::from_ref(&next)).unwrap()[0]);
    assert!((want - as_new).abs() > 1e-6, "the customer's history does not move this payment's score");
    let client = reqwest::Client::new();
    let mut owners = 0;
    for member in members {
        let url = format!("{}/v1/models/payfraud:score", member.http);
        let mut answers = Vec::new();
        for _ in 0..2 {
            let body = serde_json::json!({"instances": [serde_json::to_value(&next).unwrap()]});
            let response = client.post(&url).json(&body).send().await.unwrap();
            assert!(response.status().is_success());
            let body: serde_json::Value = response.json().await.unwrap();
            answers.push(body["predictions"][0]["fraudProbability"].as_f64().unwrap());
        }
        assert_eq!(answers[0], answers[1], "a REST request changed the history");
        if (answers[0] - want).abs() <= 1e-6 {
            owners += 1;
        } else {
            assert!((answers[0] - as_new).abs() <= 1e-6, "neither the customer's history nor none: {answers:?}");
        }
        let predict = format!("{}/v1/models/payfraud:predict", member.http);
        let response =
            client.post(&predict).json(&serde_json::json!({"instances": [vec![0.0f32; 28]]})).send().await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::BAD_REQUEST);
        assert!(response.text().await.unwrap().contains("history"));
    }
    assert_eq!(owners, 1, "exactly one member owns the customer's partition");
    want
}

/// Every line of the feature logs in `dir` (a line cut short by `kill -9` is skipped).
fn feature_lines(dir: &Path) -> (Vec<FeatureLine>, usize) {
    let (mut lines, mut cut) = (Vec::new(), 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "features") {
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                match serde_json::from_str::<FeatureLine>(line) {
                    Ok(line) => lines.push(line),
                    Err(_) => cut += 1,
                }
            }
        }
    }
    (lines, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn online_features_equal_the_trainers_across_a_rebalance_a_crash_and_a_restart() {
    let (dir, kafka) = (tempfile::tempdir().unwrap(), common::kafka());
    let (topic, group) = (harness::topic_for(&kafka, 4).await, common::unique("group"));
    let store = dir.path().join("history-models");
    let model = history_model(&store).await;
    let store_url = store.display().to_string();
    // The stream in event-time order, as producers write it; unlabelled, as live traffic.
    let mut sent: Vec<Payment> = Simulator::new(120_000, 72).map(|p| Payment { fraud: None, ..p }).collect();
    sent.sort_by_key(|p| p.event_time);
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let log_arg = |name: &str| logs.join(format!("{name}.features")).display().to_string();
    let (a_log, b_log) = (log_arg("a"), log_arg("b"));

    let publishing = common::publish_paced(&topic, records(&sent), 6_000);
    let mut a = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &["--feature-log", &a_log]);
    a.wait_until("20,000 outputs", Duration::from_secs(120), async |s| {
        s.metric("fraudstream_events_out_total").await >= 20_000.0
    })
    .await;
    // A rebalance: a second member joins and rebuilds the partitions it gets.
    let mut b = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &["--feature-log", &b_log]);
    b.wait_until("the new member to score", Duration::from_secs(60), async |s| {
        s.assigned_partitions().await == Some(2) && s.metric("fraudstream_events_out_total").await >= 2_000.0
    })
    .await;
    // A crash: the survivor gains the crashed member's partitions mid-stream.
    a.kill9();
    b.wait_until("the survivor to own all 4 partitions", Duration::from_secs(60), async |s| {
        s.assigned_partitions().await == Some(4)
    })
    .await;
    // A restart: the crashed member comes back and rebuilds what it gets.
    let mut a = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &["--feature-log", &a_log]);
    a.wait_until("the restarted member to score", Duration::from_secs(60), async |s| {
        s.assigned_partitions().await == Some(2) && s.metric("fraudstream_events_out_total").await >= 1_000.0
    })
    .await;
    assert!(!publishing.is_finished(), "the stream ended before the restart; pace it slower");
    publishing.await.unwrap();
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    let rebuilt_by_b = b.metric("fraudstream_history_rebuild_records_total").await;
    let rebuilt_by_a = a.metric("fraudstream_history_rebuild_records_total").await;
    let rebuilds = b.metric("fraudstream_history_rebuild_seconds_count").await;
    let rest = rest_reads_the_history_without_recording(&model, &sent, [&a, &b]).await;
    a.stop();
    b.stop();

    // What the trainer computes offline for the same stream.
    let history = fraudstream::history::offline(&sent);
    let mut expected = Vec::new();
    model.encoder().encode_all_with(&sent, Some(&history), &mut expected).unwrap();
    let width = model.encoder().width();
    assert_eq!(width, 39);
    let index: HashMap<&str, usize> = sent.iter().enumerate().map(|(i, p)| (p.payment_id.as_str(), i)).collect();

    let (lines, cut) = feature_lines(&logs);
    assert!(cut <= 1, "{cut} unreadable feature-log lines; only the one kill -9 may cut one short");
    let mut logged = vec![0u32; sent.len()];
    let mut mismatches = Vec::new();
    for line in &lines {
        let i = index[line.payment_id.as_str()];
        logged[i] += 1;
        let want = &expected[i * width..(i + 1) * width];
        // Exactly: the same bits, not merely close.
        if line.features.iter().map(|f| f.to_bits()).ne(want.iter().map(|f| f.to_bits())) {
            mismatches.push((
                line.payment_id.clone(),
                line.partition,
                line.offset,
                line.features.clone(),
                want.to_vec(),
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} logged rows differ from the trainer's, e.g. {:?}",
        mismatches.len(),
        lines.len(),
        &mismatches[..mismatches.len().min(2)]
    );
    let missing = logged.iter().filter(|n| **n == 0).count();
    assert_eq!(missing, 0, "{missing} payments have no logged row");
    let twice = logged.iter().filter(|n| **n > 1).count();
    // The payments a member had scored but not committed when it crashed or
    // gave partitions away were scored again elsewhere, after a rebuild: those rows agree too.
    println!(
        "{} rows logged for {} payments ({twice} scored twice); {rebuilds} rebuilds by the survivor",
        lines.len(),
        sent.len()
    );
    assert!(rebuilt_by_b > 0.0 && rebuilt_by_a > 0.0, "members rebuilt nothing: {rebuilt_by_b}, {rebuilt_by_a}");

    // And every output's score is the model's on the trainer's features.
    let scores = model.fraud_probabilities(&expected, sent.len()).unwrap();
    let mut checked = 0;
    for m in &outputs {
        let s = CODEC.decode_scored(rdkafka::Message::payload(m).unwrap()).unwrap();
        let want = f64::from(scores[index[s.payment.payment_id.as_str()]]);
        assert!(
            (s.fraud_probability - want).abs() <= 1e-6,
            "payment {} scored {} online, {want} on the trainer's features",
            s.payment.payment_id,
            s.fraud_probability
        );
        checked += 1;
    }
    assert!(checked >= sent.len());
    assert!(rest > 0.0);
}
