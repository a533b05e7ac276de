//! `fraudstream monitor`: joins scored payments with their late labels and
//! measures how each model version does on live traffic.
//!
//! Its own consumer group reads `payments-scored` and `payments-labels`
//! (co-partitioned by customer; checked at start) with the range assignor,
//! so one member owns partition p of both and the join is partition-local
//! (`join`). Each join is written once to `payments-labelled` (the scored
//! payment with `payment.fraud` set: what the trainer retrains on) and fed
//! to the live metrics (`quality`). Undecodable or invalid labels go to the
//! dead-letter topic; duplicates are no-ops.
//!
//! At least once, never a lost join: offsets are committed only after every
//! output and dead letter written so far was acknowledged (every
//! `commit_interval`, on a revoke and at shutdown). A partition's state is
//! rebuilt before its first record is processed, after a start or a
//! rebalance, by re-reading both topics from `label_window` ago up to the
//! group's committed offsets without emitting: a join is emitted by the
//! record that completes it, and only records past the committed offsets
//! are processed live, so joins emitted before a restart are not emitted
//! again and none is lost. A failure of ours (delivery, commit) stops the
//! monitor with an error (fail closed); the orchestrator restarts it.

pub mod join;
pub mod quality;
mod rebuild;
mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::ThreadedProducer;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, CodecError, WireFormat, SCORED_PAYMENT_SCHEMA_ID};
use crate::kafka::{ensure_topics, KafkaArgs, TopicError};
use quality::Quality;
use state::{Core, Deliveries, Hooks, Record};

/// What the monitor reads, writes and keeps.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub kafka: KafkaArgs,
    pub group_id: String,
    pub scored_topic: String,
    pub labels_topic: String,
    /// Where each join is written (scored payments with `payment.fraud` set).
    pub output_topic: String,
    /// Where undecodable or invalid records go.
    pub dead_letter_topic: String,
    /// Wire format of all three topics; its schema id is written on outputs.
    pub codec: Codec,
    /// Event time a scored payment waits for its label.
    pub label_window: Duration,
    /// Most scored payments (and waiting labels) kept per partition.
    pub max_entries: usize,
    /// Labelled payments per version the live quality numbers are over.
    pub quality_window: usize,
    /// How often acknowledged progress is committed.
    pub commit_interval: Duration,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub http_addr: Option<SocketAddr>,
    /// Create the output and dead-letter topics (as many partitions as the inputs) if missing.
    pub create_topics: bool,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            kafka: KafkaArgs::new("127.0.0.1:9092"),
            group_id: "fraudstream-monitor".into(),
            scored_topic: "payments-scored".into(),
            labels_topic: "payments-labels".into(),
            output_topic: "payments-labelled".into(),
            dead_letter_topic: "payments-labels-dlq".into(),
            codec: Codec::new(WireFormat::Confluent, SCORED_PAYMENT_SCHEMA_ID),
            label_window: Duration::from_secs(30 * 86_400),
            max_entries: 2_000_000,
            quality_window: 100_000,
            commit_interval: Duration::from_secs(1),
            http_addr: None,
            create_topics: true,
        }
    }
}

/// Why the monitor stopped.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("Kafka ({what}) on {brokers}: {source}")]
    Kafka { what: &'static str, brokers: String, source: KafkaError },
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("topic {topic:?} does not exist on {brokers}: start the scorer (or `fraudstream produce --labels-topic`) first, or create it with as many partitions as the other")]
    MissingTopic { topic: String, brokers: String },
    #[error("{scored:?} has {scored_partitions} partitions but {labels:?} has {labels_partitions}: the join needs them co-partitioned; give both the same partition count")]
    NotCoPartitioned { scored: String, scored_partitions: usize, labels: String, labels_partitions: usize },
    #[error("cannot encode the join of payment {payment_id:?}: {source}")]
    Encode { payment_id: String, source: CodecError },
    #[error("a record for {topic:?} was not delivered: {error}; stopping without committing (restart to retry)")]
    Delivery { topic: String, error: String },
    #[error("outputs were not acknowledged within {0:?}; stopping without committing (is the broker up?)")]
    AckTimeout(Duration),
    #[error("the metrics server cannot listen on {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
    #[error("the monitor thread panicked")]
    Panicked,
}

