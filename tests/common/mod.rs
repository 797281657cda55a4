//! Shared test support: real mosquitto and Kafka, the bridge in-process or
//! as the real binary, publishing to MQTT and reading back from Kafka.
// Each test binary compiles this module and uses a part of it.
#![allow(dead_code, unused_imports)]

pub mod bridge;
pub mod certs;
pub mod config;
pub mod device;
pub mod fixtures;
pub mod kafka;
pub mod landed;
pub mod metrics;
pub mod mosquitto;
pub mod ports;
pub mod process;
pub mod prometheus;
pub mod publish;
pub mod registry;
pub mod repo;
pub mod rig;
pub mod topics;

pub use bridge::{await_token, Bridge};
pub use config::ConfigBuilder;
pub use device::Device;
pub use landed::{
    assert_every_seq, distinct_seqs, read_committed, read_committed_distinct,
    read_committed_until_quiet, Landed,
};
pub use metrics::MetricsEndpoint;
pub use process::{die_with_parent, BridgeFiles, BridgeProcess};
pub use publish::{publish_all, telemetry, telemetry_messages, Publish};
pub use repo::repo_path;
pub use rig::Rig;
pub use topics::{unique, Topics};

/// `text` percent-encoded but for RFC 3986's unreserved characters: one
/// URL path segment or query value.
pub fn percent_encode(text: &str) -> String {
    const KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, KEPT).to_string()
}
