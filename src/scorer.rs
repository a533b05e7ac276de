//! `fraudstream score`: the process that wires the pieces together, the
//! scoring service, the model watcher, the HTTP API and the Kafka pipeline,
//! and threads one shutdown signal through all of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::api::{router, ApiState};
use crate::codec::{Codec, WireFormat, SCORED_PAYMENT_SCHEMA_JSON};
use crate::kafka::ensure_topics;
use crate::model_watch::{ModelWatcher, WatchConfig};
use crate::pipeline::{PipelineConfig, PipelineCounters, PipelineError, PipelineState};
use crate::registry::{value_subject, SchemaRegistry};
use crate::scoring::ScoringService;

/// Everything `fraudstream score` needs.
#[derive(Debug, Clone)]
pub struct ScorerConfig {
    pub pipeline: PipelineConfig,
    pub watch: WatchConfig,
    /// Where the REST API and metrics listen; `None` runs without HTTP.
    pub http_addr: Option<SocketAddr>,
    /// Model name served by the REST API.
    pub model_name: String,
    /// Largest accepted REST request body, in bytes.
    pub body_limit: usize,
    /// Create the output and dead-letter topics with this many partitions if
    /// missing; `None` leaves topics to whoever manages them.
    pub create_topics: Option<i32>,
    /// REST scoring requests served at once; more get 429.
    pub rest_concurrency: usize,
    /// Reason codes for payments at or above the review band.
    pub reasons: bool,
    /// Append the feature row of every stream payment here (JSON lines).
    pub feature_log: Option<std::path::PathBuf>,
}

/// The defaults of `fraudstream score`'s flags; main, the demo, tests and
/// benchmarks start from here and change what they must.
impl Default for ScorerConfig {
    fn default() -> Self {
        Self {
            pipeline: PipelineConfig::default(),
            watch: WatchConfig::default(),
            http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 8501))),
            model_name: "payfraud".into(),
            body_limit: 4 << 20,
            create_topics: Some(4),
            rest_concurrency: crate::api::DEFAULT_REST_CONCURRENCY,
            reasons: true,
            feature_log: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    #[error("cannot listen on {addr}: {source} (is another scorer running there? pick another --http-addr)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("cannot open the feature log {}: {source} (check --feature-log's folder exists and is writable)", path.display())]
    FeatureLog { path: std::path::PathBuf, source: std::io::Error },
    #[error("registering the output schema: {0}; fix the schema's compatibility setting or subject in the registry")]
    Registry(crate::registry::RegistryError),
}

/// A running scorer's shared parts, for callers that watch it (the demo, tests).
#[derive(Clone)]
pub struct ScorerParts {
    pub scoring: ScoringService,
    pub state: Arc<PipelineState>,
    pub counters: Arc<PipelineCounters>,
}

impl ScorerParts {
    pub fn new(max_batch: usize) -> Self {
        Self {
            scoring: ScoringService::start(max_batch, 64),
            state: Arc::new(PipelineState::default()),
            counters: Arc::new(PipelineCounters::default()),
        }
    }
}

/// With a schema registry and Confluent output: registers the output schema
/// under `<output topic>-value` (waiting while the registry is unreachable,
/// not ready meanwhile) and returns the codec that writes its id. A registry
/// that refuses the schema stops the scorer here, before anything is read.
async fn register_output_schema(
    config: &PipelineConfig,
    parts: &ScorerParts,
    shutdown: &CancellationToken,
) -> Result<Option<Codec>, ScorerError> {
    let (Some(registry), WireFormat::Confluent) = (&config.schema_registry, config.output_codec.format()) else {
        return Ok(None);
    };
    let registry = SchemaRegistry::new(registry.clone()).map_err(ScorerError::Registry)?;
    let subject = value_subject(&config.output_topic);
    let state = &parts.state;
    let id = registry
        .register_until(&subject, SCORED_PAYMENT_SCHEMA_JSON, shutdown, |why| state.set_stalled(why))
        .await
        .map_err(ScorerError::Registry)?;
    if let Some(id) = id {
        tracing::info!(registry = registry.url(), subject, id, "output schema registered");
    }
    Ok(id.map(|id| Codec::new(WireFormat::Confluent, id)))
}

