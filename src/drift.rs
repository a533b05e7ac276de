//! Drift without labels: how far live traffic has moved from the data a
//! model was trained on, as the population stability index (PSI) of each
//! feature group and of the score.
//!
//! Why here, beside the features and with no Kafka, torch or metrics: the
//! trainer records the reference (`DriftReference`, in `model.json`) and the
//! scorer counts live payments (`DriftWindow`) into bins drawn by the same
//! code (`Bins::of`, `CategoricalShares::index`), so the two can never
//! disagree on what a bin is. Labels arrive late or never; a shifted input
//! population or score distribution is the early warning that the model's
//! holdout metrics may no longer hold.
//!
//! PSI = sum over bins of (a - e) * ln(a / e), with `e` the reference share
//! and `a` the live share of a bin. A share of zero (a bin empty in the
//! window or in the reference) counts as [`PSI_EPSILON`], so one empty bin
//! gives a large but finite term instead of infinity. Rule of thumb: below
//! 0.1 no shift, 0.1 to 0.25 a moderate one, above 0.25 a significant one
//! ([`DEFAULT_PSI_THRESHOLD`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::features::FeatureSpec;
use crate::payment::Payment;

/// What a zero share counts as in [`psi`].
pub const PSI_EPSILON: f64 = 1e-4;
/// PSI above which the scorer warns: the usual "significant shift".
pub const DEFAULT_PSI_THRESHOLD: f64 = 0.25;
/// Payments per drift window by default.
pub const DEFAULT_DRIFT_WINDOW: usize = 10_000;
/// Quantiles of the training amounts that cut the amount bins (deciles).
pub const AMOUNT_QUANTILES: [f64; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
/// Quantiles of the holdout scores that cut the score bins: deciles, then
/// finer in the tail, where the few payments that matter are. Most scores
/// are near 0, so fixed bins (0.0-0.1, ...) would put almost every payment
/// in the first one and see no shift among them.
pub const SCORE_QUANTILES: [f64; 11] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99];

/// The population stability index of `actual` shares against `expected`
/// shares of the same bins (each summing to 1); zero shares count as
/// [`PSI_EPSILON`].
pub fn psi(expected: &[f64], actual: &[f64]) -> f64 {
    assert_eq!(expected.len(), actual.len(), "PSI over different bins");
    expected
        .iter()
        .zip(actual)
        .map(|(e, a)| {
            let (e, a) = (e.max(PSI_EPSILON), a.max(PSI_EPSILON));
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// What PSI is measured on: the reason-code feature groups and the score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriftGroup {
    Category,
    Age,
    Gender,
    Amount,
    Score,
}

impl DriftGroup {
    /// Every group, in the order reports list them.
    pub const ALL: [DriftGroup; 5] = [Self::Category, Self::Age, Self::Gender, Self::Amount, Self::Score];

    /// The metric label and the name log lines use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Category => "category",
            Self::Age => "age",
            Self::Gender => "gender",
            Self::Amount => "amount",
            Self::Score => "score",
        }
    }
}

/// Shares of each value of a categorical feature, plus the share of values
/// outside the vocabulary (`other`: none in training data; live, a value the
/// encoder rejects, such as a new category, which is dead-lettered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoricalShares {
    pub values: Vec<String>,
    pub shares: Vec<f64>,
    pub other: f64,
}

impl CategoricalShares {
    /// Shares of `vocabulary`'s values among `values`.
    pub fn count<'a>(vocabulary: &[String], values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut counts = vec![0u64; vocabulary.len() + 1];
        for value in values {
            counts[vocabulary.iter().position(|v| v == value).unwrap_or(vocabulary.len())] += 1;
        }
        let shares = shares(&counts);
        Self {
            values: vocabulary.to_vec(),
            shares: shares[..vocabulary.len()].to_vec(),
            other: shares[vocabulary.len()],
        }
    }

    /// Every bin's reference share, `other` last (the order of `index`).
    fn bins(&self) -> Vec<f64> {
        self.shares.iter().copied().chain([self.other]).collect()
    }

    fn check(&self, name: &str) -> Result<(), String> {
        if self.values.len() != self.shares.len() {
            return Err(format!("{name}: {} values but {} shares", self.values.len(), self.shares.len()));
        }
        check_shares(name, &self.bins())
    }
}

