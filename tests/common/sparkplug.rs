//! Sparkplug B payloads made by an independent encoder (Eclipse Tahu's
//! JavaScript library; `tests/sparkplug/fixtures.js`), by name.

/// The payload `tests/sparkplug/fixtures.json` holds under `name`.
pub fn fixture(name: &str) -> Vec<u8> {
    let all: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(super::repo_path("tests/sparkplug/fixtures.json"))
            .expect("tests/sparkplug/fixtures.json"),
    )
    .expect("fixtures are JSON");
    let hex = all[name]
        .as_str()
        .unwrap_or_else(|| panic!("no Sparkplug fixture {name}"));
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}
