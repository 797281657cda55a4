//! The batch → commit → ack loop.

use super::exactly_once::{
    decode_head, encode_head, fingerprint, ProducedIds, StateError, Verdict, BUCKETS,
};
use crate::config::{DeliveryConfig, KafkaConfig};
use crate::fault;
use crate::kafka;
use crate::kafka::{state_store, Refusal, SinkError, TransactionalSink};
use crate::mqtt::{Ack, AckKind, Acker, Delivery, Intake, MqttError, MqttMessage, PublishRefused};
use crate::route::reject::Form;
use crate::route::{Outcome, RejectReason, Rejection, RouteTable};
use crate::telemetry;
use bytes::Bytes;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

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

/// What became of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Committed,
    /// Not committed: its records must be produced again.
    Aborted,
    /// Shutdown came first; the outcome is left to the next instance's
    /// `init_transactions`, and nothing is acknowledged.
    Stopped,
}

/// The transactional call whose outcome is being settled.
#[derive(Debug, Clone, Copy)]
enum Call {
    Commit,
    Abort,
}

/// Backoff between attempts to get a batch committed while Kafka is failing.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One record of a transaction, with what it came from.
struct Entry {
    record: kafka::Record,
    /// `None` for the exactly-once state and head records, which are the
    /// bridge's own and never replaced.
    origin: Option<Origin>,
}

/// The message a record was made from, kept (moved, not copied) until
/// commit so that a record Kafka refuses can be replaced by its
/// dead-letter record.
struct Origin {
    message: MqttMessage,
    route: Option<usize>,
    /// `None` while the record is the route's own; the dead-letter reason
    /// once it is a dead-letter record.
    reason: Option<RejectReason>,
    /// Which dead-letter form the record is, if it is one.
    form: Option<Form>,
    /// Refused together with others of its partition: which of them is at
    /// fault is unknown, so it is produced alone next time (see
    /// `CommitLoop::resend`).
    suspect: bool,
    /// Kafka refused even its stub: nothing is produced for it.
    lost: bool,
}

/// The messages of one open transaction.
#[derive(Default)]
struct Batch {
    /// Kept until commit so an aborted transaction can be produced again;
    /// a record's index is its id in the sink's delivery reports.
    records: Vec<Entry>,
    /// In arrival order; QoS 0 messages have none.
    acks: Vec<Ack>,
    /// Relay publishes of this batch; its acks wait for all of them.
    relays: Vec<PendingRelay>,
    messages: usize,
    /// The exactly-once state changed: the transaction must carry it.
    state_changed: bool,
    /// The token of this transaction's head record (exactly once).
    token: Option<u64>,
    /// The session waits to reconnect until this batch has committed
    /// (`Intake::Reconnecting`).
    ownership: Vec<oneshot::Sender<()>>,
    /// Write the head even if nothing else is written (the claim at
    /// start-up, the ownership check before a reconnect).
    force_head: bool,
}

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
    acker: Acker,
    /// Acks handed to the session so far; the session counts the same acks in the same
    /// order, which is how `Intake::AcksConfirmed` maps onto them.
    acks_queued: u64,
    batch_max_messages: usize,
    commit_interval: Duration,
    exactly_once: Option<ExactlyOnce>,
    /// Acks of committed batches whose relay publishes the broker has not
    /// yet acknowledged, in batch order.
    waiting: VecDeque<WaitingAcks>,
    /// `bridge_messages_received_total` by route index, and for records
    /// without a route; registered once (see `telemetry::received_counter`).
    received: Vec<metrics::Counter>,
    received_without_route: metrics::Counter,
    /// Transactions committed so far (see `WaitingAcks::after_commit`).
    commits: u64,
    /// Dead-letter records of refused relays, for the next transaction.
    refused_relays: Vec<Entry>,
}

