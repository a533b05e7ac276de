//! Per-event acknowledgement tickets: the one path by which an input offset
//! becomes committable (the model: Vector's Kafka source and its finalizer).
//!
//! Why: every event read from Kafka must end in exactly one of two ways. Its
//! output (or dead letter) is acknowledged by the broker, which makes its
//! offset committable; or something of ours failed, which stops the pipeline.
//! A `Ticket` is issued when the event is read and travels with it, through
//! the batcher and the scoring service into the producer's delivery opaque.
//! `ack()` is the only way to finish one. A ticket dropped unacknowledged (a
//! delivery that failed for good, a record that could not be enqueued, a
//! batch the model could not score, a task that died) abandons its offset,
//! which is then never committed past, and stops the pipeline. Tickets
//! cannot be cloned.
//!
//! `Acks` also holds the in-flight budget (events and bytes) that every
//! ticket occupies until it is finished, so memory stays bounded.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::failure::{Failure, PipelineFailure};
use super::offsets::OffsetTracker;

/// Stores a committable position (every offset below it is done) with the consumer.
pub type StoreOffset = Box<dyn Fn(i32, i64) + Send + Sync>;

/// How much may be in flight (read, not yet acknowledged) at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlightLimits {
    pub events: usize,
    pub bytes: usize,
}

#[derive(Debug, Default)]
struct Used {
    events: usize,
    bytes: usize,
    /// Threads waiting on `freed`: a release wakes them only if there are
    /// any (a wake is a system call, too dear to make per event for nobody).
    waiters: usize,
}

/// The finalizer every ticket reports to.
pub struct Acks {
    tracker: OffsetTracker,
    limits: InFlightLimits,
    used: Mutex<Used>,
    freed: Condvar,
    store: RwLock<Option<StoreOffset>>,
    failure: Arc<Failure>,
}

impl Acks {
    pub fn new(topic: &str, limits: InFlightLimits, failure: Arc<Failure>) -> Self {
        Self {
            tracker: OffsetTracker::new(topic),
            limits,
            used: Mutex::default(),
            freed: Condvar::new(),
            store: RwLock::new(None),
            failure,
        }
    }

    /// Where committable positions go (set once the consumer exists).
    pub fn set_store(&self, store: StoreOffset) {
        *self.store.write().expect("offset store lock") = Some(store);
    }

    /// Stops storing positions; returns once no store call is running, so the
    /// consumer can then be closed by its owner and nobody else.
    pub fn clear_store(&self) {
        self.store.write().expect("offset store lock").take();
    }

    pub fn tracker(&self) -> &OffsetTracker {
        &self.tracker
    }

    pub fn failure(&self) -> &Arc<Failure> {
        &self.failure
    }

    /// A payload's share of the byte budget: never more than the whole budget,
    /// so one event larger than the limit still gets through, alone.
    fn weight(&self, payload_bytes: usize) -> usize {
        payload_bytes.min(self.limits.bytes)
    }

    fn fits(&self, used: &Used, bytes: usize) -> bool {
        used.events < self.limits.events && (used.bytes == 0 || used.bytes + bytes <= self.limits.bytes)
    }

    /// Issues a ticket for a read event, waiting while the in-flight budget is
    /// spent; `None` if `wait` passes first (the caller checks for shutdown
    /// and asks again).
    pub fn issue(
        self: &Arc<Self>,
        partition: i32,
        offset: i64,
        payload_bytes: usize,
        wait: Duration,
    ) -> Option<Ticket> {
        let bytes = self.weight(payload_bytes);
        let mut used = self.used.lock().expect("in-flight budget lock");
        // The clock is read only when there is no room: not per event.
        let mut until = None;
        while !self.fits(&used, bytes) {
            let until = *until.get_or_insert_with(|| Instant::now() + wait);
            let left = until.checked_duration_since(Instant::now())?;
            used.waiters += 1;
            used = self.freed.wait_timeout(used, left).expect("in-flight budget lock").0;
            used.waiters -= 1;
        }
        used.events += 1;
        used.bytes += bytes;
        drop(used);
        self.tracker.begin(partition, offset);
        Some(Ticket { acks: self.clone(), partition, offset, bytes, acked: false })
    }

    /// Whether a ticket of this size would be issued now without waiting.
    pub fn has_room(&self, payload_bytes: usize) -> bool {
        self.fits(&self.used.lock().expect("in-flight budget lock"), self.weight(payload_bytes))
    }

    /// Events in flight now (read, neither acknowledged nor abandoned).
    pub fn events_in_flight(&self) -> usize {
        self.used.lock().expect("in-flight budget lock").events
    }

    fn release(&self, bytes: usize) {
        let mut used = self.used.lock().expect("in-flight budget lock");
        used.events -= 1;
        used.bytes -= bytes;
        let wake = used.waiters > 0;
        drop(used);
        if wake {
            self.freed.notify_all();
        }
    }

    fn finish(&self, partition: i32, offset: i64, bytes: usize) {
        self.release(bytes);
        if let Some(position) = self.tracker.finish(partition, offset) {
            if let Some(store) = self.store.read().expect("offset store lock").as_ref() {
                store(partition, position);
            }
        }
    }

