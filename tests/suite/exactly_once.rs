//! Exactly once across crashes, kills and zombies: the real binary against
//! real mosquitto and real Kafka, checked the way Kafka's own exactly-once
//! system test checks: copy a known set of messages while the copier dies,
//! then read the output with `read_committed` and find every message once.
//!
//! Each test publishes messages whose JSON carries a unique `seq`; every
//! publish is acknowledged by mosquitto before the check, so "the set the
//! publisher got acknowledged" is all of them.

use crate::common::process::{tail, BridgeFiles, BridgeProcess};
use crate::common::{
    publish_all, read_committed, unique, ConfigBuilder, Landed, Publish, Rig, Topics,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEVICES: u64 = 20;
/// How long a started bridge may take to connect to mosquitto.
const CONNECT: Duration = Duration::from_secs(30);

/// One bridge identity (MQTT client id = transactional id) with its config
/// files and log, and the topic it writes.
struct Identity {
    files: BridgeFiles,
    bootstrap: String,
    topic: String,
}

impl Identity {
    fn new(rig: &Rig, topics: &Topics, qos: u8) -> Self {
        Self::with_guarantee(rig, topics, qos, "exactly_once")
    }

    fn with_guarantee(rig: &Rig, topics: &Topics, qos: u8, guarantee: &str) -> Self {
        let mapping = format!(
            "routes:\n  - name: eo\n    mqtt: {{ filter: 'eo/{{device}}/data', qos: {qos} }}\n    \
             kafka: {{ topic: hvac.telemetry, key: '{{device}}' }}\n"
        );
        let config = ConfigBuilder::new(rig.broker.port, &rig.bootstrap, topics)
            .client_id(&unique("eo"))
            .mapping_text(&mapping)
            .mqtt("inflight_window", 100)
            .delivery("guarantee", guarantee)
            .delivery("batch_max_messages", 200)
            .delivery("commit_timeout_ms", 5000)
            .delivery("transaction_timeout_ms", 10_000)
            .delivery("shutdown_timeout_ms", 5000);
        Self {
            files: BridgeFiles::new(&config),
            bootstrap: rig.bootstrap.clone(),
            topic: topics.telemetry(),
        }
    }

    fn log(&self) -> PathBuf {
        self.files.log()
    }

    /// Reads `count` records of this identity's topic (and any extra for a
    /// few seconds) off the blocking pool; on failure shows the bridges'
    /// log too.
    async fn read_landed(&self, count: u64) -> Vec<Landed> {
        let (bootstrap, topic) = (self.bootstrap.clone(), self.topic.clone());
        let read = tokio::task::spawn_blocking(move || {
            read_committed(
                &bootstrap,
                &[&topic],
                count as usize,
                Duration::from_secs(120),
                Duration::from_secs(3),
            )
        })
        .await;
        read.unwrap_or_else(|e| panic!("reader: {e:?}\nbridge log:\n{}", tail(&self.log())))
    }

    /// Starts a bridge of this identity and waits until it is connected.
    async fn start(&self, crash_at: Option<&str>) -> BridgeProcess {
        let mut bridge = self.files.start(crash_at);
        bridge.await_connected(CONNECT).await;
        bridge
    }
}

fn messages(range: std::ops::Range<u64>, qos: u8) -> Vec<Publish> {
    range
        .map(|seq| {
            Publish::new(
                format!("eo/dev{}/data", seq % DEVICES),
                format!("{{\"seq\":{seq}}}"),
                qos,
            )
        })
        .collect()
}

/// Every `seq` in `0..count` exactly once and, unless `ordered` is false,
/// per device in publish order.
fn assert_exactly_once(landed: &[Landed], count: u64, ordered: bool, log: &Path) {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
    for record in landed {
        let seq = record.json()["seq"].as_u64().expect("seq");
        *seen.entry(seq).or_default() += 1;
        let key = record.key.clone().expect("key");
        assert_eq!(key, format!("dev{}", seq % DEVICES));
        per_key.entry(key).or_default().push(seq);
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<_> = (0..count).filter(|s| !seen.contains_key(s)).collect();
    assert!(
        duplicated.is_empty() && missing.is_empty() && landed.len() as u64 == count,
        "{} records for {count} messages; duplicated (seq, times): {duplicated:?}; missing: {missing:?}\n{}",
        landed.len(),
        tail(log)
    );
    for (key, seqs) in per_key.iter().filter(|_| ordered) {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {seqs:?}"
        );
    }
}

/// Kills the bridge at `point` while `count` messages flow, restarts it,
/// and checks the output.
async fn crash_and_recover(rig: &Rig, qos: u8, point: &str, count: u64) {
    let (landed, identity) = crash_and_restart(rig, qos, point, count, "exactly_once").await;
    assert_exactly_once(&landed, count, true, &identity.log());
}

/// Runs a bridge until it crashes at `point`, restarts it and returns what
/// landed once all `count` messages did.
async fn crash_and_restart(
    rig: &Rig,
    qos: u8,
    point: &str,
    count: u64,
    guarantee: &str,
) -> (Vec<Landed>, Identity) {
    // Fresh topics per run, so each check sees only its own records.
    let topics = Topics::new();
    rig.kafka.create_test_topics(&topics).await;
    let identity = Identity::with_guarantee(rig, &topics, qos, guarantee);
    let bridge = identity.start(Some(point)).await;
    let port = rig.broker.port;
    let publisher = tokio::spawn(async move { publish_all(port, &messages(0..count, qos)).await });
    let (status, bridge) = bridge.wait_async(Duration::from_secs(60)).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "{point}: the bridge did not reach its crash point:\n{}",
            tail(&identity.log())
        )
    });
    assert!(!status.success(), "{point}: {status}");
    drop(bridge);
    publisher.await.expect("publisher");

    let bridge = identity.start(None).await;
    let landed = identity.read_landed(count).await;
    bridge.stop();
    (landed, identity)
}

