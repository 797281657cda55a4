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

use super::Subscription;
use super::{Defect, MqttMessage};
use super::{MqttConfig, MqttProtocol, Qos};
use bytes::{Buf, Bytes, BytesMut};
use chrono::Utc;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use sha2::{Digest, Sha256};

/// MQTT's largest packet (the remaining length's four-byte limit).
pub const MAX_PACKET_BYTES: u32 = 268_435_455;

/// Default for the largest PUBLISH the decoder holds in memory
/// (`limits.max_packet_bytes`).
pub const DEFAULT_MAX_PACKET_BYTES: usize = 2 * 1024 * 1024;

/// MQTT 5 properties of an oversized PUBLISH up to this size are read and
/// kept (user properties, content type: evidence); a longer block is
/// discarded with the payload.
const MAX_KEPT_PROPERTY_BYTES: usize = 64 * 1024;

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

const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;

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

/// Encodes for one protocol version.
pub struct Wire {
    protocol: MqttProtocol,
}
impl Wire {
    pub fn new(protocol: MqttProtocol) -> Self {
        Self { protocol }
    }

    pub fn encode(&self, packet: Outbound, buf: &mut BytesMut) -> Result<(), WireError> {
        match self.protocol {
            MqttProtocol::V311 => {
                let packet = match packet {
                    Outbound::PubAck(id) => v4::Packet::PubAck(v4::PubAck::new(id)),
                    Outbound::PubRec(id) => v4::Packet::PubRec(v4::PubRec::new(id)),
                    Outbound::PubComp(id) => v4::Packet::PubComp(v4::PubComp::new(id)),
                    Outbound::PubRel(id) => v4::Packet::PubRel(v4::PubRel::new(id)),
                    Outbound::PingReq => v4::Packet::PingReq,
                    Outbound::Disconnect => v4::Packet::Disconnect,
                };
                packet.write(buf, MAX_PACKET_BYTES as usize)?;
            }
            MqttProtocol::V5 => {
                let packet = match packet {
                    Outbound::PubAck(id) => v5::Packet::PubAck(v5::PubAck::new(id, None)),
                    Outbound::PubRec(id) => v5::Packet::PubRec(v5::PubRec::new(id, None)),
                    Outbound::PubComp(id) => v5::Packet::PubComp(v5::PubComp::new(id, None)),
                    Outbound::PubRel(id) => v5::Packet::PubRel(v5::PubRel::new(id, None)),
                    Outbound::PingReq => v5::Packet::PingReq(v5::PingReq),
                    Outbound::Disconnect => v5::Packet::Disconnect(v5::Disconnect::new(
                        v5::DisconnectReasonCode::NormalDisconnection,
                    )),
                };
                packet.write(buf, Some(MAX_PACKET_BYTES))?;
            }
        }
        Ok(())
    }

    /// PUBLISH of our own message; `dup` on a resend after reconnect.
    pub fn encode_publish(
        &self,
        packet_id: u16,
        publish: &OutgoingPublish,
        dup: bool,
        buf: &mut BytesMut,
    ) -> Result<(), WireError> {
        match self.protocol {
            MqttProtocol::V311 => {
                let mut p = v4::Publish::from_bytes(
                    publish.topic.clone(),
                    qos_v4(publish.qos),
                    publish.payload.clone(),
                );
                p.pkid = if publish.qos == Qos::AtMostOnce {
                    0
                } else {
                    packet_id
                };
                p.retain = publish.retain;
                p.dup = dup;
                v4::Packet::Publish(p).write(buf, MAX_PACKET_BYTES as usize)?;
            }
            MqttProtocol::V5 => {
                let mut p = v5::Publish::new(
                    publish.topic.clone(),
                    qos_v5(publish.qos),
                    publish.payload.clone(),
                    None,
                );
                p.pkid = if publish.qos == Qos::AtMostOnce {
                    0
                } else {
                    packet_id
                };
                p.retain = publish.retain;
                p.dup = dup;
                v5::Packet::Publish(p).write(buf, Some(MAX_PACKET_BYTES))?;
            }
        }
        Ok(())
    }

    /// CONNECT for the bridge's persistent session. MQTT 5 also caps the
    /// messages in flight at the window (Receive Maximum), which is how the
    /// bridge applies backpressure without stopping to read.
    pub fn encode_connect(&self, config: &MqttConfig, buf: &mut BytesMut) -> Result<(), WireError> {
        let keep_alive = u16::try_from(config.keep_alive_s).unwrap_or(u16::MAX);
        let username = config.username.as_deref().filter(|u| !u.is_empty());
        let password = config.password.as_deref().unwrap_or("");
        match self.protocol {
            MqttProtocol::V311 => {
                let mut connect = v4::Connect::new(config.client_id.clone());
                connect.keep_alive = keep_alive;
                connect.clean_session = config.clean_session;
                if let Some(user) = username {
                    connect.set_login(user, password);
                }
                v4::Packet::Connect(connect).write(buf, MAX_PACKET_BYTES as usize)?;
            }
            MqttProtocol::V5 => {
                let mut properties = v5::ConnectProperties::new();
                properties.receive_maximum = Some(config.inflight_window);
                // No Maximum Packet Size: the broker would drop larger
                // messages without a trace. The decoder discards them as
                // they arrive instead, and they are dead-lettered with
                // their size and digest as evidence.
                properties.max_packet_size = None;
                if !config.clean_session {
                    properties.session_expiry_interval = Some(config.session_expiry_s);
                }
                let connect = v5::Connect {
                    keep_alive,
                    client_id: config.client_id.clone(),
                    clean_start: config.clean_session,
                    properties: Some(properties),
                };
                let login = username.map(|u| v5::Login::new(u, password));
                v5::Packet::Connect(connect, None, login).write(buf, Some(MAX_PACKET_BYTES))?;
            }
        }
        Ok(())
    }

