//! Mapping files: the routes from MQTT topic trees to Kafka topics.
//!
//! This is plain data as the user wrote it; `route::RouteTable::compile`
//! turns it into matchers, templates and validators, reporting every problem
//! with the field path that `locate` maps back to a line.

use crate::mqtt::Qos;
use serde::Deserialize;
use std::collections::BTreeMap;

/// One mapping file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    /// Topic trees of machine-to-machine traffic (actuator commands) that
    /// never leave MQTT, even when a broader route matches them.
    #[serde(default)]
    pub m2m: Vec<String>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Kafka → MQTT: records of a Kafka topic delivered to devices.
    #[serde(default)]
    pub commands: Vec<CommandConfig>,
}

/// One command route: a Kafka topic whose records become MQTT messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Unique among command routes; used in metrics and dead-letter headers.
    pub name: String,
    pub kafka: CommandKafkaConfig,
    /// JSON Schema the record value must satisfy, relative to this file.
    pub schema: Option<String>,
    pub mqtt: CommandMqttConfig,
    /// A record older than this (by its Kafka timestamp) is not delivered:
    /// a stale setpoint is worse than none. Absent: no limit.
    pub ttl_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandKafkaConfig {
    pub topic: String,
    /// Where invalid commands go; defaults to `kafka.dead_letter_topic`.
    pub dead_letter_topic: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandMqttConfig {
    /// Template: `{key}` (the record key) and `{/json/pointer}` (a field of
    /// the record value).
    pub topic: String,
    #[serde(default = "default_command_qos")]
    pub qos: Qos,
    #[serde(default)]
    pub retain: bool,
}

fn default_command_qos() -> Qos {
    Qos::AtLeastOnce
}

/// One route: which MQTT messages, how to read and reshape them, where they go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique across all mapping files; used in metrics labels, logs and the
    /// dead-letter headers.
    pub name: String,
    pub mqtt: RouteMqttConfig,
    #[serde(default)]
    pub format: FormatConfig,
    /// The pattern and field types for `format: text`.
    pub text: Option<TextFormatConfig>,
    /// The `.proto` file and message type for `format: protobuf`.
    pub protobuf: Option<ProtobufFormatConfig>,
    /// JSON Schema file, relative to the mapping file. Draft from `$schema`
    /// (2020-12 when absent); local `$ref`s resolve relative to the file.
    pub schema: Option<String>,
    /// Overrides `limits.max_payload_bytes` for this route.
    pub max_payload_bytes: Option<usize>,
    #[serde(default)]
    pub transform: TransformConfig,
    /// Where the message goes in Kafka (an ingest route)...
    pub kafka: Option<RouteKafkaConfig>,
    /// ...or, instead, the MQTT message it becomes (a relay route, for local
    /// machine-to-machine rules).
    pub publish: Option<RoutePublishConfig>,
    /// What a `format: sparkplug_b` route makes of its messages besides
    /// the records: one record per metric, an online-state topic.
    pub sparkplug: Option<SparkplugRouteConfig>,
}

/// Options of a `format: sparkplug_b` route.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparkplugRouteConfig {
    /// One record per message (the default) or per metric.
    #[serde(default)]
    pub records: SparkplugRecords,
    /// A (compacted) topic that gets one record per node or device coming
    /// online or going offline, keyed `group/edge_node[/device]`, in the
    /// transaction of the birth or death that told it.
    pub online_topic: Option<String>,
}

/// How many records one Sparkplug message becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SparkplugRecords {
    /// One record holding every metric.
    #[default]
    PerMessage,
    /// One record per metric, with the message's header fields; a message
    /// without metrics (a STATE, an empty DATA) is still one record.
    PerMetric,
}

/// A relay route's output: one MQTT message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutePublishConfig {
    /// Topic template, as for `kafka.topic`; no `+` or `#`.
    pub topic: String,
    #[serde(default = "default_publish_qos")]
    pub qos: Qos,
    #[serde(default)]
    pub retain: bool,
}

