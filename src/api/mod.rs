//! The scorer's HTTP face: TensorFlow Serving's REST API (model status,
//! metadata, `:predict`) so the original demo's clients keep working, a
//! `:score` extension that takes raw payments, and `/healthz`, `/readyz`,
//! `/metrics` for operators. The Open Inference Protocol (KServe v2) is
//! served beside it (`oip`).
//!
//! Every request goes through the same `ScoringService` as the stream: one
//! model, one encoder, coalesced into the same forward passes. With a shadow
//! model loaded (`--shadow`), the status lists both versions, a request for
//! the shadow's version or label is scored by the shadow, and `:score`
//! outputs of the serving model carry the shadow's score as the stream's do. REST has a
//! concurrency limit of its own (429 beyond it), so a flood of requests can
//! take only that many places in the model's queue and never stalls the stream.

mod oip;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::features::FEATURE_WIDTH;
use crate::model::Label;
use crate::payment::{now_ms, Payment, ScoredPayment};
use crate::pipeline::PipelineState;
use crate::scoring::{Explain, ModelInfo, ScoringError, ScoringService, Target};
use crate::telemetry::metric;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub scoring: ScoringService,
    /// The model name clients use (`--model-name`).
    pub model_name: String,
    /// The stream pipeline, if this process runs one (for `/readyz`).
    pub pipeline: Option<Arc<PipelineState>>,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
    /// Places for REST scoring requests; none left means 429.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Default of `--max-rest-concurrency`: REST scoring requests at once.
pub const DEFAULT_REST_CONCURRENCY: usize = 8;

impl ApiState {
    /// At most `max_concurrency` scoring requests at once (each takes one
    /// place in the model's queue, which holds 64).
    pub fn new(
        scoring: ScoringService,
        model_name: impl Into<String>,
        pipeline: Option<Arc<PipelineState>>,
        max_concurrency: usize,
    ) -> Self {
        Self {
            scoring,
            model_name: model_name.into(),
            pipeline,
            prometheus: crate::telemetry::prometheus(),
            slots: Arc::new(tokio::sync::Semaphore::new(max_concurrency.max(1))),
        }
    }
}

/// The router; `body_limit` caps request bodies (larger ones get 413).
pub fn router(state: ApiState, body_limit: usize) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(|State(s): State<ApiState>| async move { s.prometheus.render() }))
        .route("/v1/models/{*rest}", get(model_get).post(model_post))
        .merge(oip::routes())
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// An error in TensorFlow Serving's shape, which the Open Inference Protocol shares:
/// `{"error": "..."}` with its status.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

impl From<ScoringError> for ApiError {
    fn from(e: ScoringError) -> Self {
        match e {
            ScoringError::NoModel => ApiError(StatusCode::SERVICE_UNAVAILABLE, "no model loaded yet".into()),
            ScoringError::NoShadow => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            ScoringError::BadWidth { .. } | ScoringError::RowsNeedHistory { .. } => bad_request(e.to_string()),
            ScoringError::Stopped
            | ScoringError::Model(_)
            | ScoringError::NotProbabilities { .. }
            | ScoringError::History(_)
            | ScoringError::HistoryNotKept(_) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        ApiError(e.status(), format!("cannot read the request body: {}", e.body_text()))
    }
}

async fn ready(State(s): State<ApiState>) -> Response {
    let (is_ready, body) = readiness(&s);
    let status = if is_ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// Whether this process should get traffic (a model loaded, partitions
/// assigned if it runs a pipeline, no pipeline failure), and `/readyz`'s body.
fn readiness(s: &ApiState) -> (bool, Value) {
    let model = s.scoring.model();
    let partitions = s.pipeline.as_ref().map(|p| p.assigned_partitions());
    let failure = s.pipeline.as_ref().and_then(|p| p.failure().map(|f| f.to_string()));
    let waiting = s.pipeline.as_ref().and_then(|p| p.waiting());
    let stalled = s.pipeline.as_ref().and_then(|p| p.stalled());
    let is_ready = model.is_some() && partitions.is_none_or(|n| n > 0) && failure.is_none() && stalled.is_none();
    let reason = if let Some(failure) = &failure {
        Some(format!("the pipeline failed and is stopping: {failure}"))
    } else if let Some(stalled) = stalled {
        Some(format!("waiting: {stalled}"))
    } else if model.is_none() {
        Some("no model loaded yet".to_string())
    } else if partitions == Some(0) {
        Some(waiting.unwrap_or_else(|| "no input partitions assigned (yet)".to_string()))
    } else {
        None
    };
    let body = json!({
        "ready": is_ready,
        "reason": reason,
        "model_version": model.map(|m| m.version.clone()),
        "assigned_partitions": partitions,
        "delivery": s.pipeline.as_ref().and_then(|p| p.delivery()).map(crate::choice::Choice::name),
    });
    (is_ready, body)
}

/// What a `/v1/models/...` path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action<'a> {
    /// No suffix: the model's status.
    Status,
    /// `/metadata`.
    Metadata,
    /// `:predict`, TF Serving's.
    Predict,
    /// `:score`, raw payments in, `ScoredPayment`s out.
    Score,
    /// `:explain`, KServe v1's: raw payments in, scores and every payment's reasons out.
    Explain,
    /// Another `:verb`.
    Unknown(&'a str),
}

impl Action<'_> {
    /// The `endpoint` label of the request metric.
    fn endpoint(self) -> &'static str {
        match self {
            Action::Status => "status",
            Action::Unknown(_) => "model",
            Action::Metadata => "metadata",
            Action::Predict => "predict",
            Action::Score => "score",
            Action::Explain => "explain",
        }
    }
}

