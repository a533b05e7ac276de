//! Kafka connection settings shared by every command that talks to a broker,
//! plus topic administration.
//!
//! Every librdkafka property can be set with `-X key=value` (like kcat), so
//! TLS, SASL and tuning need no code changes here.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

/// The partitioner of every fraudstream producer: the Java client's
/// (murmur2 of the key). librdkafka's default (`consistent_random`, CRC32)
/// puts a key on another partition than the Java client does, and the
/// monitor's join relies on payments, scored payments and labels of one
/// customer sharing a partition number, whoever produced them. Producers in
/// other languages match by using murmur2 (the Java client's default).
pub const PARTITIONER: (&str, &str) = ("partitioner", "murmur2_random");

/// Broker address and librdkafka passthrough properties (the binaries map
/// `--brokers` and `-X key=value` onto it).
#[derive(Debug, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (comma-separated host:port).
    pub brokers: String,
    /// librdkafka properties, applied last, so they override fraudstream's own settings.
    pub property: Vec<(String, String)>,
}

/// Parses `-X key=value`.
pub fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE (a librdkafka property), got {text:?}")),
    }
}

impl KafkaArgs {
    /// Args pointing at `brokers` with no extra properties.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self { brokers: brokers.into(), property: Vec::new() }
    }

    /// A client config with the brokers, then `defaults`, then the user's `-X` overrides.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in &self.property {
            config.set(k, v);
        }
        config
    }
}

/// The context of readers that ask for `enable.partition.eof` to know they
/// have read everything: librdkafka also reports each end of a partition as
/// a global error, which the default context would log as one.
pub struct EndOfPartitionIsNoError;

impl rdkafka::ClientContext for EndOfPartitionIsNoError {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !matches!(error, rdkafka::error::KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EndOfPartitionIsNoError {}

/// A topic-administration failure, naming the topic and the broker.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot create Kafka admin client for {brokers}: {source}")]
    Client { brokers: String, source: rdkafka::error::KafkaError },
    #[error("cannot create topic {topic:?} on {brokers}: {reason} (is the broker reachable? check --brokers)")]
    Create { topic: String, brokers: String, reason: String },
}

/// Creates each topic with `partitions` partitions unless it exists already.
pub async fn ensure_topics(kafka: &KafkaArgs, topics: &[&str], partitions: i32) -> Result<(), TopicError> {
    let admin: AdminClient<DefaultClientContext> = kafka
        .client_config(&[])
        .create()
        .map_err(|source| TopicError::Client { brokers: kafka.brokers.clone(), source })?;
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let create_err =
        |reason: String| TopicError::Create { topic: topics.join(","), brokers: kafka.brokers.clone(), reason };
    // librdkafka waits for a broker indefinitely; an unreachable one should fail fast.
    let results = tokio::time::timeout(Duration::from_secs(15), admin.create_topics(&new, &options))
        .await
        .map_err(|_| create_err("no answer from the broker within 15 s".into()))?
        .map_err(|e| create_err(e.to_string()))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(TopicError::Create { topic, brokers: kafka.brokers.clone(), reason: code.to_string() })
            }
        }
    }
    Ok(())
}
