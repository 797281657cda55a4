//! Real Kafka clusters of our own, for faults on the broker side: a
//! transactional produce survives the loss of the partition leader; the
//! bridge rides out each of three brokers killed and restarted, and a
//! broker paused longer than the commit timeout.

use crate::common::kafka::{create_topics, KafkaCluster};
use crate::common::{
    assert_every_seq, publish_all, read_committed, telemetry_messages, unique, Bridge, BridgeFiles,
    Rig,
};
use mqtt_kafka_bridge::telemetry::TX_SETTLED;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use std::time::{Duration, Instant};

fn leader(cluster: &KafkaCluster, topic: &str) -> u32 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .create()
        .unwrap();
    let metadata = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let leader_id = metadata.topics()[0].partitions()[0].leader();
    let broker = metadata
        .brokers()
        .iter()
        .find(|b| b.id() == leader_id)
        .expect("leader broker");
    cluster
        .node_with_port(broker.port() as u16)
        .expect("leader is one of ours")
}

fn commit_batch(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    range: std::ops::Range<u32>,
) {
    p.begin_transaction().unwrap();
    for i in range {
        let value = i.to_string();
        p.send(BaseRecord::<(), String>::to(topic).payload(&value))
            .expect("enqueue");
    }
    p.commit_transaction(Duration::from_secs(60))
        .expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_produce_survives_losing_the_partition_leader() {
    let mut cluster = KafkaCluster::start(3);
    let topic = unique("failover");
    create_topics(&cluster.bootstrap, &[&topic], 1, 3).await;

    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("transactional.id", unique("failover-tx"))
        .set("acks", "all")
        .create()
        .unwrap();
    p.init_transactions(Duration::from_secs(60)).unwrap();
    commit_batch(&p, &topic, 0..100);

    let victim = leader(&cluster, &topic);
    cluster.kill(victim);
    commit_batch(&p, &topic, 100..200);
    let new_leader = leader(&cluster, &topic);
    assert_ne!(new_leader, victim, "leadership moved");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("group.id", unique("failover-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 200 {
        assert!(
            Instant::now() < deadline,
            "read {} of 200:\n{}",
            seen.len(),
            cluster.logs()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            seen.push(
                String::from_utf8_lossy(m.payload().unwrap())
                    .parse::<u32>()
                    .unwrap(),
            );
        }
    }
    assert_eq!(
        seen,
        (0..200).collect::<Vec<_>>(),
        "every committed record once, in order"
    );

    cluster.restart(victim);
    assert_eq!(cluster.node_ids().len(), 3);
}

/// The bridge, exactly once, while each of the three brokers in turn is
/// killed (kill -9) and restarted under load; one of them is the
/// transaction coordinator, one leads the state topic, all lead data
/// partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_rides_out_every_broker_restart_exactly_once() {
    let mut cluster = KafkaCluster::start(3);
    let rig = Rig::on_cluster(&cluster).await;
    let config = rig
        .bridge_config()
        .delivery("state_topic", rig.topics.state())
        .build();
    let bridge = Bridge::start(config).await;

    let messages = telemetry_messages("k", 2000, 8, 2);
    let mut chunks = messages.chunks(500);
    publish_all(rig.broker.port, chunks.next().unwrap()).await;
    for (node, chunk) in cluster.node_ids().into_iter().zip(chunks) {
        tokio::task::block_in_place(|| cluster.kill(node));
        publish_all(rig.broker.port, chunk).await;
        tokio::task::block_in_place(|| cluster.restart(node));
    }
    let landed = tokio::task::block_in_place(|| {
        read_committed(
            &cluster.bootstrap,
            &[&rig.topics.telemetry()],
            2000,
            Duration::from_secs(120),
            Duration::from_secs(2),
        )
    });
    bridge.stop().await;
    assert_eq!(assert_every_seq(&landed, 2000), 2000, "records");
}

/// A single broker paused (SIGSTOP, as a long GC pause or a stalled VM
/// would stop it) for longer than the commit timeout, twice, under load.
/// Commits and aborts then end without a verdict; the bridge settles each
/// one (asks the same producer again until the broker answers, reads its
/// head record, re-creates the producer) and every message lands once.
/// The real binary, so that its own metrics show what was settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_left_unknown_by_a_paused_broker_are_settled_exactly_once() {
    let cluster = KafkaCluster::start(1);
    let rig = Rig::on_cluster(&cluster).await;
    let files = BridgeFiles::new(
        &rig.bridge_config()
            .delivery("state_topic", rig.topics.state())
            .delivery("commit_timeout_ms", 2000)
            // Longer than a pause: the coordinator must not abort on its own.
            .delivery("transaction_timeout_ms", 60_000),
    );
    let mut bridge = files.start(None);
    bridge.await_connected(Duration::from_secs(30)).await;

    // About 250 messages a second for 12 s, with the broker paused for
    // 5 s from 2 s and from 9 s.
    let count = 3000;
    let port = rig.broker.port;
    let publisher = tokio::spawn(async move {
        for chunk in telemetry_messages("p", count, 8, 2).chunks(100) {
            publish_all(port, chunk).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    });
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.pause(1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        cluster.resume(1);
    }
    publisher.await.expect("publisher");
    let landed = tokio::task::block_in_place(|| {
        std::panic::catch_unwind(|| {
            read_committed(
                &cluster.bootstrap,
                &[&rig.topics.telemetry()],
                count as usize,
                Duration::from_secs(120),
                Duration::from_secs(2),
            )
        })
    })
    .unwrap_or_else(|panic| {
        // What the bridge was doing says more than the count.
        eprintln!(
            "bridge log:\n{}",
            crate::common::process::tail(&files.log())
        );
        std::panic::resume_unwind(panic)
    });
    assert_eq!(
        assert_every_seq(&landed, count.into()),
        count as usize,
        "records"
    );
    // If this never comes, no transaction was left without a verdict: the
    // pauses tested nothing.
    bridge
        .await_metric(TX_SETTLED, &[], |n| n >= 1.0, Duration::from_secs(30))
        .await;
    tokio::task::block_in_place(|| bridge.stop());
}
