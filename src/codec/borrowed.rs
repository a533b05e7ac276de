//! The records as views of the bytes they were read from: every string a
//! slice of the record, nothing allocated.
//!
//! Why: the monitor reads two records per join and keeps a few fields of
//! each; decoding them into owned `ScoredPayment`s and `PaymentLabel`s was
//! a dozen allocations and frees per join. The Avro reader walks a body
//! once, into these views; the owned types are made from them
//! (`into_owned`), so there is one walk per schema, and a view is valid
//! exactly when the owned decode is.

use crate::decision::{Decision, Reason};
use crate::payment::{Payment, PaymentLabel, ScoredPayment, ShadowScore};

/// A `Payment` borrowed from its record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaymentRef<'a> {
    pub payment_id: &'a str,
    pub event_time: i64,
    pub step: i32,
    pub customer: &'a str,
    pub age: &'a str,
    pub gender: &'a str,
    pub zipcode_ori: &'a str,
    pub merchant: &'a str,
    pub zip_merchant: &'a str,
    pub category: &'a str,
    pub amount: f64,
    pub fraud: Option<bool>,
}

/// A `ScoredPayment` borrowed from its record (reasons, rare, are owned).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredRef<'a> {
    pub payment: PaymentRef<'a>,
    pub fraud_probability: f64,
    pub is_fraud: bool,
    pub threshold: f64,
    pub model_name: &'a str,
    pub model_version: &'a str,
    pub scored_at: i64,
    pub decision: Option<Decision>,
    pub reasons: Vec<Reason>,
    pub shadow: Option<ShadowRef<'a>>,
}

/// A `ShadowScore` borrowed from its record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShadowRef<'a> {
    pub model_version: &'a str,
    pub fraud_probability: f64,
    pub is_fraud: bool,
    pub decision: Decision,
}

/// A `PaymentLabel` borrowed from its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelRef<'a> {
    pub payment_id: &'a str,
    pub customer: &'a str,
    pub fraud: bool,
    pub labelled_at: i64,
    pub source: &'a str,
}

impl PaymentRef<'_> {
    pub fn into_owned(self) -> Payment {
        Payment {
            payment_id: self.payment_id.into(),
            event_time: self.event_time,
            step: self.step,
            customer: self.customer.into(),
            age: self.age.into(),
            gender: self.gender.into(),
            zipcode_ori: self.zipcode_ori.into(),
            merchant: self.merchant.into(),
            zip_merchant: self.zip_merchant.into(),
            category: self.category.into(),
            amount: self.amount,
            fraud: self.fraud,
        }
    }
}

impl ScoredRef<'_> {
    pub fn into_owned(self) -> ScoredPayment {
        ScoredPayment {
            payment: self.payment.into_owned(),
            fraud_probability: self.fraud_probability,
            is_fraud: self.is_fraud,
            threshold: self.threshold,
            model_name: self.model_name.into(),
            model_version: self.model_version.into(),
            scored_at: self.scored_at,
            decision: self.decision,
            reasons: self.reasons,
            shadow: self.shadow.map(|s| ShadowScore {
                model_version: s.model_version.into(),
                fraud_probability: s.fraud_probability,
                is_fraud: s.is_fraud,
                decision: s.decision,
            }),
        }
    }
}

impl LabelRef<'_> {
    pub fn into_owned(self) -> PaymentLabel {
        PaymentLabel {
            payment_id: self.payment_id.into(),
            customer: self.customer.into(),
            fraud: self.fraud,
            labelled_at: self.labelled_at,
            source: self.source.into(),
        }
    }
}

impl Payment {
    pub fn as_ref(&self) -> PaymentRef<'_> {
        PaymentRef {
            payment_id: &self.payment_id,
            event_time: self.event_time,
            step: self.step,
            customer: &self.customer,
            age: &self.age,
            gender: &self.gender,
            zipcode_ori: &self.zipcode_ori,
            merchant: &self.merchant,
            zip_merchant: &self.zip_merchant,
            category: &self.category,
            amount: self.amount,
            fraud: self.fraud,
        }
    }
}

impl ScoredPayment {
    pub fn as_ref(&self) -> ScoredRef<'_> {
        ScoredRef {
            payment: self.payment.as_ref(),
            fraud_probability: self.fraud_probability,
            is_fraud: self.is_fraud,
            threshold: self.threshold,
            model_name: &self.model_name,
            model_version: &self.model_version,
            scored_at: self.scored_at,
            decision: self.decision,
            reasons: self.reasons.clone(),
            shadow: self.shadow.as_ref().map(|s| ShadowRef {
                model_version: &s.model_version,
                fraud_probability: s.fraud_probability,
                is_fraud: s.is_fraud,
                decision: s.decision,
            }),
        }
    }
}

impl PaymentLabel {
    pub fn as_ref(&self) -> LabelRef<'_> {
        LabelRef {
            payment_id: &self.payment_id,
            customer: &self.customer,
            fraud: self.fraud,
            labelled_at: self.labelled_at,
            source: &self.source,
        }
    }
}
