//! Avro binary encoding of `Payment`, `ScoredPayment` and `PaymentLabel`,
//! written out by hand for the compiled-in schemas (what an Avro code generator emits).
//!
//! Why not apache-avro's serde path on the hot path: it resolves every field
//! by name and allocates per value, which cost ~1.3 us per scored event,
//! a quarter of the scorer's CPU. This module is a straight walk over the
//! fields in schema order. apache-avro stays the reference: the tests check
//! that the field layout below is the one in `schemas/`, and that both
//! implementations write identical bytes and read each other's output.
//!
//! Decoding never panics and never trusts a length: every read is bounds-
//! checked, and errors name the field so a dead letter says what was wrong.

use super::borrowed::{LabelRef, PaymentRef, ScoredRef, ShadowRef};
use crate::decision::{Decision, Reason};
use crate::payment::{Payment, PaymentLabel, ScoredPayment};

/// Why an Avro body could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AvroError {
    #[error("field `{field}`: the body ends early")]
    Truncated { field: &'static str },
    #[error("field `{field}`: variable-length integer longer than 10 bytes")]
    VarintOverflow { field: &'static str },
    #[error("field `{field}`: {value} does not fit in an Avro int")]
    IntOverflow { field: &'static str, value: i64 },
    #[error("field `{field}`: string length {length} is negative")]
    NegativeLength { field: &'static str, length: i64 },
    #[error("field `{field}`: string is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("field `{field}`: boolean byte is {byte:#04x}, not 0 or 1")]
    InvalidBoolean { field: &'static str, byte: u8 },
    #[error("field `{field}`: union branch {index} does not exist (0 = null, 1 = the value)")]
    InvalidUnionBranch { field: &'static str, index: i64 },
    #[error("field `{field}`: enum symbol {index} does not exist (0 = allow, 1 = review, 2 = block)")]
    InvalidEnumSymbol { field: &'static str, index: i64 },
    #[error("field `{field}`: array block of {count} items is more than the body can hold")]
    ArrayTooLong { field: &'static str, count: i64 },
}

/// The fields of `schemas/payment.avsc`, in order, as this module reads and
/// writes them (checked against the schema file by a test).
#[cfg(test)]
pub const PAYMENT_FIELDS: [(&str, &str); 12] = [
    ("paymentId", "string"),
    ("eventTime", "long"),
    ("step", "int"),
    ("customer", "string"),
    ("age", "string"),
    ("gender", "string"),
    ("zipcodeOri", "string"),
    ("merchant", "string"),
    ("zipMerchant", "string"),
    ("category", "string"),
    ("amount", "double"),
    ("fraud", "[null, boolean]"),
];

/// The fields of `schemas/scored_payment.avsc`, in order.
#[cfg(test)]
pub const SCORED_PAYMENT_FIELDS: [(&str, &str); 10] = [
    ("payment", "Payment"),
    ("fraudProbability", "double"),
    ("isFraud", "boolean"),
    ("threshold", "double"),
    ("modelName", "string"),
    ("modelVersion", "string"),
    ("scoredAt", "long"),
    ("decision", "[null, Decision]"),
    ("reasons", "[Reason]"),
    ("shadow", "[null, ShadowScore]"),
];

/// The fields of `schemas/payment_label.avsc`, in order.
#[cfg(test)]
pub const PAYMENT_LABEL_FIELDS: [(&str, &str); 5] = [
    ("paymentId", "string"),
    ("customer", "string"),
    ("fraud", "boolean"),
    ("labelledAt", "long"),
    ("source", "string"),
];

/// `Decision`'s symbols in schema order.
const DECISIONS: [Decision; 3] = [Decision::Allow, Decision::Review, Decision::Block];

fn decision_symbol(decision: Decision) -> i64 {
    DECISIONS.iter().position(|d| *d == decision).expect("every decision has a symbol") as i64
}

/// Appends a `Payment` body.
pub fn write_payment(out: &mut Vec<u8>, p: &Payment) {
    write_string(out, &p.payment_id);
    write_long(out, p.event_time);
    write_long(out, i64::from(p.step));
    write_string(out, &p.customer);
    write_string(out, &p.age);
    write_string(out, &p.gender);
    write_string(out, &p.zipcode_ori);
    write_string(out, &p.merchant);
    write_string(out, &p.zip_merchant);
    write_string(out, &p.category);
    write_double(out, p.amount);
    match p.fraud {
        None => write_long(out, 0),
        Some(fraud) => {
            write_long(out, 1);
            write_boolean(out, fraud);
        }
    }
}

/// Appends a `ScoredPayment` body.
pub fn write_scored_payment(out: &mut Vec<u8>, s: &ScoredPayment) {
    write_payment(out, &s.payment);
    write_double(out, s.fraud_probability);
    write_boolean(out, s.is_fraud);
    write_double(out, s.threshold);
    write_string(out, &s.model_name);
    write_string(out, &s.model_version);
    write_long(out, s.scored_at);
    match s.decision {
        None => write_long(out, 0),
        Some(decision) => {
            write_long(out, 1);
            write_long(out, decision_symbol(decision));
        }
    }
    // One block of every item, then the empty block that ends the array.
    if !s.reasons.is_empty() {
        write_long(out, s.reasons.len() as i64);
        for reason in &s.reasons {
            write_string(out, &reason.feature);
            write_string(out, &reason.value);
            write_double(out, reason.contribution);
        }
    }
    write_long(out, 0);
    match &s.shadow {
        None => write_long(out, 0),
        Some(shadow) => {
            write_long(out, 1);
            write_string(out, &shadow.model_version);
            write_double(out, shadow.fraud_probability);
            write_boolean(out, shadow.is_fraud);
            write_long(out, decision_symbol(shadow.decision));
        }
    }
}

/// Reads a `Payment` body from the front of `input`, advancing it.
pub fn read_payment(input: &mut &[u8]) -> Result<Payment, AvroError> {
    read_payment_ref(input).map(PaymentRef::into_owned)
}

/// A `Payment` body read from the front of `input` without copying it.
pub fn read_payment_ref<'b>(input: &mut &'b [u8]) -> Result<PaymentRef<'b>, AvroError> {
    let mut r = Reader(input);
    Ok(PaymentRef {
        payment_id: r.str("paymentId")?,
        event_time: r.long("eventTime")?,
        step: r.int("step")?,
        customer: r.str("customer")?,
        age: r.str("age")?,
        gender: r.str("gender")?,
        zipcode_ori: r.str("zipcodeOri")?,
        merchant: r.str("merchant")?,
        zip_merchant: r.str("zipMerchant")?,
        category: r.str("category")?,
        amount: r.double("amount")?,
        fraud: match r.long("fraud")? {
            0 => None,
            1 => Some(r.boolean("fraud")?),
            index => return Err(AvroError::InvalidUnionBranch { field: "fraud", index }),
        },
    })
}

/// Reads a `ScoredPayment` body from the front of `input`, advancing it.
pub fn read_scored_payment(input: &mut &[u8]) -> Result<ScoredPayment, AvroError> {
    read_scored_ref(input).map(ScoredRef::into_owned)
}

/// A `ScoredPayment` body read from the front of `input` without copying
/// it. A body that ends after `scoredAt` was written with schema id 2
/// (before `decision` and `reasons`), one that ends after `reasons` with
/// schema id 3 (before `shadow`): they read with the missing fields'
/// defaults, as Avro's schema resolution would.
pub fn read_scored_ref<'b>(input: &mut &'b [u8]) -> Result<ScoredRef<'b>, AvroError> {
    let payment = read_payment_ref(input)?;
    let mut r = Reader(input);
    let mut scored = ScoredRef {
        payment,
        fraud_probability: r.double("fraudProbability")?,
        is_fraud: r.boolean("isFraud")?,
        threshold: r.double("threshold")?,
        model_name: r.str("modelName")?,
        model_version: r.str("modelVersion")?,
        scored_at: r.long("scoredAt")?,
        decision: None,
        reasons: Vec::new(),
        shadow: None,
    };
    if r.0.is_empty() {
        return Ok(scored);
    }
    scored.decision = match r.long("decision")? {
        0 => None,
        1 => Some(r.decision("decision")?),
        index => return Err(AvroError::InvalidUnionBranch { field: "decision", index }),
    };
    loop {
        let mut count = r.long("reasons")?;
        if count == 0 {
            break;
        }
        if count < 0 {
            // A negative count is followed by the block's size in bytes.
            count = count.checked_neg().ok_or(AvroError::ArrayTooLong { field: "reasons", count })?;
            r.long("reasons")?;
        }
        // Each item takes at least 10 bytes: never trust a count to allocate.
        if count > (r.0.len() / 10) as i64 {
            return Err(AvroError::ArrayTooLong { field: "reasons", count });
        }
        for _ in 0..count {
            scored.reasons.push(Reason {
                feature: r.str("reasons.feature")?.to_owned(),
                value: r.str("reasons.value")?.to_owned(),
                contribution: r.double("reasons.contribution")?,
            });
        }
    }
    if r.0.is_empty() {
        return Ok(scored);
    }
    scored.shadow = match r.long("shadow")? {
        0 => None,
        1 => Some(ShadowRef {
            model_version: r.str("shadow.modelVersion")?,
            fraud_probability: r.double("shadow.fraudProbability")?,
            is_fraud: r.boolean("shadow.isFraud")?,
            decision: r.decision("shadow.decision")?,
        }),
        index => return Err(AvroError::InvalidUnionBranch { field: "shadow", index }),
    };
    Ok(scored)
}

/// Where the `fraud` union of the payment that begins `body` (a `Payment`
/// or `ScoredPayment` body) starts, and how many bytes it takes: the walk
/// `read_payment` does, without reading anything into memory.
pub fn payment_fraud_span(body: &[u8]) -> Result<(usize, usize), AvroError> {
    let mut cursor = body;
    let mut r = Reader(&mut cursor);
    r.skip_string("paymentId")?;
    r.long("eventTime")?;
    r.int("step")?;
    for field in ["customer", "age", "gender", "zipcodeOri", "merchant", "zipMerchant", "category"] {
        r.skip_string(field)?;
    }
    r.double("amount")?;
    let start = body.len() - r.0.len();
    let length = match r.long("fraud")? {
        0 => 1,
        1 => {
            r.boolean("fraud")?;
            2
        }
        index => return Err(AvroError::InvalidUnionBranch { field: "fraud", index }),
    };
    Ok((start, length))
}

/// Appends a `PaymentLabel` body.
pub fn write_label(out: &mut Vec<u8>, l: &PaymentLabel) {
    write_string(out, &l.payment_id);
    write_string(out, &l.customer);
    write_boolean(out, l.fraud);
    write_long(out, l.labelled_at);
    write_string(out, &l.source);
}

/// Reads a `PaymentLabel` body from the front of `input`, advancing it.
pub fn read_label(input: &mut &[u8]) -> Result<PaymentLabel, AvroError> {
    read_label_ref(input).map(LabelRef::into_owned)
}

/// A `PaymentLabel` body read from the front of `input` without copying it.
pub fn read_label_ref<'b>(input: &mut &'b [u8]) -> Result<LabelRef<'b>, AvroError> {
    let mut r = Reader(input);
    Ok(LabelRef {
        payment_id: r.str("paymentId")?,
        customer: r.str("customer")?,
        fraud: r.boolean("fraud")?,
        labelled_at: r.long("labelledAt")?,
        source: r.str("source")?,
    })
}

/// Avro `long`/`int`: zig-zag, then base-128 varint, low group first.
fn write_long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn write_string(out: &mut Vec<u8>, value: &str) {
    write_long(out, value.len() as i64);
    out.extend_from_slice(value.as_bytes());
}

fn write_double(out: &mut Vec<u8>, value: f64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn write_boolean(out: &mut Vec<u8>, value: bool) {
    out.push(u8::from(value));
}

/// A cursor over an Avro body that borrows the caller's slice.
struct Reader<'a, 'b>(&'a mut &'b [u8]);

impl<'b> Reader<'_, 'b> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'b [u8], AvroError> {
        let rest: &'b [u8] = self.0;
        if rest.len() < n {
            return Err(AvroError::Truncated { field });
        }
        let (head, tail) = rest.split_at(n);
        *self.0 = tail;
        Ok(head)
    }

    fn long(&mut self, field: &'static str) -> Result<i64, AvroError> {
        let mut n: u64 = 0;
        for i in 0..10 {
            let byte = self.take(1, field)?[0];
            n |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok((n >> 1) as i64 ^ -((n & 1) as i64));
            }
        }
        Err(AvroError::VarintOverflow { field })
    }

    fn int(&mut self, field: &'static str) -> Result<i32, AvroError> {
        let value = self.long(field)?;
        i32::try_from(value).map_err(|_| AvroError::IntOverflow { field, value })
    }

    fn skip_string(&mut self, field: &'static str) -> Result<(), AvroError> {
        let length = self.long(field)?;
        let n = usize::try_from(length).map_err(|_| AvroError::NegativeLength { field, length })?;
        self.take(n, field).map(|_| ())
    }

    fn str(&mut self, field: &'static str) -> Result<&'b str, AvroError> {
        let length = self.long(field)?;
        let n = usize::try_from(length).map_err(|_| AvroError::NegativeLength { field, length })?;
        std::str::from_utf8(self.take(n, field)?).map_err(|_| AvroError::InvalidUtf8 { field })
    }

    fn double(&mut self, field: &'static str) -> Result<f64, AvroError> {
        let bytes = self.take(8, field)?;
        Ok(f64::from_le_bytes(bytes.try_into().expect("took 8 bytes")))
    }

    fn decision(&mut self, field: &'static str) -> Result<Decision, AvroError> {
        let index = self.long(field)?;
        let symbol = usize::try_from(index).ok().and_then(|i| DECISIONS.get(i));
        Ok(*symbol.ok_or(AvroError::InvalidEnumSymbol { field, index })?)
    }

    fn boolean(&mut self, field: &'static str) -> Result<bool, AvroError> {
        match self.take(1, field)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(AvroError::InvalidBoolean { field, byte }),
        }
    }
}