/// Shares of a numeric value in bins cut at `edges` (ascending): bin 0 is
/// below `edges[0]`, bin i holds `[edges[i-1], edges[i])`, the last bin
/// everything from the last edge up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bins {
    pub edges: Vec<f64>,
    pub shares: Vec<f64>,
}

impl Bins {
    /// The bin `x` falls in: the one rule for reference and live counts.
    pub fn index(edges: &[f64], x: f64) -> usize {
        // The count of edges at or below x: for ascending edges, the same as a
        // binary search, but without the branches live scores would mispredict.
        edges.iter().map(|e| usize::from(*e <= x)).sum()
    }

    /// Bins cut at the `quantiles` of `values` (equal edges merged), with
    /// the share of `values` in each.
    pub fn of(mut values: Vec<f64>, quantiles: &[f64]) -> Self {
        values.retain(|v| v.is_finite());
        values.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = Vec::with_capacity(quantiles.len());
        if !values.is_empty() {
            for q in quantiles {
                let edge = values[((values.len() - 1) as f64 * q).round() as usize];
                if edges.last().is_none_or(|last| edge > *last) {
                    edges.push(edge);
                }
            }
        }
        let mut counts = vec![0u64; edges.len() + 1];
        for v in &values {
            counts[Self::index(&edges, *v)] += 1;
        }
        Self { shares: shares(&counts), edges }
    }

    fn check(&self, name: &str) -> Result<(), String> {
        if self.shares.len() != self.edges.len() + 1 {
            return Err(format!(
                "{name}: {} edges need {} shares, not {}",
                self.edges.len(),
                self.edges.len() + 1,
                self.shares.len()
            ));
        }
        if !self.edges.iter().all(|e| e.is_finite()) || !self.edges.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!("{name}: edges {:?} are not finite and strictly ascending", self.edges));
        }
        check_shares(name, &self.shares)
    }
}

fn shares(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts.iter().map(|c| if total == 0 { 0.0 } else { *c as f64 / total as f64 }).collect()
}

fn check_shares(name: &str, shares: &[f64]) -> Result<(), String> {
    let sum: f64 = shares.iter().sum();
    if !shares.iter().all(|s| s.is_finite() && *s >= 0.0) || (sum - 1.0).abs() > 1e-6 {
        return Err(format!("{name}: shares {shares:?} are not non-negative numbers summing to 1"));
    }
    Ok(())
}

/// `drift_reference` in `model.json`: the training data's feature
/// distributions and the holdout's score distribution, which live traffic
/// is compared with. Versions published before it have none: no PSI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReference {
    /// Training payments the feature shares were counted on.
    pub rows: u64,
    /// Holdout payments the score shares were counted on.
    pub scored_rows: u64,
    pub category: CategoricalShares,
    pub age: CategoricalShares,
    pub gender: CategoricalShares,
    /// Cut at the deciles of the training amounts.
    pub amount: Bins,
    /// P(fraud) cut at [`SCORE_QUANTILES`] of the holdout scores.
    pub score: Bins,
}

impl DriftReference {
    /// The reference of a model trained on `train` with `spec`, whose
    /// holdout scores (P(fraud), as the exported model gives them) are `holdout_scores`.
    pub fn new(spec: &FeatureSpec, train: &[Payment], holdout_scores: &[f32]) -> Self {
        Self {
            rows: train.len() as u64,
            scored_rows: holdout_scores.len() as u64,
            category: CategoricalShares::count(&spec.categories, train.iter().map(|p| p.category.as_str())),
            age: CategoricalShares::count(&spec.ages, train.iter().map(|p| p.age.as_str())),
            gender: CategoricalShares::count(&spec.genders, train.iter().map(|p| p.gender.as_str())),
            amount: Bins::of(train.iter().map(|p| p.amount).collect(), &AMOUNT_QUANTILES),
            score: Bins::of(holdout_scores.iter().map(|s| f64::from(*s)).collect(), &SCORE_QUANTILES),
        }
    }

