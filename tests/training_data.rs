//! The trainer's data sources on the real broker and the real S3 store
//! (Garage): labelled scored payments from a Kafka topic within a time
//! window (last record wins, unlabelled and old records left out), CSV and
//! Parquet objects under an S3 prefix or in a local directory, and a whole
//! training run from a topic, with the cold-start fallback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use fraudstream::codec::{Codec, WireFormat};
use fraudstream::kafka::ensure_topics;
use fraudstream::model::ModelStore;
use fraudstream::payment::{BANKSIM_EPOCH_MS, BANKSIM_HEADER, BANKSIM_ZIP, STEP_MS};
use fraudstream::training::data::{content_hash, load, DataSource};
use fraudstream::training::topic::LabelledTopic;
use fraudstream::training::train::TrainConfig;
use fraudstream::training::{run_once, TrainerOptions, TrainingError};
use fraudstream::{Payment, ScoredPayment, Simulator};
use rdkafka::producer::{FutureProducer, FutureRecord};

const DAY_MS: i64 = 86_400_000;

/// The scorer's output for `payment`, as the monitor republishes it with the
/// label in `payment.fraud`. Built from JSON, so fields added to
/// ScoredPayment with defaults need no change here.
fn labelled(payment: &Payment) -> ScoredPayment {
    serde_json::from_value(serde_json::json!({
        "payment": payment,
        "fraudProbability": 0.25,
        "isFraud": false,
        "threshold": 0.5,
        "modelName": "payfraud",
        "modelVersion": "1700000000",
        "scoredAt": payment.event_time + 40,
    }))
    .expect("a ScoredPayment")
}

fn topic_source(topic: &str, format: WireFormat) -> DataSource {
    DataSource::Kafka(LabelledTopic {
        kafka: common::kafka(),
        topic: topic.to_string(),
        since: Duration::from_secs(30 * 86_400),
        codec: Codec::new(format, 3),
        registry: None,
    })
}

/// Publishes (payment, record timestamp) pairs as keyed ScoredPayment records, in order.
async fn publish_scored(topic: &str, codec: Codec, records: &[(ScoredPayment, Option<i64>)]) {
    let producer: FutureProducer = common::input_producer();
    for (scored, timestamp) in records {
        let payload = codec.encode_scored(scored).unwrap();
        let mut record = FutureRecord::to(topic).key(&scored.payment.customer).payload(&payload);
        if let Some(ts) = timestamp {
            record = record.timestamp(*ts);
        }
        producer.send(record, Duration::from_secs(30)).await.expect("broker ack");
    }
}

