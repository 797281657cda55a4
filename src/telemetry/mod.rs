//! Metrics and the events that feed them.
//!
//! Every event is one function that both counts (Prometheus, through the
//! `metrics` facade) and, where useful, logs. The names and help texts are
//! in `names.rs` (one list for dashboards, alerts and docs/metrics.md); the
//! `/readyz` verdict in `health.rs` ([`Health`]); the HTTP listener in
//! `server.rs` ([`serve`]); log output in `logging.rs`. Labels are bounded: route names, topics from the
//! configuration and rejection reasons, never device ids or raw MQTT topics.
//!
//! The same events also update `Stats`, plain atomics the `demo` reads for
//! its one-line summary without scraping its own endpoint.

mod health;
mod logging;
mod names;
mod server;

pub use health::{Check, Health, Readiness, DEFAULT_MAX_COMMIT_WAIT};
pub use logging::{init as init_logging, LogFormat};
pub use names::*;
pub use server::{serve, ServeError};

use metrics::{counter, gauge, histogram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Process-wide counters for the demo's live summary.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub received: AtomicU64,
    pub produced: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub unrouted: AtomicU64,
    pub kept_on_mqtt: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub commands_delivered: AtomicU64,
    pub relayed: AtomicU64,
    pub commits: AtomicU64,
    pub aborts: AtomicU64,
    /// Transactions whose outcome was unknown and had to be settled.
    pub settled: AtomicU64,
    /// Sum of commit durations in microseconds, for a mean over an interval.
    pub commit_micros: AtomicU64,
}

pub(crate) static STATS: Stats = Stats {
    received: AtomicU64::new(0),
    produced: AtomicU64::new(0),
    dead_lettered: AtomicU64::new(0),
    unrouted: AtomicU64::new(0),
    kept_on_mqtt: AtomicU64::new(0),
    duplicates_dropped: AtomicU64::new(0),
    commands_delivered: AtomicU64::new(0),
    relayed: AtomicU64::new(0),
    commits: AtomicU64::new(0),
    aborts: AtomicU64::new(0),
    settled: AtomicU64::new(0),
    commit_micros: AtomicU64::new(0),
};

/// The handle of `route`'s received counter, to keep. Looking a labelled
/// counter up per message allocates its label and hashes it every time.
pub fn received_counter(route: &str) -> metrics::Counter {
    counter!(RECEIVED, "route" => route.to_string())
}

/// A message matched the route whose counter this is.
pub fn message_received_on(counter: &metrics::Counter) {
    counter.increment(1);
    STATS.received.fetch_add(1, Ordering::Relaxed);
}

/// A message matched no route.
pub fn message_unrouted(topic: &str) {
    tracing::debug!(topic, "message matched no route");
    counter!(UNROUTED).increment(1);
    STATS.unrouted.fetch_add(1, Ordering::Relaxed);
}

/// A partitioned bridge left a message to the bridge that owns its key.
pub fn message_for_another_instance() {
    counter!(OTHER_INSTANCE).increment(1);
}

/// A message in an M2M tree was acknowledged and left on MQTT.
pub fn message_kept_on_mqtt(topic: &str) {
    tracing::debug!(topic, "M2M message kept on MQTT");
    counter!(KEPT_ON_MQTT).increment(1);
    STATS.kept_on_mqtt.fetch_add(1, Ordering::Relaxed);
}

/// A resent message was recognised as already in Kafka. At QoS 1 the
/// decision rests on the fingerprint: a best-effort one.
pub fn duplicate_dropped(qos: u8, exact: bool) {
    tracing::debug!(
        qos,
        exact,
        "resent message already in Kafka; not produced again"
    );
    counter!(DUPLICATES_DROPPED, "qos" => if qos == 2 { "2" } else { "1" }).increment(1);
    STATS.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
    if !exact {
        best_effort("qos1_fingerprint");
    }
}

/// An exactly-once decision that cannot be exact.
pub fn best_effort(kind: &'static str) {
    counter!(BEST_EFFORT, "kind" => kind).increment(1);
}

/// A relay route republished a message to MQTT.
pub fn message_relayed(route: &str) {
    counter!(RELAYED, "route" => route.to_string()).increment(1);
    STATS.relayed.fetch_add(1, Ordering::Relaxed);
}