/// Control: the same crash between commit and ack with `at_least_once`
/// does produce duplicates, so the exactly-once checks above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_at_least_once_duplicates_after_a_crash_between_commit_and_ack() {
    let rig = Rig::start().await;
    let (landed, identity) =
        crash_and_restart(&rig, 2, "after_commit:3", 1500, "at_least_once").await;
    let (seqs, records) = crate::common::distinct_seqs(&landed);
    assert_eq!(seqs.len(), 1500, "nothing lost");
    assert!(
        records > 1500,
        "expected duplicates without the exactly-once state, got {records} records\n{}",
        tail(&identity.log())
    );
}

/// The protocol's steps at which a crash is interesting, with the hit that
/// crashes: late enough that earlier batches committed and were acked.
const CRASHES: &[(&str, &str)] = &[
    ("after_receive", "after_receive:700"),
    ("after_produce", "after_produce:700"),
    ("before_commit", "before_commit:3"),
    ("during_commit", "during_commit:3"),
    ("after_commit", "after_commit:3"),
    ("after_ack", "after_ack:3"),
];

/// The steps for `qos`: QoS 2 adds the one between PUBREL and PUBCOMP.
fn steps(qos: u8) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    const PUBREL: &[(&str, &str)] = &[("after_pubrel", "after_pubrel:300")];
    CRASHES.iter().chain(if qos == 2 { PUBREL } else { &[] })
}

/// What a matrix does to the bridge at each step.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// [`crash_and_recover`].
    Crash,
    /// [`zombie_at`].
    Zombie,
}

/// `fault` at every step of the protocol for `qos`, one after another on
/// one rig.
async fn fault_matrix(fault: Fault, qos: u8) {
    let rig = Rig::start().await;
    for (name, point) in steps(qos) {
        match fault {
            Fault::Crash => {
                eprintln!("crash point {name}");
                crash_and_recover(&rig, qos, point, 1500).await;
            }
            Fault::Zombie => {
                eprintln!("zombie frozen at {name}");
                zombie_at(&rig, qos, point, 2400).await;
            }
        }
    }
}

