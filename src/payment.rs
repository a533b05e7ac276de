//! The domain's nouns: a `Payment` as it arrives, a `ScoredPayment` as it
//! leaves, and the BankSim CSV format that labelled history comes in.
//!
//! Everything here is plain data; it knows nothing of Kafka or torch, so the
//! trainer, the scorer and the tools all share one definition.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::codec::LabelRef;
use crate::decision::{Decision, Reason};

/// Event time given to BankSim rows read from CSV: step 0 is this instant
/// (2014-01-01T00:00:00Z, roughly when BankSim was published) and each step is one day.
pub const BANKSIM_EPOCH_MS: i64 = 1_388_534_400_000;
/// One BankSim step is one day.
pub const STEP_MS: i64 = 86_400_000;

/// A raw payment event, as producers publish it (`schemas/payment.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    /// Unique id of the payment; outputs and dead letters carry it.
    pub payment_id: String,
    /// When the payment happened, milliseconds since the Unix epoch (UTC).
    pub event_time: i64,
    /// BankSim step (day number, 0..179 in the original data).
    pub step: i32,
    pub customer: String,
    /// Age band: '0' (<=18) .. '6' (>65), 'U' unknown.
    pub age: String,
    /// 'E' enterprise, 'F', 'M', 'U' unknown.
    pub gender: String,
    pub zipcode_ori: String,
    pub merchant: String,
    pub zip_merchant: String,
    /// One of the 15 BankSim categories, e.g. `es_health`.
    pub category: String,
    pub amount: f64,
    /// Ground truth where known (labelled history); absent on live traffic.
    #[serde(default)]
    pub fraud: Option<bool>,
}

/// Why a payment cannot be scored as it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidPayment {
    #[error("payment {payment_id:?}: amount {amount} is not a finite, non-negative number")]
    BadAmount { payment_id: String, amount: f64 },
    #[error("payment {payment_id:?}: field `{field}` is empty")]
    EmptyField { payment_id: String, field: &'static str },
}

impl Payment {
    /// Checks what no feature encoder can repair: a usable amount and the
    /// identifying fields. Vocabulary checks belong to the encoder.
    pub fn validate(&self) -> Result<(), InvalidPayment> {
        if !self.amount.is_finite() || self.amount < 0.0 {
            return Err(InvalidPayment::BadAmount { payment_id: self.payment_id.clone(), amount: self.amount });
        }
        for (field, value) in [
            ("paymentId", &self.payment_id),
            ("customer", &self.customer),
            ("category", &self.category),
            ("age", &self.age),
            ("gender", &self.gender),
        ] {
            if value.is_empty() {
                return Err(InvalidPayment::EmptyField { payment_id: self.payment_id.clone(), field });
            }
        }
        Ok(())
    }
}

/// A payment with the model's verdict (`schemas/scored_payment.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScoredPayment {
    pub payment: Payment,
    /// P(fraud) from the model, in [0, 1].
    pub fraud_probability: f64,
    /// `fraud_probability >= threshold`.
    pub is_fraud: bool,
    /// The model's decision threshold, chosen at training time.
    pub threshold: f64,
    pub model_name: String,
    pub model_version: String,
    /// When the score was computed, milliseconds since the Unix epoch.
    pub scored_at: i64,
    /// Allow, review or block, by the model's decision bands. Absent only in
    /// records written before decisions existed.
    #[serde(default)]
    pub decision: Option<Decision>,
    /// Why, for payments at or above the review band (or when asked):
    /// the feature groups that raised P(fraud) most, most first.
    #[serde(default)]
    pub reasons: Vec<Reason>,
    /// The shadow model's score of the same payment, for comparison only
    /// (`--shadow`); null without one, when it failed on this batch, and in
    /// records written before shadow scoring.
    #[serde(default)]
    pub shadow: Option<ShadowScore>,
}

/// What the shadow model (a candidate run beside the serving one) said about
/// a payment: its version, P(fraud), whether its threshold flags it and the
/// decision by its own bands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowScore {
    pub model_version: String,
    pub fraud_probability: f64,
    /// `fraudProbability >=` the shadow version's own threshold.
    pub is_fraud: bool,
    pub decision: Decision,
}

/// The ground truth of one payment, arriving after it (`schemas/payment_label.avsc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentLabel {
    pub payment_id: String,
    /// The record key, as on the payments topic, so a label lands on its payment's partition.
    pub customer: String,
    pub fraud: bool,
    /// When the verdict was given, milliseconds since the Unix epoch.
    pub labelled_at: i64,
    /// Who gave it: `chargeback`, `analyst`, `simulator`...
    pub source: String,
}

