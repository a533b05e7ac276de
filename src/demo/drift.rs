//! `fraudstream demo --drift`: the learning loop in about a minute, on the
//! same in-process broker and temporary store as the plain demo.
//!
//! A model trained on regime A serves. Payments stream with their labels
//! a second behind them; the monitor joins them and measures the serving
//! version live. The simulator's fraud pattern moves (regime B: fraud where
//! model 1 saw safe payments): the scorer's PSI alarms without a single
//! label, the monitor's live AP falls. The trainer then retrains on the
//! labelled topic the monitor wrote (`kafka://`), the new version wins the
//! champion gate on the drifted holdout, the scorer swaps it in, and its
//! live AP recovers. The demo prints that timeline as it happens.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{broker, scorer_config, step, wait_ready, DemoConfig, DemoError, Names, CODEC};
use crate::codec::{Codec, WireFormat, PAYMENT_LABEL_SCHEMA_ID};
use crate::monitor::quality::VersionReport;
use crate::monitor::{MonitorConfig, MonitorParts};
use crate::produce::{create_producer, publish_payments, LabelStream, PublishOptions};
use crate::scorer::ScorerParts;
use crate::simulate::Simulator;
use crate::training::data::DataSource;
use crate::training::topic::LabelledTopic;
use crate::training::train::TrainConfig;
use crate::training::{run_once, RunOutcome, TrainerOptions};

/// Payments of each act: regime A, then B before and after the retraining.
const ACT_A: u64 = 30_000;
const ACT_B_BEFORE: u64 = 40_000;
const ACT_B_AFTER: u64 = 30_000;
/// How far behind its payment each label comes.
const LABEL_DELAY: Duration = Duration::from_secs(1);
/// Labelled payments the live numbers are over: the recent past only.
const QUALITY_WINDOW: usize = 5_000;
/// PSI above this is a shifted population.
const PSI_ALARM: f64 = 0.25;

/// What the loop showed.
#[derive(Debug, Clone, Default)]
pub struct DriftSummary {
    pub first_version: String,
    pub second_version: String,
    /// Live AP of the first version on regime A, then on regime B.
    pub live_ap_before: f64,
    pub live_ap_drifted: f64,
    /// Live AP of the retrained version on regime B.
    pub live_ap_recovered: f64,
    /// PSI per group once the drift had arrived.
    pub psi_alarm: Vec<(String, f64)>,
    /// The retrained version won the gate and was swapped in.
    pub recovered: bool,
}

/// The story, on stdout, timed from the start.
struct Story(Instant);

impl Story {
    fn say(&self, text: impl AsRef<str>) {
        println!("[{:5.1} s] {}", self.0.elapsed().as_secs_f64(), text.as_ref());
    }
}

