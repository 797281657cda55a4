//! Values that must never reach a log line, `Debug` output or `check`.
//!
//! Configuration structs derive `Debug`, and a stray `?config` in a log
//! call, a panic message or an error's context would print whatever they
//! hold. A secret is therefore its own type whose `Debug` and `Display`
//! print a placeholder; the value comes out only through [`Secret::expose`],
//! at the one place that sends it (the MQTT CONNECT, librdkafka's config).

use serde::Deserialize;
use std::fmt;

/// Shown instead of a secret.
pub const REDACTED: &str = "[redacted]";

/// A password or key. Deserialises from a plain string.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the code that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Whether a librdkafka property holds a secret: its name says password,
/// secret, token or private key (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `sasl.oauthbearer.token...`,
/// `ssl.key.pem`), in any case.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "token", "private", "key.pem"]
        .iter()
        .any(|word| name.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_prints_as_redacted() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "[redacted] [redacted]");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn secret_properties_are_recognised_by_name() {
        for name in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "SASL.PASSWORD",
            "my.token.endpoint",
            "ssl.key.pem",
        ] {
            assert!(is_secret_property(name), "{name}");
        }
        for name in ["sasl.username", "compression.type", "bootstrap.servers"] {
            assert!(!is_secret_property(name), "{name}");
        }
    }
}