/// Sparkplug `seq` gaps: messages of edge nodes were lost on the way.
pub fn sparkplug_seq_gaps(gaps: u64) {
    counter!(SPARKPLUG_SEQ_GAPS).increment(gaps);
}

/// An edge node was asked to publish its birth certificate again.
pub fn sparkplug_rebirth_requested(group: &str, edge_node: &str) {
    tracing::info!(
        group,
        edge_node,
        "asking a Sparkplug edge node for a rebirth"
    );
    counter!(SPARKPLUG_REBIRTHS).increment(1);
}

/// A command from Kafka was acknowledged by the MQTT broker.
pub fn command_delivered(route: &str) {
    counter!(COMMANDS_DELIVERED, "route" => route.to_string()).increment(1);
    STATS.commands_delivered.fetch_add(1, Ordering::Relaxed);
}

/// A command older than its route's TTL was dropped.
pub fn command_expired(route: &str) {
    counter!(COMMANDS_EXPIRED, "route" => route.to_string()).increment(1);
}

/// The command consumer's lag on `topic`, from librdkafka's statistics.
pub fn command_consumer_lag(topic: &str, lag: i64) {
    gauge!(COMMAND_CONSUMER_LAG, "topic" => topic.to_string()).set(lag as f64);
}

/// An invalid command went to the dead-letter topic.
pub fn command_dead_lettered(route: &str, reason: &'static str) {
    counter!(COMMANDS_DEAD_LETTERED, "route" => route.to_string(), "reason" => reason).increment(1);
}

