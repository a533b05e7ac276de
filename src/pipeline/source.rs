//! The input consumer, owned by one thread, and its lifecycle:
//! Consuming -> Draining -> Done.
//!
//! Why a thread of its own: librdkafka runs the rebalance callbacks inside
//! `poll()`, and a revoke must wait there until the revoked partitions'
//! events are acknowledged, which needs the batcher, the model and the
//! producer to keep running. On an async runtime's worker that wait blocks
//! the very tasks it waits for (with one worker, every revoke times out). On
//! this thread it blocks nothing else. The thread is the only owner of the
//! consumer; the rest of the pipeline talks to it through the chunk channel
//! and the tickets.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message, Statistics};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::failure::PipelineFailure;
use super::sink::{Delivery, Event, Sink};
use super::ticket::Acks;
use super::{PipelineConfig, PipelineCounters, PipelineState};
use crate::payment::now_ms;
use crate::telemetry::metric;

/// How long one `poll()` waits, and so how soon a stop is noticed.
const POLL: Duration = Duration::from_millis(100);

/// The consumer's lifecycle, owned by the source thread; the revoke callback
/// reads it to know how long it may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading and handing events on.
    Consuming,
    /// Reading stopped (shutdown or a failure): what is in flight has until
    /// `deadline`, one deadline for the whole drain, revokes included.
    Draining { deadline: Instant },
    /// Committed; leaving the group: nothing more to wait for.
    Done,
}

/// Where read events go: the batcher, or (relay benchmark) straight to the sink.
pub enum Downstream {
    Batcher(mpsc::Sender<Vec<Event>>),
    Relay,
}

/// Events read but not yet handed downstream. The revoke callback runs inside
/// `poll()`, possibly in the middle of a chunk, and must pass these on before
/// it waits for the revoked partitions to drain, or it would wait in vain.
struct Intake {
    chunk: Mutex<Vec<Event>>,
    /// Taken when draining starts, so the batcher sees the channel close.
    batcher: Mutex<Option<mpsc::Sender<Vec<Event>>>>,
}

impl Intake {
    /// Hands the held events to the batcher (blocking: this is not a runtime thread).
    fn flush(&self) {
        let chunk = std::mem::take(&mut *self.chunk.lock().expect("intake lock"));
        if chunk.is_empty() {
            return;
        }
        let batcher = self.batcher.lock().expect("intake lock").clone();
        if let Some(batcher) = batcher {
            // Fails only when the batcher is gone; then the tickets drop and the pipeline stops.
            let _ = batcher.blocking_send(chunk);
        }
    }

    fn close(&self) {
        self.flush();
        self.batcher.lock().expect("intake lock").take();
    }
}

/// The consumer's callbacks; they run on the source thread, inside `poll()`.
pub struct SourceHooks {
    acks: Arc<Acks>,
    state: Arc<PipelineState>,
    counters: Arc<PipelineCounters>,
    /// Where outputs go; exactly-once commits its transactions.
    sink: Arc<Sink>,
    intake: Intake,
    drain_timeout: Duration,
    phase: Mutex<Phase>,
    /// Each owned partition's assignment number (`history::Position::epoch`):
    /// events carry it, so the scoring thread knows when a partition's
    /// customer history was built under an earlier assignment.
    epochs: Mutex<HashMap<i32, u64>>,
}

/// Assignment numbers, unique in the process (a rewind's fresh source included).
static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

impl SourceHooks {
    /// Commits what was acknowledged: the stored offsets (at least once), or
    /// the open transaction with the tracker's positions (exactly once).
    fn commit(&self, consumer: &BaseConsumer<Self>, why: &'static str) {
        if self.sink.transactions().is_none() {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, why, "nothing to commit or commit failed");
            }
            return;
        }
        if matches!(self.acks.failure().get(), Some(PipelineFailure::Transaction { .. })) {
            return; // the transaction is gone; the restart rewinds
        }
        if let Err(failure) = self.sink.commit_transaction(self.acks.tracker(), consumer.group_metadata()) {
            self.acks.failure().fail(failure);
        }
    }
}

