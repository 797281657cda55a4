//! The session's bookkeeping, with no I/O: packet ids, our own publishes in
//! flight and waiting for room, the count of acks handed out, and the
//! keep-alive deadlines.
//!
//! Kept apart from the session loop so the loop is only about waiting (on
//! the socket, the delivery task and the clock), and so these rules, where
//! the protocol's subtleties are, can be tested directly without a broker.
//! Methods that must answer the broker encode into the caller's buffer; the
//! caller writes it.

use super::client::{Ack, Completion};
use super::wire::{self, Outbound, OutgoingPublish, Wire, WireError, MAX_PACKET_BYTES};
use super::{MqttProtocol, PublishRefused, Qos};
use bytes::BytesMut;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Our own QoS 1/2 publishes in flight when the broker does not say how
/// many it takes (MQTT 3.1.1 has no Receive Maximum).
const DEFAULT_OUTGOING_WINDOW: usize = 100;

/// One of our own QoS 1/2 publishes the broker has not completed.
struct InFlight {
    packet_id: u16,
    publish: OutgoingPublish,
    /// QoS 2: PUBREC received, PUBREL sent.
    released: bool,
    done: Completion,
}

/// What the session must remember across connections: which packet ids are
/// taken, which of our publishes are unfinished (resent after a reconnect),
/// and how many acks it was given (the numbering of
/// `Intake::AcksConfirmed`).
pub(super) struct PacketState {
    wire: Wire,
    protocol: MqttProtocol,
    /// Acks taken so far, over all connections (written or dropped as
    /// stale).
    acks_written: u64,
    /// Connections made so far; the current one's number.
    connection: u64,
    next_packet_id: u16,
    /// Our own publishes sent and not completed, in the order sent.
    in_flight: VecDeque<InFlight>,
    /// Our own publishes waiting for room in the broker's window.
    waiting: VecDeque<(OutgoingPublish, Completion)>,
    /// How many of our publishes the broker takes in flight on the current
    /// connection.
    window: usize,
    /// The broker's Maximum Packet Size on the current connection.
    broker_max_packet: usize,
}

impl PacketState {
    pub(super) fn new(protocol: MqttProtocol) -> Self {
        Self {
            wire: Wire::new(protocol),
            protocol,
            acks_written: 0,
            connection: 0,
            next_packet_id: 0,
            in_flight: VecDeque::new(),
            waiting: VecDeque::new(),
            window: DEFAULT_OUTGOING_WINDOW,
            broker_max_packet: MAX_PACKET_BYTES as usize,
        }
    }

    /// A new connection was accepted with these CONNACK limits; its number,
    /// which the acks of messages received on it carry.
    pub(super) fn connected(
        &mut self,
        receive_maximum: Option<u16>,
        max_packet_size: Option<u32>,
    ) -> u64 {
        self.connection += 1;
        self.window = receive_maximum.map_or(DEFAULT_OUTGOING_WINDOW, usize::from);
        self.broker_max_packet = max_packet_size.map_or(MAX_PACKET_BYTES as usize, |m| m as usize);
        self.connection
    }

    /// Acks taken so far (see `Intake::AcksConfirmed`).
    pub(super) fn acks_written(&self) -> u64 {
        self.acks_written
    }

    /// Encodes our unfinished publishes first, in their order, as MQTT
    /// requires of a resumed session (MQTT 3.1.1 §4.4). One the broker's
    /// limit (which may differ on this connection) no longer allows ends
    /// here, refused.
    pub(super) fn resend_unfinished(&mut self, out: &mut BytesMut) -> Result<(), WireError> {
        let mut i = 0;
        while i < self.in_flight.len() {
            let f = &self.in_flight[i];
            if f.released {
                self.wire.encode(Outbound::PubRel(f.packet_id), out)?;
            } else if let Err(refused) = self.check_outgoing(&f.publish) {
                if let Some(f) = self.in_flight.remove(i) {
                    f.done.finish(Err(refused));
                }
                continue;
            } else {
                self.wire
                    .encode_publish(f.packet_id, &f.publish, true, out)?;
            }
            i += 1;
        }
        Ok(())
    }

