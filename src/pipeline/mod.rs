//! The streaming scorer: consume `Payment`s in a consumer group, score them
//! in micro-batches, produce `ScoredPayment`s, dead-letter bad input, and
//! commit an input offset only after its output is acknowledged.
//!
//! Data flow (one direction), each module one job:
//!
//! ```text
//! source (own thread: consumer, rebalances) --events with tickets, in chunks-->
//!   batcher task: decode, micro-batch --> ScoringService (model thread)
//!      \--undecodable--> sink: DLQ                          |
//!   emitter task <--scores, in batch order------------------+
//!      --> drift: count the batch into the PSI window (metrics only)
//!      --> sink: ScoredPayment --> output topic   (bad input --> DLQ)
//! broker ack (delivery callback) --> ticket.ack() --> OffsetTracker --> store offset --> commit
//! ```
//!
//! Fail closed (`failure`): a failure of ours (model, producer, broker)
//! never dead-letters a valid payment and never commits past it. The first
//! one stops consumption; what was acknowledged is drained and committed;
//! `run` returns the failure, `/readyz` reports it, and `fraudstream score`
//! exits non-zero so the orchestrator restarts it. A crash anywhere
//! re-delivers instead of losing. Memory is bounded by the in-flight budget
//! (events and bytes) that every ticket holds until it is finished.

mod batcher;
mod drift;
mod failure;
mod guard;
mod offsets;
mod replay;
mod sink;
mod source;
mod ticket;
mod transaction;

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use batcher::{BatchPolicy, Batcher};
pub use failure::{Failure, PipelineFailure};
pub use guard::{DeadLetterGuard, GuardLimits};
pub use offsets::OffsetTracker;
pub use replay::{Decode, KafkaReplay};
pub use sink::{truncate, DeadLetterReason, MAX_ERROR_HEADER_BYTES};
pub use ticket::{Acks, InFlightLimits, Ticket};
pub use transaction::{default_transactional_id, TransactionConfig};

use crate::codec::{Codec, WireFormat};
use crate::decision::Decision;
use crate::history::Position;
use crate::kafka::KafkaArgs;
use crate::payment::Payment;
use crate::registry::{RegistryConfig, SchemaRegistry, WriterSchemas};
use crate::scoring::{ScoredBatch, ScoringError, ScoringService};
use crate::telemetry::metric;
use batcher::Next;
use drift::DriftMonitor;
use sink::{Event, Sink};
use source::{Downstream, Source};

/// What a reader of the output topic may count on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every valid payment is scored; a crash re-delivers (duplicates possible).
    AtLeastOnce,
    /// Outputs and input offsets commit together in Kafka transactions: a
    /// `read_committed` reader sees each output once.
    ExactlyOnce,
}

impl crate::choice::Choice for Delivery {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::AtLeastOnce, "at-least-once", "a crash re-delivers; duplicates possible, loss not"),
        (Self::ExactlyOnce, "exactly-once", "Kafka transactions; read the output with isolation.level=read_committed"),
    ];
}

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
    /// Most payload bytes read but not yet acknowledged (memory bound).
    pub max_in_flight_bytes: usize,
    /// Longest a revoke or shutdown waits for in-flight events.
    pub drain_timeout: Duration,
    /// When too much is dead-lettered, stop instead.
    pub dead_letter_guard: GuardLimits,
    pub delivery: Delivery,
    /// Exactly-once only: the transactional id and when transactions commit.
    pub transaction: TransactionConfig,
    /// Where writer schemas of Confluent-format input are looked up; the
    /// output schema is registered there by the scorer.
    pub schema_registry: Option<RegistryConfig>,
    /// PSI of the stream against the serving version's training reference.
    pub drift: crate::drift::DriftConfig,
    /// Benchmarks only (no flag sets it): forward every input event unchanged
    /// to the output topic, without decoding or scoring, through the same
    /// consumer, tickets and producer: the baseline for the Kafka ceiling.
    pub relay_baseline: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            kafka: KafkaArgs::new("127.0.0.1:9092"),
            group_id: "fraudstream-scorer".into(),
            input_topic: "payments".into(),
            output_topic: "payments-scored".into(),
            dead_letter_topic: "payments-dlq".into(),
            input_codec: Codec::new(WireFormat::Confluent, 1),
            output_codec: Codec::new(WireFormat::Confluent, crate::codec::SCORED_PAYMENT_SCHEMA_ID),
            max_batch: 1024,
            max_delay: Duration::from_millis(2),
            max_in_flight: 100_000,
            max_in_flight_bytes: 256 << 20,
            drain_timeout: Duration::from_secs(30),
            dead_letter_guard: GuardLimits::default(),
            delivery: Delivery::AtLeastOnce,
            transaction: TransactionConfig::default(),
            schema_registry: None,
            drift: crate::drift::DriftConfig::default(),
            relay_baseline: false,
        }
    }
}

