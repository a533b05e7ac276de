//! Training fraud classifiers with tch: an MLP (the model we ship) and a
//! logistic regression (the baseline every report compares against), both
//! on the shared 28-feature encoding.
//!
//! The amount feature is min-max scaled as the serving signature demands,
//! which leaves most amounts squeezed near 0; the network therefore starts
//! with a fixed layer that takes log1p of the amount and standardises it.
//! The layer is part of the exported TorchScript graph, so serving sees the
//! original 28 features and nothing can drift.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{CModule, Device, Kind, Reduction, Tensor};

use crate::training::evaluate;
use crate::training::{Result, TrainingError};

/// The two model shapes we train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// 28 -> 64 -> 32 -> 2, ReLU.
    Mlp,
    /// 28 -> 2: logistic regression (softmax over two classes).
    Logistic,
}

/// Hyper-parameters; the defaults were tuned on the simulator at full size.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub max_epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Epochs without a better validation AP before stopping.
    pub patience: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self { max_epochs: 30, batch_size: 1024, learning_rate: 3e-3, patience: 4, seed: 42 }
    }
}

/// The fixed input layer's constants (see the module comment).
#[derive(Debug, Clone, Copy)]
struct AmountScaling {
    range: f64,
    mean: f64,
    std: f64,
}

/// A trained (or training) classifier: weights plus the fixed input layer.
pub struct Classifier {
    vs: nn::VarStore,
    net: nn::Sequential,
    scaling: AmountScaling,
    width: usize,
}

/// Per-epoch history, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub validation_ap: f64,
}

