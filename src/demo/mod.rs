//! `fraudstream demo`: the whole system in one process, with no external
//! service: librdkafka's in-process mock cluster as the broker and a
//! temporary directory as the model store (flags point it at a real broker
//! and S3). It trains and publishes a model on simulated history, starts the
//! scorer, streams simulated payments through it, and reports throughput,
//! latency and the fraud caught against the simulator's labels. With
//! `--drift` it runs the learning loop instead (`drift`).

pub mod drift;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, WireFormat};
use crate::kafka::{ensure_topics, KafkaArgs};
use crate::model::Device;
use crate::model_watch::WatchConfig;
use crate::pipeline::PipelineConfig;
use crate::produce::{create_producer, publish_payments, PublishOptions};
use crate::scorer::{ScorerConfig, ScorerParts};
use crate::simulate::Simulator;
use crate::training::data::DataSource;
use crate::training::train::TrainConfig;
use crate::training::{run_once, TrainerOptions};

/// How the demo's payments and scored payments are written.
const CODEC: Codec = Codec::new(WireFormat::Confluent, 1);

/// Demo settings; every default runs with nothing installed.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The learning loop instead: drift, alarm, retraining, recovery (`drift`).
    pub drift: bool,
    /// A real broker; `None` starts the in-process mock cluster.
    pub kafka: Option<KafkaArgs>,
    /// A model store (`s3://...` or a directory); `None` uses a temporary directory.
    pub model_store: Option<String>,
    pub train_rows: u64,
    pub events: u64,
    pub rate: Option<f64>,
    pub partitions: i32,
    pub seed: u64,
    pub device: Device,
    pub max_batch: usize,
    pub max_delay: Duration,
    pub http_addr: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
#[error("demo, {step}: {source}")]
pub struct DemoError {
    step: &'static str,
    source: Box<dyn std::error::Error + Send + Sync>,
}

fn step<E: Into<Box<dyn std::error::Error + Send + Sync>>>(step: &'static str) -> impl FnOnce(E) -> DemoError {
    move |e| DemoError { step, source: e.into() }
}

