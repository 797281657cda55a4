//! `{placeholder}` templates for topics, keys, headers and set-fields.
//!
//! Parsed once at start-up into parts with capture names resolved to
//! indices, so rendering a message is a walk over a few parts with no lookups
//! by name.
//!
//! Placeholders: `{capture}` (a topic capture), `{/json/pointer}` (a field of
//! the payload), `{mqtt.topic}`, `{mqtt.qos}`, `{mqtt.retain}`,
//! `{mqtt.received_at}` (RFC 3339), `{mqtt.received_at_ms}`,
//! `{mqtt.content_type}`, `{mqtt.user_properties.NAME}`. `{{` and `}}` are a
//! literal brace.

use crate::mqtt::MqttMessage;
use serde_json::Value;
use std::fmt::Write;

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Capture(usize),
    Pointer(String),
    Topic,
    Qos,
    Retain,
    ReceivedAt,
    ReceivedAtMs,
    ContentType,
    UserProperty(String),
}

/// A compiled template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

/// What a template is rendered against.
pub struct Context<'a> {
    pub captures: &'a [&'a str],
    pub message: &'a MqttMessage,
    /// The JSON that `{/pointer}` placeholders read; `None` for raw payloads.
    pub value: Option<&'a Value>,
}

/// Why a template could not be rendered for one message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("payload has no field at `{0}`")]
    MissingField(String),
    #[error("field at `{0}` is null")]
    NullField(String),
    #[error("message has no MQTT user property `{0}`")]
    MissingUserProperty(String),
    #[error("message has no MQTT content type")]
    MissingContentType,
    /// A placeholder's value would not stay one topic level, so the data
    /// could steer the message into another subtree or make the packet
    /// malformed.
    #[error("the value of `{placeholder}` is not one MQTT topic level: {why}")]
    NotOneLevel {
        placeholder: String,
        why: &'static str,
    },
    #[error("the topic is {0} bytes; MQTT allows at most 65535")]
    TopicTooLong(usize),
    #[error("`{0}` is not a topic to publish to")]
    NotATopic(String),
}

/// Longest topic name MQTT can encode (a two-byte length prefix).
pub const MQTT_TOPIC_MAX_BYTES: usize = 65_535;

/// Why `value` cannot be one level of an MQTT topic that data chose, if it
/// cannot: a `/` would add levels, `+` and `#` are wildcards a publish may
/// not hold, U+0000 is malformed on the wire, and a leading `$` names the
/// broker's own trees.
pub fn topic_level_problem(value: &str) -> Option<&'static str> {
    if value.contains('/') {
        Some("it holds `/`")
    } else if value.contains(['+', '#']) {
        Some("it holds a wildcard (`+` or `#`)")
    } else if value.contains('\0') {
        Some("it holds U+0000")
    } else if value.starts_with('$') {
        Some("it starts with `$`")
    } else if value.is_empty() {
        Some("it is empty")
    } else {
        None
    }
}

