//! Labelled payments from a Kafka topic: `--data kafka://payments-labelled`,
//! where `fraudstream monitor` writes scored payments joined with their late
//! labels (ScoredPayment records with `payment.fraud` set, keyed by customer,
//! in the scorer's wire format).
//!
//! Why a bounded read, not a consumer group: the trainer is a batch job. Each
//! run reads every partition from the first offset whose timestamp is within
//! `--since` (`offsets_for_times`) up to the high watermark taken at the
//! start, so it ends however fast the topic grows, and commits nothing.
//!
//! Rules, in order: records older than the window (by their Kafka timestamp,
//! CreateTime or LogAppendTime) are left out; a payment seen more than once
//! keeps its last record (the highest offset in its partition; across
//! partitions, the later timestamp), so a corrected label replaces the old
//! one; payments whose last record carries no label are skipped and counted.
//! A record that does not decode fails the run, naming topic, partition and
//! offset: a batch job has no dead-letter topic to hide it in, and training
//! on what happens to decode would silently train on less than asked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::{Result, TrainingError};
use crate::codec::{Codec, SCORED_PAYMENT_SCHEMA_JSON};
use crate::kafka::{EndOfPartitionIsNoError, KafkaArgs};
use crate::registry::{RegistryConfig, SchemaRegistry, WriterSchemas};
use crate::Payment;

/// The URL scheme of a topic data source: `kafka://<topic>`.
pub const SCHEME: &str = "kafka://";
/// Broker calls (metadata, watermarks, offsets) give up after this long.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// A read that gets nothing for this long while partitions are unfinished
/// fails (an unreachable broker, or a transaction left open).
const STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A topic of labelled scored payments and how to read it.
#[derive(Debug, Clone)]
pub struct LabelledTopic {
    pub kafka: KafkaArgs,
    pub topic: String,
    /// Only records whose Kafka timestamp is at most this old.
    pub since: Duration,
    /// The topic's wire format (the monitor's output format).
    pub codec: Codec,
    /// With a schema registry: each record read by its writer schema.
    pub registry: Option<RegistryConfig>,
}

impl LabelledTopic {
    /// The topic of `kafka://<topic>`: `None` if `location` is not such a URL,
    /// an error if it names no topic.
    pub fn topic_of(location: &str) -> Option<Result<String>> {
        let topic = location.strip_prefix(SCHEME)?;
        Some(if topic.is_empty() || topic.contains('/') {
            Err(TrainingError::Data {
                location: location.into(),
                message: "expected kafka://<topic>, e.g. kafka://payments-labelled".into(),
            })
        } else {
            Ok(topic.to_string())
        })
    }
}

impl std::fmt::Display for LabelledTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{} (since {})", self.topic, humantime::format_duration(self.since))
    }
}

/// What a read found besides the payments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicReadStats {
    /// Records read within the window.
    pub records: u64,
    /// Records past the start offset but older than the window.
    pub older: u64,
    /// Records replaced by a later record of the same payment.
    pub replaced: u64,
    /// Payments whose last record has no label.
    pub unlabelled: u64,
}

/// One record as read, before decoding.
struct Raw {
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    payload: Vec<u8>,
}

