//! Classifier evaluation on a labelled set: ROC-AUC, average precision,
//! recall at a fixed false-positive rate, threshold choice and the confusion
//! matrix. Pure Rust over (score, label) pairs, so it is easy to test.

use serde::{Deserialize, Serialize};

use crate::decision::{BandEdge, DecisionBands};

/// Counts at one decision threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Confusion {
    pub true_positives: u64,
    pub false_positives: u64,
    pub true_negatives: u64,
    pub false_negatives: u64,
}

impl Confusion {
    pub fn at(scores: &[f32], labels: &[bool], threshold: f64) -> Self {
        let mut c = Confusion::default();
        for (s, y) in scores.iter().zip(labels) {
            match (f64::from(*s) >= threshold, *y) {
                (true, true) => c.true_positives += 1,
                (true, false) => c.false_positives += 1,
                (false, false) => c.true_negatives += 1,
                (false, true) => c.false_negatives += 1,
            }
        }
        c
    }

    pub fn precision(&self) -> f64 {
        ratio(self.true_positives, self.true_positives + self.false_positives)
    }

    pub fn recall(&self) -> f64 {
        ratio(self.true_positives, self.true_positives + self.false_negatives)
    }

    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// One point of a threshold sweep, from the highest threshold down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepPoint {
    pub threshold: f64,
    pub tp: u64,
    pub fp: u64,
}

/// All distinct thresholds, highest first, with the counts at each
/// (ties are one point, as scikit-learn does).
pub fn sweep(scores: &[f32], labels: &[bool]) -> Vec<SweepPoint> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut points = Vec::new();
    let (mut tp, mut fp) = (0, 0);
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_tie = order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_tie {
            points.push(SweepPoint { threshold: f64::from(scores[i]), tp, fp });
        }
    }
    points
}

/// Everything the report states about one model on one set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub rows: u64,
    pub frauds: u64,
    pub roc_auc: f64,
    pub average_precision: f64,
    /// Recall at the threshold where the false-positive rate is at most 1%.
    pub recall_at_1pct_fpr: f64,
    pub threshold: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub confusion: Confusion,
}

impl Evaluation {
    pub fn new(scores: &[f32], labels: &[bool], threshold: f64) -> Self {
        let points = sweep(scores, labels);
        let positives = labels.iter().filter(|y| **y).count() as u64;
        let negatives = labels.len() as u64 - positives;
        let confusion = Confusion::at(scores, labels, threshold);
        Self {
            rows: labels.len() as u64,
            frauds: positives,
            roc_auc: roc_auc(&points, positives, negatives),
            average_precision: average_precision(&points, positives),
            recall_at_1pct_fpr: recall_at_fpr(&points, positives, negatives, 0.01),
            threshold,
            precision: confusion.precision(),
            recall: confusion.recall(),
            f1: confusion.f1(),
            confusion,
        }
    }
}

/// Area under the ROC curve (trapezoids between sweep points).
pub fn roc_auc(points: &[SweepPoint], positives: u64, negatives: u64) -> f64 {
    if positives == 0 || negatives == 0 {
        return f64::NAN;
    }
    let (mut area, mut prev_tpr, mut prev_fpr) = (0.0, 0.0, 0.0);
    for p in points {
        let tpr = p.tp as f64 / positives as f64;
        let fpr = p.fp as f64 / negatives as f64;
        area += (fpr - prev_fpr) * (tpr + prev_tpr) / 2.0;
        (prev_tpr, prev_fpr) = (tpr, fpr);
    }
    area
}

/// Average precision: sum over thresholds of (R_n - R_{n-1}) * P_n (scikit-learn's definition).
pub fn average_precision(points: &[SweepPoint], positives: u64) -> f64 {
    if positives == 0 {
        return f64::NAN;
    }
    let (mut ap, mut prev_recall) = (0.0, 0.0);
    for p in points {
        let recall = p.tp as f64 / positives as f64;
        let precision = p.tp as f64 / (p.tp + p.fp) as f64;
        ap += (recall - prev_recall) * precision;
        prev_recall = recall;
    }
    ap
}

/// Highest recall among thresholds whose false-positive rate is at most `max_fpr`.
pub fn recall_at_fpr(points: &[SweepPoint], positives: u64, negatives: u64, max_fpr: f64) -> f64 {
    if positives == 0 || negatives == 0 {
        return f64::NAN;
    }
    points
        .iter()
        .filter(|p| p.fp as f64 / negatives as f64 <= max_fpr)
        .map(|p| p.tp as f64 / positives as f64)
        .fold(0.0, f64::max)
}

/// The decision threshold: the one with the best F1, or, given a target
/// precision, the lowest threshold (most recall) that still reaches it.
pub fn choose_threshold(scores: &[f32], labels: &[bool], target_precision: Option<f64>) -> f64 {
    let points = sweep(scores, labels);
    let positives = labels.iter().filter(|y| **y).count() as u64;
    let f1 = |p: &SweepPoint| {
        let precision = p.tp as f64 / (p.tp + p.fp) as f64;
        let recall = ratio(p.tp, positives);
        if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        }
    };
    let chosen = match target_precision {
        Some(target) => points.iter().rfind(|p| p.tp as f64 / (p.tp + p.fp) as f64 >= target),
        None => points.iter().max_by(|a, b| f1(a).total_cmp(&f1(b))),
    };
    chosen.map_or(0.5, |p| p.threshold)
}

