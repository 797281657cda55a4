//! The MQTT side: one persistent session that feeds a bounded channel and
//! acknowledges on request.
//!
//! The session speaks the protocol itself over rumqttc's packet codec (see
//! `session` for why not rumqttc's event loop). One task owns the
//! connection: it reads, writes the acks the delivery task queues, and keeps
//! the connection alive, also while the delivery task is too busy to take
//! more messages.
//!
//! What a device sends cannot break the connection: a PUBLISH that is well
//! framed but unusable (a topic that is not UTF-8, a packet over
//! `limits.max_packet_bytes`, whose payload is dropped as it arrives) is
//! handed on as a message with a [`Defect`], acknowledged in order and
//! dead-lettered. And what the bridge publishes itself is either taken by
//! the broker or refused with a reason ([`PublishRefused`]), never resent
//! in a loop.
//!
//! Layout: `client` is the handle ([`MqttClient`]) the rest of the bridge
//! holds; `session` is the one task that owns the connection, waiting on
//! the socket, the handle's queue and the clock; `state` is its bookkeeping
//! (packet ids, publishes in flight, keep-alive deadlines), kept free of
//! I/O so it is tested directly; `transport` opens TCP or TLS, and `tls`
//! makes the TLS settings from the configured files; `wire` is the packet
//! codec.

mod client;
mod config;
mod error;
mod message;
mod qos;
mod session;
mod state;
mod tls;
mod transport;
mod wire;

pub use config::{MqttConfig, MqttProtocol};
pub use qos::Qos;
pub use tls::{MqttTls, TlsConfig, TlsSettingError};

pub use client::{Ack, AckKind, MqttClient, PublishRefused};
pub use error::MqttError;
pub use message::{Defect, MqttMessage};
pub use session::{Delivery, Intake, MqttSession};
pub use wire::{OutgoingPublish, DEFAULT_MAX_PACKET_BYTES, MAX_KEPT_USER_PROPERTIES};

/// A broker subscription the routes need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub qos: Qos,
}
