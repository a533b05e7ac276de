//! Fault injection against real components: the `fraudstream score` binary
//! as a child process, the tansu broker and the Garage S3 store. Each
//! scenario asserts that nothing is lost and counts duplicates.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fraudstream::codec::{Codec, WireFormat};
use fraudstream::kafka::KafkaArgs;
use fraudstream::{Payment, Simulator};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;

const CODEC: Codec = Codec::new(WireFormat::Confluent, 1);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `fraudstream score` child process with its log file.
struct Scorer {
    child: Child,
    http: String,
    log: PathBuf,
}

impl Scorer {
    fn spawn(kafka: &KafkaArgs, topic: &str, store: &str, group: &str, dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let log = dir.join(format!("scorer-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fraudstream"));
        cmd.args(["score", "--brokers", &kafka.brokers, "--input-topic", topic])
            .args(["--output-topic", &format!("{topic}-out"), "--dlq-topic", &format!("{topic}-dlq")])
            .args(["--group-id", group, "--model-store", store, "--poll-interval", "300ms"])
            .args(["--http-addr", &format!("127.0.0.1:{port}"), "--device", "cpu"])
            .args(["-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000"])
            .arg("--model-cache")
            .arg(dir.join(format!("cache-{port}")))
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Self { child: cmd.spawn().expect("spawn fraudstream score"), http: format!("http://127.0.0.1:{port}"), log }
    }

    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL the scorer");
        let _ = self.child.wait();
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metric(&self, name: &str) -> f64 {
        let Ok(response) = reqwest::get(format!("{}/metrics", self.http)).await else { return 0.0 };
        let text = response.text().await.unwrap_or_default();
        text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }

    async fn assigned_partitions(&self) -> Option<u64> {
        let response = reqwest::get(format!("{}/readyz", self.http)).await.ok()?;
        let body: serde_json::Value = response.json().await.ok()?;
        body["assigned_partitions"].as_u64()
    }

    async fn ready(&self) -> bool {
        reqwest::get(format!("{}/readyz", self.http)).await.is_ok_and(|r| r.status().is_success())
    }

    async fn wait_until(&mut self, what: &str, timeout: Duration, mut f: impl AsyncFnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self).await {
            assert!(self.alive(), "scorer exited while waiting for {what}:\n{}", self.log());
            assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM and wait: the graceful path.
    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.alive() {
            self.kill9();
        }
    }
}

impl Drop for Scorer {
    fn drop(&mut self) {
        if self.alive() {
            self.kill9();
        }
    }
}

async fn topic_for(kafka: &KafkaArgs, partitions: i32) -> String {
    let topic = common::unique("fault");
    let all = [topic.clone(), format!("{topic}-out"), format!("{topic}-dlq")];
    let names: Vec<&str> = all.iter().map(String::as_str).collect();
    fraudstream::kafka::ensure_topics(kafka, &names, partitions).await.unwrap();
    topic
}

async fn local_model(dir: &Path) -> String {
    let store = dir.join("models").display().to_string();
    common::train_and_publish(&store, 20_000, 11, false).await;
    store
}

fn payments(n: u64, seed: u64) -> Vec<Payment> {
    Simulator::new(n, seed).map(|p| Payment { fraud: None, ..p }).collect()
}

fn records(payments: &[Payment]) -> Vec<(String, Vec<u8>)> {
    common::keyed_records(&CODEC, payments)
}

async fn read_ids(kafka: &KafkaArgs, topic: &str, want: usize, idle: Duration) -> (usize, HashSet<String>) {
    let messages = common::read_topic(kafka, topic, idle, |m| m.len() >= want && ids_of(m).len() >= want).await;
    (messages.len(), ids_of(&messages))
}

fn ids_of(messages: &[OwnedMessage]) -> HashSet<String> {
    messages.iter().filter_map(|m| CODEC.decode_scored(m.payload()?).ok()).map(|s| s.payment.payment_id).collect()
}

fn assert_nothing_lost(sent: &[Payment], outputs: usize, seen: &HashSet<String>, scenario: &str) {
    let lost: Vec<&str> = sent.iter().map(|p| p.payment_id.as_str()).filter(|id| !seen.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{scenario}: lost {} of {} payments, e.g. {:?}",
        lost.len(),
        sent.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!("{scenario}: {} payments, {outputs} outputs, {} duplicates, 0 lost", sent.len(), outputs - seen.len());
}

/// 1. `kill -9` of a scorer in the middle of 200,000 events, then a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_then_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = local_model(dir.path()).await;
    let topic = topic_for(&kafka, 4).await;
    let group = common::unique("group");
    let sent = payments(200_000, 21);
    let publishing = common::publish_in_background(&topic, records(&sent));
    let mut scorer = Scorer::spawn(&kafka, &topic, &store, &group, dir.path(), &[]);
    scorer
        .wait_until("30,000 outputs", Duration::from_secs(120), async |s| {
            s.metric("fraudstream_events_out_total").await >= 30_000.0
        })
        .await;
    scorer.kill9();
    let scorer = Scorer::spawn(&kafka, &topic, &store, &group, dir.path(), &[]);
    publishing.await.unwrap();
    let (outputs, seen) = read_ids(&kafka, &format!("{topic}-out"), sent.len(), Duration::from_secs(30)).await;
    scorer.stop();
    assert_nothing_lost(&sent, outputs, &seen, "kill -9 and restart");
}

