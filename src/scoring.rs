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

use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::features::{EncodeError, FEATURE_WIDTH};
use crate::model::{Model, ModelError};
use crate::payment::{Payment, ScoredPayment};
use crate::telemetry::metric;

/// What callers may know about the serving model without touching torch.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub threshold: f64,
    pub device: String,
}

impl ModelInfo {
    /// A payment's score as the output says it, stream and REST alike: the
    /// one place where `p >= threshold` becomes the decision.
    pub fn verdict(&self, payment: Payment, p_fraud: f32, scored_at: i64) -> ScoredPayment {
        let (fraud_probability, is_fraud) = self.decide(p_fraud);
        ScoredPayment {
            payment,
            fraud_probability,
            is_fraud,
            threshold: self.threshold,
            model_name: self.name.clone(),
            model_version: self.version.clone(),
            scored_at,
        }
    }

    /// The probability as outputs carry it, and the decision: `p >= threshold`.
    pub fn decide(&self, p_fraud: f32) -> (f64, bool) {
        let fraud_probability = f64::from(p_fraud);
        (fraud_probability, fraud_probability >= self.threshold)
    }

    fn of(model: &Model) -> Self {
        let m = model.manifest();
        Self {
            name: m.name.clone(),
            version: m.version.clone(),
            threshold: m.threshold,
            device: crate::model::device_name(model.device()),
        }
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
}

/// Outputs for raw feature rows.
pub struct ScoredRows {
    pub model: Arc<ModelInfo>,
    pub outputs: Vec<[f32; 2]>,
}

enum Job {
    Payments(Vec<Payment>, oneshot::Sender<Result<ScoredBatch, ScoringError>>),
    Rows(Vec<f32>, oneshot::Sender<Result<ScoredRows, ScoringError>>),
    Swap(Box<Model>, oneshot::Sender<()>),
}

/// Handle to the scoring thread; cheap to clone.
#[derive(Clone)]
pub struct ScoringService {
    jobs: mpsc::Sender<Job>,
    current: Arc<RwLock<Option<Arc<ModelInfo>>>>,
    width: usize,
}

impl ScoringService {
    /// Starts the scoring thread. `max_batch` caps the rows coalesced into
    /// one forward pass; `queue` bounds waiting jobs (backpressure).
    pub fn start(max_batch: usize, queue: usize) -> Self {
        let (jobs, rx) = mpsc::channel(queue);
        let current = Arc::new(RwLock::new(None));
        let shared = current.clone();
        std::thread::Builder::new()
            .name("fraudstream-scorer".into())
            .spawn(move || run(rx, shared, max_batch))
            .expect("spawning the scoring thread");
        Self { jobs, current, width: FEATURE_WIDTH }
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
    ) -> Result<oneshot::Receiver<Result<ScoredBatch, ScoringError>>, ScoringError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Payments(payments, tx)).await.map_err(|_| ScoringError::Stopped)?;
        Ok(rx)
    }

    /// Scores payments and waits for the result.
    pub async fn score_payments(&self, payments: Vec<Payment>) -> Result<ScoredBatch, ScoringError> {
        self.submit(payments).await?.await.map_err(|_| ScoringError::Stopped)?
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
fn run(mut rx: mpsc::Receiver<Job>, current: Arc<RwLock<Option<Arc<ModelInfo>>>>, max_batch: usize) {
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
                        Job::Payments(p, _) => p.len(),
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
                let scored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| score_jobs(model, info, jobs)));
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
        Job::Payments(_, reply) => drop(reply.send(Err(error))),
        Job::Rows(_, reply) => drop(reply.send(Err(error))),
        Job::Swap(..) => {}
    }
}

/// Encodes every job's payments with the model's encoder, runs one forward
/// pass over all rows, and hands each job its slice.
fn score_jobs(model: &Model, info: &Arc<ModelInfo>, jobs: Vec<Job>) {
    let started = Instant::now();
    let encoder = model.encoder();
    let width = encoder.width();
    let rows: usize = jobs
        .iter()
        .map(|job| match job {
            Job::Payments(p, _) => p.len(),
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
            Job::Payments(payments, _) => {
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
    let outputs = match model.predict(&features, n) {
        Ok(outputs) => outputs,
        Err(e) => {
            tracing::error!(error = %e, rows = n, "forward pass failed");
            let error = ScoringError::from(e);
            for job in jobs {
                fail(job, error.clone());
            }
            return;
        }
    };
    let is_probability = |x: f32| x.is_finite() && (0.0..=1.0).contains(&x);
    if let Some(bad) = outputs.iter().find(|o| !o.iter().all(|x| is_probability(*x))) {
        let error = ScoringError::NotProbabilities { version: info.version.clone(), output: *bad };
        tracing::error!(error = %error, rows = n, "model output is not probabilities");
        for job in jobs {
            fail(job, error.clone());
        }
        return;
    }
    metrics::histogram!(metric::BATCH_SIZE).record(n as f64);
    metrics::histogram!(metric::INFERENCE_SECONDS).record(started.elapsed().as_secs_f64());
    for (job, slots) in jobs.into_iter().zip(encoded) {
        match job {
            Job::Payments(payments, reply) => {
                let results = slots.into_iter().map(|slot| slot.map(|i| outputs[i])).collect();
                let _ = reply.send(Ok(ScoredBatch { model: info.clone(), payments, results }));
            }
            Job::Rows(_, reply) => {
                let outputs = slots.into_iter().map(|slot| outputs[slot.expect("rows are pre-encoded")]).collect();
                let _ = reply.send(Ok(ScoredRows { model: info.clone(), outputs }));
            }
            Job::Swap(..) => {}
        }
    }
}
