//! The state topic: where the exactly-once state lives, written in every
//! transaction and read back at start-up (and the head alone after a
//! commit whose outcome was unknown).
//!
//! A compacted topic keyed by the bridge's `transactional.id` and a bucket
//! number (`<id>#<bucket>`), so it keeps one record per bucket per bridge,
//! plus a head record (`<id>#head`) naming the last committed transaction.
//! It is read with `read_committed` up to the high watermark, so the read
//! waits until every transaction open on the topic is decided: what is read
//! is exactly the state of the last committed transaction. At start-up that
//! follows `init_transactions`, which settled whatever the previous
//! instance left open; a bridge sharing the topic whose transaction stays
//! open longer than this read's bound makes the read time out.

use super::client_config;
use super::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StateStoreError {
    #[error("cannot read state topic {topic}: {error}")]
    Kafka { topic: String, error: KafkaError },
    #[error("state topic {0} does not exist")]
    Missing(String),
    #[error("state topic {topic} does not exist and cannot be created: {reason} (create it yourself: compacted, one partition, or give the bridge the right to create topics)")]
    Create { topic: String, reason: String },
    #[error("state topic {topic} was not read to its end within {timeout:?} ({waiting})")]
    Timeout {
        topic: String,
        timeout: Duration,
        /// What the read was still waiting for.
        waiting: String,
    },
}

/// Creates a topic of the bridge's own (compacted, one partition, the
/// broker's default replication): the state topic, the standby lease topic.
/// One that another instance created meanwhile is fine; any other refusal
/// (not authorised, a policy, Kafka unreachable) is an error that says so,
/// rather than a silent wait for a topic that will not come. `purpose`
/// names it in the log.
pub(crate) async fn create_topic(
    kafka: &KafkaConfig,
    topic: &str,
    purpose: &str,
    timeout: Duration,
) -> Result<(), StateStoreError> {
    let failed = |reason: String| StateStoreError::Create {
        topic: topic.to_string(),
        reason,
    };
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)
        .create()
        .map_err(|e| failed(format!("cannot create a Kafka admin client: {e}")))?;
    tracing::info!(topic, purpose, "creating a topic of the bridge's own");
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact")
        .set("min.compaction.lag.ms", "0");
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .create_topics(&[new], &options)
        .await
        .map_err(|e| failed(e.to_string()))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = name, purpose, "created the topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(failed(code.to_string())),
        }
    }
    Ok(())
}

/// The record key of one bucket of one bridge's state.
pub fn bucket_key(id: &str, bucket: usize) -> String {
    format!("{id}#{bucket}")
}

/// The record key of a bridge's head: which transaction committed last.
pub fn head_key(id: &str) -> String {
    format!("{id}#head")
}

/// The prefix of the record keys of a bridge's Sparkplug birth tables.
fn sparkplug_prefix(id: &str) -> String {
    format!("{id}#spb/")
}

/// The record key of one Sparkplug birth table of a bridge (`table` is
/// `group/edge_node[/device]`).
pub fn sparkplug_key(id: &str, table: &str) -> String {
    format!("{}{table}", sparkplug_prefix(id))
}

/// One bridge's state as last committed.
#[derive(Debug, Default)]
pub struct Stored {
    /// The value of each bucket that has one.
    pub buckets: HashMap<usize, Vec<u8>>,
    pub head: Option<Vec<u8>>,
    /// Sparkplug birth tables by `group/edge_node[/device]`.
    pub sparkplug: HashMap<String, Vec<u8>>,
}

/// What a read keeps: the last value of each exact key (by slot), and of
/// each key below a prefix (by the rest of the key).
#[derive(Debug, Default)]
struct Last {
    slots: HashMap<usize, Vec<u8>>,
    prefixed: HashMap<String, Vec<u8>>,
}

