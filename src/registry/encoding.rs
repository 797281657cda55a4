//! `kafka.encoding`: a route's records in the schema-registry wire format
//! (magic byte 0, the schema id as 4 bytes big endian, then the body), so
//! that Kafka Connect, ksqlDB, Flink and Spark read them with their stock
//! deserialisers.
//!
//! The schema is a file next to the mapping, compiled when the mapping
//! loads; its id comes from the registry once per configuration
//! ([`Encoding::set_id`]), never per message. A record that does not fit
//! the schema is the route's to dead-letter (reason `encode`): a field the
//! schema lacks is refused rather than dropped, since a projection would
//! lose data without a word.

use super::client::SchemaText;
use crate::config::{EncodingConfig, EncodingFormat, SubjectStrategy};
use crate::route::schema::Schemas;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use serde_json::Value;
use std::path::Path;

/// How one route's records are encoded, and under which subject.
#[derive(Debug)]
pub struct Encoding {
    body: Body,
    subject: String,
    schema: SchemaText,
    id: Option<u32>,
}

#[derive(Debug)]
enum Body {
    Avro {
        schema: Box<apache_avro::Schema>,
        names: AvroNames,
    },
    Protobuf {
        message: MessageDescriptor,
        /// Confluent's message indexes: the message's path in its file.
        indexes: Vec<i32>,
    },
    JsonSchema(crate::route::schema::Schema),
}

/// A problem with the configuration: (field, message).
type Problem = (String, String);

impl Encoding {
    /// Compiles a route's `kafka.encoding` (files relative to `base`);
    /// `None` for JSON, which needs no registry. `topic` is the route's
    /// literal topic, if it has one (the topic-name subject needs it);
    /// `route_schema` its `schema` file, the default for `json_schema`.
    pub fn compile(
        config: &EncodingConfig,
        base: &Path,
        topic: Option<&str>,
        route_schema: Option<&str>,
        schemas: &mut Schemas,
    ) -> Result<Option<Self>, Problem> {
        let field = |name: &str| format!("kafka.encoding.{name}");
        let schema_file = match (config.format, &config.schema, route_schema) {
            (EncodingFormat::Json, _, _) => return Ok(None),
            (_, Some(file), _) => file.clone(),
            (EncodingFormat::JsonSchema, None, Some(file)) => file.to_string(),
            (_, None, _) => {
                return Err((
                    field("schema"),
                    "missing: the schema file the records are encoded with".into(),
                ))
            }
        };
        let path = base.join(&schema_file);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            (
                field("schema"),
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        if config.message.is_some() && config.format != EncodingFormat::Protobuf {
            return Err((
                field("message"),
                "is only used with `format: protobuf`".into(),
            ));
        }
        let (body, kind, record_name) = match config.format {
            EncodingFormat::Json => unreachable!("returned above"),
            EncodingFormat::Avro => {
                let schema = apache_avro::Schema::parse_str(&text).map_err(|e| {
                    (
                        field("schema"),
                        format!("{}: not an Avro schema: {e}", path.display()),
                    )
                })?;
                let name = match &schema {
                    apache_avro::Schema::Record(record) => Some(record.name.fullname(None)),
                    _ => None,
                };
                let names: AvroNames = apache_avro::schema::ResolvedSchema::try_from(&schema)
                    .map_err(|e| {
                        (
                            field("schema"),
                            format!("{}: not an Avro schema: {e}", path.display()),
                        )
                    })?
                    .get_names()
                    .iter()
                    .map(|(name, schema)| (name.clone(), (*schema).clone()))
                    .collect();
                let body = Body::Avro {
                    schema: Box::new(schema),
                    names,
                };
                (body, "AVRO", name)
            }
            EncodingFormat::Protobuf => {
                let Some(name) = &config.message else {
                    return Err((
                        field("message"),
                        "missing: the message type's full name (`package.Message`)".into(),
                    ));
                };
                let message = protobuf_message(&path, name).map_err(|e| (field("schema"), e))?;
                let indexes = message_indexes(&message);
                let record = message.full_name().to_string();
                (
                    Body::Protobuf { message, indexes },
                    "PROTOBUF",
                    Some(record),
                )
            }
            EncodingFormat::JsonSchema => {
                if has_file_ref(&serde_json::from_str(&text).unwrap_or(Value::Null)) {
                    return Err((
                        field("schema"),
                        format!("{}: refers to other files (`$ref`), which the bridge does not register; give a self-contained schema", path.display()),
                    ));
                }
                let schema = schemas.load(&path).map_err(|e| (field("schema"), e))?;
                let title = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["title"].as_str().map(str::to_string));
                (Body::JsonSchema(schema), "JSON", title)
            }
        };
        let subject = subject(config, topic, record_name.as_deref())?;
        Ok(Some(Self {
            body,
            subject,
            schema: SchemaText { kind, text },
            id: None,
        }))
    }

