//! End to end: a real mosquitto, the bridge in-process, and the Kafka of
//! `crate::common::kafka::test_kafka()` (a real Apache Kafka broker unless the
//! environment says otherwise). The Kafka outages run on a private
//! one-node cluster, frozen (SIGSTOP) and thawed. librdkafka's mock cluster
//! can take a broker down, but it aborts the whole test process when it
//! cannot bind the broker's port again, which happened in CI; and a
//! one-node Kafka killed with SIGKILL can come back with a transaction it
//! no longer knows, still open on a partition (a "hanging transaction"),
//! which a test cannot wait out.

use crate::common::kafka::{KafkaCluster, TestKafka};
use crate::common::*;
use mqtt_kafka_bridge::app;
use std::time::Duration;

const ARRIVE: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hvac_messages_land_once_with_key_headers_and_dead_letters() {
    let rig = Rig::start().await;
    let bridge = Bridge::start(rig.bridge_config().build()).await;
    let (telemetry_topic, diagnostics_topic, dead_topic) = (
        rig.topics.telemetry(),
        rig.topics.diagnostics(),
        rig.topics.dead_letter(),
    );

    let mut messages = Vec::new();
    for qos in 0..=2u8 {
        for seq in 0..20u32 {
            let unit = seq % 4;
            let mut m = Publish::new(
                format!("site/s{qos}/hvac/u{unit}/telemetry"),
                telemetry(unit, seq),
                qos,
            );
            m.user_properties = vec![("fw".into(), format!("1.{qos}"))];
            messages.push(m);
        }
    }
    // Legacy text units.
    messages.push(Publish::new(
        "site/s9/hvac-legacy/u1/telemetry",
        "T=21.5;SP=22.0;H=40;CO2=600;FAN=55;LOAD=48;E=1234.5",
        1,
    ));
    messages.push(Publish::new(
        "site/s9/hvac-legacy/u1/telemetry",
        "T=warm;SP=22.0",
        1,
    ));
    // Raw passthrough.
    messages.push(Publish::new(
        "site/s9/hvac/u1/diagnostics",
        vec![0u8, 159, 146, 150],
        1,
    ));
    // Invalid: schema violation, not JSON, not UTF-8.
    let too_humid = telemetry(1, 999).replace("\"humidity_pct\":40.0", "\"humidity_pct\":140.0");
    assert!(too_humid.contains("140.0"));
    messages.push(Publish::new("site/s9/hvac/u1/telemetry", too_humid, 2));
    messages.push(Publish::new("site/s9/hvac/u1/telemetry", "{not json", 1));
    messages.push(Publish::new(
        "site/s9/hvac/u1/telemetry",
        vec![0xff, 0xfe],
        1,
    ));
    // Under a subscribed tree but matched by no route: not subscribed at all.
    messages.push(Publish::new(
        "site/s9/hvac/u1/cmd/setpoint",
        "{\"target_c\": 21}",
        1,
    ));
    publish_all(rig.broker.port, &messages).await;

    let landed = read_committed(
        &rig.bootstrap,
        &[&telemetry_topic, &diagnostics_topic, &dead_topic],
        61 + 1 + 4,
        ARRIVE,
        SETTLE,
    );
    bridge.stop().await;

    let on = |topic: &str| {
        landed
            .iter()
            .filter(|r| r.topic == topic)
            .cloned()
            .collect::<Vec<_>>()
    };
    let telemetry_records = on(&telemetry_topic);
    assert_eq!(
        telemetry_records.len(),
        61,
        "60 JSON + 1 legacy, each exactly once"
    );
    for qos in 0..=2u8 {
        for seq in 0..20u32 {
            let unit = seq % 4;
            let site = format!("s{qos}");
            let matching: Vec<_> = telemetry_records
                .iter()
                .filter(|r| r.json()["site"] == site.as_str() && r.json()["seq"] == seq)
                .collect();
            assert_eq!(matching.len(), 1, "site {site} seq {seq}");
            let r = matching[0];
            assert_eq!(r.key.as_deref(), Some(format!("s{qos}.u{unit}").as_str()));
            assert_eq!(
                r.header("mqtt.topic"),
                format!("site/s{qos}/hvac/u{unit}/telemetry")
            );
            assert_eq!(
                r.header("fw"),
                format!("1.{qos}"),
                "MQTT 5 user property carried over"
            );
            assert_eq!(r.header("schema"), "hvac-telemetry/v1");
            assert_eq!(
                r.timestamp_ms,
                Some(1_700_000_000_000 + i64::from(seq)),
                "timestamp from /ts"
            );
            assert_eq!(r.json()["unit"], format!("u{unit}"));
        }
    }
    // Per-key order: each unit's readings arrive in publish order.
    for qos in 0..=2u8 {
        for unit in 0..4u32 {
            let key = format!("s{qos}.u{unit}");
            let seqs: Vec<u64> = telemetry_records
                .iter()
                .filter(|r| r.key.as_deref() == Some(key.as_str()))
                .map(|r| r.json()["seq"].as_u64().unwrap())
                .collect();
            let mut sorted = seqs.clone();
            sorted.sort();
            assert_eq!(seqs, sorted, "order of key {key}");
        }
    }
    let legacy: Vec<_> = telemetry_records
        .iter()
        .filter(|r| r.json()["source"] == "legacy-text")
        .collect();
    assert_eq!(legacy.len(), 1);
    assert_eq!(legacy[0].json()["ambient_c"], 21.5);
    assert_eq!(legacy[0].json()["air_quality_ppm"], 600);

    let diagnostics = on(&diagnostics_topic);
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(
        diagnostics[0].value,
        vec![0u8, 159, 146, 150],
        "raw bytes untouched"
    );

    let dead = on(&dead_topic);
    let mut reasons: Vec<_> = dead
        .iter()
        .map(|r| r.header("bridge.error.reason").to_string())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["not_utf8", "parse", "parse", "schema"]);
    let schema = dead
        .iter()
        .find(|r| r.header("bridge.error.reason") == "schema")
        .unwrap();
    assert_eq!(schema.header("bridge.error.path"), "/humidity_pct");
    assert_eq!(schema.header("bridge.route"), "hvac-telemetry");
    assert!(schema
        .header("bridge.error.detail")
        .contains("140.0 is greater than the maximum of 100"));
    assert_eq!(schema.key.as_deref(), Some("site/s9/hvac/u1/telemetry"));
    let binary = dead
        .iter()
        .find(|r| r.header("bridge.error.reason") == "not_utf8")
        .unwrap();
    assert_eq!(binary.value, vec![0xff, 0xfe], "original bytes kept");
    let legacy_bad = dead
        .iter()
        .find(|r| r.header("bridge.route") == "hvac-legacy-telemetry")
        .unwrap();
    assert_eq!(legacy_bad.value, b"T=warm;SP=22.0");
    assert!(
        landed
            .iter()
            .all(|r| !r.header("mqtt.topic").contains("/cmd/")),
        "commands never reach Kafka"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_311_sessions_deliver_too() {
    let rig = Rig::start().await;
    let config = rig.bridge_config().mqtt("protocol", "v311").build();
    let bridge = Bridge::start(config).await;
    // MQTT orders messages per topic and QoS only, so each QoS gets a unit.
    let messages: Vec<_> = (0..50u32)
        .map(|seq| {
            let qos = 1 + (seq % 2);
            Publish::new(
                format!("site/a/hvac/u{qos}/telemetry"),
                telemetry(qos, seq),
                qos as u8,
            )
        })
        .collect();
    publish_all(rig.broker.port, &messages).await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        50,
        ARRIVE,
        SETTLE,
    );
    bridge.stop().await;
    for qos in 1..=2u64 {
        let key = format!("a.u{qos}");
        let seqs: Vec<u64> = landed
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .map(|r| r.json()["seq"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (0..50).filter(|s| 1 + s % 2 == qos).collect();
        assert_eq!(seqs, expected, "all, once, in order for key {key}");
    }
    assert!(
        landed.iter().all(|r| r.header("fw").is_empty()),
        "3.1.1 has no user properties"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_on_the_broker_while_kafka_is_down_and_none_is_lost() {
    let cluster = KafkaCluster::start(1);
    let rig = Rig::on_cluster(&cluster).await;
    let client_id = unique("bridge");
    // Short Kafka timeouts: the first bridge's commit, stuck while Kafka is
    // away, gives up quickly.
    let outage_config = || {
        rig.bridge_config()
            .client_id(&client_id)
            .delivery("state_topic", rig.topics.state())
            .delivery("commit_timeout_ms", 2000)
            .delivery("transaction_timeout_ms", 10_000)
            .build()
    };
    let bridge = Bridge::start(outage_config()).await;

    cluster.pause(1);
    let messages = telemetry_messages("d", 300, 3, 1);
    publish_all(rig.broker.port, &messages).await;
    // Stop the bridge while Kafka is down: the commit cannot finish, so the
    // bridge acknowledges nothing, either stopping cleanly once the failed
    // commit is aborted or giving up at the shutdown bound; the persistent
    // session keeps the messages.
    let stopped = bridge.stop_result().await;
    assert!(
        matches!(stopped, Ok(()) | Err(app::AppError::ShutdownTimeout(_))),
        "{stopped:?}"
    );
    cluster.resume(1);

    let bridge = Bridge::start(outage_config()).await;
    let landed = read_committed_distinct(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        300,
        Duration::from_secs(60),
        SETTLE,
    );
    bridge.stop().await;
    // At least once here: the first bridge's commit may still complete once
    // Kafka returns (exactly-once is the delivery protocol's job).
    assert_every_seq(&landed, 300);
}

/// Regression: with a broker that sends more than the in-flight window
/// (MQTT 3.1.1 has no Receive Maximum; the test broker allows unlimited
/// in-flight messages), acks used to pile up in rumqttc's request channel
/// until the commit loop blocked on one while the intake waited for the
/// commit loop: a deadlock. The MQTT session now takes acks also while it
/// waits for room in the delivery channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_inflight_window_does_not_stall() {
    flood_through_a_small_window(60).await;
}

/// Regression: with rumqttc's event loop, a 5 s keep-alive under this flood
/// dropped the connection ("Last pingreq isn't acked": the intake did not
/// poll while the delivery channel was full), and after the reconnect about
/// 100 of the 3000 messages sometimes never arrived. The session now keeps
/// pinging while it waits for the delivery task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_with_a_short_keep_alive_loses_nothing() {
    flood_through_a_small_window(5).await;
}

/// A Kafka stall three times the keep-alive, under load: the MQTT
/// connection stays up (the session pings while nothing can be delivered),
/// and afterwards every message lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_stall_longer_than_the_keep_alive_keeps_the_mqtt_connection() {
    let cluster = KafkaCluster::start(1);
    let rig = Rig::on_cluster(&cluster).await;
    let client_id = unique("bridge");
    let config = rig
        .bridge_config()
        .client_id(&client_id)
        .delivery("state_topic", rig.topics.state())
        .mqtt("keep_alive_s", 5)
        .mqtt("inflight_window", 50)
        .build();
    let bridge = Bridge::start(config).await;
    // Frozen: Kafka answers nothing and closes no connection.
    cluster.pause(1);
    publish_all(rig.broker.port, &telemetry_messages("s", 500, 5, 1)).await;
    // The stall itself, not a synchronisation: 3 x keep-alive.
    tokio::time::sleep(Duration::from_secs(15)).await;
    cluster.resume(1);
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        500,
        Duration::from_secs(60),
        SETTLE,
    );
    bridge.stop().await;
    let (seqs, records) = distinct_seqs(&landed);
    assert_eq!((seqs.len(), records), (500, 500));
    rig.broker.assert_connected_once(&client_id);
}

