//! Drift without labels on the real broker, S3 store and libtorch: a model
//! trained on the simulator's regime A carries its drift reference in
//! `model.json`; the `fraudstream score` binary exports a PSI of about 0 for
//! every group on regime-A traffic, and above 0.25 for the groups regime B
//! moves (and the score) once the traffic drifts, with a warning naming each;
//! the gauges are exactly the PSI the library computes offline over the same
//! windows. Offline, the regime-A model's average precision collapses on
//! regime B: what the drift hides until labels arrive. A version retrained
//! on drifted data wins the gate, the scorer swaps to it, and the PSI against
//! its reference, over a fresh window, is ~0 again.

mod common;
#[path = "faults/harness.rs"]
mod harness;

use std::time::Duration;

use fraudstream::drift::{DriftGroup, DriftWindow, PsiReport};
use fraudstream::model::{Model, ModelStore, MODEL_FILE};
use fraudstream::training::data::DataSource;
use fraudstream::training::evaluate::Evaluation;
use fraudstream::training::{run_once, train::TrainConfig, TrainerOptions};
use fraudstream::{Payment, Simulator};
use harness::{read_outputs, records, topic_for, verify_outputs, Scorer};

const WINDOW: usize = 10_000;

/// `fraudstream_psi{group="..."}` of every group, from the scorer's /metrics.
async fn gauges(scorer: &Scorer) -> Vec<(DriftGroup, Option<f64>)> {
    let text = reqwest::get(format!("{}/metrics", scorer.http)).await.unwrap().text().await.unwrap();
    DriftGroup::ALL
        .into_iter()
        .map(|group| {
            let prefix = format!("fraudstream_psi{{group=\"{}\"}} ", group.name());
            let value = text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().parse::<f64>().unwrap());
            (group, value)
        })
        .collect()
}

/// The last full window's PSI, as the library computes it from `payments`
/// and the scores `model` gives them.
fn offline_psi(model: &Model, payments: &[Payment]) -> PsiReport {
    let reference = model.manifest().drift_reference.clone().expect("the trainer wrote a drift reference");
    let scores = model.score_payments(payments).unwrap();
    let mut window = DriftWindow::new(std::sync::Arc::new(reference), WINDOW);
    let mut last = None;
    for (p, s) in payments.iter().zip(scores) {
        if let Some(report) = window.observe(p, Some(s)) {
            last = Some(report);
        }
    }
    last.expect("a full window")
}

fn assert_gauges_are(gauges: &[(DriftGroup, Option<f64>)], offline: &PsiReport, what: &str) {
    for (group, value) in gauges {
        let value = value.unwrap_or_else(|| panic!("{what}: no fraudstream_psi gauge for {group:?}"));
        let want = offline.get(*group).unwrap();
        // Features are counted exactly; a score could only change bin within 1e-6 of an edge.
        let tolerance = if *group == DriftGroup::Score { 1e-3 } else { 1e-9 };
        assert!((value - want).abs() <= tolerance, "{what}: {group:?} PSI {value}, the library gives {want}");
    }
}

fn average_precision(model: &Model, payments: &[Payment]) -> f64 {
    let scores = model.score_payments(payments).unwrap();
    let labels: Vec<bool> = payments.iter().map(|p| p.fraud == Some(true)).collect();
    Evaluation::new(&scores, &labels, model.manifest().threshold).average_precision
}

