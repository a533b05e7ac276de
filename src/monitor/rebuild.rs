//! Rebuilding one partition's join after a start or a rebalance, before its
//! first record is processed: both inputs re-read from the label window's
//! start up to the group's committed offsets, in broker-timestamp order,
//! without writing anything (every join among those records was written and
//! acknowledged before the offsets were committed).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::join::PartitionJoin;
use super::state::{Core, Hooks, Record};
use super::Input;
use super::MonitorError;
use crate::kafka::EndOfPartitionIsNoError;
use crate::payment::now_ms;
use crate::telemetry::metric;

/// One record read back, kept until both inputs are read and it is its turn.
struct Replayed {
    time: i64,
    input: Input,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

impl Core {
    /// Rebuilds `partition`'s join from the records of both inputs written
    /// within the label window before the group's committed offsets, without
    /// emitting (those joins were emitted before the offsets were committed).
    pub(super) fn rebuild(&mut self, consumer: &BaseConsumer<Hooks>, partition: i32) -> Result<(), MonitorError> {
        let started = Instant::now();
        let limits = self.limits();
        let window_ms = limits.window_ms;
        self.joins.insert(partition, PartitionJoin::new(limits));
        let inputs = [Input::Scored, Input::Labels];
        let mut wanted = TopicPartitionList::new();
        for input in inputs {
            wanted.add_partition(self.topic(input), partition);
        }
        let committed = consumer
            .committed_offsets(wanted, Duration::from_secs(15))
            .map_err(self.kafka_err("reading committed offsets"))?;
        let offset_of =
            |list: &TopicPartitionList, topic: &str| list.find_partition(topic, partition).map(|e| e.offset());
        let ends: Vec<(Input, i64)> = inputs
            .into_iter()
            .filter_map(|input| match offset_of(&committed, self.topic(input)) {
                Some(Offset::Offset(end)) if end > 0 => Some((input, end)),
                _ => None,
            })
            .collect();
        if ends.is_empty() {
            return Ok(());
        }
        let group = format!("{}-rebuild", self.config.group_id);
        let replay: BaseConsumer<EndOfPartitionIsNoError> = self
            .config
            .kafka
            .client_config(&[
                ("group.id", &group),
                ("enable.auto.commit", "false"),
                ("isolation.level", "read_committed"),
                ("enable.partition.eof", "true"),
            ])
            .create_with_context(EndOfPartitionIsNoError)
            .map_err(self.kafka_err("creating the rebuild reader"))?;
        let mut times = TopicPartitionList::new();
        for (input, _) in &ends {
            times
                .add_partition_offset(self.topic(*input), partition, Offset::Offset(now_ms().saturating_sub(window_ms)))
                .map_err(self.kafka_err("listing offsets"))?;
        }
        let starts = replay
            .offsets_for_times(times, Duration::from_secs(15))
            .map_err(self.kafka_err("finding the window start"))?;
        let mut records: Vec<Replayed> = Vec::new();
        // One input at a time, so an end-of-partition event is unambiguous.
        for (input, end) in ends {
            // No record in the window: nothing to re-read.
            let Some(Offset::Offset(start)) = offset_of(&starts, self.topic(input)) else { continue };
            if start >= end {
                continue;
            }
            let mut assignment = TopicPartitionList::new();
            assignment
                .add_partition_offset(self.topic(input), partition, Offset::Offset(start))
                .map_err(self.kafka_err("listing offsets"))?;
            replay.assign(&assignment).map_err(self.kafka_err("assigning the rebuild reader"))?;
            let mut idle = Instant::now();
            loop {
                match replay.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        idle = Instant::now();
                        if m.offset() < end {
                            records.push(Replayed {
                                time: m.timestamp().to_millis().unwrap_or(0),
                                input,
                                offset: m.offset(),
                                key: m.key().map(<[u8]>::to_vec),
                                payload: m.payload().unwrap_or_default().to_vec(),
                            });
                        }
                        if m.offset() + 1 >= end {
                            break;
                        }
                    }
                    // Everything readable was read (a transaction marker may sit just before `end`).
                    Some(Err(KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => return Err(self.kafka_err("re-reading the label window")(e)),
                    None if idle.elapsed() > Duration::from_secs(30) => {
                        tracing::warn!(
                            partition,
                            input = input.name(),
                            "rebuild: nothing readable for 30 s; going on with what was read"
                        );
                        break;
                    }
                    None => {}
                }
            }
        }
        records.sort_by_key(|r| r.time);
        let count = records.len();
        for r in &records {
            let record = Record { partition, offset: r.offset, key: r.key.as_deref(), payload: &r.payload };
            self.process(r.input, &record, false)?;
        }
        let (scored, labels) = self.joins.get(&partition).map(PartitionJoin::len).unwrap_or_default();
        metrics::histogram!(metric::MONITOR_REBUILD_SECONDS).record(started.elapsed().as_secs_f64());
        tracing::info!(
            partition,
            records = count,
            scored,
            labels,
            seconds = started.elapsed().as_secs_f64(),
            "rebuilt the join"
        );
        Ok(())
    }
}