fn sorted(mut payments: Vec<Payment>) -> Vec<Payment> {
    payments.sort_by(|a, b| (a.event_time, &a.payment_id).cmp(&(b.event_time, &b.payment_id)));
    payments
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_reads_the_window_last_record_wins_unlabelled_skipped() {
    let kafka = common::kafka();
    let topic = common::unique("labelled");
    ensure_topics(&kafka, &[&topic], 3).await.unwrap();
    let codec = Codec::new(WireFormat::Confluent, 3);
    let payments: Vec<Payment> = Simulator::new(2_000, 11).take(24).collect();
    let now = fraudstream::payment::now_ms();
    let old = Some(now - 40 * DAY_MS);
    let with = |p: &Payment, fraud: Option<bool>| labelled(&Payment { fraud, ..p.clone() });

    let mut records = Vec::new();
    // Old records first (before the window) and after newer ones (CreateTime
    // is the producer's: a partition's timestamps need not grow).
    records.push((with(&payments[0], Some(true)), old));
    for p in &payments[1..12] {
        records.push((with(p, p.fraud), None));
    }
    records.push((with(&payments[12], Some(false)), old));
    // Corrected labels: the last record of a payment wins, both ways.
    records.push((with(&payments[1], Some(!payments[1].fraud.unwrap())), None));
    records.push((with(&payments[2], Some(true)), Some(now - DAY_MS)));
    records.push((with(&payments[2], Some(false)), Some(now - 2 * DAY_MS)));
    // Not labelled yet: skipped, also when a labelled record came before.
    for p in &payments[13..16] {
        records.push((with(p, None), None));
    }
    records.push((with(&payments[3], None), None));
    // Within the window by a day.
    for p in &payments[16..20] {
        records.push((with(p, p.fraud), Some(now - 29 * DAY_MS)));
    }
    publish_scored(&topic, codec, &records).await;

    let mut expected: Vec<Payment> =
        payments[1..3].iter().chain(&payments[4..12]).chain(&payments[16..20]).cloned().collect();
    expected[0].fraud = Some(!payments[1].fraud.unwrap());
    expected[1].fraud = Some(false);
    let got = load(&topic_source(&topic, WireFormat::Confluent)).await.unwrap();
    assert_eq!(got, sorted(expected.clone()));

    // A shorter window leaves out the records 29 days old.
    let mut short = topic_source(&topic, WireFormat::Confluent);
    let DataSource::Kafka(source) = &mut short else { unreachable!() };
    source.since = Duration::from_secs(7 * 86_400);
    let recent: Vec<Payment> = expected.iter().filter(|p| !payments[16..20].contains(p)).cloned().collect();
    assert_eq!(load(&short).await.unwrap(), sorted(recent));

    // JSON works the same way.
    let json_topic = common::unique("labelled-json");
    ensure_topics(&kafka, &[&json_topic], 2).await.unwrap();
    let json_records: Vec<_> = payments[4..8].iter().map(|p| (labelled(p), None)).collect();
    publish_scored(&json_topic, Codec::new(WireFormat::Json, 0), &json_records).await;
    assert_eq!(load(&topic_source(&json_topic, WireFormat::Json)).await.unwrap(), sorted(payments[4..8].to_vec()));

    // Read as the wrong format: the error names the record and the fix.
    let err = load(&topic_source(&json_topic, WireFormat::Confluent)).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, TrainingError::Record { offset: 0, .. }), "{message}");
    assert!(message.contains(&json_topic) && message.contains("offset 0") && message.contains("--format"), "{message}");

    // A topic that does not exist is "nothing to train on", named.
    let missing = common::unique("no-such-topic");
    let err = load(&topic_source(&missing, WireFormat::Confluent)).await.unwrap_err();
    assert!(matches!(&err, TrainingError::NoPayments { detail, .. } if detail.contains("does not exist")), "{err}");
}

fn csv_with_zips(rows: &[Payment]) -> Vec<u8> {
    let mut out = format!("{BANKSIM_HEADER}\n").into_bytes();
    for p in rows {
        p.write_banksim_row(&mut out).unwrap();
    }
    out
}

fn csv_without_zips(rows: &[Payment]) -> Vec<u8> {
    let mut out =
        String::from("\"step\",\"customer\",\"age\",\"gender\",\"merchant\",\"category\",\"amount\",\"fraud\"\n");
    for p in rows {
        out.push_str(&format!(
            "{},'{}','{}','{}','{}','{}',{:.2},{}\n",
            p.step,
            p.customer,
            p.age,
            p.gender,
            p.merchant,
            p.category,
            p.amount,
            u8::from(p.fraud.unwrap())
        ));
    }
    out.into_bytes()
}

