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

/// The test broker (Apache Kafka on 127.0.0.1:9092 under `make test`).
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

/// Trains on `rows` simulated payments and publishes to `store` (a real
/// training run, kept small so tests stay quick).
pub async fn train_and_publish(store: &str, rows: u64, seed: u64, force: bool) -> fraudstream::training::RunOutcome {
    use fraudstream::training::{data::DataSource, run_once, train::TrainConfig, TrainerOptions};
    run_once(&TrainerOptions {
        data: DataSource::Simulator { rows, seed },
        model_store: store.to_string(),
        model_name: "payfraud".into(),
        device: fraudstream::model::Device::Cpu,
        target_precision: None,
        force,
        train: TrainConfig { seed, max_epochs: 8, ..TrainConfig::default() },
        ..TrainerOptions::default()
    })
    .await
    .expect("training run")
}

/// A model store under a fresh prefix of the test bucket.
pub fn s3_store() -> String {
    format!("s3://{}/{}", bucket(), unique("models"))
}

/// How test input is produced: as production producers do, idempotent, in
/// lz4-compressed multi-record batches, so a consumer resuming from a
/// committed offset usually starts in the middle of one.
pub const INPUT_PRODUCER_SETTINGS: [(&str, &str); 4] =
    [("enable.idempotence", "true"), ("compression.type", "lz4"), ("linger.ms", "20"), ("batch.num.messages", "10000")];

/// A producer for test input on the test broker (`INPUT_PRODUCER_SETTINGS`).
pub fn input_producer() -> rdkafka::producer::FutureProducer {
    kafka().client_config(&INPUT_PRODUCER_SETTINGS).create().expect("producer")
}

/// Publishes raw (key, payload) records and waits for every ack.
pub async fn publish(producer: &rdkafka::producer::FutureProducer, topic: &str, records: &[(String, Vec<u8>)]) {
    use rdkafka::producer::FutureRecord;
    // In chunks, so the producer's local queue never overflows.
    for chunk in records.chunks(20_000) {
        let deliveries: Vec<_> = chunk
            .iter()
            .map(|(key, payload)| {
                producer.send_result(FutureRecord::to(topic).key(key).payload(payload)).expect("enqueue")
            })
            .collect();
        for d in deliveries {
            d.await.expect("delivery").expect("broker ack");
        }
    }
}

/// The project's read-only `shared/` folder: beside the checkout, or FRAUDSTREAM_SHARED_DIR.
pub fn shared_dir() -> std::path::PathBuf {
    std::env::var_os("FRAUDSTREAM_SHARED_DIR")
        .map_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"), Into::into)
}

/// Payments as (customer key, encoded payload) records, as producers key them.
pub fn keyed_records(codec: &fraudstream::Codec, payments: &[fraudstream::Payment]) -> Vec<(String, Vec<u8>)> {
    payments.iter().map(|p| (p.customer.clone(), codec.encode_payment(p).unwrap())).collect()
}

/// Publishes `records` with a test input producer on a task of its own,
/// so a test can act on the scorer while input still arrives.
pub fn publish_in_background(topic: &str, records: Vec<(String, Vec<u8>)>) -> tokio::task::JoinHandle<()> {
    let topic = topic.to_string();
    tokio::spawn(async move { publish(&input_producer(), &topic, &records).await })
}

/// Publishes `records` at about `per_second` (a tenth of it every 100 ms)
/// on a task of its own, so a fault can strike while input still arrives.
pub fn publish_paced(topic: &str, records: Vec<(String, Vec<u8>)>, per_second: usize) -> tokio::task::JoinHandle<()> {
    let topic = topic.to_string();
    tokio::spawn(async move {
        let producer = input_producer();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        for chunk in records.chunks((per_second / 10).max(1)) {
            tick.tick().await;
            publish(&producer, &topic, chunk).await;
        }
    })
}

