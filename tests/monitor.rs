//! The learning loop's join on the real broker and store: payments go out
//! with their labels following on a labels topic; a scorer scores them; the
//! monitor joins scores with labels, is killed (SIGKILL) mid-stream and
//! restarted, and in the end every labelled payment is in the labelled
//! topic exactly as it was scored and with its true label; the restarted
//! monitor rebuilt the joins it had committed (without writing them again)
//! and its live precision, recall, AP and ROC-AUC equal an independent
//! computation over the labelled topic, for the serving version and for the
//! canary scoring beside it in shadow; bad labels are dead-lettered. Then
//! the trainer retrains on the labelled topic (`kafka://`) and the running
//! scorer swaps the new version in.

mod common;
#[path = "faults/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fraudstream::codec::{Codec, WireFormat, PAYMENT_LABEL_SCHEMA_ID};
use fraudstream::kafka::{ensure_topics, KafkaArgs};
use fraudstream::produce::{create_producer, publish_payments, LabelStream, PublishOptions};
use fraudstream::{Payment, PaymentLabel, ScoredPayment, Simulator};
use harness::{free_port, topic_for, Scorer, CODEC};
use rdkafka::Message;

/// A `fraudstream monitor` child process.
struct Monitor {
    child: Child,
    http: String,
    log: std::path::PathBuf,
}

impl Monitor {
    fn spawn(kafka: &KafkaArgs, topic: &str, group: &str, dir: &Path) -> Self {
        Self::spawn_with(kafka, topic, group, dir, &[])
    }

