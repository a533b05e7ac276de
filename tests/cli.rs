//! The `fraudstream` tools as a user runs them: simulate, encode, and
//! produce + consume against the real broker.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use fraudstream::payment::BankSimReader;
use fraudstream::{Payment, Simulator};

fn fraudstream() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fraudstream"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run fraudstream");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `fraudstream consume` of payments on `topic` until it goes quiet for 5 s.
fn consume_payments(kafka: &fraudstream::kafka::KafkaArgs, topic: &str, extra: &[&str]) -> Vec<Payment> {
    let mut cmd = fraudstream();
    cmd.args(["consume", "--brokers", &kafka.brokers, "--topic", topic, "--kind", "payment", "--idle-timeout", "5s"]);
    run_ok(cmd.args(extra)).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn simulate_writes_the_original_format_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.csv");
    let b = dir.path().join("b.csv");
    run_ok(fraudstream().args(["simulate", "--rows", "2000", "--seed", "3", "--output"]).arg(&a));
    run_ok(fraudstream().args(["simulate", "--rows", "2000", "--seed", "3", "--output"]).arg(&b));
    let text = std::fs::read_to_string(&a).unwrap();
    assert_eq!(text, std::fs::read_to_string(&b).unwrap(), "same seed, different output");
    let second_line = text.lines().nth(1).unwrap();
    assert!(second_line.starts_with("0,'C") && second_line.contains(",'28007',"), "{second_line}");
    let rows: Vec<Payment> = BankSimReader::new(text.as_bytes()).unwrap().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 2000);
}