/// mosquitto's `max_keepalive` below the bridge's keep-alive: an MQTT 5
/// broker then answers with a Server Keep Alive, and a client that keeps
/// its own (longer) one is disconnected when idle, again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_bridge_keeps_to_the_brokers_shorter_keep_alive() {
    let options = crate::common::mosquitto::Options {
        extra_config: "max_keepalive 10\n".into(),
        ..Default::default()
    };
    let rig = Rig::start_with_broker(TestKafka::mock(), &options).await;
    let client_id = unique("bridge");
    let config = rig
        .bridge_config()
        .client_id(&client_id)
        .mqtt("keep_alive_s", 60)
        .build();
    let bridge = Bridge::start(config).await;
    // Idle past the 15 s after which mosquitto drops a client silent for
    // 1.5 x its keep-alive (its smallest `max_keepalive` is 10). The idle
    // time is what is tested, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(20)).await;
    publish_all(rig.broker.port, &telemetry_messages("k", 10, 2, 1)).await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        10,
        Duration::from_secs(30),
        SETTLE,
    );
    bridge.stop().await;
    assert_eq!(distinct_seqs(&landed), ((0..10).collect(), 10));
    rig.broker.assert_connected_once(&client_id);
}

async fn flood_through_a_small_window(keep_alive_s: u64) {
    let rig = Rig::start().await;
    let config = rig
        .bridge_config()
        .mqtt("protocol", "v311")
        .mqtt("inflight_window", 8)
        .mqtt("keep_alive_s", keep_alive_s)
        .delivery("batch_max_messages", 5)
        .build();
    let bridge = Bridge::start(config).await;
    let messages = telemetry_messages("f", 3000, 5, 1);
    publish_all(rig.broker.port, &messages).await;
    let landed = read_committed_distinct(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        3000,
        Duration::from_secs(90),
        SETTLE,
    );
    bridge.stop().await;
    assert_eq!(assert_every_seq(&landed, 3000), 3000, "duplicates");
}

