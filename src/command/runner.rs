//! Consumes the command topics and publishes each record to MQTT.
//!
//! Every record ends, exactly once per delivery to this consumer, in one of
//! four ways, and then its offset is committed: delivered (the broker
//! acknowledged the publish), expired, dead-lettered (invalid, or refused
//! by the broker), or, when even a dead-letter stub cannot be written,
//! counted as lost and logged. None of them loops or stops the bridge: a
//! record is never published twice because the broker refused it, and a
//! dead-letter topic that refuses records does not hold up the commands
//! behind it.

use super::{CommandTable, Prepared};
use crate::backoff::Backoff;
use crate::config::KafkaConfig;
use crate::fault::{self, Point};
use crate::kafka;
use crate::kafka::{client_config, refusal_kind};
use crate::mqtt::{MqttClient, MqttError};
use crate::route::reject::{self, Evidence, Form};
use crate::route::{RejectReason, Rejection};
use crate::telemetry;
use bytes::Bytes;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long one dead-letter write may wait in librdkafka's queue.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(30);

/// First and longest pause between attempts at a dead-letter write that
/// failed for a reason that may pass (a broker away, a timeout).
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Closing a consumer waits for the group protocol (a join in progress,
/// leaving the group), polling in a loop: seconds, and on a tokio worker
/// that stalls the runtime. The consumer is closed on a thread of its own,
/// which nothing waits for.
struct CloseInBackground(Option<StreamConsumer<LagReport>>);

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
    #[error(transparent)]
    Mqtt(#[from] MqttError),
}

/// Turns the consumer's statistics into `command_consumer_lag`, by topic:
/// records the backend wrote that no bridge has delivered yet.
struct LagReport;

impl ClientContext for LagReport {
    fn stats(&self, statistics: Statistics) {
        for (name, topic) in &statistics.topics {
            // Partition -1 is librdkafka's unassigned queue; a lag of -1
            // means not known yet (no committed offset or high watermark).
            let lag: i64 = topic
                .partitions
                .values()
                .filter(|p| p.partition >= 0)
                .map(|p| p.consumer_lag.max(0))
                .sum();
            telemetry::command_consumer_lag(name, lag);
        }
    }
}

impl ConsumerContext for LagReport {}

/// Runs until `shutdown`. A command in flight at shutdown is not committed:
/// the next run delivers it again.
///
/// The routes come from `tables`: a reload sends new ones, taken between
/// two records, and the consumer subscribes to the new set of topics. With
/// no command route there is no consumer (and no group member) until a
/// reload adds one.
pub async fn run(
    mut tables: watch::Receiver<Arc<CommandTable>>,
    kafka: &KafkaConfig,
    client: MqttClient,
    shutdown: CancellationToken,
) -> Result<(), CommandError> {
    let mut table = tables.borrow_and_update().clone();
    while table.is_empty() {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            changed = tables.changed() => match changed {
                Ok(()) => table = tables.borrow_and_update().clone(),
                Err(_) => return Ok(()),
            },
        }
    }
    let group = kafka
        .command_group
        .clone()
        .unwrap_or_else(|| format!("{}.commands", kafka.transactional_id));
    let mut config = client_config(kafka);
    if !kafka.properties.contains_key("statistics.interval.ms") {
        // For `command_consumer_lag`.
        config.set("statistics.interval.ms", "5000");
    }
    let consumer: StreamConsumer<LagReport> = config
        .set("group.id", &group)
        // Static membership: a restarted bridge (same identity) takes its
        // partitions back at once instead of after the old member's session
        // times out.
        .set("group.instance.id", &kafka.transactional_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // Only what the backend committed is a command.
        .set("isolation.level", "read_committed")
        .create_with_context(LagReport)?;
    consumer.subscribe(&table.topics())?;
    let consumer = CloseInBackground(Some(consumer));
    let consumer = consumer.0.as_ref().expect("set");
    let mut dead_letters = DeadLetters::new(kafka)?;
    tracing::info!(%group, topics = ?table.topics(), "consuming commands");
    loop {
        let record = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Ok(()) = tables.changed() => {
                let new = tables.borrow_and_update().clone();
                if new.topics_sorted() != table.topics_sorted() {
                    tracing::info!(topics = ?new.topics(), "command topics changed");
                    if new.is_empty() {
                        consumer.unsubscribe();
                    } else {
                        consumer.subscribe(&new.topics())?;
                    }
                }
                table = new;
                continue;
            }
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
        if !table.reads(record.topic()) {
            // Fetched before a reload dropped its route: left uncommitted,
            // for whoever reads the topic next.
            continue;
        }
        let route = table.route_name(record.topic()).to_string();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let prepared = table.prepare(
            record.topic(),
            record.key(),
            record.payload().unwrap_or_default(),
            record.timestamp().to_millis(),
            now_ms,
        );
        let invalid = match prepared {
            None => None,
            Some(Prepared::Publish(publish)) => {
                let done = client.publish_checked(publish).await?;
                let outcome = tokio::select! {
                    // Not acknowledged yet: not committed; delivered again.
                    _ = shutdown.cancelled() => return Ok(()),
                    outcome = done => outcome.map_err(|_| MqttError::Closed)?,
                };
                match outcome {
                    Ok(()) => {
                        tracing::debug!(%route, "command delivered");
                        telemetry::command_delivered(&route);
                        fault::point(Point::CommandBeforeCommit);
                        None
                    }
                    // Final: publishing it again would be refused again.
                    Err(refused) => {
                        let topic = table.dead_letter_topic(record.topic()).unwrap_or_default();
                        let rejection =
                            Rejection::new(RejectReason::MqttRefused, refused.to_string());
                        Some((topic.to_string(), rejection))
                    }
                }
            }
            Some(Prepared::Expired { age_ms }) => {
                tracing::info!(%route, age_ms, "command expired; not delivered");
                telemetry::command_expired(&route);
                None
            }
            Some(Prepared::Invalid { topic, rejection }) => Some((topic, rejection)),
        };
        if let Some((topic, rejection)) = invalid {
            tracing::warn!(%route, %rejection, "invalid command; dead-lettering it");
            let key = record.key().map(String::from_utf8_lossy);
            let payload = Bytes::copy_from_slice(record.payload().unwrap_or_default());
            let evidence = Evidence {
                source: record.topic(),
                from_mqtt: false,
                key: key.as_deref(),
                payload: &payload,
                original: None,
                user_properties: &[],
                // When it was handled: the record's own timestamp may be
                // one Kafka no longer takes.
                timestamp_ms: now_ms,
            };
            let records = |form, kafka_error: Option<&str>| {
                reject::dead_letter_record(
                    &topic,
                    &route,
                    &evidence,
                    &rejection,
                    kafka_error,
                    table.dead_letter_limits(),
                    form,
                )
            };
            match dead_letters.write(records, &shutdown).await {
                Written::Yes => telemetry::command_dead_lettered(&route, rejection.reason.as_str()),
                Written::Lost(code) => telemetry::dead_letter_lost(&route, &topic, code),
                // Not dead-lettered yet: not committed; handled again.
                Written::Stopped => return Ok(()),
            }
        }
        commit(consumer, &record);
    }
}

/// Commits the offset after `record`. A failure (a rebalance took the
/// partition, the coordinator is away) is not fatal: the next commit covers
/// this offset too, or the partition's new owner handles the record again,
/// which at-least-once delivery of commands allows.
fn commit(consumer: &StreamConsumer<LagReport>, record: &BorrowedMessage<'_>) {
    if let Err(error) = consumer.commit_message(record, CommitMode::Async) {
        tracing::warn!(
            %error,
            topic = record.topic(),
            partition = record.partition(),
            offset = record.offset(),
            "cannot commit a command offset; a later commit covers it, or the record is handled again"
        );
    }
}

/// How a dead-letter write ended.
#[derive(Debug)]
enum Written {
    Yes,
    /// Kafka refused the full record and its stub for good.
    Lost(RDKafkaErrorCode),
    /// Shutdown came first.
    Stopped,
}

/// The producer of command dead-letter records.
struct DeadLetters {
    kafka: KafkaConfig,
    producer: FutureProducer,
}

impl DeadLetters {
    fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        Ok(Self {
            kafka: kafka.clone(),
            producer: Self::producer(kafka)?,
        })
    }

    fn producer(kafka: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
        client_config(kafka)
            .set("enable.idempotence", "true")
            .create()
    }

    /// Writes the record `records(Form::Full, None)`; when Kafka refuses it
    /// for good (too large, invalid, topic not authorised...), its stub
    /// `records(Form::Stub, Some(error))`. Errors that may pass are retried,
    /// with a growing pause, until shutdown.
    async fn write(
        &mut self,
        records: impl Fn(Form, Option<&str>) -> kafka::Record,
        shutdown: &CancellationToken,
    ) -> Written {
        let mut form = Form::Full;
        let mut record = records(form, None);
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        loop {
            let error = tokio::select! {
                _ = shutdown.cancelled() => return Written::Stopped,
                sent = send(&self.producer, &record) => match sent {
                    Ok(()) => return Written::Yes,
                    Err(error) => error,
                },
            };
            match error {
                KafkaError::MessageProduction(code) if refusal_kind(code).is_some() => {
                    if form == Form::Stub {
                        return Written::Lost(code);
                    }
                    tracing::warn!(
                        ?code,
                        "Kafka refused a command dead-letter record; writing its stub"
                    );
                    form = Form::Stub;
                    record = records(form, Some(&format!("{code:?}")));
                    continue;
                }
                // The idempotent producer is done for (e.g. after an
                // unrecoverable sequence error): a new one can go on.
                KafkaError::MessageProduction(RDKafkaErrorCode::Fatal) => {
                    tracing::warn!("the dead-letter producer failed fatally; creating a new one");
                    match Self::producer(&self.kafka) {
                        Ok(producer) => self.producer = producer,
                        Err(error) => {
                            tracing::error!(%error, "cannot create a dead-letter producer")
                        }
                    }
                }
                error => {
                    tracing::warn!(%error, retry_in = ?backoff.delay(), "cannot write a command dead-letter record yet");
                }
            }
            if !backoff.wait(shutdown).await {
                return Written::Stopped;
            }
        }
    }
}

async fn send(producer: &FutureProducer, record: &kafka::Record) -> Result<(), KafkaError> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut future = FutureRecord::<str, [u8]>::to(&record.topic)
        .payload(&record.value[..])
        .headers(headers)
        .timestamp(record.timestamp_ms);
    if let Some(key) = &record.key {
        future = future.key(key.as_str());
    }
    producer
        .send(future, DEAD_LETTER_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|(error, _)| error)
}
