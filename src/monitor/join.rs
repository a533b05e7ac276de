//! One partition's join of scored payments with their late labels, by
//! `paymentId`, in bounded state.
//!
//! Why partition-local: payments, scored payments and labels are keyed by
//! customer with the same partitioner, so a payment's score and its label
//! share a partition number and one monitor member owns both. Why bounded:
//! labels may come days late or never; a scored payment is kept for
//! `window` of event time after the newest one on the partition (and at most
//! `max_entries`), an unmatched label for `window` after the newest label.
//! Eviction follows arrival order, which per partition is close to event
//! time order (one customer's payments are in order); a few out-of-order
//! entries live a little longer, never shorter.
//!
//! Pure data: the caller decodes, emits and counts. A joined entry stays
//! until the window evicts it, so a duplicate label is recognised (and
//! ignored) and a changed one is a correction.

use std::collections::hash_map::{self, HashMap};
use std::collections::VecDeque;
use std::sync::Arc;

use crate::codec::LabelRef;

/// Payment ids to what is held for them, hashed with foldhash (SipHash's
/// DoS resistance buys nothing against the ids of our own records, and cost
/// a tenth of a join).
type ById<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// How long and how much a partition keeps.
#[derive(Debug, Clone, Copy)]
pub struct JoinLimits {
    /// Event time a scored payment waits for its label, milliseconds.
    pub window_ms: i64,
    /// Most scored payments kept per partition; the oldest go first.
    pub max_entries: usize,
}

/// One model version's view of a payment: what it said.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub version: Arc<str>,
    pub probability: f64,
    /// Flagged at the version's threshold (what `isFraud` says).
    pub flagged: bool,
}

/// The versions that scored a payment: the serving one, and the shadow beside it if there was one.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedBy {
    pub serving: Served,
    pub shadow: Option<Served>,
}

impl ServedBy {
    /// The serving version first, then the shadow.
    pub fn iter(&self) -> impl Iterator<Item = &Served> {
        std::iter::once(&self.serving).chain(&self.shadow)
    }
}

/// A scored payment waiting for (or joined with) its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The scored record as it was read, re-read when its label arrives.
    pub payload: Box<[u8]>,
    pub event_time: i64,
    pub scored_at: i64,
    pub served: ServedBy,
    /// The label, once joined.
    pub label: Option<bool>,
}

/// A label waiting for its scored payment: what the join needs of it (its
/// key is the scored payment's too, as both are keyed by customer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub fraud: bool,
    pub labelled_at: i64,
}

/// What a scored payment did to the partition's state.
#[derive(Debug, PartialEq)]
pub enum ScoredOutcome {
    /// Its label was waiting: emit the join.
    Joined(Verdict),
    /// Kept, waiting for its label.
    Waiting,
    /// Seen before (re-delivered): nothing to do.
    Duplicate,
}

/// What a label did to the partition's state.
#[derive(Debug, PartialEq)]
pub enum Outcome<'a> {
    /// A scored payment and its label met: emit the join.
    Joined(&'a Entry),
    /// A label that changes a joined payment's verdict: emit it again.
    Corrected(&'a Entry),
    /// Kept, waiting for its other half.
    Waiting,
    /// Seen before (same label, or a scored payment re-delivered): nothing to do.
    Duplicate,
}

/// Which entries the window or the size limit pushed out.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Evicted {
    /// Scored payments that never got a label, by the versions that served them.
    pub unlabelled: Vec<Entry>,
    /// Scored payments with their label (their join was emitted).
    pub labelled: Vec<Entry>,
    /// Labels whose scored payment never came.
    pub unmatched_labels: u64,
}

