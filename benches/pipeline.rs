//! Side-by-side benchmarks, measured in one run on one machine (run with
//! `scripts/bench`, which starts the broker and writes docs/benchmarks.md).
//!
//! 1. scorer throughput vs a no-op relay built from the same consumer and
//!    producer code, on the same broker and the same 1M-event stream (and
//!    the scorer exactly once, without reason codes, with a shadow model);
//! 2. scorer throughput vs the original demo's architecture: one synchronous
//!    HTTP `:predict` call per event against the scorer's own REST API;
//! 3. end-to-end latency at 25%, 50% and 75% of the maximum rate the machine
//!    sustains live, with the load generator beside the scorer
//!    (BENCH_PHASE=live-max, then BENCH_PHASE=latency BENCH_RATE=..., each
//!    on a fresh broker);
//! 4. inference alone at batch sizes 1..4096, codec and simulator speed,
//!    trainer time on 594,643 rows, and peak RSS;
//! 5. the monitor joining one scorer round's output with a label per payment,
//!    against the scorer's best rate.
//! 6. the trainer on 594,643 labelled payments read from a Kafka topic of
//!    labelled scored payments vs the same rows from a CSV file
//!    (BENCH_PHASE=trainer-data, on a fresh broker).
//!
//! Ratios, not absolute numbers, are the result: the machine is shared.
//! Tuning aids: BENCH_X="k=v;k=v" (extra librdkafka properties),
//! BENCH_THROUGHPUT_ONLY=1, BENCH_PIPELINE=scorer|relay|... (only those, comma-separated,
//! e.g. under perf), BENCH_EVENTS, BENCH_HTTP_CALLS, BENCH_IN_FLIGHT.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fraudstream::api::{router, ApiState};
use fraudstream::codec::{Codec, WireFormat};
use fraudstream::features::FeatureSet;
use fraudstream::history::{HistoryState, Replay};
use fraudstream::kafka::{ensure_topics, KafkaArgs};
use fraudstream::model::{Label, Model, ModelStore, MODEL_FILE};
use fraudstream::model_watch::WatchConfig;
use fraudstream::pipeline::{Delivery, KafkaReplay, PipelineConfig, TransactionConfig};
use fraudstream::produce::{create_producer, publish_payments, PublishOptions};
use fraudstream::scorer::{ScorerConfig, ScorerParts};
use fraudstream::scoring::ScoringService;
use fraudstream::training::{data::DataSource, run_once, train::TrainConfig, TrainerOptions};
use fraudstream::Simulator;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

/// The allocator of the `fraudstream` binary, so the in-process scorer costs what it costs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CODEC: Codec = Codec::new(WireFormat::Confluent, 1);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Peak resident set size (VmHWM) of a process, in MiB, from /proc.
fn peak_rss_mib(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The pipelines measured side by side.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pipeline {
    /// Consume -> produce through the same consumer, tickets and producer.
    Relay,
    /// The scorer, at least once (the default).
    Scorer,
    /// The scorer with `--delivery exactly-once`.
    ExactlyOnce,
    /// The scorer with `--reasons false`: decisions, no reason codes.
    NoReasons,
    /// The scorer with `--shadow canary`: every event scored by a second model too.
    Shadow,
    /// The scorer serving a model on the history feature set (customer state kept).
    History,
}

impl Pipeline {
    fn name(self) -> &'static str {
        match self {
            Pipeline::Relay => "relay",
            Pipeline::Scorer => "scorer",
            Pipeline::ExactlyOnce => "exactly-once",
            Pipeline::NoReasons => "no-reasons",
            Pipeline::Shadow => "shadow",
            Pipeline::History => "history",
        }
    }

    /// The pipeline of the latency phases: BENCH_DELIVERY=exactly-once, else the scorer.
    fn from_env() -> Self {
        match std::env::var("BENCH_DELIVERY").as_deref() {
            Ok("exactly-once") => Pipeline::ExactlyOnce,
            _ => Pipeline::Scorer,
        }
    }
}

fn scorer_config(
    kafka: &KafkaArgs,
    input: &str,
    output: &str,
    store: &str,
    cache: &std::path::Path,
    pipeline: Pipeline,
) -> ScorerConfig {
    let delivery = if pipeline == Pipeline::ExactlyOnce { Delivery::ExactlyOnce } else { Delivery::AtLeastOnce };
    ScorerConfig {
        pipeline: PipelineConfig {
            kafka: kafka.clone(),
            group_id: unique("bench"),
            input_topic: input.into(),
            output_topic: output.into(),
            dead_letter_topic: format!("{output}-dlq"),
            input_codec: CODEC,
            output_codec: CODEC,
            max_in_flight: env_u64("BENCH_IN_FLIGHT", 100_000) as usize,
            relay_baseline: pipeline == Pipeline::Relay,
            delivery,
            transaction: TransactionConfig { id: unique("bench-txn"), ..TransactionConfig::default() },
            ..PipelineConfig::default()
        },
        watch: WatchConfig {
            store: store.into(),
            poll_interval: Duration::from_secs(3600),
            cache_dir: cache.to_path_buf(),
            shadow: (pipeline == Pipeline::Shadow).then_some(Label::Canary),
            ..WatchConfig::default()
        },
        http_addr: None,
        reasons: pipeline != Pipeline::NoReasons,
        ..ScorerConfig::default()
    }
}

