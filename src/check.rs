//! `check`: compiles every route and command route of a configuration
//! without connecting to anything but a schema registry (asked whether the
//! encoded routes' schemas are compatible, when one is configured and
//! reachable), and reports what the bridge would do
//! (routes in precedence order, M2M trees, subscriptions, command routes)
//! or every problem with its file, line and field.

use crate::command::CommandTable;
use crate::config::{Config, ConfigError, ConfigErrors};
use crate::route::RouteTable;
use std::fmt::Write;
use std::path::Path;

/// The report `check` prints, or every configuration error at once (route
/// and command errors together).
pub fn run(path: &Path) -> Result<String, ConfigErrors> {
    let config = Config::load(path)?;
    let (mut table, commands) = match (RouteTable::compile(&config), CommandTable::compile(&config))
    {
        (Ok(r), Ok(k)) => (r, k),
        (Err(mut a), Err(b)) => {
            a.0.extend(b.0);
            return Err(a);
        }
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    let mut out = route_table_text(&table);
    if let Some(group) = &config.bridge.mqtt.share_group {
        let _ = write!(
            out,
            "\n(each subscribed in share group `{group}`: $share/{group}/<filter>)"
        );
    }
    if let Some(partition) = &config.bridge.partition {
        if let Ok(p) = partition.resolve(&crate::scale::host_name()) {
            let _ = write!(
                out,
                "\npartitioned: this bridge is instance {} of {}, keeping the {} it owns",
                p.slot,
                p.instances,
                match p.by {
                    crate::scale::PartitionBy::Key => "keys",
                    crate::scale::PartitionBy::Topic => "MQTT topics",
                }
            );
        }
    }
    out.push('\n');
    for topic in commands.topics() {
        let _ = writeln!(
            out,
            "command route `{}`: Kafka {topic} -> MQTT",
            commands.route_name(topic)
        );
    }
    for warning in &table.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    for warning in config.certificate_warnings(std::time::SystemTime::now()) {
        let _ = writeln!(out, "warning: {warning}");
    }
    // Against the registry, if it can be reached: an incompatible schema
    // would stop the bridge at start-up, so it fails `check` too.
    let base = config.path.parent().unwrap_or(Path::new("."));
    let (lines, problems) = crate::registry::compatibility_report(
        config.bridge.schema_registry.as_ref(),
        base,
        &mut table,
    );
    for line in lines {
        let _ = writeln!(out, "schema registry: {line}");
    }
    if !problems.is_empty() {
        return Err(ConfigErrors(
            problems
                .into_iter()
                .map(|p| ConfigError::field(&config.path, "schema_registry", p))
                .collect(),
        ));
    }
    Ok(out)
}

/// What `check` prints: every route in precedence order.
pub fn route_table_text(table: &RouteTable) -> String {
    let mut rows = vec![[
        "#".to_string(),
        "route".into(),
        "mqtt filter".into(),
        "format".into(),
        "schema".into(),
        "kafka topic".into(),
        "key".into(),
        "defined at".into(),
    ]];
    for (i, r) in table.routes().iter().enumerate() {
        rows.push([
            (i + 1).to_string(),
            r.name.clone(),
            r.filter.clone(),
            r.format.to_string(),
            if r.schema { "yes" } else { "-" }.into(),
            r.topic.clone(),
            r.key.clone().unwrap_or_else(|| "-".into()),
            r.origin.clone(),
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let trees: Vec<_> = table.m2m_trees().collect();
    if !trees.is_empty() {
        out.push_str("\nM2M trees (kept on MQTT, never produced):");
        for (tree, origin) in trees {
            let _ = write!(out, "\n  {tree}  ({origin})");
        }
        out.push('\n');
    }
    out.push_str("\nsubscriptions:");
    for sub in table.subscriptions() {
        let _ = write!(out, "\n  {} (QoS {})", sub.filter, sub.qos);
    }
    out
}
