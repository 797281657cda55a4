//! The bridge as Prometheus sees it: a real Prometheus (Debian's package)
//! scrapes the real binary, evaluates the shipped alert rules, and answers
//! every query of the shipped Grafana dashboard.

use crate::common::kafka::TestKafka;
use crate::common::prometheus::{promtool, Prometheus};
use crate::common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Every `expr` of every panel (and nested panel) of the dashboard.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(repo_path("deploy/grafana/dashboard.json"))
        .expect("deploy/grafana/dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut queries = Vec::new();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(expr.to_string());
            }
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_bridge_and_every_dashboard_query_has_data() {
    let rig = Rig::start_with(TestKafka::mock()).await;
    let files = BridgeFiles::new(&rig.bridge_config());
    let mut bridge = files.start(None);
    bridge.await_connected(Duration::from_secs(30)).await;
    let prometheus = Prometheus::start(bridge.metrics().port);

    let up = prometheus
        .await_series(r#"up{job="mqtt-kafka-bridge"} == 1"#, WAIT)
        .await;
    assert_eq!(up.len(), 1, "{up:?}");
    // For the record (`--nocapture`): what one scrape brings.
    for query in ["scrape_samples_scraped", "scrape_duration_seconds"] {
        let value = prometheus.await_series(query, WAIT).await;
        eprintln!("{query}: {}", value[0]["value"][1]);
    }

    // Traffic for the rates: good messages and one the schema refuses.
    let mut messages = telemetry_messages("p", 200, 4, 1);
    messages.push(Publish::new("site/p/hvac/u0/telemetry", "{oops", 1));
    publish_all(rig.broker.port, &messages).await;
    read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry(), &rig.topics.dead_letter()],
        201,
        Duration::from_secs(30),
        Duration::ZERO,
    );

    let produced = prometheus
        .await_series(
            r#"sum by (route) (increase(mqtt_kafka_bridge_messages_produced_total{route="hvac-telemetry"}[1m])) > 0"#,
            WAIT,
        )
        .await;
    assert_eq!(produced[0]["metric"]["route"], "hvac-telemetry");
    prometheus
        .await_series(
            r#"increase(mqtt_kafka_bridge_messages_dead_lettered_total{route="hvac-telemetry",reason="parse"}[1m]) > 0"#,
            WAIT,
        )
        .await;
    prometheus
        .await_series("mqtt_kafka_bridge_ready == 1", WAIT)
        .await;

    let queries = dashboard_queries();
    assert!(
        queries.len() >= 20,
        "the dashboard has its panels: {queries:?}"
    );
    for query in &queries {
        prometheus.await_series(query, WAIT).await;
    }

    // The shipped rules load and evaluate without errors, and none fires
    // for a healthy bridge.
    let (status, rules) = prometheus.get("/api/v1/rules").await;
    assert_eq!(status, 200, "{rules}");
    let rules: serde_json::Value = serde_json::from_str(&rules).expect("rules JSON");
    let all: Vec<_> = rules["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(all.len() >= 10, "{all:?}");
    for rule in &all {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(
            rule["state"], "inactive",
            "fires on a healthy bridge: {rule}"
        );
    }
    bridge.stop();
}

/// `promtool check rules` and the rules' own unit tests.
#[test]
fn the_alert_rules_pass_promtool() {
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yaml"],
        ["test", "rules", "deploy/prometheus/alerts_test.yaml"],
    ] {
        let output = promtool()
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run promtool ({e}); apt-get install -y prometheus"));
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
