//! Declarative reshaping: rename, drop, nest, set — in that order.
//!
//! Small on purpose: anything that needs logic belongs in a stream processor
//! downstream, not in the bridge on every device's hot path.

use super::template::{Context, Template};
use crate::config::TransformConfig;
use crate::mqtt::MqttMessage;
use serde_json::{Map, Value};
use std::borrow::Cow;

/// A compiled transform.
#[derive(Debug)]
pub struct Transform {
    renames: Vec<(String, String)>,
    drops: Vec<String>,
    nest: Option<String>,
    sets: Vec<(String, SetValue)>,
}

#[derive(Debug)]
enum SetValue {
    Constant(Value),
    Template(Template),
}

impl Transform {
    /// Compiles a transform; errors are `(field path under transform, message)`.
    pub fn compile(
        config: &TransformConfig,
        captures: &[String],
    ) -> Result<Self, (String, String)> {
        let renames = config
            .rename
            .iter()
            .map(|(from, to)| {
                let (from, to) = (pointer(from), pointer(to));
                if from == to || to.starts_with(&format!("{from}/")) {
                    Err((
                        format!("transform.rename.{}", from.trim_start_matches('/')),
                        format!("cannot rename `{from}` to `{to}`, which is itself or inside it"),
                    ))
                } else {
                    Ok((from, to))
                }
            })
            .collect::<Result<_, _>>()?;
        let drops = config.drop.iter().map(|d| pointer(d)).collect();
        if let Some(nest) = &config.nest {
            if nest.is_empty() {
                return Err(("transform.nest".into(), "must not be empty".into()));
            }
        }
        let mut sets = Vec::with_capacity(config.set.len());
        for (key, value) in &config.set {
            let set = match value {
                Value::String(text) => SetValue::Template(
                    Template::parse(text, captures, true)
                        .map_err(|e| (format!("transform.set.{key}"), e))?,
                ),
                other => SetValue::Constant(other.clone()),
            };
            sets.push((pointer(key), set));
        }
        Ok(Self {
            renames,
            drops,
            nest: config.nest.clone(),
            sets,
        })
    }

    /// Applies the transform to the parsed payload, which it consumes.
    ///
    /// `set` templates read the payload as parsed (`{/pointer}`), so their
    /// values are rendered first; the payload is then reshaped in place,
    /// without the copy a later render would need.
    pub fn apply(
        &self,
        mut value: Value,
        captures: &[&str],
        message: &MqttMessage,
    ) -> Result<Value, String> {
        let ctx = Context {
            captures,
            message,
            value: Some(&value),
        };
        let mut set_values = Vec::with_capacity(self.sets.len());
        for (path, set) in &self.sets {
            set_values.push(match set {
                SetValue::Constant(v) => v.clone(),
                SetValue::Template(t) => t
                    .render_value(&ctx)
                    .map_err(|e| format!("set `{path}`: {e}"))?,
            });
        }
        if !self.renames.is_empty() || !self.drops.is_empty() {
            if !value.is_object() {
                return Err(format!(
                    "rename/drop need a JSON object, the payload is {}",
                    kind(&value)
                ));
            }
            for (from, to) in &self.renames {
                if let Some(v) = take(&mut value, from) {
                    put(&mut value, to, v)?;
                }
            }
            for path in &self.drops {
                take(&mut value, path);
            }
        }
        if let Some(key) = &self.nest {
            let mut outer = Map::with_capacity(1 + self.sets.len());
            outer.insert(key.clone(), value);
            value = Value::Object(outer);
        }
        if !self.sets.is_empty() && !value.is_object() {
            return Err(format!(
                "set needs a JSON object, the payload is {} (use `nest` to wrap it)",
                kind(&value)
            ));
        }
        for ((path, _), v) in self.sets.iter().zip(set_values) {
            put(&mut value, path, v)?;
        }
        Ok(value)
    }
}

