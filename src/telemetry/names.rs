//! Every metric the bridge exports: its name, help text and known labels.
//!
//! One list, so that `docs/metrics.md` can be checked against it (a test
//! scrapes a fresh bridge and compares both ways) and so that every known
//! series exists at 0 from start-up: a rate over a series that appears only
//! at its first increment misses that increment, and an alert on
//! `..._mqtt_connected == 0` must fire for a bridge that never connected.
//!
//! Names follow the Prometheus conventions: one prefix, base units in the
//! name (`_seconds`, `_bytes`), `_total` only on counters.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};

macro_rules! name {
    ($suffix:literal) => {
        concat!("mqtt_kafka_bridge_", $suffix)
    };
}

pub const BUILD_INFO: &str = name!("build_info");
pub const READY: &str = name!("ready");
pub const RECEIVED: &str = name!("messages_received_total");
pub const PRODUCED: &str = name!("messages_produced_total");
pub const DEAD_LETTERED: &str = name!("messages_dead_lettered_total");
pub const UNROUTED: &str = name!("messages_unrouted_total");
pub const OTHER_INSTANCE: &str = name!("messages_for_other_instances_total");
pub const STANDBY: &str = name!("standby");
pub const KEPT_ON_MQTT: &str = name!("messages_kept_on_mqtt_total");
pub const RELAYED: &str = name!("messages_relayed_total");
pub const DUPLICATES_DROPPED: &str = name!("duplicates_dropped_total");
pub const BEST_EFFORT: &str = name!("exactly_once_best_effort_total");
pub const KAFKA_REFUSED: &str = name!("kafka_records_refused_total");
pub const DEAD_LETTERS_LOST: &str = name!("dead_letters_refused_total");
pub const TX_COMMITTED: &str = name!("transactions_committed_total");
pub const TX_ABORTED: &str = name!("transactions_aborted_total");
pub const TX_SETTLED: &str = name!("transactions_settled_total");
pub const COMMIT_SECONDS: &str = name!("commit_duration_seconds");
pub const RECEIVE_TO_COMMIT_SECONDS: &str = name!("receive_to_commit_seconds");
pub const BATCH_MESSAGES: &str = name!("batch_messages");
pub const IN_FLIGHT: &str = name!("in_flight_messages");
pub const MQTT_CONNECTED: &str = name!("mqtt_connected");
pub const MQTT_SUBSCRIBED: &str = name!("mqtt_subscribed");
pub const MQTT_CONNECTION_LOSSES: &str = name!("mqtt_connection_losses_total");
pub const MQTT_CONNECT_FAILURES: &str = name!("mqtt_connect_failures_total");
pub const MQTT_RECEIVED_BYTES: &str = name!("mqtt_received_bytes_total");
pub const KAFKA_BROKERS_UP: &str = name!("kafka_brokers_up");
pub const KAFKA_PRODUCED_BYTES: &str = name!("kafka_produced_bytes_total");
pub const COMMANDS_DELIVERED: &str = name!("commands_delivered_total");
pub const COMMANDS_EXPIRED: &str = name!("commands_expired_total");
pub const COMMANDS_DEAD_LETTERED: &str = name!("commands_dead_lettered_total");
pub const COMMAND_CONSUMER_LAG: &str = name!("command_consumer_lag");
pub const CONFIG_RELOADS: &str = name!("config_reloads_total");
pub const CONFIG_RELOAD_OK: &str = name!("config_last_reload_successful");
pub const TLS_CERT_EXPIRY: &str = name!("tls_cert_expiry_seconds");
pub const SPARKPLUG_SEQ_GAPS: &str = name!("sparkplug_seq_gaps_total");
pub const SPARKPLUG_REBIRTHS: &str = name!("sparkplug_rebirths_requested_total");

/// Bucket bounds of the two latency histograms, in seconds: from a fast
/// local commit (about 1 ms) to past the default commit timeout.
pub(super) const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
pub(super) const BATCH_BUCKETS: &[f64] =
    &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// The label values known before any message arrives.
#[derive(Debug, Default, Clone)]
pub struct KnownLabels {
    /// Every route of the mapping files (Kafka and relay routes alike).
    pub routes: Vec<String>,
    /// Command routes (Kafka to MQTT).
    pub command_routes: Vec<String>,
    /// Kafka topics the command consumer reads.
    pub command_topics: Vec<String>,
    /// Every dead-letter reason.
    pub reasons: Vec<&'static str>,
    /// Every broker error that counts as a refusal of a record.
    pub kafka_refusals: Vec<String>,
}

