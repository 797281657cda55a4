//! MQTT over TLS against mosquitto's own TLS listener: a private CA, a
//! client certificate as the bridge's identity, and every way the
//! handshake can be refused, each said clearly and retried at a growing
//! interval rather than in a loop.

use crate::common::certs::{Identity, TestCa};
use crate::common::kafka::TestKafka;
use crate::common::mosquitto::{Options, TlsListener};
use crate::common::*;
use mqtt_kafka_bridge::telemetry::{MQTT_CONNECT_FAILURES, TLS_CERT_EXPIRY};
use serde_yaml_ng::{Mapping, Value};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// A broker whose TLS listener requires a certificate from `ca`, serving
/// its own certificate for `127.0.0.1` and `localhost`.
fn broker(ca: &TestCa, options: Options) -> Options {
    let server = ca.server("broker", &["localhost", "127.0.0.1"]);
    Options {
        tls: Some(TlsListener {
            ca_file: ca.ca_file.clone(),
            cert_file: server.cert_file,
            key_file: server.key_file,
            require_certificate: true,
        }),
        ..options
    }
}

/// `mqtt.tls` for the TLS port: trusting `ca_file`, showing `identity`.
fn tls_config(
    rig: &Rig,
    ca_file: &std::path::Path,
    identity: Option<&Identity>,
    extra: &[(&str, &str)],
) -> ConfigBuilder {
    let mut tls = Mapping::new();
    tls.insert("ca_file".into(), ca_file.display().to_string().into());
    if let Some(identity) = identity {
        tls.insert(
            "cert_file".into(),
            identity.cert_file.display().to_string().into(),
        );
        tls.insert(
            "key_file".into(),
            identity.key_file.display().to_string().into(),
        );
    }
    for (key, value) in extra {
        tls.insert((*key).into(), (*value).into());
    }
    rig.bridge_config()
        .mqtt("port", rig.broker.tls_port.expect("a TLS listener"))
        .mqtt("tls", Value::Mapping(tls))
        .mqtt("reconnect_max_delay_ms", 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_a_private_ca_delivers_end_to_end() {
    let ca = TestCa::new("mqtt");
    let rig = Rig::start_with_broker(TestKafka::real(), &broker(&ca, Options::default())).await;
    let client = ca.client("bridge", "bridge-tls", 365);
    let files = BridgeFiles::new(&tls_config(&rig, &ca.ca_file, Some(&client), &[]));
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;

    // Published in the clear by a test device; read by the bridge over TLS.
    let messages = telemetry_messages("tls", 200, 4, 2);
    publish_all(rig.broker.port, &messages).await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        200,
        WAIT,
        Duration::from_millis(500),
    );
    assert_eq!(landed.len(), 200, "every message once");
    assert_every_seq(&landed, 200);
    for record in &landed {
        let unit = record.json()["unit_no"].as_u64().expect("unit_no");
        assert_eq!(record.key.as_deref(), Some(&*format!("tls.u{unit}")));
    }
    // The broker took the certificate's name for the bridge's username.
    let log = rig.broker.log();
    assert!(
        log.contains("u'bridge-tls'"),
        "mosquitto did not see the certificate's identity:\n{log}"
    );

    // The certificate's expiry, as a countdown: 365 days less a little.
    let left = bridge
        .await_metric(
            TLS_CERT_EXPIRY,
            &[("connection", "mqtt"), ("certificate", "client")],
            |v| v > 364.0 * 86_400.0 && v <= 365.0 * 86_400.0,
            WAIT,
        )
        .await;
    let ca_left = bridge
        .metrics()
        .scrape_async()
        .await
        .expect("scrape")
        .value(
            TLS_CERT_EXPIRY,
            &[("connection", "mqtt"), ("certificate", "ca")],
        );
    println!("client certificate expires in {left} s; CA in {ca_left:?} s");
    assert!(ca_left.is_some_and(|v| v > 3649.0 * 86_400.0));
    bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_the_acl_refuses_for_the_certificates_identity_shows_in_readiness() {
    let ca = TestCa::new("mqtt");
    // Refused for the certificate's name only: anonymous clients may
    // subscribe, so the refusal proves the identity came from the
    // certificate.
    let options = broker(
        &ca,
        Options {
            refuse_subscriptions: vec!["site/#".into()],
            refuse_for: vec!["bridge-acl".into()],
            ..Options::default()
        },
    );
    let rig = Rig::start_with_broker(TestKafka::real(), &options).await;
    let client = ca.client("bridge", "bridge-acl", 365);
    let files = BridgeFiles::new(&tls_config(&rig, &ca.ca_file, Some(&client), &[]));
    let mut bridge = files.start(None);
    let body = bridge
        .await_probe("/readyz", 503, "subscriptions refused", WAIT)
        .await;
    assert!(body.contains("\"mqtt\":\""), "{body}");
    bridge.stop();
}

// The bridges here are refused before they read anything, but they still
// start a producer: on the shared real broker, not on a mock cluster per
// test in the test process (which loads it; see `logs.rs`).

/// What a refused bridge must show: the explanation in its log, and
/// connection attempts that slow down (100 ms doubling to 1 s here; a
/// loop would make hundreds a second).
async fn assert_refused_and_backing_off(bridge: &mut BridgeProcess, explanation: &str) {
    let started = Instant::now();
    bridge.await_log(explanation, WAIT).await;
    let failures = |n: f64| n >= 4.0;
    bridge
        .await_metric(MQTT_CONNECT_FAILURES, &[], failures, WAIT)
        .await;
    // A window long enough for the delay to reach its 1 s cap.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let scrape = bridge.metrics().scrape_async().await.expect("scrape");
    let attempts = scrape.value(MQTT_CONNECT_FAILURES, &[]).unwrap_or(0.0);
    let seconds = started.elapsed().as_secs_f64();
    println!("{explanation:?}: {attempts} attempts in {seconds:.1} s");
    assert!(
        attempts <= seconds + 4.0,
        "{attempts} connection attempts in {seconds:.1} s: not backing off\n{}",
        std::fs::read_to_string(bridge.log()).unwrap_or_default()
    );
    assert_eq!(
        scrape.value(mqtt_kafka_bridge::telemetry::MQTT_CONNECTED, &[]),
        Some(0.0)
    );
}

/// A bridge that mosquitto (requiring certificates from `ca`) and the
/// bridge's TLS settings (trusting `trusted`, showing `client`, with
/// `extra`) cannot agree on: refused, said as `explanation`, retried at a
/// growing interval.
async fn assert_refused(
    ca: &TestCa,
    trusted: &std::path::Path,
    client: Option<&Identity>,
    extra: &[(&str, &str)],
    explanation: &str,
) {
    let rig = Rig::start_with_broker(TestKafka::real(), &broker(ca, Options::default())).await;
    let files = BridgeFiles::new(&tls_config(&rig, trusted, client, extra));
    let mut bridge = files.start(None);
    assert_refused_and_backing_off(&mut bridge, explanation).await;
    bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_the_broker_refuses_and_the_bridge_says_so() {
    let ca = TestCa::new("mqtt");
    let explanation = "the broker requires a client certificate";
    assert_refused(&ca, &ca.ca_file, None, &[], explanation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused_and_said_so() {
    let (ca, stranger) = (TestCa::new("mqtt"), TestCa::new("stranger"));
    let client = stranger.client("bridge", "bridge-stranger", 365);
    let explanation = "the broker refused our client certificate";
    assert_refused(&ca, &ca.ca_file, Some(&client), &[], explanation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_for_another_name_is_refused_and_said_so() {
    let ca = TestCa::new("mqtt");
    let client = ca.client("bridge", "bridge-name", 365);
    let name = [("server_name", "broker.example.com")];
    assert_refused(
        &ca,
        &ca.ca_file,
        Some(&client),
        &name,
        "does not name the host",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_an_untrusted_ca_is_refused_and_said_so() {
    let (ca, other) = (TestCa::new("mqtt"), TestCa::new("other"));
    let client = ca.client("bridge", "bridge-untrusting", 365);
    assert_refused(
        &ca,
        &other.ca_file,
        Some(&client),
        &[],
        "not signed by a trusted CA",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused_and_a_renewed_one_is_taken_on_reload() {
    let ca = TestCa::new("mqtt");
    let rig = Rig::start_with_broker(TestKafka::real(), &broker(&ca, Options::default())).await;
    let expired = ca.client("bridge", "bridge-expired", -2);
    let files = BridgeFiles::new(&tls_config(&rig, &ca.ca_file, Some(&expired), &[]));
    let mut bridge = files.start(None);
    // Said at start-up, before any connection.
    bridge.await_log("expired 2 days ago", WAIT).await;
    assert_refused_and_backing_off(&mut bridge, "the broker refused our client certificate").await;
    let left = bridge
        .metrics()
        .scrape_async()
        .await
        .expect("scrape")
        .value(
            TLS_CERT_EXPIRY,
            &[("connection", "mqtt"), ("certificate", "client")],
        )
        .expect("the expiry gauge");
    assert!(left < -86_400.0, "expired two days ago, yet {left}");

    // Renewed in place (as cert-manager does), then SIGHUP: the next
    // connection uses the new files, with no restart.
    let renewed = ca.client("renewed", "bridge-expired", 90);
    std::fs::copy(&renewed.cert_file, &expired.cert_file).expect("renew the certificate");
    std::fs::copy(&renewed.key_file, &expired.key_file).expect("renew the key");
    bridge.signal(libc::SIGHUP);
    bridge.await_connected(WAIT).await;
    bridge
        .await_metric(
            TLS_CERT_EXPIRY,
            &[("connection", "mqtt"), ("certificate", "client")],
            |v| v > 88.0 * 86_400.0,
            WAIT,
        )
        .await;
    bridge.stop();
}
