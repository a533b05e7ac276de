//! Labelled payments for training, from where they are: BankSim CSV and
//! Parquet files (local, or on S3: `files`), a Kafka topic of labelled
//! scored payments (`topic`), or the simulator; split by event time into
//! train, validation and holdout, so the holdout measures the future.

use std::sync::Arc;

use crate::payment::STEP_MS;
use crate::{Payment, Simulator};
use sha2::{Digest, Sha256};

use super::topic::LabelledTopic;
use super::{Result, TrainingError};

/// Where the labelled data comes from.
#[derive(Debug, Clone)]
pub enum DataSource {
    /// A BankSim CSV or Parquet file, or every `*.csv` and `*.parquet` file
    /// under a directory; local, or `s3://bucket/key.csv|.parquet` (one
    /// object) and `s3://bucket/prefix/` (every such object under it).
    Files(String),
    /// The labelled payments of a Kafka topic within a time window.
    Kafka(LabelledTopic),
    Simulator {
        rows: u64,
        seed: u64,
    },
    /// The simulator, drawing from the drifted regime B from payment `drift_after` on.
    DriftedSimulator {
        rows: u64,
        seed: u64,
        drift_after: u64,
    },
}

impl std::fmt::Display for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSource::Files(path) => write!(f, "{path}"),
            DataSource::Kafka(topic) => write!(f, "{topic}"),
            DataSource::Simulator { rows, seed } => write!(f, "simulator(rows={rows}, seed={seed})"),
            DataSource::DriftedSimulator { rows, seed, drift_after } => {
                write!(f, "simulator(rows={rows}, seed={seed}, drift_after={drift_after})")
            }
        }
    }
}

/// Reads every labelled payment. In files, a row without a label is an
/// error (a trainer cannot learn from it); on a topic, payments not labelled
/// yet are skipped and counted (see `topic`). Shows a progress spinner.
/// Nothing to train on is `TrainingError::NoPayments`.
pub async fn load(source: &DataSource) -> Result<Vec<Payment>> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} reading {msg}: {pos} rows").expect("template"));
    bar.set_message(source.to_string());
    let payments = match source {
        DataSource::Simulator { rows, seed } => {
            let sim = Simulator::new(*rows, *seed);
            sim.inspect(|_| bar.inc(1)).collect()
        }
        DataSource::DriftedSimulator { rows, seed, drift_after } => {
            let sim = Simulator::new(*rows, *seed).drift_after(*drift_after);
            sim.inspect(|_| bar.inc(1)).collect()
        }
        DataSource::Files(location) => super::files::load(location, &|| bar.inc(1)).await?,
        DataSource::Kafka(topic) => {
            let counter = bar.clone();
            super::topic::load(topic, Arc::new(move || counter.inc(1))).await?.0
        }
    };
    bar.finish_and_clear();
    if payments.is_empty() {
        return Err(TrainingError::NoPayments {
            location: source.to_string(),
            detail: "it holds no labelled payments".into(),
        });
    }
    Ok(payments)
}

/// The UTC day of a payment's event time: the unit the time split cuts at
/// (for BankSim rows, the step).
fn day(payment: &Payment) -> i64 {
    payment.event_time.div_euclid(STEP_MS)
}

/// Payments split by event time: the earliest `train` share, then `validation`, then the rest.
#[derive(Debug, Clone)]
pub struct TimeSplit {
    pub train: Vec<Payment>,
    pub validation: Vec<Payment>,
    pub holdout: Vec<Payment>,
}