/// What `/readyz` needs to know about the pipeline.
#[derive(Debug, Default)]
pub struct PipelineState {
    assigned: Mutex<HashSet<(String, i32)>>,
    /// Why nothing is being consumed although the pipeline runs (e.g. no input topic yet).
    waiting: Mutex<Option<String>>,
    /// A dependency the pipeline waits for (an unreachable schema registry): not ready meanwhile.
    stalled: Mutex<Option<String>>,
    /// The current run's failure record (a rewind starts a fresh one).
    failure: Mutex<Arc<Failure>>,
    delivery: std::sync::OnceLock<Delivery>,
}

impl PipelineState {
    /// Partitions this member owns now.
    pub fn assigned_partitions(&self) -> usize {
        self.assigned.lock().expect("assignment lock").len()
    }

    fn assign(&self, partitions: Vec<(String, i32)>) {
        self.assigned.lock().expect("assignment lock").extend(partitions);
        self.set_waiting(None);
    }

    fn unassign(&self, partitions: &[(String, i32)]) {
        let mut assigned = self.assigned.lock().expect("assignment lock");
        for key in partitions {
            assigned.remove(key);
        }
    }

    fn set_waiting(&self, reason: Option<String>) {
        *self.waiting.lock().expect("waiting lock") = reason;
    }

    /// Records (or clears) what the pipeline waits for.
    pub fn set_stalled(&self, reason: Option<String>) {
        *self.stalled.lock().expect("stalled lock") = reason;
    }

    /// What the pipeline waits for, if anything.
    pub fn stalled(&self) -> Option<String> {
        self.stalled.lock().expect("stalled lock").clone()
    }

    /// Why the pipeline is not consuming, if it says.
    pub fn waiting(&self) -> Option<String> {
        self.waiting.lock().expect("waiting lock").clone()
    }

    /// The delivery mode of the running pipeline.
    pub fn delivery(&self) -> Option<Delivery> {
        self.delivery.get().copied()
    }

    /// The failure that stopped the pipeline, if one did.
    pub fn failure(&self) -> Option<PipelineFailure> {
        self.failure.lock().expect("failure lock").get().cloned()
    }

    /// A fresh failure record for a new run of the pipeline.
    fn begin_run(&self) -> Arc<Failure> {
        let fresh = Arc::new(Failure::default());
        *self.failure.lock().expect("failure lock") = fresh.clone();
        fresh
    }
}

/// Counts of one pipeline run, for tests and the demo's summary.
#[derive(Debug, Default)]
pub struct PipelineCounters {
    pub consumed: AtomicU64,
    pub scored: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub flagged: AtomicU64,
    /// Revokes or shutdowns whose drain ran out of time.
    pub drain_timeouts: AtomicU64,
}

/// Why the pipeline did not run to a clean stop.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("Kafka client for {brokers}: {source}")]
    Kafka { brokers: String, source: KafkaError },
    #[error(transparent)]
    Failed(#[from] PipelineFailure),
    #[error(transparent)]
    Registry(crate::registry::RegistryError),
}

/// Handles of the per-event metrics, looked up once: the `metrics` macros
/// hash the metric's key on every call, which shows at 100k+ events/s.
struct EventMetrics {
    events_out: metrics::Counter,
    end_to_end: metrics::Histogram,
    fraud_probability: metrics::Histogram,
    fraud_flagged: metrics::Counter,
    /// Allow, review, block.
    decisions: [metrics::Counter; 3],
}

impl EventMetrics {
    fn new() -> Self {
        // Handles taken before the recorder exists would stay no-ops for good.
        let _ = crate::telemetry::prometheus();
        Self {
            events_out: metrics::counter!(metric::EVENTS_OUT),
            end_to_end: metrics::histogram!(metric::END_TO_END_SECONDS),
            fraud_probability: metrics::histogram!(metric::FRAUD_PROBABILITY),
            fraud_flagged: metrics::counter!(metric::FRAUD_FLAGGED),
            decisions: [Decision::Allow, Decision::Review, Decision::Block]
                .map(|d| metrics::counter!(metric::DECISIONS, "decision" => d.as_str())),
        }
    }

