//! Property tests: arbitrary input never panics the parts that untrusted
//! data (and untrusted-looking configuration) reaches, and what they
//! produce from it stays within the documented bounds.
//!
//! The MQTT wire decoder has its own properties beside it
//! (`src/mqtt/wire.rs`), since it is not public.

use mqtt_kafka_bridge::config::{Config, MappingSource};
use mqtt_kafka_bridge::mqtt::MqttMessage;
use mqtt_kafka_bridge::route::{Context, Outcome, RouteTable, Template};
use proptest::prelude::*;
use std::path::Path;

const BRIDGE: &str = "mqtt: { host: h, client_id: c }\nkafka: { bootstrap_servers: b, transactional_id: t, dead_letter_topic: dlq }\nmappings: [x]\n";

/// Routes over every format and every kind of template data can reach.
const MAPPING: &str = r#"
m2m: [ "m/+/cmd/#" ]
routes:
  - name: json
    mqtt: { filter: "j/{a}/{b}" }
    transform:
      rename: { x: y }
      set: { a: "{a}", t: "{mqtt.received_at}", p: "{mqtt.user_properties.p}" }
    kafka:
      topic: "in.{a}"
      key: "{/id}"
      timestamp: /ts
      headers: { h: "{/h}" }
  - name: text
    mqtt: { filter: "t/{a}" }
    format: text
    text:
      pattern: 'T=(?P<t>-?[0-9.]+);N=(?P<n>[0-9]+);B=(?P<b>\w+)'
      fields: { t: float, n: integer, b: boolean }
    kafka: { topic: text.out, key: "{a}" }
  - name: raw
    mqtt: { filter: "r/#" }
    format: raw
    max_payload_bytes: 64
    kafka: { topic: raw.out, key: "{mqtt.topic}" }
  - name: relay
    mqtt: { filter: "relay/{room}" }
    publish: { topic: "out/{room}/{/zone}/set" }
"#;

/// Compiled once: compiling is not what is under test here.
static TABLE: std::sync::LazyLock<RouteTable> = std::sync::LazyLock::new(compile);

fn compile() -> RouteTable {
    let source = MappingSource::parse(Path::new("m.yaml"), MAPPING).unwrap();
    RouteTable::compile(&config(source)).unwrap()
}

/// [`BRIDGE`] with `mapping`, checked as a loaded file would be.
fn config(mapping: MappingSource) -> Config {
    Config::from_parts(Path::new("bridge.yaml"), BRIDGE, vec![mapping]).expect("BRIDGE is valid")
}

/// Topics that hit every route, with arbitrary levels.
fn topic() -> impl Strategy<Value = String> {
    let level = prop_oneof![
        "[a-z0-9]{0,6}",
        any::<String>(),
        Just("$SYS".to_string()),
        Just("+".to_string()),
        Just("a/b".to_string()),
        Just("__consumer_offsets".to_string()),
        Just("dlq".to_string()),
    ];
    let prefix = prop_oneof![
        Just("j"),
        Just("t"),
        Just("r"),
        Just("relay"),
        Just("m"),
        Just("x")
    ];
    (prefix, prop::collection::vec(level, 0..4)).prop_map(|(p, levels)| {
        std::iter::once(p.to_string())
            .chain(levels)
            .collect::<Vec<_>>()
            .join("/")
    })
}

/// JSON-ish payloads (some valid, some near-valid) and arbitrary bytes.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f}")),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("null".to_string()),
        Just("true".to_string()),
    ];
    let object = prop::collection::vec(
        (
            prop_oneof![
                Just("id"),
                Just("ts"),
                Just("h"),
                Just("x"),
                Just("zone"),
                Just("id")
            ],
            scalar,
        ),
        0..6,
    )
    .prop_map(|fields| {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect();
        format!("{{{}}}", body.join(", ")).into_bytes()
    });
    prop_oneof![
        object,
        prop::collection::vec(any::<u8>(), 0..300),
        "T=-?[0-9.]{1,5};N=[0-9]{1,25};B=(true|false|maybe)".prop_map(String::into_bytes),
    ]
}