/// A relay publish the source message's ack waits for.
struct PendingRelay {
    done: oneshot::Receiver<Result<(), PublishRefused>>,
    /// The source message, dead-lettered if the broker refuses the relay.
    message: MqttMessage,
    route: usize,
}

/// What became of a relay publish.
enum RelayOutcome {
    Done,
    /// The broker refused it (a PUBACK/PUBREC reason code of 0x80 or
    /// more, or a packet over its Maximum Packet Size): never resent.
    Refused(Box<PendingRelay>, PublishRefused),
    /// The session ended.
    Closed,
}

/// A committed batch's acks, held until its relays are done.
struct WaitingAcks {
    acks: Vec<Ack>,
    relays: Vec<PendingRelay>,
    /// A refused relay's dead-letter record must commit before these acks
    /// go: not before this many commits.
    after_commit: Option<u64>,
}

/// Resolves when a relay publish of the front batch has an outcome; never
/// when there is none. Cancel-safe: a relay is removed only once it has
/// resolved.
async fn front_relay_done(waiting: &mut VecDeque<WaitingAcks>) -> RelayOutcome {
    let Some(relay) = waiting.front_mut().and_then(|w| w.relays.last_mut()) else {
        return std::future::pending().await;
    };
    let done = (&mut relay.done).await;
    let relay = waiting
        .front_mut()
        .expect("front")
        .relays
        .pop()
        .expect("last");
    match done {
        Ok(Ok(())) => RelayOutcome::Done,
        Ok(Err(refused)) => RelayOutcome::Refused(Box::new(relay), refused),
        Err(_) => RelayOutcome::Closed,
    }
}

/// The state of exactly-once delivery and where it is written.
pub struct ExactlyOnce {
    pub state: ProducedIds,
    pub topic: String,
    /// The bridge's identity (`kafka.transactional_id`).
    pub key: String,
    /// The head token of the last committed transaction: ours, or at
    /// start-up the predecessor's.
    pub last_token: Option<u64>,
    /// To read the head back after an unknown outcome.
    pub kafka: KafkaConfig,
    pub read_timeout: Duration,
}

impl CommitLoop {
    pub fn new(
        table: Arc<RouteTable>,
        sink: TransactionalSink,
        acker: Acker,
        delivery: &DeliveryConfig,
        exactly_once: Option<ExactlyOnce>,
    ) -> Self {
        let received = (0..table.routes().len())
            .map(|r| telemetry::received_counter(table.route_name(r)))
            .collect();
        Self {
            table,
            sink,
            acker,
            acks_queued: 0,
            commits: 0,
            refused_relays: Vec::new(),
            waiting: VecDeque::new(),
            received,
            received_without_route: telemetry::received_counter(""),
            batch_max_messages: delivery.batch_max_messages,
            commit_interval: Duration::from_millis(delivery.commit_interval_ms),
            exactly_once,
        }
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
                done = front_relay_done(&mut self.waiting) => {
                    self.relay_done(done).await?;
                    // No batch is open: a refused relay's dead letter gets
                    // a transaction of its own.
                    if !self.refused_relays.is_empty() {
                        self.commit_refused_relays(&shutdown).await?;
                    }
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
                    done = front_relay_done(&mut self.waiting) => self.relay_done(done).await?,
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
            self.waiting.push_back(WaitingAcks {
                acks: std::mem::take(&mut batch.acks),
                relays: std::mem::take(&mut batch.relays),
                after_commit: None,
            });
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
            if self.waiting.is_empty() {
                return Ok(());
            }
            let outcome = front_relay_done(&mut self.waiting).await;
            self.take_relay_outcome(outcome)?;
        }
    }

    /// A relay publish has an outcome.
    async fn relay_done(&mut self, outcome: RelayOutcome) -> Result<(), DeliveryError> {
        self.take_relay_outcome(outcome)?;
        self.release_acks().await
    }

