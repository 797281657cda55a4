//! The acks of committed batches, released in arrival order.
//!
//! MQTT requires acks in the order the messages arrived (MQTT 3.1.1 §4.6),
//! but a committed batch is not always free to be acknowledged: a relay
//! route's source message is acknowledged only once the broker has taken
//! the relayed publish, and a relay the broker refused has its source
//! dead-lettered, which must commit before the ack goes (so a crash in
//! between redelivers the source instead of losing it). Every later batch
//! waits behind the first that cannot go. Those rules live here, apart
//! from Kafka and the socket, so they can be tested on their own; the
//! commit loop only feeds the queue and sends what it releases.

use crate::mqtt::{Ack, MqttError, MqttMessage, PublishRefused};
use crate::route::RouteTable;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::oneshot;

/// A relay publish the source message's ack waits for.
pub(super) struct PendingRelay {
    pub done: oneshot::Receiver<Result<(), PublishRefused>>,
    /// The source message, dead-lettered if the broker refuses the relay.
    pub message: MqttMessage,
    /// The route, in `table`: the routes as they were when it was relayed
    /// (a reload may have swapped them since).
    pub route: usize,
    pub table: Arc<RouteTable>,
}

/// What became of a relay publish.
pub(super) enum RelayOutcome {
    Done,
    /// The broker refused it (a PUBACK/PUBREC reason code of 0x80 or
    /// more, or a packet over its Maximum Packet Size): never resent.
    Refused(Box<PendingRelay>, PublishRefused),
    /// The session ended.
    Closed,
}

/// The next thing [`AckQueue::release`] has for the commit loop.
pub(super) enum Release<A> {
    /// The front batch's acks: send them, then ask again.
    Acks(Vec<A>),
    /// The broker refused a relay of the front batch: dead-letter its
    /// source in the next transaction, then ask again. The batch's acks
    /// now wait for that transaction to commit.
    Refused(Box<PendingRelay>, PublishRefused),
    /// Nothing can go before a relay is done or a transaction commits.
    Blocked,
}

/// A committed batch's acks, held until its relays are done.
struct WaitingAcks<A> {
    acks: Vec<A>,
    relays: Vec<PendingRelay>,
    /// A refused relay's dead-letter record must commit before these acks
    /// go: not before this many commits.
    after_commit: Option<u64>,
}

/// Acks of committed batches whose relay publishes the broker has not yet
/// acknowledged, in batch order. Generic over the ack so the ordering
/// rules can be tested without an MQTT session; the bridge uses [`Ack`].
pub(super) struct AckQueue<A = Ack> {
    waiting: VecDeque<WaitingAcks<A>>,
    /// Transactions committed so far (see `WaitingAcks::after_commit`).
    commits: u64,
}

impl<A> Default for AckQueue<A> {
    fn default() -> Self {
        Self {
            waiting: VecDeque::new(),
            commits: 0,
        }
    }
}

impl<A> AckQueue<A> {
    /// A batch has committed: its acks queue behind the earlier batches'.
    /// A batch with neither (all QoS 0, say) waits for nothing and holds
    /// nothing back, so it takes no place: a stuck relay must not make the
    /// queue grow by one entry per commit.
    pub fn push(&mut self, acks: Vec<A>, relays: Vec<PendingRelay>) {
        if acks.is_empty() && relays.is_empty() {
            return;
        }
        self.waiting.push_back(WaitingAcks {
            acks,
            relays,
            after_commit: None,
        });
    }