/// Every labelled payment of the window, sorted by event time then id.
pub(super) async fn load(
    source: &LabelledTopic,
    on_record: Arc<dyn Fn() + Send + Sync>,
) -> Result<(Vec<Payment>, TopicReadStats)> {
    let cutoff = crate::payment::now_ms() - i64::try_from(source.since.as_millis()).unwrap_or(i64::MAX);
    let schemas = match &source.registry {
        Some(config) if source.codec.format() == crate::WireFormat::Confluent => {
            let registry = SchemaRegistry::new(config.clone()).map_err(|e| data_err(source, e.to_string()))?;
            Some(Arc::new(WriterSchemas::new(registry, SCORED_PAYMENT_SCHEMA_JSON)))
        }
        _ => None,
    };
    let reader = source.clone();
    let runtime = tokio::runtime::Handle::current();
    let started = Instant::now();
    let (records, older) = tokio::task::spawn_blocking(move || {
        read_and_decode(&reader, cutoff, schemas.as_deref(), &runtime, &*on_record)
    })
    .await
    .map_err(|e| data_err(source, format!("the reading task failed: {e}")))??;
    let mut stats = TopicReadStats { records: records.len() as u64, older, ..TopicReadStats::default() };

    // The last record of each payment wins: the index of each payment's winner.
    let mut winner: HashMap<&str, usize> = HashMap::with_capacity(records.len());
    for (i, record) in records.iter().enumerate() {
        match winner.entry(record.payment.payment_id.as_str()) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(i);
            }
            std::collections::hash_map::Entry::Occupied(mut slot) => {
                stats.replaced += 1;
                if record.is_later_than(&records[*slot.get()]) {
                    slot.insert(i);
                }
            }
        }
    }
    let mut keep = vec![false; records.len()];
    for i in winner.into_values() {
        keep[i] = true;
    }
    let mut payments: Vec<Payment> = Vec::with_capacity(records.len());
    for (record, kept) in records.into_iter().zip(keep) {
        if !kept {
            continue;
        }
        if record.payment.fraud.is_none() {
            stats.unlabelled += 1;
        } else {
            payments.push(record.payment);
        }
    }
    if stats.unlabelled > 0 {
        tracing::warn!(
            topic = %source.topic,
            unlabelled = stats.unlabelled,
            "skipped payments whose last record carries no label (payment.fraud is null)"
        );
    }
    // A fixed order, so the same records always hash and split the same.
    payments.sort_unstable_by(|a, b| (a.event_time, &a.payment_id).cmp(&(b.event_time, &b.payment_id)));
    tracing::info!(
        topic = %source.topic,
        records = stats.records,
        older = stats.older,
        replaced = stats.replaced,
        unlabelled = stats.unlabelled,
        payments = payments.len(),
        seconds = started.elapsed().as_secs_f64(),
        "read labelled payments from Kafka"
    );
    Ok((payments, stats))
}

fn data_err(source: &LabelledTopic, message: impl Into<String>) -> TrainingError {
    TrainingError::Data { location: format!("{SCHEME}{}", source.topic), message: message.into() }
}

/// A decoded record: the payment, and where it was on the topic.
struct Decoded {
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    payment: Payment,
}

impl Decoded {
    /// Whether this record of a payment supersedes `other`: by offset in the
    /// same partition, else by timestamp (then partition, for a fixed order).
    fn is_later_than(&self, other: &Decoded) -> bool {
        if self.partition == other.partition {
            self.offset > other.offset
        } else {
            (self.timestamp, self.partition) > (other.timestamp, other.partition)
        }
    }
}

/// Records handed to a decoding thread at once.
const BATCH: usize = 8_192;

/// Decodes one batch; a failure names its record.
fn decode_batch(
    batch: Vec<Raw>,
    codec: Codec,
    schemas: Option<&WriterSchemas>,
) -> std::result::Result<Vec<Decoded>, (i32, i64, String)> {
    let fast = |bytes: &[u8]| codec.decode_scored(bytes).map_err(|e| e.to_string());
    batch
        .into_iter()
        .map(|r| match crate::registry::read_with(schemas, &r.payload, fast) {
            Ok(scored) => Ok(Decoded {
                partition: r.partition,
                offset: r.offset,
                timestamp: r.timestamp,
                payment: scored.payment,
            }),
            Err(reason) => Err((r.partition, r.offset, reason)),
        })
        .collect()
}

/// Reads the window and decodes it at once: this thread polls, one thread
/// per core decodes batches as they fill. Returns the records in the order
/// read, and how many were older than the window.
fn read_and_decode(
    source: &LabelledTopic,
    cutoff_ms: i64,
    schemas: Option<&WriterSchemas>,
    runtime: &tokio::runtime::Handle,
    on_record: &dyn Fn(),
) -> Result<(Vec<Decoded>, u64)> {
    let codec = source.codec;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (send, receive) = std::sync::mpsc::sync_channel::<(usize, Vec<Raw>)>(threads * 2);
    let receive = std::sync::Mutex::new(receive);
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    let mut error = None;
                    // Every batch is taken, even after a failure, so the poller never waits on a full queue.
                    while let Ok((seq, batch)) = receive.lock().expect("batch queue").recv() {
                        if error.is_some() {
                            continue;
                        }
                        match decode_batch(batch, codec, schemas) {
                            Ok(decoded) => done.push((seq, decoded)),
                            Err(e) => {
                                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                                error = Some((seq, e));
                            }
                        }
                    }
                    (done, error)
                })
            })
            .collect();
        let mut seq = 0;
        let read = read_window(source, cutoff_ms, schemas, runtime, on_record, &failed, |batch| {
            // A send fails only when every worker is gone, which a panic would show below.
            let _ = send.send((seq, batch));
            seq += 1;
        });
        drop(send);
        let mut batches = Vec::with_capacity(seq);
        let mut first_error: Option<(usize, (i32, i64, String))> = None;
        for worker in workers {
            let (done, error) = worker.join().expect("decoding never panics");
            batches.extend(done);
            if let Some((at, e)) = error {
                if first_error.as_ref().is_none_or(|(first, _)| at < *first) {
                    first_error = Some((at, e));
                }
            }
        }
        if let Some((_, (partition, offset, reason))) = first_error {
            return Err(TrainingError::Record {
                topic: source.topic.clone(),
                partition,
                offset,
                reason,
                format: crate::choice::Choice::name(codec.format()).to_string(),
            });
        }
        let older = read?;
        batches.sort_unstable_by_key(|(seq, _)| *seq);
        let mut records = Vec::with_capacity(batches.iter().map(|(_, b)| b.len()).sum());
        for (_, batch) in batches {
            records.extend(batch);
        }
        Ok((records, older))
    })
}

