//! The MQTT side: one persistent session that feeds a bounded channel and
//! acknowledges on request.
//!
//! The session speaks the protocol itself over rumqttc's packet codec (see
//! `session` for why not rumqttc's event loop). One task owns the
//! connection: it reads, writes the acks the delivery task queues, and keeps
//! the connection alive, also while the delivery task is too busy to take
//! more messages.

mod message;
mod session;
mod wire;

pub use message::{Defect, MqttMessage};
pub use session::{Ack, AckKind, Acker, Delivery, Intake, MqttError, MqttSession};
pub use wire::OutgoingPublish;
