//! The streaming scorer against the real broker (Apache Kafka) and S3 store
//! (Garage): every valid payment scored exactly once, every invalid one
//! dead-lettered with its reason, models swapped mid-stream, restarts lose
//! nothing, and stream scores equal the trainer's model's scores.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use fraudstream::codec::{Codec, WireFormat};
use fraudstream::model::{Model, ModelStore, MODEL_FILE};
use fraudstream::model_watch::WatchConfig;
use fraudstream::pipeline::PipelineConfig;
use fraudstream::scorer::{ScorerConfig, ScorerParts};
use fraudstream::{Payment, ScoredPayment, Simulator};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

const CODEC: Codec = Codec::new(WireFormat::Confluent, 1);

struct Topics {
    input: String,
    output: String,
    dlq: String,
}

async fn topics() -> Topics {
    let t = Topics { input: common::unique("in"), output: common::unique("out"), dlq: common::unique("dlq") };
    fraudstream::kafka::ensure_topics(&common::kafka(), &[&t.input, &t.output, &t.dlq], 4).await.unwrap();
    t
}

fn config(topics: &Topics, store: &str, group: &str, cache: &std::path::Path) -> ScorerConfig {
    ScorerConfig {
        pipeline: PipelineConfig {
            kafka: common::kafka(),
            group_id: group.into(),
            input_topic: topics.input.clone(),
            output_topic: topics.output.clone(),
            dead_letter_topic: topics.dlq.clone(),
            input_codec: CODEC,
            output_codec: CODEC,
            max_batch: 512,
            max_delay: Duration::from_millis(5),
            max_in_flight: 20_000,
            drain_timeout: Duration::from_secs(20),
            ..PipelineConfig::default()
        },
        watch: WatchConfig {
            store: store.into(),
            poll_interval: Duration::from_millis(300),
            cache_dir: cache.to_path_buf(),
            ..WatchConfig::default()
        },
        http_addr: None,
        create_topics: None,
        ..ScorerConfig::default()
    }
}

struct RunningScorer {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), fraudstream::scorer::ScorerError>>,
    parts: ScorerParts,
}

fn start(config: ScorerConfig) -> RunningScorer {
    let parts = ScorerParts::new(config.pipeline.max_batch);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(fraudstream::scorer::run(config, parts.clone(), shutdown.clone()));
    RunningScorer { shutdown, task, parts }
}

impl RunningScorer {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    fn scored(&self) -> u64 {
        self.parts.counters.scored.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn encoded(payments: &[Payment]) -> Vec<(String, Vec<u8>)> {
    common::keyed_records(&CODEC, payments)
}

fn decode_all(messages: &[OwnedMessage]) -> Vec<ScoredPayment> {
    messages.iter().map(|m| CODEC.decode_scored(m.payload().unwrap()).expect("scored payment decodes")).collect()
}

fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    m.headers()?.iter().find(|h| h.key == key).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// 20,000 events: 19,000 valid payments and 1,000 invalid ones of six kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_valid_payment_scored_once_every_invalid_one_dead_lettered() {
    let store = common::s3_store();
    let outcome = common::train_and_publish(&store, 30_000, 1, false).await;
    assert!(outcome.published);
    let topics = topics().await;

    let valid: Vec<Payment> = Simulator::new(19_000, 77).map(|p| Payment { fraud: None, ..p }).collect();
    let mut records = encoded(&valid);
    let template = valid[0].clone();
    let mut invalid_reasons = HashMap::new();
    for i in 0..1000 {
        let (bytes, reason) = match i % 6 {
            0 => (vec![0xde, 0xad, 0xbe, 0xef, i as u8], "undecodable"),
            1 => (Vec::new(), "undecodable"),
            2 => {
                let mut b = CODEC.encode_payment(&template).unwrap();
                b.truncate(b.len() / 2);
                (b, "undecodable")
            }
            3 => (
                CODEC.encode_payment(&Payment { category: "es_casino".into(), ..template.clone() }).unwrap(),
                "invalid-payment",
            ),
            4 => (CODEC.encode_payment(&Payment { amount: f64::NAN, ..template.clone() }).unwrap(), "invalid-payment"),
            _ => (CODEC.encode_payment(&Payment { amount: -5.0, ..template.clone() }).unwrap(), "invalid-payment"),
        };
        *invalid_reasons.entry(reason).or_insert(0) += 1;
        records.insert((i * 19) as usize, (format!("bad-{i}"), bytes));
    }
    common::publish(&common::input_producer(), &topics.input, &records).await;

