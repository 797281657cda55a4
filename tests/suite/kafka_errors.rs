//! The real sink against Kafka failures that real brokers do not produce on
//! demand, injected with librdkafka's mock cluster (after librdkafka's own
//! `tests/0105-transactions_mock.c`): EndTxn errors, a fenced commit, a
//! transaction coordinator that moves.
//!
//! The mock shows aborted records to `read_committed` readers, so a test
//! that counts exact records here also proves no transaction was aborted.

use crate::common::kafka::TestKafka;
use crate::common::*;
use mqtt_kafka_bridge::app::AppError;
use mqtt_kafka_bridge::delivery::DeliveryError;
use mqtt_kafka_bridge::kafka::SinkError;
use mqtt_kafka_bridge::telemetry::TX_SETTLED;
use rdkafka::mocking::MockCoordinator;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::time::{Duration, Instant};

const ARRIVE: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(1);

/// Retriable EndTxn errors are retried by librdkafka inside the commit:
/// the transaction commits, nothing is aborted or produced twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_end_txn_errors_commit_once() {
    let rig = Rig::start_with(TestKafka::mock()).await;
    let bridge = Bridge::start(rig.bridge_config().build()).await;
    rig.kafka.mock_cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
        ],
    );
    publish_all(rig.broker.port, &telemetry_messages("r", 300, 4, 2)).await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        300,
        ARRIVE,
        SETTLE,
    );
    bridge.stop().await;
    assert_eq!(assert_every_seq(&landed, 300), 300, "records");
}

/// A commit that lands but is answered after the commit timeout: its
/// outcome is unknown to the bridge. It asks the same producer again (the
/// late answer arrives: committed), re-creates the producer, reads its head
/// record back, and acknowledges. Each message once. (Re-creating the
/// producer at once and producing the batch again, as the bridge did
/// before, duplicated the batch.) The real binary, so that its own metrics
/// show the unknown outcome was settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_answered_after_its_timeout_is_not_produced_again() {
    let rig = Rig::start_with(TestKafka::mock()).await;
    let files = BridgeFiles::new(&rig.bridge_config().delivery("commit_timeout_ms", 1000));
    let mut bridge = files.start(None);
    bridge.await_connected(ARRIVE).await;
    let messages = telemetry_messages("u", 400, 4, 2);
    publish_all(rig.broker.port, &messages[..200]).await;
    let first = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        200,
        ARRIVE,
        SETTLE,
    );
    assert_eq!(first.len(), 200, "before the late answer");

    rig.kafka
        .delay_next_response(1, RDKafkaApiKey::EndTxn, Duration::from_millis(2500));
    publish_all(rig.broker.port, &messages[200..]).await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        400,
        ARRIVE,
        SETTLE,
    );
    assert_eq!(assert_every_seq(&landed, 400), 400, "records");
    // If this never comes, the late EndTxn answer left no outcome unknown:
    // the test tested nothing.
    bridge
        .await_metric(TX_SETTLED, &[], |n| n >= 1.0, ARRIVE)
        .await;
    bridge.stop();
}

/// A commit answered "fenced" stops the bridge with a fatal error and
/// acknowledges nothing of that batch: a successor gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_commit_stops_the_bridge_without_acknowledging() {
    let rig = Rig::start_with(TestKafka::mock()).await;
    let id = unique("bridge");
    let config = || rig.bridge_config().client_id(&id).build();
    let bridge = Bridge::start(config()).await;
    rig.kafka.mock_cluster().request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    publish_all(rig.broker.port, &telemetry_messages("f", 200, 4, 2)).await;
    let deadline = Instant::now() + ARRIVE;
    while !bridge.is_finished() {
        assert!(Instant::now() < deadline, "the fenced bridge kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = bridge.stop_result().await;
    assert!(
        matches!(
            stopped,
            Err(AppError::Delivery(DeliveryError::Kafka(SinkError::Fatal(
                _
            ))))
        ),
        "{stopped:?}"
    );
    let successor = Bridge::start(config()).await;
    let landed = read_committed_distinct(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        200,
        ARRIVE,
        SETTLE,
    );
    successor.stop().await;
    assert_every_seq(&landed, 200);
}

/// The transaction coordinator moves to another broker twice mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moving_transaction_coordinator_loses_and_duplicates_nothing() {
    let rig = Rig::start_with(TestKafka::mock_with_brokers(3)).await;
    let id = unique("bridge");
    let bridge = Bridge::start(rig.bridge_config().client_id(&id).build()).await;
    let messages = telemetry_messages("c", 600, 4, 2);
    for (chunk, coordinator) in messages.chunks(200).zip([2, 3, 1]) {
        publish_all(rig.broker.port, chunk).await;
        rig.kafka
            .mock_cluster()
            .coordinator(MockCoordinator::Transaction(id.clone()), coordinator)
            .expect("move coordinator");
    }
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        600,
        ARRIVE,
        SETTLE,
    );
    bridge.stop().await;
    assert_eq!(assert_every_seq(&landed, 600), 600, "records");
}