#[cfg(test)]
mod tests {
    //! apache-avro is the reference: same layout, same bytes, same values.

    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::writer::datum::GenericDatumWriter;
    use apache_avro::Schema;
    use proptest::prelude::*;

    use super::*;
    use crate::codec::{PAYMENT_LABEL_SCHEMA_JSON, PAYMENT_SCHEMA_JSON, SCORED_PAYMENT_SCHEMA_JSON};
    use crate::payment::ShadowScore;

    fn schema(json: &str) -> Schema {
        Schema::parse_str(json).expect("schema parses")
    }

    /// `(name, type)` of every field of a record schema, in the notation of `PAYMENT_FIELDS`.
    fn fields(schema: &Schema) -> Vec<(String, String)> {
        let Schema::Record(record) = schema else { panic!("not a record: {schema:?}") };
        let type_name = |s: &Schema| match s {
            Schema::String => "string".to_string(),
            Schema::Long | Schema::TimestampMillis => "long".to_string(),
            Schema::Int => "int".to_string(),
            Schema::Double => "double".to_string(),
            Schema::Boolean => "boolean".to_string(),
            Schema::Union(u) if u.variants() == [Schema::Null, Schema::Boolean] => "[null, boolean]".to_string(),
            Schema::Union(u) => match u.variants() {
                [Schema::Null, Schema::Enum(e)] => format!("[null, {}]", e.name.name()),
                [Schema::Null, Schema::Record(r)] => format!("[null, {}]", r.name.name()),
                other => format!("{other:?}"),
            },
            Schema::Array(a) => match a.items.as_ref() {
                Schema::Record(r) => format!("[{}]", r.name.name()),
                other => format!("{other:?}"),
            },
            Schema::Record(r) => r.name.name().to_string(),
            other => format!("{other:?}"),
        };
        record.fields.iter().map(|f| (f.name.clone(), type_name(&f.schema))).collect()
    }

