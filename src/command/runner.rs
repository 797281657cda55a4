//! Consumes the command topics and publishes each record to MQTT.

use super::{CommandTable, Prepared};
use crate::config::KafkaConfig;
use crate::fault;
use crate::kafka::client_config;
use crate::mqtt::{Acker, MqttError};
use crate::route::headers;
use crate::telemetry;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Closing a consumer waits for the group protocol (a join in progress,
/// leaving the group), polling in a loop: seconds, and on a tokio worker
/// that stalls the runtime. The consumer is closed on a thread of its own,
/// which nothing waits for.
struct CloseInBackground(Option<StreamConsumer>);

impl Drop for CloseInBackground {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            std::thread::spawn(move || drop(consumer));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("cannot dead-letter an invalid command: {0}")]
    DeadLetter(KafkaError),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
}

/// Runs until `shutdown`. A command in flight at shutdown is not committed:
/// the next run delivers it again.
pub async fn run(
    table: Arc<CommandTable>,
    kafka: &KafkaConfig,
    acker: Acker,
    shutdown: CancellationToken,
) -> Result<(), CommandError> {
    let group = kafka
        .command_group
        .clone()
        .unwrap_or_else(|| format!("{}.commands", kafka.transactional_id));
    let consumer: StreamConsumer = client_config(kafka)
        .set("group.id", &group)
        // Static membership: a restarted bridge (same identity) takes its
        // partitions back at once instead of after the old member's session
        // times out.
        .set("group.instance.id", &kafka.transactional_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // Only what the backend committed is a command.
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&table.topics())?;
    let consumer = CloseInBackground(Some(consumer));
    let consumer = consumer.0.as_ref().expect("set");
    let producer: FutureProducer = client_config(kafka)
        .set("enable.idempotence", "true")
        .create()?;
    tracing::info!(%group, topics = ?table.topics(), "consuming commands");
    loop {
        let record = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            record = consumer.recv() => record,
        };
        let record = match record {
            Ok(r) => r,
            Err(error) => {
                // Transient (a broker away, a topic not yet created):
                // librdkafka keeps trying; so do we, a second apart, so
                // that an outage does not flood the log.
                tracing::warn!(%error, "command consumer");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        let route = table.route_name(record.topic()).to_string();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let prepared = table.prepare(
            record.topic(),
            record.key(),
            record.payload().unwrap_or_default(),
            record.timestamp().to_millis(),
            now_ms,
        );
        match prepared {
            None => {}
            Some(Prepared::Publish(publish)) => {
                let topic = publish.topic.clone();
                let done = acker.publish(publish).await?;
                tokio::select! {
                    // Not acknowledged yet: not committed; delivered again.
                    _ = shutdown.cancelled() => return Ok(()),
                    acked = done => acked.map_err(|_| MqttError::Closed)?,
                }
                tracing::debug!(%route, %topic, "command delivered");
                telemetry::command_delivered(&route);
                fault::point("command_before_commit");
            }
            Some(Prepared::Expired { age_ms }) => {
                tracing::info!(%route, age_ms, "command expired; not delivered");
                telemetry::command_expired(&route);
            }
            Some(Prepared::Invalid { topic, rejection }) => {
                tracing::warn!(%route, %rejection, "invalid command; dead-lettering it");
                let mut h = OwnedHeaders::new()
                    .insert(Header {
                        key: headers::ROUTE,
                        value: Some(&route),
                    })
                    .insert(Header {
                        key: headers::ERROR_REASON,
                        value: Some(rejection.reason.as_str()),
                    })
                    .insert(Header {
                        key: headers::ERROR_DETAIL,
                        value: Some(&rejection.detail),
                    });
                if let Some(path) = &rejection.path {
                    h = h.insert(Header {
                        key: headers::ERROR_PATH,
                        value: Some(path),
                    });
                }
                let mut dead = FutureRecord::<[u8], [u8]>::to(&topic)
                    .payload(record.payload().unwrap_or_default())
                    .headers(h);
                if let Some(key) = record.key() {
                    dead = dead.key(key);
                }
                producer
                    .send(dead, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| CommandError::DeadLetter(e))?;
                telemetry::command_dead_lettered(&route, rejection.reason.as_str());
            }
        }
        consumer.commit_message(&record, CommitMode::Async)?;
    }
}
