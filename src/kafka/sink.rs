//! One transactional producer and the calls a batch needs.
//!
//! librdkafka's transaction calls block (they wait for the coordinator), so
//! they run on tokio's blocking pool; producing a record only enqueues it and
//! stays on the async task.

use super::KafkaConfig;
use super::Record;
use crate::fault::{self, Point};
use crate::telemetry::Health;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The producer of a sink: its delivery reports are collected per record.
type Inner = BaseProducer<Reports>;

/// A record the broker (or librdkafka) refused for good: producing it again
/// would fail again. The batch replaces it with a dead-letter record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The id the record was sent with.
    pub id: usize,
    pub code: RDKafkaErrorCode,
    /// The refusal is about the topic (missing, not authorised), so every
    /// record to it is refused on its own merits, not for a neighbour's.
    pub topic_wide: bool,
    pub partition: i32,
}

/// Every error [`refusal_kind`] calls a refusal: the `error` label values
/// of `kafka_records_refused_total`, registered at 0 at start-up.
pub const REFUSALS: [RDKafkaErrorCode; 11] = {
    use RDKafkaErrorCode as E;
    [
        E::MessageSizeTooLarge,
        E::InvalidMessageSize,
        E::InvalidTimestamp,
        E::InvalidRecord,
        E::MessageBatchTooLarge,
        E::PolicyViolation,
        E::UnknownTopicOrPartition,
        E::UnknownTopic,
        E::UnknownPartition,
        E::TopicAuthorizationFailed,
        E::InvalidTopic,
    ]
};

/// How a delivery error bears on its record: `Some(topic_wide)` if the
/// record itself (or its topic) is refused for good, `None` if producing it
/// again may succeed (timeouts, leader changes, purges by our own abort).
pub fn refusal_kind(code: RDKafkaErrorCode) -> Option<bool> {
    use RDKafkaErrorCode as E;
    match code {
        E::MessageSizeTooLarge
        | E::InvalidMessageSize
        | E::InvalidTimestamp
        | E::InvalidRecord
        | E::MessageBatchTooLarge
        | E::PolicyViolation => Some(false),
        E::UnknownTopicOrPartition
        | E::UnknownTopic
        | E::UnknownPartition
        | E::TopicAuthorizationFailed
        | E::InvalidTopic => Some(true),
        _ => None,
    }
}

/// Delivery reports of the open transaction: the refusals, by record id.
/// Served by whoever polls the producer (the flush before a commit or an
/// abort); bounded by the records of one transaction.
pub struct Reports {
    refusals: Mutex<Vec<Refusal>>,
    /// The first failed delivery since the last `take_refusals` (the
    /// first that is not a purge, if any): a record that was not refused
    /// was not necessarily delivered, and the transaction can no longer
    /// commit.
    failed: Mutex<Option<KafkaError>>,
    /// Where librdkafka's statistics report the broker connections.
    health: Arc<Health>,
    /// The last time a broker refused the connection itself: a failed
    /// SASL authentication or TLS handshake. librdkafka retries those
    /// forever; at start-up the bridge stops with this instead of waiting.
    refused: Mutex<Option<String>>,
}

impl Reports {
    fn new(health: Arc<Health>) -> Self {
        Self {
            refusals: Mutex::default(),
            failed: Mutex::default(),
            health,
            refused: Mutex::default(),
        }
    }

