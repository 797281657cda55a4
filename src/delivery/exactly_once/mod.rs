//! Exactly-once delivery's memory: which MQTT packet ids are already in
//! Kafka, written in every transaction.

mod produced_ids;

pub use produced_ids::*;
