//! The Open Inference Protocol (KServe v2) REST API beside TensorFlow
//! Serving's, so KServe, Triton and MLServer clients can score without a
//! TF-Serving adapter: health (`/v2/health/*`), server and model metadata,
//! model readiness and `/infer`.
//!
//! It is another face on the same rules: model name and version are resolved,
//! readiness decided, the REST concurrency limit taken and errors shaped
//! (`{"error": "..."}`) by the TF Serving module's helpers, and rows are scored
//! by the same `ScoringService` as the stream. Only the JSON differs: one FP32
//! input `payments` [N, 28] in, one FP32 output `classification` [N, 2] out.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{bad_request, count, readiness, resolve, take_slot, ApiError, ApiState};
use crate::features::FEATURE_WIDTH;
use crate::model::{INPUT_NAME, OUTPUT_NAME};
use crate::scoring::{ModelInfo, ScoringError};
use crate::telemetry::metric;

/// The `/v2` routes, merged into the API's router.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/", get(server_metadata))
        .route("/v2/health/live", get(|| async { Json(Live { live: true }) }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
}

/// The protocol's tensor data types (all strings case-sensitive, as written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum Datatype {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl std::fmt::Display for Datatype {
    /// As the protocol spells it: the variant's name in capitals, as serde writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format!("{self:?}").to_uppercase())
    }
}

/// A tensor as model metadata describes it; -1 is a variable dimension.
#[derive(Debug, Serialize)]
struct TensorMetadata {
    name: &'static str,
    datatype: Datatype,
    shape: [i64; 2],
}

/// The model's one input: rows of the 28 encoded features.
const PAYMENTS: TensorMetadata =
    TensorMetadata { name: INPUT_NAME, datatype: Datatype::Fp32, shape: [-1, FEATURE_WIDTH as i64] };
/// The model's one output: [P(legit), P(fraud)] per row.
const CLASSIFICATION: TensorMetadata = TensorMetadata { name: OUTPUT_NAME, datatype: Datatype::Fp32, shape: [-1, 2] };

/// The `endpoint` label of the request metric, per OIP endpoint. Health
/// probes are not counted, as `/healthz` and `/readyz` are not.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    ServerMetadata,
    ModelMetadata,
    ModelReady,
    Infer,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::ServerMetadata => "v2-server-metadata",
            Endpoint::ModelMetadata => "v2-metadata",
            Endpoint::ModelReady => "v2-model-ready",
            Endpoint::Infer => "v2-infer",
        }
    }
}

/// Counts the request under `endpoint` with the status it is answered with.
fn reply(endpoint: Endpoint, result: Result<impl IntoResponse, ApiError>) -> Response {
    let response = match result {
        Ok(body) => body.into_response(),
        Err(e) => e.into_response(),
    };
    count(endpoint.label(), response.status());
    response
}

/// `{name}` and, on the `/versions/{version}` routes, `{version}`.
#[derive(Debug, Deserialize)]
struct ModelRef {
    name: String,
    version: Option<String>,
}

/// `super::resolve`, for the serving model only (this protocol does not
/// reach the shadow), its 404 worded for this protocol: what is served instead.
fn resolve_model(s: &ApiState, m: &ModelRef) -> Result<Option<Arc<ModelInfo>>, ApiError> {
    let serving = resolve(s, &m.name, m.version.as_deref()).and_then(|resolved| match resolved.target {
        super::Target::Serving => Ok(resolved.model),
        super::Target::Shadow => Err(ApiError(StatusCode::NOT_FOUND, "the shadow model".into())),
    });
    serving.map_err(|e| reword_not_found(s, m, e))
}

/// `super::check_version` (a swap between resolving and scoring), worded likewise.
fn check_version(s: &ApiState, m: &ModelRef, served: &str) -> Result<(), ApiError> {
    super::check_version(&m.name, m.version.as_deref(), served).map_err(|e| reword_not_found(s, m, e))
}