/// The monitor's two inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Input {
    Scored,
    Labels,
}

impl Input {
    fn name(self) -> &'static str {
        match self {
            Input::Scored => "scored",
            Input::Labels => "labels",
        }
    }
}

/// What a running monitor shares with its caller (the demo prints it).
#[derive(Debug, Clone, Default)]
pub struct MonitorParts {
    /// The live numbers of every version, as last exported (every second).
    pub reports: Arc<Mutex<Vec<quality::VersionReport>>>,
    /// Joins processed live (written to the labelled topic), corrections included.
    pub joins: Arc<std::sync::atomic::AtomicU64>,
}

/// Runs the monitor until `shutdown` (Ok, after a last commit) or a failure of ours (Err).
pub async fn run(config: MonitorConfig, parts: MonitorParts, shutdown: CancellationToken) -> Result<(), MonitorError> {
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.http_addr {
        serve_http(addr, ready.clone(), shutdown.clone()).await?;
    }
    let check = config.clone();
    let partitions =
        tokio::task::spawn_blocking(move || co_partitioned(&check)).await.map_err(|_| MonitorError::Panicked)??;
    if config.create_topics {
        ensure_topics(&config.kafka, &[&config.output_topic, &config.dead_letter_topic], partitions as i32).await?;
    }
    tracing::info!(
        scored = %config.scored_topic,
        labels = %config.labels_topic,
        output = %config.output_topic,
        partitions,
        window = %humantime::format_duration(config.label_window),
        "monitor starting"
    );
    let flag = ready.clone();
    let result = tokio::task::spawn_blocking(move || poll_loop(config, parts, &flag, &shutdown))
        .await
        .map_err(|_| MonitorError::Panicked)?;
    ready.store(false, Ordering::SeqCst);
    result
}

