//! The schema registry: records in its wire format (`kafka.encoding`),
//! schemas registered or looked up once per configuration.
//!
//! `config` is the bridge file's `schema_registry`, `client` the
//! Confluent-compatible REST API, `encoding` a route's compiled encoder.
//! [`resolve`] gives every encoded route of a route table its schema id,
//! before the table is used: at start-up, on reload, in `translate`.

mod client;
mod config;
mod encoding;

pub use client::{Compatibility, RegistryClient, RegistryError, SchemaText};
pub use config::RegistryConfig;
pub use encoding::Encoding;

use crate::route::RouteTable;
use std::path::Path;

/// Why a route table's schemas could not all be given an id: one line per
/// route (or one for the registry itself).
#[derive(Debug, thiserror::Error)]
#[error("schema registry: {}", .0.join("; "))]
pub struct RegistryFailure(pub Vec<String>);

/// Gives every encoded route of `table` its schema id, registering the
/// schemas (or, with `auto_register: false`, only looking them up).
/// Blocking: call it off the async runtime. Nothing to do, and no
/// registry needed, when no route encodes.
pub fn resolve_table(
    config: Option<&RegistryConfig>,
    base: &Path,
    table: &mut RouteTable,
) -> Result<(), RegistryFailure> {
    if !table.has_encodings() {
        return Ok(());
    }
    let Some(config) = config else {
        // The route compiler refuses encodings without a registry.
        return Err(RegistryFailure(vec!["not configured".into()]));
    };
    let client =
        RegistryClient::new(config, base).map_err(|e| RegistryFailure(vec![e.to_string()]))?;
    let missing = if config.auto_register {
        Missing::Register
    } else {
        Missing::Refuse
    };
    resolve(&client, table.encodings_mut(), missing).map_err(RegistryFailure)
}

/// For `translate`: each encoding's id as the registry holds it now,
/// looked up, never registered (a dry run changes nothing). One not
/// registered yet, or a registry not reachable, gets id 0 and a note.
pub fn look_up_table(
    config: Option<&RegistryConfig>,
    base: &Path,
    table: &mut RouteTable,
) -> Vec<String> {
    let Some(config) = config.filter(|_| table.has_encodings()) else {
        return Vec::new();
    };
    let client = match RegistryClient::new(config, base) {
        Ok(client) => client,
        Err(e) => return vec![e.to_string()],
    };
    let mut notes = Vec::new();
    for (route, encoding) in table.encodings_mut() {
        match client.lookup(encoding.subject(), encoding.schema()) {
            Ok(Some(id)) => encoding.set_id(id),
            Ok(None) => {
                encoding.set_id(0);
                notes.push(format!(
                    "{route}: schema not registered under subject `{}` yet (the bridge registers it at start-up); shown with id 0",
                    encoding.subject()
                ));
            }
            Err(e) => {
                encoding.set_id(0);
                notes.push(format!("{route}: {e}; shown with id 0"));
            }
        }
    }
    notes
}

/// For `check`: whether each encoding's schema could be registered (its
/// subject's latest version and compatibility rule decide). Returns the
/// report lines and the incompatible ones as problems; a registry that
/// cannot be reached is a line, not a problem (`check` also runs where
/// the registry is not reachable).
pub fn compatibility_report(
    config: Option<&RegistryConfig>,
    base: &Path,
    table: &mut RouteTable,
) -> (Vec<String>, Vec<String>) {
    let Some(config) = config.filter(|_| table.has_encodings()) else {
        return (Vec::new(), Vec::new());
    };
    let client = match RegistryClient::new(config, base) {
        Ok(client) => client,
        Err(e) => return (Vec::new(), vec![e.to_string()]),
    };
    let (mut lines, mut problems) = (Vec::new(), Vec::new());
    for (route, encoding) in table.encodings_mut() {
        let subject = encoding.subject();
        match client.compatibility(subject, encoding.schema()) {
            Ok(Compatibility::NewSubject) => lines.push(format!(
                "{route}: subject `{subject}` is new; the schema would be its first version"
            )),
            Ok(Compatibility::Compatible) => lines.push(format!(
                "{route}: compatible with the latest version of subject `{subject}`"
            )),
            Ok(Compatibility::Incompatible(why)) => problems.push(format!(
                "{route}: incompatible with the latest version of subject `{subject}`{}{}",
                if why.is_empty() { "" } else { ": " },
                why.join("; ")
            )),
            Err(RegistryError::Unreachable { url, error }) => {
                lines.push(format!(
                    "warning: schema registry {url} not reachable ({error}): compatibility not checked"
                ));
                break;
            }
            // Every route would say the same.
            Err(e @ RegistryError::Tls { .. }) => {
                problems.push(e.to_string());
                break;
            }
            Err(e) => problems.push(format!("{route}: {e}")),
        }
    }
    (lines, problems)
}

/// What [`resolve`] does with a schema the subject does not hold yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Register it (start-up and reload with `auto_register`).
    Register,
    /// Say so: it is an error (`auto_register: false`).
    Refuse,
}

/// Gives each encoding its schema id, registering the schema (or only
/// looking it up) as `missing` says. Each route's failure is one message,
/// naming the route: all of them, not just the first.
pub fn resolve<'a>(
    client: &RegistryClient,
    encodings: impl Iterator<Item = (String, &'a mut Encoding)>,
    missing: Missing,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for (route, encoding) in encodings {
        let subject = encoding.subject().to_string();
        let found = match missing {
            Missing::Register => client.register(&subject, encoding.schema()).map(Some),
            Missing::Refuse => client.lookup(&subject, encoding.schema()),
        };
        match found {
            Ok(Some(id)) => {
                tracing::info!(%route, subject, id, "schema id from the registry");
                encoding.set_id(id);
            }
            Ok(None) => problems.push(format!(
                "{route}: the schema is not registered under subject `{subject}`, and schema_registry.auto_register is false"
            )),
            // Every route would say the same, each after a handshake.
            Err(e @ RegistryError::Tls { .. }) => {
                problems.push(e.to_string());
                break;
            }
            Err(e) => problems.push(format!("{route}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}
