//! Logging set-up, in one place for every binary.

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl crate::choice::Choice for LogFormat {
    const CHOICES: &'static [(Self, &'static str, &'static str)] = &[
        (Self::Text, "text", "human-readable lines"),
        (Self::Json, "json", "one JSON object per line, for log shippers"),
    ];
}

/// Installs the global tracing subscriber on stderr. The level comes from
/// `RUST_LOG` (default `info`). Safe to call more than once.
pub fn init_logging(format: LogFormat) {
    init_logging_with(format, "info", None);
}

/// Installs the global tracing subscriber: at `RUST_LOG`'s level (else
/// `default_level`), on stderr or appended to `file`. Safe to call more than once.
pub fn init_logging_with(format: LogFormat, default_level: &str, file: Option<std::fs::File>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match (file, format) {
        (None, LogFormat::Text) => builder.with_writer(std::io::stderr).try_init(),
        (None, LogFormat::Json) => builder.with_writer(std::io::stderr).json().try_init(),
        (Some(file), LogFormat::Text) => builder.with_writer(std::sync::Mutex::new(file)).with_ansi(false).try_init(),
        (Some(file), LogFormat::Json) => builder.with_writer(std::sync::Mutex::new(file)).json().try_init(),
    };
}

/// Every metric's name, in one place, so dashboards and code agree.
pub mod metric {
    /// Counter: events read from the input topic.
    pub const EVENTS_IN: &str = "fraudstream_events_in_total";
    /// Counter: scored events acknowledged by the broker on the output topic.
    pub const EVENTS_OUT: &str = "fraudstream_events_out_total";
    /// Counter, label `reason`: events sent to the dead-letter topic.
    pub const EVENTS_DEAD_LETTERED: &str = "fraudstream_events_dead_lettered_total";
    /// Counter: outputs or dead letters that could not be enqueued or delivered for good (each stops the pipeline; their inputs stay uncommitted).
    pub const DELIVERY_FAILURES: &str = "fraudstream_delivery_failures_total";
    /// Counter, label `kind`: failures of ours that stopped the pipeline (fail closed).
    pub const PIPELINE_FAILURES: &str = "fraudstream_pipeline_failures_total";
    /// Counter, label `outcome` (committed/aborted): exactly-once transactions.
    pub const TRANSACTIONS: &str = "fraudstream_transactions_total";
    /// Histogram, seconds: closing one exactly-once transaction (flush, offsets, commit).
    pub const TRANSACTION_COMMIT_SECONDS: &str = "fraudstream_transaction_commit_seconds";
    /// Counter: exactly-once pipelines restarted in-process from the last committed transaction after an abort.
    pub const REWINDS: &str = "fraudstream_rewinds_total";
    /// Counter: revokes or shutdowns whose drain ran out of time (their events are re-delivered).
    pub const DRAIN_TIMEOUTS: &str = "fraudstream_drain_timeouts_total";
    /// Counter: REST requests refused with 429 because the REST concurrency limit was reached.
    pub const HTTP_REJECTED: &str = "fraudstream_http_rejected_total";
    /// Histogram: rows per forward pass.
    pub const BATCH_SIZE: &str = "fraudstream_batch_size";
    /// Histogram, seconds: one forward pass (encoding included).
    pub const INFERENCE_SECONDS: &str = "fraudstream_inference_seconds";
    /// Histogram, seconds: event time to output acknowledged.
    pub const END_TO_END_SECONDS: &str = "fraudstream_end_to_end_latency_seconds";
    /// Histogram: P(fraud) of scored events.
    pub const FRAUD_PROBABILITY: &str = "fraudstream_fraud_probability";
    /// Counter: model swaps to a version whose feature spec differs from the one before (pre-encoded clients must follow).
    pub const FEATURE_SPEC_CHANGES: &str = "fraudstream_feature_spec_changes_total";
    /// Counter: payments given reason codes (one extra forward pass per feature group each).
    pub const PAYMENTS_EXPLAINED: &str = "fraudstream_payments_explained_total";
    /// Counter, label `decision`: scored events by decision band.
    pub const DECISIONS: &str = "fraudstream_decisions_total";
    /// Gauge, label `group` (category/age/gender/amount/score): population stability index of the last
    /// full drift window against the serving version's training reference; NaN before the first window
    /// fills and for a version without a reference; absent with `--drift-window 0`.
    pub const PSI: &str = "fraudstream_psi";
    /// Counter: events flagged as fraud at the model's threshold.
    pub const FRAUD_FLAGGED: &str = "fraudstream_fraud_flagged_total";
    /// Gauge, label `version`: 1 for the model version now serving.
    pub const MODEL_LOADED: &str = "fraudstream_model_loaded";
    /// Gauge: the serving model version as a number (unix seconds).
    pub const MODEL_VERSION: &str = "fraudstream_model_version";
    /// Counter, label `reason`: model versions that failed to load or validate.
    pub const MODEL_LOAD_FAILURES: &str = "fraudstream_model_load_failures_total";
    /// Counter: model swaps.
    pub const MODEL_SWAPS: &str = "fraudstream_model_swaps_total";
    /// Gauge, label `version`: 1 for the shadow model version now loaded (`--shadow`), 0 once unloaded.
    pub const SHADOW_LOADED: &str = "fraudstream_shadow_model_loaded";
    /// Gauge: the shadow model version as a number (unix seconds); 0 when none is loaded.
    pub const SHADOW_VERSION: &str = "fraudstream_shadow_model_version";
    /// Counter: payments scored by the shadow model beside the serving one.
    pub const SHADOW_SCORED: &str = "fraudstream_shadow_scored_total";
    /// Counter: batches the shadow model failed on (an error, or outputs that are not probabilities); they leave with `shadow: null`.
    pub const SHADOW_FAILURES: &str = "fraudstream_shadow_failures_total";
    /// Gauge, labels `topic`, `partition`: consumer lag in messages.
    pub const CONSUMER_LAG: &str = "fraudstream_consumer_lag";
    /// Counter, label `kind` (assign/revoke): consumer group rebalances.
    pub const REBALANCES: &str = "fraudstream_rebalances_total";
    /// Gauge: events read but not yet acknowledged downstream.
    pub const IN_FLIGHT: &str = "fraudstream_in_flight_events";
    /// Counter, labels `endpoint`, `status`: REST API requests.
    pub const HTTP_REQUESTS: &str = "fraudstream_http_requests_total";
    /// Counter: rows scored through the REST API.
    pub const HTTP_ROWS_SCORED: &str = "fraudstream_http_rows_scored_total";

