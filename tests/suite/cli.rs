//! The command line as a user runs it: `check`, `translate`, `demo`.

use std::process::{Command, Output};

fn bridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mqtt-kafka-bridge"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BRIDGE_LOG", "warn")
        .output()
        .expect("run the binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_passes_on_the_shipped_config_and_every_mapping() {
    let o = bridge(&["check", "--config", "config/bridge.yaml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for route in [
        "hvac-telemetry",
        "hvac-legacy-telemetry",
        "hvac-diagnostics",
    ] {
        assert!(out.contains(route), "{out}");
    }
    assert!(out.contains("site/+/hvac/+/telemetry (QoS 1)"), "{out}");
    // Every mapping file in mappings/ is loaded by the shipped config.
    for entry in std::fs::read_dir(crate::common::repo_path("mappings")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(out.contains(&name), "{name} not checked:\n{out}");
        }
    }
}

#[test]
fn check_reports_file_line_and_field_with_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        "routes:\n  - name: r\n    mqtt: { filter: 'a/{site}' }\n    kafka:\n      topic: 'x.{sit}'\n",
    )
    .unwrap();
    let config = dir.path().join("bridge.yaml");
    std::fs::write(
        &config,
        "mqtt: { host: h, client_id: c }\nkafka: { bootstrap_servers: b, transactional_id: t }\nmappings: ['*.yaml']\n",
    )
    .unwrap();
    let o = bridge(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(78));
    let err = stderr(&o);
    assert!(
        err.contains("m.yaml:5:14: routes[0].kafka.topic: `{sit}` is not a capture of this route (captures: site)"),
        "{err}"
    );
}

#[test]
fn translate_shows_record_dead_letter_and_unrouted_with_exit_codes() {
    let ok = bridge(&[
        "translate",
        "--config",
        "config/bridge.yaml",
        "--topic",
        "site/s1/hvac-legacy/u9/telemetry",
        "--payload",
        "T=21.5;SP=22.0;H=40;CO2=600;FAN=55;LOAD=48;E=1234.5",
        "--property",
        "fw=1.2",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let out = stdout(&ok);
    assert!(
        out.contains("PRODUCE via route `hvac-legacy-telemetry`"),
        "{out}"
    );
    assert!(out.contains("topic:     hvac.telemetry"), "{out}");
    assert!(out.contains("key:       s1.u9"), "{out}");
    assert!(out.contains("  fw: 1.2"), "{out}");
    assert!(out.contains("\"air_quality_ppm\": 600"), "{out}");

    let payload = crate::common::repo_path("tests/data/too-humid.json");
    let dead = bridge(&[
        "translate",
        "--config",
        "config/bridge.yaml",
        "--topic",
        "site/s1/hvac/u7/telemetry",
        "--payload",
        &format!("@{}", payload.display()),
    ]);
    assert_eq!(dead.status.code(), Some(3), "{}", stderr(&dead));
    let out = stdout(&dead);
    assert!(out.contains("reason:    schema"), "{out}");
    assert!(out.contains("path:      /humidity_pct"), "{out}");
    assert!(out.contains("topic:     mqtt-bridge.dead-letter"), "{out}");

    let unrouted = bridge(&[
        "translate",
        "--config",
        "config/bridge.yaml",
        "--topic",
        "other/topic",
        "--payload",
        "{}",
    ]);
    assert_eq!(unrouted.status.code(), Some(4));
    assert!(stdout(&unrouted).starts_with("UNROUTED"));
}

#[test]
fn demo_runs_with_nothing_installed_and_data_reaches_kafka() {
    let port = crate::common::ports::free_port();
    let o = bridge(&[
        "demo",
        "--duration-s",
        "5",
        "--metrics-listen",
        &format!("127.0.0.1:{port}"),
    ]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    let last = out.lines().last().unwrap_or_default().to_string();
    // "demo: fleet sent N telemetry, M malformed, C commands; Kafka holds T telemetry and D dead-letter records"
    let numbers: Vec<u64> = last
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 5, "{out}");
    let (sent, in_kafka, dead) = (numbers[0], numbers[3], numbers[4]);
    assert!(sent > 100 && in_kafka > 100, "{out}");
    assert!(dead > 0, "malformed messages were dead-lettered: {out}");
    // "demo: Sparkplug edge node plant1/press-line-1 sent N messages (asked
    // for R rebirths); Kafka holds M plant.metrics and O plant.online records"
    let sparkplug = out
        .lines()
        .find(|l| l.starts_with("demo: Sparkplug edge node"))
        .unwrap_or_else(|| panic!("no Sparkplug line: {out}"));
    let numbers: Vec<u64> = sparkplug
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // plant1, line 1, then the four counts.
    let [_, _, sent, _, metrics, online] = numbers[..] else {
        panic!("{sparkplug}")
    };
    assert!(sent >= 5, "birth and data every 500 ms: {sparkplug}");
    assert!(
        metrics >= sent - 1 && metrics <= sent,
        "decoded and produced: {sparkplug}"
    );
    assert!(online >= 1, "the birth's online record: {sparkplug}");
}

/// A Sparkplug B DATA message carries aliases only: `translate --birth`
/// routes the birth first, and the DATA is decoded with its aliases.
/// Without it the DATA would be dead-lettered (exit 3).
#[test]
fn translate_decodes_sparkplug_data_with_a_birth_given_first() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["nbirth", "ndata"] {
        let bytes = crate::common::fixtures::sparkplug(name);
        std::fs::write(dir.path().join(format!("{name}.bin")), bytes).unwrap();
    }
    std::fs::write(
        dir.path().join("plant.yaml"),
        "routes:\n  - name: plant\n    mqtt: { filter: 'spBv1.0/#' }\n    format: sparkplug_b\n    kafka: { topic: plant.metrics }\n",
    )
    .unwrap();
    let config = dir.path().join("bridge.yaml");
    std::fs::write(
        &config,
        "mqtt: { host: h, client_id: c }\nkafka: { bootstrap_servers: b, transactional_id: t }\nmappings: ['plant.yaml']\n",
    )
    .unwrap();
    let path = |name: &str| format!("@{}", dir.path().join(name).display());
    let data = [
        "translate",
        "--config",
        config.to_str().unwrap(),
        "--topic",
        "spBv1.0/plant1/NDATA/edge7",
        "--payload",
    ];
    let birth = format!("spBv1.0/plant1/NBIRTH/edge7={}", path("nbirth.bin"));
    let o = bridge(&[&data[..], &[&path("ndata.bin"), "--birth", &birth]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("key:       plant1/edge7"), "{out}");
    assert!(out.contains("\"name\": \"press/pressure\""), "{out}");
    assert!(out.contains("\"value\": 99.5"), "{out}");

    let o = bridge(&[&data[..], &[&path("ndata.bin")]].concat());
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    assert!(stdout(&o).contains("before its NBIRTH"), "{}", stdout(&o));
}