impl PaymentLabel {
    /// The label of a payment whose ground truth is known, given now by `source`.
    pub fn of(payment: &Payment, source: &str) -> Option<Self> {
        Some(Self {
            payment_id: payment.payment_id.clone(),
            customer: payment.customer.clone(),
            fraud: payment.fraud?,
            labelled_at: now_ms(),
            source: source.to_string(),
        })
    }
}

impl LabelRef<'_> {
    /// What no join can use: a label must name its payment and customer.
    pub fn validate(&self) -> Result<(), InvalidPayment> {
        for (field, value) in [("paymentId", self.payment_id), ("customer", self.customer)] {
            if value.is_empty() {
                return Err(InvalidPayment::EmptyField { payment_id: self.payment_id.to_string(), field });
            }
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A BankSim CSV problem, naming the line and the field so the file can be fixed.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("BankSim CSV line {line}: {message}")]
    Malformed { line: u64, message: String },
    #[error("BankSim CSV line {line}, field `{field}`: cannot parse {value:?} ({reason})")]
    BadField { line: u64, field: &'static str, value: String, reason: String },
    #[error("BankSim CSV: header lacks column `{0}` (expected step,customer,age,gender[,zipcodeOri],merchant[,zipMerchant],category,amount[,fraud])")]
    MissingColumn(&'static str),
    #[error("BankSim CSV: {0}")]
    Io(#[from] std::io::Error),
}

/// The BankSim columns a payment is read from, in `Payment`'s order.
pub const BANKSIM_COLUMNS: [&str; 9] =
    ["step", "customer", "age", "gender", "zipcodeOri", "merchant", "zipMerchant", "category", "amount"];
const COLUMNS: [&str; 9] = BANKSIM_COLUMNS;

/// The zip code of every BankSim row (the data set has one zip code): the
/// value of `zipcodeOri` and `zipMerchant` where a file leaves them out.
pub const BANKSIM_ZIP: &str = "28007";

/// Whether BankSim column `name` may be missing (the constant zip codes).
pub fn banksim_column_optional(name: &str) -> bool {
    matches!(name, "zipcodeOri" | "zipMerchant")
}

/// Streams payments from a BankSim CSV file, in the original format (values
/// wrapped in single quotes, header quoted with double quotes or not) or
/// unquoted. Columns are found by header name; `fraud` is optional, and so
/// are the constant zip-code columns (`BANKSIM_ZIP` where absent).
pub struct BankSimReader<R: BufRead> {
    inner: csv::Reader<R>,
    /// Each column's position in a row; `None` for an absent zip-code column.
    index: [Option<usize>; 9],
    fraud: Option<usize>,
    record: csv::ByteRecord,
    /// Prefix of generated payment ids (the original format has none).
    id_prefix: String,
}

impl<R: BufRead> BankSimReader<R> {
    /// Reads the header; fails if a required column is missing.
    pub fn new(reader: R) -> Result<Self, CsvError> {
        Self::with_id_prefix(reader, "bs")
    }

    /// Like `new`, naming generated ids `<prefix>-<line>`; use a distinct
    /// prefix per file so ids stay unique across files.
    pub fn with_id_prefix(reader: R, id_prefix: &str) -> Result<Self, CsvError> {
        let mut inner = csv::ReaderBuilder::new().quote(b'\'').has_headers(true).from_reader(reader);
        let headers: Vec<String> = inner
            .byte_headers()
            .map_err(|e| CsvError::Malformed { line: 1, message: e.to_string() })?
            .iter()
            .map(|h| String::from_utf8_lossy(h).trim().trim_matches(|c| c == '"' || c == '\'').to_string())
            .collect();
        let find = |name: &str| headers.iter().position(|h| h == name);
        let mut index = [None; 9];
        for (slot, name) in index.iter_mut().zip(COLUMNS) {
            *slot = find(name);
            if slot.is_none() && !banksim_column_optional(name) {
                return Err(CsvError::MissingColumn(name));
            }
        }
        Ok(Self { inner, index, fraud: find("fraud"), record: csv::ByteRecord::new(), id_prefix: id_prefix.into() })
    }

    fn field(&self, i: usize, line: u64) -> Result<&str, CsvError> {
        let name = COLUMNS[i];
        let Some(column) = self.index[i] else { return Ok(BANKSIM_ZIP) };
        let raw = self.record.get(column).ok_or_else(|| CsvError::Malformed {
            line,
            message: format!("row has {} fields, column `{name}` is missing", self.record.len()),
        })?;
        let text = std::str::from_utf8(raw).map_err(|e| CsvError::BadField {
            line,
            field: name,
            value: String::from_utf8_lossy(raw).into_owned(),
            reason: e.to_string(),
        })?;
        Ok(text.trim())
    }

    fn parse_record(&self, line: u64) -> Result<Payment, CsvError> {
        let bad = |field: &'static str, value: &str, reason: String| CsvError::BadField {
            line,
            field,
            value: value.to_string(),
            reason,
        };
        let step_text = self.field(0, line)?;
        let step: i32 =
            step_text.parse().map_err(|e: std::num::ParseIntError| bad("step", step_text, e.to_string()))?;
        let amount_text = self.field(8, line)?;
        let amount: f64 =
            amount_text.parse().map_err(|e: std::num::ParseFloatError| bad("amount", amount_text, e.to_string()))?;
        let fraud = match self.fraud {
            None => None,
            Some(i) => {
                let raw = self.record.get(i).map(|b| String::from_utf8_lossy(b).trim().to_string()).unwrap_or_default();
                match raw.as_str() {
                    "0" | "false" => Some(false),
                    "1" | "true" => Some(true),
                    "" => None,
                    other => return Err(bad("fraud", other, "expected 0 or 1".into())),
                }
            }
        };
        let customer = self.field(1, line)?.to_string();
        Ok(Payment {
            payment_id: format!("{}-{line}", self.id_prefix),
            event_time: BANKSIM_EPOCH_MS + i64::from(step) * STEP_MS,
            step,
            customer,
            age: self.field(2, line)?.to_string(),
            gender: self.field(3, line)?.to_string(),
            zipcode_ori: self.field(4, line)?.to_string(),
            merchant: self.field(5, line)?.to_string(),
            zip_merchant: self.field(6, line)?.to_string(),
            category: self.field(7, line)?.to_string(),
            amount,
            fraud,
        })
    }
}

impl<R: BufRead> Iterator for BankSimReader<R> {
    type Item = Result<Payment, CsvError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.inner.read_byte_record(&mut self.record) {
            Ok(false) => None,
            Ok(true) => {
                let line = self.record.position().map(|p| p.line()).unwrap_or(0);
                Some(self.parse_record(line))
            }
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                Some(Err(CsvError::Malformed { line, message: e.to_string() }))
            }
        }
    }
}

