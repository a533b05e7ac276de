//! The `fraudstream` command line: a thin layer over the library.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cli::{choice, KafkaFlags};
use fraudstream::codec::{PAYMENT_SCHEMA_JSON, SCORED_PAYMENT_SCHEMA_JSON};
use fraudstream::consume::{print_events, ConsumeOptions, EventKind, Isolation};
use fraudstream::demo::DemoConfig;
use fraudstream::drift::DriftConfig;
use fraudstream::kafka::{ensure_topics, KafkaArgs};
use fraudstream::model::Device;
use fraudstream::model_watch::WatchConfig;
use fraudstream::payment::BankSimReader;
use fraudstream::pipeline::{default_transactional_id, Delivery, GuardLimits, PipelineConfig, TransactionConfig};
use fraudstream::produce::{create_producer, publish_payments, LabelStream, PublishOptions};
use fraudstream::registry::{value_subject, RegistryConfig, SchemaRegistry, WriterSchemas};
use fraudstream::scorer::{ScorerConfig, ScorerParts};
use fraudstream::telemetry::{init_logging, init_logging_with, LogFormat};
use fraudstream::{Codec, FeatureEncoder, FeatureSpec, Payment, Simulator, WireFormat};
use tokio_util::sync::CancellationToken;

mod cli;
mod models_cmd;
mod monitor_cmd;

/// mimalloc instead of glibc malloc: events are allocated on the consumer's
/// thread and freed on the producer's, which glibc's per-thread arenas handle
/// poorly; the switch cut the scorer's CPU per event by about a fifth.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "fraudstream", version, about = "Streaming fraud scoring on Kafka with libtorch")]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, env = "FRAUDSTREAM_LOG_FORMAT", value_parser = choice::<LogFormat>(), default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write BankSim-style payments (original CSV format) from the calibrated simulator.
    Simulate(SimulateArgs),
    /// Print the 28 model features of payments read on stdin (CSV or JSON lines), one JSON array a line.
    Encode(EncodeArgs),
    /// Publish payments from a BankSim CSV file or the simulator to a Kafka topic.
    Produce(ProduceArgs),
    /// Print payments or scored payments from a Kafka topic as JSON lines.
    Consume(ConsumeArgs),
    /// Run the streaming scorer: consume payments, score them, produce scored payments.
    Score(Box<ScoreArgs>),
    /// Run everything in one process (mock broker, local model store): train, score, report.
    Demo(DemoArgs),
    /// The versions in a model store and their labels: list, show, label, rollback.
    Models(models_cmd::ModelsArgs),
    /// Join scored payments with their late labels: live quality per model version, labelled history for retraining.
    Monitor(monitor_cmd::MonitorArgs),
}

