//! Metrics and the events that feed them.
//!
//! Every event is one function that both counts (Prometheus, through the
//! `metrics` facade) and, where useful, logs; names live here as constants so
//! dashboards have one place to look. Labels are bounded: route names and
//! rejection reasons, never device ids or raw topics.
//!
//! The same events also update `Stats`, plain atomics the `demo` reads for
//! its one-line summary without scraping its own endpoint.

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const RECEIVED: &str = "bridge_messages_received_total";
pub const PRODUCED: &str = "bridge_messages_produced_total";
pub const DEAD_LETTERED: &str = "bridge_messages_dead_lettered_total";
pub const UNROUTED: &str = "bridge_messages_unrouted_total";
pub const KEPT_ON_MQTT: &str = "bridge_messages_kept_on_mqtt_total";
pub const TX_COMMITTED: &str = "bridge_transactions_committed_total";
pub const TX_ABORTED: &str = "bridge_transactions_aborted_total";
pub const TX_SETTLED: &str = "bridge_transactions_settled_total";
pub const COMMIT_SECONDS: &str = "bridge_commit_duration_seconds";
pub const BATCH_MESSAGES: &str = "bridge_batch_messages";
pub const MQTT_CONNECTED: &str = "bridge_mqtt_connected";
pub const MQTT_RECONNECTS: &str = "bridge_mqtt_reconnects_total";
pub const DUPLICATES_DROPPED: &str = "bridge_duplicates_dropped_total";
pub const BEST_EFFORT: &str = "bridge_exactly_once_best_effort_total";
pub const RELAYED: &str = "bridge_messages_relayed_total";
pub const COMMANDS_DELIVERED: &str = "bridge_commands_delivered_total";
pub const COMMANDS_EXPIRED: &str = "bridge_commands_expired_total";
pub const COMMANDS_DEAD_LETTERED: &str = "bridge_commands_dead_lettered_total";
pub const KAFKA_REFUSED: &str = "bridge_kafka_records_refused_total";
pub const DEAD_LETTERS_LOST: &str = "bridge_dead_letters_refused_total";

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

/// Starts the Prometheus endpoint. Must run inside the tokio runtime.
pub fn serve_metrics(listen: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(
            Matcher::Full(COMMIT_SECONDS.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_MESSAGES.into()),
            &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0],
        )?
        .install()?;
    describe();
    tracing::info!(%listen, "serving Prometheus metrics on /metrics");
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(RECEIVED, "MQTT messages matched by a route");
    describe_counter!(PRODUCED, "Records committed to their Kafka topic");
    describe_counter!(
        DEAD_LETTERED,
        "Messages committed to the dead-letter topic, by reason"
    );
    describe_counter!(UNROUTED, "MQTT messages that matched no route");
    describe_counter!(
        KEPT_ON_MQTT,
        "MQTT messages in a declared M2M tree, never produced to Kafka"
    );
    describe_counter!(
        KAFKA_REFUSED,
        "Records Kafka refused for good (replaced by a dead-letter record), by broker error"
    );
    describe_counter!(
        DEAD_LETTERS_LOST,
        "Messages whose dead-letter record and stub Kafka both refused: acknowledged without a trace in Kafka (see the error log)"
    );
    describe_counter!(TX_COMMITTED, "Kafka transactions committed");
    describe_counter!(TX_ABORTED, "Kafka transactions aborted");
    describe_counter!(
        TX_SETTLED,
        "Kafka transactions whose commit or abort ended without a verdict, by what they turned out to be"
    );
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "Time to commit one Kafka transaction"
    );
    describe_histogram!(
        BATCH_MESSAGES,
        Unit::Count,
        "Messages per committed transaction"
    );
    describe_gauge!(MQTT_CONNECTED, "1 while connected to the MQTT broker");
    describe_counter!(MQTT_RECONNECTS, "MQTT connections lost");
    describe_counter!(
        DUPLICATES_DROPPED,
        "Resent MQTT messages recognised as already in Kafka and not produced again, by QoS"
    );
    describe_counter!(
        COMMANDS_DELIVERED,
        "Kafka commands acknowledged by the MQTT broker"
    );
    describe_counter!(
        COMMANDS_EXPIRED,
        "Kafka commands older than their TTL, not delivered"
    );
    describe_counter!(
        COMMANDS_DEAD_LETTERED,
        "Invalid Kafka commands sent to the dead-letter topic, by reason"
    );
    describe_counter!(
        BEST_EFFORT,
        "Exactly-once decisions that are best effort, by kind (qos0_message, qos1_fingerprint)"
    );
}

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

/// A command from Kafka was acknowledged by the MQTT broker.
pub fn command_delivered(route: &str) {
    counter!(COMMANDS_DELIVERED, "route" => route.to_string()).increment(1);
    STATS.commands_delivered.fetch_add(1, Ordering::Relaxed);
}

/// A command older than its route's TTL was dropped.
pub fn command_expired(route: &str) {
    counter!(COMMANDS_EXPIRED, "route" => route.to_string()).increment(1);
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

/// The MQTT connection came up.
pub fn mqtt_connected(session_present: bool) {
    tracing::info!(session_present, "connected to MQTT broker");
    gauge!(MQTT_CONNECTED).set(1.0);
}

/// The MQTT connection went down.
pub fn mqtt_disconnected(error: &dyn std::fmt::Display) {
    tracing::warn!(%error, "MQTT connection lost; reconnecting");
    gauge!(MQTT_CONNECTED).set(0.0);
    counter!(MQTT_RECONNECTS).increment(1);
}
