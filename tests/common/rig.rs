//! One test's surroundings: its own mosquitto, a Kafka and its topics.

use super::config::ConfigBuilder;
use super::kafka::{KafkaCluster, TestKafka};
use super::mosquitto::{Mosquitto, Options};
use super::Topics;

/// A mosquitto and a Kafka with one test's topics created.
pub struct Rig {
    pub broker: Mosquitto,
    pub topics: Topics,
    pub kafka: TestKafka,
    pub bootstrap: String,
}

impl Rig {
    /// With the Kafka the environment selects (see `kafka::test_kafka`).
    pub async fn start() -> Self {
        Self::start_with(super::kafka::test_kafka()).await
    }

    /// With the given Kafka, e.g. `TestKafka::mock()` for error injection.
    pub async fn start_with(kafka: TestKafka) -> Self {
        Self::start_with_broker(kafka, &Options::default()).await
    }

    /// With the given Kafka and a mosquitto started with `options` (an
    /// ACL, a packet size limit...).
    pub async fn start_with_broker(kafka: TestKafka, options: &Options) -> Self {
        let broker = Mosquitto::start_with(options);
        let topics = Topics::new();
        kafka.create_test_topics(&topics).await;
        let bootstrap = kafka.bootstrap();
        Self {
            broker,
            topics,
            kafka,
            bootstrap,
        }
    }

    /// On a private `cluster`, with the test's topics at the cluster's
    /// replication and a state topic of its own ([`Topics::state`]), so
    /// that broker faults hit the exactly-once state as they hit data.
    pub async fn on_cluster(cluster: &KafkaCluster) -> Self {
        let rig = Self::start_with(TestKafka::External(cluster.bootstrap.clone())).await;
        rig.kafka.create_topics(&[&rig.topics.state()], 3).await;
        rig
    }

    /// A bridge config for this broker, Kafka and these topics (see
    /// [`ConfigBuilder`] for its defaults).
    pub fn bridge_config(&self) -> ConfigBuilder {
        ConfigBuilder::new(self.broker.port, &self.bootstrap, &self.topics)
    }
}