/// M2M commands never reach Kafka, at any QoS, even under a route that
/// would take everything else in the tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_in_an_m2m_tree_never_reach_kafka() {
    let rig = Rig::start().await;
    let mapping = "m2m: ['site/+/hvac/+/cmd/#']\nroutes:\n  - name: everything\n    mqtt: { filter: 'site/#' }\n    format: raw\n    kafka: { topic: hvac.telemetry }\n";
    let config = rig.bridge_config().mapping_text(mapping).build();
    let bridge = Bridge::start(config).await;
    let mut messages = Vec::new();
    for qos in 0..=2u8 {
        for i in 0..10 {
            messages.push(Publish::new(
                format!("site/s{qos}/hvac/u{i}/cmd/setpoint"),
                format!("cmd-{qos}-{i}"),
                qos,
            ));
            messages.push(Publish::new(
                format!("site/s{qos}/hvac/u{i}/telemetry"),
                format!("data-{qos}-{i}"),
                qos,
            ));
        }
    }
    publish_all(rig.broker.port, &messages).await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        30,
        ARRIVE,
        Duration::from_secs(2),
    );
    bridge.stop().await;
    assert_eq!(landed.len(), 30, "the 30 telemetry messages, once each");
    assert!(
        landed.iter().all(|r| r.value.starts_with(b"data-")),
        "no command reached Kafka"
    );
}