fn reword_not_found(s: &ApiState, m: &ModelRef, e: ApiError) -> ApiError {
    if e.0 != StatusCode::NOT_FOUND {
        return e;
    }
    let name = &s.model_name;
    let message = match (&m.version, s.scoring.model()) {
        (Some(v), Some(serving)) if m.name == *name => format!(
            "model \"{name}\" has no version \"{v}\" in service; the serving version is \"{}\" \
             (or leave /versions/{v} out of the path for whichever version serves)",
            serving.version
        ),
        (Some(v), None) if m.name == *name => format!(
            "model \"{name}\" has no version in service yet; retry once a model is loaded, \
             or leave /versions/{v} out of the path"
        ),
        _ => format!("model \"{}\" is not served here; this server serves \"{name}\" (/v2/models/{name})", m.name),
    };
    ApiError(StatusCode::NOT_FOUND, message)
}

#[derive(Serialize)]
struct Live {
    live: bool,
}

#[derive(Serialize)]
struct Ready {
    ready: bool,
}

/// 200 `{"ready": true}` when `/readyz` would say 200, else 503 `{"ready": false}`
/// (a non-2xx status, so it can be a Kubernetes readiness probe as the protocol intends).
async fn server_ready(State(s): State<ApiState>) -> Response {
    let (ready, _) = readiness(&s);
    (ready_status(ready), Json(Ready { ready })).into_response()
}

fn ready_status(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[derive(Serialize)]
struct ServerMetadata {
    name: &'static str,
    version: &'static str,
    extensions: [&'static str; 0],
}

async fn server_metadata() -> Response {
    let body = ServerMetadata { name: "fraudstream", version: env!("CARGO_PKG_VERSION"), extensions: [] };
    reply(Endpoint::ServerMetadata, Ok(Json(body)))
}

#[derive(Serialize)]
struct ModelMetadata {
    name: String,
    versions: [String; 1],
    platform: &'static str,
    inputs: [TensorMetadata; 1],
    outputs: [TensorMetadata; 1],
}

async fn model_metadata(State(s): State<ApiState>, Path(m): Path<ModelRef>) -> Response {
    let result = resolve_model(&s, &m).and_then(|model| {
        let model = model.ok_or(ScoringError::NoModel)?;
        Ok(Json(ModelMetadata {
            name: s.model_name.clone(),
            versions: [model.version.clone()],
            platform: "pytorch_torchscript",
            inputs: [PAYMENTS],
            outputs: [CLASSIFICATION],
        }))
    });
    reply(Endpoint::ModelMetadata, result)
}

#[derive(Serialize)]
struct ModelReady {
    name: String,
    ready: bool,
}

/// Ready when a model is loaded (whatever the stream's state): 200, else 503.
async fn model_ready(State(s): State<ApiState>, Path(m): Path<ModelRef>) -> Response {
    let result = resolve_model(&s, &m).map(|model| {
        let ready = model.is_some();
        (ready_status(ready), Json(ModelReady { name: s.model_name.clone(), ready }))
    });
    reply(Endpoint::ModelReady, result)
}

/// `$inference_request`.
#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    /// Accepted and ignored: the protocol defines none and this server has none.
    #[serde(default, rename = "parameters")]
    _parameters: Option<Map<String, Value>>,
    inputs: Vec<RequestInput>,
    /// Absent or empty: every output (there is one).
    #[serde(default)]
    outputs: Vec<RequestOutput>,
}

/// `$request_input`: a tensor, its data flat (row-major) or nested.
#[derive(Debug, Deserialize)]
struct RequestInput {
    name: String,
    shape: Vec<u64>,
    datatype: Datatype,
    #[serde(default, rename = "parameters")]
    _parameters: Option<Map<String, Value>>,
    data: Vec<Value>,
}

/// `$request_output`.
#[derive(Debug, Deserialize)]
struct RequestOutput {
    name: String,
    #[serde(default, rename = "parameters")]
    _parameters: Option<Map<String, Value>>,
}

/// `$inference_response`.
#[derive(Debug, Serialize)]
struct InferResponse {
    model_name: String,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: [ResponseOutput; 1],
}

/// `$response_output`.
#[derive(Debug, Serialize)]
struct ResponseOutput {
    name: &'static str,
    datatype: Datatype,
    shape: [usize; 2],
    data: Vec<f32>,
}

/// How a valid request looks, for error messages.
const EXAMPLE: &str =
    r#"{"inputs": [{"name": "payments", "shape": [N, 28], "datatype": "FP32", "data": [N*28 numbers]}]}"#;

fn parse_request(body: &[u8]) -> Result<InferRequest, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body is not an inference request: {e}; send {EXAMPLE}")))
}

