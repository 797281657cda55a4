//! The `kafka` section of the bridge file: the cluster, the producer's
//! identity and librdkafka's own settings.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// Identity of this bridge's transactional producer. Two instances with
    /// the same id fence each other: give every instance its own.
    pub transactional_id: String,
    /// Where payloads that fail parsing, validation or mapping go, with the
    /// reason in headers. A route may override it.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Consumer group of the command routes (Kafka → MQTT). Default:
    /// `<transactional_id>.commands`.
    pub command_group: Option<String>,
    /// Passed to librdkafka as they are (`security.protocol`,
    /// `sasl.mechanisms`, `compression.type`, ...). The escape hatch for every
    /// setting the bridge does not model itself.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_dead_letter_topic() -> String {
    "mqtt-bridge.dead-letter".into()
}
