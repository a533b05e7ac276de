//! `ModelWatcher`: keeps the scoring service on the version the store's
//! `stable` label names (or, in a store without labels, the newest valid
//! one) without a restart, following the label backwards as well as forwards.
//!
//! At start it serves the newest version that loads, skipping (and saying
//! so) newer ones that do not, and retries with back-off while the store is
//! down or holds nothing valid. Afterwards it polls every interval with one
//! LIST call, and fetches, verifies, loads, validates and warms a newer
//! version off the scoring path before swapping it in. A version that fails
//! (a hash mismatch, a bad manifest, a load that panics or hangs, a failed
//! validation) is reported (log + metric), remembered and never tried again;
//! the current model keeps serving.
//!
//! With a shadow label (`--shadow canary`) it also keeps the version that
//! label names loaded beside the serving one, following the label's moves at
//! the same polls. The shadow is optional: a label that is unset, names the
//! serving version, or names a version that fails (skipped like any other,
//! with the same log and metric) means no shadow, and nothing about the
//! shadow ever stops the serving model from serving.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::model::{load_guarded, Label, ModelStore, ModelVersion, DEFAULT_LOAD_TIMEOUT, MODEL_FILE};
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
    /// Longest a version may take to load and warm up before it is rejected.
    pub load_timeout: Duration,
    /// Load the version this label names as the shadow model (`--shadow`).
    pub shadow: Option<Label>,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            store: "models".into(),
            pinned_version: None,
            poll_interval: Duration::from_secs(30),
            device: tch::Device::Cpu,
            cache_dir: std::env::temp_dir().join(format!("fraudstream-models-{}", std::process::id())),
            load_timeout: DEFAULT_LOAD_TIMEOUT,
            shadow: None,
        }
    }
}

pub struct ModelWatcher {
    config: WatchConfig,
    store: Option<ModelStore>,
    scoring: ScoringService,
    serving: Option<String>,
    /// The shadow version loaded beside the serving one.
    shadow: Option<String>,
    rejected: HashSet<String>,
}

fn number(version: &str) -> ModelVersion {
    ModelVersion::parse(version).unwrap_or(ModelVersion(0))
}

impl ModelWatcher {
    pub fn new(config: WatchConfig, scoring: ScoringService) -> Self {
        Self { config, store: None, scoring, serving: None, shadow: None, rejected: HashSet::new() }
    }

    async fn store(&mut self) -> Result<&ModelStore, crate::model::StoreError> {
        if self.store.is_none() {
            self.store = Some(ModelStore::open(&self.config.store).await?);
        }
        Ok(self.store.as_ref().expect("just opened"))
    }

    /// The versions worth trying, best first: the pinned one; else the one
    /// the `stable` label names, older or newer than the serving one (a
    /// rollback or a promotion), unless it was rejected (then, if nothing
    /// serves yet, the versions `stable` named before); else (no label) every
    /// version newer than the serving one that was not rejected before.
    async fn candidates(&mut self) -> Result<Vec<String>, crate::Error> {
        if self.config.pinned_version.is_none() {
            let stable = self.store().await?.label(Label::Stable).await?;
            self.scoring.set_label(Label::Stable, stable.clone());
            if let Some(stable) = stable {
                if self.serving.as_ref() == Some(&stable) {
                    return Ok(Vec::new());
                }
                if !self.rejected.contains(&stable) {
                    return Ok(vec![stable]);
                }
                if self.serving.is_some() {
                    return Ok(Vec::new()); // the label names a broken version: keep serving
                }
                // Nothing serves and stable is broken: where stable was
                // before, newest first (never the newest version as such,
                // which may be a canary that lost the champion gate).
                let history = self.store().await?.label_history(Label::Stable).await?;
                let mut earlier: Vec<String> = Vec::new();
                for moved in history.into_iter().rev() {
                    if !self.rejected.contains(&moved.version) && !earlier.contains(&moved.version) {
                        earlier.push(moved.version);
                    }
                }
                return Ok(earlier);
            }
        }
        self.unlabelled_candidates().await
    }

    async fn unlabelled_candidates(&mut self) -> Result<Vec<String>, crate::Error> {
        if let Some(pinned) = &self.config.pinned_version {
            let pinned = pinned.clone();
            return Ok(if self.serving.as_ref() == Some(&pinned) || self.rejected.contains(&pinned) {
                Vec::new()
            } else {
                vec![pinned]
            });
        }
        let versions = self.store().await?.list_versions().await?;
        if versions.is_empty() {
            return Err(crate::model::StoreError::Empty(self.config.store.clone()).into());
        }
        let floor = self.serving.as_deref().map_or(ModelVersion(0), number);
        Ok(versions.into_iter().rev().filter(|v| number(v) > floor && !self.rejected.contains(v)).collect())
    }

    /// Looks once for a newer valid version and swaps it in; newer versions
    /// that fail are rejected on the way. Then brings the shadow model in
    /// line with its label. Returns whether a swap happened.
    pub async fn check(&mut self) -> Result<bool, crate::Error> {
        let swapped = self.check_serving().await?;
        if self.serving.is_some() {
            self.check_shadow().await;
        }
        Ok(swapped)
    }