/// The original file's header line.
pub const BANKSIM_HEADER: &str = "step,customer,age,gender,zipcodeOri,merchant,zipMerchant,category,amount,fraud";

/// Writes one row in the original BankSim format (single-quoted strings).
/// Fields are taken by reference so the simulator can write without building
/// a `Payment`.
#[allow(clippy::too_many_arguments)]
pub fn write_banksim_row<W: Write>(
    out: &mut W,
    step: i32,
    customer: &str,
    age: &str,
    gender: &str,
    zipcode_ori: &str,
    merchant: &str,
    zip_merchant: &str,
    category: &str,
    amount: f64,
    fraud: bool,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{step},'{customer}','{age}','{gender}','{zipcode_ori}','{merchant}','{zip_merchant}','{category}',{amount:.2},{}",
        u8::from(fraud)
    )
}

impl Payment {
    /// Writes this payment as one BankSim CSV row (unlabelled counts as legitimate).
    pub fn write_banksim_row<W: Write>(&self, out: &mut W) -> std::io::Result<()> {
        write_banksim_row(
            out,
            self.step,
            &self.customer,
            &self.age,
            &self.gender,
            &self.zipcode_ori,
            &self.merchant,
            &self.zip_merchant,
            &self.category,
            self.amount,
            self.fraud.unwrap_or(false),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_real_banksim_file() {
        // shared/ sits beside the checkout unless FRAUDSTREAM_SHARED_DIR says otherwise.
        let shared = std::env::var_os("FRAUDSTREAM_SHARED_DIR")
            .map_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"), Into::into);
        let path = shared.join("banksim/bs140513_100_customers.csv");
        let file = std::io::BufReader::new(
            std::fs::File::open(&path).expect("shared/ beside the checkout, or set FRAUDSTREAM_SHARED_DIR"),
        );
        let rows: Vec<Payment> = BankSimReader::new(file).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 15_534);
        assert_eq!(rows.iter().filter(|p| p.fraud == Some(true)).count(), 92);
        let first = &rows[0];
        assert_eq!(first.customer, "C1093826151");
        assert_eq!(first.age, "4");
        assert_eq!(first.gender, "M");
        assert_eq!(first.merchant, "M348934600");
        assert_eq!(first.category, "es_transportation");
        assert_eq!(first.amount, 4.55);
        assert_eq!(first.step, 0);
        assert!(rows.iter().all(|p| p.validate().is_ok()));
    }

    #[test]
    fn reads_double_quoted_header_and_unquoted_values() {
        let text = "\"step\",\"customer\",\"age\",\"gender\",\"zipcodeOri\",\"merchant\",\"zipMerchant\",\"category\",\"amount\",\"fraud\"\n\
                    3,C1,2,F,28007,M1,28007,es_health,12.5,1\n\
                    4,'C2','U','E','28007','M2','28007','es_food',0.5,0\n";
        let rows: Vec<Payment> = BankSimReader::new(text.as_bytes()).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].customer, "C1");
        assert_eq!(rows[0].fraud, Some(true));
        assert_eq!(rows[1].age, "U");
        assert_eq!(rows[1].event_time, BANKSIM_EPOCH_MS + 4 * STEP_MS);
    }

    #[test]
    fn zip_code_columns_may_be_left_out() {
        let text = "step,customer,age,gender,merchant,category,amount,fraud\n\
                    5,'C7','3','F','M9','es_travel',812.25,1\n";
        let rows: Vec<Payment> = BankSimReader::new(text.as_bytes()).unwrap().map(|r| r.unwrap()).collect();
        let expected = Payment {
            payment_id: "bs-2".into(),
            event_time: BANKSIM_EPOCH_MS + 5 * STEP_MS,
            step: 5,
            customer: "C7".into(),
            age: "3".into(),
            gender: "F".into(),
            zipcode_ori: BANKSIM_ZIP.into(),
            merchant: "M9".into(),
            zip_merchant: BANKSIM_ZIP.into(),
            category: "es_travel".into(),
            amount: 812.25,
            fraud: Some(true),
        };
        assert_eq!(rows, [expected]);
        let missing = BankSimReader::new("step,customer,age,gender,category,amount\n".as_bytes()).err().unwrap();
        assert!(missing.to_string().contains("`merchant`"), "{missing}");
    }

    #[test]
    fn errors_name_line_and_field() {
        let text = format!("{BANKSIM_HEADER}\n0,'C1','2','F','28007','M1','28007','es_health',12.5,0\n1,'C1','2','F','28007','M1','28007','es_health',abc,0\n");
        let results: Vec<_> = BankSimReader::new(text.as_bytes()).unwrap().collect();
        assert!(results[0].is_ok());
        let message = results[1].as_ref().unwrap_err().to_string();
        assert!(message.contains("line 3") && message.contains("amount") && message.contains("abc"), "{message}");

        let missing = BankSimReader::new("step,customer\n1,2\n".as_bytes()).err().unwrap().to_string();
        assert!(missing.contains("`age`"), "{missing}");
    }

    #[test]
    fn writes_rows_the_reader_reads_back() {
        let mut out = format!("{BANKSIM_HEADER}\n").into_bytes();
        let payment = Payment {
            payment_id: "x".into(),
            event_time: BANKSIM_EPOCH_MS + 7 * STEP_MS,
            step: 7,
            customer: "C9".into(),
            age: "3".into(),
            gender: "M".into(),
            zipcode_ori: "28007".into(),
            merchant: "M5".into(),
            zip_merchant: "28007".into(),
            category: "es_travel".into(),
            amount: 1234.5,
            fraud: Some(true),
        };
        payment.write_banksim_row(&mut out).unwrap();
        let back = BankSimReader::new(out.as_slice()).unwrap().next().unwrap().unwrap();
        assert_eq!(Payment { payment_id: "x".into(), ..back }, payment);
    }

    #[test]
    fn validation_rejects_bad_amounts_and_empty_fields() {
        let mut p = BankSimReader::new(
            format!("{BANKSIM_HEADER}\n0,'C1','2','F','28007','M1','28007','es_health',12.5,0\n").as_bytes(),
        )
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
        assert!(p.validate().is_ok());
        p.amount = f64::NAN;
        assert!(matches!(p.validate(), Err(InvalidPayment::BadAmount { .. })));
        p.amount = -1.0;
        assert!(matches!(p.validate(), Err(InvalidPayment::BadAmount { .. })));
        p.amount = 1.0;
        p.category.clear();
        assert!(matches!(p.validate(), Err(InvalidPayment::EmptyField { field: "category", .. })));
    }
}
