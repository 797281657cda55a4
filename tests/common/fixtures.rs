//! Payloads made by independent encoders, by name: Sparkplug B by Eclipse
//! Tahu's JavaScript library (`tests/sparkplug/fixtures.js`), protobuf by
//! protobufjs (`tests/protobuf/fixtures.js`). Checked in as hex, so no
//! node is needed to run the tests.

/// The payload `tests/sparkplug/fixtures.json` holds under `name`.
pub fn sparkplug(name: &str) -> Vec<u8> {
    hex_fixture("tests/sparkplug/fixtures.json", name)
}

/// The payload `tests/protobuf/fixtures.json` holds under `name`.
pub fn protobuf(name: &str) -> Vec<u8> {
    hex_fixture("tests/protobuf/fixtures.json", name)
}

fn hex_fixture(file: &str, name: &str) -> Vec<u8> {
    let all: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(super::repo_path(file)).unwrap_or_else(|e| panic!("{file}: {e}")),
    )
    .expect("fixtures are JSON");
    let hex = all[name]
        .as_str()
        .unwrap_or_else(|| panic!("no fixture {name} in {file}"));
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}
