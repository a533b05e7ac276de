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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, CodecError, WireFormat, SCORED_PAYMENT_SCHEMA_ID};
use crate::kafka::{ensure_topics, KafkaArgs, TopicError};
use crate::payment::{now_ms, PaymentLabel, ScoredPayment};
use crate::pipeline::{truncate, DeadLetterReason, MAX_ERROR_HEADER_BYTES};
use crate::telemetry::metric;
use join::{Entry, JoinLimits, Outcome, PartitionJoin, ScoredOutcome, Served};
use quality::Quality;

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

/// Counts deliveries and keeps the first failure.
struct Deliveries {
    failure: Mutex<Option<(String, String)>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            metrics::counter!(metric::DELIVERY_FAILURES).increment(1);
            let mut failure = self.failure.lock().expect("delivery failure lock");
            failure.get_or_insert_with(|| (message.topic().to_string(), error.to_string()));
        }
    }
}

/// Everything the poll loop and the rebalance callback share (the callback
/// runs inside `poll`, on the loop's thread, so the lock is never contended).
struct Core {
    config: MonitorConfig,
    producer: ThreadedProducer<Deliveries>,
    joins: HashMap<i32, PartitionJoin>,
    /// Next offset to commit, per input and partition: everything before it was processed.
    positions: HashMap<(Input, i32), i64>,
    quality: Quality,
    versions: HashMap<String, Arc<str>>,
    /// A failure seen in the rebalance callback, for the loop to return.
    failure: Option<MonitorError>,
}

struct Hooks {
    core: Arc<Mutex<Core>>,
}

impl ClientContext for Hooks {}

impl ConsumerContext for Hooks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        metrics::counter!(metric::REBALANCES, "kind" => "revoke").increment(1);
        let mut core = self.core.lock().expect("monitor state lock");
        // Commit what was acknowledged before the partitions go to another member.
        if let Err(e) = core.commit(consumer) {
            core.failure.get_or_insert(e);
        }
        for e in list.elements() {
            core.joins.remove(&e.partition());
            core.positions.retain(|(_, p), _| *p != e.partition());
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            metrics::counter!(metric::REBALANCES, "kind" => "assign").increment(1);
            tracing::info!(
                partitions = list.count(),
                "assigned; each partition's join is rebuilt before its first record"
            );
        }
    }
}

impl Core {
    fn kafka_err(&self, what: &'static str) -> impl FnOnce(KafkaError) -> MonitorError + '_ {
        move |source| MonitorError::Kafka { what, brokers: self.config.kafka.brokers.clone(), source }
    }

    fn topic(&self, input: Input) -> &str {
        match input {
            Input::Scored => &self.config.scored_topic,
            Input::Labels => &self.config.labels_topic,
        }
    }

    fn intern(&mut self, version: &str) -> Arc<str> {
        if let Some(v) = self.versions.get(version) {
            return v.clone();
        }
        let v: Arc<str> = Arc::from(version);
        self.versions.insert(version.to_string(), v.clone());
        v
    }

    /// Waits until every record sent so far is acknowledged, then commits the positions.
    fn commit(&mut self, consumer: &BaseConsumer<Hooks>) -> Result<(), MonitorError> {
        let timeout = Duration::from_secs(60);
        let start = Instant::now();
        while self.producer.in_flight_count() > 0 {
            if start.elapsed() > timeout {
                return Err(MonitorError::AckTimeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some((topic, error)) = self.producer.context().failure.lock().expect("delivery failure lock").clone() {
            return Err(MonitorError::Delivery { topic, error });
        }
        if self.positions.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((input, partition), offset) in &self.positions {
            list.add_partition_offset(self.topic(*input), *partition, Offset::Offset(*offset))
                .map_err(self.kafka_err("listing offsets"))?;
        }
        consumer.commit(&list, CommitMode::Sync).map_err(self.kafka_err("committing offsets"))
    }

    fn send(&self, topic: &str, key: Option<&[u8]>, payload: &[u8], headers: Option<OwnedHeaders>) {
        let mut record = BaseRecord::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, back)) => {
                    // Not sent: recorded like a failed delivery, so nothing after it is committed.
                    let mut failure = self.producer.context().failure.lock().expect("delivery failure lock");
                    failure.get_or_insert_with(|| (back.topic.to_string(), error.to_string()));
                    return;
                }
            }
        }
    }