/// A plain field name is shorthand for the pointer to that top-level field.
fn pointer(name: &str) -> String {
    if name.starts_with('/') {
        name.to_string()
    } else {
        format!("/{}", name.replace('~', "~0").replace('/', "~1"))
    }
}

/// A JSON pointer token as a key. Borrowed unless it holds an escape: this
/// runs for every field a transform touches, on every message.
fn unescape(token: &str) -> Cow<'_, str> {
    if token.contains('~') {
        Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        Cow::Borrowed(token)
    }
}

fn take(value: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = path.rsplit_once('/')?;
    value
        .pointer_mut(parent)?
        .as_object_mut()?
        .shift_remove(unescape(last).as_ref())
}

/// Sets `path`, creating missing intermediate objects.
fn put(value: &mut Value, path: &str, v: Value) -> Result<(), String> {
    let mut node = value;
    let mut tokens = path.split('/').skip(1).peekable();
    while let Some(token) = tokens.next() {
        let key = unescape(token);
        let Value::Object(map) = node else {
            return Err(format!(
                "cannot set `{path}`: `{key}`'s parent is {}",
                kind(node)
            ));
        };
        if tokens.peek().is_none() {
            map.insert(key.into_owned(), v);
            return Ok(());
        }
        node = map
            .entry(key.into_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn transform(yaml: &str) -> Transform {
        let config: TransformConfig = serde_yaml_ng::from_str(yaml).unwrap();
        Transform::compile(&config, &["site".into(), "device".into()]).unwrap()
    }

    fn apply(t: &Transform, input: Value) -> Result<Value, String> {
        let mut m = MqttMessage::new("site/s1/hvac/u7/telemetry", "");
        m.qos = crate::mqtt::Qos::AtLeastOnce;
        t.apply(input, &["s1", "u7"], &m)
    }

    #[test]
    fn rename_drop_nest_set_in_order() {
        let t = transform(
            "rename: { amb: ambient_c, '/x/y': '/z' }\ndrop: [debug]\nnest: reading\nset: { site: '{site}', device: '{device}', qos: '{mqtt.qos}', v: 2, '/meta/raw_amb': '{/amb}' }",
        );
        let out = apply(&t, json!({"amb": 21.5, "debug": "x", "x": {"y": 1}})).unwrap();
        assert_eq!(
            out,
            json!({
                "reading": {"ambient_c": 21.5, "x": {}, "z": 1},
                "site": "s1", "device": "u7", "qos": 1, "v": 2,
                "meta": {"raw_amb": 21.5}
            })
        );
    }

    #[test]
    fn nest_wraps_scalars() {
        let t = transform("nest: value\nset: { unit: C }");
        assert_eq!(
            apply(&t, json!(21.5)).unwrap(),
            json!({"value": 21.5, "unit": "C"})
        );
    }

    #[test]
    fn errors_on_non_objects_and_missing_fields() {
        assert!(apply(&transform("drop: [a]"), json!([1]))
            .unwrap_err()
            .contains("an array"));
        assert!(apply(&transform("set: { a: 1 }"), json!(3))
            .unwrap_err()
            .contains("use `nest`"));
        let e = apply(&transform("set: { a: '{/missing}' }"), json!({})).unwrap_err();
        assert_eq!(e, "set `/a`: payload has no field at `/missing`");
        let e = apply(&transform("set: { '/a/b': 1 }"), json!({"a": 5})).unwrap_err();
        assert!(e.contains("parent is a number"), "{e}");
    }

    #[test]
    fn compile_errors() {
        let config: TransformConfig = serde_yaml_ng::from_str("set: { a: '{nope}' }").unwrap();
        let e = Transform::compile(&config, &["site".into()]).unwrap_err();
        assert_eq!(e.0, "transform.set.a");
        let config: TransformConfig = serde_yaml_ng::from_str("rename: { a: '/a/b' }").unwrap();
        assert!(Transform::compile(&config, &[])
            .unwrap_err()
            .1
            .contains("inside it"));
    }
}
