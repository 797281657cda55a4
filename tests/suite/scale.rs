//! Several bridges on one topic tree, on real mosquitto and real Kafka:
//! a share group splits the messages (exactly once per bridge, so for the
//! group); partitioned bridges each keep the keys they own (exactly once,
//! and per-key order kept); a standby takes over from a killed or frozen
//! active of its identity. Bridges are killed with SIGKILL (and restarted)
//! under QoS 2 load throughout.

use crate::common::*;
use mqtt_kafka_bridge::telemetry::{OTHER_INSTANCE, PRODUCED, RECEIVED, STANDBY};
use std::collections::HashMap;
use std::time::Duration;

const CONNECT: Duration = Duration::from_secs(30);
const DEVICES: u64 = 30;

/// One bridge of a group: its own identity (client id = transactional
/// id), the test's topics.
fn member(rig: &Rig) -> ConfigBuilder {
    let mapping = "routes:\n  - name: eo\n    mqtt: { filter: 'eo/{device}/data', qos: 2 }\n    \
                   kafka: { topic: hvac.telemetry, key: '{device}' }\n";
    ConfigBuilder::new(rig.broker.port, &rig.bootstrap, &rig.topics)
        .client_id(&unique("member"))
        .mapping_text(mapping)
        .mqtt("inflight_window", 100)
        .delivery("batch_max_messages", 200)
        .delivery("commit_timeout_ms", 5000)
        .delivery("transaction_timeout_ms", 10_000)
        .delivery("shutdown_timeout_ms", 5000)
}

fn messages(count: u64) -> Vec<Publish> {
    (0..count)
        .map(|seq| {
            Publish::new(
                format!("eo/dev{}/data", seq % DEVICES),
                format!("{{\"seq\":{seq}}}"),
                2,
            )
        })
        .collect()
}

/// Publishes `count` QoS 2 messages paced (about 2 000 a second) while
/// member 0 is killed with SIGKILL and restarted `kills` times; returns
/// the bridges running at the end.
async fn under_load_with_kills(
    rig: &Rig,
    files: &[BridgeFiles],
    count: u64,
    kills: usize,
) -> Vec<BridgeProcess> {
    let mut bridges = Vec::new();
    for f in files {
        let mut bridge = f.start(None);
        bridge.await_connected(CONNECT).await;
        bridges.push(bridge);
    }
    let publisher = paced_publisher(rig, count);
    for kill in 0..kills {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(400..1200))).await;
        bridges.remove(0).kill();
        eprintln!("kill {} of member 0", kill + 1);
        let mut restarted = files[0].start(None);
        restarted.await_connected(CONNECT).await;
        bridges.insert(0, restarted);
    }
    publisher.await.expect("publisher");
    bridges
}

/// Every seq of `0..count` exactly once; with `ordered`, each device's in
/// publish order.
fn assert_exactly_once(landed: &[Landed], count: u64, ordered: bool, logs: &[&BridgeFiles]) {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
    for record in landed {
        let seq = record.json()["seq"].as_u64().expect("seq");
        *seen.entry(seq).or_default() += 1;
        per_key
            .entry(record.key.clone().expect("key"))
            .or_default()
            .push(seq);
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<_> = (0..count).filter(|s| !seen.contains_key(s)).collect();
    let tails: String = logs
        .iter()
        .map(|f| format!("--- {}\n{}", f.log().display(), process::tail(&f.log())))
        .collect();
    assert!(
        duplicated.is_empty() && missing.is_empty() && landed.len() as u64 == count,
        "{} records for {count} messages; duplicated (seq, times): {duplicated:?}; missing: {missing:?}\n{tails}",
        landed.len(),
    );
    for (key, seqs) in per_key.iter().filter(|_| ordered) {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {seqs:?}"
        );
    }
}

async fn read_landed(rig: &Rig, count: u64) -> Vec<Landed> {
    let (bootstrap, topic) = (rig.bootstrap.clone(), rig.topics.telemetry());
    tokio::task::spawn_blocking(move || {
        read_committed(
            &bootstrap,
            &[&topic],
            count as usize,
            Duration::from_secs(120),
            Duration::from_secs(3),
        )
    })
    .await
    .expect("reader")
}