/// 2. Two scorers in one group: the second joins mid-stream (the first hands
/// over partitions while it is busy), then the first is stopped mid-stream
/// (SIGTERM) and the other takes over its partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_group_member_is_replaced_by_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = local_model(dir.path()).await;
    let topic = topic_for(&kafka, 4).await;
    let group = common::unique("group");
    // A backlog first, so the first member is busy (and holds events it has
    // read) when the second joins; more arrives while they work.
    let sent = payments(60_000, 22);
    let (backlog, live) = sent.split_at(40_000);
    common::publish(&common::input_producer(), &topic, &records(backlog)).await;
    let mut a = Scorer::spawn(&kafka, &topic, &store, &group, dir.path(), &[]);
    let publishing = common::publish_in_background(&topic, records(live));
    a.wait_until("outputs from the first member", Duration::from_secs(60), async |s| {
        s.metric("fraudstream_events_out_total").await >= 2_000.0
    })
    .await;
    // The second member joins while the first is consuming: the first revokes
    // two partitions mid-stream and must drain them promptly, not wait out
    // its drain timeout on events it still holds itself.
    let mut b = Scorer::spawn(&kafka, &topic, &store, &group, dir.path(), &[]);
    b.wait_until("the new member to own 2 partitions", Duration::from_secs(60), async |s| {
        s.assigned_partitions().await == Some(2)
    })
    .await;
    assert!(!a.log().contains("drain timed out"), "revoke drain timed out:\n{}", a.log());
    // Stopped with SIGTERM: tansu 0.6.0 never expires the session of a member
    // killed with SIGKILL (it keeps assigning it partitions), so a crash is
    // covered by `kill_9_mid_stream_then_restart_loses_nothing` instead.
    a.stop();
    // The survivor owns every partition after the rebalance.
    b.wait_until("the survivor to own all 4 partitions", Duration::from_secs(120), async |s| {
        s.assigned_partitions().await == Some(4)
    })
    .await;
    publishing.await.unwrap();
    let (outputs, seen) = read_ids(&kafka, &format!("{topic}-out"), sent.len(), Duration::from_secs(40)).await;
    assert!(b.alive());
    b.stop();
    assert_nothing_lost(&sent, outputs, &seen, "two members, one joining and one stopped mid-stream");
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
    // A single run from offset 0: ordinary batching is fine here.
    let producer: rdkafka::producer::FutureProducer = kafka.client_config(&[("linger.ms", "5")]).create().unwrap();
    common::publish(&producer, &topic, &all).await;
    let mut scorer = Scorer::spawn(&kafka, &topic, &store, &common::unique("group"), dir.path(), &[]);
    let (outputs, seen) = read_ids(&kafka, &format!("{topic}-out"), good.len(), Duration::from_secs(30)).await;
    let dlq = common::read_topic(&kafka, &format!("{topic}-dlq"), Duration::from_secs(10), |m| m.len() >= 10_000).await;
    assert!(scorer.alive(), "the scorer died on bad input:\n{}", scorer.log());
    assert_nothing_lost(&good, outputs, &seen, "malformed mix");
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