/// A parsed `/v1/models/...` path.
#[derive(Debug, PartialEq)]
struct ModelPath<'a> {
    name: &'a str,
    version: Option<&'a str>,
    /// `labels/<label>`: the version a store label names.
    label: Option<&'a str>,
    action: Action<'a>,
}

impl ModelPath<'_> {
    /// The version asked for: the path's, or the one its label names
    /// (404 for a label this scorer does not know).
    fn requested(&self, s: &ApiState) -> Result<Option<String>, ApiError> {
        let Some(label) = self.label else { return Ok(self.version.map(str::to_string)) };
        let known = <Label as crate::choice::Choice>::from_name(label).and_then(|l| s.scoring.label(l));
        known
            .map(Some)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("Unrecognized servable version label: {label}")))
    }
}

fn parse_path(rest: &str) -> Option<ModelPath<'_>> {
    let (path, verb) = match rest.rsplit_once(':') {
        Some((path, verb)) => (path, Some(verb)),
        None => (rest, None),
    };
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let (name, version, label, metadata) = match segments.as_slice() {
        [name] => (*name, None, None, false),
        [name, "metadata"] => (*name, None, None, true),
        [name, "versions", v] => (*name, Some(*v), None, false),
        [name, "versions", v, "metadata"] => (*name, Some(*v), None, true),
        [name, "labels", l] => (*name, None, Some(*l), false),
        [name, "labels", l, "metadata"] => (*name, None, Some(*l), true),
        _ => return None,
    };
    if name.is_empty() || (metadata && verb.is_some()) {
        return None;
    }
    let action = match (metadata, verb) {
        (true, _) => Action::Metadata,
        (false, None) => Action::Status,
        (false, Some("predict")) => Action::Predict,
        (false, Some("score")) => Action::Score,
        (false, Some("explain")) => Action::Explain,
        (false, Some(other)) => Action::Unknown(other),
    };
    Some(ModelPath { name, version, label, action })
}

/// A loaded model a request resolved to, and which one it is.
struct Resolved {
    target: Target,
    model: Option<Arc<ModelInfo>>,
}

/// Resolves a model name and version against the loaded models: no version
/// is the serving model; the serving or the shadow version is that model;
/// other names or versions are 404.
fn resolve(s: &ApiState, name: &str, version: Option<&str>) -> Result<Resolved, ApiError> {
    if name != s.model_name {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("Servable not found for request: Latest({name})")));
    }
    let serving = Resolved { target: Target::Serving, model: s.scoring.model() };
    let Some(v) = version else { return Ok(serving) };
    if serving.model.as_ref().is_some_and(|m| m.version == v) {
        return Ok(serving);
    }
    match s.scoring.shadow() {
        Some(shadow) if shadow.version == v => Ok(Resolved { target: Target::Shadow, model: Some(shadow) }),
        _ => Err(ApiError(StatusCode::NOT_FOUND, format!("Servable not found for request: Specific({name}, {v})"))),
    }
}

/// A place for one REST scoring request, or 429 if all are taken.
fn take_slot(s: &ApiState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    s.slots.clone().try_acquire_owned().map_err(|_| {
        metrics::counter!(metric::HTTP_REJECTED).increment(1);
        ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            "too many scoring requests at once (--max-rest-concurrency); retry shortly".into(),
        )
    })
}

