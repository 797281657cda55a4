//! End-to-end benchmark: MQTT publisher → mosquitto → bridge (the release
//! binary, its own process) → Kafka → `read_committed` consumer.
//!
//! `cargo bench --bench end_to_end` (env: `BENCH_MESSAGES`, default 100000;
//! `BENCH_KAFKA=mock,real`; `BENCH_GUARANTEE=exactly_once,at_least_once`;
//! `BENCH_OUTAGE_S`, 0 skips the outage run). Needs mosquitto, mosquitto_sub
//! (mosquitto-clients) and, for `real`, Java 17 (see docs/testing.md).
//! `BRIDGE_TEST_BINARY=path` measures that binary instead of the one cargo
//! built for the bench, which carries the test-only features; the figures
//! in docs/performance.md are of a `cargo build --release` binary.
//! Reports per Kafka: the reference (the same load delivered by the same
//! broker to `mosquitto_sub`), the Kafka ceiling (the same records produced
//! straight to the same Kafka, transactional, no MQTT), and the bridge's
//! throughput, latency, CPU and memory. See docs/performance.md.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::kafka::TestKafka;
use common::mosquitto::Mosquitto;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{
    committed_reader, kafka_ceiling, machine, now_us, proc_cpu_ticks, proc_status_kib, publish,
    BATCH,
};

const TOPIC_FILTER: &str = "site/+/hvac/+/telemetry";

/// The broker delivering the same load to one `mosquitto_sub`.
async fn reference_rate(broker: &Mosquitto, n: u64) -> f64 {
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-i",
            &common::unique("ref"),
        ])
        .args(["-t", TOPIC_FILTER, "-F", "%m"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    let stdout = sub.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut count = 0u64;
        for _ in std::io::BufReader::new(stdout).lines() {
            count += 1;
            if count == 1 {
                let _ = tx.send(());
            }
            if count == n + 1 {
                break;
            }
        }
        Instant::now()
    });
    // Warm-up: one message, repeated until the subscriber has it.
    loop {
        publish(broker.port, u64::MAX / 2, 1, None).await;
        if rx.recv_timeout(Duration::from_millis(300)).is_ok() {
            break;
        }
    }
    let start = Instant::now();
    publish(broker.port, 0, n, None).await;
    let end = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    let _ = sub.kill();
    let _ = sub.wait();
    n as f64 / end.duration_since(start).as_secs_f64()
}

struct BridgeRun {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_msg: f64,
    peak_rss_mib: f64,
    rss_mib: f64,
}

/// The bridge binary running against `broker` and a Kafka, with a
/// `read_committed` reader of its telemetry topic, warmed up: subscribed and
/// delivering.
struct BridgeProcess {
    child: std::process::Child,
    pid: u32,
    consumer: BaseConsumer,
    _dir: tempfile::TempDir,
}

