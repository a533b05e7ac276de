//! Helpers shared by the integration tests: where the real broker and S3
//! store are (`scripts/test-services env`), and unique names so tests can
//! share one broker and one bucket.
#![allow(dead_code)]

use fraudstream::kafka::KafkaArgs;

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: integration tests need the real broker and S3 store. \
             Run `make test`, or `scripts/test-services start && eval \"$(scripts/test-services env)\"` first."
        )
    })
}

/// The test broker (tansu on 127.0.0.1:9092 under `make test`).
pub fn kafka() -> KafkaArgs {
    KafkaArgs::new(required_env("FRAUDSTREAM_TEST_BROKERS"))
}

/// The test bucket in the S3 store (Garage under `make test`).
pub fn bucket() -> String {
    required_env("FRAUDSTREAM_TEST_BUCKET")
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// An S3 client from the standard AWS variables, as the product builds it.
pub async fn s3_client() -> aws_sdk_s3::Client {
    required_env("AWS_ENDPOINT_URL");
    fraudstream::model::s3_client().await
}
