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
//!
//! Shadow scoring: a second model (the version a label such as `canary`
//! names, `--shadow`) may be loaded beside the serving one, through the same
//! queue. Every payment of a batch is then also scored by it, in the same
//! micro-batch, and its score rides along in the output's `shadow` field;
//! everything the output decides comes from the serving model. The shadow is
//! an experiment: when it fails or returns something that is not a
//! probability, the batch leaves without shadow scores (counted and logged),
//! never failed nor dead-lettered. A shadow of the serving version itself is
//! no shadow: it is dropped when the serving model becomes that version.
//!
//! Customer history: while the serving or the shadow model's features include
//! the customer's history, this thread keeps it (`history::OnlineHistory`):
//! a stream payment's features are taken, then (once the serving model
//! accepts it) it is recorded, in stream order; REST requests read it
//! without recording. A partition is rebuilt from the input topic before its
//! first payment is scored; a failed rebuild fails the batch (fail closed).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::decision::{occluded_rows, Decision, DecisionBands, Reason};
use crate::feature_log::FeatureLog;
use crate::features::{EncodeError, FeatureEncoder, FeatureSpec, FEATURE_WIDTH};
use crate::history::{CustomerFeatures, OnlineHistory, Position, Replay};
use crate::model::{Label, Model, ModelError};
use crate::payment::{Payment, ScoredPayment, ShadowScore};
use crate::telemetry::metric;

/// What callers may know about a loaded model (the serving one or the shadow) without touching torch.
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
    /// one place where `p >= threshold` becomes `isFraud` and the bands a
    /// decision. `shadow`: the shadow model and its P(fraud), if it scored the payment.
    pub fn verdict(
        &self,
        payment: Payment,
        p_fraud: f32,
        reasons: Vec<Reason>,
        shadow: Option<(&ModelInfo, f32)>,
        scored_at: i64,
    ) -> ScoredPayment {
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
            shadow: None,
        };
        self.rescore(&mut output, p_fraud, reasons, shadow);
        output
    }

    /// Sets the score, `isFraud`, the decision, the reasons and the shadow
    /// score of `output` (a verdict of this model, reused for the next
    /// payment of a batch).
    pub fn rescore(
        &self,
        output: &mut ScoredPayment,
        p_fraud: f32,
        reasons: Vec<Reason>,
        shadow: Option<(&ModelInfo, f32)>,
    ) {
        output.fraud_probability = f64::from(p_fraud);
        output.is_fraud = self.flags(output.fraud_probability);
        output.decision = Some(self.bands.decide(output.fraud_probability));
        output.reasons = reasons;
        let reused = output.shadow.take();
        output.shadow = shadow.map(|(model, p)| model.shadow_score(p, reused));
    }

    /// Whether this model flags P(fraud) `p` as fraud: the rule behind `isFraud`.
    pub fn flags(&self, p: f64) -> bool {
        p >= self.threshold
    }

    /// This model's score as a shadow: its version, P(fraud), whether its own
    /// threshold flags it and the decision by its own bands. `reuse`: a shadow
    /// score whose version string may be kept.
    pub fn shadow_score(&self, p_fraud: f32, reuse: Option<ShadowScore>) -> ShadowScore {
        let fraud_probability = f64::from(p_fraud);
        let (is_fraud, decision) = (self.flags(fraud_probability), self.bands.decide(fraud_probability));
        match reuse {
            Some(mut score) if score.model_version == self.version => {
                score.fraud_probability = fraud_probability;
                score.is_fraud = is_fraud;
                score.decision = decision;
                score
            }
            _ => ShadowScore { model_version: self.version.clone(), fraud_probability, is_fraud, decision },
        }
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
    #[error(
        "no shadow model is loaded (start the scorer with --shadow <label> and point that label at a \
         version other than the serving one)"
    )]
    NoShadow,
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
    #[error(transparent)]
    History(Arc<crate::history::ReplayError>),
    #[error(
        "model version {version} scores {width} features, the payment's 28 and the customer's history: \
         pre-encoded rows (:predict, infer) cannot carry the history; send payments (:classify, :score)"
    )]
    RowsNeedHistory { version: String, width: usize },
    /// A history version's payment reached the encoder without its
    /// customer's features: ours to fix, never the payment's (not dead-lettered).
    #[error("{0} (a scorer bug: the batch fails instead of dead-lettering a valid payment)")]
    HistoryNotKept(Box<EncodeError>),
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
    /// The shadow model's scores, if one is loaded and its pass succeeded.
    pub shadow: Option<ShadowScores>,
}

