//! The scorer with a Confluent Schema Registry, against an HTTP server the
//! test starts that implements the registry's documented REST API
//! (`POST /subjects/{s}/versions`, `GET /schemas/ids/{id}`,
//! `GET /subjects/{s}/versions/latest`, its error bodies): no registry
//! server can be installed from this project's registries.

mod common;
#[path = "faults/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use fraudstream::codec::{Codec, WireFormat, PAYMENT_SCHEMA_JSON};
use fraudstream::Payment;
use harness::{payments, read_outputs, verify_outputs, Scorer, Setup};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use serde_json::{json, Value};

/// The registry's state: schemas by id, subjects' versions (ids), subjects that refuse new schemas.
#[derive(Default)]
struct Registry {
    schemas: Vec<String>,
    subjects: HashMap<String, Vec<u32>>,
    incompatible: Vec<String>,
}

type Shared = Arc<Mutex<Registry>>;

fn error(status: StatusCode, code: i64, message: String) -> (StatusCode, Json<Value>) {
    (status, Json(json!({ "error_code": code, "message": message })))
}

async fn register(State(r): State<Shared>, Path(subject): Path<String>, body: String) -> (StatusCode, Json<Value>) {
    let Ok(request) = serde_json::from_str::<Value>(&body) else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema".into());
    };
    let schema = request["schema"].as_str().unwrap_or_default().to_string();
    let mut r = r.lock().unwrap();
    if r.incompatible.contains(&subject) {
        let message =
            format!("Schema being registered is incompatible with an earlier schema for subject \"{subject}\"");
        return error(StatusCode::CONFLICT, 409, message);
    }
    let id = match r.schemas.iter().position(|s| *s == schema) {
        Some(i) => i as u32 + 1,
        None => {
            r.schemas.push(schema);
            r.schemas.len() as u32
        }
    };
    let versions = r.subjects.entry(subject).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    (StatusCode::OK, Json(json!({ "id": id })))
}

async fn by_id(State(r): State<Shared>, Path(id): Path<u32>) -> (StatusCode, Json<Value>) {
    let r = r.lock().unwrap();
    match r.schemas.get((id as usize).wrapping_sub(1)) {
        Some(schema) => (StatusCode::OK, Json(json!({ "schema": schema }))),
        None => error(StatusCode::NOT_FOUND, 40403, format!("Schema {id} not found")),
    }
}

async fn latest(State(r): State<Shared>, Path(subject): Path<String>) -> (StatusCode, Json<Value>) {
    let r = r.lock().unwrap();
    match r.subjects.get(&subject) {
        Some(versions) => {
            let id = *versions.last().unwrap();
            let schema = &r.schemas[id as usize - 1];
            (StatusCode::OK, Json(json!({ "subject": subject, "version": versions.len(), "id": id, "schema": schema })))
        }
        None => error(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found.")),
    }
}

/// A registry server on a fixed port that can go down and come back with its state.
struct RegistryServer {
    addr: SocketAddr,
    state: Shared,
    stop: Option<tokio_util::sync::CancellationToken>,
}

impl RegistryServer {
    fn new() -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], harness::free_port()));
        Self { addr, state: Shared::default(), stop: None }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn start(&mut self) {
        let app = Router::new()
            .route("/subjects/{subject}/versions", post(register))
            .route("/subjects/{subject}/versions/latest", get(latest))
            .route("/schemas/ids/{id}", get(by_id))
            .with_state(self.state.clone());
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(until.cancelled_owned()).await });
        self.stop = Some(stop);
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
    }

    /// Registers `schema` under `subject` as a producer would; its id.
    async fn register(&self, subject: &str, schema: &str) -> u32 {
        let reply: Value = reqwest::Client::new()
            .post(format!("{}/subjects/{subject}/versions", self.url()))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(json!({ "schema": schema }).to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        reply["id"].as_u64().unwrap() as u32
    }

    async fn latest_id(&self, subject: &str) -> Option<u32> {
        let reply: Value =
            reqwest::get(format!("{}/subjects/{subject}/versions/latest", self.url())).await.ok()?.json().await.ok()?;
        reply["id"].as_u64().map(|id| id as u32)
    }
}

/// `Payment` evolved by another team: `channel` added (with a default), the
/// optional `fraud` removed. A compatible evolution: it resolves to ours.
fn evolved_schema() -> String {
    let mut schema: Value = serde_json::from_str(PAYMENT_SCHEMA_JSON).unwrap();
    let fields = schema["fields"].as_array_mut().unwrap();
    fields.retain(|f| f["name"] != "fraud");
    fields.push(json!({"name": "channel", "type": "string", "default": "card"}));
    schema.to_string()
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct EvolvedPayment {
    payment_id: String,
    event_time: i64,
    step: i32,
    customer: String,
    age: String,
    gender: String,
    zipcode_ori: String,
    merchant: String,
    zip_merchant: String,
    category: String,
    amount: f64,
    channel: String,
}

/// `payments` written with the evolved schema, as apache-avro writes them, behind `id`.
fn evolved_records(payments: &[Payment], id: u32) -> Vec<(String, Vec<u8>)> {
    let schema = apache_avro::Schema::parse_str(&evolved_schema()).unwrap();
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema).build().unwrap();
    payments
        .iter()
        .map(|p| {
            let evolved = EvolvedPayment {
                payment_id: p.payment_id.clone(),
                event_time: p.event_time,
                step: p.step,
                customer: p.customer.clone(),
                age: p.age.clone(),
                gender: p.gender.clone(),
                zipcode_ori: p.zipcode_ori.clone(),
                merchant: p.merchant.clone(),
                zip_merchant: p.zip_merchant.clone(),
                category: p.category.clone(),
                amount: p.amount,
                channel: "app".into(),
            };
            let mut bytes = vec![0];
            bytes.extend_from_slice(&id.to_be_bytes());
            writer.write_ser(&mut bytes, &evolved).unwrap();
            (p.customer.clone(), bytes)
        })
        .collect()
}

