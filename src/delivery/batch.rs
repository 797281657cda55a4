//! One open transaction: what it holds, and what becomes of the records
//! Kafka refuses.
//!
//! An aborted transaction is produced again from what it held, so each
//! record is kept, with the message it came from, until commit. A record
//! the broker refuses for good (too large, an invalid or forbidden topic)
//! would otherwise fail its transaction forever and stall the bridge: it
//! is replaced by its dead-letter record, that by a stub, and a refused stub
//! by nothing (counted). Which record of a refused partition is at fault is
//! not always known; the rules for that live here, apart from the commit
//! loop that only asks for the batch to be produced again.

use super::acks::PendingRelay;
use super::DeliveryError;
use crate::kafka::{self, Refusal, SinkError, TransactionalSink};
use crate::mqtt::{Ack, MqttMessage};
use crate::route::reject::Form;
use crate::route::{RejectReason, Rejection, RouteTable};
use crate::telemetry;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::oneshot;

/// One record of a transaction, with what it came from.
pub(super) struct Entry {
    record: kafka::Record,
    /// `None` for the exactly-once state and head records, which are the
    /// bridge's own and never replaced.
    origin: Option<Origin>,
    /// Sent with a null value (the record's is ignored): a state record
    /// that compaction should remove.
    tombstone: bool,
}

impl Entry {
    /// A record made from `message`: the route's own (`reason` is `None`)
    /// or its full dead-letter record.
    pub fn message(
        record: kafka::Record,
        message: MqttMessage,
        route: Option<usize>,
        reason: Option<RejectReason>,
    ) -> Self {
        Self {
            record,
            origin: Some(Origin {
                message,
                route,
                reason,
                form: reason.map(|_| Form::Full),
                suspect: false,
                lost: false,
            }),
            tombstone: false,
        }
    }

    /// A record of the bridge's own (exactly-once state or head).
    pub fn own(record: kafka::Record) -> Self {
        Self {
            record,
            origin: None,
            tombstone: false,
        }
    }

    /// A tombstone of the bridge's own: its key's state is gone.
    pub fn own_tombstone(record: kafka::Record) -> Self {
        Self {
            record,
            origin: None,
            tombstone: true,
        }
    }
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
    /// [`Batch::resend`]).
    suspect: bool,
    /// Kafka refused even its stub: nothing is produced for it.
    lost: bool,
}

/// The messages of one open transaction.
#[derive(Default)]
pub(super) struct Batch {
    /// Kept until commit so an aborted transaction can be produced again;
    /// a record's index is its id in the sink's delivery reports.
    pub records: Vec<Entry>,
    /// In arrival order; QoS 0 messages have none.
    pub acks: Vec<Ack>,
    /// Relay publishes of this batch; its acks wait for all of them.
    pub relays: Vec<PendingRelay>,
    pub messages: usize,
    /// The exactly-once state changed: the transaction must carry it.
    pub state_changed: bool,
    /// The token of this transaction's head record (exactly once).
    pub token: Option<u64>,
    /// The session waits to reconnect (`Intake::Reconnecting`), or to read
    /// a new session's first message (`Intake::SessionLost`), until this
    /// batch has committed.
    pub ownership: Vec<oneshot::Sender<()>>,
    /// Write the head even if nothing else is written (the claim at
    /// start-up, the ownership check before a reconnect, the forgotten ids
    /// of a lost session).
    pub force_head: bool,
}

impl Batch {
    /// Adds `entry` to the transaction and sends it.
    pub async fn produce(
        &mut self,
        entry: Entry,
        sink: &mut TransactionalSink,
        table: &RouteTable,
    ) -> Result<(), DeliveryError> {
        self.records.push(entry);
        self.send(self.records.len() - 1, sink, table).await
    }