/// A Parquet file of `rows` written by the parquet crate (snappy), with an
/// int64 step and a boolean label, no zip codes, and a column
/// the reader ignores.
fn parquet_file(rows: &[Payment]) -> Vec<u8> {
    use parquet::basic::Compression;
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let schema = parse_message_type(
        "message payments {
            required int64 step; required binary customer (UTF8); required binary age (UTF8);
            required binary gender (UTF8); required binary merchant (UTF8); required binary category (UTF8);
            required double amount; required boolean fraud; required binary note (UTF8);
        }",
    )
    .unwrap();
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut out, Arc::new(schema), Arc::new(props)).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let text = |f: fn(&Payment) -> &str| rows.iter().map(|p| ByteArray::from(f(p))).collect::<Vec<_>>();
    let mut index = 0;
    while let Some(mut column) = group.next_column().unwrap() {
        match index {
            0 => column.typed::<Int64Type>().write_batch(
                &rows.iter().map(|p| i64::from(p.step)).collect::<Vec<_>>(),
                None,
                None,
            ),
            1 => column.typed::<ByteArrayType>().write_batch(&text(|p| &p.customer), None, None),
            2 => column.typed::<ByteArrayType>().write_batch(&text(|p| &p.age), None, None),
            3 => column.typed::<ByteArrayType>().write_batch(&text(|p| &p.gender), None, None),
            4 => column.typed::<ByteArrayType>().write_batch(&text(|p| &p.merchant), None, None),
            5 => column.typed::<ByteArrayType>().write_batch(&text(|p| &p.category), None, None),
            6 => {
                column.typed::<DoubleType>().write_batch(&rows.iter().map(|p| p.amount).collect::<Vec<_>>(), None, None)
            }
            7 => column.typed::<BoolType>().write_batch(
                &rows.iter().map(|p| p.fraud.unwrap()).collect::<Vec<_>>(),
                None,
                None,
            ),
            _ => column.typed::<ByteArrayType>().write_batch(&text(|_| "ignored"), None, None),
        }
        .unwrap();
        column.close().unwrap();
        index += 1;
    }
    group.close().unwrap();
    writer.close().unwrap();
    out
}

