//! What a score means to the people who act on it: a decision in three bands
//! (allow, review, block) and the reasons behind it.
//!
//! Why bands: an analyst queue and a payment switch need different cuts. The
//! trainer picks, on validation data, a review threshold that catches most
//! fraud (recall >= 0.95 by default) and a block threshold that is rarely
//! wrong (precision >= 0.95); `model.json` carries both with the precision
//! and recall measured there. `isFraud` (p >= the model's threshold) stays
//! as it was.
//!
//! Why these reasons: for each feature group (amount, category, age,
//! gender), the reason's contribution is how much P(fraud) falls when that
//! group alone is replaced by its training reference (the mean of the
//! training rows): occlusion against a fixed baseline. It needs one extra
//! forward pass per group over the explained rows only, is deterministic,
//! and a test can recompute it from the model without this code.

use serde::{Deserialize, Serialize};

use crate::features::FeatureSpec;
use crate::payment::Payment;

/// What to do with a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Review,
    Block,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Review => "review",
            Self::Block => "block",
        }
    }
}

/// A band's lower edge and what validation data said about it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BandEdge {
    /// P(fraud) at or above which the band starts.
    pub threshold: f64,
    /// Validation precision and recall of flagging everything at or above it.
    pub precision: f64,
    pub recall: f64,
}

/// The two thresholds that cut scores into decisions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecisionBands {
    /// At or above: review (below: allow).
    pub review: BandEdge,
    /// At or above: block. Never below `review`.
    pub block: BandEdge,
    /// The validation recall the review edge was chosen to reach.
    pub review_recall_target: f64,
    /// The validation precision the block edge was chosen to reach.
    pub block_precision_target: f64,
}

/// Default target of `--review-recall`.
pub const DEFAULT_REVIEW_RECALL: f64 = 0.95;
/// Default target of `--block-precision`.
pub const DEFAULT_BLOCK_PRECISION: f64 = 0.95;

impl DecisionBands {
    /// The one place where a probability becomes a decision.
    pub fn decide(&self, p_fraud: f64) -> Decision {
        if p_fraud >= self.block.threshold {
            Decision::Block
        } else if p_fraud >= self.review.threshold {
            Decision::Review
        } else {
            Decision::Allow
        }
    }

    /// Bands for a model published before they existed: review and block
    /// both start at its threshold, so the decision says what `isFraud` says.
    pub fn at_threshold(threshold: f64) -> Self {
        let edge = BandEdge { threshold, precision: f64::NAN, recall: f64::NAN };
        Self { review: edge, block: edge, review_recall_target: f64::NAN, block_precision_target: f64::NAN }
    }

    /// Both thresholds are probabilities and block does not start below review.
    pub fn check(&self) -> Result<(), String> {
        let (review, block) = (self.review.threshold, self.block.threshold);
        if !(0.0..=1.0).contains(&review) || !(0.0..=1.0).contains(&block) {
            return Err(format!("decision bands {review} / {block} are not probabilities in [0, 1]"));
        }
        if block < review {
            return Err(format!("the block threshold {block} lies below the review threshold {review}"));
        }
        Ok(())
    }
}

/// Why a payment scored as it did: one feature group's share of P(fraud).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// The feature group (`amount`, `category`, `age`, `gender`).
    pub feature: String,
    /// The payment's value of it (`es_travel`, `4`, `1523.40`).
    pub value: String,
    /// P(fraud) minus P(fraud) with this group at its training reference:
    /// positive when this value raised the score.
    pub contribution: f64,
}

/// Reasons given per explained payment, most fraud-raising first.
pub const MAX_REASONS: usize = 3;

/// Appends to `out` one row per feature group: `row` with that group's
/// columns replaced by `reference`'s.
pub fn occluded_rows(spec: &FeatureSpec, row: &[f32], reference: &[f32], out: &mut Vec<f32>) {
    for &group in spec.groups() {
        let start = out.len();
        out.extend_from_slice(row);
        let columns = spec.columns(group);
        out[start + columns.start..start + columns.end].copy_from_slice(&reference[columns]);
    }
}

