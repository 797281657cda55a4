//! Routing of whole messages through compiled mapping files: compile,
//! look up and make the record, as the bridge and `translate` do.

use super::*;
use crate::config::{Config, ConfigErrors, MappingSource};
use crate::mqtt::{Defect, MqttMessage, Qos, Subscription};
use serde_json::{json, Value};
use table::LINEAR_SCAN_MAX;

const BRIDGE: &str = "mqtt: { host: h, client_id: c }\nkafka: { bootstrap_servers: b, transactional_id: t, dead_letter_topic: dlq }\nmappings: [x]\n";

fn table(mapping: &str) -> Result<RouteTable, ConfigErrors> {
    table_with_files(mapping, &[])
}

fn table_with_files(mapping: &str, files: &[(&str, &str)]) -> Result<RouteTable, ConfigErrors> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("m.yaml");
    let source = MappingSource::parse(&path, mapping)?;
    RouteTable::compile(&Config::from_parts(
        &dir.path().join("bridge.yaml"),
        BRIDGE,
        vec![source],
    )?)
}

fn error_text(mapping: &str) -> String {
    table(mapping).unwrap_err().to_string()
}

fn forward(outcome: Outcome) -> kafka::Record {
    match outcome {
        Outcome::Forward { record, .. } => record,
        other => panic!("expected Forward, got {other:?}"),
    }
}

fn rejection(outcome: Outcome) -> (kafka::Record, Rejection) {
    match outcome {
        Outcome::DeadLetter {
            record, rejection, ..
        } => (record, rejection),
        other => panic!("expected DeadLetter, got {other:?}"),
    }
}

fn json_of(record: &kafka::Record) -> Value {
    serde_json::from_slice(&record.value).unwrap()
}

const HVAC: &str = r#"
routes:
  - name: telemetry
    mqtt: { filter: "site/{site}/hvac/{unit}/telemetry" }
    transform:
      set: { site: "{site}", unit: "{unit}" }
    kafka:
      topic: hvac.{site}
      key: "{/unit}"
      timestamp: /ts
      headers: { unit: "{unit}", fw: "{mqtt.user_properties.fw}" }
"#;

#[test]
fn forwards_with_topic_key_headers_timestamp_and_order() {
    let t = table(HVAC).unwrap();
    let mut m = MqttMessage::new(
        "site/s1/hvac/u7/telemetry",
        r#"{"ts": 1700000000123, "t": 21.5}"#,
    );
    m.user_properties = vec![("fw".into(), "1.2".into())];
    m.content_type = Some("application/json".into());
    let r = forward(t.route(&m));
    assert_eq!(r.topic, "hvac.s1");
    assert_eq!(r.key.as_deref(), Some("u7"));
    assert_eq!(r.timestamp_ms, 1_700_000_000_123);
    // Field order is kept: device fields first, then what `set` adds.
    assert_eq!(
        String::from_utf8(r.value.to_vec()).unwrap(),
        r#"{"ts":1700000000123,"t":21.5,"site":"s1","unit":"u7"}"#
    );
    assert_eq!(
        r.header("mqtt.topic"),
        Some(&b"site/s1/hvac/u7/telemetry"[..])
    );
    assert_eq!(r.header("content-type"), Some(&b"application/json"[..]));
    assert_eq!(r.header("unit"), Some(&b"u7"[..]));
    assert_eq!(
        r.header("fw"),
        Some(&b"1.2"[..]),
        "user property carried and templated"
    );
}

#[test]
fn json_without_transform_passes_bytes_through() {
    let t = table("routes:\n  - name: r\n    mqtt: { filter: 'a/#' }\n    kafka: { topic: t }\n")
        .unwrap();
    let payload = "{ \"spaced\" :  1 }";
    let r = forward(t.route(&MqttMessage::new("a/b", payload)));
    assert_eq!(&r.value[..], payload.as_bytes());
    assert_eq!(r.key, None);
}

#[test]
fn invalid_payloads_become_dead_letters_with_reasons() {
    let t = table(HVAC).unwrap();
    let cases: [(&str, RejectReason, &str); 4] = [
        ("not json", RejectReason::Parse, "invalid JSON"),
        ("\u{0}\u{1}", RejectReason::Parse, "invalid JSON"),
        (
            r#"{"ts": "yesterday"}"#,
            RejectReason::Timestamp,
            "is not RFC 3339",
        ),
        (
            r#"[1, 2]"#,
            RejectReason::Transform,
            "set needs a JSON object",
        ),
    ];
    for (payload, reason, detail) in cases {
        let mut m = MqttMessage::new("site/s1/hvac/u7/telemetry", payload);
        m.user_properties = vec![("fw".into(), "1".into())];
        let (record, rej) = rejection(t.route(&m));
        assert_eq!(rej.reason, reason, "{payload}");
        assert!(rej.detail.contains(detail), "{payload}: {}", rej.detail);
        assert_eq!(record.topic, "dlq");
        assert_eq!(&record.value[..], payload.as_bytes(), "original bytes kept");
        assert_eq!(record.key.as_deref(), Some("site/s1/hvac/u7/telemetry"));
        assert_eq!(record.header("bridge.route"), Some(&b"telemetry"[..]));
        assert_eq!(
            record.header("bridge.error.reason"),
            Some(reason.as_str().as_bytes())
        );
    }
}