/// Rows as a file reads them back: ids `<file>-<n>`, event time from the
/// step, amounts at the CSV's two decimals, zip codes BankSim's constant where left out.
fn as_read(rows: &[Payment], id_prefix: &str, first_id: usize, zips: bool) -> Vec<Payment> {
    rows.iter()
        .enumerate()
        .map(|(i, p)| Payment {
            payment_id: format!("{id_prefix}-{}", first_id + i),
            event_time: BANKSIM_EPOCH_MS + i64::from(p.step) * STEP_MS,
            amount: format!("{:.2}", p.amount).parse().unwrap(),
            zipcode_ori: if zips { p.zipcode_ori.clone() } else { BANKSIM_ZIP.into() },
            zip_merchant: if zips { p.zip_merchant.clone() } else { BANKSIM_ZIP.into() },
            ..p.clone()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_csv_and_parquet_under_an_s3_prefix_and_in_a_directory() {
    // Amounts at two decimals, so CSV and Parquet hold the same values.
    let rows: Vec<Payment> = Simulator::new(3_000, 12)
        .take(30)
        .map(|p| Payment { amount: format!("{:.2}", p.amount).parse().unwrap(), ..p })
        .collect();
    let (with_zips, without_zips, columnar) = (&rows[..10], &rows[10..20], &rows[20..]);
    let files: [(&str, Vec<u8>); 4] = [
        ("a/day-1.csv", csv_with_zips(with_zips)),
        ("b/day-2.csv", csv_without_zips(without_zips)),
        ("c/part-0.parquet", parquet_file(columnar)),
        ("c/_SUCCESS.json", b"{\"not\": \"data\"}".to_vec()),
    ];
    let mut expected = as_read(with_zips, "a/day-1.csv", 2, true);
    expected.extend(as_read(without_zips, "b/day-2.csv", 2, false));
    expected.extend(as_read(columnar, "c/part-0.parquet", 0, false));

    let s3 = common::s3_client().await;
    let bucket = common::bucket();
    let prefix = common::unique("training-data");
    for (name, bytes) in &files {
        s3.put_object()
            .bucket(&bucket)
            .key(format!("{prefix}/{name}"))
            .body(bytes.clone().into())
            .send()
            .await
            .unwrap();
    }
    // Beside the prefix, not under it: never read.
    s3.put_object()
        .bucket(&bucket)
        .key(format!("{prefix}-other/x.csv"))
        .body(b"not,a,banksim,file\n".to_vec().into())
        .send()
        .await
        .unwrap();
    let got = load(&DataSource::Files(format!("s3://{bucket}/{prefix}/"))).await.unwrap();
    assert_eq!(got, expected);
    // One object by its name.
    let one = load(&DataSource::Files(format!("s3://{bucket}/{prefix}/c/part-0.parquet"))).await.unwrap();
    assert_eq!(one, as_read(columnar, "bs", 0, false));

    // The same files in a local directory, and one local Parquet file.
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in &files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let local = load(&DataSource::Files(dir.path().display().to_string())).await.unwrap();
    assert_eq!(local, expected);
    let parquet = dir.path().join("c/part-0.parquet").display().to_string();
    assert_eq!(load(&DataSource::Files(parquet)).await.unwrap(), as_read(columnar, "bs", 0, false));

    // A prefix without data files is a clear error.
    let err = load(&DataSource::Files(format!("s3://{bucket}/{prefix}/c/_SUCCESS"))).await.unwrap_err();
    assert!(err.to_string().contains("no *.csv or *.parquet"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_training_run_from_a_topic_publishes_a_version() {
    let kafka = common::kafka();
    let topic = common::unique("labelled-run");
    ensure_topics(&kafka, &[&topic], 4).await.unwrap();
    let payments: Vec<Payment> = Simulator::new(20_000, 13).collect();
    let codec = Codec::new(WireFormat::Confluent, 3);
    let records: Vec<(String, Vec<u8>)> =
        payments.iter().map(|p| (p.customer.clone(), codec.encode_scored(&labelled(p)).unwrap())).collect();
    common::publish(&common::input_producer(), &topic, &records).await;

    let store = common::s3_store();
    let options = TrainerOptions {
        data: topic_source(&topic, WireFormat::Confluent),
        model_store: store.clone(),
        device: fraudstream::model::Device::Cpu,
        train: TrainConfig { seed: 13, max_epochs: 3, ..TrainConfig::default() },
        ..TrainerOptions::default()
    };
    let outcome = run_once(&options).await.expect("training from the topic");
    assert!(outcome.published, "{}", outcome.verdict);
    let opened = ModelStore::open(&store).await.unwrap();
    assert_eq!(opened.latest_version().await.unwrap().as_deref(), Some(outcome.version.as_str()));
    let dir = tempfile::tempdir().unwrap();
    let manifest = opened.fetch(&outcome.version, &[], dir.path()).await.unwrap().manifest;
    let data = &manifest.training_data;
    assert_eq!(data.source, format!("kafka://{topic} (since 30days)"));
    assert_eq!(data.rows, 20_000);
    assert_eq!(data.frauds, payments.iter().filter(|p| p.fraud == Some(true)).count() as u64);
    assert_eq!(data.sha256, content_hash(&sorted(payments)), "the run trained on exactly the topic's payments");

    // An empty topic: with no version yet, the fallback trains; once a
    // version exists, an empty window fails and publishes nothing.
    let empty = common::unique("labelled-empty");
    ensure_topics(&kafka, &[&empty], 2).await.unwrap();
    let fresh_store = common::s3_store();
    let cold = TrainerOptions {
        data: topic_source(&empty, WireFormat::Confluent),
        fallback: Some(DataSource::Simulator { rows: 20_000, seed: 14 }),
        model_store: fresh_store.clone(),
        ..options.clone()
    };
    let first = run_once(&cold).await.expect("the first run falls back");
    assert!(first.published);
    let fresh = ModelStore::open(&fresh_store).await.unwrap();
    let manifest = fresh.fetch(&first.version, &[], dir.path()).await.unwrap().manifest;
    assert_eq!(manifest.training_data.source, "simulator(rows=20000, seed=14)");
    let err = run_once(&cold).await.unwrap_err();
    assert!(matches!(&err, TrainingError::NoPayments { location, .. } if location.contains(&empty)), "{err}");
    assert_eq!(fresh.list_versions().await.unwrap(), [first.version]);
}
