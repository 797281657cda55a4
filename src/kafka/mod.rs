//! The Kafka side: a transactional producer that makes one batch of records
//! visible atomically.

mod sink;
pub mod state_store;

pub use sink::{SinkError, TransactionalSink};
pub use state_store::StateStoreError;

use crate::config::KafkaConfig;
use rdkafka::ClientConfig;

/// librdkafka settings shared by every client the bridge creates; the
/// user's `properties` come last so they can override any of them.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap_servers);
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}