/// The shadow model's P(fraud) for each payment of a batch (`None` where its
/// encoder rejected the payment).
pub struct ShadowScores {
    pub model: Arc<ModelInfo>,
    pub p_fraud: Vec<Option<f32>>,
}

impl ShadowScores {
    /// The shadow model and its P(fraud) for the `i`th payment, if it scored it.
    pub fn of(&self, i: usize) -> Option<(&ModelInfo, f32)> {
        Some((&self.model, self.p_fraud.get(i).copied().flatten()?))
    }
}

/// Which loaded model a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The serving model (the stream, and REST unless it names the shadow version).
    Serving,
    /// The shadow model (REST requests for its version or label).
    Shadow,
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
    /// Payments, with where each was read for stream payments (REST: `None`).
    Payments(Vec<Payment>, Option<Vec<Position>>, Explain, Target, oneshot::Sender<Result<ScoredBatch, ScoringError>>),
    Rows(Vec<f32>, Target, oneshot::Sender<Result<ScoredRows, ScoringError>>),
    Swap(Box<Model>, oneshot::Sender<()>),
    /// Loads (or with `None` unloads) the shadow model.
    Shadow(Option<Box<Model>>, oneshot::Sender<()>),
    /// Where customer histories are rebuilt from (the stream's input topic).
    Replay(Option<Box<dyn Replay>>, oneshot::Sender<()>),
}

impl Job {
    fn target(&self) -> Option<Target> {
        match self {
            Job::Payments(_, _, _, target, _) | Job::Rows(_, target, _) => Some(*target),
            Job::Swap(..) | Job::Shadow(..) | Job::Replay(..) => None,
        }
    }
}

/// What the scoring thread shares with callers about the loaded models.
#[derive(Default)]
struct Loaded {
    serving: RwLock<Option<Arc<ModelInfo>>>,
    shadow: RwLock<Option<Arc<ModelInfo>>>,
}

/// Handle to the scoring thread; cheap to clone.
#[derive(Clone)]
pub struct ScoringService {
    jobs: mpsc::Sender<Job>,
    loaded: Arc<Loaded>,
    /// The versions the store's labels named at the model watcher's last look.
    labels: Arc<RwLock<HashMap<Label, String>>>,
    /// Whether reasons are computed at all (`--reasons`; off only to measure their cost).
    reasons: Arc<AtomicBool>,
    /// Where the rows of stream payments are logged (`--feature-log`).
    feature_log: Arc<Mutex<Option<FeatureLog>>>,
    width: usize,
}

impl ScoringService {
    /// Starts the scoring thread. `max_batch` caps the rows coalesced into
    /// one forward pass; `queue` bounds waiting jobs (backpressure).
    pub fn start(max_batch: usize, queue: usize) -> Self {
        let (jobs, rx) = mpsc::channel(queue);
        let loaded = Arc::new(Loaded::default());
        let reasons = Arc::new(AtomicBool::new(true));
        let feature_log = Arc::new(Mutex::new(None));
        let (shared, explaining, log) = (loaded.clone(), reasons.clone(), feature_log.clone());
        std::thread::Builder::new()
            .name("fraudstream-scorer".into())
            .spawn(move || run(rx, shared, explaining, log, max_batch))
            .expect("spawning the scoring thread");
        Self { jobs, loaded, labels: Arc::default(), reasons, feature_log, width: FEATURE_WIDTH }
    }

    /// Logs the row of every stream payment scored from now on to `log`.
    pub fn log_features(&self, log: FeatureLog) {
        *self.feature_log.lock().expect("feature log lock") = Some(log);
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
        self.loaded.serving.read().expect("model info lock").clone()
    }

