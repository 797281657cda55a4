//! Compiled command routes and what one record becomes.

use crate::config::{locate_all, Config, ConfigError, ConfigErrors};
use crate::mqtt::{MqttMessage, OutgoingPublish};
use crate::route::{is_valid_kafka_topic, RejectReason, Rejection};
use crate::route::{Context, Template};
use crate::schema::Schema;
use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;

/// One compiled command route.
#[derive(Debug)]
struct CommandRoute {
    name: String,
    schema: Option<Schema>,
    topic: Template,
    qos: u8,
    retain: bool,
    ttl_ms: Option<i64>,
    dead_letter_topic: String,
}

/// All command routes, by Kafka topic.
#[derive(Debug, Default)]
pub struct CommandTable {
    routes: Vec<CommandRoute>,
    by_topic: HashMap<String, usize>,
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
        let mut table = Self::default();
        let mut errors = Vec::new();
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
                if !is_valid_kafka_topic(&command.kafka.topic) {
                    error("kafka.topic", "is not a valid Kafka topic name".into());
                }
                if table.by_topic.contains_key(&command.kafka.topic) {
                    error(
                        "kafka.topic",
                        "is already read by another command route".into(),
                    );
                }
                if command.mqtt.qos > 2 {
                    error("mqtt.qos", "must be 0, 1 or 2".into());
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
                    Some(path) => Schema::load(&base.join(path))
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
                        qos: command.mqtt.qos,
                        retain: command.mqtt.retain,
                        ttl_ms: command.ttl_ms.map(|t| t as i64),
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

    /// The route name for a Kafka topic, for metrics and headers.
    pub fn route_name(&self, topic: &str) -> &str {
        self.by_topic
            .get(topic)
            .map_or("", |&i| self.routes[i].name.as_str())
    }

    /// Decides what one record becomes. `timestamp_ms` is the record's
    /// Kafka timestamp, `now_ms` the time it is handled.
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
            let age_ms = now_ms - ts;
            if age_ms > ttl {
                return Some(Prepared::Expired { age_ms });
            }
        }
        let Ok(key) = std::str::from_utf8(key.unwrap_or_default()) else {
            return Some(invalid(RejectReason::Key, "record key is not UTF-8".into()));
        };
        let parsed: serde_json::Value = match serde_json::from_slice(value) {
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
        let mqtt_topic = match route.topic.render(&ctx) {
            Ok(t) if !t.is_empty() && !t.contains(['+', '#']) => t,
            Ok(t) => {
                return Some(invalid(
                    RejectReason::Topic,
                    format!("`{t}` is not a topic to publish to"),
                ))
            }
            Err(e) => return Some(invalid(RejectReason::Topic, format!("topic: {e}"))),
        };
        Some(Prepared::Publish(OutgoingPublish {
            topic: mqtt_topic,
            payload: Bytes::copy_from_slice(value),
            qos: route.qos,
            retain: route.retain,
        }))
    }
}