    fn failed(&self) -> Option<KafkaError> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ClientContext for Reports {
    /// librdkafka's errors about the client (not about a record). Most
    /// heal by themselves (a broker restarting); a refused authentication
    /// or TLS handshake does not, and is said so.
    fn error(&self, error: KafkaError, reason: &str) {
        let refused = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication) => Some(format!(
                "authentication failed ({reason}); check sasl.mechanisms, sasl.username and the password"
            )),
            Some(RDKafkaErrorCode::SSL) => Some(format!(
                "TLS failed ({reason}); check ssl.ca.location (the CA that signed the brokers' certificates) and the client certificate"
            )),
            _ => None,
        };
        match refused {
            Some(refused) => {
                tracing::error!(error = %refused, "Kafka broker refused the connection");
                *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(refused);
            }
            None => tracing::warn!(%error, reason, "Kafka client error"),
        }
    }

    /// Counts the brokers the producer has a connection up to.
    fn stats(&self, statistics: Statistics) {
        let up = brokers_up(&statistics);
        tracing::trace!(up, brokers = ?statistics.brokers.values().map(|b| (&b.name, &b.source, b.nodeid, &b.state)).collect::<Vec<_>>(), "producer statistics");
        self.health.kafka_brokers_up(up);
    }
}

/// The brokers with a connection up, each counted once. The transaction
/// coordinator is a logical broker with a connection of its own to a
/// real one (same node id): an idle producer may have only that one up,
/// for instance a producer re-created after an outage, which has not
/// produced yet (counting real brokers only, readiness said "no broker
/// connection" then). A bootstrap connection, whose node is not known yet,
/// counts by its name.
fn brokers_up(statistics: &Statistics) -> usize {
    statistics
        .brokers
        .values()
        .filter(|b| b.source != "internal")
        .filter(|b| b.state == "UP" || b.state == "UPDATE")
        .map(|b| {
            if b.nodeid >= 0 {
                b.nodeid.to_string()
            } else {
                b.name.clone()
            }
        })
        .collect::<std::collections::HashSet<_>>()
        .len()
}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        let Err((error, message)) = result else {
            return;
        };
        tracing::trace!(id, %error, topic = message.topic(), "delivery failed");
        // A purge is the consequence of another failure (librdkafka purges
        // a failed transaction's queues): the other one is the news.
        let purged = |e: &KafkaError| {
            matches!(
                e,
                KafkaError::MessageProduction(
                    RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight
                )
            )
        };
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.as_ref().is_none_or(|f| purged(f) && !purged(error)) {
            *failed = Some(error.clone());
        }
        let KafkaError::MessageProduction(code) = error else {
            return;
        };
        if let Some(topic_wide) = refusal_kind(*code) {
            let refusal = Refusal {
                id,
                code: *code,
                topic_wide,
                partition: message.partition(),
            };
            self.refusals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(refusal);
        }
    }
}

/// How a Kafka failure must be handled.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The producer is unusable (e.g. fenced by a newer instance with the
    /// same `transactional.id`). Stop without acknowledging anything.
    #[error("fatal Kafka error: {0}")]
    Fatal(KafkaError),
    /// The transaction must be aborted and its records produced again.
    #[error("Kafka transaction must be aborted: {0}")]
    Abortable(KafkaError),
    /// Kafka refuses this one record whatever happens (e.g. it is larger
    /// than `message.max.bytes`); the transaction is unaffected.
    #[error("Kafka rejected the record: {0}")]
    Rejected(RDKafkaErrorCode),
    /// The same call may succeed if tried again.
    #[error("retriable Kafka error: {0}")]
    Retriable(KafkaError),
    #[error("cannot create Kafka producer: {0}")]
    Create(KafkaError),
    /// A broker refused the connection (authentication, TLS) while the
    /// producer started: a configuration or credential problem, not an
    /// outage to wait out.
    #[error("Kafka refused the bridge: {0}")]
    Refused(String),
}

impl SinkError {
    /// A fatal error that says a newer instance with the same
    /// `transactional.id` has taken over. Other fatal errors say only that
    /// this producer is unusable: e.g. a retried EndTxn that reaches the
    /// coordinator after the first one, once a paused broker answers again
    /// ("invalid transaction state").
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            Self::Fatal(KafkaError::Transaction(e)) if matches!(
                e.code(),
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        )
    }

    fn classify(error: KafkaError) -> Self {
        match &error {
            KafkaError::Transaction(e) if e.is_fatal() => Self::Fatal(error),
            KafkaError::Transaction(e) if e.txn_requires_abort() => Self::Abortable(error),
            KafkaError::Transaction(e) if e.is_retriable() => Self::Retriable(error),
            // A transactional call that failed without a verdict leaves the
            // transaction in an unknown state: abort it.
            _ => Self::Abortable(error),
        }
    }
}