fn unlabelled(payments: &[Payment]) -> Vec<Payment> {
    payments.iter().map(|p| Payment { fraud: None, ..p.clone() }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psi_is_near_zero_on_the_training_distribution_and_high_after_the_drift() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store_url = common::s3_store();
    let trained = run_once(&TrainerOptions {
        data: DataSource::Simulator { rows: 60_000, seed: 61 },
        model_store: store_url.clone(),
        device: fraudstream::model::Device::Cpu,
        train: TrainConfig { seed: 61, max_epochs: 8, ..TrainConfig::default() },
        ..TrainerOptions::default()
    })
    .await
    .expect("training on regime A");
    let store = ModelStore::open(&store_url).await.unwrap();
    let fetched = dir.path().join("fetched");
    let files = store.fetch(&trained.version, &[MODEL_FILE], &fetched.join("versions")).await.unwrap();
    let model = Model::load(&files.dir, tch::Device::Cpu).unwrap();
    let reference = model.manifest().drift_reference.as_ref().expect("model.json carries drift_reference");
    assert_eq!(reference.scored_rows, trained.holdout.rows, "the score reference is the holdout's");
    let rows = model.manifest().training_data.rows;
    assert!(reference.rows > rows / 2 && reference.rows < rows, "the feature reference is the training split's");

    // The traffic: regime A from another seed, then regime B.
    let traffic_a: Vec<Payment> = Simulator::new(30_000, 62).collect();
    let traffic_b: Vec<Payment> = Simulator::new(20_000, 63).drift_after(0).collect();
    let (ap_a, ap_b) = (average_precision(&model, &traffic_a), average_precision(&model, &traffic_b));
    eprintln!(
        "regime-A model {}: holdout AP {:.4}; AP on regime-A traffic {ap_a:.4}, on regime-B traffic {ap_b:.4}",
        trained.version, trained.holdout.average_precision
    );
    assert!(ap_a > 0.5, "the regime-A model works on regime A: AP {ap_a}");
    assert!(ap_b < ap_a / 3.0, "the regime-A model misses regime B's fraud: AP {ap_b} vs {ap_a}");

    // One partition: the scorer's windows hold exactly the payments in the order sent.
    let topic = topic_for(&kafka, 1).await;
    let group = common::unique("group");
    let window = WINDOW.to_string();
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &["--drift-window", &window]);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    let unmeasured = gauges(&scorer).await;
    assert!(unmeasured.iter().all(|(_, v)| v.is_some_and(f64::is_nan)), "before a window fills: {unmeasured:?}");
    let sent_a = unlabelled(&traffic_a);
    common::publish(&common::input_producer(), &topic, &records(&sent_a)).await;
    scorer
        .wait_until("30,000 outputs", Duration::from_secs(180), async |s| {
            s.metric("fraudstream_events_out_total").await >= 30_000.0
        })
        .await;
    let on_a = gauges(&scorer).await;
    eprintln!("PSI on regime A: {on_a:?}");
    for (group, psi) in &on_a {
        assert!(psi.is_some_and(|v| v < 0.1), "{group:?}: PSI {psi:?} on the training distribution");
    }
    assert_gauges_are(&on_a, &offline_psi(&model, &traffic_a), "regime A");
    assert!(!scorer.log().contains("drift: the "), "a warning on regime A:\n{}", scorer.log());

    let sent_b = unlabelled(&traffic_b);
    common::publish(&common::input_producer(), &topic, &records(&sent_b)).await;
    scorer
        .wait_until("50,000 outputs", Duration::from_secs(180), async |s| {
            s.metric("fraudstream_events_out_total").await >= 50_000.0
        })
        .await;
    let on_b = gauges(&scorer).await;
    eprintln!("PSI on regime B: {on_b:?}");
    let psi_b = |group: DriftGroup| on_b.iter().find(|(g, _)| *g == group).and_then(|(_, v)| *v).unwrap();
    for group in [DriftGroup::Category, DriftGroup::Age, DriftGroup::Amount, DriftGroup::Score] {
        assert!(psi_b(group) > 0.25, "{group:?}: PSI {} after the drift", psi_b(group));
        let warning = format!("drift: the {} distribution moved", group.name());
        assert!(scorer.log().contains(&warning), "no warning for {group:?}:\n{}", scorer.log());
    }
    assert!(psi_b(DriftGroup::Gender) < 0.1, "gender does not drift in regime B: {}", psi_b(DriftGroup::Gender));
    assert!(!scorer.log().contains("drift: the gender"), "a warning for gender:\n{}", scorer.log());
    assert_gauges_are(&on_b, &offline_psi(&model, &traffic_b), "regime B");

    // Retrained on drifted, labelled data, the new version wins the gate on
    // regime B, the scorer swaps to it and measures against its reference:
    // a fresh window, ~0 again.
    let retrained = run_once(&TrainerOptions {
        data: DataSource::DriftedSimulator { rows: 100_000, seed: 64, drift_after: 0 },
        model_store: store_url.clone(),
        device: fraudstream::model::Device::Cpu,
        train: TrainConfig { seed: 64, max_epochs: 8, ..TrainConfig::default() },
        ..TrainerOptions::default()
    })
    .await
    .expect("training on regime B");
    assert_eq!(retrained.label, Some(fraudstream::model::Label::Stable), "{}", retrained.verdict);
    let files = store.fetch(&retrained.version, &[MODEL_FILE], &fetched.join("versions")).await.unwrap();
    let new_model = Model::load(&files.dir, tch::Device::Cpu).unwrap();
    let ap_new = average_precision(&new_model, &traffic_b);
    eprintln!("retrained on regime B: version {}, AP on regime-B traffic {ap_new:.4}", retrained.version);
    assert!(ap_new > 10.0 * ap_b, "retraining on regime B restores the AP: {ap_new} vs {ap_b}");
    let new_version: f64 = retrained.version.parse().unwrap();
    scorer
        .wait_until("the swap to the retrained version", Duration::from_secs(60), async |s| {
            s.metric("fraudstream_model_version").await == new_version
        })
        .await;
    let traffic_c: Vec<Payment> = Simulator::new(20_000, 65).drift_after(0).take(WINDOW).collect();
    let sent_c = unlabelled(&traffic_c);
    common::publish(&common::input_producer(), &topic, &records(&sent_c)).await;
    scorer
        .wait_until("60,000 outputs", Duration::from_secs(180), async |s| {
            s.metric("fraudstream_events_out_total").await >= 60_000.0
        })
        .await;
    let after_swap = gauges(&scorer).await;
    eprintln!("PSI on regime B against the retrained version: {after_swap:?}");
    for (group, psi) in &after_swap {
        assert!(psi.is_some_and(|v| v < 0.1), "{group:?}: PSI {psi:?} against the retrained version");
    }
    assert_gauges_are(&after_swap, &offline_psi(&new_model, &traffic_c), "after the swap");

    // And every output is right: the version's score, decision and reasons.
    let sent: Vec<Payment> = sent_a.into_iter().chain(sent_b).chain(sent_c).collect();
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(10)).await;
    let verified = verify_outputs(&sent, &outputs, &fetched, "drift");
    assert_eq!(verified.versions.get(&trained.version), Some(&50_000), "{:?}", verified.versions);
    assert_eq!(verified.versions.get(&retrained.version), Some(&WINDOW), "{:?}", verified.versions);
    scorer.stop();
}
