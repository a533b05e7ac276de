//! What drift monitoring costs per payment on the emitter (`cargo bench
//! --bench drift`): `DriftWindow::observe` over micro-batches of 1,024
//! payments, half of them regime A and half regime B, windows of 10,000.
//! Prints the best of five rounds in nanoseconds per payment.

use std::sync::Arc;
use std::time::Instant;

use fraudstream::drift::{DriftReference, DriftWindow, DEFAULT_DRIFT_WINDOW};
use fraudstream::{FeatureSpec, Payment, Simulator};

const BATCH: usize = 1024;

fn main() {
    let train: Vec<Payment> = Simulator::new(100_000, 1).collect();
    let holdout_scores: Vec<f32> = (0..10_000).map(|i| (i as f32 / 10_000.0).powi(6)).collect();
    let reference = Arc::new(DriftReference::new(&FeatureSpec::demo(), &train, &holdout_scores));
    let a: Vec<Payment> = Simulator::new(BATCH as u64 * 4, 2).collect();
    let b: Vec<Payment> = Simulator::new(BATCH as u64 * 4, 3).drift_after(0).collect();
    let scores: Vec<f32> = (0..BATCH).map(|i| ((i * 7919) % 10_000) as f32 / 10_000.0).collect();
    let mut window = DriftWindow::new(reference, DEFAULT_DRIFT_WINDOW);
    let batches = 2_000;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        let mut windows = 0;
        for k in 0..batches {
            let traffic = if k % 2 == 0 { &a } else { &b };
            let batch = &traffic[(k / 2 % 4) * BATCH..][..BATCH];
            for (payment, score) in batch.iter().zip(&scores) {
                windows += usize::from(window.observe(payment, Some(*score)).is_some());
            }
        }
        let ns = started.elapsed().as_nanos() as f64 / (batches * BATCH) as f64;
        assert!(windows >= batches * BATCH / DEFAULT_DRIFT_WINDOW - 1, "{windows} windows");
        best = best.min(ns);
    }
    println!("drift monitoring: {best:.1} ns per payment (best of 5 rounds of {} payments)", batches * BATCH);
}