/// 5. Corrupt or incomplete versions are rejected; the old model keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_model_versions_are_rejected_and_the_old_model_serves() {
    let dir = tempfile::tempdir().unwrap();
    let kafka = common::kafka();
    let store = local_model(dir.path()).await;
    let good_version =
        std::fs::read_dir(Path::new(&store).join("versions")).unwrap().next().unwrap().unwrap().file_name();
    let good_dir = Path::new(&store).join("versions").join(&good_version);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(good_dir.join("model.json")).unwrap()).unwrap();
    let topic = topic_for(&kafka, 2).await;
    let mut scorer = Scorer::spawn(&kafka, &topic, &store, &common::unique("group"), dir.path(), &[]);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;

    let base: u64 = good_version.to_str().unwrap().parse().unwrap();
    let publish = |offset: u64, model: Option<Vec<u8>>, with_manifest: bool| {
        let version = (base + offset).to_string();
        let folder = Path::new(&store).join("versions").join(&version);
        std::fs::create_dir_all(&folder).unwrap();
        if let Some(bytes) = model {
            std::fs::write(folder.join("model.pt"), bytes).unwrap();
        }
        if with_manifest {
            let mut m = manifest.clone();
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
    for version in [&truncated, &wrong_shape] {
        assert!(
            log.contains("rejected model version") && log.contains(version.as_str()),
            "no log line for {version}:\n{log}"
        );
    }
    let status: serde_json::Value =
        reqwest::get(format!("{}/v1/models/payfraud", scorer.http)).await.unwrap().json().await.unwrap();
    assert_eq!(status["model_version_status"][0]["version"], serde_json::json!(good_version.to_str().unwrap()));

    // Still scoring with the good model.
    let sent = payments(2_000, 24);
    let producer: rdkafka::producer::FutureProducer = kafka.client_config(&[]).create().unwrap();
    common::publish(&producer, &topic, &records(&sent)).await;
    let outputs =
        common::read_topic(&kafka, &format!("{topic}-out"), Duration::from_secs(20), |m| m.len() >= 2_000).await;
    assert_eq!(outputs.len(), 2_000);
    assert!(outputs
        .iter()
        .all(|m| CODEC.decode_scored(m.payload().unwrap()).unwrap().model_version == good_version.to_str().unwrap()));
    scorer.stop();
}

/// A service process this test started (and kills, by PID, when dropped).
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tansu_sqlite(dir: &Path, port: u16) -> Service {
    let bin = std::env::var("FRAUDSTREAM_TANSU_BIN").expect("FRAUDSTREAM_TANSU_BIN (set by scripts/test-services env)");
    let url = format!("tcp://127.0.0.1:{port}");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("tansu.log")).unwrap();
    Service(
        Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu"),
    )
}

/// 3. The broker restarts mid-stream (sqlite storage survives); the scorer reconnects and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restart_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_model(dir.path()).await;
    let port = free_port();
    let mut broker = tansu_sqlite(dir.path(), port);
    wait_port(port).await;
    let kafka = KafkaArgs::new(format!("127.0.0.1:{port}"));
    let topic = topic_for(&kafka, 2).await;
    let producer: rdkafka::producer::FutureProducer = kafka
        .client_config(&[("enable.idempotence", "true"), ("batch.num.messages", "1"), ("linger.ms", "1")])
        .create()
        .unwrap();
    let first = payments(10_000, 31);
    common::publish(&producer, &topic, &records(&first)).await;
    let mut scorer = Scorer::spawn(&kafka, &topic, &store, &common::unique("group"), dir.path(), &[]);
    scorer
        .wait_until("2,000 outputs", Duration::from_secs(60), async |s| {
            s.metric("fraudstream_events_out_total").await >= 2_000.0
        })
        .await;
    // Kill the broker hard, then bring it back on the same port and storage.
    let _ = broker.0.kill();
    let _ = broker.0.wait();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker = tansu_sqlite(dir.path(), port);
    wait_port(port).await;
    let second = payments(5_000, 32);
    common::publish(&producer, &topic, &records(&second)).await;
    let sent: Vec<Payment> = first.into_iter().chain(second).collect();
    let (outputs, seen) = read_ids(&kafka, &format!("{topic}-out"), sent.len(), Duration::from_secs(40)).await;
    assert!(scorer.alive(), "{}", scorer.log());
    scorer.stop();
    drop(broker);
    assert_nothing_lost(&sent, outputs, &seen, "broker restart");
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

/// 4. The S3 store is down when the scorer starts (it retries, then serves),
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
    let mut scorer = Scorer::spawn(
        &kafka,
        &topic,
        &store,
        &common::unique("group"),
        dir.path(),
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
    let version_dir = std::fs::read_dir(Path::new(&local).join("versions")).unwrap().next().unwrap().unwrap().path();
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
    let producer: rdkafka::producer::FutureProducer = kafka.client_config(&[]).create().unwrap();
    let first = payments(2_000, 41);
    common::publish(&producer, &topic, &records(&first)).await;
    read_ids(&kafka, &format!("{topic}-out"), 2_000, Duration::from_secs(20)).await;

    // The store goes away; polls fail; scoring goes on with the current model.
    drop(store_process);
    scorer.wait_until("a failed poll", Duration::from_secs(30), async |s| s.log().contains("model poll failed")).await;
    let second = payments(2_000, 42);
    common::publish(&producer, &topic, &records(&second)).await;
    let sent: Vec<Payment> = first.into_iter().chain(second).collect();
    let (outputs, seen) = read_ids(&kafka, &format!("{topic}-out"), sent.len(), Duration::from_secs(20)).await;
    assert!(scorer.alive());
    assert!(scorer.metric("fraudstream_model_load_failures_total{reason=\"unavailable\"}").await >= 1.0);
    scorer.stop();
    assert_nothing_lost(&sent, outputs, &seen, "S3 down at start and during polls");
}
