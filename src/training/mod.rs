//! Training: turns labelled payments into a published model version. It
//! trains an MLP, evaluates it against a logistic baseline and the current
//! champion on a time-based holdout, and publishes it as a new immutable
//! version when it is at least as good. `fraudstream-trainer` is a thin CLI
//! over `run_once`; `fraudstream demo` calls it in-process.

pub mod data;
pub mod evaluate;
mod files;
pub mod report;
pub mod topic;
pub mod train;

use std::time::Instant;

use crate::model::{
    device_name, Device, Model, ModelManifest, ModelStore, ModelVersion, TrainingDataSummary, INPUT_NAME,
    MANIFEST_FILE, MODEL_FILE, OUTPUT_NAME,
};
use crate::{FeatureEncoder, FeatureSpec, Payment};
use serde_json::json;

use crate::drift::DriftReference;
use crate::features::{AmountScale, FeatureSet};
use crate::history::CustomerFeatures;
use crate::model::Label;
use crate::training::data::{DataSource, TimeSplit};
use crate::training::evaluate::{choose_bands, choose_threshold, Evaluation};
use crate::training::train::{Architecture, TrainConfig};

/// Why a training run failed: each names the input or the step, and the
/// underlying error says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("training data {location}: {message}")]
    Data { location: String, message: String },
    #[error("training data {location}: {error}")]
    Csv { location: String, error: crate::payment::CsvError },
    #[error("training data {location}: nothing to train on: {detail}")]
    NoPayments { location: String, detail: String },
    #[error("training data kafka://{topic}: the record at partition {partition} offset {offset} does not decode as a ScoredPayment: {reason}. Check that --format (FRAUDSTREAM_FORMAT, now {format}) is how the topic is written (the monitor's --output-format), with --schema-registry-url if its writers use a registry; a record that is garbage must leave the window: delete it (kafka-delete-records.sh up to offset {}) or shorten --since", offset + 1)]
    Record { topic: String, partition: i32, offset: i64, reason: String, format: String },
    #[error("encoding the {set} set: {error}")]
    Encode { set: &'static str, error: crate::features::EncodeError },
    #[error("{step}: {error}")]
    Torch { step: String, error: tch::TchError },
    #[error("{step}: {error}")]
    Model { step: String, error: crate::model::ModelError },
    #[error("{step}: {error}")]
    Io { step: String, error: std::io::Error },
    #[error(transparent)]
    Store(#[from] crate::model::StoreError),
    #[error("drawing the report: {0}")]
    Report(String),
    #[error("{0}")]
    Invalid(String),
}

/// Results of training steps.
pub type Result<T, E = TrainingError> = std::result::Result<T, E>;

fn model_err(step: impl Into<String>) -> impl FnOnce(crate::model::ModelError) -> TrainingError {
    let step = step.into();
    move |error| TrainingError::Model { step, error }
}

/// Everything one training run needs.
#[derive(Debug, Clone)]
pub struct TrainerOptions {
    pub data: DataSource,
    /// Trained on instead when `data` holds no labelled payments and the
    /// store has no version yet: the first run of a new deployment, before
    /// any payment was scored and labelled. Later runs never fall back.
    pub fallback: Option<DataSource>,
    pub model_store: String,
    pub model_name: String,
    pub device: Device,
    pub target_precision: Option<f64>,
    /// The validation recall the review band must reach.
    pub review_recall: f64,
    /// The validation precision the block band must reach.
    pub block_precision: f64,
    /// How the amount feature is scaled.
    pub amount_scale: AmountScale,
    /// Which features the model is trained on.
    pub features: FeatureSet,
    /// Publish even if the current champion is better on the holdout.
    pub force: bool,
    /// What to do with a version that loses the champion gate.
    pub on_lose: OnLose,
    pub train: TrainConfig,
}

/// What happens to a version that loses the champion gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLose {
    /// Published and labelled `canary`, to be watched in shadow.
    Canary,
    /// Not published.
    Discard,
}

