//! The one feature encoder that the trainer and the scorer share, so training
//! and serving cannot drift apart.
//!
//! Layout (the original demo's 28 features, in its order):
//! `[amount_scaled, 15 category one-hots (sorted), 8 age one-hots ('0'..'6','U'),
//! 4 gender one-hots ('E','F','M','U')]`, with
//! `amount_scaled = (amount - amount_min) / (amount_max - amount_min)`.
//! The `FeatureSpec` travels inside each model's manifest.
//!
//! The amount range is fixed by default to the original demo's, 0 to
//! 8,329.96 (`FeatureSpec::demo`; larger amounts clip to 1), so feature 0
//! means the same in every version and clients that pre-encode features the
//! way the original demo does stay right across hot swaps. A trainer run with
//! `--amount-scale fit` scales by its training data's range instead (no clip).
//!
//! Features come in groups (`FeatureGroup`): the amount, and each one-hot
//! block. Reason codes are given per group.
//!
//! A second feature set (`FeatureSet::History`, chosen by the trainer) appends
//! the customer's history (`history::CUSTOMER_FEATURES`, computed from the
//! customer's earlier payments by `history`) and the merchant's smoothed fraud
//! rate from the training window (`HistorySpec::merchant_rates`). Its spec
//! records which definition it was trained with (`HistorySpec::version`).

use serde::{Deserialize, Serialize};

use crate::history::{CustomerFeatures, MerchantRates, CUSTOMER_FEATURES, CUSTOMER_WIDTH};
use crate::payment::Payment;

/// Features per payment: the serving signature's input width.
pub const FEATURE_WIDTH: usize = 1 + CATEGORIES.len() + AGES.len() + GENDERS.len();

/// The 15 BankSim categories, sorted: the order of the one-hot block.
pub const CATEGORIES: [&str; 15] = [
    "es_barsandrestaurants",
    "es_contents",
    "es_fashion",
    "es_food",
    "es_health",
    "es_home",
    "es_hotelservices",
    "es_hyper",
    "es_leisure",
    "es_otherservices",
    "es_sportsandtoys",
    "es_tech",
    "es_transportation",
    "es_travel",
    "es_wellnessandbeauty",
];
/// Age bands in one-hot order.
pub const AGES: [&str; 8] = ["0", "1", "2", "3", "4", "5", "6", "U"];
/// Genders in one-hot order.
pub const GENDERS: [&str; 4] = ["E", "F", "M", "U"];

/// The original demo's amount range: its largest BankSim amount.
pub const DEMO_AMOUNT_MAX: f64 = 8329.96;

/// What a model was trained with: vocabularies and the amount range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    pub categories: Vec<String>,
    pub ages: Vec<String>,
    pub genders: Vec<String>,
    pub amount_min: f64,
    pub amount_max: f64,
    /// Whether amounts above `amount_max` encode as 1 (the fixed scale) or
    /// beyond it (a range fitted to training data; manifests before the
    /// fixed scale have no such field and did not clip).
    #[serde(default)]
    pub amount_clip: bool,
    /// The history features after the 28 (`FeatureSet::History`); absent in
    /// the default set, whose manifests stay as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,
}

/// What the history feature set adds: the customer features of
/// `history` (definition `version`) and the merchant's fraud rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistorySpec {
    /// The definition of the customer features (`HISTORY_VERSION` today); a
    /// scorer refuses a version it does not compute.
    pub version: u32,
    pub merchant_rates: MerchantRates,
}

/// The definition of the customer features this build computes.
pub const HISTORY_VERSION: u32 = 1;
/// Columns the history feature set adds: the customer features and the merchant's rate.
pub const HISTORY_WIDTH: usize = CUSTOMER_WIDTH + 1;

/// Which features a trainer builds a model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSet {
    /// The original demo's 28 features of the payment alone (the TF Serving contract).
    Payment,
    /// The 28, then the customer's history and the merchant's fraud rate.
    History,
}

impl crate::choice::Choice for FeatureSet {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Payment, "payment", "the original demo's 28 features of the payment alone"),
        (
            Self::History,
            "history",
            "the 28, then the customer's last 1/7/30 days and the merchant's fraud rate (39 features)",
        ),
    ];
}

/// How the trainer sets the amount range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmountScale {
    /// The original demo's range, 0 to 8,329.96; larger amounts clip to 1.
    Fixed,
    /// The training data's range (no clip): feature 0 means something else in every version.
    Fit,
}