    fn abandon(&self, partition: i32, offset: i64, bytes: usize) {
        self.tracker.abandon(partition, offset);
        self.release(bytes);
        self.failure.fail(PipelineFailure::Unacknowledged {
            topic: self.tracker.topic().to_string(),
            partition,
            offset,
        });
    }

    /// Waits until no event of `partitions` (all if `None`) is in flight, or
    /// `until` passes; returns how many are left.
    pub fn wait_drained(&self, partitions: Option<&[(String, i32)]>, until: Instant) -> usize {
        loop {
            let left = self.tracker.in_flight(partitions);
            if left == 0 || Instant::now() >= until {
                return left;
            }
            let mut used = self.used.lock().expect("in-flight budget lock");
            used.waiters += 1;
            let mut used = self.freed.wait_timeout(used, Duration::from_millis(5)).expect("in-flight budget lock").0;
            used.waiters -= 1;
        }
    }
}

/// One event's claim on its offset. `ack()` when its output is acknowledged;
/// dropping it otherwise stops the pipeline and keeps its offset uncommitted.
#[must_use = "a ticket dropped without ack() stops the pipeline"]
pub struct Ticket {
    acks: Arc<Acks>,
    partition: i32,
    offset: i64,
    bytes: usize,
    acked: bool,
}

impl Ticket {
    /// The pipeline is stopping before this event could be finished (its
    /// input is re-read after the restart): not a failure, but its offset is
    /// never committed past.
    pub fn release(mut self) {
        self.acked = true;
        self.acks.tracker.abandon(self.partition, self.offset);
        self.acks.release(self.bytes);
    }

    /// The event's output is acknowledged: its offset may be committed.
    pub fn ack(mut self) {
        self.acked = true;
        self.acks.finish(self.partition, self.offset, self.bytes);
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The pipeline's failure record, for whoever holds a ticket it cannot ack.
    pub fn failure(&self) -> &Failure {
        &self.acks.failure
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.acked {
            self.acks.abandon(self.partition, self.offset, self.bytes);
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({}@{})", self.partition, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    fn acks(events: usize, bytes: usize) -> (Arc<Acks>, Arc<AtomicI64>) {
        let acks = Arc::new(Acks::new("in", InFlightLimits { events, bytes }, Arc::new(Failure::default())));
        let stored = Arc::new(AtomicI64::new(-1));
        let seen = stored.clone();
        acks.set_store(Box::new(move |_, position| seen.store(position, Ordering::SeqCst)));
        (acks, stored)
    }

    fn soon() -> Duration {
        Duration::from_millis(20)
    }

    #[test]
    fn acked_tickets_make_their_offsets_committable_in_order() {
        let (acks, stored) = acks(10, 1 << 20);
        let a = acks.issue(0, 5, 10, soon()).unwrap();
        let b = acks.issue(0, 6, 10, soon()).unwrap();
        b.ack();
        assert_eq!(stored.load(Ordering::SeqCst), -1, "5 is still in flight");
        a.ack();
        assert_eq!(stored.load(Ordering::SeqCst), 7);
        assert!(acks.failure().get().is_none());
        assert_eq!(acks.events_in_flight(), 0);
    }

    #[test]
    fn a_dropped_ticket_fails_the_pipeline_and_blocks_commits_past_it() {
        let (acks, stored) = acks(10, 1 << 20);
        let a = acks.issue(0, 5, 10, soon()).unwrap();
        let b = acks.issue(0, 6, 10, soon()).unwrap();
        drop(a);
        b.ack();
        assert_eq!(stored.load(Ordering::SeqCst), -1, "nothing past the abandoned offset 5 is committable");
        assert!(matches!(acks.failure().get(), Some(PipelineFailure::Unacknowledged { partition: 0, offset: 5, .. })));
        assert!(acks.failure().stopped().is_cancelled());
        assert_eq!(acks.wait_drained(None, Instant::now() + soon()), 0, "an abandoned event is not waited for");
        assert_eq!(acks.events_in_flight(), 0, "its budget is given back");
    }

    #[test]
    fn the_budget_bounds_events_and_bytes_but_admits_one_oversized_event() {
        let (acks, _) = acks(2, 100);
        let a = acks.issue(0, 0, 60, soon()).unwrap();
        assert!(!acks.has_room(60), "60 + 60 bytes exceed 100");
        assert!(acks.issue(0, 1, 60, soon()).is_none(), "waits, then gives up at the deadline");
        let b = acks.issue(0, 1, 40, soon()).unwrap();
        assert!(!acks.has_room(1), "two events is the limit");
        a.ack();
        b.ack();
        let huge = acks.issue(0, 2, 10_000, soon()).expect("one event over the byte limit still passes alone");
        assert!(!acks.has_room(1));
        huge.ack();
    }

    #[test]
    fn a_waiting_issue_wakes_when_a_ticket_is_acked() {
        let (acks, _) = acks(1, 100);
        let a = acks.issue(0, 0, 1, soon()).unwrap();
        let waiter = std::thread::spawn({
            let acks = acks.clone();
            move || acks.issue(0, 1, 1, Duration::from_secs(10)).map(|t| t.ack()).is_some()
        });
        std::thread::sleep(Duration::from_millis(20));
        a.ack();
        assert!(waiter.join().unwrap());
    }
}
