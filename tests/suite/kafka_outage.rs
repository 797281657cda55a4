//! A Kafka outage longer than the commit timeout is ridden out without a
//! restart: the failed commit and abort leave the transaction's outcome
//! unknown, so the bridge settles it once Kafka is back (asks again, reads
//! its head record, re-creates its producer) and acknowledges
//! the batch or produces it again.
//! The bridge runs as the real binary, so that its own `/readyz` shows when
//! a commit has been failing, and that it is ready again afterwards.

use crate::common::kafka::KafkaCluster;
use crate::common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_commit_timeout_is_ridden_out_without_restart() {
    // A Kafka of its own, to freeze and thaw (see bridge_end_to_end.rs
    // for why not the mock cluster, nor SIGKILL).
    let cluster = KafkaCluster::start(1);
    let rig = Rig::on_cluster(&cluster).await;
    let files = BridgeFiles::new(
        &rig.bridge_config()
            .delivery("state_topic", rig.topics.state())
            .delivery("commit_timeout_ms", 1500)
            .delivery("transaction_timeout_ms", 10_000)
            // Past one commit timeout: a commit still going on has failed
            // at least once.
            .metrics("max_commit_wait_ms", 2000),
    );
    let mut bridge = files.start(None);
    bridge.await_connected(Duration::from_secs(30)).await;

    cluster.pause(1);
    publish_all(rig.broker.port, &telemetry_messages("o", 200, 4, 1)).await;
    // Wait until a commit has failed for real before bringing Kafka back.
    // How it fails varies (an abortable error, then an abort; or a timeout,
    // then settling): the commit going on past its bound covers both, and
    // is what readiness reports.
    bridge
        .await_probe(
            "/readyz",
            503,
            r#""commit":"committing for"#,
            Duration::from_secs(60),
        )
        .await;
    cluster.resume(1);

    let landed = read_committed_distinct(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        200,
        Duration::from_secs(90),
        Duration::from_millis(500),
    );
    assert!(
        bridge.is_running(),
        "the bridge kept running through the outage"
    );
    bridge
        .await_probe("/readyz", 200, "", Duration::from_secs(30))
        .await;
    bridge.stop();
    assert_every_seq(&landed, 200);
}
