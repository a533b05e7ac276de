//! Micro-batching: events arrive in chunks; a batch goes to the model when it
//! holds `max_batch` events or its first event has waited `max_delay`.
//!
//! Why a module of its own: this is where latency and throughput are traded,
//! and it is pure (no Kafka, no model), so its timing is tested with tokio's
//! paused clock instead of by running a broker.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// When a batch is full or due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_batch: usize,
    pub max_delay: Duration,
}

/// The batch being filled.
#[derive(Debug)]
pub struct Batcher<T> {
    policy: BatchPolicy,
    items: Vec<T>,
    /// When the current batch is due: its first item's arrival + max_delay.
    due: Option<Instant>,
}

impl<T> Batcher<T> {
    pub fn new(policy: BatchPolicy) -> Self {
        Self { policy, items: Vec::with_capacity(policy.max_batch), due: None }
    }

    /// Adds an item; returns the batch if that filled it.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Vec<T>> {
        if self.items.is_empty() {
            self.due = Some(now + self.policy.max_delay);
        }
        self.items.push(item);
        (self.items.len() >= self.policy.max_batch).then(|| self.take()).flatten()
    }

    /// The batch, if it is due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<Vec<T>> {
        self.due.is_some_and(|due| now >= due).then(|| self.take()).flatten()
    }

    /// Whatever is waiting, due or not (at shutdown).
    pub fn take(&mut self) -> Option<Vec<T>> {
        self.due = None;
        if self.items.is_empty() {
            return None;
        }
        Some(std::mem::replace(&mut self.items, Vec::with_capacity(self.policy.max_batch)))
    }

    /// When the batch being filled is due, if one is.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }
}

/// What waiting for input gave.
#[derive(Debug, PartialEq)]
pub enum Next<C> {
    Chunk(C),
    /// The current batch is due before another chunk came.
    Due,
    /// The sender is gone: flush and stop.
    Closed,
}

/// Waits for the next chunk, but not past `due`. A chunk already queued is
/// taken without arming a timer (the common case under load).
pub async fn next_chunk<C>(chunks: &mut mpsc::Receiver<C>, due: Option<Instant>) -> Next<C> {
    match chunks.try_recv() {
        Ok(chunk) => return Next::Chunk(chunk),
        Err(mpsc::error::TryRecvError::Disconnected) => return Next::Closed,
        Err(mpsc::error::TryRecvError::Empty) => {}
    }
    let received = match due {
        None => chunks.recv().await,
        Some(due) => match tokio::time::timeout_at(due, chunks.recv()).await {
            Ok(received) => received,
            Err(_) => return Next::Due,
        },
    };
    received.map_or(Next::Closed, Next::Chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BatchPolicy = BatchPolicy { max_batch: 3, max_delay: Duration::from_millis(2) };

    #[test]
    fn a_full_batch_comes_out_at_once() {
        let mut b = Batcher::new(POLICY);
        let now = Instant::now();
        assert_eq!(b.push(1, now), None);
        assert_eq!(b.push(2, now), None);
        assert_eq!(b.push(3, now), Some(vec![1, 2, 3]));
        assert_eq!(b.due(), None, "nothing waits after a full batch");
        assert_eq!(b.take(), None);
    }

    #[test]
    fn a_batch_is_due_max_delay_after_its_first_item() {
        let mut b = Batcher::new(POLICY);
        let start = Instant::now();
        b.push(1, start);
        b.push(2, start + Duration::from_millis(1));
        assert_eq!(b.due(), Some(start + POLICY.max_delay), "the first item sets the deadline");
        assert_eq!(b.take_due(start + Duration::from_millis(1)), None);
        assert_eq!(b.take_due(start + POLICY.max_delay), Some(vec![1, 2]));
        assert_eq!(b.due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_stops_at_the_deadline_and_takes_queued_chunks_first() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut b = Batcher::new(POLICY);
        tx.send(vec![1]).await.unwrap();
        let Next::Chunk(chunk) = next_chunk(&mut rx, b.due()).await else { panic!("a queued chunk") };
        let arrived = Instant::now();
        for item in chunk {
            assert_eq!(b.push(item, arrived), None);
        }
        // Nothing more arrives: the wait ends exactly when the batch is due.
        assert_eq!(next_chunk(&mut rx, b.due()).await, Next::Due);
        assert_eq!(Instant::now(), arrived + POLICY.max_delay);
        assert_eq!(b.take_due(Instant::now()), Some(vec![1]));
        // A chunk that comes before the deadline is taken.
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            tx.send(vec![2, 3]).await.unwrap();
        });
        assert_eq!(next_chunk(&mut rx, Some(Instant::now() + POLICY.max_delay)).await, Next::Chunk(vec![2, 3]));
        sender.await.unwrap();
        // With no batch waiting there is no deadline; the closed channel ends the wait.
        assert_eq!(next_chunk(&mut rx, None).await, Next::Closed);
    }
}
