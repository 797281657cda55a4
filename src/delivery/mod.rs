//! From received messages to committed transactions to MQTT acks.
//!
//! One task owns the producer. It routes each message as it arrives and
//! enqueues its record in the open transaction, closes the batch on size or
//! time, commits, and only then acknowledges the batch's messages to the
//! broker, in arrival order. A crash before the commit loses nothing (the
//! broker redelivers what was not acknowledged). With exactly-once
//! delivery, every transaction also records the packet ids it produced
//! ([`ProducedIds`]), so that a message the broker resends after a crash
//! between commit and ack is recognised and not produced again.

mod commit_loop;
pub mod exactly_once;

pub use commit_loop::{CommitLoop, DeliveryError, ExactlyOnce};
pub use exactly_once::{ProducedIds, StateError};