/// Three members under QoS 2 load, member 0 killed and restarted twice:
/// what landed (checked exactly once, and in order per device if
/// `ordered`), once every member's `metric` shows it did its part.
async fn three_members_through_kills(
    rig: &Rig,
    files: &[BridgeFiles],
    metric: (&str, &[(&str, &str)]),
    ordered: bool,
) {
    let count = 6000;
    let mut bridges = under_load_with_kills(rig, files, count, 2).await;
    let landed = read_landed(rig, count).await;
    for bridge in &mut bridges {
        bridge
            .await_metric(metric.0, metric.1, |n| n > 0.0, CONNECT)
            .await;
    }
    for bridge in bridges {
        bridge.stop();
    }
    assert_exactly_once(&landed, count, ordered, &files.iter().collect::<Vec<_>>());
}

/// Three bridges in one share group under QoS 2 load, one killed and
/// restarted twice: every message lands exactly once, and every bridge
/// took a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_group_splits_the_load_exactly_once_through_kills() {
    let rig = Rig::start().await;
    let group = unique("group");
    let files: Vec<BridgeFiles> = (0..3)
        .map(|_| BridgeFiles::new(&member(&rig).mqtt("share_group", group.as_str())))
        .collect();
    three_members_through_kills(&rig, &files, (RECEIVED, &[("route", "eo")]), false).await;
}

/// Three partitioned bridges, each keeping the devices it owns, one killed
/// and restarted twice under QoS 2 load: every message lands exactly once,
/// each device's in publish order, and each bridge left the others' keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_bridges_keep_per_key_order_exactly_once_through_kills() {
    let rig = Rig::start().await;
    let files: Vec<BridgeFiles> = (0..3)
        .map(|slot| BridgeFiles::new(&member(&rig).partition(3, slot)))
        .collect();
    three_members_through_kills(&rig, &files, (OTHER_INSTANCE, &[]), true).await;
}

/// What mosquitto 2 does with a share group's messages while one member is
/// away (killed, its persistent session kept): measured here, and what
/// docs/scaling.md states. The bridge's promise (exactly once) must hold
/// either way; this pins down which way it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_queues_a_departed_members_share_for_its_return() {
    let rig = Rig::start().await;
    let group = unique("group");
    let files: Vec<BridgeFiles> = (0..3)
        .map(|_| BridgeFiles::new(&member(&rig).mqtt("share_group", group.as_str())))
        .collect();
    let mut bridges = Vec::new();
    for f in &files {
        let mut bridge = f.start(None);
        bridge.await_connected(CONNECT).await;
        bridges.push(bridge);
    }
    bridges.remove(0).kill();
    let count = 300;
    publish_all(rig.broker.port, &messages(count)).await;
    let landed_while_away = read_committed_until_quiet(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        count as usize,
        Duration::from_secs(8),
    )
    .len();
    let mut returned = files[0].start(None);
    returned.await_connected(CONNECT).await;
    let landed = read_landed(&rig, count).await;
    // A read, not a wait: the count is checked below.
    let received_on_return = returned
        .await_metric(RECEIVED, &[("route", "eo")], |_| true, CONNECT)
        .await;
    eprintln!(
        "while member 0 was away {landed_while_away} of {count} landed; on its return it received {received_on_return}"
    );
    returned.stop();
    for bridge in bridges {
        bridge.stop();
    }
    assert_exactly_once(&landed, count, false, &files.iter().collect::<Vec<_>>());
    // Measured with mosquitto 2.0: round robin over the group's sessions,
    // the departed one's included (200 landed, 100 waited for it). A
    // broker that redistributed instead would land all 300 while away.
    assert!(
        landed_while_away < count as usize,
        "mosquitto now redistributes a departed member's share: update docs/scaling.md"
    );
    assert_eq!(
        landed_while_away as u64 + received_on_return as u64,
        count,
        "the rest came to the returning member"
    );
}

/// Two bridges of one identity in standby mode (`ha.mode: standby`): the
/// first to take the lease runs, the other waits; the lease is a Kafka
/// consumer group on a one-partition topic of the test's own.
fn standby_pair(rig: &Rig) -> BridgeFiles {
    let lease = rig.topics.named("lease");
    let config = member(rig)
        .set_section("ha", "mode", "standby")
        .set_section("ha", "lease_topic", lease.as_str())
        .set_section("ha", "session_timeout_ms", 6000);
    BridgeFiles::new(&config)
}