/// The last committed values of bridge `id`'s `buckets` and head. Creates
/// the topic first if it does not exist.
pub async fn load(
    kafka: &KafkaConfig,
    topic: &str,
    id: &str,
    buckets: usize,
    timeout: Duration,
) -> Result<Stored, StateStoreError> {
    // The head is slot `buckets`.
    let keys: HashMap<Vec<u8>, usize> = (0..buckets)
        .map(|b| (bucket_key(id, b).into_bytes(), b))
        .chain([(head_key(id).into_bytes(), buckets)])
        .collect();
    let mut config = client_config(kafka);
    config
        .set("group.id", format!("{id}.state-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    let prefix = sparkplug_prefix(id);
    let read = |wait: bool| {
        let (config, topic, keys, prefix) = (
            config.clone(),
            topic.to_string(),
            keys.clone(),
            prefix.clone(),
        );
        async move {
            tokio::task::spawn_blocking(move || {
                read_last(&config, &topic, &keys, &prefix, timeout, wait)
            })
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
        }
    };
    tracing::info!(
        topic,
        bound_ms = timeout.as_millis() as u64,
        "reading the exactly-once state (waits for transactions still open on the topic)"
    );
    let mut last = match read(false).await {
        Err(StateStoreError::Missing(_)) => {
            create_topic(kafka, topic, "the exactly-once state", timeout).await?;
            read(true).await
        }
        other => other,
    }?;
    let head = last.slots.remove(&buckets);
    Ok(Stored {
        buckets: last.slots,
        head,
        sparkplug: last.prefixed,
    })
}

/// The offset the consumer will fetch next on `partition`; 0 before any.
fn consumer_position(consumer: &BaseConsumer, topic: &str, partition: i32) -> i64 {
    let Ok(list) = consumer.position() else {
        return 0;
    };
    list.find_partition(topic, partition)
        .and_then(|p| p.offset().to_raw())
        .unwrap_or(0)
}

/// Reads every partition of `topic` to its end, keeping the last value of
/// each of `keys` and of each key starting with `prefix`. A missing topic
/// is an error at once, or after `timeout` if `wait` (just created: its
/// metadata may lag).
fn read_last(
    config: &rdkafka::ClientConfig,
    topic: &str,
    keys: &HashMap<Vec<u8>, usize>,
    prefix: &str,
    timeout: Duration,
    wait: bool,
) -> Result<Last, StateStoreError> {
    let kafka = |error| StateStoreError::Kafka {
        topic: topic.to_string(),
        error,
    };
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer = config.create().map_err(kafka)?;
    tracing::debug!(topic, "reading exactly-once state");
    let partitions = loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(kafka)?;
        // Missing only when the broker says so. A topic whose partitions
        // have no leader (a broker paused or restarting, a failover), or
        // metadata that came back with another error, is waited for:
        // taking it for missing sent a settle, with a broker paused, into
        // creating the topic and waiting out that call (found by the
        // paused-broker test under load).
        let missing = metadata.topics().first().is_none_or(|t| {
            t.error().is_some_and(|e| {
                matches!(
                    RDKafkaErrorCode::from(e),
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
                )
            })
        });
        let known = !missing;
        match super::ready_partitions(&metadata) {
            Some(n) => break n,
            None if (wait || known) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            None if known => {
                return Err(StateStoreError::Timeout {
                    topic: topic.to_string(),
                    timeout,
                    waiting: "a leader for every partition".into(),
                })
            }
            None => return Err(StateStoreError::Missing(topic.to_string())),
        }
    };
    tracing::debug!(topic, partitions, "state topic found");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .map_err(kafka)?;
    }
    consumer.assign(&assignment).map_err(kafka)?;
    // The end to reach is the high watermark now, not the first end-of-
    // partition: with `read_committed` that comes at the last stable
    // offset, which stops before any transaction still open on the
    // partition, such as another bridge's that shares the topic. Our own
    // last committed state may lie beyond it; stopping there made a bridge
    // take messages it had committed for new ones (duplicates found by the
    // zombie test while crash tests left transactions open).
    // A topic created moments ago on a multi-broker cluster answers
    // UnknownTopicOrPartition or NotLeaderForPartition for a while: retry
    // until the deadline, and say what was awaited if it passes.
    let timed_out = |waiting: String| StateStoreError::Timeout {
        topic: topic.to_string(),
        timeout,
        waiting,
    };
    // The watermark query answers with the isolation level of the client
    // that asks: on the read_committed reader it is the last stable
    // offset, which stops before any transaction still open, ours too when
    // `settle` reads the head back while the coordinator is still writing
    // the commit markers of the transaction being settled (the head then
    // looked unchanged, the transaction was judged aborted, and its batch
    // produced a second time). Ask a read_uncommitted client instead.
    // It joins no group and lives only for the queries (dropped before the
    // read below), so it costs one short-lived connection per read.
    let mut uncommitted = config.clone();
    uncommitted
        .remove("group.id")
        .set("isolation.level", "read_uncommitted");
    let watermarks: BaseConsumer = uncommitted.create().map_err(kafka)?;
    let mut targets = HashMap::new();
    for p in 0..partitions as i32 {
        let high = loop {
            match watermarks.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                Ok((_, high)) => break high,
                Err(error) if Instant::now() < deadline => {
                    tracing::debug!(topic, partition = p, %error, "state topic not readable yet; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => {
                    return Err(timed_out(format!(
                        "the end offset of partition {p}: {error}"
                    )))
                }
            }
        };
        targets.insert(p, high);
    }
    drop(watermarks);
    let mut last = Last::default();
    let mut done: HashSet<i32> = HashSet::new();
    let mut last_error = None;
    let mut next_report = Instant::now() + Duration::from_secs(5);
    loop {
        for (&p, &high) in &targets {
            if high <= 0 || consumer_position(&consumer, topic, p) >= high {
                done.insert(p);
            }
        }
        if done.len() == partitions {
            break;
        }
        let behind = || {
            let mut parts: Vec<String> = targets
                .iter()
                .filter(|(p, _)| !done.contains(p))
                .map(|(&p, &high)| {
                    format!(
                        "partition {p} at {} of {high}",
                        consumer_position(&consumer, topic, p)
                    )
                })
                .collect();
            parts.sort();
            let mut text = parts.join(", ");
            if let Some(error) = &last_error {
                text.push_str(&format!("; last error: {error}"));
            }
            text
        };
        if Instant::now() >= deadline {
            return Err(timed_out(format!(
                "reading to the end offsets: {} (a transaction still open on the topic holds a read_committed reader back until it ends; one that never ends is a hanging transaction, see \"The state read times out\" in docs/operations.md)",
                behind()
            )));
        }
        if Instant::now() >= next_report {
            tracing::info!(topic, behind = %behind(), "still reading the exactly-once state");
            next_report = Instant::now() + Duration::from_secs(5);
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let key = m.key().unwrap_or_default();
                if let Some(&bucket) = keys.get(key) {
                    match m.payload() {
                        Some(value) => last.slots.insert(bucket, value.to_vec()),
                        None => last.slots.remove(&bucket),
                    };
                } else if let Some(rest) = key.strip_prefix(prefix.as_bytes()) {
                    let rest = String::from_utf8_lossy(rest).into_owned();
                    match m.payload() {
                        Some(value) => last.prefixed.insert(rest, value.to_vec()),
                        None => last.prefixed.remove(&rest),
                    };
                }
            }
            None | Some(Err(KafkaError::PartitionEOF(_))) => {}
            // Transient while a new topic's leaders settle; bounded by the
            // deadline above, which reports the last one.
            Some(Err(error)) => {
                tracing::debug!(topic, %error, "reading the state topic; retrying");
                last_error = Some(error);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(last)
}
