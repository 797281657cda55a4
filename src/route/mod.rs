//! Routing: from one MQTT message to the Kafka record it becomes.
//!
//! [`RouteTable::compile`] turns mapping files into routes once at start-up;
//! [`RouteTable::route`] is the per-message hot path shared by the running
//! bridge and the `translate` dry run, so what `translate` shows is exactly
//! what the bridge would produce.
//!
//! Precedence: the first route whose filter (and regex, if any) matches wins,
//! in mapping-file order (files sorted by path) then route order in the file.

mod compile;
mod filter;
mod format;
mod index;
mod protobuf;
mod record;
pub mod reject;
pub mod schema;
mod sparkplug;
pub(crate) mod strict_json;
mod table;
mod template;
mod transform;

pub use compile::RouteSummary;
pub use filter::TopicFilter;
pub use protobuf::ProtobufFormat;
pub use reject::{headers, RejectReason, Rejection};
pub use table::RouteTable;
pub use template::{topic_level_problem, Context, Template, TemplateError, MQTT_TOPIC_MAX_BYTES};

use crate::kafka;
use crate::mqtt::OutgoingPublish;

/// What to do with one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Produce this record, and the route's records in `also` (more
    /// metrics of a Sparkplug message, its node's online state) in the
    /// same transaction; `route` indexes [`RouteTable::routes`].
    Forward {
        route: usize,
        record: kafka::Record,
        also: Vec<kafka::Record>,
    },
    /// A relay route: publish this back to MQTT; nothing goes to Kafka.
    Relay {
        route: usize,
        publish: OutgoingPublish,
    },
    /// The message is bad: produce it to the dead-letter topic instead.
    DeadLetter {
        route: Option<usize>,
        record: kafka::Record,
        rejection: Rejection,
        /// The route's records that stand whatever became of the message:
        /// a Sparkplug node's online state, which decoding it changed.
        also: Vec<kafka::Record>,
    },
    /// No route matched; the message is acknowledged and dropped.
    Unrouted,
    /// The topic is in a declared M2M tree: it stays on MQTT, whatever
    /// route would match it.
    KeptOnMqtt,
}

#[cfg(test)]
mod tests;
