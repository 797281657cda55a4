//! `translate`: the dry run of one message through the mapping files,
//! printed as the record (or relay, or dead letter) the bridge would make.

use crate::config::Config;
use crate::kafka;
use crate::mqtt::{MqttMessage, Qos};
use crate::route::{Outcome, RouteTable};
use crate::sparkplug::Sessions;
use anyhow::{bail, Context as _};
use std::fmt::Write;
use std::path::Path;
use std::process::ExitCode;

/// `translate` exit codes: 0 produced, 3 dead-lettered, 4 unrouted, so
/// scripts can assert on mappings without parsing output (1 is a failure,
/// 2 a usage error, 78 a configuration error).
pub const EXIT_DEAD_LETTER: u8 = 3;
pub const EXIT_UNROUTED: u8 = 4;

/// Runs the `translate` dry run and prints the outcome.
pub fn run(
    config: &Path,
    topic: &str,
    payload: &str,
    properties: &[String],
    qos: u8,
    births: &[String],
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let mut table = RouteTable::compile(&config)?;
    let base = config.path.parent().unwrap_or(std::path::Path::new("."));
    for note in
        crate::registry::look_up_table(config.bridge.schema_registry.as_ref(), base, &mut table)
    {
        eprintln!("note: {note}");
    }
    let bytes = read_payload(payload)?;
    // Routed first, as the bridge would have: what they teach (Sparkplug
    // aliases) is what the message is decoded with.
    let mut sparkplug = Sessions::default();
    for birth in births {
        let Some((topic, payload)) = birth.split_once('=') else {
            bail!("--birth {birth:?} must be TOPIC=PAYLOAD or TOPIC=@path");
        };
        let outcome = table.route_with(
            &MqttMessage::new(topic, read_payload(payload)?),
            &mut sparkplug,
        );
        if let Outcome::DeadLetter { rejection, .. } = &outcome {
            bail!("--birth on {topic} would be dead-lettered: {rejection}");
        }
    }
    let Some(qos) = Qos::from_u8(qos) else {
        bail!("--qos must be 0, 1 or 2");
    };
    let mut message = MqttMessage::new(topic, bytes);
    message.qos = qos;
    for property in properties {
        let Some((name, value)) = property.split_once('=') else {
            bail!("--property {property:?} must be NAME=VALUE");
        };
        message
            .user_properties
            .push((name.to_string(), value.to_string()));
    }
    let outcome = table.route_with(&message, &mut sparkplug);
    print!("{}", outcome_text(&table, &outcome));
    Ok(match outcome {
        Outcome::Forward { .. } | Outcome::Relay { .. } => ExitCode::SUCCESS,
        Outcome::DeadLetter { .. } => ExitCode::from(EXIT_DEAD_LETTER),
        Outcome::Unrouted | Outcome::KeptOnMqtt => ExitCode::from(EXIT_UNROUTED),
    })
}

/// A payload given on the command line, or `@path` to read it from a file
/// (binary payloads: Sparkplug B, raw).
fn read_payload(payload: &str) -> anyhow::Result<Vec<u8>> {
    Ok(match payload.strip_prefix('@') {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read payload file {path}"))?
        }
        None => payload.as_bytes().to_vec(),
    })
}

/// What `translate` prints for an outcome.
pub fn outcome_text(table: &RouteTable, outcome: &Outcome) -> String {
    let mut out = String::new();
    match outcome {
        Outcome::Unrouted => {
            out.push_str("UNROUTED: no route matches this topic; the message would be acknowledged and dropped\n");
        }
        Outcome::KeptOnMqtt => {
            out.push_str("KEPT ON MQTT: the topic is in a declared M2M tree; the message would be acknowledged and never produced to Kafka\n");
        }
        Outcome::Forward {
            route,
            record,
            also,
        } => {
            let summary = &table.routes()[*route];
            let _ = writeln!(
                out,
                "PRODUCE via route `{}` ({})",
                summary.name, summary.origin
            );
            record_text(&mut out, record);
            also_text(&mut out, also);
        }
        Outcome::Relay { route, publish } => {
            let summary = &table.routes()[*route];
            let _ = writeln!(
                out,
                "RELAY via route `{}` ({}): published back to MQTT, nothing to Kafka",
                summary.name, summary.origin
            );
            let _ = writeln!(out, "topic:     {}", publish.topic);
            let _ = writeln!(out, "qos:       {}", publish.qos);
            let _ = writeln!(out, "retain:    {}", publish.retain);
            let _ = writeln!(out, "payload ({} bytes):", publish.payload.len());
            let _ = writeln!(out, "{}", String::from_utf8_lossy(&publish.payload));
        }
        Outcome::DeadLetter {
            route,
            record,
            rejection,
            also,
        } => {
            let route = route.map_or("(none)".to_string(), |r| {
                let s = &table.routes()[r];
                format!("`{}` ({})", s.name, s.origin)
            });
            let _ = writeln!(out, "DEAD-LETTER from route {route}");
            let _ = writeln!(out, "reason:    {}", rejection.reason.as_str());
            let _ = writeln!(out, "detail:    {}", rejection.detail);
            if let Some(path) = &rejection.path {
                let _ = writeln!(out, "path:      {path}");
            }
            record_text(&mut out, record);
            also_text(&mut out, also);
        }
    }
    out
}

/// The further records of an outcome, in the same transaction.
fn also_text(out: &mut String, also: &[kafka::Record]) {
    for (n, record) in also.iter().enumerate() {
        let _ = writeln!(out, "AND PRODUCE ({} of {}):", n + 1, also.len());
        record_text(out, record);
    }
}

fn record_text(out: &mut String, record: &kafka::Record) {
    let _ = writeln!(out, "topic:     {}", record.topic);
    let _ = writeln!(
        out,
        "key:       {}",
        record.key.as_deref().unwrap_or("(none)")
    );
    let time = chrono::DateTime::from_timestamp_millis(record.timestamp_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    let _ = writeln!(out, "timestamp: {} ({time})", record.timestamp_ms);
    let _ = writeln!(out, "headers:");
    for (name, value) in &record.headers {
        let _ = writeln!(out, "  {name}: {}", String::from_utf8_lossy(value));
    }
    let _ = writeln!(out, "value ({} bytes):", record.value.len());
    // The schema registry's wire format: magic byte 0, the id, the body.
    if let [0, a, b, c, d, body @ ..] = &record.value[..] {
        let id = u32::from_be_bytes([*a, *b, *c, *d]);
        let _ = writeln!(out, "  schema-registry wire format, schema id {id}");
        let _ = writeln!(
            out,
            "  body ({} bytes): {}",
            body.len(),
            body.escape_ascii()
        );
        return;
    }
    match serde_json::from_slice::<serde_json::Value>(&record.value) {
        Ok(json) => {
            let pretty = serde_json::to_string_pretty(&json).unwrap_or_default();
            for line in pretty.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        Err(_) => {
            let _ = writeln!(out, "  {}", record.value.escape_ascii());
        }
    }
}
