//! JSON Schema validation, compiled once per schema file at start-up.

use crate::route::{RejectReason, Rejection};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A compiled schema. Cheap to clone: routes that name the same file share
/// one compiled validator.
#[derive(Clone)]
pub struct Schema {
    validator: Arc<jsonschema::Validator>,
}

/// Schemas already compiled while loading one configuration, by absolute
/// path, so a file many routes name is read and compiled once (and a broken
/// one is reported once per route that names it, with the same text).
#[derive(Debug, Default)]
pub struct Schemas {
    by_path: HashMap<PathBuf, Result<Schema, String>>,
}

impl Schemas {
    /// The schema at `path`, compiled on first use.
    pub fn load(&mut self, path: &Path) -> Result<Schema, String> {
        let absolute = absolute(path)?;
        self.by_path
            .entry(absolute.clone())
            .or_insert_with(|| Schema::compile(path, &absolute))
            .clone()
    }
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("cannot resolve {}: {e}", path.display()))
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schema")
    }
}

/// How many violations a dead-letter reason lists before eliding the rest.
const MAX_REPORTED: usize = 3;

impl Schema {
    /// Loads and compiles a schema file. The draft comes from `$schema`
    /// (2020-12 when absent); relative `$ref`s resolve against the file's own
    /// location, and only `file:` references are fetched: a bridge must not
    /// reach out to the network to understand its own configuration.
    pub fn load(path: &Path) -> Result<Self, String> {
        Self::compile(path, &absolute(path)?)
    }

    /// [`Self::load`] with the absolute path already known; `path` is the
    /// one shown in errors.
    fn compile(path: &Path, absolute: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read schema {}: {e}", path.display()))?;
        let schema: Value = serde_json::from_str(&text)
            .map_err(|e| format!("schema {} is not valid JSON: {e}", path.display()))?;
        let validator = jsonschema::options()
            .with_retriever(FileRetriever)
            .with_base_uri(file_uri(absolute))
            .build(&schema)
            .map_err(|e| format!("schema {} does not compile: {e}", path.display()))?;
        Ok(Self {
            validator: Arc::new(validator),
        })
    }

    /// Validates a payload; the rejection names the first failing instance
    /// paths and what is wrong there.
    pub fn validate(&self, value: &Value) -> Result<(), Rejection> {
        if self.validator.is_valid(value) {
            return Ok(());
        }
        let mut first_path = None;
        let mut messages = Vec::new();
        let mut total = 0;
        for error in self.validator.iter_errors(value) {
            total += 1;
            if messages.len() < MAX_REPORTED {
                let path = error.instance_path().to_string();
                let shown = if path.is_empty() {
                    "/".to_string()
                } else {
                    path.clone()
                };
                messages.push(format!("{shown}: {error}"));
                first_path.get_or_insert(shown);
            }
        }
        let mut detail = messages.join("; ");
        if total > MAX_REPORTED {
            detail.push_str(&format!("; and {} more", total - MAX_REPORTED));
        }
        let rejection = Rejection::new(RejectReason::Schema, detail);
        Err(match first_path {
            Some(path) => rejection.with_path(path),
            None => rejection,
        })
    }
}

/// Resolves `$ref`s to local files only; a bridge must not reach out to
/// the network to understand its own configuration.
struct FileRetriever;

impl jsonschema::Retrieve for FileRetriever {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let text = uri.as_str();
        let Some(path) = text.strip_prefix("file://") else {
            return Err(format!("only local files are resolved, not {text}").into());
        };
        let path = percent_decode(path.split('#').next().unwrap_or_default());
        let data = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        Ok(serde_json::from_str(&data).map_err(|e| format!("{path}: {e}"))?)
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `file://` URI for an absolute path, percent-encoding what a URI
/// cannot hold as is (spaces, `#`, `%`, `?`, non-ASCII).
fn file_uri(path: &Path) -> String {
    // RFC 3986's unreserved characters and the path's slashes stay.
    const KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'/');
    let path = path.to_string_lossy();
    format!(
        "file://{}",
        percent_encoding::utf8_percent_encode(&path, KEPT)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_file_named_twice_is_compiled_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.json"), r#"{"type": "object"}"#).unwrap();
        let mut schemas = Schemas::default();
        let a = schemas.load(&dir.path().join("s.json")).unwrap();
        let b = schemas.load(&dir.path().join("./s.json")).unwrap();
        assert!(Arc::ptr_eq(&a.validator, &b.validator));
        let missing = schemas.load(&dir.path().join("nope.json")).unwrap_err();
        assert!(missing.contains("nope.json"), "{missing}");
    }

    #[test]
    fn validates_with_relative_refs_and_reports_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("common")).unwrap();
        std::fs::write(
            dir.path().join("common/percent.json"),
            r#"{"type": "number", "minimum": 0, "maximum": 100}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t.json"),
            r#"{"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                "required": ["h"], "properties": {"h": {"$ref": "common/percent.json"}}}"#,
        )
        .unwrap();
        let schema = Schema::load(&dir.path().join("t.json")).unwrap();
        assert!(schema.validate(&json!({"h": 40})).is_ok());
        let e = schema.validate(&json!({"h": 140})).unwrap_err();
        assert_eq!(e.reason, RejectReason::Schema);
        assert_eq!(e.path.as_deref(), Some("/h"));
        assert!(
            e.detail
                .starts_with("/h: 140 is greater than the maximum of 100"),
            "{}",
            e.detail
        );
        let e = schema.validate(&json!({})).unwrap_err();
        assert_eq!(e.path.as_deref(), Some("/"));
        assert!(
            e.detail.contains("\"h\" is a required property"),
            "{}",
            e.detail
        );
    }

    #[test]
    fn paths_with_spaces_and_hashes_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("my schemas #1");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("n.json"), r#"{"type": "number"}"#).unwrap();
        std::fs::write(
            sub.join("t.json"),
            r#"{"properties": {"a": {"$ref": "n.json"}}}"#,
        )
        .unwrap();
        let schema = Schema::load(&sub.join("t.json")).unwrap();
        assert!(schema.validate(&json!({"a": 1})).is_ok());
        assert!(schema.validate(&json!({"a": "x"})).is_err());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        std::fs::write(&p, "{").unwrap();
        assert!(Schema::load(&p).unwrap_err().contains("is not valid JSON"));
        std::fs::write(&p, r#"{"type": 5}"#).unwrap();
        assert!(Schema::load(&p).unwrap_err().contains("does not compile"));
        assert!(Schema::load(&dir.path().join("none.json"))
            .unwrap_err()
            .contains("cannot read"));
    }
}
