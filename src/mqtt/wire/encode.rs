//! Our packets to the broker, for either protocol version, through
//! rumqttc's encoders: what the bridge sends is well formed by construction,
//! so only the choice of fields (session, window, retain handling) is ours.

use super::{Outbound, OutgoingPublish, WireError, MAX_PACKET_BYTES};
use crate::mqtt::{MqttConfig, MqttProtocol, Qos, Subscription};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// Encodes for one protocol version.
pub struct Wire {
    protocol: MqttProtocol,
    /// `mqtt.share_group`: every filter subscribed as `$share/<group>/...`.
    share_group: Option<String>,
}
impl Wire {
    pub fn new(protocol: MqttProtocol) -> Self {
        Self {
            protocol,
            share_group: None,
        }
    }

    /// Subscribes (and unsubscribes) every filter in the shared
    /// subscription `group`, so that the broker spreads the messages over
    /// the bridges of the group instead of sending each to all.
    pub fn with_share_group(mut self, group: Option<String>) -> Self {
        self.share_group = group;
        self
    }

    /// A filter as subscribed: within the share group, if there is one.
    fn subscribed(&self, filter: &str) -> String {
        match &self.share_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter.to_string(),
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
        let password = config.password.as_ref().map_or("", |p| p.expose());
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
                    .map(|s| v4::SubscribeFilter::new(self.subscribed(&s.filter), qos_v4(s.qos)));
                let mut subscribe = v4::Subscribe::new_many(filters);
                subscribe.pkid = packet_id;
                v4::Packet::Subscribe(subscribe).write(buf, MAX_PACKET_BYTES as usize)?;
            }
            MqttProtocol::V5 => {
                let filters = subscriptions.iter().map(|s| {
                    let mut f = v5::Filter::new(self.subscribed(&s.filter), qos_v5(s.qos));
                    f.retain_forward_rule = v5::RetainForwardRule::OnNewSubscribe;
                    // No local: the bridge never receives what it publishes
                    // itself (relays, commands), so it cannot loop on them.
                    // MQTT 5 makes it a protocol error on a shared
                    // subscription (3.8.3.1); there, what keeps relays from
                    // looping is the route check that a relay's output
                    // cannot match its own filter, and commands go to M2M
                    // trees, which are never produced.
                    f.nolocal = self.share_group.is_none();
                    f
                });
                let mut subscribe = v5::Subscribe::new_many(filters, None);
                subscribe.pkid = packet_id;
                v5::Packet::Subscribe(subscribe).write(buf, Some(MAX_PACKET_BYTES))?;
            }
        }
        Ok(())
    }

    /// UNSUBSCRIBE from `filters` (after a reload removed their routes).
    pub fn encode_unsubscribe(
        &self,
        packet_id: u16,
        filters: &[String],
        buf: &mut BytesMut,
    ) -> Result<(), WireError> {
        match self.protocol {
            MqttProtocol::V311 => {
                let unsubscribe = v4::Unsubscribe {
                    pkid: packet_id,
                    topics: filters.iter().map(|f| self.subscribed(f)).collect(),
                };
                v4::Packet::Unsubscribe(unsubscribe).write(buf, MAX_PACKET_BYTES as usize)?;
            }
            MqttProtocol::V5 => {
                let unsubscribe = v5::Unsubscribe {
                    pkid: packet_id,
                    filters: filters.iter().map(|f| self.subscribed(f)).collect(),
                    properties: None,
                };
                v5::Packet::Unsubscribe(unsubscribe).write(buf, Some(MAX_PACKET_BYTES))?;
            }
        }
        Ok(())
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
    use super::super::testing::roundtrip;
    use super::*;

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
