//! `fraudstream monitor`: flags onto `fraudstream::monitor::MonitorConfig`.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use fraudstream::monitor::{run, MonitorConfig, MonitorParts};
use fraudstream::{Codec, WireFormat};
use tokio_util::sync::CancellationToken;

use crate::cli::choice;
use crate::KafkaFlags;

#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    kafka: KafkaFlags,
    /// Consumer group of the monitors (members share the partitions of both inputs).
    #[arg(long, env = "FRAUDSTREAM_MONITOR_GROUP_ID", default_value = "fraudstream-monitor")]
    group_id: String,
    /// Topic of scored payments (the scorers' output).
    #[arg(long, env = "FRAUDSTREAM_SCORED_TOPIC", default_value = "payments-scored")]
    scored_topic: String,
    /// Topic of labels (PaymentLabel, keyed by customer, as many partitions as --scored-topic).
    #[arg(long, env = "FRAUDSTREAM_LABELS_TOPIC", default_value = "payments-labels")]
    labels_topic: String,
    /// Topic each join is written to: the scored payment with `payment.fraud` set (what the trainer reads).
    #[arg(long, env = "FRAUDSTREAM_LABELLED_TOPIC", default_value = "payments-labelled")]
    labelled_topic: String,
    /// Topic for records that do not decode or cannot be joined (original bytes, error in headers).
    #[arg(long, env = "FRAUDSTREAM_LABELS_DLQ_TOPIC", default_value = "payments-labels-dlq")]
    dlq_topic: String,
    /// Wire format of all three topics.
    #[arg(long, env = "FRAUDSTREAM_FORMAT", value_parser = choice::<WireFormat>(), default_value = "confluent")]
    format: WireFormat,
    /// Schema id written into the Confluent header of joined records.
    #[arg(long, env = "FRAUDSTREAM_SCHEMA_ID", default_value_t = fraudstream::codec::SCORED_PAYMENT_SCHEMA_ID)]
    output_schema_id: u32,
    /// How long (event time) a scored payment waits for its label; also how far back a restart re-reads.
    #[arg(long, env = "FRAUDSTREAM_LABEL_WINDOW", default_value = "30d", value_parser = humantime::parse_duration)]
    label_window: Duration,
    /// Most scored payments (and, apart, waiting labels) kept per partition; the oldest go first.
    #[arg(long, env = "FRAUDSTREAM_MAX_ENTRIES", default_value_t = 2_000_000)]
    max_entries: usize,
    /// Labelled payments per model version the live precision, recall, AP and ROC-AUC are over.
    #[arg(long, env = "FRAUDSTREAM_QUALITY_WINDOW", default_value_t = 100_000)]
    quality_window: usize,
    /// How often acknowledged progress is committed.
    #[arg(long, env = "FRAUDSTREAM_COMMIT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    commit_interval: Duration,
    /// Create the labelled and dead-letter topics (as many partitions as the inputs) if they are missing.
    #[arg(long, env = "FRAUDSTREAM_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    create_topics: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "FRAUDSTREAM_HTTP_ADDR", default_value = "127.0.0.1:8502")]
    http_addr: std::net::SocketAddr,
}

pub async fn monitor(args: MonitorArgs) -> Result<()> {
    let config = MonitorConfig {
        kafka: args.kafka.into(),
        group_id: args.group_id,
        scored_topic: args.scored_topic,
        labels_topic: args.labels_topic,
        output_topic: args.labelled_topic,
        dead_letter_topic: args.dlq_topic,
        codec: Codec::new(args.format, args.output_schema_id),
        label_window: args.label_window,
        max_entries: args.max_entries,
        quality_window: args.quality_window,
        commit_interval: args.commit_interval,
        http_addr: Some(args.http_addr),
        create_topics: args.create_topics,
    };
    let shutdown = CancellationToken::new();
    crate::cancel_on_signal(shutdown.clone());
    run(config, MonitorParts::default(), shutdown).await?;
    Ok(())
}
