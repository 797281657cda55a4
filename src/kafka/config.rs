//! The `kafka` section of the bridge file: the cluster, the producer's
//! identity and librdkafka's own settings.

use crate::secret::{is_secret_property, REDACTED};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// `Debug` prints the properties with secret values redacted (see
/// [`crate::secret::is_secret_property`]).
#[derive(Clone, PartialEq, Deserialize)]
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

impl KafkaConfig {
    /// The properties as they may be shown: secret values replaced.
    pub fn redacted_properties(&self) -> BTreeMap<&str, &str> {
        self.properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) { REDACTED } else { v };
                (k.as_str(), shown)
            })
            .collect()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("transactional_id", &self.transactional_id)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("command_group", &self.command_group)
            .field("properties", &self.redacted_properties())
            .finish()
    }
}

fn default_dead_letter_topic() -> String {
    "mqtt-bridge.dead-letter".into()
}
