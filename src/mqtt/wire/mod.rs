//! The MQTT packets the bridge exchanges, for either protocol version.
//!
//! Encoding, and decoding of the broker's control packets, are rumqttc's
//! (`mqttbytes`); this module maps its two packet families (3.1.1 and 5)
//! onto the few packets the session needs, so the session's protocol logic
//! is written once.
//!
//! PUBLISH and the publish acks are decoded here, because what a device
//! sent must never break the connection (the broker would redeliver it on
//! every reconnect, forever):
//!
//! - A PUBLISH that is well framed but not valid as it stands (a topic that
//!   is not UTF-8) still becomes a message, marked with its [`Defect`], so
//!   it is acknowledged in order and dead-lettered.
//! - A PUBLISH over the decoder's packet limit is never held whole: its
//!   variable header is read, and its payload hashed and dropped as it
//!   arrives ([`Defect::TooLarge`]).
//! - PUBACK and PUBREC keep their MQTT 5 reason code, whatever it is, so a
//!   broker's refusal reaches whoever published.
//!
//! One file per direction: `encode` writes our packets, `decode` frames
//! and reads the broker's, and `publish` reads a PUBLISH's variable header
//! and MQTT 5 properties, where hostile input is most likely.

mod decode;
mod encode;
mod publish;
#[cfg(test)]
pub(super) mod testing;

pub use decode::Decoder;
pub use encode::Wire;

use super::MqttMessage;
use super::{MqttProtocol, Qos};
use bytes::Bytes;

/// MQTT's largest packet (the remaining length's four-byte limit).
pub const MAX_PACKET_BYTES: u32 = 268_435_455;

/// Default for the largest PUBLISH the decoder holds in memory
/// (`limits.max_packet_bytes`).
pub const DEFAULT_MAX_PACKET_BYTES: usize = 2 * 1024 * 1024;

/// User properties of one PUBLISH kept in memory. A device can pack about
/// half a million empty ones into a 2 MiB packet; one more than this is
/// kept, so the count still exceeds any `limits.max_user_properties` (at
/// most this, checked at load) and the message is refused as `too_large`.
pub const MAX_KEPT_USER_PROPERTIES: usize = 1024;

/// The broker's packets other than PUBLISH are small (acks, CONNACK,
/// SUBACK, DISCONNECT); a longer one is not buffered.
const MAX_CONTROL_PACKET_BYTES: usize = 64 * 1024;

/// MQTT 5 reason codes of 0x80 and above are failures.
pub const FIRST_FAILURE_CODE: u8 = 0x80;

/// Why a byte stream from the broker cannot be read as MQTT (or our packet
/// cannot be encoded): the connection ends.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed MQTT 3.1.1 packet: {0}")]
    V311(#[from] rumqttc::mqttbytes::Error),
    #[error("malformed MQTT 5 packet: {0}")]
    V5(#[from] rumqttc::v5::mqttbytes::Error),
    #[error("malformed MQTT packet: {0}")]
    Malformed(&'static str),
    #[error("an MQTT packet of type {packet_type} and {bytes} bytes from the broker; control packets over {MAX_CONTROL_PACKET_BYTES} bytes are not read")]
    ControlTooLarge { packet_type: u8, bytes: usize },
}

/// A packet from the broker, as far as the bridge cares.
#[derive(Debug)]
pub enum Inbound {
    ConnAck {
        session_present: bool,
        /// Why the broker refused the connection, if it did.
        refused: Option<String>,
        /// MQTT 5: how many of our QoS 1/2 publishes the broker takes in
        /// flight at once.
        receive_maximum: Option<u16>,
        /// MQTT 5: the largest packet the broker accepts; it disconnects a
        /// client that sends a larger one.
        max_packet_size: Option<u32>,
        /// MQTT 5: the keep-alive the broker holds us to instead of ours.
        server_keep_alive: Option<u16>,
        /// MQTT 5: the highest QoS the broker takes in our publishes.
        max_qos: Option<u8>,
        /// MQTT 5: whether the broker takes retained publishes.
        retain_available: Option<bool>,
    },
    Publish {
        packet_id: u16,
        message: MqttMessage,
    },
    /// QoS 2, second half: the broker releases a packet id it published.
    PubRel(u16),
    /// Acks of our own publishes, with their MQTT 5 reason code (0 on
    /// MQTT 3.1.1, or when the broker left it out).
    PubAck {
        packet_id: u16,
        reason: u8,
    },
    PubRec {
        packet_id: u16,
        reason: u8,
    },
    PubComp(u16),
    /// How many filters of a SUBSCRIBE the broker refused.
    SubAck {
        refused: usize,
    },
    PingResp,
    /// MQTT 5: the broker closes the connection and says why.
    Disconnect(String),
    /// Anything else the bridge ignores.
    Other,
}

/// A packet to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    /// QoS 2 of our own publish: the broker has it, release the id.
    PubRel(u16),
    PingReq,
    Disconnect,
}

/// One of our own messages to the broker (relays, commands from Kafka).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingPublish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
}