impl InferRequest {
    /// The rows of the one input, row-major, checked against `PAYMENTS`.
    fn features(&self) -> Result<Vec<f32>, ApiError> {
        match self.inputs.as_slice() {
            [input] => input.features(),
            [] => Err(bad_request(format!("\"inputs\" is empty; send one input, {EXAMPLE}"))),
            more => {
                let names: Vec<&str> = more.iter().map(|i| i.name.as_str()).collect();
                Err(bad_request(format!(
                    "\"inputs\" has {} tensors ({names:?}); this model takes one, \"{}\"",
                    more.len(),
                    PAYMENTS.name
                )))
            }
        }
    }

    /// 400 for a requested output this model does not produce.
    fn check_outputs(&self) -> Result<(), ApiError> {
        match self.outputs.iter().enumerate().find(|(_, o)| o.name != CLASSIFICATION.name) {
            Some((i, o)) => Err(bad_request(format!(
                "outputs[{i}].name is \"{}\"; this model's only output is \"{}\" (or leave \"outputs\" out)",
                o.name, CLASSIFICATION.name
            ))),
            None => Ok(()),
        }
    }
}

impl RequestInput {
    fn features(&self) -> Result<Vec<f32>, ApiError> {
        if self.name != PAYMENTS.name {
            return Err(bad_request(format!(
                "inputs[0].name is \"{}\"; this model's input is \"{}\"",
                self.name, PAYMENTS.name
            )));
        }
        if self.datatype != PAYMENTS.datatype {
            return Err(bad_request(format!(
                "inputs[0].datatype is \"{}\"; the input \"{}\" is {}: send \"datatype\": \"{2}\"",
                self.datatype, PAYMENTS.name, PAYMENTS.datatype
            )));
        }
        flatten(&self.data, self.rows()?)
    }

    /// N of a `[N, 28]` shape.
    fn rows(&self) -> Result<usize, ApiError> {
        let bad_shape = || {
            bad_request(format!(
                "inputs[0].shape is {:?}; the input \"{}\" has shape {:?}: send [rows, {FEATURE_WIDTH}]",
                self.shape, PAYMENTS.name, PAYMENTS.shape
            ))
        };
        match self.shape.as_slice() {
            [rows, width] if *width == FEATURE_WIDTH as u64 => usize::try_from(*rows)
                .ok()
                .filter(|rows| rows.checked_mul(FEATURE_WIDTH).is_some())
                .ok_or_else(bad_shape),
            _ => Err(bad_shape()),
        }
    }
}

