//! The monitor's side effects, shared by the poll loop and the rebalance
//! callback: each record through the join, joins and dead letters out,
//! offsets committed only behind acknowledged outputs, numbers exported.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::join::{Entry, JoinLimits, Outcome, PartitionJoin, ScoredOutcome, Served, ServedBy, Verdict};
use super::quality::Quality;
use super::{Input, MonitorConfig, MonitorError};
use crate::codec::{CodecError, LabelRef, ScoredRef};
use crate::pipeline::{truncate, DeadLetterReason, MAX_ERROR_HEADER_BYTES};
use crate::telemetry::metric;

/// Counts deliveries and keeps the first failure.
pub(super) struct Deliveries {
    pub(super) failure: Mutex<Option<(String, String)>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            metrics::counter!(metric::DELIVERY_FAILURES).increment(1);
            let mut failure = self.failure.lock().expect("delivery failure lock");
            failure.get_or_insert_with(|| (message.topic().to_string(), error.to_string()));
        }
    }
}

/// Everything the poll loop and the rebalance callback share (the callback
/// runs inside `poll`, on the loop's thread, so the lock is never contended).
pub(super) struct Core {
    pub(super) config: MonitorConfig,
    pub(super) producer: ThreadedProducer<Deliveries>,
    pub(super) joins: HashMap<i32, PartitionJoin>,
    /// Next offset to commit, per input and partition: everything before it was processed.
    pub(super) positions: HashMap<(Input, i32), i64>,
    pub(super) quality: Quality,
    pub(super) parts: super::MonitorParts,
    /// Counted per record, published per export (a metric call per record costs as much as the join).
    pub(super) counts: Counts,
    pub(super) versions: HashMap<String, Arc<str>>,
    /// A failure seen in the rebalance callback, for the loop to return.
    pub(super) failure: Option<MonitorError>,
}

pub(super) struct Hooks {
    pub(super) core: Arc<Mutex<Core>>,
}

impl ClientContext for Hooks {}

impl ConsumerContext for Hooks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        metrics::counter!(metric::REBALANCES, "kind" => "revoke").increment(1);
        let mut core = self.core.lock().expect("monitor state lock");
        // Commit what was acknowledged before the partitions go to another member.
        if let Err(e) = core.commit(consumer) {
            core.failure.get_or_insert(e);
        }
        for e in list.elements() {
            core.joins.remove(&e.partition());
            core.positions.retain(|(_, p), _| *p != e.partition());
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            metrics::counter!(metric::REBALANCES, "kind" => "assign").increment(1);
            tracing::info!(
                partitions = list.count(),
                "assigned; each partition's join is rebuilt before its first record"
            );
        }
    }
}

impl Core {
    pub(super) fn kafka_err(&self, what: &'static str) -> impl FnOnce(KafkaError) -> MonitorError + '_ {
        move |source| MonitorError::Kafka { what, brokers: self.config.kafka.brokers.clone(), source }
    }

    pub(super) fn topic(&self, input: Input) -> &str {
        match input {
            Input::Scored => &self.config.scored_topic,
            Input::Labels => &self.config.labels_topic,
        }
    }

    fn intern(&mut self, version: &str) -> Arc<str> {
        if let Some(v) = self.versions.get(version) {
            return v.clone();
        }
        let v: Arc<str> = Arc::from(version);
        self.versions.insert(version.to_string(), v.clone());
        v
    }

    /// Waits until every record sent so far is acknowledged, then commits the positions.
    pub(super) fn commit(&mut self, consumer: &BaseConsumer<Hooks>) -> Result<(), MonitorError> {
        let timeout = Duration::from_secs(60);
        let start = Instant::now();
        while self.producer.in_flight_count() > 0 {
            if start.elapsed() > timeout {
                return Err(MonitorError::AckTimeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some((topic, error)) = self.producer.context().failure.lock().expect("delivery failure lock").clone() {
            return Err(MonitorError::Delivery { topic, error });
        }
        if self.positions.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((input, partition), offset) in &self.positions {
            list.add_partition_offset(self.topic(*input), *partition, Offset::Offset(*offset))
                .map_err(self.kafka_err("listing offsets"))?;
        }
        consumer.commit(&list, CommitMode::Sync).map_err(self.kafka_err("committing offsets"))
    }

    fn send(&self, topic: &str, key: Option<&[u8]>, payload: &[u8], headers: Option<OwnedHeaders>) {
        let mut record = BaseRecord::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, back)) => {
                    // Not sent: recorded like a failed delivery, so nothing after it is committed.
                    let mut failure = self.producer.context().failure.lock().expect("delivery failure lock");
                    failure.get_or_insert_with(|| (back.topic.to_string(), error.to_string()));
                    return;
                }
            }
        }
    }