    fn owned(layout: &[(&str, &str)]) -> Vec<(String, String)> {
        layout.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect()
    }

    #[test]
    fn field_layout_is_the_one_in_schemas() {
        assert_eq!(fields(&schema(PAYMENT_SCHEMA_JSON)), owned(&PAYMENT_FIELDS));
        assert_eq!(fields(&schema(SCORED_PAYMENT_SCHEMA_JSON)), owned(&SCORED_PAYMENT_FIELDS));
        assert_eq!(fields(&schema(PAYMENT_LABEL_SCHEMA_JSON)), owned(&PAYMENT_LABEL_FIELDS));
    }

    fn reference_write<T: serde::Serialize>(schema_json: &str, value: &T) -> Vec<u8> {
        let schema = schema(schema_json);
        let mut out = Vec::new();
        GenericDatumWriter::builder(&schema).build().unwrap().write_ser(&mut out, value).unwrap();
        out
    }

    fn reference_read<T: serde::de::DeserializeOwned>(schema_json: &str, mut bytes: &[u8]) -> Option<T> {
        let schema = schema(schema_json);
        let value = GenericDatumReader::builder(&schema).build().unwrap().read_deser(&mut bytes).ok()?;
        Some(value)
    }

    fn payments() -> impl Strategy<Value = Payment> {
        (
            (any::<String>(), any::<i64>(), any::<i32>(), any::<String>(), any::<String>(), any::<String>()),
            (any::<String>(), any::<String>(), any::<String>(), any::<String>(), -1e12f64..1e12, any::<Option<bool>>()),
        )
            .prop_map(|((payment_id, event_time, step, customer, age, gender), rest)| {
                let (zipcode_ori, merchant, zip_merchant, category, amount, fraud) = rest;
                Payment {
                    payment_id,
                    event_time,
                    step,
                    customer,
                    age,
                    gender,
                    zipcode_ori,
                    merchant,
                    zip_merchant,
                    category,
                    amount,
                    fraud,
                }
            })
    }

