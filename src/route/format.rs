//! Payload formats: how bytes from MQTT become a JSON value.

use super::protobuf::ProtobufFormat;
use super::{RejectReason, Rejection};
use crate::config::{FieldType, FormatConfig, RouteConfig, TextFormatConfig};
use crate::mqtt::MqttMessage;
use crate::sparkplug::{self, Sessions};
use regex::Regex;
use serde_json::{Map, Number, Value};
use std::path::Path;

/// A compiled payload format.
#[derive(Debug)]
pub enum Format {
    Json,
    Text(TextFormat),
    Raw,
    /// Sparkplug B: decoded with what `Sessions` knows of the edge node.
    SparkplugB,
    /// A message type of the user's `.proto`.
    Protobuf(ProtobufFormat),
}

/// A legacy text format: a regex whose named groups become typed fields,
/// e.g. `T=21.5;H=40` → `{"ambient_c": 21.5, "humidity_pct": 40}`.
#[derive(Debug)]
pub struct TextFormat {
    regex: Regex,
    /// (group index, field name, type), in group order.
    fields: Vec<(usize, String, FieldType)>,
}

impl Format {
    /// Compiles a route's format (files relative to `base`, the mapping
    /// file's directory); errors name the field.
    pub fn compile(route: &RouteConfig, base: &Path) -> Result<Self, (String, String)> {
        let (config, text) = (route.format, route.text.as_ref());
        if config != FormatConfig::Text && text.is_some() {
            return Err(("text".into(), "is only used with `format: text`".into()));
        }
        if config != FormatConfig::Protobuf && route.protobuf.is_some() {
            return Err((
                "protobuf".into(),
                "is only used with `format: protobuf`".into(),
            ));
        }
        Ok(match config {
            FormatConfig::Json => Self::Json,
            FormatConfig::Raw => Self::Raw,
            FormatConfig::SparkplugB => Self::SparkplugB,
            FormatConfig::Protobuf => {
                let Some(protobuf) = &route.protobuf else {
                    return Err((
                        "format".into(),
                        "`format: protobuf` needs a `protobuf` field with `file` and `message`"
                            .into(),
                    ));
                };
                let include: Vec<_> = protobuf.include.iter().map(|d| base.join(d)).collect();
                Self::Protobuf(ProtobufFormat::compile(
                    &base.join(&protobuf.file),
                    &include,
                    &protobuf.message,
                )?)
            }
            FormatConfig::Text => {
                let Some(text) = text else {
                    return Err((
                        "format".into(),
                        "`format: text` needs a `text` field with `pattern` (and optional `fields`)".into(),
                    ));
                };
                Self::Text(TextFormat::compile(text)?)
            }
        })
    }

    /// Whether payloads become JSON (and so can be validated and reshaped).
    pub fn is_structured(&self) -> bool {
        !matches!(self, Self::Raw)
    }

    /// Parses a message's payload; `None` for raw. Sparkplug B reads (and
    /// updates) what `sparkplug` knows of the sender.
    #[cfg(test)]
    pub fn parse(
        &self,
        message: &MqttMessage,
        sparkplug: &mut Sessions,
    ) -> Result<Option<Value>, Rejection> {
        Ok(self
            .parse_as(message, sparkplug, sparkplug::Form::Value)?
            .map(|parsed| parsed.value))
    }

    /// [`Self::parse`]; for Sparkplug B in `form`, which may give the
    /// record's bytes ready and a value of the header fields alone.
    pub fn parse_as(
        &self,
        message: &MqttMessage,
        sparkplug: &mut Sessions,
        form: sparkplug::Form,
    ) -> Result<Option<sparkplug::Decoded>, Rejection> {
        let payload = &message.payload[..];
        let value = match self {
            Self::Raw => return Ok(None),
            Self::SparkplugB => {
                return sparkplug
                    .decode_at(&message.topic, payload, std::time::Instant::now(), form)
                    .map(Some)
                    .map_err(|e| Rejection::new(RejectReason::Sparkplug, e))
            }
            Self::Json => super::strict_json::from_slice(payload).map_err(|e| {
                let reason = if std::str::from_utf8(payload).is_err() {
                    RejectReason::NotUtf8
                } else {
                    RejectReason::Parse
                };
                Rejection::new(reason, format!("invalid JSON: {e}"))
            })?,
            Self::Text(text) => text.parse(payload)?,
            Self::Protobuf(protobuf) => protobuf.parse(payload)?,
        };
        Ok(Some(sparkplug::Decoded { value, bytes: None }))
    }
}

impl TextFormat {
    /// Compiles `format: text`'s pattern and field types.
    pub fn compile(text: &TextFormatConfig) -> Result<Self, (String, String)> {
        // Anchored so a partial match cannot silently drop data.
        let regex = Regex::new(&format!("^(?:{})$", text.pattern))
            .map_err(|e| ("text.pattern".to_string(), regex_error(&e)))?;
        let mut fields = Vec::new();
        for (index, name) in regex.capture_names().enumerate() {
            if let Some(name) = name {
                let kind = text.fields.get(name).copied().unwrap_or(FieldType::String);
                fields.push((index, name.to_string(), kind));
            }
        }
        if fields.is_empty() {
            return Err((
                "text.pattern".into(),
                "has no named groups `(?P<name>...)`, so it would produce no fields".into(),
            ));
        }
        for name in text.fields.keys() {
            if !fields.iter().any(|(_, n, _)| n == name) {
                return Err((
                    format!("text.fields.{name}"),
                    format!("`{name}` is not a named group of the pattern"),
                ));
            }
        }
        Ok(Self { regex, fields })
    }