    fn dead_letter(&self, input: Input, record: &Record<'_>, reason: DeadLetterReason, error: &str) {
        metrics::counter!(metric::EVENTS_DEAD_LETTERED, "reason" => reason.as_str()).increment(1);
        let (partition, offset) = (record.partition.to_string(), record.offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "fraudstream.error", value: Some(truncate(error, MAX_ERROR_HEADER_BYTES)) })
            .insert(Header { key: "fraudstream.error.reason", value: Some(reason.as_str()) })
            .insert(Header { key: "fraudstream.source.topic", value: Some(self.topic(input)) })
            .insert(Header { key: "fraudstream.source.partition", value: Some(partition.as_str()) })
            .insert(Header { key: "fraudstream.source.offset", value: Some(offset.as_str()) });
        self.send(&self.config.dead_letter_topic, record.key, record.payload, Some(headers));
    }

    /// Writes one join to the output topic, keyed by customer: the scored
    /// record as it was read, relabelled with the label's verdict
    /// (`Codec::relabel_scored`).
    fn emit(
        &self,
        relabelled: Result<Vec<u8>, CodecError>,
        payment_id: &str,
        customer: &str,
    ) -> Result<(), MonitorError> {
        let payload =
            relabelled.map_err(|source| MonitorError::Encode { payment_id: payment_id.to_string(), source })?;
        self.send(&self.config.output_topic, Some(customer.as_bytes()), &payload, None);
        Ok(())
    }

    /// One record of `input`. `live`: past the committed offsets, so a join it
    /// completes is emitted (during a rebuild it only rebuilds state).
    pub(super) fn process(&mut self, input: Input, record: &Record<'_>, live: bool) -> Result<(), MonitorError> {
        let codec = self.config.codec;
        let read = match input {
            Input::Scored => codec.read_scored(record.payload, |scored| self.on_scored(&scored, record, live)),
            Input::Labels => codec.read_label(record.payload, |label| self.on_label(label, record, live)),
        };
        let outcome = match read {
            Ok(outcome) => outcome?,
            Err(e) => {
                // Dead-lettered when processed live; a rebuild skips it, as it was dead-lettered then.
                if live {
                    self.dead_letter(input, record, DeadLetterReason::Undecodable, &e.to_string());
                }
                return Ok(());
            }
        };
        let Some(outcome) = outcome else { return Ok(()) };
        if live {
            self.counts.records[input as usize][outcome as usize] += 1;
        }
        let evicted = self.joins.get_mut(&record.partition).map(PartitionJoin::evict).unwrap_or_default();
        for entry in evicted.unlabelled.iter().chain(&evicted.labelled) {
            self.quality.evicted(entry);
        }
        self.counts.evictions[0] += evicted.unlabelled.len() as u64;
        self.counts.evictions[1] += evicted.labelled.len() as u64;
        self.counts.evictions[2] += evicted.unmatched_labels;
        Ok(())
    }

    fn on_scored(
        &mut self,
        scored: &ScoredRef<'_>,
        record: &Record<'_>,
        live: bool,
    ) -> Result<Option<Counted>, MonitorError> {
        let served = ServedBy {
            serving: Served {
                version: self.intern(scored.model_version),
                probability: scored.fraud_probability,
                flagged: scored.is_fraud,
            },
            shadow: scored.shadow.map(|shadow| Served {
                version: self.intern(shadow.model_version),
                probability: shadow.fraud_probability,
                flagged: shadow.is_fraud,
            }),
        };
        let entry = Entry {
            payload: record.payload.into(),
            event_time: scored.payment.event_time,
            scored_at: scored.scored_at,
            served: served.clone(),
            label: None,
        };
        let label = match self.join(record.partition).on_scored(scored.payment.payment_id, entry) {
            ScoredOutcome::Duplicate => return Ok(Some(Counted::Duplicate)),
            ScoredOutcome::Waiting => None,
            ScoredOutcome::Joined(label) => Some(label),
        };
        self.quality.scored(&served);
        let Some(label) = label else { return Ok(Some(Counted::Waiting)) };
        self.joined(&served, scored.scored_at, label, true, live);
        if live {
            let relabelled = self.config.codec.relabel_scored(record.payload, label.fraud);
            self.emit(relabelled, scored.payment.payment_id, scored.payment.customer)?;
        }
        Ok(Some(Counted::Joined))
    }

    /// `None` for a label no join can use (dead-lettered when live).
    fn on_label(
        &mut self,
        label: LabelRef<'_>,
        record: &Record<'_>,
        live: bool,
    ) -> Result<Option<Counted>, MonitorError> {
        if let Err(e) = label.validate() {
            if live {
                self.dead_letter(Input::Labels, record, DeadLetterReason::InvalidLabel, &e.to_string());
            }
            return Ok(None);
        }
        let codec = self.config.codec;
        // What a join needs of the entry, taken while the join lends it.
        let joined = |entry: &Entry| {
            let relabelled = live.then(|| codec.relabel_scored(&entry.payload, label.fraud));
            Some((entry.served.clone(), entry.scored_at, relabelled))
        };
        let (found, counted) = match self.join(record.partition).on_label(label) {
            Outcome::Waiting => (None, Counted::Waiting),
            Outcome::Duplicate => (None, Counted::Duplicate),
            Outcome::Joined(entry) => (joined(entry), Counted::Joined),
            Outcome::Corrected(entry) => (joined(entry), Counted::Corrected),
        };
        if let Some((served, scored_at, relabelled)) = found {
            let verdict = Verdict { fraud: label.fraud, labelled_at: label.labelled_at };
            self.joined(&served, scored_at, verdict, counted == Counted::Joined, live);
            if let Some(relabelled) = relabelled {
                self.emit(relabelled, label.payment_id, label.customer)?;
            }
        }
        Ok(Some(counted))
    }

    /// The join of `partition`, created empty on its first record.
    fn join(&mut self, partition: i32) -> &mut PartitionJoin {
        let limits = self.limits();
        self.joins.entry(partition).or_insert_with(|| PartitionJoin::new(limits))
    }

    /// What the join keeps, by the configuration.
    pub(super) fn limits(&self) -> JoinLimits {
        JoinLimits {
            window_ms: i64::try_from(self.config.label_window.as_millis()).unwrap_or(i64::MAX),
            max_entries: self.config.max_entries,
        }
    }

    fn joined(&mut self, served: &ServedBy, scored_at: i64, label: Verdict, first: bool, live: bool) {
        self.quality.labelled(served, label.fraud, first);
        if live {
            self.parts.joins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let delay = (label.labelled_at - scored_at).max(0) as f64 / 1000.0;
            self.counts.delays.entry(served.serving.version.clone()).or_default().push(delay);
        }
    }

    /// Publishes the counts since the last export and the live numbers.
    pub(super) fn export(&mut self) {
        let counts = std::mem::take(&mut self.counts);
        for (input, outcomes) in [Input::Scored, Input::Labels].into_iter().zip(counts.records) {
            for (outcome, n) in Counted::ALL.into_iter().zip(outcomes) {
                if n > 0 {
                    metrics::counter!(metric::MONITOR_RECORDS, "input" => input.name(), "outcome" => outcome.name())
                        .increment(n);
                }
            }
        }
        // Every join written: first labels (from either input) and corrections.
        let written: u64 =
            counts.records.iter().map(|r| r[Counted::Joined as usize] + r[Counted::Corrected as usize]).sum();
        metrics::counter!(metric::MONITOR_JOINS).increment(written);
        for (kind, n) in ["unlabelled", "labelled", "unmatched-label"].into_iter().zip(counts.evictions) {
            if n > 0 {
                metrics::counter!(metric::MONITOR_EVICTIONS, "kind" => kind).increment(n);
            }
        }
        for (version, delays) in counts.delays {
            let histogram = metrics::histogram!(metric::MONITOR_LABEL_DELAY_SECONDS, "version" => version.to_string());
            for delay in delays {
                histogram.record(delay);
            }
        }
        let reports = self.quality.report();
        for r in &reports {
            let v = r.version.to_string();
            metrics::gauge!(metric::MONITOR_LABELLED, "version" => v.clone()).set(r.samples as f64);
            metrics::gauge!(metric::MONITOR_PRECISION, "version" => v.clone()).set(r.precision);
            metrics::gauge!(metric::MONITOR_RECALL, "version" => v.clone()).set(r.recall);
            metrics::gauge!(metric::MONITOR_AVERAGE_PRECISION, "version" => v.clone()).set(r.average_precision);
            metrics::gauge!(metric::MONITOR_ROC_AUC, "version" => v.clone()).set(r.roc_auc);
            metrics::gauge!(metric::MONITOR_ALERT_RATE, "version" => v.clone()).set(r.alert_rate);
            metrics::gauge!(metric::MONITOR_LABEL_COVERAGE, "version" => v).set(r.label_coverage);
        }
        let (scored, labels) = self.joins.values().fold((0, 0), |(s, l), j| {
            let (js, jl) = j.len();
            (s + js, l + jl)
        });
        metrics::gauge!(metric::MONITOR_STATE, "kind" => "scored").set(scored as f64);
        metrics::gauge!(metric::MONITOR_STATE, "kind" => "labels").set(labels as f64);
        *self.parts.reports.lock().expect("monitor reports lock") = reports;
    }
}

/// What a record did, as `fraudstream_monitor_records_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Counted {
    Joined,
    Waiting,
    Duplicate,
    Corrected,
}

impl Counted {
    const ALL: [Counted; 4] = [Counted::Joined, Counted::Waiting, Counted::Duplicate, Counted::Corrected];

    fn name(self) -> &'static str {
        match self {
            Counted::Joined => "joined",
            Counted::Waiting => "waiting",
            Counted::Duplicate => "duplicate",
            Counted::Corrected => "corrected",
        }
    }
}

/// Counts since the last export.
#[derive(Debug, Default)]
pub(super) struct Counts {
    /// By input (scored, labels), then by `Counted`.
    records: [[u64; 4]; 2],
    /// Unlabelled, labelled, unmatched labels.
    evictions: [u64; 3],
    /// Label delays in seconds, by serving version.
    delays: HashMap<Arc<str>, Vec<f64>>,
}

/// The parts of a Kafka record the monitor uses.
pub(super) struct Record<'a> {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<&'a [u8]>,
    pub(super) payload: &'a [u8],
}

impl<'a> Record<'a> {
    pub(super) fn of(message: &'a BorrowedMessage<'a>) -> Self {
        Record {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload().unwrap_or_default(),
        }
    }
}