/// A transactional producer.
///
/// A `BaseProducer` without a polling thread: the commit confirms every
/// record of the transaction, so per-record delivery reports are not
/// needed, and `commit_transaction` serves them itself while it flushes.
/// (With `FutureProducer`, the flush inside each commit waited for its
/// polling thread's 100 ms poll cycle.)
pub struct TransactionalSink {
    producer: Arc<Inner>,
    /// Kept to re-create the producer after an indefinite outcome.
    config: rdkafka::ClientConfig,
    commit_timeout: Duration,
    in_transaction: bool,
    /// Why the open transaction must not commit: a record that is not in
    /// it (librdkafka would not enqueue it for a reason other than the
    /// record's own, a flush gave up on the rest, a state record was
    /// refused; see [`Self::doom`]). Cleared by the abort.
    doomed: Option<KafkaError>,
    health: Arc<Health>,
}

impl TransactionalSink {
    /// Creates the producer and registers its `transactional.id` with the
    /// coordinator, which fences any older producer with the same id and
    /// aborts the transaction it left open. `transaction_timeout` is how
    /// long the coordinator lets a transaction stay open before aborting
    /// it; `commit_timeout` bounds each commit and abort.
    ///
    /// Broker connections and the end of `init_transactions` are reported
    /// to `health`.
    pub async fn connect(
        kafka: &KafkaConfig,
        transaction_timeout: Duration,
        commit_timeout: Duration,
        health: Arc<Health>,
    ) -> Result<Self, SinkError> {
        let mut config = super::client_config(kafka);
        // A record for a topic that does not exist fails after this long
        // (librdkafka's default, 30 s, would hold up the commit that long
        // and can outlast `commit_timeout_ms`); it is then dead-lettered.
        if !kafka
            .properties
            .contains_key("topic.metadata.propagation.max.ms")
        {
            config.set("topic.metadata.propagation.max.ms", "5000");
        }
        // For `kafka_brokers_up` and readiness.
        if !kafka.properties.contains_key("statistics.interval.ms") {
            config.set("statistics.interval.ms", STATISTICS_EVERY_MS);
        }
        config.set("transactional.id", &kafka.transactional_id).set(
            "transaction.timeout.ms",
            transaction_timeout.as_millis().to_string(),
        );
        let producer = create_producer(&config, &health)?;
        // A cluster that is starting (as it does next to the bridge in a
        // compose file) answers "coordinator load in progress" for a while;
        // librdkafka retries that only until the timeout, then says the
        // call may be made again. The bridge waits for Kafka rather than
        // exit; its readiness says it is not ready meanwhile.
        let mut backoff = crate::backoff::Backoff::new(INIT_RETRY_FIRST, INIT_RETRY_MAX);
        loop {
            match init_transactions(&producer, commit_timeout).await {
                Err(SinkError::Retriable(error)) => {
                    tracing::warn!(%error, bootstrap_servers = %kafka.bootstrap_servers, retry_in_ms = backoff.delay().as_millis() as u64, "Kafka cannot start the transactional producer yet; retrying");
                    tokio::time::sleep(backoff.delay()).await;
                    backoff.grow();
                }
                initialised => break initialised?,
            }
        }
        health.kafka_initialised();
        Ok(Self {
            producer,
            config,
            commit_timeout,
            in_transaction: false,
            doomed: None,
            health,
        })
    }