    fn parse(&self, payload: &[u8]) -> Result<Value, Rejection> {
        let text = std::str::from_utf8(payload).map_err(|e| {
            Rejection::new(RejectReason::NotUtf8, format!("payload is not UTF-8: {e}"))
        })?;
        let text = text.trim_end_matches(['\r', '\n']);
        let caps = self.regex.captures(text).ok_or_else(|| {
            Rejection::new(
                RejectReason::Parse,
                format!(
                    "payload does not match the text pattern: {:?}",
                    truncate(text, 80)
                ),
            )
        })?;
        let mut object = Map::with_capacity(self.fields.len());
        for (index, name, kind) in &self.fields {
            let Some(m) = caps.get(*index) else { continue };
            let raw = m.as_str();
            let value = convert(raw, *kind).ok_or_else(|| {
                Rejection::new(
                    RejectReason::Parse,
                    format!(
                        "field `{name}`: {raw:?} is not a valid {}",
                        type_name(*kind)
                    ),
                )
                .with_path(format!("/{name}"))
            })?;
            object.insert(name.clone(), value);
        }
        Ok(Value::Object(object))
    }
}

fn convert(raw: &str, kind: FieldType) -> Option<Value> {
    match kind {
        FieldType::String => Some(Value::String(raw.to_string())),
        FieldType::Integer => raw.trim().parse::<i64>().ok().map(Value::from),
        FieldType::Float => raw
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number),
        FieldType::Boolean => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "on" | "yes" => Some(Value::Bool(true)),
            "false" | "0" | "off" | "no" => Some(Value::Bool(false)),
            _ => None,
        },
    }
}

fn type_name(kind: FieldType) -> &'static str {
    match kind {
        FieldType::String => "string",
        FieldType::Integer => "integer",
        FieldType::Float => "float",
        FieldType::Boolean => "boolean",
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// Regex errors span several lines with a caret; keep the last line, the
/// one that says what is wrong.
pub(crate) fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(&text);
    format!(
        "invalid regex: {}",
        last.trim().trim_start_matches("error: ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TextFormatConfig;
    use serde_json::json;
    use std::collections::BTreeMap;

    /// Parses `payload` as a message on a topic no format looks at.
    fn parse(f: &Format, payload: &'static [u8]) -> Result<Option<Value>, Rejection> {
        f.parse(&MqttMessage::new("t", payload), &mut Sessions::default())
    }

    fn text(pattern: &str, fields: &[(&str, FieldType)]) -> Format {
        let text = TextFormatConfig {
            pattern: pattern.into(),
            fields: fields
                .iter()
                .map(|(n, t)| (n.to_string(), *t))
                .collect::<BTreeMap<_, _>>(),
        };
        Format::Text(TextFormat::compile(&text).unwrap())
    }

    #[test]
    fn text_format_types_fields() {
        let f = text(
            r"T=(?P<t>[-0-9.]+);H=(?P<h>\d+)(;ON=(?P<on>\w+))?;ID=(?P<id>\w+)",
            &[
                ("t", FieldType::Float),
                ("h", FieldType::Integer),
                ("on", FieldType::Boolean),
            ],
        );
        assert_eq!(
            parse(&f, b"T=21.5;H=40;ON=1;ID=u7\n").unwrap().unwrap(),
            json!({"t": 21.5, "h": 40, "on": true, "id": "u7"})
        );
        assert_eq!(
            parse(&f, b"T=-3;H=40;ID=u7").unwrap().unwrap(),
            json!({"t": -3.0, "h": 40, "id": "u7"})
        );
    }

    #[test]
    fn text_format_rejections() {
        let f = text(r"T=(?P<t>\S+)", &[("t", FieldType::Float)]);
        let e = parse(&f, b"T=warm").unwrap_err();
        assert_eq!(e.reason, RejectReason::Parse);
        assert_eq!(e.detail, "field `t`: \"warm\" is not a valid float");
        assert_eq!(e.path.as_deref(), Some("/t"));
        assert!(parse(&f, b"X=1")
            .unwrap_err()
            .detail
            .contains("does not match"));
        assert_eq!(
            parse(&f, b"T=\xff").unwrap_err().reason,
            RejectReason::NotUtf8
        );
        // Anchored: trailing junk is not silently ignored.
        assert!(parse(&f, b"T=1 extra").is_err());
    }

    #[test]
    fn json_rejections_distinguish_utf8() {
        assert_eq!(
            parse(&Format::Json, b"{\"a\":").unwrap_err().reason,
            RejectReason::Parse
        );
        assert_eq!(
            parse(&Format::Json, b"\xff\xfe").unwrap_err().reason,
            RejectReason::NotUtf8
        );
        assert_eq!(parse(&Format::Json, b"[1]").unwrap().unwrap(), json!([1]));
        assert_eq!(parse(&Format::Raw, b"\xff").unwrap(), None);
    }

    #[test]
    fn text_format_compile_errors() {
        let compile = |p: &str, f: &[&str]| {
            let text = TextFormatConfig {
                pattern: p.into(),
                fields: f
                    .iter()
                    .map(|n| (n.to_string(), FieldType::Integer))
                    .collect(),
            };
            TextFormat::compile(&text).unwrap_err()
        };
        assert_eq!(compile("(", &[]).0, "text.pattern");
        assert!(compile("(", &[]).1.starts_with("invalid regex"));
        assert!(compile("abc", &[]).1.contains("no named groups"));
        assert_eq!(compile("(?P<a>x)", &["b"]).0, "text.fields.b");
    }
}
