//! The bridge's view of one MQTT PUBLISH, independent of protocol version.

use super::Qos;
use bytes::Bytes;
use chrono::{DateTime, Utc};

/// A received message with the metadata routes may use.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttMessage {
    pub topic: String,
    /// Reference-counted: the same bytes become the Kafka value when the
    /// route does not reshape the payload.
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    /// Set by the broker on redelivery; informational only.
    pub dup: bool,
    /// MQTT 5 user properties, in the order received.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    pub received_at: DateTime<Utc>,
    /// Set when the packet arrived well framed but could not be taken as it
    /// is; the message is dead-lettered, never routed.
    pub defect: Option<Defect>,
}

/// Why a received PUBLISH cannot be routed, whatever its route says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Defect {
    /// The packet was over `limits.max_packet_bytes`: its payload was
    /// discarded as it streamed in, so memory stays bounded. `payload` is
    /// empty; this is what is known of the original.
    TooLarge {
        packet_bytes: usize,
        payload_bytes: usize,
        sha256: [u8; 32],
    },
    /// A topic that is not UTF-8 (MQTT requires it; a broker that does not
    /// check, typically for MQTT 3.1.1, passes it on); `topic` holds it with
    /// invalid bytes replaced.
    TopicNotUtf8,
    /// The packet's framing holds but a part of it cannot be read (an
    /// MQTT 5 property block whose length runs past the packet): the
    /// message is taken without payload, so the connection survives.
    Malformed(&'static str),
}

impl MqttMessage {
    /// A QoS 1 message received now; for tests, `translate` and the demo.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            qos: Qos::AtLeastOnce,
            retain: false,
            dup: false,
            user_properties: Vec::new(),
            content_type: None,
            received_at: Utc::now(),
            defect: None,
        }
    }
}