/// Runs the learning loop and prints its timeline.
pub async fn run(config: DemoConfig) -> Result<DriftSummary, DemoError> {
    let story = Story(Instant::now());
    // The scorer's PSI gauges are read back from the metrics recorder.
    let prometheus = crate::telemetry::prometheus();
    let names = Names::new(config.kafka.is_some());
    let topics = [&names.input, &names.output, &names.dlq, &names.labels, &names.labelled, &names.labels_dlq]
        .map(String::as_str);
    let (_mock, kafka) = broker(&config, &topics).await?;

    // Act 1: model 1 learns regime A.
    let temp = tempfile::tempdir().map_err(step("creating a temporary model store"))?;
    let store = config.model_store.clone().unwrap_or_else(|| temp.path().join("models").display().to_string());
    story.say(format!("training model 1 on {} simulated payments of regime A", config.train_rows));
    let first = train(&config, &store, DataSource::Simulator { rows: config.train_rows, seed: config.seed }).await?;
    story.say(format!("model {} serves: holdout AP {:.3}", first.version, first.holdout.average_precision));

    let device = config.device.resolve().map_err(step("choosing a device"))?;
    let parts = ScorerParts::new(config.max_batch);
    let shutdown = CancellationToken::new();
    let scorer_config = scorer_config(&config, &kafka, &names, &store, temp.path(), device, Duration::from_secs(1));
    let scorer = tokio::spawn(crate::scorer::run(scorer_config, parts.clone(), shutdown.clone()));
    let monitor_parts = MonitorParts::default();
    let monitor_config = MonitorConfig {
        kafka: kafka.clone(),
        group_id: format!("{}-monitor", names.group),
        scored_topic: names.output.clone(),
        labels_topic: names.labels.clone(),
        output_topic: names.labelled.clone(),
        dead_letter_topic: names.labels_dlq.clone(),
        codec: CODEC,
        quality_window: QUALITY_WINDOW,
        // The simulator's event time runs through months in seconds: keep every payment.
        label_window: Duration::from_secs(10 * 365 * 86_400),
        create_topics: false,
        ..MonitorConfig::default()
    };
    let monitor = tokio::spawn(crate::monitor::run(monitor_config, monitor_parts.clone(), shutdown.clone()));
    wait_ready(&parts, &scorer, &shutdown).await?;

    let producer = create_producer(&kafka).map_err(step("creating the producer"))?;
    let options = PublishOptions {
        topic: names.input.clone(),
        codec: CODEC,
        rate: config.rate,
        // The simulator's days are the event time the trainer splits by.
        stamp_event_time: false,
        labels: Some(LabelStream {
            topic: names.labels.clone(),
            codec: Codec::new(WireFormat::Confluent, PAYMENT_LABEL_SCHEMA_ID),
            delay: LABEL_DELAY,
            source: "demo".into(),
        }),
    };
    let mut traffic = Simulator::new(ACT_A + ACT_B_BEFORE + ACT_B_AFTER, config.seed + 1).drift_after(ACT_A);
    let mut published = 0;
    let mut act = async |n: u64, traffic: &mut Simulator| -> Result<(), DemoError> {
        let sent = publish_payments(&producer, &options, traffic.by_ref().take(n as usize), |_| {})
            .await
            .map_err(step("publishing payments"))?;
        if sent.failed + sent.labels_failed > 0 {
            return Err(DemoError { step: "publishing payments", source: format!("{sent}").into() });
        }
        published += n;
        wait_for_joins(&monitor_parts, published, &monitor).await
    };

    // Act 2: regime A, labels a second behind.
    story.say(format!("streaming {ACT_A} payments of regime A; each label follows its payment {LABEL_DELAY:?} later"));
    act(ACT_A, &mut traffic).await?;
    let mut summary = DriftSummary { first_version: first.version.clone(), ..DriftSummary::default() };
    let before = live(&monitor_parts, &first.version);
    summary.live_ap_before = before.as_ref().map_or(f64::NAN, |r| r.average_precision);
    story.say(format!("live, model {}: {}", first.version, describe(before.as_ref())));
    story.say(format!("PSI (regime A against model 1's training data): {}", describe_psi(&psi(&prometheus))));

    // Act 3: the fraud pattern moves.
    story.say(format!("the fraud pattern moves (regime B): streaming {ACT_B_BEFORE} payments"));
    act(ACT_B_BEFORE, &mut traffic).await?;
    summary.psi_alarm = psi(&prometheus);
    let alarms: Vec<String> =
        summary.psi_alarm.iter().filter(|(_, v)| *v > PSI_ALARM).map(|(group, v)| format!("{group} {v:.2}")).collect();
    story.say(format!("PSI alarm before any label (> {PSI_ALARM}): {}", alarms.join(", ")));
    let drifted = live(&monitor_parts, &first.version);
    summary.live_ap_drifted = drifted.as_ref().map_or(f64::NAN, |r| r.average_precision);
    story.say(format!(
        "live, model {} on the last {QUALITY_WINDOW} labelled: {}",
        first.version,
        describe(drifted.as_ref())
    ));

    // Act 4: retrain on what the monitor wrote.
    story.say(format!("retraining on kafka://{} (every labelled payment so far)", names.labelled));
    let topic = LabelledTopic {
        kafka: kafka.clone(),
        topic: names.labelled.clone(),
        // All of it: the mock cluster cannot look offsets up by time.
        since: Duration::from_secs(100 * 365 * 86_400),
        codec: CODEC,
        registry: None,
    };
    let second = train(&config, &store, DataSource::Kafka(topic)).await?;
    summary.second_version = second.version.clone();
    story.say(format!("model {}: {}", second.version, second.verdict));
    let swapped = Instant::now();
    while parts.scoring.model().is_none_or(|m| m.version != second.version) {
        if swapped.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let serving = parts.scoring.model().map(|m| m.version.clone()).unwrap_or_default();
    summary.recovered = serving == second.version;
    story.say(format!("the scorer serves model {serving}"));

    // Act 5: regime B goes on, scored by the retrained version.
    story.say(format!("streaming {ACT_B_AFTER} more payments of regime B"));
    act(ACT_B_AFTER, &mut traffic).await?;
    let recovered = live(&monitor_parts, &second.version);
    summary.live_ap_recovered = recovered.as_ref().map_or(f64::NAN, |r| r.average_precision);
    story.say(format!("live, model {}: {}", second.version, describe(recovered.as_ref())));
    story.say(format!("PSI (regime B against model 2's training data): {}", describe_psi(&psi(&prometheus))));
    story.say(format!(
        "live AP: {:.3} (model 1, regime A) -> {:.3} (model 1, regime B) -> {:.3} (model 2, retrained on the labelled stream)",
        summary.live_ap_before, summary.live_ap_drifted, summary.live_ap_recovered
    ));

    shutdown.cancel();
    scorer.await.map_err(step("stopping the scorer"))?.map_err(step("running the scorer"))?;
    monitor.await.map_err(step("stopping the monitor"))?.map_err(step("running the monitor"))?;
    Ok(summary)
}

async fn train(config: &DemoConfig, store: &str, data: DataSource) -> Result<RunOutcome, DemoError> {
    run_once(&TrainerOptions {
        data,
        model_store: store.to_string(),
        model_name: "payfraud".into(),
        device: config.device,
        train: TrainConfig { seed: config.seed, ..TrainConfig::default() },
        ..TrainerOptions::default()
    })
    .await
    .map_err(|e| DemoError { step: "training", source: e.into() })
}

/// Waits until the monitor has joined `want` payments (or stopped).
async fn wait_for_joins<T>(
    parts: &MonitorParts,
    want: u64,
    monitor: &tokio::task::JoinHandle<T>,
) -> Result<(), DemoError> {
    let started = Instant::now();
    while parts.joins.load(Ordering::Relaxed) < want {
        if monitor.is_finished() || started.elapsed() > Duration::from_secs(120) {
            return Err(DemoError {
                step: "joining labels",
                source: format!("the monitor joined {} of {want} payments", parts.joins.load(Ordering::Relaxed)).into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The live numbers are exported every second.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    Ok(())
}

fn live(parts: &MonitorParts, version: &str) -> Option<VersionReport> {
    parts.reports.lock().expect("monitor reports lock").iter().find(|r| &*r.version == version).cloned()
}

fn describe(report: Option<&VersionReport>) -> String {
    match report {
        None => "no labelled payments yet".into(),
        Some(r) => format!(
            "AP {:.3}, precision {:.3}, recall {:.3} at its threshold ({} labelled, {} frauds)",
            r.average_precision, r.precision, r.recall, r.samples, r.frauds
        ),
    }
}

/// The scorer's latest PSI per group, from its gauges.
fn psi(prometheus: &metrics_exporter_prometheus::PrometheusHandle) -> Vec<(String, f64)> {
    let text = prometheus.render();
    let mut values: Vec<(String, f64)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(crate::telemetry::metric::PSI)?.strip_prefix("{group=\"")?;
            let (group, value) = rest.split_once("\"} ")?;
            Some((group.to_string(), value.trim().parse().ok()?))
        })
        .collect();
    values.sort_by_key(|(group, _)| crate::drift::DriftGroup::ALL.iter().position(|g| g.name() == group));
    values
}

fn describe_psi(values: &[(String, f64)]) -> String {
    if values.is_empty() {
        return "no full window yet".into();
    }
    values.iter().map(|(group, v)| format!("{group} {v:.2}")).collect::<Vec<_>>().join(", ")
}