    /// The shadow model, if one is loaded.
    pub fn shadow(&self) -> Option<Arc<ModelInfo>> {
        self.loaded.shadow.read().expect("model info lock").clone()
    }

    /// Puts `model` in service after every job queued before it. A shadow of
    /// the same version is unloaded with the swap (it would only repeat the score).
    pub async fn swap(&self, model: Model) -> Result<(), ScoringError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Swap(Box::new(model), tx)).await.map_err(|_| ScoringError::Stopped)?;
        rx.await.map_err(|_| ScoringError::Stopped)
    }

    /// Loads `model` as the shadow (or unloads it with `None`) after every
    /// job queued before it. A model of the serving version is not loaded.
    pub async fn set_shadow(&self, model: Option<Model>) -> Result<(), ScoringError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Shadow(model.map(Box::new), tx)).await.map_err(|_| ScoringError::Stopped)?;
        rx.await.map_err(|_| ScoringError::Stopped)
    }

    /// Queues payments for scoring by the serving model; the returned
    /// receiver yields the result. Waits while the queue is full.
    pub async fn submit(
        &self,
        payments: Vec<Payment>,
        explain: Explain,
    ) -> Result<oneshot::Receiver<Result<ScoredBatch, ScoringError>>, ScoringError> {
        self.submit_to(Target::Serving, payments, explain).await
    }

    /// Queues payments for scoring by `target`.
    pub async fn submit_to(
        &self,
        target: Target,
        payments: Vec<Payment>,
        explain: Explain,
    ) -> Result<oneshot::Receiver<Result<ScoredBatch, ScoringError>>, ScoringError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Payments(payments, None, explain, target, tx)).await.map_err(|_| ScoringError::Stopped)?;
        Ok(rx)
    }

    /// Queues stream payments (read at `positions`, in stream order) for the
    /// serving model: they count as their customers' history.
    pub async fn submit_stream(
        &self,
        payments: Vec<Payment>,
        positions: Vec<Position>,
    ) -> Result<oneshot::Receiver<Result<ScoredBatch, ScoringError>>, ScoringError> {
        assert_eq!(payments.len(), positions.len(), "a position per payment");
        let (tx, rx) = oneshot::channel();
        let job = Job::Payments(payments, Some(positions), Explain::AtReview, Target::Serving, tx);
        self.jobs.send(job).await.map_err(|_| ScoringError::Stopped)?;
        Ok(rx)
    }

    /// Sets where customer histories are rebuilt from, after every job queued
    /// before (`None`: REST only, no stream history).
    pub async fn set_replay(&self, replay: Option<Box<dyn Replay>>) -> Result<(), ScoringError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Replay(replay, tx)).await.map_err(|_| ScoringError::Stopped)?;
        rx.await.map_err(|_| ScoringError::Stopped)
    }

    /// Scores payments with the serving model and waits for the result.
    pub async fn score_payments(&self, payments: Vec<Payment>, explain: Explain) -> Result<ScoredBatch, ScoringError> {
        self.score_payments_on(Target::Serving, payments, explain).await
    }

    /// Scores payments with `target` and waits for the result.
    pub async fn score_payments_on(
        &self,
        target: Target,
        payments: Vec<Payment>,
        explain: Explain,
    ) -> Result<ScoredBatch, ScoringError> {
        self.submit_to(target, payments, explain).await?.await.map_err(|_| ScoringError::Stopped)?
    }

    /// Scores already-encoded rows (`width` floats each) with the serving
    /// model and waits for the result.
    pub async fn score_rows(&self, features: Vec<f32>) -> Result<ScoredRows, ScoringError> {
        self.score_rows_on(Target::Serving, features).await
    }

    /// Scores already-encoded rows with `target` and waits for the result.
    pub async fn score_rows_on(&self, target: Target, features: Vec<f32>) -> Result<ScoredRows, ScoringError> {
        if features.len() % self.width != 0 {
            return Err(ScoringError::BadWidth { got: features.len(), width: self.width });
        }
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Rows(features, target, tx)).await.map_err(|_| ScoringError::Stopped)?;
        rx.await.map_err(|_| ScoringError::Stopped)?
    }
}

/// A loaded model and what callers may know of it.
type InService = (Model, Arc<ModelInfo>);

