//! The Prometheus endpoint reports what the bridge did: the real binary,
//! scraped over HTTP as Prometheus would.

mod common;

use common::*;
use mqtt_kafka_bridge::telemetry::{
    COMMIT_SECONDS, DEAD_LETTERED, MQTT_CONNECTED, PRODUCED, RECEIVED, TX_COMMITTED,
};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_received_produced_dead_lettered_and_commits() {
    let rig = Rig::start().await;
    let files = BridgeFiles::new(&rig.bridge_config());
    let mut bridge = files.start(None);
    bridge.await_connected(Duration::from_secs(30)).await;

    let good = r#"{"ts": 1764000000000, "ambient_c": 21.5, "target_c": 22.0, "humidity_pct": 40.0, "air_quality_ppm": 600, "blower_pct": 55, "load_pct": 48.0, "energy_kwh": 1000.0}"#;
    let mut messages: Vec<_> = (0..3)
        .map(|_| Publish::new("site/m/hvac/u1/telemetry", good, 1))
        .collect();
    messages.push(Publish::new("site/m/hvac/u1/telemetry", "{oops", 1));
    publish_all(rig.broker.port, &messages).await;
    read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry(), &rig.topics.dead_letter()],
        4,
        Duration::from_secs(30),
        Duration::ZERO,
    );

    // Counters are updated right after the commit the reader just saw.
    let route = [("route", "hvac-telemetry")];
    bridge
        .await_metric(PRODUCED, &route, |n| n == 3.0, Duration::from_secs(10))
        .await;
    let scrape = bridge.metrics().scrape_async().await.expect("scrape");
    bridge.stop();

    let text = &scrape.text;
    assert_eq!(scrape.value(RECEIVED, &route), Some(4.0), "{text}");
    assert_eq!(
        scrape.value(
            DEAD_LETTERED,
            &[("route", "hvac-telemetry"), ("reason", "parse")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        scrape.value(TX_COMMITTED, &[]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        text.contains(&format!("{COMMIT_SECONDS}_bucket")),
        "commit latency is a histogram:\n{text}"
    );
    assert_eq!(scrape.value(MQTT_CONNECTED, &[]), Some(1.0), "{text}");
}