    fn reasons() -> impl Strategy<Value = Vec<Reason>> {
        proptest::collection::vec(
            (any::<String>(), any::<String>(), -1f64..1.0).prop_map(|(feature, value, contribution)| Reason {
                feature,
                value,
                contribution,
            }),
            0..4,
        )
    }

    fn decisions() -> impl Strategy<Value = Option<Decision>> {
        proptest::option::of(proptest::sample::select(DECISIONS.to_vec()))
    }

    fn shadows() -> impl Strategy<Value = Option<ShadowScore>> {
        proptest::option::of(
            (any::<String>(), 0f64..=1.0, any::<bool>(), proptest::sample::select(DECISIONS.to_vec())).prop_map(
                |(model_version, fraud_probability, is_fraud, decision)| ShadowScore {
                    model_version,
                    fraud_probability,
                    is_fraud,
                    decision,
                },
            ),
        )
    }

    fn scored_payments() -> impl Strategy<Value = ScoredPayment> {
        (
            (payments(), 0f64..=1.0, any::<bool>(), 0f64..=1.0),
            (any::<String>(), any::<String>(), any::<i64>(), decisions(), reasons(), shadows()),
        )
            .prop_map(|((payment, fraud_probability, is_fraud, threshold), rest)| {
                let (model_name, model_version, scored_at, decision, reasons, shadow) = rest;
                ScoredPayment {
                    payment,
                    fraud_probability,
                    is_fraud,
                    threshold,
                    model_name,
                    model_version,
                    scored_at,
                    decision,
                    reasons,
                    shadow,
                }
            })
    }