impl Template {
    /// The JSON pointers its `{/pointer}` placeholders read.
    pub fn pointers(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Pointer(pointer) => Some(pointer.as_str()),
            _ => None,
        })
    }

    /// Parses `text`; `captures` are the names the route's topic filter and
    /// regex define. `pointers` is false for raw payloads, which have no fields.
    pub fn parse(text: &str, captures: &[String], pointers: bool) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(format!(
                        "unmatched `}}` at offset {i} (write `}}}}` for a literal brace)"
                    ))
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let end = rest
                        .find('}')
                        .ok_or_else(|| format!("unclosed `{{` at offset {i}"))?;
                    let name = &rest[..end];
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Self::placeholder(name, captures, pointers)?);
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() || parts.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self { parts })
    }

    fn placeholder(name: &str, captures: &[String], pointers: bool) -> Result<Part, String> {
        if name.starts_with('/') {
            if !pointers {
                return Err(format!(
                    "`{{{name}}}` reads a payload field, but raw payloads have no fields"
                ));
            }
            return Ok(Part::Pointer(name.to_string()));
        }
        if let Some(meta) = name.strip_prefix("mqtt.") {
            return Ok(match meta {
                "topic" => Part::Topic,
                "qos" => Part::Qos,
                "retain" => Part::Retain,
                "received_at" => Part::ReceivedAt,
                "received_at_ms" => Part::ReceivedAtMs,
                "content_type" => Part::ContentType,
                m if m.starts_with("user_properties.") && m.len() > 16 => {
                    Part::UserProperty(m["user_properties.".len()..].to_string())
                }
                _ => return Err(format!(
                    "unknown `{{{name}}}`; MQTT metadata is topic, qos, retain, received_at, received_at_ms, content_type or user_properties.NAME"
                )),
            });
        }
        match captures.iter().position(|c| c == name) {
            Some(index) => Ok(Part::Capture(index)),
            None if captures.is_empty() => Err(format!(
                "`{{{name}}}` is not a capture: the route's filter defines none"
            )),
            None => Err(format!(
                "`{{{name}}}` is not a capture of this route (captures: {})",
                captures.join(", ")
            )),
        }
    }

    /// The template's text, if it has no placeholders.
    pub fn as_literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Literal(text)] => Some(text),
            _ => None,
        }
    }

    /// Renders to text, appending to `out`.
    pub fn render_into(&self, ctx: &Context<'_>, out: &mut String) -> Result<(), TemplateError> {
        for part in &self.parts {
            render_part(part, ctx, out)?;
        }
        Ok(())
    }

    /// Renders to a new string.
    pub fn render(&self, ctx: &Context<'_>) -> Result<String, TemplateError> {
        if let Some(text) = self.as_literal() {
            return Ok(text.to_string());
        }
        let mut out = String::new();
        self.render_into(ctx, &mut out)?;
        Ok(out)
    }

    /// Renders an MQTT topic to publish to (a relay's or a command's). Every
    /// placeholder's value must be exactly one topic level (see
    /// [`topic_level_problem`]): what data chooses can fill a level the
    /// mapping left open, never pick another subtree. The whole topic must
    /// be publishable and fit MQTT's length prefix.
    pub fn render_mqtt_topic(&self, ctx: &Context<'_>) -> Result<String, TemplateError> {
        let mut out = String::new();
        for part in &self.parts {
            let start = out.len();
            match part {
                Part::Literal(text) => {
                    out.push_str(text);
                    continue;
                }
                // The source topic is the broker's, from a tree the mapping
                // subscribed to: it may span levels by design.
                Part::Topic => {
                    out.push_str(&ctx.message.topic);
                    continue;
                }
                _ => {}
            }
            render_part(part, ctx, &mut out)?;
            if let Some(why) = topic_level_problem(&out[start..]) {
                return Err(TemplateError::NotOneLevel {
                    placeholder: part.to_string(),
                    why,
                });
            }
        }
        if out.len() > MQTT_TOPIC_MAX_BYTES {
            return Err(TemplateError::TopicTooLong(out.len()));
        }
        if out.is_empty() || out.contains(['+', '#', '\0']) {
            return Err(TemplateError::NotATopic(out.escape_debug().to_string()));
        }
        Ok(out)
    }

    /// Renders to a JSON value: a template that is exactly one placeholder
    /// keeps that value's type (`{mqtt.qos}` is a number, `{/reading}` the
    /// field as it is); anything else is a string.
    pub fn render_value(&self, ctx: &Context<'_>) -> Result<Value, TemplateError> {
        match self.parts.as_slice() {
            [Part::Pointer(ptr)] => Ok(lookup(ctx, ptr)?.clone()),
            [Part::Qos] => Ok(Value::from(ctx.message.qos.as_u8())),
            [Part::Retain] => Ok(Value::from(ctx.message.retain)),
            [Part::ReceivedAtMs] => Ok(Value::from(ctx.message.received_at.timestamp_millis())),
            _ => self.render(ctx).map(Value::String),
        }
    }
}

/// Appends one part's text to `out`.
fn render_part(part: &Part, ctx: &Context<'_>, out: &mut String) -> Result<(), TemplateError> {
    match part {
        Part::Literal(text) => out.push_str(text),
        Part::Capture(i) => out.push_str(ctx.captures.get(*i).copied().unwrap_or("")),
        Part::Pointer(ptr) => match lookup(ctx, ptr)? {
            Value::String(s) => out.push_str(s),
            other => {
                let _ = write!(out, "{other}");
            }
        },
        Part::Topic => out.push_str(&ctx.message.topic),
        Part::Qos => {
            let _ = write!(out, "{}", ctx.message.qos);
        }
        Part::Retain => {
            let _ = write!(out, "{}", ctx.message.retain);
        }
        Part::ReceivedAt => {
            let _ = write!(out, "{}", ctx.message.received_at.to_rfc3339());
        }
        Part::ReceivedAtMs => {
            let _ = write!(out, "{}", ctx.message.received_at.timestamp_millis());
        }
        Part::ContentType => out.push_str(
            ctx.message
                .content_type
                .as_deref()
                .ok_or(TemplateError::MissingContentType)?,
        ),
        Part::UserProperty(name) => out.push_str(user_property(ctx, name)?),
    }
    Ok(())
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Literal(text) => f.write_str(text),
            Part::Capture(i) => write!(f, "{{capture #{i}}}"),
            Part::Pointer(ptr) => write!(f, "{{{ptr}}}"),
            Part::Topic => f.write_str("{mqtt.topic}"),
            Part::Qos => f.write_str("{mqtt.qos}"),
            Part::Retain => f.write_str("{mqtt.retain}"),
            Part::ReceivedAt => f.write_str("{mqtt.received_at}"),
            Part::ReceivedAtMs => f.write_str("{mqtt.received_at_ms}"),
            Part::ContentType => f.write_str("{mqtt.content_type}"),
            Part::UserProperty(name) => write!(f, "{{mqtt.user_properties.{name}}}"),
        }
    }
}

