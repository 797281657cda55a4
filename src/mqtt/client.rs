//! The handle the rest of the bridge holds on the MQTT session: it queues
//! acks, our own publishes and the final DISCONNECT for the one task that
//! owns the connection.
//!
//! A handle rather than shared access to the connection, so that nothing
//! but the session loop ever writes to the socket: acks keep their order,
//! and a slow caller can never stall keep-alive. The queue is bounded, so
//! a caller waits when the session is behind.

use super::wire::{self, Outbound, OutgoingPublish};
use super::{MqttError, MqttTls, Qos, Subscription};
use tokio::sync::{mpsc, oneshot};

/// Command batches queued for the session: one batch of acks per Kafka
/// transaction, so a handful is plenty.
const COMMAND_QUEUE: usize = 64;

/// Why one of our own publishes did not reach the broker's subscribers.
/// Final: sending the same publish again would be refused again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefused {
    /// The broker answered with a failure reason code (MQTT 5 PUBACK or
    /// PUBREC, 0x80 or more), e.g. 0x87 when its ACL denies the topic.
    #[error("broker refused the publish: {} (0x{code:02x})", wire::reason_code_name(*code))]
    Broker { code: u8 },
    /// Not sent: the packet is larger than the broker's Maximum Packet Size
    /// (MQTT 5 CONNACK), and a broker disconnects a client that sends one.
    #[error(
        "the publish is {size} bytes, over the broker's Maximum Packet Size of {max}; not sent"
    )]
    TooLarge { size: usize, max: usize },
    /// Not sent: it would be a malformed PUBLISH.
    #[error("not sent: {0}")]
    Invalid(&'static str),
    /// Not sent: this many of our publishes already wait for room in the
    /// broker's window (or hold the bytes allowed), and the queue is bounded.
    #[error("not sent: {queued} publishes already wait for the broker's window")]
    Backlog { queued: usize },
    /// Not sent: above the broker's Maximum QoS (MQTT 5 CONNACK). QoS 2 is
    /// sent at QoS 1 to a broker whose maximum is 1; this is QoS 1 or 2 to
    /// a broker that takes only QoS 0, where nothing would confirm it.
    #[error("not sent: QoS {qos} is above the broker's Maximum QoS of {max}")]
    QosNotSupported { qos: u8, max: u8 },
    /// Not sent: retained, and the broker does not take retained messages
    /// (MQTT 5 CONNACK Retain Available 0).
    #[error("not sent: retained, and the broker does not take retained messages")]
    RetainNotAvailable,
}

impl PublishRefused {
    /// The broker's reason code, when the broker refused.
    pub fn code(&self) -> Option<u8> {
        match self {
            Self::Broker { code } => Some(*code),
            _ => None,
        }
    }
}

/// An acknowledgement the delivery task sends once it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ack {
    pub kind: AckKind,
    pub packet_id: u16,
    /// The connection the acknowledged packet came in on. An ack is
    /// written on that connection only: after a reconnect the broker
    /// resends whatever it had not had acked, and an ack from before,
    /// written late, may hit a packet id the broker has given to another
    /// message since (one of ours, or, after a successor took the session
    /// over, one of its).
    pub(super) connection: u64,
}

/// Which packet acknowledges a received message; QoS 2 takes two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckKind {
    /// QoS 1: the message is done.
    PubAck,
    /// QoS 2, first half: the message is taken; the broker answers PUBREL.
    PubRec,
    /// QoS 2, second half: the packet id is free again.
    PubComp,
}

impl Ack {
    /// The ack a message received on `connection` needs, by its QoS.
    pub(super) fn for_message(packet_id: u16, qos: Qos, connection: u64) -> Option<Self> {
        let kind = match qos {
            Qos::AtMostOnce => return None,
            Qos::AtLeastOnce => AckKind::PubAck,
            Qos::ExactlyOnce => AckKind::PubRec,
        };
        Some(Self {
            kind,
            packet_id,
            connection,
        })
    }

    /// The packet that carries this ack to the broker.
    pub(super) fn outbound(self) -> Outbound {
        match self.kind {
            AckKind::PubAck => Outbound::PubAck(self.packet_id),
            AckKind::PubRec => Outbound::PubRec(self.packet_id),
            AckKind::PubComp => Outbound::PubComp(self.packet_id),
        }
    }
}

/// What the handle asks of the session loop, in one queue so acks, our
/// publishes and the DISCONNECT keep the order they were asked in.
pub(super) enum Command {
    /// Acks in the order they must go out.
    Acks(Vec<Ack>),
    /// One of our own messages; `done` fires when the broker has it
    /// (PUBACK, PUBCOMP; QoS 0: written) or refused it.
    Publish(OutgoingPublish, Completion),
    /// The filters the session should hold from now on (a reload).
    Subscriptions(Vec<Subscription>),
    /// TLS settings for the next connection (a reload read renewed files).
    Tls(Box<MqttTls>),
    Disconnect,
}