async fn serve_http(addr: SocketAddr, ready: Arc<AtomicBool>, shutdown: CancellationToken) -> Result<(), MonitorError> {
    use axum::{http::StatusCode, routing::get};
    let prometheus = crate::telemetry::prometheus();
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| MonitorError::Http { addr, source })?;
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                match ready.load(Ordering::SeqCst) {
                    true => (StatusCode::OK, "ready"),
                    false => (StatusCode::SERVICE_UNAVAILABLE, "not ready: no partitions assigned, or stopped"),
                }
            }),
        )
        .route("/metrics", get(move || async move { prometheus.render() }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// The partition count both inputs share, or why they do not.
fn co_partitioned(config: &MonitorConfig) -> Result<usize, MonitorError> {
    let brokers = config.kafka.brokers.clone();
    let kafka_err = |what| {
        let brokers = brokers.clone();
        move |source| MonitorError::Kafka { what, brokers, source }
    };
    let client: BaseConsumer = config.kafka.client_config(&[]).create().map_err(kafka_err("creating a client"))?;
    let mut counts = Vec::new();
    for topic in [&config.scored_topic, &config.labels_topic] {
        let metadata =
            client.fetch_metadata(Some(topic), Duration::from_secs(15)).map_err(kafka_err("reading topic metadata"))?;
        let partitions = metadata.topics().first().filter(|t| t.error().is_none()).map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(MonitorError::MissingTopic { topic: topic.clone(), brokers });
        }
        counts.push(partitions);
    }
    if counts[0] != counts[1] {
        return Err(MonitorError::NotCoPartitioned {
            scored: config.scored_topic.clone(),
            scored_partitions: counts[0],
            labels: config.labels_topic.clone(),
            labels_partitions: counts[1],
        });
    }
    Ok(counts[0])
}

fn poll_loop(
    config: MonitorConfig,
    parts: MonitorParts,
    ready: &AtomicBool,
    shutdown: &CancellationToken,
) -> Result<(), MonitorError> {
    let brokers = config.kafka.brokers.clone();
    let kafka_err = |what| {
        let brokers = brokers.clone();
        move |source| MonitorError::Kafka { what, brokers, source }
    };
    let producer: ThreadedProducer<Deliveries> = config
        .kafka
        .client_config(&[
            crate::kafka::PARTITIONER,
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
            ("compression.type", "lz4"),
            // Retry until delivered: an unacknowledged join is never committed past.
            ("message.timeout.ms", "0"),
        ])
        .create_with_context(Deliveries { failure: Mutex::new(None) })
        .map_err(kafka_err("creating the producer"))?;
    let core = Arc::new(Mutex::new(Core {
        quality: Quality::new(config.quality_window),
        parts,
        counts: Default::default(),
        config: config.clone(),
        producer,
        joins: HashMap::new(),
        positions: HashMap::new(),
        versions: HashMap::new(),
        failure: None,
    }));
    let consumer: BaseConsumer<Hooks> = config
        .kafka
        .client_config(&[
            ("group.id", &config.group_id),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "earliest"),
            // Range gives one member partition p of both topics: the join is partition-local.
            ("partition.assignment.strategy", "range"),
            ("isolation.level", "read_committed"),
            // When the local queue is full, look again after 10 ms, not the
            // default 1 s, which caps a catching-up consumer near 150k records/s.
            ("fetch.queue.backoff.ms", "10"),
            // A join reads two records: fetch in bigger bites than librdkafka's
            // defaults (1 MB per partition, 100k records queued), which held a
            // catching-up monitor near 600k records/s, 300k joins/s.
            ("max.partition.fetch.bytes", "8388608"),
            ("queued.min.messages", "1000000"),
            ("queued.max.messages.kbytes", "262144"),
        ])
        .create_with_context(Hooks { core: core.clone() })
        .map_err(kafka_err("creating the consumer"))?;
    consumer.subscribe(&[&config.scored_topic, &config.labels_topic]).map_err(kafka_err("subscribing"))?;
    let (mut last_commit, mut last_export) = (Instant::now(), Instant::now());
    let mut records: u32 = 0;
    loop {
        let message = consumer.poll(Duration::from_millis(100));
        let mut core = core.lock().expect("monitor state lock");
        if let Some(failure) = core.failure.take() {
            return Err(failure);
        }
        let busy = message.is_some();
        match message {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "Kafka consumer error (librdkafka retries)"),
            Some(Ok(message)) => {
                let input = if message.topic() == config.scored_topic { Input::Scored } else { Input::Labels };
                let partition = message.partition();
                if !core.joins.contains_key(&partition) {
                    core.rebuild(&consumer, partition)?;
                }
                core.process(input, &Record::of(&message), true)?;
                core.positions.insert((input, partition), message.offset() + 1);
            }
        }
        // Clocks and the shutdown token are read every 256 records, or when
        // idle: per record, they cost a tenth of a join.
        records = records.wrapping_add(1);
        if busy && records % 256 != 0 {
            continue;
        }
        if shutdown.is_cancelled() {
            break;
        }
        if last_commit.elapsed() >= config.commit_interval {
            core.commit(&consumer)?;
            last_commit = Instant::now();
        }
        if last_export.elapsed() >= Duration::from_secs(1) {
            core.export();
            ready.store(consumer.assignment().is_ok_and(|a| a.count() > 0), Ordering::SeqCst);
            last_export = Instant::now();
        }
    }
    ready.store(false, Ordering::SeqCst);
    let mut guard = core.lock().expect("monitor state lock");
    guard.commit(&consumer)?;
    guard.export();
    drop(guard);
    tracing::info!("monitor stopped; progress committed");
    Ok(())
}