/// What the demo measured.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub model_version: String,
    pub produced: u64,
    pub scored: u64,
    pub dead_lettered: u64,
    pub seconds: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    pub frauds: u64,
    pub frauds_caught: u64,
    pub false_alarms: u64,
    /// Payments per decision (allow, review, block), and the frauds among them.
    pub decisions: [u64; 3],
    pub decision_frauds: [u64; 3],
    /// The highest-scored payment's decision and reasons, as an example.
    pub example: Option<crate::ScoredPayment>,
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "scored {} of {} payments ({} dead-lettered) with model {} in {:.2} s: {:.0} payments/s",
            self.scored,
            self.produced,
            self.dead_lettered,
            self.model_version,
            self.seconds,
            self.scored as f64 / self.seconds.max(1e-9)
        )?;
        writeln!(
            f,
            "latency, event to scored: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.latency_ms_p50, self.latency_ms_p99, self.latency_ms_max
        )?;
        write!(
            f,
            "fraud caught at the model's threshold: {} of {} ({:.1}%), with {} false alarms ({:.3}% of legitimate payments)",
            self.frauds_caught,
            self.frauds,
            100.0 * self.frauds_caught as f64 / self.frauds.max(1) as f64,
            self.false_alarms,
            100.0 * self.false_alarms as f64 / (self.scored.saturating_sub(self.frauds)).max(1) as f64
        )?;
        for (i, name) in ["allow", "review", "block"].iter().enumerate() {
            write!(f, "\n{name:>6}: {:>7} payments, {:>5} of them fraud", self.decisions[i], self.decision_frauds[i])?;
        }
        if let Some(example) = &self.example {
            let reasons: Vec<String> =
                example.reasons.iter().map(|r| format!("{}={} {:+.3}", r.feature, r.value, r.contribution)).collect();
            write!(
                f,
                "\nhighest score: payment {} P(fraud) {:.3} -> {}; reasons: {}",
                example.payment.payment_id,
                example.fraud_probability,
                example.decision.map_or("none", |d| d.as_str()),
                reasons.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Topic and group names of one demo run. On a real broker every run gets
/// its own, so runs never read each other's events or offsets.
struct Names {
    input: String,
    output: String,
    dlq: String,
    group: String,
    labels: String,
    labelled: String,
    labels_dlq: String,
}

impl Names {
    fn new(shared_broker: bool) -> Self {
        let prefix = if shared_broker {
            format!("fraudstream-demo-{}-", &uuid::Uuid::new_v4().simple().to_string()[..8])
        } else {
            String::new()
        };
        Self {
            input: format!("{prefix}payments"),
            output: format!("{prefix}payments-scored"),
            dlq: format!("{prefix}payments-dlq"),
            group: format!("{prefix}fraudstream-demo"),
            labels: format!("{prefix}payments-labels"),
            labelled: format!("{prefix}payments-labelled"),
            labels_dlq: format!("{prefix}payments-labels-dlq"),
        }
    }
}

/// The mock cluster, when the demo runs one.
type Mock = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// The demo's broker with `topics` made: the given one, or an in-process
/// mock cluster (kept alive by the returned handle).
async fn broker(config: &DemoConfig, topics: &[&str]) -> Result<(Option<Mock>, KafkaArgs), DemoError> {
    match &config.kafka {
        Some(kafka) => {
            ensure_topics(kafka, topics, config.partitions).await.map_err(step("creating topics"))?;
            eprintln!("broker: {} (topics {})", kafka.brokers, topics.join(", "));
            Ok((None, kafka.clone()))
        }
        None => {
            let mock = MockCluster::new(1).map_err(step("starting the in-process Kafka mock cluster"))?;
            for topic in topics {
                mock.create_topic(topic, config.partitions, 1).map_err(step("creating topics"))?;
            }
            eprintln!("broker: in-process mock cluster at {}", mock.bootstrap_servers());
            let kafka = KafkaArgs::new(mock.bootstrap_servers());
            Ok((Some(mock), kafka))
        }
    }
}

/// The demo's scorer: Confluent-framed Avro in and out, the store polled every `poll`.
fn scorer_config(
    config: &DemoConfig,
    kafka: &KafkaArgs,
    names: &Names,
    store: &str,
    dir: &std::path::Path,
    device: tch::Device,
    poll: Duration,
) -> ScorerConfig {
    ScorerConfig {
        pipeline: PipelineConfig {
            kafka: kafka.clone(),
            group_id: names.group.clone(),
            input_topic: names.input.clone(),
            output_topic: names.output.clone(),
            dead_letter_topic: names.dlq.clone(),
            input_codec: CODEC,
            output_codec: CODEC,
            max_batch: config.max_batch,
            max_delay: config.max_delay,
            ..PipelineConfig::default()
        },
        watch: WatchConfig {
            store: store.to_string(),
            poll_interval: poll,
            device,
            cache_dir: dir.join("cache"),
            ..WatchConfig::default()
        },
        http_addr: config.http_addr,
        // The mock cluster has no CreateTopics; its topics were made with it.
        create_topics: config.kafka.as_ref().map(|_| config.partitions),
        ..ScorerConfig::default()
    }
}

/// Waits until the scorer serves a model and has partitions.
async fn wait_ready<T>(
    parts: &ScorerParts,
    scorer: &tokio::task::JoinHandle<T>,
    shutdown: &CancellationToken,
) -> Result<(), DemoError> {
    let wait_start = Instant::now();
    while parts.scoring.model().is_none() || parts.state.assigned_partitions() == 0 {
        if scorer.is_finished() || wait_start.elapsed() > Duration::from_secs(60) {
            shutdown.cancel();
            return Err(DemoError {
                step: "starting the scorer",
                source: "scorer did not become ready within 60 s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Runs the demo end to end, printing progress to stderr.
pub async fn run(config: DemoConfig) -> Result<DemoSummary, DemoError> {
    // 1. A broker.
    let names = Names::new(config.kafka.is_some());
    let (_mock, kafka) = broker(&config, &[&names.input, &names.output, &names.dlq]).await?;

    // 2. Train and publish a model.
    let temp = tempfile::tempdir().map_err(step("creating a temporary model store"))?;
    let store = config.model_store.clone().unwrap_or_else(|| temp.path().join("models").display().to_string());
    eprintln!("training on {} simulated payments; model store {store}", config.train_rows);
    let outcome = run_once(&TrainerOptions {
        data: DataSource::Simulator { rows: config.train_rows, seed: config.seed },
        model_store: store.clone(),
        model_name: "payfraud".into(),
        device: config.device,
        target_precision: None,
        force: false,
        train: TrainConfig { seed: config.seed, ..TrainConfig::default() },
        ..TrainerOptions::default()
    })
    .await
    .map_err(|e| DemoError { step: "training", source: e.into() })?;
    eprintln!(
        "model {}: holdout ROC-AUC {:.4}, AP {:.4} (logistic baseline AP {:.4}); {}",
        outcome.version,
        outcome.holdout.roc_auc,
        outcome.holdout.average_precision,
        outcome.baseline.average_precision,
        outcome.verdict
    );

    // 3. The scorer.
    let device = config.device.resolve().map_err(step("choosing a device"))?;
    let parts = ScorerParts::new(config.max_batch);
    let shutdown = CancellationToken::new();
    let codec = CODEC;
    let scorer_config = scorer_config(&config, &kafka, &names, &store, temp.path(), device, Duration::from_secs(5));
    let scorer = tokio::spawn(crate::scorer::run(scorer_config, parts.clone(), shutdown.clone()));
    // The payment producer starts while the scorer does: an idempotent
    // producer's start-up (producer id, metadata) took ~0.5 s on the mock
    // cluster, which would otherwise show as latency of the first payments.
    let producer = create_producer(&kafka).map_err(step("creating the producer"))?;
    wait_ready(&parts, &scorer, &shutdown).await?;
    eprintln!(
        "scorer ready: model {} serving, {} partitions assigned",
        outcome.version,
        parts.state.assigned_partitions()
    );

    // 4. Live traffic.
    let options =
        PublishOptions { topic: names.input.clone(), codec, rate: config.rate, stamp_event_time: true, labels: None };
    let events = config.events;
    let traffic_seed = config.seed + 1;
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        publish_payments(&producer, &options, Simulator::new(events, traffic_seed), |_| {}).await
    });
    let counters = parts.counters.clone();
    let done = |c: &crate::pipeline::PipelineCounters| {
        c.scored.load(std::sync::atomic::Ordering::Relaxed) + c.dead_lettered.load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut last_progress = Instant::now();
    while done(&counters) < events {
        if started.elapsed() > Duration::from_secs(600) {
            break;
        }
        if last_progress.elapsed() > Duration::from_millis(500) {
            let scored = counters.scored.load(std::sync::atomic::Ordering::Relaxed);
            eprint!(
                "\r  scored {scored:>9} / {events}   flagged {:>6}   dead-lettered {:>4}   {:>8.0} payments/s ",
                counters.flagged.load(std::sync::atomic::Ordering::Relaxed),
                counters.dead_lettered.load(std::sync::atomic::Ordering::Relaxed),
                scored as f64 / started.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
            last_progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!();
    let published = publisher.await.map_err(step("publishing payments"))?.map_err(step("publishing payments"))?;
    shutdown.cancel();
    scorer.await.map_err(step("stopping the scorer"))?.map_err(step("running the scorer"))?;

    // 5. Read the scored topic back and compare with the simulator's labels.
    let consumer: StreamConsumer = kafka
        .client_config(&[
            ("group.id", &format!("{}-reader", names.group)),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "earliest"),
        ])
        .create()
        .map_err(step("reading the scored topic"))?;
    consumer.subscribe(&[&names.output]).map_err(step("reading the scored topic"))?;
    let mut summary = DemoSummary {
        model_version: outcome.version.clone(),
        produced: published.sent,
        seconds,
        dead_lettered: counters.dead_lettered.load(std::sync::atomic::Ordering::Relaxed),
        ..DemoSummary::default()
    };
    let mut latencies = Vec::with_capacity(events as usize);
    let mut seen = std::collections::HashSet::new();
    let mut stream = consumer.stream();
    while (seen.len() as u64) < published.sent {
        let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await else { break };
        let Ok(scored) = codec.decode_scored(message.payload().unwrap_or_default()) else { continue };
        if !seen.insert(scored.payment.payment_id.clone()) {
            continue;
        }
        latencies.push((scored.scored_at - scored.payment.event_time) as f64);
        let fraud = scored.payment.fraud == Some(true);
        summary.frauds += u64::from(fraud);
        summary.frauds_caught += u64::from(fraud && scored.is_fraud);
        summary.false_alarms += u64::from(!fraud && scored.is_fraud);
        if let Some(decision) = scored.decision {
            summary.decisions[decision as usize] += 1;
            summary.decision_frauds[decision as usize] += u64::from(fraud);
        }
        if summary.example.as_ref().is_none_or(|e| scored.fraud_probability > e.fraud_probability) {
            summary.example = Some(scored);
        }
    }
    drop(stream);
    summary.scored = seen.len() as u64;
    latencies.sort_by(f64::total_cmp);
    summary.latency_ms_p50 = percentile(&latencies, 0.5);
    summary.latency_ms_p99 = percentile(&latencies, 0.99);
    summary.latency_ms_max = latencies.last().copied().unwrap_or(0.0);
    Ok(summary)
}