impl ClientContext for SourceHooks {
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

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.acks.failure().fail(PipelineFailure::ConsumerFatal { reason: format!("{error}: {reason}") });
        } else {
            tracing::warn!(error = %error, reason, "input consumer error (retried)");
        }
    }
}

impl ConsumerContext for SourceHooks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        let revoked: Vec<(String, i32)> =
            list.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        metrics::counter!(metric::REBALANCES, "kind" => "revoke").increment(1);
        if self.sink.transactions().is_some() && consumer.assignment_lost() {
            // Another member may already own these partitions: committing our
            // outputs for them could duplicate theirs, and waiting for them is
            // pointless. Abort at once; the scorer rewinds.
            self.acks.failure().fail(PipelineFailure::Transaction {
                step: "revoke",
                aborted: self.sink.abort_transaction(),
                reason: "the assignment was lost (session timed out?)".into(),
            });
        } else {
            // Drain: pass on the held events, wait until every event of the
            // revoked partitions is acknowledged, then commit.
            self.intake.flush();
            let own = Instant::now() + self.drain_timeout;
            let deadline = match *self.phase.lock().expect("phase lock") {
                Phase::Consuming => own,
                Phase::Draining { deadline } => deadline.min(own),
                Phase::Done => Instant::now(),
            };
            let left = self.acks.wait_drained(Some(&revoked), deadline);
            if left > 0 {
                metrics::counter!(metric::DRAIN_TIMEOUTS).increment(1);
                self.counters.drain_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(left, "revoke: drain timed out; those events will be re-delivered to the next owner");
            }
            self.commit(consumer, "revoke");
        }
        self.acks.tracker().forget(&revoked);
        self.state.unassign(&revoked);
        tracing::info!(partitions = ?revoked, "partitions revoked after draining");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let added: Vec<(String, i32)> =
                    list.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
                metrics::counter!(metric::REBALANCES, "kind" => "assign").increment(1);
                tracing::info!(partitions = ?added, "partitions assigned");
                let mut epochs = self.epochs.lock().expect("epochs lock");
                for (_, partition) in &added {
                    epochs.insert(*partition, NEXT_EPOCH.fetch_add(1, Ordering::Relaxed));
                }
                drop(epochs);
                self.state.assign(added);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// The consumer and what its thread needs.
pub struct Source {
    consumer: Arc<BaseConsumer<SourceHooks>>,
    config: PipelineConfig,
    /// The relay baseline sends events straight to the sink.
    relay: bool,
    events_in: metrics::Counter,
    in_flight: metrics::Gauge,
}

