//! Hot reload of the real binary: SIGHUP and `--watch` swap the mapping
//! files' routes between two transactions; a bad file or a setting that
//! needs a restart leaves the running configuration in place.

use crate::common::kafka::TestKafka;
use crate::common::*;
use mqtt_kafka_bridge::telemetry::{CONFIG_RELOADS, MQTT_SUBSCRIBED};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// `mappings/hvac.yaml` with its telemetry routes (JSON, legacy text,
/// protobuf) writing to `topic` (a name under the test's prefix) instead
/// of `hvac.telemetry`.
fn hvac_to(topic: &str) -> String {
    let hvac = std::fs::read_to_string(repo_path("mappings/hvac.yaml")).expect("hvac.yaml");
    let moved = hvac.replace("topic: hvac.telemetry\n", &format!("topic: {topic}\n"));
    assert_eq!(moved.matches(topic).count(), 3, "three telemetry routes");
    moved
}

async fn await_reloads(bridge: &mut BridgeProcess, result: &str, count: f64) {
    bridge
        .await_metric(CONFIG_RELOADS, &[("result", result)], |n| n == count, WAIT)
        .await;
}

/// Four reloads while 4 000 QoS 1 messages arrive, each moving the
/// telemetry routes to the other of two topics: every message lands once,
/// on one of them, and both got some (the swaps took effect under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_move_routes_without_losing_or_repeating_a_message() {
    let rig = Rig::start_with(TestKafka::real()).await;
    let moved = rig.topics.named("hvac.telemetry-moved");
    rig.kafka.create_topics(&[&moved], 3).await;
    let original = rig.bridge_config();
    // One builder: every `bridge_config()` has an identity of its own.
    let elsewhere = original
        .clone()
        .mapping_text(&hvac_to("hvac.telemetry-moved"));
    let files = BridgeFiles::new(&original);
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;

    let count = 4000;
    let port = rig.broker.port;
    let publisher = tokio::spawn(async move {
        for chunk in telemetry_messages("r", count, 8, 1).chunks(100) {
            publish_all(port, chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    for reload in 1..=4 {
        // Paced across the load, not a synchronisation: each reload is
        // awaited through the bridge's own counter.
        tokio::time::sleep(Duration::from_millis(700)).await;
        files.rewrite(if reload % 2 == 1 {
            &elsewhere
        } else {
            &original
        });
        let timed = std::time::Instant::now();
        bridge.signal(libc::SIGHUP);
        await_reloads(&mut bridge, "success", f64::from(reload)).await;
        // For the record (`--nocapture`): SIGHUP to the swap, as scraped.
        eprintln!("reload {reload} under load: {:?}", timed.elapsed());
    }
    publisher.await.expect("publisher");

    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry(), &moved],
        count as usize,
        Duration::from_secs(60),
        Duration::from_secs(3),
    );
    bridge.stop();
    let records = assert_every_seq(&landed, u64::from(count));
    assert_eq!(records, count as usize, "no message twice");
    for topic in [rig.topics.telemetry(), moved] {
        assert!(
            landed.iter().any(|r| r.topic == topic),
            "nothing landed on {topic}"
        );
    }
}

/// A mapping error or a change to a setting that needs a restart is
/// refused: counted, logged with what is wrong, and the running routes
/// carry on. A later good file is taken, here through `--watch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_running_configuration() {
    let rig = Rig::start_with(TestKafka::mock()).await;
    let moved = rig.topics.named("hvac.telemetry-moved");
    rig.kafka.create_topics(&[&moved], 1).await;
    let config = rig.bridge_config();
    let files = BridgeFiles::new(&config);
    let mut bridge = files.start_watching();
    bridge.await_connected(WAIT).await;

    // A schema path that does not exist: a mapping error.
    let broken = hvac_to("hvac.telemetry-moved").replace(
        "schema: schemas/hvac-telemetry.schema.json",
        "schema: schemas/missing.json",
    );
    assert!(
        broken.contains("missing.json"),
        "the mapping names the schema"
    );
    files.rewrite(&config.clone().mapping_text(&broken));
    await_reloads(&mut bridge, "error", 1.0).await;

    // A new client id would be another MQTT session: refused.
    files.rewrite(&config.clone().client_id("somebody-else"));
    await_reloads(&mut bridge, "error", 2.0).await;
    let log = std::fs::read_to_string(bridge.log()).expect("log");
    assert!(
        log.contains("missing.json"),
        "the mapping error is logged:\n{log}"
    );
    assert!(
        log.contains("mqtt.client_id, kafka.transactional_id cannot change while the bridge runs"),
        "the refused setting is named:\n{log}"
    );

    // The running routes still write where they did.
    publish_all(rig.broker.port, &telemetry_messages("b", 3, 1, 1)).await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        3,
        WAIT,
        Duration::ZERO,
    );
    assert_every_seq(&landed, 3);

    // A good file is taken.
    files.rewrite(
        &config
            .clone()
            .mapping_text(&hvac_to("hvac.telemetry-moved")),
    );
    await_reloads(&mut bridge, "success", 1.0).await;
    bridge
        .await_metric(MQTT_SUBSCRIBED, &[], |v| v == 1.0, WAIT)
        .await;
    publish_all(rig.broker.port, &telemetry_messages("c", 3, 1, 1)).await;
    let landed = read_committed(&rig.bootstrap, &[&moved], 3, WAIT, Duration::ZERO);
    assert_every_seq(&landed, 3);
    bridge.stop();
}