/// The broker loses the bridge's session (restarted without persistence,
/// or the session expired) while the exactly-once state still holds a QoS
/// 2 packet id: its PUBREL never comes, and the broker's new session starts
/// numbering its messages from 1 again. The id must be forgotten, or the
/// new message that reuses it is taken for a resend and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_broker_lost_frees_its_packet_ids_for_new_messages() {
    let mut rig = Rig::start().await;
    let topics = Topics::new();
    rig.kafka.create_test_topics(&topics).await;
    let identity = Identity::new(&rig, &topics, 2);
    // Message 0 is committed, PUBREC sent, and the bridge dies on the
    // PUBREL: the state keeps packet id 1 as produced and not released.
    let bridge = identity.start(Some("after_pubrel")).await;
    publish_all(rig.broker.port, &messages(0..1, 2)).await;
    let (status, bridge) = bridge.wait_async(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "the bridge did not die at its PUBREL:\n{}",
        tail(&identity.log())
    );
    drop(bridge);
    // mosquitto runs without persistence: a restart forgets every session.
    rig.broker.restart();

    let bridge = identity.start(None).await;
    // The new session's first message arrives as packet id 1 again.
    publish_all(rig.broker.port, &messages(1..21, 2)).await;
    let landed = identity.read_landed(21).await;
    bridge.stop();
    assert_exactly_once(&landed, 21, true, &identity.log());
    let log = std::fs::read_to_string(identity.log()).unwrap_or_default();
    assert!(
        log.contains("kept no session for the bridge"),
        "the loss was not said:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_crash_matrix_loses_and_duplicates_nothing() {
    fault_matrix(Fault::Crash, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_crash_matrix_loses_and_duplicates_nothing() {
    fault_matrix(Fault::Crash, 1).await;
}

/// SIGKILL at random moments under continuous load, restarting each time.
/// `BRIDGE_TEST_KILLS` sets the number of kills (default 6; the documented
/// long run uses 100).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_under_load_loses_and_duplicates_nothing() {
    let kills: usize = std::env::var("BRIDGE_TEST_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let rig = Rig::start().await;
    let identity = Identity::new(&rig, &rig.topics, 2);
    // Paced: about 2 000 messages a second, QoS 2 and 1 mixed, for as long
    // as the kills take.
    let count = (kills as u64 + 2) * 1500;
    let first = identity.start(None).await;
    let port = rig.broker.port;
    let publisher = tokio::spawn(async move {
        let all: Vec<_> = messages(0..count, 2)
            .into_iter()
            .enumerate()
            .map(|(i, mut m)| {
                m.qos = mixed_qos(i as u64);
                m
            })
            .collect();
        for chunk in all.chunks(200) {
            publish_all(port, chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut bridge = first;
    for kill in 0..kills {
        let alive = Duration::from_millis(fastrand::u64(300..1500));
        tokio::time::sleep(alive).await;
        bridge.kill();
        eprintln!("kill {} after {alive:?}", kill + 1);
        // A new process: its metrics start from nothing, so this waits for
        // this run's connection, not an earlier one's.
        bridge = identity.start(None).await;
    }
    publisher.await.expect("publisher");
    let landed = identity.read_landed(count).await;
    bridge.stop();
    // Not checked for order: MQTT orders messages of one QoS only, and with
    // QoS 1 and 2 mixed, one run saw a QoS 2 message land 60 places late
    // after a kill (exactly once all the same); see docs/delivery.md.
    assert_exactly_once(&landed, count, false, &identity.log());
}

fn mixed_qos(seq: u64) -> u8 {
    if seq % 3 == 0 {
        1
    } else {
        2
    }
}

/// Two bridges with one identity. The first freezes itself at `point`
/// under load (SIGSTOP, as a paused VM or a long GC pause would stop it);
/// a successor takes over the MQTT session and fences the first's
/// producer; then the first is thawed and carries on from where it
/// stopped. It must stop with an error without acknowledging or producing
/// anything more, the successor must run on, and every message must land
/// once.
async fn zombie_at(rig: &Rig, qos: u8, point: &str, count: u64) {
    let topics = Topics::new();
    rig.kafka.create_test_topics(&topics).await;
    let identity = Identity::new(rig, &topics, qos);
    let log = identity.log();
    let mut zombie = identity.start(Some(&format!("{point}:freeze"))).await;
    let port = rig.broker.port;
    let third = count / 3;
    let publisher = tokio::spawn(async move { publish_all(port, &messages(0..third, qos)).await });
    let zombie = tokio::task::spawn_blocking(move || {
        zombie.await_frozen(Duration::from_secs(60));
        zombie
    })
    .await
    .unwrap();
    // Frozen inside a commit, the zombie stays frozen past its commit
    // timeout (5 s), so it thaws into an unknown outcome: the case where
    // re-creating the producer at once would fence the successor.
    let thaw_at = tokio::time::Instant::now()
        + if point.starts_with("before_commit") || point.starts_with("during_commit") {
            Duration::from_secs(6)
        } else {
            Duration::ZERO
        };
    publisher.await.expect("publisher");

    let successor = identity.start(None).await;
    publish_all(port, &messages(third..2 * third, qos)).await;
    tokio::time::sleep_until(thaw_at).await;
    zombie.signal(libc::SIGCONT);
    publish_all(port, &messages(2 * third..count, qos)).await;
    let (status, zombie) = zombie.wait_async(Duration::from_secs(60)).await;
    drop(zombie);
    let landed = identity.read_landed(count).await;
    assert!(
        matches!(status, Some(s) if !s.success()),
        "{point}: the zombie must stop with an error once fenced: {status:?}\n{}",
        tail(&log)
    );
    // Still running, and stops cleanly: the zombie did not fence it.
    successor.stop();
    assert_exactly_once(&landed, count, true, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_zombies_are_fenced_and_duplicate_nothing() {
    fault_matrix(Fault::Zombie, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_zombies_are_fenced_and_duplicate_nothing() {
    fault_matrix(Fault::Zombie, 1).await;
}