    fn dead_letter(&self, input: Input, record: &Record<'_>, reason: DeadLetterReason, error: &str) {
        metrics::counter!(metric::EVENTS_DEAD_LETTERED, "reason" => reason.as_str()).increment(1);
        let (partition, offset) = (record.partition.to_string(), record.offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "fraudstream.error", value: Some(truncate(error, MAX_ERROR_HEADER_BYTES)) })
            .insert(Header { key: "fraudstream.error.reason", value: Some(reason.as_str()) })
            .insert(Header { key: "fraudstream.source.topic", value: Some(self.topic(input)) })
            .insert(Header { key: "fraudstream.source.partition", value: Some(partition.as_str()) })
            .insert(Header { key: "fraudstream.source.offset", value: Some(offset.as_str()) });
        self.send(&self.config.dead_letter_topic, record.key, record.payload, Some(headers));
    }

    /// Writes one join to the output topic.
    fn emit(&self, mut scored: ScoredPayment, label: &PaymentLabel) -> Result<(), MonitorError> {
        scored.payment.fraud = Some(label.fraud);
        let payload = self
            .config
            .codec
            .encode_scored(&scored)
            .map_err(|source| MonitorError::Encode { payment_id: scored.payment.payment_id.clone(), source })?;
        self.send(&self.config.output_topic, Some(scored.payment.customer.as_bytes()), &payload, None);
        Ok(())
    }

    /// One record of `input`. `live`: past the committed offsets, so a join it
    /// completes is emitted (during a rebuild it only rebuilds state).
    fn process(&mut self, input: Input, record: &Record<'_>, live: bool) -> Result<(), MonitorError> {
        let codec = self.config.codec;
        let partition = record.partition;
        let limits = JoinLimits {
            window_ms: i64::try_from(self.config.label_window.as_millis()).unwrap_or(i64::MAX),
            max_entries: self.config.max_entries,
        };
        let outcome_name = match input {
            Input::Scored => {
                let scored = match codec.decode_scored(record.payload) {
                    Ok(s) => s,
                    Err(e) => {
                        if live {
                            self.dead_letter(input, record, DeadLetterReason::Undecodable, &e.to_string());
                        }
                        return Ok(());
                    }
                };
                let mut served = vec![Served {
                    version: self.intern(&scored.model_version),
                    probability: scored.fraud_probability,
                    flagged: scored.is_fraud,
                }];
                served.extend(self.shadow_served(&scored));
                let entry = Entry {
                    payload: record.payload.into(),
                    event_time: scored.payment.event_time,
                    scored_at: scored.scored_at,
                    served: served.clone(),
                    label: None,
                };
                let join = self.joins.entry(partition).or_insert_with(|| PartitionJoin::new(limits));
                match join.on_scored(&scored.payment.payment_id, entry) {
                    ScoredOutcome::Duplicate => "duplicate",
                    ScoredOutcome::Waiting => {
                        self.quality.scored(&served);
                        "waiting"
                    }
                    ScoredOutcome::Joined(label) => {
                        self.quality.scored(&served);
                        self.joined(&served, scored.scored_at, &label, true, live);
                        if live {
                            self.emit(scored, &label)?;
                        }
                        "joined"
                    }
                }
            }
            Input::Labels => {
                let label = match codec.decode_label(record.payload) {
                    Ok(l) => l,
                    Err(e) => {
                        if live {
                            self.dead_letter(input, record, DeadLetterReason::Undecodable, &e.to_string());
                        }
                        return Ok(());
                    }
                };
                if let Err(e) = label.validate() {
                    if live {
                        self.dead_letter(input, record, DeadLetterReason::InvalidLabel, &e.to_string());
                    }
                    return Ok(());
                }
                let join = self.joins.entry(partition).or_insert_with(|| PartitionJoin::new(limits));
                let (first, found) = match join.on_label(label) {
                    Outcome::Waiting => (None, None),
                    Outcome::Duplicate => (None, Some("duplicate")),
                    Outcome::Joined { entry, label } => (Some((entry.clone(), label, true)), None),
                    Outcome::Corrected { entry, label } => (Some((entry.clone(), label, false)), None),
                };
                match (first, found) {
                    (Some((entry, label, first)), _) => {
                        self.joined(&entry.served, entry.scored_at, &label, first, live);
                        if live {
                            let scored = codec.decode_scored(&entry.payload).expect("decoded when it was stored");
                            self.emit(scored, &label)?;
                        }
                        if first {
                            "joined"
                        } else {
                            "corrected"
                        }
                    }
                    (None, Some(name)) => name,
                    (None, None) => "waiting",
                }
            }
        };
        if live {
            metrics::counter!(metric::MONITOR_RECORDS, "input" => input.name(), "outcome" => outcome_name).increment(1);
        }
        let evicted = self.joins.get_mut(&partition).map(PartitionJoin::evict).unwrap_or_default();
        for entry in evicted.unlabelled.iter().chain(&evicted.labelled) {
            self.quality.evicted(entry);
        }
        for (kind, n) in [
            ("unlabelled", evicted.unlabelled.len() as u64),
            ("labelled", evicted.labelled.len() as u64),
            ("unmatched-label", evicted.unmatched_labels),
        ] {
            if n > 0 {
                metrics::counter!(metric::MONITOR_EVICTIONS, "kind" => kind).increment(n);
            }
        }
        Ok(())
    }

    /// A shadow version's view of a scored payment, when it carries one.
    fn shadow_served(&mut self, _scored: &ScoredPayment) -> Option<Served> {
        None
    }

    fn joined(&mut self, served: &[Served], scored_at: i64, label: &PaymentLabel, first: bool, live: bool) {
        self.quality.labelled(served, label.fraud, first);
        if live {
            metrics::counter!(metric::MONITOR_JOINS).increment(1);
            let delay = (label.labelled_at - scored_at).max(0) as f64 / 1000.0;
            metrics::histogram!(metric::MONITOR_LABEL_DELAY_SECONDS).record(delay);
        }
    }

    fn export(&self) {
        for r in self.quality.report() {
            let v = r.version.to_string();
            metrics::gauge!(metric::MONITOR_LABELLED, "version" => v.clone()).set(r.samples as f64);
            metrics::gauge!(metric::MONITOR_PRECISION, "version" => v.clone()).set(r.precision);
            metrics::gauge!(metric::MONITOR_RECALL, "version" => v.clone()).set(r.recall);
            metrics::gauge!(metric::MONITOR_AVERAGE_PRECISION, "version" => v.clone()).set(r.average_precision);
            metrics::gauge!(metric::MONITOR_ROC_AUC, "version" => v.clone()).set(r.roc_auc);
            metrics::gauge!(metric::MONITOR_ALERT_RATE, "version" => v.clone()).set(r.alert_rate);
            metrics::gauge!(metric::MONITOR_LABEL_COVERAGE, "version" => v).set(r.label_coverage);
        }
        let (scored, labels) = self.joins.values().fold((0, 0), |(s, l), j| {
            let (js, jl) = j.len();
            (s + js, l + jl)
        });
        metrics::gauge!(metric::MONITOR_STATE, "kind" => "scored").set(scored as f64);
        metrics::gauge!(metric::MONITOR_STATE, "kind" => "labels").set(labels as f64);
    }
}