    fn decided(&self, decision: Decision) -> &metrics::Counter {
        &self.decisions[decision as usize]
    }
}

/// Runs the pipeline until `shutdown` is cancelled or something of ours
/// fails; then drains what is in flight, commits what was acknowledged and
/// returns (the failure, if there was one). The scoring service must
/// already have a model in service.
pub async fn run(
    config: PipelineConfig,
    scoring: ScoringService,
    state: Arc<PipelineState>,
    counters: Arc<PipelineCounters>,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let kafka_err = |source| PipelineError::Kafka { brokers: config.kafka.brokers.clone(), source };
    let failure = state.begin_run();
    let _ = state.delivery.set(config.delivery);
    let limits = InFlightLimits { events: config.max_in_flight.max(1), bytes: config.max_in_flight_bytes.max(1) };
    let acks = Arc::new(Acks::new(&config.input_topic, limits, failure.clone()));
    let sink =
        Arc::new(Sink::create(&config, failure.clone(), EventMetrics::new(), counters.clone()).map_err(kafka_err)?);
    let events_in = metrics::counter!(metric::EVENTS_IN);
    let schemas = match (&config.schema_registry, config.input_codec.format()) {
        (Some(registry), WireFormat::Confluent) => {
            let registry = SchemaRegistry::new(registry.clone()).map_err(PipelineError::Registry)?;
            Some(Arc::new(WriterSchemas::new(registry, crate::codec::PAYMENT_SCHEMA_JSON)))
        }
        _ => None,
    };

    // Stop on shutdown or on the first failure, whichever comes first.
    let stop = CancellationToken::new();
    let stop_watch = tokio::spawn({
        let (stop, shutdown, failed) = (stop.clone(), shutdown.clone(), failure.stopped().clone());
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = failed.cancelled() => {}
                _ = stop.cancelled() => {}
            }
            stop.cancel();
        }
    });

    // The batcher and the emitter run as tasks; the source hands them events.
    let (downstream, tasks) = if config.relay_baseline {
        (Downstream::Relay, Vec::new())
    } else {
        let (chunk_tx, chunk_rx) = mpsc::channel::<Vec<Event>>(16);
        let (batch_tx, batch_rx) = mpsc::channel::<Pending>(8);
        let policy = BatchPolicy { max_batch: config.max_batch.max(1), max_delay: config.max_delay };
        // Customer histories are rebuilt from this input, decoded as the batcher decodes it.
        let decode: replay::Decode = {
            let (codec, schemas) = (config.input_codec, schemas.clone());
            Box::new(move |bytes| decode_payment(&codec, schemas.as_deref(), bytes).ok())
        };
        let history = replay::KafkaReplay {
            kafka: config.kafka.clone(),
            group_id: config.group_id.clone(),
            topic: config.input_topic.clone(),
            decode,
        };
        // Fails only if the scoring service stopped, which the first batch reports.
        let _ = scoring.set_replay(Some(Box::new(history))).await;
        let input = Input { codec: config.input_codec, schemas, state: state.clone(), stop: stop.clone() };
        let batching = tokio::spawn(batch(chunk_rx, policy, input, scoring, batch_tx));
        let drift = DriftMonitor::new(config.drift);
        let emitting = tokio::spawn(emit(batch_rx, sink.clone(), counters.clone(), drift));
        (Downstream::Batcher(chunk_tx), vec![batching, emitting])
    };
    let source = Source::create(&config, acks, state.clone(), counters.clone(), sink.clone(), downstream, events_in)
        .map_err(kafka_err)?;
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("fraudstream-source".into())
        .spawn({
            let stop = stop.clone();
            move || {
                let _ = done_tx.send(source.run(stop));
            }
        })
        .expect("spawning the consumer thread");
    let subscribed = done_rx.await.unwrap_or(Ok(()));
    stop.cancel();
    let _ = stop_watch.await;
    for task in tasks {
        let _ = task.await;
    }
    drop(sink);
    state.assigned.lock().expect("assignment lock").clear();
    subscribed.map_err(kafka_err)?;
    match failure.get() {
        Some(failed) => Err(failed.clone().into()),
        None => {
            tracing::info!("pipeline stopped");
            Ok(())
        }
    }
}

/// A micro-batch's events (an undecodable one with its error), waiting for
/// the scores of the decoded ones.
type Pending = (Vec<(Event, Option<String>)>, oneshot::Receiver<Result<ScoredBatch, ScoringError>>);