/// Starts the active (`bridge-0`, which takes the lease) and the standby
/// (`bridge-1`, which waits for it).
async fn start_pair(files: &BridgeFiles) -> (BridgeProcess, BridgeProcess) {
    let mut active = files.start_as("bridge-0");
    active.await_connected(CONNECT).await;
    let mut standby = files.start_as("bridge-1");
    standby
        .await_metric(STANDBY, &[], |n| n == 1.0, CONNECT)
        .await;
    (active, standby)
}

/// Messages of the standby tests.
const COUNT: u64 = 4000;

/// A standby pair started, and `count` messages being published to it
/// for 0.8 s already: the moment to strike the active.
async fn standby_under_load(
    count: u64,
) -> (
    Rig,
    BridgeFiles,
    BridgeProcess,
    BridgeProcess,
    tokio::task::JoinHandle<()>,
) {
    let rig = Rig::start().await;
    let files = standby_pair(&rig);
    let (active, standby) = start_pair(&files).await;
    let publisher = paced_publisher(&rig, count);
    tokio::time::sleep(Duration::from_millis(800)).await;
    (rig, files, active, standby, publisher)
}

/// Until `standby` has committed its first record: it holds the lease.
async fn first_record_from(standby: &mut BridgeProcess) {
    standby
        .await_metric(
            PRODUCED,
            &[("route", "eo")],
            |n| n > 0.0,
            Duration::from_secs(60),
        )
        .await;
}

/// Publishes `count` QoS 2 messages paced (about 2 000 a second).
fn paced_publisher(rig: &Rig, count: u64) -> tokio::task::JoinHandle<()> {
    let port = rig.broker.port;
    tokio::spawn(async move {
        for chunk in messages(count).chunks(200) {
            publish_all(port, chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The active is killed with SIGKILL under QoS 2 load; the standby takes
/// the lease, fences the dead one's transaction, takes the MQTT session
/// over and goes on: every message exactly once, in order per device. The
/// time from the kill to the standby's first committed record is the
/// failover time docs/scaling.md reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_from_a_killed_active_exactly_once() {
    let (rig, files, active, mut standby, publisher) = standby_under_load(COUNT).await;
    let killed = std::time::Instant::now();
    active.kill();
    first_record_from(&mut standby).await;
    let failover = killed.elapsed();
    eprintln!(
        "failover: SIGKILL of the active to the standby's first committed record: {failover:?}"
    );
    publisher.await.expect("publisher");
    let landed = read_landed(&rig, COUNT).await;
    standby.stop();
    assert_exactly_once(&landed, COUNT, true, &[&files]);
    // The goal: under 15 s with the default settings (6 s session
    // timeout); 5.5-7.1 s measured on the 2-core machine.
    assert!(
        failover < Duration::from_secs(15),
        "failover took {failover:?}"
    );
}

/// The active freezes (SIGSTOP, as a long GC pause or a paused VM would
/// stop it) under load; the standby takes over; the old active, thawed,
/// has lost the lease and its producer is fenced: it stops by itself,
/// producing nothing more. Every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_active_thawed_after_the_takeover_stops_and_duplicates_nothing() {
    let (rig, files, active, mut standby, publisher) = standby_under_load(COUNT).await;
    active.signal(libc::SIGSTOP);
    first_record_from(&mut standby).await;
    active.signal(libc::SIGCONT);
    let (status, _active) = active.wait_async(Duration::from_secs(60)).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "the thawed active did not stop:\n{}",
            process::tail(&files.log())
        )
    });
    assert!(
        !status.success(),
        "it stops with an error: {status}\n{}",
        process::tail(&files.log())
    );
    let log = std::fs::read_to_string(files.log()).unwrap();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("bridge stopping") || l.contains("lost the lease"))
        .collect();
    eprintln!("the thawed active stopped: {why:#?}");
    publisher.await.expect("publisher");
    let landed = read_landed(&rig, COUNT).await;
    standby.stop();
    assert_exactly_once(&landed, COUNT, true, &[&files]);
}
