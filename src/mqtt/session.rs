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
//!   [`MqttClient::publish_checked`] reports it, and a publish the broker could
//!   only take for a protocol error (over its Maximum Packet Size, a topic
//!   that cannot be encoded) is refused here without being sent, since the
//!   broker would disconnect and the publish would be resent first on every
//!   reconnect.
//! - **Bounded memory per packet.** A PUBLISH over the session's packet
//!   limit is hashed and dropped as it arrives (see `wire::Decoder`) and
//!   handed on as a defective message, acknowledged in order like any
//!   other.

use super::client::{Ack, AckKind, Command, MqttClient};
use super::state::{KeepAlive, PacketState};
use super::transport::{self, write, Stream};
use super::wire::{Decoder, Inbound, Outbound, Wire, DEFAULT_MAX_PACKET_BYTES};
use super::MqttConfig;
use super::MqttError;
use super::MqttMessage;
use super::MqttTls;
use super::Subscription;
use crate::backoff::Backoff;
use crate::fault::{self, Point};
use crate::telemetry::{self, Health};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long to wait for TCP, TLS and CONNACK before trying again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Encoded acks held before they are written, when many are queued at once.
const ACK_BATCH_BYTES: usize = 64 * 1024;

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
    /// being from an earlier connection count too: the delivery side
    /// recognises the broker's resend of such a message by its DUP flag and
    /// content, see `delivery::ProducedIds::check`).
    AcksConfirmed(u64),
    /// The connection was lost. Before it takes the session back, the
    /// session waits for the answer: the delivery task proves with a
    /// Kafka transaction that this instance still owns its identity. A
    /// zombie (an instance frozen while a successor took over) is fenced
    /// there and stops, instead of taking the MQTT session from its
    /// successor, and being taken back, for as long as no message happens
    /// to make it commit.
    Reconnecting(oneshot::Sender<()>),
    /// The broker accepted the connection without a session (CONNACK
    /// Session Present 0): it will resend nothing from before, and may
    /// reuse any packet id for a new message. Sent before any message of
    /// the connection; the session reads nothing more until the answer
    /// comes, which the delivery task sends once it has forgotten the old
    /// session's packet ids durably.
    SessionLost(oneshot::Sender<()>),
}

/// The MQTT session: an client for the delivery task and an intake loop that
/// forwards what the broker sends into a bounded channel.
pub struct MqttSession {
    config: MqttConfig,
    wire: Wire,
    /// PUBLISH packets over this are not held in memory (see
    /// `wire::Decoder`).
    max_packet_bytes: usize,
    commands: mpsc::Receiver<Command>,
    client: MqttClient,
    subscriptions: Vec<Subscription>,
    /// TLS for the next connection; `None` is plain TCP.
    tls: Option<MqttTls>,
    state: PacketState,
    /// Where connection and subscription states are reported for `/readyz`.
    health: Arc<Health>,
}

/// What the broker's CONNACK said.
struct Accepted {
    session_present: bool,
    receive_maximum: Option<u16>,
    max_packet_size: Option<u32>,
    server_keep_alive: Option<u16>,
    max_qos: Option<u8>,
    retain_available: Option<bool>,
}

impl MqttSession {
    /// Prepares the session; nothing connects until [`Self::run_intake`].
    pub fn new(config: &MqttConfig, subscriptions: Vec<Subscription>) -> Self {
        let (client, commands) = MqttClient::new();
        Self {
            config: config.clone(),
            wire: Wire::new(config.protocol).with_share_group(config.share_group.clone()),
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            commands,
            client,
            subscriptions,
            tls: None,
            state: PacketState::new(config.protocol),
            health: Arc::default(),
        }
    }

