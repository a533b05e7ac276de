//! What the binaries share about flags: the library's closed sets as clap
//! possible values, so `--help` lists each name with its meaning, and the
//! Kafka connection flags. Included by `src/main.rs` and
//! `trainer/src/main.rs`; the library itself knows no clap.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use fraudstream::choice::Choice;
use fraudstream::kafka::KafkaArgs;

/// A flag's parser for the values of `T`.
pub fn choice<T: Choice + Send + Sync>() -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(T::CHOICES.iter().map(|(_, name, help)| PossibleValue::new(*name).help(*help)))
        .map(|name| T::from_name(&name).expect("clap accepts only the listed names"))
}

/// `--brokers` and `-X`, as every command that talks to Kafka takes them.
#[derive(Debug, clap::Args)]
pub struct KafkaFlags {
    /// Kafka bootstrap servers (comma-separated host:port).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Any librdkafka property, e.g. `-X security.protocol=SASL_SSL`; repeatable.
    /// Applied last, so it overrides fraudstream's own settings. From the
    /// environment: `KAFKA_PROPERTIES="k1=v1;k2=v2"`.
    #[arg(short = 'X', value_name = "KEY=VALUE", env = "KAFKA_PROPERTIES", hide_env_values = true, value_delimiter = ';', value_parser = fraudstream::kafka::parse_property)]
    pub property: Vec<(String, String)>,
}

impl From<KafkaFlags> for KafkaArgs {
    fn from(flags: KafkaFlags) -> Self {
        KafkaArgs { brokers: flags.brokers, property: flags.property }
    }
}