    /// The subject the schema is registered under.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The schema as the registry takes it.
    pub fn schema(&self) -> &SchemaText {
        &self.schema
    }

    /// The id the registry gave the schema.
    pub fn id(&self) -> Option<u32> {
        self.id
    }

    pub fn set_id(&mut self, id: u32) {
        self.id = Some(id);
    }

    /// `value` in the wire format; the error says what does not fit.
    pub fn encode(&self, value: &Value) -> Result<Vec<u8>, String> {
        let Some(id) = self.id else {
            return Err(format!(
                "no schema id for subject `{}` (the registry was not asked)",
                self.subject
            ));
        };
        let mut out = Vec::with_capacity(64);
        out.push(0);
        out.extend(id.to_be_bytes());
        match &self.body {
            Body::Avro { schema, names } => {
                let fitted = fit_avro(value, schema, names, "", 0)?;
                let avro = apache_avro::types::Value::from(fitted)
                    .resolve(schema)
                    .map_err(|e| format!("does not fit the Avro schema: {e}"))?;
                let body = apache_avro::to_avro_datum(schema, avro)
                    .map_err(|e| format!("cannot be written as Avro: {e}"))?;
                out.extend(body);
            }
            Body::Protobuf { message, indexes } => {
                let decoded = DynamicMessage::deserialize(message.clone(), value)
                    .map_err(|e| format!("does not fit `{}`: {e}", message.full_name()))?;
                write_indexes(&mut out, indexes);
                prost::Message::encode(&decoded, &mut out)
                    .map_err(|e| format!("cannot be written as protobuf: {e}"))?;
            }
            Body::JsonSchema(schema) => {
                schema
                    .validate(value)
                    .map_err(|r| format!("does not fit the JSON Schema: {}", r.detail))?;
                serde_json::to_writer(&mut out, value).expect("a Value serialises");
            }
        }
        Ok(out)
    }
}

