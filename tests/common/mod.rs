//! Shared test support: real mosquitto, Kafka, MQTT publishing, Kafka reading.
#![allow(dead_code)]

pub mod kafka;
pub mod mosquitto;
pub mod process;

use mqtt_kafka_bridge::config::{BridgeConfig, Config, MappingSource};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::HashMap;
use std::path::PathBuf;

use std::time::{Duration, Instant};

/// Ends a child process when the test process dies, even by SIGKILL, so no
/// broker outlives its test.
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A unique name per call, so tests sharing a cluster never see each
/// other's records or sessions.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Topic names of one test, so tests sharing a Kafka never see each
/// other's records.
#[derive(Clone, Debug)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn new() -> Self {
        Self {
            prefix: format!("{}.", unique("t")),
        }
    }
    pub fn telemetry(&self) -> String {
        format!("{}hvac.telemetry", self.prefix)
    }
    pub fn diagnostics(&self) -> String {
        format!("{}hvac.diagnostics", self.prefix)
    }
    pub fn dead_letter(&self) -> String {
        format!("{}dead-letter", self.prefix)
    }
    pub fn commands(&self) -> String {
        format!("{}hvac.commands", self.prefix)
    }
    pub fn all(&self) -> Vec<String> {
        vec![
            self.telemetry(),
            self.diagnostics(),
            self.dead_letter(),
            self.commands(),
        ]
    }
}

/// A bridge config for the given broker and Kafka running
/// `mappings/hvac.yaml`, its Kafka topics renamed into `topics`.
/// `extra_mqtt` is YAML added to the `mqtt` section.
pub fn bridge_config(
    mqtt_port: u16,
    bootstrap: &str,
    client_id: &str,
    extra_mqtt: &str,
    topics: &Topics,
) -> Config {
    let hvac = std::fs::read_to_string(repo_path("mappings/hvac.yaml")).expect("read hvac.yaml");
    bridge_config_with_mapping(mqtt_port, bootstrap, client_id, extra_mqtt, topics, &hvac)
}

/// [`bridge_config`] with the mapping text given, parsed as if it were
/// `mappings/hvac.yaml` so that schema paths resolve.
pub fn bridge_config_with_mapping(
    mqtt_port: u16,
    bootstrap: &str,
    client_id: &str,
    extra_mqtt: &str,
    topics: &Topics,
    mapping: &str,
) -> Config {
    let text = format!(
        "mqtt:\n  host: 127.0.0.1\n  port: {mqtt_port}\n  client_id: {client_id}\n  keep_alive_s: 5\n  reconnect_delay_ms: 100\n{extra_mqtt}\
         kafka:\n  bootstrap_servers: '{bootstrap}'\n  transactional_id: {client_id}\n  dead_letter_topic: {dlq}\n\
         delivery:\n  batch_max_messages: 500\n  commit_interval_ms: 50\n  shutdown_timeout_ms: 3000\n\
         mappings: [unused]\n",
        dlq = topics.dead_letter()
    );
    let bridge: BridgeConfig = serde_yaml_ng::from_str(&text).expect("test bridge config");
    let path = repo_path("mappings/hvac.yaml");
    let mapping = mapping.replace("topic: hvac.", &format!("topic: {}hvac.", topics.prefix));
    Config {
        bridge,
        path: repo_path("tests/bridge.yaml"),
        // Parsed under its real path, so schema references resolve.
        mappings: vec![MappingSource::parse(&path, &mapping).expect("mapping parses")],
    }
}

/// One message to publish.
#[derive(Clone, Debug)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub user_properties: Vec<(String, String)>,
}