impl crate::choice::Choice for AmountScale {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Fixed, "fixed", "0 to 8329.96, as the original demo; larger amounts clip to 1"),
        (Self::Fit, "fit", "the training data's min and max (feature 0 changes meaning between versions)"),
    ];
}

/// A block of features that together describe one attribute of a payment:
/// what reason codes are given for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureGroup {
    Amount,
    Category,
    Age,
    Gender,
}

impl FeatureGroup {
    /// Every group, in feature order.
    pub const ALL: [FeatureGroup; 4] = [Self::Amount, Self::Category, Self::Age, Self::Gender];

    /// The name reasons carry.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amount => "amount",
            Self::Category => "category",
            Self::Age => "age",
            Self::Gender => "gender",
        }
    }

    /// The payment's value of this group, as reasons show it.
    pub fn value(self, payment: &Payment) -> String {
        match self {
            Self::Amount => format!("{:.2}", payment.amount),
            Self::Category => payment.category.clone(),
            Self::Age => payment.age.clone(),
            Self::Gender => payment.gender.clone(),
        }
    }
}

impl FeatureSpec {
    /// The BankSim vocabularies with the given amount range (not clipped).
    pub fn banksim(amount_min: f64, amount_max: f64) -> Self {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            categories: owned(&CATEGORIES),
            ages: owned(&AGES),
            genders: owned(&GENDERS),
            amount_min,
            amount_max,
            amount_clip: false,
            history: None,
        }
    }

    /// The default: BankSim vocabularies, the original demo's fixed amount
    /// range, larger amounts clipped to 1.
    pub fn demo() -> Self {
        Self { amount_clip: true, ..Self::banksim(0.0, DEMO_AMOUNT_MAX) }
    }

    /// The spec a trainer uses for `scale` on its training `payments`.
    pub fn for_training<'a>(scale: AmountScale, payments: impl IntoIterator<Item = &'a Payment>) -> Self {
        match scale {
            AmountScale::Fixed => Self::demo(),
            AmountScale::Fit => Self::fit(payments),
        }
    }

    /// The features of `group`: a range of column indices.
    pub fn columns(&self, group: FeatureGroup) -> std::ops::Range<usize> {
        let (c, a, g) = (self.categories.len(), self.ages.len(), self.genders.len());
        match group {
            FeatureGroup::Amount => 0..1,
            FeatureGroup::Category => 1..1 + c,
            FeatureGroup::Age => 1 + c..1 + c + a,
            FeatureGroup::Gender => 1 + c + a..1 + c + a + g,
        }
    }

    /// Every feature's name, in column order (`amount_scaled`, `category=es_food`, ...).
    pub fn feature_names(&self) -> Vec<String> {
        let mut names = vec!["amount_scaled".to_string()];
        for (group, vocab) in [
            (FeatureGroup::Category, &self.categories),
            (FeatureGroup::Age, &self.ages),
            (FeatureGroup::Gender, &self.genders),
        ] {
            names.extend(vocab.iter().map(|v| format!("{}={v}", group.name())));
        }
        if self.history.is_some() {
            names.extend(CUSTOMER_FEATURES.iter().map(|n| n.to_string()));
            names.push("merchant_fraud_rate".to_string());
        }
        names
    }

    /// The BankSim vocabularies with the amount range of `payments` (the training data).
    pub fn fit<'a>(payments: impl IntoIterator<Item = &'a Payment>) -> Self {
        let (min, max) = payments
            .into_iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.amount), hi.max(p.amount)));
        if min.is_finite() {
            Self::banksim(min, max)
        } else {
            Self::banksim(0.0, 1.0)
        }
    }

    /// Number of features a payment encodes to.
    pub fn width(&self) -> usize {
        let history = if self.history.is_some() { HISTORY_WIDTH } else { 0 };
        1 + self.categories.len() + self.ages.len() + self.genders.len() + history
    }

    /// This spec with the history features, merchant rates learned from `train`.
    pub fn with_history<'a>(self, train: impl IntoIterator<Item = &'a Payment>) -> Self {
        let merchant_rates = MerchantRates::fit(train, crate::history::DEFAULT_PRIOR);
        Self { history: Some(HistorySpec { version: HISTORY_VERSION, merchant_rates }), ..self }
    }
}