/// The join state of one partition.
///
/// Scored payments leave only by eviction, oldest arrival first, so they
/// are kept in arrival order (`held`, also the eviction order) and the map
/// holds only each id's arrival number: a small table that grows and is
/// probed cheaply, where one of whole entries cost a third of a join in
/// rehashing and cache misses at a million payments held.
#[derive(Debug)]
pub struct PartitionJoin {
    limits: JoinLimits,
    /// Arrival number of each held scored payment.
    scored: ById<u64>,
    /// Held scored payments in arrival order; `held[0]` arrived `first`.
    held: VecDeque<(Arc<str>, Entry)>,
    first: u64,
    scored_watermark: i64,
    labels: ById<Verdict>,
    labels_order: VecDeque<(i64, Arc<str>)>,
    labels_watermark: i64,
}

impl PartitionJoin {
    pub fn new(limits: JoinLimits) -> Self {
        Self {
            limits,
            scored: ById::default(),
            held: VecDeque::new(),
            first: 0,
            scored_watermark: i64::MIN,
            labels: ById::default(),
            labels_order: VecDeque::new(),
            labels_watermark: i64::MIN,
        }
    }

    /// Scored payments held (joined or not) and labels waiting.
    pub fn len(&self) -> (usize, usize) {
        (self.scored.len(), self.labels.len())
    }

    pub fn is_empty(&self) -> bool {
        self.scored.is_empty() && self.labels.is_empty()
    }

    /// A scored payment arrives.
    pub fn on_scored(&mut self, payment_id: &str, entry: Entry) -> ScoredOutcome {
        let id: Arc<str> = payment_id.into();
        let arrival = self.first + self.held.len() as u64;
        match self.scored.entry(id.clone()) {
            hash_map::Entry::Occupied(_) => return ScoredOutcome::Duplicate,
            hash_map::Entry::Vacant(vacant) => vacant.insert(arrival),
        };
        self.scored_watermark = self.scored_watermark.max(entry.event_time);
        let label = self.labels.remove(payment_id);
        self.held.push_back((id, Entry { label: label.map(|l| l.fraud), ..entry }));
        label.map_or(ScoredOutcome::Waiting, ScoredOutcome::Joined)
    }

    /// Where in `held` the scored payment `payment_id` is.
    fn held_index(&self, payment_id: &str) -> Option<usize> {
        let arrival = *self.scored.get(payment_id)?;
        Some(usize::try_from(arrival - self.first).expect("held payments fit in memory"))
    }

