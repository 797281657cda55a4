//! Hostile device input on real mosquitto and a real Kafka broker: each
//! message a device can send to break the flow is accounted for (in its
//! topic or in the dead-letter topic with the right reason), the messages
//! after it still arrive, the bridge keeps running and never reconnects.
//!
//! The broker-side refusals (a timestamp outside Kafka's window, a record
//! over a topic's `max.message.bytes`, a topic that does not exist) abort a
//! whole transaction in librdkafka; these cases prove the bridge replaces
//! just the refused records and commits the rest.

use crate::common::kafka::TestKafka;
use crate::common::mosquitto::Options;
use crate::common::*;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(2);

/// Kafka topics are renamed into the test's (`small` is `<prefix>small`,
/// the template `{x}` is `<prefix>{x}`).
const MAPPING: &str = r#"
routes:
  - name: stamped
    mqtt: { filter: "hostile/ts/{dev}" }
    kafka: { topic: hvac.telemetry, key: "{dev}", timestamp: /ts }
  - name: small
    mqtt: { filter: "hostile/small/{dev}" }
    kafka: { topic: small, key: "{dev}" }
  - name: templated
    mqtt: { filter: "hostile/tpl/{x}" }
    kafka: { topic: "{x}" }
"#;

fn json(seq: u32, ts: i64) -> String {
    format!(r#"{{"seq": {seq}, "ts": {ts}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_records_are_dead_lettered_and_the_flow_goes_on() {
    let rig = Rig::start_with(TestKafka::real()).await;
    let small = rig.topics.named("small");
    kafka::create_topic_with_max_bytes(&rig.bootstrap, &small, 1000).await;
    let client_id = unique("hostile");
    let config = rig
        .bridge_config()
        .client_id(&client_id)
        .mapping_text(MAPPING)
        // Wider than Kafka's own 1 h window, so that the broker, not the
        // bridge, refuses the 2 h-ahead record.
        .limits("timestamp_max_ahead_ms", 3 * 3_600_000)
        .build();
    let bridge = Bridge::start(config).await;
    let now = chrono::Utc::now().timestamp_millis();
    let hour = 3_600_000;
    let big = format!(r#"{{"seq": 4, "pad": "{}"}}"#, "x".repeat(5000));
    let bomb: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("p{i}"), "y".repeat(100)))
        .collect();
    let mut messages = vec![
        Publish::new("hostile/ts/a", json(1, now), 1),
        // Kafka refuses it: INVALID_TIMESTAMP.
        Publish::new("hostile/ts/a", json(2, now + 2 * hour), 1),
        // The bridge refuses it: outside its own window.
        Publish::new("hostile/ts/a", json(3, now + 5 * hour), 1),
        // Kafka refuses it: over the topic's max.message.bytes.
        Publish::new("hostile/small/a", big.clone(), 1),
        Publish::new("hostile/small/a", json(5, now), 1),
        // Kafka refuses it: the topic does not exist (no auto-create).
        Publish::new("hostile/tpl/nosuch", json(6, now), 1),
        Publish::new("hostile/tpl/hvac.telemetry", json(7, now), 1),
        Publish::new("hostile/ts/a", r#"{"seq": 8, "seq": 80}"#, 1),
        Publish::new("hostile/ts/a", json(9, now), 1),
    ];
    let mut bombed = Publish::new("hostile/ts/a", json(10, now), 1);
    bombed.user_properties = bomb;
    messages.push(bombed);
    messages.push(Publish::new("hostile/ts/a", json(11, now), 1));
    publish_all(rig.broker.port, &messages).await;

    let telemetry = rig.topics.telemetry();
    let dlq = rig.topics.dead_letter();
    // Until quiet rather than panicking at the deadline, so that a failure
    // shows every record that landed, and so which one did not (it failed
    // once with 10 of 11, the bridge idle after four aborts in a row).
    let landed = read_committed_until_quiet(
        &rig.bootstrap,
        &[&telemetry, &small, &dlq],
        11,
        Duration::from_secs(90),
    );
    let summary: Vec<(String, String, String)> = landed
        .iter()
        .map(|l| {
            (
                l.topic.clone(),
                String::from_utf8_lossy(&l.value).chars().take(60).collect(),
                l.header("bridge.error.reason").to_string(),
            )
        })
        .collect();
    assert_eq!(landed.len(), 11, "{summary:#?}");
    assert!(!bridge.is_finished(), "the bridge stopped");
    let seqs = |topic: &str| {
        let mut s: Vec<i64> = landed
            .iter()
            .filter(|l| l.topic == topic)
            .map(|l| l.json()["seq"].as_i64().unwrap_or(-1))
            .collect();
        s.sort();
        s
    };
    assert_eq!(seqs(&telemetry), [1, 7, 9, 11], "{landed:#?}");
    assert_eq!(seqs(&small), [5]);
    let mut dead: Vec<(String, String, String)> = landed
        .iter()
        .filter(|l| l.topic == dlq)
        .map(|l| {
            let seq = serde_json::from_slice::<serde_json::Value>(&l.value)
                .map(|v| v["seq"].to_string())
                .unwrap_or_else(|_| "?".into());
            (
                seq,
                l.header("bridge.error.reason").to_string(),
                l.header("bridge.error.kafka").to_string(),
            )
        })
        .collect();
    dead.sort();
    let expected: Vec<(String, String, String)> = [
        ("10", "too_large", ""),
        ("2", "kafka_rejected", "InvalidTimestamp"),
        ("3", "timestamp", ""),
        ("4", "kafka_rejected", "MessageSizeTooLarge"),
        ("6", "kafka_rejected", "UnknownTopic"),
        ("80", "parse", ""),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    // The unknown topic is reported as the broker's or librdkafka's code,
    // depending on which saw it first.
    let dead: Vec<_> = dead
        .into_iter()
        .map(|(a, b, c)| {
            let c = if c == "UnknownTopicOrPartition" {
                "UnknownTopic".into()
            } else {
                c
            };
            (a, b, c)
        })
        .collect();
    assert_eq!(dead, expected, "{landed:#?}");
    for l in landed.iter().filter(|l| l.topic == dlq) {
        assert!(!l.header("bridge.original.sha256").is_empty());
        let bytes: usize = l.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes < 16 * 1024, "bounded headers: {bytes} bytes");
    }
    let oversized = landed
        .iter()
        .find(|l| l.header("bridge.error.kafka") == "MessageSizeTooLarge")
        .expect("oversized");
    assert_eq!(
        oversized.value,
        big.as_bytes(),
        "the original is the evidence"
    );
    assert_eq!(
        oversized.header("bridge.original.size"),
        big.len().to_string()
    );
    bridge.stop().await;
    rig.broker.assert_connected_once(&client_id);
}

/// A record for a topic librdkafka has learnt is missing is refused as
/// it is enqueued, not in a delivery report: a refusal like the first
/// record's, which the batch dead-letters, and no harm to the rest of the
/// transaction. (It used to count as a failure of the transaction that
/// the commit would report, but the commit did not: the message was
/// acknowledged with no record anywhere. `refused_records_...` lost its
/// unknown-topic message that way under load.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_known_to_be_missing_is_refused_as_it_is_enqueued() {
    use crate::common::kafka::{test_record as record, test_sink};
    use mqtt_kafka_bridge::kafka::SinkError;
    use rdkafka::error::RDKafkaErrorCode as Code;

    let kafka = TestKafka::real();
    let topics = Topics::new();
    kafka.create_topics(&[&topics.telemetry()], 1).await;
    let missing = topics.named("missing");
    let mut sink = test_sink(&kafka.bootstrap(), &unique("missing")).await;
    let unknown = |code: Code| matches!(code, Code::UnknownTopic | Code::UnknownTopicOrPartition);

    // The first record: refused in its delivery report, which dooms the
    // transaction.
    sink.send(&record(&missing), false, 0)
        .await
        .expect("enqueued");
    let first = sink.commit().await;
    assert!(matches!(first, Err(SinkError::Abortable(_))), "{first:?}");
    sink.abort().await.expect("abort");
    let refusals = sink.take_refusals();
    assert!(
        refusals.len() == 1 && unknown(refusals[0].code) && refusals[0].topic_wide,
        "{refusals:?}"
    );

    // The next: refused at once, and the transaction commits the rest.
    let second = sink.send(&record(&missing), false, 0).await;
    assert!(
        matches!(second, Err(SinkError::Rejected(code)) if unknown(code)),
        "{second:?}"
    );
    sink.send(&record(&topics.telemetry()), false, 1)
        .await
        .expect("send");
    sink.commit().await.expect("the rest commits");
    let landed = read_committed(
        &kafka.bootstrap(),
        &[&topics.telemetry()],
        1,
        Duration::from_secs(30),
        SETTLE,
    );
    assert_eq!(landed.len(), 1);
}