/// Tensor data of shape `[rows, 28]`, given flat (`rows * 28` numbers,
/// row-major) or in its natural nested form (`rows` lists of 28 numbers).
fn flatten(data: &[Value], rows: usize) -> Result<Vec<f32>, ApiError> {
    let nested = data.first().is_some_and(Value::is_array);
    let expected = if nested { rows } else { rows * FEATURE_WIDTH };
    if data.len() != expected {
        let form = if nested { "rows" } else { "numbers" };
        return Err(bad_request(format!(
            "inputs[0].data has {} {form}; shape [{rows}, {FEATURE_WIDTH}] needs {expected} {form} \
             (give the data flat, {} numbers row-major, or as {rows} rows of {FEATURE_WIDTH})",
            data.len(),
            rows * FEATURE_WIDTH
        )));
    }
    let mut features = Vec::with_capacity(rows * FEATURE_WIDTH);
    if !nested {
        for (k, cell) in data.iter().enumerate() {
            features.push(fp32(cell, || format!("inputs[0].data[{k}]"))?);
        }
        return Ok(features);
    }
    for (i, row) in data.iter().enumerate() {
        let cells = match row {
            Value::Array(cells) if cells.len() == FEATURE_WIDTH => cells,
            _ => {
                return Err(bad_request(format!(
                    "inputs[0].data[{i}] is not a row of {FEATURE_WIDTH} numbers; nested data must be \
                     [[{FEATURE_WIDTH} numbers], ...] throughout (or give it all flat)"
                )))
            }
        };
        for (j, cell) in cells.iter().enumerate() {
            features.push(fp32(cell, || format!("inputs[0].data[{i}][{j}]"))?);
        }
    }
    Ok(features)
}

/// A JSON number as FP32; anything else, or a number beyond FP32's range, is a 400 naming `at`.
fn fp32(cell: &Value, at: impl Fn() -> String) -> Result<f32, ApiError> {
    cell.as_f64()
        .map(|x| x as f32)
        .filter(|x| x.is_finite())
        .ok_or_else(|| bad_request(format!("{} is {cell}, not a finite FP32 number", at())))
}

async fn infer(State(s): State<ApiState>, Path(m): Path<ModelRef>, body: Result<Bytes, BytesRejection>) -> Response {
    reply(Endpoint::Infer, run_infer(&s, &m, body).await.map(Json))
}