    /// Every transaction that commits, whatever it holds, counts: a
    /// refused relay's dead letter goes in the next one.
    pub fn count_commit(&mut self) {
        self.commits += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Resolves when a relay publish of the front batch has an outcome;
    /// never when there is none. Cancel-safe: a relay is removed only once
    /// it has resolved. Hand the outcome to [`Self::take_relay_outcome`].
    pub async fn front_relay_done(&mut self) -> RelayOutcome {
        let Some(relay) = self.waiting.front_mut().and_then(|w| w.relays.last_mut()) else {
            return std::future::pending().await;
        };
        let done = (&mut relay.done).await;
        let relay = self
            .waiting
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

    /// Notes a relay's outcome for the front batch. A refused relay is
    /// handed back, for its source to be dead-lettered (reason
    /// `mqtt_refused`) in the next transaction, and the batch's acks wait
    /// until that has committed.
    pub fn take_relay_outcome(
        &mut self,
        outcome: RelayOutcome,
    ) -> Result<Option<(Box<PendingRelay>, PublishRefused)>, MqttError> {
        match outcome {
            RelayOutcome::Done => Ok(None),
            RelayOutcome::Closed => Err(MqttError::Closed),
            RelayOutcome::Refused(relay, refused) => {
                if let Some(front) = self.waiting.front_mut() {
                    front.after_commit = Some(self.commits + 1);
                }
                Ok(Some((relay, refused)))
            }
        }
    }

    /// The next step in sending, in batch order, the acks of committed
    /// batches whose relay publishes are all done. Never waits: the commit
    /// loop keeps taking messages meanwhile, which is what lets the
    /// session read the broker's acks of the relays.
    pub fn release(&mut self) -> Result<Release<A>, MqttError> {
        loop {
            let Some(front) = self.waiting.front_mut() else {
                return Ok(Release::Blocked);
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
                    Err(oneshot::error::TryRecvError::Empty) => return Ok(Release::Blocked),
                    Err(oneshot::error::TryRecvError::Closed) => RelayOutcome::Closed,
                };
                if let Some((relay, refused)) = self.take_relay_outcome(outcome)? {
                    return Ok(Release::Refused(relay, refused));
                }
                continue;
            }
            if front.after_commit.is_some_and(|c| self.commits < c) {
                return Ok(Release::Blocked);
            }
            let acks = self.waiting.pop_front().expect("front").acks;
            return Ok(Release::Acks(acks));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, MappingSource};

    type Sender = oneshot::Sender<Result<(), PublishRefused>>;

    fn relay(route: usize) -> (Sender, PendingRelay) {
        thread_local! {
            static TABLE: Arc<RouteTable> = {
                let bridge = "mqtt: { host: h, client_id: c }\nkafka: { bootstrap_servers: b, transactional_id: t }\nmappings: [x]\n";
                let mapping = "routes:\n  - name: r\n    mqtt: { filter: 'a/#' }\n    kafka: { topic: t }\n";
                let path = std::path::Path::new("m.yaml");
                let source = MappingSource::parse(path, mapping).expect("mapping");
                let config = Config::from_parts(std::path::Path::new("b.yaml"), bridge, vec![source])
                    .expect("config");
                Arc::new(RouteTable::compile(&config).expect("table"))
            };
        }
        let (tx, rx) = oneshot::channel();
        let relay = PendingRelay {
            done: rx,
            message: MqttMessage::new("a/b", "x"),
            route,
            table: TABLE.with(Arc::clone),
        };
        (tx, relay)
    }

    /// Everything the queue releases until it blocks; refused relays by
    /// route.
    fn drain(queue: &mut AckQueue<u16>) -> (Vec<Vec<u16>>, Vec<usize>) {
        let (mut acks, mut refused) = (Vec::new(), Vec::new());
        loop {
            match queue.release().expect("session open") {
                Release::Acks(a) => acks.push(a),
                Release::Refused(relay, _) => refused.push(relay.route),
                Release::Blocked => return (acks, refused),
            }
        }
    }

    #[test]
    fn batches_without_relays_go_at_once_in_order() {
        let mut queue = AckQueue::default();
        queue.push(vec![1, 2], Vec::new());
        queue.push(Vec::new(), Vec::new());
        queue.push(vec![3], Vec::new());
        // The empty batch took no place.
        assert_eq!(queue.waiting.len(), 2);
        assert_eq!(drain(&mut queue), (vec![vec![1, 2], vec![3]], vec![]));
        assert!(queue.is_empty());
    }

    #[test]
    fn commits_behind_a_stuck_relay_do_not_grow_the_queue() {
        let mut queue = AckQueue::default();
        let (_tx, r) = relay(0);
        queue.push(vec![1], vec![r]);
        for _ in 0..1000 {
            queue.count_commit();
            queue.push(Vec::new(), Vec::new());
        }
        assert_eq!(queue.waiting.len(), 1);
        assert_eq!(drain(&mut queue), (vec![], vec![]));
    }

    #[test]
    fn a_pending_relay_holds_its_batch_and_every_later_one() {
        let mut queue = AckQueue::default();
        let (first, r1) = relay(0);
        let (second, r2) = relay(1);
        queue.push(vec![1], vec![r1, r2]);
        queue.push(vec![2], Vec::new());
        assert_eq!(drain(&mut queue), (vec![], vec![]));
        first.send(Ok(())).unwrap();
        assert_eq!(drain(&mut queue), (vec![], vec![]), "one relay still out");
        second.send(Ok(())).unwrap();
        assert_eq!(drain(&mut queue), (vec![vec![1], vec![2]], vec![]));
        assert!(queue.is_empty());
    }

    #[test]
    fn a_refused_relay_holds_its_batch_until_the_next_commit() {
        let mut queue = AckQueue::default();
        queue.count_commit();
        let (tx, r) = relay(7);
        queue.push(vec![1], vec![r]);
        queue.push(vec![2], Vec::new());
        tx.send(Err(PublishRefused::Broker { code: 0x87 })).unwrap();
        assert_eq!(drain(&mut queue), (vec![], vec![7]), "dead-letter it first");
        assert_eq!(drain(&mut queue), (vec![], vec![]), "reported once");
        queue.count_commit();
        assert_eq!(drain(&mut queue), (vec![vec![1], vec![2]], vec![]));
    }

    #[test]
    fn a_closed_session_is_an_error() {
        let mut queue = AckQueue::<u16>::default();
        let (tx, r) = relay(0);
        queue.push(vec![1], vec![r]);
        drop(tx);
        assert!(matches!(queue.release(), Err(MqttError::Closed)));
    }

    #[tokio::test]
    async fn front_relay_done_reports_the_front_batch_only() {
        let mut queue = AckQueue::default();
        let (tx, r) = relay(3);
        queue.push(vec![1], vec![r]);
        let (later, r) = relay(4);
        queue.push(vec![2], vec![r]);
        later.send(Ok(())).unwrap();
        tx.send(Err(PublishRefused::Invalid("test"))).unwrap();
        let outcome = queue.front_relay_done().await;
        let refused = queue.take_relay_outcome(outcome).unwrap();
        assert_eq!(refused.map(|(relay, _)| relay.route), Some(3));
        // The later batch's relay is done, but the front waits for the
        // commit of the dead letter.
        assert_eq!(drain(&mut queue), (vec![], vec![]));
        queue.count_commit();
        assert_eq!(drain(&mut queue), (vec![vec![1], vec![2]], vec![]));
    }
}
