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

/// Our own publishes waiting for the broker's window, at most: a relay
/// route turns device messages into publishes, and a device sending QoS 0
/// (which no window slows) faster than the broker completes them must not
/// grow the queue for ever. Past either bound a publish is refused
/// ([`PublishRefused::Backlog`]) and its source dead-lettered.
const MAX_WAITING_PUBLISHES: usize = 1024;
const MAX_WAITING_BYTES: usize = 64 * 1024 * 1024;

/// One of our own QoS 1/2 publishes the broker has not completed.
struct InFlight {
    packet_id: u16,
    publish: OutgoingPublish,
    /// QoS 2: PUBREC received, PUBREL sent.
    released: bool,
    /// The connection it (or its PUBREL) last went out on: after a
    /// reconnect to a broker with a smaller Receive Maximum, the rest go
    /// out as the first complete.
    sent_on: u64,
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
    /// Topic and payload bytes in `waiting`.
    waiting_bytes: usize,
    /// How many of our publishes the broker takes in flight on the current
    /// connection.
    window: usize,
    /// The broker's Maximum Packet Size on the current connection.
    broker_max_packet: usize,
    /// The broker's Maximum QoS (MQTT 5 CONNACK; 2 when not announced).
    max_qos: Qos,
    /// Whether the broker takes retained messages (MQTT 5 CONNACK).
    retain_available: bool,
    /// Whether resends on this connection carry DUP (a resumed session).
    resend_dup: bool,
    /// In-flight publishes not yet sent on this connection (held back by a
    /// smaller Receive Maximum after a reconnect): 0 almost always, which
    /// spares `send_waiting`, called on every turn of the session loop, a
    /// scan of the in-flight list.
    unsent: usize,
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
            waiting_bytes: 0,
            window: DEFAULT_OUTGOING_WINDOW,
            broker_max_packet: MAX_PACKET_BYTES as usize,
            max_qos: Qos::ExactlyOnce,
            retain_available: true,
            resend_dup: true,
            unsent: 0,
        }
    }

    /// The rest of the broker's CONNACK limits on the new connection
    /// (after [`Self::connected`]): MQTT 5 says a client must not publish
    /// above its Maximum QoS, nor retained when Retain Available is 0; a
    /// broker disconnects one that does, and the publish would be resent
    /// first on every reconnect.
    pub(super) fn broker_limits(&mut self, max_qos: Option<u8>, retain_available: Option<bool>) {
        self.max_qos = max_qos.and_then(Qos::from_u8).unwrap_or(Qos::ExactlyOnce);
        self.retain_available = retain_available.unwrap_or(true);
    }

    /// A new connection was accepted with these CONNACK limits; its number,
    /// which the acks of messages received on it carry.
    pub(super) fn connected(
        &mut self,
        receive_maximum: Option<u16>,
        max_packet_size: Option<u32>,
    ) -> u64 {
        self.connection += 1;
        // At least one (a broker announcing 0, which MQTT 5 forbids, would
        // otherwise stall every publish for good), and one id short of all
        // of them: with every id in flight, the SUBSCRIBE of the next
        // connect would find none free.
        self.window = receive_maximum
            .map_or(DEFAULT_OUTGOING_WINDOW, usize::from)
            .clamp(1, usize::from(u16::MAX) - 1);
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
    ///
    /// Without `session_present` the broker has forgotten them (its session
    /// expired, or it restarted without persistence), and MQTT says to
    /// discard the session's state: a QoS 2 publish it had answered with
    /// PUBREC was taken then, and is done; the others go out again as new
    /// messages (DUP clear), at least once as before.
    pub(super) fn resend_unfinished(
        &mut self,
        session_present: bool,
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        self.resend_dup = session_present;
        if !session_present {
            let (done, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.in_flight)
                .into_iter()
                .partition(|f| f.released);
            self.in_flight = kept;
            for f in done {
                f.done.finish(Ok(()));
            }
        }
        // None has gone out on this new connection yet.
        self.unsent = self.in_flight.len();
        self.resend_in_window(out)
    }

    /// Sends what of our unfinished publishes (or their PUBRELs) has not
    /// gone out on this connection yet, oldest first, as far as the
    /// broker's window allows; one its limits no longer allow ends here,
    /// refused.
    fn resend_in_window(&mut self, out: &mut BytesMut) -> Result<(), WireError> {
        if self.unsent == 0 {
            return Ok(());
        }
        let connection = self.connection;
        let mut sent = self
            .in_flight
            .iter()
            .filter(|f| f.sent_on == connection)
            .count();
        let mut i = 0;
        while i < self.in_flight.len() && sent < self.window {
            let f = &self.in_flight[i];
            if f.sent_on == connection {
                i += 1;
                continue;
            }
            if f.released {
                self.wire.encode(Outbound::PubRel(f.packet_id), out)?;
            } else if let Err(refused) = self.check_outgoing(&f.publish) {
                if let Some(f) = self.in_flight.remove(i) {
                    f.done.finish(Err(refused));
                }
                self.unsent = self.unsent.saturating_sub(1);
                continue;
            } else {
                self.wire
                    .encode_publish(f.packet_id, &f.publish, self.resend_dup, out)?;
            }
            self.in_flight[i].sent_on = connection;
            self.unsent = self.unsent.saturating_sub(1);
            sent += 1;
            i += 1;
        }
        if i >= self.in_flight.len() {
            // Walked to the end: everything left went out on this connection.
            self.unsent = 0;
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
        let bytes = publish_bytes(&publish);
        if self.waiting.len() >= MAX_WAITING_PUBLISHES
            || self.waiting_bytes + bytes > MAX_WAITING_BYTES
        {
            done.finish(Err(PublishRefused::Backlog {
                queued: self.waiting.len(),
            }));
            return;
        }
        self.waiting_bytes += bytes;
        self.waiting.push_back((publish, done));
    }

    /// Encodes waiting publishes while the broker's window has room.
    pub(super) fn send_waiting(&mut self, out: &mut BytesMut) -> Result<(), WireError> {
        // Older first: resends a smaller window held back after a reconnect.
        self.resend_in_window(out)?;
        while self.in_flight.len() < self.window {
            let Some((mut publish, done)) = self.waiting.pop_front() else {
                break;
            };
            self.waiting_bytes -= publish_bytes(&publish);
            if publish.qos == Qos::ExactlyOnce && self.max_qos == Qos::AtLeastOnce {
                // Still at least once, which is what relays and commands
                // promise; the device may see a duplicate.
                tracing::debug!(topic = %publish.topic, "the broker's Maximum QoS is 1: publishing at QoS 1");
                publish.qos = Qos::AtLeastOnce;
            }
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
                sent_on: self.connection,
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
        if publish.qos > self.max_qos {
            return Err(PublishRefused::QosNotSupported {
                qos: publish.qos.as_u8(),
                max: self.max_qos.as_u8(),
            });
        }
        if publish.retain && !self.retain_available {
            return Err(PublishRefused::RetainNotAvailable);
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

/// What a waiting publish holds in memory, for [`MAX_WAITING_BYTES`].
fn publish_bytes(publish: &OutgoingPublish) -> usize {
    publish.topic.len() + publish.payload.len()
}

/// PINGREQs without a PINGRESP after which the connection counts as dead
/// (a live broker answers each within a round trip).
const MAX_UNANSWERED_PINGS: usize = 1024;

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
    ///
    /// A broker that keeps sending but never answers a PINGREQ is dead too,
    /// once more than [`MAX_UNANSWERED_PINGS`] are outstanding after a
    /// keep-alive of reading: each ack batch sends one, and their queue
    /// must not grow for ever.
    pub(super) fn overdue(&self, holding: bool, now: Instant) -> bool {
        let Some((sent, _)) = self.pings.front() else {
            return false;
        };
        if holding {
            return false;
        }
        let reading_for = now.saturating_duration_since(self.reading_since);
        if self.pings.len() > MAX_UNANSWERED_PINGS && reading_for > self.interval {
            return true;
        }
        let waiting = (*sent).max(self.reading_since).max(self.last_read);
        now.saturating_duration_since(waiting) > self.interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::client::AckKind;
    use crate::mqtt::wire::{Decoder, Inbound};
    use bytes::Bytes;
    use tokio::sync::oneshot;

    fn publish(topic: &str, qos: Qos) -> OutgoingPublish {
        OutgoingPublish {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
        }
    }

    type Outcome = oneshot::Receiver<Result<(), PublishRefused>>;

    /// Queues a publish whose outcome the test can read.
    fn queue(state: &mut PacketState, topic: &str, qos: Qos) -> Outcome {
        let (done, outcome) = oneshot::channel();
        state.queue_publish(publish(topic, qos), Completion::Checked(done));
        outcome
    }

    /// What `out` holds, as (packet, packet id) pairs; consumes it.
    fn sent(out: &mut BytesMut) -> Vec<(&'static str, u16)> {
        let mut decoder = Decoder::new(MqttProtocol::V5, usize::MAX);
        let mut packets = Vec::new();
        while let Some(packet) = decoder.decode(out).expect("well formed") {
            packets.push(match packet {
                Inbound::Publish { packet_id, .. } => ("PUBLISH", packet_id),
                Inbound::PubAck { packet_id, .. } => ("PUBACK", packet_id),
                Inbound::PubRec { packet_id, .. } => ("PUBREC", packet_id),
                Inbound::PubRel(id) => ("PUBREL", id),
                Inbound::PubComp(id) => ("PUBCOMP", id),
                other => panic!("unexpected {other:?}"),
            });
        }
        assert!(out.is_empty(), "a partial packet");
        packets
    }

    fn connected(window: Option<u16>, max_packet: Option<u32>) -> PacketState {
        let mut state = PacketState::new(MqttProtocol::V5);
        state.connected(window, max_packet);
        state
    }

    #[test]
    fn the_window_leaves_a_packet_id_free_for_the_next_subscribe() {
        assert_eq!(
            connected(Some(u16::MAX), None).window,
            usize::from(u16::MAX) - 1
        );
        assert_eq!(connected(Some(20), None).window, 20);
        assert_eq!(connected(Some(0), None).window, 1);
    }

    #[test]
    fn packet_ids_wrap_past_zero_and_skip_ids_in_flight() {
        let mut state = connected(None, None);
        state.next_packet_id = u16::MAX - 1;
        let _a = queue(&mut state, "a", Qos::AtLeastOnce);
        let _b = queue(&mut state, "b", Qos::ExactlyOnce);
        let mut out = BytesMut::new();
        state.send_waiting(&mut out).unwrap();
        assert_eq!(sent(&mut out), [("PUBLISH", u16::MAX), ("PUBLISH", 1)]);
        // Both ids are taken: the next round skips them, and never hands
        // out 0.
        state.next_packet_id = u16::MAX - 1;
        assert_eq!(state.packet_id(), 2);
        // Once completed, an id is free again.
        state.pub_ack(u16::MAX, 0);
        state.next_packet_id = u16::MAX - 1;
        assert_eq!(state.packet_id(), u16::MAX);
    }

    #[test]
    fn publishes_wait_while_the_brokers_window_is_full() {
        let mut state = connected(Some(2), None);
        let mut out = BytesMut::new();
        // Nothing waiting: nothing sent.
        state.send_waiting(&mut out).unwrap();
        assert!(out.is_empty());

        let mut outcomes: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|t| queue(&mut state, t, Qos::AtLeastOnce))
            .collect();
        state.send_waiting(&mut out).unwrap();
        assert_eq!(sent(&mut out), [("PUBLISH", 1), ("PUBLISH", 2)]);
        // Full: the third waits, however often the loop comes round.
        state.send_waiting(&mut out).unwrap();
        assert!(out.is_empty());

        state.pub_ack(1, 0);
        assert_eq!(outcomes[0].try_recv(), Ok(Ok(())));
        state.send_waiting(&mut out).unwrap();
        assert_eq!(sent(&mut out), [("PUBLISH", 3)]);
        assert!(outcomes[2].try_recv().is_err(), "not acked yet");

        // QoS 0 takes no room and completes once encoded.
        let mut fire_and_forget = queue(&mut state, "d", Qos::AtMostOnce);
        state.send_waiting(&mut out).unwrap();
        assert!(out.is_empty(), "window full: QoS 0 keeps its place in line");
        state.pub_ack(2, 0);
        state.send_waiting(&mut out).unwrap();
        assert_eq!(sent(&mut out), [("PUBLISH", 0)]);
        assert_eq!(fire_and_forget.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn acks_go_out_in_arrival_order_and_stale_ones_are_only_counted() {
        let mut state = PacketState::new(MqttProtocol::V5);
        let first = state.connected(None, None);
        let old = Ack::for_message(9, Qos::AtLeastOnce, first).unwrap();
        let current = state.connected(None, None);
        let acks = [
            Ack::for_message(5, Qos::ExactlyOnce, current).unwrap(),
            old,
            Ack::for_message(3, Qos::AtLeastOnce, current).unwrap(),
            Ack {
                kind: AckKind::PubComp,
                packet_id: 4,
                connection: current,
            },
        ];
        let mut out = BytesMut::new();
        state.write_acks(&acks, &mut out).unwrap();
        assert_eq!(
            sent(&mut out),
            [("PUBREC", 5), ("PUBACK", 3), ("PUBCOMP", 4)]
        );
        assert_eq!(state.acks_written(), 4);
        // Without a connection none is written, all are counted.
        state.drop_acks(&acks[..2]);
        assert_eq!(state.acks_written(), 6);
        // QoS 0 needs no ack.
        assert_eq!(Ack::for_message(1, Qos::AtMostOnce, current), None);
    }

    #[test]
    fn a_full_backlog_refuses_publishes_instead_of_growing() {
        let mut state = connected(Some(1), None);
        let mut outcomes: Vec<_> = (0..MAX_WAITING_PUBLISHES + 1)
            .map(|_| queue(&mut state, "a", Qos::AtLeastOnce))
            .collect();
        let mut refused = outcomes.pop().unwrap();
        assert_eq!(
            refused.try_recv(),
            Ok(Err(PublishRefused::Backlog {
                queued: MAX_WAITING_PUBLISHES
            }))
        );
        assert!(outcomes[0].try_recv().is_err(), "the first still waits");
        // Sending one makes room for one, and the byte count follows.
        let mut out = BytesMut::new();
        state.send_waiting(&mut out).unwrap();
        assert_eq!(state.waiting.len(), MAX_WAITING_PUBLISHES - 1);
        assert_eq!(state.waiting_bytes, (MAX_WAITING_PUBLISHES - 1) * 2);
        let mut next = queue(&mut state, "a", Qos::AtLeastOnce);
        assert!(next.try_recv().is_err(), "taken");

        // The byte bound holds on its own.
        let mut state = connected(Some(1), None);
        let big = OutgoingPublish {
            payload: Bytes::from(vec![0u8; MAX_WAITING_BYTES / 2 - 1]),
            ..publish("b", Qos::AtLeastOnce)
        };
        let (a, _a) = oneshot::channel();
        let (b, _b) = oneshot::channel();
        let (c, mut c_outcome) = oneshot::channel();
        state.queue_publish(big.clone(), Completion::Checked(a));
        state.queue_publish(big.clone(), Completion::Checked(b));
        state.queue_publish(big, Completion::Checked(c));
        assert_eq!(
            c_outcome.try_recv(),
            Ok(Err(PublishRefused::Backlog { queued: 2 }))
        );
    }

    #[test]
    fn refused_publishes_complete_with_their_reason() {
        let mut state = connected(None, Some(40));
        let mut out = BytesMut::new();
        let mut invalid = queue(&mut state, "a/#", Qos::AtLeastOnce);
        let mut too_large = queue(&mut state, &"t".repeat(40), Qos::AtLeastOnce);
        let mut by_puback = queue(&mut state, "a", Qos::AtLeastOnce);
        let mut by_pubrec = queue(&mut state, "b", Qos::ExactlyOnce);
        let mut taken = queue(&mut state, "c", Qos::ExactlyOnce);
        state.send_waiting(&mut out).unwrap();
        // Refused here are never sent.
        assert!(matches!(
            invalid.try_recv(),
            Ok(Err(PublishRefused::Invalid(_)))
        ));
        assert!(matches!(
            too_large.try_recv(),
            Ok(Err(PublishRefused::TooLarge { max: 40, .. }))
        ));
        assert_eq!(
            sent(&mut out),
            [("PUBLISH", 1), ("PUBLISH", 2), ("PUBLISH", 3)]
        );

        state.pub_ack(1, 0x87);
        assert_eq!(
            by_puback.try_recv(),
            Ok(Err(PublishRefused::Broker { code: 0x87 }))
        );
        // A refusing PUBREC ends the flow: no PUBREL.
        state.pub_rec(2, 0x97, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(
            by_pubrec.try_recv(),
            Ok(Err(PublishRefused::Broker { code: 0x97 }))
        );
        // An accepting one is answered, and PUBCOMP ends it.
        state.pub_rec(3, 0, &mut out).unwrap();
        assert_eq!(sent(&mut out), [("PUBREL", 3)]);
        assert!(taken.try_recv().is_err(), "not complete yet");
        state.pub_comp(3);
        assert_eq!(taken.try_recv(), Ok(Ok(())));
        // Acks for ids not in flight are ignored.
        state.pub_ack(77, 0);
        state.pub_comp(78);
        assert!(state.in_flight.is_empty());
    }

    #[test]
    fn a_reconnect_resends_unfinished_publishes_in_order_or_refuses_them() {
        let mut state = connected(None, None);
        let mut out = BytesMut::new();
        let _released = queue(&mut state, "a", Qos::ExactlyOnce);
        let mut big = queue(&mut state, &"b".repeat(100), Qos::AtLeastOnce);
        let _small = queue(&mut state, "c", Qos::AtLeastOnce);
        state.send_waiting(&mut out).unwrap();
        state.pub_rec(1, 0, &mut out).unwrap();
        out.clear();

        // The new connection's broker takes smaller packets.
        state.connected(None, Some(50));
        state.resend_unfinished(true, &mut out).unwrap();
        assert_eq!(sent(&mut out), [("PUBREL", 1), ("PUBLISH", 3)]);
        assert!(matches!(
            big.try_recv(),
            Ok(Err(PublishRefused::TooLarge { max: 50, .. }))
        ));
    }

    #[test]
    fn a_lost_session_completes_released_publishes_and_resends_the_rest_as_new() {
        let mut state = connected(None, None);
        let mut out = BytesMut::new();
        let mut released = queue(&mut state, "a", Qos::ExactlyOnce);
        let mut unanswered = queue(&mut state, "b", Qos::AtLeastOnce);
        state.send_waiting(&mut out).unwrap();
        state.pub_rec(1, 0, &mut out).unwrap();
        out.clear();

        // The broker restarted without its sessions.
        state.connected(None, None);
        state.resend_unfinished(false, &mut out).unwrap();
        // The broker took "a" at PUBREC: done, no PUBREL for a session that
        // no longer knows it.
        assert!(matches!(released.try_recv(), Ok(Ok(()))));
        let mut decoder = Decoder::new(MqttProtocol::V5, usize::MAX);
        let packet = decoder.decode(&mut out).unwrap().expect("one packet");
        let Inbound::Publish { packet_id, message } = packet else {
            panic!("{packet:?}");
        };
        assert_eq!((packet_id, message.topic.as_str()), (2, "b"));
        assert!(!message.dup, "a new message to the new session");
        assert!(out.is_empty());
        assert!(
            unanswered.try_recv().is_err(),
            "still waiting for its PUBACK"
        );
    }

    #[test]
    fn the_brokers_maximum_qos_and_retain_available_are_kept_to() {
        let mut state = connected(None, None);
        state.broker_limits(Some(1), Some(false));
        let mut out = BytesMut::new();
        // QoS 2 goes out at QoS 1: still at least once.
        let _downgraded = queue(&mut state, "a", Qos::ExactlyOnce);
        let (done, mut retained) = oneshot::channel();
        let mut publish = publish("r", Qos::AtLeastOnce);
        publish.retain = true;
        state.queue_publish(publish, Completion::Checked(done));
        state.send_waiting(&mut out).unwrap();
        let mut decoder = Decoder::new(MqttProtocol::V5, usize::MAX);
        let Some(Inbound::Publish { message, .. }) = decoder.decode(&mut out).unwrap() else {
            panic!("a PUBLISH");
        };
        assert_eq!(
            (message.topic.as_str(), message.qos),
            ("a", Qos::AtLeastOnce)
        );
        assert!(out.is_empty(), "the retained one is not sent");
        assert_eq!(
            retained.try_recv(),
            Ok(Err(PublishRefused::RetainNotAvailable))
        );

        // A broker that takes QoS 0 only: nothing would confirm QoS 1.
        state.connected(None, None);
        state.broker_limits(Some(0), None);
        let mut refused = queue(&mut state, "b", Qos::AtLeastOnce);
        state.send_waiting(&mut out).unwrap();
        assert_eq!(
            refused.try_recv(),
            Ok(Err(PublishRefused::QosNotSupported { qos: 1, max: 0 }))
        );
    }

    #[test]
    fn a_smaller_window_after_a_reconnect_resends_as_the_first_complete() {
        let mut state = connected(Some(10), None);
        let mut out = BytesMut::new();
        let _outcomes: Vec<_> = (0..3)
            .map(|_| queue(&mut state, "a", Qos::AtLeastOnce))
            .collect();
        state.send_waiting(&mut out).unwrap();
        assert_eq!(sent(&mut out).len(), 3);

        // The new connection's broker takes one at a time.
        state.connected(Some(1), None);
        state.resend_unfinished(true, &mut out).unwrap();
        assert_eq!(sent(&mut out), [("PUBLISH", 1)]);
        state.send_waiting(&mut out).unwrap();
        assert!(out.is_empty(), "over the broker's Receive Maximum");
        state.pub_ack(1, 0);
        state.send_waiting(&mut out).unwrap();
        assert_eq!(sent(&mut out), [("PUBLISH", 2)]);
        state.pub_ack(2, 0);
        state.send_waiting(&mut out).unwrap();
        assert_eq!(sent(&mut out), [("PUBLISH", 3)]);
    }

    const KEEP_ALIVE: Duration = Duration::from_secs(4);

    #[test]
    fn a_ping_is_due_after_half_the_keep_alive_without_writing() {
        let t0 = Instant::now();
        let mut keep_alive = KeepAlive::new(KEEP_ALIVE, 0, t0);
        assert_eq!(keep_alive.check_period(), Duration::from_secs(1));
        assert!(!keep_alive.ping_due(t0 + Duration::from_millis(1999)));
        assert!(keep_alive.ping_due(t0 + Duration::from_secs(2)));
        // Any write restarts the count.
        keep_alive.wrote(t0 + Duration::from_secs(2));
        assert!(!keep_alive.ping_due(t0 + Duration::from_secs(3)));
        assert!(keep_alive.ping_due(t0 + Duration::from_secs(4)));
    }

    #[test]
    fn a_missing_pingresp_is_overdue_only_after_a_keep_alive_of_reading() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let keep_alive = KeepAlive::new(KEEP_ALIVE, 0, t0);
        // No ping out: silence alone is not overdue.
        assert!(!keep_alive.overdue(false, at(100)));

        let mut keep_alive = KeepAlive::new(KEEP_ALIVE, 0, t0);
        keep_alive.ping_sent(0, at(2));
        assert!(!keep_alive.overdue(false, at(6)));
        assert!(keep_alive.overdue(false, at(6) + Duration::from_millis(1)));
        // Holding a packet for a busy delivery task: nothing is read, so
        // nothing is missing.
        assert!(!keep_alive.overdue(true, at(60)));
        // Reading again restarts the wait, as do bytes arriving.
        keep_alive.resumed_reading(at(60));
        assert!(!keep_alive.overdue(false, at(64)));
        assert!(keep_alive.overdue(false, at(65)));
        keep_alive.read(at(65));
        assert!(!keep_alive.overdue(false, at(69)));
        // Answered: nothing overdue.
        keep_alive.pong();
        assert!(!keep_alive.overdue(false, at(1000)));
    }

    #[test]
    fn a_broker_that_sends_but_never_answers_pings_is_dead() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut keep_alive = KeepAlive::new(KEEP_ALIVE, 0, t0);
        for n in 0..=MAX_UNANSWERED_PINGS as u64 {
            keep_alive.ping_sent(n, at(1));
        }
        // Data keeps arriving, which alone would keep it alive...
        keep_alive.read(at(100));
        assert!(!keep_alive.overdue(true, at(100)), "holding: nothing read");
        // ...but past a keep-alive of reading, the unanswered pings end it.
        assert!(!keep_alive.overdue(false, at(4)));
        assert!(keep_alive.overdue(false, at(100)));
        keep_alive.pong();
        assert!(!keep_alive.overdue(false, at(100)), "within the cap again");
    }

    #[test]
    fn a_pingresp_confirms_the_acks_written_before_its_pingreq() {
        let t0 = Instant::now();
        let mut keep_alive = KeepAlive::new(KEEP_ALIVE, 2, t0);
        keep_alive.ping_sent(2, t0);
        keep_alive.ping_sent(5, t0);
        keep_alive.ping_sent(5, t0);
        keep_alive.ping_sent(7, t0);
        // Known before the connection: not news.
        assert_eq!(keep_alive.pong(), None);
        assert_eq!(keep_alive.pong(), Some(5));
        assert_eq!(keep_alive.pong(), None);
        assert_eq!(keep_alive.pong(), Some(7));
        // A PINGRESP nobody asked for confirms nothing.
        assert_eq!(keep_alive.pong(), None);
    }
}
