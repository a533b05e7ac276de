//! `fraudstream models`: what is in a model store and which version serves,
//! and the moves people make by hand (promote, rollback).
//!
//! Why a library module: the rules live here (a label never points at a
//! version that does not load and validate; a rollback goes to where
//! `stable` was before), the binary only prints.

use std::path::Path;

use crate::model::{
    load_guarded, rollback_target, Label, LabelMove, ModelManifest, ModelStore, StoreError, DEFAULT_LOAD_TIMEOUT,
    MODEL_FILE,
};

/// One version as `models list` shows it.
#[derive(Debug, Clone)]
pub struct VersionInfo {
    pub version: String,
    pub created_at: i64,
    /// Labels naming it.
    pub labels: Vec<Label>,
    pub manifest: ModelManifest,
}

impl VersionInfo {
    /// The holdout average precision and ROC-AUC the trainer recorded.
    pub fn holdout(&self) -> (f64, f64) {
        let model = &self.manifest.metrics["holdout"]["model"];
        let get = |k: &str| model[k].as_f64().unwrap_or(f64::NAN);
        (get("average_precision"), get("roc_auc"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "version {version} cannot carry a label: {source}; pick a version that loads (see `fraudstream models list`)"
    )]
    Invalid { version: String, source: crate::model::ModelError },
    #[error("`stable` has no earlier version to roll back to (its history: {0})")]
    NothingToRollBackTo(String),
}

/// Every complete version, oldest first, with its labels.
pub async fn list(store: &ModelStore, work: &Path) -> Result<Vec<VersionInfo>, LifecycleError> {
    let stable = store.label(Label::Stable).await?;
    let canary = store.label(Label::Canary).await?;
    let mut infos = Vec::new();
    for version in store.list_versions().await? {
        let files = store.fetch(&version, &[], work).await?;
        let labels = [(Label::Stable, &stable), (Label::Canary, &canary)]
            .into_iter()
            .filter(|(_, named)| named.as_deref() == Some(version.as_str()))
            .map(|(label, _)| label)
            .collect();
        infos.push(VersionInfo { created_at: files.manifest.created_at, version, labels, manifest: files.manifest });
    }
    Ok(infos)
}

/// Points `label` at `version` once it has loaded and validated as a scorer
/// would load it (hashes, manifest, warm-up on CPU).
pub async fn set_label(
    store: &ModelStore,
    label: Label,
    version: &str,
    work: &Path,
) -> Result<LabelMove, LifecycleError> {
    let invalid = |source| LifecycleError::Invalid { version: version.to_string(), source };
    let files = match store.fetch(version, &[MODEL_FILE], work).await {
        Ok(files) => files,
        Err(
            e @ (StoreError::NoSuchVersion(_) | StoreError::BadManifest { .. } | StoreError::MisplacedManifest { .. }),
        ) => {
            return Err(invalid(crate::model::ModelError::Invalid { version: version.into(), reason: e.to_string() }));
        }
        Err(e) => return Err(e.into()),
    };
    load_guarded(files.dir, tch::Device::Cpu, DEFAULT_LOAD_TIMEOUT).await.map_err(invalid)?;
    Ok(store.set_label(label, version).await?)
}

/// Moves `stable` back to where it was before its current version; (from, to).
pub async fn rollback(store: &ModelStore, work: &Path) -> Result<(String, String), LifecycleError> {
    let history = store.label_history(Label::Stable).await?;
    let Some(target) = rollback_target(&history) else {
        let versions: Vec<&str> = history.iter().map(|m| m.version.as_str()).collect();
        return Err(LifecycleError::NothingToRollBackTo(format!("{versions:?}")));
    };
    let from = history.last().map(|m| m.version.clone()).unwrap_or_default();
    let target = target.to_string();
    set_label(store, Label::Stable, &target, work).await?;
    Ok((from, target))
}
