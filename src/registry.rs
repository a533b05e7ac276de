//! Confluent Schema Registry: the client, and the writer-schema cache that
//! lets records written with any registered schema be read as ours.
//!
//! Why: in Kafka shops, Avro on a topic means the Confluent wire format with
//! a registry. Producers register their schema under the topic's subject
//! (`<topic>-value`, TopicNameStrategy) and write the id it returns;
//! consumers fetch the writer schema by id and resolve it to their own. So
//! the scorer registers its output schema and writes that id, and reads each
//! input record with the schema it was written with: the hand-written fast
//! path when that schema is ours, apache-avro's schema resolution otherwise.
//!
//! Failure rules (fail closed): a registry that cannot be reached or answers
//! 5xx is transient, retried with backoff for as long as it takes, and never
//! a reason to dead-letter a valid event; an unknown id or a writer schema
//! that does not resolve to ours is the record's fault (dead-lettered).
//! Credentials come from the environment only (`SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`,
//! as `user:password`), and `SCHEMA_REGISTRY_CA_LOCATION` names a PEM CA.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::Schema;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::codec::CONFLUENT_MAGIC;

/// The `Content-Type` the registry's API documents.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
/// Longest wait between retries of an unreachable registry.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The subject of a topic's record values (TopicNameStrategy).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// Where the registry is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    pub url: String,
    /// `user:password` for HTTP basic auth, from `SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`.
    pub basic_auth: Option<String>,
    /// A PEM file of the CA that signed the registry's certificate, from `SCHEMA_REGISTRY_CA_LOCATION`.
    pub ca_location: Option<String>,
}

impl RegistryConfig {
    /// `url` with credentials and CA from the environment.
    pub fn from_env(url: impl Into<String>) -> Self {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Self {
            url: url.into().trim_end_matches('/').to_string(),
            basic_auth: var("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"),
            ca_location: var("SCHEMA_REGISTRY_CA_LOCATION"),
        }
    }
}

/// Why the registry did not answer as hoped.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry {url} cannot be reached: {source} (retrying)")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("schema registry {url} answered {status}: {message} (retrying)")]
    Unavailable { url: String, status: u16, message: String },
    #[error("schema registry {url} refused: {status} (error code {code}): {message}")]
    Refused { url: String, status: u16, code: i64, message: String },
    #[error("schema registry {url}: unexpected answer ({reason})")]
    BadAnswer { url: String, reason: String },
    #[error("schema registry settings: {0}")]
    Config(String),
}

impl RegistryError {
    /// Worth retrying: the registry is down or overloaded, not saying no.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Unavailable { .. })
    }
}

/// A client of the registry's REST API.
#[derive(Clone)]
pub struct SchemaRegistry {
    http: reqwest::Client,
    config: RegistryConfig,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("SchemaRegistry").field("url", &self.config.url).finish()
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error_code: Option<i64>,
    message: Option<String>,
}

