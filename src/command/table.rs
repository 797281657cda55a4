//! Compiled command routes and what one record becomes.
//!
//! A command record is written by whoever may write the command topic, so
//! its key and value are untrusted: what they put into the MQTT topic fills
//! exactly one topic level (no `/`, `+`, `#`, U+0000, leading `$`), and a
//! topic that cannot be published is refused here, before the broker could
//! take it for a malformed packet.

use crate::config::{locate_all, Config, ConfigError, ConfigErrors};
use crate::kafka;
use crate::mqtt::{MqttMessage, OutgoingPublish, Qos};
use crate::route::reject::DeadLetterLimits;
use crate::route::schema::{Schema, Schemas};
use crate::route::{Context, Template};
use crate::route::{RejectReason, Rejection};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;

/// One compiled command route.
#[derive(Debug)]
struct CommandRoute {
    name: String,
    schema: Option<Schema>,
    topic: Template,
    /// The template as written, for rejection details.
    topic_text: String,
    qos: Qos,
    retain: bool,
    ttl_ms: Option<i64>,
    dead_letter_topic: String,
}

/// All command routes, by Kafka topic.
#[derive(Debug, Default)]
pub struct CommandTable {
    routes: Vec<CommandRoute>,
    by_topic: HashMap<String, usize>,
    /// How much of a rejected record its dead-letter record carries.
    dead_letter_limits: DeadLetterLimits,
}

/// What one command record becomes.
#[derive(Debug, PartialEq)]
pub enum Prepared {
    Publish(OutgoingPublish),
    /// Older than the route's `ttl_ms`: not delivered.
    Expired {
        age_ms: i64,
    },
    /// Goes to `topic` (the dead-letter topic) with the reason.
    Invalid {
        topic: String,
        rejection: Rejection,
    },
}