fn default_publish_qos() -> Qos {
    Qos::AtLeastOnce
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMqttConfig {
    /// MQTT topic filter; `{name}` matches one level like `+` and captures it.
    pub filter: String,
    /// Optional regex on the whole topic, for captures a level filter cannot
    /// express. Its named groups become captures; no match means the route
    /// does not apply and the next one is tried.
    pub regex: Option<String>,
    /// Subscription QoS; defaults to `mqtt.qos` of the bridge file.
    pub qos: Option<Qos>,
}

/// How the payload bytes become a JSON value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatConfig {
    /// UTF-8 JSON (the default).
    #[default]
    Json,
    /// Legacy text parsed by the regex in the route's `text` field.
    Text,
    /// Bytes passed through untouched: no schema, no transform.
    Raw,
    /// Sparkplug B protobuf on the `spBv1.0/...` namespace, decoded with
    /// the aliases of each edge node's birth certificate.
    #[serde(rename = "sparkplug_b")]
    SparkplugB,
    /// Protobuf of a message type from a `.proto` file (`protobuf`).
    Protobuf,
}

/// Where `format: protobuf` finds its message type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtobufFormatConfig {
    /// The `.proto` file, relative to the mapping file.
    pub file: String,
    /// The message type's full name, with its package (`acme.v1.Reading`).
    pub message: String,
    /// More directories its imports are looked up in (relative to the
    /// mapping file), after the file's own.
    #[serde(default)]
    pub include: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextFormatConfig {
    /// Must match the whole payload; each named group becomes a field.
    pub pattern: String,
    /// Field types of named groups; undeclared groups are strings.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Integer,
    Float,
    Boolean,
}

/// Declarative reshaping, applied in field order: rename, drop, nest, set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// `from: to`; plain names or JSON pointers.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Names or JSON pointers to remove.
    #[serde(default)]
    pub drop: Vec<String>,
    /// Wrap the (renamed, trimmed) payload under this key.
    pub nest: Option<String>,
    /// Fields to set: constants, or templates over captures, MQTT metadata
    /// and payload fields. Keys are names or JSON pointers.
    #[serde(default)]
    pub set: serde_json::Map<String, serde_json::Value>,
}

impl TransformConfig {
    pub fn is_empty(&self) -> bool {
        self.rename.is_empty() && self.drop.is_empty() && self.nest.is_none() && self.set.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteKafkaConfig {
    /// Topic template, e.g. `hvac.telemetry` or `telemetry.{site}`.
    pub topic: String,
    /// Key template: `{device}` (a capture) or `{/device_id}` (a JSON pointer
    /// into the record value). Absent: no key (round-robin partitions).
    pub key: Option<String>,
    /// Extra headers; values are templates.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `received` (default) or a JSON pointer to a field holding epoch
    /// milliseconds or an RFC 3339 string.
    pub timestamp: Option<String>,
    /// Overrides `kafka.dead_letter_topic` of the bridge file.
    pub dead_letter_topic: Option<String>,
    /// Copy MQTT 5 user properties into record headers. Configured
    /// `headers` win over properties of the same name.
    #[serde(default = "default_true")]
    pub user_properties: bool,
    /// For a templated `topic`: the topics it may render to, as glob
    /// patterns (`telemetry.*`). A rendered topic outside the list is
    /// dead-lettered with reason `topic`. Whatever the list, a templated
    /// topic never names the state topic, a dead-letter topic or an
    /// internal `__` topic.
    #[serde(default)]
    pub allowed_topics: Vec<String>,
    /// The record value's encoding: JSON (the default) or the schema
    /// registry's wire format.
    pub encoding: Option<EncodingConfig>,
}

/// `kafka.encoding` of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodingConfig {
    pub format: EncodingFormat,
    /// The schema file (relative to the mapping file): `.avsc` for Avro,
    /// `.proto` for protobuf, a JSON Schema for `json_schema` (default:
    /// the route's `schema`).
    pub schema: Option<String>,
    /// For protobuf: the message type's full name.
    pub message: Option<String>,
    /// The subject, instead of the strategy's.
    pub subject: Option<String>,
    #[serde(default)]
    pub subject_strategy: SubjectStrategy,
}

/// How a record value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodingFormat {
    /// Plain JSON, no registry.
    Json,
    Avro,
    Protobuf,
    /// JSON, with the registry's header and a JSON Schema.
    JsonSchema,
}

/// Which subject a route's schema goes under (Confluent's strategies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// `<topic>-value`.
    #[default]
    TopicName,
    /// The record's full name (Avro record, protobuf message, JSON Schema
    /// `title`).
    RecordName,
    /// `<topic>-<record name>`.
    TopicRecordName,
}

fn default_true() -> bool {
    true
}
