//! Models: where they are kept (`ModelStore`), what describes them
//! (`ModelManifest`, the `model.json` beside each `model.pt`), and how they
//! run (`Model`, a TorchScript module on CPU or CUDA).
//!
//! A model version is a folder `versions/<unix-seconds>/` holding `model.pt`,
//! the report, and `model.json`, written last: a folder without a manifest is
//! incomplete and ignored. Versions are immutable.

mod store;
mod torch;

use serde::{Deserialize, Serialize};

pub use store::{s3_client, ModelStore, StoreError, VersionFiles};
pub use torch::{device_name, Device, Model, ModelError};

use crate::features::FeatureSpec;

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
    /// Decision threshold on P(fraud), chosen on validation data.
    pub threshold: f64,
    /// Evaluation results (holdout and validation), as the trainer reports them.
    pub metrics: serde_json::Value,
    pub training_data: TrainingDataSummary,
    pub trainer_version: String,
    /// Device the model was trained on (`cpu`, `cuda:0`).
    pub device: String,
    pub training_seconds: f64,
}
