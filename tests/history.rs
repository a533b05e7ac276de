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
use fraudstream::history::{Position, Replay, ReplayError};
use fraudstream::model::{Model, ModelStore};
use fraudstream::scoring::ScoringService;
use fraudstream::training::{data::DataSource, run_once, train::TrainConfig, TrainerOptions};
use fraudstream::{Payment, Simulator};
use harness::{read_outputs, records, Scorer, CODEC};

/// A model on the history feature set, published to a local store.
async fn history_model(store: &Path) -> Model {
    trained(store, FeatureSet::History).await
}

/// A model on `features`, published to a local store.
async fn trained(store: &Path, features: FeatureSet) -> Model {
    let url = store.display().to_string();
    let outcome = run_once(&TrainerOptions {
        data: DataSource::Simulator { rows: 60_000, seed: 71 },
        model_store: url.clone(),
        device: fraudstream::model::Device::Cpu,
        features,
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

/// The reasons for `payment` computed here from the trainer's `row`: the
/// payment's four groups and the two history groups, written out.
fn reasons_on_the_trainers_row(model: &Model, payment: &Payment, row: &[f32]) -> Vec<(String, String, f64)> {
    let count = |x: f32| f64::from(x).exp_m1().round();
    let mut groups = common::payment_groups(payment);
    let history = format!(
        "{} payments in the last day, {} in 7 days, {} in 30 days",
        count(row[28]),
        count(row[29]),
        count(row[30])
    );
    groups.push(("customer_history", 28..38, history));
    groups.push(("merchant", 38..39, format!("{} ({:.1}% fraud in training)", payment.merchant, 100.0 * row[38])));
    common::reasons_of_row(model, row, &groups)
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
    let (mut checked, mut explained, mut by_history) = (0, 0, 0);
    for m in &outputs {
        let s = CODEC.decode_scored(rdkafka::Message::payload(m).unwrap()).unwrap();
        let want = f64::from(scores[index[s.payment.payment_id.as_str()]]);
        assert!(
            (s.fraud_probability - want).abs() <= 1e-6,
            "payment {} scored {} online, {want} on the trainer's features",
            s.payment.payment_id,
            s.fraud_probability
        );
        if !s.reasons.is_empty() {
            let i = index[s.payment.payment_id.as_str()];
            let expected = reasons_on_the_trainers_row(&model, &s.payment, &expected[i * width..(i + 1) * width]);
            common::assert_reasons(&s.reasons, &expected, &format!("payment {}", s.payment.payment_id));
            explained += 1;
            by_history += usize::from(s.reasons.iter().any(|r| r.feature == "customer_history"));
        }
        checked += 1;
    }
    println!("{explained} outputs with reasons, {by_history} of them naming the customer's history");
    assert!(explained > 0 && by_history > 0, "no reasons ({explained}), or none from the history ({by_history})");
    assert!(checked >= sent.len());
    assert!(rest > 0.0);
}

/// The input topic, in memory: payments per partition, each at its index.
struct Topic(HashMap<i32, Vec<Payment>>, std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Replay for Topic {
    fn replay(
        &mut self,
        partition: i32,
        until: i64,
        _since_ms: i64,
        visit: &mut dyn FnMut(&Payment),
    ) -> Result<u64, ReplayError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let read = &self.0[&partition][..until as usize];
        read.iter().for_each(visit);
        Ok(read.len() as u64)
    }
}

/// A scorer serving a 28-feature version keeps no history; the first batch
/// after a swap to a history version must still get its customers' features
/// (rebuilt then), never a payment refused for lack of them; a new
/// assignment (epoch) rebuilds again. Scores equal the trainer's rows'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_to_a_history_version_rebuilds_before_its_first_batch() {
    let dir = tempfile::tempdir().unwrap();
    let payment_model = trained(&dir.path().join("payment"), FeatureSet::Payment).await;
    let history_model = trained(&dir.path().join("history"), FeatureSet::History).await;
    let mut stream: Vec<Payment> = Simulator::new(20_000, 73).map(|p| Payment { fraud: None, ..p }).collect();
    stream.sort_by_key(|p| p.event_time);
    let offline = fraudstream::history::offline(&stream);
    let want = history_model.score_payments_with(&stream, &offline).unwrap();
    // Two partitions by customer; a payment's offset is its index in its partition.
    let mut partitions: HashMap<i32, Vec<Payment>> = HashMap::new();
    let mut at = Vec::new();
    for p in &stream {
        let partition = i32::from(p.customer.bytes().fold(0u8, u8::wrapping_add) % 2);
        let list = partitions.entry(partition).or_default();
        at.push((partition, list.len() as i64));
        list.push(p.clone());
    }
    let rebuilds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let scoring = ScoringService::start(1024, 64);
    scoring.swap(payment_model).await.unwrap();
    scoring.set_replay(Some(Box::new(Topic(partitions, rebuilds.clone())))).await.unwrap();
    let submit = async |range: std::ops::Range<usize>, epoch: u64| {
        let positions = range.clone().map(|i| Position { partition: at[i].0, offset: at[i].1, epoch }).collect();
        scoring.submit_stream(stream[range].to_vec(), positions).await.unwrap().await.unwrap().unwrap()
    };
    let first = submit(0..5_000, 1).await;
    assert!(first.results.iter().all(Result::is_ok));
    assert_eq!(rebuilds.load(std::sync::atomic::Ordering::Relaxed), 0, "a 28-feature version keeps no history");
    // The swap and the next batch, queued back to back.
    let swap = scoring.swap(history_model);
    let (swapped, next) = tokio::join!(swap, submit(5_000..10_000, 1));
    swapped.unwrap();
    let mut scored = 0;
    for (batch, start) in
        [(next, 5_000), (submit(10_000..15_000, 1).await, 10_000), (submit(15_000..20_000, 2).await, 15_000)]
    {
        for (k, result) in batch.results.iter().enumerate() {
            let i = start + k;
            if batch.model.feature_spec.history.is_none() {
                continue; // queued before the swap
            }
            let p = result.as_ref().unwrap_or_else(|e| panic!("payment {i} refused after the swap: {e}"))[1];
            assert!((p - want[i]).abs() <= 1e-6, "payment {i}: {p} online, {} on the trainer's row", want[i]);
            scored += 1;
        }
    }
    assert!(scored >= 10_000, "{scored} payments scored by the history version");
    // One rebuild per partition after the swap, and again under the new epoch.
    assert_eq!(rebuilds.load(std::sync::atomic::Ordering::Relaxed), 4);
}
