//! Bridge configurations for tests, built from the rig they run against.
//!
//! Every config goes through the checks a user's file gets: in-process
//! through `Config::from_parts`, as files through the binary's own
//! `Config::load`. So no test runs a config a user could not load.

use super::{repo_path, Topics};
use mqtt_kafka_bridge::config::{Config, MappingSource};
use serde_yaml_ng::{Mapping, Value};
use std::path::{Path, PathBuf};

/// The environment variable a bridge file written by
/// [`ConfigBuilder::write`] takes its metrics port from, so that each
/// start of the binary can get a fresh port (see `process::BridgeProcess`).
pub const METRICS_PORT_ENV: &str = "BRIDGE_TEST_METRICS_PORT";

/// A bridge configuration for one test: its broker, its Kafka, its topics,
/// and `mappings/hvac.yaml` unless told otherwise.
///
/// Defaults suit tests: a 5 s keep-alive and 100 ms reconnect delay so
/// broker faults are noticed quickly, commits every 50 ms, a 3 s shutdown
/// bound, and a fresh client id (also the transactional id).
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    bridge: Mapping,
    mapping: String,
    topics: Topics,
}

impl ConfigBuilder {
    pub fn new(mqtt_port: u16, bootstrap: &str, topics: &Topics) -> Self {
        let text = format!(
            "mqtt:\n  host: 127.0.0.1\n  port: {mqtt_port}\n  keep_alive_s: 5\n  reconnect_delay_ms: 100\n\
             kafka:\n  bootstrap_servers: '{bootstrap}'\n  dead_letter_topic: '{dlq}'\n\
             delivery:\n  batch_max_messages: 500\n  commit_interval_ms: 50\n  shutdown_timeout_ms: 3000\n",
            dlq = topics.dead_letter()
        );
        let bridge = serde_yaml_ng::from_str(&text).expect("the default test bridge YAML");
        let hvac =
            std::fs::read_to_string(repo_path("mappings/hvac.yaml")).expect("read hvac.yaml");
        Self {
            bridge,
            mapping: hvac,
            topics: topics.clone(),
        }
        .client_id(&super::unique("bridge"))
    }

    /// The MQTT client id, also the Kafka transactional id: one bridge
    /// identity. Two configs with one id are one bridge run twice.
    pub fn client_id(self, id: &str) -> Self {
        self.mqtt("client_id", id).kafka("transactional_id", id)
    }

    /// The mapping file's text instead of `mappings/hvac.yaml`. Its Kafka
    /// topics (`kafka.topic` and `kafka.dead_letter_topic` of routes and
    /// commands) are renamed into the test's, as hvac.yaml's are: write
    /// `hvac.telemetry`, get `<prefix>hvac.telemetry` ([`Topics::named`]).
    pub fn mapping_text(mut self, text: &str) -> Self {
        self.mapping = text.to_string();
        self
    }

    /// Sets `mqtt.<key>`, e.g. `.mqtt("protocol", "v311")`.
    pub fn mqtt(self, key: &str, value: impl Into<Value>) -> Self {
        self.set("mqtt", key, value)
    }

    /// Sets `kafka.<key>`.
    pub fn kafka(self, key: &str, value: impl Into<Value>) -> Self {
        self.set("kafka", key, value)
    }

    /// Sets a librdkafka property (`kafka.properties`), e.g.
    /// `message.max.bytes`, whose dots a `section.key` path would split.
    pub fn kafka_property(self, name: &str, value: &str) -> Self {
        let mut properties = match self.section("kafka").get("properties") {
            Some(Value::Mapping(map)) => map.clone(),
            _ => Mapping::new(),
        };
        properties.insert(name.into(), value.into());
        self.kafka("properties", properties)
    }

    /// Sets `delivery.<key>`, e.g. `.delivery("commit_timeout_ms", 1500)`.
    pub fn delivery(self, key: &str, value: impl Into<Value>) -> Self {
        self.set("delivery", key, value)
    }

    /// Sets `metrics.<key>` (the listener itself is set by [`Self::write`]).
    pub fn metrics(self, key: &str, value: impl Into<Value>) -> Self {
        self.set("metrics", key, value)
    }

    /// Sets `<section>.<key>` of the bridge file, for sections without a
    /// setter of their own (`ha`).
    pub fn set_section(self, section: &str, key: &str, value: impl Into<Value>) -> Self {
        self.set(section, key, value)
    }

    /// Sets `partition`: this bridge is slot `instance` of `instances`.
    pub fn partition(self, instances: u32, instance: u32) -> Self {
        self.set("partition", "instances", instances)
            .set("partition", "instance", instance)
    }