/// Reads a topic from the beginning until `until` says stop or nothing new
/// arrives for `idle`. `until` may be costly, so it is asked every thousand
/// messages and when the topic goes quiet.
pub async fn read_topic(
    kafka: &KafkaArgs,
    topic: &str,
    idle: std::time::Duration,
    mut until: impl FnMut(&[rdkafka::message::OwnedMessage]) -> bool,
) -> Vec<rdkafka::message::OwnedMessage> {
    use futures::StreamExt;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let group = unique("reader");
    let consumer: StreamConsumer = kafka
        .client_config(&[("group.id", &group), ("enable.auto.commit", "false"), ("auto.offset.reset", "earliest")])
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let mut checked = 0;
    let mut stream = consumer.stream();
    loop {
        if out.is_empty() || out.len() >= checked + 1000 {
            checked = out.len();
            if until(&out) {
                break;
            }
        }
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(m))) => out.push(m.detach()),
            Ok(Some(Err(e))) => panic!("reading {topic}: {e}"),
            _ => break,
        }
    }
    out
}

/// A feature group as the tests write it out: name, columns, the value reasons show.
pub type Group = (&'static str, std::ops::Range<usize>, String);

/// The original demo's four groups of `payment`, written out.
pub fn payment_groups(payment: &fraudstream::Payment) -> Vec<Group> {
    vec![
        ("amount", 0..1, format!("{:.2}", payment.amount)),
        ("category", 1..16, payment.category.clone()),
        ("age", 16..24, payment.age.clone()),
        ("gender", 24..28, payment.gender.clone()),
    ]
}

/// Reason codes for `payment`, computed here without fraudstream's reason
/// code: the payment's row, and one copy per feature group (the original
/// demo's layout, written out) with that group's columns set to the
/// version's training reference, scored in one forward pass; each group's
/// contribution is P(fraud) minus its copy's, the three largest first.
pub fn independent_reasons(
    model: &fraudstream::model::Model,
    payment: &fraudstream::Payment,
) -> Vec<(String, String, f64)> {
    assert_eq!(model.manifest().feature_reference.len(), 28, "the version has no training reference");
    let row = model.encoder().encode(payment).unwrap();
    reasons_of_row(model, &row, &payment_groups(payment))
}

/// The same for an encoded `row` and the version's `groups`.
pub fn reasons_of_row(model: &fraudstream::model::Model, row: &[f32], groups: &[Group]) -> Vec<(String, String, f64)> {
    let reference = &model.manifest().feature_reference;
    let mut rows = row.to_vec();
    for (_, columns, _) in groups {
        let mut copy = row.to_vec();
        copy[columns.clone()].copy_from_slice(&reference[columns.clone()]);
        rows.extend(copy);
    }
    let scores = model.predict(&rows, groups.len() + 1).unwrap();
    let mut reasons: Vec<(String, String, f64)> = groups
        .iter()
        .enumerate()
        .map(|(i, (name, _, value))| {
            (name.to_string(), value.clone(), f64::from(scores[0][1]) - f64::from(scores[i + 1][1]))
        })
        .collect();
    reasons.sort_by(|a, b| b.2.total_cmp(&a.2));
    reasons.truncate(3);
    reasons
}

/// Asserts that `reasons` are `expected` (names and values exactly, contributions within 1e-5).
pub fn assert_reasons(reasons: &[fraudstream::decision::Reason], expected: &[(String, String, f64)], what: &str) {
    let got: Vec<(&str, &str)> = reasons.iter().map(|r| (r.feature.as_str(), r.value.as_str())).collect();
    let want: Vec<(&str, &str)> = expected.iter().map(|(f, v, _)| (f.as_str(), v.as_str())).collect();
    // Groups with (nearly) equal contributions may come in either order.
    let close = reasons.iter().zip(expected).all(|(r, (_, _, c))| (r.contribution - c).abs() <= 1e-5);
    assert!(got.len() == want.len() && close, "{what}: reasons {reasons:?}, expected {expected:?}");
    if got != want {
        let mut a = got.clone();
        let mut b = want.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{what}: reasons {reasons:?}, expected {expected:?}");
    }
}