impl TimeSplit {
    /// Splits at whole UTC days of event time (BankSim steps), so no day is
    /// in two sets. Fails if a set would be empty or hold no fraud (nothing to
    /// learn or measure).
    pub fn new(mut payments: Vec<Payment>, train_share: f64, validation_share: f64) -> Result<Self> {
        payments.sort_by_key(|p| p.event_time);
        let n = payments.len() as f64;
        let cut = |share: f64| {
            let target = (n * share) as usize;
            let day_at = payments.get(target).map_or(i64::MAX, day);
            payments.partition_point(|p| day(p) < day_at)
        };
        let (a, b) = (cut(train_share), cut(train_share + validation_share));
        let holdout = payments.split_off(b);
        let validation = payments.split_off(a);
        let split = Self { train: payments, validation, holdout };
        for (name, set) in [("train", &split.train), ("validation", &split.validation), ("holdout", &split.holdout)] {
            let frauds = set.iter().filter(|p| p.fraud == Some(true)).count();
            if set.is_empty() || frauds == 0 {
                return Err(TrainingError::Invalid(format!(
                    "the {name} set has {} payments and {frauds} frauds; the data is too small or spans too few days (of event time) to split by time",
                    set.len()
                )));
            }
        }
        Ok(split)
    }
}

/// Labels as booleans.
pub fn labels(payments: &[Payment]) -> Vec<bool> {
    payments.iter().map(|p| p.fraud == Some(true)).collect()
}

/// SHA-256 over every payment's event time, features and label, in order:
/// tells data sets apart (what a run read, in the order it read it).
pub fn content_hash(payments: &[Payment]) -> String {
    let mut hasher = Sha256::new();
    for p in payments {
        hasher.update(p.event_time.to_le_bytes());
        hasher.update(p.step.to_le_bytes());
        hasher.update(p.customer.as_bytes());
        hasher.update(p.age.as_bytes());
        hasher.update(p.gender.as_bytes());
        hasher.update(p.merchant.as_bytes());
        hasher.update(p.category.as_bytes());
        hasher.update(p.amount.to_le_bytes());
        hasher.update([u8::from(p.fraud == Some(true))]);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_by_time_and_covers_everything() {
        let payments: Vec<Payment> = Simulator::new(20_000, 5).collect();
        let split = TimeSplit::new(payments, 0.7, 0.15).unwrap();
        let total = split.train.len() + split.validation.len() + split.holdout.len();
        assert_eq!(total, 20_000);
        let last_train = split.train.iter().map(|p| p.step).max().unwrap();
        let first_val = split.validation.iter().map(|p| p.step).min().unwrap();
        let last_val = split.validation.iter().map(|p| p.step).max().unwrap();
        let first_hold = split.holdout.iter().map(|p| p.step).min().unwrap();
        assert!(last_train < first_val && last_val < first_hold);
        let share = split.train.len() as f64 / 20_000.0;
        assert!((0.65..0.75).contains(&share), "train share {share}");
    }

    #[test]
    fn too_little_data_is_a_clear_error() {
        let payments: Vec<Payment> = Simulator::new(30, 5).collect();
        let err = TimeSplit::new(payments, 0.7, 0.15).unwrap_err().to_string();
        assert!(err.contains("too small"), "{err}");
    }

    #[tokio::test]
    async fn a_drifted_simulator_source_says_so_and_drifts() {
        let source = DataSource::DriftedSimulator { rows: 4_000, seed: 5, drift_after: 1_000 };
        assert_eq!(source.to_string(), "simulator(rows=4000, seed=5, drift_after=1000)");
        let drifted = load(&source).await.unwrap();
        let plain = load(&DataSource::Simulator { rows: 4_000, seed: 5 }).await.unwrap();
        assert_eq!(drifted[..1_000], plain[..1_000]);
        assert_eq!(drifted[1_000..], Simulator::new(4_000, 5).drift_after(1_000).skip(1_000).collect::<Vec<_>>()[..]);
        assert_ne!(content_hash(&drifted), content_hash(&plain));
    }

    #[test]
    fn hash_changes_with_the_data() {
        let a: Vec<Payment> = Simulator::new(100, 1).collect();
        let b: Vec<Payment> = Simulator::new(100, 2).collect();
        assert_eq!(content_hash(&a), content_hash(&a.clone()));
        assert_ne!(content_hash(&a), content_hash(&b));
    }
}