/// Sets the gauges of the shadow model: `version` loaded (1) or unloaded (0).
fn shadow_gauges(version: &str, loaded: bool) {
    metrics::gauge!(metric::SHADOW_LOADED, "version" => version.to_string()).set(if loaded { 1.0 } else { 0.0 });
    let number = crate::model::ModelVersion::parse(version).map_or(0.0, |v| v.0 as f64);
    metrics::gauge!(metric::SHADOW_VERSION).set(if loaded { number } else { 0.0 });
}

/// The scoring thread: takes every job already waiting (up to `max_batch`
/// rows), runs one forward pass over all of them (and one with the shadow
/// model, if loaded), and answers each.
fn run(
    mut rx: mpsc::Receiver<Job>,
    loaded: Arc<Loaded>,
    reasons: Arc<AtomicBool>,
    feature_log: Arc<Mutex<Option<FeatureLog>>>,
    max_batch: usize,
) {
    let mut model: Option<InService> = None;
    let mut shadow: Option<InService> = None;
    let set_shadow = |shadow: &mut Option<InService>, new: Option<InService>| {
        if let Some((_, old)) = shadow.as_ref() {
            shadow_gauges(&old.version, false);
            tracing::info!(version = %old.version, "shadow model unloaded");
        }
        if let Some((_, info)) = &new {
            shadow_gauges(&info.version, true);
            tracing::info!(version = %info.version, device = %info.device, "shadow model loaded");
        }
        *loaded.shadow.write().expect("model info lock") = new.as_ref().map(|(_, info)| info.clone());
        *shadow = new;
    };
    let mut history = OnlineHistory::default();
    // Whether the serving or shadow model needs customer history (kept only then).
    let mut keeping = false;
    let mut pending: Option<Job> = None;
    loop {
        let Some(first) = pending.take().or_else(|| rx.blocking_recv()) else { return };
        let mut jobs = Vec::new();
        let mut rows = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Swap(..) | Job::Shadow(..) | Job::Replay(..) if !jobs.is_empty() => {
                    // Score what came before the swap with the old models first.
                    pending = Some(job);
                    break;
                }
                Job::Swap(new, done) => {
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
                    *loaded.serving.write().expect("model info lock") = Some(info.clone());
                    if shadow.as_ref().is_some_and(|(_, s)| s.version == info.version) {
                        // The shadow now serves: shadowing it would only repeat the score.
                        set_shadow(&mut shadow, None);
                    }
                    model = Some((*new, info));
                    let _ = done.send(());
                }
                Job::Shadow(new, done) => {
                    let new = new.map(|m| {
                        let info = Arc::new(ModelInfo::of(&m));
                        (*m, info)
                    });
                    let serving = model.as_ref().map(|(_, info)| info.version.as_str());
                    let new = new.filter(|(_, info)| Some(info.version.as_str()) != serving);
                    let same = match (&shadow, &new) {
                        (None, None) => true,
                        (Some((_, a)), Some((_, b))) => a.version == b.version,
                        _ => false,
                    };
                    if !same {
                        set_shadow(&mut shadow, new);
                    }
                    let _ = done.send(());
                }
                Job::Replay(replay, done) => {
                    history.set_replay(replay);
                    let _ = done.send(());
                }
                job => {
                    rows += match &job {
                        Job::Payments(p, ..) => p.len(),
                        Job::Rows(f, ..) => f.len() / FEATURE_WIDTH,
                        Job::Swap(..) | Job::Shadow(..) | Job::Replay(..) => 0,
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
        // After this batch's swaps: the models that score it decide.
        let wants = [model.as_ref(), shadow.as_ref()].into_iter().flatten().any(|(m, _)| m.encoder().needs_history());
        if wants != keeping {
            // Not kept until now (stale) or no longer needed (memory): start over.
            history.clear();
            keeping = wants;
        }
        let (for_shadow, for_serving): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|job| job.target() == Some(Target::Shadow));
        let explaining = reasons.load(Ordering::Relaxed);
        for (jobs, target) in [(for_serving, Target::Serving), (for_shadow, Target::Shadow)] {
            if jobs.is_empty() {
                continue;
            }
            let (scoring, beside) = match target {
                Target::Serving => (model.as_ref(), shadow.as_ref()),
                Target::Shadow => (shadow.as_ref(), None),
            };
            let Some((scoring, info)) = scoring else {
                let error = if target == Target::Serving { ScoringError::NoModel } else { ScoringError::NoShadow };
                for job in jobs {
                    fail(job, error.clone());
                }
                continue;
            };
            // A panic inside libtorch must not kill the scoring thread: the
            // batch's jobs are dropped with it (their callers see the
            // reply channel close, a scoring failure) and the thread lives.
            let mut log = feature_log.lock().expect("feature log lock");
            let log = if target == Target::Serving { log.as_mut() } else { None };
            let scored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                score_jobs(scoring, info, jobs, explaining, beside, keeping.then_some(&mut history), log)
            }));
            if let Err(panic) = scored {
                tracing::error!(version = %info.version, message = panic_message(&panic), "the model panicked while scoring");
            }
        }
        if keeping {
            history.publish();
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn fail(job: Job, error: ScoringError) {
    match job {
        Job::Payments(.., reply) => drop(reply.send(Err(error))),
        Job::Rows(.., reply) => drop(reply.send(Err(error))),
        Job::Swap(..) | Job::Shadow(..) | Job::Replay(..) => {}
    }
}

/// Where `encode_payments` appends rows.
struct Encoded<'a> {
    row: &'a mut [f32],
    features: &'a mut Vec<f32>,
    n: &'a mut usize,
}

