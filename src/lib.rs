//! MQTT-to-Kafka bridge and protocol translator.
//!
//! The path of one message, which is also the order of the folders:
//!
//! 1. [`mqtt`] reads a PUBLISH from a persistent session and puts it, with
//!    its ack token, into a bounded channel (full channel = stop reading;
//!    the broker holds the backlog).
//! 2. [`delivery`] takes it and asks [`route`] what it becomes: the first
//!    route whose topic filter matches parses the payload (formats),
//!    validates it (`route::schema`), reshapes it (transform) and renders
//!    topic, key, headers and timestamp from templates. Any failure becomes
//!    a dead-letter record carrying the reason (`route::reject`).
//! 3. [`delivery`] enqueues the record in the open Kafka transaction
//!    ([`kafka`]), commits when the batch is full or old enough, and only
//!    then acknowledges the batch's MQTT messages, in arrival order. With
//!    exactly-once delivery, each transaction also carries the packet ids it
//!    produced, so a message the broker resends is recognised and not
//!    produced again.
//!
//! The other direction, [`command`], consumes command topics from Kafka and
//! publishes them to devices through the same MQTT session.
//!
//! Dependencies point one way. [`mqtt`] and [`kafka`] are at the bottom and
//! know nothing of the rest (each owns its own config section and
//! vocabulary: `mqtt::Qos`, `mqtt::Subscription`, `kafka::Record`);
//! [`config`] loads files into them; [`route`] sits on those; [`delivery`]
//! and [`command`] on route; [`app`] wires everything and owns shutdown.
//! [`reload`] swaps a new configuration in while the bridge runs.
//! [`check`] and [`translate`] are the dry-run commands, [`cli`] the
//! command line, [`telemetry`] the metrics, probes and logs, [`secret`]
//! what never gets printed, [`tls`] the certificate and key files both
//! sides use, [`sparkplug`] the Sparkplug B payloads and edge-node sessions
//! a `format: sparkplug_b` route decodes with, [`backoff`] the one retry wait, [`fault`] the crash points the
//! exactly-once tests use (compiled in only with the `fault` feature), and
//! `demo` runs it all in-process (the default-on `demo` feature).

pub mod app;
pub mod backoff;
pub mod check;
pub mod cli;
pub mod command;
pub mod config;
pub mod delivery;
#[cfg(feature = "demo")]
pub mod demo;
pub mod fault;
pub mod kafka;
pub mod mqtt;
pub mod registry;
pub mod reload;
pub mod route;
pub mod scale;
pub mod secret;
pub mod sparkplug;
pub mod telemetry;
pub mod tls;
pub mod translate;
