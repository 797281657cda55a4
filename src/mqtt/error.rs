//! The MQTT layer's one error type, shared by the handle, the session loop
//! and the transport, so callers match on a single enum whichever part
//! failed.

use super::wire::WireError;

/// Why an MQTT operation or connection failed. Most variants end one
/// connection only: the session reconnects after them.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT session has ended")]
    Closed,
    #[error("MQTT connection failed: {0}")]
    Io(std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("MQTT broker refused the connection: {0}")]
    Refused(String),
    #[error("MQTT broker disconnected: {0}")]
    BrokerDisconnect(String),
    #[error("MQTT broker closed the connection")]
    ConnectionClosed,
    #[error("no {0} from the MQTT broker in time")]
    Timeout(&'static str),
    /// A TLS failure, said as what to check (see `tls::explain`).
    #[error("MQTT over TLS: {0}")]
    Tls(String),
}

impl From<std::io::Error> for MqttError {
    /// rustls reports handshake failures and the broker's alerts as I/O
    /// errors; those become [`MqttError::Tls`] with the setting to check.
    fn from(error: std::io::Error) -> Self {
        match super::tls::explain(&error) {
            Some(explained) => Self::Tls(explained),
            None => Self::Io(error),
        }
    }
}