/// Per payment of a job: its row, or why it cannot be encoded.
type Slots = Vec<Result<usize, EncodeError>>;
/// Per payment of a job: its customer features, where history is kept.
type OfCustomers = Vec<Option<CustomerFeatures>>;

/// A job's slots and, where history is kept, each payment's customer
/// features. A stream payment's features are taken (its partition rebuilt
/// first if needed), then, once encoded, it is recorded as its customer's latest.
fn encode_payments(
    encoder: &FeatureEncoder,
    payments: &[Payment],
    positions: Option<&[Position]>,
    mut history: Option<&mut OnlineHistory>,
    out: &mut Encoded<'_>,
) -> Result<(Slots, OfCustomers), ScoringError> {
    let mut slots = Vec::with_capacity(payments.len());
    let mut customer = Vec::new();
    for (i, p) in payments.iter().enumerate() {
        let at = positions.map(|ps| ps[i]);
        let of_customer = match (history.as_deref_mut(), at) {
            (None, _) => None,
            (Some(h), Some(at)) => Some(
                h.features(p, at, &|q: &Payment| encoder.accepts(q)).map_err(|e| ScoringError::History(Arc::new(e)))?,
            ),
            (Some(h), None) => Some(h.peek(p)),
        };
        let slot = encoder.encode_with(p, of_customer.as_ref(), out.row).map(|()| {
            out.features.extend_from_slice(out.row);
            *out.n += 1;
            *out.n - 1
        });
        if let Err(missing @ EncodeError::MissingHistory { .. }) = slot {
            return Err(ScoringError::HistoryNotKept(Box::new(missing)));
        }
        if let (Some(h), Some(at), Ok(_)) = (history.as_deref_mut(), at, &slot) {
            h.record(p, at);
        }
        slots.push(slot);
        if history.is_some() {
            customer.push(of_customer);
        }
    }
    Ok((slots, customer))
}