impl SchemaRegistry {
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(path) = &config.ca_location {
            let pem = std::fs::read(path)
                .map_err(|e| RegistryError::Config(format!("reading SCHEMA_REGISTRY_CA_LOCATION {path}: {e}")))?;
            let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                RegistryError::Config(format!("SCHEMA_REGISTRY_CA_LOCATION {path} is not a PEM CA: {e}"))
            })?;
            http = http.add_root_certificate(ca);
        }
        let http = http.build().map_err(|e| RegistryError::Config(e.to_string()))?;
        Ok(Self { http, config })
    }

    pub fn url(&self) -> &str {
        &self.config.url
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> Result<serde_json::Value, RegistryError> {
        let url = self.config.url.clone();
        let request = match self.config.basic_auth.as_deref().and_then(|a| a.split_once(':')) {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        };
        let response = request
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .await
            .map_err(|source| RegistryError::Unreachable { url: url.clone(), source })?;
        let status = response.status();
        let text = response.text().await.map_err(|source| RegistryError::Unreachable { url: url.clone(), source })?;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| RegistryError::BadAnswer { url, reason: e.to_string() });
        }
        let body: Option<ErrorBody> = serde_json::from_str(&text).ok();
        let message = body.as_ref().and_then(|b| b.message.clone()).unwrap_or(text);
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(RegistryError::Unavailable { url, status: status.as_u16(), message });
        }
        let code = body.and_then(|b| b.error_code).unwrap_or(i64::from(status.as_u16()));
        Err(RegistryError::Refused { url, status: status.as_u16(), code, message })
    }

    /// Registers `schema` under `subject` (or finds it there) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let url = format!("{}/subjects/{subject}/versions", self.config.url);
        let body = serde_json::json!({ "schema": schema });
        let request = self.http.post(url).header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE).body(body.to_string());
        let answer = self.call(request).await?;
        self.id_of(&answer)
    }

    /// The schema registered as `id`, as JSON text.
    pub async fn schema(&self, id: u32) -> Result<String, RegistryError> {
        let answer = self.call(self.http.get(format!("{}/schemas/ids/{id}", self.config.url))).await?;
        answer["schema"].as_str().map(str::to_string).ok_or_else(|| RegistryError::BadAnswer {
            url: self.config.url.clone(),
            reason: format!("no \"schema\" in the answer for id {id}"),
        })
    }

    fn id_of(&self, answer: &serde_json::Value) -> Result<u32, RegistryError> {
        answer["id"].as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| RegistryError::BadAnswer {
            url: self.config.url.clone(),
            reason: format!("no schema id in {answer}"),
        })
    }

    /// `register`, retried while the registry is unreachable, until `stop`
    /// (then `None`). `waiting` hears why it waits.
    pub async fn register_until(
        &self,
        subject: &str,
        schema: &str,
        stop: &CancellationToken,
        waiting: impl Fn(Option<String>),
    ) -> Result<Option<u32>, RegistryError> {
        retry(stop, waiting, || self.register(subject, schema)).await
    }
}

/// Runs `call` until it succeeds, fails for good, or `stop` is cancelled.
async fn retry<T, F: std::future::Future<Output = Result<T, RegistryError>>>(
    stop: &CancellationToken,
    waiting: impl Fn(Option<String>),
    mut call: impl FnMut() -> F,
) -> Result<Option<T>, RegistryError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(value) => {
                waiting(None);
                return Ok(Some(value));
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "schema registry unavailable; retrying");
                waiting(Some(e.to_string()));
                tokio::select! {
                    _ = stop.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// What is known of one writer schema id.
#[derive(Debug)]
enum Writer {
    /// Our own schema: the hand-written codec reads it.
    Ours,
    /// Another schema, resolved to ours record by record.
    Other(Schema),
    /// Not readable as ours, for good (unknown id, not a schema).
    Unusable(String),
}

/// Why a record could not be read; the message names the schema id.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("schema id {schema_id}: {reason}")]
pub struct WriterSchemaError {
    pub schema_id: u32,
    pub reason: String,
}

/// The writer schemas of one topic's records, fetched once per id.
pub struct WriterSchemas {
    registry: SchemaRegistry,
    /// Our schema of the record type (the reader's).
    reader: Schema,
    known: Mutex<HashMap<u32, Arc<Writer>>>,
}

impl std::fmt::Debug for WriterSchemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = self.known.lock().map(|k| k.len()).unwrap_or(0);
        f.debug_struct("WriterSchemas").field("registry", &self.registry).field("known", &known).finish()
    }
}

impl WriterSchemas {
    /// Reads records as `reader_schema` (ours, JSON text).
    pub fn new(registry: SchemaRegistry, reader_schema: &str) -> Self {
        let reader = Schema::parse_str(reader_schema).expect("the compiled-in schemas parse");
        Self { registry, reader, known: Mutex::default() }
    }

