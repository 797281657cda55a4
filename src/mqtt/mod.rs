//! The MQTT side: one persistent session that feeds a bounded channel and
//! acknowledges on request.
//!
//! rumqttc drives the protocol. Two rules keep it honest: the task that polls
//! the event loop never awaits an ack (acks come from the delivery task
//! through [`Acker`]), and the request channel is sized well above the
//! in-flight window, so queued acks never wait on a full channel.

mod message;
mod session;

pub use message::MqttMessage;
pub use session::{AckToken, Acker, Delivery, MqttError, MqttSession};
