//! The Kafka side: a transactional producer that makes one batch of records
//! visible atomically.

mod config;
mod record;
mod sink;
pub mod state_store;

pub use config::KafkaConfig;
pub use record::{is_valid_topic_name, Record};
pub use sink::{refusal_kind, Refusal, SinkError, TransactionalSink, REFUSALS};
pub use state_store::StateStoreError;

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

/// How many partitions the (single) topic in `metadata` has once it is
/// usable: known to the broker, with a leader for every partition. `None`
/// while it is missing or still being created; a client that produces or
/// reads before then waits on the topic, for up to 30 s.
pub fn ready_partitions(metadata: &rdkafka::metadata::Metadata) -> Option<usize> {
    let topic = metadata.topics().first()?;
    let partitions = topic.partitions();
    (topic.error().is_none()
        && !partitions.is_empty()
        && partitions.iter().all(|p| p.leader() >= 0))
    .then_some(partitions.len())
}
