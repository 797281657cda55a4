//! The exactly-once state read on real Kafka: it must wait for a
//! transaction still open on the state topic and then see what it
//! committed. Reading only to the last stable offset (what a
//! `read_committed` client's watermark query answers) returned at once with
//! the old head, which once made `settle` judge a committed batch aborted
//! and produce it twice.

use crate::common::kafka::TestKafka;
use crate::common::unique;
use mqtt_kafka_bridge::kafka::state_store::{self, head_key};
use mqtt_kafka_bridge::kafka::KafkaConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use std::time::Duration;

const BUCKETS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_read_waits_for_an_open_transaction_and_sees_its_commit() {
    // The mock cluster has no last stable offset to tell apart.
    let kafka = TestKafka::real();
    let bootstrap = kafka.bootstrap();
    let (topic, id) = (unique("state"), unique("bridge"));
    let config = KafkaConfig {
        bootstrap_servers: bootstrap.clone(),
        transactional_id: id.clone(),
        dead_letter_topic: "dlq".into(),
        command_group: None,
        properties: Default::default(),
    };
    let load = |timeout| {
        let (config, topic, id) = (config.clone(), topic.clone(), id.clone());
        async move { state_store::load(&config, &topic, &id, BUCKETS, timeout).await }
    };
    // Creates the topic; nothing stored yet.
    let empty = load(Duration::from_secs(60)).await.expect("first read");
    assert_eq!(empty.head, None);

    let writer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("transactional.id", unique("writer"))
        .create()
        .expect("producer");
    writer
        .init_transactions(Duration::from_secs(30))
        .expect("init_transactions");
    writer.begin_transaction().expect("begin");
    writer
        .send(
            BaseRecord::to(&topic)
                .key(&head_key(&id))
                .payload("new-head"),
        )
        .map_err(|(e, _)| e)
        .expect("enqueue");
    writer.flush(Duration::from_secs(30)).expect("flush");

    let mut read = tokio::spawn(load(Duration::from_secs(60)));
    // The record is on the broker, its transaction open: the read must not
    // end (with the old head) until the transaction is decided.
    assert!(
        tokio::time::timeout(Duration::from_secs(3), &mut read)
            .await
            .is_err(),
        "the read returned while a transaction was open on the state topic"
    );
    writer
        .commit_transaction(Duration::from_secs(30))
        .expect("commit");
    let stored = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the read ended after the commit")
        .expect("no panic")
        .expect("read");
    assert_eq!(stored.head.as_deref(), Some(&b"new-head"[..]));
}
