//! `ScoringService`: the one thread that runs the model, shared by the Kafka
//! pipeline and the REST API.
//!
//! Why one thread: libtorch is fastest here with one intra-op thread and
//! large batches, so concurrent callers are coalesced into one forward pass
//! instead of each paying the per-call overhead. Why encoding happens here:
//! a model carries the feature spec it was trained with, so payments must be
//! encoded by the same model that scores them. Model swaps travel through the
//! same queue as work, so every batch is scored by exactly one model and a
//! swap never drops or double-scores an event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::decision::{occluded_rows, Decision, DecisionBands, Reason};
use crate::features::{EncodeError, FeatureSpec, FEATURE_WIDTH};
use crate::model::{Label, Model, ModelError};
use crate::payment::{Payment, ScoredPayment};
use crate::telemetry::metric;

/// What callers may know about the serving model without touching torch.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub threshold: f64,
    pub bands: DecisionBands,
    pub feature_spec: FeatureSpec,
    /// Whether the version can give reasons (it has a training reference).
    pub explains: bool,
    pub device: String,
    /// What the version's live traffic is compared with (PSI); none in older versions.
    pub drift_reference: Option<Arc<crate::drift::DriftReference>>,
}

impl ModelInfo {
    /// A payment's score as the output says it, stream and REST alike: the
    /// one place where `p >= threshold` becomes `isFraud` and the bands a decision.
    pub fn verdict(&self, payment: Payment, p_fraud: f32, reasons: Vec<Reason>, scored_at: i64) -> ScoredPayment {
        let mut output = ScoredPayment {
            payment,
            fraud_probability: 0.0,
            is_fraud: false,
            threshold: self.threshold,
            model_name: self.name.clone(),
            model_version: self.version.clone(),
            scored_at,
            decision: None,
            reasons: Vec::new(),
        };
        self.rescore(&mut output, p_fraud, reasons);
        output
    }

    /// Sets the score, `isFraud`, the decision and the reasons of `output`
    /// (a verdict of this model, reused for the next payment of a batch).
    pub fn rescore(&self, output: &mut ScoredPayment, p_fraud: f32, reasons: Vec<Reason>) {
        output.fraud_probability = f64::from(p_fraud);
        output.is_fraud = output.fraud_probability >= self.threshold;
        output.decision = Some(self.bands.decide(output.fraud_probability));
        output.reasons = reasons;
    }

    fn of(model: &Model) -> Self {
        let m = model.manifest();
        Self {
            name: m.name.clone(),
            version: m.version.clone(),
            threshold: m.threshold,
            bands: m.bands(),
            feature_spec: m.feature_spec.clone(),
            explains: !m.feature_reference.is_empty(),
            device: crate::model::device_name(model.device()),
            drift_reference: m.drift_reference.clone().map(Arc::new),
        }
    }

    /// Whether a payment scored `p_fraud` gets reasons without being asked.
    fn wants_reasons(&self, p_fraud: f32) -> bool {
        self.bands.decide(f64::from(p_fraud)) != Decision::Allow
    }
}

/// Why a scoring request failed as a whole.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScoringError {
    #[error("no model is loaded yet")]
    NoModel,
    #[error("the scoring service has stopped")]
    Stopped,
    #[error(transparent)]
    Model(Arc<ModelError>),
    #[error(
        "model version {version} returned {output:?}, not a pair of probabilities; a model that emits \
         non-finite or out-of-range scores must not serve (publish a fixed version or pin a good one)"
    )]
    NotProbabilities { version: String, output: [f32; 2] },
    #[error("input has {got} values, not a whole number of {width}-feature rows")]
    BadWidth { got: usize, width: usize },
}

impl From<ModelError> for ScoringError {
    fn from(e: ModelError) -> Self {
        ScoringError::Model(Arc::new(e))
    }
}

/// Scores of payments, in order; a payment the model's encoder rejects gets its error.
pub struct ScoredBatch {
    pub model: Arc<ModelInfo>,
    pub payments: Vec<Payment>,
    /// [P(legit), P(fraud)] or why the payment could not be encoded.
    pub results: Vec<Result<[f32; 2], EncodeError>>,
    /// Each payment's reasons (empty where none were computed).
    pub reasons: Vec<Vec<Reason>>,
}

/// Which payments of a job get reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Explain {
    /// Those at or above the review band (the stream, `:score`).
    AtReview,
    /// Every one (`:explain`, `:score?explain=true`).
    All,
}