impl BridgeProcess {
    async fn start(broker: &Mosquitto, kafka: &TestKafka, guarantee: &str) -> Self {
        let bootstrap = &kafka.bootstrap();
        let topics = common::Topics::new();
        kafka.create_test_topics(&topics).await;
        let dir = tempfile::tempdir().unwrap();
        let mapping = std::fs::read_to_string(common::repo_path("mappings/hvac.yaml"))
            .unwrap()
            .replace("topic: hvac.", &format!("topic: {}hvac.", topics.prefix))
            .replace(
                "schemas/",
                &format!("{}/", common::repo_path("mappings/schemas").display()),
            );
        std::fs::write(dir.path().join("hvac.yaml"), mapping).unwrap();
        let id = common::unique("bench-bridge");
        let config = dir.path().join("bridge.yaml");
        std::fs::write(
            &config,
            format!(
                "mqtt: {{ host: 127.0.0.1, port: {}, client_id: {id}, inflight_window: 2000 }}\n\
                 kafka: {{ bootstrap_servers: '{bootstrap}', transactional_id: {id}, dead_letter_topic: {} }}\n\
                 delivery: {{ guarantee: {guarantee}, batch_max_messages: {BATCH}, commit_interval_ms: 100 }}\nmappings: ['hvac.yaml']\n",
                broker.port,
                topics.dead_letter()
            ),
        )
        .unwrap();
        // `cargo bench` builds the binary with the dev-dependencies'
        // features (the crash points, tokio's test clock); a production
        // build is measured by naming it in BRIDGE_TEST_BINARY.
        let mut command = Command::new(common::process::binary());
        common::die_with_parent(&mut command);
        let log = std::env::var("BENCH_BRIDGE_LOG").unwrap_or_else(|_| "warn".into());
        let child = command
            .args(["run", "--config", config.to_str().unwrap(), "--log", &log])
            .spawn()
            .expect("bridge binary");
        let pid = child.id();
        let consumer = committed_reader(bootstrap, &topics.telemetry());
        // Warm-up until the bridge is subscribed and a record comes through.
        let mut warm = 0u64;
        'warm: loop {
            publish(broker.port, 10_000_000 + warm, 1, None).await;
            warm += 1;
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                if let Some(Ok(_)) = consumer.poll(Duration::from_millis(50)) {
                    break 'warm;
                }
            }
            assert!(
                warm < 120,
                "bridge did not deliver a warm-up message in 60 s"
            );
        }
        while let Some(Ok(_)) = consumer.poll(Duration::from_millis(300)) {}
        eprintln!("  bridge warm ({warm} warm-up messages)");
        Self {
            child,
            pid,
            consumer,
            _dir: dir,
        }
    }

    fn rss_mib(&self) -> f64 {
        proc_status_kib(self.pid, "VmRSS:") / 1024.0
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Runs the bridge, publishes `n` messages (paced at `rate` or flat out)
/// and reads them back.
async fn bridge_run(
    broker: &Mosquitto,
    kafka: &TestKafka,
    guarantee: &str,
    n: u64,
    rate: Option<f64>,
) -> BridgeRun {
    let bridge = BridgeProcess::start(broker, kafka, guarantee).await;
    let (pid, consumer) = (bridge.pid, &bridge.consumer);
    eprintln!("  publishing {n}");
    let cpu_before = proc_cpu_ticks(pid);
    let start = Instant::now();
    let port = broker.port;
    let publisher = tokio::spawn(async move { publish(port, 0, n, rate).await });
    let mut latencies = Vec::with_capacity(n as usize);
    let deadline = Instant::now() + Duration::from_secs(600);
    while (latencies.len() as u64) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records in 600 s",
            latencies.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let received = now_us();
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            if v["seq"].as_u64().unwrap() < 10_000_000 {
                latencies.push(received.saturating_sub(v["sent_us"].as_u64().unwrap()));
            }
        }
    }
    let elapsed = start.elapsed();
    eprintln!("  {n} records read in {elapsed:?}");
    publisher.await.unwrap();
    let cpu_ticks = proc_cpu_ticks(pid) - cpu_before;
    let peak = proc_status_kib(pid, "VmHWM:");
    let rss = proc_status_kib(pid, "VmRSS:");
    bridge.stop();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    BridgeRun {
        rate: n as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_us_per_msg: cpu_ticks as f64 / ticks_per_s / n as f64 * 1e6,
        peak_rss_mib: peak / 1024.0,
        rss_mib: rss / 1024.0,
    }
}

