//! Exactly-once delivery's memory, from its read at start-up to the records
//! each transaction writes.
//!
//! A crash between a commit and its acks makes the broker resend messages
//! already in Kafka, and a packet id alone does not say which (ids are
//! reused). So every transaction also writes which packet ids it produced
//! ([`ProducedIds`]) and a head record with a fresh token naming the
//! transaction, to the state topic, as its last records: they commit or
//! abort with the data they describe. One place owns that life cycle so
//! the start-up read, the writes and the read-back after an unknown outcome
//! (`delivery::settle`) cannot drift apart; the Kafka I/O itself is
//! [`crate::kafka::state_store`], which knows nothing of the format.

mod produced_ids;

pub(super) use produced_ids::{decode_head, fingerprint, Verdict};
pub use produced_ids::{ProducedIds, StateError};

use super::batch::Entry;
use crate::config::{BridgeConfig, KafkaConfig};
use crate::kafka::{self, state_store, StateStoreError};
use crate::sparkplug;
use bytes::Bytes;
use std::collections::HashMap;
use std::time::Duration;

/// Why the exactly-once state could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StateStoreError),
    #[error("the exactly-once state in Kafka is unreadable: {0}")]
    State(#[from] StateError),
}

/// The state of exactly-once delivery and where it is written.
pub struct ExactlyOnce {
    /// What the next transaction's state records are made from.
    pub(super) ids: ProducedIds,
    topic: String,
    /// The bridge's identity (`kafka.transactional_id`).
    key: String,
    /// The head token of the last committed transaction: ours, or at
    /// start-up the predecessor's. An unknown outcome whose read-back head
    /// still shows it did not commit (see `delivery::settle`).
    pub(super) last_token: Option<u64>,
    /// Sparkplug birth tables as loaded at start-up, until the commit loop
    /// takes them (`group/edge_node[/device]` → table).
    pub(super) sparkplug: HashMap<String, Vec<u8>>,
    /// To read the head back after an unknown outcome.
    kafka: KafkaConfig,
    read_timeout: Duration,
}

impl ExactlyOnce {
    /// Reads this bridge's state from the state topic (creating the topic
    /// if it is missing).
    ///
    /// Call it after `init_transactions`, which settled what an earlier
    /// instance left open, and before subscribing: what is read is then the
    /// state of the last committed transaction, and no message can arrive
    /// before it is known.
    pub async fn load(bridge: &BridgeConfig) -> Result<Self, LoadError> {
        // Another bridge's transaction left open on the state topic (one
        // that crashed) holds the read back until the broker aborts it:
        // allow for the transaction timeout.
        let read_timeout = Duration::from_millis(
            bridge.delivery.transaction_timeout_ms + bridge.delivery.commit_timeout_ms,
        );
        let mut loaded = Self {
            ids: ProducedIds::default(),
            topic: bridge.delivery.state_topic.clone(),
            key: bridge.kafka.transactional_id.clone(),
            last_token: None,
            sparkplug: HashMap::new(),
            kafka: bridge.kafka.clone(),
            read_timeout,
        };
        let stored = loaded.read().await?;
        for bytes in stored.buckets.values() {
            loaded.ids.merge_bucket(bytes)?;
        }
        loaded.last_token = stored.head.as_deref().map(decode_head).transpose()?;
        loaded.sparkplug = stored.sparkplug;
        tracing::info!(
            topic = %loaded.topic,
            entries = loaded.ids.len(),
            sparkplug_tables = loaded.sparkplug.len(),
            "exactly-once state loaded"
        );
        Ok(loaded)
    }

    /// The state topic, which the producer must be able to write to before
    /// the first transaction.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The last committed values of this bridge's buckets and head: at
    /// start-up, and to learn after an unknown outcome which transaction
    /// committed last (reading fences no one).
    pub(super) async fn read(&self) -> Result<state_store::Stored, StateStoreError> {
        state_store::load(
            &self.kafka,
            &self.topic,
            &self.key,
            produced_ids::BUCKETS,
            self.read_timeout,
        )
        .await
    }

    /// The state records a transaction must end with, and the token of its
    /// head record if it has one.
    ///
    /// The buckets changed since the last call (if `changed`), the
    /// Sparkplug birth tables that `tables` says changed (a gone one as a
    /// tombstone), then a head
    /// with a new token if any of them is written or `force_head` (the
    /// transaction has records of its own, or is the claim at start-up or
    /// the ownership proof before a reconnect): read back after an unknown
    /// outcome, the token says which transaction committed last.
    /// `messages` is only logged.
    pub(super) fn transaction_records(
        &mut self,
        changed: bool,
        tables: Vec<sparkplug::Change>,
        force_head: bool,
        messages: usize,
    ) -> (Vec<Entry>, Option<u64>) {
        // (key, value), `None` for a tombstone.
        let mut state: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        if changed {
            let dirty = self.ids.take_dirty();
            tracing::trace!(
                records = dirty.len(),
                bytes = dirty.iter().map(|(_, b)| b.len()).sum::<usize>(),
                messages,
                "state records"
            );
            state.extend(
                dirty
                    .into_iter()
                    .map(|(b, bytes)| (state_store::bucket_key(&self.key, b), Some(bytes))),
            );
        }
        state.extend(
            tables
                .into_iter()
                .map(|(table, value)| (state_store::sparkplug_key(&self.key, &table), value)),
        );
        let mut token = None;
        if !state.is_empty() || force_head {
            let new = fastrand::u64(..);
            state.push((
                state_store::head_key(&self.key),
                Some(produced_ids::encode_head(new)),
            ));
            token = Some(new);
        }
        let records = state
            .into_iter()
            .map(|(key, bytes)| {
                let tombstone = bytes.is_none();
                let record = kafka::Record {
                    topic: self.topic.clone(),
                    key: Some(key),
                    value: bytes.map(Bytes::from).unwrap_or_default(),
                    headers: Vec::new(),
                    timestamp_ms: chrono::Utc::now().timestamp_millis(),
                };
                if tombstone {
                    Entry::own_tombstone(record)
                } else {
                    Entry::own(record)
                }
            })
            .collect();
        (records, token)
    }

    /// The transaction whose head carried `token` (if it had one) has
    /// committed: it is now the one an unknown outcome is judged against.
    pub(super) fn committed(&mut self, token: Option<u64>) {
        self.last_token = token.or(self.last_token);
    }
}
