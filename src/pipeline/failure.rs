//! Why the pipeline stopped, recorded once, seen by everyone.
//!
//! Why: the rule of this codebase is fail closed. When something of ours
//! fails (the model, the producer, the broker, the store) for a reason that
//! retrying will not fix, the scorer must stop consuming, drain what was
//! acknowledged, commit that, fail `/readyz`, log why and exit non-zero, so the
//! orchestrator restarts it. Every part that can detect such a failure
//! reports it here; the first report wins (later ones are consequences) and
//! cancels `stopped()`, which the consumer watches.

use std::sync::OnceLock;

use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use crate::scoring::ScoringError;
use crate::telemetry::metric;

/// A failure of ours that stops the pipeline. Bad input is never one of these:
/// it goes to the dead-letter topic.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineFailure {
    #[error(
        "the model could not score a batch of {events} valid payments (input {topic} partition {partition} \
         from offset {offset}): {source}; those payments are not dead-lettered and their offsets are not \
         committed, so a restart with a working model scores them"
    )]
    Scoring { topic: String, partition: i32, offset: i64, events: usize, source: ScoringError },
    #[error(
        "cannot enqueue a {bytes}-byte record for topic {topic} (input partition {partition} offset {offset}): \
         {source}; raise the producer's limit (-X message.max.bytes=...) and the topic's max.message.bytes, \
         or check that the topic exists and this scorer may write to it"
    )]
    Enqueue { topic: String, bytes: usize, partition: i32, offset: i64, source: KafkaError },
    #[error(
        "the broker refused a record for topic {topic} for good (input partition {partition} offset \
         {offset}): {source}; check the topic exists, its ACLs and its size limits"
    )]
    Delivery { topic: String, partition: i32, offset: i64, source: KafkaError },
    #[error(
        "the output producer hit a fatal error: {reason}; it cannot send any more records, so the scorer \
         stops and a restart starts a new producer"
    )]
    ProducerFatal { reason: String },
    #[error("the input consumer hit a fatal error: {reason}")]
    ConsumerFatal { reason: String },
    #[error(
        "exactly-once: {step} failed: {reason}{}",
        if *aborted {
            "; the open transaction was aborted, so the scorer rewinds to the last committed transaction"
        } else {
            "; the scorer stops and its restart re-reads from the last committed transaction (a fenced \
             producer means another scorer took this transactional.id)"
        }
    )]
    Transaction { step: &'static str, aborted: bool, reason: String },
    #[error(
        "{dead} of the last {window} events were dead-lettered ({consecutive} in a row), over the limit \
         (--dlq-max-share {max_share}, --dlq-max-consecutive {max_consecutive}): something upstream \
         is sending what this scorer cannot read (a new schema or format?); fix the producer or \
         --input-format, or raise the limits"
    )]
    DeadLetterGuard { dead: usize, window: usize, consecutive: usize, max_share: f64, max_consecutive: usize },
    #[error(
        "input {topic} partition {partition} offset {offset} was dropped without being acknowledged \
         (an internal error; see the log lines before this one)"
    )]
    Unacknowledged { topic: String, partition: i32, offset: i64 },
}

impl PipelineFailure {
    /// Whether the scorer may start the pipeline again in-process: the open
    /// transaction was aborted, so nothing past the last committed one is
    /// visible to read_committed readers or committed as input offsets, and
    /// a fresh consumer and producer re-read from there. Anything else (a
    /// fenced or fatal producer, a broken model, bad input over the limit)
    /// needs the process to exit.
    pub fn rewinds(&self) -> bool {
        matches!(self, Self::Transaction { aborted: true, .. })
    }

    /// A short label for the metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Scoring { .. } => "scoring",
            Self::Enqueue { .. } => "enqueue",
            Self::Delivery { .. } => "delivery",
            Self::ProducerFatal { .. } => "producer-fatal",
            Self::ConsumerFatal { .. } => "consumer-fatal",
            Self::Transaction { .. } => "transaction",
            Self::DeadLetterGuard { .. } => "dead-letter-guard",
            Self::Unacknowledged { .. } => "unacknowledged",
        }
    }
}

/// The pipeline's failure record: the first failure, and the token it cancels.
#[derive(Debug, Default)]
pub struct Failure {
    first: OnceLock<PipelineFailure>,
    stop: CancellationToken,
}

impl Failure {
    /// Records `failure` (if it is the first) and stops the pipeline.
    pub fn fail(&self, failure: PipelineFailure) {
        let kind = failure.kind();
        if self.first.set(failure).is_ok() {
            metrics::counter!(metric::PIPELINE_FAILURES, "kind" => kind).increment(1);
            if let Some(first) = self.first.get() {
                tracing::error!(kind, error = %first, "pipeline failed: stopping consumption, draining what was acknowledged");
            }
        }
        self.stop.cancel();
    }

    /// The first failure, if any.
    pub fn get(&self) -> Option<&PipelineFailure> {
        self.first.get()
    }

    /// Cancelled on the first failure.
    pub fn stopped(&self) -> &CancellationToken {
        &self.stop
    }
}
