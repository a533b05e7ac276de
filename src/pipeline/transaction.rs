//! Exactly-once delivery: outputs, dead letters and the input offsets they
//! finish are committed together in one Kafka transaction.
//!
//! Why here, beside the tickets rather than instead of them: a transaction
//! commits what the tickets say is finished. Every `interval` (or after
//! `max_events` records), and before partitions are revoked or the scorer
//! stops, `commit` closes the gate on new sends, flushes the producer (every
//! record sent is then acknowledged, so its ticket has moved the committable
//! positions), hands those positions to the transaction with the consumer
//! group's metadata, and commits. Readers with `isolation.level=read_committed`
//! see each output once; a crash aborts the open transaction (the next
//! instance with the same `transactional.id` fences it), and the input is
//! re-read from the last committed positions. Any transaction error stops the
//! pipeline (fail closed). An abortable one (a commit that raced a
//! rebalance), or a lost assignment, is aborted first, and the scorer then
//! rewinds in-process: a fresh consumer re-reads from the committed offsets
//! and a fresh producer fences this one (`scorer::run_pipeline`). A fenced or
//! fatal one ends the process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::failure::PipelineFailure;
use super::offsets::OffsetTracker;

/// How long one transactional call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// When a transaction is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionConfig {
    /// The producer's `transactional.id`: stable for one member across its
    /// restarts (so a restart fences and aborts its predecessor's open
    /// transaction at once), unique among live members.
    pub id: String,
    /// Commit at least this often.
    pub interval: Duration,
    /// Commit after this many records, whichever comes first.
    pub max_events: usize,
}

impl Default for TransactionConfig {
    fn default() -> Self {
        Self {
            id: default_transactional_id("fraudstream-scorer"),
            interval: Duration::from_millis(100),
            max_events: 100_000,
        }
    }
}

/// `<group>-<host name>`: in Kubernetes a StatefulSet pod keeps its name
/// across restarts; two scorers on one host need `--transactional-id`.
pub fn default_transactional_id(group: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "scorer".into());
    format!("{group}-{host}")
}

/// The open transaction's state.
pub struct Transactions {
    config: TransactionConfig,
    /// Sends hold it shared; a commit holds it alone.
    gate: RwLock<()>,
    /// One commit at a time (the committer thread, a revoke, the final drain).
    committing: Mutex<()>,
    /// Records sent in the open transaction.
    sent: AtomicUsize,
    /// Of those, how many the delivery callback has finished with (acked
    /// their tickets, or failed): a flush returns when the last delivery
    /// report is taken off the queue, possibly before its callback ran.
    settled: AtomicUsize,
}

impl Transactions {
    pub fn new(config: TransactionConfig) -> Self {
        Self {
            config,
            gate: RwLock::new(()),
            committing: Mutex::new(()),
            sent: AtomicUsize::new(0),
            settled: AtomicUsize::new(0),
        }
    }

    pub fn config(&self) -> &TransactionConfig {
        &self.config
    }

    /// Held while a record is enqueued.
    pub fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().expect("transaction gate")
    }

    /// A record joined the open transaction (called under the gate).
    pub fn sent_one(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// The delivery callback is done with one record.
    pub fn settle(&self) {
        self.settled.fetch_add(1, Ordering::Release);
    }

    /// Whether enough was sent to commit before the interval is up.
    pub fn is_full(&self) -> bool {
        self.sent.load(Ordering::Relaxed) >= self.config.max_events
    }

    /// Commits the open transaction with the input positions its records
    /// finished (read from `tracker` once every record sent is settled) and
    /// begins the next one.
    pub fn commit(
        &self,
        producer: &ThreadedProducer<super::sink::SinkHooks>,
        tracker: &OffsetTracker,
        group: Option<ConsumerGroupMetadata>,
    ) -> Result<(), PipelineFailure> {
        let _one = self.committing.lock().expect("transaction commit lock");
        let _closed = self.gate.write().expect("transaction gate");
        let started = std::time::Instant::now();
        if self.sent.load(Ordering::Relaxed) == 0 {
            // Nothing sent, so no position moved: an idle scorer commits nothing.
            return Ok(());
        }
        let fail = |step: &'static str, source: KafkaError| transaction_failure(producer, step, source);
        // Every record sent is acknowledged and its delivery report served.
        // Not `producer.flush()`: with a ThreadedProducer its poll between
        // checks waits the full 100 ms (the polling thread takes the reports).
        let deadline = std::time::Instant::now() + CALL_TIMEOUT;
        let settled = || {
            producer.in_flight_count() == 0 && self.settled.load(Ordering::Acquire) >= self.sent.load(Ordering::Relaxed)
        };
        while !settled() {
            if std::time::Instant::now() >= deadline {
                return Err(PipelineFailure::Transaction {
                    step: "flush",
                    aborted: false,
                    reason: "delivery reports did not settle in time".into(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // Only now: every record of this transaction has moved the positions.
        let positions = tracker.positions();
        let topic = tracker.topic();
        if !positions.is_empty() {
            let group = group.ok_or_else(|| PipelineFailure::Transaction {
                step: "send_offsets_to_transaction",
                aborted: false,
                reason: "the consumer has no group metadata (not in a group)".into(),
            })?;
            let mut offsets = TopicPartitionList::new();
            for (partition, position) in &positions {
                offsets
                    .add_partition_offset(topic, *partition, Offset::Offset(*position))
                    .map_err(|e| fail("send_offsets_to_transaction", e))?;
            }
            producer
                .send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)
                .map_err(|e| fail("send_offsets_to_transaction", e))?;
        }
        producer.commit_transaction(CALL_TIMEOUT).map_err(|e| fail("commit_transaction", e))?;
        // Under the closed gate nothing is sent, and everything sent settled.
        self.sent.store(0, Ordering::Relaxed);
        self.settled.store(0, Ordering::Release);
        metrics::counter!(crate::telemetry::metric::TRANSACTIONS, "outcome" => "committed").increment(1);
        metrics::histogram!(crate::telemetry::metric::TRANSACTION_COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        producer.begin_transaction().map_err(|e| fail("begin_transaction", e))
    }
}

impl Transactions {
    /// Aborts the open transaction (its records and offsets are discarded);
    /// whether that succeeded.
    pub fn abort(&self, producer: &ThreadedProducer<super::sink::SinkHooks>) -> bool {
        let _one = self.committing.lock().expect("transaction commit lock");
        let _closed = self.gate.write().expect("transaction gate");
        let aborted = producer.abort_transaction(CALL_TIMEOUT).is_ok();
        if aborted {
            metrics::counter!(crate::telemetry::metric::TRANSACTIONS, "outcome" => "aborted").increment(1);
        }
        aborted
    }
}

/// A failed transactional call: aborted first where that is what the error
/// asks for; either way the pipeline stops and the restart rewinds.
fn transaction_failure(
    producer: &ThreadedProducer<super::sink::SinkHooks>,
    step: &'static str,
    source: KafkaError,
) -> PipelineFailure {
    let requires_abort = matches!(&source, KafkaError::Transaction(e) if e.txn_requires_abort());
    let aborted = requires_abort && producer.abort_transaction(CALL_TIMEOUT).is_ok();
    if aborted {
        metrics::counter!(crate::telemetry::metric::TRANSACTIONS, "outcome" => "aborted").increment(1);
    }
    PipelineFailure::Transaction { step, aborted, reason: source.to_string() }
}
