//! `ModelWatcher`: keeps the scoring service on the newest complete model
//! version without a restart.
//!
//! At start it retries with back-off until a model loads (the store may be
//! down or empty); afterwards it polls every interval with one LIST call,
//! and loads, validates and warms a newer version before swapping it in.
//! A version that fails to load is reported (log + metric), remembered and
//! skipped; the old model keeps serving.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::model::{Model, ModelStore, MODEL_FILE};
use crate::scoring::ScoringService;
use crate::telemetry::metric;

/// Where to find models and how often to look.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub store: String,
    /// Serve exactly this version and never swap.
    pub pinned_version: Option<String>,
    pub poll_interval: Duration,
    pub device: tch::Device,
    /// Local folder for downloaded versions.
    pub cache_dir: PathBuf,
}

pub struct ModelWatcher {
    config: WatchConfig,
    store: Option<ModelStore>,
    scoring: ScoringService,
    serving: Option<String>,
    rejected: HashSet<String>,
}

fn newer(candidate: &str, current: Option<&str>) -> bool {
    let parse = |v: &str| v.parse::<u64>().unwrap_or(0);
    current.is_none_or(|c| parse(candidate) > parse(c))
}

impl ModelWatcher {
    pub fn new(config: WatchConfig, scoring: ScoringService) -> Self {
        Self { config, store: None, scoring, serving: None, rejected: HashSet::new() }
    }

    async fn store(&mut self) -> Result<&ModelStore, crate::model::StoreError> {
        if self.store.is_none() {
            self.store = Some(ModelStore::open(&self.config.store).await?);
        }
        Ok(self.store.as_ref().expect("just opened"))
    }

    /// Looks once for a newer version and swaps it in. Returns whether a swap happened.
    pub async fn check(&mut self) -> Result<bool, crate::Error> {
        let wanted = match &self.config.pinned_version {
            Some(v) => Some(v.clone()),
            None => self.store().await?.latest_version().await?,
        };
        let Some(version) = wanted else {
            return Err(crate::model::StoreError::Empty(self.config.store.clone()).into());
        };
        if self.serving.as_deref() == Some(version.as_str())
            || self.rejected.contains(&version)
            || !newer(&version, self.serving.as_deref()) && self.config.pinned_version.is_none()
        {
            return Ok(false);
        }
        let cache_dir = self.config.cache_dir.clone();
        let files = self.store().await?.fetch(&version, &[MODEL_FILE], &cache_dir).await?;
        let device = self.config.device;
        let dir = files.dir.clone();
        let loaded = tokio::task::spawn_blocking(move || Model::load(&dir, device)).await.expect("model loading task");
        match loaded {
            Ok(model) => {
                self.scoring.swap(model).await.map_err(|e| crate::model::ModelError::Invalid {
                    version: version.clone(),
                    reason: e.to_string(),
                })?;
                tracing::info!(version, previous = ?self.serving, "swapped in a new model version");
                self.serving = Some(version);
                Ok(true)
            }
            Err(e) => {
                metrics::counter!(metric::MODEL_LOAD_FAILURES, "reason" => "invalid").increment(1);
                tracing::error!(version, error = %e, "rejected model version; the current model keeps serving");
                self.rejected.insert(version);
                Err(e.into())
            }
        }
    }

    /// Retries with back-off (1 s doubling to 30 s) until a model serves, or shutdown.
    pub async fn load_initial(&mut self, shutdown: &CancellationToken) -> bool {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.check().await {
                Ok(_) if self.serving.is_some() => return true,
                Ok(_) => {}
                Err(e) => {
                    metrics::counter!(metric::MODEL_LOAD_FAILURES, "reason" => "unavailable").increment(1);
                    tracing::warn!(store = %self.config.store, error = %e, retry_in = ?backoff, "no model to serve yet");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Polls until shutdown. Errors (store down, bad version) are logged; the current model keeps serving.
    pub async fn watch(mut self, shutdown: CancellationToken) {
        if self.config.pinned_version.is_some() {
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
            if let Err(e) = self.check().await {
                if !matches!(e, crate::Error::Model(_)) {
                    metrics::counter!(metric::MODEL_LOAD_FAILURES, "reason" => "unavailable").increment(1);
                    tracing::warn!(store = %self.config.store, error = %e, "model poll failed; the current model keeps serving");
                }
            }
        }
    }
}