#[derive(Debug, Args)]
struct ScoreArgs {
    #[command(flatten)]
    kafka: KafkaFlags,
    /// Consumer group; scorers with the same group share the input partitions.
    #[arg(long, env = "FRAUDSTREAM_GROUP_ID", default_value = "fraudstream-scorer")]
    group_id: String,
    /// Topic of incoming payments.
    #[arg(long, env = "FRAUDSTREAM_INPUT_TOPIC", default_value = "payments")]
    input_topic: String,
    /// Topic for scored payments.
    #[arg(long, env = "FRAUDSTREAM_OUTPUT_TOPIC", default_value = "payments-scored")]
    output_topic: String,
    /// Topic for events that cannot be scored (original bytes, error in headers).
    #[arg(long, env = "FRAUDSTREAM_DLQ_TOPIC", default_value = "payments-dlq")]
    dlq_topic: String,
    /// Wire format of incoming payments.
    #[arg(long, env = "FRAUDSTREAM_INPUT_FORMAT", value_parser = choice::<WireFormat>(), default_value = "confluent")]
    input_format: WireFormat,
    /// Wire format of scored payments.
    #[arg(long, env = "FRAUDSTREAM_OUTPUT_FORMAT", value_parser = choice::<WireFormat>(), default_value = "confluent")]
    output_format: WireFormat,
    /// Confluent Schema Registry: register the output schema under `<output topic>-value` and write
    /// its id; read input by each record's writer schema. Basic auth from
    /// SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (user:password), a CA from SCHEMA_REGISTRY_CA_LOCATION.
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    schema_registry_url: Option<String>,
    /// Schema id written into Confluent headers of scored payments (without a registry).
    #[arg(long, env = "FRAUDSTREAM_SCHEMA_ID", default_value_t = fraudstream::codec::SCORED_PAYMENT_SCHEMA_ID)]
    output_schema_id: u32,
    #[command(flatten)]
    scoring: ScoringArgs,
    /// Where model versions are published: s3://bucket/prefix or a local directory.
    #[arg(long, env = "FRAUDSTREAM_MODEL_STORE", default_value = "models")]
    model_store: String,
    /// Serve exactly this version and never swap (default: newest complete version).
    #[arg(long, env = "FRAUDSTREAM_MODEL_VERSION")]
    model_version: Option<String>,
    /// How often to look for a new model version (one LIST call).
    #[arg(long, env = "FRAUDSTREAM_POLL_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Shadow scoring: also score every payment with the version this label names (e.g. `canary`),
    /// following its moves; its score goes into the output's `shadow` field and decides nothing.
    #[arg(long, env = "FRAUDSTREAM_SHADOW", value_parser = choice::<fraudstream::model::Label>())]
    shadow: Option<fraudstream::model::Label>,
    /// Local folder for downloaded model versions (default: a temporary folder).
    #[arg(long, env = "FRAUDSTREAM_MODEL_CACHE")]
    model_cache: Option<PathBuf>,
    /// Append the exact feature row of every stream payment scored to this file (JSON lines:
    /// paymentId, partition, offset, modelVersion, features), for audits and skew checks.
    #[arg(long, value_name = "FILE", env = "FRAUDSTREAM_FEATURE_LOG")]
    feature_log: Option<PathBuf>,
    /// Address of the REST API (TensorFlow Serving compatible), /metrics, /healthz and /readyz.
    #[arg(long, env = "FRAUDSTREAM_HTTP_ADDR", default_value = "127.0.0.1:8501")]
    http_addr: std::net::SocketAddr,
    /// Model name the REST API serves.
    #[arg(long, env = "FRAUDSTREAM_MODEL_NAME", default_value = "payfraud")]
    model_name: String,
    /// Largest REST request body in bytes; larger ones get 413.
    #[arg(long, env = "FRAUDSTREAM_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Most events read but not yet acknowledged downstream (backpressure).
    #[arg(long, env = "FRAUDSTREAM_MAX_IN_FLIGHT", default_value_t = 100_000)]
    max_in_flight: usize,
    /// Most payload bytes read but not yet acknowledged (bounds memory; the
    /// output producer's queue is sized to match). Default 256 MiB, for the
    /// 2 GiB pod limit in k8s/.
    #[arg(long, env = "FRAUDSTREAM_MAX_IN_FLIGHT_BYTES", default_value_t = 256 << 20)]
    max_in_flight_bytes: usize,
    /// Longest a partition revoke or shutdown waits for in-flight events.
    #[arg(long, env = "FRAUDSTREAM_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Stop (fail closed) when more than this share of the last --dlq-window events was dead-lettered.
    #[arg(long, env = "FRAUDSTREAM_DLQ_MAX_SHARE", default_value_t = 0.5)]
    dlq_max_share: f64,
    /// How many recent events --dlq-max-share is measured over.
    #[arg(long, env = "FRAUDSTREAM_DLQ_WINDOW", default_value_t = 10_000)]
    dlq_window: usize,
    /// Stop (fail closed) when this many events in a row were dead-lettered (0: no limit).
    #[arg(long, env = "FRAUDSTREAM_DLQ_MAX_CONSECUTIVE", default_value_t = 1_000)]
    dlq_max_consecutive: usize,
    /// Longest a model version may take to load and warm up before it is rejected.
    #[arg(long, env = "FRAUDSTREAM_MODEL_LOAD_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    model_load_timeout: Duration,
    /// What readers of the output topic may count on: `exactly-once` commits outputs and input
    /// offsets in Kafka transactions (read them with isolation.level=read_committed).
    #[arg(long, env = "FRAUDSTREAM_DELIVERY", value_parser = choice::<Delivery>(), default_value = "at-least-once")]
    delivery: Delivery,
    /// Exactly-once: commit the open transaction at least this often.
    #[arg(long, env = "FRAUDSTREAM_TRANSACTION_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    transaction_interval: Duration,
    /// Exactly-once: commit sooner once a transaction holds this many records.
    #[arg(long, env = "FRAUDSTREAM_TRANSACTION_MAX_EVENTS", default_value_t = TransactionConfig::default().max_events)]
    transaction_max_events: usize,
    /// Exactly-once: the producer's transactional.id, stable for this member across restarts and
    /// unique among members (default: `<group id>-<host name>`, e.g. a StatefulSet pod's name).
    #[arg(long, env = "FRAUDSTREAM_TRANSACTIONAL_ID")]
    transactional_id: Option<String>,
    /// REST scoring requests served at once; more get 429 (the stream keeps its share of the model).
    #[arg(long, env = "FRAUDSTREAM_MAX_REST_CONCURRENCY", default_value_t = fraudstream::api::DEFAULT_REST_CONCURRENCY)]
    max_rest_concurrency: usize,
    /// Partitions for the output and dead-letter topics if they must be created (0: never create topics).
    #[arg(long, env = "FRAUDSTREAM_TOPIC_PARTITIONS", default_value_t = 4)]
    topic_partitions: i32,
    /// Payments per drift window: when one fills, the PSI of each feature group and of the score
    /// against the serving version's training reference is exported (0: no drift monitoring).
    #[arg(long, value_name = "PAYMENTS", env = "FRAUDSTREAM_DRIFT_WINDOW", default_value_t = fraudstream::drift::DEFAULT_DRIFT_WINDOW)]
    drift_window: usize,
    /// PSI above which a group's drift is logged as a warning.
    #[arg(long, value_name = "PSI", env = "FRAUDSTREAM_DRIFT_THRESHOLD", default_value_t = fraudstream::drift::DEFAULT_PSI_THRESHOLD)]
    drift_threshold: f64,
}

