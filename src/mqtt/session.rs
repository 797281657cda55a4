//! One persistent MQTT session, driven packet by packet.
//!
//! The bridge speaks the protocol itself on top of rumqttc's codec instead
//! of using rumqttc's event loop, because exactly-once delivery needs things
//! that event loop decides on its own:
//!
//! - **PUBCOMP after a durable commit.** rumqttc answers PUBREL with PUBCOMP
//!   at once; the bridge must first commit that it forgot the packet id.
//! - **Unknown PUBREL.** After a restart the broker resends PUBREL for a
//!   message whose PUBREC went out before the crash. rumqttc treats that as
//!   a protocol error and disconnects, and the broker resends it on every
//!   reconnect, forever (rumqtt issue #664). Here it is answered like any
//!   other PUBREL.
//! - **Keep-alive independent of backpressure.** rumqttc pings only while
//!   its event loop is polled; when Kafka stalled and the intake stopped
//!   polling, the connection dropped. Here one task keeps writing acks and
//!   PINGREQs while it waits for room in the delivery channel.
//! - **Knowing which acks arrived.** A PINGRESP answers a PINGREQ sent after
//!   some acks, so the broker has processed those acks (it handles a
//!   connection's packets in order). The delivery task uses that to forget
//!   duplicate-detection state it no longer needs.
//! - **Refusals reach the publisher.** An MQTT 5 broker may answer our own
//!   PUBLISH with a failure reason code (not authorised, quota exceeded);
//!   [`Acker::publish_checked`] reports it, and a publish the broker could
//!   only take for a protocol error (over its Maximum Packet Size, a topic
//!   that cannot be encoded) is refused here without being sent, since the
//!   broker would disconnect and the publish would be resent first on every
//!   reconnect.
//! - **Bounded memory per packet.** A PUBLISH over the session's packet
//!   limit is hashed and dropped as it arrives (see `wire::Decoder`) and
//!   handed on as a defective message, acknowledged in order like any
//!   other.

use super::wire::{
    self, Decoder, Inbound, Outbound, OutgoingPublish, Wire, WireError, DEFAULT_MAX_PACKET_BYTES,
    MAX_PACKET_BYTES,
};
use super::MqttConfig;
use super::MqttMessage;
use super::{Qos, Subscription};
use crate::telemetry;
use bytes::BytesMut;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long to wait for TCP, TLS and CONNACK before trying again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Our own QoS 1/2 publishes in flight when the broker does not say how
/// many it takes (MQTT 3.1.1 has no Receive Maximum).
const DEFAULT_OUTGOING_WINDOW: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT session has ended")]
    Closed,
    #[error("MQTT connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("MQTT broker refused the connection: {0}")]
    Refused(String),
    #[error("MQTT broker disconnected: {0}")]
    BrokerDisconnect(String),
    #[error("MQTT broker closed the connection")]
    ConnectionClosed,
    #[error("no {0} from the MQTT broker in time")]
    Timeout(&'static str),
    #[error("TLS: {0}")]
    Tls(String),
}

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
    connection: u64,
}

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
    fn for_message(packet_id: u16, qos: Qos, connection: u64) -> Option<Self> {
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

    fn outbound(self) -> Outbound {
        match self.kind {
            AckKind::PubAck => Outbound::PubAck(self.packet_id),
            AckKind::PubRec => Outbound::PubRec(self.packet_id),
            AckKind::PubComp => Outbound::PubComp(self.packet_id),
        }
    }
}

/// One received message and, for QoS 1 and 2, how to acknowledge it.
#[derive(Debug)]
pub struct Delivery {
    pub message: MqttMessage,
    pub packet_id: u16,
    pub ack: Option<Ack>,
}

/// What the session hands to the delivery task, in the order it happened
/// on the connection.
#[derive(Debug)]
pub enum Intake {
    Message(Delivery),
    /// PUBREL: the broker will not resend this QoS 2 message; send this
    /// PUBCOMP once that is durable.
    Released(Ack),
    /// The broker has processed the first `n` acks the session was given
    /// (counted over the session's life, all connections; acks dropped for
    /// being from an earlier connection count too, see
    /// `SessionState::check`).
    AcksConfirmed(u64),
    /// The connection was lost. Before it takes the session back, the
    /// session waits for the answer: the delivery task proves with a
    /// Kafka transaction that this instance still owns its identity. A
    /// zombie (an instance frozen while a successor took over) is fenced
    /// there and stops, instead of taking the MQTT session from its
    /// successor, and being taken back, for as long as no message happens
    /// to make it commit.
    Reconnecting(oneshot::Sender<()>),
}