#[test]
fn encode_prints_the_original_demo_example() {
    let mut child = fraudstream()
        .args(["encode", "--amount-min", "0", "--amount-max", "8329.96"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let payment = r#"{"paymentId":"p","eventTime":0,"step":0,"customer":"C1","age":"3","gender":"M","zipcodeOri":"28007","merchant":"M1","zipMerchant":"28007","category":"es_health","amount":44.26,"fraud":null}"#;
    writeln!(child.stdin.take().unwrap(), "{payment}\n{payment}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let rows: Vec<Vec<f32>> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert!((rows[0][0] - 0.005313).abs() < 1e-6);
    let ones: Vec<usize> = (1..28).filter(|i| rows[0][*i] == 1.0).collect();
    assert_eq!(ones, vec![5, 19, 26]);

    // CSV in, and an unknown category is a clear error.
    let mut child = fraudstream().arg("encode").stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    writeln!(
        child.stdin.take().unwrap(),
        "{}\n0,'C1','3','M','28007','M1','28007','es_casino',1.0,0",
        fraudstream::payment::BANKSIM_HEADER
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("es_casino"));
}

/// Produces with the CLI, reads back with the CLI, in each wire format.
#[test]
fn produce_then_consume_round_trips_through_the_broker() {
    let kafka = common::kafka();
    for format in ["confluent", "json"] {
        let topic = common::unique("cli-payments");
        let summary = run_ok(fraudstream().args([
            "produce",
            "--brokers",
            &kafka.brokers,
            "--topic",
            &topic,
            "--simulate",
            "3000",
            "--seed",
            "9",
            "--format",
            format,
            "--keep-event-time",
            "-X",
            "batch.num.messages=1000",
        ]));
        assert!(summary.contains("sent 3000 payments, 0 failed"), "{summary}");
        let mut read = consume_payments(&kafka, &topic, &["--format", format]);
        let mut expected: Vec<Payment> = Simulator::new(3000, 9).collect();
        read.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
        expected.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
        assert_eq!(read.len(), 3000, "{format}");
        assert_eq!(read, expected, "{format}: payments changed on the way");
    }
}

/// `--drift-after K` (and its env fallback): the first K payments are regime
/// A's, the rest regime B's, in the CSV and through the broker alike.
#[test]
fn simulate_and_produce_drift_after_k_payments() {
    let text = run_ok(
        fraudstream().args(["simulate", "--rows", "3000", "--seed", "9"]).env("FRAUDSTREAM_DRIFT_AFTER", "1000"),
    );
    let rows: Vec<Payment> = BankSimReader::new(text.as_bytes()).unwrap().map(|r| r.unwrap()).collect();
    let expected: Vec<Payment> = Simulator::new(3000, 9).drift_after(1000).collect();
    let key = |p: &Payment| (p.customer.clone(), p.category.clone(), p.amount.to_bits(), p.fraud);
    assert_eq!(rows.iter().map(key).collect::<Vec<_>>(), expected.iter().map(key).collect::<Vec<_>>());
    let regime_a: Vec<Payment> = Simulator::new(3000, 9).collect();
    assert_eq!(expected[..1000], regime_a[..1000]);
    let b_frauds = expected[1000..].iter().filter(|p| p.fraud == Some(true));
    assert!(
        b_frauds.clone().count() > 0
            && b_frauds.clone().all(|p| ["es_transportation", "es_food"].contains(&p.category.as_str()))
    );

    let kafka = common::kafka();
    let topic = common::unique("cli-drift");
    let summary = run_ok(fraudstream().args([
        "produce",
        "--brokers",
        &kafka.brokers,
        "--topic",
        &topic,
        "--simulate",
        "3000",
        "--seed",
        "9",
        "--drift-after",
        "1000",
        "--keep-event-time",
    ]));
    assert!(summary.contains("sent 3000 payments, 0 failed"), "{summary}");
    let mut read = consume_payments(&kafka, &topic, &[]);
    let mut expected = expected;
    read.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
    expected.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
    assert_eq!(read, expected, "the drifted payments changed on the way");

    // Only simulated payments drift.
    let refused = fraudstream().args(["produce", "--csv", "payments.csv", "--drift-after", "5"]).output().unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("--drift-after") && said.contains("cannot be used with"),
        "{said}"
    );
}

#[test]
fn produce_publishes_the_real_banksim_file() {
    let kafka = common::kafka();
    let topic = common::unique("cli-banksim");
    let csv = common::shared_dir().join("banksim/bs140513_100_customers.csv");
    let summary = run_ok(
        fraudstream()
            .args(["produce", "--brokers", &kafka.brokers, "--topic", &topic, "--rate", "50000", "--csv"])
            .arg(&csv),
    );
    assert!(summary.contains("sent 15534 payments, 0 failed"), "{summary}");
    let read = consume_payments(&kafka, &topic, &["--max", "20000"]);
    assert_eq!(read.len(), 15_534);
    assert_eq!(read.iter().filter(|p| p.fraud == Some(true)).count(), 92);
}

#[test]
fn produce_reports_a_bad_broker_address_clearly() {
    let out = fraudstream()
        .args(["produce", "--brokers", "127.0.0.1:1", "--topic", "x", "--simulate", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

/// The README's main job pointed at the real broker and S3 store by flags.
#[test]
fn demo_runs_against_the_real_broker_and_s3() {
    let kafka = common::kafka();
    let store = format!("s3://{}/{}", common::bucket(), common::unique("demo"));
    let out = run_ok(fraudstream().args([
        "demo",
        "--brokers",
        &kafka.brokers,
        "--model-store",
        &store,
        "--train-rows",
        "30000",
        "--events",
        "5000",
    ]));
    assert!(out.contains("scored 5000 of 5000 payments (0 dead-lettered)"), "{out}");
    assert!(out.contains("fraud caught at the model's threshold"), "{out}");
}

/// `consume --kind scored` filters: frauds only, a minimum probability, the first N.
#[tokio::test]
async fn consume_filters_scored_payments() {
    use fraudstream::codec::{Codec, WireFormat};
    let kafka = common::kafka();
    let topic = common::unique("cli-scored");
    fraudstream::kafka::ensure_topics(&kafka, &[&topic], 1).await.unwrap();
    let codec = Codec::new(WireFormat::Confluent, 2);
    let records: Vec<(String, Vec<u8>)> = Simulator::new(100, 4)
        .enumerate()
        .map(|(i, payment)| {
            let p = i as f64 / 100.0;
            let scored = fraudstream::ScoredPayment {
                payment,
                fraud_probability: p,
                is_fraud: p >= 0.9,
                threshold: 0.9,
                model_name: "payfraud".into(),
                model_version: "1".into(),
                scored_at: 0,
                decision: None,
                reasons: Vec::new(),
                shadow: None,
            };
            (i.to_string(), codec.encode_scored(&scored).unwrap())
        })
        .collect();
    common::publish(&common::input_producer(), &topic, &records).await;
    let consume = |extra: &[&str]| {
        let mut cmd = fraudstream();
        cmd.args(["consume", "--brokers", &kafka.brokers, "--topic", &topic, "--idle-timeout", "5s"]).args(extra);
        run_ok(&mut cmd)
            .lines()
            .map(|l| serde_json::from_str::<fraudstream::ScoredPayment>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let frauds = consume(&["--frauds-only"]);
    assert_eq!(frauds.len(), 10);
    assert!(frauds.iter().all(|s| s.is_fraud));
    let high = consume(&["--min-probability", "0.75"]);
    assert_eq!(high.len(), 25);
    assert!(high.iter().all(|s| s.fraud_probability >= 0.75));
    assert_eq!(consume(&["-n", "3"]).len(), 3);
}

/// Every flag of every command has an environment fallback, shown in `--help`.
#[test]
fn every_flag_has_an_environment_fallback() {
    for command in ["simulate", "encode", "produce", "consume", "score", "demo", "models", "monitor"] {
        let help = run_ok(fraudstream().args([command, "--help"]));
        // An option's block: its line (`  -x, --name <V>  ...`) and the indented lines after it.
        let mut blocks: Vec<String> = Vec::new();
        for line in help.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('-') && line.len() - trimmed.len() <= 6 {
                blocks.push(line.to_string());
            } else if let Some(block) = blocks.last_mut().filter(|_| line.starts_with("   ")) {
                block.push_str(line);
            }
        }
        assert!(!blocks.is_empty(), "{command}: no options found in\n{help}");
        for block in blocks {
            if block.contains("--help") || block.contains("--version") {
                continue;
            }
            assert!(
                block.contains("[env: "),
                "`fraudstream {command}`: a flag without an environment fallback:\n{block}"
            );
        }
    }
}

/// `--help` names the variables but never prints their values: KAFKA_PROPERTIES holds passwords.
#[test]
fn help_never_prints_kafka_credentials() {
    for command in ["produce", "consume", "score", "demo", "monitor"] {
        let help =
            run_ok(fraudstream().args([command, "--help"]).env("KAFKA_PROPERTIES", "sasl.password=s3cret-value"));
        assert!(help.contains("KAFKA_PROPERTIES"), "{command}: {help}");
        assert!(!help.contains("s3cret-value"), "`fraudstream {command} --help` printed a password:\n{help}");
    }
}

/// `fraudstream demo --drift` on the mock cluster: model 1's live AP drops
/// when the fraud pattern moves, PSI alarms before any label, the model
/// retrained on the monitor's labelled topic wins and serves, live AP recovers.
#[test]
fn the_drift_demo_shows_the_loop_recover() {
    let out = run_ok(fraudstream().args(["demo", "--drift", "--train-rows", "100000"]));
    assert!(out.contains("PSI alarm before any label") && out.contains("category"), "{out}");
    assert!(out.contains("challenger wins"), "the retrained version must win the gate:\n{out}");
    let line = out.lines().find(|l| l.contains("live AP:")).unwrap_or_else(|| panic!("no AP timeline:\n{out}"));
    let aps: Vec<f64> =
        line.split_whitespace().filter_map(|w| w.parse::<f64>().ok()).filter(|v| (0.0..=1.0).contains(v)).collect();
    let [before, drifted, recovered] = aps[..] else { panic!("{line}") };
    assert!(drifted < before / 2.0, "the drift must hurt model 1: {line}");
    assert!(recovered > drifted + 0.2, "retraining must recover: {line}");
}