/// Micro-batching and device settings shared by `score` and `demo`.
#[derive(Debug, Args)]
struct ScoringArgs {
    /// Most events in one forward pass.
    #[arg(long, env = "FRAUDSTREAM_MAX_BATCH", default_value_t = 1024)]
    max_batch: usize,
    /// Longest an event waits for its batch to fill (e.g. `5ms`).
    #[arg(long, env = "FRAUDSTREAM_MAX_DELAY", default_value = "2ms", value_parser = humantime::parse_duration)]
    max_delay: Duration,
    /// Device to score on.
    #[arg(long, env = "FRAUDSTREAM_DEVICE", value_parser = choice::<Device>(), default_value = "auto")]
    device: Device,
    /// Intra-op threads for libtorch (1 is fastest on small shared machines; scale with replicas).
    #[arg(long, env = "FRAUDSTREAM_THREADS", default_value_t = 1)]
    threads: i32,
    /// Reason codes for payments at or above the review band (`false`: decisions only).
    #[arg(long, env = "FRAUDSTREAM_REASONS", default_value_t = true, action = clap::ArgAction::Set)]
    reasons: bool,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// A real Kafka broker (default: an in-process mock cluster).
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: Option<String>,
    /// librdkafka properties for --brokers (ignored without it), e.g. `-X security.protocol=SSL`; from the environment:
    /// `KAFKA_PROPERTIES="k1=v1;k2=v2"`.
    #[arg(short = 'X', value_name = "KEY=VALUE", env = "KAFKA_PROPERTIES", hide_env_values = true, value_delimiter = ';', value_parser = fraudstream::kafka::parse_property)]
    property: Vec<(String, String)>,
    /// Model store: s3://bucket/prefix or a directory (default: a temporary directory).
    #[arg(long, env = "FRAUDSTREAM_MODEL_STORE")]
    model_store: Option<String>,
    /// Simulated labelled payments to train on.
    #[arg(long, default_value_t = 200_000, env = "FRAUDSTREAM_TRAIN_ROWS")]
    train_rows: u64,
    /// Simulated live payments to stream through the scorer.
    #[arg(long, default_value_t = 50_000, env = "FRAUDSTREAM_EVENTS")]
    events: u64,
    /// Target rate of live payments per second (default: as fast as possible).
    #[arg(long, env = "FRAUDSTREAM_RATE")]
    rate: Option<f64>,
    /// Partitions of the demo topics.
    #[arg(long, default_value_t = 4, env = "FRAUDSTREAM_PARTITIONS")]
    partitions: i32,
    /// Seed of the simulated history and traffic.
    #[arg(long, default_value_t = 42, env = "FRAUDSTREAM_SEED")]
    seed: u64,
    #[command(flatten)]
    scoring: ScoringArgs,
    /// Also serve the REST API and metrics here during the demo (e.g. 127.0.0.1:8501).
    #[arg(long, env = "FRAUDSTREAM_HTTP_ADDR")]
    http_addr: Option<std::net::SocketAddr>,
    /// Run the learning loop instead: a model trained on regime A serves, the fraud pattern moves
    /// (regime B), live AP drops and PSI alarms, the trainer retrains on the labelled topic, the
    /// new version wins and is swapped in, live AP recovers.
    #[arg(long, env = "FRAUDSTREAM_DEMO_DRIFT")]
    drift: bool,
    /// Show the components' log lines (info and up) between the demo's own lines (default: errors only).
    #[arg(short, long, env = "FRAUDSTREAM_VERBOSE")]
    verbose: bool,
    /// Append the components' log lines (info and up) to this file instead.
    #[arg(long, env = "FRAUDSTREAM_LOG_FILE", conflicts_with = "verbose")]
    log_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// Number of payments to write (the original data set has 594,643).
    #[arg(long, default_value_t = 594_643, env = "FRAUDSTREAM_ROWS")]
    rows: u64,
    /// Random seed; the same seed gives the same payments.
    #[arg(long, default_value_t = 42, env = "FRAUDSTREAM_SEED")]
    seed: u64,
    /// Output file (default: stdout).
    #[arg(long, short, env = "FRAUDSTREAM_OUTPUT")]
    output: Option<PathBuf>,
    /// Draw the simulated payments from this one on from the drifted regime B (0: all of them):
    /// fraud moves to mid-amount transportation and food, the population shifts.
    #[arg(long, value_name = "N", env = "FRAUDSTREAM_DRIFT_AFTER")]
    drift_after: Option<u64>,
}