/// The parts of a Kafka record the monitor uses.
struct Record<'a> {
    partition: i32,
    offset: i64,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
}

impl<'a> Record<'a> {
    fn of(message: &'a BorrowedMessage<'a>) -> Self {
        Record {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload().unwrap_or_default(),
        }
    }
}

/// Runs the monitor until `shutdown` (Ok, after a last commit) or a failure of ours (Err).
pub async fn run(config: MonitorConfig, shutdown: CancellationToken) -> Result<(), MonitorError> {
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.http_addr {
        serve_http(addr, ready.clone(), shutdown.clone()).await?;
    }
    let check = config.clone();
    let partitions =
        tokio::task::spawn_blocking(move || co_partitioned(&check)).await.map_err(|_| MonitorError::Panicked)??;
    ensure_topics(&config.kafka, &[&config.output_topic, &config.dead_letter_topic], partitions as i32).await?;
    tracing::info!(
        scored = %config.scored_topic,
        labels = %config.labels_topic,
        output = %config.output_topic,
        partitions,
        window = %humantime::format_duration(config.label_window),
        "monitor starting"
    );
    let flag = ready.clone();
    let result = tokio::task::spawn_blocking(move || poll_loop(config, &flag, &shutdown))
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

fn poll_loop(config: MonitorConfig, ready: &AtomicBool, shutdown: &CancellationToken) -> Result<(), MonitorError> {
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
        ])
        .create_with_context(Hooks { core: core.clone() })
        .map_err(kafka_err("creating the consumer"))?;
    consumer.subscribe(&[&config.scored_topic, &config.labels_topic]).map_err(kafka_err("subscribing"))?;
    let (mut last_commit, mut last_export) = (Instant::now(), Instant::now());
    while !shutdown.is_cancelled() {
        let message = consumer.poll(Duration::from_millis(100));
        let mut core = core.lock().expect("monitor state lock");
        if let Some(failure) = core.failure.take() {
            return Err(failure);
        }
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

impl Core {
    /// Rebuilds `partition`'s join from the records of both inputs written
    /// within the label window before the group's committed offsets, without
    /// emitting (those joins were emitted before the offsets were committed).
    fn rebuild(&mut self, consumer: &BaseConsumer<Hooks>, partition: i32) -> Result<(), MonitorError> {
        let started = Instant::now();
        let window_ms = i64::try_from(self.config.label_window.as_millis()).unwrap_or(i64::MAX);
        let limits = JoinLimits { window_ms, max_entries: self.config.max_entries };
        self.joins.insert(partition, PartitionJoin::new(limits));
        let inputs = [Input::Scored, Input::Labels];
        let mut wanted = TopicPartitionList::new();
        for input in inputs {
            wanted.add_partition(self.topic(input), partition);
        }
        let committed = consumer
            .committed_offsets(wanted, Duration::from_secs(15))
            .map_err(self.kafka_err("reading committed offsets"))?;
        let offset_of =
            |list: &TopicPartitionList, topic: &str| list.find_partition(topic, partition).map(|e| e.offset());
        let ends: Vec<(Input, i64)> = inputs
            .into_iter()
            .filter_map(|input| match offset_of(&committed, self.topic(input)) {
                Some(Offset::Offset(end)) if end > 0 => Some((input, end)),
                _ => None,
            })
            .collect();
        if ends.is_empty() {
            return Ok(());
        }
        let group = format!("{}-rebuild", self.config.group_id);
        let replay: BaseConsumer = self
            .config
            .kafka
            .client_config(&[
                ("group.id", &group),
                ("enable.auto.commit", "false"),
                ("isolation.level", "read_committed"),
                ("enable.partition.eof", "true"),
            ])
            .create()
            .map_err(self.kafka_err("creating the rebuild reader"))?;
        let mut times = TopicPartitionList::new();
        for (input, _) in &ends {
            times
                .add_partition_offset(self.topic(*input), partition, Offset::Offset(now_ms().saturating_sub(window_ms)))
                .map_err(self.kafka_err("listing offsets"))?;
        }
        let starts = replay
            .offsets_for_times(times, Duration::from_secs(15))
            .map_err(self.kafka_err("finding the window start"))?;
        let mut records: Vec<(i64, Input, i64, Option<Vec<u8>>, Vec<u8>)> = Vec::new();
        // One input at a time, so an end-of-partition event is unambiguous.
        for (input, end) in ends {
            // No record in the window: nothing to re-read.
            let Some(Offset::Offset(start)) = offset_of(&starts, self.topic(input)) else { continue };
            if start >= end {
                continue;
            }
            let mut assignment = TopicPartitionList::new();
            assignment
                .add_partition_offset(self.topic(input), partition, Offset::Offset(start))
                .map_err(self.kafka_err("listing offsets"))?;
            replay.assign(&assignment).map_err(self.kafka_err("assigning the rebuild reader"))?;
            let mut idle = Instant::now();
            loop {
                match replay.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        idle = Instant::now();
                        if m.offset() < end {
                            let time = m.timestamp().to_millis().unwrap_or(0);
                            let (key, payload) =
                                (m.key().map(<[u8]>::to_vec), m.payload().unwrap_or_default().to_vec());
                            records.push((time, input, m.offset(), key, payload));
                        }
                        if m.offset() + 1 >= end {
                            break;
                        }
                    }
                    // Everything readable was read (a transaction marker may sit just before `end`).
                    Some(Err(KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => return Err(self.kafka_err("re-reading the label window")(e)),
                    None if idle.elapsed() > Duration::from_secs(30) => {
                        tracing::warn!(
                            partition,
                            input = input.name(),
                            "rebuild: nothing readable for 30 s; going on with what was read"
                        );
                        break;
                    }
                    None => {}
                }
            }
        }
        records.sort_by_key(|(time, ..)| *time);
        let count = records.len();
        for (_, input, offset, key, payload) in &records {
            let record = Record { partition, offset: *offset, key: key.as_deref(), payload };
            self.process(*input, &record, false)?;
        }
        let (scored, labels) = self.joins.get(&partition).map(PartitionJoin::len).unwrap_or_default();
        metrics::histogram!(metric::MONITOR_REBUILD_SECONDS).record(started.elapsed().as_secs_f64());
        tracing::info!(
            partition,
            records = count,
            scored,
            labels,
            seconds = started.elapsed().as_secs_f64(),
            "rebuilt the join"
        );
        Ok(())
    }
}