    /// Whether the reference is usable: shapes agree, shares sum to 1, edges ascend.
    pub fn check(&self) -> Result<(), String> {
        self.category.check("drift_reference.category")?;
        self.age.check("drift_reference.age")?;
        self.gender.check("drift_reference.gender")?;
        self.amount.check("drift_reference.amount")?;
        self.score.check("drift_reference.score")
    }
}

/// How the scorer measures drift.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftConfig {
    /// Payments per window (0: off). PSI is computed when a window fills,
    /// then counting starts afresh (consecutive, non-overlapping windows).
    pub window: usize,
    /// PSI above which a group's drift is logged as a warning.
    pub threshold: f64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self { window: DEFAULT_DRIFT_WINDOW, threshold: DEFAULT_PSI_THRESHOLD }
    }
}

/// A categorical group's live counts; values are looked up most common first,
/// so the usual payment costs one or two string comparisons.
#[derive(Debug, Clone)]
struct CategoricalCounts {
    lookup: Vec<(Box<str>, usize)>,
    counts: Vec<u64>,
}

impl CategoricalCounts {
    fn new(reference: &CategoricalShares) -> Self {
        let mut lookup: Vec<(Box<str>, usize)> =
            reference.values.iter().enumerate().map(|(i, v)| (v.as_str().into(), i)).collect();
        lookup.sort_by(|a, b| reference.shares[b.1].total_cmp(&reference.shares[a.1]));
        Self { lookup, counts: vec![0; reference.values.len() + 1] }
    }

    fn add(&mut self, value: &str) {
        let other = self.counts.len() - 1;
        let bin = self.lookup.iter().find(|(v, _)| &**v == value).map_or(other, |(_, i)| *i);
        self.counts[bin] += 1;
    }
}

/// The PSI of every group over one window; `None` for a group with nothing
/// counted (the score, when no payment of the window could be scored).
#[derive(Debug, Clone, PartialEq)]
pub struct PsiReport {
    /// Payments in the window.
    pub payments: usize,
    pub psi: Vec<(DriftGroup, Option<f64>)>,
}

impl PsiReport {
    /// The PSI of `group`, if it was measured.
    pub fn get(&self, group: DriftGroup) -> Option<f64> {
        self.psi.iter().find(|(g, _)| *g == group).and_then(|(_, v)| *v)
    }
}

/// Live counts of one model's traffic in its reference's bins.
#[derive(Debug, Clone)]
pub struct DriftWindow {
    reference: Arc<DriftReference>,
    size: usize,
    seen: usize,
    category: CategoricalCounts,
    age: CategoricalCounts,
    gender: CategoricalCounts,
    amount: Vec<u64>,
    score: Vec<u64>,
}

impl DriftWindow {
    /// An empty window of `size` payments (at least 1) against `reference`.
    pub fn new(reference: Arc<DriftReference>, size: usize) -> Self {
        Self {
            size: size.max(1),
            seen: 0,
            category: CategoricalCounts::new(&reference.category),
            age: CategoricalCounts::new(&reference.age),
            gender: CategoricalCounts::new(&reference.gender),
            amount: vec![0; reference.amount.shares.len()],
            score: vec![0; reference.score.shares.len()],
            reference,
        }
    }

    /// Counts one payment and its P(fraud) (`None`: the model's encoder
    /// rejected it). A non-finite or negative amount is not counted in the
    /// amount group. When this payment fills the window, returns its PSI
    /// and starts the next window.
    pub fn observe(&mut self, payment: &Payment, score: Option<f32>) -> Option<PsiReport> {
        self.category.add(&payment.category);
        self.age.add(&payment.age);
        self.gender.add(&payment.gender);
        if payment.amount.is_finite() && payment.amount >= 0.0 {
            self.amount[Bins::index(&self.reference.amount.edges, payment.amount)] += 1;
        }
        if let Some(score) = score {
            self.score[Bins::index(&self.reference.score.edges, f64::from(score))] += 1;
        }
        self.seen += 1;
        if self.seen < self.size {
            return None;
        }
        let report = self.report();
        *self = Self::new(self.reference.clone(), self.size);
        Some(report)
    }

