//! Routing: from one MQTT message to the Kafka record it becomes.
//!
//! [`RouteTable::compile`] turns mapping files into routes once at start-up;
//! [`RouteTable::route`] is the per-message hot path shared by the running
//! bridge and the `translate` dry run, so what `translate` shows is exactly
//! what the bridge would produce.
//!
//! Precedence: the first route whose filter (and regex, if any) matches wins,
//! in mapping-file order (files sorted by path) then route order in the file.

mod filter;
mod format;
mod index;
mod table;
mod template;
mod transform;

pub use filter::TopicFilter;
pub use table::{RouteSummary, RouteTable, Subscription};
pub use template::{Context, Template, TemplateError};

use crate::mqtt::{MqttMessage, OutgoingPublish};
use bytes::Bytes;
use std::fmt;

/// One record to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaRecord {
    pub topic: String,
    pub key: Option<String>,
    pub value: Bytes,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: i64,
}

impl KafkaRecord {
    /// The value of the first header with this name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Produce this record; `route` indexes [`RouteTable::routes`].
    Forward { route: usize, record: KafkaRecord },
    /// A relay route: publish this back to MQTT; nothing goes to Kafka.
    Relay {
        route: usize,
        publish: OutgoingPublish,
    },
    /// The message is bad: produce it to the dead-letter topic instead.
    DeadLetter {
        route: Option<usize>,
        record: KafkaRecord,
        rejection: Rejection,
    },
    /// No route matched; the message is acknowledged and dropped.
    Unrouted,
    /// The topic is in a declared M2M tree: it stays on MQTT, whatever
    /// route would match it.
    KeptOnMqtt,
}

/// Which rule a rejected message broke. The label values of
/// `bridge_messages_dead_lettered_total{reason}`, so the set stays small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    TooLarge,
    NotUtf8,
    Parse,
    Schema,
    Transform,
    Key,
    Topic,
    Header,
    Timestamp,
    /// Kafka itself refused the record (e.g. over `message.max.bytes`).
    KafkaRejected,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::NotUtf8 => "not_utf8",
            Self::Parse => "parse",
            Self::Schema => "schema",
            Self::Transform => "transform",
            Self::Key => "key",
            Self::Topic => "topic",
            Self::Header => "header",
            Self::Timestamp => "timestamp",
            Self::KafkaRejected => "kafka_rejected",
        }
    }
}

/// Why a message went to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    /// Human-readable detail, e.g. the schema validator's message.
    pub detail: String,
    /// JSON pointer into the payload where the problem is, when known.
    pub path: Option<String>,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            path: None,
        }
    }

    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

/// Header names the bridge writes. MQTT user properties with these names
/// (or any `bridge.` name) are not carried over, so a device cannot forge
/// the source topic or a dead-letter reason.
pub mod headers {
    pub fn is_reserved(name: &str) -> bool {
        name == MQTT_TOPIC || name == CONTENT_TYPE || name.starts_with("bridge.")
    }

    pub const MQTT_TOPIC: &str = "mqtt.topic";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const ROUTE: &str = "bridge.route";
    pub const ERROR_REASON: &str = "bridge.error.reason";
    pub const ERROR_DETAIL: &str = "bridge.error.detail";
    pub const ERROR_PATH: &str = "bridge.error.path";
}

/// Kafka's own rule for topic names.
pub fn is_valid_kafka_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Builds the dead-letter record for a message: the original bytes, keyed by
/// the MQTT topic so one device's failures stay in order, with the reason in
/// headers.
pub(crate) fn dead_letter_record(
    topic: &str,
    route: Option<&str>,
    message: &MqttMessage,
    rejection: &Rejection,
) -> KafkaRecord {
    let mut headers = Vec::with_capacity(5 + message.user_properties.len());
    headers.push((
        headers::MQTT_TOPIC.to_string(),
        message.topic.as_bytes().to_vec(),
    ));
    if let Some(route) = route {
        headers.push((headers::ROUTE.to_string(), route.as_bytes().to_vec()));
    }
    headers.push((
        headers::ERROR_REASON.to_string(),
        rejection.reason.as_str().as_bytes().to_vec(),
    ));
    headers.push((
        headers::ERROR_DETAIL.to_string(),
        rejection.detail.as_bytes().to_vec(),
    ));
    if let Some(path) = &rejection.path {
        headers.push((headers::ERROR_PATH.to_string(), path.as_bytes().to_vec()));
    }
    for (k, v) in message
        .user_properties
        .iter()
        .filter(|(k, _)| !headers::is_reserved(k))
    {
        headers.push((k.clone(), v.as_bytes().to_vec()));
    }
    KafkaRecord {
        topic: topic.to_string(),
        key: Some(message.topic.clone()),
        value: message.payload.clone(),
        headers,
        timestamp_ms: message.received_at.timestamp_millis(),
    }
}
