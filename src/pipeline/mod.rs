//! The streaming scorer: consume `Payment`s in a consumer group, score them
//! in micro-batches, produce `ScoredPayment`s, dead-letter what cannot be
//! scored, and commit an input offset only after its output is acknowledged.
//!
//! Data flow (one direction):
//!
//! ```text
//! consumer loop --raw events, in chunks--> batcher: decode --micro-batch--> ScoringService (model thread)
//!                                             \--undecodable--> DLQ                    |
//!                                 emitter <--scores in batch order----------------------+
//!                                    |--ScoredPayment--> output topic
//!                                    \--unencodable----> DLQ
//! broker ack (delivery callback) --> OffsetTracker --> store offset --> auto-commit
//! ```
//!
//! At-least-once: offsets are stored only from delivery callbacks, in order
//! per partition; on partition revoke and on shutdown, in-flight work is
//! drained and committed before the partitions are let go. A crash anywhere
//! re-delivers instead of losing. Backpressure: a semaphore bounds events in
//! flight, so a slow broker pauses consumption rather than filling memory.

mod offsets;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message, Statistics};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

pub use offsets::OffsetTracker;

use crate::codec::Codec;
use crate::kafka::KafkaArgs;
use crate::payment::{now_ms, Payment, ScoredPayment};
use crate::scoring::{ScoredBatch, ScoringError, ScoringService};
use crate::telemetry::metric;

/// Settings of the streaming part of the scorer.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub kafka: KafkaArgs,
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    pub dead_letter_topic: String,
    pub input_codec: Codec,
    pub output_codec: Codec,
    /// Most events in one micro-batch.
    pub max_batch: usize,
    /// Longest an event waits for its batch to fill.
    pub max_delay: Duration,
    /// Most events read but not yet acknowledged downstream (backpressure).
    pub max_in_flight: usize,
    /// Longest a revoke or shutdown waits for in-flight events.
    pub drain_timeout: Duration,
    /// Forward every input event unchanged to the output topic, without
    /// decoding or scoring: the same consumer, producer and offset handling,
    /// as a benchmark baseline for the Kafka ceiling.
    pub relay: bool,
}

/// Shared liveness facts for `/readyz`.
#[derive(Debug, Default)]
pub struct PipelineState {
    assigned: Mutex<HashSet<(String, i32)>>,
}

impl PipelineState {
    /// Partitions this member owns now.
    pub fn assigned_partitions(&self) -> usize {
        self.assigned.lock().expect("assignment lock").len()
    }
}

/// Counts of one pipeline run, for tests and the demo's summary.
#[derive(Debug, Default)]
pub struct PipelineCounters {
    pub consumed: std::sync::atomic::AtomicU64,
    pub scored: std::sync::atomic::AtomicU64,
    pub dead_lettered: std::sync::atomic::AtomicU64,
    pub flagged: std::sync::atomic::AtomicU64,
}

/// A failure that stops the pipeline (bad configuration, unreachable broker at start).
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("Kafka client for {brokers}: {source}")]
    Kafka { brokers: String, source: KafkaError },
    #[error("scoring service: {0}")]
    Scoring(#[from] ScoringError),
}

/// What the delivery callback needs to finish an event.
struct Delivery {
    partition: i32,
    offset: i64,
    event_time: i64,
    kind: DeliveryKind,
}

#[derive(Clone, Copy, PartialEq)]
enum DeliveryKind {
    Scored,
    DeadLetter,
}

type ScorerConsumer = StreamConsumer<ConsumerHooks>;

/// Handles of the per-event metrics, looked up once: the `metrics` macros
/// hash the metric's key on every call, which shows at 100k+ events/s.
struct EventMetrics {
    events_in: metrics::Counter,
    events_out: metrics::Counter,
    end_to_end: metrics::Histogram,
    fraud_probability: metrics::Histogram,
    fraud_flagged: metrics::Counter,
}

