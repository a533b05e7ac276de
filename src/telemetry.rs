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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
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
                .expect("valid histogram buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); then ours only renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
