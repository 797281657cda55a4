//! `kafka.encoding` against a real schema registry (Apicurio, through its
//! Confluent-compatible API; `tests/common/registry.rs`): records land in
//! the registry's wire format under the id the registry gave the schema,
//! and read back with the schema fetched by that id; what does not fit the
//! schema is dead-lettered with reason `encode`; a schema the registry
//! refuses as incompatible fails `check` and stops the start, naming the
//! route and the subject.

use crate::common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// The HVAC telemetry route, its records Avro-encoded with `schema`.
fn avro_mapping(schema: &str) -> String {
    format!(
        r#"
routes:
  - name: hvac-telemetry
    mqtt: {{ filter: "site/{{site}}/hvac/{{unit}}/telemetry", qos: 1 }}
    schema: schemas/hvac-telemetry.schema.json
    transform:
      # The test units also send these; the Avro schema has no place for them.
      drop: [seq, unit_no]
      set: {{ site: "{{site}}", unit: "{{unit}}", received_at: "{{mqtt.received_at}}" }}
    kafka:
      topic: hvac.telemetry
      key: "{{site}}.{{unit}}"
      encoding: {{ format: avro, schema: "{schema}" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_records_carry_the_registry_id_and_read_back_with_its_schema() {
    let registry = registry::shared();
    let rig = Rig::start().await;
    let config = rig
        .bridge_config()
        .mapping_text(&avro_mapping("schemas/hvac-telemetry.avsc"))
        .schema_registry("url", registry.url.as_str());
    let files = BridgeFiles::new(&config);
    // Before the first start the subject is new to the registry, which
    // `check` takes as fine (Apicurio answers "compatible" for a subject it
    // does not hold; Confluent's 404 40401 reads as "new").
    let (code, out) = run_to_exit(&files, &["check"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("subject `{}-value`", rig.topics.telemetry())),
        "{out}"
    );
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;

    let mut messages = telemetry_messages("s1", 5, 2, 1);
    // Valid for the JSON Schema, but the Avro schema has no `firmware`.
    let mut extra: serde_json::Value = serde_json::from_str(&telemetry(9, 9)).unwrap();
    extra["firmware"] = "2.1".into();
    messages.push(Publish::new(
        "site/s1/hvac/u9/telemetry",
        extra.to_string(),
        1,
    ));
    publish_all(rig.broker.port, &messages).await;
    let (data, dlq) = (rig.topics.telemetry(), rig.topics.dead_letter());
    let landed = read_committed(
        &rig.bootstrap,
        &[&data, &dlq],
        6,
        WAIT,
        Duration::from_secs(2),
    );
    bridge.stop();
    assert_eq!(landed.len(), 6, "every message once");

    let dead: Vec<_> = landed.iter().filter(|l| l.topic == dlq).collect();
    assert_eq!(
        dead.len(),
        1,
        "{:?}",
        dead.iter()
            .map(|d| d.header("bridge.error.detail"))
            .collect::<Vec<_>>()
    );
    assert_eq!(dead[0].header("bridge.error.reason"), "encode");
    assert!(
        dead[0]
            .header("bridge.error.detail")
            .contains("field `/firmware` is not in the Avro schema `hvac.v1.Telemetry`"),
        "{:?}",
        dead[0].headers
    );

    let subject = format!("{data}-value");
    let versions = registry.get_json(&format!("/subjects/{subject}/versions"));
    assert_eq!(versions, serde_json::json!([1]), "registered once");
    let records: Vec<_> = landed.iter().filter(|l| l.topic == data).collect();
    assert_eq!(records.len(), 5);
    let mut units = Vec::new();
    for record in records {
        let value = &record.value;
        assert_eq!(value[0], 0, "magic byte");
        let id = u32::from_be_bytes(value[1..5].try_into().unwrap());
        // What a stock deserialiser does: the writer schema by its id.
        let text = registry.get_json(&format!("/schemas/ids/{id}"))["schema"]
            .as_str()
            .expect("the registry knows the id")
            .to_string();
        let schema = apache_avro::Schema::parse_str(&text).unwrap();
        let read = apache_avro::from_avro_datum(&schema, &mut &value[5..], None).unwrap();
        let apache_avro::types::Value::Record(fields) = read else {
            panic!("a record")
        };
        let field = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let apache_avro::types::Value::String(unit) = field("unit") else {
            panic!("unit is a string")
        };
        assert_eq!(record.key.as_deref(), Some(format!("s1.{unit}").as_str()));
        assert_eq!(
            field("site"),
            apache_avro::types::Value::String("s1".into())
        );
        assert_eq!(field("blower_pct"), apache_avro::types::Value::Int(55));
        let apache_avro::types::Value::Double(energy) = field("energy_kwh") else {
            panic!("energy is a double")
        };
        units.push((unit, energy));
    }
    // `translate` shows the record as the bridge writes it, with the id
    // the registry holds (looked up, not registered).
    let id = u32::from_be_bytes(
        landed.iter().find(|l| l.topic == data).unwrap().value[1..5]
            .try_into()
            .unwrap(),
    );
    let payload = telemetry(1, 1);
    let (code, out) = run_to_exit(
        &files,
        &[
            "translate",
            "--topic",
            "site/s1/hvac/u1/telemetry",
            "--payload",
            &payload,
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("schema-registry wire format, schema id {id}")),
        "{out}"
    );
    units.sort_by(|a, b| a.1.total_cmp(&b.1));
    assert_eq!(
        units,
        (0..5)
            .map(|seq| (format!("u{}", seq % 2), 1000.0 + f64::from(seq)))
            .collect::<Vec<_>>()
    );
}

/// Runs the binary with `args` on `files`' config, to its exit (bounded).
fn run_to_exit(files: &BridgeFiles, args: &[&str]) -> (Option<i32>, String) {
    let config = files.config();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqtt-kafka-bridge"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .env(config::METRICS_PORT_ENV, ports::free_port().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the bridge binary");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`{args:?}` did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_schema_fails_check_and_stops_the_start() {
    let registry = registry::shared();
    let rig = Rig::start().await;
    let subject = format!("{}-value", rig.topics.telemetry());
    let v1 = std::fs::read_to_string(repo_path("mappings/schemas/hvac-telemetry.avsc")).unwrap();
    registry.register(&subject, "AVRO", &v1);
    let (status, _) = registry.request(
        "PUT",
        &format!("/config/{subject}"),
        Some(&serde_json::json!({"compatibility": "BACKWARD"})),
    );
    assert_eq!(status, 200);

    // A new required field without a default: readers of the new schema
    // cannot read what was written with the old one.
    let dir = tempfile::tempdir().unwrap();
    let mut v2: serde_json::Value = serde_json::from_str(&v1).unwrap();
    v2["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "firmware", "type": "string"}));
    let v2_path = dir.path().join("v2.avsc");
    std::fs::write(&v2_path, v2.to_string()).unwrap();
    let config = rig
        .bridge_config()
        .mapping_text(&avro_mapping(&v2_path.display().to_string()))
        .schema_registry("url", registry.url.as_str());
    let files = BridgeFiles::new(&config);

    let (code, out) = run_to_exit(&files, &["check"]);
    assert_eq!(code, Some(78), "{out}");
    assert!(
        out.contains(&format!(
            "route `hvac-telemetry`: incompatible with the latest version of subject `{subject}`"
        )),
        "{out}"
    );

    let (code, out) = run_to_exit(&files, &["run"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("route `hvac-telemetry`"), "{out}");
    assert!(out.contains(&subject), "{out}");
    assert!(out.contains("HTTP 409"), "{out}");
    // Nothing was registered over the refusal.
    assert_eq!(
        registry.get_json(&format!("/subjects/{subject}/versions")),
        serde_json::json!([1])
    );

    // The old schema, still compatible with itself, passes `check`.
    let config = rig
        .bridge_config()
        .mapping_text(&avro_mapping("schemas/hvac-telemetry.avsc"))
        .schema_registry("url", registry.url.as_str());
    let (code, out) = run_to_exit(&BridgeFiles::new(&config), &["check"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "compatible with the latest version of subject `{subject}`"
        )),
        "{out}"
    );
}

/// `format: protobuf` encoding: the registry holds the `.proto` text under
/// the message's name (`record_name`), and a record reads back with the
/// message compiled from that text, after the id and Confluent's message
/// indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_records_read_back_with_the_registered_proto() {
    const PROTO: &str = "syntax = \"proto3\";\npackage hvac.out.v1;\n\nmessage Reading {\n  string site = 1;\n  string unit = 2;\n  double ambient_c = 3;\n  uint32 air_quality_ppm = 4;\n}\n";
    let registry = registry::shared();
    let rig = Rig::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("reading.proto");
    std::fs::write(&proto, PROTO).unwrap();
    // Per test: the registry is shared, and record_name subjects are not
    // prefixed by topic.
    let subject = format!("{}Reading", rig.topics.prefix);
    let mapping = format!(
        r#"
routes:
  - name: hvac-telemetry
    mqtt: {{ filter: "site/{{site}}/hvac/{{unit}}/telemetry", qos: 1 }}
    transform:
      drop: [ts, target_c, humidity_pct, blower_pct, load_pct, energy_kwh, mode, seq, unit_no]
      set: {{ site: "{{site}}", unit: "{{unit}}" }}
    kafka:
      topic: hvac.telemetry
      key: "{{site}}.{{unit}}"
      encoding:
        format: protobuf
        schema: "{}"
        message: hvac.out.v1.Reading
        subject: "{subject}"
"#,
        proto.display()
    );
    let config = rig
        .bridge_config()
        .mapping_text(&mapping)
        .schema_registry("url", registry.url.as_str());
    let files = BridgeFiles::new(&config);
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;
    publish_all(rig.broker.port, &telemetry_messages("s2", 3, 3, 1)).await;
    let topic = rig.topics.telemetry();
    let landed = read_committed(&rig.bootstrap, &[&topic], 3, WAIT, Duration::from_secs(1));
    bridge.stop();
    assert_eq!(landed.len(), 3);

    for record in &landed {
        let value = &record.value;
        assert_eq!(value[0], 0, "magic byte");
        let id = u32::from_be_bytes(value[1..5].try_into().unwrap());
        let schema = registry.get_json(&format!("/schemas/ids/{id}"));
        assert_eq!(schema["schemaType"], "PROTOBUF", "{schema}");
        // The first message of its file: one 0 byte of message indexes.
        assert_eq!(value[5], 0);
        let registered = dir.path().join("registered.proto");
        std::fs::write(&registered, schema["schema"].as_str().unwrap()).unwrap();
        let pool = protox::Compiler::new([dir.path()])
            .unwrap()
            .open_file("registered.proto")
            .unwrap()
            .descriptor_pool();
        let message = pool.get_message_by_name("hvac.out.v1.Reading").unwrap();
        let decoded = prost_reflect::DynamicMessage::decode(message, &value[6..]).unwrap();
        let json = serde_json::to_value(&decoded).unwrap();
        assert_eq!(json["site"], "s2");
        assert_eq!(
            record.key.as_deref(),
            Some(format!("s2.{}", json["unit"].as_str().unwrap()).as_str())
        );
        assert_eq!(json["ambientC"], 21.5);
        assert_eq!(json["airQualityPpm"], 600);
    }
}

/// An `https` registry whose certificate comes from a private CA: trusted
/// through `schema_registry.ca_file` (checked, registered, records
/// encoded), and refused with another CA, which `check` and the start
/// both name as a TLS problem rather than an unreachable registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_registry_is_trusted_through_its_ca_file_and_refused_with_another() {
    let ca = certs::TestCa::new("registry");
    let https = registry::HttpsRegistry::start(&ca.server("registry", &["127.0.0.1"]));
    let rig = Rig::start().await;
    let config = |ca_file: &std::path::Path| {
        rig.bridge_config()
            .mapping_text(&avro_mapping("schemas/hvac-telemetry.avsc"))
            .schema_registry("url", https.https_url.as_str())
            .schema_registry("ca_file", ca_file.display().to_string())
    };
    let subject = format!("{}-value", rig.topics.telemetry());

    let files = BridgeFiles::new(&config(&ca.ca_file));
    let (code, out) = run_to_exit(&files, &["check"]);
    assert_eq!(code, Some(0), "{out}");
    // Asked over HTTPS (Apicurio calls a subject it does not hold
    // compatible).
    assert!(out.contains(&format!("subject `{subject}`")), "{out}");
    let mut bridge = files.start(None);
    bridge.await_connected(WAIT).await;
    publish_all(rig.broker.port, &telemetry_messages("s1", 3, 1, 1)).await;
    let landed = read_committed(
        &rig.bootstrap,
        &[&rig.topics.telemetry()],
        3,
        WAIT,
        Duration::from_secs(1),
    );
    bridge.stop();
    assert_eq!(landed.len(), 3);
    let id = https
        .registry
        .get_json(&format!("/subjects/{subject}/versions/1"))["id"]
        .as_u64()
        .expect("registered over HTTPS");
    for record in &landed {
        assert_eq!(record.value[0], 0, "magic byte");
        let used = u32::from_be_bytes(record.value[1..5].try_into().unwrap());
        assert_eq!(u64::from(used), id);
    }

    let other = certs::TestCa::new("other");
    let files = BridgeFiles::new(&config(&other.ca_file));
    let (code, out) = run_to_exit(&files, &["check"]);
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("TLS") && out.contains("ca_file"), "{out}");
    let (code, out) = run_to_exit(&files, &["run"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("TLS") && out.contains("ca_file"), "{out}");
}