    /// SUBSCRIBE to every filter at once. On MQTT 5, retain handling 1
    /// (retained messages only for a new subscription, so subscribing again
    /// on every reconnect does not replay them) and no local.
    pub fn encode_subscribe(
        &self,
        packet_id: u16,
        subscriptions: &[Subscription],
        buf: &mut BytesMut,
    ) -> Result<(), WireError> {
        match self.protocol {
            MqttProtocol::V311 => {
                let filters = subscriptions
                    .iter()
                    .map(|s| v4::SubscribeFilter::new(s.filter.clone(), qos_v4(s.qos)));
                let mut subscribe = v4::Subscribe::new_many(filters);
                subscribe.pkid = packet_id;
                v4::Packet::Subscribe(subscribe).write(buf, MAX_PACKET_BYTES as usize)?;
            }
            MqttProtocol::V5 => {
                let filters = subscriptions.iter().map(|s| {
                    let mut f = v5::Filter::new(s.filter.clone(), qos_v5(s.qos));
                    f.retain_forward_rule = v5::RetainForwardRule::OnNewSubscribe;
                    // No local: the bridge never receives what it publishes
                    // itself (relays, commands), so it cannot loop on them.
                    f.nolocal = true;
                    f
                });
                let mut subscribe = v5::Subscribe::new_many(filters, None);
                subscribe.pkid = packet_id;
                v5::Packet::Subscribe(subscribe).write(buf, Some(MAX_PACKET_BYTES))?;
            }
        }
        Ok(())
    }
}

/// Decodes the broker's packets on one connection. It keeps state between
/// calls (an oversized PUBLISH being discarded), so each connection needs a
/// new one.
pub struct Decoder {
    protocol: MqttProtocol,
    max_packet_bytes: usize,
    discarding: Option<Discard>,
}

/// An oversized PUBLISH whose variable header has been read and whose rest
/// is dropped as it arrives.
struct Discard {
    head: Head,
    packet_bytes: usize,
    /// Property bytes still to drop (a block too long to keep).
    skip: usize,
    /// Payload bytes still to hash and drop.
    remaining: usize,
    payload_bytes: usize,
    digest: Sha256,
}

/// The fixed header: the first byte and the remaining length.
struct Fixed {
    byte1: u8,
    header_len: usize,
    remaining: usize,
}

impl Fixed {
    fn packet_type(&self) -> u8 {
        self.byte1 >> 4
    }

    fn frame_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// The variable header of a PUBLISH.
#[derive(Debug)]
struct Head {
    qos: Qos,
    dup: bool,
    retain: bool,
    topic: String,
    topic_not_utf8: bool,
    packet_id: u16,
    user_properties: Vec<(String, String)>,
    content_type: Option<String>,
    /// Bytes after the fixed header up to the payload, or up to the
    /// property block when that is skipped.
    consumed: usize,
    /// Property bytes left unread (too many to keep), or, when the block
    /// is malformed, everything after the packet id.
    skipped_properties: usize,
    /// The MQTT 5 property block cannot be read (its length runs past the
    /// packet): the packet's framing still holds, so the message is taken,
    /// without payload, and dead-lettered rather than the connection ended.
    malformed: Option<&'static str>,
}

impl Head {
    fn into_inbound(self, payload: Bytes, too_large: Option<Defect>) -> Inbound {
        let defect = self
            .malformed
            .map(Defect::Malformed)
            .or(too_large)
            .or(self.topic_not_utf8.then_some(Defect::TopicNotUtf8));
        Inbound::Publish {
            packet_id: self.packet_id,
            message: MqttMessage {
                topic: self.topic,
                payload,
                qos: self.qos,
                retain: self.retain,
                dup: self.dup,
                user_properties: self.user_properties,
                content_type: self.content_type,
                received_at: Utc::now(),
                defect,
            },
        }
    }
}

impl Decoder {
    /// A decoder that holds PUBLISH packets of up to `max_packet_bytes`
    /// (fixed header included) in memory and streams larger ones.
    pub fn new(protocol: MqttProtocol, max_packet_bytes: usize) -> Self {
        Self {
            protocol,
            max_packet_bytes,
            discarding: None,
        }
    }

