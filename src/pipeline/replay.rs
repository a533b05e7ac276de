//! Reading a partition of the input topic back to rebuild its customer
//! history (`history::Replay`), on the scoring thread, before the partition's
//! next payment is scored.
//!
//! Where it starts: the first record whose broker timestamp is at least the
//! window's start in event time (`since_ms`). Producers write a payment after
//! it happened, so nothing in the window is older by broker time; reading
//! more (the mock cluster has no time index: from the low watermark) costs
//! time, never exactness. It stops before `until`, the payment about to be scored.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::history::{Replay, ReplayError};
use crate::kafka::{EndOfPartitionIsNoError, KafkaArgs};
use crate::payment::Payment;

/// How a record's bytes become a payment (the pipeline's own decoder); a
/// record it cannot decode was dead-lettered, not scored, and is skipped.
pub type Decode = Box<dyn Fn(&[u8]) -> Option<Payment> + Send>;

/// How long a rebuild waits for the next record before it fails.
const STALL: Duration = Duration::from_secs(30);

/// Rebuilds from the input topic over its own group-less reader.
pub struct KafkaReplay {
    pub kafka: KafkaArgs,
    pub group_id: String,
    pub topic: String,
    pub decode: Decode,
}

impl KafkaReplay {
    fn error(&self, partition: i32, until: i64, step: &str) -> impl Fn(KafkaError) -> ReplayError + '_ {
        let step = step.to_string();
        move |e| ReplayError {
            partition,
            until,
            message: format!(
                "{step} on topic {} at {}: {e} (is the broker reachable?)",
                self.topic, self.kafka.brokers
            ),
        }
    }
}

impl Replay for KafkaReplay {
    fn replay(
        &mut self,
        partition: i32,
        until: i64,
        since_ms: i64,
        visit: &mut dyn FnMut(&Payment),
    ) -> Result<u64, ReplayError> {
        let err = |step| self.error(partition, until, step);
        let reader: BaseConsumer<EndOfPartitionIsNoError> = self
            .kafka
            .client_config(&[
                ("group.id", &format!("{}-history", self.group_id)),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "true"),
                ("fetch.queue.backoff.ms", "10"),
            ])
            .create_with_context(EndOfPartitionIsNoError)
            .map_err(err("creating the history reader"))?;
        let mut times = TopicPartitionList::new();
        times
            .add_partition_offset(&self.topic, partition, Offset::Offset(since_ms.max(0)))
            .map_err(err("listing offsets"))?;
        let start = match reader.offsets_for_times(times, Duration::from_secs(15)) {
            Ok(found) => match found.find_partition(&self.topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Offset::Offset(o),
                // Nothing that new: nothing to read.
                Some(Offset::End) => return Ok(0),
                _ => Offset::Beginning,
            },
            Err(e) => {
                tracing::debug!(error = %e, "no time index: the history rebuild reads from the start of the partition");
                Offset::Beginning
            }
        };
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.topic, partition, start).map_err(err("listing offsets"))?;
        reader.assign(&assignment).map_err(err("assigning the history reader"))?;
        let mut read = 0;
        let mut idle = Instant::now();
        loop {
            match reader.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    idle = Instant::now();
                    if m.offset() >= until {
                        break;
                    }
                    read += 1;
                    if let Some(payment) = m.payload().and_then(|bytes| (self.decode)(bytes)) {
                        visit(&payment);
                    }
                    if m.offset() + 1 >= until {
                        break;
                    }
                }
                // Everything readable was read (control records may sit just before `until`).
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(err("reading the partition back")(e)),
                None if idle.elapsed() > STALL => {
                    return Err(ReplayError {
                        partition,
                        until,
                        message: format!(
                            "nothing readable on topic {} for {} s after {read} records",
                            self.topic,
                            STALL.as_secs()
                        ),
                    })
                }
                None => {}
            }
        }
        Ok(read)
    }
}