    /// Packet ids of our own packets (SUBSCRIBE, PUBLISH); never 0, never
    /// one still in flight.
    pub(super) fn packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            let id = self.next_packet_id;
            if !self.in_flight.iter().any(|f| f.packet_id == id) {
                return id;
            }
        }
    }

    /// Queues one of our publishes; [`Self::send_waiting`] sends it when
    /// the window has room.
    pub(super) fn queue_publish(&mut self, publish: OutgoingPublish, done: Completion) {
        self.waiting.push_back((publish, done));
    }

    /// Encodes waiting publishes while the broker's window has room.
    pub(super) fn send_waiting(&mut self, out: &mut BytesMut) -> Result<(), WireError> {
        while self.in_flight.len() < self.window {
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

    /// Why `publish` cannot go out on this connection, if it cannot.
    fn check_outgoing(&self, publish: &OutgoingPublish) -> Result<(), PublishRefused> {
        if let Some(problem) = wire::outgoing_problem(publish) {
            return Err(PublishRefused::Invalid(problem));
        }
        let size = wire::publish_size(self.protocol, publish);
        let max = self.broker_max_packet.min(MAX_PACKET_BYTES as usize);
        if size > max {
            return Err(PublishRefused::TooLarge { size, max });
        }
        Ok(())
    }

    /// PUBACK of our own publish: done, refused or not.
    pub(super) fn pub_ack(&mut self, packet_id: u16, reason: u8) {
        self.completed(packet_id, refusal(reason));
    }

    /// PUBREC of our own QoS 2 publish: a refusal ends the flow, the packet
    /// id is free and no PUBREL follows (MQTT 5 §4.3.3); otherwise PUBREL.
    pub(super) fn pub_rec(
        &mut self,
        packet_id: u16,
        reason: u8,
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        if reason >= wire::FIRST_FAILURE_CODE {
            self.completed(packet_id, refusal(reason));
            return Ok(());
        }
        if let Some(f) = self.in_flight.iter_mut().find(|f| f.packet_id == packet_id) {
            f.released = true;
        }
        self.wire.encode(Outbound::PubRel(packet_id), out)
    }

    /// PUBCOMP of our own QoS 2 publish. Its only failure code (0x92,
    /// packet id not found) means the broker had already released it: the
    /// message was taken at PUBREC.
    pub(super) fn pub_comp(&mut self, packet_id: u16) {
        self.completed(packet_id, Ok(()));
    }

    /// Our publish is done, and its packet id free.
    fn completed(&mut self, packet_id: u16, result: Result<(), PublishRefused>) {
        if let Some(i) = self.in_flight.iter().position(|f| f.packet_id == packet_id) {
            if let Some(f) = self.in_flight.remove(i) {
                f.done.finish(result);
            }
        }
    }

    /// Encodes the acks of the current connection in the order given (the
    /// order messages arrived) and counts them all. Acks of an earlier
    /// connection are dropped: the broker resends their messages, and may
    /// have given their packet ids to others since.
    pub(super) fn write_acks(&mut self, acks: &[Ack], out: &mut BytesMut) -> Result<(), WireError> {
        let mut stale = 0;
        for ack in acks {
            if ack.connection == self.connection {
                self.wire.encode(ack.outbound(), out)?;
            } else {
                stale += 1;
            }
        }
        self.acks_written += acks.len() as u64;
        log_dropped(stale);
        Ok(())
    }

    /// Counts acks that arrived while no connection was up: all of them
    /// belong to a lost one, so none is written.
    pub(super) fn drop_acks(&mut self, acks: &[Ack]) {
        self.acks_written += acks.len() as u64;
        log_dropped(acks.len());
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

/// One connection's keep-alive: when to ping, when silence means the
/// connection is dead, and which acks a PINGRESP confirms.
///
/// Times are passed in, so the rules are tested without a clock.
pub(super) struct KeepAlive {
    interval: Duration,
    /// PINGREQs in flight, each with the number of acks written before it:
    /// its PINGRESP confirms them.
    pings: VecDeque<(Instant, u64)>,
    /// Acks confirmed so far.
    confirmed: u64,
    last_write: Instant,
    /// Bytes arriving show the connection is alive even when a PINGRESP is
    /// queued behind a long PUBLISH.
    last_read: Instant,
    /// When the session last resumed reading after waiting for the delivery
    /// task; a PINGRESP it did not read meanwhile is not overdue.
    reading_since: Instant,
}

impl KeepAlive {
    /// A connection that has just written CONNECT (at `now`), with
    /// `acks_written` acks counted before it.
    pub(super) fn new(interval: Duration, acks_written: u64, now: Instant) -> Self {
        Self {
            interval,
            pings: VecDeque::new(),
            confirmed: acks_written,
            last_write: now,
            last_read: now,
            reading_since: now,
        }
    }

    /// How often to check: often enough that a ping goes out well within
    /// the keep-alive the broker enforces.
    pub(super) fn check_period(&self) -> Duration {
        self.interval / 4
    }

    pub(super) fn wrote(&mut self, now: Instant) {
        self.last_write = now;
    }

    pub(super) fn read(&mut self, now: Instant) {
        self.last_read = now;
    }

    /// The delivery task took the packet the session was holding; reading
    /// starts again.
    pub(super) fn resumed_reading(&mut self, now: Instant) {
        self.reading_since = now;
    }

    /// The broker must hear from us within the keep-alive: ping after half
    /// of it without writing.
    pub(super) fn ping_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_write) >= self.interval / 2
    }

    /// A PINGREQ is going out after `acks_written` acks.
    pub(super) fn ping_sent(&mut self, acks_written: u64, now: Instant) {
        self.pings.push_back((now, acks_written));
    }

    /// A PINGRESP arrived: the number of acks it newly confirms, if any.
    pub(super) fn pong(&mut self) -> Option<u64> {
        let (_, acks) = self.pings.pop_front()?;
        if acks > self.confirmed {
            self.confirmed = acks;
            Some(acks)
        } else {
            None
        }
    }

    /// Whether the oldest PINGRESP is overdue, so the connection is dead.
    /// Only reading time counts: while the session holds a packet for a
    /// busy delivery task (`holding`), it reads nothing, so a PINGRESP it
    /// has not read is not missing.
    pub(super) fn overdue(&self, holding: bool, now: Instant) -> bool {
        let Some((sent, _)) = self.pings.front() else {
            return false;
        };
        let waiting = (*sent).max(self.reading_since).max(self.last_read);
        !holding && now.saturating_duration_since(waiting) > self.interval
    }
}