    /// Reports connection and subscription states to `health`.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = health;
        self
    }

    /// Connects over TLS as `tls` says (made from `mqtt.tls` by
    /// [`MqttTls::load`]). Without it the session connects over plain TCP.
    pub fn with_tls(mut self, tls: Option<MqttTls>) -> Self {
        self.tls = tls;
        self
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

    /// A handle to the session: it acks, publishes and disconnects, and can
    /// be cloned for every task that needs to.
    pub fn client(&self) -> MqttClient {
        self.client.clone()
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
        // Grows with each failed attempt in a row: a broker that refuses us
        // (a certificate, a password, an ACL) is asked again at most every
        // `reconnect_max_delay_ms`, not in a loop.
        let mut retry = Backoff::new(
            Duration::from_millis(self.config.reconnect_delay_ms),
            Duration::from_millis(
                self.config
                    .reconnect_max_delay_ms
                    .max(self.config.reconnect_delay_ms),
            ),
        );
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
                Ok(()) => return Ok(()),
                Err(error) if connected => {
                    telemetry::mqtt_lost(&self.health, &error);
                    lost = true;
                    retry.reset();
                }
                Err(error) => telemetry::mqtt_connect_failed(&self.health, &error, retry.delay()),
            }
            if !self.wait_to_retry(&mut retry, &finished).await {
                return Ok(());
            }
        }
    }

    /// Waits out the retry delay, taking commands meanwhile as
    /// [`Self::await_ownership`] does (the delay grows to
    /// `reconnect_max_delay_ms`, and the delivery task must not wait on a
    /// full command queue that long). New TLS settings (a reload that read
    /// a renewed certificate) end the wait: the next attempt may succeed.
    /// False when the session should end instead.
    async fn wait_to_retry(&mut self, retry: &mut Backoff, finished: &CancellationToken) -> bool {
        let delay = tokio::time::sleep(retry.delay());
        let mut delay = std::pin::pin!(delay);
        retry.grow();
        loop {
            tokio::select! {
                _ = finished.cancelled() => return false,
                _ = &mut delay => return true,
                command = self.commands.recv() => match command {
                    Some(Command::Tls(tls)) => {
                        self.tls = Some(*tls);
                        retry.reset();
                        return true;
                    }
                    Some(command) => {
                        if !self.take_offline(command) {
                            return false;
                        }
                    }
                    None => return false,
                },
            }
        }
    }

    /// A command taken while there is no connection: acks are for a
    /// connection that is gone, publishes and settings wait for the next
    /// one. False for DISCONNECT: there is nothing to disconnect, the
    /// session ends.
    fn take_offline(&mut self, command: Command) -> bool {
        match command {
            Command::Acks(acks) => self.state.drop_acks(&acks),
            Command::Publish(publish, done) => self.state.queue_publish(publish, done),
            // Subscribed to on the next connection.
            Command::Subscriptions(subscriptions) => self.subscriptions = subscriptions,
            Command::Tls(tls) => self.tls = Some(*tls),
            Command::Disconnect => return false,
        }
        true
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
                    Some(command) => {
                        if !self.take_offline(command) {
                            return Ok(false);
                        }
                    }
                    None => return Ok(false),
                },
            }
        }
    }

    /// One connection: opens it, then serves it until it ends. `Ok` once
    /// DISCONNECT has gone out.
    async fn serve(
        &mut self,
        intake: &mpsc::Sender<Intake>,
        stop_intake: &CancellationToken,
        subscribed: &CancellationToken,
        connected: &mut bool,
    ) -> Result<(), MqttError> {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            transport::open(&self.config, self.tls.as_ref()),
        )
        .await
        .map_err(|_| MqttError::Timeout("TCP/TLS connection"))??;
        self.serve_stream(stream, intake, stop_intake, subscribed, connected)
            .await
    }

    /// CONNECT, SUBSCRIBE, then read, ack and ping until the connection
    /// ends. `connected` is set once the broker has accepted the session.
    ///
    /// One packet read and not yet taken by the delivery task is held;
    /// while it is, nothing more is read (backpressure: the broker holds
    /// the backlog), but commands, acks and pings still go out.
    async fn serve_stream(
        &mut self,
        mut stream: Box<dyn Stream>,
        intake: &mpsc::Sender<Intake>,
        stop_intake: &CancellationToken,
        subscribed: &CancellationToken,
        connected: &mut bool,
    ) -> Result<(), MqttError> {
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
        telemetry::mqtt_connected(
            &self.health,
            accepted.session_present,
            !self.subscriptions.is_empty(),
        );
        let connection = self
            .state
            .connected(accepted.receive_maximum, accepted.max_packet_size);
        self.state
            .broker_limits(accepted.max_qos, accepted.retain_available);
        self.state
            .resend_unfinished(accepted.session_present, &mut out)?;

        // Subscribe on every connect, also to a resumed session: routes may
        // have changed since the session was made. (MQTT 3.1.1 brokers
        // resend retained messages then; MQTT 5 ones do not, see
        // `Wire::encode_subscribe`.)
        if !self.subscriptions.is_empty() {
            let packet_id = self.state.packet_id();
            self.wire
                .encode_subscribe(packet_id, &self.subscriptions, &mut out)?;
            write(&mut stream, &mut out).await?;
        } else {
            subscribed.cancel();
        }

        // MQTT 5: a Server Keep Alive replaces ours (a broker that allows
        // less than we asked would otherwise drop an idle bridge, again
        // and again). 0 turns the broker's check off; we keep pinging at
        // our own pace, which is harmless.
        let keep_alive_s = match accepted.server_keep_alive {
            Some(server) if server > 0 => {
                if u64::from(server) != self.config.keep_alive_s {
                    tracing::info!(
                        server_keep_alive_s = server,
                        configured_s = self.config.keep_alive_s,
                        "using the broker's keep-alive"
                    );
                }
                u64::from(server)
            }
            _ => self.config.keep_alive_s,
        };
        let interval = Duration::from_secs(keep_alive_s.max(1));
        let mut keep_alive = KeepAlive::new(interval, self.state.acks_written(), Instant::now());
        let mut ticker = tokio::time::interval(keep_alive.check_period());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A broker that kept no session for us forgot every message it had
        // sent and not seen completed: the delivery task must forget their
        // packet ids, durably, before the first message of this session,
        // which may reuse one of them. Until it says so, nothing is read.
        // (Not once intake has stopped: nothing more is taken then.)
        let mut held: Option<Intake> = None;
        let mut forgetting: Option<oneshot::Receiver<()>> = None;
        if !accepted.session_present && !stop_intake.is_cancelled() {
            let (done, answer) = oneshot::channel();
            held = Some(Intake::SessionLost(done));
            forgetting = Some(answer);
        }

        loop {
            while held.is_none() && forgetting.is_none() {
                let Some(packet) = decoder.decode(&mut buf)? else {
                    break;
                };
                held = self.received(
                    packet,
                    connection,
                    &mut keep_alive,
                    stop_intake,
                    subscribed,
                    &mut out,
                )?;
            }

            self.state.send_waiting(&mut out)?;
            if !out.is_empty() {
                write(&mut stream, &mut out).await?;
                keep_alive.wrote(Instant::now());
            }

            tokio::select! {
                biased;
                command = self.commands.recv() => {
                    if !self.take_commands(command, &mut out)? {
                        self.wire.encode(Outbound::Disconnect, &mut out)?;
                        write(&mut stream, &mut out).await?;
                        let _ = stream.shutdown().await;
                        return Ok(());
                    }
                    // A barrier after every write of acks: its PINGRESP says
                    // these acks arrived. One per write, not one at a time:
                    // a PINGRESP queues behind the whole in-flight window,
                    // and waiting for it before the next barrier doubled how
                    // long the delivery task must remember acked messages.
                    self.wire.encode(Outbound::PingReq, &mut out)?;
                    keep_alive.ping_sent(self.state.acks_written(), Instant::now());
                    write(&mut stream, &mut out).await?;
                    keep_alive.wrote(Instant::now());
                    fault::point(Point::AfterAck);
                }
                permit = intake.reserve(), if held.is_some() => {
                    let packet = held.take();
                    match permit {
                        Ok(permit) => {
                            if let Some(packet) = packet {
                                permit.send(packet);
                            }
                        }
                        // The delivery task is gone: keep the connection for
                        // the DISCONNECT, forward nothing.
                        Err(_) => stop_intake.cancel(),
                    }
                    keep_alive.resumed_reading(Instant::now());
                }
                forgot = async { forgetting.as_mut().expect("guarded").await }, if forgetting.is_some() && held.is_none() => {
                    // Dropped unanswered: the delivery task failed; the
                    // session must not take messages it cannot judge.
                    forgot.map_err(|_| MqttError::Closed)?;
                    forgetting = None;
                    keep_alive.resumed_reading(Instant::now());
                }
                read = stream.read_buf(&mut buf), if held.is_none() && forgetting.is_none() => {
                    if read? == 0 {
                        return Err(MqttError::ConnectionClosed);
                    }
                    keep_alive.read(Instant::now());
                }
                _ = ticker.tick() => {
                    if keep_alive.ping_due(Instant::now()) {
                        self.wire.encode(Outbound::PingReq, &mut out)?;
                        keep_alive.ping_sent(self.state.acks_written(), Instant::now());
                        write(&mut stream, &mut out).await?;
                        keep_alive.wrote(Instant::now());
                    }
                    if keep_alive.overdue(held.is_some() || forgetting.is_some(), Instant::now()) {
                        return Err(MqttError::Timeout("PINGRESP"));
                    }
                }
            }
        }
    }

    /// Takes a packet from the broker: what the delivery task must be
    /// handed, if anything, or the connection's end.
    fn received(
        &mut self,
        packet: Inbound,
        connection: u64,
        keep_alive: &mut KeepAlive,
        stop_intake: &CancellationToken,
        subscribed: &CancellationToken,
        out: &mut BytesMut,
    ) -> Result<Option<Intake>, MqttError> {
        // After the intake stopped, what arrives is not acknowledged and
        // the broker redelivers it.
        let forwarding = !stop_intake.is_cancelled();
        Ok(match packet {
            Inbound::Publish { packet_id, message } => forwarding.then(|| {
                let ack = Ack::for_message(packet_id, message.qos, connection);
                Intake::Message(Delivery {
                    message,
                    packet_id,
                    ack,
                })
            }),
            Inbound::PubRel(packet_id) => forwarding.then_some(Intake::Released(Ack {
                kind: AckKind::PubComp,
                packet_id,
                connection,
            })),
            Inbound::PingResp => keep_alive.pong().map(Intake::AcksConfirmed),
            Inbound::SubAck { refused } => {
                telemetry::mqtt_subscribed(&self.health, refused);
                subscribed.cancel();
                None
            }
            Inbound::PubAck { packet_id, reason } => {
                self.state.pub_ack(packet_id, reason);
                None
            }
            Inbound::PubRec { packet_id, reason } => {
                self.state.pub_rec(packet_id, reason, out)?;
                None
            }
            Inbound::PubComp(packet_id) => {
                self.state.pub_comp(packet_id);
                None
            }
            Inbound::Disconnect(reason) => return Err(MqttError::BrokerDisconnect(reason)),
            Inbound::ConnAck { .. } | Inbound::Other => None,
        })
    }

    /// On a live connection: UNSUBSCRIBE from the filters `wanted` drops,
    /// SUBSCRIBE to those it adds or changes. The delivery task has already
    /// swapped its routes, so a message on a new filter finds its route.
    fn change_subscriptions(
        &mut self,
        wanted: Vec<Subscription>,
        out: &mut BytesMut,
    ) -> Result<(), MqttError> {
        let dropped: Vec<String> = self
            .subscriptions
            .iter()
            .filter(|old| !wanted.iter().any(|new| new.filter == old.filter))
            .map(|old| old.filter.clone())
            .collect();
        let added: Vec<Subscription> = wanted
            .iter()
            .filter(|new| !self.subscriptions.contains(new))
            .cloned()
            .collect();
        if !dropped.is_empty() {
            tracing::info!(filters = ?dropped, "unsubscribing");
            let packet_id = self.state.packet_id();
            self.wire.encode_unsubscribe(packet_id, &dropped, out)?;
        }
        if !added.is_empty() {
            for sub in &added {
                tracing::info!(filter = %sub.filter, qos = sub.qos.as_u8(), "subscribing");
            }
            let packet_id = self.state.packet_id();
            self.wire.encode_subscribe(packet_id, &added, out)?;
            self.health.mqtt_connected(true);
        }
        self.subscriptions = wanted;
        Ok(())
    }

    /// Takes `first` and every command queued behind it, so many acks go
    /// out in one write. False when the session must disconnect; the acks
    /// taken before that are encoded in `out`.
    fn take_commands(
        &mut self,
        first: Option<Command>,
        out: &mut BytesMut,
    ) -> Result<bool, MqttError> {
        let mut next = first;
        loop {
            match next {
                Some(Command::Acks(acks)) => self.state.write_acks(&acks, out)?,
                Some(Command::Publish(publish, done)) => self.state.queue_publish(publish, done),
                Some(Command::Subscriptions(subscriptions)) => {
                    self.change_subscriptions(subscriptions, out)?
                }
                Some(Command::Tls(tls)) => self.tls = Some(*tls),
                Some(Command::Disconnect) | None => return Ok(false),
            }
            if out.len() > ACK_BATCH_BYTES {
                return Ok(true);
            }
            match self.commands.try_recv() {
                Ok(command) => next = Some(command),
                Err(_) => return Ok(true),
            }
        }
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
                    server_keep_alive,
                    max_qos,
                    retain_available,
                    ..
                } => {
                    return Ok(Accepted {
                        session_present,
                        receive_maximum,
                        max_packet_size,
                        server_keep_alive,
                        max_qos,
                        retain_available,
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

#[cfg(test)]
mod tests {
    //! The session against a scripted broker, on a loopback socket (through
    //! `run_intake`) or an in-memory pipe (through `serve_stream`): what it
    //! writes is read back with rumqttc's codec, what it is sent is written
    //! byte by byte.
    //!
    //! The keep-alive and backpressure tests run on paused time (tokio's
    //! `test-util`, tests only): the clock moves only when every task
    //! waits, so their deadlines are exact, not bounds, and they take no
    //! wall time. The rules themselves are tested on `KeepAlive` with
    //! synthetic instants.

    use super::*;
    use crate::mqtt::{Defect, OutgoingPublish, PublishRefused, Qos};
    use bytes::Bytes;
    use rumqttc::mqttbytes::v4;
    use rumqttc::v5::mqttbytes::v5;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    const WAIT: Duration = Duration::from_secs(10);

    struct Broker {
        reader: Box<dyn AsyncRead + Unpin + Send>,
        writer: Box<dyn AsyncWrite + Unpin + Send>,
        buf: BytesMut,
        protocol: MqttProtocol,
    }

    use crate::mqtt::MqttProtocol;

    fn config(protocol: MqttProtocol, port: u16, keep_alive_s: u64) -> MqttConfig {
        let protocol_name = match protocol {
            MqttProtocol::V5 => "v5",
            MqttProtocol::V311 => "v311",
        };
        serde_yaml_ng::from_str(&format!(
            "{{ host: 127.0.0.1, port: {port}, client_id: c, protocol: {protocol_name}, keep_alive_s: {keep_alive_s} }}"
        ))
        .unwrap()
    }

    /// A session connected to a scripted broker that answered CONNECT with
    /// `connack`, and the session's intake.
    async fn connect(
        protocol: MqttProtocol,
        connack: &[u8],
        configure: impl FnOnce(MqttSession) -> MqttSession,
    ) -> (
        Broker,
        MqttClient,
        mpsc::Receiver<Intake>,
        CancellationToken,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let session = configure(MqttSession::new(&config(protocol, port, 60), Vec::new()));
        let client = session.client();
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
        let mut broker = Broker::new(stream, protocol);
        broker.expect(|p| matches!(p, Packet::Connect)).await;
        broker.send(connack).await;
        (broker, client, rx, finished)
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
        fn new(stream: impl Stream + 'static, protocol: MqttProtocol) -> Self {
            let (reader, writer) = tokio::io::split(stream);
            Self {
                reader: Box::new(reader),
                writer: Box::new(writer),
                buf: BytesMut::new(),
                protocol,
            }
        }

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
                let read = tokio::time::timeout(WAIT, self.reader.read_buf(&mut self.buf))
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
            self.writer.write_all(bytes).await.unwrap();
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

    // CONNACKs of a resumed session (Session Present 1), as the bridge's
    // persistent session usually gets; a session the broker lost is
    // `a_lost_session_is_reported_before_any_message_of_the_new_one`.
    /// CONNACK, MQTT 5, with a Maximum Packet Size.
    const CONNACK_V5_MAX_200: &[u8] = &[0x20, 8, 1, 0, 5, 0x27, 0, 0, 0, 200];
    const CONNACK_V5: &[u8] = &[0x20, 3, 1, 0, 0];
    const CONNACK_V4: &[u8] = &[0x20, 2, 1, 0];
    /// CONNACK, MQTT 5, Session Present 0.
    const CONNACK_V5_NEW_SESSION: &[u8] = &[0x20, 3, 0, 0, 0];

    #[tokio::test]
    async fn a_lost_session_is_reported_before_any_message_of_the_new_one() {
        let (mut broker, _client, mut intake, finished) =
            connect(MqttProtocol::V5, CONNACK_V5_NEW_SESSION, |s| s).await;
        broker.send(&qos1_publish(1)).await;
        let reply = match tokio::time::timeout(WAIT, intake.recv()).await.unwrap() {
            Some(Intake::SessionLost(reply)) => reply,
            other => panic!("expected SessionLost first, got {other:?}"),
        };
        // Nothing of the new session is taken until the delivery task has
        // forgotten the old one's ids.
        let early = tokio::time::timeout(Duration::from_millis(300), intake.recv()).await;
        assert!(early.is_err(), "a message before the answer: {early:?}");
        reply.send(()).unwrap();
        match tokio::time::timeout(WAIT, intake.recv()).await.unwrap() {
            Some(Intake::Message(delivery)) => assert_eq!(delivery.packet_id, 1),
            other => panic!("expected the message, got {other:?}"),
        }
        finished.cancel();
    }

    #[tokio::test]
    async fn a_refusing_puback_or_pubrec_ends_the_publish_with_its_reason() {
        let (mut broker, client, _intake, finished) =
            connect(MqttProtocol::V5, CONNACK_V5, |s| s).await;

        // QoS 1, refused: 0x87.
        let done = client.publish_checked(publish("a/1", 1, 3)).await.unwrap();
        let id = broker.expect_publish("a/1").await;
        broker.send(&ack(4, id, 0x87)).await;
        let refused = outcome(done).await.unwrap_err();
        assert_eq!(refused, PublishRefused::Broker { code: 0x87 });
        assert_eq!(
            refused.to_string(),
            "broker refused the publish: NotAuthorized (0x87)"
        );

        // QoS 2, refused at PUBREC: no PUBREL, the flow is over.
        let done = client.publish_checked(publish("a/2", 2, 3)).await.unwrap();
        let refused_id = broker.expect_publish("a/2").await;
        broker.send(&ack(5, refused_id, 0x97)).await;
        assert_eq!(
            outcome(done).await,
            Err(PublishRefused::Broker { code: 0x97 })
        );

        // QoS 2, taken: PUBREL for this one only, then PUBCOMP ends it.
        let done = client.publish_checked(publish("a/3", 2, 3)).await.unwrap();
        let id = broker.expect_publish("a/3").await;
        broker.send(&ack(5, id, 0)).await;
        assert_eq!(broker.expect(|_| true).await, Packet::PubRel(id));
        broker.send(&ack(7, id, 0)).await;
        assert_eq!(outcome(done).await, Ok(()));

        // `publish` keeps its old contract: it fires, refused or not.
        let done = client.publish(publish("a/4", 1, 3)).await.unwrap();
        let id = broker.expect_publish("a/4").await;
        broker.send(&ack(4, id, 0x80)).await;
        tokio::time::timeout(WAIT, done).await.unwrap().unwrap();

        // Success codes below 0x80 are successes.
        let done = client.publish_checked(publish("a/5", 1, 3)).await.unwrap();
        let id = broker.expect_publish("a/5").await;
        broker.send(&ack(4, id, 0x10)).await;
        assert_eq!(outcome(done).await, Ok(()));
        finished.cancel();
    }

    #[tokio::test]
    async fn a_publish_over_the_brokers_maximum_packet_size_is_not_sent() {
        let (mut broker, client, _intake, finished) =
            connect(MqttProtocol::V5, CONNACK_V5_MAX_200, |s| s).await;
        let too_large = client
            .publish_checked(publish("big", 1, 200))
            .await
            .unwrap();
        let invalid = client.publish_checked(publish("a/+", 1, 1)).await.unwrap();
        let fits = client
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
        let (mut broker, client, mut intake, finished) =
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
        client.ack_all(acks).await.unwrap();
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
        let mut head = crate::mqtt::wire::testing::fixed(0x32, remaining);
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

    /// A session serving one connection over an in-memory pipe of
    /// `pipe_bytes` (a full pipe blocks the writer, as a socket would), with
    /// an intake of `intake_capacity`, already past CONNACK (MQTT 3.1.1).
    struct InMemory {
        broker: Broker,
        client: MqttClient,
        intake: mpsc::Receiver<Intake>,
        session: JoinHandle<Result<(), MqttError>>,
    }

    async fn serve_in_memory(
        keep_alive_s: u64,
        intake_capacity: usize,
        pipe_bytes: usize,
    ) -> InMemory {
        serve_in_memory_as(
            MqttProtocol::V311,
            CONNACK_V4,
            keep_alive_s,
            intake_capacity,
            pipe_bytes,
        )
        .await
    }

    /// A session speaking `protocol` over an in-memory pipe to a scripted
    /// broker that answered its CONNECT with `connack`.
    async fn serve_in_memory_as(
        protocol: MqttProtocol,
        connack: &[u8],
        keep_alive_s: u64,
        intake_capacity: usize,
        pipe_bytes: usize,
    ) -> InMemory {
        let config = config(protocol, 1883, keep_alive_s);
        let mut session = MqttSession::new(&config, Vec::new());
        let client = session.client();
        let (ours, server) = tokio::io::duplex(pipe_bytes);
        let (tx, intake) = mpsc::channel(intake_capacity);
        let session = tokio::spawn(async move {
            let (stop_intake, subscribed) = (CancellationToken::new(), CancellationToken::new());
            let mut connected = false;
            session
                .serve_stream(
                    Box::new(ours),
                    &tx,
                    &stop_intake,
                    &subscribed,
                    &mut connected,
                )
                .await
        });
        let mut broker = Broker::new(server, protocol);
        assert_eq!(broker.read().await, Packet::Connect);
        broker.send(connack).await;
        InMemory {
            broker,
            client,
            intake,
            session,
        }
    }

    /// QoS 1 PUBLISH, MQTT 3.1.1, topic "t", two payload bytes.
    fn qos1_publish(packet_id: u16) -> [u8; 9] {
        let [high, low] = packet_id.to_be_bytes();
        [0x32, 7, 0, 1, b't', high, low, b'o', b'k']
    }

    const PINGRESP: &[u8] = &[0xd0, 0];
    const KEEP_ALIVE: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_silent_session_pings_after_half_the_keep_alive() {
        let start = Instant::now();
        let InMemory {
            mut broker,
            session,
            ..
        } = serve_in_memory(1, 16, 64 * 1024).await;
        for _ in 0..3 {
            assert_eq!(broker.read().await, Packet::PingReq);
            broker.send(PINGRESP).await;
        }
        // Three pings, each after half a keep-alive of silence, all
        // answered: the connection outlived its keep-alive.
        assert_eq!(start.elapsed(), KEEP_ALIVE * 3 / 2);
        assert!(!session.is_finished());
        session.abort();
    }

    /// A broker that holds us to a shorter keep-alive than we asked for
    /// (MQTT 5 Server Keep Alive) is pinged at its pace, not ours.
    #[tokio::test(start_paused = true)]
    async fn the_brokers_server_keep_alive_replaces_ours() {
        let start = Instant::now();
        // Session Present, Server Keep Alive (0x13) of 4 s; ours is 60.
        let connack = [0x20, 6, 1, 0, 3, 0x13, 0, 4];
        let InMemory {
            mut broker,
            session,
            ..
        } = serve_in_memory_as(MqttProtocol::V5, &connack, 60, 16, 64 * 1024).await;
        assert_eq!(broker.read().await, Packet::PingReq);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        session.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_pingresp_ends_the_connection() {
        let start = Instant::now();
        let InMemory {
            mut broker,
            session,
            ..
        } = serve_in_memory(1, 16, 64 * 1024).await;
        assert_eq!(broker.read().await, Packet::PingReq);
        // No answer: within the keep-alive after the ping, the session
        // gives the connection up (run_intake then reconnects).
        let ended = tokio::time::timeout(WAIT, session)
            .await
            .expect("the session gave up on the connection")
            .unwrap();
        assert!(
            matches!(ended, Err(MqttError::Timeout("PINGRESP"))),
            "{ended:?}"
        );
        // Half a keep-alive to the ping, a whole one for its answer, then
        // the next check (every quarter keep-alive) finds it missing.
        assert_eq!(start.elapsed(), KEEP_ALIVE * 7 / 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_intake_stops_reading_but_keeps_the_connection_alive() {
        const MESSAGES: u16 = 40;
        let InMemory {
            mut broker,
            client,
            mut intake,
            session,
        } = serve_in_memory(1, 1, 64).await;
        // 360 bytes into a 64-byte pipe: the broker's writes complete only
        // as far as the session reads.
        let mut writer = std::mem::replace(&mut broker.writer, Box::new(tokio::io::sink()));
        let writer = tokio::spawn(async move {
            for id in 1..=MESSAGES {
                writer.write_all(&qos1_publish(id)).await.unwrap();
            }
            writer
        });
        // Nobody takes from the intake. The session holds one message and
        // reads no more, but still pings; and the PINGRESPs it does not
        // read while it waits are not missing: three pings, a keep-alive
        // and a half without an answer, and the connection stands.
        for _ in 0..3 {
            assert_eq!(broker.read().await, Packet::PingReq);
        }
        // Well past the point where an unread PINGRESP would count as
        // missing if reading time were not all that counts.
        tokio::time::sleep(KEEP_ALIVE * 3).await;
        assert!(!writer.is_finished(), "the session kept reading");
        assert!(!session.is_finished());

        // Taking from the intake frees it: every message, in order.
        let mut acks = Vec::new();
        for id in 1..=MESSAGES {
            match tokio::time::timeout(WAIT, intake.recv()).await.unwrap() {
                Some(Intake::Message(delivery)) => {
                    assert_eq!(delivery.packet_id, id);
                    acks.extend(delivery.ack);
                }
                other => panic!("{other:?}"),
            }
        }
        broker.writer = tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
        client.ack_all(acks).await.unwrap();
        for id in 1..=MESSAGES {
            assert_eq!(broker.expect(|_| true).await, Packet::PubAck(id));
        }
        session.abort();
    }
}