    /// Notes a relay's outcome for the front batch: a refused relay's
    /// source is dead-lettered (reason `mqtt_refused`) in the next
    /// transaction, and the batch's acks wait until that has committed, so
    /// a crash in between redelivers the source instead of losing it.
    fn take_relay_outcome(&mut self, outcome: RelayOutcome) -> Result<(), DeliveryError> {
        let (relay, refused) = match outcome {
            RelayOutcome::Done => return Ok(()),
            RelayOutcome::Closed => return Err(MqttError::Closed.into()),
            RelayOutcome::Refused(relay, refused) => (*relay, refused),
        };
        tracing::warn!(route = self.table.route_name(relay.route), %refused, "the MQTT broker refused a relay publish; dead-lettering its source");
        let rejection = Rejection::new(RejectReason::MqttRefused, refused.to_string());
        let record = self.table.dead_letter(
            Some(relay.route),
            &relay.message,
            &rejection,
            None,
            Form::Full,
        );
        self.refused_relays.push(Entry {
            record,
            origin: Some(Origin {
                message: relay.message,
                route: Some(relay.route),
                reason: Some(RejectReason::MqttRefused),
                form: Some(Form::Full),
                suspect: false,
                lost: false,
            }),
        });
        if let Some(front) = self.waiting.front_mut() {
            front.after_commit = Some(self.commits + 1);
        }
        Ok(())
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

    /// Sends, in batch order, the acks of committed batches whose relay
    /// publishes are all done. The waiting is never a blocking await: the
    /// loop keeps taking messages meanwhile, which is what lets the session
    /// read the broker's acks of the relays.
    async fn release_acks(&mut self) -> Result<(), DeliveryError> {
        loop {
            let Some(front) = self.waiting.front_mut() else {
                return Ok(());
            };
            if let Some(relay) = front.relays.last_mut() {
                let outcome = match relay.done.try_recv() {
                    Ok(result) => {
                        let relay = front.relays.pop().expect("last");
                        match result {
                            Ok(()) => RelayOutcome::Done,
                            Err(refused) => RelayOutcome::Refused(Box::new(relay), refused),
                        }
                    }
                    Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Err(oneshot::error::TryRecvError::Closed) => RelayOutcome::Closed,
                };
                self.take_relay_outcome(outcome)?;
                continue;
            }
            if front.after_commit.is_some_and(|c| self.commits < c) {
                return Ok(());
            }
            let acks = self.waiting.pop_front().expect("front").acks;
            self.send_acks(acks).await?;
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
                    eo.state
                        .acked(ack.packet_id, self.acks_queued + n as u64 + 1);
                }
            }
        }
        self.acks_queued += acks.len() as u64;
        self.acker.ack_all(acks).await?;
        Ok(())
    }

    /// Takes one item from the session into the batch.
    async fn add(&mut self, batch: &mut Batch, intake: Intake) -> Result<(), DeliveryError> {
        match intake {
            Intake::Message(delivery) => {
                fault::point("after_receive");
                self.add_message(batch, delivery).await
            }
            Intake::Released(ack) => {
                fault::point("after_pubrel");
                batch.messages += 1;
                if let Some(eo) = &mut self.exactly_once {
                    // PUBCOMP frees the id for a new message: only once the
                    // state without it has committed.
                    batch.state_changed |= eo.state.release(ack.packet_id);
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
            Intake::AcksConfirmed(acks) => {
                if let Some(eo) = &mut self.exactly_once {
                    // Smaller state in the next transaction; nothing to
                    // commit for it alone.
                    eo.state.confirm(acks);
                }
                Ok(())
            }
        }
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
        let fingerprint = match (&mut self.exactly_once, delivery.ack) {
            (Some(eo), Some(_)) => {
                let fp = fingerprint(&message.topic, &message.payload);
                match eo
                    .state
                    .check(delivery.packet_id, message.qos, message.dup, fp)
                {
                    Verdict::New => Some(fp),
                    Verdict::Duplicate { exact } => {
                        telemetry::duplicate_dropped(message.qos.as_u8(), exact);
                        return Ok(());
                    }
                }
            }
            (Some(_), None) => {
                telemetry::best_effort("qos0_message");
                None
            }
            (None, _) => None,
        };
        let qos = delivery.message.qos;
        let (route, record, reason) = match self.table.route(&delivery.message) {
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
                    done: self.acker.publish_checked(publish).await?,
                    message: delivery.message,
                    route,
                });
                return Ok(());
            }
            Outcome::Forward { route, record } => (Some(route), record, None),
            Outcome::DeadLetter {
                route,
                record,
                rejection,
            } => {
                let name = route.map_or("", |r| self.table.route_name(r));
                tracing::debug!(route = name, topic = %delivery.message.topic, %rejection, "dead-lettering message");
                (route, record, Some(rejection.reason))
            }
        };
        telemetry::message_received_on(
            route.map_or(&self.received_without_route, |r| &self.received[r]),
        );
        let form = reason.map(|_| Form::Full);
        batch.records.push(Entry {
            record,
            origin: Some(Origin {
                message: delivery.message,
                route,
                reason,
                form,
                suspect: false,
                lost: false,
            }),
        });
        self.send_entry(batch, batch.records.len() - 1).await?;
        fault::point("after_produce");
        if let (Some(eo), Some(fp)) = (&mut self.exactly_once, fingerprint) {
            eo.state.record(delivery.packet_id, qos, fp);
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
            batch.records.push(entry);
            self.send_entry(batch, batch.records.len() - 1).await?;
        }
        if let Some(eo) = &mut self.exactly_once {
            // The buckets of the state this batch changed, then the head, as
            // the transaction's last records, so they commit or abort with
            // the batch (and are produced again with it).
            let mut state: Vec<(String, Vec<u8>)> = Vec::new();
            if batch.state_changed {
                let dirty = eo.state.take_dirty();
                tracing::trace!(
                    records = dirty.len(),
                    bytes = dirty.iter().map(|(_, b)| b.len()).sum::<usize>(),
                    messages = batch.messages,
                    "state records"
                );
                state.extend(
                    dirty
                        .into_iter()
                        .map(|(b, bytes)| (state_store::bucket_key(&eo.key, b), bytes)),
                );
            }
            if !batch.records.is_empty() || !state.is_empty() || batch.force_head {
                // A new token for every transaction: read back after an
                // unknown outcome, it says which transaction committed last.
                let token = fastrand::u64(..);
                state.push((state_store::head_key(&eo.key), encode_head(token)));
                batch.token = Some(token);
            }
            let topic = eo.topic.clone();
            for (key, bytes) in state {
                let record = kafka::Record {
                    topic: topic.clone(),
                    key: Some(key),
                    value: Bytes::from(bytes),
                    headers: Vec::new(),
                    timestamp_ms: chrono::Utc::now().timestamp_millis(),
                };
                batch.records.push(Entry {
                    record,
                    origin: None,
                });
                self.send_entry(batch, batch.records.len() - 1).await?;
            }
        }
        if batch.records.is_empty() {
            return Ok(true);
        }
        let mut backoff = RETRY_MIN;
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
                            refused = self.refused(batch, self.sink.take_refusals());
                            Fate::Aborted
                        }
                        Err(e) if e.is_fenced() => return Err(e.into()),
                        Err(e) => {
                            tracing::warn!(error = %e, "abort failed; settling the transaction");
                            self.settle(batch, Call::Abort, shutdown).await?
                        }
                    }
                }
                Err(e) => {
                    // Timed out or otherwise without a verdict: whether the
                    // transaction committed is unknown.
                    tracing::warn!(error = %e, "commit outcome unknown; settling the transaction");
                    self.settle(batch, Call::Commit, shutdown).await?
                }
            };
            match fate {
                Fate::Committed => {
                    fault::point("after_commit");
                    self.commits += 1;
                    if let Some(eo) = &mut self.exactly_once {
                        eo.last_token = batch.token.or(eo.last_token);
                    }
                    for reply in batch.ownership.drain(..) {
                        let _ = reply.send(());
                    }
                    self.committed(batch, started.elapsed());
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
                backoff = RETRY_MIN;
            } else {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            self.resend(batch).await?;
        }
    }

    /// Sends record `id` of the batch. A record librdkafka refuses at once
    /// (e.g. over `message.max.bytes`) is replaced on the spot. An enqueue
    /// failure of the transaction itself is dealt with at commit, which
    /// then fails too and produces the batch again.
    async fn send_entry(&mut self, batch: &mut Batch, id: usize) -> Result<(), DeliveryError> {
        loop {
            let entry = &batch.records[id];
            if entry.origin.as_ref().is_some_and(|o| o.lost) {
                return Ok(());
            }
            match self.sink.send(&entry.record, id).await {
                Ok(()) | Err(SinkError::Abortable(_)) => return Ok(()),
                Err(SinkError::Rejected(code)) if entry.origin.is_some() => {
                    self.replace(batch, id, code);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Acts on the records Kafka refused in an aborted attempt: each one at
    /// fault is replaced by the next dead-letter form; records refused
    /// together with others of their partition become suspects, produced
    /// alone next time. Returns whether anything changed (so the next
    /// attempt can go at once).
    ///
    /// A record is at fault if its refusal is about its topic (every record
    /// to that topic is refused on its own account), or if it is the only
    /// refused record of its partition: the broker refuses a partition's
    /// whole request for one bad record, so several refusals in one
    /// partition may be one culprit and its innocent neighbours.
    fn refused(&mut self, batch: &mut Batch, refusals: Vec<Refusal>) -> bool {
        let mut changed = false;
        for refusal in &refusals {
            let Some(entry) = batch.records.get(refusal.id) else {
                continue;
            };
            let Some(origin) = &entry.origin else {
                // The state topic refused the bridge's own record: not the
                // data's fault. The batch is retried with backoff.
                tracing::error!(code = ?refusal.code, topic = %entry.record.topic, "Kafka refused an exactly-once state record");
                continue;
            };
            let alone = refusals
                .iter()
                .filter(|r| {
                    r.partition == refusal.partition
                        && batch.records.get(r.id).map(|e| &e.record.topic)
                            == Some(&entry.record.topic)
                })
                .count()
                == 1;
            if refusal.topic_wide || alone {
                self.replace(batch, refusal.id, refusal.code);
                changed = true;
            } else if !origin.suspect {
                batch.records[refusal.id]
                    .origin
                    .as_mut()
                    .expect("checked")
                    .suspect = true;
                changed = true;
            }
        }
        changed
    }

    /// Replaces a refused record by its next dead-letter form: the route's
    /// record by the full dead-letter record, that by a stub with only the
    /// `bridge.*` headers, and a refused stub by nothing (counted, logged).
    fn replace(&self, batch: &mut Batch, id: usize, code: RDKafkaErrorCode) {
        let entry = &mut batch.records[id];
        let Some(origin) = entry.origin.as_mut() else {
            return;
        };
        telemetry::kafka_refused(code, &entry.record.topic);
        origin.suspect = false;
        let route_name = origin.route.map_or("", |r| self.table.route_name(r));
        let detail = match origin.reason {
            None => format!(
                "Kafka refused the record for `{}`: {code}",
                entry.record.topic
            ),
            Some(reason) => format!(
                "Kafka refused the dead-letter record (reason {}) for `{}`: {code}",
                reason.as_str(),
                entry.record.topic
            ),
        };
        let form = match origin.form {
            None => Form::Full,
            Some(Form::Full) => Form::Stub,
            Some(Form::Stub) => {
                telemetry::dead_letter_lost(route_name, &entry.record.topic, code);
                origin.lost = true;
                return;
            }
        };
        let rejection = Rejection::new(RejectReason::KafkaRejected, detail);
        entry.record = self.table.dead_letter(
            origin.route,
            &origin.message,
            &rejection,
            Some(&format!("{code:?}")),
            form,
        );
        origin.reason = Some(RejectReason::KafkaRejected);
        origin.form = Some(form);
    }

    /// Produces an aborted batch again. Suspects (see [`Self::refused`])
    /// go last and one at a time, each after a flush, so a refusal then is
    /// the suspect's own: the attempt stops there (the transaction is lost
    /// anyway) and the next one replaces it. A suspect delivered alone is
    /// cleared.
    async fn resend(&mut self, batch: &mut Batch) -> Result<(), DeliveryError> {
        let suspects: Vec<usize> = (0..batch.records.len())
            .filter(|&i| batch.records[i].origin.as_ref().is_some_and(|o| o.suspect))
            .collect();
        for id in 0..batch.records.len() {
            if !suspects.contains(&id) {
                self.send_entry(batch, id).await?;
            }
        }
        for id in suspects {
            // Any failed delivery leaves the transaction abortable: stop
            // here, the commit says so. Only a suspect delivered alone
            // with nothing failed is cleared.
            if self.sink.flush().await.is_err() || self.sink.has_failures() {
                return Ok(());
            }
            self.send_entry(batch, id).await?;
            if self.sink.flush().await.is_err() || self.sink.has_failures() {
                return Ok(());
            }
            if let Some(origin) = batch.records[id].origin.as_mut() {
                origin.suspect = false;
            }
        }
        Ok(())
    }

    /// Learns what became of a transaction whose `call` (commit or abort)
    /// ended without a verdict: timed out, or the connection broke
    /// mid-EndTxn.
    ///
    /// 1. Ask the same producer again until the coordinator answers:
    ///    librdkafka carries on with the same call, its documented handling
    ///    of a timeout. A zombie (frozen mid-commit while a successor took
    ///    over) hears "fenced" here and stops; re-creating its producer
    ///    first would have fenced the successor instead.
    /// 2. Exactly once: read the head, which fences no one, and judge it
    ///    (see [`Self::judge`]): committed, not committed, or a successor
    ///    exists (stop). The read goes to the high watermark with
    ///    `read_committed`, so it waits until this transaction is settled
    ///    on the broker: its verdict is final. At least once takes the
    ///    answer of step 1.
    /// 3. Re-create the producer all the same, so that no request of the
    ///    old one still on its way can land on a later transaction
    ///    (Jepsen's 2024 Kafka analysis, KIP-890).
    async fn settle(
        &mut self,
        batch: &Batch,
        mut call: Call,
        shutdown: &CancellationToken,
    ) -> Result<Fate, DeliveryError> {
        let mut backoff = RETRY_MIN;
        let answer = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Fate::Stopped),
                _ = tokio::time::sleep(backoff) => {}
            }
            let result = match call {
                Call::Commit => self.sink.commit().await,
                Call::Abort => self.sink.abort().await,
            };
            match (call, result) {
                (Call::Commit, Ok(())) => break Fate::Committed,
                (Call::Abort, Ok(())) => break Fate::Aborted,
                // A successor took over: stop, and do not fence it back.
                (_, Err(e)) if e.is_fenced() => return Err(e.into()),
                // The coordinator refused the commit: it did not happen.
                (Call::Commit, Err(SinkError::Abortable(_))) => call = Call::Abort,
                // Timed out again: Kafka is still not answering.
                (_, Err(SinkError::Retriable(e))) => {
                    tracing::warn!(error = %e, "transaction outcome still unknown; asking again");
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                // Anything else, fatal errors included (measured: a paused
                // broker that answers again can reject the retried EndTxn
                // as "invalid transaction state", fatal to librdkafka):
                // this producer cannot tell. Re-creating it settles the
                // transaction; with exactly once the head read back
                // decides, and at least once produces the batch again,
                // which at least once allows.
                (_, Err(e)) => {
                    tracing::warn!(error = %e, "the producer cannot settle the transaction; re-creating it");
                    break Fate::Aborted;
                }
            }
        };
        // Re-creating the producer fences every other producer with this
        // identity, a successor's too: a zombie whose commit had landed
        // before it froze gets "committed" from the retry above, not
        // "fenced". So the head is read first: every instance claims it
        // when it starts, so a successor shows there.
        let fate = if self.exactly_once.is_some() {
            let Some(head) = self.read_head(shutdown).await? else {
                return Ok(Fate::Stopped);
            };
            let fate = self.judge(batch, head)?;
            tracing::debug!(?fate, coordinator_said = ?answer, "head record read back");
            fate
        } else {
            answer
        };
        if !self.recover(shutdown).await? {
            return Ok(Fate::Stopped);
        }
        match fate {
            Fate::Committed => telemetry::settled("committed"),
            Fate::Aborted => telemetry::settled("aborted"),
            Fate::Stopped => {}
        }
        Ok(fate)
    }

    /// The batch's token means it committed, our previous token that it did
    /// not, and anything else that another instance with this identity has
    /// committed since, so this one must stop: it is a zombie, its state is
    /// stale.
    fn judge(&self, batch: &Batch, head: Option<u64>) -> Result<Fate, DeliveryError> {
        let last = self.exactly_once.as_ref().and_then(|eo| eo.last_token);
        if head.is_some() && head == batch.token {
            Ok(Fate::Committed)
        } else if head == last {
            Ok(Fate::Aborted)
        } else {
            Err(DeliveryError::Superseded)
        }
    }

    /// The last committed head token (exactly once), retrying while Kafka
    /// is unreachable; `None` if shutdown came first.
    async fn read_head(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Option<u64>>, DeliveryError> {
        let Some(eo) = &self.exactly_once else {
            return Ok(Some(None));
        };
        let mut backoff = RETRY_MIN;
        loop {
            let read = state_store::load(&eo.kafka, &eo.topic, &eo.key, BUCKETS, eo.read_timeout);
            match read.await {
                Ok(stored) => {
                    let head = stored.head.as_deref().map(decode_head).transpose()?;
                    return Ok(Some(head));
                }
                Err(error) => tracing::warn!(%error, "cannot read the exactly-once head; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    /// Re-creates the producer, retrying while Kafka is unreachable.
    /// Returns false if shutdown was requested first.
    async fn recover(&mut self, shutdown: &CancellationToken) -> Result<bool, DeliveryError> {
        let mut backoff = RETRY_MIN;
        loop {
            match self.sink.recreate().await {
                Ok(()) => return Ok(true),
                Err(SinkError::Fatal(e)) => return Err(SinkError::Fatal(e).into()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-create the Kafka producer; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    fn committed(&self, batch: &Batch, took: Duration) {
        let mut produced: HashMap<usize, u64> = HashMap::new();
        let mut dead_lettered: HashMap<(Option<usize>, &'static str), u64> = HashMap::new();
        for origin in batch.records.iter().filter_map(|e| e.origin.as_ref()) {
            match (origin.lost, origin.route, origin.reason) {
                (true, _, _) => {}
                (false, Some(route), None) => *produced.entry(route).or_default() += 1,
                (false, route, Some(reason)) => {
                    *dead_lettered.entry((route, reason.as_str())).or_default() += 1
                }
                (false, None, None) => {}
            }
        }
        let produced: Vec<_> = produced
            .iter()
            .map(|(r, n)| (self.table.route_name(*r).to_string(), *n))
            .collect();
        let dead_lettered: Vec<_> = dead_lettered
            .iter()
            .map(|((r, reason), n)| {
                let name = r.map_or("", |r| self.table.route_name(r));
                ((name.to_string(), *reason), *n)
            })
            .collect();
        telemetry::committed(took, batch.messages, &produced, &dead_lettered);
    }
}