impl crate::choice::Choice for OnLose {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Canary, "canary", "publish it labelled canary, to watch in shadow"),
        (Self::Discard, "discard", "do not publish it"),
    ];
}

/// The defaults of `fraudstream-trainer`'s flags (on the simulator's data).
impl Default for TrainerOptions {
    fn default() -> Self {
        Self {
            data: DataSource::Simulator { rows: 594_643, seed: 42 },
            fallback: None,
            model_store: "models".into(),
            model_name: "payfraud".into(),
            device: Device::Auto,
            target_precision: None,
            review_recall: crate::decision::DEFAULT_REVIEW_RECALL,
            block_precision: crate::decision::DEFAULT_BLOCK_PRECISION,
            amount_scale: AmountScale::Fixed,
            features: FeatureSet::Payment,
            force: false,
            on_lose: OnLose::Canary,
            train: TrainConfig::default(),
        }
    }
}

/// What a run decided.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The version this run trained (published or not).
    pub version: String,
    pub published: bool,
    /// The label the published version got: `stable` if it won the gate, `canary` if not.
    pub label: Option<Label>,
    /// One line saying which model won and why.
    pub verdict: String,
    pub holdout: Evaluation,
    pub baseline: Evaluation,
    pub champion: Option<(String, Evaluation)>,
    pub training_seconds: f64,
}