impl EventMetrics {
    fn new() -> Self {
        // Handles taken before the recorder exists would stay no-ops for good.
        let _ = crate::telemetry::prometheus();
        Self {
            events_in: metrics::counter!(metric::EVENTS_IN),
            events_out: metrics::counter!(metric::EVENTS_OUT),
            end_to_end: metrics::histogram!(metric::END_TO_END_SECONDS),
            fraud_probability: metrics::histogram!(metric::FRAUD_PROBABILITY),
            fraud_flagged: metrics::counter!(metric::FRAUD_FLAGGED),
        }
    }
}

/// State shared by the consumer hooks and the producer's delivery callback.
struct Shared {
    tracker: OffsetTracker,
    state: Arc<PipelineState>,
    in_flight: Semaphore,
    /// Weak: the consumer owns this struct through its hooks; a strong
    /// reference would keep it alive (and in the group) forever.
    consumer: OnceLock<Weak<ScorerConsumer>>,
    counters: Arc<PipelineCounters>,
    metrics: EventMetrics,
    drain_timeout: Duration,
    intake: Intake,
}

/// Events read but not yet handed to the batcher, kept where the rebalance
/// hook can reach them: it runs inside `consumer.recv()`, possibly in the
/// middle of a chunk, and must pass those events on before it waits for the
/// revoked partitions to drain, or it would wait for them in vain.
struct Intake {
    chunk: Mutex<Vec<InFlight>>,
    /// Taken at shutdown, so the batcher sees the channel close.
    batcher: Mutex<Option<mpsc::Sender<Vec<InFlight>>>>,
}

impl Intake {
    fn take_chunk(&self) -> Vec<InFlight> {
        let mut chunk = self.chunk.lock().expect("intake lock");
        let capacity = chunk.len();
        std::mem::replace(&mut *chunk, Vec::with_capacity(capacity))
    }

    /// Hands the held events to the batcher from a thread that must not
    /// await (the rebalance hook); the batcher runs on other threads.
    fn flush_blocking(&self) {
        let mut chunk = self.take_chunk();
        let Some(batcher) = self.batcher.lock().expect("intake lock").clone() else { return };
        while !chunk.is_empty() {
            match batcher.try_send(chunk) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    chunk = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }
}

impl Shared {
    /// An event is done: free its slot, and store the committable offset.
    fn finish(&self, partition: i32, offset: i64) {
        self.in_flight.add_permits(1);
        if let Some(position) = self.tracker.finish(partition, offset) {
            if let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) {
                // store_offset(o) commits o + 1; fails harmlessly if the partition was revoked.
                if let Err(e) = consumer.store_offset(self.tracker.topic(), partition, position - 1) {
                    tracing::debug!(partition, position, error = %e, "offset not stored");
                }
            }
        }
    }
}

/// Rebalance and statistics hooks of the consumer.
struct ConsumerHooks(Arc<Shared>);

impl ClientContext for ConsumerHooks {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(metric::CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for ConsumerHooks {
    fn pre_rebalance(&self, consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        let revoked: Vec<(String, i32)> =
            list.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        metrics::counter!(metric::REBALANCES, "kind" => "revoke").increment(1);
        // Drain: pass on the events the consumer loop holds, wait until every
        // event of the revoked partitions is acknowledged (the batcher and
        // emitter run on other threads), then commit.
        self.0.intake.flush_blocking();
        let deadline = Instant::now() + self.0.drain_timeout;
        while self.0.tracker.in_flight(Some(&revoked)) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = self.0.tracker.in_flight(Some(&revoked));
        if left > 0 {
            tracing::warn!(left, "revoke: drain timed out; those events will be re-delivered to the next owner");
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "revoke: nothing to commit or commit failed");
        }
        self.0.tracker.forget(&revoked);
        let mut assigned = self.0.state.assigned.lock().expect("assignment lock");
        for key in &revoked {
            assigned.remove(key);
        }
        tracing::info!(partitions = ?revoked, "partitions revoked after draining");
    }

    fn post_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let added: Vec<(String, i32)> =
                list.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
            metrics::counter!(metric::REBALANCES, "kind" => "assign").increment(1);
            tracing::info!(partitions = ?added, "partitions assigned");
            self.0.state.assigned.lock().expect("assignment lock").extend(added);
        }
    }
}