impl Publish {
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>, qos: u8) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            user_properties: Vec::new(),
        }
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Publishes everything and waits until the broker acknowledged every
/// QoS 1/2 message (QoS 0: until written to the socket).
pub async fn publish_all(port: u16, messages: &[Publish]) {
    let mut options = MqttOptions::new(unique("publisher"), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(Some(1 << 24));
    let (client, mut events) = AsyncClient::new(options, messages.len() + 16);
    let expected_acks = messages.iter().filter(|m| m.qos > 0).count();
    let expected_zero = messages.len() - expected_acks;
    let feeder = {
        let client = client.clone();
        let messages = messages.to_vec();
        tokio::spawn(async move {
            for m in messages {
                let props = PublishProperties {
                    user_properties: m.user_properties.clone(),
                    ..Default::default()
                };
                client
                    .publish_with_properties(m.topic, qos(m.qos), false, m.payload, props)
                    .await
                    .expect("queue publish");
            }
        })
    };
    let (mut acks, mut zero_sent) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acks < expected_acks || zero_sent < expected_zero {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("publisher timed out waiting for acks")
            .expect("publisher connection");
        match event {
            Event::Incoming(Packet::PubAck(_)) | Event::Incoming(Packet::PubComp(_)) => acks += 1,
            Event::Outgoing(rumqttc::Outgoing::Publish(0)) => zero_sent += 1,
            _ => {}
        }
    }
    feeder.await.unwrap();
    client.disconnect().await.ok();
    // Drive the loop until DISCONNECT is written, bounded.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                _ => {}
            }
        }
    })
    .await;
}

/// An HVAC telemetry payload valid for `mappings/hvac.yaml`, carrying
/// `seq` so tests can count what landed.
pub fn telemetry(unit: u32, seq: u32) -> String {
    serde_json::json!({
        "ts": 1_700_000_000_000u64 + u64::from(seq),
        "ambient_c": 21.5, "target_c": 22.0, "humidity_pct": 40.0,
        "air_quality_ppm": 600, "blower_pct": 55, "load_pct": 48.0,
        "energy_kwh": 1000.0 + f64::from(seq), "seq": seq, "unit_no": unit
    })
    .to_string()
}

/// `count` telemetry messages spread over `units` units of one site.
pub fn telemetry_messages(site: &str, count: u32, units: u32, qos: u8) -> Vec<Publish> {
    (0..count)
        .map(|seq| {
            let unit = seq % units;
            Publish::new(
                format!("site/{site}/hvac/u{unit}/telemetry"),
                telemetry(unit, seq),
                qos,
            )
        })
        .collect()
}

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
            let m = result.expect("consume");
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

/// A mosquitto and a Kafka with one test's topics created.
pub struct Rig {
    pub broker: mosquitto::Mosquitto,
    pub topics: Topics,
    pub kafka: kafka::TestKafka,
    pub bootstrap: String,
}

impl Rig {
    /// With the Kafka the environment selects (see `kafka::test_kafka`).
    pub async fn start() -> Self {
        Self::start_with(kafka::test_kafka()).await
    }

    /// With the given Kafka, e.g. `TestKafka::mock()` for error injection.
    pub async fn start_with(kafka: kafka::TestKafka) -> Self {
        let broker = mosquitto::Mosquitto::start();
        let topics = Topics::new();
        kafka.create_test_topics(&topics).await;
        let bootstrap = kafka.bootstrap();
        Self {
            broker,
            topics,
            kafka,
            bootstrap,
        }
    }
}

/// The bridge running in-process, subscribed and ready.
pub struct Bridge {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), mqtt_kafka_bridge::app::AppError>>,
}

impl Bridge {
    /// Starts the bridge and waits until its subscriptions are in place.
    pub async fn start(config: Config) -> Self {
        // The bridge's log goes to the test's captured output, which the
        // harness shows only for a failing test; BRIDGE_TEST_LOG=debug for
        // more.
        let filter = std::env::var("BRIDGE_TEST_LOG")
            .unwrap_or_else(|_| "warn,mqtt_kafka_bridge=info".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let ready = tokio_util::sync::CancellationToken::new();
        let mut task = tokio::spawn(mqtt_kafka_bridge::app::run_with_readiness(
            config,
            shutdown.clone(),
            ready.clone(),
        ));
        tokio::select! {
            _ = await_token(&ready, "bridge subscribed", Duration::from_secs(30)) => {}
            stopped = &mut task => panic!("the bridge stopped before it was ready: {stopped:?}"),
        }
        Self { shutdown, task }
    }

    /// Whether the bridge has stopped on its own.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub async fn stop(self) {
        self.stop_result().await.expect("bridge exits cleanly");
    }

    pub async fn stop_result(self) -> Result<(), mqtt_kafka_bridge::app::AppError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("bridge stops within 20 s")
            .expect("bridge task")
    }
}

/// Waits for `token` with a deadline, naming what was awaited on failure.
pub async fn await_token(
    token: &tokio_util::sync::CancellationToken,
    what: &str,
    timeout: Duration,
) {
    tokio::time::timeout(timeout, token.cancelled())
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {timeout:?}"));
}
