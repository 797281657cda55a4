//! Hostile command records and oversized device messages on real mosquitto
//! and a real Kafka broker. Each bad input is accounted for (in the
//! dead-letter topic with the right reason), the valid input after it still
//! arrives, the bridge keeps running, and mosquitto sees it connect once:
//! no record makes it publish a packet the broker disconnects it for, and
//! none is published again because the broker refused it.

use crate::common::kafka::TestKafka;
use crate::common::mosquitto::Options;
use crate::common::*;
use bytes::BytesMut;
use mqtt_kafka_bridge::telemetry::DEAD_LETTERED;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rumqttc::v5::mqttbytes::QoS;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ARRIVE: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(2);

/// Mapping of the command tests: the HVAC setpoint route (QoS 1) and a QoS 2
/// route, so that refusals at PUBACK and at PUBREC are both seen.
const COMMANDS: &str = r#"
routes:
  - name: hvac-diagnostics
    mqtt: { filter: "site/{site}/hvac/{unit}/diagnostics", qos: 1 }
    format: raw
    kafka: { topic: hvac.diagnostics, key: "{site}.{unit}" }
commands:
  - name: hvac-setpoint
    kafka: { topic: hvac.commands }
    schema: schemas/hvac-setpoint.schema.json
    mqtt: { topic: "site/{/site}/hvac/{key}/cmd/setpoint", qos: 1 }
    ttl_ms: 300000
  - name: hvac-mode
    kafka: { topic: hvac.modes }
    mqtt: { topic: "site/{/site}/hvac/{key}/cmd/mode", qos: 2 }
"#;

/// Mapping of the large-packet test: raw diagnostics, no size limit of the
/// route's own.
const DIAGNOSTICS: &str = r#"
routes:
  - name: hvac-diagnostics
    mqtt: { filter: "site/{site}/hvac/{unit}/diagnostics", qos: 1 }
    format: raw
    kafka: { topic: hvac.diagnostics, key: "{site}.{unit}" }
"#;

/// A mosquitto started with `options` and this test's topics on the real
/// Kafka broker (the mock cluster has no per-topic `max.message.bytes`).
async fn rig_with(options: &Options) -> Rig {
    Rig::start_with_broker(TestKafka::real(), options).await
}

/// Produces `(key, value)` records, in this order, to partition 0 of
/// `topic`: the bridge handles them in this order.
async fn produce(bootstrap: &str, topic: &str, records: &[(Vec<u8>, String)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for (key, value) in records {
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(0)
                    .key(key)
                    .payload(value)
                    .timestamp(chrono::Utc::now().timestamp_millis()),
                Duration::from_secs(30),
            )
            .await
            .expect("produce command");
    }
}

