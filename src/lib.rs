//! MQTT-to-Kafka bridge and protocol translator.
//!
//! The path of one message:
//!
//! 1. [`mqtt`] reads a PUBLISH from a persistent session and puts it, with
//!    its ack token, into a bounded channel (full channel = stop reading;
//!    the broker holds the backlog).
//! 2. [`delivery`] takes it and asks [`route`] what it becomes: the first
//!    route whose topic filter matches parses the payload ([`route`]'s
//!    formats), validates it ([`schema`]), reshapes it (transform) and
//!    renders topic, key, headers and timestamp from templates. Any failure
//!    becomes a dead-letter record carrying the reason.
//! 3. [`delivery`] enqueues the record in the open Kafka transaction
//!    ([`kafka`]), commits when the batch is full or old enough, and only
//!    then acknowledges the batch's MQTT messages, in arrival order. With
//!    exactly-once delivery, each transaction also carries the packet ids it
//!    produced, so a message the broker resends is recognised and not
//!    produced again.
//!
//! [`config`] loads the YAML files, [`telemetry`] counts everything,
//! [`app`] wires the parts and owns shutdown, [`demo`] runs it all
//! in-process, and [`cli`] is the command line.

pub mod app;
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
pub mod route;
pub mod telemetry;
pub mod translate;
