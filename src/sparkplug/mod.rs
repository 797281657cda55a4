//! Sparkplug B, the MQTT of factories and utilities: protobuf payloads on
//! `spBv1.0/<group>/<type>/<edge node>[/<device>]`, where birth
//! certificates declare each metric's name, alias and datatype and later
//! DATA messages carry only aliases and values.
//!
//! `proto` is the official protobuf definition as Rust types, `topic` the
//! namespace, `decode` values by datatype as JSON, and `sessions` what the
//! bridge knows of each edge node (births, aliases, `seq`), which a route
//! with `format: sparkplug_b` decodes DATA messages with; `persist` keeps
//! the birth tables in the exactly-once state across restarts.

pub mod decode;
mod persist;
#[rustfmt::skip]
pub mod proto;
mod sessions;
pub mod topic;

pub use persist::{Change, MAX_RECORD_BYTES};
pub use sessions::{
    Decoded, Form, Sessions, Transition, HEADER_FIELDS, MAX_HELD_BYTES, MAX_NODES, REBIRTH_EVERY,
};
pub use topic::{MessageType, SparkplugTopic};

/// Where a rebirth request for an edge node goes: its NCMD topic.
pub fn rebirth_topic(group: &str, edge_node: &str) -> String {
    format!("{}/{group}/NCMD/{edge_node}", topic::NAMESPACE)
}