    /// Decodes one packet from the front of `buf`, or `None` when `buf`
    /// does not yet hold a whole one. While an oversized PUBLISH streams
    /// in, this consumes `buf` as it fills, so the caller's buffer stays
    /// small whatever the packet's size.
    ///
    /// An error means the stream cannot be framed (or the broker broke the
    /// protocol): the connection must end.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        if self.discarding.is_some() {
            return Ok(self.discard(buf));
        }
        let Some(fixed) = fixed_header(buf)? else {
            return Ok(None);
        };
        let frame_len = fixed.frame_len();
        match fixed.packet_type() {
            PUBLISH if frame_len > self.max_packet_bytes => {
                let available = &buf[fixed.header_len..buf.len().min(frame_len)];
                let Some(head) = publish_head(
                    self.protocol,
                    fixed.byte1,
                    available,
                    fixed.remaining,
                    false,
                )?
                else {
                    return Ok(None);
                };
                buf.advance(fixed.header_len + head.consumed);
                let skip = head.skipped_properties;
                let payload_bytes = fixed.remaining - head.consumed - skip;
                self.discarding = Some(Discard {
                    head,
                    packet_bytes: frame_len,
                    skip,
                    remaining: payload_bytes,
                    payload_bytes,
                    digest: Sha256::new(),
                });
                Ok(self.discard(buf))
            }
            PUBLISH => {
                if buf.len() < frame_len {
                    return Ok(None);
                }
                let frame = buf.split_to(frame_len).freeze();
                let body = frame.slice(fixed.header_len..);
                let head = publish_head(self.protocol, fixed.byte1, &body, fixed.remaining, true)?
                    .ok_or(WireError::Malformed("PUBLISH shorter than its header"))?;
                let payload = if head.malformed.is_some() {
                    Bytes::new()
                } else {
                    body.slice(head.consumed..)
                };
                Ok(Some(head.into_inbound(payload, None)))
            }
            PUBACK | PUBREC | PUBREL | PUBCOMP => {
                if fixed.remaining > MAX_CONTROL_PACKET_BYTES {
                    return Err(WireError::ControlTooLarge {
                        packet_type: fixed.packet_type(),
                        bytes: frame_len,
                    });
                }
                if buf.len() < frame_len {
                    return Ok(None);
                }
                let frame = buf.split_to(frame_len);
                let body = &frame[fixed.header_len..];
                let [high, low, ..] = *body else {
                    return Err(WireError::Malformed("publish ack without a packet id"));
                };
                let packet_id = u16::from_be_bytes([high, low]);
                // MQTT 5: a reason code follows unless it is 0 (Success);
                // properties after it are not needed.
                let reason = match self.protocol {
                    MqttProtocol::V5 => body.get(2).copied().unwrap_or(0),
                    MqttProtocol::V311 => 0,
                };
                Ok(Some(match fixed.packet_type() {
                    PUBACK => Inbound::PubAck { packet_id, reason },
                    PUBREC => Inbound::PubRec { packet_id, reason },
                    PUBREL => Inbound::PubRel(packet_id),
                    _ => Inbound::PubComp(packet_id),
                }))
            }
            packet_type => {
                if fixed.remaining > MAX_CONTROL_PACKET_BYTES {
                    return Err(WireError::ControlTooLarge {
                        packet_type,
                        bytes: frame_len,
                    });
                }
                if buf.len() < frame_len {
                    return Ok(None);
                }
                match self.protocol {
                    MqttProtocol::V311 => Ok(Some(inbound_v4(v4::Packet::read(buf, frame_len)?))),
                    MqttProtocol::V5 => Ok(Some(inbound_v5(v5::Packet::read(
                        buf,
                        Some(MAX_PACKET_BYTES),
                    )?))),
                }
            }
        }
    }

    /// Drops what `buf` holds of the oversized PUBLISH (hashing its
    /// payload); the message once the last byte has arrived.
    fn discard(&mut self, buf: &mut BytesMut) -> Option<Inbound> {
        let d = self.discarding.as_mut()?;
        let n = d.skip.min(buf.len());
        buf.advance(n);
        d.skip -= n;
        if d.skip > 0 {
            return None;
        }
        let n = d.remaining.min(buf.len());
        d.digest.update(&buf[..n]);
        buf.advance(n);
        d.remaining -= n;
        if d.remaining > 0 {
            return None;
        }
        let d = self.discarding.take()?;
        let defect = Defect::TooLarge {
            packet_bytes: d.packet_bytes,
            payload_bytes: d.payload_bytes,
            sha256: d.digest.finalize().into(),
        };
        Some(d.head.into_inbound(Bytes::new(), Some(defect)))
    }
}

/// The fixed header at the front of `buf`, `None` until it is all there.
fn fixed_header(buf: &[u8]) -> Result<Option<Fixed>, WireError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    match variable_int(&buf[1..]) {
        Ok(Some((remaining, len))) => Ok(Some(Fixed {
            byte1,
            header_len: 1 + len,
            remaining,
        })),
        Ok(None) => Ok(None),
        Err(()) => Err(WireError::Malformed("remaining length over four bytes")),
    }
}

/// An MQTT variable byte integer at the front of `bytes` and its length;
/// `None` until it is all there, `Err` when it runs over four bytes.
fn variable_int(bytes: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    let mut value = 0;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(())
    } else {
        Ok(None)
    }
}

