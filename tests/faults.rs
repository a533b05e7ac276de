//! Fault injection against real components: the `fraudstream score` binary
//! as a child process, Apache Kafka and the Garage S3 store. Each scenario
//! asserts that no valid payment is lost AND that every output is right (the
//! payment unchanged, the probability the named version gives for it), and
//! prints the duplicates.

mod common;
#[path = "faults/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fraudstream::kafka::KafkaArgs;
use fraudstream::Payment;
use harness::{
    free_port, kafka_node, local_model, payments, read_outputs, records, topic_for, verify_outputs, wait_kafka,
    wait_port, Scorer, Service, Setup, CODEC,
};
use rdkafka::Message;

/// 1. `kill -9` of a scorer in the middle of 200,000 events, then a restart.
/// Input arrives in lz4-compressed multi-record batches, so the restarted
/// scorer resumes from committed offsets inside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_then_restart_loses_nothing() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(4).await;
    let sent = payments(200_000, 21);
    let publishing = common::publish_in_background(&topic, records(&sent));
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &[]);
    scorer
        .wait_until("30,000 outputs", Duration::from_secs(120), async |s| {
            s.metric("fraudstream_events_out_total").await >= 30_000.0
        })
        .await;
    scorer.kill9();
    let scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &[]);
    publishing.await.unwrap();
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    scorer.stop();
    verify_outputs(&sent, &outputs, &store, "kill -9 and restart");
}

/// The committed offset of `group` on partition 0 of `topic`.
fn committed_offset(kafka: &KafkaArgs, group: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = kafka.client_config(&[("group.id", group)]).create().unwrap();
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(topic, 0);
    let committed = consumer.committed_offsets(wanted, Duration::from_secs(10)).expect("committed offsets");
    let offset = match committed.find_partition(topic, 0).map(|p| p.offset()) {
        Some(Offset::Offset(o)) => o,
        other => panic!("group {group} has no committed offset on {topic}/0: {other:?}"),
    };
    // Drop the list before the consumer (a live list blocks its destruction).
    drop(committed);
    offset
}

/// A record batch as Kafka stores it: first offset, record count, codec.
#[derive(Debug)]
struct StoredBatch {
    base_offset: i64,
    records: i64,
    compression: i16,
}

/// The record batches of partition 0 of `topic`, read from the test broker's
/// log segments (record batch format v2: baseOffset i64, batchLength i32,
/// leader epoch i32, magic i8, crc u32, attributes i16, lastOffsetDelta i32).
fn stored_batches(topic: &str) -> Vec<StoredBatch> {
    let data = std::env::var("FRAUDSTREAM_TEST_KAFKA_DATA").expect("FRAUDSTREAM_TEST_KAFKA_DATA (test-services env)");
    let folder = Path::new(&data).join(format!("{topic}-0"));
    let mut segments: Vec<_> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let mut batches = Vec::new();
    for segment in segments {
        let bytes = std::fs::read(&segment).unwrap();
        let mut at = 0;
        while at + 27 <= bytes.len() {
            let field = |from: usize, len: usize| &bytes[at + from..at + from + len];
            let base_offset = i64::from_be_bytes(field(0, 8).try_into().unwrap());
            let length = i32::from_be_bytes(field(8, 4).try_into().unwrap()) as usize;
            let attributes = i16::from_be_bytes(field(21, 2).try_into().unwrap());
            let last_delta = i32::from_be_bytes(field(23, 4).try_into().unwrap());
            if length == 0 {
                break;
            }
            batches.push(StoredBatch { base_offset, records: i64::from(last_delta) + 1, compression: attributes & 7 });
            at += 12 + length;
        }
    }
    batches
}

/// 2. A graceful stop commits an offset in the middle of an lz4-compressed
/// multi-record batch (checked against the broker's own log segments); the
/// next scorer resumes from it: nothing lost, nothing scored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_from_an_offset_inside_a_compressed_batch() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(1).await;
    let sent = payments(150_000, 25);
    common::publish(&common::input_producer(), &topic, &records(&sent)).await;
    let batches = stored_batches(&topic);
    assert!(batches.iter().all(|b| b.compression == 3), "input not lz4-compressed: {batches:?}");
    assert!(batches.len() < sent.len() / 100, "input not in multi-record batches: {} batches", batches.len());

    // A slowed-down scorer (small batches, few events in flight), so it is
    // stopped well before the end of the backlog.
    let slow = ["--max-in-flight", "256", "--max-batch", "32", "--drain-timeout", "5s"];
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &slow);
    scorer
        .wait_until("10,000 outputs", Duration::from_secs(120), async |s| {
            s.metric("fraudstream_events_out_total").await >= 10_000.0
        })
        .await;
    // Mid-stream: a graceful stop exits 0 within --drain-timeout + 5 s.
    let (status, took) = scorer.terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "SIGTERM mid-stream: {status:?} after {took:?}:\n{}", scorer.log());
    let committed = committed_offset(&kafka, &group, &topic);
    assert!(committed > 0 && committed < sent.len() as i64, "committed {committed} of {}", sent.len());
    let inside = batches
        .iter()
        .find(|b| b.base_offset < committed && committed < b.base_offset + b.records)
        .unwrap_or_else(|| panic!("committed offset {committed} is on a batch boundary: {batches:?}"));
    eprintln!(
        "committed offset {committed}, inside the lz4 batch of {} records at {}",
        inside.records, inside.base_offset
    );

    let scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &[]);
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    scorer.stop();
    let verified = verify_outputs(&sent, &outputs, &store, "resume inside a compressed batch");
    assert_eq!(verified.duplicates, 0, "a graceful stop committed less than it had produced");
}