    async fn check_serving(&mut self) -> Result<bool, crate::Error> {
        for version in self.candidates().await? {
            match self.try_version(&version).await {
                Ok(()) => return Ok(true),
                Err(crate::Error::Model(e)) => self.reject(version, &e),
                // The store itself failed: try again at the next poll.
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// A version that failed to fetch, verify, load or validate: logged,
    /// counted and never tried again.
    fn reject(&mut self, version: String, error: &crate::model::ModelError) {
        metrics::counter!(metric::MODEL_LOAD_FAILURES, "reason" => "invalid").increment(1);
        tracing::error!(
            version,
            error = %error,
            serving = ?self.serving,
            "rejected model version; it will not be tried again"
        );
        self.rejected.insert(version);
    }

    /// Loads the version the shadow label names as the shadow model, or
    /// unloads the shadow when that label is unset, names the serving
    /// version or a rejected one. A store that cannot be read leaves the
    /// shadow as it is until the next poll.
    async fn check_shadow(&mut self) {
        let Some(label) = self.config.shadow else { return };
        let named = match self.store().await {
            Ok(store) => store.label(label).await,
            Err(e) => Err(e),
        };
        let named = match named {
            Ok(named) => named,
            Err(e) => {
                metrics::counter!(metric::MODEL_LOAD_FAILURES, "reason" => "unavailable").increment(1);
                tracing::warn!(
                    label = crate::choice::Choice::name(label),
                    error = %e,
                    shadow = ?self.shadow,
                    "cannot read the shadow label; the shadow stays as it is"
                );
                return;
            }
        };
        self.scoring.set_label(label, named.clone());
        let wanted = named.filter(|v| Some(v) != self.serving.as_ref() && !self.rejected.contains(v));
        if wanted == self.shadow {
            return;
        }
        let Some(version) = wanted else {
            self.set_shadow(None, None).await;
            return;
        };
        match self.load(&version).await {
            Ok(model) => self.set_shadow(Some(model), Some(version)).await,
            Err(crate::Error::Model(e)) => {
                self.reject(version, &e);
                self.set_shadow(None, None).await;
            }
            Err(e) => {
                metrics::counter!(metric::MODEL_LOAD_FAILURES, "reason" => "unavailable").increment(1);
                tracing::warn!(
                    version,
                    error = %e,
                    shadow = ?self.shadow,
                    "cannot fetch the shadow version; the shadow stays as it is"
                );
            }
        }
    }

    async fn set_shadow(&mut self, model: Option<crate::model::Model>, version: Option<String>) {
        if self.scoring.set_shadow(model).await.is_ok() {
            tracing::info!(shadow = ?version, previous = ?self.shadow, serving = ?self.serving, "shadow model changed");
            self.shadow = version;
        }
    }

    /// Fetches, verifies, loads and warms up `version`, then swaps it in.
    async fn try_version(&mut self, version: &str) -> Result<(), crate::Error> {
        let model = self.load(version).await?;
        self.scoring
            .swap(model)
            .await
            .map_err(|e| crate::model::ModelError::Invalid { version: version.into(), reason: e.to_string() })?;
        tracing::info!(version, previous = ?self.serving, skipped = ?self.rejected, "swapped in a new model version");
        self.serving = Some(version.to_string());
        Ok(())
    }

    /// Fetches, verifies, loads and warms up `version`.
    async fn load(&mut self, version: &str) -> Result<crate::model::Model, crate::Error> {
        let cache_dir = self.config.cache_dir.clone();
        let files = self.store().await?.fetch(version, &[MODEL_FILE], &cache_dir).await.map_err(|e| match e {
            // A manifest in the wrong folder is the version's fault, not the store's.
            crate::model::StoreError::MisplacedManifest { .. } | crate::model::StoreError::BadManifest { .. } => {
                crate::Error::Model(crate::model::ModelError::Invalid {
                    version: version.into(),
                    reason: e.to_string(),
                })
            }
            e => e.into(),
        })?;
        Ok(load_guarded(files.dir, self.config.device, self.config.load_timeout).await?)
    }

    /// Retries with back-off (1 s doubling to 30 s) until a model serves, or shutdown.
    pub async fn load_initial(&mut self, shutdown: &CancellationToken) -> bool {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.check().await {
                Ok(_) if self.serving.is_some() => return true,
                Ok(_) => {
                    metrics::counter!(metric::MODEL_LOAD_FAILURES, "reason" => "unavailable").increment(1);
                    tracing::warn!(
                        store = %self.config.store,
                        rejected = ?self.rejected,
                        retry_in = ?backoff,
                        "no model to serve yet: no version in the store loads"
                    );
                }
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
        if self.config.pinned_version.is_some() && self.config.shadow.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
            if let Err(e) = self.check().await {
                metrics::counter!(metric::MODEL_LOAD_FAILURES, "reason" => "unavailable").increment(1);
                tracing::warn!(store = %self.config.store, error = %e, "model poll failed; the current model keeps serving");
            }
        }
    }
}
