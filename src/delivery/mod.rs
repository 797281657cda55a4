//! From received messages to committed transactions to MQTT acks.
//!
//! One task owns the producer ([`CommitLoop`]). It routes each message as
//! it arrives and enqueues its record in the open transaction
//! (`batch.rs`), closes the batch on size or time, commits, and only then
//! acknowledges the batch's messages to the broker, in arrival order
//! (`acks.rs`). A crash before the commit loses nothing (the broker
//! redelivers what was not acknowledged). A commit without a verdict is
//! settled before anything else happens (`settle.rs`). With exactly-once
//! delivery, every transaction also records the packet ids it produced
//! (`exactly_once/`), so that a message the broker resends after a crash
//! between commit and ack is recognised and not produced again.

mod acks;
mod batch;
mod commit_loop;
mod exactly_once;
mod settle;

pub use commit_loop::{CommitLoop, RouteSwap};
pub use exactly_once::{ExactlyOnce, LoadError, ProducedIds, StateError};

use crate::kafka::SinkError;
use crate::mqtt::MqttError;

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Kafka(#[from] SinkError),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error("another instance with this identity has committed since this one's last transaction: this one is a zombie and stops")]
    Superseded,
    #[error("the exactly-once head record is unreadable: {0}")]
    Head(#[from] StateError),
}