/// 3. Two scorers in one group: the second joins mid-stream (the first hands
/// over partitions while it is busy), then the first crashes (SIGKILL): the
/// broker expires its session after `session.timeout.ms` and the survivor
/// takes over its partitions and finishes the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_group_member_is_replaced_by_the_other() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(4).await;
    // A backlog first, so the first member is busy (and holds events it has
    // read) when the second joins; more arrives, paced, while they work, so
    // the crash strikes mid-stream.
    let sent = payments(100_000, 22);
    let (backlog, live) = sent.split_at(40_000);
    common::publish(&common::input_producer(), &topic, &records(backlog)).await;
    let mut a = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &[]);
    let publishing = common::publish_paced(&topic, records(live), 10_000);
    a.wait_until("outputs from the first member", Duration::from_secs(60), async |s| {
        s.metric("fraudstream_events_out_total").await >= 2_000.0
    })
    .await;
    // The second member joins while the first is consuming: the first revokes
    // two partitions mid-stream and must drain them promptly, not wait out
    // its drain timeout on events it still holds itself.
    let mut b = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &[]);
    b.wait_until("the new member to own 2 partitions", Duration::from_secs(60), async |s| {
        s.assigned_partitions().await == Some(2)
    })
    .await;
    assert!(!a.log().contains("drain timed out"), "revoke drain timed out:\n{}", a.log());
    assert!(!publishing.is_finished(), "the stream ended before the crash; pace it slower");
    a.kill9();
    // The survivor owns every partition once the crashed member's session expires.
    b.wait_until("the survivor to own all 4 partitions", Duration::from_secs(60), async |s| {
        s.assigned_partitions().await == Some(4)
    })
    .await;
    publishing.await.unwrap();
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(40)).await;
    assert!(b.alive(), "{}", b.log());
    b.stop();
    verify_outputs(&sent, &outputs, &store, "two members, one joining and one crashing mid-stream");
}

/// 4. The broker is killed (`kill -9`) mid-stream and restarts on the same
/// data directory; the scorer reconnects and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_kill_9_and_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_model(dir.path()).await;
    let store_url = store.display().to_string();
    let (port, controller) = (free_port(), free_port());
    let mut broker = kafka_node(dir.path(), port, controller);
    let kafka = KafkaArgs::new(format!("127.0.0.1:{port}"));
    wait_kafka(&kafka, Duration::from_secs(90)).await;
    let topic = topic_for(&kafka, 2).await;
    // The scorer is ready first; input then arrives paced (10,000 a second),
    // so the broker dies while the scorer is busy.
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &common::unique("group"), dir.path(), &[]);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    let sent = payments(60_000, 31);
    let (dir_path, records) = (dir.path().to_path_buf(), records(&sent));
    harness::publish_across_a_broker_crash(
        &kafka,
        &topic,
        records,
        &mut scorer,
        &mut broker,
        &dir_path,
        port,
        controller,
    )
    .await;
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(40)).await;
    assert!(scorer.alive(), "{}", scorer.log());
    scorer.stop();
    drop(broker);
    verify_outputs(&sent, &outputs, &store, "broker kill -9 and restart");
}

