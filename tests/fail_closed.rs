//! Fail closed, on the real `fraudstream score` binary against Apache Kafka:
//! when something of ours fails (the model, the producer), the scorer stops,
//! dead-letters no valid payment, commits nothing past what it scored, says
//! why, and exits non-zero; a restart with the cause fixed scores the rest.
//! Also: the model versions a scorer refuses to serve, the dead-letter
//! guard, and an input topic created after the scorer started.

mod common;
#[path = "faults/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use fraudstream::kafka::KafkaArgs;
use fraudstream::model::sha256_hex;
use fraudstream::Payment;
use harness::{
    local_model, model_bytes, only_version, payments, publish_version, python_model, read_outputs, records, topic_for,
    verify_outputs, Scorer, Setup,
};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use serde_json::Value;

/// Waits for the scorer to exit on its own.
fn wait_exit(scorer: &mut Scorer, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = scorer.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the scorer did not exit within {timeout:?}:\n{}", scorer.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every input offset, by partition, with the payment id it carries.
async fn input_ids(kafka: &KafkaArgs, topic: &str, count: usize) -> HashMap<(i32, i64), String> {
    let messages = common::read_topic(kafka, topic, Duration::from_secs(5), |m| m.len() >= count).await;
    messages
        .iter()
        .filter_map(|m| {
            let id = harness::CODEC.decode_payment(m.payload()?).ok()?.payment_id;
            Some(((m.partition(), m.offset()), id))
        })
        .collect()
}

/// The group's committed offset of each partition (absent: nothing committed).
fn committed(kafka: &KafkaArgs, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = kafka.client_config(&[("group.id", group)]).create().unwrap();
    let mut wanted = TopicPartitionList::new();
    for p in 0..partitions {
        wanted.add_partition(topic, p);
    }
    let list = consumer.committed_offsets(wanted, Duration::from_secs(10)).expect("committed offsets");
    let offsets = list
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect();
    drop(list);
    offsets
}

fn output_ids(messages: &[OwnedMessage]) -> std::collections::HashSet<String> {
    messages
        .iter()
        .filter_map(|m| harness::CODEC.decode_scored(m.payload()?).ok())
        .map(|s| s.payment.payment_id)
        .collect()
}

/// Nothing committed past an event without an output: every input offset
/// below each partition's committed offset has its output.
async fn assert_nothing_committed_past_unscored(
    kafka: &KafkaArgs,
    group: &str,
    topic: &str,
    partitions: i32,
    sent: usize,
) {
    let inputs = input_ids(kafka, topic, sent).await;
    let outputs = common::read_topic(kafka, &format!("{topic}-out"), Duration::from_secs(5), |_| false).await;
    let scored = output_ids(&outputs);
    for (partition, position) in committed(kafka, group, topic, partitions) {
        let unscored: Vec<i64> =
            (0..position).filter(|o| inputs.get(&(partition, *o)).is_some_and(|id| !scored.contains(id))).collect();
        assert!(
            unscored.is_empty(),
            "partition {partition} committed up to {position} past unscored offsets {:?}",
            &unscored[..unscored.len().min(5)]
        );
    }
}

/// A forward pass that fails on one valid payment: the scorer exits
/// non-zero, dead-letters nothing, commits nothing past the last scored
/// event; restarted on a working version, it scores the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_model_stops_the_scorer_without_dead_letters_or_commits_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = local_model(dir.path()).await;
    let (good, manifest) = only_version(&store);
    // Version good+10 raises on amounts far above anything it was trained on.
    let amount_max = manifest["feature_spec"]["amount_max"].as_f64().unwrap();
    let failing = python_model(
        &store.join("versions").join(good.to_string()).join("model.pt"),
        "        if bool((payments[:, 0] > 5.0).any()):\n            raise RuntimeError(\"injected failure\")\n        return self.inner(payments)",
        &dir.path().join("failing.pt"),
    );
    // Unclipped amounts (as `--amount-scale fit` writes them), so the marker reaches the failure.
    publish_version(&store, &manifest, good + 10, &failing, |m| {
        m["feature_spec"]["amount_clip"] = serde_json::json!(false)
    });

    let topic = topic_for(&kafka, 2).await;
    let group = common::unique("group");
    let mut sent = payments(4_000, 51);
    let marker = Payment { amount: amount_max * 10.0, ..sent[2_000].clone() };
    sent.insert(2_000, Payment { payment_id: format!("{}-marker", marker.payment_id), ..marker });
    let store_url = store.display().to_string();
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &[]);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    common::publish(&common::input_producer(), &topic, &records(&sent)).await;
    let status = wait_exit(&mut scorer, Duration::from_secs(60));
    let log = scorer.log();
    assert!(!status.success(), "the scorer exited 0 after its model failed:\n{log}");
    assert!(log.contains("pipeline failed") && log.contains("injected failure"), "the log does not say why:\n{log}");
    let dlq = common::read_topic(&kafka, &format!("{topic}-dlq"), Duration::from_secs(3), |_| false).await;
    assert!(dlq.is_empty(), "{} valid payments were dead-lettered for a failure of the model", dlq.len());
    assert_nothing_committed_past_unscored(&kafka, &group, &topic, 2, sent.len()).await;

    // Restarted on the working version, it scores everything, the marker too.
    let scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &["--model-version", &good.to_string()]);
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    scorer.stop();
    let verified = verify_outputs(&sent, &outputs, &store, "a failing model, then a restart");
    assert!(verified.versions.contains_key(&good.to_string()), "the restart scored nothing: {:?}", verified.versions);
}