#[derive(Debug, Args)]
struct EncodeArgs {
    /// Smallest training amount (the model's `amount_min`).
    #[arg(long, default_value_t = 0.0, env = "FRAUDSTREAM_AMOUNT_MIN")]
    amount_min: f64,
    /// Largest training amount (the model's `amount_max`).
    #[arg(long, default_value_t = 8329.96, env = "FRAUDSTREAM_AMOUNT_MAX")]
    amount_max: f64,
}

#[derive(Debug, Args)]
struct WireArgs {
    /// Wire format of the events.
    #[arg(long, env = "FRAUDSTREAM_FORMAT", value_parser = choice::<WireFormat>(), default_value = "confluent")]
    format: WireFormat,
    /// Schema id written into the Confluent header (without a registry).
    #[arg(long, env = "FRAUDSTREAM_SCHEMA_ID", default_value_t = 1)]
    schema_id: u32,
    /// Confluent Schema Registry: writers register their schema under `<topic>-value`, readers
    /// resolve each record's writer schema. Basic auth from SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO
    /// (user:password), a CA from SCHEMA_REGISTRY_CA_LOCATION.
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    schema_registry_url: Option<String>,
}

impl WireArgs {
    fn codec(&self) -> Codec {
        Codec::new(self.format, self.schema_id)
    }

