//! The human report of a training run: a Markdown page with SVG plots (PR
//! curve, ROC curve, score histograms), drawn with plotters.

use plotters::prelude::*;

use crate::decision::DecisionBands;
use crate::training::evaluate::{curves, Evaluation};
use crate::training::train::EpochLog;
use crate::training::{Result, TrainingError};

/// Files of a report: name and contents.
pub type ReportFiles = Vec<(&'static str, Vec<u8>)>;

fn plot_err<E: std::fmt::Display>(e: E) -> TrainingError {
    TrainingError::Report(e.to_string())
}

/// A named line of a chart.
type Series<'a> = (&'a str, &'a [(f64, f64)], RGBColor);

/// A labelled point drawn over a chart.
type Mark<'a> = (&'a str, (f64, f64), RGBColor);

fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>], marks: &[Mark<'_>]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)
            .map_err(plot_err)?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(plot_err)?;
        for (name, points, color) in series {
            let color = *color;
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        for (name, point, color) in marks {
            let color = *color;
            chart
                .draw_series(std::iter::once(Circle::new(*point, 6, color.filled())))
                .map_err(plot_err)?
                .label(*name)
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Share of each class per score bin (20 bins over [0, 1]), so both classes show despite the imbalance.
fn histogram_svg(scores: &[f32], labels: &[bool]) -> Result<String> {
    const BINS: usize = 20;
    let mut counts = [[0f64; BINS]; 2];
    for (s, y) in scores.iter().zip(labels) {
        let bin = ((f64::from(*s) * BINS as f64) as usize).min(BINS - 1);
        counts[usize::from(*y)][bin] += 1.0;
    }
    for class in &mut counts {
        let total: f64 = class.iter().sum::<f64>().max(1.0);
        class.iter_mut().for_each(|c| *c /= total);
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Holdout scores by class", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(plot_err)?;
        chart.configure_mesh().x_desc("P(fraud)").y_desc("share of class").draw().map_err(plot_err)?;
        for (class, color, name) in [(0, BLUE, "legitimate"), (1, RED, "fraud")] {
            let bars = counts[class].iter().enumerate().map(move |(i, share)| {
                let x0 = i as f64 / BINS as f64;
                let (lo, hi) = if class == 0 {
                    (x0, x0 + 0.5 / BINS as f64)
                } else {
                    (x0 + 0.5 / BINS as f64, x0 + 1.0 / BINS as f64)
                };
                Rectangle::new([(lo, 0.0), (hi, *share)], color.filled())
            });
            chart
                .draw_series(bars)
                .map_err(plot_err)?
                .label(name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Inputs of the report.
pub struct ReportInput<'a> {
    pub title: String,
    pub summary_lines: Vec<String>,
    pub model: &'a Evaluation,
    pub baseline: &'a Evaluation,
    pub champion: Option<&'a Evaluation>,
    pub model_scores: &'a [f32],
    pub baseline_scores: &'a [f32],
    pub labels: &'a [bool],
    pub history: &'a [EpochLog],
    /// The decision bands chosen on validation data.
    pub bands: &'a DecisionBands,
}

/// Renders `report.md` and its three SVG plots.
pub fn render(input: &ReportInput<'_>) -> Result<ReportFiles> {
    let (model_pr, model_roc) = curves(input.model_scores, input.labels, 400);
    let (base_pr, base_roc) = curves(input.baseline_scores, input.labels, 400);
    let pr = line_chart(
        "Precision-recall (holdout)",
        "recall",
        "precision",
        &[("MLP", &model_pr, RED), ("logistic baseline", &base_pr, BLUE)],
        &[
            ("review edge (validation)", (input.bands.review.recall, input.bands.review.precision), MAGENTA),
            ("block edge (validation)", (input.bands.block.recall, input.bands.block.precision), BLACK),
        ],
    )?;
    let roc = line_chart(
        "ROC (holdout)",
        "false-positive rate",
        "true-positive rate",
        &[("MLP", &model_roc, RED), ("logistic baseline", &base_roc, BLUE)],
        &[],
    )?;
    let hist = histogram_svg(input.model_scores, input.labels)?;

    let mut md = format!("# {}\n\n", input.title);
    for line in &input.summary_lines {
        md.push_str(&format!("- {line}\n"));
    }
    md.push_str("\n## Holdout (the latest days, never seen in training)\n\n");
    md.push_str("| model | ROC-AUC | average precision | recall @ 1% FPR | threshold | precision | recall | F1 | TP | FP | TN | FN |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut rows = vec![("MLP (this version)", input.model), ("logistic baseline", input.baseline)];
    if let Some(champion) = input.champion {
        rows.push(("current champion", champion));
    }
    for (name, e) in rows {
        let c = &e.confusion;
        md.push_str(&format!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {} | {} | {} | {} |\n",
            e.roc_auc,
            e.average_precision,
            e.recall_at_1pct_fpr,
            e.threshold,
            e.precision,
            e.recall,
            e.f1,
            c.true_positives,
            c.false_positives,
            c.true_negatives,
            c.false_negatives
        ));
    }
    let b = input.bands;
    md.push_str("\n## Decision bands (chosen on validation data)\n\n| decision | P(fraud) from | chosen for | validation precision | validation recall |\n|---|---|---|---|---|\n");
    md.push_str(&format!("| allow | 0 | | | |\n| review | {:.4} | recall >= {} | {:.4} | {:.4} |\n| block | {:.4} | precision >= {} | {:.4} | {:.4} |\n",
        b.review.threshold, b.review_recall_target, b.review.precision, b.review.recall,
        b.block.threshold, b.block_precision_target, b.block.precision, b.block.recall));
    md.push_str("\n![precision-recall](pr.svg)\n![ROC](roc.svg)\n![score histogram](scores.svg)\n\n## Training\n\n| epoch | loss | validation AP |\n|---|---|---|\n");
    for log in input.history {
        md.push_str(&format!("| {} | {:.5} | {:.4} |\n", log.epoch, log.loss, log.validation_ap));
    }
    Ok(vec![
        ("report.md", md.into_bytes()),
        ("pr.svg", pr.into_bytes()),
        ("roc.svg", roc.into_bytes()),
        ("scores.svg", hist.into_bytes()),
    ])
}
