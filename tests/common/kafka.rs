//! Kafka for tests: a real Apache Kafka (KRaft) started from jars, the
//! librdkafka mock cluster, or an external cluster, behind one switch.
//!
//! - default: a real single-node broker, shared by the tests of one test
//!   binary (started on first use, ~3 s), killed when the test process
//!   exits, even by SIGKILL (`PR_SET_PDEATHSIG`).
//! - `BRIDGE_TEST_KAFKA=mock`: librdkafka's mock cluster (fast, not Kafka).
//! - `KAFKA_BOOTSTRAP=host:port`: a cluster of your own.
//!
//! [`KafkaCluster::start`] also runs private clusters (e.g. three brokers)
//! for fault tests; they stop when dropped. See docs/testing.md.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a broker may take to answer after launch (typically 2.5 s, 5 s
/// for three; generous for a loaded CI machine).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// SIGTERM, then this long before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The Kafka a test talks to.
pub enum TestKafka {
    Real(String),
    /// The mock cluster lives in this client (`test.mock.num.brokers`),
    /// which also gives the raw handle for injections rust-rdkafka does not
    /// wrap (see [`TestKafka::delay_next_response`]).
    Mock(BaseProducer),
    External(String),
}

/// The Kafka selected by the environment (see the module docs).
pub fn test_kafka() -> TestKafka {
    if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP") {
        return TestKafka::External(bootstrap);
    }
    if std::env::var("BRIDGE_TEST_KAFKA").as_deref() == Ok("mock") {
        return TestKafka::mock();
    }
    TestKafka::Real(shared_broker().to_string())
}

impl TestKafka {
    /// The real shared broker, whatever the environment says.
    pub fn real() -> Self {
        Self::Real(shared_broker().to_string())
    }

    /// A fresh mock cluster, whatever the environment says.
    pub fn mock() -> Self {
        Self::mock_with_brokers(1)
    }

    /// A fresh mock cluster of `brokers` brokers.
    pub fn mock_with_brokers(brokers: i32) -> Self {
        Self::Mock(
            ClientConfig::new()
                .set("test.mock.num.brokers", brokers.to_string())
                .create()
                .expect("mock cluster"),
        )
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Self::Real(b) | Self::External(b) => b.clone(),
            Self::Mock(_) => self.mock_cluster().bootstrap_servers(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Real(_) => "Apache Kafka (test broker)",
            Self::Mock(_) => "librdkafka mock cluster",
            Self::External(_) => "external Kafka",
        }
    }

    /// The mock cluster, for error injection (`broker_down`, ...).
    ///
    /// # Panics
    /// If this is not the mock cluster: a test that injects errors must
    /// ask for [`TestKafka::mock`].
    pub fn mock_cluster(&self) -> MockCluster<'_, DefaultProducerContext> {
        match self {
            Self::Mock(holder) => holder.client().mock_cluster().expect("mock cluster"),
            _ => panic!("error injection needs TestKafka::mock()"),
        }
    }

    /// Makes mock broker `broker` answer its next `api` request late, by
    /// `rtt`, having carried it out at once: a commit that lands while its
    /// caller times out. (librdkafka's
    /// `rd_kafka_mock_broker_push_request_error_rtts`, as its own
    /// `0105-transactions_mock.c` uses it.)
    pub fn delay_next_response(&self, broker: i32, api: RDKafkaApiKey, rtt: Duration) {
        self.answer_next(broker, api, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR, rtt);
    }

    /// Makes mock broker `broker` answer its next `api` request with
    /// `error`, after `rtt`.
    pub fn answer_next(
        &self,
        broker: i32,
        api: RDKafkaApiKey,
        error: RDKafkaRespErr,
        rtt: Duration,
    ) {
        let Self::Mock(holder) = self else {
            panic!("error injection needs TestKafka::mock()");
        };
        let rtt_ms = i32::try_from(rtt.as_millis()).expect("rtt in ms fits an int");
        // SAFETY: the handle belongs to `holder`, alive for this call; the
        // variadic part is one (error code, rtt in ms) pair of C ints.
        let err = unsafe {
            let cluster =
                rdkafka::bindings::rd_kafka_handle_mock_cluster(holder.client().native_ptr());
            assert!(!cluster.is_null(), "the holder has a mock cluster");
            rdkafka::bindings::rd_kafka_mock_broker_push_request_error_rtts(
                cluster,
                broker,
                api as i16,
                1,
                error as i32,
                rtt_ms,
            )
        };
        assert_eq!(err, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR, "push rtt");
    }

    /// Creates one test's topics, three partitions each.
    pub async fn create_test_topics(&self, topics: &super::Topics) {
        let names = topics.all();
        self.create_topics(&names.iter().map(String::as_str).collect::<Vec<_>>(), 3)
            .await;
        // The mock does not answer CreateTopics, so the bridge cannot create
        // its state topic there; on real Kafka it does (and that is tested).
        if let Self::Mock(_) = self {
            let _ = self.mock_cluster().create_topic(STATE_TOPIC, 1, 1);
        }
    }

    /// Creates topics (test topics are never auto-created).
    pub async fn create_topics(&self, topics: &[&str], partitions: i32) {
        match self {
            Self::Mock(_) => {
                let m = self.mock_cluster();
                for t in topics {
                    m.create_topic(t, partitions, 1).expect("create mock topic");
                }
            }
            Self::Real(b) => create_topics(b, topics, partitions, 1).await,
            Self::External(b) => create_topics(b, topics, partitions, -1).await,
        }
    }
}

