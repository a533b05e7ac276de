//! The real broker works with our Kafka client: a consumer group round-trips
//! 1,000 messages and resumes from its committed offsets after a restart.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

fn group_consumer(group: &str) -> StreamConsumer {
    common::kafka()
        .client_config(&[
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "earliest"),
            ("partition.assignment.strategy", "cooperative-sticky"),
        ])
        .create()
        .expect("consumer")
}

/// Reads `n` messages and returns their payloads as numbers.
async fn read(consumer: &StreamConsumer, n: usize) -> Vec<u32> {
    let mut stream = consumer.stream();
    let mut seen = Vec::new();
    while seen.len() < n {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no message within 30 s after {} of {n}", seen.len()))
            .expect("stream ended")
            .expect("kafka error");
        let text = std::str::from_utf8(message.payload().unwrap()).unwrap();
        seen.push(text.parse().unwrap());
    }
    seen
}

#[tokio::test]
async fn consumer_group_round_trip_and_resume_after_restart() {
    let kafka = common::kafka();
    let topic = common::unique("smoke");
    fraudstream::kafka::ensure_topics(&kafka, &[&topic], 3).await.unwrap();

    // Ordinary lz4 batches: the second member resumes inside one.
    let producer: FutureProducer = common::input_producer();
    let deliveries: Vec<_> = (0..1000u32)
        .map(|i| {
            let payload = i.to_string();
            let key = (i % 17).to_string();
            producer.send_result(FutureRecord::to(&topic).key(&key).payload(&payload)).expect("enqueue")
        })
        .collect();
    for d in deliveries {
        d.await.expect("delivery future").expect("broker ack");
    }

    let group = common::unique("smoke-group");
    let first = {
        let consumer = group_consumer(&group);
        consumer.subscribe(&[&topic]).unwrap();
        let seen = read(&consumer, 600).await;
        consumer.commit_consumer_state(CommitMode::Sync).expect("commit");
        seen
    };
    // A new member of the same group picks up exactly where the first stopped.
    let consumer = group_consumer(&group);
    consumer.subscribe(&[&topic]).unwrap();
    let second = read(&consumer, 400).await;
    let extra = tokio::time::timeout(Duration::from_secs(3), async { consumer.stream().next().await }).await;
    assert!(extra.is_err(), "more than 1,000 messages came back: committed offsets were not honoured");

    let all: BTreeSet<u32> = first.iter().chain(&second).copied().collect();
    assert_eq!(first.len() + second.len(), 1000);
    assert_eq!(all, (0..1000).collect::<BTreeSet<_>>(), "messages lost or duplicated across the restart");
}
