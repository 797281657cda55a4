//! Connecting, subscribing and reading one MQTT session.

use super::MqttMessage;
use crate::config::{MqttConfig, MqttProtocol};
use crate::route::Subscription;
use crate::telemetry;
use bytes::Bytes;
use chrono::Utc;
use rumqttc::v5;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// MQTT's largest packet: the bridge accepts whatever the broker sends and
/// applies its own per-route size limit, so that an oversized message is
/// dead-lettered instead of breaking the connection in a redelivery loop.
const MAX_PACKET_BYTES: u32 = 268_435_455;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT request channel closed: {0}")]
    Client(String),
    #[error("invalid MQTT settings: {0}")]
    Settings(String),
}

/// What is needed to acknowledge one message later: MQTT acks carry only
/// the packet id, and the QoS decides between PUBACK and PUBREC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    pub packet_id: u16,
    pub qos: u8,
}

/// One received message and, for QoS 1 and 2, how to acknowledge it.
#[derive(Debug)]
pub struct Delivery {
    pub message: MqttMessage,
    pub ack: Option<AckToken>,
}

/// Cloneable handle that acknowledges messages and ends the session.
#[derive(Clone)]
pub enum Acker {
    V311(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

impl Acker {
    /// Queues the PUBACK/PUBREC for one message. Acks must be sent in the
    /// order messages arrived (MQTT 3.1.1 §4.6); callers ack in order.
    pub async fn ack(&self, token: AckToken) -> Result<(), MqttError> {
        match self {
            Self::V311(client) => {
                let mut p = rumqttc::Publish::new("", qos_v4(token.qos), Vec::new());
                p.pkid = token.packet_id;
                client.ack(&p).await
            }
            .map_err(|e| MqttError::Client(e.to_string())),
            Self::V5(client) => {
                let mut p =
                    v5::mqttbytes::v5::Publish::new("", qos_v5(token.qos), Vec::<u8>::new(), None);
                p.pkid = token.packet_id;
                client.ack(&p).await
            }
            .map_err(|e| MqttError::Client(e.to_string())),
        }
    }

    /// Queues the ack without waiting; `false` when the request channel is
    /// full (or closed), so the caller keeps the token and tries again. The
    /// commit loop never awaits an ack: the task that drains the channel may
    /// itself be waiting for the commit loop to take a message (see
    /// `delivery::commit_loop`).
    pub fn try_ack(&self, token: AckToken) -> bool {
        match self {
            Self::V311(client) => {
                let mut p = rumqttc::Publish::new("", qos_v4(token.qos), Vec::new());
                p.pkid = token.packet_id;
                client.try_ack(&p).is_ok()
            }
            Self::V5(client) => {
                let mut p =
                    v5::mqttbytes::v5::Publish::new("", qos_v5(token.qos), Vec::<u8>::new(), None);
                p.pkid = token.packet_id;
                client.try_ack(&p).is_ok()
            }
        }
    }

    /// Sends DISCONNECT. The broker keeps the session (when not clean), so
    /// unacknowledged messages are redelivered to the next connection.
    pub async fn disconnect(&self) -> Result<(), MqttError> {
        match self {
            Self::V311(client) => client
                .disconnect()
                .await
                .map_err(|e| MqttError::Client(e.to_string())),
            Self::V5(client) => client
                .disconnect()
                .await
                .map_err(|e| MqttError::Client(e.to_string())),
        }
    }

    async fn subscribe(&self, subs: &[Subscription]) -> Result<(), MqttError> {
        match self {
            Self::V311(client) => client
                .subscribe_many(
                    subs.iter()
                        .map(|s| rumqttc::SubscribeFilter::new(s.filter.clone(), qos_v4(s.qos))),
                )
                .await
                .map_err(|e| MqttError::Client(e.to_string())),
            Self::V5(client) => {
                // Retain handling 1: retained messages only for a new
                // subscription, so resubscribing on reconnect does not
                // replay them.
                let filters = subs.iter().map(|s| {
                    let mut f = v5::mqttbytes::v5::Filter::new(s.filter.clone(), qos_v5(s.qos));
                    f.retain_forward_rule = v5::mqttbytes::v5::RetainForwardRule::OnNewSubscribe;
                    f
                });
                client
                    .subscribe_many(filters)
                    .await
                    .map_err(|e| MqttError::Client(e.to_string()))
            }
        }
    }
}

enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// What one poll of the event loop produced, whatever the protocol.
enum Polled {
    Connected { session_present: bool },
    Message(Delivery),
    Subscribed,
    Disconnected,
    Other,
}

/// The MQTT session: an acker for the delivery task and an intake loop that
/// forwards messages into a bounded channel.
pub struct MqttSession {
    acker: Acker,
    event_loop: EventLoop,
    subscriptions: Vec<Subscription>,
    reconnect_delay: Duration,
}

impl MqttSession {
    /// Prepares the session; nothing connects until [`Self::run_intake`].
    pub fn new(config: &MqttConfig, subscriptions: Vec<Subscription>) -> Result<Self, MqttError> {
        // Room for one ack per in-flight message plus subscribes and
        // disconnect, so an ack never waits for space (see module docs).
        let cap = usize::from(config.inflight_window) * 2 + 64;
        let keep_alive = Duration::from_secs(config.keep_alive_s);
        let (acker, event_loop) = match config.protocol {
            MqttProtocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(&config.client_id, &config.host, config.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_session(config.clean_session)
                    .set_manual_acks(true)
                    .set_max_packet_size(MAX_PACKET_BYTES as usize, MAX_PACKET_BYTES as usize)
                    .set_request_channel_capacity(cap);
                if let Some(u) = config.username.as_deref().filter(|u| !u.is_empty()) {
                    o.set_credentials(u, config.password.as_deref().unwrap_or(""));
                }
                if config.tls {
                    o.set_transport(rumqttc::Transport::tls_with_default_config());
                }
                let (client, ev) = rumqttc::AsyncClient::new(o, cap);
                (Acker::V311(client), EventLoop::V311(Box::new(ev)))
            }
            MqttProtocol::V5 => {
                let mut o = v5::MqttOptions::new(&config.client_id, &config.host, config.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_start(config.clean_session)
                    .set_manual_acks(true)
                    .set_max_packet_size(Some(MAX_PACKET_BYTES))
                    .set_receive_maximum(Some(config.inflight_window))
                    .set_request_channel_capacity(cap);
                if !config.clean_session {
                    o.set_session_expiry_interval(Some(config.session_expiry_s));
                }
                if let Some(u) = config.username.as_deref().filter(|u| !u.is_empty()) {
                    o.set_credentials(u, config.password.as_deref().unwrap_or(""));
                }
                if config.tls {
                    o.set_transport(rumqttc::Transport::tls_with_default_config());
                }
                let (client, ev) = v5::AsyncClient::new(o, cap);
                (Acker::V5(client), EventLoop::V5(Box::new(ev)))
            }
        };
        Ok(Self {
            acker,
            event_loop,
            subscriptions,
            reconnect_delay: Duration::from_millis(config.reconnect_delay_ms),
        })
    }

    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }

    /// Polls the session until DISCONNECT has gone out or `finished` fires.
    ///
    /// Forwards messages into `deliveries` until `stop_intake` fires; after
    /// that it only keeps polling, so that the acks of the last transaction
    /// and the DISCONNECT still reach the broker. Messages arriving after
    /// `stop_intake` are not acknowledged: the broker redelivers them.
    ///
    /// `subscribed` is cancelled once the broker has confirmed the
    /// subscriptions (or resumed a session that has them): from then on no
    /// published message is missed.
    pub async fn run_intake(
        mut self,
        deliveries: mpsc::Sender<Delivery>,
        stop_intake: CancellationToken,
        finished: CancellationToken,
        subscribed: CancellationToken,
    ) -> Result<(), MqttError> {
        let mut connected = false;
        loop {
            let polled = tokio::select! {
                _ = finished.cancelled() => return Ok(()),
                polled = self.event_loop.poll() => polled,
            };
            match polled {
                Ok(Polled::Connected { session_present }) => {
                    connected = true;
                    telemetry::mqtt_connected(session_present);
                    // Subscribe on every connect, also to a resumed session:
                    // routes may have changed since the session was made.
                    // (MQTT 3.1.1 brokers resend retained messages then;
                    // MQTT 5 ones do not, see `Acker::subscribe`.)
                    {
                        let acker = self.acker.clone();
                        let subs = self.subscriptions.clone();
                        tokio::spawn(async move {
                            if let Err(e) = acker.subscribe(&subs).await {
                                tracing::error!(error = %e, "subscribe failed");
                            }
                        });
                    }
                }
                Ok(Polled::Message(delivery)) => {
                    if stop_intake.is_cancelled() {
                        continue;
                    }
                    tokio::select! {
                        _ = stop_intake.cancelled() => {}
                        sent = deliveries.send(delivery) => if sent.is_err() {
                            // The delivery task is gone; keep polling for the
                            // disconnect, forwarding nothing.
                            stop_intake.cancel();
                        },
                    }
                }
                Ok(Polled::Subscribed) => subscribed.cancel(),
                Ok(Polled::Disconnected) => return Ok(()),
                Ok(Polled::Other) => {}
                Err(error) => {
                    if connected {
                        telemetry::mqtt_disconnected(&error);
                    } else {
                        tracing::warn!(%error, "cannot connect to MQTT broker; retrying");
                    }
                    connected = false;
                    tokio::select! {
                        _ = finished.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.reconnect_delay) => {}
                    }
                }
            }
        }
    }
}

impl EventLoop {
    async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            Self::V311(ev) => {
                use rumqttc::{Event, Outgoing, Packet};
                Ok(match ev.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(ack)) => Polled::Connected {
                        session_present: ack.session_present,
                    },
                    Event::Incoming(Packet::Publish(p)) => {
                        let qos = p.qos as u8;
                        Polled::Message(Delivery {
                            ack: (qos > 0).then_some(AckToken {
                                packet_id: p.pkid,
                                qos,
                            }),
                            message: MqttMessage {
                                topic: p.topic,
                                payload: p.payload,
                                qos,
                                retain: p.retain,
                                dup: p.dup,
                                user_properties: Vec::new(),
                                content_type: None,
                                received_at: Utc::now(),
                            },
                        })
                    }
                    Event::Incoming(Packet::SubAck(_)) => Polled::Subscribed,
                    Event::Outgoing(Outgoing::Disconnect) => Polled::Disconnected,
                    _ => Polled::Other,
                })
            }
            Self::V5(ev) => {
                use rumqttc::Outgoing;
                use v5::mqttbytes::v5::Packet;
                use v5::Event;
                Ok(match ev.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(ack)) => Polled::Connected {
                        session_present: ack.session_present,
                    },
                    Event::Incoming(Packet::Publish(p)) => {
                        let qos = p.qos as u8;
                        let (user_properties, content_type) = match p.properties {
                            Some(props) => (props.user_properties, props.content_type),
                            None => (Vec::new(), None),
                        };
                        Polled::Message(Delivery {
                            ack: (qos > 0).then_some(AckToken {
                                packet_id: p.pkid,
                                qos,
                            }),
                            message: MqttMessage {
                                topic: topic_string(p.topic),
                                payload: p.payload,
                                qos,
                                retain: p.retain,
                                dup: p.dup,
                                user_properties,
                                content_type,
                                received_at: Utc::now(),
                            },
                        })
                    }
                    Event::Incoming(Packet::SubAck(_)) => Polled::Subscribed,
                    Event::Outgoing(Outgoing::Disconnect) => Polled::Disconnected,
                    _ => Polled::Other,
                })
            }
        }
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

fn qos_v5(qos: u8) -> v5::mqttbytes::QoS {
    match qos {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        1 => v5::mqttbytes::QoS::AtLeastOnce,
        _ => v5::mqttbytes::QoS::ExactlyOnce,
    }
}