impl CommandTable {
    /// Compiles the `commands:` of every mapping file, reporting every
    /// problem with file, line and field.
    pub fn compile(config: &Config) -> Result<Self, ConfigErrors> {
        let limits = &config.bridge.limits;
        let mut table = Self {
            dead_letter_limits: DeadLetterLimits {
                max_payload_bytes: limits.dead_letter_max_payload_bytes,
                max_user_property_bytes: limits.max_user_property_bytes,
            },
            ..Self::default()
        };
        let mut errors = Vec::new();
        let mut schemas = Schemas::default();
        for source in &config.mappings {
            let base = source.path.parent().unwrap_or(Path::new("."));
            let mut file_errors = Vec::new();
            for (index, command) in source.file.commands.iter().enumerate() {
                let field = |f: &str| format!("commands[{index}].{f}");
                let mut error = |f: &str, m: String| {
                    file_errors.push(ConfigError::field(&source.path, field(f), m))
                };
                if table.routes.iter().any(|r| r.name == command.name) {
                    error(
                        "name",
                        format!("command route `{}` is defined twice", command.name),
                    );
                }
                if !kafka::is_valid_topic_name(&command.kafka.topic) {
                    error("kafka.topic", "is not a valid Kafka topic name".into());
                }
                if table.by_topic.contains_key(&command.kafka.topic) {
                    error(
                        "kafka.topic",
                        "is already read by another command route".into(),
                    );
                }
                if command.mqtt.topic.contains(['+', '#']) {
                    error(
                        "mqtt.topic",
                        "a topic to publish to cannot hold `+` or `#`".into(),
                    );
                }
                let topic = Template::parse(&command.mqtt.topic, &["key".to_string()], true)
                    .map_err(|e| error("mqtt.topic", e))
                    .ok();
                let schema = match &command.schema {
                    Some(path) => schemas
                        .load(&base.join(path))
                        .map_err(|e| error("schema", e))
                        .ok()
                        .map(Some),
                    None => Some(None),
                };
                if let (Some(topic), Some(schema)) = (topic, schema) {
                    table
                        .by_topic
                        .insert(command.kafka.topic.clone(), table.routes.len());
                    table.routes.push(CommandRoute {
                        name: command.name.clone(),
                        schema,
                        topic,
                        topic_text: command.mqtt.topic.clone(),
                        qos: command.mqtt.qos,
                        retain: command.mqtt.retain,
                        // Beyond i64 is no limit at all.
                        ttl_ms: command.ttl_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                        dead_letter_topic: command
                            .kafka
                            .dead_letter_topic
                            .clone()
                            .unwrap_or_else(|| config.bridge.kafka.dead_letter_topic.clone()),
                    });
                }
            }
            locate_all(&source.text, &mut file_errors);
            errors.extend(file_errors);
        }
        // Partitioned members have identities of their own and no common
        // name to default a shared consumer group to.
        if config.bridge.partition.is_some()
            && config.bridge.kafka.command_group.is_none()
            && !table.routes.is_empty()
        {
            errors.push(ConfigError::field(
                &config.path,
                "kafka.command_group",
                "must be set with `partition` and command routes: one consumer group for every member (each in a group of its own would deliver every command once per member)",
            ));
        }
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The Kafka topics to consume.
    pub fn topics(&self) -> Vec<&str> {
        self.by_topic.keys().map(String::as_str).collect()
    }

    /// The topics to consume, sorted: to compare two tables.
    pub fn topics_sorted(&self) -> Vec<&str> {
        let mut topics = self.topics();
        topics.sort_unstable();
        topics
    }

    /// Whether a route reads `topic`.
    pub fn reads(&self, topic: &str) -> bool {
        self.by_topic.contains_key(topic)
    }

    /// The route name for a Kafka topic, for metrics and headers.
    pub fn route_name(&self, topic: &str) -> &str {
        self.by_topic
            .get(topic)
            .map_or("", |&i| self.routes[i].name.as_str())
    }

    /// Where the route reading a Kafka topic dead-letters its records.
    pub fn dead_letter_topic(&self, topic: &str) -> Option<&str> {
        self.by_topic
            .get(topic)
            .map(|&i| self.routes[i].dead_letter_topic.as_str())
    }

    /// How much of a rejected record its dead-letter record carries (from
    /// `limits`).
    pub fn dead_letter_limits(&self) -> &DeadLetterLimits {
        &self.dead_letter_limits
    }

    /// Decides what one record becomes. `timestamp_ms` is the record's
    /// Kafka timestamp, `now_ms` the time it is handled; a timestamp ahead
    /// of `now_ms` counts as age 0.
    pub fn prepare(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        timestamp_ms: Option<i64>,
        now_ms: i64,
    ) -> Option<Prepared> {
        let route = &self.routes[*self.by_topic.get(topic)?];
        let invalid = |reason, detail: String| Prepared::Invalid {
            topic: route.dead_letter_topic.clone(),
            rejection: Rejection::new(reason, detail),
        };
        if let (Some(ttl), Some(ts)) = (route.ttl_ms, timestamp_ms) {
            let age_ms = now_ms.saturating_sub(ts).max(0);
            if age_ms > ttl {
                return Some(Prepared::Expired { age_ms });
            }
        }
        let Ok(key) = std::str::from_utf8(key.unwrap_or_default()) else {
            return Some(invalid(RejectReason::Key, "record key is not UTF-8".into()));
        };
        let parsed: serde_json::Value = match crate::route::strict_json::from_slice(value) {
            Ok(v) => v,
            Err(e) => {
                return Some(invalid(
                    RejectReason::Parse,
                    format!("value is not JSON: {e}"),
                ))
            }
        };
        if let Some(schema) = &route.schema {
            if let Err(rejection) = schema.validate(&parsed) {
                return Some(Prepared::Invalid {
                    topic: route.dead_letter_topic.clone(),
                    rejection,
                });
            }
        }
        // Templates render against an MQTT message; a command has none, so
        // a stand-in carries the Kafka topic.
        let stand_in = MqttMessage::new(topic, Bytes::new());
        let captures = [key];
        let ctx = Context {
            captures: &captures,
            message: &stand_in,
            value: Some(&parsed),
        };
        let mqtt_topic = match route.topic.render_mqtt_topic(&ctx) {
            Ok(t) => t,
            Err(e) => {
                // The template's only capture is the record key.
                let e = e.to_string().replace("{capture #0}", "{key}");
                return Some(invalid(
                    RejectReason::Topic,
                    format!("MQTT topic `{}`: {e}", route.topic_text),
                ));
            }
        };
        Some(Prepared::Publish(OutgoingPublish {
            topic: mqtt_topic,
            payload: Bytes::copy_from_slice(value),
            qos: route.qos,
            retain: route.retain,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MappingSource;

    const BRIDGE: &str = "mqtt: { host: h, client_id: c }\nkafka: { bootstrap_servers: b, transactional_id: t, dead_letter_topic: dlq }\nmappings: [x]\nlimits: { dead_letter_max_payload_bytes: 1000 }\n";

    const MAPPING: &str = r#"
commands:
  - name: setpoint
    kafka: { topic: cmds, dead_letter_topic: cmds.dlq }
    mqtt: { topic: "site/{/site}/hvac/{key}/cmd/setpoint", qos: 1 }
    ttl_ms: 60000
  - name: forever
    kafka: { topic: forever }
    mqtt: { topic: "dev/{key}/cmd" }
    ttl_ms: 18446744073709551615
"#;

    const NOW: i64 = 1_700_000_000_000;

    fn table() -> CommandTable {
        let dir = tempfile::tempdir().unwrap();
        let source = MappingSource::parse(&dir.path().join("m.yaml"), MAPPING).unwrap();
        let config =
            Config::from_parts(&dir.path().join("bridge.yaml"), BRIDGE, vec![source]).unwrap();
        CommandTable::compile(&config).unwrap()
    }

    /// Several bridges on one tree must share one command consumer group,
    /// or each would deliver every command: a share group gets
    /// `<group>.commands` by default; partitioned bridges must name one.
    #[test]
    fn several_bridges_consume_commands_in_one_group() {
        let dir = tempfile::tempdir().unwrap();
        let config = |bridge: &str| {
            let source = MappingSource::parse(&dir.path().join("m.yaml"), MAPPING).unwrap();
            Config::from_parts(&dir.path().join("bridge.yaml"), bridge, vec![source]).unwrap()
        };
        let shared = config(&BRIDGE.replace("client_id: c", "client_id: c, share_group: g"));
        assert_eq!(
            shared.bridge.kafka.command_group.as_deref(),
            Some("g.commands")
        );
        let partitioned = format!("{BRIDGE}partition: {{ instances: 2, instance: 0 }}\n");
        let error = CommandTable::compile(&config(&partitioned))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("kafka.command_group: must be set with `partition` and command routes"),
            "{error}"
        );
        let named = partitioned.replace(
            "dead_letter_topic: dlq",
            "dead_letter_topic: dlq, command_group: cmds.g",
        );
        assert!(CommandTable::compile(&config(&named)).is_ok());
    }

    fn prepare(key: &[u8], value: &str) -> Prepared {
        table()
            .prepare("cmds", Some(key), value.as_bytes(), Some(NOW), NOW)
            .expect("a command topic")
    }

    /// The rejection of an invalid command, checking it goes to the
    /// route's dead-letter topic.
    fn invalid(prepared: Prepared) -> Rejection {
        match prepared {
            Prepared::Invalid { topic, rejection } => {
                assert_eq!(topic, "cmds.dlq");
                rejection
            }
            other => panic!("not invalid: {other:?}"),
        }
    }

    #[test]
    fn a_valid_command_renders_its_topic() {
        match prepare(b"u7", r#"{"site":"s1"}"#) {
            Prepared::Publish(p) => {
                assert_eq!(p.topic, "site/s1/hvac/u7/cmd/setpoint");
                assert_eq!(&p.payload[..], br#"{"site":"s1"}"#);
                assert_eq!(p.qos, Qos::AtLeastOnce);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_that_is_not_one_topic_level_is_refused() {
        for (key, why) in [
            (&b"u1/../../other"[..], "holds `/`"),
            (b"u1\0", "U+0000"),
            (b"u+", "wildcard"),
            (b"#", "wildcard"),
            (b"$SYS", "starts with `$`"),
            (b"", "empty"),
        ] {
            let rejection = invalid(prepare(key, r#"{"site":"s1"}"#));
            assert_eq!(rejection.reason, RejectReason::Topic, "{key:?}");
            assert!(
                rejection.detail.contains(why),
                "{key:?}: {}",
                rejection.detail
            );
            assert!(rejection.detail.contains("{key}"), "{}", rejection.detail);
        }
    }

    #[test]
    fn a_pointer_value_that_is_not_one_topic_level_is_refused() {
        for site in ["s1/x", "s\u{0}", "+", "$share"] {
            let value = serde_json::json!({ "site": site }).to_string();
            let rejection = invalid(prepare(b"u1", &value));
            assert_eq!(rejection.reason, RejectReason::Topic, "{site:?}");
            assert!(rejection.detail.contains("{/site}"), "{}", rejection.detail);
        }
    }

    #[test]
    fn a_topic_too_long_for_mqtt_is_refused() {
        let key = "k".repeat(70_000);
        let rejection = invalid(prepare(key.as_bytes(), r#"{"site":"s1"}"#));
        assert_eq!(rejection.reason, RejectReason::Topic);
        assert!(rejection.detail.contains("65535"), "{}", rejection.detail);
    }

    #[test]
    fn duplicate_json_keys_are_refused() {
        let rejection = invalid(prepare(b"u1", r#"{"site":"s1","site":"s2"}"#));
        assert_eq!(rejection.reason, RejectReason::Parse);
        assert!(
            rejection.detail.contains("duplicate key `site`"),
            "{}",
            rejection.detail
        );
    }

    #[test]
    fn a_key_that_is_not_utf8_is_refused() {
        let rejection = invalid(prepare(&[0xff, b'u'], r#"{"site":"s1"}"#));
        assert_eq!(rejection.reason, RejectReason::Key);
    }

    #[test]
    fn ttl_arithmetic_saturates() {
        let t = table();
        let value = br#"{"site":"s1"}"#;
        let prepare = |topic, ts, now| t.prepare(topic, Some(b"u1"), value, Some(ts), now);
        // From the future: age 0, delivered.
        assert!(matches!(
            prepare("cmds", NOW + 3_600_000, NOW),
            Some(Prepared::Publish(_))
        ));
        assert!(matches!(
            prepare("cmds", i64::MAX, i64::MIN),
            Some(Prepared::Publish(_))
        ));
        // Older than the TTL: expired, with its age.
        assert_eq!(
            prepare("cmds", NOW - 60_001, NOW),
            Some(Prepared::Expired { age_ms: 60_001 })
        );
        // An age beyond i64: the most there is, no overflow.
        assert_eq!(
            prepare("cmds", i64::MIN, i64::MAX),
            Some(Prepared::Expired { age_ms: i64::MAX })
        );
        // A TTL beyond i64 is no limit (it does not wrap to negative).
        assert!(matches!(
            prepare("forever", 0, NOW),
            Some(Prepared::Publish(_))
        ));
    }

    #[test]
    fn dead_letter_settings_come_from_the_config() {
        let t = table();
        assert_eq!(t.dead_letter_topic("cmds"), Some("cmds.dlq"));
        assert_eq!(t.dead_letter_topic("forever"), Some("dlq"));
        assert_eq!(t.dead_letter_topic("other"), None);
        assert_eq!(t.dead_letter_limits().max_payload_bytes, 1000);
    }
}