/// The producer's delivery callback: runs on librdkafka's thread, so
/// acknowledgements never wait on the async runtime.
struct DeliveryHooks(Arc<Shared>);

impl ClientContext for DeliveryHooks {}

impl ProducerContext for DeliveryHooks {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        match result {
            Ok(_) => {
                match delivery.kind {
                    DeliveryKind::Scored => {
                        self.0.metrics.events_out.increment(1);
                        self.0.counters.scored.fetch_add(1, Ordering::Relaxed);
                        let latency = (now_ms() - delivery.event_time).max(0) as f64 / 1000.0;
                        self.0.metrics.end_to_end.record(latency);
                    }
                    DeliveryKind::DeadLetter => {
                        self.0.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.0.finish(delivery.partition, delivery.offset);
            }
            Err((e, _)) => {
                // With message.timeout.ms=0 librdkafka retries until it succeeds;
                // only permanent errors land here. The offset stays uncommitted,
                // so the event is re-delivered after a restart: nothing is lost.
                tracing::error!(
                    partition = delivery.partition,
                    offset = delivery.offset,
                    error = %e,
                    "output delivery failed permanently; its input offset will not be committed"
                );
                metrics::counter!(metric::DELIVERY_FAILURES).increment(1);
                self.0.in_flight.add_permits(1);
            }
        }
    }
}

/// An event on its way through the pipeline.
struct InFlight {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    /// Decoded by the batcher; kept for dead letters, which carry the original bytes.
    payload: Vec<u8>,
    headers: Option<OwnedHeaders>,
}

impl InFlight {
    fn of(message: &BorrowedMessage<'_>) -> Self {
        Self {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers: message.headers().map(|h| h.detach()),
        }
    }
}

struct Emitter {
    producer: ThreadedProducer<DeliveryHooks>,
    config: PipelineConfig,
}

impl Emitter {
    /// Enqueues a record, waiting while librdkafka's local queue is full.
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        delivery: Box<Delivery>,
    ) {
        let mut record = BaseRecord::with_opaque_to(topic, delivery).payload(payload);
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
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, back)) => {
                    // Not retriable (e.g. a record over message.max.bytes). The input
                    // offset stays uncommitted, so the event is re-delivered after a
                    // restart instead of being lost; its slot is freed.
                    tracing::error!(
                        topic,
                        partition = back.delivery_opaque.partition,
                        offset = back.delivery_opaque.offset,
                        error = %e,
                        "cannot enqueue record; its input offset will not be committed"
                    );
                    metrics::counter!(metric::DELIVERY_FAILURES).increment(1);
                    self.producer.context().0.in_flight.add_permits(1);
                    return;
                }
            }
        }
    }

    /// Sends the original event to the dead-letter topic with headers naming the error.
    async fn dead_letter(&self, event: InFlight, event_time: i64, reason: &'static str, error: &str) {
        metrics::counter!(metric::EVENTS_DEAD_LETTERED, "reason" => reason).increment(1);
        tracing::debug!(partition = event.partition, offset = event.offset, reason, error, "dead-lettering event");
        let mut headers = OwnedHeaders::new();
        if let Some(original) = &event.headers {
            for h in original.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        let partition = event.partition.to_string();
        let offset = event.offset.to_string();
        headers = headers
            .insert(Header { key: "fraudstream.error", value: Some(error) })
            .insert(Header { key: "fraudstream.error.reason", value: Some(reason) })
            .insert(Header { key: "fraudstream.source.topic", value: Some(self.config.input_topic.as_str()) })
            .insert(Header { key: "fraudstream.source.partition", value: Some(partition.as_str()) })
            .insert(Header { key: "fraudstream.source.offset", value: Some(offset.as_str()) });
        let delivery = Box::new(Delivery {
            partition: event.partition,
            offset: event.offset,
            event_time,
            kind: DeliveryKind::DeadLetter,
        });
        self.send(&self.config.dead_letter_topic, event.key.as_deref(), &event.payload, Some(headers), delivery).await;
    }

    /// Produces the results of one scored batch, in order.
    async fn emit(&self, events: Vec<InFlight>, batch: Result<ScoredBatch, ScoringError>, counters: &PipelineCounters) {
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                let message = format!("scoring failed: {e}");
                for event in events {
                    self.dead_letter(event, now_ms(), "scoring", &message).await;
                }
                return;
            }
        };
        let scored_at = now_ms();
        for ((event, payment), result) in events.into_iter().zip(batch.payments).zip(batch.results) {
            match result {
                Ok([_, p_fraud]) => {
                    let fraud_probability = f64::from(p_fraud);
                    let is_fraud = fraud_probability >= batch.model.threshold;
                    let event_metrics = &self.producer.context().0.metrics;
                    event_metrics.fraud_probability.record(fraud_probability);
                    if is_fraud {
                        event_metrics.fraud_flagged.increment(1);
                        counters.flagged.fetch_add(1, Ordering::Relaxed);
                    }
                    let event_time = payment.event_time;
                    let scored = ScoredPayment {
                        payment,
                        fraud_probability,
                        is_fraud,
                        threshold: batch.model.threshold,
                        model_name: batch.model.name.clone(),
                        model_version: batch.model.version.clone(),
                        scored_at,
                    };
                    match self.config.output_codec.encode_scored(&scored) {
                        Ok(bytes) => {
                            let delivery = Box::new(Delivery {
                                partition: event.partition,
                                offset: event.offset,
                                event_time,
                                kind: DeliveryKind::Scored,
                            });
                            self.send(&self.config.output_topic, event.key.as_deref(), &bytes, None, delivery).await;
                        }
                        Err(e) => self.dead_letter(event, event_time, "output-encoding", &e.to_string()).await,
                    }
                }
                Err(e) => self.dead_letter(event, payment.event_time, "invalid-payment", &e.to_string()).await,
            }
        }
    }
}