    /// The writer schema id of a Confluent-format record, if it is one.
    pub fn schema_id(bytes: &[u8]) -> Option<u32> {
        match bytes {
            [CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }

    fn get(&self, id: u32) -> Option<Arc<Writer>> {
        self.known.lock().expect("writer schema cache lock").get(&id).cloned()
    }

    /// Makes sure every id of `records` is known, fetching those that are not
    /// (retrying while the registry is unreachable); false if `stop` came first.
    pub async fn learn<'a>(
        &self,
        records: impl IntoIterator<Item = &'a [u8]>,
        stop: &CancellationToken,
        waiting: impl Fn(Option<String>) + Copy,
    ) -> bool {
        let mut missing: Vec<u32> =
            records.into_iter().filter_map(Self::schema_id).filter(|id| self.get(*id).is_none()).collect();
        missing.sort_unstable();
        missing.dedup();
        for id in missing {
            let writer = match retry(stop, waiting, || self.registry.schema(id)).await {
                Ok(None) => return false,
                Ok(Some(text)) => match Schema::parse_str(&text) {
                    Ok(schema) if schema.canonical_form() == self.reader.canonical_form() => Writer::Ours,
                    Ok(schema) => Writer::Other(schema),
                    Err(e) => Writer::Unusable(format!("the registry's schema does not parse: {e}")),
                },
                Err(e) => Writer::Unusable(e.to_string()),
            };
            tracing::info!(schema_id = id, writer = ?writer_kind(&writer), "writer schema learned");
            self.known.lock().expect("writer schema cache lock").insert(id, Arc::new(writer));
        }
        true
    }

    /// Reads a Confluent-format record whose id `learn` has seen: `fast` for
    /// our own schema, apache-avro's resolution from the writer's otherwise.
    /// `None` if the record is not in the Confluent format or its id is not
    /// learned (the caller's plain codec then judges it).
    pub fn read<T: DeserializeOwned>(
        &self,
        bytes: &[u8],
        fast: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Option<Result<T, WriterSchemaError>> {
        let schema_id = Self::schema_id(bytes)?;
        let writer = self.get(schema_id)?;
        let fail = |reason: String| Err(WriterSchemaError { schema_id, reason });
        Some(match writer.as_ref() {
            Writer::Ours => fast(bytes).or_else(fail),
            Writer::Unusable(reason) => fail(reason.clone()),
            Writer::Other(schema) => {
                let mut body = &bytes[5..];
                let read = apache_avro::reader::datum::GenericDatumReader::builder(schema)
                    .reader_schema(&self.reader)
                    .build()
                    .and_then(|reader| reader.read_value(&mut body));
                match read {
                    Err(e) => fail(format!("does not resolve to fraudstream's schema: {e}")),
                    Ok(_) if !body.is_empty() => fail(format!("{} trailing bytes after the body", body.len())),
                    Ok(value) => apache_avro::from_value(&value).or_else(|e| fail(e.to_string())),
                }
            }
        })
    }
}

/// Reads `bytes` by its writer schema where `schemas` knows it (after
/// `learn`), else with `fast` (the plain codec): the one rule every reader
/// of our topics follows.
pub fn read_with<T: DeserializeOwned>(
    schemas: Option<&WriterSchemas>,
    bytes: &[u8],
    fast: impl FnOnce(&[u8]) -> Result<T, String> + Copy,
) -> Result<T, String> {
    match schemas.and_then(|s| s.read(bytes, fast)) {
        Some(read) => read.map_err(|e| e.to_string()),
        None => fast(bytes),
    }
}

fn writer_kind(writer: &Writer) -> &'static str {
    match writer {
        Writer::Ours => "fraudstream's own",
        Writer::Other(_) => "resolved to fraudstream's",
        Writer::Unusable(_) => "unusable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_ids() {
        assert_eq!(value_subject("payments"), "payments-value");
        assert_eq!(WriterSchemas::schema_id(&[0, 0, 0, 1, 2, 9]), Some(258));
        assert_eq!(WriterSchemas::schema_id(&[1, 0, 0, 1, 2, 9]), None);
        assert_eq!(WriterSchemas::schema_id(&[0, 0, 0]), None);
    }

    #[test]
    fn settings_come_from_the_environment_and_stay_out_of_debug() {
        let config = RegistryConfig {
            url: "http://127.0.0.1:1".into(),
            basic_auth: Some("user:secret".into()),
            ca_location: None,
        };
        let registry = SchemaRegistry::new(config).unwrap();
        assert!(!format!("{registry:?}").contains("secret"));
        assert_eq!(RegistryConfig::from_env("http://r:8081/").url, "http://r:8081");
    }
}