async fn run_infer(s: &ApiState, m: &ModelRef, body: Result<Bytes, BytesRejection>) -> Result<InferResponse, ApiError> {
    let body = body?;
    resolve_model(s, m)?.ok_or(ScoringError::NoModel)?;
    let _slot = take_slot(s)?;
    let request = parse_request(&body)?;
    let features = request.features()?;
    request.check_outputs()?;
    let rows = features.len() / FEATURE_WIDTH;
    let scored = s.scoring.score_rows(features).await?;
    check_version(s, m, &scored.model.version)?;
    metrics::counter!(metric::HTTP_ROWS_SCORED).increment(rows as u64);
    Ok(InferResponse {
        model_name: s.model_name.clone(),
        model_version: scored.model.version.clone(),
        id: request.id,
        outputs: [ResponseOutput {
            name: CLASSIFICATION.name,
            datatype: CLASSIFICATION.datatype,
            shape: [rows, 2],
            data: scored.outputs.as_flattened().to_vec(),
        }],
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn request(input: Value) -> InferRequest {
        serde_json::from_value(json!({ "inputs": [input] })).unwrap()
    }

    fn row(base: f32) -> Vec<f32> {
        (0..FEATURE_WIDTH).map(|j| base + j as f32).collect()
    }

    fn error(input: Value) -> String {
        request(input).features().unwrap_err().1
    }

    #[test]
    fn reads_flat_and_nested_data_row_major() {
        let expected: Vec<f32> = [row(0.0), row(100.0)].concat();
        let flat = json!({"name": "payments", "shape": [2, 28], "datatype": "FP32", "data": expected});
        assert_eq!(request(flat).features().unwrap(), expected);
        let nested = json!({"name": "payments", "shape": [2, 28], "datatype": "FP32", "data": [row(0.0), row(100.0)]});
        assert_eq!(request(nested).features().unwrap(), expected);
        let ints = json!({"name": "payments", "shape": [1, 28], "datatype": "FP32", "data": vec![0; 28]});
        assert_eq!(request(ints).features().unwrap(), vec![0.0; 28]);
        let empty = json!({"name": "payments", "shape": [0, 28], "datatype": "FP32", "data": []});
        assert!(request(empty).features().unwrap().is_empty());
    }

    #[test]
    fn a_shape_that_is_not_rows_of_28_or_disagrees_with_the_data_is_rejected() {
        let input =
            |shape: Value, data: Value| json!({"name": "payments", "shape": shape, "datatype": "FP32", "data": data});
        assert!(error(input(json!([28]), json!(row(0.0)))).contains("shape is [28]"));
        assert!(error(input(json!([1, 27]), json!(row(0.0)))).contains("send [rows, 28]"));
        assert!(error(input(json!([1, 1, 28]), json!(row(0.0)))).contains("shape is [1, 1, 28]"));
        assert!(error(input(json!([2, 28]), json!(row(0.0)))).contains("has 28 numbers; shape [2, 28] needs 56"));
        assert!(error(input(json!([2, 28]), json!([row(0.0)]))).contains("has 1 rows; shape [2, 28] needs 2 rows"));
        assert!(error(input(json!([1, 28]), json!([vec![0.0; 27]]))).contains("data[0] is not a row of 28"));
        let mixed = json!([row(0.0), 1.0]);
        assert!(error(input(json!([2, 28]), mixed)).contains("data[1] is not a row"));
        let mut cells = vec![json!(0.0); 28];
        cells[3] = json!("x");
        assert!(error(input(json!([1, 28]), json!(cells))).contains("data[3] is \"x\", not a finite FP32 number"));
        cells[3] = json!(1e39);
        let too_big = error(input(json!([1, 28]), json!([cells])));
        assert!(too_big.contains("data[0][3] is 1e+39"), "{too_big}");
        let huge = json!(u64::MAX);
        assert!(error(input(json!([huge, 28]), json!([]))).contains("send [rows, 28]"));
    }

    #[test]
    fn another_datatype_or_input_name_is_rejected() {
        let fp64 = json!({"name": "payments", "shape": [1, 28], "datatype": "FP64", "data": row(0.0)});
        assert!(
            error(fp64).contains("datatype is \"FP64\"; the input \"payments\" is FP32: send \"datatype\": \"FP32\"")
        );
        let named = json!({"name": "input0", "shape": [1, 28], "datatype": "FP32", "data": row(0.0)});
        assert!(error(named).contains("name is \"input0\"; this model's input is \"payments\""));
        let unknown = br#"{"inputs": [{"name": "payments", "shape": [1, 28], "datatype": "fp32", "data": []}]}"#;
        assert!(parse_request(unknown).unwrap_err().1.contains("unknown variant `fp32`, expected one of `BOOL`"));
        let two: InferRequest = serde_json::from_value(json!({"inputs": [
            {"name": "payments", "shape": [1, 28], "datatype": "FP32", "data": row(0.0)},
            {"name": "extra", "shape": [1], "datatype": "BOOL", "data": [true]}
        ]}))
        .unwrap();
        assert!(two.features().unwrap_err().1.contains("has 2 tensors ([\"payments\", \"extra\"])"));
        let none: InferRequest = serde_json::from_value(json!({"inputs": []})).unwrap();
        assert!(none.features().unwrap_err().1.contains("\"inputs\" is empty"));
        assert!(parse_request(b"{}").unwrap_err().1.contains("missing field `inputs`"));
    }

    #[test]
    fn only_the_classification_output_may_be_requested() {
        let with_outputs = |outputs: Value| -> InferRequest {
            serde_json::from_value(json!({"inputs": [], "outputs": outputs})).unwrap()
        };
        assert!(with_outputs(json!([{"name": "classification"}])).check_outputs().is_ok());
        assert!(with_outputs(json!([])).check_outputs().is_ok());
        let e = with_outputs(json!([{"name": "classification"}, {"name": "logits"}])).check_outputs().unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        assert!(e.1.contains("outputs[1].name is \"logits\"; this model's only output is \"classification\""));
    }

    #[test]
    fn datatypes_are_spelled_as_the_protocol_spells_them() {
        for (datatype, text) in [(Datatype::Fp32, "FP32"), (Datatype::Uint16, "UINT16"), (Datatype::Bytes, "BYTES")] {
            assert_eq!(datatype.to_string(), text);
            assert_eq!(serde_json::to_value(datatype).unwrap(), json!(text));
        }
    }
}