/// `value` made ready for the Avro library, or why it does not fit.
///
/// Refused first, what the library would get wrong silently: it turns a
/// JSON number past `int` into a wrong `int` (4294967351 became 55) and one
/// past `long` into a negative, and drops the fields a nested record
/// lacks. Converted, what JSON can only carry as text: an RFC 3339 string
/// for a `timestamp-*` field (to the epoch count), an ISO 8601 string with
/// no offset for a `local-timestamp-*` one, `YYYY-MM-DD` for a `date`,
/// `HH:MM:SS[.fff]` for a `time-*` (the library takes only numbers for
/// them). `path` names the place (a JSON pointer). What the library
/// refuses by itself (a string for a plain number, a missing field) is
/// left to it.
fn fit_avro(
    value: &Value,
    schema: &apache_avro::Schema,
    names: &AvroNames,
    path: &str,
    depth: usize,
) -> Result<Value, String> {
    use apache_avro::Schema as S;
    let at = if path.is_empty() { "/" } else { path };
    let out_of = |range: &str| Err(format!("`{at}`: {value} is out of range for Avro {range}"));
    if depth > MAX_AVRO_DEPTH {
        return Err(format!(
            "`{at}`: nested deeper than {MAX_AVRO_DEPTH} levels"
        ));
    }
    let fit = |value: &Value, schema: &apache_avro::Schema, path: &str| {
        fit_avro(value, schema, names, path, depth + 1)
    };
    match (schema, value) {
        // A type declared once and used again by its name.
        (S::Ref { name }, _) => match names.get(name) {
            Some(named) => fit(value, named, path),
            None => Ok(value.clone()),
        },
        // Fractions are the library's to refuse.
        (_, Value::Number(n)) if integer(schema) == Some(Integer::Int) => {
            if n.is_f64() || n.as_i64().is_some_and(|n| i32::try_from(n).is_ok()) {
                Ok(value.clone())
            } else {
                out_of("int")
            }
        }
        (_, Value::Number(n)) if integer(schema) == Some(Integer::Long) => {
            if n.as_u64().is_some_and(|n| n > i64::MAX as u64) {
                return out_of("long");
            }
            Ok(value.clone())
        }
        (_, Value::String(text)) if is_time(schema) => logical_from_text(schema, text)
            .map(Value::from)
            .ok_or_else(|| format!("`{at}`: {value} is not {}", text_form(schema))),
        (S::Record(record), Value::Object(object)) => {
            // By name: an alias would pass the library's lookup and then be
            // dropped for the field's default.
            if let Some(extra) = object
                .keys()
                .find(|k| !record.fields.iter().any(|f| &f.name == *k))
            {
                return Err(format!(
                    "field `{path}/{extra}` is not in the Avro schema `{}`",
                    record.name.fullname(None)
                ));
            }
            let mut fitted = serde_json::Map::with_capacity(object.len());
            for field in &record.fields {
                if let Some(v) = object.get(&field.name) {
                    let v = fit(v, &field.schema, &format!("{path}/{}", field.name))?;
                    fitted.insert(field.name.clone(), v);
                }
            }
            Ok(Value::Object(fitted))
        }
        (S::Array(array), Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| fit(v, &array.items, &format!("{path}/{i}")))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        (S::Map(map), Value::Object(object)) => object
            .iter()
            .map(|(k, v)| Ok((k.clone(), fit(v, &map.types, &format!("{path}/{k}"))?)))
            .collect::<Result<_, String>>()
            .map(Value::Object),
        // A string stays one where the union takes strings as they are.
        (S::Union(union), Value::String(_))
            if union
                .variants()
                .iter()
                .any(|b| matches!(named(b, names), S::String | S::Uuid | S::Enum(_))) =>
        {
            Ok(value.clone())
        }
        // A union takes the value if one of its branches of the value's
        // kind does.
        (S::Union(union), _) if !value.is_null() => {
            let mut first_error = None;
            for branch in union
                .variants()
                .iter()
                .filter(|b| takes_kind(named(b, names), value))
            {
                match fit(value, branch, path) {
                    Ok(fitted) => return Ok(fitted),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            first_error.map_or_else(|| Ok(value.clone()), Err)
        }
        _ => Ok(value.clone()),
    }
}

/// The named types of an Avro schema, by full name, for the references
/// to them.
type AvroNames = std::collections::HashMap<apache_avro::schema::Name, apache_avro::Schema>;

/// Deeper than any schema needs; JSON payloads stop at 128 levels anyway.
const MAX_AVRO_DEPTH: usize = 256;

/// `schema`, or the type it refers to by name.
fn named<'a>(schema: &'a apache_avro::Schema, names: &'a AvroNames) -> &'a apache_avro::Schema {
    match schema {
        apache_avro::Schema::Ref { name } => names.get(name).unwrap_or(schema),
        _ => schema,
    }
}

/// Whether `schema` can take a JSON value of `value`'s kind at all (a
/// number, a string, ...), to pick a union's branch.
fn takes_kind(schema: &apache_avro::Schema, value: &Value) -> bool {
    use apache_avro::Schema as S;
    match value {
        Value::Null => matches!(schema, S::Null),
        Value::Bool(_) => matches!(schema, S::Boolean),
        Value::Number(_) => matches!(schema, S::Float | S::Double) || integer(schema).is_some(),
        Value::String(_) => !matches!(
            schema,
            S::Null
                | S::Boolean
                | S::Int
                | S::Long
                | S::Float
                | S::Double
                | S::Array(_)
                | S::Map(_)
                | S::Record(_)
        ),
        Value::Array(_) => matches!(schema, S::Array(_) | S::Bytes | S::Fixed(_)),
        Value::Object(_) => matches!(schema, S::Record(_) | S::Map(_) | S::Ref { .. }),
    }
}

/// The Avro integer a type is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Integer {
    Int,
    Long,
}

/// `int` and `long`, and the logical types of dates and times, which are
/// written as one of them.
fn integer(schema: &apache_avro::Schema) -> Option<Integer> {
    use apache_avro::Schema as S;
    match schema {
        S::Int | S::Date | S::TimeMillis => Some(Integer::Int),
        S::Long
        | S::TimeMicros
        | S::TimestampMillis
        | S::TimestampMicros
        | S::TimestampNanos
        | S::LocalTimestampMillis
        | S::LocalTimestampMicros
        | S::LocalTimestampNanos => Some(Integer::Long),
        _ => None,
    }
}

/// Whether `schema` is a logical type of dates and times.
fn is_time(schema: &apache_avro::Schema) -> bool {
    use apache_avro::Schema as S;
    integer(schema).is_some() && !matches!(schema, S::Int | S::Long)
}

/// The number a logical type's text form stands for, if `text` is one.
fn logical_from_text(schema: &apache_avro::Schema, text: &str) -> Option<i64> {
    use apache_avro::Schema as S;
    use chrono::{NaiveDate, NaiveDateTime, NaiveTime, Timelike};
    // chrono reads a leap second (`23:59:60.5`) as a nanosecond past
    // 999_999_999, which would count past the end of the day.
    let midnight = |t: NaiveTime| {
        (t.nanosecond() < 1_000_000_000).then(|| {
            i64::from(t.num_seconds_from_midnight()) * 1_000_000 + i64::from(t.nanosecond() / 1_000)
        })
    };
    let local = || NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").ok();
    let zoned = || chrono::DateTime::parse_from_rfc3339(text).ok();
    match schema {
        S::Date => {
            let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
            Some(date.signed_duration_since(NaiveDate::default()).num_days())
        }
        S::TimeMillis => {
            Some(midnight(NaiveTime::parse_from_str(text, "%H:%M:%S%.f").ok()?)? / 1000)
        }
        S::TimeMicros => midnight(NaiveTime::parse_from_str(text, "%H:%M:%S%.f").ok()?),
        S::TimestampMillis => Some(zoned()?.timestamp_millis()),
        S::TimestampMicros => Some(zoned()?.timestamp_micros()),
        S::TimestampNanos => zoned()?.timestamp_nanos_opt(),
        S::LocalTimestampMillis => Some(local()?.and_utc().timestamp_millis()),
        S::LocalTimestampMicros => Some(local()?.and_utc().timestamp_micros()),
        S::LocalTimestampNanos => local()?.and_utc().timestamp_nanos_opt(),
        _ => None,
    }
}

/// The text a logical type takes, for errors.
fn text_form(schema: &apache_avro::Schema) -> &'static str {
    use apache_avro::Schema as S;
    match schema {
        S::Date => "a date (YYYY-MM-DD) for Avro date",
        S::TimeMillis | S::TimeMicros => "a time of day (HH:MM:SS[.fff]) for Avro time",
        S::LocalTimestampMillis | S::LocalTimestampMicros => {
            "a local date-time (YYYY-MM-DDTHH:MM:SS[.fff], no offset) for Avro local-timestamp"
        }
        S::LocalTimestampNanos => {
            "a local date-time (YYYY-MM-DDTHH:MM:SS[.fff], no offset, within 1677-2262) for Avro local-timestamp-nanos"
        }
        S::TimestampNanos => "an RFC 3339 timestamp (within 1677-2262) for Avro timestamp-nanos",
        _ => "an RFC 3339 timestamp for Avro timestamp",
    }
}

