//! `Model`: a TorchScript fraud model with its manifest and feature encoder,
//! loaded on CPU or CUDA, validated and warmed up before it takes traffic.

use std::path::Path;

use super::{ModelManifest, MANIFEST_FILE, MODEL_FILE};
use crate::features::FeatureEncoder;
use crate::payment::Payment;

/// Where to run a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA if a GPU is visible, else CPU.
    Auto,
    Cpu,
    Cuda,
}

impl crate::choice::Choice for Device {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Auto, "auto", "CUDA if a GPU is visible, else CPU"),
        (Self::Cpu, "cpu", "the CPU"),
        (Self::Cuda, "cuda", "the first CUDA device; fails if there is none"),
    ];
}

impl Device {
    /// The torch device; `Cuda` fails clearly when no GPU is usable.
    pub fn resolve(self) -> Result<tch::Device, ModelError> {
        match self {
            Device::Cpu => Ok(tch::Device::Cpu),
            Device::Auto => Ok(tch::Device::cuda_if_available()),
            Device::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
            Device::Cuda => Err(ModelError::NoCuda),
        }
    }
}

/// Name of a torch device as manifests and logs write it.
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("--device cuda asked for, but no CUDA device is usable (is this a GPU host, and was fraudstream built with `make LIBTORCH_VARIANT=cuda`?)")]
    NoCuda,
    #[error("cannot load TorchScript model {path}: {source}")]
    Load { path: String, source: tch::TchError },
    #[error("cannot read model manifest {path}: {reason}")]
    Manifest { path: String, reason: String },
    #[error("model {version}: forward pass failed: {source}")]
    Forward { version: String, source: tch::TchError },
    #[error("model {version} failed validation: {reason}")]
    Invalid { version: String, reason: String },
}

/// A loaded, validated model, ready to score.
pub struct Model {
    module: tch::CModule,
    device: tch::Device,
    manifest: ModelManifest,
    encoder: FeatureEncoder,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("version", &self.manifest.version).field("device", &self.device).finish()
    }
}

impl Model {
    /// Loads `model.pt` and `model.json` from a version folder, then validates
    /// and warms the model up (the first forward calls are slow).
    /// The manifest must vouch for the files (`ModelManifest::verify`).
    pub fn load(dir: &Path, device: tch::Device) -> Result<Self, ModelError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_text = std::fs::read(&manifest_path)
            .map_err(|e| ModelError::Manifest { path: manifest_path.display().to_string(), reason: e.to_string() })?;
        let manifest: ModelManifest = serde_json::from_slice(&manifest_text)
            .map_err(|e| ModelError::Manifest { path: manifest_path.display().to_string(), reason: e.to_string() })?;
        manifest.verify(dir)?;
        Self::from_module_file(&dir.join(MODEL_FILE), manifest, device)
    }

    /// Loads a TorchScript file with a manifest held in memory.
    pub fn from_module_file(path: &Path, manifest: ModelManifest, device: tch::Device) -> Result<Self, ModelError> {
        let mut module = tch::CModule::load_on_device(path, device)
            .map_err(|source| ModelError::Load { path: path.display().to_string(), source })?;
        module.set_eval();
        let encoder = FeatureEncoder::new(manifest.feature_spec.clone());
        let model = Self { module, device, manifest, encoder };
        model.validate()?;
        Ok(model)
    }

    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    pub fn encoder(&self) -> &FeatureEncoder {
        &self.encoder
    }

    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// Runs the model on `rows` feature rows (row-major, `width` floats each)
    /// and returns the `classification` output: [P(legit), P(fraud)] per row.
    pub fn predict(&self, features: &[f32], rows: usize) -> Result<Vec<[f32; 2]>, ModelError> {
        let width = self.encoder.width();
        assert_eq!(features.len(), rows * width, "feature buffer does not hold {rows} rows of {width}");
        if rows == 0 {
            return Ok(Vec::new());
        }
        let forward = || -> Result<Vec<f32>, tch::TchError> {
            // The fallible (f_) forms: a failure on the device (CUDA out of
            // memory, say) is an error for this batch, not a panic.
            let input =
                tch::Tensor::from_slice(features).f_view([rows as i64, width as i64])?.f_to_device(self.device)?;
            let output = tch::no_grad(|| self.module.forward_ts(&[input]))?;
            let output = output.f_to_device(tch::Device::Cpu)?.f_to_kind(tch::Kind::Float)?.f_contiguous()?;
            if output.size() != [rows as i64, 2] {
                return Err(tch::TchError::Shape(format!("expected output [{rows}, 2], got {:?}", output.size())));
            }
            Vec::<f32>::try_from(output.view([-1]))
        };
        let flat = forward().map_err(|source| ModelError::Forward { version: self.version().into(), source })?;
        Ok(flat.chunks_exact(2).map(|c| [c[0], c[1]]).collect())
    }

    /// P(fraud) for each row.
    pub fn fraud_probabilities(&self, features: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        Ok(self.predict(features, rows)?.into_iter().map(|p| p[1]).collect())
    }

    /// Scores payments directly (encoding them first); for tools and tests.
    /// With history features, `payments` are their own history (a whole stream).
    pub fn score_payments(&self, payments: &[Payment]) -> Result<Vec<f32>, crate::Error> {
        let mut features = Vec::with_capacity(payments.len() * self.encoder.width());
        self.encoder.encode_all(payments, &mut features)?;
        Ok(self.fraud_probabilities(&features, payments.len())?)
    }

    /// Scores payments with their customer features given (`history::offline`
    /// over a longer stream); ignored by a model without history features.
    pub fn score_payments_with(
        &self,
        payments: &[Payment],
        history: &[crate::history::CustomerFeatures],
    ) -> Result<Vec<f32>, crate::Error> {
        let mut features = Vec::with_capacity(payments.len() * self.encoder.width());
        self.encoder.encode_all_with(payments, Some(history), &mut features)?;
        Ok(self.fraud_probabilities(&features, payments.len())?)
    }

    /// A golden batch through the model: right shape, finite probabilities
    /// that sum to 1. Also warms the module up.
    fn validate(&self) -> Result<(), ModelError> {
        let invalid = |reason: String| ModelError::Invalid { version: self.version().into(), reason };
        let spec = self.encoder.spec();
        let want = 28 + if spec.history.is_some() { crate::features::HISTORY_WIDTH } else { 0 };
        if self.encoder.width() != want {
            return Err(invalid(format!(
                "feature spec has width {}, the serving signature needs {want}",
                self.encoder.width()
            )));
        }
        if let Some(history) = spec.history.as_ref().filter(|h| h.version != crate::features::HISTORY_VERSION) {
            return Err(invalid(format!(
                "it was trained on customer history features of definition {}, this scorer computes definition {}: \
                 run a scorer of the trainer's release, or retrain with this one",
                history.version,
                crate::features::HISTORY_VERSION
            )));
        }
        let golden: Vec<Payment> = crate::simulate::Simulator::new(64, 1).collect();
        let mut features = Vec::new();
        self.encoder.encode_all(&golden, &mut features).map_err(|e| invalid(e.to_string()))?;
        for _ in 0..3 {
            let out = self.predict(&features, golden.len())?;
            if let Some(bad) = out.iter().find(|p| !p.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x))) {
                return Err(invalid(format!("output {bad:?} is not a pair of probabilities")));
            }
            if let Some(bad) = out.iter().find(|p| (p[0] + p[1] - 1.0).abs() > 1e-3) {
                return Err(invalid(format!("output {bad:?} does not sum to 1 (softmax expected)")));
            }
        }
        Ok(())
    }
}
