//! The `fraudstream-trainer` command line: a thin layer over the trainer library.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use cli::{choice, KafkaFlags};
use fraudstream::codec::{Codec, WireFormat};
use fraudstream::features::{AmountScale, FeatureSet};
use fraudstream::model::Device;
use fraudstream::registry::RegistryConfig;
use fraudstream::telemetry::{init_logging, LogFormat};
use fraudstream::training::data::DataSource;
use fraudstream::training::topic::LabelledTopic;
use fraudstream::training::train::TrainConfig;
use fraudstream::training::{run_once, OnLose, RunOutcome, TrainerOptions};

#[path = "../../src/cli.rs"]
mod cli;

/// mimalloc instead of glibc malloc, as in `fraudstream`: reading a topic
/// allocates a dozen strings per payment.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Train a fraud model on labelled payments, evaluate it on a time-based
/// holdout against a logistic baseline and the current champion, and publish
/// it to the model store as a new immutable version if it is at least as good.
#[derive(Debug, Parser)]
#[command(name = "fraudstream-trainer", version)]
struct Cli {
    /// Labelled payments: kafka://<topic> (labelled scored payments, e.g. kafka://payments-labelled),
    /// a BankSim CSV or Parquet file, a directory of them, s3://bucket/key.csv|.parquet, or
    /// s3://bucket/prefix/ (every *.csv and *.parquet object under it).
    #[arg(long, env = "FRAUDSTREAM_TRAIN_DATA", conflicts_with = "simulate", required_unless_present = "simulate")]
    data: Option<String>,
    /// Train on N simulated payments instead.
    #[arg(long, value_name = "N", env = "FRAUDSTREAM_SIMULATE")]
    simulate: Option<u64>,
    /// With --simulate: draw the payments from this one on from the drifted regime B (0: all of them).
    #[arg(long, value_name = "N", env = "FRAUDSTREAM_DRIFT_AFTER", requires = "simulate", conflicts_with = "data")]
    drift_after: Option<u64>,
    /// With --data kafka://<topic>: read the records of this last stretch of time (by Kafka timestamp).
    #[arg(long, env = "FRAUDSTREAM_SINCE", value_parser = humantime::parse_duration, default_value = "30d")]
    since: Duration,
    /// With --data kafka://<topic>: when the topic holds no labelled payments and the model store
    /// no version yet (a new deployment's first run), train on these files instead (as --data takes them).
    #[arg(long, value_name = "LOCATION", env = "FRAUDSTREAM_FALLBACK_DATA", conflicts_with = "fallback_simulate")]
    fallback_data: Option<String>,
    /// Like --fallback-data, on N simulated payments.
    #[arg(long, value_name = "N", env = "FRAUDSTREAM_FALLBACK_SIMULATE")]
    fallback_simulate: Option<u64>,
    /// With --data kafka://<topic>: the topic's wire format (the monitor's output format).
    #[arg(long, env = "FRAUDSTREAM_FORMAT", value_parser = choice::<WireFormat>(), default_value = "confluent")]
    format: WireFormat,
    /// With --data kafka://<topic>: Confluent Schema Registry, to read each record by its writer schema.
    /// Basic auth from SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (user:password), a CA from SCHEMA_REGISTRY_CA_LOCATION.
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    schema_registry_url: Option<String>,
    #[command(flatten)]
    kafka: KafkaFlags,
    /// Simulator seed; also seeds weight initialisation and shuffling.
    #[arg(long, env = "FRAUDSTREAM_SEED", default_value_t = 42)]
    seed: u64,
    /// Where versions are published: s3://bucket/prefix or a local directory.
    #[arg(long, env = "FRAUDSTREAM_MODEL_STORE", default_value = "models")]
    model_store: String,
    /// Model name written into the manifest (the REST API serves it under this name).
    #[arg(long, env = "FRAUDSTREAM_MODEL_NAME", default_value = "payfraud")]
    model_name: String,
    /// Device to train on.
    #[arg(long, env = "FRAUDSTREAM_DEVICE", value_parser = choice::<Device>(), default_value = "auto")]
    device: Device,
    /// Intra-op threads for libtorch (1 is fastest on small shared machines).
    #[arg(long, env = "FRAUDSTREAM_THREADS", default_value_t = 1)]
    threads: i32,
    /// Choose the decision threshold as the lowest reaching this precision on validation (default: best F1).
    #[arg(long, value_name = "P", env = "FRAUDSTREAM_TARGET_PRECISION")]
    target_precision: Option<f64>,
    /// The review band starts at the highest threshold reaching this recall on validation.
    #[arg(long, value_name = "R", env = "FRAUDSTREAM_REVIEW_RECALL", default_value_t = TrainerOptions::default().review_recall)]
    review_recall: f64,
    /// The block band starts at the lowest threshold reaching this precision on validation.
    #[arg(long, value_name = "P", env = "FRAUDSTREAM_BLOCK_PRECISION", default_value_t = TrainerOptions::default().block_precision)]
    block_precision: f64,
    /// How the amount feature is scaled.
    #[arg(long, env = "FRAUDSTREAM_AMOUNT_SCALE", value_parser = choice::<AmountScale>(), default_value = "fixed")]
    amount_scale: AmountScale,
    /// The features to train on: the payment's own 28 (the TF Serving contract), or those
    /// and the customer's history and the merchant's fraud rate.
    #[arg(long, env = "FRAUDSTREAM_FEATURES", value_parser = choice::<FeatureSet>(), default_value = "payment")]
    features: FeatureSet,
    /// A version that loses the champion gate: publish it labelled canary (to watch in shadow), or discard it.
    #[arg(long, env = "FRAUDSTREAM_ON_LOSE", value_parser = choice::<OnLose>(), default_value = "canary")]
    on_lose: OnLose,
    /// Publish even if the current champion scores a better holdout AP.
    #[arg(long, env = "FRAUDSTREAM_FORCE")]
    force: bool,
    /// Keep running and retrain at this interval (e.g. `6h`); default: one run, then exit.
    #[arg(long, env = "FRAUDSTREAM_TRAIN_EVERY", value_parser = humantime::parse_duration)]
    every: Option<Duration>,
    /// Most training epochs (early stopping usually ends sooner).
    #[arg(long, default_value_t = TrainConfig::default().max_epochs, env = "FRAUDSTREAM_MAX_EPOCHS")]
    max_epochs: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = TrainConfig::default().batch_size, env = "FRAUDSTREAM_BATCH_SIZE")]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = TrainConfig::default().learning_rate, env = "FRAUDSTREAM_LEARNING_RATE")]
    learning_rate: f64,
    /// Log line format.
    #[arg(long, env = "FRAUDSTREAM_LOG_FORMAT", value_parser = choice::<LogFormat>(), default_value = "text")]
    log_format: LogFormat,
}

