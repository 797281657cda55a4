//! The `mqtt` section of the bridge file: how to reach the broker and hold
//! the session. It lives beside the session that reads it, so the MQTT
//! side depends on nothing above it.

use super::tls::{deserialize_tls, TlsConfig};
use super::Qos;
use crate::secret::Secret;
use serde::Deserialize;
use std::path::PathBuf;

/// MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    /// MQTT 5: carries user properties and content type into Kafka headers,
    /// and lets the bridge cap in-flight messages with Receive Maximum.
    #[default]
    V5,
    /// MQTT 3.1.1, for brokers and gateways that speak nothing newer.
    V311,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Must be stable across restarts: the broker keeps the persistent
    /// session (unacknowledged messages) under this id.
    pub client_id: String,
    #[serde(default)]
    pub protocol: MqttProtocol,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (a mounted Kubernetes or Docker secret),
    /// read at start-up instead of `password`. One trailing newline is
    /// ignored.
    pub password_file: Option<PathBuf>,
    /// TLS to the broker: `true` for the system's root certificates and no
    /// client certificate, or a map (see [`TlsConfig`]). Absent or `false`:
    /// plain TCP.
    #[serde(default, deserialize_with = "deserialize_tls")]
    pub tls: Option<TlsConfig>,
    /// `false` keeps the broker-side session across disconnects, so messages
    /// published while the bridge is down are delivered when it returns.
    #[serde(default)]
    pub clean_session: bool,
    /// MQTT 5 session expiry after disconnect.
    #[serde(default = "default_session_expiry_s")]
    pub session_expiry_s: u32,
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Default subscription QoS for routes that do not set their own.
    #[serde(default = "default_qos")]
    pub qos: Qos,
    /// Messages received but not yet acknowledged. When the window is full
    /// the bridge stops reading from the broker, which holds the backlog.
    #[serde(default = "default_inflight_window")]
    pub inflight_window: u16,
    /// Delay before reconnecting after the connection drops. Doubles after
    /// each failed attempt in a row, up to `reconnect_max_delay_ms`, so a
    /// broker that refuses the bridge (a bad certificate, a password) is not
    /// hammered.
    #[serde(default = "default_reconnect_delay_ms")]
    pub reconnect_delay_ms: u64,
    #[serde(default = "default_reconnect_max_delay_ms")]
    pub reconnect_max_delay_ms: u64,
    /// A shared subscription group (`$share/<group>/<filter>`): bridges
    /// of one group split the messages between them instead of each
    /// receiving all. Each keeps its own client id and transactional id
    /// (template them from the pod or host name). Absent: every
    /// subscription is the bridge's own.
    pub share_group: Option<String>,
}

fn default_mqtt_port() -> u16 {
    1883
}
fn default_session_expiry_s() -> u32 {
    3600
}
fn default_keep_alive_s() -> u64 {
    30
}
fn default_qos() -> Qos {
    Qos::AtLeastOnce
}
fn default_inflight_window() -> u16 {
    1000
}
fn default_reconnect_delay_ms() -> u64 {
    1000
}
fn default_reconnect_max_delay_ms() -> u64 {
    30_000
}
