//! Publishing payments to Kafka: the `fraudstream produce` tool, the demo's
//! traffic source and the benchmarks' load generator.
//!
//! Keyed by customer (so one customer's payments stay in order on one
//! partition), with an idempotent producer and an optional target rate.
//! With a labels topic, each payment's ground truth follows it there after a
//! delay, as chargebacks and analysts' verdicts follow real payments.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::codec::{Codec, CodecError};
use crate::kafka::KafkaArgs;
use crate::payment::{now_ms, Payment, PaymentLabel};

/// How many deliveries may be awaited at once before sending waits.
const MAX_IN_FLIGHT: usize = 50_000;

/// What a publishing run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProduceSummary {
    pub sent: u64,
    pub failed: u64,
    /// Labels delivered to the labels topic (and those that failed).
    pub labels_sent: u64,
    pub labels_failed: u64,
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
        )?;
        if self.labels_sent + self.labels_failed > 0 {
            write!(f, "; {} labels, {} failed", self.labels_sent, self.labels_failed)?;
        }
        Ok(())
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
    /// Also publish each labelled payment's ground truth, later.
    pub labels: Option<LabelStream>,
}

/// Where and when the payments' labels follow them.
#[derive(Debug, Clone)]
pub struct LabelStream {
    pub topic: String,
    pub codec: Codec,
    /// How long after its payment each label is sent.
    pub delay: Duration,
    /// The labels' `source` field.
    pub source: String,
}

/// The idempotent producer used for payments, labels and scored payments alike.
pub fn create_producer(kafka: &KafkaArgs) -> Result<FutureProducer, ProduceError> {
    kafka
        .client_config(&[
            crate::kafka::PARTITIONER,
            ("enable.idempotence", "true"),
            ("linger.ms", "2"),
            ("compression.type", "lz4"),
            ("queue.buffering.max.messages", "500000"),
            ("message.timeout.ms", "60000"),
        ])
        .create()
        .map_err(|source| ProduceError::Client { brokers: kafka.brokers.clone(), source })
}

/// What a delivery was for.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Payment,
    Label,
}

/// Sends records and counts their deliveries, keeping at most
/// `MAX_IN_FLIGHT` awaited at once.
struct Sender<'a> {
    producer: &'a FutureProducer,
    in_flight: FuturesUnordered<BoxFuture<'a, (Sent, bool)>>,
    summary: ProduceSummary,
}

impl<'a> Sender<'a> {
    fn settle(&mut self, (sent, ok): (Sent, bool)) {
        let s = &mut self.summary;
        match (sent, ok) {
            (Sent::Payment, true) => s.sent += 1,
            (Sent::Payment, false) => s.failed += 1,
            (Sent::Label, true) => s.labels_sent += 1,
            (Sent::Label, false) => s.labels_failed += 1,
        }
    }

    async fn send(&mut self, what: Sent, topic: &str, key: &str, payload: &[u8], id: &str) {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    let id = id.to_string();
                    self.in_flight.push(Box::pin(async move {
                        match delivery.await {
                            Ok(Ok(_)) => (what, true),
                            Ok(Err((e, _))) => {
                                tracing::warn!(error = %e, id, ?what, "delivery failed");
                                (what, false)
                            }
                            Err(_) => (what, false),
                        }
                    }));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    // The local queue is full: wait for a delivery to free room.
                    match self.in_flight.next().await {
                        Some(result) => self.settle(result),
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, id, ?what, "cannot enqueue");
                    self.settle((what, false));
                    break;
                }
            }
        }
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(result) = self.in_flight.next().await {
                self.settle(result);
            }
        }
    }

    /// Sends the labels whose time has come (all of them with `all`, waiting for each).
    async fn send_labels(&mut self, stream: &LabelStream, due: &mut VecDeque<(Instant, PaymentLabel)>, all: bool) {
        while let Some((at, _)) = due.front() {
            let now = Instant::now();
            if *at > now {
                if !all {
                    return;
                }
                tokio::time::sleep(*at - now).await;
            }
            let (_, mut label) = due.pop_front().expect("checked above");
            label.labelled_at = now_ms();
            match stream.codec.encode_label(&label) {
                Ok(payload) => {
                    self.send(Sent::Label, &stream.topic, &label.customer, &payload, &label.payment_id).await
                }
                Err(e) => {
                    tracing::warn!(error = %e, payment_id = %label.payment_id, "cannot encode label");
                    self.settle((Sent::Label, false));
                }
            }
        }
    }
}

/// Publishes `payments` (and, with `options.labels`, their labels after the
/// delay), calling `progress(sent_so_far)` now and then. Returns when every
/// record is delivered or failed for good.
pub async fn publish_payments(
    producer: &FutureProducer,
    options: &PublishOptions,
    payments: impl IntoIterator<Item = Payment>,
    mut progress: impl FnMut(u64),
) -> Result<ProduceSummary, ProduceError> {
    let start = Instant::now();
    let mut sender = Sender { producer, in_flight: FuturesUnordered::new(), summary: ProduceSummary::default() };
    let mut due = VecDeque::new();
    let mut queued: u64 = 0;
    for mut payment in payments {
        if let Some(rate) = options.rate {
            let at = start + Duration::from_secs_f64(queued as f64 / rate);
            let now = Instant::now();
            if at > now {
                tokio::time::sleep(at - now).await;
            }
        }
        if let Some(stream) = &options.labels {
            sender.send_labels(stream, &mut due, false).await;
        }
        // Stamped after the rate limiter's wait: the event happens when it is sent.
        if options.stamp_event_time {
            payment.event_time = now_ms();
        }
        // With a labels topic the payment goes out unlabelled, as live payments do; its label follows.
        let label = options.labels.as_ref().and_then(|stream| PaymentLabel::of(&payment, &stream.source));
        if options.labels.is_some() {
            payment.fraud = None;
        }
        let payload = options
            .codec
            .encode_payment(&payment)
            .map_err(|source| ProduceError::Encode { payment_id: payment.payment_id.clone(), source })?;
        sender.send(Sent::Payment, &options.topic, &payment.customer, &payload, &payment.payment_id).await;
        if let (Some(stream), Some(label)) = (&options.labels, label) {
            due.push_back((Instant::now() + stream.delay, label));
        }
        queued += 1;
        if queued % 1024 == 0 {
            progress(sender.summary.sent);
        }
    }
    if let Some(stream) = &options.labels {
        sender.send_labels(stream, &mut due, true).await;
    }
    while let Some(result) = sender.in_flight.next().await {
        sender.settle(result);
    }
    progress(sender.summary.sent);
    let mut summary = sender.summary;
    summary.elapsed = start.elapsed();
    Ok(summary)
}