/// Outputs for raw feature rows.
pub struct ScoredRows {
    pub model: Arc<ModelInfo>,
    pub outputs: Vec<[f32; 2]>,
}

enum Job {
    Payments(Vec<Payment>, Explain, oneshot::Sender<Result<ScoredBatch, ScoringError>>),
    Rows(Vec<f32>, oneshot::Sender<Result<ScoredRows, ScoringError>>),
    Swap(Box<Model>, oneshot::Sender<()>),
}

/// Handle to the scoring thread; cheap to clone.
#[derive(Clone)]
pub struct ScoringService {
    jobs: mpsc::Sender<Job>,
    current: Arc<RwLock<Option<Arc<ModelInfo>>>>,
    /// The versions the store's labels named at the model watcher's last look.
    labels: Arc<RwLock<HashMap<Label, String>>>,
    /// Whether reasons are computed at all (`--reasons`; off only to measure their cost).
    reasons: Arc<AtomicBool>,
    width: usize,
}

impl ScoringService {
    /// Starts the scoring thread. `max_batch` caps the rows coalesced into
    /// one forward pass; `queue` bounds waiting jobs (backpressure).
    pub fn start(max_batch: usize, queue: usize) -> Self {
        let (jobs, rx) = mpsc::channel(queue);
        let current = Arc::new(RwLock::new(None));
        let reasons = Arc::new(AtomicBool::new(true));
        let (shared, explaining) = (current.clone(), reasons.clone());
        std::thread::Builder::new()
            .name("fraudstream-scorer".into())
            .spawn(move || run(rx, shared, explaining, max_batch))
            .expect("spawning the scoring thread");
        Self { jobs, current, labels: Arc::default(), reasons, width: FEATURE_WIDTH }
    }

    /// Records which version `label` names in the store (`None`: unset).
    pub fn set_label(&self, label: Label, version: Option<String>) {
        let mut labels = self.labels.write().expect("labels lock");
        match version {
            Some(version) => labels.insert(label, version),
            None => labels.remove(&label),
        };
    }

    /// The version `label` named at the last look, if any.
    pub fn label(&self, label: Label) -> Option<String> {
        self.labels.read().expect("labels lock").get(&label).cloned()
    }

    /// Turns reason codes on (the default) or off.
    pub fn set_reasons(&self, on: bool) {
        self.reasons.store(on, Ordering::Relaxed);
    }

    /// The serving model, if any.
    pub fn model(&self) -> Option<Arc<ModelInfo>> {
        self.current.read().expect("model info lock").clone()
    }

    /// Puts `model` in service after every job queued before it.
    pub async fn swap(&self, model: Model) -> Result<(), ScoringError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Swap(Box::new(model), tx)).await.map_err(|_| ScoringError::Stopped)?;
        rx.await.map_err(|_| ScoringError::Stopped)
    }

    /// Queues payments for scoring; the returned receiver yields the result.
    /// Waits while the queue is full.
    pub async fn submit(
        &self,
        payments: Vec<Payment>,
        explain: Explain,
    ) -> Result<oneshot::Receiver<Result<ScoredBatch, ScoringError>>, ScoringError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Payments(payments, explain, tx)).await.map_err(|_| ScoringError::Stopped)?;
        Ok(rx)
    }

    /// Scores payments and waits for the result.
    pub async fn score_payments(&self, payments: Vec<Payment>, explain: Explain) -> Result<ScoredBatch, ScoringError> {
        self.submit(payments, explain).await?.await.map_err(|_| ScoringError::Stopped)?
    }

    /// Scores already-encoded rows (`width` floats each) and waits for the result.
    pub async fn score_rows(&self, features: Vec<f32>) -> Result<ScoredRows, ScoringError> {
        if features.len() % self.width != 0 {
            return Err(ScoringError::BadWidth { got: features.len(), width: self.width });
        }
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Rows(features, tx)).await.map_err(|_| ScoringError::Stopped)?;
        rx.await.map_err(|_| ScoringError::Stopped)?
    }
}

