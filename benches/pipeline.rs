//! The per-message pipeline without network: route match, parse, schema
//! validation, transform, key/topic/header rendering, serialisation.
//!
//! `cargo bench --bench pipeline`; figures go to docs/performance.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mqtt_kafka_bridge::config::{Config, MappingSource};
use mqtt_kafka_bridge::mqtt::MqttMessage;
use mqtt_kafka_bridge::route::{Outcome, RouteTable};
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
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