/// The name MQTT 5 gives a PUBACK or PUBREC reason code.
pub fn reason_code_name(code: u8) -> &'static str {
    match code {
        0x00 => "Success",
        0x10 => "NoMatchingSubscribers",
        0x80 => "UnspecifiedError",
        0x83 => "ImplementationSpecificError",
        0x87 => "NotAuthorized",
        0x90 => "TopicNameInvalid",
        0x91 => "PacketIdentifierInUse",
        0x97 => "QuotaExceeded",
        0x99 => "PayloadFormatInvalid",
        _ => "Unknown",
    }
}

/// Why one of our own publishes cannot go out as it is, if it cannot: the
/// broker would take a malformed PUBLISH for a protocol error and
/// disconnect, and the session would resend it first on every reconnect.
pub fn outgoing_problem(publish: &OutgoingPublish) -> Option<&'static str> {
    if publish.topic.is_empty() {
        Some("the topic is empty")
    } else if publish.topic.len() > usize::from(u16::MAX) {
        Some("the topic is over 65535 bytes")
    } else if publish.topic.contains(['+', '#']) {
        Some("the topic holds a wildcard (`+` or `#`)")
    } else if publish.topic.contains('\0') {
        Some("the topic holds U+0000")
    } else {
        None
    }
}

/// Bytes of the PUBLISH that carries `publish` (fixed header included).
pub fn publish_size(protocol: MqttProtocol, publish: &OutgoingPublish) -> usize {
    let mut remaining = 2 + publish.topic.len() + publish.payload.len();
    if publish.qos != Qos::AtMostOnce {
        remaining += 2;
    }
    if protocol == MqttProtocol::V5 {
        // An empty property block: its length, zero.
        remaining += 1;
    }
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

#[cfg(test)]
mod tests {
    use super::testing::BOTH;
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn publish_size_is_the_encoded_size() {
        for protocol in BOTH {
            for payload in [
                0, 1, 100, 120, 127, 128, 16_370, 16_383, 16_384, 2_097_140, 2_097_152,
            ] {
                for qos in [Qos::AtMostOnce, Qos::AtLeastOnce] {
                    let publish = OutgoingPublish {
                        topic: "a/b".into(),
                        payload: Bytes::from(vec![0; payload]),
                        qos,
                        retain: false,
                    };
                    let mut buf = BytesMut::new();
                    Wire::new(protocol)
                        .encode_publish(1, &publish, false, &mut buf)
                        .unwrap();
                    assert_eq!(
                        publish_size(protocol, &publish),
                        buf.len(),
                        "{protocol:?} {payload} {qos}"
                    );
                }
            }
        }
    }

    #[test]
    fn outgoing_publishes_that_would_be_malformed_are_named() {
        let publish = |topic: &str| OutgoingPublish {
            topic: topic.into(),
            payload: Bytes::new(),
            qos: Qos::AtLeastOnce,
            retain: false,
        };
        assert_eq!(outgoing_problem(&publish("a/b")), None);
        assert!(outgoing_problem(&publish("")).is_some());
        assert!(outgoing_problem(&publish("a/+")).is_some());
        assert!(outgoing_problem(&publish("a\0b")).is_some());
        assert!(outgoing_problem(&publish(&"x".repeat(65_536))).is_some());
        assert_eq!(outgoing_problem(&publish(&"x".repeat(65_535))), None);
    }
}