/// The scoring thread: takes every job already waiting (up to `max_batch`
/// rows), runs one forward pass over all of them, and answers each.
fn run(
    mut rx: mpsc::Receiver<Job>,
    current: Arc<RwLock<Option<Arc<ModelInfo>>>>,
    reasons: Arc<AtomicBool>,
    max_batch: usize,
) {
    let mut model: Option<(Model, Arc<ModelInfo>)> = None;
    let mut pending: Option<Job> = None;
    loop {
        let Some(first) = pending.take().or_else(|| rx.blocking_recv()) else { return };
        let mut jobs = Vec::new();
        let mut rows = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Swap(new, done) => {
                    if jobs.is_empty() {
                        let info = Arc::new(ModelInfo::of(&new));
                        tracing::info!(version = %info.version, device = %info.device, "model in service");
                        metrics::counter!(metric::MODEL_SWAPS).increment(1);
                        if let Some((_, old)) = &model {
                            metrics::gauge!(metric::MODEL_LOADED, "version" => old.version.clone()).set(0.0);
                            if old.feature_spec != info.feature_spec {
                                // Pre-encoded clients (`:predict`) must encode differently from now on.
                                tracing::warn!(
                                    from = %old.version,
                                    to = %info.version,
                                    old_spec = ?old.feature_spec,
                                    new_spec = ?info.feature_spec,
                                    "the new version encodes features differently"
                                );
                                metrics::counter!(metric::FEATURE_SPEC_CHANGES).increment(1);
                            }
                        }
                        metrics::gauge!(metric::MODEL_LOADED, "version" => info.version.clone()).set(1.0);
                        let number = crate::model::ModelVersion::parse(&info.version).map_or(0.0, |v| v.0 as f64);
                        metrics::gauge!(metric::MODEL_VERSION).set(number);
                        *current.write().expect("model info lock") = Some(info.clone());
                        model = Some((*new, info));
                        let _ = done.send(());
                    } else {
                        // Score what came before the swap with the old model first.
                        pending = Some(Job::Swap(new, done));
                        break;
                    }
                }
                job => {
                    rows += match &job {
                        Job::Payments(p, ..) => p.len(),
                        Job::Rows(f, _) => f.len() / FEATURE_WIDTH,
                        Job::Swap(..) => 0,
                    };
                    jobs.push(job);
                    if rows < max_batch {
                        next = rx.try_recv().ok();
                    }
                }
            }
        }
        if jobs.is_empty() {
            continue;
        }
        match &model {
            None => {
                for job in jobs {
                    fail(job, ScoringError::NoModel);
                }
            }
            Some((model, info)) => {
                // A panic inside libtorch must not kill the scoring thread: the
                // batch's jobs are dropped with it (their callers see the
                // reply channel close, a scoring failure) and the thread lives.
                let explaining = reasons.load(Ordering::Relaxed);
                let scored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    score_jobs(model, info, jobs, explaining)
                }));
                if let Err(panic) = scored {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(version = %info.version, message, "the model panicked while scoring");
                }
            }
        }
    }
}

fn fail(job: Job, error: ScoringError) {
    match job {
        Job::Payments(_, _, reply) => drop(reply.send(Err(error))),
        Job::Rows(_, reply) => drop(reply.send(Err(error))),
        Job::Swap(..) => {}
    }
}

/// Encodes every job's payments with the model's encoder, runs one forward
/// pass over all rows, and hands each job its slice.
fn score_jobs(model: &Model, info: &Arc<ModelInfo>, jobs: Vec<Job>, explaining: bool) {
    let started = Instant::now();
    let encoder = model.encoder();
    let width = encoder.width();
    let rows: usize = jobs
        .iter()
        .map(|job| match job {
            Job::Payments(p, ..) => p.len(),
            Job::Rows(f, _) => f.len() / width,
            Job::Swap(..) => 0,
        })
        .sum();
    let mut features: Vec<f32> = Vec::with_capacity(rows * width);
    let mut encoded: Vec<Vec<Result<usize, EncodeError>>> = Vec::with_capacity(jobs.len());
    let mut row = vec![0f32; width];
    let mut n = 0;
    for job in &jobs {
        match job {
            Job::Payments(payments, ..) => {
                let mut slots = Vec::with_capacity(payments.len());
                for p in payments {
                    slots.push(encoder.encode_into(p, &mut row).map(|()| {
                        features.extend_from_slice(&row);
                        n += 1;
                        n - 1
                    }));
                }
                encoded.push(slots);
            }
            Job::Rows(rows, _) => {
                let count = rows.len() / width;
                features.extend_from_slice(rows);
                encoded.push((n..n + count).map(Ok).collect());
                n += count;
            }
            Job::Swap(..) => encoded.push(Vec::new()),
        }
    }
    let scored = forward(model, info, &features, n).and_then(|outputs| {
        let reasons = if explaining && info.explains {
            explain(model, info, &jobs, &encoded, &features, &outputs)?
        } else {
            jobs.iter().map(|_| Vec::new()).collect()
        };
        Ok((outputs, reasons))
    });
    let (outputs, reasons) = match scored {
        Ok(scored) => scored,
        Err(error) => {
            // The model is ours: no job is answered with a partial result.
            for job in jobs {
                fail(job, error.clone());
            }
            return;
        }
    };
    metrics::histogram!(metric::BATCH_SIZE).record(n as f64);
    metrics::histogram!(metric::INFERENCE_SECONDS).record(started.elapsed().as_secs_f64());
    for ((job, slots), reasons) in jobs.into_iter().zip(encoded).zip(reasons) {
        match job {
            Job::Payments(payments, _, reply) => {
                let results: Vec<_> = slots.into_iter().map(|slot| slot.map(|i| outputs[i])).collect();
                let mut reasons = reasons;
                reasons.resize_with(payments.len(), Vec::new);
                let _ = reply.send(Ok(ScoredBatch { model: info.clone(), payments, results, reasons }));
            }
            Job::Rows(_, reply) => {
                let outputs = slots.into_iter().map(|slot| outputs[slot.expect("rows are pre-encoded")]).collect();
                let _ = reply.send(Ok(ScoredRows { model: info.clone(), outputs }));
            }
            Job::Swap(..) => {}
        }
    }
}