/// Encodes every job's payments with the model's encoder (their customer
/// features first, where `history` is kept), runs one forward pass over all
/// rows (and, with a `shadow` model, one more over the payments), and hands
/// each job its slice. A job whose history cannot be rebuilt, or whose
/// pre-encoded rows do not fit the model, fails alone.
fn score_jobs(
    model: &Model,
    info: &Arc<ModelInfo>,
    jobs: Vec<Job>,
    explaining: bool,
    shadow: Option<&InService>,
    mut history: Option<&mut OnlineHistory>,
    log: Option<&mut FeatureLog>,
) {
    let started = Instant::now();
    let encoder = model.encoder();
    let width = encoder.width();
    let rows: usize = jobs
        .iter()
        .map(|job| match job {
            Job::Payments(p, ..) => p.len(),
            Job::Rows(f, ..) => f.len() / width,
            Job::Swap(..) | Job::Shadow(..) | Job::Replay(..) => 0,
        })
        .sum();
    let mut features: Vec<f32> = Vec::with_capacity(rows * width);
    let mut encoded: Vec<Slots> = Vec::with_capacity(jobs.len());
    let mut customer: Vec<OfCustomers> = Vec::with_capacity(jobs.len());
    let mut kept = Vec::with_capacity(jobs.len());
    let mut row = vec![0f32; width];
    let mut n = 0;
    for job in jobs {
        let done = match &job {
            Job::Payments(payments, positions, ..) => {
                let (rows_before, n_before) = (features.len(), n);
                let mut out = Encoded { row: &mut row, features: &mut features, n: &mut n };
                match encode_payments(encoder, payments, positions.as_deref(), history.as_deref_mut(), &mut out) {
                    Ok((slots, of_customers)) => {
                        encoded.push(slots);
                        customer.push(of_customers);
                        Ok(())
                    }
                    Err(error) => {
                        features.truncate(rows_before);
                        n = n_before;
                        Err(error)
                    }
                }
            }
            Job::Rows(..) if width != FEATURE_WIDTH => {
                Err(ScoringError::RowsNeedHistory { version: info.version.clone(), width })
            }
            Job::Rows(rows, ..) if rows.len() % width != 0 => Err(ScoringError::BadWidth { got: rows.len(), width }),
            Job::Rows(rows, ..) => {
                let count = rows.len() / width;
                features.extend_from_slice(rows);
                encoded.push((n..n + count).map(Ok).collect());
                customer.push(Vec::new());
                n += count;
                Ok(())
            }
            Job::Swap(..) | Job::Shadow(..) | Job::Replay(..) => {
                encoded.push(Vec::new());
                customer.push(Vec::new());
                Ok(())
            }
        };
        match done {
            Ok(()) => kept.push(job),
            Err(error) => fail(job, error),
        }
    }
    let jobs = kept;
    if let Some(log) = log {
        for (job, slots) in jobs.iter().zip(&encoded) {
            let Job::Payments(payments, Some(positions), ..) = job else { continue };
            for ((p, at), slot) in payments.iter().zip(positions).zip(slots) {
                if let Ok(row) = slot {
                    log.write(&p.payment_id, *at, &info.version, &features[row * width..(row + 1) * width]);
                }
            }
        }
        log.flush();
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
    let (shadow, shadow_scores) = match shadow {
        Some((model, shadow_info)) => {
            match shadow_pass(model, shadow_info, info, &jobs, (&encoded, &customer), &features, n) {
                Some(scores) => (Some(shadow_info), scores),
                None => (None, Vec::new()),
            }
        }
        None => (None, Vec::new()),
    };
    metrics::histogram!(metric::BATCH_SIZE).record(n as f64);
    metrics::histogram!(metric::INFERENCE_SECONDS).record(started.elapsed().as_secs_f64());
    let mut shadow_scores = shadow_scores.into_iter();
    for ((job, slots), reasons) in jobs.into_iter().zip(encoded).zip(reasons) {
        let job_shadow = shadow_scores.next();
        match job {
            Job::Payments(payments, _, _, _, reply) => {
                let results: Vec<_> = slots.into_iter().map(|slot| slot.map(|i| outputs[i])).collect();
                let mut reasons = reasons;
                reasons.resize_with(payments.len(), Vec::new);
                let shadow =
                    shadow.zip(job_shadow).map(|(model, p_fraud)| ShadowScores { model: model.clone(), p_fraud });
                let _ = reply.send(Ok(ScoredBatch { model: info.clone(), payments, results, reasons, shadow }));
            }
            Job::Rows(.., reply) => {
                let outputs = slots.into_iter().map(|slot| outputs[slot.expect("rows are pre-encoded")]).collect();
                let _ = reply.send(Ok(ScoredRows { model: info.clone(), outputs }));
            }
            Job::Swap(..) | Job::Shadow(..) | Job::Replay(..) => {}
        }
    }
}

/// The shadow model's pass over the payments of a batch the serving model
/// has scored: P(fraud) per job, per payment (`None` where its encoder
/// rejects the payment), or `None` for the whole batch when the shadow fails
/// or returns something that is not a probability. The shadow is an
/// experiment: its failure is counted and logged, never the batch's.
fn shadow_pass(
    model: &Model,
    info: &ModelInfo,
    serving: &ModelInfo,
    jobs: &[Job],
    (encoded, customer): (&[Slots], &[OfCustomers]),
    features: &[f32],
    rows: usize,
) -> Option<Vec<Vec<Option<f32>>>> {
    // Same encoding and nothing pre-encoded in the batch: the serving model's rows are the shadow's.
    let reuse = info.feature_spec == serving.feature_spec && jobs.iter().all(|j| matches!(j, Job::Payments(..)));
    let mut own = Vec::new();
    let slots: Vec<Vec<Option<usize>>> = if reuse {
        encoded.iter().map(|slots| slots.iter().map(|slot| slot.as_ref().ok().copied()).collect()).collect()
    } else {
        let encoder = model.encoder();
        let mut row = vec![0f32; encoder.width()];
        let mut n = 0;
        jobs.iter()
            .zip(customer)
            .map(|(job, of_customers)| match job {
                Job::Payments(payments, ..) => payments
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let of_customer = of_customers.get(i).and_then(Option::as_ref);
                        encoder.encode_with(p, of_customer, &mut row).ok().map(|()| {
                            own.extend_from_slice(&row);
                            n += 1;
                            n - 1
                        })
                    })
                    .collect(),
                _ => Vec::new(),
            })
            .collect()
    };
    let (features, rows) = if reuse { (features, rows) } else { (own.as_slice(), own.len() / model.encoder().width()) };
    let scored =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checked_forward(model, info, features, rows)));
    let why = match scored {
        Ok(Ok(outputs)) => {
            metrics::counter!(metric::SHADOW_SCORED).increment(rows as u64);
            return Some(slots.into_iter().map(|s| s.into_iter().map(|i| Some(outputs[i?][1])).collect()).collect());
        }
        Ok(Err(error)) => error.to_string(),
        Err(panic) => format!("the model panicked: {}", panic_message(&panic)),
    };
    metrics::counter!(metric::SHADOW_FAILURES).increment(1);
    tracing::warn!(
        shadow = %info.version,
        serving = %serving.version,
        rows,
        error = %why,
        "the shadow model failed on a batch; it leaves with `shadow: null`, scored by the serving model as always"
    );
    None
}

