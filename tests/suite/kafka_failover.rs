//! Broker failover under load: a three-node KRaft cluster (RF 3,
//! `min.insync.replicas` 2, one transaction-coordinator partition) whose
//! brokers are each killed with SIGKILL and restarted in turn while QoS 2
//! messages arrive at about 700 a second. Every message must land exactly
//! once, and the bridge must never go longer than a stated bound without a
//! commit while messages are waiting.
//!
//! The bridge runs as the real binary: the longest stall is measured on
//! its own metrics (commits and records produced), which nothing else
//! moves.

use crate::common::kafka::KafkaCluster;
use crate::common::{
    assert_every_seq, distinct_seqs, publish_all, read_committed_until_quiet, telemetry_messages,
    BridgeFiles, Rig,
};
use mqtt_kafka_bridge::telemetry::{PRODUCED, TX_COMMITTED};
use std::time::{Duration, Instant};

/// The longest the bridge may go without a commit while brokers fail over
/// and messages wait. A broker's session times out after 2 s here
/// (`broker.session.timeout.ms`), a new leader and coordinator take a few
/// seconds more, and librdkafka retries with backoff.
const STALL_BOUND: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_is_exactly_once_and_never_stalls_long() {
    let mut cluster = KafkaCluster::start(3);
    let rig = Rig::on_cluster(&cluster).await;
    let (broker, topics) = (&rig.broker, &rig.topics);
    let files = BridgeFiles::new(&rig.bridge_config().delivery("state_topic", topics.state()));
    let mut bridge = files.start(None);
    bridge.await_connected(Duration::from_secs(30)).await;

    // 700 a second for 30 s (BRIDGE_TEST_FAILOVER_MESSAGES for longer
    // runs; the brokers are killed in the first 40 s either way).
    let count: u32 = std::env::var("BRIDGE_TEST_FAILOVER_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(21_000);
    let port = broker.port;
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        let messages = telemetry_messages("f", count, 16, 2);
        let mut next = tokio::time::Instant::now();
        for chunk in messages.chunks(70) {
            publish_all(port, chunk).await;
            next += Duration::from_millis(100);
            tokio::time::sleep_until(next).await;
        }
    });
    // The longest time without a commit, sampled every 100 ms until every
    // message has been committed.
    let metrics = bridge.metrics();
    let sampler = tokio::spawn(async move {
        // Counters appear with the first commit: none yet is zero.
        let sample = || async move {
            let scrape = metrics.scrape_async().await.expect("scrape the bridge");
            (
                scrape.value(TX_COMMITTED, &[]).unwrap_or(0.0),
                scrape.value(PRODUCED, &[]).unwrap_or(0.0),
            )
        };
        let (mut last, mut since, mut worst) = (sample().await.0, Instant::now(), Duration::ZERO);
        let mut worst_at = Duration::ZERO;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (now, produced) = sample().await;
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() > worst {
                worst = since.elapsed();
                worst_at = started.elapsed();
            }
            if produced >= f64::from(count) || started.elapsed() > Duration::from_secs(300) {
                break;
            }
        }
        (worst, worst_at)
    });
    for node in cluster.node_ids() {
        tokio::time::sleep(Duration::from_secs(5)).await;
        tokio::task::block_in_place(|| cluster.kill(node));
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::block_in_place(|| cluster.restart(node));
    }
    publisher.await.expect("publisher");
    let published = started.elapsed();
    let telemetry = topics.telemetry();
    let dead_letter = topics.dead_letter();
    let all = tokio::task::block_in_place(|| {
        read_committed_until_quiet(
            &cluster.bootstrap,
            &[&telemetry, &dead_letter],
            count as usize,
            Duration::from_secs(180),
        )
    });
    let (landed, dead): (Vec<_>, Vec<_>) = all.into_iter().partition(|l| l.topic == telemetry);
    assert!(
        dead.is_empty(),
        "{} dead-lettered, e.g. {:?}",
        dead.len(),
        dead.first().map(|d| &d.headers)
    );
    let (seqs, _) = distinct_seqs(&landed);
    let missing: Vec<u64> = (0..u64::from(count))
        .filter(|s| seqs.binary_search(s).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "{} missing: {:?}",
        missing.len(),
        &missing[..missing.len().min(200)]
    );
    let (worst, worst_at) = sampler.await.expect("sampler");
    let done = started.elapsed();
    eprintln!(
        "published {count} in {published:?}, all committed after {done:?}; longest time without a commit: {worst:?} (ending {worst_at:?} in)"
    );
    tokio::task::block_in_place(|| bridge.stop());
    assert_eq!(
        assert_every_seq(&landed, count.into()),
        count as usize,
        "records"
    );
    assert!(
        worst < STALL_BOUND,
        "the bridge went {worst:?} without a commit (at {worst_at:?}); the bound is {STALL_BOUND:?}"
    );
}