/// Reads every record from the window's start offsets to the high
/// watermarks taken first (blocking: librdkafka's own threads fetch), and
/// hands them to `emit` in batches, leaving out those older than the window
/// (returns how many). With a registry, each new writer schema id is
/// learned before its record is handed on. Stops early once `failed`.
fn read_window(
    source: &LabelledTopic,
    cutoff_ms: i64,
    schemas: Option<&WriterSchemas>,
    runtime: &tokio::runtime::Handle,
    on_record: &dyn Fn(),
    failed: &std::sync::atomic::AtomicBool,
    mut emit: impl FnMut(Vec<Raw>),
) -> Result<u64> {
    let kafka_err = |what: &str, e: KafkaError| {
        data_err(source, format!("{what} on {}: {e} (is the broker reachable? check --brokers)", source.kafka.brokers))
    };
    let group = format!("fraudstream-trainer-{}", uuid::Uuid::new_v4().simple());
    let consumer: BaseConsumer<EndOfPartitionIsNoError> = source
        .kafka
        .client_config(&[
            ("group.id", &group),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("isolation.level", "read_committed"),
            ("enable.partition.eof", "true"),
            // Large fetches: a bulk read, not a low-latency stream.
            ("fetch.max.bytes", "104857600"),
            ("max.partition.fetch.bytes", "16777216"),
            ("queued.max.messages.kbytes", "524288"),
        ])
        .create_with_context(EndOfPartitionIsNoError)
        .map_err(|e| kafka_err("creating a consumer", e))?;

    let metadata =
        consumer.fetch_metadata(Some(&source.topic), BROKER_TIMEOUT).map_err(|e| kafka_err("reading metadata", e))?;
    let topic = metadata.topics().iter().find(|t| t.name() == source.topic);
    let partitions: Vec<i32> = match topic {
        Some(t) if t.error().is_none() => t.partitions().iter().map(|p| p.id()).collect(),
        Some(t) if t.error().map(RDKafkaErrorCode::from) == Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
            Vec::new()
        }
        Some(t) => {
            let code = t.error().map(RDKafkaErrorCode::from);
            return Err(data_err(source, format!("the broker reports {code:?} for the topic")));
        }
        None => Vec::new(),
    };
    if partitions.is_empty() {
        return Err(TrainingError::NoPayments {
            location: format!("{SCHEME}{}", source.topic),
            detail: format!("the topic does not exist on {}", source.kafka.brokers),
        });
    }

    // The end of the read: each partition's high watermark now.
    let (mut low, mut high) = (HashMap::new(), HashMap::new());
    for &p in &partitions {
        let (l, h) = consumer
            .fetch_watermarks(&source.topic, p, BROKER_TIMEOUT)
            .map_err(|e| kafka_err(&format!("reading the watermarks of partition {p}"), e))?;
        low.insert(p, l);
        high.insert(p, h);
    }
    // The start: the first offset at or after the cutoff (End: none is). A
    // window reaching back before 1970 is the whole topic, read from the
    // beginning without a time lookup (which some brokers, librdkafka's mock
    // cluster among them, do not answer).
    let mut wanted = TopicPartitionList::new();
    for &p in &partitions {
        let start = if cutoff_ms <= 0 { low[&p] } else { cutoff_ms };
        wanted
            .add_partition_offset(&source.topic, p, Offset::Offset(start))
            .map_err(|e| kafka_err("building the offset query", e))?;
    }
    let starts = match cutoff_ms <= 0 {
        true => wanted,
        false => consumer.offsets_for_times(wanted, BROKER_TIMEOUT).map_err(|e| kafka_err("offsets_for_times", e))?,
    };
    let mut assignment = TopicPartitionList::new();
    let mut open: HashMap<i32, i64> = HashMap::new();
    for element in starts.elements() {
        let p = element.partition();
        let end = high[&p];
        if let Offset::Offset(start) = element.offset() {
            if start < end {
                assignment
                    .add_partition_offset(&source.topic, p, Offset::Offset(start))
                    .map_err(|e| kafka_err("building the assignment", e))?;
                open.insert(p, end);
            }
        }
    }
    let mut older = 0;
    if open.is_empty() {
        return Ok(older);
    }
    let mut batch = Vec::with_capacity(BATCH);
    let mut learned = std::collections::HashSet::new();
    consumer.assign(&assignment).map_err(|e| kafka_err("assigning the partitions", e))?;
    let mut last_progress = Instant::now();
    while !open.is_empty() && !failed.load(std::sync::atomic::Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(500)) {
            None => {
                if last_progress.elapsed() > STALL_TIMEOUT {
                    let mut unfinished: Vec<i32> = open.keys().copied().collect();
                    unfinished.sort_unstable();
                    return Err(data_err(
                        source,
                        format!(
                            "no record for {STALL_TIMEOUT:?} while partitions {unfinished:?} are not read to their high watermarks (a transaction left open, or the broker went away)"
                        ),
                    ));
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // The end of the log (for read_committed, of what is committed):
                // done once the position passed the watermark taken at the start.
                if let Some(end) = open.get(&p).copied() {
                    let position = consumer
                        .position()
                        .ok()
                        .and_then(|tpl| tpl.find_partition(&source.topic, p).map(|e| e.offset()));
                    if matches!(position, Some(Offset::Offset(o)) if o >= end) {
                        open.remove(&p);
                    }
                }
            }
            Some(Err(e)) => return Err(kafka_err("reading", e)),
            Some(Ok(message)) => {
                last_progress = Instant::now();
                let p = message.partition();
                let Some(end) = open.get(&p).copied() else { continue };
                if message.offset() >= end {
                    open.remove(&p);
                    continue;
                }
                if message.offset() + 1 >= end {
                    open.remove(&p);
                }
                on_record();
                let timestamp = message.timestamp().to_millis();
                if timestamp.is_some_and(|t| t < cutoff_ms) {
                    older += 1;
                    continue;
                }
                let payload = message.payload().unwrap_or_default();
                if let Some(schemas) = schemas {
                    learn(source, schemas, runtime, payload, &mut learned)?;
                }
                batch.push(Raw { partition: p, offset: message.offset(), timestamp, payload: payload.to_vec() });
                if batch.len() == BATCH {
                    emit(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
                }
            }
        }
    }
    if !batch.is_empty() {
        emit(batch);
    }
    Ok(older)
}

