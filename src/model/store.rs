//! `ModelStore`: model versions in S3 (`s3://bucket/prefix`) or a local
//! directory, with the same layout and rules in both.
//!
//! Rules: versions are `versions/<unix-seconds>/`; `model.json` is written
//! last and marks a version complete; a version folder is never written twice
//! (Garage ignores `If-None-Match: *` on PUT, so we check first and fail).

use std::path::{Path, PathBuf};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;

use super::{sha256_hex, ModelManifest, ModelVersion, MANIFEST_FILE};

/// Where model versions live.
#[derive(Clone, Debug)]
pub enum ModelStore {
    Dir(PathBuf),
    S3 { client: aws_sdk_s3::Client, bucket: String, prefix: String },
}

/// A model-store failure, naming the location and what to check.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("model store {location}: {source}")]
    Io { location: String, source: std::io::Error },
    #[error("model store {location}: S3 {operation} failed: {message} (check AWS_ENDPOINT_URL, AWS_REGION and the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")]
    S3 { location: String, operation: &'static str, message: String },
    #[error("model store {0}: no complete model version (a version needs versions/<v>/model.json); train and publish one with fraudstream-trainer")]
    Empty(String),
    #[error("model store {0}: version not found or incomplete (no model.json)")]
    NoSuchVersion(String),
    #[error("model store {0}: version exists already; versions are immutable, publish under a new version")]
    VersionExists(String),
    #[error("model store {location}: invalid model.json: {source}")]
    BadManifest { location: String, source: serde_json::Error },
    #[error("model store {location}: its model.json says version {says:?}; a manifest copied into the wrong folder is not trusted (publish versions with fraudstream-trainer)")]
    MisplacedManifest { location: String, says: String },
    #[error("invalid model store {0:?}: expected s3://bucket[/prefix] or a directory path")]
    BadUrl(String),
}

/// Files of one version, fetched to a local folder.
#[derive(Debug, Clone)]
pub struct VersionFiles {
    pub dir: PathBuf,
    pub manifest: ModelManifest,
}

/// An S3 client from the standard AWS variables (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, profiles...).
pub async fn s3_client() -> aws_sdk_s3::Client {
    let shared = aws_config::load_from_env().await;
    // A custom endpoint (MinIO, Garage, ...) wants path-style addressing.
    let path_style = std::env::var_os("AWS_ENDPOINT_URL").is_some();
    let config = aws_sdk_s3::config::Builder::from(&shared).force_path_style(path_style).build();
    aws_sdk_s3::Client::from_conf(config)
}

fn version_number(v: &str) -> Option<ModelVersion> {
    ModelVersion::parse(v)
}

/// An `s3://bucket/key` location, parsed in one place for the model store
/// (`s3://bucket/prefix`) and the trainer's data (`s3://bucket/key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// The key or prefix, without leading or trailing slashes; may be empty.
    pub key: String,
}

impl S3Url {
    /// `None` if `text` is not an `s3://` URL; an error if it is one without a bucket.
    pub fn parse(text: &str) -> Option<Result<Self, StoreError>> {
        let rest = text.strip_prefix("s3://")?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Some(Err(StoreError::BadUrl(text.into())));
        }
        Some(Ok(Self { bucket: bucket.into(), key: key.trim_matches('/').into() }))
    }
}

