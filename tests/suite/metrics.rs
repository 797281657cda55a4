//! The Prometheus endpoint reports what the bridge did: the real binary,
//! scraped over HTTP as Prometheus would.

use crate::common::kafka::TestKafka;
use crate::common::*;
use mqtt_kafka_bridge::telemetry::{
    BUILD_INFO, COMMIT_SECONDS, DEAD_LETTERED, MQTT_CONNECTED, PRODUCED, RECEIVED, TX_COMMITTED,
};
use std::collections::BTreeMap;
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

/// docs/metrics.md is the operator's list: every metric a fresh bridge
/// serves is in it with its type, and everything in it is served (each
/// known series exists at 0 from start-up, so nothing waits for traffic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_list_every_metric_served_and_nothing_more() {
    let rig = Rig::start_with(TestKafka::mock()).await;
    let files = BridgeFiles::new(&rig.bridge_config());
    let mut bridge = files.start(None);
    bridge.await_connected(Duration::from_secs(30)).await;
    let scrape = bridge.metrics().scrape_async().await.expect("scrape");
    bridge.stop();

    let served: BTreeMap<&str, &str> = scrape
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let docs = std::fs::read_to_string(repo_path("docs/metrics.md")).expect("docs/metrics.md");
    let documented: BTreeMap<&str, &str> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| {
            let (name, rest) = l.split_once("` | ")?;
            // The probe table's rows are paths; a metric served only with
            // some configuration (TLS files) is checked by its own test.
            let conditional = rest.contains("| Only when");
            (!name.starts_with('/') && !conditional).then_some((name, rest.split(' ').next()?))
        })
        .collect();
    let undocumented: Vec<_> = served
        .iter()
        .filter(|(n, _)| !documented.contains_key(*n))
        .collect();
    let unserved: Vec<_> = documented
        .iter()
        .filter(|(n, _)| !served.contains_key(*n))
        .collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not in docs/metrics.md: {undocumented:?}\nin docs/metrics.md but not served: {unserved:?}\nscrape:\n{}",
        scrape.text
    );
    for (name, kind) in &served {
        assert_eq!(documented[name], *kind, "type of {name} in docs/metrics.md");
    }
    // Every known label set is there before any traffic.
    for (name, labels) in [
        (RECEIVED, vec![("route", "hvac-telemetry")]),
        (
            DEAD_LETTERED,
            vec![("route", "hvac-telemetry"), ("reason", "schema")],
        ),
        (MQTT_CONNECTED, vec![]),
        (TX_COMMITTED, vec![]),
    ] {
        assert!(
            scrape.value(name, &labels).is_some(),
            "{name}{labels:?} missing:\n{}",
            scrape.text
        );
    }
    assert!(
        scrape.text.contains(&format!(
            "{BUILD_INFO}{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{}",
        scrape.text
    );
}