fn count(endpoint: &'static str, status: StatusCode) {
    metrics::counter!(metric::HTTP_REQUESTS, "endpoint" => endpoint, "status" => status.as_u16().to_string())
        .increment(1);
}

async fn model_get(State(s): State<ApiState>, Path(rest): Path<String>) -> Response {
    let result = (|| {
        let path = parse_path(&rest)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no such endpoint: /v1/models/{rest}")))?;
        let version = path.requested(&s)?;
        let Resolved { model, .. } = resolve(&s, path.name, version.as_deref())?;
        match path.action {
            Action::Status => {
                // Every loaded version without a version or label; else the one asked for.
                let shadow = if version.is_none() { s.scoring.shadow() } else { None };
                Ok((path.action.endpoint(), Json(status_body(model.as_deref(), shadow.as_deref()))))
            }
            Action::Metadata => {
                let model = model.ok_or(ScoringError::NoModel)?;
                Ok((path.action.endpoint(), Json(metadata_body(&s.model_name, &model))))
            }
            Action::Predict | Action::Score | Action::Explain | Action::Unknown(_) => {
                let verb = rest.rsplit_once(':').map_or("", |(_, verb)| verb);
                Err(ApiError(StatusCode::METHOD_NOT_ALLOWED, format!("use POST for :{verb}")))
            }
        }
    })();
    match result {
        Ok((endpoint, body)) => {
            count(endpoint, StatusCode::OK);
            body.into_response()
        }
        Err(e) => {
            count("model", e.0);
            e.into_response()
        }
    }
}

/// TF Serving's status: the serving version (LOADING before one is) and the
/// shadow version, if one is loaded beside it.
fn status_body(model: Option<&ModelInfo>, shadow: Option<&ModelInfo>) -> Value {
    let entry = |version: &str, state: &str| json!({ "version": version, "state": state, "status": { "error_code": "OK", "error_message": "" } });
    let mut versions = vec![match model {
        Some(m) => entry(&m.version, "AVAILABLE"),
        None => entry("", "LOADING"),
    }];
    versions.extend(shadow.map(|m| entry(&m.version, "AVAILABLE")));
    json!({ "model_version_status": versions })
}

/// The original demo's signature, as TensorFlow Serving describes it
/// (note the doubled `signature_def` key, as TF Serving writes it), and
/// beside it the feature spec: what each of the 28 inputs means for this
/// version, for clients that encode payments themselves.
fn metadata_body(name: &str, model: &crate::scoring::ModelInfo) -> Value {
    let dim = |size: &str| json!({ "size": size, "name": "" });
    let spec = &model.feature_spec;
    json!({
        "model_spec": { "name": name, "signature_name": "", "version": model.version },
        "metadata": {
          "feature_spec": {
            "features": spec.feature_names(),
            "amount_min": spec.amount_min,
            "amount_max": spec.amount_max,
            "amount_clip": spec.amount_clip,
            "amount_scaled": "(amount - amount_min) / (amount_max - amount_min), at most 1 when amount_clip",
          },
          "decision_bands": { "review": model.bands.review.threshold, "block": model.bands.block.threshold },
          "signature_def": { "signature_def": { "serving_default": {
            "inputs": { "payments": {
                "dtype": "DT_FLOAT",
                "tensor_shape": { "dim": [dim("-1"), dim(&FEATURE_WIDTH.to_string())], "unknown_rank": false },
                "name": "X_train:0"
            }},
            "outputs": { "classification": {
                "dtype": "DT_FLOAT",
                "tensor_shape": { "dim": [dim("-1"), dim("2")], "unknown_rank": false },
                "name": "Softmax:0"
            }},
            "method_name": "tensorflow/serving/predict"
        }}}}
    })
}

/// Query parameters of `POST /v1/models/...`.
#[derive(Debug, Default, Deserialize)]
struct PostParams {
    /// `:score?explain=true`: reasons for every payment, not only those at or above review.
    #[serde(default)]
    explain: bool,
}