enum Command {
    /// Acks in the order they must go out.
    Acks(Vec<Ack>),
    /// One of our own messages; `done` fires when the broker has it
    /// (PUBACK, PUBCOMP; QoS 0: written) or refused it.
    Publish(OutgoingPublish, Completion),
    Disconnect,
}

/// Who waits for one of our own publishes.
enum Completion {
    /// [`Acker::publish`]: told that the publish is over, refused or not
    /// (a refusal is logged).
    Done(oneshot::Sender<()>),
    /// [`Acker::publish_checked`]: told how it ended.
    Checked(oneshot::Sender<Result<(), PublishRefused>>),
}

impl Completion {
    fn finish(self, result: Result<(), PublishRefused>) {
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

/// One of our own QoS 1/2 publishes the broker has not completed.
struct InFlight {
    packet_id: u16,
    publish: OutgoingPublish,
    /// QoS 2: PUBREC received, PUBREL sent.
    released: bool,
    done: Completion,
}

/// Cloneable handle that acknowledges messages and ends the session.
#[derive(Clone)]
pub struct Acker {
    commands: mpsc::Sender<Command>,
}

impl Acker {
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

/// The MQTT session: an acker for the delivery task and an intake loop that
/// forwards what the broker sends into a bounded channel.
pub struct MqttSession {
    config: MqttConfig,
    wire: Wire,
    /// PUBLISH packets over this are not held in memory (see
    /// `wire::Decoder`).
    max_packet_bytes: usize,
    /// The broker's Maximum Packet Size on the current connection.
    broker_max_packet: usize,
    commands: mpsc::Receiver<Command>,
    acker: Acker,
    subscriptions: Vec<Subscription>,
    /// Acks taken from `commands` so far, over all connections (written or
    /// dropped as stale).
    acks_written: u64,
    /// Connections made so far; the current one's number.
    connection: u64,
    next_packet_id: u16,
    /// Our own publishes sent and not completed, in the order sent.
    in_flight: VecDeque<InFlight>,
    /// Our own publishes waiting for room in the broker's window.
    waiting: VecDeque<(OutgoingPublish, Completion)>,
}

/// What the broker's CONNACK said.
struct Accepted {
    session_present: bool,
    receive_maximum: Option<u16>,
    max_packet_size: Option<u32>,
}

/// Why serving a connection ended without an error.
enum Ended {
    Disconnected,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl MqttSession {
    /// Prepares the session; nothing connects until [`Self::run_intake`].
    pub fn new(config: &MqttConfig, subscriptions: Vec<Subscription>) -> Result<Self, MqttError> {
        // Batches of acks, one per transaction: a handful is plenty.
        let (tx, commands) = mpsc::channel(64);
        Ok(Self {
            config: config.clone(),
            wire: Wire::new(config.protocol),
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            broker_max_packet: MAX_PACKET_BYTES as usize,
            commands,
            acker: Acker { commands: tx },
            subscriptions,
            acks_written: 0,
            connection: 0,
            next_packet_id: 0,
            in_flight: VecDeque::new(),
            waiting: VecDeque::new(),
        })
    }

    /// Sets the largest PUBLISH (fixed header included) held in memory
    /// (`limits.max_packet_bytes`; default 2 MiB). A larger one is not
    /// refused: its payload is hashed and dropped as it arrives, and it
    /// reaches the delivery task as a message with an empty payload and
    /// [`super::Defect::TooLarge`], acknowledged in order like any other.
    /// Nothing of this is announced to the broker (a Maximum Packet Size
    /// would make it drop such messages without a trace).
    pub fn with_max_packet_bytes(mut self, max_packet_bytes: usize) -> Self {
        self.max_packet_bytes = max_packet_bytes;
        self
    }

    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }

    /// Connects, reconnecting after any failure, until DISCONNECT has gone
    /// out or `finished` fires.
    ///
    /// Forwards messages into `intake` until `stop_intake` fires; after that
    /// it keeps the connection (so the last acks and the DISCONNECT go out)
    /// but forwards nothing: what arrives then is not acknowledged and the
    /// broker redelivers it.
    ///
    /// `subscribed` is cancelled once the broker has confirmed the
    /// subscriptions: from then on no published message is missed.
    pub async fn run_intake(
        mut self,
        intake: mpsc::Sender<Intake>,
        stop_intake: CancellationToken,
        finished: CancellationToken,
        subscribed: CancellationToken,
    ) -> Result<(), MqttError> {
        let reconnect_delay = Duration::from_millis(self.config.reconnect_delay_ms);
        let mut lost = false;
        loop {
            if lost {
                // Nothing would be acknowledged on a new connection once
                // the intake has stopped: the acks queued belong to the
                // lost one.
                if stop_intake.is_cancelled() {
                    return Ok(());
                }
                if !self.await_ownership(&intake, &finished).await? {
                    return Ok(());
                }
                lost = false;
            }
            let mut connected = false;
            let served = tokio::select! {
                _ = finished.cancelled() => return Ok(()),
                served = self.serve(&intake, &stop_intake, &subscribed, &mut connected) => served,
            };
            match served {
                Ok(Ended::Disconnected) => return Ok(()),
                Err(error) if connected => {
                    telemetry::mqtt_disconnected(&error);
                    lost = true;
                }
                Err(error) => tracing::warn!(%error, "cannot connect to MQTT broker; retrying"),
            }
            tokio::select! {
                _ = finished.cancelled() => return Ok(()),
                _ = tokio::time::sleep(reconnect_delay) => {}
            }
        }
    }

    /// After a lost connection: asks the delivery task to prove that this
    /// instance still owns its identity (see `Intake::Reconnecting`), and
    /// keeps taking commands meanwhile, so the delivery task never waits on
    /// a full command channel. Returns false when the session should end
    /// instead (DISCONNECT requested, or `finished`).
    async fn await_ownership(
        &mut self,
        intake: &mpsc::Sender<Intake>,
        finished: &CancellationToken,
    ) -> Result<bool, MqttError> {
        let (ask, answer) = oneshot::channel();
        let mut answer = std::pin::pin!(answer);
        let mut asked = std::pin::pin!(intake.send(Intake::Reconnecting(ask)));
        let mut sent = false;
        loop {
            tokio::select! {
                _ = finished.cancelled() => return Ok(false),
                result = &mut asked, if !sent => {
                    // The delivery task is gone: nothing more to do.
                    if result.is_err() {
                        return Ok(false);
                    }
                    sent = true;
                }
                result = &mut answer, if sent => {
                    // Dropped unanswered: the delivery task failed (e.g.
                    // fenced); the session must not take the broker's
                    // session back.
                    return result.map(|()| true).map_err(|_| MqttError::Closed);
                }
                command = self.commands.recv() => match command {
                    Some(Command::Acks(acks)) => {
                        // All of a lost connection: none is written.
                        self.acks_written += acks.len() as u64;
                        log_dropped(acks.len());
                    }
                    Some(Command::Publish(publish, done)) => self.waiting.push_back((publish, done)),
                    Some(Command::Disconnect) | None => return Ok(false),
                },
            }
        }
    }

    /// One connection: CONNECT, SUBSCRIBE, then read, ack and ping until it
    /// ends.
    async fn serve(
        &mut self,
        intake: &mpsc::Sender<Intake>,
        stop_intake: &CancellationToken,
        subscribed: &CancellationToken,
        connected: &mut bool,
    ) -> Result<Ended, MqttError> {
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, open(&self.config))
            .await
            .map_err(|_| MqttError::Timeout("TCP/TLS connection"))??;
        let mut out = BytesMut::new();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut decoder = Decoder::new(self.config.protocol, self.max_packet_bytes);
        self.wire.encode_connect(&self.config, &mut out)?;
        write(&mut stream, &mut out).await?;
        let accepted = tokio::time::timeout(
            CONNECT_TIMEOUT,
            read_connack(&mut decoder, &mut stream, &mut buf),
        )
        .await
        .map_err(|_| MqttError::Timeout("CONNACK"))??;
        *connected = true;
        self.connection += 1;
        let connection = self.connection;
        telemetry::mqtt_connected(accepted.session_present);
        let window = accepted
            .receive_maximum
            .map_or(DEFAULT_OUTGOING_WINDOW, usize::from);
        self.broker_max_packet = accepted
            .max_packet_size
            .map_or(MAX_PACKET_BYTES as usize, |m| m as usize);
        // Our unfinished publishes first, in their order, as MQTT requires
        // of a resumed session (MQTT 3.1.1 §4.4). One the broker's limit
        // (which may differ on this connection) no longer allows ends here.
        let mut i = 0;
        while i < self.in_flight.len() {
            let f = &self.in_flight[i];
            if f.released {
                self.wire.encode(Outbound::PubRel(f.packet_id), &mut out)?;
            } else if let Err(refused) = self.check_outgoing(&f.publish) {
                let f = self.in_flight.remove(i).expect("in range");
                f.done.finish(Err(refused));
                continue;
            } else {
                self.wire
                    .encode_publish(f.packet_id, &f.publish, true, &mut out)?;
            }
            i += 1;
        }

        // Subscribe on every connect, also to a resumed session: routes may
        // have changed since the session was made. (MQTT 3.1.1 brokers
        // resend retained messages then; MQTT 5 ones do not, see
        // `Wire::encode_subscribe`.)
        if !self.subscriptions.is_empty() {
            let packet_id = self.packet_id();
            self.wire
                .encode_subscribe(packet_id, &self.subscriptions, &mut out)?;
            write(&mut stream, &mut out).await?;
        } else {
            subscribed.cancel();
        }

        let keep_alive = Duration::from_secs(self.config.keep_alive_s.max(1));
        let mut ticker = tokio::time::interval(keep_alive / 4);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_write = Instant::now();
        // PINGREQs in flight, each with the number of acks written before
        // it: its PINGRESP confirms them.
        let mut pings: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut confirmed = self.acks_written;
        // A packet read but not yet taken by the delivery task. While it
        // waits, nothing more is read (backpressure), but acks and pings
        // still go out.
        let mut pending: Option<Intake> = None;
        let mut reading_since = Instant::now();
        // Bytes arriving show the connection is alive even when a PINGRESP
        // is queued behind a long PUBLISH.
        let mut last_read = Instant::now();

        loop {
            while pending.is_none() {
                let Some(packet) = decoder.decode(&mut buf)? else {
                    break;
                };
                match packet {
                    Inbound::Publish { packet_id, message } => {
                        if !stop_intake.is_cancelled() {
                            let ack = Ack::for_message(packet_id, message.qos, connection);
                            pending = Some(Intake::Message(Delivery {
                                message,
                                packet_id,
                                ack,
                            }));
                        }
                    }
                    Inbound::PubRel(id) => {
                        if !stop_intake.is_cancelled() {
                            pending = Some(Intake::Released(Ack {
                                kind: AckKind::PubComp,
                                packet_id: id,
                                connection,
                            }));
                        }
                    }
                    Inbound::PingResp => {
                        if let Some((_, acks)) = pings.pop_front() {
                            if acks > confirmed {
                                confirmed = acks;
                                pending = Some(Intake::AcksConfirmed(acks));
                            }
                        }
                    }
                    Inbound::SubAck { refused } => {
                        if refused > 0 {
                            tracing::error!(refused, "the MQTT broker refused subscriptions");
                        } else {
                            tracing::info!("MQTT subscriptions in place");
                        }
                        subscribed.cancel();
                    }
                    Inbound::PubAck { packet_id, reason } => {
                        self.completed(packet_id, refusal(reason));
                    }
                    // A PUBCOMP's only failure code (0x92, packet id not
                    // found) means the broker had already released it: the
                    // message was taken at PUBREC.
                    Inbound::PubComp(id) => self.completed(id, Ok(())),
                    Inbound::PubRec { packet_id, reason } if reason >= wire::FIRST_FAILURE_CODE => {
                        // Refused: the flow ends here, the packet id is
                        // free, no PUBREL (MQTT 5 §4.3.3).
                        self.completed(packet_id, refusal(reason));
                    }
                    Inbound::PubRec { packet_id, .. } => {
                        if let Some(f) =
                            self.in_flight.iter_mut().find(|f| f.packet_id == packet_id)
                        {
                            f.released = true;
                        }
                        self.wire.encode(Outbound::PubRel(packet_id), &mut out)?;
                    }
                    Inbound::Disconnect(reason) => return Err(MqttError::BrokerDisconnect(reason)),
                    Inbound::ConnAck { .. } | Inbound::Other => {}
                }
                if pending.is_some() {
                    // Waiting for the delivery task from now on.
                    break;
                }
            }

            self.send_waiting(window, &mut out)?;
            if !out.is_empty() {
                write(&mut stream, &mut out).await?;
                last_write = Instant::now();
            }

            tokio::select! {
                biased;
                command = self.commands.recv() => {
                    let mut next = command;
                    // Take every queued command: one write for many acks.
                    loop {
                        match next {
                            Some(Command::Acks(acks)) => {
                                let mut stale = 0;
                                for ack in &acks {
                                    if ack.connection == connection {
                                        self.wire.encode(ack.outbound(), &mut out)?;
                                    } else {
                                        stale += 1;
                                    }
                                }
                                self.acks_written += acks.len() as u64;
                                log_dropped(stale);
                            }
                            Some(Command::Publish(publish, done)) => {
                                self.waiting.push_back((publish, done));
                            }
                            Some(Command::Disconnect) | None => {
                                self.wire.encode(Outbound::Disconnect, &mut out)?;
                                write(&mut stream, &mut out).await?;
                                let _ = stream.shutdown().await;
                                return Ok(Ended::Disconnected);
                            }
                        }
                        if out.len() > 64 * 1024 {
                            break;
                        }
                        match self.commands.try_recv() {
                            Ok(command) => next = Some(command),
                            Err(_) => break,
                        }
                    }
                    // A barrier after every write of acks: its PINGRESP says
                    // these acks arrived. One per write, not one at a time:
                    // a PINGRESP queues behind the whole in-flight window,
                    // and waiting for it before the next barrier doubled how
                    // long the delivery task must remember acked messages.
                    self.wire.encode(Outbound::PingReq, &mut out)?;
                    pings.push_back((Instant::now(), self.acks_written));
                    write(&mut stream, &mut out).await?;
                    last_write = Instant::now();
                    crate::fault::point("after_ack");
                }
                permit = intake.reserve(), if pending.is_some() => {
                    match permit {
                        Ok(permit) => permit.send(pending.take().expect("guarded")),
                        // The delivery task is gone: keep the connection for
                        // the DISCONNECT, forward nothing.
                        Err(_) => {
                            stop_intake.cancel();
                            pending = None;
                        }
                    }
                    reading_since = Instant::now();
                }
                read = stream.read_buf(&mut buf), if pending.is_none() => {
                    if read? == 0 {
                        return Err(MqttError::ConnectionClosed);
                    }
                    last_read = Instant::now();
                }
                _ = ticker.tick() => {
                    // The broker must hear from us within the keep-alive.
                    if last_write.elapsed() >= keep_alive / 2 {
                        self.wire.encode(Outbound::PingReq, &mut out)?;
                        pings.push_back((Instant::now(), self.acks_written));
                        write(&mut stream, &mut out).await?;
                        last_write = Instant::now();
                    }
                    // A PINGRESP not read because the delivery task is busy
                    // is not a dead connection: count only reading time.
                    if let Some((sent, _)) = pings.front() {
                        let waiting = (*sent).max(reading_since).max(last_read);
                        if pending.is_none() && waiting.elapsed() > keep_alive {
                            return Err(MqttError::Timeout("PINGRESP"));
                        }
                    }
                }
            }
        }
    }

    /// Packet ids of our own packets (SUBSCRIBE, PUBLISH); never 0, never
    /// one still in flight.
    fn packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            let id = self.next_packet_id;
            if !self.in_flight.iter().any(|f| f.packet_id == id) {
                return id;
            }
        }
    }