/// One forward pass over `rows` feature rows, checked: a model that fails or
/// returns anything but probabilities is an error for the whole batch.
fn forward(model: &Model, info: &ModelInfo, features: &[f32], rows: usize) -> Result<Vec<[f32; 2]>, ScoringError> {
    let outputs = model.predict(features, rows).map_err(|e| {
        tracing::error!(error = %e, rows, "forward pass failed");
        ScoringError::from(e)
    })?;
    let is_probability = |x: f32| x.is_finite() && (0.0..=1.0).contains(&x);
    if let Some(bad) = outputs.iter().find(|o| !o.iter().all(|x| is_probability(*x))) {
        let error = ScoringError::NotProbabilities { version: info.version.clone(), output: *bad };
        tracing::error!(error = %error, rows, "model output is not probabilities");
        return Err(error);
    }
    Ok(outputs)
}

/// Reasons for the payments that get them (at or above review, or every
/// one of a job that asks): one more forward pass over their occluded rows,
/// one row per feature group. Per job, per payment; empty for the others.
fn explain(
    model: &Model,
    info: &ModelInfo,
    jobs: &[Job],
    encoded: &[Vec<Result<usize, EncodeError>>],
    features: &[f32],
    outputs: &[[f32; 2]],
) -> Result<Vec<Vec<Vec<Reason>>>, ScoringError> {
    let reference = &model.manifest().feature_reference;
    let width = info.feature_spec.width();
    let groups = crate::features::FeatureGroup::ALL.len();
    let mut wanted: Vec<(usize, usize, usize)> = Vec::new(); // (job, payment, row)
    for (j, (job, slots)) in jobs.iter().zip(encoded).enumerate() {
        let Job::Payments(_, explain, _) = job else { continue };
        for (k, slot) in slots.iter().enumerate() {
            if let Ok(row) = slot {
                if *explain == Explain::All || info.wants_reasons(outputs[*row][1]) {
                    wanted.push((j, k, *row));
                }
            }
        }
    }
    let mut reasons: Vec<Vec<Vec<Reason>>> = jobs.iter().map(|_| Vec::new()).collect();
    if wanted.is_empty() {
        return Ok(reasons);
    }
    let mut occluded = Vec::with_capacity(wanted.len() * groups * width);
    for (_, _, row) in &wanted {
        occluded_rows(&info.feature_spec, &features[row * width..(row + 1) * width], reference, &mut occluded);
    }
    // Failing here fails the batch: review and block payments never leave without their reasons.
    let scores = forward(model, info, &occluded, wanted.len() * groups)?;
    metrics::counter!(metric::PAYMENTS_EXPLAINED).increment(wanted.len() as u64);
    for (i, (j, k, row)) in wanted.into_iter().enumerate() {
        let Job::Payments(payments, ..) = &jobs[j] else { continue };
        let without: Vec<f32> = scores[i * groups..(i + 1) * groups].iter().map(|o| o[1]).collect();
        let per_job = &mut reasons[j];
        per_job.resize_with(payments.len(), Vec::new);
        per_job[k] = crate::decision::reasons(&payments[k], outputs[row][1], &without);
    }
    Ok(reasons)
}
