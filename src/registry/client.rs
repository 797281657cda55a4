//! The registry's Confluent-compatible REST API, as far as a producer
//! needs it: register a schema, look one up, test compatibility.
//!
//! Blocking (ureq): the calls happen when a configuration is loaded (start,
//! reload, `check`, `translate`), never per message, so they run on a
//! blocking thread and need no second HTTP stack in the runtime.

use super::RegistryConfig;
use serde::Deserialize;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry {url} not reachable: {error}")]
    Unreachable { url: String, error: String },
    /// Reached, but its certificate is not trusted (or the handshake
    /// failed): a configuration problem, not an outage.
    #[error("schema registry {url} failed the TLS handshake: {error} (check that schema_registry.ca_file holds the CA that signed the registry's certificate, that the certificate is for the URL's host and still valid, and that the URL is https on an https port)")]
    Tls { url: String, error: String },
    /// The registry answered with an error (incompatible, invalid schema,
    /// not authorised).
    #[error("schema registry refused {what} for subject `{subject}`: HTTP {status}: {message}")]
    Refused {
        what: &'static str,
        subject: String,
        status: u16,
        message: String,
    },
    #[error("schema registry answered {what} for subject `{subject}` with something unexpected: {detail}")]
    Unexpected {
        what: &'static str,
        subject: String,
        detail: String,
    },
    #[error("schema_registry.ca_file {path}: {error}")]
    Ca { path: String, error: String },
}

/// A schema as the registry takes it.
#[derive(Debug, Clone)]
pub struct SchemaText {
    /// `AVRO`, `PROTOBUF` or `JSON`.
    pub kind: &'static str,
    pub text: String,
}

/// What the registry says of a schema against a subject's latest version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compatibility {
    /// The subject has no version yet: anything goes.
    NewSubject,
    Compatible,
    /// Incompatible, with the registry's reasons (if it gave any).
    Incompatible(Vec<String>),
}

/// A client of one registry.
pub struct RegistryClient {
    agent: ureq::Agent,
    url: String,
    auth: Option<String>,
}

/// The registry's error body (`{"error_code": 409, "message": "..."}`).
#[derive(Deserialize)]
struct ErrorBody {
    message: Option<String>,
}

#[derive(Deserialize)]
struct IdBody {
    id: u32,
}

#[derive(Deserialize)]
struct CompatibilityBody {
    is_compatible: bool,
    #[serde(default)]
    messages: Vec<String>,
}