/// An output the producer refuses to enqueue (over its message.max.bytes):
/// the scorer stops with that reason instead of skipping the record, and its
/// partition does not move past it; with the limit raised it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_output_too_large_to_send_stops_the_scorer_and_its_partition_is_not_skipped() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(1).await;
    let mut sent = payments(1_000, 52);
    // A valid payment with a 200 KB merchant name: its output exceeds 100 KB.
    sent[500].merchant = "M".repeat(200_000);
    let limit = ["-X", "message.max.bytes=100000"];
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &limit);
    common::publish(&common::input_producer(), &topic, &records(&sent)).await;
    let status = wait_exit(&mut scorer, Duration::from_secs(60));
    let log = scorer.log();
    assert!(!status.success(), "exited 0 with an output it could not send:\n{log}");
    assert!(log.contains("cannot enqueue") && log.contains("message.max.bytes"), "no reason in the log:\n{log}");
    let position = committed(&kafka, &group, &topic, 1).get(&0).copied().unwrap_or(0);
    assert!(position <= 500, "committed {position}, past the unsent offset 500");
    let dlq = common::read_topic(&kafka, &format!("{topic}-dlq"), Duration::from_secs(3), |_| false).await;
    assert!(dlq.is_empty(), "a valid payment was dead-lettered");

    let scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &["-X", "message.max.bytes=1000000"]);
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    scorer.stop();
    verify_outputs(&sent, &outputs, &store, "an oversized output, then a raised limit");
}

/// Versions a scorer refuses, newest first at start: a forward pass that
/// never finishes within the load timeout, a threshold that is not a
/// probability, a manifest copied into another version's folder, files that
/// do not match their manifest's hashes (a mixed publish), a truncated
/// model. It serves the newest valid version and says which it skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_newest_valid_version_serves_and_broken_newer_ones_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = local_model(dir.path()).await;
    let (good, manifest) = only_version(&store);
    let bytes = model_bytes(&store, good);
    let good_model = store.join("versions").join(good.to_string()).join("model.pt");
    let truncated = &bytes[..bytes.len() / 3];
    publish_version(&store, &manifest, good + 1, truncated, |_| {});
    // A mixed publish: the manifest vouches for other bytes than model.pt's.
    publish_version(&store, &manifest, good + 2, &bytes, |m| m["files"]["model.pt"] = sha256_hex(truncated).into());
    // A manifest that says it is another version.
    publish_version(&store, &manifest, good + 3, &bytes, |m| m["version"] = serde_json::json!(good.to_string()));
    publish_version(&store, &manifest, good + 4, &bytes, |m| m["threshold"] = serde_json::json!(1.5));
    let slow = python_model(
        &good_model,
        "        x = payments\n        for _ in range(2000000):\n            x = x * 1.0\n        return self.inner(x)",
        &dir.path().join("slow.pt"),
    );
    publish_version(&store, &manifest, good + 5, &slow, |_| {});
    let topic = topic_for(&kafka, 1).await;
    let mut scorer = Scorer::spawn(
        &kafka,
        &topic,
        &store.display().to_string(),
        &common::unique("group"),
        dir.path(),
        &["--model-load-timeout", "2s"],
    );
    scorer.wait_until("ready", Duration::from_secs(90), async |s| s.ready().await).await;
    let status: Value =
        reqwest::get(format!("{}/v1/models/payfraud", scorer.http)).await.unwrap().json().await.unwrap();
    assert_eq!(status["model_version_status"][0]["version"], serde_json::json!(good.to_string()));
    assert!(scorer.metric("fraudstream_model_load_failures_total{reason=\"invalid\"}").await >= 5.0);
    let log = scorer.log();
    for (offset, why) in
        [(5, "longer than"), (4, "threshold 1.5"), (3, "says version"), (2, "sha256"), (1, "cannot load")]
    {
        let version = (good + offset).to_string();
        assert!(
            log.lines().any(|l| l.contains("rejected model version") && l.contains(&version) && l.contains(why)),
            "version {version} not rejected for {why:?}:\n{log}"
        );
    }
    let sent = payments(1_000, 53);
    common::publish(&common::input_producer(), &topic, &records(&sent)).await;
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(20)).await;
    scorer.stop();
    verify_outputs(&sent, &outputs, &store, "broken newer versions skipped");
}