    /// The registry, when one is given and the format is Confluent's.
    fn registry(&self) -> Result<Option<SchemaRegistry>> {
        match (&self.schema_registry_url, self.format) {
            (Some(url), WireFormat::Confluent) => Ok(Some(SchemaRegistry::new(RegistryConfig::from_env(url))?)),
            _ => Ok(None),
        }
    }
}

#[derive(Debug, Args)]
struct ProduceArgs {
    #[command(flatten)]
    kafka: KafkaFlags,
    #[command(flatten)]
    wire: WireArgs,
    /// Topic to publish to.
    #[arg(long, env = "FRAUDSTREAM_INPUT_TOPIC", default_value = "payments")]
    topic: String,
    /// Publish the rows of this BankSim CSV file.
    #[arg(long, conflicts_with = "simulate", required_unless_present = "simulate", env = "FRAUDSTREAM_CSV")]
    csv: Option<PathBuf>,
    /// Publish this many simulated payments.
    #[arg(long, value_name = "N", env = "FRAUDSTREAM_SIMULATE")]
    simulate: Option<u64>,
    /// Simulator seed.
    #[arg(long, default_value_t = 42, env = "FRAUDSTREAM_SEED")]
    seed: u64,
    /// Draw the simulated payments from this one on from the drifted regime B (0: all of them):
    /// fraud moves to mid-amount transportation and food, the population shifts.
    #[arg(long, value_name = "N", env = "FRAUDSTREAM_DRIFT_AFTER", requires = "simulate", conflicts_with = "csv")]
    drift_after: Option<u64>,
    /// Target rate in events per second (default: as fast as the broker takes them).
    #[arg(long, value_name = "EVENTS_PER_S", env = "FRAUDSTREAM_RATE")]
    rate: Option<f64>,
    /// Keep the source's event times instead of stamping the send time.
    #[arg(long, env = "FRAUDSTREAM_KEEP_EVENT_TIME")]
    keep_event_time: bool,
    /// Partitions for the topic if it has to be created.
    #[arg(long, default_value_t = 4, env = "FRAUDSTREAM_PARTITIONS")]
    partitions: i32,
    /// Also publish each payment's ground truth (the CSV's or the simulator's `fraud`) to this
    /// topic as a PaymentLabel, --label-delay after the payment (created with --partitions).
    #[arg(long, env = "FRAUDSTREAM_LABELS_TOPIC")]
    labels_topic: Option<String>,
    /// How long after its payment each label is published.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, env = "FRAUDSTREAM_LABEL_DELAY")]
    label_delay: Duration,
    /// The labels' `source` field.
    #[arg(long, default_value = "fraudstream-produce", env = "FRAUDSTREAM_LABEL_SOURCE")]
    label_source: String,
}

