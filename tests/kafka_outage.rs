//! A Kafka outage longer than the commit timeout is ridden out without a
//! restart: the failed commit and abort leave the transaction's outcome
//! unknown, so the bridge settles it once Kafka is back (asks again, reads
//! its head record, re-creates its producer) and acknowledges
//! the batch or produces it again.
//! (Its own test binary: it watches the process-wide abort counter.)

mod common;

use common::kafka::TestKafka;
use common::*;
use mqtt_kafka_bridge::telemetry::STATS;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_commit_timeout_is_ridden_out_without_restart() {
    // Error injection on demand: only the mock cluster can take a broker
    // down and bring it back within a test.
    let Rig {
        broker,
        topics,
        kafka,
        bootstrap,
    } = Rig::start_with(TestKafka::mock()).await;
    let mut config = bridge_config(broker.port, &bootstrap, &unique("bridge"), "", &topics);
    config.bridge.delivery.commit_timeout_ms = 1500;
    config.bridge.delivery.transaction_timeout_ms = 10_000;
    let bridge = Bridge::start(config).await;

    kafka.mock_cluster().broker_down(1).expect("broker down");
    let body = r#"{"ts": 1, "ambient_c": 21.5, "target_c": 22.0, "humidity_pct": 40.0, "air_quality_ppm": 600, "blower_pct": 55, "load_pct": 48.0, "energy_kwh": 1000.0, "seq": SEQ}"#;
    let messages: Vec<_> = (0..200)
        .map(|seq| {
            Publish::new(
                format!("site/o/hvac/u{}/telemetry", seq % 4),
                body.replace("SEQ", &seq.to_string()),
                1,
            )
        })
        .collect();
    publish_all(broker.port, &messages).await;
    // Wait until a commit has failed for real before bringing Kafka back.
    let deadline = Instant::now() + Duration::from_secs(60);
    while STATS.aborts.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "no commit failed while Kafka was down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kafka.mock_cluster().broker_up(1).expect("broker up");

    let landed = read_committed_distinct(
        &bootstrap,
        &[&topics.telemetry()],
        200,
        Duration::from_secs(90),
        Duration::from_millis(500),
    );
    assert!(
        !bridge.is_finished(),
        "the bridge kept running through the outage"
    );
    bridge.stop().await;
    assert_every_seq(&landed, 200);
}