/// A record Kafka refuses fails the commit at once, without waiting for
/// the rest of the doomed transaction: here a record whose broker answers
/// 10 s late. In CI a record enqueued just as librdkafka purged the
/// failed transaction's queues was never sent, and the sink's flush
/// waited for it until the commit timed out: one refused record held the
/// flow for `commit_timeout_ms` (a flake of `hostile_input`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_fails_the_commit_without_waiting_for_the_rest() {
    use crate::common::kafka::{test_record as record, test_sink};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    let kafka = TestKafka::mock_with_brokers(2);
    let cluster = kafka.mock_cluster();
    for (topic, broker) in [("refusing", 1), ("slow", 2)] {
        cluster.create_topic(topic, 1, 1).expect("topic");
        cluster
            .partition_leader(topic, 0, Some(broker))
            .expect("leader");
    }
    let id = unique("doomed");
    cluster
        .coordinator(MockCoordinator::Transaction(id.clone()), 1)
        .expect("coordinator");
    let mut sink = test_sink(&kafka.bootstrap(), &id).await;
    // Both partitions known and in use before the failure.
    for topic in ["refusing", "slow"] {
        sink.send(&record(topic), false, 0).await.expect("send");
    }
    sink.commit().await.expect("first commit");

    kafka.answer_next(
        1,
        RDKafkaApiKey::Produce,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_TIMESTAMP,
        Duration::ZERO,
    );
    kafka.answer_next(
        2,
        RDKafkaApiKey::Produce,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
        Duration::from_secs(10),
    );
    sink.send(&record("slow"), false, 1).await.expect("send");
    sink.send(&record("refusing"), false, 0)
        .await
        .expect("send");
    let started = Instant::now();
    let committed = sink.commit().await;
    // The flush's own verdict, not librdkafka's after the late answer.
    assert!(
        matches!(
            &committed,
            Err(SinkError::Abortable(KafkaError::MessageProduction(
                RDKafkaErrorCode::InvalidTimestamp
            )))
        ),
        "{committed:?} after {:?}",
        started.elapsed()
    );
    // Well before the late answer (10 s): the flush did not wait for it.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    sink.abort().await.expect("abort");
    let refusals = sink.take_refusals();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(
        (refusals[0].id, refusals[0].code),
        (0, RDKafkaErrorCode::InvalidTimestamp)
    );
}

/// A Kafka whose transaction coordinator is still loading (a cluster
/// starting next to the bridge) for longer than one `init_transactions`
/// may take: librdkafka gives up with a retriable error, and the bridge
/// tries again instead of exiting (it exited with status 1, seen when a
/// test started it right after its Kafka).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_still_loading_at_start_up_is_waited_for() {
    use crate::common::kafka::{test_record, test_sink_with};

    let kafka = TestKafka::mock();
    // About 100 ms apart (librdkafka's retry backoff): some 3 s of
    // loading, three times the timeout of one attempt.
    kafka.mock_cluster().request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 30],
    );
    let mut sink = test_sink_with(
        &kafka.bootstrap(),
        &unique("loading"),
        Duration::from_secs(1),
    )
    .await
    .expect("the producer waited for the coordinator");
    sink.send(&test_record("after-loading"), false, 0)
        .await
        .expect("send");
    sink.commit().await.expect("commit");
}

/// A flush that times out dooms the transaction: whoever gave up on
/// sending the rest of it (the batch producing its suspects one at a
/// time) cannot then commit it without them, even once the records sent
/// so far are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_flush_timed_out_does_not_commit() {
    use crate::common::kafka::{test_record as record, test_sink_with};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    let kafka = TestKafka::mock();
    let id = unique("flush");
    let mut sink = test_sink_with(&kafka.bootstrap(), &id, Duration::from_secs(1))
        .await
        .expect("sink");
    sink.send(&record("slow"), false, 0).await.expect("send");
    sink.commit().await.expect("first commit");

    kafka.delay_next_response(1, RDKafkaApiKey::Produce, Duration::from_secs(3));
    sink.send(&record("slow"), false, 0).await.expect("send");
    let timed_out = sink.flush().await;
    assert!(timed_out.is_err(), "{timed_out:?}");
    // The record is delivered meanwhile; the transaction stays doomed.
    let deadline = Instant::now() + ARRIVE;
    while sink.flush().await.is_err() {
        assert!(Instant::now() < deadline, "never delivered");
    }
    let committed = sink.commit().await;
    assert!(
        matches!(
            committed,
            Err(SinkError::Abortable(KafkaError::Flush(
                RDKafkaErrorCode::OperationTimedOut
            )))
        ),
        "{committed:?}"
    );
    sink.abort().await.expect("abort");
}