    let cache = tempfile::tempdir().unwrap();
    let scorer = start(config(&topics, &store, &common::unique("group"), cache.path()));
    common::read_topic(&common::kafka(), &topics.output, Duration::from_secs(30), |m| m.len() >= 19_000).await;
    let dlq = common::read_topic(&common::kafka(), &topics.dlq, Duration::from_secs(10), |m| m.len() >= 1_000).await;
    // Nothing more arrives: exactly one output per valid input.
    tokio::time::sleep(Duration::from_secs(2)).await;
    scorer.stop().await;
    let out = common::read_topic(&common::kafka(), &topics.output, Duration::from_secs(5), |m| m.len() > 19_000).await;

    let scored = decode_all(&out);
    let ids: HashSet<&str> = scored.iter().map(|s| s.payment.payment_id.as_str()).collect();
    assert_eq!(scored.len(), 19_000, "one output per valid input");
    assert_eq!(ids, valid.iter().map(|p| p.payment_id.as_str()).collect::<HashSet<_>>());
    assert!(scored.iter().all(|s| s.model_version == outcome.version && s.model_name == "payfraud"));
    assert!(scored.iter().all(|s| (0.0..=1.0).contains(&s.fraud_probability)));
    // Keyed like the input.
    assert!(out.iter().zip(&scored).all(|(m, s)| m.key() == Some(s.payment.customer.as_bytes())));

    assert_eq!(dlq.len(), 1_000, "every invalid input in the DLQ");
    let mut reasons = HashMap::new();
    for m in &dlq {
        let reason = header(m, "fraudstream.error.reason").expect("reason header");
        assert!(header(m, "fraudstream.error").is_some_and(|e| !e.is_empty()));
        assert_eq!(header(m, "fraudstream.source.topic").as_deref(), Some(topics.input.as_str()));
        assert!(header(m, "fraudstream.source.offset").is_some_and(|o| o.parse::<i64>().is_ok()));
        assert!(m.key().is_some_and(|k| k.starts_with(b"bad-")), "original key kept");
        *reasons.entry(reason).or_insert(0) += 1;
    }
    assert_eq!(reasons.get("undecodable"), invalid_reasons.get("undecodable"));
    assert_eq!(reasons.get("invalid-payment"), invalid_reasons.get("invalid-payment"));
    let casino = dlq.iter().find(|m| header(m, "fraudstream.error").is_some_and(|e| e.contains("es_casino")));
    assert!(casino.is_some(), "the error names the unknown category");

    // Stream scores equal the published model's scores for the same payments.
    let files =
        ModelStore::open(&store).await.unwrap().fetch(&outcome.version, &[MODEL_FILE], cache.path()).await.unwrap();
    let model = Model::load(&files.dir, tch::Device::Cpu).unwrap();
    let by_id: HashMap<&str, &ScoredPayment> = scored.iter().map(|s| (s.payment.payment_id.as_str(), s)).collect();
    let sample: Vec<Payment> = valid.iter().step_by(37).cloned().collect();
    let expected = model.score_payments(&sample).unwrap();
    for (p, e) in sample.iter().zip(expected) {
        let got = by_id[p.payment_id.as_str()];
        assert!(
            (got.fraud_probability - f64::from(e)).abs() < 1e-6,
            "{}: {} vs {e}",
            p.payment_id,
            got.fraud_probability
        );
        assert_eq!(got.is_fraud, f64::from(e) >= got.threshold);
        assert_eq!(&got.payment, p, "the payment passes through unchanged");
    }
}

/// A new version published mid-stream is picked up; a scorer restarted
/// mid-stream (same group) loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_swap_and_restart_mid_stream_lose_nothing() {
    let store = common::s3_store();
    let first = common::train_and_publish(&store, 20_000, 2, false).await;
    let topics = topics().await;
    let group = common::unique("group");
    let cache = tempfile::tempdir().unwrap();
    let producer = common::input_producer();
    let payments: Vec<Payment> = Simulator::new(30_000, 99).collect();
    let waves: Vec<&[Payment]> = payments.chunks(10_000).collect();

    let scorer = start(config(&topics, &store, &group, cache.path()));
    common::publish(&producer, &topics.input, &encoded(waves[0])).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while scorer.scored() < 10_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(scorer.scored() >= 10_000, "first wave not scored in time");

