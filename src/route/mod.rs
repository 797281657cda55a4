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
pub mod reject;
pub(crate) mod strict_json;
mod table;
mod template;
mod transform;

pub use filter::TopicFilter;
pub use reject::{headers, RejectReason, Rejection};
pub use table::{RouteSummary, RouteTable, Subscription};
pub use template::{topic_level_problem, Context, Template, TemplateError, MQTT_TOPIC_MAX_BYTES};

use crate::mqtt::OutgoingPublish;
use bytes::Bytes;

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
