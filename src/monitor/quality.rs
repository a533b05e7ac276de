//! Live model quality per version, from the joins: what a fraud team asks
//! of the model serving now (and of a shadow beside it) before the next
//! retraining.
//!
//! Two kinds of numbers. Over the last `window` labelled payments of each
//! version: precision and recall at the version's own threshold (as served:
//! `isFraud`), average precision and ROC-AUC of its probabilities, the same
//! definitions as the trainer's report (`training::evaluate`). Over the
//! scored payments the join holds (its label window): alert rate (flagged
//! share) and label coverage (labelled share).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::join::{Entry, ServedBy};
use crate::training::evaluate::{average_precision, roc_auc, sweep, Confusion};

/// One labelled payment, as one version scored it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    probability: f32,
    flagged: bool,
    fraud: bool,
}

#[derive(Debug, Default)]
struct Version {
    samples: VecDeque<Sample>,
    /// Scored payments held by the join, of them flagged, of them labelled.
    scored: u64,
    flagged: u64,
    labelled: u64,
}

/// One version's live numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionReport {
    pub version: Arc<str>,
    /// Labelled payments the quality numbers are over, and the frauds among them.
    pub samples: u64,
    pub frauds: u64,
    pub precision: f64,
    pub recall: f64,
    /// NaN until both classes were seen.
    pub average_precision: f64,
    pub roc_auc: f64,
    pub alert_rate: f64,
    pub label_coverage: f64,
}

/// Every version's live numbers.
#[derive(Debug)]
pub struct Quality {
    window: usize,
    versions: BTreeMap<Arc<str>, Version>,
}

impl Quality {
    /// Quality over the last `window` labelled payments of each version.
    pub fn new(window: usize) -> Self {
        Self { window: window.max(1), versions: BTreeMap::new() }
    }

    /// A scored payment entered the join.
    pub fn scored(&mut self, served: &ServedBy) {
        for s in served.iter() {
            let v = self.versions.entry(s.version.clone()).or_default();
            v.scored += 1;
            v.flagged += u64::from(s.flagged);
        }
    }

    /// A scored payment got its label (`first`: not a correction of an earlier one).
    pub fn labelled(&mut self, served: &ServedBy, fraud: bool, first: bool) {
        for s in served.iter() {
            let v = self.versions.entry(s.version.clone()).or_default();
            v.labelled += u64::from(first);
            if v.samples.len() == self.window {
                v.samples.pop_front();
            }
            v.samples.push_back(Sample { probability: s.probability as f32, flagged: s.flagged, fraud });
        }
    }

    /// A scored payment left the join.
    pub fn evicted(&mut self, entry: &Entry) {
        for s in entry.served.iter() {
            if let Some(v) = self.versions.get_mut(&s.version) {
                v.scored = v.scored.saturating_sub(1);
                v.flagged = v.flagged.saturating_sub(u64::from(s.flagged));
                v.labelled = v.labelled.saturating_sub(u64::from(entry.label.is_some()));
            }
        }
    }

    /// The numbers of every version seen, oldest version first.
    pub fn report(&self) -> Vec<VersionReport> {
        self.versions
            .iter()
            .map(|(version, v)| {
                let scores: Vec<f32> = v.samples.iter().map(|s| s.probability).collect();
                let labels: Vec<bool> = v.samples.iter().map(|s| s.fraud).collect();
                let positives = labels.iter().filter(|y| **y).count() as u64;
                let negatives = labels.len() as u64 - positives;
                let points = sweep(&scores, &labels);
                let mut confusion = Confusion::default();
                for s in &v.samples {
                    match (s.flagged, s.fraud) {
                        (true, true) => confusion.true_positives += 1,
                        (true, false) => confusion.false_positives += 1,
                        (false, false) => confusion.true_negatives += 1,
                        (false, true) => confusion.false_negatives += 1,
                    }
                }
                let share = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
                VersionReport {
                    version: version.clone(),
                    samples: labels.len() as u64,
                    frauds: positives,
                    precision: confusion.precision(),
                    recall: confusion.recall(),
                    average_precision: average_precision(&points, positives),
                    roc_auc: roc_auc(&points, positives, negatives),
                    alert_rate: share(v.flagged, v.scored),
                    label_coverage: share(v.labelled, v.scored),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::join::Served;

    fn served(version: &str, probability: f64, threshold: f64) -> ServedBy {
        ServedBy {
            serving: Served { version: version.into(), probability, flagged: probability >= threshold },
            shadow: None,
        }
    }

    #[test]
    fn numbers_match_a_hand_computed_example() {
        let mut q = Quality::new(100);
        // Probabilities and labels: 0.9 F, 0.8 L, 0.7 F, 0.2 L, 0.1 L; threshold 0.5; plus one unlabelled.
        for (p, fraud) in [(0.9, true), (0.8, false), (0.7, true), (0.2, false), (0.1, false)] {
            q.scored(&served("7", p, 0.5));
            q.labelled(&served("7", p, 0.5), fraud, true);
        }
        q.scored(&served("7", 0.6, 0.5));
        let r = &q.report()[0];
        assert_eq!((r.samples, r.frauds), (5, 2));
        // Flagged: 0.9 (F), 0.8 (L), 0.7 (F): precision 2/3, recall 2/2.
        assert!((r.precision - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.recall, 1.0);
        // AP: recall 1/2 at precision 1 (0.9), then recall 1 at precision 2/3 (0.7).
        assert!((r.average_precision - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-12);
        // ROC-AUC: of the 6 (fraud, legit) pairs, 5 are ordered right.
        assert!((r.roc_auc - 5.0 / 6.0).abs() < 1e-12);
        assert!((r.alert_rate - 4.0 / 6.0).abs() < 1e-12, "0.9, 0.8, 0.7 and 0.6 of 6 scored");
        assert!((r.label_coverage - 5.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn the_window_keeps_the_last_samples_and_eviction_updates_the_shares() {
        let mut q = Quality::new(2);
        for (p, fraud) in [(0.9, false), (0.8, true), (0.1, false)] {
            q.scored(&served("1", p, 0.5));
            q.labelled(&served("1", p, 0.5), fraud, true);
        }
        let r = &q.report()[0];
        assert_eq!((r.samples, r.frauds), (2, 1), "0.9 fell out of the window");
        assert_eq!(r.average_precision, 1.0);
        let gone = Entry {
            payload: Box::new([]),
            event_time: 0,
            scored_at: 0,
            served: served("1", 0.9, 0.5),
            label: Some(false),
        };
        q.evicted(&gone);
        let r = &q.report()[0];
        assert_eq!((r.alert_rate, r.label_coverage), (0.5, 1.0));
    }

    #[test]
    fn versions_are_reported_apart() {
        let mut q = Quality::new(10);
        let both = ServedBy {
            serving: Served { version: "1".into(), probability: 0.9, flagged: true },
            shadow: Some(Served { version: "2".into(), probability: 0.1, flagged: false }),
        };
        q.scored(&both);
        q.labelled(&both, true, true);
        let r = q.report();
        assert_eq!(r.iter().map(|r| (&*r.version, r.recall)).collect::<Vec<_>>(), [("1", 1.0), ("2", 0.0)]);
    }
}
