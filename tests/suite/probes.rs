//! `/livez` and `/readyz` of the real binary follow what happens to its
//! MQTT broker and Kafka, as a kubelet would see them.

use crate::common::kafka::{KafkaCluster, TestKafka};
use crate::common::mosquitto::Options;
use crate::common::*;
use mqtt_kafka_bridge::telemetry::{KAFKA_BROKERS_UP, MQTT_CONNECTED, MQTT_SUBSCRIBED, READY};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn check<'a>(body: &'a str, name: &str) -> &'a str {
    let key = format!("\"{name}\":\"");
    let start = body
        .find(&key)
        .unwrap_or_else(|| panic!("no check {name} in {body}"))
        + key.len();
    let len = body[start..].find('"').expect("closing quote");
    &body[start..start + len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_mqtt_and_kafka_outages_and_liveness_holds() {
    // A Kafka of its own, to kill and start again.
    let mut cluster = KafkaCluster::start(1);
    let mut rig = Rig::on_cluster(&cluster).await;
    let files = BridgeFiles::new(
        &rig.bridge_config()
            .delivery("state_topic", rig.topics.state()),
    );
    let mut bridge = files.start(None);

    let ready = bridge.await_probe("/readyz", 200, "", WAIT).await;
    assert_eq!(
        ready.trim(),
        r#"{"status":"ready","checks":{"mqtt":"ok","kafka":"ok","exactly_once_state":"ok","commit":"ok"}}"#
    );
    let scrape = bridge.metrics().scrape_async().await.expect("scrape");
    assert_eq!(scrape.value(READY, &[]), Some(1.0), "{}", scrape.text);

    // Timings for the record (`--nocapture`), not assertions.
    let timed = std::time::Instant::now();
    rig.broker.stop();
    let body = bridge
        .await_probe("/readyz", 503, r#""mqtt":"disconnected""#, WAIT)
        .await;
    eprintln!(
        "MQTT broker killed: /readyz 503 after {:?}",
        timed.elapsed()
    );
    assert_eq!(check(&body, "mqtt"), "disconnected", "{body}");
    assert_eq!(check(&body, "kafka"), "ok", "{body}");
    assert!(body.starts_with(r#"{"status":"not ready""#), "{body}");
    let (live, _) = bridge.metrics().get_async("/livez").await.expect("livez");
    assert_eq!(live, 200, "alive while MQTT is away");
    let scrape = bridge.metrics().scrape_async().await.expect("scrape");
    assert_eq!(scrape.value(MQTT_CONNECTED, &[]), Some(0.0));
    assert_eq!(scrape.value(READY, &[]), Some(0.0));

    let timed = std::time::Instant::now();
    rig.broker.restart();
    bridge.await_probe("/readyz", 200, "", WAIT).await;
    eprintln!("MQTT broker back: /readyz 200 after {:?}", timed.elapsed());

    let timed = std::time::Instant::now();
    cluster.kill(1);
    let body = bridge
        .await_probe("/readyz", 503, r#""kafka":"no broker connection""#, WAIT)
        .await;
    eprintln!(
        "Kafka broker killed: /readyz 503 after {:?}",
        timed.elapsed()
    );
    assert_eq!(check(&body, "kafka"), "no broker connection", "{body}");
    assert_eq!(check(&body, "mqtt"), "ok", "{body}");
    let scrape = bridge.metrics().scrape_async().await.expect("scrape");
    assert_eq!(scrape.value(KAFKA_BROKERS_UP, &[]), Some(0.0));
    let (live, _) = bridge.metrics().get_async("/livez").await.expect("livez");
    assert_eq!(live, 200, "alive while Kafka is away");

    let timed = std::time::Instant::now();
    cluster.restart(1);
    bridge.await_probe("/readyz", 200, "", WAIT).await;
    eprintln!(
        "Kafka broker back: /readyz 200 after {:?} (restart included)",
        timed.elapsed()
    );

    let (status, body) = bridge.metrics().get_async("/nope").await.expect("get");
    assert_eq!(status, 404, "{body}");
    bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_the_broker_refuses_makes_the_bridge_not_ready() {
    // Every subscription of the test mapping is under `site/`.
    let options = Options {
        refuse_subscriptions: vec!["site/#".into()],
        ..Options::default()
    };
    let rig = Rig::start_with_broker(TestKafka::mock(), &options).await;
    let files = BridgeFiles::new(&rig.bridge_config());
    let mut bridge = files.start(None);

    let body = bridge
        .await_probe("/readyz", 503, "subscriptions refused", WAIT)
        .await;
    assert!(
        check(&body, "mqtt").ends_with("subscriptions refused"),
        "{body}"
    );
    // It stays so: the broker answered; nothing will change on its own.
    let scrape = bridge.metrics().scrape_async().await.expect("scrape");
    assert_eq!(
        scrape.value(MQTT_SUBSCRIBED, &[]),
        Some(0.0),
        "{}",
        scrape.text
    );
    assert_eq!(scrape.value(MQTT_CONNECTED, &[]), Some(1.0));
    bridge.stop();
}
