//! What the REST API tests share: a real model trained and published into a
//! local store, served on an ephemeral port, and a plain HTTP client.
#![allow(dead_code)]

use std::time::Duration;

use fraudstream::api::{router, ApiState};
use fraudstream::model::{Model, ModelStore, MODEL_FILE};
use fraudstream::scoring::ScoringService;
use fraudstream::Payment;
use reqwest::StatusCode;
use serde_json::Value;

use crate::common;

pub struct Server {
    pub base: String,
    pub scoring: ScoringService,
    pub version: String,
    pub model_dir: std::path::PathBuf,
    pub _dir: tempfile::TempDir,
}

/// Trains a small model into a local store and serves it on an ephemeral port.
pub async fn serve(body_limit: usize) -> Server {
    serve_with(body_limit, fraudstream::api::DEFAULT_REST_CONCURRENCY).await
}

/// `serve`, with at most `concurrency` scoring requests at once.
pub async fn serve_with(body_limit: usize, concurrency: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("models").display().to_string();
    let outcome = common::train_and_publish(&store, 20_000, 4, false).await;
    let files = ModelStore::open(&store)
        .await
        .unwrap()
        .fetch(&outcome.version, &[MODEL_FILE], &dir.path().join("cache"))
        .await
        .unwrap();
    let scoring = ScoringService::start(1024, 64);
    scoring.swap(Model::load(&files.dir, tch::Device::Cpu).unwrap()).await.unwrap();
    let base = start_http_with(scoring.clone(), body_limit, concurrency).await;
    Server { base, scoring, version: outcome.version, model_dir: files.dir, _dir: dir }
}

pub async fn start_http(scoring: ScoringService, body_limit: usize) -> String {
    start_http_with(scoring, body_limit, fraudstream::api::DEFAULT_REST_CONCURRENCY).await
}

pub async fn start_http_with(scoring: ScoringService, body_limit: usize, concurrency: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(ApiState::new(scoring, "payfraud", None, concurrency), body_limit);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// The original demo's example: a fraud payment in es_health, age 3, male.
pub fn demo_row() -> Vec<f64> {
    let mut row = vec![0.0; 28];
    row[0] = 0.005313;
    row[5] = 1.0;
    row[19] = 1.0;
    row[26] = 1.0;
    row
}

pub fn demo_payment() -> Payment {
    Payment {
        payment_id: "demo-1".into(),
        event_time: 0,
        step: 0,
        customer: "C1".into(),
        age: "3".into(),
        gender: "M".into(),
        zipcode_ori: "28007".into(),
        merchant: "M1053599405".into(),
        zip_merchant: "28007".into(),
        category: "es_health".into(),
        amount: 44.26,
        fraud: None,
    }
}

pub async fn call(method: reqwest::Method, url: &str, body: Option<String>) -> (StatusCode, Value) {
    let client = reqwest::Client::new();
    let mut request = client.request(method, url).timeout(Duration::from_secs(30));
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

pub async fn get(url: &str) -> (StatusCode, Value) {
    call(reqwest::Method::GET, url, None).await
}

pub async fn post(url: &str, body: Value) -> (StatusCode, Value) {
    call(reqwest::Method::POST, url, Some(body.to_string())).await
}

/// Sends `n` copies of `body` to `url` at once against a concurrency limit of
/// 1: some are served, the others refused with 429; the refusals' bodies.
pub async fn flood(url: &str, body: String, n: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let requests = (0..n).map(|_| {
        let request = client.post(url).header("content-type", "application/json").body(body.clone());
        async move {
            let response = request.send().await.expect("request");
            (response.status(), response.text().await.unwrap())
        }
    });
    let answers = futures::future::join_all(requests).await;
    let ok = answers.iter().filter(|(status, _)| *status == StatusCode::OK).count();
    let refused: Vec<String> = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::TOO_MANY_REQUESTS)
        .map(|(_, body)| body.clone())
        .collect();
    assert!(ok >= 1, "no request was served: {answers:?}");
    assert!(!refused.is_empty(), "{n} concurrent requests with a limit of 1, none refused");
    assert_eq!(ok + refused.len(), n, "only 200 or 429 expected");
    refused
}