    /// Why `publish` cannot go out on this connection, if it cannot.
    fn check_outgoing(&self, publish: &OutgoingPublish) -> Result<(), PublishRefused> {
        if let Some(problem) = wire::outgoing_problem(publish) {
            return Err(PublishRefused::Invalid(problem));
        }
        let size = wire::publish_size(self.config.protocol, publish);
        let max = self.broker_max_packet.min(MAX_PACKET_BYTES as usize);
        if size > max {
            return Err(PublishRefused::TooLarge { size, max });
        }
        Ok(())
    }

    /// Sends waiting publishes while the broker's window has room.
    fn send_waiting(&mut self, window: usize, out: &mut BytesMut) -> Result<(), MqttError> {
        while self.in_flight.len() < window {
            let Some((publish, done)) = self.waiting.pop_front() else {
                break;
            };
            if let Err(refused) = self.check_outgoing(&publish) {
                tracing::debug!(%refused, "publish refused before sending");
                done.finish(Err(refused));
                continue;
            }
            // QoS 0 has no packet id and nothing to wait for; it queues
            // here too, so our publishes go out in the order asked.
            if publish.qos == Qos::AtMostOnce {
                self.wire.encode_publish(0, &publish, false, out)?;
                done.finish(Ok(()));
                continue;
            }
            let packet_id = self.packet_id();
            self.wire.encode_publish(packet_id, &publish, false, out)?;
            self.in_flight.push_back(InFlight {
                packet_id,
                publish,
                released: false,
                done,
            });
        }
        Ok(())
    }

