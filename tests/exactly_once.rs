//! `--delivery exactly-once` on the real binary against Apache Kafka, read
//! the way its consumers must read it (isolation.level=read_committed, the
//! librdkafka default the test reader keeps): after a crash, a crashed group
//! member or bad input, every payment has exactly one output, and each is
//! right.

mod common;
#[path = "faults/harness.rs"]
mod harness;

use std::time::Duration;

use fraudstream::kafka::KafkaArgs;
use fraudstream::Payment;
use harness::{payments, read_outputs, records, verify_outputs, Scorer, Setup, CODEC};
use rdkafka::message::OwnedMessage;

/// A member must never exit: a commit that races a rebalance aborts and
/// rewinds in-process.
fn assert_alive(scorer: &mut Scorer) {
    assert!(scorer.alive(), "the scorer exited:\n{}", scorer.log());
}

fn exactly_once(id: &str) -> [String; 6] {
    ["--delivery", "exactly-once", "--transactional-id", id, "--transaction-interval", "100ms"].map(String::from)
}

/// Everything committed on `topic`, read until it stays quiet: a late
/// duplicate would show up here.
async fn everything(kafka: &KafkaArgs, topic: &str) -> Vec<OwnedMessage> {
    common::read_topic(kafka, topic, Duration::from_secs(5), |_| false).await
}

/// `kill -9` mid 200,000 events, then a restart with the same transactional
/// id: exactly 200,000 outputs, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_then_restart_gives_each_output_once() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(4).await;
    let id = common::unique("txn");
    let args = exactly_once(&id);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sent = payments(200_000, 61);
    let publishing = common::publish_in_background(&topic, records(&sent));
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args);
    scorer
        .wait_until("30,000 outputs", Duration::from_secs(120), async |s| {
            s.metric("fraudstream_events_out_total").await >= 30_000.0
        })
        .await;
    scorer.kill9();
    let scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args);
    publishing.await.unwrap();
    read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(30)).await;
    scorer.stop();
    let outputs = everything(&kafka, &format!("{topic}-out")).await;
    let verified = verify_outputs(&sent, &outputs, &store, "exactly-once: kill -9 and restart");
    assert_eq!((verified.outputs, verified.duplicates), (sent.len(), 0), "not exactly once");
}

/// Two members, one `kill -9`ed mid-stream: the survivor takes over from the
/// last committed transaction; every payment has exactly one output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_member_costs_no_duplicate() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(4).await;
    let (id_a, id_b) = (common::unique("txn-a"), common::unique("txn-b"));
    let (args_a, args_b) = (exactly_once(&id_a), exactly_once(&id_b));
    let args_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let sent = payments(100_000, 62);
    let (backlog, live) = sent.split_at(40_000);
    common::publish(&common::input_producer(), &topic, &records(backlog)).await;
    let mut a = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args_a);
    let publishing = common::publish_paced(&topic, records(live), 5_000);
    a.wait_until("outputs from the first member", Duration::from_secs(60), async |s| {
        s.metric("fraudstream_events_out_total").await >= 2_000.0
    })
    .await;
    let mut b = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args_b);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.assigned_partitions().await != Some(2) {
        // A commit that races the rebalance (ILLEGAL_GENERATION) aborts and
        // rewinds in-process.
        assert_alive(&mut a);
        assert!(std::time::Instant::now() < deadline, "the new member never owned 2 partitions:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!publishing.is_finished(), "the stream ended before the crash; pace it slower");
    a.kill9();
    b.wait_until("the survivor to own all 4 partitions", Duration::from_secs(60), async |s| {
        s.assigned_partitions().await == Some(4)
    })
    .await;
    publishing.await.unwrap();
    // The crashed member's open transaction is aborted by the broker after
    // transaction.timeout.ms (10 s); until then read_committed readers wait.
    assert_alive(&mut b);
    read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(40)).await;
    b.stop();
    let outputs = everything(&kafka, &format!("{topic}-out")).await;
    let verified = verify_outputs(&sent, &outputs, &store, "exactly-once: a member crashes");
    assert_eq!((verified.outputs, verified.duplicates), (sent.len(), 0), "not exactly once");
}