    fn spawn_with(kafka: &KafkaArgs, topic: &str, group: &str, dir: &Path, extra: &[&str]) -> Self {
        let port = free_port();
        let log = dir.join(format!("monitor-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_fraudstream"))
            .args(["monitor", "--brokers", &kafka.brokers, "--group-id", group])
            .args(["--scored-topic", &format!("{topic}-out"), "--labels-topic", &format!("{topic}-labels")])
            .args(["--labelled-topic", &format!("{topic}-labelled"), "--dlq-topic", &format!("{topic}-labels-dlq")])
            .args(["--http-addr", &format!("127.0.0.1:{port}"), "--commit-interval", "300ms"])
            // The simulator's event times span half a year, sent in seconds: keep them all.
            .args(["--label-window", "3650d"])
            .args(["-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000"])
            .args(extra)
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn fraudstream monitor");
        Self { child, http: format!("http://127.0.0.1:{port}"), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the monitor to exit on its own.
    async fn exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the monitor kept running:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every sample of `name` whose labels contain `with`, summed.
    async fn metric(&self, name: &str, with: &str) -> f64 {
        let Ok(response) = reqwest::get(format!("{}/metrics", self.http)).await else { return f64::NAN };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
            .filter(|l| l.contains(with))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn wait_until(&mut self, what: &str, timeout: Duration, mut f: impl AsyncFnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self).await {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "monitor exited while waiting for {what}:\n{}",
                self.log()
            );
            assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Average precision and ROC-AUC written out here, from the definitions
/// (ties are one threshold; ROC-AUC counts a tied fraud/legit pair as half).
fn independent_ap_and_auc(rows: &[(f64, bool)]) -> (f64, f64) {
    let mut sorted = rows.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let positives = rows.iter().filter(|r| r.1).count() as f64;
    let (mut ap, mut tp, mut seen, mut last_recall) = (0.0, 0.0, 0.0, 0.0);
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            tp += f64::from(u8::from(sorted[j].1));
            seen += 1.0;
            j += 1;
        }
        let recall = tp / positives;
        ap += (recall - last_recall) * (tp / seen);
        last_recall = recall;
        i = j;
    }
    let frauds: Vec<f64> = rows.iter().filter(|r| r.1).map(|r| r.0).collect();
    let legit: Vec<f64> = rows.iter().filter(|r| !r.1).map(|r| r.0).collect();
    let mut pairs = 0.0;
    for f in &frauds {
        for l in &legit {
            pairs += if f > l {
                1.0
            } else if f == l {
                0.5
            } else {
                0.0
            };
        }
    }
    (ap, pairs / (frauds.len() as f64 * legit.len() as f64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn monitor_joins_every_label_across_a_crash_and_measures_live_quality() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = common::s3_store();
    let v1 = common::train_and_publish(&store, 20_000, 71, false).await;
    // A weak candidate: it loses the champion gate and is published as the canary.
    let v2 = fraudstream::training::run_once(&fraudstream::training::TrainerOptions {
        data: fraudstream::training::data::DataSource::Simulator { rows: 20_000, seed: 73 },
        model_store: store.clone(),
        device: fraudstream::model::Device::Cpu,
        train: fraudstream::training::train::TrainConfig {
            seed: 73,
            max_epochs: 1,
            learning_rate: 1e-5,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(v2.label, Some(fraudstream::model::Label::Canary), "{}", v2.verdict);
    let topic = topic_for(&kafka, 4).await;
    let (labels_topic, labelled_topic, dlq_topic) =
        (format!("{topic}-labels"), format!("{topic}-labelled"), format!("{topic}-labels-dlq"));
    ensure_topics(&kafka, &[&labels_topic, &labelled_topic, &dlq_topic], 4).await.unwrap();

    let mut scorer =
        Scorer::spawn(&kafka, &topic, &store, &common::unique("group"), dir.path(), &["--shadow", "canary"]);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    let group = common::unique("monitor");
    let mut monitor = Monitor::spawn(&kafka, &topic, &group, dir.path());

    // 30,000 labelled payments at ~5,000/s; each label follows its payment 1 s later.
    let sent: Vec<Payment> = Simulator::new(30_000, 72).collect();
    let truth: HashMap<String, bool> = sent.iter().map(|p| (p.payment_id.clone(), p.fraud.unwrap())).collect();
    let label_codec = Codec::new(WireFormat::Confluent, PAYMENT_LABEL_SCHEMA_ID);
    let options = PublishOptions {
        topic: topic.clone(),
        codec: CODEC,
        rate: Some(5_000.0),
        // BankSim's days as event time, so the trainer can split the labelled topic by time.
        stamp_event_time: false,
        labels: Some(LabelStream {
            topic: labels_topic.clone(),
            codec: label_codec,
            delay: Duration::from_secs(1),
            source: "test".into(),
        }),
    };
    let payments = sent.clone();
    let kafka_for_producer = kafka.clone();
    let publishing = tokio::spawn(async move {
        let producer = create_producer(&kafka_for_producer).unwrap();
        publish_payments(&producer, &options, payments, |_| {}).await.unwrap()
    });

    // Mid-stream, a crash: nothing drained, nothing committed on the way out.
    monitor
        .wait_until("the first joins", Duration::from_secs(60), async |m| {
            m.metric("fraudstream_monitor_joins_total", "").await > 3_000.0
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    monitor.child.kill().unwrap();
    monitor.child.wait().unwrap();
    let first_log = monitor.log();
    let mut monitor = Monitor::spawn(&kafka, &topic, &group, dir.path());

    let summary = publishing.await.unwrap();
    assert_eq!((summary.sent, summary.labels_sent, summary.failed), (30_000, 30_000, 0), "{summary}");
    // Duplicate labels (the same verdict again), a label that does not
    // decode and one without a payment id.
    let producer = common::input_producer();
    let duplicates: Vec<(String, Vec<u8>)> = sent[..500]
        .iter()
        .map(|p| (p.customer.clone(), label_codec.encode_label(&PaymentLabel::of(p, "again").unwrap()).unwrap()))
        .collect();
    common::publish(&producer, &labels_topic, &duplicates).await;
    let nameless = PaymentLabel {
        payment_id: String::new(),
        customer: "C1".into(),
        fraud: true,
        labelled_at: 0,
        source: "test".into(),
    };
    let bad = vec![
        ("C1".to_string(), b"not a label".to_vec()),
        ("C1".to_string(), label_codec.encode_label(&nameless).unwrap()),
    ];
    common::publish(&producer, &labels_topic, &bad).await;

    // Every labelled payment reaches the labelled topic.
    let want = sent.len();
    let joined = common::read_topic(&kafka, &labelled_topic, Duration::from_secs(60), |m| {
        let ids: std::collections::HashSet<String> =
            m.iter().filter_map(|m| CODEC.decode_scored(m.payload()?).ok()).map(|s| s.payment.payment_id).collect();
        ids.len() >= want
    })
    .await;
    let scored_out =
        common::read_topic(&kafka, &format!("{topic}-out"), Duration::from_secs(10), |m| m.len() >= want).await;
    let scored: HashMap<String, ScoredPayment> = scored_out
        .iter()
        .map(|m| CODEC.decode_scored(m.payload().unwrap()).unwrap())
        .map(|s| (s.payment.payment_id.clone(), s))
        .collect();
    let mut by_id: HashMap<String, ScoredPayment> = HashMap::new();
    for m in &joined {
        let j = CODEC.decode_scored(m.payload().unwrap()).expect("a joined record decodes as a ScoredPayment");
        let id = j.payment.payment_id.clone();
        let score = scored.get(&id).unwrap_or_else(|| panic!("{id} joined but never scored"));
        // The join is the scored record as served, with the true label and nothing else changed.
        assert_eq!(j.payment.fraud, Some(truth[&id]), "{id}: the label");
        assert_eq!(
            ScoredPayment { payment: Payment { fraud: None, ..j.payment.clone() }, ..j.clone() },
            *score,
            "{id}"
        );
        assert_eq!(j.model_version, v1.version);
        assert_eq!(j.shadow.as_ref().map(|s| s.model_version.as_str()), Some(v2.version.as_str()), "{id}: the shadow");
        if let Some(before) = by_id.insert(id.clone(), j.clone()) {
            assert_eq!(before, j, "{id}: a duplicate join differs");
        }
    }
    assert_eq!(by_id.len(), want, "every labelled payment was joined");
    let duplicates = joined.len() - by_id.len();
    eprintln!("{} joins, {duplicates} written twice (at least once across the crash)", joined.len());

    // The restarted monitor rebuilt what its predecessor had committed
    // without writing it again: it wrote fewer joins than there are, yet its
    // live numbers cover all of them.
    let version = format!("version=\"{}\"", v1.version);
    monitor
        .wait_until("quality over every join", Duration::from_secs(30), async |m| {
            m.metric("fraudstream_monitor_labelled", &version).await == want as f64
        })
        .await;
    assert!(first_log.contains("rebuilt the join") || monitor.log().contains("rebuilt the join"), "{}", monitor.log());
    let rewritten = monitor.metric("fraudstream_monitor_joins_total", "").await;
    assert!(rewritten < want as f64, "the restarted monitor wrote {rewritten} joins: it re-emitted committed ones");

    // Each version's live numbers: the serving one's from the joins' own
    // scores, the canary's from their shadow scores.
    let serving: Vec<(f64, bool, bool)> =
        by_id.values().map(|j| (j.fraud_probability, j.is_fraud, j.payment.fraud.unwrap())).collect();
    let shadow: Vec<(f64, bool, bool)> = by_id
        .values()
        .map(|j| {
            let s = j.shadow.as_ref().unwrap();
            (s.fraud_probability, s.is_fraud, j.payment.fraud.unwrap())
        })
        .collect();
    let mut aps = Vec::new();
    for (version, rows) in [(&v1.version, serving), (&v2.version, shadow)] {
        let with = format!("version=\"{version}\"");
        monitor
            .wait_until("the shadow's numbers too", Duration::from_secs(30), async |m| {
                m.metric("fraudstream_monitor_labelled", &with).await == want as f64
            })
            .await;
        let scores: Vec<(f64, bool)> = rows.iter().map(|(p, _, fraud)| (*p, *fraud)).collect();
        let (ap, auc) = independent_ap_and_auc(&scores);
        let tp = rows.iter().filter(|(_, flagged, fraud)| *flagged && *fraud).count() as f64;
        let precision = tp / rows.iter().filter(|r| r.1).count().max(1) as f64;
        let recall = tp / rows.iter().filter(|r| r.2).count() as f64;
        for (name, expected) in [
            ("fraudstream_monitor_average_precision", ap),
            ("fraudstream_monitor_roc_auc", auc),
            ("fraudstream_monitor_precision", precision),
            ("fraudstream_monitor_recall", recall),
        ] {
            let live = monitor.metric(name, &with).await;
            assert!((live - expected).abs() < 1e-9, "{name} of {version}: monitor {live}, offline {expected}");
        }
        aps.push(ap);
    }
    assert!(
        aps[0] > 0.5 && aps[0] > aps[1],
        "the trained model's live AP {} beats the weak canary's {}",
        aps[0],
        aps[1]
    );
    assert_eq!(monitor.metric("fraudstream_monitor_label_coverage", &version).await, 1.0);
    // Label delays of the joins it wrote live (labels came 1 s after their payments).
    let delays = monitor.metric("fraudstream_monitor_label_delay_seconds_count", &version).await;
    assert!(delays == rewritten, "{delays} label delays for {rewritten} joins written");
    // The 500 duplicates were recognised (some may have been processed by the first monitor).
    assert!(monitor.metric("fraudstream_monitor_records_total", "outcome=\"duplicate\"").await >= 1.0);

    // The two bad labels are in the dead-letter topic, with their reasons.
    let dead = common::read_topic(&kafka, &dlq_topic, Duration::from_secs(10), |m| m.len() >= 2).await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| {
            use rdkafka::message::Headers;
            let headers = m.headers().expect("dead letters carry headers");
            let reason = headers.iter().find(|h| h.key == "fraudstream.error.reason").unwrap();
            String::from_utf8(reason.value.unwrap().to_vec()).unwrap()
        })
        .collect();
    assert_eq!(reasons, ["undecodable", "invalid-label"]);

    // Retraining on what the monitor wrote: every labelled payment once, and
    // the running scorer swaps the new version in.
    let retrained = fraudstream::training::run_once(&fraudstream::training::TrainerOptions {
        data: fraudstream::training::data::DataSource::Kafka(fraudstream::training::topic::LabelledTopic {
            kafka: kafka.clone(),
            topic: labelled_topic.clone(),
            since: Duration::from_secs(3_600),
            codec: CODEC,
            registry: None,
        }),
        model_store: store.clone(),
        device: fraudstream::model::Device::Cpu,
        force: true,
        train: fraudstream::training::train::TrainConfig { seed: 74, max_epochs: 4, ..Default::default() },
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(retrained.label, Some(fraudstream::model::Label::Stable), "{}", retrained.verdict);
    let manifest = fraudstream::model::ModelStore::open(&store)
        .await
        .unwrap()
        .fetch(&retrained.version, &[], &dir.path().join("retrained"))
        .await
        .unwrap()
        .manifest;
    let frauds = truth.values().filter(|f| **f).count() as u64;
    assert_eq!(
        (manifest.training_data.rows, manifest.training_data.frauds),
        (want as u64, frauds),
        "trained on every labelled payment, once"
    );
    let version = retrained.version.clone();
    scorer
        .wait_until("the retrained version to serve", Duration::from_secs(15), async |s| {
            format!("{}", s.metric("fraudstream_model_version").await as u64) == version
        })
        .await;
    scorer.stop();
}

/// The join needs both inputs co-partitioned: a labels topic with another
/// partition count is refused at start, with the fix in the message.
#[tokio::test]
async fn a_labels_topic_with_another_partition_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let topic = common::unique("copart");
    ensure_topics(&kafka, &[&format!("{topic}-out")], 4).await.unwrap();
    ensure_topics(&kafka, &[&format!("{topic}-labels")], 2).await.unwrap();
    let mut monitor = Monitor::spawn(&kafka, &topic, &common::unique("monitor"), dir.path());
    let status = monitor.exit(Duration::from_secs(60)).await;
    let log = monitor.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("has 4 partitions but") && log.contains("has 2") && log.contains("co-partitioned"), "{log}");
}

/// Fail closed: a join the monitor's producer refuses (over its
/// `message.max.bytes`) stops the monitor with that reason and a non-zero
/// exit, with the record that completed the join not committed past; a
/// restart with the limit raised writes it, and every other join, with the
/// right verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_it_cannot_write_stops_the_monitor_and_a_restart_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let topic = common::unique("monitor-fail");
    let (scored_topic, labels_topic, labelled_topic) =
        (format!("{topic}-out"), format!("{topic}-labels"), format!("{topic}-labelled"));
    ensure_topics(&kafka, &[&scored_topic, &labels_topic, &labelled_topic, &format!("{topic}-labels-dlq")], 1)
        .await
        .unwrap();
    let mut sent: Vec<Payment> = Simulator::new(300, 81).collect();
    // A valid payment with a 200 KB merchant name: its join exceeds 100 KB.
    const BIG: usize = 150;
    sent[BIG].merchant = "M".repeat(200_000);
    let label_codec = Codec::new(WireFormat::Confluent, PAYMENT_LABEL_SCHEMA_ID);
    let scored: Vec<(String, Vec<u8>)> = sent
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let probability = (i % 100) as f64 / 100.0;
            let record = ScoredPayment {
                payment: Payment { fraud: None, ..p.clone() },
                fraud_probability: probability,
                is_fraud: probability >= 0.5,
                threshold: 0.5,
                model_name: "payfraud".into(),
                model_version: "7".into(),
                scored_at: p.event_time,
                decision: None,
                reasons: Vec::new(),
                shadow: None,
            };
            (p.customer.clone(), CODEC.encode_scored(&record).unwrap())
        })
        .collect();
    let labels: Vec<(String, Vec<u8>)> = sent
        .iter()
        .map(|p| (p.customer.clone(), label_codec.encode_label(&PaymentLabel::of(p, "test").unwrap()).unwrap()))
        .collect();
    let producer = common::input_producer();
    common::publish(&producer, &scored_topic, &scored).await;
    common::publish(&producer, &labels_topic, &labels).await;

    let group = common::unique("monitor");
    let mut monitor = Monitor::spawn_with(&kafka, &topic, &group, dir.path(), &["-X", "message.max.bytes=100000"]);
    let status = monitor.exit(Duration::from_secs(60)).await;
    let log = monitor.log();
    assert!(!status.success(), "exited 0 with a join it could not write:\n{log}");
    assert!(log.contains("was not delivered") && log.contains(&labelled_topic), "no reason in the log:\n{log}");
    // The join was completed by the later of its two records: that one must be read again.
    let committed = |topic: &str| committed_offset(&kafka, &group, topic);
    let (scored_at, labels_at) = (committed(&scored_topic), committed(&labels_topic));
    assert!(
        scored_at <= BIG as i64 || labels_at <= BIG as i64,
        "committed scored {scored_at} and labels {labels_at}: both past the unwritten join's records at {BIG}"
    );

    let mut monitor = Monitor::spawn_with(&kafka, &topic, &group, dir.path(), &["-X", "message.max.bytes=1000000"]);
    let joins = common::read_topic(&kafka, &labelled_topic, Duration::from_secs(20), |m| m.len() >= sent.len()).await;
    assert!(monitor.child.try_wait().unwrap().is_none(), "the restarted monitor stopped:\n{}", monitor.log());
    let mut verdicts: HashMap<String, bool> = HashMap::new();
    for message in &joins {
        let join = CODEC.decode_scored(message.payload().unwrap()).unwrap();
        verdicts.insert(join.payment.payment_id.clone(), join.payment.fraud.expect("a join carries its label"));
    }
    for p in &sent {
        assert_eq!(verdicts.get(&p.payment_id), p.fraud.as_ref(), "payment {}'s join", p.payment_id);
    }
    let big = joins.iter().find(|m| m.payload().is_some_and(|b| b.len() > 200_000));
    assert!(big.is_some(), "the oversized join was not written after the restart");
}

/// The group's committed offset of partition 0 of `topic` (0: nothing committed).
fn committed_offset(kafka: &KafkaArgs, group: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = kafka.client_config(&[("group.id", group)]).create().unwrap();
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(topic, 0);
    let list = consumer.committed_offsets(wanted, Duration::from_secs(10)).expect("committed offsets");
    match list.find_partition(topic, 0).map(|e| e.offset()) {
        Some(Offset::Offset(offset)) => offset,
        _ => 0,
    }
}