    /// The PSI of every group over what this window has counted so far.
    pub fn report(&self) -> PsiReport {
        let measure = |reference: &[f64], counts: &[u64]| {
            (counts.iter().sum::<u64>() > 0).then(|| psi(reference, &shares(counts)))
        };
        let r = &self.reference;
        let psi = DriftGroup::ALL
            .into_iter()
            .map(|group| {
                let value = match group {
                    DriftGroup::Category => measure(&r.category.bins(), &self.category.counts),
                    DriftGroup::Age => measure(&r.age.bins(), &self.age.counts),
                    DriftGroup::Gender => measure(&r.gender.bins(), &self.gender.counts),
                    DriftGroup::Amount => measure(&r.amount.shares, &self.amount),
                    DriftGroup::Score => measure(&r.score.shares, &self.score),
                };
                (group, value)
            })
            .collect();
        PsiReport { payments: self.seen, psi }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::Simulator;

    #[test]
    fn psi_matches_hand_computed_values() {
        assert_eq!(psi(&[0.5, 0.5], &[0.5, 0.5]), 0.0);
        // (0.7-0.5)ln(0.7/0.5) + (0.3-0.5)ln(0.3/0.5) = 0.2*0.336472 + 0.2*0.510826
        let expected = 0.2 * (1.4f64).ln() + 0.2 * (0.5f64 / 0.3).ln();
        assert!((psi(&[0.5, 0.5], &[0.7, 0.3]) - expected).abs() < 1e-12);
        assert!((expected - 0.169_459_6).abs() < 1e-6, "{expected}");
        // Symmetric in its arguments.
        assert!((psi(&[0.7, 0.3], &[0.5, 0.5]) - expected).abs() < 1e-12);
        // An empty bin counts as 1e-4: (0.5-1e-4)ln(0.5/1e-4) + (0.5-1)ln(0.5/1), finite.
        let empty = (0.5 - 1e-4) * (0.5f64 / 1e-4).ln() + (0.5 - 1.0) * 0.5f64.ln();
        assert!((psi(&[0.0, 1.0], &[0.5, 0.5]) - empty).abs() < 1e-12);
        assert!((empty - 4.604_3).abs() < 1e-3, "{empty}");
        // A bin empty in both contributes nothing.
        assert_eq!(psi(&[0.0, 1.0], &[0.0, 1.0]), 0.0);
    }

    #[test]
    fn bins_are_cut_at_quantiles_and_merge_ties() {
        let bins = Bins::of((1..=100).map(f64::from).collect(), &AMOUNT_QUANTILES);
        // The value at index round(99 * q): 9.9 -> 10 (value 11), 19.8 -> 20 (value 21), ...
        assert_eq!(bins.edges, [11.0, 21.0, 31.0, 41.0, 51.0, 60.0, 70.0, 80.0, 90.0]);
        assert_eq!(bins.shares.len(), 10);
        assert!((bins.shares.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(bins.shares[0], 0.10, "1..=10 below the first edge");
        // [edges[i-1], edges[i]): an edge value belongs to the bin it starts.
        assert_eq!((Bins::index(&bins.edges, 10.99), Bins::index(&bins.edges, 11.0)), (0, 1));
        assert_eq!(Bins::index(&bins.edges, 1e9), 9);
        // Mostly zeros (as scores are mostly near 0): equal edges merge.
        let mut scores = vec![0.0; 95];
        scores.extend([0.2, 0.4, 0.6, 0.8, 1.0]);
        let bins = Bins::of(scores, &SCORE_QUANTILES);
        assert_eq!(bins.edges, [0.0, 0.8]);
        assert_eq!(bins.shares, [0.0, 0.98, 0.02]);
        assert!(bins.check("score").is_ok());
    }

    #[test]
    fn categorical_shares_count_unseen_values_as_other() {
        let vocabulary: Vec<String> = ["F", "M"].map(String::from).to_vec();
        let shares = CategoricalShares::count(&vocabulary, ["F", "F", "M", "X"]);
        assert_eq!((shares.shares.as_slice(), shares.other), ([0.5, 0.25].as_slice(), 0.25));
        let mut counts = CategoricalCounts::new(&shares);
        for v in ["M", "F", "Y", "F"] {
            counts.add(v);
        }
        assert_eq!(counts.counts, [2, 1, 1]);
        assert_eq!(counts.lookup[0].0.as_ref(), "F", "most common first");
    }

    #[test]
    fn a_reference_round_trips_and_a_broken_one_is_refused() {
        let train: Vec<Payment> = Simulator::new(5_000, 3).collect();
        let scores: Vec<f32> = (0..1000).map(|i| (i as f32 / 1000.0).powi(4)).collect();
        let reference = DriftReference::new(&FeatureSpec::demo(), &train, &scores);
        assert!(reference.check().is_ok(), "{:?}", reference.check());
        assert_eq!((reference.rows, reference.scored_rows), (5_000, 1000));
        assert_eq!((reference.amount.edges.len(), reference.score.edges.len()), (9, 11));
        assert_eq!(reference.category.other, 0.0);
        let mut back: DriftReference = serde_json::from_str(&serde_json::to_string(&reference).unwrap()).unwrap();
        // serde_json may read a float back one unit in the last place off.
        for (a, b) in back.score.edges.iter().zip(&reference.score.edges) {
            assert!((a - b).abs() <= b.abs() * 1e-12, "{a} vs {b}");
        }
        back.score.edges.clone_from(&reference.score.edges);
        assert_eq!(back, reference);
        let mut broken = reference.clone();
        broken.amount.edges.swap(0, 1);
        assert!(broken.check().unwrap_err().contains("ascending"));
        let mut broken = reference;
        broken.age.shares[0] += 0.5;
        assert!(broken.check().unwrap_err().contains("summing to 1"));
    }

    /// The check on the features, without a model: ~0 on the same
    /// distribution (another seed), > 0.25 for the groups regime B moves.
    #[test]
    fn feature_psi_is_near_zero_on_the_same_distribution_and_high_after_drift() {
        let train: Vec<Payment> = Simulator::new(60_000, 1).collect();
        let reference = Arc::new(DriftReference::new(&FeatureSpec::demo(), &train, &[0.5]));
        let window_of = |payments: Vec<Payment>| {
            let mut window = DriftWindow::new(reference.clone(), payments.len());
            let mut report = None;
            for p in &payments {
                report = window.observe(p, None);
            }
            report.expect("the window filled")
        };
        let same = window_of(Simulator::new(60_000, 2).skip(40_000).take(10_000).collect());
        let drifted = window_of(Simulator::new(60_000, 2).drift_after(0).skip(40_000).take(10_000).collect());
        for group in [DriftGroup::Category, DriftGroup::Age, DriftGroup::Gender, DriftGroup::Amount] {
            let psi = same.get(group).unwrap();
            assert!(psi < 0.1, "{group:?}: PSI {psi} on the same distribution");
        }
        for group in [DriftGroup::Category, DriftGroup::Age, DriftGroup::Amount] {
            let psi = drifted.get(group).unwrap();
            assert!(psi > DEFAULT_PSI_THRESHOLD, "{group:?}: PSI {psi} after the drift");
        }
        assert!(drifted.get(DriftGroup::Gender).unwrap() < 0.1, "gender does not drift: {drifted:?}");
        eprintln!("same distribution: {same:?}\nregime B: {drifted:?}");
    }

    #[test]
    fn a_window_reports_when_full_and_starts_afresh() {
        let train: Vec<Payment> = Simulator::new(2_000, 3).collect();
        let reference = Arc::new(DriftReference::new(&FeatureSpec::demo(), &train, &[0.1, 0.2, 0.3]));
        let mut window = DriftWindow::new(reference, 1_000);
        let mut reports = Vec::new();
        for (i, p) in train.iter().enumerate() {
            // The first 1,000 payments are scored, the next 1,000 are not.
            if let Some(report) = window.observe(p, (i < 1_000).then_some(0.2)) {
                reports.push(report);
            }
        }
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].payments, 1_000);
        // Every score in the bin holding a third of the reference: (1-1/3)ln(3) + 2 empty-bin terms.
        let third = 1.0 / 3.0;
        let expected = (1.0 - third) * 3f64.ln() + 2.0 * (PSI_EPSILON - third) * (PSI_EPSILON / third).ln();
        assert!((reports[0].get(DriftGroup::Score).unwrap() - expected).abs() < 1e-9);
        assert_eq!(reports[1].get(DriftGroup::Score), None, "nothing scored in the second window");
        assert!(reports[1].get(DriftGroup::Category).is_some());
    }
}
