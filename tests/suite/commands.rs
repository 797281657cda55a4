//! Commands to devices. Kafka → MQTT: records of a command topic reach the
//! right device topic once, in order per device; invalid ones are
//! dead-lettered, stale ones dropped; an offset is committed only after the
//! broker has the command, so a bridge killed in between delivers it again.
//! MQTT → MQTT: a relay route turns a wall dial into a unit's setpoint.

use crate::common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

const ARRIVE: Duration = Duration::from_secs(60);

async fn produce(bootstrap: &str, topic: &str, commands: &[(&str, String, i64)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for (key, value, timestamp) in commands {
        producer
            .send(
                FutureRecord::to(topic)
                    .key(*key)
                    .payload(value)
                    .timestamp(*timestamp),
                Duration::from_secs(30),
            )
            .await
            .expect("produce command");
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn setpoint(seq: u32) -> String {
    format!(
        r#"{{"site":"s1","setpoint_c":{},"seq":{seq}}}"#,
        18 + seq % 10
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_each_device_once_in_order_and_bad_ones_do_not() {
    let rig = Rig::start().await;
    let mut device =
        Device::subscribe(rig.broker.port, "site/+/hvac/+/cmd/#", QoS::AtLeastOnce).await;
    let bridge = Bridge::start(rig.bridge_config().build()).await;

    let mut commands: Vec<(&str, String, i64)> = Vec::new();
    for seq in 0..30u32 {
        let unit = ["u1", "u2", "u3"][seq as usize % 3];
        commands.push((unit, setpoint(seq), now_ms()));
        if seq == 10 {
            // Invalid: outside the schema's range.
            commands.push(("u1", r#"{"site":"s1","setpoint_c":99}"#.into(), now_ms()));
            // Stale: older than the route's five-minute TTL.
            commands.push(("u2", setpoint(999), now_ms() - 10 * 60_000));
        }
    }
    produce(&rig.bootstrap, &rig.topics.commands(), &commands).await;
    let got = device.receive(30).await;
    // The dead-letter record shows the invalid one was handled; a settle
    // read there also gives any stray command time to show up.
    let dead = read_committed(
        &rig.bootstrap,
        &[&rig.topics.dead_letter()],
        1,
        ARRIVE,
        Duration::from_secs(1),
    );
    bridge.stop().await;
    assert!(device.try_next().is_none(), "no extra command");

    let mut last: std::collections::HashMap<String, u64> = Default::default();
    for (topic, payload) in &got {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        let seq = v["seq"].as_u64().unwrap();
        assert_ne!(seq, 999, "the stale command was delivered");
        let unit = ["u1", "u2", "u3"][seq as usize % 3];
        assert_eq!(topic, &format!("site/s1/hvac/{unit}/cmd/setpoint"));
        if let Some(previous) = last.insert(unit.to_string(), seq) {
            assert!(previous < seq, "{unit}: {seq} after {previous}");
        }
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].header("bridge.error.reason"), "schema");
    assert_eq!(dead[0].header("bridge.route"), "hvac-setpoint");
    assert_eq!(dead[0].key.as_deref(), Some("u1"));
}

/// The bridge dies after the broker acknowledged a command and before the
/// offset was committed: the command is delivered again, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_offset_was_not_committed_is_delivered_again() {
    let rig = Rig::start().await;
    let mut device =
        Device::subscribe(rig.broker.port, "site/+/hvac/+/cmd/#", QoS::AtLeastOnce).await;
    let files = BridgeFiles::new(&rig.bridge_config());
    let bridge = files.start(Some("command_before_commit:1"));
    produce(
        &rig.bootstrap,
        &rig.topics.commands(),
        &[("u7", setpoint(1), now_ms())],
    )
    .await;
    let first = device.receive(1).await;
    let (status, _) = bridge.wait_async(ARRIVE).await;
    assert!(
        matches!(status, Some(s) if !s.success()),
        "crashed at the point: {status:?}"
    );

    let bridge = files.start(None);
    let again = device.receive(1).await;
    assert_eq!(again, first, "the same command, delivered again");
    produce(
        &rig.bootstrap,
        &rig.topics.commands(),
        &[("u7", setpoint(2), now_ms())],
    )
    .await;
    let next = device.receive(1).await;
    assert!(next[0].1.contains(r#""seq":2"#), "{next:?}");
    bridge.stop();
    assert!(
        device.try_next().is_none(),
        "committed after the restart: no third copy"
    );
}

/// The relay route of `mappings/hvac.yaml`: a wall dial reading becomes a
/// setpoint command for the room's unit, reshaped, on MQTT only. The dial
/// messages are acknowledged once relayed: a second bridge on the same
/// session relays none of them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_dial_is_relayed_to_its_unit_reshaped() {
    let rig = Rig::start().await;
    let mut device =
        Device::subscribe(rig.broker.port, "site/+/hvac/+/cmd/#", QoS::AtLeastOnce).await;
    let id = unique("bridge");
    let config = || rig.bridge_config().client_id(&id).build();
    let bridge = Bridge::start(config()).await;
    let dials: Vec<Publish> = (0..20)
        .map(|i| {
            Publish::new(
                format!("site/s1/room/r{}/thermostat/dial", i % 4),
                format!(r#"{{"target_c":{}}}"#, 15 + i),
                1,
            )
        })
        .collect();
    publish_all(rig.broker.port, &dials).await;
    let got = device.receive(20).await;
    bridge.stop().await;
    for (i, (topic, payload)) in got.iter().enumerate() {
        assert_eq!(topic, &format!("site/s1/hvac/r{}/cmd/setpoint", i % 4));
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"setpoint_c": 15 + i, "site": "s1", "issued_by": "wall-dial"})
        );
    }

    // Everything was acknowledged: after a restart on the same session the
    // next thing relayed is a new marker, not an old dial.
    let bridge = Bridge::start(config()).await;
    let marker = Publish::new("site/s1/room/r9/thermostat/dial", r#"{"target_c":30}"#, 1);
    publish_all(rig.broker.port, &[marker]).await;
    let next = device.receive(1).await;
    bridge.stop().await;
    assert_eq!(next[0].0, "site/s1/hvac/r9/cmd/setpoint", "{next:?}");
}