/// The subject by the configured strategy (or the explicit one).
fn subject(
    config: &EncodingConfig,
    topic: Option<&str>,
    record: Option<&str>,
) -> Result<String, Problem> {
    if let Some(subject) = &config.subject {
        return Ok(subject.clone());
    }
    let need_topic = || {
        topic.ok_or_else(|| {
            (
                "kafka.encoding.subject_strategy".to_string(),
                "the topic-name strategies need a literal `kafka.topic`; with a templated topic set `kafka.encoding.subject` or use `record_name`".to_string(),
            )
        })
    };
    let need_record = || {
        record.ok_or_else(|| {
            (
                "kafka.encoding.subject_strategy".to_string(),
                "the record-name strategies need a named record (an Avro record, a protobuf message, a JSON Schema `title`)".to_string(),
            )
        })
    };
    Ok(match config.subject_strategy {
        SubjectStrategy::TopicName => format!("{}-value", need_topic()?),
        SubjectStrategy::RecordName => need_record()?.to_string(),
        SubjectStrategy::TopicRecordName => format!("{}-{}", need_topic()?, need_record()?),
    })
}

/// The message `name` of a self-contained `.proto` (the registry would
/// need its imports registered as references, which the bridge does not do).
fn protobuf_message(path: &Path, name: &str) -> Result<MessageDescriptor, String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = path.strip_prefix(dir).unwrap_or(path);
    let pool = protox::Compiler::new([dir])
        .and_then(|mut c| {
            c.include_imports(true).open_file(file)?;
            Ok(c.descriptor_pool())
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let message = pool
        .get_message_by_name(name)
        .ok_or_else(|| format!("{}: declares no message `{name}`", path.display()))?;
    if message.parent_file().dependencies().next().is_some() {
        return Err(format!(
            "{}: imports other files, which the bridge does not register as references; give a self-contained .proto",
            path.display()
        ));
    }
    Ok(message)
}

/// The message's path in its file: its index among the top-level
/// messages, then among each parent's nested ones.
fn message_indexes(message: &MessageDescriptor) -> Vec<i32> {
    let mut path = Vec::new();
    let mut current = message.clone();
    loop {
        let (siblings, parent): (Vec<MessageDescriptor>, _) = match current.parent_message() {
            Some(parent) => (parent.child_messages().collect(), Some(parent)),
            None => (current.parent_file().messages().collect(), None),
        };
        let index = siblings
            .iter()
            .position(|m| m.full_name() == current.full_name())
            .expect("a message is among its siblings");
        path.push(index as i32);
        match parent {
            Some(parent) => current = parent,
            None => break,
        }
    }
    path.reverse();
    path
}

/// Confluent's message indexes: `[0]` (the first message) as one 0 byte,
/// otherwise the count and each index as zig-zag varints.
fn write_indexes(out: &mut Vec<u8>, indexes: &[i32]) {
    if indexes == [0] {
        out.push(0);
        return;
    }
    write_zigzag(out, indexes.len() as i32);
    for &index in indexes {
        write_zigzag(out, index);
    }
}

fn write_zigzag(out: &mut Vec<u8>, value: i32) {
    let mut n = ((value << 1) ^ (value >> 31)) as u32;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Whether a JSON Schema refers to another document (a `$ref` that does
/// not start with `#`).
fn has_file_ref(schema: &Value) -> bool {
    match schema {
        Value::Object(map) => map.iter().any(|(k, v)| {
            (k == "$ref" && v.as_str().is_some_and(|r| !r.starts_with('#'))) || has_file_ref(v)
        }),
        Value::Array(items) => items.iter().any(has_file_ref),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AVSC: &str = r#"{"type": "record", "name": "Telemetry", "namespace": "hvac.v1",
      "fields": [
        {"name": "unit", "type": "string"},
        {"name": "ambient_c", "type": "double"},
        {"name": "blower_pct", "type": "int"},
        {"name": "mode", "type": ["null", "string"], "default": null}
      ]}"#;

    fn compile(
        format: EncodingFormat,
        files: &[(&str, &str)],
        schema: Option<&str>,
        message: Option<&str>,
        strategy: SubjectStrategy,
        topic: Option<&str>,
    ) -> Result<Option<Encoding>, Problem> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let config = EncodingConfig {
            format,
            schema: schema.map(str::to_string),
            message: message.map(str::to_string),
            subject: None,
            subject_strategy: strategy,
        };
        Encoding::compile(&config, dir.path(), topic, None, &mut Schemas::default())
    }

    /// An Avro encoding of `avsc` with schema id 1.
    fn avro_with(avsc: &str) -> Encoding {
        let mut e = compile(
            EncodingFormat::Avro,
            &[("t.avsc", avsc)],
            Some("t.avsc"),
            None,
            SubjectStrategy::TopicName,
            Some("t"),
        )
        .unwrap()
        .unwrap();
        e.set_id(1);
        e
    }

    fn avro() -> Encoding {
        compile(
            EncodingFormat::Avro,
            &[("t.avsc", AVSC)],
            Some("t.avsc"),
            None,
            SubjectStrategy::TopicName,
            Some("hvac.telemetry"),
        )
        .unwrap()
        .unwrap()
    }

    #[test]
    fn avro_records_are_the_wire_format_around_an_avro_body() {
        let mut e = avro();
        assert_eq!(e.subject(), "hvac.telemetry-value");
        assert_eq!(e.schema().kind, "AVRO");
        let value = json!({"unit": "u7", "ambient_c": 21.5, "blower_pct": 55});
        assert!(e.encode(&value).unwrap_err().contains("no schema id"));
        e.set_id(0x0102_0304);
        let bytes = e.encode(&value).unwrap();
        assert_eq!(&bytes[..5], &[0, 1, 2, 3, 4]);
        // Read back by the Avro library with the schema as registered.
        let schema = apache_avro::Schema::parse_str(AVSC).unwrap();
        let read = apache_avro::from_avro_datum(&schema, &mut &bytes[5..], None).unwrap();
        let apache_avro::types::Value::Record(fields) = read else {
            panic!("a record")
        };
        assert_eq!(fields[0].1, apache_avro::types::Value::String("u7".into()));
        assert_eq!(fields[2].1, apache_avro::types::Value::Int(55));
        assert_eq!(
            fields[3].1,
            apache_avro::types::Value::Union(0, Box::new(apache_avro::types::Value::Null))
        );
    }

    #[test]
    fn what_does_not_fit_the_avro_schema_says_why() {
        let mut e = avro();
        e.set_id(1);
        let extra = e
            .encode(&json!({"unit": "u", "ambient_c": 1.0, "blower_pct": 1, "site": "s1"}))
            .unwrap_err();
        assert_eq!(
            extra,
            "field `/site` is not in the Avro schema `hvac.v1.Telemetry`"
        );
        // What the Avro library would turn into wrong values without a word.
        let too_big = e
            .encode(&json!({"unit": "u", "ambient_c": 1.0, "blower_pct": 4_294_967_351u64}))
            .unwrap_err();
        assert_eq!(
            too_big,
            "`/blower_pct`: 4294967351 is out of range for Avro int"
        );
        assert!(e
            .encode(&json!({"unit": "u", "ambient_c": 1.0, "blower_pct": -2_147_483_649i64}))
            .is_err());
        let missing = e
            .encode(&json!({"unit": "u", "ambient_c": 1.0}))
            .unwrap_err();
        assert!(
            missing.starts_with("does not fit the Avro schema"),
            "{missing}"
        );
        let wrong = e
            .encode(&json!({"unit": 7, "ambient_c": 1.0, "blower_pct": 1}))
            .unwrap_err();
        assert!(wrong.starts_with("does not fit the Avro schema"), "{wrong}");
    }

    /// A record type used a second time is a reference by name: the
    /// checks and conversions follow it (the range check once did not,
    /// and the library wrapped the number). An alias is not a field name.
    #[test]
    fn named_types_used_again_are_checked_and_aliases_refused() {
        let avsc = r#"{"type": "record", "name": "T", "fields": [
            {"name": "a", "type": {"type": "record", "name": "P", "fields": [
                {"name": "n", "type": "int"},
                {"name": "at", "type": {"type": "int", "logicalType": "time-millis"}}
            ]}},
            {"name": "b", "type": "P"},
            {"name": "c", "type": "int", "aliases": ["old_c"], "default": 0}
        ]}"#;
        let e = avro_with(avsc);
        let p = json!({"n": 1, "at": "00:00:01"});
        assert!(e.encode(&json!({"a": p, "b": p, "c": 1})).is_ok());
        let wrapped = json!({"a": p, "b": {"n": 4_294_967_351u64, "at": 0}, "c": 1});
        assert_eq!(
            e.encode(&wrapped).unwrap_err(),
            "`/b/n`: 4294967351 is out of range for Avro int"
        );
        let leap = json!({"a": p, "b": {"n": 1, "at": "23:59:60.5"}, "c": 1});
        assert!(e
            .encode(&leap)
            .unwrap_err()
            .starts_with("`/b/at`: \"23:59:60.5\" is not a time of day"));
        let alias = json!({"a": p, "b": p, "old_c": 7});
        assert_eq!(
            e.encode(&alias).unwrap_err(),
            "field `/old_c` is not in the Avro schema `T`"
        );
    }

    /// JSON carries times as text; Avro's logical types want numbers.
    #[test]
    fn logical_types_take_their_text_forms() {
        use apache_avro::types::Value as A;
        let avsc = r#"{"type": "record", "name": "T", "fields": [
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "local", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "at", "type": {"type": "int", "logicalType": "time-millis"}},
            {"name": "maybe", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
            {"name": "either", "type": ["null", "string", {"type": "long", "logicalType": "timestamp-millis"}]},
            {"name": "n", "type": {"type": "long", "logicalType": "timestamp-millis"}}
        ]}"#;
        let e = avro_with(avsc);
        let record = json!({
            "ts": "2026-12-01T13:59:30.250+01:00",
            "us": "2026-12-01T12:59:30.000001Z",
            "local": "2026-12-01T12:59:30.250",
            "day": "2026-12-01",
            "at": "12:59:30.250",
            "maybe": "2026-12-01T12:59:30.250Z",
            "either": "2026-12-01T12:59:30.250Z",
            "n": 1_796_129_970_250i64
        });
        let bytes = e.encode(&record).unwrap();
        let Body::Avro { schema, .. } = &e.body else {
            panic!("avro")
        };
        let A::Record(fields) =
            apache_avro::from_avro_datum(schema, &mut &bytes[5..], None).unwrap()
        else {
            panic!("a record")
        };
        let ms = 1_796_129_970_250i64;
        assert_eq!(
            fields.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
            [
                A::TimestampMillis(ms),
                A::TimestampMicros(1_796_129_970_000_001),
                A::LocalTimestampMillis(ms),
                A::Date(20_788),
                A::TimeMillis(46_770_250),
                A::Union(1, Box::new(A::TimestampMillis(ms))),
                // A union with a string branch keeps the text.
                A::Union(1, Box::new(A::String("2026-12-01T12:59:30.250Z".into()))),
                A::TimestampMillis(ms),
            ]
        );
        let mut wrong = record.clone();
        wrong["ts"] = json!("yesterday");
        assert_eq!(
            e.encode(&wrong).unwrap_err(),
            "`/ts`: \"yesterday\" is not an RFC 3339 timestamp for Avro timestamp"
        );
        wrong["ts"] = json!("2026-12-01T12:59:30");
        assert!(e.encode(&wrong).is_err(), "no offset: not RFC 3339");
    }

    const PROTO: &str = "syntax = \"proto3\";\npackage hvac.v1;\nmessage Other { int32 a = 1; }\nmessage Telemetry {\n  message Part { string name = 1; }\n  string unit = 1;\n  double ambient_c = 2;\n}\n";

    #[test]
    fn protobuf_records_carry_the_message_indexes() {
        let mut e = compile(
            EncodingFormat::Protobuf,
            &[("t.proto", PROTO)],
            Some("t.proto"),
            Some("hvac.v1.Telemetry"),
            SubjectStrategy::RecordName,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.subject(), "hvac.v1.Telemetry");
        e.set_id(9);
        let bytes = e.encode(&json!({"unit": "u7", "ambient_c": 21.5})).unwrap();
        // Second top-level message: count 1, index 1, as zig-zag varints.
        assert_eq!(&bytes[..7], &[0, 0, 0, 0, 9, 2, 2]);
        assert_eq!(&bytes[7..12], &[0x0a, 2, b'u', b'7', 0x11]);
        assert!(e
            .encode(&json!({"unit": "u7", "site": "s1"}))
            .unwrap_err()
            .starts_with("does not fit `hvac.v1.Telemetry`"));

        let nested = compile(
            EncodingFormat::Protobuf,
            &[("t.proto", PROTO)],
            Some("t.proto"),
            Some("hvac.v1.Telemetry.Part"),
            SubjectStrategy::RecordName,
            None,
        )
        .unwrap()
        .unwrap();
        let Body::Protobuf { indexes, .. } = &nested.body else {
            panic!()
        };
        assert_eq!(indexes, &[1, 0]);
        let mut first = Vec::new();
        write_indexes(&mut first, &[0]);
        assert_eq!(first, [0]);
    }

    #[test]
    fn json_schema_records_are_checked_against_the_registered_schema() {
        let schema = r#"{"title": "Reading", "type": "object", "required": ["unit"]}"#;
        let mut e = compile(
            EncodingFormat::JsonSchema,
            &[("r.json", schema)],
            Some("r.json"),
            None,
            SubjectStrategy::TopicRecordName,
            Some("t"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.subject(), "t-Reading");
        e.set_id(3);
        let bytes = e.encode(&json!({"unit": "u7"})).unwrap();
        assert_eq!(&bytes[5..], br#"{"unit":"u7"}"#);
        assert!(e.encode(&json!({"no": 1})).is_err());
    }

    #[test]
    fn configuration_problems_name_the_field() {
        let problem = |r: Result<Option<Encoding>, Problem>| r.unwrap_err();
        let (field, message) = problem(compile(
            EncodingFormat::Avro,
            &[],
            None,
            None,
            SubjectStrategy::TopicName,
            Some("t"),
        ));
        assert_eq!(field, "kafka.encoding.schema");
        assert!(message.starts_with("missing"), "{message}");
        let (field, message) = problem(compile(
            EncodingFormat::Avro,
            &[("t.avsc", AVSC)],
            Some("t.avsc"),
            None,
            SubjectStrategy::TopicName,
            None,
        ));
        assert_eq!(field, "kafka.encoding.subject_strategy");
        assert!(message.contains("literal `kafka.topic`"), "{message}");
        let (_, message) = problem(compile(
            EncodingFormat::Avro,
            &[("t.avsc", "{\"type\": \"nope\"}")],
            Some("t.avsc"),
            None,
            SubjectStrategy::TopicName,
            Some("t"),
        ));
        assert!(message.contains("not an Avro schema"), "{message}");
        let (_, message) = problem(compile(
            EncodingFormat::JsonSchema,
            &[("r.json", r#"{"$ref": "common.json#/x"}"#)],
            Some("r.json"),
            None,
            SubjectStrategy::TopicName,
            Some("t"),
        ));
        assert!(message.contains("self-contained"), "{message}");
        assert!(compile(
            EncodingFormat::Json,
            &[],
            None,
            None,
            SubjectStrategy::TopicName,
            None
        )
        .unwrap()
        .is_none());
    }
}
