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

use super::wire::{Inbound, Outbound, OutgoingPublish, Wire, WireError};
use super::MqttMessage;
use crate::config::MqttConfig;
use crate::route::Subscription;
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
    fn for_message(packet_id: u16, qos: u8, connection: u64) -> Option<Self> {
        let kind = match qos {
            0 => return None,
            1 => AckKind::PubAck,
            _ => AckKind::PubRec,
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
    /// (PUBACK, PUBCOMP; QoS 0: written).
    Publish(OutgoingPublish, oneshot::Sender<()>),
    Disconnect,
}

/// One of our own QoS 1/2 publishes the broker has not completed.
struct InFlight {
    packet_id: u16,
    publish: OutgoingPublish,
    /// QoS 2: PUBREC received, PUBREL sent.
    released: bool,
    done: oneshot::Sender<()>,
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
    pub async fn publish(
        &self,
        publish: OutgoingPublish,
    ) -> Result<oneshot::Receiver<()>, MqttError> {
        let (done, receiver) = oneshot::channel();
        self.commands
            .send(Command::Publish(publish, done))
            .await
            .map_err(|_| MqttError::Closed)?;
        Ok(receiver)
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
    waiting: VecDeque<(OutgoingPublish, oneshot::Sender<()>)>,
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
        self.wire.encode_connect(&self.config, &mut out)?;
        write(&mut stream, &mut out).await?;
        let (session_present, receive_maximum) =
            tokio::time::timeout(CONNECT_TIMEOUT, self.read_connack(&mut stream, &mut buf))
                .await
                .map_err(|_| MqttError::Timeout("CONNACK"))??;
        *connected = true;
        self.connection += 1;
        let connection = self.connection;
        telemetry::mqtt_connected(session_present);
        let window = receive_maximum.map_or(DEFAULT_OUTGOING_WINDOW, usize::from);
        // Our unfinished publishes first, in their order, as MQTT requires
        // of a resumed session (MQTT 3.1.1 §4.4).
        for f in &self.in_flight {
            if f.released {
                self.wire.encode(Outbound::PubRel(f.packet_id), &mut out)?;
            } else {
                self.wire
                    .encode_publish(f.packet_id, &f.publish, true, &mut out)?;
            }
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

        loop {
            while pending.is_none() {
                let Some(packet) = self.wire.decode(&mut buf)? else {
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
                    Inbound::PubAck(id) | Inbound::PubComp(id) => self.completed(id),
                    Inbound::PubRec(id) => {
                        if let Some(f) = self.in_flight.iter_mut().find(|f| f.packet_id == id) {
                            f.released = true;
                        }
                        self.wire.encode(Outbound::PubRel(id), &mut out)?;
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
                        let waiting = (*sent).max(reading_since);
                        if pending.is_none() && waiting.elapsed() > keep_alive {
                            return Err(MqttError::Timeout("PINGRESP"));
                        }
                    }
                }
            }
        }
    }

    async fn read_connack(
        &self,
        stream: &mut Box<dyn Stream>,
        buf: &mut BytesMut,
    ) -> Result<(bool, Option<u16>), MqttError> {
        loop {
            while let Some(packet) = self.wire.decode(buf)? {
                match packet {
                    Inbound::ConnAck {
                        refused: Some(reason),
                        ..
                    } => return Err(MqttError::Refused(reason)),
                    Inbound::ConnAck {
                        session_present,
                        receive_maximum,
                        ..
                    } => return Ok((session_present, receive_maximum)),
                    Inbound::Disconnect(reason) => return Err(MqttError::BrokerDisconnect(reason)),
                    _ => {}
                }
            }
            if stream.read_buf(buf).await? == 0 {
                return Err(MqttError::ConnectionClosed);
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

    /// Sends waiting publishes while the broker's window has room.
    fn send_waiting(&mut self, window: usize, out: &mut BytesMut) -> Result<(), MqttError> {
        while self.in_flight.len() < window {
            let Some((publish, done)) = self.waiting.pop_front() else {
                break;
            };
            // QoS 0 has no packet id and nothing to wait for; it queues
            // here too, so our publishes go out in the order asked.
            if publish.qos == 0 {
                self.wire.encode_publish(0, &publish, false, out)?;
                let _ = done.send(());
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

    /// PUBACK or PUBCOMP of our own publish: it is done.
    fn completed(&mut self, packet_id: u16) {
        if let Some(i) = self.in_flight.iter().position(|f| f.packet_id == packet_id) {
            let f = self.in_flight.remove(i).expect("found");
            let _ = f.done.send(());
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
