//! Bytes <-> `Payment` / `ScoredPayment` / `PaymentLabel`, in the three wire formats we speak:
//! Avro binary in the Confluent wire format (magic byte 0, 4-byte big-endian
//! schema id, body), plain Avro binary, and JSON (one object per line).
//!
//! The Avro schemas are the files in `schemas/`, compiled in and published
//! from here; `avro` reads and writes exactly their layout (tests hold the two
//! together against apache-avro). Decoding never panics: garbage is an error
//! the pipeline can dead-letter.

mod avro;
mod borrowed;

use serde::{de::DeserializeOwned, Serialize};

pub use avro::AvroError;
pub use borrowed::{LabelRef, PaymentRef, ScoredRef, ShadowRef};

use crate::payment::{Payment, PaymentLabel, ScoredPayment};

/// `schemas/payment.avsc`, verbatim.
pub const PAYMENT_SCHEMA_JSON: &str = include_str!("../../schemas/payment.avsc");
/// `schemas/scored_payment.avsc`, verbatim.
pub const SCORED_PAYMENT_SCHEMA_JSON: &str = include_str!("../../schemas/scored_payment.avsc");
/// The Confluent schema id scorers write by default: moved on from 2 when
/// `decision` and `reasons` were added, and from 3 when `shadow` was (each
/// with a default, so readers of either schema read records of the other).
pub const SCORED_PAYMENT_SCHEMA_ID: u32 = 4;
/// The `ScoredPayment` schema before decisions (schema id 2), kept for the
/// compatibility tests and for readers that registered it.
pub const SCORED_PAYMENT_SCHEMA_V2_JSON: &str = include_str!("../../schemas/history/scored_payment-2.avsc");
/// The `ScoredPayment` schema before shadow scores (schema id 3), kept for
/// the same reasons.
pub const SCORED_PAYMENT_SCHEMA_V3_JSON: &str = include_str!("../../schemas/history/scored_payment-3.avsc");

/// `schemas/payment_label.avsc`, verbatim.
pub const PAYMENT_LABEL_SCHEMA_JSON: &str = include_str!("../../schemas/payment_label.avsc");
/// The Confluent schema id written on labels without a registry.
pub const PAYMENT_LABEL_SCHEMA_ID: u32 = 10;

/// The Confluent wire format's first byte.
pub(crate) const CONFLUENT_MAGIC: u8 = 0;

/// How events are laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// Avro binary behind the Confluent header (magic 0 + schema id).
    Confluent,
    /// Avro binary, no header.
    Avro,
    /// One JSON object.
    Json,
}

impl crate::choice::Choice for WireFormat {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Confluent, "confluent", "Avro binary behind the Confluent header (magic 0 + schema id)"),
        (Self::Avro, "avro", "Avro binary, no header"),
        (Self::Json, "json", "one JSON object"),
    ];
}