    /// Replaces the producer with a new one after a commit or abort whose
    /// outcome is unknown (timed out, or failed so the transaction cannot
    /// be aborted). The new producer's `init_transactions` bumps the epoch,
    /// which fences the old producer and makes the coordinator abort or
    /// complete whatever it left open, so nothing the old one did can land
    /// after we act on a later transaction. (Reusing the old producer is
    /// how a delayed EndTxn can hit a later transaction; see Jepsen's 2024
    /// Kafka analysis and KIP-890.)
    pub async fn recreate(&mut self) -> Result<(), SinkError> {
        let producer = init_producer(&self.config, self.commit_timeout, &self.health).await?;
        let old = std::mem::replace(&mut self.producer, producer);
        self.in_transaction = false;
        self.doomed = None;
        // Destroying a producer can wait on its brokers: not on this task.
        tokio::task::spawn_blocking(move || drop(old));
        Ok(())
    }

    /// Waits until this producer's metadata shows `topic` with a leader for
    /// every partition. Called for the state topic before the first
    /// transaction: a topic created moments ago (by this bridge or a
    /// sibling) may not be in the broker's metadata yet, and a producer
    /// that finds it missing holds records for it for up to
    /// `topic.metadata.propagation.max.ms` (30 s), stalling the first commit.
    pub async fn await_topic(&self, topic: &str) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        let (topic, timeout) = (topic.to_string(), self.commit_timeout);
        blocking("wait for the state topic", move || {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let ready = producer
                    .client()
                    .fetch_metadata(Some(&topic), timeout)
                    .is_ok_and(|m| super::ready_partitions(&m).is_some());
                if ready {
                    return Ok(());
                }
                // At the deadline (still missing, or Kafka unreachable)
                // the first commit deals with what remains.
                if std::time::Instant::now() >= deadline {
                    tracing::warn!(%topic, ?timeout, "the producer still does not see the state topic; going on, the first commit may wait for it");
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
    }

    /// The records refused for good since the last call (see
    /// [`Refusal`]); learnt from delivery reports, which the flush of a
    /// commit or an abort serves.
    pub fn take_refusals(&self) -> Vec<Refusal> {
        let reports = self.producer.context();
        *reports.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        std::mem::take(&mut *reports.refusals.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether any delivery has failed (refused or otherwise) since the
    /// last [`Self::take_refusals`].
    pub fn has_failures(&self) -> bool {
        let reports = self.producer.context();
        reports
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits until every record sent so far is delivered or failed, so
    /// that the next one travels alone (used to find which of several
    /// refused records is at fault). A flush that fails dooms the
    /// transaction: whoever gives up on sending the rest of it after this
    /// cannot commit it by mistake.
    pub async fn flush(&mut self) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        let timeout = self.commit_timeout;
        let flushed = blocking("flush", move || flush(&producer, timeout, OnFailure::Stop)).await;
        if let Err(SinkError::Abortable(error) | SinkError::Retriable(error)) = &flushed {
            self.doom(error.clone());
        }
        flushed
    }

    /// Makes the open transaction's commit fail (with `error`), so that it
    /// is aborted and produced again: for a record that could not be put
    /// in it.
    pub fn doom(&mut self, error: KafkaError) {
        self.doomed.get_or_insert(error);
    }

    /// Starts a transaction unless one is open.
    pub fn begin(&mut self) -> Result<(), SinkError> {
        if !self.in_transaction {
            // Reports of an earlier transaction are of no use any more.
            self.take_refusals();
            self.producer
                .begin_transaction()
                .map_err(SinkError::classify)?;
            self.in_transaction = true;
        }
        Ok(())
    }

    /// Enqueues one record in the open transaction (with a null value if
    /// `tombstone`); `id` comes back in a [`Refusal`] if the broker
    /// refuses it. Delivery is confirmed by the commit.
    ///
    /// A record librdkafka refuses to enqueue on its own account (too
    /// large, a topic it knows is missing) is [`SinkError::Rejected`]. Any
    /// other failure to enqueue dooms the transaction: its commit fails,
    /// so the batch is aborted and produced again, and a record that never
    /// left the bridge cannot be acknowledged as delivered.
    pub async fn send(
        &mut self,
        record: &Record,
        tombstone: bool,
        id: usize,
    ) -> Result<(), SinkError> {
        let sent = self.enqueue(record, tombstone, id).await;
        if let Err(SinkError::Abortable(error)) = &sent {
            self.doom(error.clone());
        }
        sent
    }

    async fn enqueue(
        &mut self,
        record: &Record,
        tombstone: bool,
        id: usize,
    ) -> Result<(), SinkError> {
        self.begin()?;
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut base = BaseRecord::<str, [u8], usize>::with_opaque_to(&record.topic, id)
            .headers(headers)
            .timestamp(record.timestamp_ms);
        if !tombstone {
            base = base.payload(record.value.as_ref());
        }
        if let Some(key) = &record.key {
            base = base.key(key.as_str());
        }
        loop {
            match self.producer.send(base) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // librdkafka's queue is full: serve delivery reports and
                    // give its threads a moment to drain it to the brokers.
                    base = back;
                    self.producer.poll(Duration::ZERO);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // E.g. over `message.max.bytes`, or for a topic librdkafka
                // has learnt does not exist (the first record to it is
                // refused in its delivery report, later ones here).
                Err((KafkaError::MessageProduction(code), _)) if refusal_kind(code).is_some() => {
                    return Err(SinkError::Rejected(code))
                }
                Err((error, _)) => return Err(SinkError::Abortable(error)),
            }
        }
    }

    /// Commits the open transaction: every record sent since `begin` becomes
    /// visible to `read_committed` consumers at once, or none does.
    pub async fn commit(&mut self) -> Result<(), SinkError> {
        // Kept until the abort: a commit asked for again still fails.
        if let Some(error) = &self.doomed {
            return Err(SinkError::Abortable(error.clone()));
        }
        if !self.in_transaction {
            return Ok(());
        }
        let producer = self.producer.clone();
        let timeout = self.commit_timeout;
        blocking("commit", move || {
            flush(&producer, timeout, OnFailure::Stop)?;
            fault::point(Point::BeforeCommit);
            fault::point_soon(Point::DuringCommit);
            producer.commit_transaction(timeout)
        })
        .await?;
        self.in_transaction = false;
        Ok(())
    }

    /// Aborts the open transaction; its records are discarded.
    pub async fn abort(&mut self) -> Result<(), SinkError> {
        self.doomed = None;
        if !self.in_transaction {
            return Ok(());
        }
        let producer = self.producer.clone();
        let timeout = self.commit_timeout;
        blocking("abort", move || {
            // Aborting waits for the delivery reports of every outstanding
            // record, and nothing else polls this producer: drop them from
            // the queues and serve their reports first.
            producer.purge(PurgeConfig::default().queue().inflight());
            flush(&producer, timeout, OnFailure::Wait)?;
            producer.abort_transaction(timeout)
        })
        .await?;
        self.in_transaction = false;
        Ok(())
    }
}

/// Waits until every record of the transaction is delivered, serving
/// delivery reports as they arrive; fails with the first failed delivery
/// once the transaction cannot commit.
///
/// rust-rdkafka's `commit_transaction` flushes first too, but its flush
/// polls in 100 ms steps, which put a 100 ms floor under every commit
/// (measured: flush 100.1 ms, EndTxn 3 ms, for 1 or 1 000 records). After
/// this flush nothing is in flight, so its own flush returns at once.
///
/// One failed delivery dooms the transaction (librdkafka refuses to
/// commit it), and from then on librdkafka sends none of its records
/// still queued, e.g. for a partition whose leader it was still looking
/// up: waiting for those held every such commit for the whole timeout,
/// 30 s for one refused record. So after a failure the flush waits only
/// [`AFTER_A_FAILURE`] more, for the reports of records already sent
/// (each refusal learnt now is one abort fewer), and then stops. Either
/// way the first failure is the commit's error, and no EndTxn is sent.
fn flush(producer: &Inner, timeout: Duration, on_failure: OnFailure) -> Result<(), KafkaError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut failed_since = None;
    while producer.in_flight_count() > 0 {
        let now = std::time::Instant::now();
        if now >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        if let (OnFailure::Stop, Some(failed)) = (on_failure, producer.context().failed()) {
            if now - *failed_since.get_or_insert(now) >= AFTER_A_FAILURE {
                return Err(failed);
            }
        }
        // Returns as soon as a delivery report is served.
        producer.poll(Duration::from_millis(10));
    }
    match (on_failure, producer.context().failed()) {
        (OnFailure::Stop, Some(failed)) => Err(failed),
        _ => Ok(()),
    }
}

/// What a [`flush`] does once a delivery has failed.
#[derive(Clone, Copy)]
enum OnFailure {
    /// Stop soon: the transaction cannot commit (before a commit).
    Stop,
    /// Wait for every report (an abort, which purged the queues first).
    Wait,
}

/// How long a flush goes on serving delivery reports after one failed.
const AFTER_A_FAILURE: Duration = Duration::from_millis(250);

/// A new producer, its `init_transactions` done.
async fn init_producer(
    config: &rdkafka::ClientConfig,
    timeout: Duration,
    health: &Arc<Health>,
) -> Result<Arc<Inner>, SinkError> {
    let producer = create_producer(config, health)?;
    init_transactions(&producer, timeout).await?;
    Ok(producer)
}

fn create_producer(
    config: &rdkafka::ClientConfig,
    health: &Arc<Health>,
) -> Result<Arc<Inner>, SinkError> {
    let producer: Arc<Inner> = Arc::new(
        config
            .create_with_context(Reports::new(health.clone()))
            .map_err(SinkError::Create)?,
    );
    tokio::spawn(serve_statistics(Arc::downgrade(&producer)));
    Ok(producer)
}

/// One `init_transactions` attempt, cut short if a broker refuses the
/// connection (authentication, TLS).
async fn init_transactions(producer: &Arc<Inner>, timeout: Duration) -> Result<(), SinkError> {
    let init = producer.clone();
    let refused = async {
        // Errors reach the context from `serve_statistics`'s polls.
        loop {
            if let Some(refused) = producer.context().refused() {
                return refused;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        initialised = blocking("init_transactions", move || init.init_transactions(timeout)) => initialised,
        refused = refused => Err(SinkError::Refused(refused)),
    }
}

/// The waits between `init_transactions` attempts at start-up.
const INIT_RETRY_FIRST: Duration = Duration::from_millis(200);
const INIT_RETRY_MAX: Duration = Duration::from_secs(5);

/// librdkafka's `statistics.interval.ms` unless configured.
const STATISTICS_EVERY_MS: &str = "1000";

/// Polls the producer between commits, so its statistics reach
/// [`Reports::stats`] also while the bridge is idle (librdkafka serves
/// callbacks only from a poll, and the sink polls only while it flushes).
/// Ends with the producer. A poll may serve delivery reports too; they
/// land in the same [`Reports`] whichever poll serves them.
async fn serve_statistics(producer: std::sync::Weak<Inner>) {
    let mut every = tokio::time::interval(Duration::from_millis(500));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(producer) = producer.upgrade() else {
            return;
        };
        producer.poll(Duration::ZERO);
        if Arc::strong_count(&producer) == 1 {
            // Dropped by the sink meanwhile: destroying it can wait on its
            // brokers, so not on this task.
            tokio::task::spawn_blocking(move || drop(producer));
            return;
        }
    }
}

/// How often a blocking Kafka call that is still running says so.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(5);

/// Runs a blocking librdkafka call on the blocking pool. While it runs past
/// [`STILL_WAITING_EVERY`], a warning says which call is waiting and for
/// how long: during a broker failover a commit can wait for seconds for a
/// new partition leader or transaction coordinator, and the log should
/// say so rather than go quiet.
async fn blocking(
    what: &'static str,
    call: impl FnOnce() -> Result<(), KafkaError> + Send + 'static,
) -> Result<(), SinkError> {
    let started = std::time::Instant::now();
    let mut task = tokio::task::spawn_blocking(call);
    let joined = loop {
        tokio::select! {
            joined = &mut task => break joined,
            _ = tokio::time::sleep(STILL_WAITING_EVERY) => tracing::warn!(
                call = what,
                waited_ms = started.elapsed().as_millis() as u64,
                "Kafka call still waiting (for a partition leader or the transaction coordinator)"
            ),
        }
    };
    match joined {
        Ok(result) => result.map_err(SinkError::classify),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coordinator's connection counts for its node, once; a
    /// bootstrap connection counts by its name; internal ones never.
    #[test]
    fn brokers_up_counts_each_node_once_the_coordinator_too() {
        let broker = |name: &str, nodeid: i32, source: &str, state: &str| {
            serde_json::json!({
                "name": name, "nodeid": nodeid, "nodename": name, "source": source,
                "state": state, "stateage": 0, "outbuf_cnt": 0, "outbuf_msg_cnt": 0,
                "waitresp_cnt": 0, "waitresp_msg_cnt": 0, "tx": 0, "txbytes": 0,
                "txerrs": 0, "txretries": 0, "txidle": 0, "req_timeouts": 0, "rx": 0,
                "rxbytes": 0, "rxerrs": 0, "rxcorriderrs": 0, "rxpartial": 0, "rxidle": 0,
                "zbuf_grow": 0, "buf_grow": 0, "wakeups": 0, "connects": 0,
                "disconnects": 0, "req": {}, "toppars": {}
            })
        };
        let stats = |brokers: Vec<serde_json::Value>| -> Statistics {
            let brokers: serde_json::Map<String, serde_json::Value> = brokers
                .into_iter()
                .map(|b| (b["name"].as_str().unwrap().to_string(), b))
                .collect();
            serde_json::from_value(serde_json::json!({
                "name": "p", "client_id": "c", "type": "producer", "ts": 0, "time": 0,
                "age": 0, "replyq": 0, "msg_cnt": 0, "msg_size": 0, "msg_max": 0,
                "msg_size_max": 0, "simple_cnt": 0, "metadata_cache_cnt": 0,
                "tx": 0, "tx_bytes": 0, "rx": 0, "rx_bytes": 0, "txmsgs": 0,
                "txmsg_bytes": 0, "rxmsgs": 0, "rxmsg_bytes": 0,
                "brokers": brokers, "topics": {}
            }))
            .expect("statistics")
        };
        let only_the_coordinator = stats(vec![
            broker("127.0.0.1:9092/bootstrap", -1, "configured", "DOWN"),
            broker("127.0.0.1:9092/1", 1, "learned", "DOWN"),
            broker("TxnCoordinator", 1, "logical", "UP"),
            broker(":0/internal", -1, "internal", "UP"),
        ]);
        assert_eq!(brokers_up(&only_the_coordinator), 1);
        let both = stats(vec![
            broker("127.0.0.1:9092/1", 1, "learned", "UP"),
            broker("TxnCoordinator", 1, "logical", "UP"),
            broker("127.0.0.1:9093/2", 2, "learned", "UPDATE"),
        ]);
        assert_eq!(brokers_up(&both), 2);
        let bootstrap = stats(vec![broker(
            "127.0.0.1:9092/bootstrap",
            -1,
            "configured",
            "UP",
        )]);
        assert_eq!(brokers_up(&bootstrap), 1);
        assert_eq!(brokers_up(&stats(vec![])), 0);
    }

    #[test]
    fn every_listed_refusal_is_one() {
        for code in REFUSALS {
            assert!(refusal_kind(code).is_some(), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::PurgeQueue,
        ] {
            assert!(refusal_kind(code).is_none(), "{code:?}");
        }
    }
}
