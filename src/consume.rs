//! Reading our topics as JSON lines: `fraudstream consume`, like kcat for our
//! schemas, so users can look at scored payments without writing code.
//!
//! It reads with a throw-away consumer group and never commits, so looking
//! at a topic never moves a real consumer group's offsets.

use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::kafka::KafkaArgs;

/// Which record type the topic holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `Payment` events (the input topic).
    Payment,
    /// `ScoredPayment` events (the output topic).
    Scored,
}

impl crate::choice::Choice for EventKind {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Payment, "payment", "Payment events (the input topic)"),
        (Self::Scored, "scored", "ScoredPayment events (the output topic)"),
    ];
}

/// Which records a reader sees on a topic written in transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Only committed transactions (and non-transactional records): each
    /// exactly-once output once.
    ReadCommitted,
    /// Everything, aborted transactions' records too.
    ReadUncommitted,
}

impl Isolation {
    fn property(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "read_committed",
            Isolation::ReadUncommitted => "read_uncommitted",
        }
    }
}

impl crate::choice::Choice for Isolation {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::ReadCommitted, "read-committed", "only committed transactions: exactly-once outputs once each"),
        (Self::ReadUncommitted, "read-uncommitted", "every record, aborted transactions' too"),
    ];
}

/// What to print.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    pub topic: String,
    pub codec: Codec,
    /// With a schema registry: each record read by its writer schema.
    pub schemas: Option<std::sync::Arc<crate::registry::WriterSchemas>>,
    pub kind: EventKind,
    /// Start at the earliest offset (else only new events).
    pub from_beginning: bool,
    /// Print only scored payments at or above this probability.
    pub min_probability: Option<f64>,
    /// Print only scored payments the model flagged as fraud.
    pub frauds_only: bool,
    /// Stop after printing this many events.
    pub max_events: Option<u64>,
    /// Stop when no event arrives for this long.
    pub idle_timeout: Option<Duration>,
    pub isolation: Isolation,
}

/// What a run printed and skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumeSummary {
    pub printed: u64,
    pub filtered: u64,
    pub undecodable: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("Kafka consumer on {brokers}: {source}")]
    Kafka { brokers: String, source: rdkafka::error::KafkaError },
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads `payload` by its writer schema (with a registry) or with the codec.
fn decode<T: serde::de::DeserializeOwned>(
    options: &ConsumeOptions,
    payload: &[u8],
    with_codec: fn(&Codec, &[u8]) -> Result<T, crate::codec::CodecError>,
) -> Result<T, String> {
    let fast = |bytes: &[u8]| with_codec(&options.codec, bytes).map_err(|e| e.to_string());
    crate::registry::read_with(options.schemas.as_deref(), payload, fast)
}

/// Prints events of `options.topic` as JSON lines to `out` until a limit is hit.
pub async fn print_events(
    kafka: &KafkaArgs,
    options: &ConsumeOptions,
    out: &mut impl Write,
) -> Result<ConsumeSummary, ConsumeError> {
    let kafka_err = |source| ConsumeError::Kafka { brokers: kafka.brokers.clone(), source };
    let group = format!("fraudstream-consume-{}", uuid::Uuid::new_v4());
    let consumer: StreamConsumer = kafka
        .client_config(&[
            ("group.id", &group),
            ("enable.auto.commit", "false"),
            ("isolation.level", options.isolation.property()),
            ("auto.offset.reset", if options.from_beginning { "earliest" } else { "latest" }),
        ])
        .create()
        .map_err(kafka_err)?;
    consumer.subscribe(&[&options.topic]).map_err(kafka_err)?;
    let mut summary = ConsumeSummary::default();
    let mut stream = consumer.stream();
    loop {
        if options.max_events.is_some_and(|max| summary.printed >= max) {
            break;
        }
        let next = match options.idle_timeout {
            Some(idle) => match tokio::time::timeout(idle, stream.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => stream.next().await,
        };
        let Some(message) = next else { break };
        let message = message.map_err(kafka_err)?;
        let payload = message.payload().unwrap_or_default();
        if let Some(schemas) = &options.schemas {
            let never = CancellationToken::new();
            schemas.learn([payload], &never, |_| {}).await;
        }
        let line = match options.kind {
            EventKind::Payment => decode(options, payload, Codec::decode_payment).map(|p| serde_json::to_string(&p)),
            EventKind::Scored => decode(options, payload, Codec::decode_scored).map(|s| {
                let keep = (!options.frauds_only || s.is_fraud)
                    && options.min_probability.is_none_or(|min| s.fraud_probability >= min);
                if keep {
                    serde_json::to_string(&s)
                } else {
                    Ok(String::new())
                }
            }),
        };
        match line {
            Ok(Ok(line)) if line.is_empty() => summary.filtered += 1,
            Ok(Ok(line)) => {
                writeln!(out, "{line}")?;
                summary.printed += 1;
            }
            Ok(Err(e)) => return Err(ConsumeError::Io(e.into())),
            Err(e) => {
                tracing::warn!(
                    partition = message.partition(),
                    offset = message.offset(),
                    error = %e,
                    "skipping an event that does not decode"
                );
                summary.undecodable += 1;
            }
        }
    }
    out.flush()?;
    drop(stream);
    consumer.unsubscribe();
    Ok(summary)
}
