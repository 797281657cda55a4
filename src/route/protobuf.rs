//! `format: protobuf`: payloads of a message type from the user's `.proto`
//! file, decoded into the JSON the rest of the pipeline (schema, transform,
//! templates) handles.
//!
//! The file is compiled when the mapping is loaded (protox: pure Rust, no
//! `protoc`), so a syntax error or an unknown message name is a
//! configuration error naming the file and line, not a dead letter per
//! message. The JSON follows protobuf's canonical JSON mapping with three
//! choices made for templates and schemas: field names as written in the
//! `.proto` (`device_id`, not `deviceId`), 64-bit integers as numbers (not
//! strings), and the top-level fields at their default value present
//! (proto3 does not send a 0 or an empty string, and a key template
//! reading such a field must not fail for the one device whose id is 0).

use super::{RejectReason, Rejection};
use prost_reflect::{DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A compiled `format: protobuf`: the message type payloads are decoded as.
#[derive(Debug)]
pub struct ProtobufFormat {
    message: MessageDescriptor,
    /// The top-level fields at their defaults, in field order: what a
    /// decoded payload is completed with.
    defaults: serde_json::Map<String, Value>,
}

/// Defaults are left out while decoding and put back for the top-level
/// fields only: an empty element of a repeated sub-message costs 2 bytes on
/// the wire, and with every default filled in it would become an object of
/// all its fields (a 1 MiB payload of them, about a gigabyte of JSON).
const OPTIONS: SerializeOptions = SerializeOptions::new()
    .use_proto_field_name(true)
    .stringify_64_bit_integers(false)
    .skip_default_fields(true);

const DEFAULTS: SerializeOptions = SerializeOptions::new()
    .use_proto_field_name(true)
    .stringify_64_bit_integers(false)
    .skip_default_fields(false);

impl ProtobufFormat {
    /// Compiles `file` (imports resolved in its directory, then in
    /// `include`, then among Google's well-known types) and finds
    /// `message` (its full name, `package.Message`). The error is for the
    /// field it names.
    pub fn compile(
        file: &Path,
        include: &[PathBuf],
        message: &str,
    ) -> Result<Self, (String, String)> {
        // protox would say "not in any include path" of a missing file.
        if let Err(e) = std::fs::metadata(file) {
            return Err((
                "protobuf.file".to_string(),
                format!("cannot read {}: {e}", file.display()),
            ));
        }
        let pool = compiler(file, include)
            .map(|compiler| compiler.descriptor_pool())
            .map_err(|e| {
                (
                    "protobuf.file".to_string(),
                    format!("{}: {}", file.display(), one_line(&e.to_string())),
                )
            })?;
        let found = pool.get_message_by_name(message).ok_or_else(|| {
            let mut known: Vec<String> = pool
                .all_messages()
                .filter(|m| !m.full_name().starts_with("google.protobuf."))
                .map(|m| m.full_name().to_string())
                .collect();
            known.sort();
            known.truncate(20);
            (
                "protobuf.message".to_string(),
                format!(
                    "`{message}` is not a message of {} (full names, with the package: {})",
                    file.display(),
                    if known.is_empty() {
                        "it declares none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })?;
        let defaults = match DynamicMessage::new(found.clone())
            .serialize_with_options(serde_json::value::Serializer, &DEFAULTS)
        {
            Ok(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        Ok(Self {
            message: found,
            defaults,
        })
    }

    /// Every file `file` is compiled from, as read: itself and its
    /// imports, however deep (Google's well-known types are built in and
    /// have none). What `--watch` watches; empty if it does not compile,
    /// which loading the mapping reports.
    pub fn source_files(file: &Path, include: &[PathBuf]) -> Vec<PathBuf> {
        compiler(file, include)
            .map(|compiler| {
                compiler
                    .files()
                    .filter_map(|f| f.path().map(Path::to_path_buf))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Decodes one payload. Not the message type (truncated, a wrong wire
    /// type, nesting past prost's recursion limit) is a `parse` rejection.
    pub fn parse(&self, payload: &[u8]) -> Result<Value, Rejection> {
        let name = self.message.full_name();
        let message = DynamicMessage::decode(self.message.clone(), payload).map_err(|e| {
            Rejection::new(RejectReason::Parse, format!("not a protobuf `{name}`: {e}"))
        })?;
        let decoded = message
            .serialize_with_options(serde_json::value::Serializer, &OPTIONS)
            .map_err(|e| {
                Rejection::new(
                    RejectReason::Parse,
                    format!("protobuf `{name}` has no JSON form: {e}"),
                )
            })?;
        let Value::Object(mut sent) = decoded else {
            // Well-known types (a bare Timestamp) are not objects.
            return Ok(decoded);
        };
        // In field order: the defaults, each replaced by what was sent,
        // then what has presence and was sent (message fields, optionals).
        let mut out = serde_json::Map::with_capacity(self.defaults.len() + sent.len());
        for (field, default) in &self.defaults {
            let value = sent.remove(field).unwrap_or_else(|| default.clone());
            out.insert(field.clone(), value);
        }
        out.extend(sent);
        Ok(Value::Object(out))
    }
}

/// A compiler that has read `file` and its imports (looked up in its
/// directory, then in `include`).
fn compiler(file: &Path, include: &[PathBuf]) -> Result<protox::Compiler, protox::Error> {
    let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let includes: Vec<PathBuf> = std::iter::once(dir.clone())
        .chain(include.iter().cloned())
        .collect();
    let name = file.strip_prefix(&dir).unwrap_or(file);
    let mut compiler = protox::Compiler::new(&includes)?;
    compiler.include_imports(true).open_file(name)?;
    Ok(compiler)
}

/// An error of several lines (protox's diagnostics) as one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PROTO: &str = r#"
syntax = "proto3";
package acme.sensors.v1;
import "google/protobuf/timestamp.proto";
import "units.proto";

message Reading {
  string device_id = 1;
  double temperature_c = 2;
  int64 counter = 3;
  bool alarm = 4;
  Unit unit = 5;
  repeated float samples = 6;
  google.protobuf.Timestamp taken_at = 7;
  bytes raw = 8;
  map<string, string> tags = 9;
}
"#;
    const UNITS: &str = "syntax = \"proto3\";\npackage acme.sensors.v1;\nenum Unit { UNIT_UNSPECIFIED = 0; CELSIUS = 1; }\n";

    fn compiled(dir: &Path, message: &str) -> Result<ProtobufFormat, (String, String)> {
        std::fs::write(dir.join("reading.proto"), PROTO).unwrap();
        std::fs::write(dir.join("units.proto"), UNITS).unwrap();
        ProtobufFormat::compile(&dir.join("reading.proto"), &[], message)
    }

    /// A payload encoded by hand, field by field (wire format), so that
    /// the decoder is checked against the encoding, not against itself.
    fn reading() -> Vec<u8> {
        let mut b = vec![0x0a, 3, b'u', b'-', b'7']; // 1: "u-7"
        b.push(0x11); // 2: double 21.5
        b.extend(21.5f64.to_le_bytes());
        b.extend([
            0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]); // 3: -1
        b.extend([0x28, 1]); // 5: CELSIUS
        b.extend([0x32, 8]); // 6: packed floats
        b.extend(1.5f32.to_le_bytes());
        b.extend(2.5f32.to_le_bytes());
        b.extend([0x3a, 2, 0x08, 0x2a]); // 7: seconds 42
        b
    }

    #[test]
    fn payloads_become_json_with_proto_names_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let format = compiled(dir.path(), "acme.sensors.v1.Reading").unwrap();
        let value = format.parse(&reading()).unwrap();
        assert_eq!(
            value,
            json!({
                "device_id": "u-7", "temperature_c": 21.5, "counter": -1,
                "alarm": false, "unit": "CELSIUS", "samples": [1.5, 2.5],
                "taken_at": "1970-01-01T00:00:42Z", "raw": "", "tags": {}
            })
        );
        // Empty is a valid message: every field at its default.
        assert_eq!(format.parse(&[]).unwrap()["device_id"], "");
    }

    /// Empty elements of a repeated sub-message stay empty objects: only
    /// top-level defaults are filled in, so 2 bytes on the wire cannot
    /// become an object of every field.
    #[test]
    fn nested_defaults_are_not_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("batch.proto"),
            "syntax = \"proto3\";\nmessage Item { int32 a = 1; string b = 2; bool c = 3; }\nmessage Batch { uint32 count = 1; repeated Item items = 2; }\n",
        )
        .unwrap();
        let format =
            ProtobufFormat::compile(&dir.path().join("batch.proto"), &[], "Batch").unwrap();
        // Three empty items.
        let value = format.parse(&[0x12, 0, 0x12, 0, 0x12, 0]).unwrap();
        assert_eq!(value, json!({"count": 0, "items": [{}, {}, {}]}));
    }

    #[test]
    fn what_is_not_the_message_is_a_parse_rejection() {
        let dir = tempfile::tempdir().unwrap();
        let format = compiled(dir.path(), "acme.sensors.v1.Reading").unwrap();
        for bad in [&b"{\"json\": 1}"[..], &[0x0a, 50, b'x'], &[0xff; 12]] {
            let rejection = format.parse(bad).unwrap_err();
            assert_eq!(rejection.reason, RejectReason::Parse);
            assert!(
                rejection
                    .detail
                    .starts_with("not a protobuf `acme.sensors.v1.Reading`"),
                "{}",
                rejection.detail
            );
        }
        // Nested past the recursion limit: refused, not a stack overflow.
        std::fs::write(
            dir.path().join("deep.proto"),
            "syntax = \"proto3\";\nmessage Deep { Deep next = 1; }\n",
        )
        .unwrap();
        let deep = ProtobufFormat::compile(&dir.path().join("deep.proto"), &[], "Deep").unwrap();
        let mut payload = Vec::new();
        for _ in 0..200 {
            let mut outer = vec![0x0a];
            let mut len = payload.len();
            loop {
                let byte = (len & 0x7f) as u8;
                len >>= 7;
                if len == 0 {
                    outer.push(byte);
                    break;
                }
                outer.push(byte | 0x80);
            }
            outer.extend(payload);
            payload = outer;
        }
        assert_eq!(
            deep.parse(&payload).unwrap_err().reason,
            RejectReason::Parse
        );
    }

    #[test]
    fn compile_errors_name_the_field_and_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let (field, detail) = compiled(dir.path(), "Reading").unwrap_err();
        assert_eq!(field, "protobuf.message");
        assert!(detail.contains("acme.sensors.v1.Reading"), "{detail}");

        std::fs::write(
            dir.path().join("bad.proto"),
            "syntax = \"proto3\";\nmessage { }\n",
        )
        .unwrap();
        let (field, detail) =
            ProtobufFormat::compile(&dir.path().join("bad.proto"), &[], "X").unwrap_err();
        assert_eq!(field, "protobuf.file");
        assert!(detail.contains("bad.proto"), "{detail}");

        let (field, detail) =
            ProtobufFormat::compile(&dir.path().join("missing.proto"), &[], "X").unwrap_err();
        assert_eq!(field, "protobuf.file");
        assert!(detail.starts_with("cannot read "), "{detail}");
        assert!(detail.contains("missing.proto"), "{detail}");
    }
}
