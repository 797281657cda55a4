//! The integration tests, one module per concern, in one test binary.
//!
//! One binary rather than one per file: cargo runs test binaries one after
//! another, and most of these tests wait on brokers rather than compute, so
//! in one binary they overlap (`RUST_TEST_THREADS` in `.cargo/config.toml`).
//! The rig is also shared: one test Kafka broker for the process, one port
//! registry, and `tests/common` compiled and linked once.
//!
//! Run one concern with a filter: `cargo test --test suite exactly_once::`.

#[path = "../common/mod.rs"]
mod common;

mod bridge_end_to_end;
mod cli;
mod commands;
mod exactly_once;
mod hostile_commands;
mod hostile_input;
mod kafka_cluster;
mod kafka_errors;
mod kafka_failover;
mod kafka_guard;
mod kafka_outage;
mod kafka_security;
mod logs;
mod metrics;
mod probes;
mod prometheus;
mod properties;
mod protobuf;
mod registry;
mod reload;
mod scale;
mod sparkplug;
mod state_store;
mod tls;
