//! The zero-install demo: everything in one process.
//!
//! An embedded MQTT broker (rumqttd), librdkafka's mock Kafka cluster, a
//! simulated HVAC fleet, a Sparkplug B edge node, and the bridge itself
//! running `mappings/hvac.yaml` and `mappings/plant.yaml`,
//! with a one-line summary every second and `/metrics` served. The mock
//! cluster is for showing the flow, not for proving guarantees: the test
//! suite does that against real brokers.

mod broker;
mod edge_node;
mod fleet;

use crate::app;
use crate::config::{Config, MappingSource};
use crate::telemetry::STATS;
use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The worked example, built in so the demo runs from any directory.
/// The shipped mapping and the files it refers to, by path relative to it.
const MAPPING_FILES: [(&str, &str); 7] = [
    ("hvac.yaml", include_str!("../../mappings/hvac.yaml")),
    ("plant.yaml", include_str!("../../mappings/plant.yaml")),
    (
        "schemas/hvac-telemetry.schema.json",
        include_str!("../../mappings/schemas/hvac-telemetry.schema.json"),
    ),
    (
        "schemas/common.schema.json",
        include_str!("../../mappings/schemas/common.schema.json"),
    ),
    (
        "schemas/hvac-setpoint.schema.json",
        include_str!("../../mappings/schemas/hvac-setpoint.schema.json"),
    ),
    (
        "schemas/wall-dial.schema.json",
        include_str!("../../mappings/schemas/wall-dial.schema.json"),
    ),
    (
        "protos/hvac.proto",
        include_str!("../../mappings/protos/hvac.proto"),
    ),
];

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Mapping files to run; the built-in `mappings/hvac.yaml` when absent.
    #[arg(long)]
    pub mappings: Option<PathBuf>,
    /// Simulated HVAC units.
    #[arg(long, default_value_t = 12)]
    pub units: usize,
    /// Messages per second from the whole fleet.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Where to serve Prometheus metrics.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: std::net::SocketAddr,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_s: Option<u64>,
}

const TOPICS: [&str; 7] = [
    "hvac.telemetry",
    "plant.metrics",
    "plant.online",
    "hvac.diagnostics",
    "mqtt-bridge.dead-letter",
    "hvac.commands",
    // The mock cluster does not answer CreateTopics, so the bridge cannot
    // create its state topic itself here.
    "mqtt-bridge.state",
];

pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.units == 0 {
        bail!("--units must be at least 1");
    }
    if let Some(seconds) = args.duration_s {
        let token = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            token.cancel();
        });
    }
    let kafka = MockCluster::new(3).context("cannot start the mock Kafka cluster")?;
    for topic in TOPICS {
        kafka
            .create_topic(topic, 3, 3)
            .context("cannot create demo topic")?;
    }
    let bootstrap = kafka.bootstrap_servers();
    let mqtt_port = free_port()?;
    broker::start(([127, 0, 0, 1], mqtt_port).into())?;

    let _keep = TempMappings::write_if_needed(args.mappings.is_none())?;
    let mappings_dir = match &args.mappings {
        Some(dir) => dir.clone(),
        None => _keep.dir().to_path_buf(),
    };
    let config = demo_config(mqtt_port, &bootstrap, args.metrics_listen, &mappings_dir)?;

    println!("demo: MQTT broker on 127.0.0.1:{mqtt_port}, mock Kafka at {bootstrap}");
    println!(
        "demo: metrics on http://{}/metrics; Ctrl-C to stop",
        args.metrics_listen
    );
    let bridge_stop = CancellationToken::new();
    let ready = CancellationToken::new();
    let bridge = tokio::spawn(app::run_with_readiness(
        config,
        bridge_stop.clone(),
        ready.clone(),
    ));
    tokio::select! {
        _ = ready.cancelled() => {}
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(30)) => bail!("the bridge did not subscribe within 30 s"),
    }

    let in_kafka = Arc::new(KafkaCounts::default());
    let reader_stop = CancellationToken::new();
    let reader = spawn_reader(bootstrap.clone(), in_kafka.clone(), reader_stop.clone());
    let counts = Arc::new(fleet::FleetCounts::default());
    let fleet_stop = CancellationToken::new();
    let fleet = tokio::spawn(fleet::run(
        mqtt_port,
        args.units,
        args.rate,
        counts.clone(),
        fleet_stop.clone(),
    ));

    let (edge_sent, rebirths) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let edge_node = tokio::spawn(edge_node::run(
        mqtt_port,
        edge_sent.clone(),
        rebirths.clone(),
        fleet_stop.clone(),
    ));
    let backend = tokio::spawn(backend_setpoints(
        bootstrap.clone(),
        args.units,
        fleet_stop.clone(),
    ));

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut last_commits, mut last_micros) = (0, 0);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let commits = STATS.commits.load(Ordering::Relaxed);
        let micros = STATS.commit_micros.load(Ordering::Relaxed);
        let latency = if commits > last_commits {
            format!(
                "{:.1} ms",
                (micros - last_micros) as f64 / (commits - last_commits) as f64 / 1000.0
            )
        } else {
            "-".into()
        };
        (last_commits, last_micros) = (commits, micros);
        println!(
            "{:>4}s  received {:>6} | produced {:>6} | dead-lettered {:>4} | unrouted {:>3} | kept on MQTT {:>4} | relayed {:>3} | Kafka->MQTT commands {:>3} | commits {:>5}, commit {latency} | in Kafka: telemetry {} dead-letter {}",
            started.elapsed().as_secs(),
            STATS.received.load(Ordering::Relaxed),
            STATS.produced.load(Ordering::Relaxed),
            STATS.dead_lettered.load(Ordering::Relaxed),
            STATS.unrouted.load(Ordering::Relaxed),
            counts.commands.load(Ordering::Relaxed),
            STATS.relayed.load(Ordering::Relaxed),
            STATS.commands_delivered.load(Ordering::Relaxed),
            commits,
            in_kafka.telemetry.load(Ordering::Relaxed),
            in_kafka.dead_letter.load(Ordering::Relaxed),
        );
    }
    fleet_stop.cancel();
    let _ = fleet.await;
    let _ = edge_node.await;
    let _ = backend.await;
    bridge_stop.cancel();
    let result = bridge.await.context("bridge task")?;
    // Everything is committed now: let the reader catch up before the last
    // line says what Kafka holds.
    reader_stop.cancel();
    let _ = reader.join();
    println!(
        "demo: Sparkplug edge node plant1/press-line-1 sent {} messages (asked for {} rebirths); Kafka holds {} plant.metrics and {} plant.online records",
        edge_sent.load(Ordering::Relaxed),
        rebirths.load(Ordering::Relaxed),
        in_kafka.plant_metrics.load(Ordering::Relaxed),
        in_kafka.plant_online.load(Ordering::Relaxed),
    );
    println!(
        "demo: fleet sent {} telemetry, {} malformed, {} commands; Kafka holds {} telemetry and {} dead-letter records",
        counts.telemetry.load(Ordering::Relaxed),
        counts.malformed.load(Ordering::Relaxed),
        counts.commands.load(Ordering::Relaxed),
        in_kafka.telemetry.load(Ordering::Relaxed),
        in_kafka.dead_letter.load(Ordering::Relaxed),
    );
    drop(kafka);
    result.map_err(Into::into)
}

