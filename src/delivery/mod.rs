//! From received messages to committed transactions to MQTT acks.
//!
//! One task owns the producer. It routes each message as it arrives and
//! enqueues its record in the open transaction, closes the batch on size or
//! time, commits, and only then acknowledges the batch's messages to the
//! broker, in arrival order. A crash before the commit loses nothing (the
//! broker redelivers what was not acknowledged); a crash between commit and
//! ack can duplicate, which is what the exactly-once work closes.

mod commit_loop;

pub use commit_loop::{CommitLoop, DeliveryError};