#[derive(Debug, Args)]
struct ConsumeArgs {
    #[command(flatten)]
    kafka: KafkaFlags,
    #[command(flatten)]
    wire: WireArgs,
    /// Topic to read.
    #[arg(long, default_value = "payments-scored", env = "FRAUDSTREAM_TOPIC")]
    topic: String,
    /// Record type on the topic.
    #[arg(long, value_parser = choice::<EventKind>(), default_value = "scored", env = "FRAUDSTREAM_KIND")]
    kind: EventKind,
    /// Only new events (default: from the beginning of the topic).
    #[arg(long, env = "FRAUDSTREAM_LATEST")]
    latest: bool,
    /// Print only scored payments at or above this fraud probability.
    #[arg(long, value_name = "P", env = "FRAUDSTREAM_MIN_PROBABILITY")]
    min_probability: Option<f64>,
    /// Print only scored payments flagged as fraud at the model's threshold.
    #[arg(long, env = "FRAUDSTREAM_FRAUDS_ONLY")]
    frauds_only: bool,
    /// Stop after printing N events.
    #[arg(long, short = 'n', value_name = "N", env = "FRAUDSTREAM_MAX")]
    max: Option<u64>,
    /// Stop when nothing arrives for this long (e.g. `5s`; default: wait forever).
    #[arg(long, value_parser = humantime::parse_duration, env = "FRAUDSTREAM_IDLE_TIMEOUT")]
    idle_timeout: Option<Duration>,
    /// Which records to see on a topic written in transactions (a scorer with --delivery exactly-once).
    #[arg(long, value_parser = choice::<Isolation>(), default_value = "read-committed", env = "FRAUDSTREAM_ISOLATION_LEVEL")]
    isolation_level: Isolation,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        // A demo tells its story on stdout and stderr; the components' logs are for -v or a file.
        Command::Demo(args) if !args.verbose => {
            let file = match &args.log_file {
                Some(path) => Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .with_context(|| format!("opening the log file {}", path.display()))?,
                ),
                None => None,
            };
            let level = if file.is_some() { "info" } else { "error" };
            init_logging_with(cli.log_format, level, file);
        }
        _ => init_logging(cli.log_format),
    }
    match cli.command {
        Command::Simulate(args) => simulate(args),
        Command::Encode(args) => encode(args),
        Command::Produce(args) => runtime()?.block_on(produce(args)),
        Command::Consume(args) => runtime()?.block_on(consume(args)),
        Command::Score(args) => {
            set_threads(args.scoring.threads)?;
            runtime()?.block_on(score(*args))
        }
        Command::Models(args) => runtime()?.block_on(models_cmd::run(args)),
        Command::Monitor(args) => runtime()?.block_on(monitor_cmd::monitor(args)),
        Command::Demo(args) => {
            set_threads(args.scoring.threads)?;
            runtime()?.block_on(demo(args))
        }
    }
}

fn set_threads(threads: i32) -> Result<()> {
    if threads < 1 {
        bail!("--threads must be at least 1");
    }
    tch::set_num_threads(threads);
    Ok(())
}

/// Cancels `token` on SIGINT or SIGTERM, so every part can drain and commit.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
        token.cancel();
    });
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// The simulator for `rows` payments, drifting to regime B after `drift_after` of them if given.
fn simulator(rows: u64, seed: u64, drift_after: Option<u64>) -> Simulator {
    let sim = Simulator::new(rows, seed);
    match drift_after {
        Some(n) => sim.drift_after(n),
        None => sim,
    }
}

