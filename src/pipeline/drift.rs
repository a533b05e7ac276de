//! The drift monitor on the emitter task: counts every scored batch into the
//! serving version's drift window (`crate::drift`), and when a window fills
//! exports each group's PSI as `fraudstream_psi{group}` and warns about the
//! groups above the threshold.
//!
//! Why on the emitter: it sees every batch of the stream once, in order, on
//! one task, so the window needs no lock and the scoring thread (the one
//! stage that cannot be split) does no extra work. REST traffic is not
//! counted: it is whatever clients ask, not the population. A batch scored
//! by another version than the last one (a swap) starts a fresh window
//! against that version's reference; the gauges keep the last full window's
//! values until the next one fills.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::drift::{DriftConfig, DriftGroup, DriftWindow, PsiReport};
use crate::scoring::ScoredBatch;
use crate::telemetry::metric;

/// How often a group that stays above the threshold is warned about again.
const REPEAT_WARNING: Duration = Duration::from_secs(60);

pub struct DriftMonitor {
    config: DriftConfig,
    /// The version whose window is open, and that window (`None`: the
    /// version has no reference, or drift is off).
    version: Option<String>,
    window: Option<DriftWindow>,
    gauges: [metrics::Gauge; 5],
    /// When each group was last warned about; `None` while it is below the threshold.
    warned: [Option<Instant>; 5],
}

impl DriftMonitor {
    pub fn new(config: DriftConfig) -> Self {
        let _ = crate::telemetry::prometheus();
        Self {
            config,
            version: None,
            window: None,
            gauges: DriftGroup::ALL.map(|g| metrics::gauge!(metric::PSI, "group" => g.name())),
            warned: [None; 5],
        }
    }

    /// Counts `batch`; publishes and logs when a window fills.
    pub fn observe(&mut self, batch: &ScoredBatch) {
        if self.config.window == 0 {
            return;
        }
        if self.version.as_deref() != Some(batch.model.version.as_str()) {
            self.start(batch);
        }
        let Some(window) = &mut self.window else { return };
        let mut full = Vec::new();
        for (payment, result) in batch.payments.iter().zip(&batch.results) {
            if let Some(report) = window.observe(payment, result.as_ref().ok().map(|p| p[1])) {
                full.push(report);
            }
        }
        for report in full {
            self.publish(&batch.model.version, &report);
        }
    }

    fn start(&mut self, batch: &ScoredBatch) {
        let version = batch.model.version.clone();
        self.window = batch.model.drift_reference.as_ref().map(|r| DriftWindow::new(Arc::clone(r), self.config.window));
        if self.window.is_none() {
            tracing::info!(version, "this version has no drift reference (published before them): no PSI");
            self.gauges.iter().for_each(|g| g.set(f64::NAN));
        }
        self.warned = [None; 5];
        self.version = Some(version);
    }

    fn publish(&mut self, version: &str, report: &PsiReport) {
        for (i, group) in DriftGroup::ALL.into_iter().enumerate() {
            let Some(psi) = report.get(group) else { continue };
            self.gauges[i].set(psi);
            if psi <= self.config.threshold {
                if self.warned[i].take().is_some() {
                    tracing::info!(group = group.name(), psi, version, "drift back below the threshold");
                }
                continue;
            }
            if self.warned[i].is_none_or(|at| at.elapsed() >= REPEAT_WARNING) {
                self.warned[i] = Some(Instant::now());
                tracing::warn!(
                    group = group.name(),
                    psi,
                    threshold = self.config.threshold,
                    version,
                    payments = report.payments,
                    "drift: the {} distribution moved away from the training data of the serving version \
                     (PSI {psi:.3} > {}); its holdout metrics may no longer hold: check the input, retrain",
                    group.name(),
                    self.config.threshold
                );
            }
        }
    }
}
