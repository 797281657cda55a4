//! MQTT's quality-of-service level as a type, so that "0, 1 or 2" is
//! checked once, where a config file or a packet is read, and nowhere else.

use serde::{Deserialize, Deserializer};
use std::fmt;

/// A QoS level. Ordered, so that the stronger of two is their `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qos {
    /// Fire and forget: the broker does not resend, so nothing is acked.
    AtMostOnce = 0,
    /// Resent until PUBACK: may arrive twice.
    AtLeastOnce = 1,
    /// PUBREC/PUBREL/PUBCOMP: the broker delivers it once per session.
    ExactlyOnce = 2,
}

impl Qos {
    /// The level with this number, `None` for anything but 0, 1 or 2.
    pub fn from_u8(level: u8) -> Option<Self> {
        match level {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }

    /// The number on the wire and in the `{mqtt.qos}` placeholder.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Qos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u8())
    }
}

/// Config files write QoS as the number users know; anything else is
/// refused while parsing. The check runs in a visitor, inside the scalar's
/// own deserialisation, so the error carries that scalar's line and field
/// rather than its parent mapping's.
impl<'de> Deserialize<'de> for Qos {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Level;
        impl serde::de::Visitor<'_> for Level {
            type Value = Qos;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("QoS 0, 1 or 2")
            }
            fn visit_u64<E: serde::de::Error>(self, level: u64) -> Result<Qos, E> {
                u8::try_from(level)
                    .ok()
                    .and_then(Qos::from_u8)
                    .ok_or_else(|| E::custom(format!("is {level}; must be 0, 1 or 2")))
            }
            fn visit_i64<E: serde::de::Error>(self, level: i64) -> Result<Qos, E> {
                match u64::try_from(level) {
                    Ok(level) => self.visit_u64(level),
                    Err(_) => Err(E::custom(format!("is {level}; must be 0, 1 or 2"))),
                }
            }
        }
        deserializer.deserialize_u8(Level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_only_three_exist() {
        for level in 0..=2 {
            assert_eq!(Qos::from_u8(level).unwrap().as_u8(), level);
        }
        assert_eq!(Qos::from_u8(3), None);
        assert!(Qos::ExactlyOnce > Qos::AtLeastOnce);
    }

    #[test]
    fn serde_refuses_out_of_range() {
        let ok: Qos = serde_yaml_ng::from_str("2").unwrap();
        assert_eq!(ok, Qos::ExactlyOnce);
        let err = serde_yaml_ng::from_str::<Qos>("3").unwrap_err().to_string();
        assert!(err.contains("must be 0, 1 or 2"), "{err}");
        assert!(serde_yaml_ng::from_str::<Qos>("-1").is_err());
    }
}
