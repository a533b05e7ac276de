//! Publishing payments to Kafka: the `fraudstream produce` tool, the demo's
//! traffic source and the benchmarks' load generator.
//!
//! Keyed by customer (so one customer's payments stay in order on one
//! partition), with an idempotent producer and an optional target rate.

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::codec::{Codec, CodecError};
use crate::kafka::KafkaArgs;
use crate::payment::{now_ms, Payment};

/// How many deliveries may be awaited at once before sending waits.
const MAX_IN_FLIGHT: usize = 50_000;

/// What a publishing run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProduceSummary {
    pub sent: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

impl ProduceSummary {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for ProduceSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} payments, {} failed, in {:.2} s ({:.0} payments/s)",
            self.sent,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}

/// Publishing failures that stop a run (single failed deliveries are counted instead).
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("cannot create Kafka producer for {brokers}: {source}")]
    Client { brokers: String, source: KafkaError },
    #[error("cannot encode payment {payment_id:?}: {source}")]
    Encode { payment_id: String, source: CodecError },
}

/// Options for one publishing run.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub topic: String,
    pub codec: Codec,
    /// Target events per second; `None` sends as fast as the broker takes them.
    pub rate: Option<f64>,
    /// Stamp each payment's event time with the send time (live traffic) instead
    /// of keeping the source's.
    pub stamp_event_time: bool,
}

/// The idempotent producer used for payments and scored payments alike.
pub fn create_producer(kafka: &KafkaArgs) -> Result<FutureProducer, ProduceError> {
    kafka
        .client_config(&[
            ("enable.idempotence", "true"),
            ("linger.ms", "2"),
            ("compression.type", "lz4"),
            ("queue.buffering.max.messages", "500000"),
            ("message.timeout.ms", "60000"),
        ])
        .create()
        .map_err(|source| ProduceError::Client { brokers: kafka.brokers.clone(), source })
}

/// Publishes `payments`, calling `progress(sent_so_far)` now and then.
pub async fn publish_payments(
    producer: &FutureProducer,
    options: &PublishOptions,
    payments: impl IntoIterator<Item = Payment>,
    mut progress: impl FnMut(u64),
) -> Result<ProduceSummary, ProduceError> {
    let start = Instant::now();
    let mut summary = ProduceSummary::default();
    let mut in_flight = FuturesUnordered::new();
    let mut queued: u64 = 0;
    let settle = |result: Result<_, _>, summary: &mut ProduceSummary| match result {
        Ok(Ok(_)) => summary.sent += 1,
        Ok(Err((e, _))) => {
            tracing::warn!(error = %e, "payment delivery failed");
            summary.failed += 1;
        }
        Err(_) => summary.failed += 1,
    };
    for mut payment in payments {
        if let Some(rate) = options.rate {
            let due = start + Duration::from_secs_f64(queued as f64 / rate);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        // Stamped after the rate limiter's wait: the event happens when it is sent.
        if options.stamp_event_time {
            payment.event_time = now_ms();
        }
        let payload = options
            .codec
            .encode_payment(&payment)
            .map_err(|source| ProduceError::Encode { payment_id: payment.payment_id.clone(), source })?;
        let mut record = FutureRecord::to(&options.topic).key(&payment.customer).payload(&payload);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    // The local queue is full: wait for a delivery to free room.
                    match in_flight.next().await {
                        Some(result) => settle(result, &mut summary),
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, payment_id = %payment.payment_id, "cannot enqueue payment");
                    summary.failed += 1;
                    break;
                }
            }
        }
        queued += 1;
        while in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(result) = in_flight.next().await {
                settle(result, &mut summary);
            }
        }
        if queued % 1024 == 0 {
            progress(summary.sent);
        }
    }
    while let Some(result) = in_flight.next().await {
        settle(result, &mut summary);
    }
    progress(summary.sent);
    summary.elapsed = start.elapsed();
    Ok(summary)
}