/// Sets every series with a known label set to 0 (counters: registers them;
/// an existing counter keeps its value), so each exists from start-up. Run
/// again after a reload for the routes it added.
pub fn register(known: &KnownLabels) {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for name in [
        UNROUTED,
        OTHER_INSTANCE,
        KEPT_ON_MQTT,
        TX_COMMITTED,
        TX_ABORTED,
        MQTT_CONNECTION_LOSSES,
        MQTT_CONNECT_FAILURES,
        MQTT_RECEIVED_BYTES,
        KAFKA_PRODUCED_BYTES,
        SPARKPLUG_SEQ_GAPS,
        SPARKPLUG_REBIRTHS,
    ] {
        counter!(name).increment(0);
    }
    for name in [
        READY,
        STANDBY,
        MQTT_CONNECTED,
        MQTT_SUBSCRIBED,
        KAFKA_BROKERS_UP,
        IN_FLIGHT,
    ] {
        gauge!(name).increment(0.0);
    }
    for name in [COMMIT_SECONDS, RECEIVE_TO_COMMIT_SECONDS, BATCH_MESSAGES] {
        let _ = metrics::histogram!(name);
    }
    for qos in ["1", "2"] {
        counter!(DUPLICATES_DROPPED, "qos" => qos).increment(0);
    }
    for kind in ["qos0_message", "qos1_fingerprint"] {
        counter!(BEST_EFFORT, "kind" => kind).increment(0);
    }
    for outcome in ["committed", "aborted"] {
        counter!(TX_SETTLED, "outcome" => outcome).increment(0);
    }
    for result in ["success", "error"] {
        counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
    // The configuration running was loaded at start-up: successful until a
    // reload fails. (Registered again after a reload: left as it is.)
    gauge!(CONFIG_RELOAD_OK).increment(0.0);
    // The route label is empty for a defective packet, dead-lettered
    // whatever route it would match.
    for route in known.routes.iter().map(String::as_str).chain([""]) {
        counter!(RECEIVED, "route" => route.to_string()).increment(0);
        counter!(PRODUCED, "route" => route.to_string()).increment(0);
        counter!(DEAD_LETTERS_LOST, "route" => route.to_string()).increment(0);
        counter!(RELAYED, "route" => route.to_string()).increment(0);
        for reason in &known.reasons {
            counter!(DEAD_LETTERED, "route" => route.to_string(), "reason" => *reason).increment(0);
        }
    }
    for route in &known.command_routes {
        counter!(COMMANDS_DELIVERED, "route" => route.clone()).increment(0);
        counter!(COMMANDS_EXPIRED, "route" => route.clone()).increment(0);
        for reason in &known.reasons {
            counter!(COMMANDS_DEAD_LETTERED, "route" => route.clone(), "reason" => *reason)
                .increment(0);
        }
    }
    for error in &known.kafka_refusals {
        counter!(KAFKA_REFUSED, "error" => error.clone()).increment(0);
    }
    for topic in &known.command_topics {
        gauge!(COMMAND_CONSUMER_LAG, "topic" => topic.clone()).increment(0.0);
    }
}

/// Help text and units, shown as `# HELP` in the scrape.
pub(super) fn describe() {
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build is running"
    );
    describe_gauge!(
        READY,
        "1 when /readyz answers 200: MQTT subscribed, Kafka reachable, exactly-once state read, no commit stuck"
    );
    describe_gauge!(
        STANDBY,
        "1 while this bridge waits for its identity's lease (ha.mode: standby); 0 once it holds it, or without standby"
    );
    describe_counter!(RECEIVED, "MQTT messages matched by a route");
    describe_counter!(PRODUCED, "Records committed to their Kafka topic");
    describe_counter!(
        DEAD_LETTERED,
        "Messages committed to the dead-letter topic, by reason"
    );
    describe_counter!(UNROUTED, "MQTT messages that matched no route");
    describe_counter!(
        OTHER_INSTANCE,
        "MQTT messages a partitioned bridge acknowledged unproduced: another bridge of the group owns their key"
    );
    describe_counter!(
        KEPT_ON_MQTT,
        "MQTT messages in a declared M2M tree, never produced to Kafka"
    );
    describe_counter!(
        RELAYED,
        "MQTT messages republished to MQTT by a relay route"
    );
    describe_counter!(
        DUPLICATES_DROPPED,
        "Resent MQTT messages recognised as already in Kafka and not produced again, by QoS"
    );
    describe_counter!(
        BEST_EFFORT,
        "Exactly-once decisions that are best effort, by kind (qos0_message, qos1_fingerprint)"
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
        RECEIVE_TO_COMMIT_SECONDS,
        Unit::Seconds,
        "Time from a message's arrival off MQTT to the commit of its record"
    );
    describe_histogram!(
        BATCH_MESSAGES,
        Unit::Count,
        "Messages per committed transaction"
    );
    describe_gauge!(
        IN_FLIGHT,
        "MQTT messages (and QoS 2 releases) received and not yet acknowledged to the broker"
    );
    describe_gauge!(MQTT_CONNECTED, "1 while connected to the MQTT broker");
    describe_gauge!(
        MQTT_SUBSCRIBED,
        "1 while connected with every subscription granted"
    );
    describe_counter!(
        MQTT_CONNECTION_LOSSES,
        "Established MQTT connections that were lost"
    );
    describe_counter!(
        MQTT_CONNECT_FAILURES,
        "MQTT connection attempts that failed before CONNACK (refused, unreachable, TLS)"
    );
    describe_counter!(
        MQTT_RECEIVED_BYTES,
        Unit::Bytes,
        "Payload bytes of the MQTT messages the bridge took"
    );
    describe_gauge!(
        KAFKA_BROKERS_UP,
        "Kafka broker connections of the producer that are up (librdkafka statistics)"
    );
    describe_counter!(
        KAFKA_PRODUCED_BYTES,
        Unit::Bytes,
        "Key and value bytes of the records committed to Kafka (state records excluded)"
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
    describe_gauge!(
        COMMAND_CONSUMER_LAG,
        "Command records not yet read, summed over the topic's partitions (librdkafka statistics)"
    );
    describe_gauge!(
        CONFIG_RELOAD_OK,
        "0 after a reload was refused, until one succeeds (the files on disk are not what runs)"
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Configuration reloads, by result (success, error)"
    );
    describe_counter!(
        SPARKPLUG_SEQ_GAPS,
        "Sparkplug B seq gaps: messages of edge nodes lost before the bridge (each also asks for a rebirth)"
    );
    describe_counter!(
        SPARKPLUG_REBIRTHS,
        "Sparkplug B rebirth requests (NCMD Node Control/Rebirth) sent to edge nodes whose messages needed a birth the bridge had not seen"
    );
    describe_gauge!(
        TLS_CERT_EXPIRY,
        Unit::Seconds,
        "Seconds until the first certificate of a configured file expires (negative: expired), by connection (mqtt, kafka) and certificate (client, ca)"
    );
}