fn setpoint(seq: u32) -> String {
    format!(r#"{{"site":"s1","setpoint_c":21,"seq":{seq}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_commands_are_dead_lettered_once_and_the_next_command_arrives() {
    // mosquitto denies publishing to unit `locked` (MQTT 5: PUBACK or
    // PUBREC 0x87), announces a Maximum Packet Size, and logs every packet,
    // so that refused publishes can be counted.
    let rig = rig_with(&Options {
        acl: Some("topic readwrite #\ntopic deny site/+/hvac/locked/#\n".into()),
        // A positive queue limit: with 0 (the rig's default), mosquitto
        // 2.0.11 closes the connection after every refusing PUBACK or
        // PUBREC it sends (`handle__publish` tests `out_packet_count >=
        // max_queued_messages` without checking for 0).
        extra_config: "max_packet_size 100000\nmax_queued_messages 1000\nlog_type debug\n".into(),
        ..Options::default()
    })
    .await;
    let modes = rig.topics.named("hvac.modes");
    rig.kafka.create_topics(&[&modes], 1).await;
    let mut device = Device::subscribe(rig.broker.port, "#", QoS::ExactlyOnce).await;
    let client_id = unique("bridge");
    let config = rig
        .bridge_config()
        .client_id(&client_id)
        .mapping_text(COMMANDS)
        .build();
    let bridge = Bridge::start(config).await;

    let valid = |seq| (b"u2".to_vec(), setpoint(seq));
    let long_key = vec![b'k'; 70_000];
    let padded = format!(
        r#"{{"site":"s1","setpoint_c":21,"pad":"{}"}}"#,
        "p".repeat(150_000)
    );
    // Each bad record, then a valid one that must still arrive.
    let records = vec![
        (b"u1/../../elsewhere".to_vec(), setpoint(100)),
        valid(1),
        (b"u1\0".to_vec(), setpoint(101)),
        valid(2),
        (long_key.clone(), setpoint(102)),
        valid(3),
        // Denied by the ACL: PUBACK 0x87.
        (b"locked".to_vec(), setpoint(103)),
        valid(4),
        // Over the Maximum Packet Size mosquitto announced: not sent.
        (b"u3".to_vec(), padded.clone()),
        valid(5),
    ];
    produce(&rig.bootstrap, &rig.topics.commands(), &records).await;
    // QoS 2, denied by the ACL: PUBREC 0x87, then a valid one.
    produce(
        &rig.bootstrap,
        &modes,
        &[
            (b"locked".to_vec(), r#"{"site":"s1","mode":"off"}"#.into()),
            (b"u2".to_vec(), r#"{"site":"s1","mode":"heat"}"#.into()),
        ],
    )
    .await;

    let got = device.receive(6).await;
    let dlq = rig.topics.dead_letter();
    let dead = read_committed(&rig.bootstrap, &[&dlq], 6, ARRIVE, SETTLE);
    assert!(!bridge.is_finished(), "the bridge stopped");
    assert!(
        device.try_next().is_none(),
        "an extra message: {:?}",
        device.try_next()
    );
    bridge.stop().await;

    let setpoints: Vec<_> = got
        .iter()
        .filter(|(topic, _)| topic.ends_with("/setpoint"))
        .collect();
    for (i, (topic, payload)) in setpoints.iter().enumerate() {
        assert_eq!(topic, "site/s1/hvac/u2/cmd/setpoint");
        assert_eq!(payload, &setpoint(i as u32 + 1), "in order");
    }
    assert_eq!(setpoints.len(), 5, "{got:?}");
    assert!(got.contains(&(
        "site/s1/hvac/u2/cmd/mode".into(),
        r#"{"site":"s1","mode":"heat"}"#.into()
    )));

    let find = |key: &[u8]| {
        let key = String::from_utf8_lossy(key);
        let found: Vec<_> = dead
            .iter()
            .filter(|l| l.key.as_deref() == Some(&*key))
            .collect();
        assert!(
            !found.is_empty(),
            "no dead letter keyed {key:.40?}: {dead:#?}"
        );
        found
    };
    let expect = |key: &[u8], route: &str, reason: &str, detail: &str| {
        for l in find(key) {
            if l.header("bridge.route") != route {
                continue;
            }
            assert_eq!(l.header("bridge.error.reason"), reason, "{l:#?}");
            assert!(
                l.header("bridge.error.detail").contains(detail),
                "{detail:?} not in {:?}",
                l.header("bridge.error.detail")
            );
            assert_eq!(l.header("bridge.original.size"), l.value.len().to_string());
            assert_eq!(
                l.header("bridge.original.sha256"),
                format!("{:x}", Sha256::digest(&l.value))
            );
            return;
        }
        panic!("no dead letter of route {route} keyed {key:.40?}");
    };
    expect(b"u1/../../elsewhere", "hvac-setpoint", "topic", "holds `/`");
    expect(b"u1\0", "hvac-setpoint", "topic", "U+0000");
    expect(&long_key, "hvac-setpoint", "topic", "65535");
    expect(
        b"locked",
        "hvac-setpoint",
        "mqtt_refused",
        "NotAuthorized (0x87)",
    );
    expect(
        b"u3",
        "hvac-setpoint",
        "mqtt_refused",
        "Maximum Packet Size",
    );
    expect(
        b"locked",
        "hvac-mode",
        "mqtt_refused",
        "NotAuthorized (0x87)",
    );
    assert_eq!(dead.len(), 6, "one dead letter each: {dead:#?}");
    let padded_letter = &find(b"u3")[0];
    assert_eq!(padded_letter.value, padded.as_bytes(), "the evidence");

    // Each refused publish was sent once, never again.
    let log = rig.broker.log();
    let denied: Vec<_> = log
        .lines()
        .filter(|l| l.contains("Denied PUBLISH") && l.contains(&client_id))
        .collect();
    assert_eq!(denied.len(), 2, "{denied:#?}");
    assert!(
        !log.contains("elsewhere"),
        "a command left its subtree:\n{log}"
    );
    rig.broker.assert_connected_once(&client_id);
}

/// The peak resident set size of process `pid`, in bytes, after resetting
/// it to the current size when `reset` (Linux `clear_refs` 5); `None` where
/// /proc does not tell.
fn peak_rss(pid: i32, reset: bool) -> Option<usize> {
    if reset {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").ok()?;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Publishes one QoS 1 MQTT 3.1.1 message of `size` bytes on a bare TCP
/// connection, generating the payload as it is written, so this process
/// never holds it; returns its SHA-256 once the broker acknowledged it.
async fn publish_streamed(port: u16, topic: &str, size: usize) -> String {
    use rumqttc::mqttbytes::v4;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut out = BytesMut::new();
    v4::Packet::Connect(v4::Connect::new(unique("big-publisher")))
        .write(&mut out, 1 << 20)
        .unwrap();
    stream.write_all(&out).await.unwrap();
    let mut connack = [0; 4];
    stream.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK");
    let remaining = 2 + topic.len() + 2 + size;
    let mut header = vec![0x32];
    let mut n = remaining;
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        header.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    header.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    header.extend_from_slice(topic.as_bytes());
    header.extend_from_slice(&[0, 1]);
    stream.write_all(&header).await.unwrap();
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 253) as u8).collect();
    let mut digest = Sha256::new();
    let mut sent = 0;
    while sent < size {
        let n = chunk.len().min(size - sent);
        digest.update(&chunk[..n]);
        stream.write_all(&chunk[..n]).await.unwrap();
        sent += n;
    }
    let mut puback = [0; 4];
    tokio::time::timeout(ARRIVE, stream.read_exact(&mut puback))
        .await
        .expect("PUBACK in time")
        .unwrap();
    assert_eq!(puback, [0x40, 2, 0, 1], "PUBACK");
    stream.write_all(&[0xe0, 0]).await.unwrap();
    format!("{:x}", digest.finalize())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_publish_streams_through_in_bounded_memory_and_the_next_one_arrives() {
    let rig = rig_with(&Options::default()).await;
    let client_id = unique("bridge");
    // The real binary: its memory is measured apart from this process's,
    // and its metrics show when each message was dead-lettered.
    let files = BridgeFiles::new(
        &rig.bridge_config()
            .client_id(&client_id)
            .mapping_text(DIAGNOSTICS)
            .limits("max_packet_bytes", 1024 * 1024),
    );
    let mut bridge = files.start(None);
    bridge.await_connected(ARRIVE).await;

    let size = 64 * 1024 * 1024;
    let topic = "site/s1/hvac/u1/diagnostics";
    let too_large = [("reason", "too_large")];
    let commit_wait = Duration::from_secs(120);
    // A first oversized message takes what the bridge allocates once (its
    // first dead letter, first transaction...), so the peak measured below
    // is what a large packet costs.
    let warm_up = 3 * 1024 * 1024;
    let warm_up_sha256 = publish_streamed(rig.broker.port, topic, warm_up).await;
    bridge
        .await_metric(DEAD_LETTERED, &too_large, |n| n >= 1.0, commit_wait)
        .await;

    let before = peak_rss(bridge.pid(), true);
    let sha256 = publish_streamed(rig.broker.port, topic, size).await;
    bridge
        .await_metric(DEAD_LETTERED, &too_large, |n| n >= 2.0, commit_wait)
        .await;
    let after = peak_rss(bridge.pid(), false);
    publish_all(rig.broker.port, &[Publish::new(topic, "after", 1)]).await;
    let diagnostics = rig.topics.diagnostics();
    let dlq = rig.topics.dead_letter();
    let landed = read_committed(
        &rig.bootstrap,
        &[&diagnostics, &dlq],
        3,
        Duration::from_secs(120),
        SETTLE,
    );
    assert!(bridge.is_running(), "the bridge stopped");
    bridge.stop();

    let next: Vec<_> = landed.iter().filter(|l| l.topic == diagnostics).collect();
    assert_eq!(next.len(), 1, "{landed:#?}");
    assert_eq!(next[0].value, b"after");
    let mut dead: Vec<_> = landed.iter().filter(|l| l.topic == dlq).collect();
    dead.sort_by_key(|l| l.header("bridge.original.size").len());
    assert_eq!(dead.len(), 2, "{landed:#?}");
    for (l, (size, sha256)) in dead.iter().zip([(warm_up, warm_up_sha256), (size, sha256)]) {
        assert_eq!(l.header("bridge.error.reason"), "too_large");
        assert_eq!(l.header("bridge.original.size"), size.to_string());
        assert_eq!(l.header("bridge.original.sha256"), sha256);
        assert!(l.value.is_empty(), "the payload was not kept");
        assert_eq!(l.header("mqtt.topic"), topic);
    }
    if let (Some(before), Some(after)) = (before, after) {
        let grown = after.saturating_sub(before);
        eprintln!("peak RSS grew by {} KiB", grown >> 10);
        assert!(
            grown < size / 16,
            "peak RSS grew by {} MiB for a {} MiB message",
            grown >> 20,
            size >> 20
        );
    }
    rig.broker.assert_connected_once(&client_id);
}

/// A dead-letter topic that refuses the full record gets its stub; one that
/// refuses the stub too gets nothing (counted and logged), and in both
/// cases the offset is committed and the next command is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_kafka_refuses_falls_back_to_a_stub_and_never_stalls_commands() {
    let rig = rig_with(&Options::default()).await;
    let (small_dlq, tiny_dlq) = (rig.topics.named("small-dlq"), rig.topics.named("tiny-dlq"));
    kafka::create_topic_with_max_bytes(&rig.bootstrap, &small_dlq, 2000).await;
    kafka::create_topic_with_max_bytes(&rig.bootstrap, &tiny_dlq, 100).await;
    let (small_cmds, tiny_cmds) = (
        rig.topics.named("hvac.small-cmds"),
        rig.topics.named("hvac.tiny-cmds"),
    );
    rig.kafka.create_topics(&[&small_cmds, &tiny_cmds], 1).await;
    // Kafka topics, dead-letter ones too, are renamed into the test's.
    let mapping = r#"
routes:
  - name: hvac-diagnostics
    mqtt: { filter: "site/{site}/hvac/{unit}/diagnostics", qos: 1 }
    format: raw
    kafka: { topic: hvac.diagnostics }
commands:
  - name: small
    kafka: { topic: hvac.small-cmds, dead_letter_topic: small-dlq }
    mqtt: { topic: "site/{/site}/hvac/{key}/cmd/small" }
  - name: tiny
    kafka: { topic: hvac.tiny-cmds, dead_letter_topic: tiny-dlq }
    mqtt: { topic: "site/{/site}/hvac/{key}/cmd/tiny" }
"#;
    let mut device = Device::subscribe(rig.broker.port, "#", QoS::ExactlyOnce).await;
    let client_id = unique("bridge");
    let config = rig
        .bridge_config()
        .client_id(&client_id)
        .mapping_text(mapping)
        .build();
    let bridge = Bridge::start(config).await;

    let padded = format!(r#"{{"site":"s1","pad":"{}"}}"#, "p".repeat(10_000));
    let bad = (b"u1/x".to_vec(), padded.clone());
    let good = (b"u2".to_vec(), r#"{"site":"s1"}"#.to_string());
    produce(&rig.bootstrap, &small_cmds, &[bad.clone(), good.clone()]).await;
    produce(&rig.bootstrap, &tiny_cmds, &[bad, good]).await;

    let mut got = device.receive(2).await;
    got.sort();
    assert_eq!(
        got,
        [
            (
                "site/s1/hvac/u2/cmd/small".into(),
                r#"{"site":"s1"}"#.into()
            ),
            ("site/s1/hvac/u2/cmd/tiny".into(), r#"{"site":"s1"}"#.into()),
        ]
    );
    let dead = read_committed(&rig.bootstrap, &[&small_dlq, &tiny_dlq], 1, ARRIVE, SETTLE);
    assert!(!bridge.is_finished(), "the bridge stopped");
    bridge.stop().await;

    assert_eq!(dead.len(), 1, "{dead:#?}");
    let stub = &dead[0];
    assert_eq!(stub.topic, small_dlq);
    assert!(stub.value.is_empty(), "a stub: no payload");
    assert_eq!(stub.header("bridge.error.reason"), "topic");
    assert_eq!(stub.header("bridge.error.kafka"), "MessageSizeTooLarge");
    assert_eq!(
        stub.header("bridge.original.size"),
        padded.len().to_string()
    );
    assert_eq!(
        stub.header("bridge.original.sha256"),
        format!("{:x}", Sha256::digest(padded.as_bytes()))
    );
    assert_eq!(stub.header("bridge.source"), small_cmds);
    rig.broker.assert_connected_once(&client_id);
}
