//! `schema_registry` in the bridge file: where the schemas of encoded
//! routes are registered and looked up.

use crate::secret::Secret;
use serde::Deserialize;
use std::path::PathBuf;

/// A Confluent-compatible schema registry (Confluent Schema Registry,
/// Apicurio's `/apis/ccompat/v7`, Redpanda, Karapace).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of the Confluent API, e.g. `http://registry:8081` or
    /// `http://apicurio:8080/apis/ccompat/v7`.
    pub url: String,
    /// HTTP basic authentication.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password, read instead of `password`.
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates for an `https` registry with a private CA
    /// (replaces the public roots).
    pub ca_file: Option<PathBuf>,
    /// Each request to the registry, at most.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Register a route's schema at start-up (the default), or only look
    /// it up, for registries where producers may not register: then a
    /// schema not registered already stops the start.
    #[serde(default = "default_true")]
    pub auto_register: bool,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_true() -> bool {
    true
}