/// 6. 10,000 malformed events mixed into 100,000 good ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_events_go_to_the_dlq_and_the_process_lives() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = local_model(dir.path()).await;
    let topic = topic_for(&kafka, 4).await;
    let good = payments(100_000, 23);
    let mut all = records(&good);
    for (i, template) in good.iter().take(10_000).enumerate() {
        let bad = match i % 4 {
            0 => format!("garbage-{i}").into_bytes(),
            1 => CODEC.encode_payment(&Payment { gender: "X".into(), ..template.clone() }).unwrap(),
            2 => CODEC.encode_payment(&Payment { amount: f64::INFINITY, ..template.clone() }).unwrap(),
            _ => vec![0, 0, 0, 0, 1],
        };
        all.insert(i * 11, (format!("bad-{i}"), bad));
    }
    common::publish(&common::input_producer(), &topic, &all).await;
    let mut scorer =
        Scorer::spawn(&kafka, &topic, &store.display().to_string(), &common::unique("group"), dir.path(), &[]);
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &good, Duration::from_secs(30)).await;
    let dlq = common::read_topic(&kafka, &format!("{topic}-dlq"), Duration::from_secs(10), |m| m.len() >= 10_000).await;
    assert!(scorer.alive(), "the scorer died on bad input:\n{}", scorer.log());
    verify_outputs(&good, &outputs, &store, "malformed mix");
    assert_eq!(dlq.len(), 10_000);
    assert!(dlq.iter().all(|m| m.key().is_some_and(|k| k.starts_with(b"bad-"))));
    let reasons: HashSet<String> = dlq
        .iter()
        .filter_map(|m| {
            use rdkafka::message::Headers;
            let h = m.headers()?;
            h.iter()
                .find(|h| h.key == "fraudstream.error.reason")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into())
        })
        .collect();
    assert_eq!(reasons, HashSet::from(["undecodable".to_string(), "invalid-payment".to_string()]));
    assert!(scorer.metric("fraudstream_events_dead_lettered_total").await >= 10_000.0);
    scorer.stop();
}