    /// Reads `bytes` written with `writer` as a reader holding `reader` does
    /// (Avro schema resolution, apache-avro's).
    fn resolve_read<T: serde::de::DeserializeOwned>(writer: &str, reader: &str, mut bytes: &[u8]) -> T {
        let (writer, reader) = (schema(writer), schema(reader));
        let value = GenericDatumReader::builder(&writer).reader_schema(&reader).build().unwrap().read_value(&mut bytes);
        apache_avro::from_value(&value.unwrap()).unwrap()
    }

    /// `ScoredPayment` as schema id 2 had it.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ScoredPaymentV2 {
        payment: Payment,
        fraud_probability: f64,
        is_fraud: bool,
        threshold: f64,
        model_name: String,
        model_version: String,
        scored_at: i64,
    }

    /// `ScoredPayment` as schema id 3 had it.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ScoredPaymentV3 {
        payment: Payment,
        fraud_probability: f64,
        is_fraud: bool,
        threshold: f64,
        model_name: String,
        model_version: String,
        scored_at: i64,
        decision: Option<Decision>,
        reasons: Vec<Reason>,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn payments_are_written_and_read_as_apache_avro_does(p in payments()) {
            let mut ours = Vec::new();
            write_payment(&mut ours, &p);
            prop_assert_eq!(&ours, &reference_write(PAYMENT_SCHEMA_JSON, &p));
            prop_assert_eq!(reference_read::<Payment>(PAYMENT_SCHEMA_JSON, &ours), Some(p.clone()));
            let mut cursor = ours.as_slice();
            prop_assert_eq!(read_payment(&mut cursor), Ok(p));
            prop_assert!(cursor.is_empty());
        }

        #[test]
        fn labels_are_written_and_read_as_apache_avro_does(
            (payment_id, customer, fraud, labelled_at, source) in (any::<String>(), any::<String>(), any::<bool>(), any::<i64>(), any::<String>())
        ) {
            let l = PaymentLabel { payment_id, customer, fraud, labelled_at, source };
            let mut ours = Vec::new();
            write_label(&mut ours, &l);
            prop_assert_eq!(&ours, &reference_write(PAYMENT_LABEL_SCHEMA_JSON, &l));
            prop_assert_eq!(reference_read::<PaymentLabel>(PAYMENT_LABEL_SCHEMA_JSON, &ours), Some(l.clone()));
            prop_assert_eq!(read_label(&mut ours.as_slice()), Ok(l.clone()));
            prop_assert_eq!(read_label_ref(&mut ours.as_slice()), Ok(l.as_ref()));
            prop_assert_eq!(l.as_ref().into_owned(), l);
        }

        #[test]
        fn scored_payments_are_written_and_read_as_apache_avro_does(s in scored_payments()) {
            let mut ours = Vec::new();
            write_scored_payment(&mut ours, &s);
            prop_assert_eq!(&ours, &reference_write(SCORED_PAYMENT_SCHEMA_JSON, &s));
            prop_assert_eq!(reference_read::<ScoredPayment>(SCORED_PAYMENT_SCHEMA_JSON, &ours), Some(s.clone()));
            prop_assert_eq!(read_scored_payment(&mut ours.as_slice()), Ok(s.clone()));
            // The view borrows what the owned record holds, and makes it again.
            prop_assert_eq!(read_scored_ref(&mut ours.as_slice()), Ok(s.as_ref()));
            prop_assert_eq!(s.as_ref().into_owned(), s);
        }

        /// Schema evolution, both ways: a reader of an old schema (id 2, id 3)
        /// reads new records (the new fields are skipped), and a reader of
        /// the new schema reads old records (the new fields take their
        /// defaults), by Avro's schema resolution and by our reader alike.
        #[test]
        fn old_and_new_scored_payment_schemas_read_each_other(s in scored_payments()) {
            use crate::codec::SCORED_PAYMENT_SCHEMA_V2_JSON as V2;
            use crate::codec::SCORED_PAYMENT_SCHEMA_V3_JSON as V3;
            // Id 3 <-> id 4 (before and after `shadow`).
            let v3 = ScoredPaymentV3 {
                payment: s.payment.clone(),
                fraud_probability: s.fraud_probability,
                is_fraud: s.is_fraud,
                threshold: s.threshold,
                model_name: s.model_name.clone(),
                model_version: s.model_version.clone(),
                scored_at: s.scored_at,
                decision: s.decision,
                reasons: s.reasons.clone(),
            };
            let mut new_bytes = Vec::new();
            write_scored_payment(&mut new_bytes, &s);
            prop_assert_eq!(resolve_read::<ScoredPaymentV3>(SCORED_PAYMENT_SCHEMA_JSON, V3, &new_bytes), v3);
            let v3_bytes = reference_write(V3, &resolve_read::<ScoredPaymentV3>(SCORED_PAYMENT_SCHEMA_JSON, V3, &new_bytes));
            let without_shadow = ScoredPayment { shadow: None, ..s.clone() };
            prop_assert_eq!(&resolve_read::<ScoredPayment>(V3, SCORED_PAYMENT_SCHEMA_JSON, &v3_bytes), &without_shadow);
            prop_assert_eq!(read_scored_payment(&mut v3_bytes.as_slice()), Ok(without_shadow));
            // Id 2 <-> id 4 (before decisions, reasons and shadow).
            let old = ScoredPaymentV2 {
                payment: s.payment.clone(),
                fraud_probability: s.fraud_probability,
                is_fraud: s.is_fraud,
                threshold: s.threshold,
                model_name: s.model_name.clone(),
                model_version: s.model_version.clone(),
                scored_at: s.scored_at,
            };
            // A new record, read with the old schema.
            prop_assert_eq!(resolve_read::<ScoredPaymentV2>(SCORED_PAYMENT_SCHEMA_JSON, V2, &new_bytes), old);
            // An old record (apache-avro, the old schema), read with the new one.
            let old = ScoredPaymentV2 { ..resolve_read(SCORED_PAYMENT_SCHEMA_JSON, V2, &new_bytes) };
            let old_bytes = reference_write(V2, &old);
            let defaults = ScoredPayment { decision: None, reasons: Vec::new(), shadow: None, ..s.clone() };
            prop_assert_eq!(&resolve_read::<ScoredPayment>(V2, SCORED_PAYMENT_SCHEMA_JSON, &old_bytes), &defaults);
            prop_assert_eq!(read_scored_payment(&mut old_bytes.as_slice()), Ok(defaults));
        }

        /// On any bytes, including damaged payments, both accept the same bodies and read the same values.
        #[test]
        fn damaged_bodies_are_judged_as_apache_avro_judges_them(
            p in payments(),
            cut in 0usize..400,
            flips in proptest::collection::vec((0usize..400, 0u8..8), 0..4),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
            use_garbage in any::<bool>(),
        ) {
            let mut bytes = Vec::new();
            write_payment(&mut bytes, &p);
            if use_garbage {
                bytes = garbage;
            } else {
                for (at, bit) in flips {
                    let at = at % bytes.len();
                    bytes[at] ^= 1 << bit;
                }
                bytes.truncate(cut.min(bytes.len()));
            }
            let mut cursor = bytes.as_slice();
            let ours = read_payment(&mut cursor).ok();
            let reference = reference_read::<Payment>(PAYMENT_SCHEMA_JSON, &bytes);
            // NaN != NaN: compare amounts by their bits.
            let key = |p: &Option<Payment>| p.as_ref().map(|p| (Payment { amount: 0.0, ..p.clone() }, p.amount.to_bits()));
            prop_assert_eq!(key(&ours), key(&reference));
        }
    }

    #[test]
    fn errors_name_the_field() {
        let mut bytes = Vec::new();
        write_payment(&mut bytes, &Payment { fraud: Some(true), ..crate::Simulator::new(1, 1).next().unwrap() });
        let last = bytes.len() - 1;
        bytes[last] = 2;
        assert_eq!(
            read_payment(&mut bytes.as_slice()).unwrap_err().to_string(),
            "field `fraud`: boolean byte is 0x02, not 0 or 1"
        );
        let err = read_payment(&mut &bytes[..3]).unwrap_err();
        assert!(matches!(err, AvroError::Truncated { field: "paymentId" }), "{err}");
        assert!(matches!(
            read_payment(&mut &[0x01][..]),
            Err(AvroError::NegativeLength { field: "paymentId", length: -1 })
        ));
        assert!(matches!(read_payment(&mut &[0xff; 11][..]), Err(AvroError::VarintOverflow { field: "paymentId" })));
    }
}