impl Source {
    /// Creates the consumer (not yet subscribed).
    pub fn create(
        config: &PipelineConfig,
        acks: Arc<Acks>,
        state: Arc<PipelineState>,
        counters: Arc<PipelineCounters>,
        sink: Arc<Sink>,
        downstream: Downstream,
        events_in: metrics::Counter,
    ) -> Result<Self, KafkaError> {
        let (batcher, relay) = match downstream {
            Downstream::Batcher(tx) => (Some(tx), false),
            Downstream::Relay => (None, true),
        };
        let exactly_once = sink.transactions().is_some();
        let hooks = SourceHooks {
            acks,
            state,
            counters,
            sink,
            intake: Intake { chunk: Mutex::new(Vec::new()), batcher: Mutex::new(batcher) },
            drain_timeout: config.drain_timeout,
            phase: Mutex::new(Phase::Consuming),
            epochs: Mutex::new(HashMap::new()),
        };
        let consumer: BaseConsumer<SourceHooks> = config
            .kafka
            .client_config(&[
                ("group.id", &config.group_id),
                ("partition.assignment.strategy", "cooperative-sticky"),
                // Exactly once: offsets commit only inside transactions.
                ("enable.auto.commit", if exactly_once { "false" } else { "true" }),
                ("auto.commit.interval.ms", "1000"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("statistics.interval.ms", "5000"),
                // Notice a topic created after the scorer started within
                // seconds, not at librdkafka's default 5-minute refresh.
                ("topic.metadata.refresh.interval.ms", "3000"),
                // When the local queue is full, look again after 10 ms, not the
                // default 1 s: the default caps a catching-up consumer near 150k
                // events/s however fast the broker and the scorer are.
                ("fetch.queue.backoff.ms", "10"),
            ])
            .create_with_context(hooks)?;
        let in_flight = metrics::gauge!(metric::IN_FLIGHT);
        Ok(Self { consumer: Arc::new(consumer), config: config.clone(), relay, events_in, in_flight })
    }

    fn hooks(&self) -> &SourceHooks {
        self.consumer.context()
    }

    /// Consumes until `stop` is cancelled (shutdown or a failure), then drains,
    /// commits and closes the consumer. Runs on its own thread.
    pub fn run(self, stop: CancellationToken) -> Result<(), KafkaError> {
        // At least once, committable positions are stored with the consumer
        // by the tickets' finalizer, on the producer's thread; the weak
        // handle never outlives `clear_store`. Exactly once, transactions
        // read them from the tracker instead.
        let weak = Arc::downgrade(&self.consumer);
        let topic = self.config.input_topic.clone();
        if self.hooks().sink.transactions().is_none() {
            self.hooks().acks.set_store(Box::new(move |partition, position| {
                if let Some(consumer) = weak.upgrade() {
                    // store_offset(o) commits o + 1; fails harmlessly if the partition was revoked.
                    if let Err(e) = consumer.store_offset(&topic, partition, position - 1) {
                        tracing::debug!(partition, position, error = %e, "offset not stored");
                    }
                }
            }));
        }
        let subscribed = self.consumer.subscribe(&[&self.config.input_topic]);
        if subscribed.is_ok() {
            tracing::info!(topic = %self.config.input_topic, group = %self.config.group_id, "consuming");
            let committer = self.start_committer(&stop);
            self.consume(&stop);
            if let Some(committer) = committer {
                let _ = committer.join();
            }
            self.drain();
        }
        // Done: from here on this thread holds the only handle, and closing
        // the consumer (which leaves the group) happens here.
        self.hooks().acks.clear_store();
        subscribed
    }

    /// Exactly once: a thread that commits the open transaction every
    /// interval, or sooner when it holds `max_events` records, until `stop`.
    fn start_committer(&self, stop: &CancellationToken) -> Option<std::thread::JoinHandle<()>> {
        let config = self.hooks().sink.transactions()?.config().clone();
        let (consumer, stop) = (self.consumer.clone(), stop.clone());
        let spawned = std::thread::Builder::new().name("fraudstream-txn".into()).spawn(move || {
            let mut last = Instant::now();
            while !stop.is_cancelled() {
                std::thread::sleep(Duration::from_millis(5));
                let hooks = consumer.context();
                let full = hooks.sink.transactions().is_some_and(|t| t.is_full());
                if full || last.elapsed() >= config.interval {
                    hooks.commit(&consumer, "interval");
                    last = Instant::now();
                }
            }
        });
        match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                self.hooks().acks.failure().fail(PipelineFailure::Transaction {
                    step: "start",
                    aborted: false,
                    reason: format!("cannot start the committer thread: {e}"),
                });
                None
            }
        }
    }

    /// Consuming: read, issue a ticket per event, hand events downstream in chunks.
    fn consume(&self, stop: &CancellationToken) {
        let hooks = self.hooks();
        let mut reported_errors: HashSet<String> = HashSet::new();
        while !stop.is_cancelled() {
            let Some(first) = self.consumer.poll(POLL) else { continue };
            let mut taken = 0;
            let mut next = Some(first);
            while let Some(result) = next.take() {
                let message = match result {
                    Ok(message) => message,
                    Err(e) => {
                        self.consumer_error(e, &mut reported_errors);
                        break;
                    }
                };
                if !self.take(&message, stop) {
                    break;
                }
                taken += 1;
                if taken < self.config.max_batch && hooks.acks.has_room(0) {
                    next = self.consumer.poll(Duration::ZERO);
                }
            }
            if taken > 0 {
                hooks.state.set_waiting(None);
                self.events_in.increment(taken as u64);
                hooks.counters.consumed.fetch_add(taken as u64, Ordering::Relaxed);
                hooks.intake.flush();
                self.in_flight.set(hooks.acks.events_in_flight() as f64);
            }
        }
    }

    /// Issues the event's ticket (waiting for room in flight) and passes it on;
    /// false if the pipeline stopped while waiting (the event is left uncommitted).
    fn take(&self, message: &BorrowedMessage<'_>, stop: &CancellationToken) -> bool {
        let hooks = self.hooks();
        let payload = message.payload().unwrap_or_default();
        let ticket = loop {
            match hooks.acks.issue(message.partition(), message.offset(), payload.len(), POLL) {
                Some(ticket) => break ticket,
                None if stop.is_cancelled() => return false,
                None => {}
            }
        };
        match self.relay {
            true => {
                let event_time = message.timestamp().to_millis().unwrap_or_else(now_ms);
                let sink = &hooks.sink;
                sink.send_blocking(sink.output_topic(), message.key(), payload, Delivery::output(ticket, event_time));
            }
            false => {
                let epoch = hooks.epochs.lock().expect("epochs lock").get(&message.partition()).copied().unwrap_or(0);
                let event = Event {
                    epoch,
                    ticket,
                    key: message.key().map(<[u8]>::to_vec),
                    payload: payload.to_vec(),
                    headers: message.headers().map(|h| h.detach()),
                };
                hooks.intake.chunk.lock().expect("intake lock").push(event);
            }
        }
        true
    }

    /// A consumer error: fatal ones stop the pipeline; a missing input topic
    /// is reported on `/readyz` (and picked up once created); others are retried.
    fn consumer_error(&self, error: KafkaError, reported: &mut HashSet<String>) {
        let hooks = self.hooks();
        let code = error.rdkafka_error_code();
        if matches!(error, KafkaError::MessageConsumptionFatal(_)) || code == Some(RDKafkaErrorCode::Fatal) {
            hooks.acks.failure().fail(PipelineFailure::ConsumerFatal { reason: error.to_string() });
            return;
        }
        if matches!(code, Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)) {
            hooks.state.set_waiting(Some(format!(
                "input topic {:?} does not exist (yet): create it, or check --input-topic; \
                 the scorer picks it up within seconds of its creation",
                self.config.input_topic
            )));
        }
        // Each distinct error once (bounded: messages may name offsets).
        if reported.len() >= 64 {
            reported.clear();
        }
        if reported.insert(error.to_string()) {
            tracing::warn!(error = %error, "consumer error (retrying)");
        }
        std::thread::sleep(POLL);
    }

    /// Draining -> Done: stop reading, let what is in flight be acknowledged
    /// (one deadline for the whole drain), commit that, leave the group.
    fn drain(&self) {
        let hooks = self.hooks();
        let deadline = Instant::now() + self.config.drain_timeout;
        *hooks.phase.lock().expect("phase lock") = Phase::Draining { deadline };
        tracing::info!("draining in-flight events");
        hooks.intake.close();
        if self.relay {
            hooks.sink.flush(Duration::from_millis(10));
        }
        let left = hooks.acks.wait_drained(None, deadline);
        if left > 0 {
            metrics::counter!(metric::DRAIN_TIMEOUTS).increment(1);
            hooks.counters.drain_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(left, "drain timed out; those events will be re-delivered");
        }
        hooks.commit(&self.consumer, "final");
        *hooks.phase.lock().expect("phase lock") = Phase::Done;
        self.consumer.unsubscribe();
    }
}