    // A new version while the scorer runs.
    let second = common::train_and_publish(&store, 20_000, 3, true).await;
    assert!(second.published && second.version != first.version);
    let deadline = Instant::now() + Duration::from_secs(30);
    while scorer.parts.scoring.model().is_none_or(|m| m.version != second.version) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scorer.parts.scoring.model().unwrap().version, second.version, "new version not picked up");

    // Second wave, and a restart in the middle of it.
    let publishing = common::publish_in_background(&topics.input, encoded(waves[1]));
    let before = scorer.scored();
    let deadline = Instant::now() + Duration::from_secs(30);
    while scorer.scored() < before + 2_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    scorer.stop().await;
    let scorer = start(config(&topics, &store, &group, cache.path()));
    publishing.await.unwrap();
    common::publish(&producer, &topics.input, &encoded(waves[2])).await;

    let all: HashSet<&str> = payments.iter().map(|p| p.payment_id.as_str()).collect();
    let out = common::read_topic(&common::kafka(), &topics.output, Duration::from_secs(30), |m| {
        m.len() >= 30_000
            && decode_all(m).iter().map(|s| s.payment.payment_id.clone()).collect::<HashSet<_>>().len() >= 30_000
    })
    .await;
    scorer.stop().await;
    let scored = decode_all(&out);
    let seen: HashSet<&str> = scored.iter().map(|s| s.payment.payment_id.as_str()).collect();
    let lost: Vec<&&str> = all.difference(&seen).take(5).collect();
    assert!(lost.is_empty(), "lost {} payments, e.g. {lost:?}", all.len() - seen.len());
    let duplicates = scored.len() - seen.len();
    eprintln!("restart mid-stream: {} outputs for 30000 payments, {duplicates} duplicates", scored.len());

    // Everything of the third wave was scored by the new version.
    let third: HashSet<&str> = waves[2].iter().map(|p| p.payment_id.as_str()).collect();
    assert!(scored
        .iter()
        .filter(|s| third.contains(s.payment.payment_id.as_str()))
        .all(|s| s.model_version == second.version));
    assert!(scored.iter().any(|s| s.model_version == first.version), "the first wave was scored by the first version");
}

/// A revoke on a runtime with one worker (a pod with a 1-CPU limit) drains
/// within the timeout: the rebalance callback waits on the consumer's own
/// thread, not on the worker that the batcher and the producer need.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_revoke_drains_on_a_one_worker_runtime() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let store = common::s3_store();
    common::train_and_publish(&store, 20_000, 3, false).await;
    let topics = topics().await;
    let group = common::unique("group");
    let payments: Vec<Payment> = Simulator::new(100_000, 5).map(|p| Payment { fraud: None, ..p }).collect();
    common::publish(&common::input_producer(), &topics.input, &encoded(&payments)).await;
    let cache = tempfile::tempdir().unwrap();
    let mut config = config(&topics, &store, &group, cache.path());
    config.pipeline.drain_timeout = Duration::from_secs(10);
    let scorer = start(config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while scorer.scored() < 5_000 {
        assert!(Instant::now() < deadline, "the scorer did not start scoring");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second member joins mid-stream, on a thread of its own (its poll blocks).
    let joined = Instant::now();
    let (kafka, input) = (common::kafka(), topics.input.clone());
    let member = std::thread::spawn(move || {
        let other: BaseConsumer = kafka
            .client_config(&[
                ("group.id", &group),
                ("partition.assignment.strategy", "cooperative-sticky"),
                ("enable.auto.commit", "false"),
            ])
            .create()
            .unwrap();
        other.subscribe(&[&input]).unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        // Poll (without committing) until the group hands it partitions.
        while other.assignment().unwrap().count() == 0 && Instant::now() < until {
            let _ = other.poll(Duration::from_millis(100));
        }
        // Counted before `other` drops: a partition list still alive while
        // its consumer is destroyed blocks the destruction forever.
        let assigned = other.assignment().unwrap().count();
        drop(other);
        assigned
    });
    let got = tokio::task::spawn_blocking(move || member.join().unwrap()).await.unwrap();
    let waited = joined.elapsed();
    assert!(got > 0, "the second member never got a partition");
    assert_eq!(
        scorer.parts.counters.drain_timeouts.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a revoke ran out of its drain timeout on a one-worker runtime"
    );
    assert!(waited < Duration::from_secs(10), "the revoke took {waited:?}, as long as a drain timeout");
    // The second member left without committing: its partitions come back
    // and nothing is lost.
    let out = common::read_topic(&common::kafka(), &topics.output, Duration::from_secs(30), |m| {
        m.len() >= payments.len()
            && decode_all(m).iter().map(|s| s.payment.payment_id.clone()).collect::<HashSet<_>>().len()
                >= payments.len()
    })
    .await;
    scorer.stop().await;
    let ids: HashSet<String> = decode_all(&out).into_iter().map(|s| s.payment.payment_id).collect();
    assert_eq!(ids.len(), payments.len(), "payments lost across the revoke");
}