/// Why a payment cannot be encoded; the scorer dead-letters it with this text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("payment {payment_id:?}: unknown {field} {value:?} (known: {known})")]
    UnknownValue { payment_id: String, field: &'static str, value: String, known: String },
    #[error(transparent)]
    Invalid(#[from] crate::payment::InvalidPayment),
    #[error(
        "payment {payment_id:?}: amount {amount} scales to {value} as a model feature (a 32-bit float), \
         which the model cannot score; amounts must stay below about 3.4e38"
    )]
    NonFiniteFeature { payment_id: String, amount: f64, value: f32 },
    #[error(
        "payment {payment_id:?}: the model's features include the customer's history, and none was given \
         (score it through the scoring service, which keeps the history, or encode with `encode_all`)"
    )]
    MissingHistory { payment_id: String },
}

/// Encodes payments into feature rows according to a `FeatureSpec`.
#[derive(Debug, Clone)]
pub struct FeatureEncoder {
    spec: FeatureSpec,
    amount_scale: f64,
    /// The history spec's merchant rates as the model sees them, hashed.
    rates: Option<RateTable>,
}

/// `MerchantRates::rate` as f32, looked up by hash instead of by tree.
#[derive(Debug, Clone)]
struct RateTable {
    merchants: foldhash::HashMap<String, f32>,
    categories: foldhash::HashMap<String, f32>,
    overall: f32,
}

impl RateTable {
    fn new(rates: &MerchantRates) -> Self {
        let table =
            |m: &std::collections::BTreeMap<String, f64>| m.iter().map(|(k, v)| (k.clone(), *v as f32)).collect();
        Self { merchants: table(&rates.merchants), categories: table(&rates.categories), overall: rates.overall as f32 }
    }

    fn rate(&self, merchant: &str, category: &str) -> f32 {
        self.merchants.get(merchant).or_else(|| self.categories.get(category)).copied().unwrap_or(self.overall)
    }
}

impl FeatureEncoder {
    pub fn new(spec: FeatureSpec) -> Self {
        let range = spec.amount_max - spec.amount_min;
        let amount_scale = if range > 0.0 { 1.0 / range } else { 1.0 };
        let rates = spec.history.as_ref().map(|h| RateTable::new(&h.merchant_rates));
        Self { spec, amount_scale, rates }
    }

    pub fn width(&self) -> usize {
        self.spec.width()
    }

    pub fn spec(&self) -> &FeatureSpec {
        &self.spec
    }

    /// Whether rows need the customer's history (`encode_with`).
    pub fn needs_history(&self) -> bool {
        self.spec.history.is_some()
    }

    /// Whether `payment` encodes (what the stream scores, and so what counts
    /// as a customer's history), without writing a row.
    pub fn accepts(&self, payment: &Payment) -> bool {
        self.base(payment).is_ok()
    }