    // `fraudstream monitor`
    /// Counter, labels `input` (scored/labels), `outcome` (joined/waiting/duplicate/corrected): records processed live.
    pub const MONITOR_RECORDS: &str = "fraudstream_monitor_records_total";
    /// Counter: joins written to the labelled topic (corrections included).
    pub const MONITOR_JOINS: &str = "fraudstream_monitor_joins_total";
    /// Counter, label `kind` (unlabelled/labelled/unmatched-label): entries the label window or size limit dropped.
    pub const MONITOR_EVICTIONS: &str = "fraudstream_monitor_evictions_total";
    /// Gauge, label `kind` (scored/labels): entries the join holds.
    pub const MONITOR_STATE: &str = "fraudstream_monitor_state_entries";
    /// Histogram, seconds: rebuilding one partition's customer history (scorer) before scoring it.
    pub const HISTORY_REBUILD_SECONDS: &str = "fraudstream_history_rebuild_seconds";
    /// Counter: input records read back to rebuild customer histories.
    pub const HISTORY_REBUILD_RECORDS: &str = "fraudstream_history_rebuild_records_total";
    /// Gauge: customers whose history the scorer holds.
    pub const HISTORY_CUSTOMERS: &str = "fraudstream_history_customers";
    /// Gauge, bytes: heap held by customer histories.
    pub const HISTORY_BYTES: &str = "fraudstream_history_bytes";
    /// Histogram, seconds: rebuilding one partition's join after a start or rebalance.
    pub const MONITOR_REBUILD_SECONDS: &str = "fraudstream_monitor_rebuild_seconds";
    /// Histogram, seconds, label `version` (the serving one): from scoring to the label (labelledAt - scoredAt).
    pub const MONITOR_LABEL_DELAY_SECONDS: &str = "fraudstream_monitor_label_delay_seconds";
    /// Gauge, label `version`: labelled payments the live quality numbers are over.
    pub const MONITOR_LABELLED: &str = "fraudstream_monitor_labelled";
    /// Gauge, label `version`: live precision at the version's threshold.
    pub const MONITOR_PRECISION: &str = "fraudstream_monitor_precision";
    /// Gauge, label `version`: live recall at the version's threshold.
    pub const MONITOR_RECALL: &str = "fraudstream_monitor_recall";
    /// Gauge, label `version`: live average precision.
    pub const MONITOR_AVERAGE_PRECISION: &str = "fraudstream_monitor_average_precision";
    /// Gauge, label `version`: live ROC-AUC.
    pub const MONITOR_ROC_AUC: &str = "fraudstream_monitor_roc_auc";
    /// Gauge, label `version`: share of the scored payments held that the version flagged.
    pub const MONITOR_ALERT_RATE: &str = "fraudstream_monitor_alert_rate";
    /// Gauge, label `version`: share of the scored payments held that have a label.
    pub const MONITOR_LABEL_COVERAGE: &str = "fraudstream_monitor_label_coverage";
}

/// Installs the Prometheus recorder (once per process) and returns its handle,
/// which renders the `/metrics` page.
pub fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency_buckets = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
            let probability_buckets = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99];
            let batch_buckets = [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0];
            // Labels come seconds (tests) to weeks (chargebacks) after the score.
            let label_delay_buckets =
                [1.0, 10.0, 60.0, 600.0, 3_600.0, 21_600.0, 86_400.0, 604_800.0, 2_592_000.0, 7_776_000.0];
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &latency_buckets,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(metric::FRAUD_PROBABILITY.into()),
                        &probability_buckets,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(metric::BATCH_SIZE.into()),
                        &batch_buckets,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(metric::MONITOR_LABEL_DELAY_SECONDS.into()),
                        &label_delay_buckets,
                    )
                })
                .expect("valid histogram buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); then ours only renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
