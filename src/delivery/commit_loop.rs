//! The batch → commit → ack loop: the one task that owns the producer.
//!
//! Everything that must happen in order around a Kafka transaction meets
//! here: a message is routed and enqueued as it arrives, the batch closes
//! on size or time, commits, and only then are its acks released. The
//! pieces with rules of their own live beside it: [`super::batch`] (what a
//! transaction holds, refused records), [`super::acks`] (in-order release),
//! [`super::settle`] (unknown outcomes), [`super::exactly_once`] (the
//! state each transaction carries).

use super::acks::{AckQueue, PendingRelay, RelayOutcome, Release};
use super::batch::{Batch, Entry};
use super::exactly_once::{fingerprint, ExactlyOnce, Verdict};
use super::settle::{backoff, settle, Call, Fate};
use super::DeliveryError;
use crate::config::DeliveryConfig;
use crate::fault::{self, Point};
use crate::kafka::{SinkError, TransactionalSink};
use crate::mqtt::{
    Ack, AckKind, Delivery, Intake, MqttClient, MqttMessage, OutgoingPublish, PublishRefused, Qos,
};
use crate::route::reject::Form;
use crate::route::{Outcome, RejectReason, Rejection, RouteTable};
use crate::scale::Partition;
use crate::sparkplug::{self, Sessions};
use crate::telemetry::{self, Health};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Routes, produces, commits and acknowledges.
///
/// The acks of a committed batch go to the MQTT session as one command:
/// one channel operation, one socket write and one barrier PINGREQ per
/// transaction. (Handing them over one by one had the session write, and
/// ping, once per ack, with the two tasks on different cores.) Awaiting room
/// in the session's channel cannot deadlock: the session takes commands
/// also while it waits for this loop to take a message.
pub struct CommitLoop {
    table: Arc<RouteTable>,
    sink: TransactionalSink,
    client: MqttClient,
    /// Acks handed to the session so far; the session counts the same acks in the same
    /// order, which is how `Intake::AcksConfirmed` maps onto them.
    acks_queued: u64,
    batch_max_messages: usize,
    commit_interval: Duration,
    exactly_once: Option<ExactlyOnce>,
    /// Acks of committed batches not yet handed to the session.
    acks: AckQueue,
    /// `mqtt_kafka_bridge_messages_received_total` by route index, and for records
    /// without a route; registered once (see `telemetry::received_counter`).
    received: Vec<metrics::Counter>,
    received_without_route: metrics::Counter,
    /// Dead-letter records of refused relays, for the next transaction.
    refused_relays: Vec<Entry>,
    /// What Sparkplug B edge nodes told in their births (aliases, seq),
    /// for routes with `format: sparkplug_b`. Here, beside the routes'
    /// single reader, and kept across reloads: a new route table does not
    /// make the nodes born again. With exactly once, the birth tables are
    /// written with the state in the transaction of the birth that changed
    /// them, and restored at start-up, so a restart needs no rebirth.
    sparkplug: Sessions,
    counters: telemetry::MessageCounters,
    /// Acks owed to the broker: taken into a batch, not yet handed to the
    /// session (`in_flight_messages`).
    owed: usize,
    /// Where a commit that goes on too long shows (`/readyz`).
    health: Arc<Health>,
    /// New routes from a reload, taken between transactions.
    swaps: Option<mpsc::Receiver<RouteSwap>>,
    /// Partitioned: the share of the keys this bridge owns; the rest of
    /// the messages are acknowledged with their batch, unproduced.
    partition: Option<Partition>,
}