/// Kafka (the mock cluster) down for `outage` under a steady load: the
/// bridge must stop reading from MQTT rather than buffer, so its memory
/// stays flat while mosquitto holds the backlog; then the time to deliver
/// the backlog once Kafka is back.
async fn outage_run(broker: &Mosquitto, rate: f64, outage: Duration) {
    let kafka = TestKafka::mock();
    let mock = kafka.mock_cluster();
    let bridge = BridgeProcess::start(broker, &kafka, "exactly_once").await;
    let count = (rate * outage.as_secs_f64()) as u64;
    mock.broker_down(1).unwrap();
    let port = broker.port;
    let publisher = tokio::spawn(async move { publish(port, 0, count, Some(rate)).await });
    let mut samples = vec![bridge.rss_mib()];
    let started = Instant::now();
    while started.elapsed() < outage {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(bridge.rss_mib());
    }
    publisher.await.unwrap();
    mock.broker_up(1).unwrap();
    let back = Instant::now();
    let mut seen = std::collections::HashSet::new();
    let mut records = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while (seen.len() as u64) < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} after the outage",
            seen.len()
        );
        if let Some(Ok(m)) = bridge.consumer.poll(Duration::from_millis(100)) {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let seq = v["seq"].as_u64().unwrap();
            if seq < 10_000_000 {
                records += 1;
                seen.insert(seq);
            }
        }
    }
    let recovery = back.elapsed();
    samples.push(bridge.rss_mib());
    bridge.stop();
    let (min, max) = samples
        .iter()
        .fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
    println!("--- Kafka down for {outage:?} at {rate:.0} msg/s (mock) ---");
    println!(
        "bridge RSS during the outage: {min:.1}-{max:.1} MiB over {} samples; backlog {count} messages held by mosquitto",
        samples.len()
    );
    println!(
        "after Kafka returned: all {count} delivered in {:.1} s ({records} records: {} redelivered duplicates, at-least-once)",
        recovery.as_secs_f64(),
        records - count
    );
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes its settings from env.
    let n: u64 = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let kinds = std::env::var("BENCH_KAFKA").unwrap_or_else(|_| "mock,real".into());
    let guarantees =
        std::env::var("BENCH_GUARANTEE").unwrap_or_else(|_| "exactly_once,at_least_once".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "end-to-end benchmark: {n} HVAC messages at QoS 1, batch {BATCH}, commit interval 100 ms"
    );
    println!("machine: {}", machine());
    let outage_s: u64 = std::env::var("BENCH_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    runtime.block_on(async {
        let broker = Mosquitto::start();
        let reference = reference_rate(&broker, n).await;
        println!("reference (mosquitto -> mosquitto_sub): {reference:.0} msg/s");
        for kind in kinds.split(',').filter(|k| !k.is_empty()) {
            let kafka = match kind {
                "mock" => TestKafka::mock(),
                "real" => TestKafka::real(),
                other => panic!("BENCH_KAFKA: unknown kind {other}"),
            };
            let bootstrap = kafka.bootstrap();
            let ceiling_topic = common::unique("ceiling");
            kafka.create_topics(&[&ceiling_topic], 3).await;
            eprintln!("{kind}: measuring the Kafka ceiling");
            let ceiling = kafka_ceiling(&bootstrap, &ceiling_topic, n);
            eprintln!("{kind}: {ceiling:.0} msg/s");
            println!("--- Kafka: {kind} ---");
            println!("kafka ceiling (rdkafka, transactional, no MQTT): {ceiling:.0} msg/s");
            for guarantee in guarantees.split(',') {
            eprintln!("{kind}, {guarantee}: bridge flat out");
            let full = bridge_run(&broker, &kafka, guarantee, n, None).await;
            let half = bridge_run(&broker, &kafka, guarantee, n / 2, Some(full.rate / 2.0)).await;
            println!("{guarantee}:");
            println!(
                "bridge flat out: {:.0} msg/s = {:.2} x reference; latency p50 {:.1} ms, p99 {:.1} ms; CPU {:.1} us/msg ({:.1} s per million); RSS {:.1} MiB (peak {:.1} MiB)",
                full.rate, full.rate / reference, full.p50_ms, full.p99_ms, full.cpu_us_per_msg, full.cpu_us_per_msg, full.rss_mib, full.peak_rss_mib
            );
            println!(
                "bridge at half that rate ({:.0} msg/s offered): latency p50 {:.1} ms, p99 {:.1} ms; CPU {:.1} us/msg",
                full.rate / 2.0, half.p50_ms, half.p99_ms, half.cpu_us_per_msg
            );
            }
        }
        if outage_s > 0 {
            outage_run(&broker, 2000.0, Duration::from_secs(outage_s)).await;
        }
    });
}
