//! Where events leave the pipeline: scored payments to the output topic, bad
//! input to the dead-letter topic, and the producer whose delivery callback
//! acknowledges each event's ticket.
//!
//! Why here, in one place: this is where fail-closed is decided. Bad input
//! (undecodable bytes, a payment the model's encoder rejects) is
//! dead-lettered with its reason. Our own failures (the model could not score
//! a batch, it returned a non-finite score, the producer could not enqueue
//! or deliver a record, the producer's state is fatal, the dead-letter guard
//! tripped) are reported to the pipeline's `Failure` and the event's ticket is
//! dropped unacknowledged: it is never dead-lettered, and its offset is never
//! committed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::failure::{Failure, PipelineFailure};
use super::guard::DeadLetterGuard;
use super::ticket::Ticket;
use super::transaction::Transactions;
use super::{Delivery as DeliveryMode, EventMetrics, PipelineConfig, PipelineCounters};
use crate::codec::{Codec, WireFormat};
use crate::payment::now_ms;
use crate::scoring::{ScoredBatch, ScoringError};
use crate::telemetry::metric;

/// Longest value of a `fraudstream.error` header: the error names the
/// offending value, which may be as large as the event itself.
pub const MAX_ERROR_HEADER_BYTES: usize = 1024;

/// Why an event was dead-lettered: always something about the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Not a payment in the input format (garbage, truncated, wrong schema).
    Undecodable,
    /// A payment the model's encoder rejects (unknown category, bad amount).
    InvalidPayment,
    /// The scored payment cannot be written in the output format.
    OutputEncoding,
    /// A label the monitor cannot join (no payment id or customer).
    InvalidLabel,
}

impl DeadLetterReason {
    /// The `fraudstream.error.reason` header and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::InvalidPayment => "invalid-payment",
            Self::OutputEncoding => "output-encoding",
            Self::InvalidLabel => "invalid-label",
        }
    }
}

/// An event on its way through the pipeline, with its ticket.
pub struct Event {
    pub ticket: Ticket,
    /// The assignment of its partition it was read under (`history::Position`).
    pub epoch: u64,
    pub key: Option<Vec<u8>>,
    /// Decoded by the batcher; kept for dead letters, which carry the original bytes.
    pub payload: Vec<u8>,
    pub headers: Option<OwnedHeaders>,
}

#[derive(Clone, Copy, PartialEq)]
enum DeliveryKind {
    Scored,
    DeadLetter,
}

/// The delivery opaque: the ticket rides with the record to the broker and back.
pub struct Delivery {
    ticket: Ticket,
    event_time: i64,
    kind: DeliveryKind,
}

impl Delivery {
    /// A relayed or scored record's delivery.
    pub fn output(ticket: Ticket, event_time: i64) -> Box<Self> {
        Box::new(Self { ticket, event_time, kind: DeliveryKind::Scored })
    }
}

/// The producer's callbacks: run on librdkafka's thread, so acknowledgements
/// never wait on the async runtime.
pub struct SinkHooks {
    failure: Arc<Failure>,
    metrics: EventMetrics,
    counters: Arc<PipelineCounters>,
    /// Exactly-once: told when each record's delivery is dealt with.
    transactions: Option<Arc<Transactions>>,
}

impl ClientContext for SinkHooks {
    fn error(&self, error: KafkaError, reason: &str) {
        // A fatal error (an idempotent producer that lost its sequence, say)
        // makes every later send fail: nothing can be delivered any more.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.failure.fail(PipelineFailure::ProducerFatal { reason: format!("{error}: {reason}") });
        } else {
            tracing::warn!(error = %error, reason, "output producer error (retried)");
        }
    }
}

impl ProducerContext for SinkHooks {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        self.deliver(result, *delivery);
        if let Some(transactions) = &self.transactions {
            transactions.settle();
        }
    }
}