    /// A label arrives.
    pub fn on_label(&mut self, label: LabelRef<'_>) -> Outcome<'_> {
        if let Some(index) = self.held_index(label.payment_id) {
            let entry = &mut self.held[index].1;
            return match entry.label.replace(label.fraud) {
                None => Outcome::Joined(entry),
                Some(before) if before == label.fraud => Outcome::Duplicate,
                Some(_) => Outcome::Corrected(entry),
            };
        }
        self.labels_watermark = self.labels_watermark.max(label.labelled_at);
        if let Some(waiting) = self.labels.get_mut(label.payment_id) {
            // The later verdict wins; the first one's place in the eviction order stays.
            let same = waiting.fraud == label.fraud;
            *waiting = Verdict { fraud: label.fraud, labelled_at: label.labelled_at };
            return if same { Outcome::Duplicate } else { Outcome::Waiting };
        }
        let id: Arc<str> = label.payment_id.into();
        self.labels_order.push_back((label.labelled_at, id.clone()));
        self.labels.insert(id, Verdict { fraud: label.fraud, labelled_at: label.labelled_at });
        Outcome::Waiting
    }

    /// Drops what the window and the size limit no longer keep.
    pub fn evict(&mut self) -> Evicted {
        let mut out = Evicted::default();
        let horizon = self.scored_watermark.saturating_sub(self.limits.window_ms);
        while let Some((_, entry)) = self.held.front() {
            if entry.event_time >= horizon && self.held.len() <= self.limits.max_entries {
                break;
            }
            let (id, entry) = self.held.pop_front().expect("checked above");
            self.first += 1;
            self.scored.remove(&id);
            match entry.label {
                Some(_) => out.labelled.push(entry),
                None => out.unlabelled.push(entry),
            }
        }
        let horizon = self.labels_watermark.saturating_sub(self.limits.window_ms);
        while let Some((time, _)) = self.labels_order.front() {
            if *time >= horizon && self.labels.len() <= self.limits.max_entries {
                break;
            }
            let (_, id) = self.labels_order.pop_front().expect("checked above");
            if self.labels.remove(&id).is_some() {
                out.unmatched_labels += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payment::PaymentLabel;

    const DAY: i64 = 86_400_000;

    fn entry(event_time: i64) -> Entry {
        Entry {
            payload: Box::new([1, 2, 3]),
            event_time,
            scored_at: event_time,
            served: ServedBy { serving: Served { version: "1".into(), probability: 0.9, flagged: true }, shadow: None },
            label: None,
        }
    }

    fn label(id: &str, fraud: bool, at: i64) -> PaymentLabel {
        PaymentLabel { payment_id: id.into(), customer: "C1".into(), fraud, labelled_at: at, source: "test".into() }
    }

    fn join() -> PartitionJoin {
        PartitionJoin::new(JoinLimits { window_ms: 30 * DAY, max_entries: 1_000 })
    }

    #[test]
    fn a_label_after_its_payment_joins_once() {
        let mut j = join();
        assert_eq!(j.on_scored("p1", entry(0)), ScoredOutcome::Waiting);
        assert!(matches!(j.on_label(label("p1", true, 5).as_ref()), Outcome::Joined(e) if e.label == Some(true)));
        assert_eq!(j.on_label(label("p1", true, 6).as_ref()), Outcome::Duplicate, "the same verdict again");
        assert!(matches!(j.on_label(label("p1", false, 7).as_ref()), Outcome::Corrected(e) if e.label == Some(false)));
        assert_eq!(j.on_scored("p1", entry(0)), ScoredOutcome::Duplicate, "a re-delivered score");
    }

    #[test]
    fn a_label_before_its_payment_waits_for_it() {
        let mut j = join();
        assert_eq!(j.on_label(label("p1", false, 5).as_ref()), Outcome::Waiting);
        assert_eq!(
            j.on_label(label("p1", true, 6).as_ref()),
            Outcome::Waiting,
            "a changed verdict replaces the waiting one"
        );
        assert_eq!(j.on_label(label("p1", true, 7).as_ref()), Outcome::Duplicate);
        assert!(matches!(j.on_scored("p1", entry(0)), ScoredOutcome::Joined(label) if label.fraud));
        assert_eq!(j.len(), (1, 0));
    }

    #[test]
    fn the_window_evicts_by_event_time_and_counts_what_went() {
        let mut j = join();
        j.on_scored("old-unlabelled", entry(0));
        j.on_scored("old-labelled", entry(DAY));
        j.on_label(label("old-labelled", true, 0).as_ref());
        j.on_label(label("never-scored", true, 0).as_ref());
        j.on_scored("recent", entry(2 * DAY));
        assert_eq!(j.evict(), Evicted::default(), "nothing is older than 30 days yet");
        j.on_scored("new", entry(31 * DAY + 1));
        j.on_label(label("other", false, 31 * DAY + 1).as_ref());
        let out = j.evict();
        assert_eq!(out.unlabelled.iter().map(|e| e.event_time).collect::<Vec<_>>(), [0]);
        assert_eq!(out.labelled.iter().map(|e| e.event_time).collect::<Vec<_>>(), [DAY]);
        assert_eq!(out.unmatched_labels, 1);
        assert_eq!(j.len(), (2, 1), "recent and new stay, the label `other` waits");
        // An evicted payment's late label waits like any unmatched one.
        assert_eq!(j.on_label(label("old-unlabelled", true, 32 * DAY).as_ref()), Outcome::Waiting);
    }

    #[test]
    fn the_size_limit_evicts_the_oldest_first() {
        let mut j = PartitionJoin::new(JoinLimits { window_ms: 30 * DAY, max_entries: 2 });
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            j.on_scored(id, entry(i as i64));
        }
        let out = j.evict();
        assert_eq!(out.unlabelled.len(), 1);
        assert_eq!(out.unlabelled[0].event_time, 0);
        assert_eq!(j.len(), (2, 0));
    }
}