/// The decision bands on validation `scores`: review at the highest
/// threshold whose recall reaches `review_recall` (the fewest reviews that
/// catch that much fraud), block at the lowest threshold whose precision
/// reaches `block_precision` (or, where none does, the most precise one), and
/// never below review.
pub fn choose_bands(scores: &[f32], labels: &[bool], review_recall: f64, block_precision: f64) -> DecisionBands {
    let points = sweep(scores, labels);
    let positives = labels.iter().filter(|y| **y).count() as u64;
    let edge = |p: &SweepPoint| BandEdge {
        threshold: p.threshold,
        precision: p.tp as f64 / (p.tp + p.fp) as f64,
        recall: ratio(p.tp, positives),
    };
    let none = BandEdge { threshold: 0.5, precision: f64::NAN, recall: f64::NAN };
    let review = points.iter().find(|p| edge(p).recall >= review_recall).map_or(none, edge);
    let block = points
        .iter()
        .rfind(|p| edge(p).precision >= block_precision)
        .or_else(|| points.iter().max_by(|a, b| edge(a).precision.total_cmp(&edge(b).precision)))
        .map_or(none, edge);
    let block = if block.threshold < review.threshold { review } else { block };
    DecisionBands { review, block, review_recall_target: review_recall, block_precision_target: block_precision }
}

/// Points of a curve, (x, y).
pub type Curve = Vec<(f64, f64)>;

/// Curves for the report, thinned to at most `max_points` points each:
/// (recall, precision) and (false-positive rate, true-positive rate).
pub fn curves(scores: &[f32], labels: &[bool], max_points: usize) -> (Curve, Curve) {
    let points = sweep(scores, labels);
    let positives = labels.iter().filter(|y| **y).count().max(1) as f64;
    let negatives = (labels.len() as f64 - positives).max(1.0);
    let step = (points.len() / max_points.max(1)).max(1);
    let thinned = points.iter().enumerate().filter(|(i, _)| i % step == 0 || *i == points.len() - 1).map(|(_, p)| p);
    let mut pr = Vec::new();
    let mut roc = vec![(0.0, 0.0)];
    for p in thinned {
        pr.push((p.tp as f64 / positives, p.tp as f64 / (p.tp + p.fp) as f64));
        roc.push((p.fp as f64 / negatives, p.tp as f64 / positives));
    }
    (pr, roc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_inverted_rankings() {
        let scores = [0.9, 0.8, 0.3, 0.1];
        let labels = [true, true, false, false];
        let e = Evaluation::new(&scores, &labels, 0.5);
        assert_eq!((e.roc_auc, e.average_precision, e.recall_at_1pct_fpr), (1.0, 1.0, 1.0));
        assert_eq!(
            e.confusion,
            Confusion { true_positives: 2, false_positives: 0, true_negatives: 2, false_negatives: 0 }
        );
        let inverted = Evaluation::new(&scores, &[false, false, true, true], 0.5);
        assert_eq!(inverted.roc_auc, 0.0);
        assert_eq!(inverted.f1, 0.0);
    }

    #[test]
    fn bands_are_chosen_as_specified_on_a_fixed_set() {
        let scores = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2];
        let labels = [true, true, true, false, true, false, true, false, false, false];
        let edge = |b: BandEdge| (b.threshold as f32, (b.precision * 1e4).round() / 1e4, b.recall);
        let b = choose_bands(&scores, &labels, 0.95, 0.95);
        // Review: the highest threshold catching >= 95% of the 5 frauds: all 5 at 0.5 (5 TP, 2 FP).
        assert_eq!(edge(b.review), (0.5, 0.7143, 1.0));
        // Block: the lowest threshold still >= 95% precise: 0.85 (3 TP, 0 FP).
        assert_eq!(edge(b.block), (0.85, 1.0, 0.6));
        assert_eq!((b.review_recall_target, b.block_precision_target), (0.95, 0.95));
        let b = choose_bands(&scores, &labels, 0.8, 0.8);
        assert_eq!((edge(b.review), edge(b.block)), ((0.7, 0.8, 0.8), (0.7, 0.8, 0.8)));
        // A block edge that would fall below review is raised to it.
        let b = choose_bands(&scores, &labels, 0.5, 0.7);
        assert_eq!((b.review.threshold as f32, b.block.threshold as f32), (0.85, 0.85));
        // No threshold reaches the precision: the most precise one, lowest first.
        let b = choose_bands(&[0.9, 0.8, 0.7], &[false, true, false], 0.95, 0.95);
        assert_eq!(edge(b.block), (0.8, 0.5, 1.0));
    }

    #[test]
    fn matches_scikit_learn_on_a_small_case() {
        // sklearn: roc_auc_score([0,0,1,1],[0.1,0.4,0.35,0.8]) = 0.75,
        // average_precision_score(...) = 0.8333...
        let scores = [0.1, 0.4, 0.35, 0.8];
        let labels = [false, false, true, true];
        let points = sweep(&scores, &labels);
        assert!((roc_auc(&points, 2, 2) - 0.75).abs() < 1e-12);
        assert!((average_precision(&points, 2) - 0.833_333_333_333).abs() < 1e-9);
    }

    #[test]
    fn ties_count_as_one_threshold() {
        let scores = [0.5, 0.5, 0.5, 0.5];
        let labels = [true, false, true, false];
        let points = sweep(&scores, &labels);
        assert_eq!(points.len(), 1);
        assert!((roc_auc(&points, 2, 2) - 0.5).abs() < 1e-12);
        assert!((average_precision(&points, 2) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn threshold_choice_by_f1_and_by_precision() {
        let scores = [0.95, 0.9, 0.7, 0.6, 0.4, 0.2, 0.1];
        let labels = [true, true, false, true, false, false, false];
        // F1 at 0.6: p=3/4, r=1 -> 0.857; at 0.9: p=1, r=2/3 -> 0.8.
        assert_eq!(choose_threshold(&scores, &labels, None), 0.6000000238418579);
        assert_eq!(choose_threshold(&scores, &labels, Some(1.0)), 0.8999999761581421);
    }
}