/// 7. Corrupt or incomplete versions are rejected; the old model keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_model_versions_are_rejected_and_the_old_model_serves() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = local_model(dir.path()).await;
    let store_url = store.display().to_string();
    let good_version = std::fs::read_dir(store.join("versions")).unwrap().next().unwrap().unwrap().file_name();
    let good_dir = store.join("versions").join(&good_version);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(good_dir.join("model.json")).unwrap()).unwrap();
    let topic = topic_for(&kafka, 2).await;
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &common::unique("group"), dir.path(), &[]);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;

    let base: u64 = good_version.to_str().unwrap().parse().unwrap();
    let publish = |offset: u64, model: Option<Vec<u8>>, with_manifest: bool| {
        let version = (base + offset).to_string();
        let folder = store.join("versions").join(&version);
        std::fs::create_dir_all(&folder).unwrap();
        let mut m = manifest.clone();
        if let Some(bytes) = model {
            // The manifest vouches for these bytes: what is tested is the model itself.
            m["files"]["model.pt"] = serde_json::json!(fraudstream::model::sha256_hex(&bytes));
            std::fs::write(folder.join("model.pt"), bytes).unwrap();
        }
        if with_manifest {
            m["version"] = serde_json::json!(version);
            std::fs::write(folder.join("model.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        }
        version
    };
    let model_bytes = std::fs::read(good_dir.join("model.pt")).unwrap();
    // Truncated TorchScript.
    let truncated = publish(10, Some(model_bytes[..model_bytes.len() / 3].to_vec()), true);
    scorer
        .wait_until("the truncated version's rejection", Duration::from_secs(30), async |s| {
            s.metric("fraudstream_model_load_failures_total{reason=\"invalid\"}").await >= 1.0
        })
        .await;
    // Missing manifest: an incomplete version, never even considered.
    publish(20, Some(model_bytes.clone()), false);
    // Wrong output shape: three classes instead of two.
    let wrong_shape = {
        let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let linear = tch::nn::linear(vs.root(), 28, 3, Default::default());
        vs.freeze();
        let module = tch::CModule::create_by_tracing(
            "Wrong",
            "forward",
            &[tch::Tensor::zeros([2, 28], tch::kind::FLOAT_CPU)],
            &mut |x| vec![tch::nn::Module::forward(&linear, &x[0]).softmax(-1, tch::Kind::Float)],
        )
        .unwrap();
        let path = dir.path().join("wrong.pt");
        module.save(&path).unwrap();
        publish(30, Some(std::fs::read(&path).unwrap()), true)
    };
    scorer
        .wait_until("two rejections", Duration::from_secs(30), async |s| {
            s.metric("fraudstream_model_load_failures_total{reason=\"invalid\"}").await >= 2.0
        })
        .await;
    let log = scorer.log();
    for (version, why) in [(&truncated, "cannot load TorchScript"), (&wrong_shape, "expected output")] {
        assert!(
            log.lines()
                .any(|l| l.contains("rejected model version") && l.contains(version.as_str()) && l.contains(why)),
            "{version} not rejected for {why:?}:\n{log}"
        );
    }
    let status: serde_json::Value =
        reqwest::get(format!("{}/v1/models/payfraud", scorer.http)).await.unwrap().json().await.unwrap();
    assert_eq!(status["model_version_status"][0]["version"], serde_json::json!(good_version.to_str().unwrap()));

    // Still scoring with the good model.
    let sent = payments(2_000, 24);
    common::publish(&common::input_producer(), &topic, &records(&sent)).await;
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(20)).await;
    scorer.stop();
    let verified = verify_outputs(&sent, &outputs, &store, "corrupt versions");
    assert_eq!(verified.versions.keys().collect::<Vec<_>>(), [good_version.to_str().unwrap()]);
}

fn garage(dir: &Path, s3_port: u16, bucket: &str) -> Service {
    let bin =
        std::env::var("FRAUDSTREAM_GARAGE_BIN").expect("FRAUDSTREAM_GARAGE_BIN (set by scripts/test-services env)");
    let rpc = free_port();
    let config = dir.join("garage.toml");
    std::fs::write(
        &config,
        format!(
            "metadata_dir = \"{0}/meta\"\ndata_dir = \"{0}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{1}\"\n\n\
             [s3_api]\ns3_region = \"us-east-1\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\nroot_domain = \".s3.localhost\"\n",
            dir.display(),
            "1".repeat(64)
        ),
    )
    .unwrap();
    Service(
        Command::new(bin)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_CONFIG_FILE", &config)
            .env("GARAGE_DEFAULT_BUCKET", bucket)
            .env("GARAGE_DEFAULT_ACCESS_KEY", std::env::var("AWS_ACCESS_KEY_ID").unwrap())
            .env("GARAGE_DEFAULT_SECRET_KEY", std::env::var("AWS_SECRET_ACCESS_KEY").unwrap())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start garage"),
    )
}

/// 5. The S3 store is down when the scorer starts (it retries, then serves),
/// and goes down again while it runs (the current model keeps serving).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_down_at_start_and_during_polls() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let local = local_model(dir.path()).await;
    let topic = topic_for(&kafka, 2).await;
    let s3_port = free_port();
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    let bucket = "fault-models";
    let store = format!("s3://{bucket}/payfraud");
    let mut scorer = Scorer::spawn_with_env(
        &kafka,
        &topic,
        &store,
        &common::unique("group"),
        dir.path(),
        &[],
        &[("AWS_ENDPOINT_URL", &endpoint), ("AWS_MAX_ATTEMPTS", "1")],
    );
    scorer
        .wait_until("a retry log line", Duration::from_secs(30), async |s| s.log().contains("no model to serve yet"))
        .await;
    assert!(!scorer.ready().await, "ready without a model");

    // The store comes up and a version appears in it.
    let garage_dir = dir.path().join("garage");
    std::fs::create_dir_all(&garage_dir).unwrap();
    let store_process = garage(&garage_dir, s3_port, bucket);
    wait_port(s3_port).await;
    let shared = aws_config::load_from_env().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared).endpoint_url(&endpoint).force_path_style(true).build(),
    );
    let version_dir = std::fs::read_dir(local.join("versions")).unwrap().next().unwrap().unwrap().path();
    let version = version_dir.file_name().unwrap().to_str().unwrap().to_string();
    for file in ["model.pt", "model.json"] {
        let body = std::fs::read(version_dir.join(file)).unwrap();
        let mut attempt = 0;
        while let Err(e) = s3
            .put_object()
            .bucket(bucket)
            .key(format!("payfraud/versions/{version}/{file}"))
            .body(body.clone().into())
            .send()
            .await
        {
            attempt += 1;
            assert!(attempt < 50, "cannot upload to the new store: {e:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    scorer.wait_until("ready after the store came up", Duration::from_secs(60), async |s| s.ready().await).await;
    let producer = common::input_producer();
    let first = payments(2_000, 41);
    common::publish(&producer, &topic, &records(&first)).await;
    read_outputs(&kafka, &format!("{topic}-out"), &first, Duration::from_secs(20)).await;

    // The store goes away; polls fail; scoring goes on with the current model.
    drop(store_process);
    scorer.wait_until("a failed poll", Duration::from_secs(30), async |s| s.log().contains("model poll failed")).await;
    let second = payments(2_000, 42);
    common::publish(&producer, &topic, &records(&second)).await;
    let sent: Vec<Payment> = first.into_iter().chain(second).collect();
    let outputs = read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(20)).await;
    assert!(scorer.alive());
    assert!(scorer.metric("fraudstream_model_load_failures_total{reason=\"unavailable\"}").await >= 1.0);
    scorer.stop();
    let verified = verify_outputs(&sent, &outputs, &local, "S3 down at start and during polls");
    assert_eq!(verified.versions.keys().collect::<Vec<_>>(), [&version]);
}