/// The bridge's default exactly-once state topic.
pub const STATE_TOPIC: &str = "mqtt-bridge.state";

/// `replication` -1 means the cluster's default.
pub async fn create_topics(bootstrap: &str, topics: &[&str], partitions: i32, replication: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let new: Vec<_> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin
        .create_topics(&new, &options)
        .await
        .expect("create topics")
    {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("cannot create topic {topic}: {code}"),
        }
    }
    await_topics(bootstrap, topics);
}

/// Creates `topic` (one partition) refusing records over
/// `max_message_bytes` (its own `max.message.bytes`), for refusals only a
/// real broker makes.
pub async fn create_topic_with_max_bytes(bootstrap: &str, topic: &str, max_message_bytes: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let max = max_message_bytes.to_string();
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("max.message.bytes", &max);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&[new], &options).await.expect("create") {
        result.expect("topic created");
    }
    await_topics(bootstrap, &[topic]);
}

/// Waits until the broker's metadata shows every topic with a leader for
/// every partition. Creation returns before that; a producer that asks in
/// between takes the topic for missing and holds its records for up to
/// `topic.metadata.propagation.max.ms` (30 s), which once stalled a test's
/// first commit past its deadline.
pub fn await_topics(bootstrap: &str, topics: &[&str]) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("metadata client");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for topic in topics {
        loop {
            let ready = client
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .is_ok_and(|m| mqtt_kafka_bridge::kafka::ready_partitions(&m).is_some());
            if ready {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "topic {topic} has no leader 30 s after creation"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The SCRAM-SHA-512 user of the shared broker's SASL_SSL listener.
pub const SCRAM_USER: &str = "bridge";
pub const SCRAM_PASSWORD: &str = "s3cret-scram-password";

/// The shared broker's SASL_SSL listener: where, and the CA that signed
/// its certificate.
#[derive(Debug, Clone)]
pub struct SecureListener {
    pub bootstrap: String,
    pub ca_file: PathBuf,
}

struct Shared {
    bootstrap: String,
    secure: SecureListener,
}

/// The single-node broker shared by the tests of this process. Besides its
/// plain listener it has a SASL_SSL one (SCRAM, a private CA) for the
/// security tests: one JVM for all, not a second broker for a few tests.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        // The broker's parent-death signal follows the thread that spawned
        // it, so that thread lives as long as the process.
        std::thread::Builder::new()
            .name("shared-kafka".into())
            .spawn(move || {
                // Named like the brokers' own dirs, so a later run removes
                // it once this process is gone (`remove_stale_dirs`).
                let dir = std::env::temp_dir().join(format!("mkb-kafka-{}-ca", std::process::id()));
                let ca = super::certs::TestCa::new_in("kafka", &dir);
                let server = ca.server("broker", &["localhost", "127.0.0.1"]);
                let keystore = dir.join("broker-keystore.pem");
                std::fs::write(&keystore, format!("{}{}", server.key_pem, server.cert_pem))
                    .expect("write the broker's keystore");
                let cluster = KafkaCluster::start_with(
                    1,
                    Some(&SaslSsl {
                        keystore,
                        users: vec![(SCRAM_USER.into(), SCRAM_PASSWORD.into())],
                    }),
                );
                let shared = Shared {
                    bootstrap: cluster.bootstrap.clone(),
                    secure: SecureListener {
                        bootstrap: cluster.secure_bootstrap.clone().expect("SASL_SSL"),
                        ca_file: ca.ca_file.clone(),
                    },
                };
                tx.send(shared).expect("report the broker");
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn shared-kafka thread");
        rx.recv().expect("shared Kafka broker started")
    })
}

fn shared_broker() -> &'static str {
    &shared().bootstrap
}

/// The shared broker's SASL_SSL listener (the broker starts on first use).
pub fn shared_secure() -> &'static SecureListener {
    &shared().secure
}