async fn model_post(
    State(s): State<ApiState>,
    Path(rest): Path<String>,
    params: Result<Query<PostParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let path = parse_path(&rest);
    let endpoint = path.as_ref().map_or("model", |p| p.action.endpoint());
    let result = async {
        let path =
            path.ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no such endpoint: /v1/models/{rest}")))?;
        let body = body?;
        let version = path.requested(&s)?;
        let resolved = resolve(&s, path.name, version.as_deref())?;
        resolved.model.as_ref().ok_or(ScoringError::NoModel)?;
        let target = resolved.target;
        let _slot = take_slot(&s)?;
        let Query(params) = params.map_err(|e| bad_request(format!("query string: {}", e.body_text())))?;
        let explain = if params.explain { Explain::All } else { Explain::AtReview };
        match path.action {
            Action::Predict => predict(&s, &path, target, &body).await,
            Action::Score => Ok(json!({ "predictions": score(&s, &path, target, &body, explain).await? })),
            Action::Explain => {
                let explanations = score(&s, &path, target, &body, Explain::All).await?;
                let predictions: Vec<[f64; 2]> =
                    explanations.iter().map(|e| [1.0 - e.fraud_probability, e.fraud_probability]).collect();
                Ok(json!({ "predictions": predictions, "explanations": explanations }))
            }
            Action::Status | Action::Metadata | Action::Unknown(_) => Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: POST /v1/models/{rest}; use :predict, :score or :explain"),
            )),
        }
    }
    .await;
    match result {
        Ok(body) => {
            count(endpoint, StatusCode::OK);
            Json(body).into_response()
        }
        Err(e) => {
            count(endpoint, e.0);
            e.into_response()
        }
    }
}

/// Reads rows of numbers from `instances` / `inputs` in any of TF Serving's
/// shapes: a list of rows, a list of `{"payments": row}` objects, or
/// `{"payments": [rows]}`.
fn rows_of(value: &Value, field: &str) -> Result<Vec<f32>, ApiError> {
    let rows: Vec<&Value> = match value {
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::Object(map) => map
                    .get("payments")
                    .ok_or_else(|| bad_request(format!("{field}: an object row must hold the input \"payments\""))),
                other => Ok(other),
            })
            .collect::<Result<_, _>>()?,
        Value::Object(map) => match map.get("payments") {
            Some(Value::Array(items)) => items.iter().collect(),
            _ => return Err(bad_request(format!("{field}: expected {{\"payments\": [[...28 numbers], ...]}}"))),
        },
        _ => return Err(bad_request(format!("{field}: expected a list of rows"))),
    };
    let mut features = Vec::with_capacity(rows.len() * FEATURE_WIDTH);
    for (i, row) in rows.iter().enumerate() {
        let Value::Array(cells) = row else {
            return Err(bad_request(format!("{field}[{i}]: expected a list of {FEATURE_WIDTH} numbers")));
        };
        if cells.len() != FEATURE_WIDTH {
            return Err(bad_request(format!(
                "{field}[{i}] has {} values; the input \"payments\" needs rows of {FEATURE_WIDTH} numbers (shape [-1, {FEATURE_WIDTH}])",
                cells.len()
            )));
        }
        for (j, cell) in cells.iter().enumerate() {
            let x = cell
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad_request(format!("{field}[{i}][{j}] is {cell}, not a finite number")))?;
            features.push(x as f32);
        }
    }
    Ok(features)
}

#[derive(Deserialize)]
struct PredictRequest {
    #[serde(default)]
    signature_name: Option<String>,
    #[serde(default)]
    instances: Option<Value>,
    #[serde(default)]
    inputs: Option<Value>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("JSON Parse error: {e}")))
}

async fn predict(s: &ApiState, path: &ModelPath<'_>, target: Target, body: &[u8]) -> Result<Value, ApiError> {
    let request: PredictRequest = parse_json(body)?;
    if let Some(name) = request.signature_name.as_deref().filter(|n| !n.is_empty() && *n != "serving_default") {
        return Err(bad_request(format!("Serving signature name: \"{name}\" not found in signature def")));
    }
    let (features, row_format) = match (&request.instances, &request.inputs) {
        (Some(_), Some(_)) => return Err(bad_request("Request contains both \"instances\" and \"inputs\"; use one")),
        (None, None) => return Err(bad_request("Missing \"instances\" or \"inputs\" key")),
        (Some(instances), None) => (rows_of(instances, "instances")?, true),
        (None, Some(inputs)) => (rows_of(inputs, "inputs")?, false),
    };
    let rows = features.len() / FEATURE_WIDTH;
    let scored = s.scoring.score_rows_on(target, features).await?;
    check_version(path.name, path.requested(s)?.as_deref(), &scored.model.version)?;
    metrics::counter!(metric::HTTP_ROWS_SCORED).increment(rows as u64);
    let outputs: Vec<[f32; 2]> = scored.outputs;
    Ok(if row_format { json!({ "predictions": outputs }) } else { json!({ "outputs": outputs }) })
}

/// A model swap between resolving and scoring must not answer for the wrong version.
fn check_version(name: &str, version: Option<&str>, served: &str) -> Result<(), ApiError> {
    match version {
        Some(v) if v != served => {
            Err(ApiError(StatusCode::NOT_FOUND, format!("Servable not found for request: Specific({name}, {v})")))
        }
        _ => Ok(()),
    }
}

