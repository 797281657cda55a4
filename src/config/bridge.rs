//! The bridge file: connections, delivery settings, where the mappings are.

use crate::kafka::KafkaConfig;
use crate::mqtt::MqttConfig;
use serde::Deserialize;

/// Top level of `bridge.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    pub mqtt: MqttConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where routes with `kafka.encoding` register their schemas.
    pub schema_registry: Option<crate::registry::RegistryConfig>,
    /// Partitioned: this bridge is one of several that each receive every
    /// message and keep the keys they own (see [`crate::scale`]).
    pub partition: Option<crate::scale::PartitionConfig>,
    /// Hot standby: run only while holding this identity's lease.
    pub ha: Option<crate::scale::HaConfig>,
    /// Glob patterns of mapping files, relative to the bridge file. Files are
    /// loaded in sorted path order, which is also the route precedence order.
    pub mappings: Vec<String>,
}

/// What the bridge promises about each MQTT message reaching Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// QoS 2 messages land exactly once, also across crashes; QoS 1 ones
    /// exactly once wherever a redelivery can be recognised (see
    /// docs/delivery.md). Costs one small state record per transaction.
    #[default]
    ExactlyOnce,
    /// Nothing is lost; a crash between commit and acknowledgement can
    /// produce a message twice.
    AtLeastOnce,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    #[serde(default)]
    pub guarantee: Guarantee,
    /// Compacted topic holding each bridge's exactly-once state, keyed by
    /// `kafka.transactional_id`. Created (compacted, one partition) if
    /// missing.
    #[serde(default = "default_state_topic")]
    pub state_topic: String,
    /// A transaction commits once it holds this many messages...
    #[serde(default = "default_batch_max_messages")]
    pub batch_max_messages: usize,
    /// ...or this long after its first message, whichever comes first. This
    /// bounds the latency a message spends waiting for its batch.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// librdkafka's `transaction.timeout.ms`: the broker aborts a transaction
    /// left open longer than this (e.g. by a bridge that died mid-batch).
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: u64,
    /// How long a commit may take before the bridge treats it as failed.
    #[serde(default = "default_commit_timeout_ms")]
    pub commit_timeout_ms: u64,
    /// Upper bound on graceful shutdown: finish the open transaction, ack,
    /// disconnect.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            guarantee: Guarantee::default(),
            state_topic: default_state_topic(),
            batch_max_messages: default_batch_max_messages(),
            commit_interval_ms: default_commit_interval_ms(),
            transaction_timeout_ms: default_transaction_timeout_ms(),
            commit_timeout_ms: default_commit_timeout_ms(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Messages larger than this are dead-lettered with reason `too_large`.
    /// The size counts what the device controls: payload, topic, MQTT 5
    /// user properties and content type. A route may set its own limit.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// PUBLISH packets larger than this are not held in memory: the payload
    /// is discarded as it streams in (its SHA-256 computed on the way) and
    /// the message dead-lettered as `too_large` with its size. Bounds the
    /// memory one message can take, whatever the broker allows.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// More MQTT 5 user properties than this on one message: `too_large`.
    #[serde(default = "default_max_user_properties")]
    pub max_user_properties: usize,
    /// More bytes of user-property names and values than this on one
    /// message: `too_large`.
    #[serde(default = "default_max_user_property_bytes")]
    pub max_user_property_bytes: usize,
    /// The longest prefix of a rejected payload a dead-letter record keeps.
    /// Every dead-letter record also carries the original's size and
    /// SHA-256, so a cut payload can still be matched to its source.
    #[serde(default = "default_dead_letter_max_payload_bytes")]
    pub dead_letter_max_payload_bytes: usize,
    /// A timestamp read from the payload (`kafka.timestamp: /ptr`) more than
    /// this far ahead of the bridge's clock is refused (reason `timestamp`)
    /// before Kafka sees it. Kafka refuses records stamped more than
    /// `message.timestamp.after.max.ms` (1 h by default) ahead, and one such
    /// record would abort a whole transaction.
    #[serde(default = "default_timestamp_max_ahead_ms")]
    pub timestamp_max_ahead_ms: u64,
    /// If set, a payload timestamp older than this is refused too (match it
    /// to the topics' `message.timestamp.before.max.ms`). Timestamps before
    /// 1970 are always refused.
    #[serde(default)]
    pub timestamp_max_behind_ms: Option<u64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: default_max_payload_bytes(),
            max_packet_bytes: default_max_packet_bytes(),
            max_user_properties: default_max_user_properties(),
            max_user_property_bytes: default_max_user_property_bytes(),
            dead_letter_max_payload_bytes: default_dead_letter_max_payload_bytes(),
            timestamp_max_ahead_ms: default_timestamp_max_ahead_ms(),
            timestamp_max_behind_ms: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP listener serving `/metrics`, `/livez` and
    /// `/readyz`, e.g. `0.0.0.0:9464`. Absent: no listener.
    pub listen: Option<std::net::SocketAddr>,
    /// How long one commit, with its retries, may go on before `/readyz`
    /// says not ready. Longer than a broker failover takes, so a failover
    /// the bridge rides out does not pull it out of service.
    #[serde(default = "default_max_commit_wait_ms")]
    pub max_commit_wait_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            max_commit_wait_ms: default_max_commit_wait_ms(),
        }
    }
}

fn default_max_commit_wait_ms() -> u64 {
    30_000
}

fn default_state_topic() -> String {
    "mqtt-bridge.state".into()
}
fn default_batch_max_messages() -> usize {
    1000
}
fn default_commit_interval_ms() -> u64 {
    100
}
fn default_transaction_timeout_ms() -> u64 {
    60_000
}
fn default_commit_timeout_ms() -> u64 {
    30_000
}
fn default_shutdown_timeout_ms() -> u64 {
    10_000
}
/// 900 KiB: below librdkafka's default `message.max.bytes` (1 000 000)
/// with room for key and headers, so a payload the bridge accepts is one
/// Kafka accepts too.
fn default_max_payload_bytes() -> usize {
    900 * 1024
}

fn default_max_packet_bytes() -> usize {
    2 * 1024 * 1024
}

fn default_max_user_properties() -> usize {
    32
}

fn default_max_user_property_bytes() -> usize {
    8 * 1024
}

fn default_dead_letter_max_payload_bytes() -> usize {
    256 * 1024
}

fn default_timestamp_max_ahead_ms() -> u64 {
    3_600_000
}
