//! Kafka over SASL_SSL: the shared test broker's SASL_SSL listener, with
//! SCRAM users created at format time and a certificate from a private CA
//! (`common::kafka::shared_secure`). The
//! bridge delivers exactly once with the right credentials, and with a
//! wrong password or an untrusted broker certificate stops with a clear
//! error instead of waiting forever.

use crate::common::certs::TestCa;
use crate::common::kafka::{
    shared_secure, TestKafka, SCRAM_PASSWORD as PASSWORD, SCRAM_USER as USER,
};
use crate::common::*;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// A rig on the shared broker (topics made over its plain listener) and a
/// bridge config reaching it over its SASL_SSL listener with `password`
/// (from a file, as a mounted secret) and trusting `ca_file`.
async fn rig_and_config(
    password: &str,
    ca_file: &std::path::Path,
) -> (Rig, ConfigBuilder, tempfile::TempDir) {
    let rig = Rig::start_with(TestKafka::real()).await;
    let secrets = tempfile::tempdir().expect("secrets dir");
    let password_file = secrets.path().join("kafka-password");
    std::fs::write(&password_file, format!("{password}\n")).expect("write the password");
    let config = ConfigBuilder::new(rig.broker.port, &shared_secure().bootstrap, &rig.topics)
        .kafka_property("security.protocol", "SASL_SSL")
        .kafka_property("sasl.mechanisms", "SCRAM-SHA-512")
        .kafka_property("sasl.username", USER)
        .kafka_property("sasl.password_file", &password_file.display().to_string())
        .kafka_property("ssl.ca.location", &ca_file.display().to_string());
    (rig, config, secrets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_with_scram_delivers_exactly_once() {
    let (rig, config, _secrets) = rig_and_config(PASSWORD, &shared_secure().ca_file).await;
    let files = BridgeFiles::new(&config);
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;

    publish_all(rig.broker.port, &telemetry_messages("scram", 300, 3, 2)).await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        300,
        WAIT,
        Duration::from_millis(500),
    );
    assert_eq!(landed.len(), 300, "every message exactly once");
    assert_every_seq(&landed, 300);
    // The password never reaches the log, even at debug.
    let log = std::fs::read_to_string(files.log()).unwrap_or_default();
    assert!(
        !log.contains(PASSWORD),
        "the password is in the log:\n{log}"
    );
    bridge.stop();
}

/// Starts a bridge that Kafka refuses and waits for it to exit; returns
/// its log and how long it took.
async fn refused(config: &ConfigBuilder) -> (String, Duration) {
    let files = BridgeFiles::new(config);
    let started = Instant::now();
    let bridge = files.start(None);
    let (status, _bridge) = bridge.wait_async(WAIT).await;
    let status = status.expect("the bridge stops by itself instead of waiting");
    assert!(!status.success(), "a refused bridge exits with an error");
    let took = started.elapsed();
    (
        std::fs::read_to_string(files.log()).unwrap_or_default(),
        took,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_the_bridge_with_a_clear_error() {
    let (_rig, config, _secrets) =
        rig_and_config("not-the-password", &shared_secure().ca_file).await;
    let (log, took) = refused(&config).await;
    println!("wrong password: stopped after {took:?}");
    assert!(
        log.contains("Kafka refused the bridge: authentication failed"),
        "{log}"
    );
    assert!(
        !log.contains("not-the-password"),
        "the password is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_certificate_stops_the_bridge_with_a_clear_error() {
    let other = TestCa::new("not-kafkas");
    let (_rig, config, _secrets) = rig_and_config(PASSWORD, &other.ca_file).await;
    let (log, took) = refused(&config).await;
    println!("untrusted broker certificate: stopped after {took:?}");
    assert!(
        log.contains("Kafka refused the bridge: TLS failed"),
        "{log}"
    );
    assert!(log.contains("certificate verify failed"), "{log}");
}
