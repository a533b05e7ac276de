//! The dead-letter guard (the idea of Sentry Arroyo's `DlqLimit`).
//!
//! Why: the dead-letter topic is for the odd bad event. When most recent
//! events, or a long run of them, are dead-lettered, the cause is almost
//! never the events one by one: a producer upstream changed its format or
//! schema, or the scorer was deployed with the wrong `--input-format`.
//! Quietly routing a whole topic into the DLQ (and committing it) is the
//! failure this guard turns into a stop, with a message that says so.

use std::collections::VecDeque;

use super::failure::PipelineFailure;

/// Limits of the guard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardLimits {
    /// How many recent events the share is measured over.
    pub window: usize,
    /// Stop when more than this share of the window was dead-lettered.
    pub max_share: f64,
    /// Stop when this many events in a row were dead-lettered (0: no limit).
    pub max_consecutive: usize,
}

impl Default for GuardLimits {
    fn default() -> Self {
        Self { window: 10_000, max_share: 0.5, max_consecutive: 1_000 }
    }
}

/// Outcomes of the most recent events, oldest first.
#[derive(Debug)]
pub struct DeadLetterGuard {
    limits: GuardLimits,
    recent: VecDeque<bool>,
    dead: usize,
    consecutive: usize,
}

impl DeadLetterGuard {
    pub fn new(limits: GuardLimits) -> Self {
        Self { limits, recent: VecDeque::with_capacity(limits.window), dead: 0, consecutive: 0 }
    }

    /// Records `count` events that went out as scored outputs (a run of
    /// dead letters ends only if there was one).
    pub fn scored(&mut self, count: usize) {
        if count == 0 {
            return;
        }
        for _ in 0..count.min(self.limits.window) {
            self.push(false);
        }
        self.consecutive = 0;
    }

    /// Records one dead-lettered event; an error once a limit is passed.
    pub fn dead_lettered(&mut self) -> Result<(), PipelineFailure> {
        self.push(true);
        self.consecutive += 1;
        // The share is judged over a whole window only, so the first few
        // events of a run cannot trip it by themselves.
        let share_over = self.recent.len() >= self.limits.window
            && self.dead as f64 > self.limits.max_share * self.limits.window as f64;
        let run_over = self.limits.max_consecutive > 0 && self.consecutive >= self.limits.max_consecutive;
        if share_over || run_over {
            return Err(PipelineFailure::DeadLetterGuard {
                dead: self.dead,
                window: self.recent.len(),
                consecutive: self.consecutive,
                max_share: self.limits.max_share,
                max_consecutive: self.limits.max_consecutive,
            });
        }
        Ok(())
    }

    fn push(&mut self, dead: bool) {
        if self.limits.window == 0 {
            return;
        }
        if self.recent.len() == self.limits.window && self.recent.pop_front() == Some(true) {
            self.dead -= 1;
        }
        self.recent.push_back(dead);
        self.dead += usize::from(dead);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_bad_events_among_many_pass() {
        let mut g = DeadLetterGuard::new(GuardLimits { window: 100, max_share: 0.5, max_consecutive: 10 });
        for _ in 0..1_000 {
            g.scored(10);
            assert!(g.dead_lettered().is_ok(), "one in eleven is no reason to stop");
        }
    }

    #[test]
    fn more_than_the_share_of_a_full_window_stops() {
        let mut g = DeadLetterGuard::new(GuardLimits { window: 100, max_share: 0.5, max_consecutive: 0 });
        let mut tripped = None;
        for i in 0..200 {
            // Two dead letters for every scored event: 2/3 of the window.
            g.scored(1);
            if g.dead_lettered().and_then(|()| g.dead_lettered()).is_err() {
                tripped = Some(i);
                break;
            }
        }
        let i = tripped.expect("the guard never tripped");
        assert!((33..=40).contains(&i), "tripped after {i} rounds, not once the window filled");
    }

    #[test]
    fn a_run_of_dead_letters_stops_even_before_the_window_fills() {
        let mut g = DeadLetterGuard::new(GuardLimits { window: 10_000, max_share: 0.5, max_consecutive: 5 });
        g.scored(3);
        for _ in 0..4 {
            assert!(g.dead_lettered().is_ok());
        }
        g.scored(0); // a batch with nothing scored does not end the run
        let Err(PipelineFailure::DeadLetterGuard { consecutive, .. }) = g.dead_lettered() else {
            panic!("five in a row must stop")
        };
        assert_eq!(consecutive, 5);
        // A scored event ends the run.
        let mut g = DeadLetterGuard::new(GuardLimits { window: 10_000, max_share: 0.5, max_consecutive: 5 });
        for _ in 0..20 {
            for _ in 0..4 {
                assert!(g.dead_lettered().is_ok());
            }
            g.scored(1);
        }
    }
}