fn simulate(args: SimulateArgs) -> Result<()> {
    let mut sim = simulator(args.rows, args.seed, args.drift_after);
    let out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(File::create(path).with_context(|| format!("creating {}", path.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::with_capacity(1 << 20, out);
    sim.write_csv(&mut out).context("writing simulated payments")?;
    out.flush().context("writing simulated payments")?;
    Ok(())
}

/// Reads payments from stdin: JSON lines if the first non-blank byte is `{`, else BankSim CSV.
fn read_payments(input: impl BufRead + 'static) -> Result<Box<dyn Iterator<Item = Result<Payment>>>> {
    let mut input = input;
    let first = loop {
        let buf = input.fill_buf().context("reading stdin")?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => break Some(buf[i]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    };
    Ok(match first {
        None => Box::new(std::iter::empty()),
        Some(b'{') => Box::new(
            input.lines().enumerate().filter(|(_, l)| !matches!(l, Ok(l) if l.trim().is_empty())).map(|(i, line)| {
                let line = line.context("reading stdin")?;
                serde_json::from_str::<Payment>(&line)
                    .with_context(|| format!("stdin line {}: not a Payment JSON object", i + 1))
            }),
        ),
        Some(_) => Box::new(BankSimReader::new(input)?.map(|r| r.map_err(anyhow::Error::from))),
    })
}

fn encode(args: EncodeArgs) -> Result<()> {
    if args.amount_max.partial_cmp(&args.amount_min) != Some(std::cmp::Ordering::Greater) {
        bail!("--amount-max ({}) must be larger than --amount-min ({})", args.amount_max, args.amount_min);
    }
    let encoder = FeatureEncoder::new(FeatureSpec::banksim(args.amount_min, args.amount_max));
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut row = vec![0.0f32; encoder.width()];
    for payment in read_payments(BufReader::new(std::io::stdin()))? {
        let payment = payment?;
        encoder.encode_into(&payment, &mut row)?;
        serde_json::to_writer(&mut out, &row)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

async fn produce(args: ProduceArgs) -> Result<()> {
    let kafka = KafkaArgs::from(args.kafka);
    let mut topics = vec![args.topic.as_str()];
    topics.extend(args.labels_topic.as_deref());
    ensure_topics(&kafka, &topics, args.partitions).await?;
    let producer = create_producer(&kafka)?;
    let registry = args.wire.registry()?;
    // With a registry, each topic's schema is registered under `<topic>-value` and its id written.
    let codec_for = |topic: &str, schema: &'static str, name: &str, default_id: u32| {
        let registry = registry.as_ref();
        let (subject, name, fallback) = (value_subject(topic), name.to_string(), args.wire.codec());
        async move {
            let Some(registry) = registry else { return Ok(Some(fallback.with_schema_id(default_id))) };
            let stop = CancellationToken::new();
            cancel_on_signal(stop.clone());
            let Some(id) = registry.register_until(&subject, schema, &stop, |_| {}).await? else { return Ok(None) };
            eprintln!("schema registry {}: {name} schema registered under {subject} as id {id}", registry.url());
            anyhow::Ok(Some(Codec::new(WireFormat::Confluent, id)))
        }
    };
    let Some(codec) = codec_for(&args.topic, PAYMENT_SCHEMA_JSON, "Payment", args.wire.schema_id).await? else {
        return Ok(());
    };
    let labels = match &args.labels_topic {
        None => None,
        Some(topic) => {
            let label_schema = fraudstream::codec::PAYMENT_LABEL_SCHEMA_JSON;
            let id = fraudstream::codec::PAYMENT_LABEL_SCHEMA_ID;
            let Some(codec) = codec_for(topic, label_schema, "PaymentLabel", id).await? else { return Ok(()) };
            Some(LabelStream {
                topic: topic.clone(),
                codec,
                delay: args.label_delay,
                source: args.label_source.clone(),
            })
        }
    };
    let options = PublishOptions {
        topic: args.topic.clone(),
        codec,
        rate: args.rate,
        stamp_event_time: !args.keep_event_time,
        labels,
    };
    let (payments, total): (Box<dyn Iterator<Item = Payment>>, Option<u64>) = match (&args.csv, args.simulate) {
        (Some(path), _) => {
            let file = File::open(path).with_context(|| format!("opening BankSim CSV {}", path.display()))?;
            let prefix = path.file_stem().and_then(|s| s.to_str()).unwrap_or("csv").to_string();
            let reader = BankSimReader::with_id_prefix(BufReader::new(file), &prefix)?;
            let path = path.clone();
            // A bad row stops the run with its line number rather than being skipped silently.
            let rows = reader.map_while(move |r| match r {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "stopping at a malformed row");
                    None
                }
            });
            (Box::new(rows), None)
        }
        (None, Some(n)) => (Box::new(simulator(n, args.seed, args.drift_after)), Some(n)),
        (None, None) => bail!("pass --csv FILE or --simulate N"),
    };
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} payments sent [{elapsed_precise}] {per_sec}")
            .expect("valid progress template"),
    );
    let summary = publish_payments(&producer, &options, payments, |sent| bar.set_position(sent)).await?;
    bar.finish_and_clear();
    println!("{summary} to topic {:?} on {}", args.topic, kafka.brokers);
    if summary.failed + summary.labels_failed > 0 {
        bail!(
            "{} payments and {} labels were not delivered; see the warnings above",
            summary.failed,
            summary.labels_failed
        );
    }
    Ok(())
}

async fn consume(args: ConsumeArgs) -> Result<()> {
    let schema = match args.kind {
        EventKind::Payment => PAYMENT_SCHEMA_JSON,
        EventKind::Scored => SCORED_PAYMENT_SCHEMA_JSON,
    };
    let schemas = args.wire.registry()?.map(|registry| Arc::new(WriterSchemas::new(registry, schema)));
    let options = ConsumeOptions {
        topic: args.topic,
        codec: args.wire.codec(),
        schemas,
        kind: args.kind,
        from_beginning: !args.latest,
        min_probability: args.min_probability,
        frauds_only: args.frauds_only,
        max_events: args.max,
        idle_timeout: args.idle_timeout,
        isolation: args.isolation_level,
    };
    let summary = print_events(&args.kafka.into(), &options, &mut std::io::stdout().lock()).await?;
    if summary.undecodable > 0 {
        eprintln!("{} events did not decode as {:?} in format {:?}", summary.undecodable, args.kind, args.wire.format);
    }
    Ok(())
}

async fn score(args: ScoreArgs) -> Result<()> {
    if args.drift_threshold.is_nan() || args.drift_threshold < 0.0 {
        bail!("--drift-threshold must be a PSI (a number >= 0), not {}", args.drift_threshold);
    }
    let device = args.scoring.device.resolve()?;
    let cache = match &args.model_cache {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("fraudstream-models-{}", std::process::id())),
    };
    let transactional_id = args.transactional_id.unwrap_or_else(|| default_transactional_id(&args.group_id));
    let config = ScorerConfig {
        pipeline: PipelineConfig {
            schema_registry: args.schema_registry_url.map(RegistryConfig::from_env),
            kafka: args.kafka.into(),
            group_id: args.group_id,
            input_topic: args.input_topic,
            output_topic: args.output_topic,
            dead_letter_topic: args.dlq_topic,
            input_codec: Codec::new(args.input_format, 0),
            output_codec: Codec::new(args.output_format, args.output_schema_id),
            max_batch: args.scoring.max_batch,
            max_delay: args.scoring.max_delay,
            max_in_flight: args.max_in_flight,
            max_in_flight_bytes: args.max_in_flight_bytes,
            drain_timeout: args.drain_timeout,
            dead_letter_guard: GuardLimits {
                window: args.dlq_window,
                max_share: args.dlq_max_share,
                max_consecutive: args.dlq_max_consecutive,
            },
            delivery: args.delivery,
            transaction: TransactionConfig {
                id: transactional_id,
                interval: args.transaction_interval,
                max_events: args.transaction_max_events,
            },
            drift: DriftConfig { window: args.drift_window, threshold: args.drift_threshold },
            relay_baseline: false,
        },
        watch: WatchConfig {
            store: args.model_store,
            pinned_version: args.model_version,
            poll_interval: args.poll_interval,
            device,
            cache_dir: cache,
            load_timeout: args.model_load_timeout,
            shadow: args.shadow,
        },
        http_addr: Some(args.http_addr),
        model_name: args.model_name,
        body_limit: args.max_body_bytes,
        create_topics: (args.topic_partitions > 0).then_some(args.topic_partitions),
        rest_concurrency: args.max_rest_concurrency,
        reasons: args.scoring.reasons,
        feature_log: args.feature_log,
    };
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let parts = ScorerParts::new(config.pipeline.max_batch);
    fraudstream::scorer::run(config, parts, shutdown).await?;
    Ok(())
}

async fn demo(args: DemoArgs) -> Result<()> {
    let kafka = args.brokers.map(|brokers| KafkaArgs { brokers, property: args.property });
    let config = DemoConfig {
        drift: args.drift,
        kafka,
        model_store: args.model_store,
        train_rows: args.train_rows,
        events: args.events,
        rate: args.rate,
        partitions: args.partitions,
        seed: args.seed,
        device: args.scoring.device,
        max_batch: args.scoring.max_batch,
        max_delay: args.scoring.max_delay,
        http_addr: args.http_addr,
    };
    if config.drift {
        let summary = fraudstream::demo::drift::run(config).await?;
        if !summary.recovered {
            bail!("the retrained version {} did not take over from {}", summary.second_version, summary.first_version);
        }
        return Ok(());
    }
    let summary = fraudstream::demo::run(config).await?;
    println!("{summary}");
    if summary.scored + summary.dead_lettered < summary.produced {
        bail!("{} payments were not scored", summary.produced - summary.scored - summary.dead_lettered);
    }
    Ok(())
}
