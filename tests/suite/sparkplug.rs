//! Sparkplug B from an independent encoder (Eclipse Tahu's JavaScript
//! library, `tests/sparkplug/fixtures.js`) through real mosquitto and the
//! real binary into real Kafka: births teach the aliases, DATA is decoded
//! by alias, each sender's records keep their order under its key, and what
//! cannot be decoded is dead-lettered with reason `sparkplug`.

use crate::common::fixtures::sparkplug as fixture;
use crate::common::*;
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

const MAPPING: &str = r#"
routes:
  - name: plant
    mqtt: { filter: "spBv1.0/#", qos: 1 }
    format: sparkplug_b
    kafka: { topic: hvac.telemetry }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tahu_births_data_and_deaths_land_decoded_in_order_per_sender() {
    let rig = Rig::start().await;
    let files = BridgeFiles::new(&rig.bridge_config().mapping_text(MAPPING));
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;

    let node = |kind: &str| format!("spBv1.0/plant1/{kind}/edge7");
    let device = |kind: &str| format!("spBv1.0/plant1/{kind}/edge7/press3");
    let messages = [
        (node("NDATA"), "ndata"), // before its birth: dead letter
        (node("NBIRTH"), "nbirth"),
        (node("NDATA"), "ndata"),
        (device("DBIRTH"), "dbirth"),
        (device("DDATA"), "ddata"),
        (node("NDATA"), "ndata_unknown_alias"), // dead letter
        (node("NDEATH"), "ndeath"),
    ];
    let publishes: Vec<Publish> = messages
        .iter()
        .map(|(topic, name)| Publish::new(topic.clone(), fixture(name), 1))
        .collect();
    publish_all(rig.broker.port, &publishes).await;

    let (data, dlq) = (rig.topics.telemetry(), rig.topics.dead_letter());
    let landed = read_committed(
        &rig.bootstrap,
        &[&data, &dlq],
        7,
        WAIT,
        Duration::from_secs(2),
    );
    bridge.stop();
    assert_eq!(landed.len(), 7, "every message once");

    let decoded: Vec<(String, String, Value)> = landed
        .iter()
        .filter(|l| l.topic == data)
        .map(|l| {
            (
                l.key.clone().expect("key"),
                l.json()["message_type"].as_str().unwrap().to_string(),
                l.json(),
            )
        })
        .collect();
    let node_records: Vec<&str> = decoded
        .iter()
        .filter(|(key, _, _)| key == "plant1/edge7")
        .map(|(_, kind, _)| kind.as_str())
        .collect();
    assert_eq!(
        node_records,
        ["NBIRTH", "NDATA", "NDEATH"],
        "in order under the node's key"
    );
    let device_records: Vec<&str> = decoded
        .iter()
        .filter(|(key, _, _)| key == "plant1/edge7/press3")
        .map(|(_, kind, _)| kind.as_str())
        .collect();
    assert_eq!(device_records, ["DBIRTH", "DDATA"]);

    // NDATA by alias, with the birth's names and datatypes.
    let ndata = &decoded
        .iter()
        .find(|(_, kind, _)| kind == "NDATA")
        .unwrap()
        .2;
    assert_eq!(
        ndata["metrics"],
        serde_json::json!([
            {"name": "press/count", "alias": 1, "datatype": "Int32", "value": -7},
            {"name": "press/pressure", "alias": 2, "datatype": "Double", "value": 99.5},
        ])
    );
    let ddata = &decoded
        .iter()
        .find(|(_, kind, _)| kind == "DDATA")
        .unwrap()
        .2;
    assert_eq!(ddata["metrics"][1]["name"], "speed");
    assert_eq!(ddata["metrics"][1]["value"], 2.25);

    let dead: Vec<(&str, &str)> = landed
        .iter()
        .filter(|l| l.topic == dlq)
        .map(|l| {
            (
                l.header("bridge.error.reason"),
                l.header("bridge.error.detail"),
            )
        })
        .collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead.iter().all(|(reason, _)| *reason == "sparkplug"),
        "{dead:?}"
    );
    assert!(dead[0].1.contains("before its NBIRTH"), "{dead:?}");
    assert!(
        dead[1]
            .1
            .contains("alias 99 is not in the birth certificate"),
        "{dead:?}"
    );
}

/// The bridge restarts between a node's birth and its next DATA: the
/// birth tables committed with the birth are read back with the
/// exactly-once state, so the DATA is decoded at once, with no dead letter
/// and no rebirth request. Births and deaths also land on the route's
/// online topic, keyed by node and device, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_birth_and_data_needs_no_rebirth() {
    const ONLINE: &str = r#"
routes:
  - name: plant
    mqtt: { filter: "spBv1.0/#", qos: 1 }
    format: sparkplug_b
    sparkplug: { online_topic: plant.online }
    kafka: { topic: hvac.telemetry }
