//! What the bridge writes to its log: JSON lines when asked, lifecycle
//! events at info level, and never a secret.

use crate::common::kafka::TestKafka;
use crate::common::*;
use std::time::Duration;

const MQTT_SECRET: &str = "hunter2-mqtt-secret";
const KAFKA_SECRET: &str = "hunter2-kafka-secret";

/// A bridge with an MQTT password and a Kafka `sasl.password` (ignored by
/// librdkafka over PLAINTEXT, but still configured), logging JSON at debug
/// level: every line is a JSON object, the lifecycle events are there, and
/// neither secret appears, in the log or in `check`'s report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_lifecycle_events_and_no_secret() {
    // The real broker: a mock cluster lives in the test process, and
    // under the whole suite's load its group coordinator once timed
    // out the reader below.
    let rig = Rig::start_with(TestKafka::real()).await;
    let config = rig
        .bridge_config()
        .mqtt("username", "bridge")
        .mqtt("password", MQTT_SECRET)
        .kafka_property("sasl.password", KAFKA_SECRET);
    let files = BridgeFiles::new(&config);
    let mut bridge = BridgeProcess::start_with_env(
        &files.config(),
        &files.log(),
        None,
        &[
            ("BRIDGE_LOG_FORMAT", "json"),
            ("BRIDGE_LOG", "debug,rdkafka=debug"),
        ],
    );
    bridge.await_connected(Duration::from_secs(30)).await;
    publish_all(rig.broker.port, &telemetry_messages("l", 5, 1, 1)).await;
    read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        5,
        Duration::from_secs(30),
        Duration::ZERO,
    );
    bridge.stop();

    let log = std::fs::read_to_string(files.log()).expect("log");
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for field in ["timestamp", "level", "target"] {
            assert!(event.get(field).is_some(), "no {field} in {line}");
        }
        if event["level"] == "INFO" {
            messages.push(event["message"].as_str().unwrap_or_default().to_string());
        }
    }
    for lifecycle in [
        "connected to MQTT broker",
        "MQTT subscriptions in place",
        "Kafka producer ready",
        "bridge stopped",
    ] {
        assert!(
            messages.iter().any(|m| m == lifecycle),
            "no `{lifecycle}` at info level in {messages:?}"
        );
    }
    assert!(
        messages.len() < 40,
        "info level is for lifecycle events, not messages: {messages:#?}"
    );
    // The settings are logged at debug level, with the secrets replaced.
    assert!(log.contains("effective bridge settings"), "{log}");
    assert!(log.contains("[redacted]"), "{log}");
    for secret in [MQTT_SECRET, KAFKA_SECRET] {
        assert!(!log.contains(secret), "{secret} in the log");
    }

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-kafka-bridge"))
        .args(["check", "--config"])
        .arg(files.config())
        .env("BRIDGE_TEST_METRICS_PORT", "9")
        .output()
        .expect("run check");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{report}");
    for secret in [MQTT_SECRET, KAFKA_SECRET] {
        assert!(!report.contains(secret), "{secret} in check's report");
    }
}