/// The batcher task: decodes events and cuts micro-batches for the scoring
/// service. An undecodable event stays in its place in the batch, so the
/// emitter sends every output and dead letter of a partition in input order
/// (what lets a transaction's offsets cover exactly what it holds).
async fn batch(
    mut chunks: mpsc::Receiver<Vec<Event>>,
    policy: BatchPolicy,
    input: Input,
    scoring: ScoringService,
    batches: mpsc::Sender<Pending>,
) {
    let mut batcher: Batcher<(Event, Result<Payment, String>)> = Batcher::new(policy);
    loop {
        let full = match batcher::next_chunk(&mut chunks, batcher.due()).await {
            Next::Chunk(chunk) => {
                if !input.learn(&chunk).await {
                    // Stopping while the registry is unreachable: these events
                    // are neither scored nor dead-lettered; the restart re-reads them.
                    chunk.into_iter().for_each(|event| event.ticket.release());
                    continue;
                }
                let now = tokio::time::Instant::now();
                for event in chunk {
                    let decoded = input.decode(&event.payload);
                    if let Some(full) = batcher.push((event, decoded), now) {
                        submit(&scoring, &batches, full).await;
                    }
                }
                batcher.take_due(tokio::time::Instant::now())
            }
            Next::Due => batcher.take(),
            Next::Closed => {
                if let Some(last) = batcher.take() {
                    submit(&scoring, &batches, last).await;
                }
                return;
            }
        };
        if let Some(full) = full {
            submit(&scoring, &batches, full).await;
        }
    }
}

/// Hands a micro-batch to the scoring service and its events to the emitter.
async fn submit(
    scoring: &ScoringService,
    batches: &mpsc::Sender<Pending>,
    batch: Vec<(Event, Result<Payment, String>)>,
) {
    let mut events = Vec::with_capacity(batch.len());
    let mut payments = Vec::with_capacity(batch.len());
    let mut positions = Vec::with_capacity(batch.len());
    for (event, decoded) in batch {
        match decoded {
            Ok(payment) => {
                payments.push(payment);
                let (partition, offset) = (event.ticket.partition(), event.ticket.offset());
                positions.push(Position { partition, offset, epoch: event.epoch });
                events.push((event, None));
            }
            Err(error) => events.push((event, Some(error))),
        }
    }
    let reply = match scoring.submit_stream(payments, positions).await {
        Ok(reply) => reply,
        Err(e) => {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(e));
            rx
        }
    };
    // Fails only if the emitter is gone; the tickets then drop and the pipeline stops.
    let _ = batches.send((events, reply)).await;
}

/// The emitter task: produces each batch's results in the order the batches
/// were cut, and counts them for drift.
async fn emit(
    mut batches: mpsc::Receiver<Pending>,
    sink: Arc<Sink>,
    counters: Arc<PipelineCounters>,
    mut drift: DriftMonitor,
) {
    while let Some((events, reply)) = batches.recv().await {
        let batch = reply.await.unwrap_or(Err(ScoringError::Stopped));
        if let Ok(batch) = &batch {
            drift.observe(batch);
        }
        sink.emit(events, batch, &counters).await;
    }
}

/// How input bytes become payments: the codec, and with a schema registry
/// the writer schema of each record.
struct Input {
    codec: Codec,
    schemas: Option<Arc<WriterSchemas>>,
    state: Arc<PipelineState>,
    stop: CancellationToken,
}

impl Input {
    /// Learns the writer schemas of `chunk` (waiting while the registry is
    /// unreachable); false if the pipeline stopped first.
    async fn learn(&self, chunk: &[Event]) -> bool {
        let Some(schemas) = &self.schemas else { return true };
        let state = &self.state;
        schemas.learn(chunk.iter().map(|e| e.payload.as_slice()), &self.stop, |why| state.set_stalled(why)).await
    }

    fn decode(&self, payload: &[u8]) -> Result<Payment, String> {
        decode_payment(&self.codec, self.schemas.as_deref(), payload)
    }
}

/// A payment from a record's bytes: by its writer schema where a registry is
/// used and knows it, else by `codec`.
fn decode_payment(codec: &Codec, schemas: Option<&WriterSchemas>, payload: &[u8]) -> Result<Payment, String> {
    if payload.is_empty() {
        return Err("empty message".to_string());
    }
    let fast = |bytes: &[u8]| codec.decode_payment(bytes).map_err(|e| e.to_string());
    match schemas.and_then(|s| s.read(payload, fast)) {
        Some(read) => read.map_err(|e| e.to_string()),
        None => fast(payload),
    }
}