/// The reasons for `payment` scored `p_fraud`, given the scores of its
/// `occluded_rows` of its encoded `row` (one per group of `spec`, in order).
pub fn reasons(spec: &FeatureSpec, payment: &Payment, row: &[f32], p_fraud: f32, occluded: &[f32]) -> Vec<Reason> {
    let mut reasons: Vec<Reason> = spec
        .groups()
        .iter()
        .zip(occluded)
        .map(|(group, without)| Reason {
            feature: group.name().to_string(),
            value: group.value(spec, payment, row),
            contribution: f64::from(p_fraud) - f64::from(*without),
        })
        .collect();
    // Deterministic: by contribution, ties in group order (a stable sort).
    reasons.sort_by(|a, b| b.contribution.total_cmp(&a.contribution));
    reasons.truncate(MAX_REASONS);
    reasons
}

/// The training reference of every column: the mean of the training rows.
pub fn feature_reference(rows: &[f32], width: usize) -> Vec<f32> {
    let n = rows.len() / width.max(1);
    let mut sums = vec![0f64; width];
    for row in rows.chunks_exact(width) {
        for (sum, x) in sums.iter_mut().zip(row) {
            *sum += f64::from(*x);
        }
    }
    sums.into_iter().map(|s| if n == 0 { 0.0 } else { (s / n as f64) as f32 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bands(review: f64, block: f64) -> DecisionBands {
        DecisionBands {
            review: BandEdge { threshold: review, precision: 0.3, recall: 0.95 },
            block: BandEdge { threshold: block, precision: 0.95, recall: 0.4 },
            review_recall_target: 0.95,
            block_precision_target: 0.95,
        }
    }

    #[test]
    fn bands_cut_at_their_lower_edges() {
        let b = bands(0.2, 0.8);
        assert_eq!(b.decide(0.0), Decision::Allow);
        assert_eq!(b.decide(0.199), Decision::Allow);
        assert_eq!(b.decide(0.2), Decision::Review);
        assert_eq!(b.decide(0.799), Decision::Review);
        assert_eq!(b.decide(0.8), Decision::Block);
        assert_eq!(b.decide(1.0), Decision::Block);
        let old = DecisionBands::at_threshold(0.5);
        assert_eq!((old.decide(0.49), old.decide(0.5)), (Decision::Allow, Decision::Block));
        assert!(b.check().is_ok());
        assert!(bands(0.8, 0.2).check().is_err());
        assert!(bands(0.2, 1.5).check().is_err());
    }

    use crate::features::FeatureGroup;

    #[test]
    fn occluded_rows_replace_one_group_each() {
        let spec = FeatureSpec::demo();
        let row: Vec<f32> = (0..28).map(|i| i as f32).collect();
        let reference = vec![-1.0; 28];
        let mut out = Vec::new();
        occluded_rows(&spec, &row, &reference, &mut out);
        assert_eq!(out.len(), 4 * 28);
        for (g, group) in FeatureGroup::ALL.iter().enumerate() {
            let r = &out[g * 28..(g + 1) * 28];
            for (i, x) in r.iter().enumerate() {
                let want = if spec.columns(*group).contains(&i) { -1.0 } else { i as f32 };
                assert_eq!(*x, want, "group {group:?} column {i}");
            }
        }
    }

    #[test]
    fn reasons_are_differences_sorted_and_cut() {
        let payment = crate::Simulator::new(1, 1).next().unwrap();
        let spec = FeatureSpec::demo();
        let row = crate::FeatureEncoder::new(spec.clone()).encode(&payment).unwrap();
        let r = reasons(&spec, &payment, &row, 0.9, &[0.5, 0.95, 0.8, 0.9]);
        let got: Vec<(&str, f64)> =
            r.iter().map(|r| (r.feature.as_str(), (r.contribution * 1e6).round() / 1e6)).collect();
        assert_eq!(got, vec![("amount", 0.4), ("age", 0.1), ("gender", 0.0)]);
        assert_eq!(r[0].value, format!("{:.2}", payment.amount));
    }

    #[test]
    fn the_reference_is_the_column_mean() {
        assert_eq!(feature_reference(&[0.0, 1.0, 1.0, 0.0, 0.5, 1.0], 2), vec![0.5, 2.0 / 3.0]);
    }
}