"#;
    let rig = Rig::start().await;
    let online = rig.topics.named("plant.online");
    rig.kafka.create_topics(&[&online], 1).await;
    let files = BridgeFiles::new(&rig.bridge_config().mapping_text(ONLINE));
    let node = |kind: &str| format!("spBv1.0/plant1/{kind}/edge7");
    let device = |kind: &str| format!("spBv1.0/plant1/{kind}/edge7/press3");
    let (topic, dlq) = (rig.topics.telemetry(), rig.topics.dead_letter());

    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;
    // seq 0, 1 and 2; then, after the restart, 3, 4 and 5: no gap.
    publish_all(
        rig.broker.port,
        &[
            Publish::new(node("NBIRTH"), fixture("nbirth"), 1),
            Publish::new(node("NDATA"), fixture("ndata"), 1),
            Publish::new(device("DBIRTH"), fixture("dbirth"), 1),
        ],
    )
    .await;
    read_committed(&rig.bootstrap, &[&topic], 3, WAIT, Duration::ZERO);
    bridge.stop();

    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;
    publish_all(
        rig.broker.port,
        &[
            Publish::new(device("DDATA"), fixture("ddata"), 1),
            Publish::new(node("NDATA"), fixture("ndata_after"), 1),
            Publish::new(device("DDEATH"), fixture("ddeath_after"), 1),
            Publish::new(node("NDEATH"), fixture("ndeath"), 1),
        ],
    )
    .await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&topic, &dlq, &online],
        3 + 4 + 4,
        WAIT,
        Duration::from_secs(2),
    );
    bridge
        .await_metric(
            mqtt_kafka_bridge::telemetry::SPARKPLUG_REBIRTHS,
            &[],
            |n| n == 0.0,
            WAIT,
        )
        .await;
    bridge.stop();
    // The deaths wrote tombstones: a third start restores no table.
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;
    bridge.stop();
    let log = std::fs::read_to_string(files.log()).unwrap();
    let loads: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("exactly-once state loaded"))
        .collect();
    assert_eq!(loads.len(), 3, "{log}");
    assert!(loads[1].contains("sparkplug_tables=2"), "{}", loads[1]);
    assert!(loads[2].contains("sparkplug_tables=0"), "{}", loads[2]);
    assert!(landed.iter().all(|l| l.topic != dlq), "no dead letter");
    // In order under each sender's key (keys may share no partition).
    let of = |key: &str| -> Vec<Value> {
        landed
            .iter()
            .filter(|l| l.topic == topic && l.key.as_deref() == Some(key))
            .map(|l| l.json())
            .collect()
    };
    let kinds = |records: &[Value]| -> Vec<String> {
        records
            .iter()
            .map(|v| v["message_type"].as_str().unwrap().to_string())
            .collect()
    };
    let (node_records, device_records) = (of("plant1/edge7"), of("plant1/edge7/press3"));
    assert_eq!(kinds(&node_records), ["NBIRTH", "NDATA", "NDATA", "NDEATH"]);
    assert_eq!(kinds(&device_records), ["DBIRTH", "DDATA", "DDEATH"]);
    // Decoded after the restart with the tables of the births before it.
    assert_eq!(device_records[1]["metrics"][1]["name"], "speed");
    assert_eq!(device_records[1]["metrics"][1]["value"], 2.25);
    assert_eq!(
        node_records[2]["metrics"],
        serde_json::json!([{"name": "press/pressure", "alias": 2, "datatype": "Double", "value": 100.25}])
    );

    // One partition: the online topic keeps the order of births and deaths.
    let states: Vec<(String, bool)> = landed
        .iter()
        .filter(|l| l.topic == online)
        .map(|l| {
            (
                l.key.clone().unwrap(),
                l.json()["online"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("plant1/edge7".to_string(), true),
            ("plant1/edge7/press3".to_string(), true),
            ("plant1/edge7/press3".to_string(), false),
            ("plant1/edge7".to_string(), false),
        ]
    );
}

/// DATA from a node whose birth the bridge never saw (it was born before
/// the bridge first subscribed) is dead-lettered, not dropped, and the
/// node is asked for a rebirth on its NCMD topic; once the node answers
/// with its NBIRTH, its DATA is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_without_a_birth_asks_for_a_rebirth_and_decodes_after_it() {
    let rig = Rig::start().await;
    let files = BridgeFiles::new(&rig.bridge_config().mapping_text(MAPPING));
    let birth = Publish::new("spBv1.0/plant1/NBIRTH/edge7", fixture("nbirth"), 1);
    let data = Publish::new("spBv1.0/plant1/NDATA/edge7", fixture("ndata"), 1);
    let (topic, dlq) = (rig.topics.telemetry(), rig.topics.dead_letter());

    // The edge node listens for commands, as Sparkplug nodes do.
    let mut node = Device::subscribe(
        rig.broker.port,
        "spBv1.0/plant1/NCMD/+",
        rumqttc::v5::mqttbytes::QoS::AtMostOnce,
    )
    .await;
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;
    publish_all(rig.broker.port, std::slice::from_ref(&data)).await;
    let request = node.receive(1).await;
    assert_eq!(request[0].0, "spBv1.0/plant1/NCMD/edge7");
    assert!(request[0].1.contains("Node Control/Rebirth"), "{request:?}");
    // The node answers with its birth, then goes on.
    publish_all(rig.broker.port, &[birth, data]).await;

    let landed = read_committed(
        &rig.bootstrap,
        &[&topic, &dlq],
        3,
        WAIT,
        Duration::from_secs(2),
    );
    let kinds: Vec<(String, String)> = landed
        .iter()
        .map(|l| {
            let kind = if l.topic == dlq {
                "dead letter".to_string()
            } else {
                l.json()["message_type"].as_str().unwrap().to_string()
            };
            (l.topic.clone(), kind)
        })
        .collect();
    let on = |t: &str| -> Vec<&str> {
        kinds
            .iter()
            .filter(|(topic, _)| topic == t)
            .map(|(_, kind)| kind.as_str())
            .collect()
    };
    assert_eq!(on(&topic), ["NBIRTH", "NDATA"]);
    assert_eq!(on(&dlq), ["dead letter"]);
    bridge
        .await_metric(
            mqtt_kafka_bridge::telemetry::SPARKPLUG_REBIRTHS,
            &[],
            |n| n == 1.0,
            WAIT,
        )
        .await;
    bridge.stop();
}