/// A payment as `:score` accepts it: the `Payment` fields, with id, time,
/// step and zip codes optional.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScoreInput {
    payment_id: Option<String>,
    event_time: Option<i64>,
    step: Option<i32>,
    customer: String,
    age: String,
    gender: String,
    zipcode_ori: Option<String>,
    merchant: String,
    zip_merchant: Option<String>,
    category: String,
    amount: f64,
}

/// Scores the payments of a `:score` or `:explain` body.
async fn score(
    s: &ApiState,
    path: &ModelPath<'_>,
    target: Target,
    body: &[u8],
    explain: Explain,
) -> Result<Vec<ScoredPayment>, ApiError> {
    #[derive(Deserialize)]
    struct ScoreRequest {
        instances: Vec<Value>,
    }
    let request: ScoreRequest = parse_json(body)?;
    let mut payments = Vec::with_capacity(request.instances.len());
    for (i, item) in request.instances.into_iter().enumerate() {
        let p: ScoreInput = serde_json::from_value(item).map_err(|e| bad_request(format!("instances[{i}]: {e}")))?;
        payments.push(Payment {
            payment_id: p.payment_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            event_time: p.event_time.unwrap_or_else(now_ms),
            step: p.step.unwrap_or(0),
            customer: p.customer,
            age: p.age,
            gender: p.gender,
            zipcode_ori: p.zipcode_ori.unwrap_or_default(),
            merchant: p.merchant,
            zip_merchant: p.zip_merchant.unwrap_or_default(),
            category: p.category,
            amount: p.amount,
            fraud: None,
        });
    }
    let batch = s.scoring.score_payments_on(target, payments, explain).await?;
    check_version(path.name, path.requested(s)?.as_deref(), &batch.model.version)?;
    let scored_at = now_ms();
    let mut predictions: Vec<ScoredPayment> = Vec::with_capacity(batch.payments.len());
    let shadow = batch.shadow;
    let rows = batch.payments.into_iter().zip(batch.results).zip(batch.reasons);
    for (i, ((payment, result), reasons)) in rows.enumerate() {
        let [_, p] = result.map_err(|e| bad_request(format!("instances[{i}]: {e}")))?;
        let shadow = shadow.as_ref().and_then(|s| s.of(i));
        predictions.push(batch.model.verdict(payment, p, reasons, shadow, scored_at));
    }
    metrics::counter!(metric::HTTP_ROWS_SCORED).increment(predictions.len() as u64);
    Ok(predictions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tf_serving_paths() {
        let p = |s| parse_path(s);
        assert_eq!(
            p("payfraud"),
            Some(ModelPath { name: "payfraud", version: None, label: None, action: Action::Status })
        );
        assert_eq!(p("payfraud/labels/stable:predict").unwrap().label, Some("stable"));
        assert_eq!(p("payfraud/labels/stable/metadata").unwrap().action, Action::Metadata);
        assert_eq!(p("payfraud/metadata").unwrap().action, Action::Metadata);
        assert_eq!(p("payfraud/versions/17").unwrap().version, Some("17"));
        assert_eq!(p("payfraud/versions/17/metadata").unwrap().action, Action::Metadata);
        assert_eq!(p("payfraud:predict").unwrap().action, Action::Predict);
        assert_eq!(p("payfraud:score").unwrap().action, Action::Score);
        assert_eq!(p("payfraud:classify").unwrap().action, Action::Unknown("classify"));
        assert_eq!(
            p("payfraud/versions/17:predict"),
            Some(ModelPath { name: "payfraud", version: Some("17"), label: None, action: Action::Predict })
        );
        assert_eq!(p("payfraud/labels/x/y"), None);
        assert_eq!(p("payfraud/tags/x"), None);
        assert_eq!(p(""), None);
    }

    #[test]
    fn reads_all_row_shapes_and_rejects_bad_widths() {
        let row: Vec<f64> = (0..28).map(f64::from).collect();
        for value in [json!([row]), json!([{ "payments": row }]), json!({ "payments": [row] })] {
            assert_eq!(rows_of(&value, "x").unwrap().len(), 28);
        }
        let short = json!([[1.0, 2.0]]);
        assert!(rows_of(&short, "instances").unwrap_err().1.contains("has 2 values"));
        let text = json!([vec!["a"; 28]]);
        assert!(rows_of(&text, "inputs").is_err());
    }
}