fn encode(
    encoder: &FeatureEncoder,
    payments: &[Payment],
    history: &[CustomerFeatures],
    set: &'static str,
) -> Result<Vec<f32>> {
    let mut features = Vec::with_capacity(payments.len() * encoder.width());
    encoder
        .encode_all_with(payments, Some(history), &mut features)
        .map_err(|error| TrainingError::Encode { set, error })?;
    Ok(features)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The newest published version, fetched and loaded as a scorer would.
async fn load_champion(
    store: &ModelStore,
    version: &str,
    work: &std::path::Path,
    device: tch::Device,
) -> std::result::Result<Model, crate::Error> {
    let files = store.fetch(version, &[MODEL_FILE], work).await?;
    Ok(crate::model::load_guarded(files.dir, device, crate::model::DEFAULT_LOAD_TIMEOUT).await?)
}

/// One training run, from data to (maybe) a published version.
pub async fn run_once(options: &TrainerOptions) -> Result<RunOutcome> {
    let started = Instant::now();
    // Open the store first: a wrong URL or unreachable S3 fails before any training.
    let store = ModelStore::open(&options.model_store).await?;
    let latest = store.latest_version().await?;
    // The champion is what serves: the `stable` label's version, or the newest in a store without labels.
    let serving = match store.label(Label::Stable).await? {
        Some(stable) => Some(stable),
        None => latest.clone(),
    };

    let (payments, source) = match (data::load(&options.data).await, &options.fallback) {
        (Err(TrainingError::NoPayments { location, detail }), Some(fallback)) if latest.is_none() => {
            tracing::warn!(%location, %detail, fallback = %fallback, "no labelled payments and no model yet: training on the fallback data");
            (data::load(fallback).await?, fallback)
        }
        (loaded, _) => (loaded?, &options.data),
    };
    let summary = TrainingDataSummary {
        source: source.to_string(),
        rows: payments.len() as u64,
        frauds: payments.iter().filter(|p| p.fraud == Some(true)).count() as u64,
        sha256: data::content_hash(&payments),
    };
    let split = TimeSplit::new(payments, 0.7, 0.15)?;
    let mut spec = FeatureSpec::for_training(options.amount_scale, &split.train);
    if options.features == FeatureSet::History {
        // Merchant rates from the training window only: validation and holdout stay unseen.
        spec = spec.with_history(&split.train);
    }
    let encoder = FeatureEncoder::new(spec.clone());
    let width = encoder.width();
    // Customer features over the whole data in event-time order, as a scorer
    // reading it as a stream computes them (the split is by time, so this is
    // train, then validation, then holdout).
    let history = crate::history::offline(split.train.iter().chain(&split.validation).chain(&split.holdout));
    let (train_h, rest) = history.split_at(split.train.len());
    let (val_h, hold_h) = rest.split_at(split.validation.len());
    let train_x = encode(&encoder, &split.train, train_h, "train")?;
    let val_x = encode(&encoder, &split.validation, val_h, "validation")?;
    let hold_x = encode(&encoder, &split.holdout, hold_h, "holdout")?;
    let (train_y, val_y, hold_y) =
        (data::labels(&split.train), data::labels(&split.validation), data::labels(&split.holdout));

    let device = options.device.resolve().map_err(model_err("choosing the training device"))?;
    tracing::info!(
        rows = summary.rows,
        frauds = summary.frauds,
        train = split.train.len(),
        validation = split.validation.len(),
        holdout = split.holdout.len(),
        device = %device_name(device),
        "training"
    );
    let bar = indicatif::ProgressBar::new(options.train.max_epochs as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} epoch {pos}/{len} {msg}").expect("template"));
    let (mut mlp, history) = train::train(
        Architecture::Mlp,
        (&train_x, &train_y),
        (&val_x, &val_y),
        width,
        &options.train,
        device,
        |log| {
            bar.set_position(log.epoch as u64);
            bar.set_message(format!("loss {:.4}  validation AP {:.4}", log.loss, log.validation_ap));
        },
    )?;
    bar.finish_and_clear();
    let (baseline, _) = train::train(
        Architecture::Logistic,
        (&train_x, &train_y),
        (&val_x, &val_y),
        width,
        &options.train,
        device,
        |_| {},
    )?;
    let training_seconds = started.elapsed().as_secs_f64();

    let val_scores = mlp.score(&val_x);
    let threshold = choose_threshold(&val_scores, &val_y, options.target_precision);
    let bands = choose_bands(&val_scores, &val_y, options.review_recall, options.block_precision);
    let model_scores = mlp.score(&hold_x);
    let holdout = Evaluation::new(&model_scores, &hold_y, threshold);
    let base_threshold = choose_threshold(&baseline.score(&val_x), &val_y, options.target_precision);
    let baseline_scores = baseline.score(&hold_x);
    let baseline_eval = Evaluation::new(&baseline_scores, &hold_y, base_threshold);

    let work =
        tempfile::tempdir().map_err(|error| TrainingError::Io { step: "creating a temporary folder".into(), error })?;
    let model_path = work.path().join(MODEL_FILE);
    mlp.export(&model_path)?;

    // The champion, re-scored on this run's holdout (not its own recorded metrics).
    let champion = match &serving {
        None => None,
        Some(version) => match load_champion(&store, version, work.path(), device).await {
            Ok(champion) => {
                let scores = champion.score_payments_with(&split.holdout, hold_h).map_err(|e| {
                    TrainingError::Invalid(format!("re-scoring the holdout with champion {version}: {e}"))
                })?;
                Some((version.clone(), Evaluation::new(&scores, &hold_y, champion.manifest().threshold)))
            }
            // A champion no scorer can load serves nobody: this run must be
            // able to replace it, or a broken version blocks every fix.
            Err(e) => {
                tracing::warn!(version, error = %e, "the current champion does not load; treating it as no champion");
                None
            }
        },
    };

    let after_latest = latest.as_deref().and_then(ModelVersion::parse).map_or(ModelVersion(0), ModelVersion::next);
    let version = ModelVersion(now_secs()).max(after_latest).to_string();
    let metrics = json!({
        "holdout": { "model": holdout, "baseline": baseline_eval, "champion": champion.as_ref().map(|(v, e)| json!({"version": v, "evaluation": e})) },
        "history": history,
    });
    let mut manifest = ModelManifest {
        name: options.model_name.clone(),
        version: version.clone(),
        created_at: crate::payment::now_ms(),
        input: INPUT_NAME.into(),
        output: OUTPUT_NAME.into(),
        feature_spec: spec,
        threshold,
        decision_bands: Some(bands),
        feature_reference: crate::decision::feature_reference(&train_x, width),
        // Set below, from the scores of the exported model: what scorers will compute.
        drift_reference: None,
        metrics: metrics.clone(),
        training_data: summary.clone(),
        trainer_version: env!("CARGO_PKG_VERSION").into(),
        device: device_name(device),
        training_seconds,
        // Filled in by ModelStore::publish, from the files it writes.
        files: Default::default(),
    };

    // What we publish must be what we measured: load the exported file the
    // way the scorer will and compare its scores with the trainer's.
    let exported = Model::from_module_file(&model_path, manifest.clone(), device)
        .map_err(model_err("reloading the exported model"))?;
    let reloaded = exported
        .score_payments_with(&split.holdout, hold_h)
        .map_err(|e| TrainingError::Invalid(format!("scoring the holdout with the exported model: {e}")))?;
    let drift = reloaded.iter().zip(&model_scores).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    if drift > 1e-4 {
        return Err(TrainingError::Invalid(format!(
            "the exported TorchScript model scores differ from the trained model by {drift}; not publishing"
        )));
    }
    manifest.drift_reference = Some(DriftReference::new(&manifest.feature_spec, &split.train, &reloaded));

    let (wins, verdict) = match &champion {
        None => (true, "no champion yet: publishing".to_string()),
        Some((v, e)) if holdout.average_precision >= e.average_precision => (
            true,
            format!(
                "challenger wins: holdout AP {:.4} >= champion {v}'s {:.4}",
                holdout.average_precision, e.average_precision
            ),
        ),
        Some((v, e)) if options.force => (
            true,
            format!(
                "champion {v} is better (AP {:.4} > {:.4}) but --force given: publishing",
                e.average_precision, holdout.average_precision
            ),
        ),
        Some((v, e)) => (
            false,
            format!(
                "champion {v} stays: holdout AP {:.4} > challenger's {:.4}",
                e.average_precision, holdout.average_precision
            ),
        ),
    };

    let label = match (wins, options.on_lose) {
        (true, _) => Some(Label::Stable),
        (false, OnLose::Canary) => Some(Label::Canary),
        (false, OnLose::Discard) => None,
    };
    if let Some(label) = label {
        let model_bytes = std::fs::read(&model_path)
            .map_err(|error| TrainingError::Io { step: format!("reading {}", model_path.display()), error })?;
        let mut files: Vec<(&str, Vec<u8>)> = vec![(MODEL_FILE, model_bytes)];
        files.push(("metrics.json", serde_json::to_vec_pretty(&metrics).expect("metrics serialise")));
        files.extend(report::render(&report::ReportInput {
            title: format!("{} version {version}", options.model_name),
            summary_lines: vec![
                format!(
                    "data: {} ({} rows, {} frauds, sha256 {})",
                    summary.source,
                    summary.rows,
                    summary.frauds,
                    &summary.sha256[..16]
                ),
                format!(
                    "split by time: {} train / {} validation / {} holdout rows",
                    split.train.len(),
                    split.validation.len(),
                    split.holdout.len()
                ),
                format!("device {}, {:.1} s of training", device_name(device), training_seconds),
                format!("verdict: {verdict}"),
            ],
            model: &holdout,
            baseline: &baseline_eval,
            champion: champion.as_ref().map(|(_, e)| e),
            model_scores: &model_scores,
            baseline_scores: &baseline_scores,
            labels: &hold_y,
            history: &history,
            bands: &bands,
        })?);
        debug_assert!(files.iter().all(|(name, _)| *name != MANIFEST_FILE));
        store.publish(&manifest, &files).await?;
        if label == Label::Canary && store.label(Label::Stable).await?.is_none() {
            // A store without labels serves its newest version: pin the
            // champion as stable first, so the canary does not serve.
            if let Some((champion, _)) = &champion {
                store.set_label(Label::Stable, champion).await?;
            }
        }
        store.set_label(label, &version).await?;
    }
    Ok(RunOutcome {
        version,
        published: label.is_some(),
        label,
        verdict,
        holdout,
        baseline: baseline_eval,
        champion,
        training_seconds,
    })
}
