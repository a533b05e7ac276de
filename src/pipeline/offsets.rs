//! Which input offsets may be committed: only those whose output (or dead
//! letter) the broker has acknowledged, and only in order per partition.
//!
//! Outputs of one input partition can be acknowledged out of order (they may
//! land on different output partitions), so each partition keeps the set of
//! offsets still in flight; the committable position is the lowest of them,
//! or one past the highest offset seen when none is in flight. An offset
//! whose event was abandoned (its ticket dropped unacknowledged: the pipeline
//! is failing) stays below the committable position for good, so nothing at
//! or past it is ever committed by this consumer.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

#[derive(Debug, Default)]
struct PartitionState {
    in_flight: BTreeSet<i64>,
    /// Offsets that will never finish: the position never moves past them.
    abandoned: BTreeSet<i64>,
    /// One past the highest offset begun.
    next: i64,
    /// Highest position already reported as committable.
    reported: i64,
}

/// Thread-safe tracker of one input topic, shared by the consumer loop and
/// the delivery callbacks (keyed by partition alone: no per-event allocation).
#[derive(Debug)]
pub struct OffsetTracker {
    topic: String,
    partitions: Mutex<HashMap<i32, PartitionState>>,
}

impl OffsetTracker {
    /// A tracker for the partitions of `topic`.
    pub fn new(topic: impl Into<String>) -> Self {
        Self { topic: topic.into(), partitions: Mutex::default() }
    }

    /// The topic whose offsets this tracks.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Records that `offset` was read and is now in flight.
    pub fn begin(&self, partition: i32, offset: i64) {
        let mut map = self.partitions.lock().expect("offset tracker lock");
        // The first offset seen starts the partition: nothing below it is ours to report.
        let state = map.entry(partition).or_insert_with(|| PartitionState {
            in_flight: BTreeSet::new(),
            abandoned: BTreeSet::new(),
            next: offset,
            reported: offset,
        });
        state.in_flight.insert(offset);
        state.next = state.next.max(offset + 1);
    }

    /// Records that `offset` is done (its output is acknowledged). Returns the
    /// new committable position (every offset below it is done) if it moved.
    pub fn finish(&self, partition: i32, offset: i64) -> Option<i64> {
        let mut map = self.partitions.lock().expect("offset tracker lock");
        let state = map.get_mut(&partition)?;
        state.in_flight.remove(&offset);
        let position = [state.in_flight.first(), state.abandoned.first()]
            .into_iter()
            .flatten()
            .min()
            .copied()
            .unwrap_or(state.next);
        if position > state.reported {
            state.reported = position;
            Some(position)
        } else {
            None
        }
    }

    /// Records that `offset` will never finish: it no longer counts as in
    /// flight, and the committable position never moves past it.
    pub fn abandon(&self, partition: i32, offset: i64) {
        let mut map = self.partitions.lock().expect("offset tracker lock");
        if let Some(state) = map.get_mut(&partition) {
            if state.in_flight.remove(&offset) {
                state.abandoned.insert(offset);
            }
        }
    }

    /// The partitions of this tracker's topic among `partitions`.
    fn own<'a>(&'a self, partitions: &'a [(String, i32)]) -> impl Iterator<Item = i32> + 'a {
        partitions.iter().filter(|(topic, _)| *topic == self.topic).map(|(_, partition)| *partition)
    }

    /// Offsets in flight on the given partitions (all partitions if `None`);
    /// abandoned offsets are not counted: nobody will finish them.
    pub fn in_flight(&self, partitions: Option<&[(String, i32)]>) -> usize {
        let map = self.partitions.lock().expect("offset tracker lock");
        match partitions {
            None => map.values().map(|s| s.in_flight.len()).sum(),
            Some(list) => self.own(list).filter_map(|p| map.get(&p)).map(|s| s.in_flight.len()).sum(),
        }
    }

    /// Every partition's committable position (the next offset to read when
    /// resuming), as last reported by `finish`.
    pub fn positions(&self) -> Vec<(i32, i64)> {
        let map = self.partitions.lock().expect("offset tracker lock");
        map.iter().map(|(partition, state)| (*partition, state.reported)).collect()
    }

    /// Forgets partitions this consumer no longer owns.
    pub fn forget(&self, partitions: &[(String, i32)]) {
        let mut map = self.partitions.lock().expect("offset tracker lock");
        for partition in self.own(partitions) {
            map.remove(&partition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_below_the_lowest_offset_in_flight() {
        let t = OffsetTracker::new("in");
        for o in 10..15 {
            t.begin(0, o);
        }
        assert_eq!(t.finish(0, 12), None, "10 and 11 are still in flight");
        assert_eq!(t.finish(0, 10), Some(11));
        assert_eq!(t.finish(0, 11), Some(13));
        assert_eq!(t.finish(0, 14), None);
        assert_eq!(t.in_flight(None), 1);
        assert_eq!(t.finish(0, 13), Some(15));
        assert_eq!(t.in_flight(None), 0);
    }

    #[test]
    fn nothing_at_or_past_an_abandoned_offset_becomes_committable() {
        let t = OffsetTracker::new("in");
        for o in 0..4 {
            t.begin(0, o);
        }
        assert_eq!(t.finish(0, 0), Some(1));
        t.abandon(0, 1);
        assert_eq!(t.in_flight(None), 2, "an abandoned offset is not in flight");
        assert_eq!(t.finish(0, 2), None);
        assert_eq!(t.finish(0, 3), None, "every later offset is done, but 1 never will be");
        assert_eq!(t.in_flight(None), 0);
    }

    #[test]
    fn partitions_are_independent_and_can_be_forgotten() {
        let t = OffsetTracker::new("in");
        t.begin(0, 5);
        t.begin(1, 7);
        assert_eq!(t.finish(1, 7), Some(8));
        assert_eq!(t.in_flight(Some(&[("in".into(), 0)])), 1);
        assert_eq!(t.in_flight(Some(&[("other".into(), 0)])), 0, "another topic's partition is not ours");
        t.forget(&[("other".into(), 0)]);
        assert_eq!(t.in_flight(None), 1);
        t.forget(&[("in".into(), 0)]);
        assert_eq!(t.in_flight(None), 0);
        assert_eq!(t.finish(0, 5), None, "a forgotten partition reports nothing");
    }
}