/// The data centre's side: a setpoint for a random unit every second,
/// produced to `hvac.commands`, which the bridge delivers to the unit's
/// MQTT command topic.
async fn backend_setpoints(bootstrap: String, units: usize, stop: CancellationToken) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = match rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
    {
        Ok(p) => p,
        Err(error) => {
            tracing::warn!(%error, "demo backend: no producer; no commands from Kafka");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The fleet's naming: unit i is ahu-<i+1> on site-<i % 3 + 1>.
        let i = fastrand::usize(0..units);
        let key = format!("ahu-{:03}", i + 1);
        let value = format!(
            r#"{{"site":"site-{}","setpoint_c":{},"issued_by":"demo-backend"}}"#,
            i % 3 + 1,
            19 + fastrand::u32(0..6)
        );
        let record = FutureRecord::to("hvac.commands").key(&key).payload(&value);
        if let Err((error, _)) = producer.send(record, Duration::from_secs(5)).await {
            tracing::warn!(%error, "demo backend: command not produced");
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn demo_config(
    mqtt_port: u16,
    bootstrap: &str,
    metrics: std::net::SocketAddr,
    mappings: &Path,
) -> anyhow::Result<Config> {
    let text = format!(
        "mqtt: {{ host: 127.0.0.1, port: {mqtt_port}, client_id: demo-bridge, protocol: v311 }}\n\
         kafka: {{ bootstrap_servers: '{bootstrap}', transactional_id: demo-bridge }}\n\
         delivery: {{ batch_max_messages: 500, commit_interval_ms: 100 }}\n\
         metrics: {{ listen: '{metrics}' }}\n\
         mappings: ['*.yaml']\n"
    );
    let mut sources = Vec::new();
    let mut paths: Vec<_> = glob::glob(&format!("{}/*.yaml", mappings.display()))?
        .filter_map(Result::ok)
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("no mapping files (*.yaml) in {}", mappings.display());
    }
    for path in paths {
        sources.push(MappingSource::load(&path)?);
    }
    // Through the same checks as a bridge file a user writes.
    Ok(Config::from_parts(
        &mappings.join("demo-bridge.yaml"),
        &text,
        sources,
    )?)
}

/// The built-in mapping files, written to a temporary directory so that
/// their schema and `.proto` references resolve like on disk.
struct TempMappings(Option<tempfile::TempDir>);

impl TempMappings {
    fn write_if_needed(needed: bool) -> anyhow::Result<Self> {
        if !needed {
            return Ok(Self(None));
        }
        let dir = tempfile::tempdir()?;
        for (path, text) in MAPPING_FILES {
            let path = dir.path().join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, text)?;
        }
        Ok(Self(Some(dir)))
    }

    fn dir(&self) -> &Path {
        self.0.as_ref().map_or(Path::new("mappings"), |d| d.path())
    }
}

#[derive(Default)]
struct KafkaCounts {
    telemetry: AtomicU64,
    dead_letter: AtomicU64,
    plant_metrics: AtomicU64,
    plant_online: AtomicU64,
}

/// Counts what is visible in Kafka to a `read_committed` consumer.
fn spawn_reader(
    bootstrap: String,
    counts: Arc<KafkaCounts>,
    stop: CancellationToken,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let consumer: BaseConsumer = match rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "demo-reader")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "demo reader unavailable");
                return;
            }
        };
        // Assigned, not subscribed: no group to join, so counting starts at
        // once.
        let mut assignment = rdkafka::TopicPartitionList::new();
        for topic in [
            "hvac.telemetry",
            "mqtt-bridge.dead-letter",
            "plant.metrics",
            "plant.online",
        ] {
            for partition in 0..3 {
                let _ =
                    assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning);
            }
        }
        if consumer.assign(&assignment).is_err() {
            return;
        }
        // After `stop`: read on until nothing new arrived for a second
        // (at most ten).
        let mut quiet_since: Option<Instant> = None;
        let mut drain_until: Option<Instant> = None;
        loop {
            if stop.is_cancelled() && drain_until.is_none() {
                drain_until = Some(Instant::now() + Duration::from_secs(10));
            }
            if let Some(until) = drain_until {
                let quiet = quiet_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(1));
                if quiet || Instant::now() >= until {
                    return;
                }
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    quiet_since = None;
                    let counter = match m.topic() {
                        "hvac.telemetry" => &counts.telemetry,
                        "plant.metrics" => &counts.plant_metrics,
                        "plant.online" => &counts.plant_online,
                        _ => &counts.dead_letter,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    quiet_since.get_or_insert_with(Instant::now);
                }
            }
        }
    })
}