fn print_outcome(outcome: &RunOutcome) {
    let e = &outcome.holdout;
    let b = &outcome.baseline;
    let published = match outcome.label {
        Some(label) => format!("PUBLISHED, labelled {}", fraudstream::choice::Choice::name(label)),
        None => "not published".to_string(),
    };
    println!("version {}: {published}", outcome.version);
    println!("  {}", outcome.verdict);
    println!(
        "  holdout ({} rows, {} frauds): ROC-AUC {:.4}  AP {:.4}  recall@1%FPR {:.4}  threshold {:.4}  P {:.4} R {:.4} F1 {:.4}",
        e.rows, e.frauds, e.roc_auc, e.average_precision, e.recall_at_1pct_fpr, e.threshold, e.precision, e.recall, e.f1
    );
    println!(
        "  logistic baseline: ROC-AUC {:.4}  AP {:.4}  (lift in AP {:+.4})",
        b.roc_auc,
        b.average_precision,
        e.average_precision - b.average_precision
    );
    if let Some((v, c)) = &outcome.champion {
        println!("  champion {v} on the same holdout: ROC-AUC {:.4}  AP {:.4}", c.roc_auc, c.average_precision);
    }
    println!("  trained in {:.1} s", outcome.training_seconds);
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if cli.threads < 1 {
        bail!("--threads must be at least 1");
    }
    tch::set_num_threads(cli.threads);
    let data = match (cli.data, cli.simulate) {
        (Some(location), _) => match LabelledTopic::topic_of(&location) {
            Some(topic) => DataSource::Kafka(LabelledTopic {
                kafka: cli.kafka.into(),
                topic: topic?,
                since: cli.since,
                codec: Codec::new(cli.format, 0),
                registry: cli.schema_registry_url.map(RegistryConfig::from_env),
            }),
            None => DataSource::Files(location),
        },
        (None, Some(rows)) => match cli.drift_after {
            None => DataSource::Simulator { rows, seed: cli.seed },
            Some(drift_after) => DataSource::DriftedSimulator { rows, seed: cli.seed, drift_after },
        },
        (None, None) => bail!("pass --data kafka://TOPIC|FILE|DIR|s3://bucket/key or --simulate N"),
    };
    if cli.since.is_zero() {
        bail!("--since must be longer than 0 s");
    }
    let fallback = match (cli.fallback_data, cli.fallback_simulate) {
        (Some(location), _) if LabelledTopic::topic_of(&location).is_some() => {
            bail!("--fallback-data takes files (a path or s3:// URL), not a topic: {location}")
        }
        (Some(location), _) => Some(DataSource::Files(location)),
        (None, Some(rows)) => Some(DataSource::Simulator { rows, seed: cli.seed }),
        (None, None) => None,
    };
    if fallback.is_some() && !matches!(data, DataSource::Kafka(_)) {
        bail!("--fallback-data and --fallback-simulate apply only to --data kafka://<topic>");
    }
    let options = TrainerOptions {
        data,
        fallback,
        model_store: cli.model_store,
        model_name: cli.model_name,
        device: cli.device,
        target_precision: cli.target_precision,
        review_recall: cli.review_recall,
        block_precision: cli.block_precision,
        amount_scale: cli.amount_scale,
        features: cli.features,
        force: cli.force,
        on_lose: cli.on_lose,
        train: TrainConfig {
            max_epochs: cli.max_epochs,
            batch_size: cli.batch_size,
            learning_rate: cli.learning_rate,
            seed: cli.seed,
            ..TrainConfig::default()
        },
    };
    let Some(every) = cli.every else {
        print_outcome(&run_once(&options).await?);
        return Ok(());
    };
    loop {
        match run_once(&options).await {
            Ok(outcome) => print_outcome(&outcome),
            // On a schedule, one failed run must not end the service.
            Err(e) => tracing::error!(error = format!("{e:#}"), "training run failed; retrying at the next interval"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; exiting");
                return Ok(());
            }
        }
    }
}