/// Fetches the writer schema of `payload` from the registry the first time its id shows up.
fn learn(
    source: &LabelledTopic,
    schemas: &WriterSchemas,
    runtime: &tokio::runtime::Handle,
    payload: &[u8],
    learned: &mut std::collections::HashSet<u32>,
) -> Result<()> {
    let Some(id) = WriterSchemas::schema_id(payload) else { return Ok(()) };
    if !learned.insert(id) {
        return Ok(());
    }
    // Retried while the registry is unreachable, but a batch job gives up in the end.
    let never = CancellationToken::new();
    let learning = tokio::time::timeout(BROKER_TIMEOUT, schemas.learn([payload], &never, |_| {}));
    runtime.block_on(learning).map(|_| ()).map_err(|_| {
        let url = source.registry.as_ref().map_or("", |r| r.url.as_str());
        data_err(source, format!("schema registry {url} did not answer within {BROKER_TIMEOUT:?} (schema id {id})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_urls_name_a_topic() {
        assert_eq!(LabelledTopic::topic_of("kafka://payments-labelled").unwrap().unwrap(), "payments-labelled");
        assert!(LabelledTopic::topic_of("s3://b/k").is_none());
        assert!(LabelledTopic::topic_of("kafka://").unwrap().is_err());
        assert!(LabelledTopic::topic_of("kafka://host:9092/topic").unwrap().is_err());
    }
}
