//! Scale-out benchmark: 1, 2 and 3 bridges (the release binary, each its
//! own process) on one topic tree, as a share group and partitioned, from a
//! QoS 1 publisher through mosquitto to a real Kafka, read back with
//! `read_committed`. Reports per row the aggregate rate, the bridges' CPU
//! per message (all of them together), and mosquitto's CPU per message
//! (partitioned bridges make it deliver every message N times).
//!
//! `cargo bench --bench scale` (env: `BENCH_MESSAGES`, default 50000;
//! `BENCH_ROWS`, default `single,shared2,shared3,partitioned2,partitioned3`).
//! Needs mosquitto and Java 17. On one machine every bridge, the broker,
//! Kafka and the publisher share its cores: the rows show what each mode
//! costs, not what it gains on machines of their own. See docs/scaling.md.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::kafka::TestKafka;
use common::mosquitto::Mosquitto;
use common::{BridgeFiles, BridgeProcess, ConfigBuilder, Topics};
use std::time::{Duration, Instant};
use support::{committed_reader, kafka_ceiling, machine, proc_cpu_ticks, publish, BATCH};

/// One row: how many bridges, and how they split the work.
#[derive(Clone, Copy)]
enum Mode {
    Shared,
    Partitioned,
}

fn rows(spec: &str) -> Vec<(String, Option<Mode>, u32)> {
    spec.split(',')
        .filter(|r| !r.is_empty())
        .map(|row| {
            let (mode, n) =
                row.split_at(row.find(|c: char| c.is_ascii_digit()).unwrap_or(row.len()));
            let n: u32 = n.parse().unwrap_or(1);
            let mode = match mode {
                "single" => None,
                "shared" => Some(Mode::Shared),
                "partitioned" => Some(Mode::Partitioned),
                other => panic!("BENCH_ROWS: unknown mode {other}"),
            };
            (row.to_string(), mode, n)
        })
        .collect()
}

/// The bridges of one row, started and connected.
async fn start_bridges(
    base: &ConfigBuilder,
    mode: Option<Mode>,
    n: u32,
) -> (Vec<BridgeFiles>, Vec<BridgeProcess>) {
    let group = common::unique("bench-group");
    let mut files = Vec::new();
    let mut bridges = Vec::new();
    for slot in 0..n {
        let mut config = base
            .clone()
            .client_id(&common::unique("bench-bridge"))
            .mqtt("inflight_window", 2000)
            .delivery("batch_max_messages", BATCH as u64)
            .delivery("commit_interval_ms", 100);
        match mode {
            Some(Mode::Shared) => config = config.mqtt("share_group", group.as_str()),
            // One command consumer group for the members (hvac.yaml has
            // command routes).
            Some(Mode::Partitioned) => {
                config = config
                    .partition(n, slot)
                    .kafka("command_group", group.as_str())
            }
            None => {}
        }
        let f = BridgeFiles::new(&config);
        let mut bridge = f.start(None);
        bridge.await_connected(Duration::from_secs(60)).await;
        files.push(f);
        bridges.push(bridge);
    }
    (files, bridges)
}

struct Row {
    rate: f64,
    bridge_cpu_us: f64,
    broker_cpu_us: f64,
}

async fn run_row(
    broker: &Mosquitto,
    kafka: &TestKafka,
    mode: Option<Mode>,
    n: u32,
    count: u64,
) -> Row {
    let topics = Topics::new();
    kafka.create_test_topics(&topics).await;
    let bootstrap = kafka.bootstrap();
    let base = ConfigBuilder::new(broker.port, &bootstrap, &topics);
    let (_files, bridges) = start_bridges(&base, mode, n).await;
    let consumer = committed_reader(&bootstrap, &topics.telemetry());
    let ticks = |bridges: &[BridgeProcess]| -> u64 {
        bridges.iter().map(|b| proc_cpu_ticks(b.pid() as u32)).sum()
    };
    let (bridge_before, broker_before) = (ticks(&bridges), proc_cpu_ticks(broker.pid()));
    let start = Instant::now();
    let port = broker.port;
    let publisher = tokio::spawn(async move { publish(port, 0, count, None).await });
    let mut read = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while read < count {
        assert!(
            Instant::now() < deadline,
            "only {read} of {count} records in 600 s"
        );
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            read += 1;
        }
    }
    let elapsed = start.elapsed();
    publisher.await.unwrap();
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let per_msg = |t: u64| t as f64 / ticks_per_s / count as f64 * 1e6;
    let row = Row {
        rate: count as f64 / elapsed.as_secs_f64(),
        bridge_cpu_us: per_msg(ticks(&bridges) - bridge_before),
        broker_cpu_us: per_msg(proc_cpu_ticks(broker.pid()) - broker_before),
    };
    for bridge in bridges {
        bridge.stop();
    }
    row
}

fn main() {
    let count: u64 = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let spec = std::env::var("BENCH_ROWS")
        .unwrap_or_else(|_| "single,shared2,shared3,partitioned2,partitioned3".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "scale-out benchmark: {count} HVAC messages at QoS 1 per row, real Kafka, exactly once"
    );
    println!("machine: {}", machine());
    runtime.block_on(async {
        let broker = Mosquitto::start();
        let kafka = TestKafka::real();
        // A fresh broker JVM is slow for its first ~100k records.
        let warm = common::unique("warm");
        kafka.create_topics(&[&warm], 3).await;
        let ceiling = kafka_ceiling(&kafka.bootstrap(), &warm, 150_000);
        println!("kafka warmed: 150000 records, transactional, {ceiling:.0} msg/s");
        println!("row            bridges  msg/s    bridge CPU us/msg (all)  mosquitto CPU us/msg");
        for (name, mode, n) in rows(&spec) {
            eprintln!("{name}: starting {n} bridge(s)");
            let row = run_row(&broker, &kafka, mode, n, count).await;
            println!(
                "{name:<14} {n:>7}  {:>7.0}  {:>23.1}  {:>20.1}",
                row.rate, row.bridge_cpu_us, row.broker_cpu_us
            );
        }
    });
}