/// Who waits for one of our own publishes.
pub(super) enum Completion {
    /// [`MqttClient::publish`]: told that the publish is over, refused or not
    /// (a refusal is logged).
    Done(oneshot::Sender<()>),
    /// [`MqttClient::publish_checked`]: told how it ended.
    Checked(oneshot::Sender<Result<(), PublishRefused>>),
}

impl Completion {
    /// Tells the publisher; one who stopped waiting is not an error.
    pub(super) fn finish(self, result: Result<(), PublishRefused>) {
        match self {
            Self::Done(done) => {
                if let Err(refused) = result {
                    tracing::warn!(%refused, "an MQTT publish was refused");
                }
                let _ = done.send(());
            }
            Self::Checked(done) => {
                let _ = done.send(result);
            }
        }
    }
}

/// Cloneable handle that acknowledges messages and ends the session.
#[derive(Clone)]
pub struct MqttClient {
    commands: mpsc::Sender<Command>,
}

impl MqttClient {
    /// A handle and the queue it feeds, which the session loop drains.
    pub(super) fn new() -> (Self, mpsc::Receiver<Command>) {
        let (commands, queue) = mpsc::channel(COMMAND_QUEUE);
        (Self { commands }, queue)
    }

    /// Queues acks, to be written in this order. Acks must go out in the
    /// order messages arrived (MQTT 3.1.1 §4.6); callers ack in order.
    ///
    /// Waiting for room cannot deadlock with the intake: the session takes
    /// commands also while it waits for room in the delivery channel.
    pub async fn ack_all(&self, acks: Vec<Ack>) -> Result<(), MqttError> {
        self.commands
            .send(Command::Acks(acks))
            .await
            .map_err(|_| MqttError::Closed)
    }

    /// Publishes one of our own messages. The receiver fires once the broker
    /// has it (PUBACK or PUBCOMP; QoS 0: once written), also across
    /// reconnects, where unfinished publishes are resent in order. It fails
    /// if the session ends first.
    ///
    /// It also fires when the publish was refused (see
    /// [`Self::publish_checked`], which tells which).
    pub async fn publish(
        &self,
        publish: OutgoingPublish,
    ) -> Result<oneshot::Receiver<()>, MqttError> {
        let (done, receiver) = oneshot::channel();
        self.send_publish(publish, Completion::Done(done)).await?;
        Ok(receiver)
    }

    /// [`Self::publish`], telling how it ended: `Ok(())` once the broker has
    /// it, or why it was refused: by the broker (an MQTT 5 failure reason
    /// code in PUBACK or PUBREC; for QoS 2 the flow ends there), or here,
    /// unsent, because the broker could only take it for a protocol error.
    /// A refusal is final; the publish is not retried.
    pub async fn publish_checked(
        &self,
        publish: OutgoingPublish,
    ) -> Result<oneshot::Receiver<Result<(), PublishRefused>>, MqttError> {
        let (done, receiver) = oneshot::channel();
        self.send_publish(publish, Completion::Checked(done))
            .await?;
        Ok(receiver)
    }

    async fn send_publish(
        &self,
        publish: OutgoingPublish,
        done: Completion,
    ) -> Result<(), MqttError> {
        self.commands
            .send(Command::Publish(publish, done))
            .await
            .map_err(|_| MqttError::Closed)
    }

    /// Makes the session hold `subscriptions` from now on: it unsubscribes
    /// from the filters not among them and subscribes to the new ones (or
    /// at a new QoS), and subscribes to them all on later connections.
    pub async fn set_subscriptions(
        &self,
        subscriptions: Vec<Subscription>,
    ) -> Result<(), MqttError> {
        self.commands
            .send(Command::Subscriptions(subscriptions))
            .await
            .map_err(|_| MqttError::Closed)
    }

    /// Makes the session use `tls` from its next connection on; the
    /// connection up now stays (a renewed certificate is needed only for
    /// the next handshake).
    pub async fn set_tls(&self, tls: MqttTls) -> Result<(), MqttError> {
        self.commands
            .send(Command::Tls(Box::new(tls)))
            .await
            .map_err(|_| MqttError::Closed)
    }

    /// Sends DISCONNECT after the acks queued before it. The broker keeps the
    /// session (when not clean), so unacknowledged messages are redelivered
    /// to the next connection.
    pub async fn disconnect(&self) -> Result<(), MqttError> {
        self.commands
            .send(Command::Disconnect)
            .await
            .map_err(|_| MqttError::Closed)
    }
}