    /// Sets `schema_registry.<key>`.
    pub fn schema_registry(self, key: &str, value: impl Into<Value>) -> Self {
        self.set("schema_registry", key, value)
    }

    /// Sets `limits.<key>`.
    pub fn limits(self, key: &str, value: impl Into<Value>) -> Self {
        self.set("limits", key, value)
    }

    /// The config for `app::run`, checked as `Config::load` checks a file.
    /// The mapping is parsed as if it were `mappings/hvac.yaml`, so that
    /// its relative schema paths resolve.
    pub fn build(&self) -> Config {
        let path = repo_path("mappings/hvac.yaml");
        let mapping = MappingSource::parse(&path, &self.mapping_yaml(false))
            .unwrap_or_else(|e| panic!("test mapping: {e}"));
        let bridge = self.bridge_yaml(Value::Sequence(vec!["unused".into()]));
        Config::from_parts(&repo_path("tests/bridge.yaml"), &bridge, vec![mapping])
            .unwrap_or_else(|e| panic!("test config: {e}\n{bridge}"))
    }

    /// Writes `bridge.yaml` and `mapping.yaml` into `dir` for the binary
    /// and returns the bridge file's path. The bridge file serves metrics
    /// on the port in [`METRICS_PORT_ENV`]; the mapping's schema and
    /// `.proto` paths are made absolute, since `dir` has neither.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let listen = format!("127.0.0.1:${{{METRICS_PORT_ENV}}}");
        let bridge = self
            .clone()
            .set("metrics", "listen", listen)
            .bridge_yaml(Value::Sequence(vec!["mapping.yaml".into()]));
        let mapping = self.mapping_yaml(true);
        std::fs::write(dir.join("mapping.yaml"), mapping).expect("write mapping.yaml");
        let path = dir.join("bridge.yaml");
        std::fs::write(&path, bridge).expect("write bridge.yaml");
        path
    }

    fn section(&self, name: &str) -> Mapping {
        match self.bridge.get(name) {
            Some(Value::Mapping(map)) => map.clone(),
            _ => Mapping::new(),
        }
    }

    fn set(mut self, section: &str, key: &str, value: impl Into<Value>) -> Self {
        let mut map = self.section(section);
        map.insert(key.into(), value.into());
        self.bridge.insert(section.into(), Value::Mapping(map));
        self
    }

    fn bridge_yaml(&self, mappings: Value) -> String {
        let mut bridge = self.bridge.clone();
        bridge.insert("mappings".into(), mappings);
        serde_yaml_ng::to_string(&bridge).expect("serialise the bridge YAML")
    }

    /// The mapping with its Kafka topics renamed into the test's, edited
    /// as YAML rather than as text, so that no other `topic:` (an MQTT
    /// one, a template) is touched by accident.
    fn mapping_yaml(&self, absolute_schemas: bool) -> String {
        let mut mapping: Value =
            serde_yaml_ng::from_str(&self.mapping).expect("the test mapping is YAML");
        for entry in entries(&mut mapping) {
            if let Some(kafka) = entry.get_mut("kafka") {
                for field in ["topic", "dead_letter_topic"] {
                    if let Some(Value::String(topic)) = kafka.get_mut(field) {
                        *topic = self.topics.named(topic);
                    }
                }
            }
            if let Some(Value::String(topic)) = entry
                .get_mut("sparkplug")
                .and_then(|s| s.get_mut("online_topic"))
            {
                *topic = self.topics.named(topic);
            }
            if let (true, Some(Value::String(schema))) = (absolute_schemas, entry.get_mut("schema"))
            {
                *schema = repo_path("mappings").join(&*schema).display().to_string();
            }
            for (section, field) in [("protobuf", "file"), ("kafka", "encoding")] {
                let file = entry.get_mut(section).and_then(|s| s.get_mut(field));
                // `kafka.encoding.schema` is one level further down.
                let file = match (section, file) {
                    ("kafka", Some(encoding)) => encoding.get_mut("schema"),
                    (_, file) => file,
                };
                if let (true, Some(Value::String(path))) = (absolute_schemas, file) {
                    *path = repo_path("mappings").join(&*path).display().to_string();
                }
            }
        }
        serde_yaml_ng::to_string(&mapping).expect("serialise the mapping")
    }
}

/// The routes and command routes of a mapping file.
fn entries(mapping: &mut Value) -> impl Iterator<Item = &mut Value> {
    let Value::Mapping(map) = mapping else {
        panic!("a mapping file is a YAML mapping: {mapping:?}")
    };
    map.iter_mut()
        .filter(|(key, _)| matches!(key.as_str(), Some("routes" | "commands")))
        .filter_map(|(_, list)| list.as_sequence_mut())
        .flatten()
}