/// The broker jars, fetched once into a cache outside the tree.
fn libs() -> &'static Path {
    static LIBS: OnceLock<PathBuf> = OnceLock::new();
    LIBS.get_or_init(|| {
        let script = super::repo_path("tests/kafka/fetch.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run tests/kafka/fetch.sh");
        assert!(
            out.status.success(),
            "tests/kafka/fetch.sh failed (needs java 17+ and, once, mvn):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// A SASL_SSL listener (SCRAM-SHA-512 over TLS) beside the plain one, as
/// a secured production cluster has.
#[derive(Debug, Clone)]
pub struct SaslSsl {
    /// PEM: the broker's private key (unencrypted PKCS#8) followed by its
    /// certificate chain, Kafka's `ssl.keystore.type=PEM` keystore.
    pub keystore: PathBuf,
    /// SCRAM-SHA-512 users (name, password), created at format time.
    pub users: Vec<(String, String)>,
}

struct Node {
    id: u32,
    port: u16,
    /// The SASL_SSL listener's port, with [`SaslSsl`].
    secure_port: Option<u16>,
    controller_port: u16,
    properties: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A KRaft cluster of combined broker+controller nodes on loopback ports.
pub struct KafkaCluster {
    nodes: Vec<Node>,
    /// The plain listeners: for the tests' own clients.
    pub bootstrap: String,
    /// The SASL_SSL listeners, with [`KafkaCluster::start_secure`].
    pub secure_bootstrap: Option<String>,
    dir: PathBuf,
}

impl KafkaCluster {
    /// Formats and starts `count` nodes and waits until all answer.
    pub fn start(count: u32) -> Self {
        Self::start_with(count, None)
    }

    fn start_with(count: u32, secure: Option<&SaslSsl>) -> Self {
        super::process::remove_stale_dirs("mkb-kafka-");
        let dir = std::env::temp_dir().join(format!(
            "mkb-kafka-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("kafka dir");
        let ports: Vec<(u16, u16)> = (0..count)
            .map(|_| (super::ports::free_port(), super::ports::free_port()))
            .collect();
        let secure_ports: Vec<Option<u16>> = (0..count)
            .map(|_| secure.map(|_| super::ports::free_port()))
            .collect();
        let voters: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect();
        let cluster_id = cluster_id();
        let mut nodes = Vec::new();
        for (i, (port, controller_port)) in ports.iter().enumerate() {
            let id = i as u32 + 1;
            let node_dir = dir.join(format!("node{id}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let properties = node_dir.join("server.properties");
            let mut text = server_properties(
                id,
                *port,
                *controller_port,
                &voters.join(","),
                &node_dir,
                count,
            );
            if let (Some(secure), Some(secure_port)) = (secure, secure_ports[i]) {
                text = with_sasl_ssl(&text, *port, secure_port, secure);
            }
            std::fs::write(&properties, text).unwrap();
            nodes.push(Node {
                id,
                port: *port,
                secure_port: secure_ports[i],
                controller_port: *controller_port,
                properties,
                log: node_dir.join("server.log"),
                child: None,
            });
        }
        let formats: Vec<_> = nodes
            .iter()
            .map(|n| {
                java()
                    // `=` form: an id may start with `-`, which the tool's
                    // argument parser would otherwise take for an option.
                    .args([
                        "kafka.tools.StorageTool",
                        "format",
                        &format!("--cluster-id={cluster_id}"),
                        "-c",
                    ])
                    .arg(&n.properties)
                    .args(
                        secure
                            .iter()
                            .flat_map(|s| &s.users)
                            .flat_map(|(name, password)| {
                                [
                                    "--add-scram".to_string(),
                                    format!("SCRAM-SHA-512=[name={name},password={password}]"),
                                ]
                            }),
                    )
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start StorageTool (is java 17+ installed?)")
            })
            .collect();
        for f in formats {
            let out = f.wait_with_output().expect("StorageTool");
            assert!(
                out.status.success(),
                "format failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let bootstrap = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        let secure_bootstrap = secure.map(|_| {
            nodes
                .iter()
                .filter_map(|n| n.secure_port)
                .map(|p| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        });
        let mut cluster = Self {
            nodes,
            bootstrap,
            secure_bootstrap,
            dir,
        };
        for id in 1..=count {
            cluster.launch(id);
        }
        cluster.wait_ready(count as usize);
        cluster
    }

    fn launch(&mut self, id: u32) {
        let node = &mut self.nodes[id as usize - 1];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let mut command = java();
        command
            .arg("kafka.Kafka")
            .arg(&node.properties)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        super::die_with_parent(&mut command);
        node.child = Some(command.spawn().expect("start kafka.Kafka"));
    }

    /// Waits until `expected` brokers are in the cluster metadata.
    fn wait_ready(&self, expected: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("log_level", "0")
            .create()
            .expect("metadata client");
        loop {
            if let Ok(metadata) = consumer.fetch_metadata(None, Duration::from_secs(2)) {
                if metadata.brokers().len() >= expected {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "Kafka did not start within {START_TIMEOUT:?}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ids of the running nodes.
    pub fn node_ids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// The node serving `127.0.0.1:port`.
    pub fn node_with_port(&self, port: u16) -> Option<u32> {
        self.nodes.iter().find(|n| n.port == port).map(|n| n.id)
    }

    /// kill -9: the node dies without a controlled shutdown.
    pub fn kill(&mut self, id: u32) {
        if let Some(mut child) = self.nodes[id as usize - 1].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the node stops answering without closing a connection, as
    /// in a long GC pause or a stalled VM.
    pub fn pause(&self, id: u32) {
        self.signal(id, libc::SIGSTOP);
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self, id: u32) {
        self.signal(id, libc::SIGCONT);
    }

    fn signal(&self, id: u32, signal: i32) {
        if let Some(child) = &self.nodes[id as usize - 1].child {
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Starts a stopped node again on its old data and ports.
    pub fn restart(&mut self, id: u32) {
        self.kill(id);
        self.launch(id);
        let node = &self.nodes[id as usize - 1];
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", node.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "node {id} did not restart:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<_> = text
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!(
                    "--- node {} (port {}, controller {}) ---\n{}",
                    n.id,
                    n.port,
                    n.controller_port,
                    tail.join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for KafkaCluster {
    /// All nodes are signalled together: stopping them one at a time makes
    /// the last one wait minutes for a quorum that is gone.
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Some(child) = &node.child {
                // SIGCONT first: a paused node would not act on SIGTERM.
                unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn java() -> Command {
    let mut command = Command::new("java");
    command
        .args([
            "-Xms64m",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
        ])
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            super::repo_path("tests/kafka/log4j2.yaml").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", libs().display()));
    command
}

/// What `StorageTool random-uuid` prints, without a JVM start.
fn cluster_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..22)
        .map(|_| ALPHABET[fastrand::usize(..64)] as char)
        .collect()
}

/// Broker settings for tests: small, fast to start, internal topics sized
/// for the cluster, topic auto-creation off so tests create what they use.
///
/// Retention off: test records carry payload timestamps from 2023
/// (`ts`), and time-based retention (7 days, checked every 5 minutes)
/// deleted the first segments of a run older than that, which read as
/// lost messages ("offset out of range" at offset 0, then fewer records).
fn server_properties(
    id: u32,
    port: u16,
    controller_port: u16,
    voters: &str,
    dir: &Path,
    count: u32,
) -> String {
    let rf = count.min(3);
    let isr = if count >= 3 { 2 } else { 1 };
    format!(
        "process.roles=broker,controller\nnode.id={id}\ncontroller.quorum.voters={voters}\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port}\ncontroller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\nlistener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
         log.dirs={}\nnum.partitions=1\ndefault.replication.factor={rf}\nmin.insync.replicas={isr}\n\
         auto.create.topics.enable=false\n\
         log.retention.ms=-1\n\
         offsets.topic.replication.factor={rf}\noffsets.topic.num.partitions=1\n\
         transaction.state.log.replication.factor={rf}\ntransaction.state.log.min.isr={isr}\ntransaction.state.log.num.partitions=1\n\
         share.coordinator.state.topic.replication.factor={rf}\nshare.coordinator.state.topic.min.isr={isr}\n\
         group.initial.rebalance.delay.ms=0\nlog.cleaner.dedupe.buffer.size=2097152\n\
         num.network.threads=2\nnum.io.threads=2\nbackground.threads=2\nnum.recovery.threads.per.data.dir=1\n\
         broker.heartbeat.interval.ms=500\nbroker.session.timeout.ms=2000\n",
        dir.join("data").display()
    )
}

/// `properties` with a SASL_SSL listener on `secure_port` added; brokers
/// and controllers keep talking over the plain listeners.
fn with_sasl_ssl(properties: &str, port: u16, secure_port: u16, secure: &SaslSsl) -> String {
    let mut out = String::new();
    for line in properties.lines() {
        let line = if line.starts_with("listeners=") {
            format!("{line},SASL_SSL://127.0.0.1:{secure_port}")
        } else if line.starts_with("advertised.listeners=") {
            format!("advertised.listeners=PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{secure_port}")
        } else if line.starts_with("listener.security.protocol.map=") {
            format!("{line},SASL_SSL:SASL_SSL")
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!(
        "sasl.enabled.mechanisms=SCRAM-SHA-512\n\
         listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
         listener.name.sasl_ssl.ssl.keystore.type=PEM\n\
         listener.name.sasl_ssl.ssl.keystore.location={}\n",
        secure.keystore.display()
    ));
    out
}

/// The bridge's own transactional producer on `bootstrap`, for tests of
/// the sink alone (`transactional_id` unique per test), with a 60 s
/// commit timeout.
pub async fn test_sink(
    bootstrap: &str,
    transactional_id: &str,
) -> mqtt_kafka_bridge::kafka::TransactionalSink {
    test_sink_with(bootstrap, transactional_id, Duration::from_secs(60))
        .await
        .expect("transactional producer")
}

/// [`test_sink`] with its commit (and `init_transactions`) timeout.
pub async fn test_sink_with(
    bootstrap: &str,
    transactional_id: &str,
    commit_timeout: Duration,
) -> Result<mqtt_kafka_bridge::kafka::TransactionalSink, mqtt_kafka_bridge::kafka::SinkError> {
    let config = mqtt_kafka_bridge::kafka::KafkaConfig {
        bootstrap_servers: bootstrap.into(),
        transactional_id: transactional_id.into(),
        dead_letter_topic: "dead-letter".into(),
        command_group: None,
        properties: Default::default(),
    };
    let timeout = Duration::from_secs(60);
    let health = std::sync::Arc::new(mqtt_kafka_bridge::telemetry::Health::new(timeout));
    mqtt_kafka_bridge::kafka::TransactionalSink::connect(&config, timeout, commit_timeout, health)
        .await
}

/// A small record for `topic`, stamped now.
pub fn test_record(topic: &str) -> mqtt_kafka_bridge::kafka::Record {
    mqtt_kafka_bridge::kafka::Record {
        topic: topic.into(),
        key: None,
        value: bytes::Bytes::from_static(b"{}"),
        headers: vec![],
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
    }
}