/// Runs the pipeline until `shutdown` is cancelled, then drains and commits.
/// The scoring service must already have a model in service.
pub async fn run(
    config: PipelineConfig,
    scoring: ScoringService,
    state: Arc<PipelineState>,
    counters: Arc<PipelineCounters>,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let kafka_err = |source| PipelineError::Kafka { brokers: config.kafka.brokers.clone(), source };
    let shared = Arc::new(Shared {
        tracker: OffsetTracker::new(&config.input_topic),
        state: state.clone(),
        in_flight: Semaphore::new(config.max_in_flight),
        consumer: OnceLock::new(),
        counters: counters.clone(),
        metrics: EventMetrics::new(),
        drain_timeout: config.drain_timeout,
        intake: Intake { chunk: Mutex::new(Vec::new()), batcher: Mutex::new(None) },
    });
    let producer: ThreadedProducer<DeliveryHooks> = config
        .kafka
        .client_config(&[
            ("enable.idempotence", "true"),
            ("linger.ms", "1"),
            ("compression.type", "lz4"),
            // Retry until delivered: an undeliverable output must never let its input be committed.
            ("message.timeout.ms", "0"),
            ("queue.buffering.max.messages", "1000000"),
        ])
        .create_with_context(DeliveryHooks(shared.clone()))
        .map_err(kafka_err)?;
    let consumer: Arc<ScorerConsumer> = Arc::new(
        config
            .kafka
            .client_config(&[
                ("group.id", &config.group_id),
                ("partition.assignment.strategy", "cooperative-sticky"),
                ("enable.auto.commit", "true"),
                ("auto.commit.interval.ms", "1000"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("statistics.interval.ms", "5000"),
                // When the local queue is full, look again after 10 ms, not the
                // default 1 s: the default caps a catching-up consumer near 150k
                // events/s however fast the broker and the scorer are.
                ("fetch.queue.backoff.ms", "10"),
            ])
            .create_with_context(ConsumerHooks(shared.clone()))
            .map_err(kafka_err)?,
    );
    let _ = shared.consumer.set(Arc::downgrade(&consumer));
    consumer.subscribe(&[&config.input_topic]).map_err(kafka_err)?;
    tracing::info!(topic = %config.input_topic, group = %config.group_id, "consuming");

    // The consumer loop hands raw events over in chunks (one channel operation
    // per chunk, not per event); the batcher decodes them into micro-batches
    // for the scoring service; the emitter produces the scores in order. Each
    // stage runs beside the others, so the consumer loop, the one stage that
    // cannot be split, does no more per event than the relay does.
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<Vec<InFlight>>(16);
    *shared.intake.batcher.lock().expect("intake lock") = Some(chunk_tx.clone());
    let (batch_tx, mut batch_rx) = mpsc::channel::<Pending>(8);
    let emitter = Arc::new(Emitter { producer, config: config.clone() });

    let batcher = {
        let scoring = scoring.clone();
        let emitter = emitter.clone();
        let (max_batch, max_delay, codec) = (config.max_batch, config.max_delay, config.input_codec);
        tokio::spawn(async move {
            let mut events = Vec::with_capacity(max_batch);
            let mut payments = Vec::with_capacity(max_batch);
            let mut deadline = tokio::time::Instant::now();
            // Wait for work, then fill the batch until it is full or due.
            loop {
                let next = if events.is_empty() {
                    chunk_rx.recv().await
                } else {
                    // Take what is queued without a timer; arm one only to wait.
                    match chunk_rx.try_recv() {
                        Ok(chunk) => Some(chunk),
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                        // Due: an empty chunk, so the batch below is submitted.
                        Err(mpsc::error::TryRecvError::Empty) => {
                            tokio::time::timeout_at(deadline, chunk_rx.recv()).await.unwrap_or(Some(Vec::new()))
                        }
                    }
                };
                let Some(mut chunk) = next else { break };
                for event in chunk.drain(..) {
                    match decode(&codec, &event.payload) {
                        Ok(payment) => {
                            if events.is_empty() {
                                deadline = tokio::time::Instant::now() + max_delay;
                            }
                            events.push(event);
                            payments.push(payment);
                        }
                        Err(error) => emitter.dead_letter(event, now_ms(), "undecodable", &error).await,
                    }
                    if events.len() == max_batch && !submit(&scoring, &batch_tx, &mut events, &mut payments).await {
                        return;
                    }
                }
                let due = tokio::time::Instant::now() >= deadline;
                if !events.is_empty() && due && !submit(&scoring, &batch_tx, &mut events, &mut payments).await {
                    break;
                }
            }
            if !events.is_empty() {
                submit(&scoring, &batch_tx, &mut events, &mut payments).await;
            }
        })
    };
    let emitter_task = {
        let emitter = emitter.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            while let Some((events, reply)) = batch_rx.recv().await {
                let batch = reply.await.unwrap_or(Err(ScoringError::Stopped));
                emitter.emit(events, batch, &counters).await;
            }
        })
    };

    // The consumer loop: wait for one event, then take the events that are
    // already there (and have a slot), up to a batch, without waiting again.
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = shared.in_flight.acquire() => permit.expect("semaphore open"),
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = consumer.recv() => message,
        };
        let mut taken = 0;
        let mut next = Some((permit, message));
        while let Some((permit, message)) = next.take() {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            };
            // The slot is given back by the delivery callback.
            permit.forget();
            taken += 1;
            shared.tracker.begin(message.partition(), message.offset());
            if config.relay {
                let delivery = Box::new(Delivery {
                    partition: message.partition(),
                    offset: message.offset(),
                    event_time: message.timestamp().to_millis().unwrap_or_else(now_ms),
                    kind: DeliveryKind::Scored,
                });
                let payload = message.payload().unwrap_or_default();
                emitter.send(&config.output_topic, message.key(), payload, None, delivery).await;
            } else {
                // Locked per event, never across recv(): the rebalance hook
                // takes the same lock from inside recv() on this thread.
                shared.intake.chunk.lock().expect("intake lock").push(InFlight::of(&message));
            }
            if taken < config.max_batch {
                if let Ok(permit) = shared.in_flight.try_acquire() {
                    next = consumer.recv().now_or_never().map(|message| (permit, message));
                }
            }
        }
        shared.metrics.events_in.increment(taken as u64);
        counters.consumed.fetch_add(taken as u64, Ordering::Relaxed);
        let chunk = shared.intake.take_chunk();
        if !chunk.is_empty() && chunk_tx.send(chunk).await.is_err() {
            break;
        }
    }

    // Shutdown: stop reading, drain what is in flight, commit, let go.
    tracing::info!("shutting down: draining in-flight events");
    drop(chunk_tx);
    shared.intake.batcher.lock().expect("intake lock").take();
    let _ = batcher.await;
    let _ = emitter_task.await;
    let deadline = Instant::now() + config.drain_timeout;
    while shared.tracker.in_flight(None) > 0 && Instant::now() < deadline {
        let _ = emitter.producer.flush(Duration::from_millis(100));
    }
    let left = shared.tracker.in_flight(None);
    if left > 0 {
        tracing::warn!(left, "drain timed out; those events will be re-delivered");
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit: nothing to commit or commit failed");
    }
    consumer.unsubscribe();
    // Producer first (its callbacks store offsets), then the consumer, which
    // leaves the group as it closes.
    drop(emitter);
    drop(consumer);
    state.assigned.lock().expect("assignment lock").clear();
    tracing::info!("pipeline stopped");
    Ok(())
}

