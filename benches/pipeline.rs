//! The per-message pipeline without network: route match, parse, schema
//! validation, transform, key/topic/header rendering, serialisation.
//!
//! `cargo bench --bench pipeline`; figures go to docs/performance.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mqtt_kafka_bridge::config::{Config, MappingSource};
use mqtt_kafka_bridge::mqtt::MqttMessage;
use mqtt_kafka_bridge::route::{Outcome, RouteTable};
use mqtt_kafka_bridge::sparkplug::Sessions;
use std::hint::black_box;
use std::path::Path;

const BRIDGE: &str = "mqtt: { host: h, client_id: c }\nkafka: { bootstrap_servers: b, transactional_id: t }\nmappings: [x]\n";

fn table(mappings: Vec<MappingSource>) -> RouteTable {
    RouteTable::compile(&Config::from_parts(Path::new("bench.yaml"), BRIDGE, mappings).unwrap())
        .unwrap()
}

fn hvac() -> RouteTable {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/hvac.yaml");
    table(vec![MappingSource::load(&path).unwrap()])
}

const TELEMETRY: &str = r#"{"ts":1764000000000,"ambient_c":21.4,"target_c":22.0,"humidity_pct":41.2,"air_quality_ppm":612,"blower_pct":55,"load_pct":48.5,"energy_kwh":1234.567,"mode":"cool"}"#;
const LEGACY: &str = "T=21.5;SP=22.0;H=40.0;CO2=600;FAN=55;LOAD=48.0;E=1234.567";

fn forward(t: &RouteTable, m: &MqttMessage) {
    match t.route(m) {
        Outcome::Forward { record, .. } => {
            black_box(record);
        }
        other => panic!("benchmark message not forwarded: {other:?}"),
    }
}

/// The HVAC readings as protobufjs encoded them (`tests/protobuf`).
fn protobuf_telemetry() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/protobuf/fixtures.json");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let hex = all["telemetry"].as_str().unwrap();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// An NBIRTH declaring `n` Double metrics with aliases, and an NDATA
/// carrying all of them by alias.
fn sparkplug_messages(n: u64) -> (MqttMessage, MqttMessage) {
    use mqtt_kafka_bridge::sparkplug::proto::payload::{metric, Metric};
    use mqtt_kafka_bridge::sparkplug::proto::{DataType, Payload};
    use prost::Message;
    let metric = |i: u64, named: bool| Metric {
        name: named.then(|| format!("line3/press/sensor{i}")),
        alias: Some(i + 1),
        datatype: named.then_some(DataType::Double as u32),
        timestamp: Some(1_764_000_000_000),
        value: Some(metric::Value::DoubleValue(21.5 + i as f64)),
        ..Metric::default()
    };
    let payload = |seq: u64, named: bool| Payload {
        timestamp: Some(1_764_000_000_000),
        seq: Some(seq),
        metrics: (0..n).map(|i| metric(i, named)).collect(),
        ..Payload::default()
    };
    (
        MqttMessage::new(
            "spBv1.0/plant1/NBIRTH/edge7",
            payload(0, true).encode_to_vec(),
        ),
        MqttMessage::new(
            "spBv1.0/plant1/NDATA/edge7",
            payload(1, false).encode_to_vec(),
        ),
    )
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));

    let t = hvac();
    let json = MqttMessage::new("site/s1/hvac/u7/telemetry", TELEMETRY);
    group.bench_function("hvac_json_validate_transform", |b| {
        b.iter(|| forward(&t, black_box(&json)))
    });

    let legacy = MqttMessage::new("site/s1/hvac-legacy/u7/telemetry", LEGACY);
    group.bench_function("hvac_legacy_text", |b| {
        b.iter(|| forward(&t, black_box(&legacy)))
    });

    let protobuf = MqttMessage::new("site/s1/hvac-pb/u7/telemetry", protobuf_telemetry());
    group.bench_function("hvac_protobuf_validate_transform", |b| {
        b.iter(|| forward(&t, black_box(&protobuf)))
    });

    let raw = MqttMessage::new("site/s1/hvac/u7/diagnostics", vec![0u8; 512]);
    group.bench_function("raw_passthrough", |b| {
        b.iter(|| forward(&t, black_box(&raw)))
    });

    let plain = table(vec![MappingSource::parse(
        Path::new("plain.yaml"),
        "routes:\n  - name: p\n    mqtt: { filter: 'site/{site}/hvac/{unit}/telemetry' }\n    kafka: { topic: hvac.telemetry, key: '{site}.{unit}' }\n",
    )
    .unwrap()]);
    group.bench_function("json_passthrough_no_schema", |b| {
        b.iter(|| forward(&plain, black_box(&json)))
    });

    // 1 000 routes, the message matches the last one.
    let mut many = String::from("routes:\n");
    for i in 0..1000 {
        many.push_str(&format!(
            "  - name: r{i}\n    mqtt: {{ filter: 'site/{{site}}/line{i}/{{unit}}/telemetry' }}\n    kafka: {{ topic: t{i}, key: '{{unit}}' }}\n"
        ));
    }
    let many = table(vec![
        MappingSource::parse(Path::new("many.yaml"), &many).unwrap()
    ]);
    let last = MqttMessage::new("site/s1/line999/u7/telemetry", TELEMETRY);
    group.bench_function("1000_routes_last_matches", |b| {
        b.iter(|| forward(&many, black_box(&last)))
    });

    // Sparkplug B NDATA of 9 metrics by alias (the HVAC row's 9 fields),
    // decoded with the aliases of a birth seen before.
    let sparkplug = table(vec![MappingSource::parse(
        Path::new("plant.yaml"),
        "routes:\n  - name: plant\n    mqtt: { filter: 'spBv1.0/#' }\n    format: sparkplug_b\n    kafka: { topic: plant.metrics }\n",
    )
    .unwrap()]);
    let (birth, data) = sparkplug_messages(9);
    let mut sessions = Sessions::default();
    assert!(matches!(
        sparkplug.route_with(&birth, &mut sessions),
        Outcome::Forward { .. }
    ));
    group.bench_function("sparkplug_ndata_9_metrics", |b| {
        b.iter(
            || match sparkplug.route_with(black_box(&data), &mut sessions) {
                Outcome::Forward { record, .. } => {
                    black_box(record);
                }
                other => panic!("NDATA not forwarded: {other:?}"),
            },
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