/// A transaction committed: count what it made visible.
pub fn committed(
    duration: Duration,
    messages: usize,
    produced: &[(String, u64)],
    dead_lettered: &[((String, &'static str), u64)],
) {
    counter!(TX_COMMITTED).increment(1);
    histogram!(COMMIT_SECONDS).record(duration.as_secs_f64());
    histogram!(BATCH_MESSAGES).record(messages as f64);
    STATS.commits.fetch_add(1, Ordering::Relaxed);
    STATS
        .commit_micros
        .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    for (route, n) in produced {
        counter!(PRODUCED, "route" => route.clone()).increment(*n);
        STATS.produced.fetch_add(*n, Ordering::Relaxed);
    }
    for ((route, reason), n) in dead_lettered {
        counter!(DEAD_LETTERED, "route" => route.clone(), "reason" => *reason).increment(*n);
        STATS.dead_lettered.fetch_add(*n, Ordering::Relaxed);
    }
}

/// Kafka refused a record for good (`code` is the broker's error); it is
/// replaced by its dead-letter record, or that by a stub.
pub fn kafka_refused(code: rdkafka::types::RDKafkaErrorCode, topic: &str) {
    tracing::debug!(?code, topic, "Kafka refused a record; dead-lettering it");
    counter!(KAFKA_REFUSED, "error" => format!("{code:?}")).increment(1);
}

/// Kafka refused even the dead-letter stub of a message: nothing of it
/// reaches Kafka. Only a dead-letter topic that is missing or not writable
/// gets here: a configuration problem, logged at error level.
pub fn dead_letter_lost(route: &str, topic: &str, code: rdkafka::types::RDKafkaErrorCode) {
    tracing::error!(route, dead_letter_topic = topic, ?code, "Kafka refused a dead-letter stub; the message is acknowledged without a record (check that the dead-letter topic exists and is writable)");
    counter!(DEAD_LETTERS_LOST, "route" => route.to_string()).increment(1);
}

/// A transaction was aborted; its messages will be produced again.
pub fn aborted(error: &dyn std::fmt::Display) {
    tracing::warn!(%error, "Kafka transaction aborted; retrying the batch");
    counter!(TX_ABORTED).increment(1);
    STATS.aborts.fetch_add(1, Ordering::Relaxed);
}

/// A transaction whose commit or abort ended without a verdict turned
/// out `committed` or `aborted` (then its batch is produced again).
pub fn settled(outcome: &'static str) {
    tracing::info!(outcome, "transaction with an unknown outcome settled");
    counter!(TX_SETTLED, "outcome" => outcome).increment(1);
    STATS.settled.fetch_add(1, Ordering::Relaxed);
}

/// The MQTT connection came up; `subscribing` unless there is nothing to
/// subscribe to.
pub fn mqtt_connected(health: &Health, session_present: bool, subscribing: bool) {
    tracing::info!(session_present, "connected to MQTT broker");
    health.mqtt_connected(subscribing);
}

/// The broker answered the SUBSCRIBE; `refused` filters were refused.
pub fn mqtt_subscribed(health: &Health, refused: usize) {
    if refused > 0 {
        tracing::error!(
            refused,
            "the MQTT broker refused subscriptions; not ready (check the broker's ACL)"
        );
    } else {
        tracing::info!("MQTT subscriptions in place");
    }
    health.mqtt_subscribed(refused.try_into().unwrap_or(u32::MAX));
}

/// An established MQTT connection went down.
pub fn mqtt_lost(health: &Health, error: &dyn std::fmt::Display) {
    tracing::warn!(%error, "MQTT connection lost; reconnecting");
    health.mqtt_lost();
    counter!(MQTT_CONNECTION_LOSSES).increment(1);
}

/// A connection attempt failed before the broker accepted the session.
pub fn mqtt_connect_failed(
    health: &Health,
    error: &dyn std::fmt::Display,
    retry_in: std::time::Duration,
) {
    tracing::warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "cannot connect to MQTT broker; retrying");
    health.mqtt_lost();
    counter!(MQTT_CONNECT_FAILURES).increment(1);
}

/// Handles of the per-message series, looked up once: a labelled lookup
/// per message allocates its label and hashes it every time.
pub struct MessageCounters {
    received_bytes: metrics::Counter,
    produced_bytes: metrics::Counter,
    in_flight: metrics::Gauge,
    receive_to_commit: metrics::Histogram,
}

impl Default for MessageCounters {
    fn default() -> Self {
        Self {
            received_bytes: counter!(MQTT_RECEIVED_BYTES),
            produced_bytes: counter!(KAFKA_PRODUCED_BYTES),
            in_flight: gauge!(IN_FLIGHT),
            receive_to_commit: histogram!(RECEIVE_TO_COMMIT_SECONDS),
        }
    }
}

impl MessageCounters {
    /// A message's payload arrived off MQTT.
    pub fn received_bytes(&self, bytes: usize) {
        self.received_bytes.increment(bytes as u64);
    }

    /// Acks owed to the broker right now.
    pub fn in_flight(&self, owed: usize) {
        self.in_flight.set(owed as f64);
    }

    /// A transaction committed records of `bytes` in all.
    pub fn produced_bytes(&self, bytes: u64) {
        self.produced_bytes.increment(bytes);
    }

    /// A message's record committed `wait` after the message arrived.
    pub fn waited(&self, wait: Duration) {
        self.receive_to_commit.record(wait.as_secs_f64());
    }
}

/// A configuration reload was tried.
pub fn config_reloaded(ok: bool) {
    let result = if ok { "success" } else { "error" };
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
    gauge!(CONFIG_RELOAD_OK).set(if ok { 1.0 } else { 0.0 });
}

/// The configuration loaded at start-up is in use.
pub fn config_loaded() {
    gauge!(CONFIG_RELOAD_OK).set(1.0);
}

/// The certificate files in use, whose expiry each scrape reports.
static CERTIFICATES: std::sync::Mutex<Vec<crate::tls::CertificateInUse>> =
    std::sync::Mutex::new(Vec::new());

/// `connection`'s certificates are now `certificates` (start-up; a reload
/// that read renewed MQTT files). Sets their gauges at once.
pub fn certificates_in_use(connection: &str, certificates: &[crate::tls::CertificateInUse]) {
    {
        let mut all = CERTIFICATES.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|c| c.connection != connection);
        all.extend(
            certificates
                .iter()
                .filter(|c| c.connection == connection)
                .cloned(),
        );
    }
    refresh_certificate_expiry();
}

/// Sets the expiry gauges to the time left now: a countdown, so an alert
/// needs no `time()` arithmetic (`..._tls_cert_expiry_seconds < 14 * 86400`).
pub fn refresh_certificate_expiry() {
    let now = std::time::SystemTime::now();
    let all = CERTIFICATES.lock().unwrap_or_else(|e| e.into_inner());
    for cert in all.iter() {
        gauge!(TLS_CERT_EXPIRY, "connection" => cert.connection, "certificate" => cert.role.as_str())
            .set(cert.expiry.seconds_left(now) as f64);
    }
}