impl SinkHooks {
    fn deliver(&self, result: &DeliveryResult<'_>, delivery: Delivery) {
        match result {
            Ok(_) => {
                match delivery.kind {
                    DeliveryKind::Scored => {
                        self.metrics.events_out.increment(1);
                        self.counters.scored.fetch_add(1, Ordering::Relaxed);
                        let latency = (now_ms() - delivery.event_time).max(0) as f64 / 1000.0;
                        self.metrics.end_to_end.record(latency);
                    }
                    DeliveryKind::DeadLetter => {
                        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                delivery.ticket.ack();
            }
            Err((e, message)) => {
                // With message.timeout.ms=0 librdkafka retries until it succeeds;
                // only permanent errors land here.
                use rdkafka::Message;
                metrics::counter!(metric::DELIVERY_FAILURES).increment(1);
                self.failure.fail(PipelineFailure::Delivery {
                    topic: message.topic().to_string(),
                    partition: delivery.ticket.partition(),
                    offset: delivery.ticket.offset(),
                    source: e.clone(),
                });
                // The ticket is dropped unacknowledged: its offset is never committed.
            }
        }
    }
}

type Record<'a> = BaseRecord<'a, [u8], [u8], Box<Delivery>>;

/// Output and dead-letter producer.
pub struct Sink {
    producer: ThreadedProducer<SinkHooks>,
    input_topic: String,
    output_topic: String,
    dead_letter_topic: String,
    output_codec: Codec,
    /// Confluent input: dead letters name the writer schema id.
    input_format: WireFormat,
    guard: Mutex<DeadLetterGuard>,
    failure: Arc<Failure>,
    /// Exactly-once: the open transaction every record joins.
    transactions: Option<Arc<Transactions>>,
}

impl Sink {
    pub fn create(
        config: &PipelineConfig,
        failure: Arc<Failure>,
        metrics: EventMetrics,
        counters: Arc<PipelineCounters>,
    ) -> Result<Self, KafkaError> {
        // The producer's queue holds what is in flight: size it to the same budget.
        let queue_messages = config.max_in_flight.saturating_add(1024).to_string();
        let queue_kbytes = (config.max_in_flight_bytes / 1024 * 2).clamp(16 * 1024, 2_097_151).to_string();
        let mut settings = vec![
            crate::kafka::PARTITIONER,
            ("enable.idempotence", "true"),
            ("linger.ms", "1"),
            ("compression.type", "lz4"),
            // Retry until delivered: an undeliverable output must never let its input be committed.
            ("message.timeout.ms", "0"),
            ("queue.buffering.max.messages", &queue_messages),
            ("queue.buffering.max.kbytes", &queue_kbytes),
        ];
        let exactly_once = config.delivery == DeliveryMode::ExactlyOnce;
        if exactly_once {
            settings.push(("transactional.id", &config.transaction.id));
            // A crashed member's open transaction blocks read_committed readers
            // of its partitions until the broker aborts it: keep that short.
            settings.push(("transaction.timeout.ms", "10000"));
        }
        let transactions = exactly_once.then(|| Arc::new(Transactions::new(config.transaction.clone())));
        let hooks = SinkHooks { failure: failure.clone(), metrics, counters, transactions: transactions.clone() };
        let producer: ThreadedProducer<SinkHooks> = config.kafka.client_config(&settings).create_with_context(hooks)?;
        if exactly_once {
            // Fences any earlier producer with this id and aborts its open transaction.
            producer.init_transactions(Duration::from_secs(30))?;
            producer.begin_transaction()?;
        }
        Ok(Self {
            producer,
            input_topic: config.input_topic.clone(),
            output_topic: config.output_topic.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            output_codec: config.output_codec,
            input_format: config.input_codec.format(),
            guard: Mutex::new(DeadLetterGuard::new(config.dead_letter_guard)),
            failure,
            transactions,
        })
    }

    /// Exactly-once: the open transaction.
    pub fn transactions(&self) -> Option<&Transactions> {
        self.transactions.as_deref()
    }

    /// Exactly-once: commits the open transaction with the input `positions`
    /// (a no-op at least once).
    pub fn commit_transaction(
        &self,
        tracker: &super::offsets::OffsetTracker,
        group: Option<rdkafka::consumer::ConsumerGroupMetadata>,
    ) -> Result<(), PipelineFailure> {
        match &self.transactions {
            Some(transactions) => transactions.commit(&self.producer, tracker, group),
            None => Ok(()),
        }
    }

    /// Exactly-once: aborts the open transaction; whether that succeeded
    /// (false at least once).
    pub fn abort_transaction(&self) -> bool {
        self.transactions.as_ref().is_some_and(|t| t.abort(&self.producer))
    }

    pub fn output_topic(&self) -> &str {
        &self.output_topic
    }

    /// Enqueues `record`; gives it back only when librdkafka's queue is full
    /// (try again shortly). Any other error fails the pipeline.
    fn enqueue<'a>(&self, record: Record<'a>) -> Option<Record<'a>> {
        let _open_transaction = self.transactions.as_deref().map(Transactions::gate);
        match self.producer.send(record) {
            Ok(()) => {
                if let Some(transactions) = &self.transactions {
                    transactions.sent_one();
                }
                None
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => Some(back),
            Err((source, back)) => {
                metrics::counter!(metric::DELIVERY_FAILURES).increment(1);
                let bytes = back.payload.map_or(0, <[u8]>::len);
                let ticket = &back.delivery_opaque.ticket;
                self.failure.fail(PipelineFailure::Enqueue {
                    topic: back.topic.to_string(),
                    bytes,
                    partition: ticket.partition(),
                    offset: ticket.offset(),
                    source,
                });
                None
            }
        }
    }

    /// Sends a record, waiting (asynchronously) while the queue is full.
    async fn send(&self, mut record: Record<'_>) {
        while let Some(back) = self.enqueue(record) {
            record = back;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Sends a record from a thread outside the runtime (the relay's consumer thread).
    pub fn send_blocking(&self, topic: &str, key: Option<&[u8]>, payload: &[u8], delivery: Box<Delivery>) {
        let mut record = record(topic, key, payload, None, delivery);
        while let Some(back) = self.enqueue(record) {
            record = back;
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends the original event to the dead-letter topic with headers naming the error.
    pub async fn dead_letter(&self, event: Event, event_time: i64, reason: DeadLetterReason, error: &str) {
        if let Err(tripped) = self.guard.lock().expect("dead-letter guard lock").dead_lettered() {
            // Not sent: the event stays uncommitted for after the upstream fix.
            self.failure.fail(tripped);
            return;
        }
        metrics::counter!(metric::EVENTS_DEAD_LETTERED, "reason" => reason.as_str()).increment(1);
        tracing::debug!(
            partition = event.ticket.partition(),
            offset = event.ticket.offset(),
            reason = reason.as_str(),
            error,
            "dead-lettering event"
        );
        let headers = self.dead_letter_headers(&event, reason, error);
        let delivery = Box::new(Delivery { ticket: event.ticket, event_time, kind: DeliveryKind::DeadLetter });
        self.send(record(&self.dead_letter_topic, event.key.as_deref(), &event.payload, Some(headers), delivery)).await;
    }

    fn dead_letter_headers(&self, event: &Event, reason: DeadLetterReason, error: &str) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = &event.headers {
            for h in original.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        let partition = event.ticket.partition().to_string();
        let offset = event.ticket.offset().to_string();
        if self.input_format == WireFormat::Confluent {
            if let Some(id) = crate::registry::WriterSchemas::schema_id(&event.payload) {
                headers = headers.insert(Header { key: "fraudstream.schema.id", value: Some(id.to_string().as_str()) });
            }
        }
        headers
            .insert(Header { key: "fraudstream.error", value: Some(truncate(error, MAX_ERROR_HEADER_BYTES)) })
            .insert(Header { key: "fraudstream.error.reason", value: Some(reason.as_str()) })
            .insert(Header { key: "fraudstream.source.topic", value: Some(self.input_topic.as_str()) })
            .insert(Header { key: "fraudstream.source.partition", value: Some(partition.as_str()) })
            .insert(Header { key: "fraudstream.source.offset", value: Some(offset.as_str()) })
    }

    /// Produces the results of one scored batch, in order. A batch the model
    /// could not score, or a score that is not a probability, fails the
    /// pipeline: the model is ours, the payments are valid. Undecodable
    /// events (with their error) are dead-lettered in their place.
    pub async fn emit(
        &self,
        events: Vec<(Event, Option<String>)>,
        batch: Result<ScoredBatch, ScoringError>,
        counters: &PipelineCounters,
    ) {
        let batch = match batch {
            Ok(batch) => batch,
            Err(source) => {
                let first = events.first().map(|(e, _)| (e.ticket.partition(), e.ticket.offset())).unwrap_or((-1, -1));
                self.failure.fail(PipelineFailure::Scoring {
                    topic: self.input_topic.clone(),
                    partition: first.0,
                    offset: first.1,
                    events: events.len(),
                    source,
                });
                return; // the tickets drop unacknowledged
            }
        };
        let scored_at = now_ms();
        let mut scored = 0;
        // One output value per batch, its payment and score replaced per
        // event: the model's name and version are not copied per event.
        let mut reused: Option<crate::payment::ScoredPayment> = None;
        let shadow = batch.shadow;
        let mut scores = batch.payments.into_iter().zip(batch.results).zip(batch.reasons).enumerate();
        for (event, undecodable) in events {
            if let Some(error) = undecodable {
                self.dead_letter(event, now_ms(), DeadLetterReason::Undecodable, &error).await;
                continue;
            }
            let Some((i, ((payment, result), reasons))) = scores.next() else {
                return; // fewer scores than payments: the remaining tickets drop, the pipeline stops
            };
            match result {
                Ok(p) => {
                    let event_time = payment.event_time;
                    let shadow = shadow.as_ref().and_then(|s| s.of(i));
                    let output = match reused.as_mut() {
                        Some(output) => {
                            output.payment = payment;
                            batch.model.rescore(output, p[1], reasons, shadow);
                            output
                        }
                        None => reused.insert(batch.model.verdict(payment, p[1], reasons, shadow, scored_at)),
                    };
                    let metrics = &self.producer.context().metrics;
                    metrics.fraud_probability.record(output.fraud_probability);
                    if let Some(decision) = output.decision {
                        metrics.decided(decision).increment(1);
                    }
                    if output.is_fraud {
                        metrics.fraud_flagged.increment(1);
                        counters.flagged.fetch_add(1, Ordering::Relaxed);
                    }
                    match self.output_codec.encode_scored(output) {
                        Ok(bytes) => {
                            scored += 1;
                            let delivery = Delivery::output(event.ticket, event_time);
                            let key = event.key.as_deref();
                            self.send(record(&self.output_topic, key, &bytes, None, delivery)).await;
                        }
                        Err(e) => {
                            self.dead_letter(event, event_time, DeadLetterReason::OutputEncoding, &e.to_string()).await
                        }
                    }
                }
                Err(e) => {
                    let event_time = payment.event_time;
                    self.dead_letter(event, event_time, DeadLetterReason::InvalidPayment, &e.to_string()).await
                }
            }
        }
        self.guard.lock().expect("dead-letter guard lock").scored(scored);
    }

    /// Waits for queued records to be delivered, up to `timeout`.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

fn record<'a>(
    topic: &'a str,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
    headers: Option<OwnedHeaders>,
    delivery: Box<Delivery>,
) -> Record<'a> {
    let mut record = BaseRecord::with_opaque_to(topic, delivery).payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(headers) = headers {
        record = record.headers(headers);
    }
    record
}

/// At most `max` bytes of `text`, cut at a character boundary, marked when cut.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_headers_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("short", 1024), "short");
        let long = "é".repeat(1000); // 2,000 bytes
        let cut = truncate(&long, MAX_ERROR_HEADER_BYTES);
        assert!(cut.len() <= MAX_ERROR_HEADER_BYTES && cut.len() >= MAX_ERROR_HEADER_BYTES - 1);
        assert!(long.starts_with(cut));
    }

    /// librdkafka's own fatal error (an idempotent producer raises one when it
    /// can no longer guarantee order): the next output cannot be sent, and
    /// that stops the pipeline instead of consuming on with no output.
    #[test]
    fn after_a_fatal_producer_error_the_next_output_stops_the_pipeline() {
        use super::super::ticket::{Acks, InFlightLimits};
        use rdkafka::bindings::{rd_kafka_resp_err_t, rd_kafka_test_fatal_error};
        let failure = Arc::new(Failure::default());
        // No broker needed: the fatal error is raised inside the client.
        let config = PipelineConfig { kafka: crate::kafka::KafkaArgs::new("127.0.0.1:1"), ..PipelineConfig::default() };
        let sink = Sink::create(&config, failure.clone(), EventMetrics::new(), Arc::default()).unwrap();
        let acks = Arc::new(Acks::new("in", InFlightLimits { events: 10, bytes: 1 << 20 }, failure.clone()));
        let reason = std::ffi::CString::new("injected: out-of-order sequence").unwrap();
        let raised = unsafe {
            rd_kafka_test_fatal_error(
                sink.producer.client().native_ptr(),
                rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            )
        };
        assert_eq!(raised, rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        let ticket = acks.issue(0, 7, 3, Duration::ZERO).unwrap();
        sink.send_blocking("out", None, b"abc", Delivery::output(ticket, 0));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while failure.get().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let failed = failure.get().expect("a producer in a fatal state did not stop the pipeline");
        assert!(failed.to_string().contains("atal"), "{failed}");
        assert!(failure.stopped().is_cancelled());
        assert_eq!(acks.tracker().finish(0, 8), None, "offset 7 was never acknowledged, so nothing past it commits");
    }

    #[test]
    fn dead_letter_reasons_have_stable_names() {
        let names: Vec<&str> = [
            DeadLetterReason::Undecodable,
            DeadLetterReason::InvalidPayment,
            DeadLetterReason::OutputEncoding,
            DeadLetterReason::InvalidLabel,
        ]
        .into_iter()
        .map(DeadLetterReason::as_str)
        .collect();
        assert_eq!(names, ["undecodable", "invalid-payment", "output-encoding", "invalid-label"]);
    }
}