/// A trainer whose newest published version does not load publishes anyway
/// (no --force needed): a broken champion must not block its own fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_trainer_replaces_a_champion_that_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_model(dir.path()).await;
    let (good, manifest) = only_version(&store);
    let bytes = model_bytes(&store, good);
    publish_version(&store, &manifest, good + 1, &bytes[..bytes.len() / 2], |_| {});
    let outcome = common::train_and_publish(&store.display().to_string(), 20_000, 12, false).await;
    assert!(outcome.published, "not published over a broken champion: {}", outcome.verdict);
    assert!(outcome.champion.is_none(), "a champion that does not load was compared against");
}

/// A topic of garbage (a producer upstream switched formats): the guard stops
/// the scorer long before the whole topic is dead-lettered and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dead_letter_guard_stops_a_scorer_fed_only_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = local_model(dir.path()).await;
    let topic = topic_for(&kafka, 1).await;
    let group = common::unique("group");
    let garbage: Vec<(String, Vec<u8>)> =
        (0..5_000).map(|i| (format!("k{i}"), format!("{{\"v\":{i}}}").into_bytes())).collect();
    common::publish(&common::input_producer(), &topic, &garbage).await;
    let mut scorer = Scorer::spawn(
        &kafka,
        &topic,
        &store.display().to_string(),
        &group,
        dir.path(),
        &["--dlq-max-consecutive", "500"],
    );
    let status = wait_exit(&mut scorer, Duration::from_secs(60));
    let log = scorer.log();
    assert!(!status.success(), "exited 0:\n{log}");
    assert!(log.contains("dead-lettered") && log.contains("--dlq-max-consecutive"), "no reason in the log:\n{log}");
    let dlq = common::read_topic(&kafka, &format!("{topic}-dlq"), Duration::from_secs(3), |_| false).await;
    assert!(dlq.len() < 500, "{} dead letters, the limit is 500 in a row", dlq.len());
    let position = committed(&kafka, &group, &topic, 1).get(&0).copied().unwrap_or(0);
    assert!(position < 500, "committed {position} of 5,000 garbage events");
}

/// A scorer started before its input topic exists says so on /readyz and
/// picks the topic up within seconds of its creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_input_topic_created_after_start_is_picked_up_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = local_model(dir.path()).await;
    let topic = common::unique("late");
    let out: Vec<String> = ["out", "dlq"].iter().map(|s| format!("{topic}-{s}")).collect();
    fraudstream::kafka::ensure_topics(&kafka, &[&out[0], &out[1]], 1).await.unwrap();
    let mut scorer =
        Scorer::spawn(&kafka, &topic, &store.display().to_string(), &common::unique("group"), dir.path(), &[]);
    scorer
        .wait_until("/readyz to say the topic is missing", Duration::from_secs(60), async |s| {
            let Ok(response) = reqwest::get(format!("{}/readyz", s.http)).await else { return false };
            let status = response.status();
            let body: Value = response.json().await.unwrap_or_default();
            status == 503 && body["reason"].as_str().is_some_and(|r| r.contains("does not exist"))
        })
        .await;
    fraudstream::kafka::ensure_topics(&kafka, &[&topic], 2).await.unwrap();
    let created = Instant::now();
    let sent = payments(1_000, 54);
    common::publish(&common::input_producer(), &topic, &records(&sent)).await;
    let outputs = read_outputs(&kafka, &out[0], &sent, Duration::from_secs(30)).await;
    let took = created.elapsed();
    assert!(scorer.ready().await);
    scorer.stop();
    verify_outputs(&sent, &outputs, &store, "an input topic created after start");
    assert!(took < Duration::from_secs(20), "took {took:?} to pick up the new topic");
}
