//! Reading back what the bridge committed to Kafka, as a downstream
//! `read_committed` consumer would, and checking it by `seq`.

use super::unique;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A record as read back from Kafka.
#[derive(Debug, Clone)]
pub struct Landed {
    pub topic: String,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
    pub timestamp_ms: Option<i64>,
}

impl Landed {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).expect("record value is JSON")
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Reads `topics` with `read_committed` from the beginning until `expected`
/// records arrived, then keeps reading for `settle` to catch extras
/// (duplicates). Panics at `timeout` with what it has.
pub fn read_committed(
    bootstrap: &str,
    topics: &[&str],
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Landed> {
    read_committed_until(bootstrap, topics, timeout, settle, &|out| {
        out.len() >= expected
    })
}

/// Reads `topics` until `expected` records arrived, or until nothing new
/// arrived for 20 s after `timeout`... whichever first: returns what it
/// read, for tests that diagnose what is missing rather than panic.
pub fn read_committed_until_quiet(
    bootstrap: &str,
    topics: &[&str],
    expected: usize,
    timeout: Duration,
) -> Vec<Landed> {
    let deadline = Instant::now() + timeout;
    read_committed_until(
        bootstrap,
        topics,
        timeout * 2,
        Duration::from_secs(2),
        &|out| out.len() >= expected || Instant::now() >= deadline,
    )
}

/// Reads until `expected` distinct `seq` values arrived (for at-least-once
/// runs, where redelivered duplicates must not end the read early).
pub fn read_committed_distinct(
    bootstrap: &str,
    topics: &[&str],
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Landed> {
    read_committed_until(bootstrap, topics, timeout, settle, &|out| {
        out.len() >= expected && distinct_seqs(out).0.len() >= expected
    })
}

/// Each assigned partition's position against its high watermark, for
/// failure messages.
fn positions(consumer: &BaseConsumer) -> String {
    let Ok(position) = consumer.position() else {
        return "(no position)".into();
    };
    position
        .elements()
        .iter()
        .map(|p| {
            let high = consumer
                .fetch_watermarks(p.topic(), p.partition(), Duration::from_secs(5))
                .map_or(-1, |(_, high)| high);
            format!(
                "  {}[{}]: position {:?}, high watermark {high}",
                p.topic(),
                p.partition(),
                p.offset()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn read_committed_until(
    bootstrap: &str,
    topics: &[&str],
    timeout: Duration,
    settle: Duration,
    done: &dyn Fn(&[Landed]) -> bool,
) -> Vec<Landed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("consumer");
    consumer.subscribe(topics).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut settle_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if let Some(until) = settle_until {
            if now >= until {
                break;
            }
        } else if done(&out) {
            settle_until = Some(now + settle);
        } else if now >= deadline {
            panic!(
                "only {} records arrived within {timeout:?}, not what was expected; the last: {:?}\n\
                 partitions (a position below the high watermark: records there are not \
                 readable yet, e.g. behind an open transaction):\n{}",
                out.len(),
                out.last(),
                positions(&consumer)
            );
        }
        if let Some(result) = consumer.poll(Duration::from_millis(100)) {
            // librdkafka reports connection trouble (a broker paused or
            // restarting: AllBrokersDown, transport failures) through the
            // consumer and goes on retrying; so does the reader, until its
            // deadline says what did not arrive.
            let m = match result {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("reader: {e} (retrying)");
                    continue;
                }
            };
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Landed {
                topic: m.topic().to_string(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                headers,
                timestamp_ms: m.timestamp().to_millis(),
            });
        }
    }
    out
}

/// The distinct `seq` fields of JSON records, sorted, and how many records
/// there were (more than distinct ones when some were redelivered).
pub fn distinct_seqs(landed: &[Landed]) -> (Vec<u64>, usize) {
    let mut seqs: Vec<u64> = landed
        .iter()
        .map(|r| r.json()["seq"].as_u64().expect("seq"))
        .collect();
    seqs.sort_unstable();
    let records = seqs.len();
    seqs.dedup();
    (seqs, records)
}

/// Asserts that messages `0..count` all landed (by their `seq` field),
/// duplicates allowed (at least once); returns how many records there were.
pub fn assert_every_seq(landed: &[Landed], count: u64) -> usize {
    let (seqs, records) = distinct_seqs(landed);
    assert_eq!(
        seqs.len() as u64,
        count,
        "distinct messages ({records} records)"
    );
    assert_eq!(seqs.first().copied(), Some(0));
    assert_eq!(seqs.last().copied(), Some(count - 1));
    records
}