/// A record Kafka itself refuses (over librdkafka's `message.max.bytes`,
/// which a route's `max_payload_bytes` may exceed) is not acknowledged into
/// nowhere: its dead-letter record goes to the dead-letter topic, or, if
/// Kafka refuses that too, a stub with the reason, size and digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_kafka_refuses_is_dead_lettered_not_lost() {
    let rig = Rig::start().await;
    let config = rig
        .bridge_config()
        .kafka_property("message.max.bytes", "2000")
        .build();
    let bridge = Bridge::start(config).await;
    publish_all(
        rig.broker.port,
        &[
            Publish::new("site/k/hvac/u1/diagnostics", vec![7u8; 5000], 1),
            Publish::new("site/k/hvac/u1/diagnostics", vec![8u8; 100], 1),
        ],
    )
    .await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.diagnostics(), &rig.topics.dead_letter()],
        2,
        ARRIVE,
        SETTLE,
    );
    bridge.stop().await;
    let diagnostics: Vec<_> = landed
        .iter()
        .filter(|r| r.topic == rig.topics.diagnostics())
        .collect();
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(diagnostics[0].value, vec![8u8; 100]);
    let dead: Vec<_> = landed
        .iter()
        .filter(|r| r.topic == rig.topics.dead_letter())
        .collect();
    assert_eq!(dead.len(), 1, "{landed:?}");
    assert_eq!(dead[0].header("bridge.error.reason"), "kafka_rejected");
    assert_eq!(dead[0].header("bridge.route"), "hvac-diagnostics");
    // The full dead-letter record (5000 bytes) is refused too, so a stub
    // with the evidence takes its place.
    assert_eq!(dead[0].header("bridge.error.kafka"), "MessageSizeTooLarge");
    assert_eq!(dead[0].header("bridge.original.size"), "5000");
    assert_eq!(
        dead[0].header("bridge.original.sha256"),
        mqtt_kafka_bridge::route::reject::sha256_hex(&[7u8; 5000])
    );
    assert!(dead[0].value.is_empty());
}