fn message() -> impl Strategy<Value = MqttMessage> {
    (
        topic(),
        payload(),
        prop::collection::vec((any::<String>(), any::<String>()), 0..40),
        proptest::option::of(any::<String>()),
    )
        .prop_map(|(topic, payload, props, content_type)| {
            let mut m = MqttMessage::new(topic, payload);
            m.user_properties = props;
            m.content_type = content_type;
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn routing_never_panics_and_stays_in_bounds(m in message()) {
        match TABLE.route(&m) {
            Outcome::Forward { record, .. } => {
                prop_assert!(!record.topic.starts_with("__"));
                prop_assert!(record.topic != "dlq");
                prop_assert!(record.timestamp_ms >= 0);
            }
            Outcome::DeadLetter { record, .. } => {
                prop_assert_eq!(record.topic.as_str(), "dlq");
                prop_assert!(record.value.len() <= 256 * 1024);
                prop_assert!(record.header("bridge.original.sha256").is_some());
                prop_assert!(record.header("bridge.error.detail").unwrap().len() <= 1024);
                let props: usize = record
                    .headers
                    .iter()
                    .filter(|(k, _)| !k.starts_with("bridge.") && k != "mqtt.topic")
                    .map(|(k, v)| k.len() + v.len())
                    .sum();
                prop_assert!(props <= 8 * 1024);
            }
            Outcome::Relay { publish, .. } => {
                // Four levels, as the template says: data filled levels,
                // never added them.
                prop_assert_eq!(publish.topic.split('/').count(), 4, "{}", publish.topic);
                prop_assert!(!publish.topic.contains(['+', '#', '\0']));
            }
            Outcome::Unrouted | Outcome::KeptOnMqtt => {}
        }
    }

    #[test]
    fn templates_parse_anything_without_panicking(text in any::<String>()) {
        let _ = Template::parse(&text, &["a".to_string()], true);
    }

    #[test]
    fn mqtt_topics_from_data_keep_the_template_levels(
        a in any::<String>(),
        zone in any::<String>(),
    ) {
        let t = Template::parse("x/{a}/{/zone}/y", &["a".to_string()], true).unwrap();
        let m = MqttMessage::new("src", "");
        let value = serde_json::json!({ "zone": zone });
        let captures = [a.as_str()];
        let ctx = Context { captures: &captures, message: &m, value: Some(&value) };
        if let Ok(topic) = t.render_mqtt_topic(&ctx) {
            prop_assert_eq!(topic.split('/').count(), 4);
            prop_assert!(!topic.contains(['+', '#', '\0']));
            prop_assert!(topic.len() <= 65_535);
            prop_assert!(!a.starts_with('$') && !zone.starts_with('$'));
        }
    }

    #[test]
    fn mapping_files_never_panic_the_loader(text in any::<String>()) {
        if let Ok(source) = MappingSource::parse(Path::new("m.yaml"), &text) {
            let _ = RouteTable::compile(&config(source));
        }
    }

    #[test]
    fn near_valid_mapping_files_never_panic_the_loader(
        at in 0usize..MAPPING.len(),
        insert in "[ -~\n\t{}\\[\\]:'\"#-]{0,8}",
        cut in 0usize..20,
    ) {
        let mut text = MAPPING.to_string();
        let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let end = (at + cut).min(text.len());
        let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text.replace_range(at..end, &insert);
        if let Ok(source) = MappingSource::parse(Path::new("m.yaml"), &text) {
            let _ = RouteTable::compile(&config(source));
        }
    }

    #[test]
    fn bridge_files_never_panic_the_loader(text in any::<String>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bridge.yaml");
        std::fs::write(&path, text).unwrap();
        let _ = Config::load(&path);
    }
}