#[test]
fn missing_header_source_is_a_header_rejection() {
    let t = table(HVAC).unwrap();
    let m = MqttMessage::new("site/s1/hvac/u7/telemetry", r#"{"ts": 1}"#);
    let (_, rej) = rejection(t.route(&m));
    assert_eq!(rej.reason, RejectReason::Header);
    assert_eq!(
        rej.detail,
        "header `fw`: message has no MQTT user property `fw`"
    );
}

#[test]
fn missing_key_field_is_a_key_rejection() {
    let t = table("routes:\n  - name: r\n    mqtt: { filter: 'a/+' }\n    kafka: { topic: t, key: '{/id}' }\n").unwrap();
    let (_, rej) = rejection(t.route(&MqttMessage::new("a/b", r#"{"x": 1}"#)));
    assert_eq!(rej.reason, RejectReason::Key);
    assert_eq!(rej.detail, "key: payload has no field at `/id`");
}

#[test]
fn oversized_and_non_utf8_payloads() {
    let t = table("routes:\n  - name: r\n    mqtt: { filter: 'a/+' }\n    max_payload_bytes: 8\n    kafka: { topic: t }\n").unwrap();
    let (_, rej) = rejection(t.route(&MqttMessage::new("a/b", "123456789")));
    assert_eq!(rej.reason, RejectReason::TooLarge);
    assert_eq!(
        rej.detail,
        "message is 12 bytes (payload 9, topic 3, user properties 0), the limit is 8"
    );
    let (_, rej) = rejection(t.route(&MqttMessage::new("a/b", &b"\"\xff\""[..])));
    assert_eq!(rej.reason, RejectReason::NotUtf8);
}

#[test]
fn captured_topic_level_that_is_no_kafka_name_is_rejected() {
    let t = table(
        "routes:\n  - name: r\n    mqtt: { filter: 'a/{x}' }\n    kafka: { topic: 'in.{x}' }\n",
    )
    .unwrap();
    let (_, rej) = rejection(t.route(&MqttMessage::new("a/b c", "1")));
    assert_eq!(rej.reason, RejectReason::Topic);
    assert!(rej
        .detail
        .contains("`in.b c` is not a valid Kafka topic name"));
}

#[test]
fn first_matching_route_wins_and_regex_can_decline() {
    let t = table(
        r#"
routes:
  - name: legacy
    mqtt: { filter: "dev/#", regex: '^dev/(?P<site>[a-z]+)-(?P<unit>\d+)$' }
    format: raw
    kafka: { topic: "legacy.{site}", key: "{unit}" }
  - name: rest
    mqtt: { filter: "dev/#" }
    format: raw
    kafka: { topic: other }
"#,
    )
    .unwrap();
    let r = forward(t.route(&MqttMessage::new("dev/north-42", &b"\x00\x01"[..])));
    assert_eq!(
        (r.topic.as_str(), r.key.as_deref()),
        ("legacy.north", Some("42"))
    );
    assert_eq!(&r.value[..], b"\x00\x01");
    let r = forward(t.route(&MqttMessage::new("dev/x/y", "z")));
    assert_eq!(r.topic, "other");
    assert_eq!(
        t.route(&MqttMessage::new("elsewhere", "z")),
        Outcome::Unrouted
    );
    // A route with a regex shadows nothing, so no warning.
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    assert_eq!(
        t.subscriptions(),
        vec![Subscription {
            filter: "dev/#".into(),
            qos: Qos::AtLeastOnce
        }]
    );
}

#[test]
fn shadowed_routes_are_warned_and_subscriptions_merge() {
    let t = table(
        r#"
routes:
  - name: all
    mqtt: { filter: "a/#", qos: 1 }
    kafka: { topic: t }
  - name: narrow
    mqtt: { filter: "a/{x}/c", qos: 2 }
    kafka: { topic: t }
  - name: other
    mqtt: { filter: "b/+" }
    kafka: { topic: t }
"#,
    )
    .unwrap();
    assert_eq!(t.warnings.len(), 1);
    assert!(
        t.warnings[0].contains("m.yaml:6: route `narrow` (a/+/c) is shadowed by route `all`"),
        "{}",
        t.warnings[0]
    );
    assert_eq!(
        t.subscriptions(),
        vec![
            Subscription {
                filter: "a/#".into(),
                qos: Qos::ExactlyOnce
            },
            Subscription {
                filter: "b/+".into(),
                qos: Qos::AtLeastOnce
            },
        ]
    );
}

#[test]
fn text_format_route_produces_json() {
    let t = table(
        r#"
routes:
  - name: legacy
    mqtt: { filter: "l/{unit}" }
    format: text
    text:
      pattern: 'T=(?P<t>[-0-9.]+);H=(?P<h>\d+)'
      fields: { t: float, h: integer }
    transform: { nest: reading, set: { unit: "{unit}" } }
    kafka: { topic: t, key: "{unit}" }
"#,
    )
    .unwrap();
    let r = forward(t.route(&MqttMessage::new("l/u1", "T=21.5;H=40")));
    assert_eq!(
        json_of(&r),
        json!({"reading": {"t": 21.5, "h": 40}, "unit": "u1"})
    );
    let (_, rej) = rejection(t.route(&MqttMessage::new("l/u1", "T=hot;H=40")));
    assert_eq!(rej.reason, RejectReason::Parse);
}

#[test]
fn schema_rejection_names_instance_path() {
    let t = table_with_files(
        "routes:\n  - name: r\n    mqtt: { filter: 'a' }\n    schema: s.json\n    kafka: { topic: t }\n",
        &[("s.json", r#"{"type": "object", "properties": {"h": {"maximum": 100}}}"#)],
    )
    .unwrap();
    assert!(matches!(
        t.route(&MqttMessage::new("a", r#"{"h": 5}"#)),
        Outcome::Forward { .. }
    ));
    let (record, rej) = rejection(t.route(&MqttMessage::new("a", r#"{"h": 500}"#)));
    assert_eq!(rej.reason, RejectReason::Schema);
    assert_eq!(record.header("bridge.error.path"), Some(&b"/h"[..]));
    assert!(
        rej.detail
            .contains("500 is greater than the maximum of 100"),
        "{}",
        rej.detail
    );
}

// One test per configuration error a user can hit in a mapping file.

#[test]
fn config_error_unknown_capture_names_file_line_and_field() {
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a/{site}' }\n    kafka:\n      topic: 'x.{sit}'\n");
    assert!(e.contains("m.yaml:5:14: routes[0].kafka.topic: `{sit}` is not a capture of this route (captures: site)"), "{e}");
}

#[test]
fn config_error_bad_filter() {
    let e = error_text(
        "routes:\n  - name: r\n    mqtt: { filter: 'a/#/b' }\n    kafka: { topic: t }\n",
    );
    assert!(
        e.contains(":3:21: routes[0].mqtt.filter: `#` must be the last level"),
        "{e}"
    );
}

#[test]
fn config_error_bad_regex() {
    let e = error_text(
        "routes:\n  - name: r\n    mqtt: { filter: 'a', regex: '(' }\n    kafka: { topic: t }\n",
    );
    assert!(e.contains("routes[0].mqtt.regex: invalid regex"), "{e}");
}

#[test]
fn config_error_missing_schema_file() {
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a' }\n    schema: nope.json\n    kafka: { topic: t }\n");
    assert!(
        e.contains(":4:13: routes[0].schema: cannot read schema"),
        "{e}"
    );
}

#[test]
fn config_error_schema_or_transform_on_raw() {
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a' }\n    format: raw\n    schema: s.json\n    transform: { drop: [x] }\n    kafka: { topic: t, key: '{/id}' }\n");
    assert!(
        e.contains("routes[0].schema: raw payloads cannot be validated"),
        "{e}"
    );
    assert!(
        e.contains("routes[0].transform: raw payloads cannot be transformed"),
        "{e}"
    );
    assert!(
        e.contains(
            "routes[0].kafka.key: `{/id}` reads a payload field, but raw payloads have no fields"
        ),
        "{e}"
    );
}

#[test]
fn config_error_invalid_topic_and_timestamp() {
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a' }\n    kafka: { topic: 'bad topic', timestamp: now }\n");
    assert!(
        e.contains("routes[0].kafka.topic: `bad topic` is not a valid Kafka topic name"),
        "{e}"
    );
    assert!(
        e.contains("routes[0].kafka.timestamp: `now` is neither `received` nor a JSON pointer"),
        "{e}"
    );
}

#[test]
fn config_error_duplicate_route_name() {
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a' }\n    kafka: { topic: t }\n  - name: r\n    mqtt: { filter: 'b' }\n    kafka: { topic: t }\n");
    assert!(
        e.contains(":5:11: routes[1].name: route name `r` is already used"),
        "{e}"
    );
}

#[test]
fn exactly_once_refuses_a_route_at_qos_0_and_at_least_once_takes_it() {
    let mapping =
        "routes:\n  - name: r\n    mqtt: { filter: a, qos: 0 }\n    kafka: { topic: t }\n";
    let e = error_text(mapping);
    assert!(e.contains("m.yaml:3:29: routes[0].mqtt.qos: is 0"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let bridge = format!("{BRIDGE}delivery: {{ guarantee: at_least_once }}\n");
    let source = MappingSource::parse(&dir.path().join("m.yaml"), mapping).unwrap();
    let config =
        Config::from_parts(&dir.path().join("bridge.yaml"), &bridge, vec![source]).unwrap();
    RouteTable::compile(&config).unwrap();
}

#[test]
fn config_error_bad_qos_and_text_without_pattern() {
    // An out-of-range QoS is refused by the parser, at its own position.
    let e = error_text(
        "routes:\n  - name: r\n    mqtt: { filter: 'a', qos: 3 }\n    kafka: { topic: t }\n",
    );
    assert!(
        e.contains("m.yaml:3:31: routes[0].mqtt.qos: is 3; must be 0, 1 or 2"),
        "{e}"
    );
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a' }\n    format: text\n    kafka: { topic: t }\n");
    assert!(
        e.contains("routes[0].format: `format: text` needs a `text` field"),
        "{e}"
    );
}

#[test]
fn config_error_unknown_format() {
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a' }\n    format: xml\n    kafka: { topic: t }\n");
    assert!(e.contains("m.yaml:4:13: routes[0].format: unknown variant `xml`, expected one of `json`, `text`, `raw`"), "{e}");
}

#[test]
fn config_error_missing_required_field() {
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a' }\n");
    assert!(
        e.contains("m.yaml:2:5: routes[0].kafka: missing: a route needs `kafka` (ingest to Kafka) or `publish` (an MQTT relay)"),
        "{e}"
    );
}

#[test]
fn a_relay_route_publishes_the_reshaped_payload_back_to_mqtt() {
    let t = table(
        r#"
routes:
  - name: dial-to-setpoint
    mqtt: { filter: "site/{site}/room/{room}/thermostat/dial", qos: 1 }
    transform:
      rename: { target_c: setpoint_c }
      set: { source: wall-dial }
    publish:
      topic: "site/{site}/hvac/{room}/cmd/setpoint"
      qos: 2
      retain: true
"#,
    )
    .unwrap();
    let m = MqttMessage::new("site/s1/room/r4/thermostat/dial", r#"{"target_c": 22.5}"#);
    match t.route(&m) {
        Outcome::Relay { route: 0, publish } => {
            assert_eq!(publish.topic, "site/s1/hvac/r4/cmd/setpoint");
            assert_eq!((publish.qos, publish.retain), (Qos::ExactlyOnce, true));
            let v: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
            assert_eq!(
                v,
                serde_json::json!({"setpoint_c": 22.5, "source": "wall-dial"})
            );
        }
        other => panic!("expected Relay, got {other:?}"),
    }
    // A bad payload is dead-lettered like any other.
    let bad = MqttMessage::new("site/s1/room/r4/thermostat/dial", "22.5 please");
    assert_eq!(rejection(t.route(&bad)).1.reason, RejectReason::Parse);
}

#[test]
fn a_relay_that_would_hear_its_own_output_is_refused() {
    let e = error_text(
        "routes:\n  - name: echo\n    mqtt: { filter: 'dev/{d}/in/#' }\n    publish: { topic: 'dev/{d}/in/again' }\n",
    );
    assert!(
        e.contains("m.yaml:4:23: routes[0].publish.topic: `dev/{d}/in/again` can match the route's own filter"),
        "{e}"
    );
    let e = error_text(
        "routes:\n  - name: both\n    mqtt: { filter: 'a' }\n    kafka: { topic: t }\n    publish: { topic: b }\n",
    );
    assert!(
        e.contains("routes[0].publish: a route has either `kafka`"),
        "{e}"
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let errors = table("routes:\n  - name: r\n    mqtt: { filter: 'a/#/b' }\n    kafka: { topic: 'x y' }\n  - name: s\n    mqtt: { filter: 'a', regex: '(' }\n    kafka: { topic: t }\n").unwrap_err();
    assert_eq!(errors.0.len(), 3, "{errors}");
}

#[test]
fn large_tables_use_the_index_and_keep_precedence() {
    // More routes than the linear-scan limit, with overlaps: the first in
    // file order must still win, `#` must match its parent level, and a
    // declining regex must fall through to the next candidate.
    let mut yaml = String::from("routes:\n");
    yaml.push_str("  - name: regex\n    mqtt: { filter: 'x/#', regex: '^x/keep/' }\n    format: raw\n    kafka: { topic: via-regex }\n");
    for i in 0..30 {
        yaml.push_str(&format!("  - name: r{i}\n    mqtt: {{ filter: 'x/n{i}/{{unit}}' }}\n    format: raw\n    kafka: {{ topic: t{i}, key: '{{unit}}' }}\n"));
    }
    yaml.push_str("  - name: wide\n    mqtt: { filter: 'x/#' }\n    format: raw\n    kafka: { topic: wide }\n");
    let t = table(&yaml).unwrap();
    assert!(t.routes().len() > LINEAR_SCAN_MAX);
    let r = forward(t.route(&MqttMessage::new("x/n29/u1", "v")));
    assert_eq!((r.topic.as_str(), r.key.as_deref()), ("t29", Some("u1")));
    assert_eq!(
        forward(t.route(&MqttMessage::new("x/keep/a", "v"))).topic,
        "via-regex"
    );
    assert_eq!(
        forward(t.route(&MqttMessage::new("x/n3/u1/extra", "v"))).topic,
        "wide"
    );
    assert_eq!(forward(t.route(&MqttMessage::new("x", "v"))).topic, "wide");
    assert_eq!(
        t.route(&MqttMessage::new("y/n1/u1", "v")),
        Outcome::Unrouted
    );
}

#[test]
fn m2m_trees_stay_on_mqtt_whatever_matches_and_overlaps_are_warned() {
    let t = table(
        "m2m: ['site/+/hvac/+/cmd/#']\nroutes:\n  - name: everything\n    mqtt: { filter: 'site/#' }\n    format: raw\n    kafka: { topic: all }\n",
    )
    .unwrap();
    for qos in [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce] {
        let mut m = MqttMessage::new("site/s1/hvac/u1/cmd/setpoint", "{}");
        m.qos = qos;
        assert_eq!(t.route(&m), Outcome::KeptOnMqtt);
    }
    assert_eq!(
        forward(t.route(&MqttMessage::new("site/s1/hvac/u1/telemetry", "{}"))).topic,
        "all"
    );
    assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
    assert!(
        t.warnings[0].contains(
            "route `everything` (site/#) overlaps the M2M tree site/+/hvac/+/cmd/# declared at"
        ),
        "{}",
        t.warnings[0]
    );
    assert_eq!(
        t.m2m_trees().next().unwrap().1.rsplit(':').next(),
        Some("1")
    );
}

#[test]
fn config_error_bad_m2m_filter() {
    let e = error_text("m2m: ['a/#/b']\nroutes: []\n");
    assert!(
        e.contains("m.yaml:1:7: m2m[0]: `#` must be the last level"),
        "{e}"
    );
}

// ---- Hostile input (issue 13) ----

const STAMPED: &str = r#"
routes:
  - name: r
    mqtt: { filter: "d/{dev}" }
    kafka: { topic: t, key: "{dev}", timestamp: /ts, headers: { schema: "v1" } }
"#;

#[test]
fn timestamps_outside_the_window_are_refused_before_kafka() {
    let t = table(STAMPED).unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let at = |ts: i64| {
        let mut m = MqttMessage::new("d/x", format!(r#"{{"ts": {ts}}}"#));
        m.received_at = chrono::DateTime::from_timestamp_millis(now).unwrap();
        t.route(&m)
    };
    assert_eq!(forward(at(now + 3_500_000)).timestamp_ms, now + 3_500_000);
    for ts in [now + 2 * 3_600_000, -1, i64::MAX] {
        let (record, rej) = rejection(at(ts));
        assert_eq!(rej.reason, RejectReason::Timestamp, "{ts}");
        assert_eq!(rej.path.as_deref(), Some("/ts"));
        assert_eq!(record.topic, "dlq");
    }
    // Huge floats saturate rather than wrap.
    let (_, rej) = rejection(t.route(&MqttMessage::new("d/x", r#"{"ts": 1e300}"#)));
    assert_eq!(rej.reason, RejectReason::Timestamp);
}

#[test]
fn configured_headers_win_over_device_properties_in_any_case() {
    let t = table(STAMPED).unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let mut m = MqttMessage::new("d/x", format!(r#"{{"ts": {now}}}"#));
    m.user_properties = vec![
        ("schema".into(), "forged".into()),
        ("SCHEMA".into(), "forged".into()),
        ("Bridge.route".into(), "forged".into()),
        ("MQTT.TOPIC".into(), "forged".into()),
        ("fw".into(), "1.2".into()),
    ];
    let r = forward(t.route(&m));
    let names: Vec<_> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["mqtt.topic", "fw", "schema"]);
    assert_eq!(r.header("schema"), Some(&b"v1"[..]));
    assert_eq!(r.header("mqtt.topic"), Some(&b"d/x"[..]));
}

#[test]
fn reserved_names_cannot_be_configured_headers() {
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a/+' }\n    kafka: { topic: t, headers: { Bridge.Route: x } }\n");
    assert!(e.contains("header name the bridge writes itself"), "{e}");
}

#[test]
fn user_property_bombs_are_too_large_and_not_copied() {
    let t = table(HVAC).unwrap();
    let mut m = MqttMessage::new("site/s1/hvac/u7/telemetry", "{}");
    m.user_properties = (0..10_000)
        .map(|i| (format!("p{i}"), "x".repeat(100)))
        .collect();
    let (record, rej) = rejection(t.route(&m));
    assert_eq!(rej.reason, RejectReason::TooLarge);
    assert!(
        rej.detail.contains("10000 user properties"),
        "{}",
        rej.detail
    );
    let bytes: usize = record.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(
        bytes < 16 * 1024,
        "dead-letter headers are bounded: {bytes}"
    );
    // Few but large properties count against the byte limit...
    m.user_properties = vec![("big".into(), "x".repeat(9000))];
    let (_, rej) = rejection(t.route(&m));
    assert!(
        rej.detail.contains("user properties of 9003 bytes"),
        "{}",
        rej.detail
    );
    // ...and towards the message size.
    let t = table("routes:\n  - name: r\n    mqtt: { filter: 'a/+' }\n    max_payload_bytes: 100\n    kafka: { topic: t }\n").unwrap();
    let mut m = MqttMessage::new("a/b", "1");
    m.user_properties = vec![("k".into(), "v".repeat(200))];
    let (_, rej) = rejection(t.route(&m));
    assert!(
        rej.detail.starts_with("message is 205 bytes"),
        "{}",
        rej.detail
    );
}

#[test]
fn dead_letters_keep_a_bounded_prefix_with_size_and_digest() {
    let t = table("routes:\n  - name: r\n    mqtt: { filter: 'a/+' }\n    max_payload_bytes: 100\n    kafka: { topic: t }\n").unwrap();
    let payload = vec![b'x'; 400 * 1024];
    let (record, _) = rejection(t.route(&MqttMessage::new("a/b", payload.clone())));
    assert_eq!(record.value.len(), 256 * 1024);
    assert_eq!(record.header("bridge.original.size"), Some(&b"409600"[..]));
    assert_eq!(
        record.header("bridge.original.sha256").unwrap(),
        crate::route::reject::sha256_hex(&payload).as_bytes()
    );
}

#[test]
fn schema_failures_do_not_copy_the_value_into_headers() {
    let schema = r#"{"type": "object", "properties": {"a": {"type": "string"}}}"#;
    let t = table_with_files(
        "routes:\n  - name: r\n    mqtt: { filter: 'a/+' }\n    schema: s.json\n    kafka: { topic: t }\n",
        &[("s.json", schema)],
    )
    .unwrap();
    let payload = format!(r#"{{"a": [{}1]}}"#, "1,".repeat(50_000));
    let (record, rej) = rejection(t.route(&MqttMessage::new("a/b", payload)));
    assert_eq!(rej.reason, RejectReason::Schema);
    assert!(record.header("bridge.error.detail").unwrap().len() <= 1024);
}

#[test]
fn duplicate_json_keys_are_refused() {
    let t = table("routes:\n  - name: r\n    mqtt: { filter: 'a/+' }\n    kafka: { topic: t }\n")
        .unwrap();
    let (_, rej) = rejection(t.route(&MqttMessage::new("a/b", r#"{"seq":1,"seq":2}"#)));
    assert_eq!(rej.reason, RejectReason::Parse);
    assert!(rej.detail.contains("duplicate key `seq`"), "{}", rej.detail);
}

#[test]
fn templated_kafka_topics_stay_out_of_the_bridge_topics() {
    let t =
        table("routes:\n  - name: r\n    mqtt: { filter: 'a/{x}' }\n    kafka: { topic: '{x}' }\n")
            .unwrap();
    for bad in [
        "mqtt-bridge.state",
        "dlq",
        "__consumer_offsets",
        "__transaction_state",
    ] {
        let (record, rej) = rejection(t.route(&MqttMessage::new(format!("a/{bad}"), "1")));
        assert_eq!(rej.reason, RejectReason::Topic, "{bad}");
        assert_eq!(record.topic, "dlq");
    }
    assert_eq!(forward(t.route(&MqttMessage::new("a/ok", "1"))).topic, "ok");
    let t = table("routes:\n  - name: r\n    mqtt: { filter: 'a/{x}' }\n    kafka: { topic: 'in.{x}', allowed_topics: ['in.s?'] }\n").unwrap();
    assert_eq!(
        forward(t.route(&MqttMessage::new("a/s1", "1"))).topic,
        "in.s1"
    );
    let (_, rej) = rejection(t.route(&MqttMessage::new("a/s10", "1")));
    assert!(rej.detail.contains("allowed_topics"), "{}", rej.detail);
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a/+' }\n    kafka: { topic: mqtt-bridge.state }\n");
    assert!(e.contains("state topic"), "{e}");
    let e = error_text("routes:\n  - name: r\n    mqtt: { filter: 'a/+' }\n    kafka: { topic: t, allowed_topics: [u] }\n");
    assert!(e.contains("does not allow the route's own topic"), "{e}");
}

#[test]
fn relay_topics_take_one_level_per_placeholder() {
    let t = table("routes:\n  - name: r\n    mqtt: { filter: 'in/+' }\n    publish: { topic: 'out/{/room}/set' }\n").unwrap();
    let publish = |payload: &str| t.route(&MqttMessage::new("in/x", payload.to_string()));
    match publish(r#"{"room": "r1"}"#) {
        Outcome::Relay { publish, .. } => assert_eq!(publish.topic, "out/r1/set"),
        other => panic!("{other:?}"),
    }
    for room in ["a/b", "+", "#", "$SYS", "", r"a\u0000b"] {
        let (_, rej) = rejection(publish(&format!(r#"{{"room": "{room}"}}"#)));
        assert_eq!(rej.reason, RejectReason::Topic, "{room:?}");
        assert!(
            rej.detail.contains("not one MQTT topic level"),
            "{}",
            rej.detail
        );
    }
}

#[test]
fn defective_messages_are_dead_lettered_whatever_the_route() {
    let t = table(HVAC).unwrap();
    let mut m = MqttMessage::new("site/s1/hvac/u7/telemetry", "");
    m.defect = Some(Defect::TooLarge {
        packet_bytes: 70_000_000,
        payload_bytes: 69_999_000,
        sha256: [7; 32],
    });
    let (record, rej) = rejection(t.route(&m));
    assert_eq!(rej.reason, RejectReason::TooLarge);
    assert_eq!(
        record.header("bridge.original.size"),
        Some(&b"69999000"[..])
    );
    assert_eq!(
        record.header("bridge.original.sha256"),
        Some("07".repeat(32).as_bytes())
    );
    let mut m = MqttMessage::new("site/s1/hvac/u7/telemetry", "");
    m.defect = Some(Defect::Malformed("PUBLISH properties past the packet"));
    let (_, rej) = rejection(t.route(&m));
    assert_eq!(rej.reason, RejectReason::Parse);
    assert!(rej.detail.contains("malformed"), "{}", rej.detail);
    let mut m = MqttMessage::new("no/route/\u{fffd}", "1");
    m.defect = Some(Defect::TopicNotUtf8);
    let (record, rej) = rejection(t.route(&m));
    assert_eq!(rej.reason, RejectReason::NotUtf8);
    assert_eq!(record.topic, "dlq");
}

#[test]
fn a_dollar_route_keeps_its_subscription_beside_a_catch_all() {
    let t = table(
        "routes:\n  - name: all\n    mqtt: { filter: '#' }\n    kafka: { topic: all }\n  - name: aws\n    mqtt: { filter: '$aws/things/+/shadow' }\n    kafka: { topic: aws }\n",
    )
    .unwrap();
    let filters: Vec<_> = t.subscriptions().into_iter().map(|s| s.filter).collect();
    assert_eq!(filters, ["#", "$aws/things/+/shadow"]);
    assert!(t.warnings.is_empty(), "not shadowed: {:?}", t.warnings);
    let r = forward(t.route(&MqttMessage::new("$aws/things/u1/shadow", "{}")));
    assert_eq!(r.topic, "aws");
}

/// A Sparkplug B route: births teach the aliases that later DATA needs,
/// and what cannot be decoded is dead-lettered with reason `sparkplug`.
/// Payloads by Eclipse Tahu's JavaScript library (`tests/sparkplug`).
#[test]
fn sparkplug_b_routes_decode_data_with_the_births_aliases() {
    let t = table(
        r#"
routes:
  - name: plant
    mqtt: { filter: "spBv1.0/#", qos: 1 }
    format: sparkplug_b
    kafka: { topic: plant.metrics }
"#,
    )
    .unwrap();
    let payload = crate::sparkplug::fixture;
    let mut sessions = crate::sparkplug::Sessions::default();
    let mut route = |topic: &str, name: &str| {
        t.route_with(&MqttMessage::new(topic, payload(name)), &mut sessions)
    };

    // DATA before its birth: dead-lettered, not dropped.
    let (_, rej) = rejection(route("spBv1.0/plant1/NDATA/edge7", "ndata"));
    assert_eq!(rej.reason, RejectReason::Sparkplug);
    assert!(rej.detail.contains("before its NBIRTH"), "{}", rej.detail);

    let birth = forward(route("spBv1.0/plant1/NBIRTH/edge7", "nbirth"));
    assert_eq!(birth.topic, "plant.metrics");
    // Keyed by the sender unless the route says otherwise.
    assert_eq!(birth.key.as_deref(), Some("plant1/edge7"));
    let data = forward(route("spBv1.0/plant1/NDATA/edge7", "ndata"));
    let value = json_of(&data);
    assert_eq!(value["message_type"], "NDATA");
    assert_eq!(value["metrics"][0]["name"], "press/count");
    assert_eq!(value["metrics"][0]["value"], -7);
    assert_eq!(
        t.routes()[0].key.as_deref(),
        Some("{/descriptor}"),
        "check shows the default key"
    );

    // A template that reads a metric gets the whole message to read.
    let t = table(
        r#"
routes:
  - name: plant
    mqtt: { filter: "spBv1.0/#", qos: 1 }
    format: sparkplug_b
    kafka: { topic: plant.metrics, key: "{/edge_node}.{/metrics/0/name}" }
"#,
    )
    .unwrap();
    let mut sessions = crate::sparkplug::Sessions::default();
    forward(t.route_with(
        &MqttMessage::new("spBv1.0/plant1/NBIRTH/edge7", payload("nbirth")),
        &mut sessions,
    ));
    let data = forward(t.route_with(
        &MqttMessage::new("spBv1.0/plant1/NDATA/edge7", payload("ndata")),
        &mut sessions,
    ));
    assert_eq!(data.key.as_deref(), Some("edge7.press/count"));
    assert_eq!(json_of(&data)["metrics"][1]["value"], 99.5);
}

/// `sparkplug.records: per_metric` makes one record per metric, each with
/// the message's fields; `sparkplug.online_topic` gets each birth's and
/// death's state, also when the message itself is dead-lettered.
#[test]
fn sparkplug_routes_split_per_metric_and_record_online_state() {
    let t = table(
        r#"
routes:
  - name: plant
    mqtt: { filter: "spBv1.0/#", qos: 1 }
    format: sparkplug_b
    sparkplug: { records: per_metric, online_topic: plant.online }
    kafka: { topic: plant.metrics, key: "{/descriptor}/{/metric/name}" }
"#,
    )
    .unwrap();
    let payload = crate::sparkplug::fixture;
    let mut sessions = crate::sparkplug::Sessions::default();
    let mut route = |topic: &str, name: &str| {
        t.route_with(&MqttMessage::new(topic, payload(name)), &mut sessions)
    };
    let Outcome::Forward { record, also, .. } = route("spBv1.0/plant1/NBIRTH/edge7", "nbirth")
    else {
        panic!("the birth is produced")
    };
    // Five metrics, then the node's online state.
    assert_eq!(also.len(), 5);
    assert_eq!(record.key.as_deref(), Some("plant1/edge7/bdSeq"));
    assert_eq!(json_of(&record)["metric"]["value"], 7);
    assert_eq!(json_of(&record)["message_type"], "NBIRTH");
    assert!(json_of(&record).get("metrics").is_none());
    assert_eq!(also[3].key.as_deref(), Some("plant1/edge7/press/label"));
    assert_eq!(also[3].topic, "plant.metrics");
    let online = &also[4];
    assert_eq!(online.topic, "plant.online");
    assert_eq!(online.key.as_deref(), Some("plant1/edge7"));
    assert_eq!(
        json_of(online),
        json!({"group": "plant1", "edge_node": "edge7", "descriptor": "plant1/edge7",
               "online": true, "message_type": "NBIRTH", "timestamp": 1_764_000_000_000u64,
               "bd_seq": 7})
    );

    let Outcome::Forward { record, also, .. } = route("spBv1.0/plant1/NDATA/edge7", "ndata") else {
        panic!("the data is produced")
    };
    assert_eq!(record.key.as_deref(), Some("plant1/edge7/press/count"));
    assert_eq!(also.len(), 1, "one more metric, no state change");
    assert_eq!(json_of(&also[0])["metric"]["value"], 99.5);

    route("spBv1.0/plant1/DBIRTH/edge7/press3", "dbirth");
    let Outcome::Forward { also, .. } = route("spBv1.0/plant1/NDEATH/edge7", "ndeath") else {
        panic!("the death is produced")
    };
    let offline: Vec<_> = also
        .iter()
        .filter(|r| r.topic == "plant.online")
        .map(|r| (r.key.clone().unwrap(), json_of(r)["online"].clone()))
        .collect();
    assert_eq!(
        offline,
        [
            ("plant1/edge7/press3".to_string(), json!(false)),
            ("plant1/edge7".to_string(), json!(false))
        ]
    );

    // A birth whose record cannot be made still changed the node's state:
    // the online record goes with the dead letter.
    let t = table(
        r#"
routes:
  - name: plant
    mqtt: { filter: "spBv1.0/#", qos: 1 }
    format: sparkplug_b
    sparkplug: { online_topic: plant.online }
    kafka: { topic: plant.metrics, key: "{/metrics/9/name}" }
"#,
    )
    .unwrap();
    let mut sessions = crate::sparkplug::Sessions::default();
    let Outcome::DeadLetter {
        rejection, also, ..
    } = t.route_with(
        &MqttMessage::new("spBv1.0/plant1/NBIRTH/edge7", payload("nbirth")),
        &mut sessions,
    )
    else {
        panic!("no key: dead-lettered")
    };
    assert_eq!(rejection.reason, RejectReason::Key);
    assert_eq!(also.len(), 1);
    assert_eq!(also[0].topic, "plant.online");
}

#[test]
fn config_error_sparkplug_options_out_of_place() {
    let text = error_text(
        r#"
routes:
  - name: j
    mqtt: { filter: "a/#" }
    sparkplug: { records: per_metric }
    kafka: { topic: t }
  - name: s
    mqtt: { filter: "spBv1.0/#" }
    format: sparkplug_b
    sparkplug: { online_topic: "bad topic" }
    kafka: { topic: t }
"#,
    );
    assert!(
        text.contains("sparkplug: is for `format: sparkplug_b` routes only"),
        "{text}"
    );
    assert!(
        text.contains("sparkplug.online_topic: `bad topic` is not a valid Kafka topic name"),
        "{text}"
    );
}

/// In a share group the bridge hears its own publishes: two relays that
/// feed each other would loop, and are refused; without a group, No Local
/// keeps them apart.
#[test]
fn relays_feeding_each_other_are_refused_in_a_share_group() {
    let mapping = r#"
routes:
  - name: ping
    mqtt: { filter: "a/{x}" }
    publish: { topic: "b/{x}" }
  - name: pong
    mqtt: { filter: "b/{x}" }
    publish: { topic: "a/{x}" }
"#;
    assert!(table(mapping).is_ok(), "no share group: No Local");
    let dir = tempfile::tempdir().unwrap();
    let source = MappingSource::parse(&dir.path().join("m.yaml"), mapping).unwrap();
    let bridge = BRIDGE.replace("client_id: c", "client_id: c, share_group: g");
    let config =
        Config::from_parts(&dir.path().join("bridge.yaml"), &bridge, vec![source]).unwrap();
    let text = RouteTable::compile(&config).unwrap_err().to_string();
    assert!(
        text.contains("m.yaml:5:")
            && text.contains(
                "routes[0].publish.topic: relay `ping` publishes where relay `pong` listens"
            ),
        "{text}"
    );
}