/// Most in-process rewinds within [`REWIND_WINDOW`]; one more exits instead.
const MAX_REWINDS: usize = 3;
const REWIND_WINDOW: Duration = Duration::from_secs(60);

/// Runs the pipeline; after an aborted transaction (a commit that raced a
/// rebalance, a lost assignment) starts it again in-process: a fresh consumer
/// re-reads from the last committed transaction, a fresh producer with the
/// same transactional.id fences the old one. Rewinds that keep coming are
/// not transient: after [`MAX_REWINDS`] within [`REWIND_WINDOW`] the failure
/// is returned and the process exits for the orchestrator.
async fn run_pipeline(
    config: PipelineConfig,
    parts: &ScorerParts,
    shutdown: &CancellationToken,
) -> Result<(), PipelineError> {
    let mut rewinds: Vec<Instant> = Vec::new();
    loop {
        let result = crate::pipeline::run(
            config.clone(),
            parts.scoring.clone(),
            parts.state.clone(),
            parts.counters.clone(),
            shutdown.clone(),
        )
        .await;
        let failure = match &result {
            Err(PipelineError::Failed(failure)) if failure.rewinds() && !shutdown.is_cancelled() => failure,
            _ => return result,
        };
        rewinds.retain(|at| at.elapsed() < REWIND_WINDOW);
        if rewinds.len() >= MAX_REWINDS {
            tracing::error!(rewinds = rewinds.len() + 1, "rewinding again and again; exiting for the orchestrator");
            return result;
        }
        rewinds.push(Instant::now());
        metrics::counter!(crate::telemetry::metric::REWINDS).increment(1);
        tracing::warn!(error = %failure, "rewinding to the last committed transaction");
    }
}

/// Runs the scorer until `shutdown` is cancelled or its pipeline fails; then
/// drains, commits and returns (the failure, for a non-zero exit).
pub async fn run(mut config: ScorerConfig, parts: ScorerParts, shutdown: CancellationToken) -> Result<(), ScorerError> {
    parts.scoring.set_reasons(config.reasons);
    if let Some(path) = &config.feature_log {
        let log = crate::feature_log::FeatureLog::open(path)
            .map_err(|source| ScorerError::FeatureLog { path: path.clone(), source })?;
        parts.scoring.log_features(log);
    }
    // HTTP first, so /healthz answers (and /readyz says why not) while we wait for a model.
    let http = match config.http_addr {
        None => None,
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| ScorerError::Bind { addr, source })?;
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "REST API and metrics listening");
            let api = ApiState::new(
                parts.scoring.clone(),
                config.model_name.clone(),
                Some(parts.state.clone()),
                config.rest_concurrency,
            );
            let app = router(api, config.body_limit);
            let stop = shutdown.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }))
        }
    };

    let mut watcher = ModelWatcher::new(config.watch.clone(), parts.scoring.clone());
    if !watcher.load_initial(&shutdown).await {
        return Ok(());
    }
    if let Some(partitions) = config.create_topics {
        let topics = [config.pipeline.output_topic.as_str(), config.pipeline.dead_letter_topic.as_str()];
        if let Err(e) = ensure_topics(&config.pipeline.kafka, &topics, partitions).await {
            tracing::warn!(error = %e, "could not create the output topics; assuming they are managed elsewhere");
        }
    }
    match register_output_schema(&config.pipeline, &parts, &shutdown).await? {
        Some(codec) => config.pipeline.output_codec = codec,
        None if shutdown.is_cancelled() => return Ok(()),
        None => {}
    }
    let watch = tokio::spawn(watcher.watch(shutdown.clone()));
    let result = run_pipeline(config.pipeline, &parts, &shutdown).await;
    shutdown.cancel();
    let _ = watch.await;
    if let Some(http) = http {
        let _ = http.await;
    }
    Ok(result?)
}
