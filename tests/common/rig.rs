//! One test's surroundings: its own mosquitto, a Kafka and its topics.

use super::{kafka, mosquitto, Topics};

/// A mosquitto and a Kafka with one test's topics created.
pub struct Rig {
    pub broker: mosquitto::Mosquitto,
    pub topics: Topics,
    pub kafka: kafka::TestKafka,
    pub bootstrap: String,
}

impl Rig {
    /// With the Kafka the environment selects (see `kafka::test_kafka`).
    pub async fn start() -> Self {
        Self::start_with(kafka::test_kafka()).await
    }

    /// With the given Kafka, e.g. `TestKafka::mock()` for error injection.
    pub async fn start_with(kafka: kafka::TestKafka) -> Self {
        let broker = mosquitto::Mosquitto::start();
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
}