    /// The payment's one-hot positions (category, age, gender) and scaled
    /// amount, or why it cannot be encoded.
    fn base(&self, payment: &Payment) -> Result<([usize; 3], f32), EncodeError> {
        payment.validate()?;
        let lookup = |vocab: &[String], value: &str, field: &'static str| {
            vocab.iter().position(|v| v == value).ok_or_else(|| EncodeError::UnknownValue {
                payment_id: payment.payment_id.clone(),
                field,
                value: value.to_string(),
                known: vocab.join(","),
            })
        };
        let category = lookup(&self.spec.categories, &payment.category, "category")?;
        let age = lookup(&self.spec.ages, &payment.age, "age")?;
        let gender = lookup(&self.spec.genders, &payment.gender, "gender")?;
        let scaled = (payment.amount - self.spec.amount_min) * self.amount_scale;
        let amount = if self.spec.amount_clip { scaled.min(1.0) } else { scaled } as f32;
        // Finite in f64 is not enough: the cast to f32 overflows to inf, and
        // the model's NaN would then slip past `p >= threshold` unflagged.
        if !amount.is_finite() {
            return Err(EncodeError::NonFiniteFeature {
                payment_id: payment.payment_id.clone(),
                amount: payment.amount,
                value: amount,
            });
        }
        Ok(([category, age, gender], amount))
    }

    /// Writes the features of `payment` into `row` (length `width()`); for a
    /// spec with history features, see `encode_with`.
    pub fn encode_into(&self, payment: &Payment, row: &mut [f32]) -> Result<(), EncodeError> {
        self.encode_with(payment, None, row)
    }

    /// Writes the features of `payment`, with the customer's `history` where
    /// the spec has history features (ignored where it has not).
    pub fn encode_with(
        &self,
        payment: &Payment,
        history: Option<&CustomerFeatures>,
        row: &mut [f32],
    ) -> Result<(), EncodeError> {
        assert_eq!(row.len(), self.width(), "feature row has the wrong width");
        let ([category, age, gender], amount) = self.base(payment)?;
        row.fill(0.0);
        row[0] = amount;
        let mut offset = 1;
        row[offset + category] = 1.0;
        offset += self.spec.categories.len();
        row[offset + age] = 1.0;
        offset += self.spec.ages.len();
        row[offset + gender] = 1.0;
        offset += self.spec.genders.len();
        if let Some(rates) = &self.rates {
            let history =
                history.ok_or_else(|| EncodeError::MissingHistory { payment_id: payment.payment_id.clone() })?;
            row[offset..offset + CUSTOMER_WIDTH].copy_from_slice(&history.0);
            row[offset + CUSTOMER_WIDTH] = rates.rate(&payment.merchant, &payment.category);
        }
        Ok(())
    }

    /// Encodes one payment into a new row.
    pub fn encode(&self, payment: &Payment) -> Result<Vec<f32>, EncodeError> {
        let mut row = vec![0.0; self.width()];
        self.encode_into(payment, &mut row)?;
        Ok(row)
    }

    /// Appends the rows of `payments` to `out` (row-major), for batch scoring
    /// and training. With history features, `payments` are their own
    /// history (`history::offline`): a whole stream, not a sample of one.
    pub fn encode_all(&self, payments: &[Payment], out: &mut Vec<f32>) -> Result<(), EncodeError> {
        let history = self.needs_history().then(|| crate::history::offline(payments));
        self.encode_all_with(payments, history.as_deref(), out)
    }

    /// Appends the rows of `payments`, the i-th with `history[i]` (where the
    /// spec has history features).
    pub fn encode_all_with(
        &self,
        payments: &[Payment],
        history: Option<&[CustomerFeatures]>,
        out: &mut Vec<f32>,
    ) -> Result<(), EncodeError> {
        let width = self.width();
        for (i, payment) in payments.iter().enumerate() {
            let start = out.len();
            out.resize(start + width, 0.0);
            if let Err(e) = self.encode_with(payment, history.map(|h| &h[i]), &mut out[start..]) {
                out.truncate(start);
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment(category: &str, age: &str, gender: &str, amount: f64) -> Payment {
        Payment {
            payment_id: "p1".into(),
            event_time: 0,
            step: 0,
            customer: "C1".into(),
            age: age.into(),
            gender: gender.into(),
            zipcode_ori: "28007".into(),
            merchant: "M1".into(),
            zip_merchant: "28007".into(),
            category: category.into(),
            amount,
            fraud: None,
        }
    }

    #[test]
    fn encodes_the_original_demo_example() {
        let encoder = FeatureEncoder::new(FeatureSpec::banksim(0.0, 8329.96));
        let row = encoder.encode(&payment("es_health", "3", "M", 44.26)).unwrap();
        assert_eq!(row.len(), 28);
        assert!((row[0] - 0.005313).abs() < 1e-6, "amount_scaled {}", row[0]);
        let ones: Vec<usize> = row.iter().enumerate().filter(|(_, v)| **v == 1.0).map(|(i, _)| i).collect();
        assert_eq!(ones, vec![5, 19, 26]);
        assert_eq!(row.iter().filter(|v| **v != 0.0).count(), 4);
    }

    #[test]
    fn vocabularies_are_sorted_and_complete() {
        let mut sorted = CATEGORIES;
        sorted.sort();
        assert_eq!(sorted, CATEGORIES);
        assert_eq!(FeatureSpec::banksim(0.0, 1.0).width(), 28);
    }

    #[test]
    fn unknown_values_are_errors_not_zero_rows() {
        let encoder = FeatureEncoder::new(FeatureSpec::banksim(0.0, 100.0));
        let err = encoder.encode(&payment("es_casino", "3", "M", 1.0)).unwrap_err();
        assert!(matches!(&err, EncodeError::UnknownValue { field: "category", .. }), "{err}");
        assert!(err.to_string().contains("es_casino"));
        assert!(encoder.encode(&payment("es_food", "9", "M", 1.0)).is_err());
        assert!(encoder.encode(&payment("es_food", "3", "X", 1.0)).is_err());
        assert!(matches!(encoder.encode(&payment("es_food", "3", "M", f64::NAN)), Err(EncodeError::Invalid(_))));
        assert!(matches!(encoder.encode(&payment("es_food", "3", "M", -3.0)), Err(EncodeError::Invalid(_))));
    }

    #[test]
    fn an_amount_beyond_f32_is_bad_input_not_a_nan_score() {
        let encoder = FeatureEncoder::new(FeatureSpec::banksim(0.0, 8329.96));
        // Finite as f64, infinite once scaled and cast to the model's f32.
        let err = encoder.encode(&payment("es_food", "3", "M", 1e43)).unwrap_err();
        assert!(matches!(err, EncodeError::NonFiniteFeature { value, .. } if value.is_infinite()), "{err}");
        assert!(encoder.encode(&payment("es_food", "3", "M", 1e30)).is_ok(), "large but representable");
    }

    #[test]
    fn the_demo_scale_is_fixed_and_clips() {
        let encoder = FeatureEncoder::new(FeatureSpec::demo());
        assert_eq!(encoder.encode(&payment("es_food", "3", "M", 8329.96)).unwrap()[0], 1.0);
        assert_eq!(encoder.encode(&payment("es_food", "3", "M", 20_000.0)).unwrap()[0], 1.0, "clipped");
        assert_eq!(encoder.encode(&payment("es_food", "3", "M", 1e43)).unwrap()[0], 1.0, "clipped, not infinite");
        let row = encoder.encode(&payment("es_health", "3", "M", 44.26)).unwrap();
        assert!((row[0] - 0.005313).abs() < 1e-6, "the original demo's encoding: {}", row[0]);
        // A spec from before the fixed scale reads as not clipping.
        let old: FeatureSpec =
            serde_json::from_str(r#"{"categories":[],"ages":[],"genders":[],"amount_min":0.0,"amount_max":10.0}"#)
                .unwrap();
        assert!(!old.amount_clip);
    }

    #[test]
    fn groups_cover_every_column_once_in_order() {
        let spec = FeatureSpec::demo();
        let names = spec.feature_names();
        assert_eq!(names.len(), spec.width());
        let mut next = 0;
        for group in FeatureGroup::ALL {
            let columns = spec.columns(group);
            assert_eq!(columns.start, next, "{group:?}");
            next = columns.end;
        }
        assert_eq!(next, spec.width());
        assert_eq!(
            (names[0].as_str(), names[1].as_str(), names[27].as_str()),
            ("amount_scaled", "category=es_barsandrestaurants", "gender=U")
        );
        let p = payment("es_food", "3", "M", 12.5);
        assert_eq!(FeatureGroup::ALL.map(|g| g.value(&p)), ["12.50", "es_food", "3", "M"].map(String::from));
    }

    #[test]
    fn fit_takes_min_and_max_and_spec_round_trips_as_json() {
        let rows = [payment("es_food", "1", "F", 3.0), payment("es_food", "1", "F", 11.0)];
        let spec = FeatureSpec::fit(&rows);
        assert_eq!((spec.amount_min, spec.amount_max), (3.0, 11.0));
        let back: FeatureSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        let mut out = Vec::new();
        FeatureEncoder::new(spec).encode_all(&rows, &mut out).unwrap();
        assert_eq!(out.len(), 56);
        assert_eq!((out[0], out[28]), (0.0, 1.0));
    }

    #[test]
    fn the_history_set_appends_customer_features_and_the_merchant_rate() {
        let mut train = vec![payment("es_food", "3", "M", 10.0), payment("es_food", "3", "M", 30.0)];
        train[0].fraud = Some(true);
        train[1].fraud = Some(false);
        let spec = FeatureSpec::demo().with_history(&train);
        assert_eq!(spec.width(), 28 + HISTORY_WIDTH);
        assert_eq!(spec.feature_names().len(), spec.width());
        assert_eq!(spec.feature_names()[38], "merchant_fraud_rate");
        let back: FeatureSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        let encoder = FeatureEncoder::new(spec.clone());
        let p = payment("es_food", "3", "M", 20.0);
        assert!(matches!(encoder.encode(&p), Err(EncodeError::MissingHistory { .. })));
        let history = crate::history::CustomerFeatures([0.5; CUSTOMER_WIDTH]);
        let mut row = vec![0.0; encoder.width()];
        encoder.encode_with(&p, Some(&history), &mut row).unwrap();
        assert_eq!(&row[28..38], &[0.5; CUSTOMER_WIDTH]);
        let rate = spec.history.as_ref().unwrap().merchant_rates.rate("M1", "es_food");
        assert_eq!(row[38], rate as f32);
        // The base set ignores history, and its manifests do not mention it.
        let base = FeatureEncoder::new(FeatureSpec::demo());
        let mut row28 = vec![0.0; 28];
        base.encode_with(&p, Some(&history), &mut row28).unwrap();
        assert_eq!(&row28[..], &row[..28]);
        assert!(!serde_json::to_string(&FeatureSpec::demo()).unwrap().contains("history"));
    }
}
