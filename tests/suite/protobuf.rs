//! `format: protobuf` with the shipped mapping's `hvac-protobuf-telemetry`
//! route: payloads encoded by protobufjs (an independent encoder,
//! `tests/protobuf/fixtures.js`) from `mappings/protos/hvac.proto` go
//! through real mosquitto and the real binary into real Kafka as the same
//! JSON the other units send; what is not the message type, or breaks the
//! schema, is dead-lettered with its reason.

use crate::common::fixtures::protobuf as fixture;
use crate::common::*;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_units_land_as_json_and_bad_payloads_are_dead_lettered() {
    let rig = Rig::start().await;
    let files = BridgeFiles::new(&rig.bridge_config());
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;

    let unit = |u: &str| format!("site/s1/hvac-pb/{u}/telemetry");
    publish_all(
        rig.broker.port,
        &[
            Publish::new(unit("u1"), fixture("telemetry"), 1),
            Publish::new(unit("u2"), fixture("zeros"), 1),
            Publish::new(unit("u3"), fixture("out_of_range"), 1),
            Publish::new(unit("u4"), br#"{"ambient_c": 21.5}"#.to_vec(), 1),
        ],
    )
    .await;
    let (data, dlq) = (rig.topics.telemetry(), rig.topics.dead_letter());
    let landed = read_committed(
        &rig.bootstrap,
        &[&data, &dlq],
        4,
        WAIT,
        Duration::from_secs(2),
    );
    bridge.stop();
    assert_eq!(landed.len(), 4, "every message once");

    let record = |key: &str| {
        landed
            .iter()
            .find(|l| l.topic == data && l.key.as_deref() == Some(key))
            .unwrap_or_else(|| panic!("no record keyed {key}: {landed:?}"))
    };
    let u1 = record("s1.u1");
    let mut value = u1.json();
    value.as_object_mut().unwrap().remove("received_at");
    assert_eq!(
        value,
        json!({"ts": 1_764_000_000_000u64, "ambient_c": 21.5, "target_c": 22.0,
               "humidity_pct": 40.0, "air_quality_ppm": 600, "blower_pct": 55,
               "load_pct": 48.0, "energy_kwh": 1234.5, "mode": "heat",
               "site": "s1", "unit": "u1", "source": "protobuf"})
    );
    assert_eq!(u1.timestamp_ms, Some(1_764_000_000_000), "from /ts");
    assert_eq!(u1.header("schema"), "hvac-telemetry/v1");
    // Readings proto3 did not send (all 0) are there at 0; `mode`, which
    // has presence, is absent.
    let u2 = record("s1.u2").json();
    assert_eq!(u2["ambient_c"], 0.0);
    assert_eq!(u2["air_quality_ppm"], 0);
    assert!(u2.get("mode").is_none(), "{u2}");

    let mut dead: Vec<(String, String)> = landed
        .iter()
        .filter(|l| l.topic == dlq)
        .map(|l| {
            (
                l.header("mqtt.topic").to_string(),
                l.header("bridge.error.reason").to_string(),
            )
        })
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        [
            (unit("u3"), "schema".to_string()),
            (unit("u4"), "parse".to_string())
        ]
    );
}