impl Classifier {
    fn new(arch: Architecture, width: usize, scaling: AmountScaling, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        // nn::linear initialises weights Kaiming-uniform, suited to ReLU.
        let net = match arch {
            Architecture::Mlp => nn::seq()
                .add(nn::linear(&root / "fc1", width as i64, 64, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::linear(&root / "fc2", 64, 32, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::linear(&root / "out", 32, 2, Default::default())),
            Architecture::Logistic => nn::seq().add(nn::linear(&root / "out", width as i64, 2, Default::default())),
        };
        Self { vs, net, scaling, width }
    }

    /// Replaces the min-max-scaled amount (column 0) with its standardised log.
    fn prepare(&self, x: &Tensor) -> Tensor {
        let amount = x.narrow(1, 0, 1);
        let rest = x.narrow(1, 1, self.width as i64 - 1);
        let amount = ((amount * self.scaling.range).clamp_min(0.0).log1p() - self.scaling.mean) / self.scaling.std;
        Tensor::cat(&[amount, rest], 1)
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        self.net.forward(&self.prepare(x))
    }

    /// `classification`: [P(legit), P(fraud)] per row.
    fn probabilities(&self, x: &Tensor) -> Tensor {
        self.logits(x).softmax(-1, Kind::Float)
    }

    /// P(fraud) for every row of `features` (row-major).
    pub fn score(&self, features: &[f32]) -> Vec<f32> {
        let device = self.vs.device();
        let mut out = Vec::with_capacity(features.len() / self.width);
        for chunk in features.chunks(65_536 * self.width) {
            let rows = (chunk.len() / self.width) as i64;
            let x = Tensor::from_slice(chunk).view([rows, self.width as i64]).to_device(device);
            let p = tch::no_grad(|| self.probabilities(&x)).select(1, 1).to_device(Device::Cpu);
            out.extend(Vec::<f32>::try_from(p).expect("float scores"));
        }
        out
    }

    /// Freezes the weights and writes a TorchScript module with the serving
    /// signature: `payments` float [-1, width] -> `classification` float [-1, 2].
    /// The module is traced on the CPU so it loads on any device.
    pub fn export(&mut self, path: &std::path::Path) -> Result<()> {
        self.vs.freeze();
        self.vs.set_device(Device::Cpu);
        let example = Tensor::zeros([3, self.width as i64], (Kind::Float, Device::Cpu));
        let module = CModule::create_by_tracing("FraudModel", "forward", &[example], &mut |inputs| {
            vec![self.probabilities(&inputs[0])]
        })
        .map_err(|error| TrainingError::Torch { step: "tracing the model to TorchScript".into(), error })?;
        module.save(path).map_err(|error| TrainingError::Torch {
            step: format!("saving TorchScript to {}", path.display()),
            error,
        })?;
        Ok(())
    }

    fn snapshot(&self) -> Vec<(String, Tensor)> {
        self.vs.variables().into_iter().map(|(name, t)| (name, t.detach().copy())).collect()
    }

    fn restore(&mut self, snapshot: &[(String, Tensor)]) {
        let variables = self.vs.variables();
        tch::no_grad(|| {
            for (name, saved) in snapshot {
                let mut var = variables[name].shallow_clone();
                var.copy_(saved);
            }
        });
    }
}

/// Trains `arch` on `train`, early-stopping on validation average precision,
/// and returns the best classifier seen. `on_epoch` reports progress.
pub fn train(
    arch: Architecture,
    train: (&[f32], &[bool]),
    validation: (&[f32], &[bool]),
    width: usize,
    config: &TrainConfig,
    device: Device,
    mut on_epoch: impl FnMut(&EpochLog),
) -> Result<(Classifier, Vec<EpochLog>)> {
    tch::manual_seed(config.seed as i64);
    let (features, labels) = train;
    let rows = labels.len();
    if rows == 0 || features.len() != rows * width {
        return Err(TrainingError::Invalid("the training set is empty or misshapen".into()));
    }

    // Constants of the fixed input layer, from the training set only.
    let scaling = scaling_for(features, width);
    let mut model = Classifier::new(arch, width, scaling, device);

    let x = Tensor::from_slice(features).view([rows as i64, width as i64]).to_device(device);
    let y = Tensor::from_slice(&labels.iter().map(|l| i64::from(*l)).collect::<Vec<_>>()).to_device(device);
    let positives = labels.iter().filter(|l| **l).count().max(1) as f64;
    // Weighted loss against the ~1:80 imbalance; the square root keeps
    // precision from collapsing while still lifting the rare class.
    let fraud_weight = ((rows as f64 - positives) / positives).sqrt();
    let class_weights = Tensor::from_slice(&[1.0f32, fraud_weight as f32]).to_device(device);
    let mut optimizer = nn::Adam::default()
        .build(&model.vs, config.learning_rate)
        .map_err(|error| TrainingError::Torch { step: "creating the optimizer".into(), error })?;

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<i64> = (0..rows as i64).collect();
    let mut history = Vec::new();
    let mut best: Option<(f64, Vec<(String, Tensor)>)> = None;
    let mut since_best = 0;
    for epoch in 1..=config.max_epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let mut batches = 0;
        for batch in order.chunks(config.batch_size) {
            let index = Tensor::from_slice(batch).to_device(device);
            let xb = x.index_select(0, &index);
            let yb = y.index_select(0, &index);
            let loss =
                model.logits(&xb).cross_entropy_loss::<&Tensor>(&yb, Some(&class_weights), Reduction::Mean, -100, 0.0);
            optimizer.backward_step(&loss);
            loss_sum += loss.double_value(&[]);
            batches += 1;
        }
        let scores = model.score(validation.0);
        let validation_ap = evaluate::average_precision(
            &evaluate::sweep(&scores, validation.1),
            validation.1.iter().filter(|l| **l).count() as u64,
        );
        let log = EpochLog { epoch, loss: loss_sum / batches as f64, validation_ap };
        on_epoch(&log);
        history.push(log);
        if best.as_ref().is_none_or(|(ap, _)| validation_ap > *ap) {
            best = Some((validation_ap, model.snapshot()));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= config.patience {
                break;
            }
        }
    }
    if let Some((_, snapshot)) = best {
        model.restore(&snapshot);
    }
    Ok((model, history))
}

/// Fixed input-layer constants from the training features.
fn scaling_for(features: &[f32], width: usize) -> AmountScaling {
    // The amount column is (amount - min) / (max - min); scaling it back by a
    // large constant before log1p spreads the typical amounts out. 10,000
    // makes a one-euro step visible at BankSim's range of ~8,000 euros.
    let range = 10_000.0;
    let logs: Vec<f64> = features.iter().step_by(width).map(|a| (f64::from(*a) * range).max(0.0).ln_1p()).collect();
    let n = logs.len().max(1) as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let std = (logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt().max(1e-6);
    AmountScaling { range, mean, std }
}