/// A member frozen (SIGSTOP) past its session timeout loses its partitions
/// to the other member; thawed, it finds its assignment lost, aborts its
/// open transaction and rewinds in-process (it does not exit), rejoins, and
/// every payment still has exactly one output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_lost_its_partitions_rewinds_in_process() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(4).await;
    let (id_a, id_b) = (common::unique("txn-a"), common::unique("txn-b"));
    let (args_a, args_b) = (exactly_once(&id_a), exactly_once(&id_b));
    let args_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let sent = payments(120_000, 65);
    let mut a = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args_a);
    let mut b = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args_b);
    for s in [&mut a, &mut b] {
        s.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    }
    // 24 s of traffic, the freeze in the middle of it.
    let publishing = common::publish_paced(&topic, records(&sent), 5_000);
    a.wait_until("outputs from the member to freeze", Duration::from_secs(60), async |s| {
        s.metric("fraudstream_events_out_total").await >= 5_000.0
    })
    .await;
    a.freeze(true);
    b.wait_until("the other member to own all 4 partitions", Duration::from_secs(60), async |s| {
        s.assigned_partitions().await == Some(4)
    })
    .await;
    a.freeze(false);
    a.wait_until("the thawed member to rewind and own partitions again", Duration::from_secs(60), async |s| {
        s.metric("fraudstream_rewinds_total").await >= 1.0 && s.assigned_partitions().await.is_some_and(|n| n > 0)
    })
    .await;
    assert!(!publishing.is_finished(), "the stream ended before the member rejoined; pace it slower");
    publishing.await.unwrap();
    read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(40)).await;
    assert_alive(&mut a);
    assert_alive(&mut b);
    assert!(a.log().contains("rewinding to the last committed transaction"), "{}", a.log());
    a.stop();
    b.stop();
    let outputs = everything(&kafka, &format!("{topic}-out")).await;
    let verified = verify_outputs(&sent, &outputs, &store, "exactly-once: a frozen member rewinds");
    assert_eq!((verified.outputs, verified.duplicates), (sent.len(), 0), "not exactly once");
}

/// Malformed events among good ones, and a `kill -9` in the middle: each
/// good payment has one output, each bad event one dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_bad_event_is_dead_lettered_once() {
    let Setup { dir, kafka, store, store_url, topic, group } = Setup::new(4).await;
    let id = common::unique("txn");
    let args = exactly_once(&id);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let good = payments(50_000, 63);
    let mut all = records(&good);
    for (i, template) in good.iter().take(5_000).enumerate() {
        let bad = match i % 2 {
            0 => format!("garbage-{i}").into_bytes(),
            _ => CODEC.encode_payment(&Payment { gender: "X".into(), ..template.clone() }).unwrap(),
        };
        all.insert(i * 11, (format!("bad-{i}"), bad));
    }
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    let status: serde_json::Value =
        reqwest::get(format!("{}/readyz", scorer.http)).await.unwrap().json().await.unwrap();
    assert_eq!(status["delivery"], "exactly-once", "{status}");
    let publishing = common::publish_paced(&topic, all, 20_000);
    scorer
        .wait_until("10,000 outputs", Duration::from_secs(60), async |s| {
            s.metric("fraudstream_events_out_total").await >= 10_000.0
        })
        .await;
    assert!(!publishing.is_finished(), "the stream ended before the crash; pace it slower");
    scorer.kill9();
    let scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args);
    publishing.await.unwrap();
    read_outputs(&kafka, &format!("{topic}-out"), &good, Duration::from_secs(30)).await;
    scorer.stop();
    let outputs = everything(&kafka, &format!("{topic}-out")).await;
    let verified = verify_outputs(&good, &outputs, &store, "exactly-once: malformed mix");
    assert_eq!((verified.outputs, verified.duplicates), (good.len(), 0), "not exactly once");
    let dlq = everything(&kafka, &format!("{topic}-dlq")).await;
    assert_eq!(dlq.len(), 5_000, "each bad event dead-lettered exactly once");
}

/// The broker is killed (`kill -9`) while transactions are open and restarts
/// on the same data. A scorer whose transaction failed exits non-zero (fail
/// closed) and is restarted, as an orchestrator would; either way every
/// payment ends with exactly one committed output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_crash_costs_no_duplicate() {
    use harness::{free_port, kafka_node, local_model, topic_for, wait_kafka};
    let dir = tempfile::tempdir().unwrap();
    let store = local_model(dir.path()).await;
    let store_url = store.display().to_string();
    let (port, controller) = (free_port(), free_port());
    let mut broker = kafka_node(dir.path(), port, controller);
    let kafka = KafkaArgs::new(format!("127.0.0.1:{port}"));
    wait_kafka(&kafka, Duration::from_secs(90)).await;
    let topic = topic_for(&kafka, 2).await;
    let group = common::unique("group");
    let id = common::unique("txn");
    let args = exactly_once(&id);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut scorer = Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args);
    scorer.wait_until("ready", Duration::from_secs(60), async |s| s.ready().await).await;
    let sent = payments(60_000, 64);
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
    // Give a failed transaction time to end the process, then restart it if it did.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let scorer = if scorer.alive() {
        scorer
    } else {
        let status = scorer.child.wait().unwrap();
        assert!(!status.success(), "the scorer exited 0 after the broker crash:\n{}", scorer.log());
        Scorer::spawn(&kafka, &topic, &store_url, &group, dir.path(), &args)
    };
    read_outputs(&kafka, &format!("{topic}-out"), &sent, Duration::from_secs(40)).await;
    scorer.stop();
    let outputs = everything(&kafka, &format!("{topic}-out")).await;
    drop(broker);
    let verified = verify_outputs(&sent, &outputs, &store, "exactly-once: broker kill -9 and restart");
    assert_eq!((verified.outputs, verified.duplicates), (sent.len(), 0), "not exactly once");
}