/// New routes for the commit loop; `done` fires once they are in use.
pub struct RouteSwap {
    pub table: Arc<RouteTable>,
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// The next swap, or never when there is no reloader.
async fn next_swap(swaps: &mut Option<mpsc::Receiver<RouteSwap>>) -> RouteSwap {
    match swaps {
        Some(rx) => match rx.recv().await {
            Some(swap) => swap,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl CommitLoop {
    pub fn new(
        table: Arc<RouteTable>,
        sink: TransactionalSink,
        client: MqttClient,
        delivery: &DeliveryConfig,
        mut exactly_once: Option<ExactlyOnce>,
        health: Arc<Health>,
    ) -> Self {
        let sparkplug = match &mut exactly_once {
            Some(eo) => Sessions::restore(std::mem::take(&mut eo.sparkplug)),
            None => Sessions::default(),
        };
        let received = (0..table.routes().len())
            .map(|r| telemetry::received_counter(table.route_name(r)))
            .collect();
        Self {
            table,
            sink,
            client,
            acks_queued: 0,
            refused_relays: Vec::new(),
            sparkplug,
            acks: AckQueue::default(),
            received,
            received_without_route: telemetry::received_counter(""),
            batch_max_messages: delivery.batch_max_messages,
            commit_interval: Duration::from_millis(delivery.commit_interval_ms),
            exactly_once,
            counters: telemetry::MessageCounters::default(),
            owed: 0,
            health,
            swaps: None,
            partition: None,
        }
    }

    /// Keeps only the messages `partition` says this bridge owns.
    pub fn with_partition(mut self, partition: Option<Partition>) -> Self {
        self.partition = partition;
        self
    }

    /// Takes new routes from `swaps` (a reload) between transactions.
    pub fn with_route_swaps(mut self, swaps: mpsc::Receiver<RouteSwap>) -> Self {
        self.swaps = Some(swaps);
        self
    }

    /// Runs until `shutdown` fires (then commits and acks the open batch and
    /// returns) or the input closes. A fatal Kafka error returns without
    /// acknowledging the open batch.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Intake>,
        shutdown: CancellationToken,
    ) -> Result<(), DeliveryError> {
        if self.exactly_once.is_some() {
            // The claim: a head record of this instance's before anything
            // else, so that a zombie of the previous one finds it (see
            // `settle`) even while this one has nothing to commit.
            let mut claim = Batch {
                force_head: true,
                ..Batch::default()
            };
            if !self.commit(&mut claim, &shutdown).await? {
                return Ok(());
            }
        }
        loop {
            // Refused relays found while releasing the last batch's acks.
            if !self.refused_relays.is_empty() {
                self.commit_refused_relays(&shutdown).await?;
            }
            let first = tokio::select! {
                _ = shutdown.cancelled() => return self.finish().await,
                done = self.acks.front_relay_done() => {
                    // A refused relay's dead letter gets a transaction of
                    // its own at the top of the loop: no batch is open.
                    self.relay_done(done).await?;
                    continue;
                }
                swap = next_swap(&mut self.swaps) => {
                    self.swap_routes(swap);
                    continue;
                }
                first = input.recv() => match first {
                    Some(d) => d,
                    None => return self.finish().await,
                },
            };
            let mut batch = Batch::default();
            self.add(&mut batch, first).await?;
            let deadline = tokio::time::Instant::now() + self.commit_interval;
            let mut stopping = false;
            while batch.messages < self.batch_max_messages && !batch.force_head {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => { stopping = true; break; }
                    _ = tokio::time::sleep_until(deadline) => break,
                    done = self.acks.front_relay_done() => self.relay_done(done).await?,
                    next = input.recv() => match next {
                        Some(d) => self.add(&mut batch, d).await?,
                        None => { stopping = true; break; }
                    },
                }
            }
            if !self.commit(&mut batch, &shutdown).await? {
                // Shut down before Kafka took the batch: acknowledge nothing
                // of it; the broker redelivers it to the next run.
                return self.finish().await;
            }
            self.acks.push(
                std::mem::take(&mut batch.acks),
                std::mem::take(&mut batch.relays),
            );
            self.release_acks().await?;
            if stopping {
                return self.finish().await;
            }
        }
    }

    /// At shutdown: sends the acks of committed batches, waiting for their
    /// relays (the session still reads the broker's acks; the caller bounds
    /// the wait with `delivery.shutdown_timeout_ms`).
    async fn finish(&mut self) -> Result<(), DeliveryError> {
        // Bounded by the caller, not by shutdown (which has come).
        let unbounded = CancellationToken::new();
        loop {
            if !self.refused_relays.is_empty() {
                self.commit_refused_relays(&unbounded).await?;
            }
            self.release_acks().await?;
            if self.acks.is_empty() {
                return Ok(());
            }
            let outcome = self.acks.front_relay_done().await;
            self.take_relay_outcome(outcome)?;
        }
    }

    /// A relay publish has an outcome.
    async fn relay_done(&mut self, outcome: RelayOutcome) -> Result<(), DeliveryError> {
        self.take_relay_outcome(outcome)?;
        self.release_acks().await
    }

    /// Notes a relay's outcome (see [`AckQueue::take_relay_outcome`]).
    fn take_relay_outcome(&mut self, outcome: RelayOutcome) -> Result<(), DeliveryError> {
        if let Some((relay, refused)) = self.acks.take_relay_outcome(outcome)? {
            self.dead_letter_relay(*relay, refused);
        }
        Ok(())
    }

    /// A refused relay's source goes to the dead-letter topic (reason
    /// `mqtt_refused`) in the next transaction; its ack waits for that
    /// commit, so a crash in between redelivers the source instead of
    /// losing it.
    ///
    /// The record follows the route as it was when the message was relayed;
    /// the entry names the route in the current table (by name: a reload
    /// may have moved or removed it, and then the entry has no route).
    fn dead_letter_relay(&mut self, relay: PendingRelay, refused: PublishRefused) {
        let name = relay.table.route_name(relay.route);
        tracing::warn!(route = name, %refused, "the MQTT broker refused a relay publish; dead-lettering its source");
        let rejection = Rejection::new(RejectReason::MqttRefused, refused.to_string());
        let record = relay.table.dead_letter(
            Some(relay.route),
            &relay.message,
            &rejection,
            None,
            Form::Full,
        );
        let route = if Arc::ptr_eq(&relay.table, &self.table) {
            Some(relay.route)
        } else {
            self.table.route_index(name)
        };
        self.refused_relays.push(Entry::message(
            record,
            relay.message,
            route,
            Some(RejectReason::MqttRefused),
        ));
    }

    /// Takes the routes of a reload: called between transactions only, so
    /// that every record of a batch comes from one set of routes.
    fn swap_routes(&mut self, swap: RouteSwap) {
        self.received = (0..swap.table.routes().len())
            .map(|r| telemetry::received_counter(swap.table.route_name(r)))
            .collect();
        self.table = swap.table;
        let _ = swap.done.send(());
    }

    /// Commits the dead letters of refused relays in a transaction of
    /// their own, then releases the acks that waited for it.
    async fn commit_refused_relays(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let mut batch = Batch::default();
        if self.commit(&mut batch, shutdown).await? {
            self.release_acks().await?;
        }
        Ok(())
    }

    /// Sends whatever acks [`AckQueue::release`] lets go.
    async fn release_acks(&mut self) -> Result<(), DeliveryError> {
        loop {
            match self.acks.release()? {
                Release::Acks(acks) => self.send_acks(acks).await?,
                Release::Refused(relay, refused) => self.dead_letter_relay(*relay, refused),
                Release::Blocked => return Ok(()),
            }
        }
    }

    /// Hands acks to the session, numbering them as the session counts them
    /// (see `Intake::AcksConfirmed`).
    async fn send_acks(&mut self, acks: Vec<Ack>) -> Result<(), DeliveryError> {
        if acks.is_empty() {
            return Ok(());
        }
        if let Some(eo) = &mut self.exactly_once {
            for (n, ack) in acks.iter().enumerate() {
                if ack.kind == AckKind::PubAck {
                    eo.ids.acked(ack.packet_id, self.acks_queued + n as u64 + 1);
                }
            }
        }
        self.acks_queued += acks.len() as u64;
        self.owed = self.owed.saturating_sub(acks.len());
        self.counters.in_flight(self.owed);
        self.client.ack_all(acks).await?;
        Ok(())
    }

    /// Takes one item from the session into the batch.
    async fn add(&mut self, batch: &mut Batch, intake: Intake) -> Result<(), DeliveryError> {
        match intake {
            Intake::Message(delivery) => {
                fault::point(Point::AfterReceive);
                self.counters.received_bytes(delivery.message.payload.len());
                if delivery.ack.is_some() {
                    self.owed += 1;
                    self.counters.in_flight(self.owed);
                }
                self.add_message(batch, delivery).await
            }
            Intake::Released(ack) => {
                fault::point(Point::AfterPubrel);
                batch.messages += 1;
                self.owed += 1;
                self.counters.in_flight(self.owed);
                if let Some(eo) = &mut self.exactly_once {
                    // PUBCOMP frees the id for a new message: only once the
                    // state without it has committed.
                    batch.state_changed |= eo.ids.release(ack.packet_id);
                }
                batch.acks.push(ack);
                Ok(())
            }
            Intake::Reconnecting(reply) => {
                if self.exactly_once.is_some() {
                    // Answered once this batch, which then carries a head
                    // record whatever else it holds, has committed: a
                    // fenced producer fails there.
                    batch.ownership.push(reply);
                    batch.force_head = true;
                } else {
                    // At least once has no state topic to write to; a
                    // zombie is fenced at its first commit.
                    let _ = reply.send(());
                }
                Ok(())
            }
            Intake::SessionLost(reply) => {
                match &mut self.exactly_once {
                    Some(eo) => {
                        // Nothing of the old session will be resent, and its
                        // ids are free for new messages: forgotten in this
                        // batch's state, which commits (with a head record
                        // whatever else it holds) before the session reads
                        // the new session's first message.
                        eo.ids.forget_all();
                        tracing::warn!(
                            "the MQTT broker kept no session for the bridge (expired, or lost in a broker restart); \
                             forgetting the packet ids of the old one"
                        );
                        batch.state_changed = true;
                        batch.ownership.push(reply);
                        batch.force_head = true;
                    }
                    None => {
                        let _ = reply.send(());
                    }
                }
                Ok(())
            }
            Intake::AcksConfirmed(acks) => {
                if let Some(eo) = &mut self.exactly_once {
                    // Smaller state in the next transaction; nothing to
                    // commit for it alone.
                    eo.ids.confirm(acks);
                }
                Ok(())
            }
        }
    }

    /// What decoding Sparkplug left to do: count `seq` gaps, and ask edge
    /// nodes whose messages needed a birth the bridge has not seen (after
    /// a restart, or lost messages) to publish it again. QoS 0, as
    /// Sparkplug sends commands; a lost request is asked again after
    /// `sparkplug::REBIRTH_EVERY` by the next message that needs it.
    async fn sparkplug_follow_ups(&mut self) -> Result<(), DeliveryError> {
        let gaps = self.sparkplug.take_gaps();
        if gaps > 0 {
            telemetry::sparkplug_seq_gaps(gaps);
        }
        for (group, edge_node) in self.sparkplug.take_rebirths() {
            telemetry::sparkplug_rebirth_requested(&group, &edge_node);
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let publish = OutgoingPublish {
                topic: sparkplug::rebirth_topic(&group, &edge_node),
                payload: sparkplug::rebirth_payload(now_ms).into(),
                qos: Qos::AtMostOnce,
                retain: false,
            };
            // Done once written; nothing to wait for.
            drop(self.client.publish(publish).await?);
        }
        Ok(())
    }

    /// Routes one message into the batch, unless it is a resend of one
    /// already produced.
    async fn add_message(
        &mut self,
        batch: &mut Batch,
        delivery: Delivery,
    ) -> Result<(), DeliveryError> {
        batch.messages += 1;
        if let Some(ack) = delivery.ack {
            batch.acks.push(ack);
        }
        let message = &delivery.message;
        // Hashed only where it decides something: a QoS 1 resend in
        // `check`, and a QoS 1 entry recorded after the produce (QoS 2 ids
        // are exact and store no fingerprint).
        let mut hashed = None;
        let mut hash =
            |m: &MqttMessage| *hashed.get_or_insert_with(|| fingerprint(&m.topic, &m.payload));
        let dedupe = match (&mut self.exactly_once, delivery.ack) {
            (Some(eo), Some(_)) => {
                match eo
                    .ids
                    .check(delivery.packet_id, message.qos, message.dup, || {
                        hash(message)
                    }) {
                    Verdict::New => true,
                    Verdict::Duplicate { exact } => {
                        telemetry::duplicate_dropped(message.qos.as_u8(), exact);
                        return Ok(());
                    }
                }
            }
            (Some(_), None) => {
                telemetry::best_effort("qos0_message");
                false
            }
            (None, _) => false,
        };
        let qos = delivery.message.qos;
        let outcome = self
            .table
            .route_with(&delivery.message, &mut self.sparkplug);
        if let Some(partition) = &self.partition {
            // Routed first: the owner may be the record's key. (Every
            // bridge of the group routes every message, so each knows the
            // Sparkplug births; only the owner asks for a rebirth.)
            if !partition.owns(&outcome, &delivery.message.topic) {
                self.sparkplug.take_rebirths();
                telemetry::message_for_another_instance();
                return Ok(());
            }
        }
        self.sparkplug_follow_ups().await?;
        let (route, record, reason, also) = match outcome {
            Outcome::Unrouted => {
                telemetry::message_unrouted(&delivery.message.topic);
                return Ok(());
            }
            Outcome::KeptOnMqtt => {
                telemetry::message_kept_on_mqtt(&delivery.message.topic);
                return Ok(());
            }
            Outcome::Relay { route, publish } => {
                telemetry::message_relayed(self.table.route_name(route));
                batch.relays.push(PendingRelay {
                    done: self.client.publish_checked(publish).await?,
                    message: delivery.message,
                    route,
                    table: self.table.clone(),
                });
                return Ok(());
            }
            Outcome::Forward {
                route,
                record,
                also,
            } => (Some(route), record, None, also),
            Outcome::DeadLetter {
                route,
                record,
                rejection,
                also,
            } => {
                let name = route.map_or("", |r| self.table.route_name(r));
                tracing::debug!(route = name, topic = %delivery.message.topic, %rejection, "dead-lettering message");
                (route, record, Some(rejection.reason), also)
            }
        };
        telemetry::message_received_on(
            route.map_or(&self.received_without_route, |r| &self.received[r]),
        );
        let fingerprint = if dedupe && qos == Qos::AtLeastOnce {
            hash(&delivery.message)
        } else {
            0
        };
        // The route's record first, then its further records (more metrics
        // of a Sparkplug message, in the message's order; online state).
        // Each is replaced by the message's dead letter if Kafka refuses
        // it, and the others stand.
        // Further records take a copy of the message (each may become its
        // dead letter); the route's own record takes the message itself, so
        // the usual message, with none, is not copied on this path.
        let further: Vec<Entry> = also
            .into_iter()
            .map(|r| Entry::message(r, delivery.message.clone(), route, None))
            .collect();
        let entry = Entry::message(record, delivery.message, route, reason);
        batch.produce(entry, &mut self.sink, &self.table).await?;
        for entry in further {
            batch.produce(entry, &mut self.sink, &self.table).await?;
        }
        fault::point(Point::AfterProduce);
        if let (Some(eo), true) = (&mut self.exactly_once, dedupe) {
            eo.ids.record(delivery.packet_id, qos, fingerprint);
            batch.state_changed = true;
        }
        Ok(())
    }

    /// Commits the batch, retrying (abort and produce again) until Kafka
    /// accepts it, a fatal error occurs, or shutdown is requested. Returns
    /// whether the batch committed (and so may be acknowledged).
    async fn commit(
        &mut self,
        batch: &mut Batch,
        shutdown: &CancellationToken,
    ) -> Result<bool, DeliveryError> {
        // Dead letters of relays the broker refused since the last commit.
        for entry in std::mem::take(&mut self.refused_relays) {
            batch.produce(entry, &mut self.sink, &self.table).await?;
        }
        if let Some(eo) = &mut self.exactly_once {
            // The state records go last, so they commit or abort with the
            // batch (and are produced again with it).
            let (records, token) = eo.transaction_records(
                batch.state_changed,
                self.sparkplug.take_changes(),
                batch.force_head || !batch.records.is_empty(),
                batch.messages,
            );
            if token.is_some() {
                batch.token = token;
            }
            for entry in records {
                batch.produce(entry, &mut self.sink, &self.table).await?;
            }
        }
        if batch.records.is_empty() {
            return Ok(true);
        }
        self.health.commit_started();
        let committed = self.commit_until_decided(batch, shutdown).await;
        self.health.commit_finished();
        committed
    }

    /// [`Self::commit`]'s retry loop, for a batch that holds records.
    async fn commit_until_decided(
        &mut self,
        batch: &mut Batch,
        shutdown: &CancellationToken,
    ) -> Result<bool, DeliveryError> {
        let mut backoff = backoff();
        loop {
            let started = Instant::now();
            let mut refused = false;
            let fate = match self.sink.commit().await {
                Ok(()) => Fate::Committed,
                // Fenced: a successor has taken over. (Other fatal errors
                // leave the outcome unknown: settled below.)
                Err(e) if e.is_fenced() => return Err(e.into()),
                Err(SinkError::Abortable(e)) => {
                    telemetry::aborted(&e);
                    match self.sink.abort().await {
                        Ok(()) => {
                            // The reports served by the commit's flush and
                            // the abort's say which records were refused.
                            refused = batch.refused(&self.table, self.sink.take_refusals());
                            Fate::Aborted
                        }
                        Err(e) if e.is_fenced() => return Err(e.into()),
                        Err(e) => {
                            tracing::warn!(error = %e, "abort failed; settling the transaction");
                            let eo = self.exactly_once.as_ref();
                            settle(&mut self.sink, eo, batch.token, Call::Abort, shutdown).await?
                        }
                    }
                }
                Err(e) => {
                    // Timed out or otherwise without a verdict: whether the
                    // transaction committed is unknown.
                    tracing::warn!(error = %e, "commit outcome unknown; settling the transaction");
                    let eo = self.exactly_once.as_ref();
                    settle(&mut self.sink, eo, batch.token, Call::Commit, shutdown).await?
                }
            };
            match fate {
                Fate::Committed => {
                    fault::point(Point::AfterCommit);
                    self.acks.count_commit();
                    if let Some(eo) = &mut self.exactly_once {
                        eo.committed(batch.token);
                    }
                    for reply in batch.ownership.drain(..) {
                        let _ = reply.send(());
                    }
                    batch.count_committed(&self.table, started.elapsed(), &self.counters);
                    return Ok(true);
                }
                Fate::Stopped => return Ok(false),
                Fate::Aborted => {}
            }
            if shutdown.is_cancelled() {
                let _ = self.sink.abort().await;
                return Ok(false);
            }
            // A refusal is not Kafka failing: the batch, with the refused
            // records replaced, goes again at once.
            if refused {
                backoff.reset();
            } else {
                // Shutdown ends the wait; the check above then stops after
                // one more attempt.
                backoff.wait(shutdown).await;
            }
            batch.resend(&mut self.sink, &self.table).await?;
        }
    }
}
