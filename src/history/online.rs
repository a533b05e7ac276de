//! The scorer's customer histories: partition-local, kept on the scoring
//! thread, and rebuilt before a partition is scored whenever they cannot be
//! trusted (a start, a partition gained in a rebalance, a rewind).
//!
//! Why an epoch rides with each payment: the source numbers every assignment
//! of a partition (`Position::epoch`). A payment whose epoch differs from the
//! one its partition's history was built under, or whose offset goes back,
//! means another member (or an earlier run) scored what came in between, so
//! the history is rebuilt from the input topic (`Replay`) up to that offset.
//! Offsets that skip forward (dead-lettered or control records) are not a
//! reason: nothing that counts was missed.
//!
//! Memory is bounded by the window: `HistoryState` evicts customers idle for
//! longer than it. REST requests read these histories without changing them.

use std::collections::HashMap;
use std::time::Instant;

use super::{CustomerFeatures, HistoryState, HORIZON_MS, LATENESS_STEPS};
use crate::payment::{Payment, STEP_MS};
use crate::telemetry::metric;

/// Where a stream payment was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
    /// Which assignment of the partition it was read under.
    pub epoch: u64,
}

/// Why a partition's history could not be rebuilt.
#[derive(Debug, thiserror::Error)]
#[error("rebuilding the customer history of partition {partition} (up to offset {until}): {message}")]
pub struct ReplayError {
    pub partition: i32,
    pub until: i64,
    pub message: String,
}

/// Reads back a partition of the input topic for a rebuild.
pub trait Replay: Send {
    /// Calls `visit` with every payment of `partition` before offset `until`
    /// written since `since_ms` (by broker timestamp; more is harmless), in
    /// offset order; returns how many records it read.
    fn replay(
        &mut self,
        partition: i32,
        until: i64,
        since_ms: i64,
        visit: &mut dyn FnMut(&Payment),
    ) -> Result<u64, ReplayError>;
}

struct PartitionHistory {
    state: HistoryState,
    epoch: u64,
    /// The offset after the last payment seen.
    next: i64,
}

/// The histories of the partitions this scorer owns.
#[derive(Default)]
pub struct OnlineHistory {
    partitions: HashMap<i32, PartitionHistory>,
    replay: Option<Box<dyn Replay>>,
    /// When the gauges were last published (they walk every customer).
    published: Option<Instant>,
}

impl OnlineHistory {
    /// Where rebuilds read from (set by the streaming pipeline; REST-only
    /// scorers have none and keep no history).
    pub fn set_replay(&mut self, replay: Option<Box<dyn Replay>>) {
        self.replay = replay;
        self.clear();
    }

    /// Forgets every partition (the next payment of each rebuilds it).
    pub fn clear(&mut self) {
        self.partitions.clear();
        self.gauges();
    }

    /// The customer features of the stream payment at `at`, rebuilding its
    /// partition first if needed; `accepts` says which payments the stream
    /// scores (only those count as history).
    pub fn features(
        &mut self,
        payment: &Payment,
        at: Position,
        accepts: &dyn Fn(&Payment) -> bool,
    ) -> Result<CustomerFeatures, ReplayError> {
        let stale = self.partitions.get(&at.partition).is_none_or(|h| h.epoch != at.epoch || at.offset < h.next);
        if stale {
            self.rebuild(payment, at, accepts)?;
        }
        let history = self.partitions.get_mut(&at.partition).expect("rebuilt above");
        history.next = at.offset + 1;
        Ok(history.state.take(payment))
    }

    /// Records a scored stream payment as its customer's latest.
    pub fn record(&mut self, payment: &Payment, at: Position) {
        if let Some(history) = self.partitions.get_mut(&at.partition) {
            history.state.record(payment);
        }
    }

    /// The features of `payment` from whichever partition holds its
    /// customer, without recording it (REST): a customer of a partition this
    /// member does not own looks new.
    pub fn peek(&self, payment: &Payment) -> CustomerFeatures {
        self.partitions
            .values()
            .find(|h| h.state.knows(&payment.customer))
            .map_or_else(|| CustomerFeatures::new_customer(payment.amount), |h| h.state.features(payment))
    }

    fn rebuild(
        &mut self,
        payment: &Payment,
        at: Position,
        accepts: &dyn Fn(&Payment) -> bool,
    ) -> Result<(), ReplayError> {
        let started = Instant::now();
        let mut state = HistoryState::default();
        let since_ms = payment.event_time - HORIZON_MS - LATENESS_STEPS * STEP_MS;
        let read = match self.replay.as_mut() {
            Some(replay) if at.offset > 0 => replay.replay(at.partition, at.offset, since_ms, &mut |p| {
                if accepts(p) {
                    state.record(p);
                }
            })?,
            _ => 0,
        };
        let seconds = started.elapsed().as_secs_f64();
        metrics::histogram!(metric::HISTORY_REBUILD_SECONDS).record(seconds);
        metrics::counter!(metric::HISTORY_REBUILD_RECORDS).increment(read);
        tracing::info!(
            partition = at.partition,
            until = at.offset,
            records = read,
            customers = state.customers(),
            seconds,
            "customer history rebuilt"
        );
        self.partitions.insert(at.partition, PartitionHistory { state, epoch: at.epoch, next: at.offset });
        self.gauges();
        Ok(())
    }

    /// Publishes the customers and bytes held, at most once a second.
    pub fn publish(&mut self) {
        if self.published.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
            return;
        }
        self.published = Some(Instant::now());
        self.gauges();
    }

    fn gauges(&self) {
        let (customers, bytes) =
            self.partitions.values().fold((0, 0), |(c, b), h| (c + h.state.customers(), b + h.state.memory_bytes()));
        metrics::gauge!(metric::HISTORY_CUSTOMERS).set(customers as f64);
        metrics::gauge!(metric::HISTORY_BYTES).set(bytes as f64);
    }

    /// Customers held over all partitions.
    pub fn customers(&self) -> usize {
        self.partitions.values().map(|h| h.state.customers()).sum()
    }
}
