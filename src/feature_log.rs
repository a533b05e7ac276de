//! The feature log: the exact row the serving model scored each stream
//! payment on, one JSON line per payment, appended to a file
//! (`fraudstream score --feature-log`).
//!
//! Why: with history features, what a payment was scored on depends on the
//! stream before it. The log is what an audit of a decision, or a check for
//! training/serving skew, compares against the trainer's offline features
//! (the parity test does exactly that). It is a diagnostic beside the
//! output, not an output: a failed write is logged, never the batch's failure.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::history::Position;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeatureLine {
    pub payment_id: String,
    pub partition: i32,
    pub offset: i64,
    pub model_version: String,
    pub features: Vec<f32>,
}

/// An open feature log.
pub struct FeatureLog {
    path: PathBuf,
    out: BufWriter<File>,
    failed: bool,
}

impl FeatureLog {
    /// Opens `path` for appending (a restarted scorer adds to it).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { path: path.to_path_buf(), out: BufWriter::new(file), failed: false })
    }

    /// Appends one payment's row.
    pub fn write(&mut self, payment_id: &str, at: Position, model_version: &str, features: &[f32]) {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Line<'a> {
            payment_id: &'a str,
            partition: i32,
            offset: i64,
            model_version: &'a str,
            features: &'a [f32],
        }
        let line = Line { payment_id, partition: at.partition, offset: at.offset, model_version, features };
        let written = serde_json::to_writer(&mut self.out, &line).map_err(std::io::Error::from);
        let written = written.and_then(|()| self.out.write_all(b"\n"));
        self.check(written);
    }

    /// Writes what is buffered (after each batch).
    pub fn flush(&mut self) {
        let flushed = self.out.flush();
        self.check(flushed);
    }

    fn check(&mut self, result: std::io::Result<()>) {
        if let Err(error) = result {
            if !self.failed {
                tracing::warn!(path = %self.path.display(), %error, "cannot write the feature log; scoring goes on");
            }
            self.failed = true;
        }
    }
}