    /// PUBACK or PUBCOMP of our own publish, or a refusing PUBREC: it is
    /// done, and its packet id free.
    fn completed(&mut self, packet_id: u16, result: Result<(), PublishRefused>) {
        if let Some(i) = self.in_flight.iter().position(|f| f.packet_id == packet_id) {
            let f = self.in_flight.remove(i).expect("found");
            f.done.finish(result);
        }
    }
}

/// A PUBACK or PUBREC reason code as the publish's outcome.
fn refusal(reason: u8) -> Result<(), PublishRefused> {
    if reason >= wire::FIRST_FAILURE_CODE {
        Err(PublishRefused::Broker { code: reason })
    } else {
        Ok(())
    }
}

async fn read_connack(
    decoder: &mut Decoder,
    stream: &mut Box<dyn Stream>,
    buf: &mut BytesMut,
) -> Result<Accepted, MqttError> {
    loop {
        while let Some(packet) = decoder.decode(buf)? {
            match packet {
                Inbound::ConnAck {
                    refused: Some(reason),
                    ..
                } => return Err(MqttError::Refused(reason)),
                Inbound::ConnAck {
                    session_present,
                    receive_maximum,
                    max_packet_size,
                    ..
                } => {
                    return Ok(Accepted {
                        session_present,
                        receive_maximum,
                        max_packet_size,
                    })
                }
                Inbound::Disconnect(reason) => return Err(MqttError::BrokerDisconnect(reason)),
                _ => {}
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(MqttError::ConnectionClosed);
        }
    }
}

/// Acks counted (they keep the numbering of `Intake::AcksConfirmed`) but
/// not written: they belong to a connection that is gone, and the broker
/// resends their messages.
fn log_dropped(count: usize) {
    if count > 0 {
        tracing::debug!(
            count,
            "acks of a lost connection dropped; the broker resends their messages"
        );
    }
}

async fn write(stream: &mut Box<dyn Stream>, out: &mut BytesMut) -> Result<(), MqttError> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

async fn open(config: &MqttConfig) -> Result<Box<dyn Stream>, MqttError> {
    let tcp = tokio::net::TcpStream::connect((config.host.as_str(), config.port)).await?;
    tcp.set_nodelay(true)?;
    if !config.tls {
        return Ok(Box::new(tcp));
    }
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A certificate the store cannot use is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(config.host.clone())
        .map_err(|e| MqttError::Tls(e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await?;
    Ok(Box::new(stream))
}

#[cfg(test)]
mod tests {
    //! The session against a scripted broker on a loopback socket: what it
    //! writes is read back with rumqttc's codec, what it is sent is written
    //! byte by byte.

    use super::*;
    use crate::mqtt::Defect;
    use bytes::Bytes;
    use rumqttc::mqttbytes::v4;
    use rumqttc::v5::mqttbytes::v5;
    use tokio::net::{TcpListener, TcpStream};

    const WAIT: Duration = Duration::from_secs(10);

    struct Broker {
        stream: TcpStream,
        buf: BytesMut,
        protocol: MqttProtocol,
    }

    use crate::mqtt::MqttProtocol;

    /// A session connected to a scripted broker that answered CONNECT with
    /// `connack`, and the session's intake.
    async fn connect(
        protocol: MqttProtocol,
        connack: &[u8],
        configure: impl FnOnce(MqttSession) -> MqttSession,
    ) -> (Broker, Acker, mpsc::Receiver<Intake>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let protocol_name = match protocol {
            MqttProtocol::V5 => "v5",
            MqttProtocol::V311 => "v311",
        };
        let config: MqttConfig = serde_yaml_ng::from_str(&format!(
            "{{ host: 127.0.0.1, port: {port}, client_id: c, protocol: {protocol_name}, keep_alive_s: 60 }}"
        ))
        .unwrap();
        let session = configure(MqttSession::new(&config, Vec::new()).unwrap());
        let acker = session.acker();
        let (tx, rx) = mpsc::channel(16);
        let finished = CancellationToken::new();
        tokio::spawn(session.run_intake(
            tx,
            CancellationToken::new(),
            finished.clone(),
            CancellationToken::new(),
        ));
        let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut broker = Broker {
            stream,
            buf: BytesMut::new(),
            protocol,
        };
        broker.expect(|p| matches!(p, Packet::Connect)).await;
        broker.send(connack).await;
        (broker, acker, rx, finished)
    }

    /// What the broker read, as far as these tests care.
    #[derive(Debug, PartialEq)]
    enum Packet {
        Connect,
        Publish { packet_id: u16, topic: String },
        PubAck(u16),
        PubRec(u16),
        PubRel(u16),
        PingReq,
        Other,
    }

    impl Broker {
        async fn read(&mut self) -> Packet {
            loop {
                let packet = match self.protocol {
                    MqttProtocol::V5 => match v5::Packet::read(&mut self.buf, None) {
                        Ok(v5::Packet::Connect(..)) => Some(Packet::Connect),
                        Ok(v5::Packet::Publish(p)) => Some(Packet::Publish {
                            packet_id: p.pkid,
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        }),
                        Ok(v5::Packet::PubAck(a)) => Some(Packet::PubAck(a.pkid)),
                        Ok(v5::Packet::PubRec(a)) => Some(Packet::PubRec(a.pkid)),
                        Ok(v5::Packet::PubRel(a)) => Some(Packet::PubRel(a.pkid)),
                        Ok(v5::Packet::PingReq(_)) => Some(Packet::PingReq),
                        Ok(_) => Some(Packet::Other),
                        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => None,
                        Err(e) => panic!("the session sent a malformed packet: {e}"),
                    },
                    MqttProtocol::V311 => match v4::Packet::read(&mut self.buf, 1 << 28) {
                        Ok(v4::Packet::Connect(..)) => Some(Packet::Connect),
                        Ok(v4::Packet::Publish(p)) => Some(Packet::Publish {
                            packet_id: p.pkid,
                            topic: p.topic,
                        }),
                        Ok(v4::Packet::PubAck(a)) => Some(Packet::PubAck(a.pkid)),
                        Ok(v4::Packet::PubRec(a)) => Some(Packet::PubRec(a.pkid)),
                        Ok(v4::Packet::PubRel(a)) => Some(Packet::PubRel(a.pkid)),
                        Ok(v4::Packet::PingReq) => Some(Packet::PingReq),
                        Ok(_) => Some(Packet::Other),
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => None,
                        Err(e) => panic!("the session sent a malformed packet: {e}"),
                    },
                };
                if let Some(packet) = packet {
                    return packet;
                }
                let read = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("the session wrote nothing")
                    .unwrap();
                assert!(read > 0, "the session closed the connection");
            }
        }

        /// The next packet other than PINGREQ, which must match.
        async fn expect(&mut self, wanted: impl Fn(&Packet) -> bool) -> Packet {
            loop {
                match self.read().await {
                    Packet::PingReq => continue,
                    packet => {
                        assert!(wanted(&packet), "unexpected {packet:?}");
                        return packet;
                    }
                }
            }
        }

        async fn expect_publish(&mut self, wanted: &str) -> u16 {
            match self
                .expect(|p| matches!(p, Packet::Publish { topic, .. } if topic == wanted))
                .await
            {
                Packet::Publish { packet_id, .. } => packet_id,
                _ => unreachable!(),
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }
    }

    fn publish(topic: &str, qos: u8, payload: usize) -> OutgoingPublish {
        OutgoingPublish {
            topic: topic.into(),
            payload: Bytes::from(vec![b'x'; payload]),
            qos: Qos::from_u8(qos).unwrap(),
            retain: false,
        }
    }

    async fn outcome(
        done: oneshot::Receiver<Result<(), PublishRefused>>,
    ) -> Result<(), PublishRefused> {
        tokio::time::timeout(WAIT, done)
            .await
            .expect("the publish ended")
            .expect("the session is alive")
    }

    fn ack(packet_type: u8, id: u16, reason: u8) -> [u8; 5] {
        let [high, low] = id.to_be_bytes();
        [packet_type << 4, 3, high, low, reason]
    }

    /// CONNACK, MQTT 5, with a Maximum Packet Size.
    const CONNACK_V5_MAX_200: &[u8] = &[0x20, 8, 0, 0, 5, 0x27, 0, 0, 0, 200];
    const CONNACK_V5: &[u8] = &[0x20, 3, 0, 0, 0];
    const CONNACK_V4: &[u8] = &[0x20, 2, 0, 0];

    #[tokio::test]
    async fn a_refusing_puback_or_pubrec_ends_the_publish_with_its_reason() {
        let (mut broker, acker, _intake, finished) =
            connect(MqttProtocol::V5, CONNACK_V5, |s| s).await;

        // QoS 1, refused: 0x87.
        let done = acker.publish_checked(publish("a/1", 1, 3)).await.unwrap();
        let id = broker.expect_publish("a/1").await;
        broker.send(&ack(4, id, 0x87)).await;
        let refused = outcome(done).await.unwrap_err();
        assert_eq!(refused, PublishRefused::Broker { code: 0x87 });
        assert_eq!(
            refused.to_string(),
            "broker refused the publish: NotAuthorized (0x87)"
        );

        // QoS 2, refused at PUBREC: no PUBREL, the flow is over.
        let done = acker.publish_checked(publish("a/2", 2, 3)).await.unwrap();
        let refused_id = broker.expect_publish("a/2").await;
        broker.send(&ack(5, refused_id, 0x97)).await;
        assert_eq!(
            outcome(done).await,
            Err(PublishRefused::Broker { code: 0x97 })
        );

        // QoS 2, taken: PUBREL for this one only, then PUBCOMP ends it.
        let done = acker.publish_checked(publish("a/3", 2, 3)).await.unwrap();
        let id = broker.expect_publish("a/3").await;
        broker.send(&ack(5, id, 0)).await;
        assert_eq!(broker.expect(|_| true).await, Packet::PubRel(id));
        broker.send(&ack(7, id, 0)).await;
        assert_eq!(outcome(done).await, Ok(()));

        // `publish` keeps its old contract: it fires, refused or not.
        let done = acker.publish(publish("a/4", 1, 3)).await.unwrap();
        let id = broker.expect_publish("a/4").await;
        broker.send(&ack(4, id, 0x80)).await;
        tokio::time::timeout(WAIT, done).await.unwrap().unwrap();

        // Success codes below 0x80 are successes.
        let done = acker.publish_checked(publish("a/5", 1, 3)).await.unwrap();
        let id = broker.expect_publish("a/5").await;
        broker.send(&ack(4, id, 0x10)).await;
        assert_eq!(outcome(done).await, Ok(()));
        finished.cancel();
    }

    #[tokio::test]
    async fn a_publish_over_the_brokers_maximum_packet_size_is_not_sent() {
        let (mut broker, acker, _intake, finished) =
            connect(MqttProtocol::V5, CONNACK_V5_MAX_200, |s| s).await;
        let too_large = acker.publish_checked(publish("big", 1, 200)).await.unwrap();
        let invalid = acker.publish_checked(publish("a/+", 1, 1)).await.unwrap();
        let fits = acker
            .publish_checked(publish("small", 1, 100))
            .await
            .unwrap();
        assert!(matches!(
            outcome(too_large).await,
            Err(PublishRefused::TooLarge { max: 200, .. })
        ));
        assert!(matches!(
            outcome(invalid).await,
            Err(PublishRefused::Invalid(_))
        ));
        // The next thing the broker reads is the one that fits.
        let id = broker.expect_publish("small").await;
        broker.send(&ack(4, id, 0)).await;
        assert_eq!(outcome(fits).await, Ok(()));
        finished.cancel();
    }

    #[tokio::test]
    async fn an_undecodable_publish_is_handed_on_and_acked_in_order() {
        let (mut broker, acker, mut intake, finished) =
            connect(MqttProtocol::V311, CONNACK_V4, |s| s).await;
        // QoS 1, id 7, topic "a\xffb": then a valid one, id 8.
        broker
            .send(&[0x32, 9, 0, 3, b'a', 0xff, b'b', 0, 7, b'h', b'i'])
            .await;
        broker.send(&[0x32, 7, 0, 1, b'c', 0, 8, b'o', b'k']).await;
        let mut acks = Vec::new();
        for (id, defect) in [(7, Some(Defect::TopicNotUtf8)), (8, None)] {
            let intake = tokio::time::timeout(WAIT, intake.recv()).await.unwrap();
            let Some(Intake::Message(delivery)) = intake else {
                panic!("{intake:?}");
            };
            assert_eq!(delivery.packet_id, id);
            assert_eq!(delivery.message.defect, defect);
            acks.extend(delivery.ack);
        }
        acker.ack_all(acks).await.unwrap();
        assert_eq!(broker.expect(|_| true).await, Packet::PubAck(7));
        assert_eq!(broker.expect(|_| true).await, Packet::PubAck(8));
        finished.cancel();
    }

    #[tokio::test]
    async fn a_publish_over_the_limit_streams_through_and_the_next_one_follows() {
        let (mut broker, _acker, mut intake, finished) =
            connect(MqttProtocol::V5, CONNACK_V5, |s| {
                s.with_max_packet_bytes(4096)
            })
            .await;
        let payload_bytes: usize = 8 * 1024 * 1024;
        let remaining = 2 + 1 + 2 + 1 + payload_bytes;
        let mut head = vec![0x32];
        let mut n = remaining;
        while n > 0 {
            let b = (n % 128) as u8;
            n /= 128;
            head.push(if n > 0 { b | 0x80 } else { b });
        }
        head.extend_from_slice(&[0, 1, b't', 0, 9, 0]);
        let packet_bytes = head.len() + payload_bytes;
        let writer = tokio::spawn(async move {
            broker.send(&head).await;
            let chunk = vec![b'z'; 64 * 1024];
            for _ in 0..payload_bytes / chunk.len() {
                broker.send(&chunk).await;
            }
            broker.send(&[0x32, 7, 0, 1, b'n', 0, 10, 0, b'!']).await;
            broker
        });
        async fn next(intake: &mut mpsc::Receiver<Intake>) -> Delivery {
            match tokio::time::timeout(WAIT, intake.recv()).await.unwrap() {
                Some(Intake::Message(d)) => d,
                other => panic!("{other:?}"),
            }
        }
        let big = next(&mut intake).await;
        assert_eq!(big.packet_id, 9);
        assert!(big.message.payload.is_empty());
        assert!(matches!(
            big.message.defect,
            Some(Defect::TooLarge { packet_bytes: p, payload_bytes: q, .. }) if (p, q) == (packet_bytes, payload_bytes)
        ));
        let small = next(&mut intake).await;
        assert_eq!(
            (small.packet_id, &small.message.payload[..]),
            (10, &b"!"[..])
        );
        let _broker = writer.await.unwrap();
        finished.cancel();
    }
}