impl ModelStore {
    /// Opens `s3://bucket/prefix` (credentials and endpoint from the standard
    /// AWS variables) or a directory (created on first publish).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if let Some(parsed) = S3Url::parse(url) {
            let S3Url { bucket, key: prefix } = parsed?;
            Ok(Self::S3 { client: s3_client().await, bucket, prefix })
        } else if url.is_empty() || url.contains("://") {
            Err(StoreError::BadUrl(url.into()))
        } else {
            Ok(Self::Dir(PathBuf::from(url)))
        }
    }

    /// Human-readable location, for logs and errors.
    pub fn location(&self) -> String {
        match self {
            Self::Dir(dir) => dir.display().to_string(),
            Self::S3 { bucket, prefix, .. } if prefix.is_empty() => format!("s3://{bucket}"),
            Self::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
        }
    }

    pub(super) fn key(&self, rel: &str) -> String {
        match self {
            Self::S3 { prefix, .. } if !prefix.is_empty() => format!("{prefix}/{rel}"),
            _ => rel.to_string(),
        }
    }

    fn s3_err(&self, operation: &'static str) -> impl Fn(String) -> StoreError + '_ {
        move |message| StoreError::S3 { location: self.location(), operation, message }
    }

    /// Complete versions (those with a manifest), oldest first. One LIST call
    /// per 1,000 objects on S3.
    pub async fn list_versions(&self) -> Result<Vec<String>, StoreError> {
        let mut versions = Vec::new();
        match self {
            Self::Dir(dir) => {
                let root = dir.join("versions");
                let entries = match std::fs::read_dir(&root) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(source) => return Err(StoreError::Io { location: root.display().to_string(), source }),
                };
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if version_number(&name).is_some() && entry.path().join(MANIFEST_FILE).is_file() {
                        versions.push(name);
                    }
                }
            }
            Self::S3 { client, bucket, .. } => {
                let prefix = self.key("versions/");
                let mut pages = client.list_objects_v2().bucket(bucket).prefix(&prefix).into_paginator().send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| self.s3_err("ListObjectsV2")(DisplayErrorContext(e).to_string()))?;
                    for object in page.contents() {
                        let Some(rest) = object.key().and_then(|k| k.strip_prefix(&prefix)) else { continue };
                        if let Some((version, file)) = rest.split_once('/') {
                            if file == MANIFEST_FILE && version_number(version).is_some() {
                                versions.push(version.to_string());
                            }
                        }
                    }
                }
            }
        }
        versions.sort_by_key(|v| version_number(v));
        versions.dedup();
        Ok(versions)
    }

    /// The newest complete version.
    pub async fn latest_version(&self) -> Result<Option<String>, StoreError> {
        Ok(self.list_versions().await?.pop())
    }

    /// Writes one object whole (a directory store writes then renames, so
    /// a reader never sees half of it).
    pub(super) async fn write(&self, rel: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Self::Dir(dir) => {
                let path = dir.join(rel);
                let io = |source, path: &Path| StoreError::Io { location: path.display().to_string(), source };
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| io(e, parent))?;
                }
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes).map_err(|e| io(e, &tmp))?;
                std::fs::rename(&tmp, &path).map_err(|e| io(e, &path))
            }
            Self::S3 { client, bucket, .. } => {
                let key = self.key(rel);
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .body(ByteStream::from(bytes))
                    .send()
                    .await
                    .map_err(|e| self.s3_err("PutObject")(format!("{key}: {}", DisplayErrorContext(e))))?;
                Ok(())
            }
        }
    }

    /// The names of the objects directly under `rel/`, unsorted.
    pub(super) async fn names(&self, rel: &str) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        match self {
            Self::Dir(dir) => {
                let root = dir.join(rel);
                let entries = match std::fs::read_dir(&root) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                    Err(source) => return Err(StoreError::Io { location: root.display().to_string(), source }),
                };
                names.extend(entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
            }
            Self::S3 { client, bucket, .. } => {
                let prefix = self.key(&format!("{rel}/"));
                let mut pages = client.list_objects_v2().bucket(bucket).prefix(&prefix).into_paginator().send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| self.s3_err("ListObjectsV2")(DisplayErrorContext(e).to_string()))?;
                    names.extend(
                        page.contents().iter().filter_map(|o| o.key()?.strip_prefix(&prefix)).map(String::from),
                    );
                }
            }
        }
        Ok(names)
    }

    pub(super) async fn read(&self, rel: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Self::Dir(dir) => {
                let path = dir.join(rel);
                match std::fs::read(&path) {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(StoreError::Io { location: path.display().to_string(), source }),
                }
            }
            Self::S3 { client, bucket, .. } => {
                match client.get_object().bucket(bucket).key(self.key(rel)).send().await {
                    Ok(output) => {
                        let data = output
                            .body
                            .collect()
                            .await
                            .map_err(|e| self.s3_err("GetObject")(format!("reading {rel}: {e}")))?;
                        Ok(Some(data.into_bytes().to_vec()))
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                    Err(e) => Err(self.s3_err("GetObject")(format!("{rel}: {}", DisplayErrorContext(e)))),
                }
            }
        }
    }

    fn describe(&self, version: &str) -> String {
        format!("{}/versions/{version}", self.location())
    }

    /// Copies the manifest and `files` of `version` into `dest/<version>/`
    /// (manifest first, so a version deleted meanwhile fails cleanly).
    pub async fn fetch(&self, version: &str, files: &[&str], dest: &Path) -> Result<VersionFiles, StoreError> {
        let rel = format!("versions/{version}/{MANIFEST_FILE}");
        let manifest_bytes = self.read(&rel).await?.ok_or_else(|| StoreError::NoSuchVersion(self.describe(version)))?;
        let manifest: ModelManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|source| StoreError::BadManifest { location: self.describe(version), source })?;
        if manifest.version != version {
            return Err(StoreError::MisplacedManifest {
                location: self.describe(version),
                says: manifest.version.clone(),
            });
        }
        let dir = dest.join(version);
        let io = |source, path: &Path| StoreError::Io { location: path.display().to_string(), source };
        std::fs::create_dir_all(&dir).map_err(|e| io(e, &dir))?;
        std::fs::write(dir.join(MANIFEST_FILE), &manifest_bytes).map_err(|e| io(e, &dir))?;
        for file in files {
            let bytes = self
                .read(&format!("versions/{version}/{file}"))
                .await?
                .ok_or_else(|| StoreError::NoSuchVersion(format!("{} (missing {file})", self.describe(version))))?;
            let path = dir.join(file);
            std::fs::write(&path, bytes).map_err(|e| io(e, &path))?;
        }
        Ok(VersionFiles { dir, manifest })
    }

    /// Whether anything at all exists under `versions/<version>/` (complete or not).
    async fn version_exists(&self, version: &str) -> Result<bool, StoreError> {
        match self {
            Self::Dir(dir) => Ok(dir.join("versions").join(version).exists()),
            Self::S3 { client, bucket, .. } => {
                let listing = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(self.key(&format!("versions/{version}/")))
                    .max_keys(1)
                    .send()
                    .await
                    .map_err(|e| self.s3_err("ListObjectsV2")(DisplayErrorContext(e).to_string()))?;
                Ok(listing.key_count().unwrap_or(0) > 0)
            }
        }
    }

    /// Publishes a new version: every file in `files`, then the manifest last,
    /// listing each file's sha256. Fails without writing if the version folder
    /// exists (and where a store cannot tell, the hashes expose a mix).
    pub async fn publish(&self, manifest: &ModelManifest, files: &[(&str, Vec<u8>)]) -> Result<(), StoreError> {
        let mut manifest = manifest.clone();
        manifest.files = files.iter().map(|(name, bytes)| (name.to_string(), sha256_hex(bytes))).collect();
        let manifest = &manifest;
        let version = &manifest.version;
        if version_number(version).is_none() {
            return Err(StoreError::BadUrl(format!("version {version:?} is not unix seconds")));
        }
        if self.version_exists(version).await? {
            return Err(StoreError::VersionExists(self.describe(version)));
        }
        let manifest_bytes = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        match self {
            Self::Dir(dir) => {
                let versions = dir.join("versions");
                let target = versions.join(version);
                let io = |source, path: &Path| StoreError::Io { location: path.display().to_string(), source };
                std::fs::create_dir_all(&versions).map_err(|e| io(e, &versions))?;
                // create_dir fails if another publisher got there first.
                std::fs::create_dir(&target).map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => StoreError::VersionExists(self.describe(version)),
                    _ => io(e, &target),
                })?;
                for (name, bytes) in files.iter().chain(std::iter::once(&(MANIFEST_FILE, manifest_bytes))) {
                    // Write-then-rename, so a reader never sees half a file.
                    let tmp = target.join(format!(".{name}.tmp"));
                    std::fs::write(&tmp, bytes).map_err(|e| io(e, &tmp))?;
                    std::fs::rename(&tmp, target.join(name)).map_err(|e| io(e, &target))?;
                }
            }
            Self::S3 { client, bucket, .. } => {
                for (name, bytes) in files.iter().chain(std::iter::once(&(MANIFEST_FILE, manifest_bytes))) {
                    let key = self.key(&format!("versions/{version}/{name}"));
                    client
                        .put_object()
                        .bucket(bucket)
                        .key(&key)
                        .body(ByteStream::from(bytes.clone()))
                        .send()
                        .await
                        .map_err(|e| self.s3_err("PutObject")(format!("{key}: {}", DisplayErrorContext(e))))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_are_parsed_in_one_place() {
        assert!(S3Url::parse("models").is_none(), "a directory, not a URL");
        let u = S3Url::parse("s3://b/some/prefix/").unwrap().unwrap();
        assert_eq!((u.bucket.as_str(), u.key.as_str()), ("b", "some/prefix"));
        let u = S3Url::parse("s3://b").unwrap().unwrap();
        assert_eq!((u.bucket.as_str(), u.key.as_str()), ("b", ""));
        assert!(matches!(S3Url::parse("s3:///key"), Some(Err(StoreError::BadUrl(_)))));
    }

    #[test]
    fn versions_sort_as_numbers() {
        assert!(ModelVersion::parse("1000000000").unwrap() > ModelVersion::parse("999").unwrap());
        assert_eq!(ModelVersion::parse("v1"), None);
        assert_eq!(ModelVersion(41).next().to_string(), "42");
    }
}
