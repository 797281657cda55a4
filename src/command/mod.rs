//! Kafka → MQTT: command records from the data centre delivered to devices.
//!
//! A command route names a Kafka topic; each record becomes one MQTT
//! message on a topic rendered from its key and value. The record's offset
//! is committed only after the broker acknowledged the publish, so a bridge
//! that dies in between delivers the command again rather than losing it
//! (at least once). Records are handled one at a time in offset order, so
//! commands to one device (one key, one partition) keep their order.

mod runner;
mod table;

pub use runner::{run, CommandError};
pub use table::{CommandTable, Prepared};
