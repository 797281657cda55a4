//! The Prometheus endpoint reports what the bridge did.
//! (Its own test binary: the metrics recorder is process-wide.)

mod common;

use common::kafka::test_kafka;
use common::mosquitto::{free_port, Mosquitto};
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_received_produced_dead_lettered_and_commits() {
    let broker = Mosquitto::start();
    let topics = Topics::new();
    let kafka = test_kafka();
    kafka.create_test_topics(&topics).await;
    let mut config = bridge_config(
        broker.port,
        &kafka.bootstrap(),
        &unique("bridge"),
        "",
        &topics,
    );
    let metrics_port = free_port();
    config.bridge.metrics.listen = Some(([127, 0, 0, 1], metrics_port).into());

    let bridge = Bridge::start(config).await;

    let good = r#"{"ts": 1764000000000, "ambient_c": 21.5, "target_c": 22.0, "humidity_pct": 40.0, "air_quality_ppm": 600, "blower_pct": 55, "load_pct": 48.0, "energy_kwh": 1000.0}"#;
    let mut messages: Vec<_> = (0..3)
        .map(|_| Publish::new("site/m/hvac/u1/telemetry", good, 1))
        .collect();
    messages.push(Publish::new("site/m/hvac/u1/telemetry", "{oops", 1));
    publish_all(broker.port, &messages).await;
    read_committed(
        &kafka.bootstrap(),
        &[&topics.telemetry(), &topics.dead_letter()],
        4,
        Duration::from_secs(30),
        Duration::ZERO,
    );

    // Counters are updated right after the commit the reader just saw;
    // poll the endpoint until they show, with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = tokio::task::spawn_blocking(move || scrape(metrics_port))
            .await
            .unwrap();
        if value(
            &text,
            r#"bridge_messages_produced_total{route="hvac-telemetry"}"#,
        ) == Some(3.0)
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never showed 3 produced:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bridge.stop().await;

    assert_eq!(
        value(
            &text,
            r#"bridge_messages_received_total{route="hvac-telemetry"}"#
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"bridge_messages_dead_lettered_total{route="hvac-telemetry",reason="parse"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(&text, "bridge_transactions_committed_total").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("bridge_commit_duration_seconds_bucket"),
        "commit latency is a histogram:\n{text}"
    );
    assert_eq!(value(&text, "bridge_mqtt_connected"), Some(1.0), "{text}");
}