impl RegistryClient {
    /// A client for `config` (with its password read already; relative
    /// paths resolved against `base`).
    pub fn new(config: &RegistryConfig, base: &Path) -> Result<Self, RegistryError> {
        let mut builder = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
            // Error statuses carry the registry's reason in their body.
            .http_status_as_error(false);
        if let Some(ca) = &config.ca_file {
            let path = base.join(ca);
            let ca_error = |error: String| RegistryError::Ca {
                path: path.display().to_string(),
                error,
            };
            let pem = std::fs::read(&path).map_err(|e| ca_error(e.to_string()))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("holds no PEM certificate".into()));
            }
            builder = builder.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        }
        let auth = config.username.as_ref().map(|user| {
            use base64::Engine;
            let password = config.password.as_ref().map_or("", |p| p.expose());
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        });
        Ok(Self {
            agent: builder.build().new_agent(),
            url: config.url.trim_end_matches('/').to_string(),
            auth,
        })
    }

    /// Registers `schema` under `subject` and returns its id; the same
    /// schema registered already gets its existing id.
    pub fn register(&self, subject: &str, schema: &SchemaText) -> Result<u32, RegistryError> {
        let path = format!("/subjects/{}/versions", encode(subject));
        let (status, body) = self.post(&path, schema)?;
        self.id_from("registering the schema", subject, status, &body)
    }

    /// The id of `schema` under `subject`, or `None` if it is not
    /// registered there.
    pub fn lookup(&self, subject: &str, schema: &SchemaText) -> Result<Option<u32>, RegistryError> {
        let path = format!("/subjects/{}", encode(subject));
        let (status, body) = self.post(&path, schema)?;
        // The subject (40401) or the schema under it (40403) not found.
        if status == 404 && matches!(error_code(&body), Some(40401 | 40403)) {
            return Ok(None);
        }
        self.id_from("looking the schema up", subject, status, &body)
            .map(Some)
    }

    /// Whether `schema` could be registered under `subject` (its latest
    /// version and the subject's compatibility rule decide).
    pub fn compatibility(
        &self,
        subject: &str,
        schema: &SchemaText,
    ) -> Result<Compatibility, RegistryError> {
        let path = format!(
            "/compatibility/subjects/{}/versions/latest?verbose=true",
            encode(subject)
        );
        let (status, body) = self.post(&path, schema)?;
        // Only "no such subject" (40401) or "no such version" (40402): any
        // other 404, such as a URL without Apicurio's `/apis/ccompat/v7`,
        // is a refusal, not a green `check`.
        if status == 404 && matches!(error_code(&body), Some(40401 | 40402)) {
            return Ok(Compatibility::NewSubject);
        }
        if !(200..300).contains(&status) {
            return Err(refused("testing compatibility", subject, status, &body));
        }
        let answer: CompatibilityBody =
            serde_json::from_str(&body).map_err(|e| RegistryError::Unexpected {
                what: "testing compatibility",
                subject: subject.to_string(),
                detail: format!("{e}: {}", crate::route::reject::truncate(&body, 200)),
            })?;
        Ok(if answer.is_compatible {
            Compatibility::Compatible
        } else {
            Compatibility::Incompatible(answer.messages)
        })
    }

    fn post(&self, path: &str, schema: &SchemaText) -> Result<(u16, String), RegistryError> {
        let mut body = json!({ "schema": schema.text });
        if schema.kind != "AVRO" {
            body["schemaType"] = json!(schema.kind);
        }
        let mut request = self
            .agent
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .header(
                "Accept",
                "application/vnd.schemaregistry.v1+json, application/json",
            );
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        let mut response = request
            .send_json(&body)
            .map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(1024 * 1024)
            .read_to_string()
            .map_err(|e| RegistryError::Unreachable {
                url: self.url.clone(),
                error: e.to_string(),
            })?;
        Ok((status, text))
    }

    /// A request that got no answer: refused by TLS, or not reachable.
    fn transport_error(&self, error: ureq::Error) -> RegistryError {
        let tls = match &error {
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => true,
            // How ureq reports a certificate rustls refused.
            ureq::Error::Io(io) => io
                .get_ref()
                .is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()),
            _ => false,
        };
        let (url, error) = (self.url.clone(), error.to_string());
        if tls {
            RegistryError::Tls { url, error }
        } else {
            RegistryError::Unreachable { url, error }
        }
    }

    fn id_from(
        &self,
        what: &'static str,
        subject: &str,
        status: u16,
        body: &str,
    ) -> Result<u32, RegistryError> {
        if !(200..300).contains(&status) {
            return Err(refused(what, subject, status, body));
        }
        serde_json::from_str::<IdBody>(body)
            .map(|b| b.id)
            .map_err(|e| RegistryError::Unexpected {
                what,
                subject: subject.to_string(),
                detail: format!("{e}: {}", crate::route::reject::truncate(body, 200)),
            })
    }
}

fn refused(what: &'static str, subject: &str, status: u16, body: &str) -> RegistryError {
    let message = serde_json::from_str::<ErrorBody>(body)
        .ok()
        .and_then(|b| b.message)
        .unwrap_or_else(|| crate::route::reject::truncate(body, 300).to_string());
    RegistryError::Refused {
        what,
        subject: subject.to_string(),
        status,
        message,
    }
}

/// The registry's own error code in an error body (`40401`: no such
/// subject).
fn error_code(body: &str) -> Option<u32> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("error_code")?
        .as_u64()
        .and_then(|c| u32::try_from(c).ok())
}

/// A subject as one URL path segment: RFC 3986's unreserved characters
/// stay, the rest is percent-encoded (a subject may hold `/` or spaces).
fn encode(subject: &str) -> String {
    percent_encoding::utf8_percent_encode(subject, NOT_UNRESERVED).to_string()
}

/// Every byte but RFC 3986's unreserved characters.
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_are_one_path_segment() {
        assert_eq!(
            super::encode("hvac.telemetry-value"),
            "hvac.telemetry-value"
        );
        assert_eq!(super::encode("a/b c"), "a%2Fb%20c");
    }
}