    /// Sends record `id` of the batch. A record librdkafka refuses at once
    /// (e.g. over `message.max.bytes`) is replaced on the spot. An enqueue
    /// failure of the transaction itself is dealt with at commit, which
    /// then fails too and produces the batch again.
    async fn send(
        &mut self,
        id: usize,
        sink: &mut TransactionalSink,
        table: &RouteTable,
    ) -> Result<(), DeliveryError> {
        loop {
            let entry = &self.records[id];
            if entry.origin.as_ref().is_some_and(|o| o.lost) {
                return Ok(());
            }
            match sink.send(&entry.record, entry.tombstone, id).await {
                Ok(()) | Err(SinkError::Abortable(_)) => return Ok(()),
                Err(SinkError::Rejected(code)) if entry.origin.is_some() => {
                    self.replace(table, id, code);
                }
                Err(SinkError::Rejected(code)) => {
                    // As when a delivery report says so (see `refused`):
                    // not the data's fault; the batch is retried with
                    // backoff, and the transaction must not commit
                    // without it.
                    tracing::error!(?code, topic = %entry.record.topic, "Kafka refused an exactly-once state record");
                    sink.doom(rdkafka::error::KafkaError::MessageProduction(code));
                    return Ok(());
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
    pub fn refused(&mut self, table: &RouteTable, refusals: Vec<Refusal>) -> bool {
        let mut changed = false;
        for refusal in &refusals {
            let Some(entry) = self.records.get(refusal.id) else {
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
                        && self.records.get(r.id).map(|e| &e.record.topic)
                            == Some(&entry.record.topic)
                })
                .count()
                == 1;
            if refusal.topic_wide || alone {
                self.replace(table, refusal.id, refusal.code);
                changed = true;
            } else if !origin.suspect {
                self.records[refusal.id]
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
    fn replace(&mut self, table: &RouteTable, id: usize, code: RDKafkaErrorCode) {
        let entry = &mut self.records[id];
        let Some(origin) = entry.origin.as_mut() else {
            return;
        };
        telemetry::kafka_refused(code, &entry.record.topic);
        origin.suspect = false;
        let route_name = origin.route.map_or("", |r| table.route_name(r));
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
        entry.record = table.dead_letter(
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
    pub async fn resend(
        &mut self,
        sink: &mut TransactionalSink,
        table: &RouteTable,
    ) -> Result<(), DeliveryError> {
        let suspects: Vec<usize> = (0..self.records.len())
            .filter(|&i| self.records[i].origin.as_ref().is_some_and(|o| o.suspect))
            .collect();
        for id in 0..self.records.len() {
            if !suspects.contains(&id) {
                self.send(id, sink, table).await?;
            }
        }
        for id in suspects {
            // Any failed delivery leaves the transaction abortable: stop
            // here, the commit says so. Only a suspect delivered alone
            // with nothing failed is cleared.
            // (A failed flush dooms the transaction.)
            if sink.flush().await.is_err() || sink.has_failures() {
                return Ok(());
            }
            self.send(id, sink, table).await?;
            if sink.flush().await.is_err() || sink.has_failures() {
                return Ok(());
            }
            if let Some(origin) = self.records[id].origin.as_mut() {
                origin.suspect = false;
            }
        }
        Ok(())
    }

    /// Counts what the committed batch produced and dead-lettered, by route.
    pub fn count_committed(
        &self,
        table: &RouteTable,
        took: Duration,
        counters: &telemetry::MessageCounters,
    ) {
        let mut produced: HashMap<usize, u64> = HashMap::new();
        let mut dead_lettered: HashMap<(Option<usize>, &'static str), u64> = HashMap::new();
        let mut bytes = 0;
        let now = chrono::Utc::now();
        for (record, origin) in self
            .records
            .iter()
            .filter_map(|e| Some((&e.record, e.origin.as_ref()?)))
        {
            if !origin.lost {
                bytes += (record.key.as_ref().map_or(0, String::len) + record.value.len()) as u64;
                counters.waited(
                    (now - origin.message.received_at)
                        .to_std()
                        .unwrap_or_default(),
                );
            }
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
            .map(|(r, n)| (table.route_name(*r).to_string(), *n))
            .collect();
        let dead_lettered: Vec<_> = dead_lettered
            .iter()
            .map(|((r, reason), n)| {
                let name = r.map_or("", |r| table.route_name(r));
                ((name.to_string(), *reason), *n)
            })
            .collect();
        telemetry::committed(took, self.messages, &produced, &dead_lettered);
        counters.produced_bytes(bytes);
    }
}