/// A micro-batch's events, waiting for their scores.
type Pending = (Vec<InFlight>, oneshot::Receiver<Result<ScoredBatch, ScoringError>>);

/// Hands a micro-batch to the scoring service and its events to the
/// emitter; false once the pipeline is shutting down.
async fn submit(
    scoring: &ScoringService,
    batch_tx: &mpsc::Sender<Pending>,
    events: &mut Vec<InFlight>,
    payments: &mut Vec<Payment>,
) -> bool {
    let capacity = events.capacity();
    let reply = match scoring.submit(std::mem::replace(payments, Vec::with_capacity(capacity))).await {
        Ok(reply) => reply,
        Err(e) => {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(e));
            rx
        }
    };
    batch_tx.send((std::mem::replace(events, Vec::with_capacity(capacity)), reply)).await.is_ok()
}

fn decode(codec: &Codec, payload: &[u8]) -> Result<Payment, String> {
    if payload.is_empty() {
        return Err("empty message".to_string());
    }
    codec.decode_payment(payload).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(offset: i64) -> InFlight {
        InFlight { partition: 0, offset, key: None, payload: vec![1], headers: None }
    }

    /// The rebalance hook hands over what the consumer loop holds, waiting
    /// (without a runtime) while the batcher's queue is full.
    #[test]
    fn held_events_reach_the_batcher_from_the_rebalance_hook() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        tx.try_send(vec![event(0)]).unwrap();
        let intake = Arc::new(Intake { chunk: Mutex::new(vec![event(1), event(2)]), batcher: Mutex::new(Some(tx)) });
        let hook = std::thread::spawn({
            let intake = intake.clone();
            move || intake.flush_blocking()
        });
        let offsets: Vec<i64> = runtime.block_on(async {
            let mut offsets = Vec::new();
            while offsets.len() < 3 {
                offsets.extend(rx.recv().await.unwrap().iter().map(|e| e.offset));
            }
            offsets
        });
        hook.join().unwrap();
        assert_eq!(offsets, [0, 1, 2]);
        assert!(intake.take_chunk().is_empty());
        // After shutdown (no batcher) there is nowhere to hand events to; the hook returns.
        intake.batcher.lock().unwrap().take();
        intake.chunk.lock().unwrap().push(event(3));
        intake.flush_blocking();
    }
}
