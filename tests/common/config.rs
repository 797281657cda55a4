//! Bridge configurations for tests.

use super::{repo_path, Topics};
use mqtt_kafka_bridge::config::{BridgeConfig, Config, MappingSource};

/// A bridge config for the given broker and Kafka running
/// `mappings/hvac.yaml`, its Kafka topics renamed into `topics`.
/// `extra_mqtt` is YAML added to the `mqtt` section.
pub fn bridge_config(
    mqtt_port: u16,
    bootstrap: &str,
    client_id: &str,
    extra_mqtt: &str,
    topics: &Topics,
) -> Config {
    let hvac = std::fs::read_to_string(repo_path("mappings/hvac.yaml")).expect("read hvac.yaml");
    bridge_config_with_mapping(mqtt_port, bootstrap, client_id, extra_mqtt, topics, &hvac)
}

/// [`bridge_config`] with the mapping text given, parsed as if it were
/// `mappings/hvac.yaml` so that schema paths resolve.
pub fn bridge_config_with_mapping(
    mqtt_port: u16,
    bootstrap: &str,
    client_id: &str,
    extra_mqtt: &str,
    topics: &Topics,
    mapping: &str,
) -> Config {
    let text = format!(
        "mqtt:\n  host: 127.0.0.1\n  port: {mqtt_port}\n  client_id: {client_id}\n  keep_alive_s: 5\n  reconnect_delay_ms: 100\n{extra_mqtt}\
         kafka:\n  bootstrap_servers: '{bootstrap}'\n  transactional_id: {client_id}\n  dead_letter_topic: {dlq}\n\
         delivery:\n  batch_max_messages: 500\n  commit_interval_ms: 50\n  shutdown_timeout_ms: 3000\n\
         mappings: [unused]\n",
        dlq = topics.dead_letter()
    );
    let bridge: BridgeConfig = serde_yaml_ng::from_str(&text).expect("test bridge config");
    let path = repo_path("mappings/hvac.yaml");
    let mapping = mapping.replace("topic: hvac.", &format!("topic: {}hvac.", topics.prefix));
    Config {
        bridge,
        path: repo_path("tests/bridge.yaml"),
        // Parsed under its real path, so schema references resolve.
        mappings: vec![MappingSource::parse(&path, &mapping).expect("mapping parses")],
    }
}