fn ours(payments: &[Payment], id: u32) -> Vec<(String, Vec<u8>)> {
    common::keyed_records(&Codec::new(WireFormat::Confluent, id), payments)
}

async fn everything(kafka: &fraudstream::kafka::KafkaArgs, topic: &str) -> Vec<OwnedMessage> {
    common::read_topic(kafka, topic, Duration::from_secs(4), |_| false).await
}

fn registry_args(url: &str) -> Vec<String> {
    vec!["--schema-registry-url".into(), url.into()]
}

/// Payments written with our schema and with an evolved one are all scored
/// and right; outputs carry the id the registry gave the output schema under
/// `<output topic>-value`; a record whose id the registry does not know is
/// dead-lettered, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evolved_writers_are_scored_and_outputs_carry_the_registered_id() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(2).await;
    let mut registry = RegistryServer::new();
    registry.start().await;
    let subject = format!("{topic}-value");
    let our_id = registry.register(&subject, PAYMENT_SCHEMA_JSON).await;
    let evolved_id = registry.register(&subject, &evolved_schema()).await;
    assert_ne!(our_id, evolved_id);
    let sent = payments(4_000, 71);
    let (plain, evolved) = sent.split_at(2_000);
    let mut records = ours(plain, our_id);
    records.extend(evolved_records(evolved, evolved_id));
    let mut unknown = ours(&payments(10, 72), 9_999);
    for (key, _) in &mut unknown {
        key.push_str("-unknown");
    }
    records.extend(unknown);
    common::publish(&common::input_producer(), &topic, &records).await;

    let args = registry_args(&registry.url());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args);
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    scorer.stop();
    let verified = verify_outputs(&sent, &outputs, &store, "schema registry: evolved writers");
    assert_eq!(verified.outputs, sent.len());
    let output_id = registry.latest_id(&format!("{topic}-out-value")).await.expect("the output schema is registered");
    for m in &outputs {
        assert_eq!(m.payload().unwrap()[1..5], output_id.to_be_bytes(), "an output without the registered id");
    }
    let dead = everything(&kafka, &format!("{topic}-dlq")).await;
    assert_eq!(dead.len(), 10, "only the unknown-id records are dead-lettered");
    for m in &dead {
        let headers = m.headers().unwrap();
        let header = |key: &str| {
            headers.iter().find(|h| h.key == key).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).to_string())
        };
        assert_eq!(header("fraudstream.schema.id").as_deref(), Some("9999"));
        assert_eq!(header("fraudstream.error.reason").as_deref(), Some("undecodable"));
        assert!(
            header("fraudstream.error").is_some_and(|e| e.contains("9999") && e.contains("not found")),
            "{:?}",
            header("fraudstream.error")
        );
    }
    registry.stop();
}

/// The registry is down when the scorer starts (it waits, not ready, and
/// consumes nothing), comes up (the scorer registers and scores), goes down
/// again while records with a writer schema the scorer has not seen arrive
/// (it waits; nothing is dead-lettered or lost), and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_outage_at_start_and_mid_stream_loses_nothing() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(2).await;
    let mut registry = RegistryServer::new();
    let args = registry_args(&registry.url());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args);
    scorer
        .wait_until("not ready, waiting for the registry", Duration::from_secs(60), async |s| {
            let Ok(reply) = reqwest::get(format!("{}/readyz", s.http)).await else { return false };
            let body: Value = reply.json().await.unwrap_or_default();
            body["reason"].as_str().is_some_and(|r| r.contains("schema registry"))
        })
        .await;
    registry.start().await;
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    let subject = format!("{topic}-value");
    let our_id = registry.register(&subject, PAYMENT_SCHEMA_JSON).await;
    let evolved_id = registry.register(&subject, &evolved_schema()).await;
    let sent = payments(3_000, 73);
    let (first, later) = sent.split_at(1_000);
    common::publish(&common::input_producer(), &topic, &ours(first, our_id)).await;
    read_outputs(&kafka, &format!("{topic}-out"), first, Duration::from_secs(30)).await;

    registry.stop();
    common::publish(&common::input_producer(), &topic, &evolved_records(later, evolved_id)).await;
    scorer
        .wait_until("not ready while the registry is down", Duration::from_secs(60), async |s| !s.ready().await)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(scorer.alive(), "the scorer exited:\n{}", scorer.log());
    assert_eq!(scorer.metric("fraudstream_events_dead_lettered_total").await, 0.0);
    registry.start().await;
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    scorer.stop();
    let verified = verify_outputs(&sent, &outputs, &store, "schema registry: outages");
    assert_eq!(verified.outputs, sent.len());
    assert!(everything(&kafka, &format!("{topic}-dlq")).await.is_empty(), "valid events were dead-lettered");
    registry.stop();
}

/// A registry that refuses the output schema (incompatible) stops the scorer
/// at start with the registry's message, before anything is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_output_schema_stops_the_scorer_at_start() {
    let Setup { dir, kafka, store: _, store_url, topic, group } = Setup::new(1).await;
    let mut registry = RegistryServer::new();
    registry.state.lock().unwrap().incompatible.push(format!("{topic}-out-value"));
    registry.start().await;
    let args = registry_args(&registry.url());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = scorer.child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = scorer.log();
    assert!(status.is_some_and(|s| !s.success()), "the scorer did not fail:\n{log}");
    assert!(log.contains("incompatible with an earlier schema"), "{log}");
    registry.stop();
}