/// One forward pass over `rows` feature rows, checked: a model that fails or
/// returns anything but probabilities is an error for the whole batch (logged).
fn forward(model: &Model, info: &ModelInfo, features: &[f32], rows: usize) -> Result<Vec<[f32; 2]>, ScoringError> {
    checked_forward(model, info, features, rows).inspect_err(|error| {
        tracing::error!(error = %error, rows, "forward pass failed");
    })
}

/// `forward` without the log line: the model's outputs, if all are probabilities.
fn checked_forward(
    model: &Model,
    info: &ModelInfo,
    features: &[f32],
    rows: usize,
) -> Result<Vec<[f32; 2]>, ScoringError> {
    let outputs = model.predict(features, rows)?;
    let is_probability = |x: f32| x.is_finite() && (0.0..=1.0).contains(&x);
    if let Some(bad) = outputs.iter().find(|o| !o.iter().all(|x| is_probability(*x))) {
        return Err(ScoringError::NotProbabilities { version: info.version.clone(), output: *bad });
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
    let groups = info.feature_spec.groups().len();
    let mut wanted: Vec<(usize, usize, usize)> = Vec::new(); // (job, payment, row)
    for (j, (job, slots)) in jobs.iter().zip(encoded).enumerate() {
        let Job::Payments(_, _, explain, ..) = job else { continue };
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
        let encoded = &features[row * width..(row + 1) * width];
        per_job[k] = crate::decision::reasons(&info.feature_spec, &payments[k], encoded, outputs[row][1], &without);
    }
    Ok(reasons)
}