/// Reads the variable header of a PUBLISH from `body` (what has arrived of
/// the `remaining` bytes after the fixed header). `None` until enough has
/// arrived; an error when a field runs past the packet or the broker broke
/// the protocol (QoS 3, packet id 0), as nothing of the packet can be
/// trusted then.
///
/// `keep_all_properties`: read the property block whatever its size (the
/// whole packet is in memory); otherwise a block over
/// [`MAX_KEPT_PROPERTY_BYTES`] is left to be skipped.
fn publish_head(
    protocol: MqttProtocol,
    byte1: u8,
    body: &[u8],
    remaining: usize,
    keep_all_properties: bool,
) -> Result<Option<Head>, WireError> {
    // Whether `n` more bytes from `at` are there: an error past the packet,
    // false when they have not arrived yet.
    let have = |at: usize, n: usize, what: &'static str| -> Result<bool, WireError> {
        if at + n > remaining {
            Err(WireError::Malformed(what))
        } else {
            Ok(at + n <= body.len())
        }
    };
    let Some(qos) = Qos::from_u8((byte1 >> 1) & 0b11) else {
        return Err(WireError::Malformed("PUBLISH with QoS 3"));
    };
    if !have(0, 2, "PUBLISH topic length past the packet")? {
        return Ok(None);
    }
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    if !have(2, topic_len, "PUBLISH topic past the packet")? {
        return Ok(None);
    }
    let topic_bytes = &body[2..2 + topic_len];
    let mut at = 2 + topic_len;
    let mut packet_id = 0;
    if qos != Qos::AtMostOnce {
        if !have(at, 2, "PUBLISH packet id past the packet")? {
            return Ok(None);
        }
        packet_id = u16::from_be_bytes([body[at], body[at + 1]]);
        if packet_id == 0 {
            return Err(WireError::Malformed(
                "PUBLISH with QoS 1 or 2 and packet id 0",
            ));
        }
        at += 2;
    }
    let (mut user_properties, mut content_type, mut skipped_properties) = (Vec::new(), None, 0);
    let mut malformed = None;
    if protocol == MqttProtocol::V5 {
        // A broken property block inside an intact frame: skip the rest of
        // the packet (its length is known) and keep what identifies it.
        let after_id = at;
        let problem = match variable_int(&body[at..]) {
            Ok(Some((_, len_len))) if at + len_len > remaining => {
                Some("PUBLISH property length past the packet")
            }
            Ok(Some((properties_len, len_len))) if at + len_len + properties_len > remaining => {
                Some("PUBLISH properties past the packet")
            }
            Ok(Some((properties_len, len_len))) => {
                at += len_len;
                if keep_all_properties || properties_len <= MAX_KEPT_PROPERTY_BYTES {
                    if at + properties_len > body.len() {
                        return Ok(None);
                    }
                    (user_properties, content_type) =
                        publish_properties(&body[at..at + properties_len]);
                    at += properties_len;
                } else {
                    skipped_properties = properties_len;
                }
                None
            }
            Ok(None) if body.len() >= remaining => Some("PUBLISH property length past the packet"),
            Ok(None) => return Ok(None),
            Err(()) => Some("PUBLISH property length over four bytes"),
        };
        if let Some(what) = problem {
            malformed = Some(what);
            at = after_id;
            skipped_properties = remaining - after_id;
        }
    }
    let (topic, topic_not_utf8) = match std::str::from_utf8(topic_bytes) {
        Ok(t) => (t.to_string(), false),
        Err(_) => (String::from_utf8_lossy(topic_bytes).into_owned(), true),
    };
    Ok(Some(Head {
        qos,
        dup: byte1 & 0b1000 != 0,
        retain: byte1 & 0b0001 != 0,
        topic,
        topic_not_utf8,
        packet_id,
        user_properties,
        content_type,
        consumed: at,
        skipped_properties,
        malformed,
    }))
}

/// The user properties and content type of a PUBLISH property block.
/// Lenient: what the bridge does not use is skipped, text that is not
/// UTF-8 has its bytes replaced, and reading stops (keeping what was read)
/// at a property it cannot size; the payload's place is known from the
/// block's length either way.
fn publish_properties(mut block: &[u8]) -> (Vec<(String, String)>, Option<String>) {
    fn take<'a>(block: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if block.len() < n {
            return None;
        }
        let (taken, rest) = block.split_at(n);
        *block = rest;
        Some(taken)
    }
    fn binary<'a>(block: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = take(block, 2)?;
        take(block, usize::from(u16::from_be_bytes([len[0], len[1]])))
    }
    fn text(block: &mut &[u8]) -> Option<String> {
        binary(block).map(|b| String::from_utf8_lossy(b).into_owned())
    }
    let mut user_properties = Vec::new();
    let mut content_type = None;
    let mut read = |block: &mut &[u8]| -> Option<()> {
        match take(block, 1)?[0] {
            // Payload format indicator.
            0x01 => {
                take(block, 1)?;
            }
            // Message expiry interval.
            0x02 => {
                take(block, 4)?;
            }
            0x03 => content_type = Some(text(block)?),
            // Response topic, correlation data.
            0x08 | 0x09 => {
                binary(block)?;
            }
            // Subscription identifier.
            0x0b => {
                let (_, len) = variable_int(block).ok()??;
                take(block, len)?;
            }
            // Topic alias.
            0x23 => {
                take(block, 2)?;
            }
            0x26 if user_properties.len() > MAX_KEPT_USER_PROPERTIES => {
                binary(block)?;
                binary(block)?;
            }
            0x26 => {
                let name = text(block)?;
                let value = text(block)?;
                user_properties.push((name, value));
            }
            _ => return None,
        }
        Some(())
    };
    while !block.is_empty() {
        if read(&mut block).is_none() {
            break;
        }
    }
    (user_properties, content_type)
}

/// The broker's control packets (PUBLISH and its acks are decoded above).
fn inbound_v4(packet: v4::Packet) -> Inbound {
    match packet {
        v4::Packet::ConnAck(ack) => Inbound::ConnAck {
            session_present: ack.session_present,
            refused: (ack.code != v4::ConnectReturnCode::Success)
                .then(|| format!("{:?}", ack.code)),
            receive_maximum: None,
            max_packet_size: None,
        },
        v4::Packet::SubAck(ack) => Inbound::SubAck {
            refused: ack
                .return_codes
                .iter()
                .filter(|c| matches!(c, v4::SubscribeReasonCode::Failure))
                .count(),
        },
        v4::Packet::PingResp => Inbound::PingResp,
        _ => Inbound::Other,
    }
}

