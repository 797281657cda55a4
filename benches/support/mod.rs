//! What the end-to-end benches share: the HVAC load they publish, the
//! Kafka ceiling they compare with, and reading a process's CPU and memory
//! from /proc.
// Each bench uses a part of it.
#![allow(dead_code)]

use crate::common;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Records per transaction, as the benches configure the bridge.
pub const BATCH: usize = 1000;

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

pub fn payload(seq: u64) -> Vec<u8> {
    format!(
        r#"{{"ts":{},"ambient_c":21.4,"target_c":22.0,"humidity_pct":41.2,"air_quality_ppm":612,"blower_pct":55,"load_pct":48.5,"energy_kwh":1234.567,"mode":"cool","seq":{seq},"sent_us":{}}}"#,
        now_us() / 1000,
        now_us()
    )
    .into_bytes()
}

/// Publishes `count` messages at QoS 1 (`rate` per second, or as fast as the
/// broker acks), waiting for every PUBACK.
pub async fn publish(port: u16, first_seq: u64, count: u64, rate: Option<f64>) {
    let mut options = MqttOptions::new(common::unique("bench-pub"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 10_000);
    let feeder = tokio::spawn(async move {
        let start = Instant::now();
        for i in 0..count {
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let seq = first_seq + i;
            let topic = format!("site/s{}/hvac/u{}/telemetry", seq % 4, seq % 64);
            client
                .publish(topic, QoS::AtLeastOnce, false, payload(seq))
                .await
                .unwrap();
        }
        client
    });
    let mut acks = 0;
    while acks < count {
        if let Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) =
            events.poll().await.expect("publisher")
        {
            acks += 1;
        }
    }
    let client = feeder.await.unwrap();
    client.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
}

/// The same records produced straight to Kafka, transactional, in batches
/// of the bridge's size: the Kafka side's ceiling.
pub fn kafka_ceiling(bootstrap: &str, topic: &str, n: u64) -> f64 {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", common::unique("ceiling"))
        .create()
        .unwrap();
    p.init_transactions(Duration::from_secs(30)).unwrap();
    let start = Instant::now();
    let mut seq = 0u64;
    while seq < n {
        p.begin_transaction().unwrap();
        for _ in 0..BATCH.min((n - seq) as usize) {
            let key = format!("s{}.u{}", seq % 4, seq % 64);
            let value = payload(seq);
            let mut record = BaseRecord::to(topic).key(&key).payload(&value);
            loop {
                match p.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        p.poll(Duration::from_millis(1));
                    }
                }
            }
            seq += 1;
        }
        // The same flush as the bridge's sink (see src/kafka/sink.rs):
        // rust-rdkafka's own flush adds 100 ms per commit.
        while p.in_flight_count() > 0 {
            p.poll(Duration::from_millis(10));
        }
        p.commit_transaction(Duration::from_secs(30)).unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

pub fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

pub fn proc_status_kib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .unwrap_or(0.0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {:.0} GiB", mem / 1024.0 / 1024.0)
}

/// A `read_committed` reader of `topic` from its start, in a group of its
/// own, fetching without waiting for full batches (latency figures).
pub fn committed_reader(bootstrap: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", common::unique("bench-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}