/// Why bytes could not become an event (or an event bytes).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not in the Confluent wire format: {0} (expected magic byte 0 and a 4-byte schema id; is the producer writing plain Avro or JSON? then pass --format avro|json)")]
    BadHeader(String),
    #[error("invalid Avro {schema} body: {source}")]
    Avro { schema: &'static str, source: AvroError },
    #[error("{0} trailing bytes after the Avro {1} body")]
    TrailingBytes(usize, &'static str),
    #[error("invalid JSON {schema}: {source}")]
    Json { schema: &'static str, source: serde_json::Error },
}

/// Encodes and decodes events in one wire format.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    format: WireFormat,
    /// Written into the Confluent header; ignored on decode (no registry to ask).
    schema_id: u32,
}

impl Codec {
    pub const fn new(format: WireFormat, schema_id: u32) -> Self {
        Self { format, schema_id }
    }

    pub fn format(&self) -> WireFormat {
        self.format
    }

    pub fn encode_payment(&self, payment: &Payment) -> Result<Vec<u8>, CodecError> {
        self.encode(payment, "Payment", avro::write_payment)
    }

    pub fn decode_payment(&self, bytes: &[u8]) -> Result<Payment, CodecError> {
        self.decode(bytes, "Payment", avro::read_payment)
    }

    pub fn encode_scored(&self, scored: &ScoredPayment) -> Result<Vec<u8>, CodecError> {
        self.encode(scored, "ScoredPayment", avro::write_scored_payment)
    }

    pub fn decode_scored(&self, bytes: &[u8]) -> Result<ScoredPayment, CodecError> {
        self.decode(bytes, "ScoredPayment", avro::read_scored_payment)
    }

    /// A scored payment in this format, as `bytes` hold it, with
    /// `payment.fraud` set to `fraud` and this codec's schema id: what
    /// `encode_scored` would write for the decoded record so labelled. Avro
    /// bodies are patched in place of decoding and encoding them again.
    pub fn relabel_scored(&self, bytes: &[u8], fraud: bool) -> Result<Vec<u8>, CodecError> {
        let name = "ScoredPayment";
        let body = match self.format {
            WireFormat::Json => {
                let mut scored = self.decode_scored(bytes)?;
                scored.payment.fraud = Some(fraud);
                return self.encode_scored(&scored);
            }
            WireFormat::Avro => bytes,
            WireFormat::Confluent => match bytes {
                [CONFLUENT_MAGIC, _, _, _, _, body @ ..] => body,
                _ => return Err(CodecError::BadHeader(format!("only {} bytes or no magic byte", bytes.len()))),
            },
        };
        let (start, length) =
            avro::payment_fraud_span(body).map_err(|source| CodecError::Avro { schema: name, source })?;
        let mut out = Vec::with_capacity(bytes.len() + 6);
        if self.format == WireFormat::Confluent {
            out.push(CONFLUENT_MAGIC);
            out.extend_from_slice(&self.schema_id.to_be_bytes());
        }
        out.extend_from_slice(&body[..start]);
        // Union branch 1 (zig-zag 2), then the boolean.
        out.extend_from_slice(&[2, u8::from(fraud)]);
        out.extend_from_slice(&body[start + length..]);
        Ok(out)
    }

    pub fn encode_label(&self, label: &PaymentLabel) -> Result<Vec<u8>, CodecError> {
        self.encode(label, "PaymentLabel", avro::write_label)
    }

    pub fn decode_label(&self, bytes: &[u8]) -> Result<PaymentLabel, CodecError> {
        self.decode(bytes, "PaymentLabel", avro::read_label)
    }

    /// What `read` makes of the scored payment in `bytes`, seen without
    /// copying its strings (Avro; JSON is decoded first). Fails where
    /// `decode_scored` fails.
    pub fn read_scored<R>(&self, bytes: &[u8], read: impl FnOnce(ScoredRef<'_>) -> R) -> Result<R, CodecError> {
        match self.format {
            WireFormat::Json => self.decode_scored(bytes).map(|owned| read(owned.as_ref())),
            _ => self.read_avro(bytes, "ScoredPayment", avro::read_scored_ref).map(read),
        }
    }

    /// What `read` makes of the label in `bytes`, seen without copying its
    /// strings (Avro; JSON is decoded first). Fails where `decode_label` fails.
    pub fn read_label<R>(&self, bytes: &[u8], read: impl FnOnce(LabelRef<'_>) -> R) -> Result<R, CodecError> {
        match self.format {
            WireFormat::Json => self.decode_label(bytes).map(|owned| read(owned.as_ref())),
            _ => self.read_avro(bytes, "PaymentLabel", avro::read_label_ref).map(read),
        }
    }

    /// The same format with another Confluent schema id (labels and outputs carry their own).
    pub const fn with_schema_id(self, schema_id: u32) -> Self {
        Self { format: self.format, schema_id }
    }

    fn encode<T: Serialize>(
        &self,
        value: &T,
        name: &'static str,
        write_avro: fn(&mut Vec<u8>, &T),
    ) -> Result<Vec<u8>, CodecError> {
        match self.format {
            WireFormat::Json => serde_json::to_vec(value).map_err(|source| CodecError::Json { schema: name, source }),
            WireFormat::Avro | WireFormat::Confluent => {
                let mut out = Vec::with_capacity(192);
                if self.format == WireFormat::Confluent {
                    out.push(CONFLUENT_MAGIC);
                    out.extend_from_slice(&self.schema_id.to_be_bytes());
                }
                write_avro(&mut out, value);
                Ok(out)
            }
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        bytes: &[u8],
        name: &'static str,
        read_avro: fn(&mut &[u8]) -> Result<T, AvroError>,
    ) -> Result<T, CodecError> {
        match self.format {
            WireFormat::Json => {
                serde_json::from_slice(bytes).map_err(|source| CodecError::Json { schema: name, source })
            }
            WireFormat::Avro | WireFormat::Confluent => self.read_avro(bytes, name, read_avro),
        }
    }

    /// The Avro body of `bytes` (behind the Confluent header where there is
    /// one), read whole by `read`.
    fn read_avro<'a, T>(
        &self,
        bytes: &'a [u8],
        name: &'static str,
        read: fn(&mut &'a [u8]) -> Result<T, AvroError>,
    ) -> Result<T, CodecError> {
        let body = match self.format {
            WireFormat::Avro | WireFormat::Json => bytes,
            WireFormat::Confluent => match bytes {
                [CONFLUENT_MAGIC, _, _, _, _, body @ ..] => body,
                [] => return Err(CodecError::BadHeader("empty message".into())),
                [first, ..] if *first != CONFLUENT_MAGIC => {
                    return Err(CodecError::BadHeader(format!("first byte is {first:#04x}")))
                }
                _ => return Err(CodecError::BadHeader(format!("only {} bytes", bytes.len()))),
            },
        };
        let mut cursor = body;
        let value = read(&mut cursor).map_err(|source| CodecError::Avro { schema: name, source })?;
        if !cursor.is_empty() {
            return Err(CodecError::TrailingBytes(cursor.len(), name));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payment() -> Payment {
        Payment {
            payment_id: "p-1".into(),
            event_time: 1_700_000_000_123,
            step: 12,
            customer: "C1093826151".into(),
            age: "4".into(),
            gender: "M".into(),
            zipcode_ori: "28007".into(),
            merchant: "M348934600".into(),
            zip_merchant: "28007".into(),
            category: "es_transportation".into(),
            amount: 4.55,
            fraud: None,
        }
    }

    fn scored() -> ScoredPayment {
        ScoredPayment {
            payment: Payment { fraud: Some(true), ..payment() },
            fraud_probability: 0.93,
            is_fraud: true,
            threshold: 0.5,
            model_name: "payfraud".into(),
            model_version: "1700000000".into(),
            scored_at: 1_700_000_000_200,
            decision: Some(crate::decision::Decision::Review),
            reasons: Vec::new(),
            shadow: Some(crate::payment::ShadowScore {
                model_version: "1700000100".into(),
                fraud_probability: 0.42,
                is_fraud: false,
                decision: crate::decision::Decision::Allow,
            }),
        }
    }

    const ALL: [WireFormat; 3] = [WireFormat::Confluent, WireFormat::Avro, WireFormat::Json];

    #[test]
    fn payments_round_trip_in_every_format() {
        for format in ALL {
            let codec = Codec::new(format, 7);
            for p in
                [payment(), Payment { fraud: Some(false), ..payment() }, Payment { fraud: Some(true), ..payment() }]
            {
                let bytes = codec.encode_payment(&p).unwrap();
                assert_eq!(codec.decode_payment(&bytes).unwrap(), p, "{format:?}");
            }
        }
    }

    #[test]
    fn scored_payments_round_trip_in_every_format() {
        for format in ALL {
            let codec = Codec::new(format, 7);
            let bytes = codec.encode_scored(&scored()).unwrap();
            assert_eq!(codec.decode_scored(&bytes).unwrap(), scored(), "{format:?}");
        }
    }

    #[test]
    fn confluent_header_carries_the_schema_id() {
        let bytes = Codec::new(WireFormat::Confluent, 0x01020304).encode_payment(&payment()).unwrap();
        assert_eq!(&bytes[..5], &[0, 1, 2, 3, 4]);
        let plain = Codec::new(WireFormat::Avro, 0).encode_payment(&payment()).unwrap();
        assert_eq!(&bytes[5..], plain.as_slice());
    }

    #[test]
    fn json_is_the_documented_field_names() {
        let text = String::from_utf8(Codec::new(WireFormat::Json, 0).encode_payment(&payment()).unwrap()).unwrap();
        for field in ["paymentId", "eventTime", "zipcodeOri", "zipMerchant", "amount"] {
            assert!(text.contains(&format!("\"{field}\"")), "{text}");
        }
        let missing = Codec::new(WireFormat::Json, 0).decode_payment(br#"{"paymentId":"x"}"#).unwrap_err();
        assert!(missing.to_string().contains("missing field"), "{missing}");
    }

    #[test]
    fn scored_schema_embeds_the_payment_schema_unchanged() {
        let scored: serde_json::Value = serde_json::from_str(SCORED_PAYMENT_SCHEMA_JSON).unwrap();
        let payment: serde_json::Value = serde_json::from_str(PAYMENT_SCHEMA_JSON).unwrap();
        assert_eq!(scored["fields"][0]["type"], payment);
    }

    #[test]
    fn garbage_is_an_error() {
        let codec = Codec::new(WireFormat::Confluent, 1);
        assert!(matches!(codec.decode_payment(b""), Err(CodecError::BadHeader(_))));
        assert!(matches!(codec.decode_payment(b"{\"a\":1}"), Err(CodecError::BadHeader(_))));
        assert!(codec.decode_payment(&[0, 0, 0, 0, 1, 0xff, 0xff]).is_err());
        let mut good = codec.encode_payment(&payment()).unwrap();
        good.push(0);
        assert!(matches!(codec.decode_payment(&good), Err(CodecError::TrailingBytes(1, _))));
    }

    #[test]
    fn relabelling_writes_what_encoding_the_relabelled_record_writes() {
        for format in ALL {
            let (reader, writer) = (Codec::new(format, 3), Codec::new(format, 9));
            for fraud in [None, Some(false), Some(true)] {
                let mut s = scored();
                s.payment.fraud = fraud;
                let bytes = reader.encode_scored(&s).unwrap();
                for label in [false, true] {
                    let relabelled = writer.relabel_scored(&bytes, label).unwrap();
                    s.payment.fraud = Some(label);
                    if format == WireFormat::Json {
                        assert_eq!(writer.decode_scored(&relabelled).unwrap(), s, "{format:?}");
                    } else {
                        assert_eq!(relabelled, writer.encode_scored(&s).unwrap(), "{format:?} {fraud:?} -> {label}");
                    }
                    s.payment.fraud = fraud;
                }
            }
        }
        assert!(Codec::new(WireFormat::Confluent, 1).relabel_scored(&[0, 0, 0, 0, 1, 0xff], true).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn views_accept_and_hold_what_decoding_does(bytes in proptest::collection::vec(any::<u8>(), 0..256), cut in 0usize..300) {
            let label = PaymentLabel {
                payment_id: "p-1".into(),
                customer: "C1".into(),
                fraud: true,
                labelled_at: 5,
                source: "test".into(),
            };
            for format in ALL {
                let codec = Codec::new(format, 1);
                let (scored, label) = (codec.encode_scored(&scored()).unwrap(), codec.encode_label(&label).unwrap());
                for input in [&bytes[..], &scored, &scored[..cut.min(scored.len())], &label, &label[..cut.min(label.len())]] {
                    prop_assert_eq!(codec.read_scored(input, |s| s.into_owned()).ok(), codec.decode_scored(input).ok());
                    prop_assert_eq!(codec.read_label(input, |l| l.into_owned()).ok(), codec.decode_label(input).ok());
                }
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for format in ALL {
                let codec = Codec::new(format, 1);
                let _ = codec.decode_payment(&bytes);
                let _ = codec.decode_scored(&bytes);
                let _ = codec.decode_label(&bytes);
                let _ = codec.relabel_scored(&bytes, true);
            }
        }

        #[test]
        fn truncated_or_flipped_payments_never_panic(cut in 0usize..200, flip in 0usize..200, bit in 0u8..8) {
            for format in ALL {
                let codec = Codec::new(format, 1);
                let mut bytes = codec.encode_payment(&payment()).unwrap();
                let at = flip % bytes.len();
                bytes[at] ^= 1 << bit;
                bytes.truncate(cut.min(bytes.len()));
                let _ = codec.decode_payment(&bytes);
            }
        }
    }
}