/// CPU seconds (user + system) a process has used so far, from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces); utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) / 100.0
}

/// One pipeline's pass over the whole input topic.
struct Drain {
    /// Events/s from the first event consumed to the last output acknowledged.
    rate: f64,
    /// CPU microseconds per event of this process (the pipeline) and of the
    /// broker (pid in BENCH_BROKER_PID, set by scripts/bench).
    own_cpu_us: f64,
    broker_cpu_us: f64,
}

/// Runs a scorer (or relay) over the whole input topic.
async fn drain_topic(config: ScorerConfig, events: u64) -> Drain {
    let broker_pid = std::env::var("BENCH_BROKER_PID").unwrap_or_default();
    let (own_cpu, broker_cpu) = (cpu_seconds("self"), cpu_seconds(&broker_pid));
    let parts = ScorerParts::new(config.pipeline.max_batch);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(fraudstream::scorer::run(config, parts.clone(), shutdown.clone()));
    let mut started = None;
    loop {
        let consumed = parts.counters.consumed.load(Ordering::Relaxed);
        if consumed > 0 && started.is_none() {
            started = Some(Instant::now());
        }
        if parts.counters.scored.load(Ordering::Relaxed) >= events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = started.expect("consumed something").elapsed().as_secs_f64();
    let per_event_us = |cpu: f64| cpu * 1e6 / events as f64;
    let drain = Drain {
        rate: events as f64 / seconds,
        own_cpu_us: per_event_us(cpu_seconds("self") - own_cpu),
        broker_cpu_us: per_event_us(cpu_seconds(&broker_pid) - broker_cpu),
    };
    shutdown.cancel();
    task.await.unwrap().unwrap();
    drain
}

/// apache-avro's serde reader and writer over the same schemas and framing,
/// to put the cost of fraudstream's hand-written codec beside it.
struct ReferenceAvro {
    payment: apache_avro::reader::datum::GenericDatumReader<'static>,
    scored: apache_avro::writer::datum::GenericDatumWriter<'static>,
}

impl ReferenceAvro {
    fn new() -> Self {
        let schema = |json: &str| -> &'static apache_avro::Schema {
            Box::leak(Box::new(apache_avro::Schema::parse_str(json).unwrap()))
        };
        Self {
            payment: apache_avro::reader::datum::GenericDatumReader::builder(schema(
                fraudstream::codec::PAYMENT_SCHEMA_JSON,
            ))
            .build()
            .unwrap(),
            scored: apache_avro::writer::datum::GenericDatumWriter::builder(schema(
                fraudstream::codec::SCORED_PAYMENT_SCHEMA_JSON,
            ))
            .build()
            .unwrap(),
        }
    }

    fn decode_payment(&self, bytes: &[u8]) -> fraudstream::Payment {
        self.payment.read_deser(&mut &bytes[5..]).unwrap()
    }

    fn encode_scored(&self, scored: &fraudstream::ScoredPayment) -> Vec<u8> {
        let mut out = Vec::with_capacity(192);
        out.extend_from_slice(&[0, 0, 0, 0, 1]);
        self.scored.write_ser(&mut out, scored).unwrap();
        out
    }
}

/// Runs the `fraudstream score` binary over the whole input topic and reads
/// its peak resident set size (VmHWM) before stopping it.
async fn scorer_process_peak_rss(kafka: &KafkaArgs, input: &str, store: &str, events: u64) -> f64 {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let output = unique("rss-out");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fraudstream"))
        .args(["score", "--brokers", &kafka.brokers, "--input-topic", input, "--output-topic", &output])
        .args(["--group-id", &unique("rss"), "--model-store", store, "--device", "cpu"])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn fraudstream score");
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = match reqwest::get(&metrics).await {
            Ok(r) => r.text().await.unwrap_or_default().lines().any(|l| {
                l.starts_with("fraudstream_events_out_total")
                    && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v >= events as f64)
            }),
            Err(_) => false,
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss = peak_rss_mib(&child.id().to_string());
    let _ = child.kill();
    let _ = child.wait();
    rss
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(f64::NAN)
}

/// A scorer running in this process on fresh input and output topics, with
/// its partitions assigned: the set-up of the live measurements.
struct LiveScorer {
    input: String,
    output: String,
    parts: ScorerParts,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), fraudstream::scorer::ScorerError>>,
}

impl LiveScorer {
    async fn start(kafka: &KafkaArgs, store: &str, cache: &std::path::Path) -> Self {
        let input = unique("live-in");
        let output = unique("live-out");
        ensure_topics(kafka, &[&input, &output], 4).await.unwrap();
        let parts = ScorerParts::new(1024);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(fraudstream::scorer::run(
            scorer_config(kafka, &input, &output, store, cache, Pipeline::from_env()),
            parts.clone(),
            shutdown.clone(),
        ));
        while parts.state.assigned_partitions() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { input, output, parts, shutdown, task }
    }