/// A rebirth request: NCMD with `Node Control/Rebirth` = true, which makes
/// the edge node publish its NBIRTH (and its devices' DBIRTHs) again.
pub fn rebirth_payload(timestamp_ms: u64) -> Vec<u8> {
    use prost::Message;
    proto::Payload {
        timestamp: Some(timestamp_ms),
        metrics: vec![proto::payload::Metric {
            name: Some("Node Control/Rebirth".into()),
            timestamp: Some(timestamp_ms),
            datatype: Some(proto::DataType::Boolean as u32),
            value: Some(proto::payload::metric::Value::BooleanValue(true)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

/// A payload by Eclipse Tahu's JavaScript library (an independent
/// encoder), from `tests/sparkplug/fixtures.json`, for unit tests here and
/// in `route`.
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let all: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/sparkplug/fixtures.json")).unwrap();
    let hex = all[name]
        .as_str()
        .unwrap_or_else(|| panic!("no Sparkplug fixture {name}"));
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// The fixtures' edge node's topic for message type `kind`.
#[cfg(test)]
pub(crate) fn node(kind: &str) -> String {
    format!("spBv1.0/plant1/{kind}/edge7")
}

/// The fixtures' device's topic for message type `kind`.
#[cfg(test)]
pub(crate) fn device(kind: &str) -> String {
    format!("{}/press3", node(kind))
}

#[cfg(test)]
mod tests {
    //! Payloads made by Eclipse Tahu's JavaScript library (an independent
    //! encoder): `tests/sparkplug/fixtures.js`.

    use super::*;
    use prost::Message;
    use serde_json::{json, Value};

    use super::{device, fixture, node};

    fn values(decoded: &Value) -> Vec<(String, Value)> {
        decoded["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["name"].as_str().unwrap().to_string(), m["value"].clone()))
            .collect()
    }

    #[test]
    fn data_by_alias_is_decoded_with_the_births_names_and_datatypes() {
        let mut s = Sessions::default();
        let birth = s.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
        assert_eq!(birth["message_type"], "NBIRTH");
        assert_eq!(birth["descriptor"], "plant1/edge7");
        assert_eq!(birth["seq"], 0);
        assert_eq!(
            values(&birth),
            [
                ("bdSeq".into(), json!(7)),
                ("Node Control/Rebirth".into(), json!(false)),
                ("press/count".into(), json!(-42)),
                ("press/pressure".into(), json!(101.325)),
                ("press/label".into(), json!("line 3")),
            ]
        );

        let data = s.decode(&node("NDATA"), &fixture("ndata")).unwrap();
        assert_eq!(
            data["metrics"],
            json!([
                {"name": "press/count", "alias": 1, "datatype": "Int32", "value": -7},
                {"name": "press/pressure", "alias": 2, "datatype": "Double", "value": 99.5},
            ])
        );
        assert_eq!(data["timestamp"], 1_764_000_000_001u64);

        s.decode(&device("DBIRTH"), &fixture("dbirth")).unwrap();
        let data = s.decode(&device("DDATA"), &fixture("ddata")).unwrap();
        assert_eq!(data["device"], "press3");
        assert_eq!(data["descriptor"], "plant1/edge7/press3");
        assert_eq!(
            values(&data),
            [
                ("running".into(), json!(false)),
                ("speed".into(), json!(2.25))
            ]
        );
        assert_eq!(s.take_gaps(), 0);
        assert!(s.take_rebirths().is_empty());
    }

    #[test]
    fn what_cannot_be_decoded_says_why() {
        let mut s = Sessions::default();
        // DATA before any birth.
        let error = s.decode(&node("NDATA"), &fixture("ndata")).unwrap_err();
        assert_eq!(
            error,
            "NDATA from edge node `plant1/edge7` before its NBIRTH"
        );
        s.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
        // DDATA before the device's birth.
        let error = s.decode(&device("DDATA"), &fixture("ddata")).unwrap_err();
        assert_eq!(error, "DDATA from device `press3` before its DBIRTH");
        // An alias no birth declared.
        let error = s
            .decode(&node("NDATA"), &fixture("ndata_unknown_alias"))
            .unwrap_err();
        assert_eq!(error, "alias 99 is not in the birth certificate");
        // Not protobuf, not the namespace.
        assert!(s
            .decode(&node("NDATA"), b"{\"json\": true}")
            .unwrap_err()
            .starts_with("not a Sparkplug B payload"));
        assert!(s.decode("site/a/b", &fixture("ndata")).is_err());
        // A device's alias used from the node.
        s.decode(&device("DBIRTH"), &fixture("dbirth")).unwrap();
        let mut data = super::proto::Payload::default();
        data.metrics.push(super::proto::payload::Metric {
            alias: Some(3),
            value: Some(super::proto::payload::metric::Value::BooleanValue(true)),
            ..Default::default()
        });
        let error = s
            .decode(&node("NDATA"), &prost::Message::encode_to_vec(&data))
            .unwrap_err();
        assert_eq!(
            error,
            "alias 3 belongs to device `press3`, not to this node"
        );
    }

    #[test]
    fn seq_gaps_are_counted_and_deaths_end_sessions() {
        let mut s = Sessions::default();
        s.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
        s.decode(&node("NDATA"), &fixture("ndata")).unwrap();
        // seq 1 then 9: seven messages lost. Still decodable.
        let data = s.decode(&node("NDATA"), &fixture("ndata_gap")).unwrap();
        assert_eq!(values(&data), [("press/pressure".into(), json!(1.0))]);
        assert_eq!(s.take_gaps(), 1);
        // Messages were lost: the node is asked to be born again.
        assert_eq!(
            s.take_rebirths(),
            [("plant1".to_string(), "edge7".to_string())]
        );

        // A death with another bdSeq is a late will of an older session.
        s.decode(&node("NDEATH"), &fixture("ndeath_stale")).unwrap();
        assert!(s.is_online("plant1", "edge7"));
        let death = s.decode(&node("NDEATH"), &fixture("ndeath")).unwrap();
        assert_eq!(values(&death), [("bdSeq".into(), json!(7))]);
        assert!(!s.is_online("plant1", "edge7"));
        assert!(s.decode(&node("NDATA"), &fixture("ndata")).is_err());
    }

    #[test]
    fn what_a_birth_would_mend_asks_for_one_at_most_every_five_seconds() {
        use std::time::{Duration, Instant};
        let mut s = Sessions::default();
        let t0 = Instant::now();
        let node = |kind: &str| format!("spBv1.0/plant1/{kind}/edge7");
        assert!(s
            .decode_at(&node("NDATA"), &fixture("ndata"), t0, Form::Value)
            .is_err());
        assert!(s
            .decode_at(
                &node("NDATA"),
                &fixture("ndata"),
                t0 + Duration::from_secs(1),
                Form::Value
            )
            .is_err());
        assert_eq!(
            s.take_rebirths().len(),
            1,
            "one request, not one per message"
        );
        assert!(s
            .decode_at(
                &node("NDATA"),
                &fixture("ndata"),
                t0 + REBIRTH_EVERY,
                Form::Value
            )
            .is_err());
        assert_eq!(s.take_rebirths().len(), 1);
        // Garbage is no reason to ask: a birth would not mend it.
        assert!(s
            .decode_at(
                &node("NDATA"),
                b"\xff\xff",
                t0 + REBIRTH_EVERY * 3,
                Form::Value
            )
            .is_err());
        assert!(s.take_rebirths().is_empty());

        let request = super::proto::Payload::decode(&rebirth_payload(7)[..]).unwrap();
        assert_eq!(
            request.metrics[0].name.as_deref(),
            Some("Node Control/Rebirth")
        );
        assert_eq!(
            request.metrics[0].value,
            Some(super::proto::payload::metric::Value::BooleanValue(true))
        );
        assert_eq!(
            rebirth_topic("plant1", "edge7"),
            "spBv1.0/plant1/NCMD/edge7"
        );
    }

    #[test]
    fn the_bytes_form_is_the_value_form_serialised_with_a_header_value() {
        let (mut a, mut b) = (Sessions::default(), Sessions::default());
        let now = std::time::Instant::now();
        for s in [&mut a, &mut b] {
            s.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
        }
        let full = a
            .decode_at(&node("NDATA"), &fixture("ndata"), now, Form::Value)
            .unwrap();
        let fast = b
            .decode_at(&node("NDATA"), &fixture("ndata"), now, Form::Bytes)
            .unwrap();
        assert_eq!(full.bytes, None);
        assert_eq!(
            fast.bytes.unwrap(),
            serde_json::to_vec(&full.value).unwrap()
        );
        let mut header = full.value.clone();
        header.as_object_mut().unwrap().remove("metrics");
        assert_eq!(fast.value, header);
        assert!(fast
            .value
            .as_object()
            .unwrap()
            .keys()
            .all(|k| HEADER_FIELDS.contains(&k.as_str())));
    }

    #[test]
    fn a_device_death_forgets_the_devices_aliases() {
        let mut s = Sessions::default();
        s.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
        s.decode(&device("DBIRTH"), &fixture("dbirth")).unwrap();
        s.decode(&device("DDEATH"), &fixture("ddeath")).unwrap();
        assert!(s.decode(&device("DDATA"), &fixture("ddata")).is_err());
        // The node's own aliases stay.
        s.decode(&node("NDATA"), &fixture("ndata")).unwrap();
    }

    #[test]
    fn births_cannot_grow_memory_without_bound() {
        let mut s = Sessions::default();
        let birth = fixture("nbirth");
        for i in 0..MAX_NODES {
            s.decode(&format!("spBv1.0/g/NBIRTH/n{i}"), &birth).unwrap();
        }
        let error = s.decode("spBv1.0/g/NBIRTH/one-more", &birth).unwrap_err();
        assert!(error.contains("past the 10000"), "{error}");
        // A node already known may be born again.
        s.decode("spBv1.0/g/NBIRTH/n0", &birth).unwrap();
    }

    #[test]
    fn births_of_long_names_are_bounded_by_their_bytes() {
        // 800 KiB of metric names per birth (under the payload limit): a
        // count of metrics alone would let 10 000 nodes hold 8 GB.
        let birth = proto::Payload {
            metrics: (0..8)
                .map(|i| proto::payload::Metric {
                    name: Some(format!("{i}{}", "x".repeat(100 * 1024))),
                    alias: Some(i),
                    datatype: Some(proto::DataType::Boolean as u32),
                    value: Some(proto::payload::metric::Value::BooleanValue(true)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut s = Sessions::default();
        let mut born = 0;
        let error = loop {
            match s.decode(&format!("spBv1.0/g/NBIRTH/n{born}"), &birth) {
                Ok(_) => born += 1,
                Err(e) => break e,
            }
        };
        assert!(
            error.contains("MiB the bridge keeps of birth certificates"),
            "{error}"
        );
        // 64 MiB of 800 KiB births: 81 of them, far from 10 000.
        assert_eq!(born, MAX_HELD_BYTES / (8 * (100 * 1024 + 1 + 64)));
    }
}