fn lookup<'a>(ctx: &Context<'a>, ptr: &str) -> Result<&'a Value, TemplateError> {
    match ctx.value.and_then(|v| v.pointer(ptr)) {
        None => Err(TemplateError::MissingField(ptr.to_string())),
        Some(Value::Null) => Err(TemplateError::NullField(ptr.to_string())),
        Some(value) => Ok(value),
    }
}

fn user_property<'a>(ctx: &Context<'a>, name: &str) -> Result<&'a str, TemplateError> {
    ctx.message
        .user_properties
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| TemplateError::MissingUserProperty(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::Qos;
    use serde_json::json;

    fn caps() -> Vec<String> {
        vec!["site".into(), "device".into()]
    }

    fn message() -> MqttMessage {
        let mut m = MqttMessage::new("site/s1/hvac/u7/telemetry", "{}");
        m.qos = Qos::ExactlyOnce;
        m.user_properties = vec![("fw".into(), "1.2".into())];
        m
    }

    fn render(text: &str, value: &Value) -> Result<String, TemplateError> {
        let m = message();
        let t = Template::parse(text, &caps(), true).unwrap();
        t.render(&Context {
            captures: &["s1", "u7"],
            message: &m,
            value: Some(value),
        })
    }

    #[test]
    fn renders_captures_pointers_and_metadata() {
        let v = json!({"id": "dev-9", "n": 3, "deep": {"x": true}});
        assert_eq!(render("{site}.{device}", &v).unwrap(), "s1.u7");
        assert_eq!(
            render("k-{/id}-{/n}-{/deep/x}", &v).unwrap(),
            "k-dev-9-3-true"
        );
        assert_eq!(
            render("{mqtt.topic}|{mqtt.qos}|{mqtt.user_properties.fw}", &v).unwrap(),
            "site/s1/hvac/u7/telemetry|2|1.2"
        );
        assert_eq!(render("{{literal}}", &v).unwrap(), "{literal}");
    }

    #[test]
    fn missing_fields_are_errors_not_empty_strings() {
        let v = json!({"n": null});
        assert_eq!(
            render("{/id}", &v).unwrap_err(),
            TemplateError::MissingField("/id".into())
        );
        assert_eq!(
            render("{/n}", &v).unwrap_err(),
            TemplateError::NullField("/n".into())
        );
        assert_eq!(
            render("{mqtt.user_properties.nope}", &v).unwrap_err(),
            TemplateError::MissingUserProperty("nope".into())
        );
    }

    #[test]
    fn single_placeholder_keeps_type() {
        let m = message();
        let v = json!({"r": {"t": 21.5}});
        let ctx = Context {
            captures: &["s1", "u7"],
            message: &m,
            value: Some(&v),
        };
        let t = |s| {
            Template::parse(s, &caps(), true)
                .unwrap()
                .render_value(&ctx)
                .unwrap()
        };
        assert_eq!(t("{/r}"), json!({"t": 21.5}));
        assert_eq!(t("{mqtt.qos}"), json!(2));
        assert_eq!(t("{mqtt.retain}"), json!(false));
        assert_eq!(t("{device}"), json!("u7"));
        assert_eq!(t("q{mqtt.qos}"), json!("q2"));
    }

    #[test]
    fn compile_errors_explain() {
        let e = Template::parse("{sit}", &caps(), true).unwrap_err();
        assert_eq!(
            e,
            "`{sit}` is not a capture of this route (captures: site, device)"
        );
        assert!(Template::parse("{/x}", &caps(), false)
            .unwrap_err()
            .contains("raw payloads"));
        assert!(Template::parse("{mqtt.nope}", &caps(), true)
            .unwrap_err()
            .contains("unknown"));
        assert!(Template::parse("a{b", &caps(), true)
            .unwrap_err()
            .contains("unclosed"));
        assert!(Template::parse("a}b", &caps(), true)
            .unwrap_err()
            .contains("unmatched"));
        assert!(Template::parse("{x}", &[], true)
            .unwrap_err()
            .contains("defines none"));
    }
}
