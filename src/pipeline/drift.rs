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
//! values until the next one fills (NaN before the first, and while a
//! version without a reference serves; no gauges at all with drift off).

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
    /// `fraudstream_psi{group}`, in `DriftGroup::ALL` order; none when drift is off
    /// (no gauge then, rather than a PSI of 0 that was never measured).
    gauges: Option<[metrics::Gauge; 5]>,
    /// When each group was last warned about; `None` while it is below the threshold.
    warned: [Option<Instant>; 5],
}

impl DriftMonitor {
    /// A monitor with no window open yet; its gauges read NaN until the first one fills.
    pub fn new(config: DriftConfig) -> Self {
        let _ = crate::telemetry::prometheus();
        let gauges = (config.window > 0).then(|| {
            let gauges = DriftGroup::ALL.map(|g| metrics::gauge!(metric::PSI, "group" => g.name()));
            gauges.iter().for_each(|g| g.set(f64::NAN));
            gauges
        });
        Self { config, version: None, window: None, gauges, warned: [None; 5] }
    }

    /// Counts `batch`; publishes and logs when a window fills.
    pub fn observe(&mut self, batch: &ScoredBatch) {
        if self.gauges.is_none() {
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
            self.gauges.iter().flatten().for_each(|g| g.set(f64::NAN));
        }
        self.warned = [None; 5];
        self.version = Some(version);
    }

    fn publish(&mut self, version: &str, report: &PsiReport) {
        let Some(gauges) = &self.gauges else { return };
        for (i, group) in DriftGroup::ALL.into_iter().enumerate() {
            let Some(psi) = report.get(group) else { continue };
            gauges[i].set(psi);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::DecisionBands;
    use crate::drift::DriftReference;
    use crate::scoring::ModelInfo;
    use crate::{FeatureSpec, Payment, Simulator};

    fn batch(version: &str, reference: Option<&Arc<DriftReference>>, payments: &[Payment]) -> ScoredBatch {
        let model = Arc::new(ModelInfo {
            name: "payfraud".into(),
            version: version.into(),
            threshold: 0.5,
            bands: DecisionBands::at_threshold(0.5),
            feature_spec: FeatureSpec::demo(),
            explains: false,
            device: "cpu".into(),
            drift_reference: reference.cloned(),
        });
        let results = payments.iter().map(|_| Ok([0.9, 0.1])).collect();
        ScoredBatch {
            model,
            payments: payments.to_vec(),
            results,
            reasons: vec![Vec::new(); payments.len()],
            shadow: None,
        }
    }

    /// The gauges as `/metrics` renders them.
    fn rendered() -> Vec<(String, f64)> {
        let mut gauges: Vec<(String, f64)> = crate::telemetry::prometheus()
            .render()
            .lines()
            .filter_map(|l| l.strip_prefix("fraudstream_psi{group=\""))
            .map(|l| {
                let (group, value) = l.split_once("\"} ").unwrap();
                (group.to_string(), value.parse().unwrap())
            })
            .collect();
        gauges.sort_by(|a, b| a.0.cmp(&b.0));
        gauges
    }

    #[test]
    fn gauges_follow_the_serving_versions_reference() {
        let payments: Vec<Payment> = Simulator::new(2_000, 4).collect();
        let reference = Arc::new(DriftReference::new(&FeatureSpec::demo(), &payments, &[0.05, 0.1, 0.2]));
        let mut monitor = DriftMonitor::new(DriftConfig { window: 1_000, threshold: 0.25 });
        let before = rendered();
        assert_eq!(before.len(), 5);
        assert!(before.iter().all(|(_, v)| v.is_nan()), "not measured yet: {before:?}");

        monitor.observe(&batch("1", Some(&reference), &payments[..1_000]));
        let measured = rendered();
        assert!(measured.iter().all(|(_, v)| v.is_finite()), "{measured:?}");
        let category = measured.iter().find(|(g, _)| g == "category").unwrap().1;
        assert!(category < 0.01, "the reference's own payments: {category}");

        // A version without a reference: NaN, and nothing counted.
        monitor.observe(&batch("2", None, &payments[..1_000]));
        assert!(rendered().iter().all(|(_, v)| v.is_nan()));

        // Back to version 1: a fresh window, which 999 payments do not fill.
        monitor.observe(&batch("1", Some(&reference), &payments[..999]));
        assert!(rendered().iter().all(|(_, v)| v.is_nan()));
        monitor.observe(&batch("1", Some(&reference), &payments[999..1_000]));
        assert_eq!(rendered(), measured, "the same 1,000 payments, the same PSI");
    }
}
