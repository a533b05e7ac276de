//! Models: where they are kept (`ModelStore`), what describes them
//! (`ModelManifest`, the `model.json` beside each `model.pt`), and how they
//! run (`Model`, a TorchScript module on CPU or CUDA).
//!
//! A model version is a folder `versions/<unix-seconds>/` holding `model.pt`,
//! the report, and `model.json`, written last: a folder without a manifest is
//! incomplete and ignored. Versions are immutable.

mod labels;
mod store;
mod torch;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use labels::{previous as rollback_target, Label, LabelMove};
pub use store::{s3_client, ModelStore, S3Url, StoreError, VersionFiles};
pub use torch::{device_name, Device, Model, ModelError};

use crate::decision::DecisionBands;
use crate::drift::DriftReference;
use crate::features::FeatureSpec;

/// A model version: the unix seconds of its publication, as its folder
/// `versions/<v>/` is named. Parsed here and nowhere else; manifests and
/// outputs carry its text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelVersion(pub u64);

impl ModelVersion {
    /// The version a folder name or a manifest names, if it is one.
    pub fn parse(text: &str) -> Option<Self> {
        text.parse().ok().map(Self)
    }

    /// The version after this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl std::fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// File name of the TorchScript module in a version folder.
pub const MODEL_FILE: &str = "model.pt";
/// File name of the manifest in a version folder; written last.
pub const MANIFEST_FILE: &str = "model.json";
/// The serving signature kept from the original TensorFlow demo.
pub const INPUT_NAME: &str = "payments";
pub const OUTPUT_NAME: &str = "classification";

/// What the labelled data a model was trained on looked like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingDataSummary {
    /// Where it came from (a path, `s3://...`, or `simulator(rows, seed)`).
    pub source: String,
    pub rows: u64,
    pub frauds: u64,
    /// SHA-256 over the encoded features and labels, to tell data sets apart.
    pub sha256: String,
}

/// `model.json`: everything a scorer needs besides the weights, and what a
/// person needs to trust them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub name: String,
    pub version: String,
    /// Publication time, milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Input tensor name and width: `payments`, float [-1, width].
    pub input: String,
    /// Output tensor name: `classification`, float [-1, 2] = [P(legit), P(fraud)].
    pub output: String,
    pub feature_spec: FeatureSpec,
    /// Decision threshold on P(fraud), chosen on validation data (`isFraud`).
    pub threshold: f64,
    /// Review and block thresholds, chosen on validation data. Versions
    /// published before them have none: both bands then start at `threshold`.
    #[serde(default)]
    pub decision_bands: Option<DecisionBands>,
    /// Every feature's training reference (the training rows' mean), which
    /// reason codes replace one group at a time. Empty in versions published
    /// before reasons: those give none.
    #[serde(default)]
    pub feature_reference: Vec<f32>,
    /// The training data's feature distributions and the holdout's score
    /// distribution, which scorers compare live traffic with (PSI). `None`
    /// in versions published before drift references: those get no PSI.
    #[serde(default)]
    pub drift_reference: Option<DriftReference>,
    /// Evaluation results (holdout and validation), as the trainer reports them.
    pub metrics: serde_json::Value,
    pub training_data: TrainingDataSummary,
    pub trainer_version: String,
    /// Device the model was trained on (`cpu`, `cuda:0`).
    pub device: String,
    pub training_seconds: f64,
    /// SHA-256 (hex) of every other file of the version, filled in by
    /// `ModelStore::publish`. A scorer rejects a version whose files do not
    /// match: a damaged upload, or two publishers that mixed their files.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

/// SHA-256 of `bytes`, in hex, as manifests record it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// How long loading and warming up a version may take by default.
pub const DEFAULT_LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Loads, verifies and warms up the version in `dir` off the async runtime.
/// A load that panics or takes longer than `timeout` is an error for this
/// version only (a hung load's thread is left behind; it holds no lock).
pub async fn load_guarded(
    dir: std::path::PathBuf,
    device: tch::Device,
    timeout: std::time::Duration,
) -> Result<Model, ModelError> {
    let version = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let invalid = |reason: String| ModelError::Invalid { version: version.clone(), reason };
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(move || Model::load(&dir, device))).await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(join)) => Err(invalid(format!("loading panicked: {join}"))),
        Err(_) => Err(invalid(format!("loading and warming up took longer than {timeout:?}"))),
    }
}

impl ModelManifest {
    /// The decision bands, or both at `threshold` for versions without them.
    pub fn bands(&self) -> DecisionBands {
        self.decision_bands.unwrap_or_else(|| DecisionBands::at_threshold(self.threshold))
    }

    /// What a scorer checks before it loads a version from `dir`: the
    /// threshold is a probability, and `model.pt` is the file the manifest
    /// was published with.
    pub fn verify(&self, dir: &Path) -> Result<(), ModelError> {
        let invalid = |reason: String| ModelError::Invalid { version: self.version.clone(), reason };
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(invalid(format!("threshold {} is not a probability in [0, 1]", self.threshold)));
        }
        if let Some(bands) = &self.decision_bands {
            bands.check().map_err(invalid)?;
        }
        if !self.feature_reference.is_empty() && self.feature_reference.len() != self.feature_spec.width() {
            return Err(invalid(format!(
                "feature_reference has {} values for {} features",
                self.feature_reference.len(),
                self.feature_spec.width()
            )));
        }
        if let Some(reference) = &self.drift_reference {
            reference.check().map_err(invalid)?;
        }
        let Some(expected) = self.files.get(MODEL_FILE) else {
            return Err(invalid(format!(
                "{MANIFEST_FILE} lists no sha256 for {MODEL_FILE}; republish the version with this trainer"
            )));
        };
        let path = dir.join(MODEL_FILE);
        let bytes = std::fs::read(&path)
            .map_err(|e| ModelError::Manifest { path: path.display().to_string(), reason: e.to_string() })?;
        let actual = sha256_hex(&bytes);
        if actual != *expected {
            return Err(invalid(format!(
                "{MODEL_FILE} has sha256 {actual}, but {MANIFEST_FILE} says {expected}: the files of this \
                 version do not belong together (a damaged upload, or two trainers publishing the same \
                 version); publish a new version"
            )));
        }
        Ok(())
    }
}
