//! The MQTT packets the bridge exchanges, for either protocol version.
//!
//! Encoding and decoding are rumqttc's (`mqttbytes`); this module only maps
//! its two packet families (3.1.1 and 5) onto the few packets the session
//! needs, so the session's protocol logic is written once.

use super::MqttMessage;
use crate::config::{MqttConfig, MqttProtocol};
use crate::route::Subscription;
use bytes::{Bytes, BytesMut};
use chrono::Utc;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// MQTT's largest packet: the bridge accepts whatever the broker sends and
/// applies its own per-route size limit, so that an oversized message is
/// dead-lettered instead of breaking the connection in a redelivery loop.
pub const MAX_PACKET_BYTES: u32 = 268_435_455;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed MQTT 3.1.1 packet: {0}")]
    V311(#[from] rumqttc::mqttbytes::Error),
    #[error("malformed MQTT 5 packet: {0}")]
    V5(#[from] rumqttc::v5::mqttbytes::Error),
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
    },
    Publish {
        packet_id: u16,
        message: MqttMessage,
    },
    /// QoS 2, second half: the broker releases a packet id it published.
    PubRel(u16),
    /// Acks of our own publishes.
    PubAck(u16),
    PubRec(u16),
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
    pub qos: u8,
    pub retain: bool,
}

/// Encodes and decodes for one protocol version.
pub struct Wire {
    protocol: MqttProtocol,
}

impl Wire {
    pub fn new(protocol: MqttProtocol) -> Self {
        Self { protocol }
    }

    /// Decodes one packet from the front of `buf`, or `None` when `buf`
    /// does not yet hold a whole one.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        match self.protocol {
            MqttProtocol::V311 => match v4::Packet::read(buf, MAX_PACKET_BYTES as usize) {
                Ok(packet) => Ok(Some(inbound_v4(packet))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(e.into()),
            },
            MqttProtocol::V5 => match v5::Packet::read(buf, Some(MAX_PACKET_BYTES)) {
                Ok(packet) => Ok(Some(inbound_v5(packet))),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(e.into()),
            },
        }
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
                p.pkid = if publish.qos == 0 { 0 } else { packet_id };
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
                p.pkid = if publish.qos == 0 { 0 } else { packet_id };
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
                properties.max_packet_size = Some(MAX_PACKET_BYTES);
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

fn inbound_v4(packet: v4::Packet) -> Inbound {
    match packet {
        v4::Packet::ConnAck(ack) => Inbound::ConnAck {
            session_present: ack.session_present,
            refused: (ack.code != v4::ConnectReturnCode::Success)
                .then(|| format!("{:?}", ack.code)),
            receive_maximum: None,
        },
        v4::Packet::Publish(p) => {
            let qos = p.qos as u8;
            Inbound::Publish {
                packet_id: p.pkid,
                message: MqttMessage {
                    topic: p.topic,
                    payload: p.payload,
                    qos,
                    retain: p.retain,
                    dup: p.dup,
                    user_properties: Vec::new(),
                    content_type: None,
                    received_at: Utc::now(),
                    defect: None,
                },
            }
        }
        v4::Packet::PubRel(rel) => Inbound::PubRel(rel.pkid),
        v4::Packet::PubAck(ack) => Inbound::PubAck(ack.pkid),
        v4::Packet::PubRec(rec) => Inbound::PubRec(rec.pkid),
        v4::Packet::PubComp(comp) => Inbound::PubComp(comp.pkid),
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
        v5::Packet::ConnAck(ack) => Inbound::ConnAck {
            session_present: ack.session_present,
            refused: (ack.code != v5::ConnectReturnCode::Success)
                .then(|| format!("{:?}", ack.code)),
            receive_maximum: ack.properties.and_then(|p| p.receive_max),
        },
        v5::Packet::Publish(p) => {
            let qos = p.qos as u8;
            let (user_properties, content_type) = match p.properties {
                Some(props) => (props.user_properties, props.content_type),
                None => (Vec::new(), None),
            };
            Inbound::Publish {
                packet_id: p.pkid,
                message: MqttMessage {
                    topic: topic_string(p.topic),
                    payload: p.payload,
                    qos,
                    retain: p.retain,
                    dup: p.dup,
                    user_properties,
                    content_type,
                    received_at: Utc::now(),
                    defect: None,
                },
            }
        }
        v5::Packet::PubRel(rel) => Inbound::PubRel(rel.pkid),
        v5::Packet::PubAck(ack) => Inbound::PubAck(ack.pkid),
        v5::Packet::PubRec(rec) => Inbound::PubRec(rec.pkid),
        v5::Packet::PubComp(comp) => Inbound::PubComp(comp.pkid),
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

/// MQTT topics are UTF-8 by specification; a broker that breaks that rule
/// gets its bytes replaced rather than a crash.
fn topic_string(topic: Bytes) -> String {
    match String::from_utf8(topic.to_vec()) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of a packet as the other side would encode it.
    fn roundtrip(protocol: MqttProtocol, packet: Outbound) -> BytesMut {
        let mut buf = BytesMut::new();
        Wire::new(protocol).encode(packet, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_partial_packet_waits_for_more_bytes() {
        for protocol in [MqttProtocol::V311, MqttProtocol::V5] {
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
            let wire = Wire::new(protocol);
            let mut buf = BytesMut::from(&publish[..publish.len() - 1]);
            assert!(wire.decode(&mut buf).unwrap().is_none());
            buf.extend_from_slice(&publish[publish.len() - 1..]);
            match wire.decode(&mut buf).unwrap() {
                Some(Inbound::Publish { packet_id, message }) => {
                    assert_eq!(packet_id, 7);
                    assert_eq!(message.topic, "a/b");
                    assert_eq!(&message.payload[..], b"xyz");
                    assert_eq!(message.qos, 2);
                    assert!(message.dup);
                }
                other => panic!("{protocol:?}: {other:?}"),
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
}