/// A relay publish the MQTT broker refuses (MQTT 5 PUBACK reason code
/// 0x87, from mosquitto's ACL) is not counted as delivered: its source is
/// dead-lettered with reason `mqtt_refused`, and the flow goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_relay_dead_letters_its_source() {
    let options = Options {
        acl: Some("topic readwrite #\ntopic deny relay/out/locked/#\n".into()),
        // mosquitto 2.0 disconnects a client after a refusing PUBACK when
        // max_queued_messages is 0 (no limit), the rig's default.
        extra_config: "max_queued_messages 1000\n".into(),
        ..Options::default()
    };
    let rig = Rig::start_with_broker(TestKafka::real(), &options).await;
    let client_id = unique("relay");
    let mapping = r#"
routes:
  - name: stamped
    mqtt: { filter: "hostile/ts/{dev}" }
    kafka: { topic: hvac.telemetry, key: "{dev}" }
  - name: relay
    mqtt: { filter: "relay/in/{room}" }
    publish: { topic: "relay/out/{room}/set", qos: 1 }
"#;
    let config = rig
        .bridge_config()
        .client_id(&client_id)
        .mapping_text(mapping)
        .build();
    let bridge = Bridge::start(config).await;
    let now = chrono::Utc::now().timestamp_millis();
    publish_all(
        rig.broker.port,
        &[
            Publish::new("relay/in/locked", r#"{"set": 1}"#, 1),
            Publish::new("relay/in/open", r#"{"set": 2}"#, 1),
            Publish::new("hostile/ts/a", json(1, now), 1),
        ],
    )
    .await;
    let telemetry = rig.topics.telemetry();
    let dlq = rig.topics.dead_letter();
    let landed = read_committed(
        &rig.bootstrap,
        &[&telemetry, &dlq],
        2,
        Duration::from_secs(60),
        SETTLE,
    );
    assert!(!bridge.is_finished(), "the bridge stopped");
    let dead: Vec<_> = landed.iter().filter(|l| l.topic == dlq).collect();
    assert_eq!(dead.len(), 1, "{landed:#?}");
    assert_eq!(dead[0].header("bridge.error.reason"), "mqtt_refused");
    assert_eq!(dead[0].header("mqtt.topic"), "relay/in/locked");
    assert!(
        dead[0].header("bridge.error.detail").contains("0x87"),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(dead[0].value, br#"{"set": 1}"#);
    assert_eq!(landed.iter().filter(|l| l.topic == telemetry).count(), 1);
    bridge.stop().await;
    rig.broker.assert_connected_once(&client_id);
}