    /// Publishes `n` payments (at `rate`, or as fast as possible) and waits until all are scored.
    /// The load generator is a `fraudstream produce` process of its own, as
    /// payment producers are: it does not share this process's runtime.
    async fn publish_and_wait(&self, kafka: &KafkaArgs, n: u64, rate: Option<f64>) {
        let mut produce = tokio::process::Command::new(env!("CARGO_BIN_EXE_fraudstream"));
        produce.args(["produce", "--brokers", &kafka.brokers, "--topic", &self.input]);
        produce.args(["--simulate", &n.to_string(), "--seed", "5"]);
        if let Some(rate) = rate {
            produce.args(["--rate", &format!("{rate:.0}")]);
        }
        for (k, v) in &kafka.property {
            produce.args(["-X", &format!("{k}={v}")]);
        }
        let status = produce
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .expect("run fraudstream produce");
        assert!(status.success(), "fraudstream produce failed: {status}");
        while self.parts.counters.scored.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// The rate the whole system sustains live: the load generator publishes
/// `n` payments as fast as it can while the scorer runs beside it on the
/// same cores; events scored per second from first consumed to last scored.
async fn live_max(kafka: &KafkaArgs, store: &str, cache: &std::path::Path, n: u64) -> f64 {
    let scorer = LiveScorer::start(kafka, store, cache).await;
    let counters = scorer.parts.counters.clone();
    let first = tokio::spawn(async move {
        while counters.consumed.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Instant::now()
    });
    scorer.publish_and_wait(kafka, n, None).await;
    let rate = n as f64 / first.await.unwrap().elapsed().as_secs_f64();
    scorer.stop().await;
    rate
}

/// Latency at `rate` events/s for `seconds`: (p50, p99) from event time to
/// `scoredAt`, and, exactly once, (p50, p99) from event time to the moment a
/// reader with `isolation.level=read_committed`, assigned before the first
/// event, receives the output (what a downstream system waits, the
/// transaction's commit included). At least once the reader reads after the
/// run, as in earlier rounds, so its CPU does not weigh on the scorer's
/// latency; the readable pair is then NaN.
async fn latency_at(
    kafka: &KafkaArgs,
    store: &str,
    cache: &std::path::Path,
    rate: f64,
    seconds: f64,
) -> ((f64, f64), (f64, f64)) {
    let scorer = LiveScorer::start(kafka, store, cache).await;
    let n = (rate * seconds) as u64;
    let consumer: StreamConsumer = kafka
        .client_config(&[
            ("group.id", &unique("lat-read")),
            ("auto.offset.reset", "earliest"),
            ("enable.auto.commit", "false"),
            ("isolation.level", "read_committed"),
            ("fetch.wait.max.ms", "5"),
        ])
        .create()
        .unwrap();
    // Assigned, not subscribed: no group join to wait for (up to 3 s on Kafka).
    let mut partitions = rdkafka::TopicPartitionList::new();
    for partition in 0..4 {
        partitions.add_partition_offset(&scorer.output, partition, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&partitions).unwrap();
    drop(partitions);
    let live = Pipeline::from_env() == Pipeline::ExactlyOnce;
    let read = async move {
        let (mut scored, mut readable) = (Vec::with_capacity(n as usize), Vec::with_capacity(n as usize));
        let mut seen = 0u64;
        let mut stream = consumer.stream();
        while seen < n {
            let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(30), stream.next()).await else { break };
            let received = fraudstream::payment::now_ms();
            let s = CODEC.decode_scored(m.payload().unwrap()).unwrap();
            seen += 1;
            // Skip the first 2 s of traffic: connection set-up and the first fetches are warm-up.
            let index: f64 = s.payment.payment_id.rsplit('-').next().unwrap().parse().unwrap();
            if index >= rate * 2.0 {
                scored.push((s.scored_at - s.payment.event_time) as f64);
                readable.push((received - s.payment.event_time) as f64);
            }
        }
        (scored, readable)
    };
    let (mut scored, mut readable) = if live {
        let reader = tokio::spawn(read);
        scorer.publish_and_wait(kafka, n, Some(rate)).await;
        reader.await.unwrap()
    } else {
        scorer.publish_and_wait(kafka, n, Some(rate)).await;
        let (scored, _) = read.await;
        (scored, Vec::new())
    };
    scorer.stop().await;
    scored.sort_by(f64::total_cmp);
    readable.sort_by(f64::total_cmp);
    let p = |v: &[f64]| (percentile(v, 0.5), percentile(v, 0.99));
    (p(&scored), p(&readable))
}

/// Joins per second of an in-process monitor over `scored` (the output of
/// a scorer round over `Simulator::new(events, 7)`) and one label per
/// payment, from the first join written to the last: the best of
/// BENCH_MONITOR_ROUNDS (3) rounds, each a new consumer group over the same
/// two topics, as the scorer's rate is its best round.
async fn monitor_drain(kafka: &KafkaArgs, scored: &str, events: u64) -> f64 {
    let labels = unique("bench-labels");
    ensure_topics(kafka, &[&labels], 4).await.unwrap();
    let producer = create_producer(kafka).unwrap();
    let codec = Codec::new(WireFormat::Confluent, fraudstream::codec::PAYMENT_LABEL_SCHEMA_ID);
    let records: Vec<(String, Vec<u8>)> = Simulator::new(events, 7)
        .map(|p| {
            let label = fraudstream::PaymentLabel::of(&p, "bench").unwrap();
            (label.customer.clone(), codec.encode_label(&label).unwrap())
        })
        .collect();
    for chunk in records.chunks(50_000) {
        let sends: Vec<_> = chunk
            .iter()
            .map(|(k, v)| producer.send_result(rdkafka::producer::FutureRecord::to(&labels).key(k).payload(v)).unwrap())
            .collect();
        for send in sends {
            send.await.unwrap().unwrap();
        }
    }
    drop(records);
    let mut best = f64::NAN;
    for _ in 0..env_u64("BENCH_MONITOR_ROUNDS", 3) {
        best = best.max(monitor_round(kafka, scored, &labels, events).await);
    }
    best
}

/// One monitor round of `monitor_drain`: joins per second.
async fn monitor_round(kafka: &KafkaArgs, scored: &str, labels: &str, events: u64) -> f64 {
    use fraudstream::monitor::{run, MonitorConfig, MonitorParts};
    use rdkafka::consumer::BaseConsumer;
    let labelled = unique("bench-labelled");
    let config = MonitorConfig {
        kafka: kafka.clone(),
        group_id: unique("bench-monitor"),
        scored_topic: scored.into(),
        labels_topic: labels.into(),
        output_topic: labelled.clone(),
        dead_letter_topic: format!("{labelled}-dlq"),
        codec: CODEC,
        ..MonitorConfig::default()
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(config, MonitorParts::default(), shutdown.clone()));
    let watcher: BaseConsumer = kafka.client_config(&[]).create().unwrap();
    let written = || -> i64 {
        (0..4).map(|p| watcher.fetch_watermarks(&labelled, p, Duration::from_secs(5)).map_or(0, |(_, high)| high)).sum()
    };
    let mut started = None;
    loop {
        let n = written();
        if n > 0 && started.is_none() {
            started = Some(Instant::now());
        }
        if n >= events as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = events as f64 / started.expect("joins were written").elapsed().as_secs_f64();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    rate
}

/// Publishes a copy of the stable version as a newer version labelled
/// `canary`: the shadow model of the shadow rounds, the same size as the
/// serving one (its cost is the second forward pass, not what it learnt).
async fn publish_canary(store: &str, cache: &std::path::Path) {
    let store = ModelStore::open(store).await.unwrap();
    let stable = store.label(Label::Stable).await.unwrap().expect("the trainer labelled its version stable");
    let files = store.fetch(&stable, &[MODEL_FILE], cache).await.unwrap();
    let mut manifest = files.manifest.clone();
    manifest.version = (stable.parse::<u64>().unwrap() + 1).to_string();
    let model = std::fs::read(files.dir.join(MODEL_FILE)).unwrap();
    store.publish(&manifest, &[(MODEL_FILE, model)]).await.unwrap();
    store.set_label(Label::Canary, &manifest.version).await.unwrap();
}

/// Trains on the full-size simulated set and publishes to `store`.
async fn train(store: &str) -> fraudstream::training::RunOutcome {
    train_on(store, FeatureSet::Payment).await
}

/// Trains on the full-size simulated set with `features` and publishes to `store`.
async fn train_on(store: &str, features: FeatureSet) -> fraudstream::training::RunOutcome {
    run_once(&TrainerOptions {
        features,
        data: DataSource::Simulator { rows: 594_643, seed: 42 },
        model_store: store.to_string(),
        model_name: "payfraud".into(),
        device: fraudstream::model::Device::Cpu,
        target_precision: None,
        force: false,
        train: TrainConfig::default(),
        ..TrainerOptions::default()
    })
    .await
    .unwrap()
}

/// The scorer's history rebuild over a whole topic: every partition read
/// back and recorded into a fresh state, as a member gaining it does
/// (`pipeline::KafkaReplay`, `HistoryState`). Seconds per million records
/// read, and heap bytes per customer held at the end.
fn history_rebuild(kafka: &KafkaArgs, topic: &str) -> (f64, f64, usize) {
    let mut replay = KafkaReplay {
        kafka: kafka.clone(),
        group_id: unique("bench-history"),
        topic: topic.into(),
        decode: Box::new(|bytes| CODEC.decode_payment(bytes).ok()),
    };
    let encoder = fraudstream::FeatureEncoder::new(fraudstream::FeatureSpec::demo());
    let (mut read, mut bytes, mut customers) = (0u64, 0usize, 0usize);
    let started = Instant::now();
    for partition in 0..4 {
        let mut state = HistoryState::default();
        read += replay
            .replay(partition, i64::MAX, 0, &mut |p| {
                if encoder.accepts(p) {
                    state.record(p);
                }
            })
            .unwrap();
        bytes += state.memory_bytes();
        customers += state.customers();
    }
    let seconds = started.elapsed().as_secs_f64();
    (seconds * 1e6 / read as f64, bytes as f64 / customers.max(1) as f64, customers)
}

/// The trainer from a Kafka topic vs from CSV, on the same BENCH_TRAINER_ROWS
/// (594,643) simulated labelled payments: each run (load, split, MLP +
/// baseline, export, publish to a fresh store) and its load alone, best of 2
/// alternating rounds. The runs train exactly BENCH_TRAINER_EPOCHS (10)
/// epochs, no early stopping, so both do the same work but the reading.
/// Returns the headline cell.
async fn trainer_data(kafka: &KafkaArgs, dir: &std::path::Path) -> String {
    use std::io::Write;

    use fraudstream::training::data::load;
    use fraudstream::training::topic::LabelledTopic;
    use rdkafka::producer::FutureRecord;

    let rows = env_u64("BENCH_TRAINER_ROWS", 594_643);
    let epochs = env_u64("BENCH_TRAINER_EPOCHS", 10) as usize;
    let payments: Vec<fraudstream::Payment> = Simulator::new(rows, 42).collect();
    let csv = dir.join("labelled.csv");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
    writeln!(out, "{}", fraudstream::payment::BANKSIM_HEADER).unwrap();
    for p in &payments {
        p.write_banksim_row(&mut out).unwrap();
    }
    out.into_inner().unwrap().sync_all().unwrap();

    // The monitor's records: the scored payment with its label, keyed by customer.
    let topic = unique("bench-labelled");
    ensure_topics(kafka, &[&topic], 4).await.unwrap();
    let template: fraudstream::ScoredPayment = serde_json::from_value(serde_json::json!({
        "payment": payments[0], "fraudProbability": 0.02, "isFraud": false, "threshold": 0.5,
        "modelName": "payfraud", "modelVersion": "1700000000", "scoredAt": 0, "decision": "allow",
    }))
    .unwrap();
    let producer = create_producer(kafka).unwrap();
    for chunk in payments.chunks(50_000) {
        let records: Vec<(String, Vec<u8>)> = chunk
            .iter()
            .map(|p| {
                let scored =
                    fraudstream::ScoredPayment { payment: p.clone(), scored_at: p.event_time, ..template.clone() };
                (p.customer.clone(), CODEC.encode_scored(&scored).unwrap())
            })
            .collect();
        let deliveries: Vec<_> = records
            .iter()
            .map(|(key, payload)| producer.send_result(FutureRecord::to(&topic).key(key).payload(payload)).unwrap())
            .collect();
        for d in deliveries {
            d.await.unwrap().unwrap();
        }
    }
    let sources = [
        DataSource::Files(csv.display().to_string()),
        DataSource::Kafka(LabelledTopic {
            kafka: kafka.clone(),
            topic: topic.clone(),
            since: Duration::from_secs(30 * 86_400),
            codec: CODEC,
            registry: None,
        }),
    ];
    let (mut run_best, mut load_best) = ([f64::MAX; 2], [f64::MAX; 2]);
    for round in 0..2 {
        for (i, source) in sources.iter().enumerate() {
            let started = Instant::now();
            let loaded = load(source).await.unwrap();
            load_best[i] = load_best[i].min(started.elapsed().as_secs_f64());
            assert_eq!(loaded.len() as u64, rows, "{source}");
            drop(loaded);
            let started = Instant::now();
            let outcome = run_once(&TrainerOptions {
                data: source.clone(),
                model_store: dir.join(format!("trainer-data-{round}-{i}")).display().to_string(),
                device: fraudstream::model::Device::Cpu,
                train: TrainConfig { max_epochs: epochs, patience: epochs, ..TrainConfig::default() },
                ..TrainerOptions::default()
            })
            .await
            .unwrap();
            run_best[i] = run_best[i].min(started.elapsed().as_secs_f64());
            assert!(outcome.published);
        }
    }
    eprintln!("trainer-data: runs {run_best:?} s, loads {load_best:?} s (csv, kafka)");
    format!(
        "**{:.2}x** ({:.1} vs {:.1} s per run of {epochs} epochs; reading alone {:.2} vs {:.2} s)",
        run_best[1] / run_best[0],
        run_best[1],
        run_best[0],
        load_best[1],
        load_best[0]
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tch::set_num_threads(1);
    // The metrics recorder, as in `fraudstream score`: per-event metrics cost what they cost in production.
    let _ = fraudstream::telemetry::prometheus();
    let brokers = std::env::var("FRAUDSTREAM_TEST_BROKERS").expect("run through scripts/bench (starts the broker)");
    let mut kafka = KafkaArgs::new(brokers);
    // Extra librdkafka properties for tuning experiments: BENCH_X="k=v;k=v".
    for pair in std::env::var("BENCH_X").unwrap_or_default().split(';').filter(|p| !p.is_empty()) {
        kafka.property.push(fraudstream::kafka::parse_property(pair).expect("BENCH_X holds k=v pairs"));
    }
    let events = env_u64("BENCH_EVENTS", 1_000_000);
    let http_calls = env_u64("BENCH_HTTP_CALLS", 5_000);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut out = String::new();
    // BENCH_MODEL_STORE keeps the model for the later phases, which reuse it.
    let store = std::env::var("BENCH_MODEL_STORE").unwrap_or_else(|_| dir.path().join("models").display().to_string());

    // Benchmark 3 runs in phases of their own, each on a broker scripts/bench
    // has just started: a broker holding millions of records from the runs
    // before is slower than a fresh one.
    let phase = std::env::var("BENCH_PHASE").unwrap_or_else(|_| "throughput".into());
    if phase == "trainer-data" {
        println!("{}", trainer_data(&kafka, dir.path()).await);
        return;
    }
    if phase != "throughput" {
        if ModelStore::open(&store).await.unwrap().latest_version().await.unwrap().is_none() {
            train(&store).await;
        }
        match phase.as_str() {
            // The rate the machine sustains live, generator and scorer side by side.
            "live-max" => println!("{:.0}", live_max(&kafka, &store, &cache, events).await),
            // p50 and p99 (ms) at BENCH_RATE events/s for 12 s: to scored, then to readable.
            "latency" => {
                let rate = env_u64("BENCH_RATE", 10_000) as f64;
                let ((p50, p99), (r50, r99)) = latency_at(&kafka, &store, &cache, rate, 12.0).await;
                println!("{p50:.1} {p99:.1} {r50:.1} {r99:.1}");
            }
            // Tuning aid: one scorer drain of BENCH_EVENTS, then the monitor over its output.
            "monitor" => {
                let input = unique("bench-in");
                ensure_topics(&kafka, &[&input], 4).await.unwrap();
                let producer = create_producer(&kafka).unwrap();
                let options = PublishOptions {
                    topic: input.clone(),
                    codec: CODEC,
                    rate: None,
                    stamp_event_time: true,
                    labels: None,
                };
                publish_payments(&producer, &options, Simulator::new(events, 7), |_| {}).await.unwrap();
                let output = unique("bench-out");
                let config = scorer_config(&kafka, &input, &output, &store, &cache, Pipeline::Scorer);
                let scorer = drain_topic(config, events).await.rate;
                let monitor = monitor_drain(&kafka, &output, events).await;
                println!("scorer {scorer:.0} events/s, monitor {monitor:.0} joins/s ({:.2})", monitor / scorer);
            }
            other => panic!("BENCH_PHASE is throughput, live-max, latency, trainer-data or monitor, not {other:?}"),
        }
        return;
    }

    // Trainer on the full-size simulated set (also the model every run below uses).
    let started = Instant::now();
    let outcome = train(&store).await;
    let trainer_seconds = started.elapsed().as_secs_f64();
    publish_canary(&store, &cache).await;
    eprintln!("trainer: {trainer_seconds:.1} s");
    let history_store = format!("{store}-history");
    let history_outcome = train_on(&history_store, FeatureSet::History).await;
    let headline_file = std::env::var("BENCH_HEADLINE_FILE").ok();

    // 1. Scorer vs relay on the same 1M-event stream.
    let input = unique("bench-in");
    ensure_topics(&kafka, &[&input], 4).await.unwrap();
    let producer = create_producer(&kafka).unwrap();
    let options =
        PublishOptions { topic: input.clone(), codec: CODEC, rate: None, stamp_event_time: true, labels: None };
    publish_payments(&producer, &options, Simulator::new(events, 7), |_| {}).await.unwrap();
    // The same payments with the simulator's own event times (180 days) for
    // the history scorer: the history features are about the customer's last
    // days, and a stream stamped within seconds puts every payment of a
    // customer in its last day (out of the model's range: nearly all go to
    // review and its reasons pass). The 28-feature scorer's rate is the same
    // on either stream.
    let history_input = unique("bench-in-history");
    ensure_topics(&kafka, &[&history_input], 4).await.unwrap();
    let options = PublishOptions { topic: history_input.clone(), stamp_event_time: false, ..options };
    publish_payments(&producer, &options, Simulator::new(events, 7), |_| {}).await.unwrap();
    let (mut relay_rounds, mut scorer_rounds, mut exactly_once_rounds) = (Vec::new(), Vec::new(), Vec::new());
    let (mut no_reasons_rounds, mut shadow_rounds, mut history_rounds) = (Vec::new(), Vec::new(), Vec::new());
    let mut scored_topic = String::new();
    for round in 0..3 {
        let pipelines = [
            Pipeline::Relay,
            Pipeline::Scorer,
            Pipeline::ExactlyOnce,
            Pipeline::NoReasons,
            Pipeline::Shadow,
            Pipeline::History,
        ];
        for pipeline in pipelines {
            if std::env::var("BENCH_PIPELINE").is_ok_and(|p| !p.split(',').any(|p| p == pipeline.name())) {
                continue;
            }
            let output = unique("bench-out");
            if pipeline == Pipeline::Scorer {
                scored_topic = output.clone();
            }
            let (model_store, topic) =
                if pipeline == Pipeline::History { (&history_store, &history_input) } else { (&store, &input) };
            let config = scorer_config(&kafka, topic, &output, model_store, &cache, pipeline);
            let drain = drain_topic(config, events).await;
            eprintln!(
                "round {round}: {:12} {:.0} events/s, CPU per event {:.2} us (+ broker {:.2} us)",
                pipeline.name(),
                drain.rate,
                drain.own_cpu_us,
                drain.broker_cpu_us
            );
            match pipeline {
                Pipeline::Relay => relay_rounds.push(drain),
                Pipeline::Scorer => scorer_rounds.push(drain),
                Pipeline::ExactlyOnce => exactly_once_rounds.push(drain),
                Pipeline::NoReasons => no_reasons_rounds.push(drain),
                Pipeline::Shadow => shadow_rounds.push(drain),
                Pipeline::History => history_rounds.push(drain),
            }
        }
    }
    let best = |rounds: &[Drain]| rounds.iter().map(|d| d.rate).fold(f64::NAN, f64::max);
    let (relay_best, scorer_best, exactly_once_best) =
        (best(&relay_rounds), best(&scorer_rounds), best(&exactly_once_rounds));
    let (no_reasons_best, shadow_best, history_best) =
        (best(&no_reasons_rounds), best(&shadow_rounds), best(&history_rounds));
    // Tuning aid: BENCH_THROUGHPUT_ONLY=1 stops after the throughput rounds.
    if std::env::var("BENCH_THROUGHPUT_ONLY").is_ok() {
        println!(
            "relay {relay_best:.0} events/s, scorer {scorer_best:.0} events/s, with a shadow {shadow_best:.0} events/s \
             (shadow / without {:.2}), with history features {history_best:.0} events/s (history / 28 features {:.2})",
            shadow_best / scorer_best,
            history_best / scorer_best
        );
        return;
    }

    // The history a member rebuilds when it gains partitions: the whole topic here.
    let (rebuild_s_per_million, bytes_per_customer, customers) = history_rebuild(&kafka, &history_input);
    eprintln!("history rebuild: {rebuild_s_per_million:.2} s per million events; {bytes_per_customer:.0} bytes per customer ({customers} customers)");

    // Peak RSS of the real `fraudstream score` process over the same stream.
    let scorer_rss = scorer_process_peak_rss(&kafka, &input, &store, events).await;
    eprintln!("scorer process peak RSS: {scorer_rss:.0} MiB");

    // 5. The monitor over the last scorer round's output and a label per payment.
    let monitor_rate = monitor_drain(&kafka, &scored_topic, events).await;
    eprintln!("monitor: {monitor_rate:.0} joins/s");

    // 2. One synchronous HTTP :predict call per event, against the scorer's own API.
    let scoring = ScoringService::start(1024, 64);
    let version = ModelStore::open(&store).await.unwrap().latest_version().await.unwrap().unwrap();
    let files = ModelStore::open(&store).await.unwrap().fetch(&version, &[MODEL_FILE], &cache).await.unwrap();
    scoring.swap(Model::load(&files.dir, tch::Device::Cpu).unwrap()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app =
        router(ApiState::new(scoring.clone(), "payfraud", None, fraudstream::api::DEFAULT_REST_CONCURRENCY), 1 << 20);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let model = Model::load(&files.dir, tch::Device::Cpu).unwrap();
    let rows: Vec<Vec<f32>> = Simulator::new(http_calls, 9).map(|p| model.encoder().encode(&p).unwrap()).collect();
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/models/payfraud:predict");
    let started = Instant::now();
    for row in &rows {
        let body = serde_json::json!({ "instances": [row] }).to_string();
        let response = client.post(&url).body(body).send().await.unwrap();
        assert!(response.status().is_success());
        response.bytes().await.unwrap();
    }
    let http_rate = rows.len() as f64 / started.elapsed().as_secs_f64();
    eprintln!("per-event HTTP: {http_rate:.0} events/s");

    // 4. Inference alone, simulator speed.
    let mut inference_rows = Vec::new();
    for batch in [1usize, 16, 256, 4096] {
        let payments: Vec<_> = Simulator::new(batch as u64, 3).collect();
        let mut features = Vec::new();
        model.encoder().encode_all(&payments, &mut features).unwrap();
        let calls = (400_000 / batch).clamp(50, 20_000);
        for _ in 0..3 {
            model.predict(&features, batch).unwrap();
        }
        let started = Instant::now();
        for _ in 0..calls {
            model.predict(&features, batch).unwrap();
        }
        let rate = (calls * batch) as f64 / started.elapsed().as_secs_f64();
        inference_rows.push((batch, rate));
    }
    let mut sim = Simulator::new(3_000_000, 1);
    let started = Instant::now();
    let mut null = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create("/dev/null").unwrap());
    sim.write_csv(&mut null).unwrap();
    std::io::Write::flush(&mut null).unwrap();
    let sim_rate = 3_000_000.0 / started.elapsed().as_secs_f64();
    // The codec's share of an event, side by side with apache-avro's serde
    // path (the reference the hand-written codec is tested against).
    let payloads: Vec<Vec<u8>> = Simulator::new(200_000, 3).map(|p| CODEC.encode_payment(&p).unwrap()).collect();
    let scored: Vec<fraudstream::ScoredPayment> = Simulator::new(200_000, 3)
        .map(|payment| fraudstream::ScoredPayment {
            payment,
            fraud_probability: 0.1,
            is_fraud: false,
            threshold: 0.5,
            model_name: "payfraud".into(),
            model_version: "1700000000".into(),
            scored_at: 0,
            decision: None,
            reasons: Vec::new(),
            shadow: None,
        })
        .collect();
    let per_event_us = |f: &mut dyn FnMut(usize)| {
        let started = Instant::now();
        (0..payloads.len()).for_each(&mut *f);
        started.elapsed().as_secs_f64() * 1e6 / payloads.len() as f64
    };
    let decode_us = per_event_us(&mut |i| drop(std::hint::black_box(CODEC.decode_payment(&payloads[i]).unwrap())));
    let encode_us = per_event_us(&mut |i| drop(std::hint::black_box(CODEC.encode_scored(&scored[i]).unwrap())));
    let reference = ReferenceAvro::new();
    let reference_decode_us = per_event_us(&mut |i| drop(std::hint::black_box(reference.decode_payment(&payloads[i]))));
    let reference_encode_us = per_event_us(&mut |i| drop(std::hint::black_box(reference.encode_scored(&scored[i]))));

    let h = &outcome.holdout;
    // The headline cells, one per line, for scripts/bench to put the runs on
    // both brokers side by side.
    let headline = [
        format!("**{:.2}** ({scorer_best:.0} vs {relay_best:.0} events/s)", scorer_best / relay_best),
        format!("**{:.0}x** ({scorer_best:.0} vs {http_rate:.0} events/s)", scorer_best / http_rate),
        format!("**{:.2}** ({exactly_once_best:.0} vs {scorer_best:.0} events/s)", exactly_once_best / scorer_best),
        format!("**{:.2}** ({scorer_best:.0} vs {no_reasons_best:.0} events/s)", scorer_best / no_reasons_best),
        format!("**{:.2}** ({shadow_best:.0} vs {scorer_best:.0} events/s)", shadow_best / scorer_best),
        format!("**{:.2}** ({monitor_rate:.0} joins/s vs {scorer_best:.0} events/s)", monitor_rate / scorer_best),
        format!(
            "**{:.2}** ({history_best:.0} vs {scorer_best:.0} events/s); state {bytes_per_customer:.0} bytes per customer; rebuild {rebuild_s_per_million:.2} s per million events",
            history_best / scorer_best
        ),
    ];
    if let Some(path) = headline_file {
        std::fs::write(path, headline.join("\n") + "\n").unwrap();
    }
    out.push_str(&format!("### Throughput ({events} events, 4 partitions, best of 3 alternating rounds)\n\nCPU per event: CPU time of the pipeline's process (and of the broker) over the round, divided by the events.\n\n| pipeline | rounds (events/s) | best | CPU per event, pipeline (broker) |\n|---|---|---|---|\n"));
    let row = |name: &str, rounds: &[Drain], best: f64| {
        let join = |f: &dyn Fn(&Drain) -> String| rounds.iter().map(f).collect::<Vec<_>>().join(", ");
        format!(
            "| {name} | {} | {best:.0} | {} us |\n",
            join(&|d| format!("{:.0}", d.rate)),
            join(&|d| format!("{:.2} ({:.2})", d.own_cpu_us, d.broker_cpu_us))
        )
    };
    out.push_str(&row("no-op relay (consume -> produce, same code)", &relay_rounds, relay_best));
    out.push_str(&row(
        "scorer (decode, encode, score, decide, explain review/block, produce), at least once",
        &scorer_rounds,
        scorer_best,
    ));
    out.push_str(&row("scorer without reason codes (`--reasons false`)", &no_reasons_rounds, no_reasons_best));
    out.push_str(&row(
        "scorer with a shadow model (`--shadow canary`: every event scored by a second version too)",
        &shadow_rounds,
        shadow_best,
    ));
    out.push_str(&row(
        "scorer on history features (39: the 28, the customer's last 1/7/30 days, the merchant's fraud rate)",
        &history_rounds,
        history_best,
    ));
    out.push_str(&row(
        "scorer, exactly once (Kafka transactions every 100 ms or 100,000 records)",
        &exactly_once_rounds,
        exactly_once_best,
    ));
    out.push_str(&format!("| original architecture: sequential HTTP `:predict`, 1 event per call ({http_calls} calls) | | {http_rate:.0} | |\n"));
    out.push_str(&format!("| monitor: joins of the scorer's {events} outputs with {events} labels (`payments-labelled` written), vs the scorer's best | | {monitor_rate:.0} joins/s ({:.2}x) | |\n\n", monitor_rate / scorer_best));
    out.push_str("### Inference alone (CPU, one intra-op thread, MLP 28-64-32-2 with its input layer)\n\n| batch | rows/s |\n|---|---|\n");
    for (batch, rate) in &inference_rows {
        out.push_str(&format!("| {batch} | {rate:.0} |\n"));
    }
    out.push_str(&format!(
        "\n### Other\n\n| measure | result |\n|---|---|\n| trainer, 594,643 simulated rows (load, split, MLP + baseline, export, publish) | {trainer_seconds:.1} s |\n| holdout ROC-AUC / AP (MLP) | {:.4} / {:.4} |\n| holdout ROC-AUC / AP (logistic baseline) | {:.4} / {:.4} |\n| holdout ROC-AUC / AP, history features (MLP) | {:.4} / {:.4} |\n| customer history: rebuild of the whole {events}-event topic (4 partitions), state held after it | {rebuild_s_per_million:.2} s per million events; {customers} customers, {bytes_per_customer:.0} bytes each |\n| simulator to CSV on /dev/null (one thread) | {sim_rate:.0} rows/s |\n| Avro (Confluent) decode of a payment / encode of a scored payment: fraudstream's codec | {decode_us:.2} / {encode_us:.2} us |\n| the same with apache-avro's serde reader and writer | {reference_decode_us:.2} / {reference_encode_us:.2} us |\n| peak RSS of the `fraudstream score` process over the {events}-event stream | {scorer_rss:.0} MiB |\n| peak RSS of the benchmark process (throughput phase: in-process scorer, relay, publisher, HTTP client) | {:.0} MiB |\n",
        h.roc_auc,
        h.average_precision,
        outcome.baseline.roc_auc,
        outcome.baseline.average_precision,
        history_outcome.holdout.roc_auc,
        history_outcome.holdout.average_precision,
        peak_rss_mib("self")
    ));
    println!("{out}");
}