fn inbound_v5(packet: v5::Packet) -> Inbound {
    match packet {
        v5::Packet::ConnAck(ack) => {
            let properties = ack.properties.as_ref();
            Inbound::ConnAck {
                session_present: ack.session_present,
                refused: (ack.code != v5::ConnectReturnCode::Success)
                    .then(|| format!("{:?}", ack.code)),
                receive_maximum: properties.and_then(|p| p.receive_max),
                max_packet_size: properties.and_then(|p| p.max_packet_size),
            }
        }
        v5::Packet::SubAck(ack) => Inbound::SubAck {
            refused: ack
                .return_codes
                .iter()
                .filter(|c| !matches!(c, v5::SubscribeReasonCode::Success(_)))
                .count(),
        },
        v5::Packet::PingResp(_) => Inbound::PingResp,
        v5::Packet::Disconnect(d) => Inbound::Disconnect(format!("{:?}", d.reason_code)),
        _ => Inbound::Other,
    }
}

fn qos_v4(qos: Qos) -> rumqttc::QoS {
    match qos {
        Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        Qos::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: Qos) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match qos {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    const BOTH: [MqttProtocol; 2] = [MqttProtocol::V311, MqttProtocol::V5];

    /// Bytes of a packet as the other side would encode it.
    fn roundtrip(protocol: MqttProtocol, packet: Outbound) -> BytesMut {
        let mut buf = BytesMut::new();
        Wire::new(protocol).encode(packet, &mut buf).unwrap();
        buf
    }

    fn decoder(protocol: MqttProtocol) -> Decoder {
        Decoder::new(protocol, DEFAULT_MAX_PACKET_BYTES)
    }

    /// A PUBLISH as the broker would encode it.
    fn publish_bytes(
        protocol: MqttProtocol,
        topic: &str,
        packet_id: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut buf = BytesMut::new();
        let publish = OutgoingPublish {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos: if packet_id == 0 {
                Qos::AtMostOnce
            } else {
                Qos::AtLeastOnce
            },
            retain: false,
        };
        Wire::new(protocol)
            .encode_publish(packet_id, &publish, false, &mut buf)
            .unwrap();
        buf.to_vec()
    }

    /// A fixed header for `packet_type` with `remaining` bytes to follow.
    fn fixed(byte1: u8, mut remaining: usize) -> Vec<u8> {
        let mut out = vec![byte1];
        loop {
            let mut b = (remaining % 128) as u8;
            remaining /= 128;
            if remaining > 0 {
                b |= 0x80;
            }
            out.push(b);
            if remaining == 0 {
                return out;
            }
        }
    }

    fn expect_publish(inbound: Option<Inbound>) -> (u16, MqttMessage) {
        match inbound {
            Some(Inbound::Publish { packet_id, message }) => (packet_id, message),
            other => panic!("not a PUBLISH: {other:?}"),
        }
    }

    #[test]
    fn a_partial_packet_waits_for_more_bytes() {
        for protocol in BOTH {
            let mut publish = BytesMut::new();
            match protocol {
                MqttProtocol::V311 => {
                    let mut p = v4::Publish::new("a/b", rumqttc::QoS::ExactlyOnce, b"xyz".to_vec());
                    p.pkid = 7;
                    p.dup = true;
                    v4::Packet::Publish(p).write(&mut publish, 1000).unwrap();
                }
                MqttProtocol::V5 => {
                    let mut p = v5::Publish::new(
                        "a/b",
                        rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
                        b"xyz".to_vec(),
                        None,
                    );
                    p.pkid = 7;
                    p.dup = true;
                    v5::Packet::Publish(p).write(&mut publish, None).unwrap();
                }
            }
            // Byte by byte: nothing until the last one.
            let mut decoder = decoder(protocol);
            let mut buf = BytesMut::new();
            for (i, b) in publish.iter().enumerate() {
                buf.extend_from_slice(&[*b]);
                let decoded = decoder.decode(&mut buf).unwrap();
                if i + 1 < publish.len() {
                    assert!(decoded.is_none(), "{protocol:?}: decoded at byte {i}");
                    continue;
                }
                let (packet_id, message) = expect_publish(decoded);
                assert_eq!(packet_id, 7);
                assert_eq!(message.topic, "a/b");
                assert_eq!(&message.payload[..], b"xyz");
                assert_eq!(message.qos, Qos::ExactlyOnce);
                assert!(message.dup);
                assert_eq!(message.defect, None);
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn acks_carry_their_packet_id() {
        // PUBACK, PUBREC and PUBCOMP: fixed header type, length 2, the id.
        assert_eq!(
            &roundtrip(MqttProtocol::V311, Outbound::PubAck(0x0102))[..],
            &[0x40, 2, 1, 2]
        );
        assert_eq!(
            &roundtrip(MqttProtocol::V311, Outbound::PubRec(5))[..],
            &[0x50, 2, 0, 5]
        );
        assert_eq!(
            &roundtrip(MqttProtocol::V5, Outbound::PubComp(5))[..],
            &[0x70, 2, 0, 5]
        );
    }

    #[test]
    fn publish_acks_keep_their_reason_code() {
        let cases: [(&[u8], u8); 6] = [
            // No reason code: Success.
            (&[0x40, 2, 0, 5], 0),
            (&[0x40, 3, 0, 5, 0x87], 0x87),
            // With an empty property block.
            (&[0x40, 4, 0, 5, 0x97, 0], 0x97),
            // With a reason string: properties are skipped.
            (&[0x40, 8, 0, 5, 0x99, 4, 0x1f, 0, 1, b'x'], 0x99),
            // A code MQTT 5 does not define for PUBACK is kept as it is.
            (&[0x40, 3, 0, 5, 0x8f], 0x8f),
            (&[0x40, 3, 0, 5, 0x10], 0x10),
        ];
        for (bytes, code) in cases {
            let mut buf = BytesMut::from(bytes);
            match decoder(MqttProtocol::V5).decode(&mut buf).unwrap() {
                Some(Inbound::PubAck {
                    packet_id: 5,
                    reason,
                }) => assert_eq!(reason, code),
                other => panic!("{bytes:?}: {other:?}"),
            }
            assert!(buf.is_empty());
        }
        let mut buf = BytesMut::from(&[0x50, 3, 0, 9, 0x87, 0x70, 2, 0, 9][..]);
        let mut d = decoder(MqttProtocol::V5);
        assert!(matches!(
            d.decode(&mut buf).unwrap(),
            Some(Inbound::PubRec {
                packet_id: 9,
                reason: 0x87
            })
        ));
        assert!(matches!(
            d.decode(&mut buf).unwrap(),
            Some(Inbound::PubComp(9))
        ));
        // MQTT 3.1.1 has no reason codes.
        let mut buf = BytesMut::from(&[0x50, 2, 0, 9][..]);
        assert!(matches!(
            decoder(MqttProtocol::V311).decode(&mut buf).unwrap(),
            Some(Inbound::PubRec {
                packet_id: 9,
                reason: 0
            })
        ));
        assert_eq!(reason_code_name(0x87), "NotAuthorized");
    }

    #[test]
    fn a_topic_that_is_not_utf8_becomes_a_defective_message() {
        for protocol in BOTH {
            // PUBLISH QoS 1, topic "a\xffb", packet id 7, payload "xy",
            // then a valid one: both are decoded, in order.
            let mut body = vec![0, 3, b'a', 0xff, b'b', 0, 7];
            if protocol == MqttProtocol::V5 {
                body.push(0);
            }
            body.extend_from_slice(b"xy");
            let mut bytes = fixed(0x32, body.len());
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(&publish_bytes(protocol, "a/b", 8, b"ok"));
            let mut buf = BytesMut::from(&bytes[..]);
            let mut d = decoder(protocol);
            let (packet_id, message) = expect_publish(d.decode(&mut buf).unwrap());
            assert_eq!(packet_id, 7);
            assert_eq!(message.topic, "a\u{fffd}b");
            assert_eq!(&message.payload[..], b"xy");
            assert_eq!(message.defect, Some(Defect::TopicNotUtf8));
            let (packet_id, message) = expect_publish(d.decode(&mut buf).unwrap());
            assert_eq!((packet_id, message.defect), (8, None));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn publish_properties_are_read_and_bad_ones_do_not_break_the_packet() {
        let mut p = v5::Publish::new(
            "a/b",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            b"payload".to_vec(),
            Some(PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                response_topic: Some("r/t".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into()), ("k2".into(), "v2".into())],
                subscription_identifiers: vec![300],
                content_type: Some("application/json".into()),
                topic_alias: None,
            }),
        );
        p.pkid = 3;
        let mut buf = BytesMut::new();
        v5::Packet::Publish(p).write(&mut buf, None).unwrap();
        let (_, message) = expect_publish(decoder(MqttProtocol::V5).decode(&mut buf).unwrap());
        assert_eq!(
            message.user_properties,
            [("k".into(), "v".into()), ("k2".into(), "v2".into())]
        );
        assert_eq!(message.content_type.as_deref(), Some("application/json"));
        assert_eq!(&message.payload[..], b"payload");

        // A user property value that is not UTF-8, then an unknown
        // property: the first is kept (bytes replaced), the rest skipped,
        // the payload found by the block's length.
        let props = [&[0x26, 0, 1, b'k', 0, 2, b'v', 0xfe][..], &[0x7f, 1, 2, 3]].concat();
        let mut body = vec![0, 1, b't', 0, 4, props.len() as u8];
        body.extend_from_slice(&props);
        body.extend_from_slice(b"data");
        let mut bytes = fixed(0x32, body.len());
        bytes.extend_from_slice(&body);
        let mut buf = BytesMut::from(&bytes[..]);
        let (packet_id, message) =
            expect_publish(decoder(MqttProtocol::V5).decode(&mut buf).unwrap());
        assert_eq!(packet_id, 4);
        assert_eq!(message.user_properties, [("k".into(), "v\u{fffd}".into())]);
        assert_eq!(&message.payload[..], b"data");
        assert_eq!(message.defect, None);
    }

    #[test]
    fn broken_framing_is_an_error() {
        let cases: [(MqttProtocol, &[u8]); 5] = [
            // Remaining length over four bytes.
            (MqttProtocol::V5, &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            // Topic length past the packet.
            (MqttProtocol::V311, &[0x30, 4, 0, 9, b'a', b'b']),
            // QoS 3.
            (MqttProtocol::V311, &[0x36, 5, 0, 1, b'a', 0, 1]),
            // QoS 1 with packet id 0.
            (MqttProtocol::V311, &[0x32, 5, 0, 1, b'a', 0, 0]),
            // A publish ack without a packet id.
            (MqttProtocol::V5, &[0x40, 1, 0]),
        ];
        for (protocol, bytes) in cases {
            let mut buf = BytesMut::from(bytes);
            assert!(
                decoder(protocol).decode(&mut buf).is_err(),
                "{protocol:?} {bytes:?}"
            );
        }
    }

    /// Half a million empty user properties fit in a 2 MiB packet; the
    /// decoder keeps one more than its cap, so memory stays bounded and the
    /// count still trips any `limits.max_user_properties`.
    #[test]
    fn user_property_bombs_are_kept_only_up_to_the_cap() {
        let mut props = Vec::new();
        for _ in 0..100_000 {
            props.extend_from_slice(&[0x26, 0, 0, 0, 0]);
        }
        let mut body = vec![0, 1, b'a', 0, 7];
        let mut len = Vec::new();
        let mut n = props.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            len.push(b);
            if n == 0 {
                break;
            }
        }
        body.extend_from_slice(&len);
        body.extend_from_slice(&props);
        body.extend_from_slice(b"{}");
        let mut buf = BytesMut::from(&fixed(0x32, body.len())[..]);
        buf.extend_from_slice(&body);
        let Some(Inbound::Publish { message, .. }) =
            decoder(MqttProtocol::V5).decode(&mut buf).unwrap()
        else {
            panic!("no publish");
        };
        assert_eq!(message.user_properties.len(), MAX_KEPT_USER_PROPERTIES + 1);
        assert_eq!(&message.payload[..], b"{}");
    }

    /// A property block that runs past an intact frame is not worth a
    /// reconnect (the broker would resend the same packet first): the
    /// message comes out without payload, marked malformed, with its
    /// packet id so it is acked in order, and the next packet decodes.
    #[test]
    fn a_broken_property_block_is_a_defect_not_a_lost_connection() {
        let broken: [&[u8]; 3] = [
            // QoS 1, id 7, property length 9 in a 2-byte remainder.
            &[0x32, 7, 0, 1, b'a', 0, 7, 9, 0],
            // Property length over four bytes.
            &[0x32, 10, 0, 1, b'a', 0, 7, 0xff, 0xff, 0xff, 0xff, 0x01],
            // Property length itself cut by the frame's end.
            &[0x32, 6, 0, 1, b'a', 0, 7, 0xff],
        ];
        for limit in [DEFAULT_MAX_PACKET_BYTES, 8] {
            for bytes in broken {
                let mut buf = BytesMut::from(bytes);
                buf.extend_from_slice(&publish_bytes(MqttProtocol::V5, "next", 8, b"ok"));
                let mut d = Decoder::new(MqttProtocol::V5, limit);
                let Some(Inbound::Publish { packet_id, message }) = d.decode(&mut buf).unwrap()
                else {
                    panic!("{bytes:?}: no publish");
                };
                assert_eq!(packet_id, 7);
                assert_eq!(message.topic, "a");
                assert!(message.payload.is_empty());
                assert!(
                    matches!(message.defect, Some(Defect::Malformed(_))),
                    "{bytes:?}: {:?}",
                    message.defect
                );
                let mut next = None;
                for _ in 0..4 {
                    if let Some(p) = d.decode(&mut buf).unwrap() {
                        next = Some(p);
                        break;
                    }
                }
                let Some(Inbound::Publish { packet_id, message }) = next else {
                    panic!("{bytes:?}: the next packet did not decode");
                };
                assert_eq!((packet_id, message.topic.as_str()), (8, "next"));
            }
        }
    }

    /// Feeds an oversized PUBLISH (`head`, then `payload_bytes` of a
    /// pattern, then `after`) in 64 KiB reads, as the session would, and
    /// returns what was decoded and the largest buffer seen.
    fn stream_oversized(
        protocol: MqttProtocol,
        limit: usize,
        head: &[u8],
        payload_bytes: usize,
        after: &[u8],
    ) -> (Vec<Inbound>, usize, [u8; 32]) {
        const READ: usize = 64 * 1024;
        let mut d = Decoder::new(protocol, limit);
        let mut digest = Sha256::new();
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        let mut largest = 0;
        let mut sent = 0;
        let chunk: Vec<u8> = (0..READ).map(|i| (i % 251) as u8).collect();
        let mut feed = |buf: &mut BytesMut, bytes: &[u8]| {
            buf.extend_from_slice(bytes);
            largest = largest.max(buf.capacity());
            while let Some(inbound) = d.decode(buf).unwrap() {
                decoded.push(inbound);
            }
        };
        for part in head.chunks(READ) {
            feed(&mut buf, part);
        }
        while sent < payload_bytes {
            let n = READ.min(payload_bytes - sent);
            digest.update(&chunk[..n]);
            feed(&mut buf, &chunk[..n]);
            sent += n;
        }
        feed(&mut buf, after);
        assert!(buf.is_empty());
        (decoded, largest, digest.finalize().into())
    }

    #[test]
    fn an_oversized_publish_is_hashed_and_dropped_as_it_streams_in() {
        let payload_bytes = 32 * 1024 * 1024;
        for protocol in BOTH {
            let mut variable = vec![0, 5, b'b', b'i', b'g', b'/', b'x', 0x12, 0x34];
            if protocol == MqttProtocol::V5 {
                let props = [
                    &[0x26, 0, 1, b'k', 0, 1, b'v'][..],
                    &[0x03, 0, 4, b'j', b's', b'o', b'n'],
                ]
                .concat();
                variable.push(props.len() as u8);
                variable.extend_from_slice(&props);
            }
            let mut head = fixed(0x34 | 0x01, variable.len() + payload_bytes);
            let packet_bytes = head.len() + variable.len() + payload_bytes;
            head.extend_from_slice(&variable);
            let after = publish_bytes(protocol, "small", 9, b"next");
            let (decoded, largest, sha256) =
                stream_oversized(protocol, 1024, &head, payload_bytes, &after);
            assert!(
                largest <= 256 * 1024,
                "{protocol:?}: buffer grew to {largest}"
            );
            let mut decoded = decoded.into_iter();
            let (packet_id, message) = expect_publish(decoded.next());
            assert_eq!(packet_id, 0x1234);
            assert_eq!(message.topic, "big/x");
            assert_eq!((message.qos, message.retain), (Qos::ExactlyOnce, true));
            assert!(message.payload.is_empty());
            assert_eq!(
                message.defect,
                Some(Defect::TooLarge {
                    packet_bytes,
                    payload_bytes,
                    sha256
                })
            );
            if protocol == MqttProtocol::V5 {
                assert_eq!(message.user_properties, [("k".into(), "v".into())]);
                assert_eq!(message.content_type.as_deref(), Some("json"));
            }
            let (packet_id, message) = expect_publish(decoded.next());
            assert_eq!((packet_id, &message.payload[..]), (9, &b"next"[..]));
            assert!(decoded.next().is_none());
        }
    }

    #[test]
    fn an_oversized_publish_with_a_huge_property_block_skips_the_block() {
        let property = [&[0x26, 0, 4][..], b"name", &[0x03, 0xe8], &[b'v'; 1000]].concat();
        let props: Vec<u8> = property.repeat(200);
        let payload_bytes = 3 * 1024 * 1024;
        let mut variable = vec![0, 1, b't', 0, 1];
        let mut props_len = Vec::new();
        let mut n = props.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            props_len.push(b);
            if n == 0 {
                break;
            }
        }
        variable.extend_from_slice(&props_len);
        variable.extend_from_slice(&props);
        let mut head = fixed(0x32, variable.len() + payload_bytes);
        head.extend_from_slice(&variable);
        let (decoded, largest, sha256) =
            stream_oversized(MqttProtocol::V5, 1024, &head, payload_bytes, &[]);
        assert!(largest <= 512 * 1024, "buffer grew to {largest}");
        let (packet_id, message) = expect_publish(decoded.into_iter().next());
        assert_eq!(packet_id, 1);
        assert!(message.user_properties.is_empty());
        match message.defect {
            Some(Defect::TooLarge {
                payload_bytes: p,
                sha256: s,
                ..
            }) => assert_eq!((p, s), (payload_bytes, sha256)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_publish_at_the_limit_is_held_whole() {
        for protocol in BOTH {
            let bytes = publish_bytes(protocol, "t", 1, &[7; 1000]);
            let mut at = Decoder::new(protocol, bytes.len());
            let (_, message) = expect_publish(at.decode(&mut BytesMut::from(&bytes[..])).unwrap());
            assert_eq!((message.payload.len(), message.defect), (1000, None));
            let mut over = Decoder::new(protocol, bytes.len() - 1);
            let (_, message) =
                expect_publish(over.decode(&mut BytesMut::from(&bytes[..])).unwrap());
            assert!(matches!(
                message.defect,
                Some(Defect::TooLarge { packet_bytes, payload_bytes: 1000, .. }) if packet_bytes == bytes.len()
            ));
        }
    }

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

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Feeds `chunks` to a decoder as a socket would deliver them and
        /// collects what it decodes, up to its first error. Bounded, so a
        /// decoder that stops making progress fails instead of hanging.
        fn feed(decoder: &mut Decoder, chunks: &[Vec<u8>]) -> (Vec<Inbound>, bool) {
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for chunk in chunks {
                buf.extend_from_slice(chunk);
                for _ in 0..10_000 {
                    match decoder.decode(&mut buf) {
                        Ok(Some(packet)) => out.push(packet),
                        Ok(None) => break,
                        Err(_) => return (out, true),
                    }
                }
            }
            (out, false)
        }

        fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                chunks.push(bytes[start..p].to_vec());
                start = p;
            }
            chunks
        }

        fn protocol() -> impl Strategy<Value = MqttProtocol> {
            prop_oneof![Just(MqttProtocol::V311), Just(MqttProtocol::V5)]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn arbitrary_bytes_never_panic_the_decoder(
                protocol in protocol(),
                bytes in prop::collection::vec(any::<u8>(), 0..600),
                cuts in prop::collection::vec(any::<usize>(), 0..6),
                max in 8usize..400,
            ) {
                let mut decoder = Decoder::new(protocol, max);
                let _ = feed(&mut decoder, &split(&bytes, &cuts));
            }

            #[test]
            fn a_publish_decodes_the_same_however_it_is_split(
                protocol in protocol(),
                topic in "[a-z/]{1,20}|\\PC{1,12}",
                payload in prop::collection::vec(any::<u8>(), 0..700),
                cuts in prop::collection::vec(any::<usize>(), 0..8),
                max in prop_oneof![Just(DEFAULT_MAX_PACKET_BYTES), 16usize..600],
            ) {
                let bytes = publish_bytes(protocol, &topic, 7, &payload);
                let mut decoder = Decoder::new(protocol, max);
                let (packets, failed) = feed(&mut decoder, &split(&bytes, &cuts));
                prop_assert!(!failed);
                prop_assert_eq!(packets.len(), 1);
                let Inbound::Publish { packet_id, message } = &packets[0] else {
                    panic!("not a publish: {:?}", packets[0]);
                };
                prop_assert_eq!(*packet_id, 7);
                prop_assert_eq!(&message.topic, &topic);
                if bytes.len() > max {
                    prop_assert!(message.payload.is_empty());
                    let digest: [u8; 32] = Sha256::digest(&payload).into();
                    prop_assert_eq!(
                        message.defect.clone(),
                        Some(Defect::TooLarge {
                            packet_bytes: bytes.len(),
                            payload_bytes: payload.len(),
                            sha256: digest,
                        })
                    );
                } else {
                    prop_assert_eq!(&message.payload[..], &payload[..]);
                    prop_assert_eq!(message.defect.clone(), None);
                }
            }
        }
    }
}
