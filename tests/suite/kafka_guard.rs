//! Proves the test rig tells the truth about transactions. If the Kafka the
//! tests run against does not honour them (librdkafka's mock cluster shows
//! aborted records to `read_committed` readers), this fails, and so every
//! exactly-once claim of the other tests would be worthless.

use crate::common::kafka::test_kafka;
use crate::common::unique;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use std::time::{Duration, Instant};

fn producer(bootstrap: &str, transactional_id: &str) -> ThreadedProducer<DefaultProducerContext> {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", transactional_id)
        .create()
        .expect("producer");
    p.init_transactions(Duration::from_secs(30))
        .expect("init_transactions");
    p
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, value: &str) {
    p.send(BaseRecord::<(), str>::to(topic).payload(value))
        .expect("enqueue");
}

/// Every value in `topic` visible at `isolation`, read until `expected`
/// arrived and the end of the partition was reached.
fn values(bootstrap: &str, topic: &str, isolation: &str, expected: usize) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("guard"))
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                out.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
            }
            Some(Err(KafkaError::PartitionEOF(_))) if out.len() >= expected => return out,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{isolation}: only {out:?} within 30 s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_records_are_invisible_to_read_committed_and_old_producers_are_fenced() {
    let kafka = test_kafka();
    let bootstrap = kafka.bootstrap();
    let topic = unique("guard");
    kafka.create_topics(&[&topic], 1).await;

    let id = unique("guard-tx");
    let p = producer(&bootstrap, &id);
    p.begin_transaction().unwrap();
    send(&p, &topic, "aborted");
    p.flush(Duration::from_secs(10)).unwrap();
    p.abort_transaction(Duration::from_secs(10)).unwrap();
    p.begin_transaction().unwrap();
    send(&p, &topic, "committed");
    p.commit_transaction(Duration::from_secs(10)).unwrap();

    let committed = values(&bootstrap, &topic, "read_committed", 1);
    assert_eq!(
        committed,
        ["committed"],
        "{}: read_committed must not see aborted records",
        kafka.name()
    );
    let uncommitted = values(&bootstrap, &topic, "read_uncommitted", 2);
    assert_eq!(uncommitted, ["aborted", "committed"], "{}", kafka.name());

    // A second producer with the same transactional.id fences the first.
    p.begin_transaction().unwrap();
    send(&p, &topic, "zombie");
    let newer = producer(&bootstrap, &id);
    let commit = p.commit_transaction(Duration::from_secs(10));
    match commit {
        Err(KafkaError::Transaction(e)) => assert!(
            e.is_fatal(),
            "fenced producer's commit must fail fatally: {e}"
        ),
        other => panic!(
            "{}: the old producer was not fenced: {other:?}",
            kafka.name()
        ),
    }
    newer.begin_transaction().unwrap();
    send(&newer, &topic, "newer");
    newer.commit_transaction(Duration::from_secs(10)).unwrap();
    assert_eq!(
        values(&bootstrap, &topic, "read_committed", 2),
        ["committed", "newer"]
    );
}
