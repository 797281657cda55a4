//! Sparkplug B values as JSON, by datatype.
//!
//! Integers keep their width and sign (Sparkplug carries Int8..Int32 in a
//! uint32 field as two's complement, Int64 in a uint64), floats stay
//! numbers (non-finite ones, which JSON cannot hold, become the strings
//! `"NaN"`, `"Infinity"`, `"-Infinity"`), DateTime is milliseconds since
//! the epoch, Bytes and File are base64, arrays (packed little-endian in
//! `bytes_value`) become JSON arrays, a DataSet becomes
//! `{"columns", "types", "rows"}` and a Template
//! `{"template_ref", "version", "is_definition", "parameters", "metrics"}`.

use super::proto::payload::{self, data_set, metric, property_value, template};
use super::proto::DataType;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Map, Number, Value};

/// A metric's value on its way out: the common kinds as themselves (a
/// record is serialised straight from them, without a `Value` tree), the
/// structured ones (arrays, DataSet, Template) as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Out {
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Text(String),
    Json(Value),
}

impl From<Out> for Value {
    fn from(out: Out) -> Self {
        match out {
            Out::Null => Value::Null,
            Out::Int(v) => json!(v),
            Out::UInt(v) => json!(v),
            Out::Float(v) => json!(v),
            Out::Bool(v) => Value::Bool(v),
            Out::Text(v) => Value::String(v),
            Out::Json(v) => v,
        }
    }
}

/// One metric as the record shows it, borrowing its name from the message
/// or the birth certificate.
#[derive(Debug, Serialize)]
pub struct MetricOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    pub datatype: &'static str,
    pub value: Out,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_historical: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_transient: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<Value>,
}

/// The datatype's name as the specification writes it (`Int32`, `Double`).
pub fn datatype_name(datatype: u32) -> &'static str {
    i32::try_from(datatype)
        .ok()
        .and_then(|d| DataType::try_from(d).ok())
        .map_or("Unknown", |d| d.as_str_name())
}

/// A metric's value as JSON, read as `datatype` says. An error says what
/// does not fit (a value of another kind than the datatype, a packed array
/// of the wrong length).
pub fn metric_value(datatype: u32, value: Option<&metric::Value>) -> Result<Out, String> {
    use metric::Value as V;
    let Some(value) = value else {
        return Ok(Out::Null);
    };
    let kind = data_type(datatype);
    Ok(match (kind, value) {
        (Some(DataType::DataSet), V::DatasetValue(set)) => Out::Json(data_set(set)?),
        (Some(DataType::Template), V::TemplateValue(t)) => Out::Json(template_value(t)?),
        (Some(array), V::BytesValue(bytes)) if is_array(array) => {
            Out::Json(packed_array(array, bytes)?)
        }
        (Some(DataType::Bytes | DataType::File), V::BytesValue(bytes)) => base64(bytes),
        (_, V::IntValue(v)) => int_value(kind, datatype, *v)?,
        (_, V::LongValue(v)) => long_value(kind, datatype, *v)?,
        (_, V::FloatValue(v)) => float(f64::from(*v)),
        (_, V::DoubleValue(v)) => float(*v),
        (_, V::BooleanValue(v)) => Out::Bool(*v),
        (_, V::StringValue(v)) => Out::Text(v.clone()),
        (None, V::BytesValue(bytes)) => base64(bytes),
        (_, V::ExtensionValue(_)) => Out::Null,
        (_, other) => {
            return Err(format!(
                "datatype {} cannot hold a {}",
                datatype_name(datatype),
                value_kind(other)
            ))
        }
    })
}

fn data_type(datatype: u32) -> Option<DataType> {
    i32::try_from(datatype)
        .ok()
        .and_then(|d| DataType::try_from(d).ok())
        .filter(|d| *d != DataType::Unknown)
}

fn value_kind(value: &metric::Value) -> &'static str {
    use metric::Value as V;
    match value {
        V::IntValue(_) => "int_value",
        V::LongValue(_) => "long_value",
        V::FloatValue(_) => "float_value",
        V::DoubleValue(_) => "double_value",
        V::BooleanValue(_) => "boolean_value",
        V::StringValue(_) => "string_value",
        V::BytesValue(_) => "bytes_value",
        V::DatasetValue(_) => "dataset_value",
        V::TemplateValue(_) => "template_value",
        V::ExtensionValue(_) => "extension_value",
    }
}

/// Int8/Int16/Int32 arrive as uint32 two's complement; some encoders
/// zero-extend the narrow types instead (Int8 -5 as 251), which is taken
/// too when it fits the type.
fn int_value(kind: Option<DataType>, datatype: u32, v: u32) -> Result<Out, String> {
    let signed = v as i32;
    let narrow = |bits: u32| -> Result<Out, String> {
        let (min, max) = (-(1i32 << (bits - 1)), (1i32 << (bits - 1)) - 1);
        if (min..=max).contains(&signed) {
            Ok(Out::Int(signed.into()))
        } else if v < (1u32 << bits) {
            // Zero-extended two's complement of the narrow type.
            Ok(Out::Int(
                (((v << (32 - bits)) as i32) >> (32 - bits)).into(),
            ))
        } else {
            Err(format!("{v} does not fit {}", datatype_name(datatype)))
        }
    };
    match kind {
        Some(DataType::Int8) => narrow(8),
        Some(DataType::Int16) => narrow(16),
        Some(DataType::Int32) => Ok(Out::Int(signed.into())),
        Some(DataType::UInt8) if v > u32::from(u8::MAX) => Err(format!("{v} does not fit UInt8")),
        Some(DataType::UInt16) if v > u32::from(u16::MAX) => {
            Err(format!("{v} does not fit UInt16"))
        }
        _ => Ok(Out::UInt(v.into())),
    }
}

fn long_value(kind: Option<DataType>, _datatype: u32, v: u64) -> Result<Out, String> {
    Ok(match kind {
        Some(DataType::Int64) => Out::Int(v as i64),
        _ => Out::UInt(v),
    })
}

fn float(v: f64) -> Out {
    if v.is_finite() {
        Out::Float(v)
    } else if v.is_nan() {
        Out::Text("NaN".into())
    } else if v > 0.0 {
        Out::Text("Infinity".into())
    } else {
        Out::Text("-Infinity".into())
    }
}

/// [`float`] for the places that build JSON directly.
fn float_json(v: f64) -> Value {
    match Number::from_f64(v) {
        Some(n) => Value::Number(n),
        None => float(v).into(),
    }
}

fn base64(bytes: &[u8]) -> Out {
    Out::Text(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn is_array(kind: DataType) -> bool {
    (DataType::Int8Array as i32..=DataType::DateTimeArray as i32).contains(&(kind as i32))
}

/// Sparkplug 3.0 arrays: little-endian elements packed in `bytes_value`;
/// Boolean arrays are a u32 count then bits, most significant first;
/// String arrays are NUL-terminated strings.
fn packed_array(kind: DataType, bytes: &[u8]) -> Result<Value, String> {
    fn chunks<const N: usize>(bytes: &[u8], name: &str) -> Result<Vec<[u8; N]>, String> {
        if bytes.len() % N != 0 {
            return Err(format!(
                "{name} of {} bytes is not a whole number of {N}-byte elements",
                bytes.len()
            ));
        }
        Ok(bytes
            .chunks_exact(N)
            .map(|c| c.try_into().expect("exact chunk"))
            .collect())
    }
    let name = kind.as_str_name();
    Ok(match kind {
        DataType::Int8Array => json!(bytes.iter().map(|b| *b as i8).collect::<Vec<_>>()),
        DataType::UInt8Array => json!(bytes),
        DataType::Int16Array => json!(chunks::<2>(bytes, name)?
            .into_iter()
            .map(i16::from_le_bytes)
            .collect::<Vec<_>>()),
        DataType::UInt16Array => json!(chunks::<2>(bytes, name)?
            .into_iter()
            .map(u16::from_le_bytes)
            .collect::<Vec<_>>()),
        DataType::Int32Array => json!(chunks::<4>(bytes, name)?
            .into_iter()
            .map(i32::from_le_bytes)
            .collect::<Vec<_>>()),
        DataType::UInt32Array => json!(chunks::<4>(bytes, name)?
            .into_iter()
            .map(u32::from_le_bytes)
            .collect::<Vec<_>>()),
        DataType::Int64Array | DataType::DateTimeArray => json!(chunks::<8>(bytes, name)?
            .into_iter()
            .map(i64::from_le_bytes)
            .collect::<Vec<_>>()),
        DataType::UInt64Array => json!(chunks::<8>(bytes, name)?
            .into_iter()
            .map(u64::from_le_bytes)
            .collect::<Vec<_>>()),
        DataType::FloatArray => Value::Array(
            chunks::<4>(bytes, name)?
                .into_iter()
                .map(|c| float_json(f64::from(f32::from_le_bytes(c))))
                .collect(),
        ),
        DataType::DoubleArray => Value::Array(
            chunks::<8>(bytes, name)?
                .into_iter()
                .map(|c| float_json(f64::from_le_bytes(c)))
                .collect(),
        ),
        DataType::BooleanArray => {
            let (count, bits) = bytes
                .split_first_chunk::<4>()
                .ok_or("BooleanArray shorter than its 4-byte count")?;
            let count = u32::from_le_bytes(*count) as usize;
            if count > bits.len().saturating_mul(8) {
                return Err(format!(
                    "BooleanArray of {count} values has {} bytes of bits",
                    bits.len()
                ));
            }
            json!((0..count)
                .map(|i| bits[i / 8] & (0x80 >> (i % 8)) != 0)
                .collect::<Vec<_>>())
        }
        DataType::StringArray => {
            let body = bytes.strip_suffix(&[0]).unwrap_or(bytes);
            if body.is_empty() {
                json!([])
            } else {
                Value::Array(
                    body.split(|b| *b == 0)
                        .map(|s| Value::String(String::from_utf8_lossy(s).into_owned()))
                        .collect(),
                )
            }
        }
        other => return Err(format!("{} is not an array type", other.as_str_name())),
    })
}

fn data_set(set: &payload::DataSet) -> Result<Value, String> {
    use data_set::data_set_value::Value as D;
    let types: Vec<u32> = set.types.clone();
    let mut rows = Vec::with_capacity(set.rows.len());
    for row in &set.rows {
        let mut values = Vec::with_capacity(row.elements.len());
        for (i, element) in row.elements.iter().enumerate() {
            let datatype = types.get(i).copied().unwrap_or(0);
            let kind = data_type(datatype);
            values.push(Value::from(match &element.value {
                None => Out::Null,
                Some(D::IntValue(v)) => int_value(kind, datatype, *v)?,
                Some(D::LongValue(v)) => long_value(kind, datatype, *v)?,
                Some(D::FloatValue(v)) => float(f64::from(*v)),
                Some(D::DoubleValue(v)) => float(*v),
                Some(D::BooleanValue(v)) => Out::Bool(*v),
                Some(D::StringValue(v)) => Out::Text(v.clone()),
                Some(D::ExtensionValue(_)) => Out::Null,
            }));
        }
        rows.push(Value::Array(values));
    }
    Ok(json!({
        "columns": set.columns,
        "types": types.iter().map(|t| datatype_name(*t)).collect::<Vec<_>>(),
        "rows": rows,
    }))
}

fn template_value(t: &payload::Template) -> Result<Value, String> {
    use template::parameter::Value as P;
    let mut parameters = Map::new();
    for p in &t.parameters {
        let datatype = p.r#type.unwrap_or(0);
        let kind = data_type(datatype);
        let value = match &p.value {
            None => Out::Null,
            Some(P::IntValue(v)) => int_value(kind, datatype, *v)?,
            Some(P::LongValue(v)) => long_value(kind, datatype, *v)?,
            Some(P::FloatValue(v)) => float(f64::from(*v)),
            Some(P::DoubleValue(v)) => float(*v),
            Some(P::BooleanValue(v)) => Out::Bool(*v),
            Some(P::StringValue(v)) => Out::Text(v.clone()),
            Some(P::ExtensionValue(_)) => Out::Null,
        };
        parameters.insert(p.name.clone().unwrap_or_default(), value.into());
    }
    let mut metrics = Vec::with_capacity(t.metrics.len());
    for m in &t.metrics {
        // Template members carry their own names and datatypes.
        let out = metric_out(m, m.name.as_deref(), m.datatype.unwrap_or(0))?;
        metrics.push(serde_json::to_value(&out).expect("a metric serialises"));
    }
    let mut out = Map::new();
    if let Some(r) = &t.template_ref {
        out.insert("template_ref".into(), json!(r));
    }
    if let Some(v) = &t.version {
        out.insert("version".into(), json!(v));
    }
    out.insert(
        "is_definition".into(),
        json!(t.is_definition.unwrap_or(false)),
    );
    out.insert("parameters".into(), Value::Object(parameters));
    out.insert("metrics".into(), Value::Array(metrics));
    Ok(Value::Object(out))
}

/// One metric as the record shows it, with the name and datatype
/// resolved (from the metric itself, or its birth certificate for an
/// alias).
pub fn metric_out<'a>(
    m: &'a payload::Metric,
    name: Option<&'a str>,
    datatype: u32,
) -> Result<MetricOut<'a>, String> {
    let value = if m.is_null.unwrap_or(false) {
        Out::Null
    } else {
        metric_value(datatype, m.value.as_ref()).map_err(|e| match name {
            Some(name) => format!("metric `{name}`: {e}"),
            None => format!("metric with alias {}: {e}", m.alias.unwrap_or(0)),
        })?
    };
    Ok(MetricOut {
        name,
        alias: m.alias,
        timestamp: m.timestamp,
        datatype: datatype_name(datatype),
        value,
        is_historical: m.is_historical == Some(true),
        is_transient: m.is_transient == Some(true),
        properties: m.properties.as_ref().map(property_set),
    })
}

fn property_set(set: &payload::PropertySet) -> Value {
    use property_value::Value as P;
    let mut out = Map::new();
    for (key, value) in set.keys.iter().zip(&set.values) {
        let datatype = value.r#type.unwrap_or(0);
        let kind = data_type(datatype);
        let json = if value.is_null.unwrap_or(false) {
            Value::Null
        } else {
            match &value.value {
                None => Value::Null,
                Some(P::IntValue(v)) => int_value(kind, datatype, *v)
                    .map(Value::from)
                    .unwrap_or(json!(v)),
                Some(P::LongValue(v)) => long_value(kind, datatype, *v)
                    .map(Value::from)
                    .unwrap_or(json!(v)),
                Some(P::FloatValue(v)) => float_json(f64::from(*v)),
                Some(P::DoubleValue(v)) => float_json(*v),
                Some(P::BooleanValue(v)) => Value::Bool(*v),
                Some(P::StringValue(v)) => Value::String(v.clone()),
                Some(P::PropertysetValue(s)) => property_set(s),
                Some(P::PropertysetsValue(list)) => {
                    Value::Array(list.propertyset.iter().map(property_set).collect())
                }
                Some(P::ExtensionValue(_)) => Value::Null,
            }
        };
        out.insert(key.clone(), json);
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metric::Value as V;

    fn dt(d: DataType) -> u32 {
        d as u32
    }

    #[test]
    fn integers_keep_width_and_sign() {
        let v = |d, value| Value::from(metric_value(dt(d), Some(&value)).unwrap());
        // Tahu's encoders: uint32 two's complement.
        assert_eq!(v(DataType::Int32, V::IntValue(4_294_967_254)), json!(-42));
        assert_eq!(v(DataType::Int8, V::IntValue((-5i32) as u32)), json!(-5));
        // Zero-extended narrow two's complement, as some encoders write it.
        assert_eq!(v(DataType::Int8, V::IntValue(251)), json!(-5));
        assert_eq!(v(DataType::Int16, V::IntValue(65_535)), json!(-1));
        assert_eq!(v(DataType::UInt32, V::IntValue(u32::MAX)), json!(u32::MAX));
        assert_eq!(v(DataType::Int64, V::LongValue(u64::MAX)), json!(-1));
        assert_eq!(v(DataType::UInt64, V::LongValue(u64::MAX)), json!(u64::MAX));
        assert_eq!(
            v(DataType::DateTime, V::LongValue(1_700_000_000_000)),
            json!(1_700_000_000_000u64)
        );
        assert!(metric_value(dt(DataType::UInt8), Some(&V::IntValue(300))).is_err());
        assert!(metric_value(dt(DataType::Int8), Some(&V::IntValue(70_000))).is_err());
    }

    #[test]
    fn floats_bytes_and_mismatches() {
        let v = |d, value| metric_value(dt(d), Some(&value)).map(Value::from);
        assert_eq!(
            v(DataType::Double, V::DoubleValue(101.325)).unwrap(),
            json!(101.325)
        );
        assert_eq!(
            v(DataType::Float, V::FloatValue(f32::NAN)).unwrap(),
            json!("NaN")
        );
        assert_eq!(
            v(DataType::Double, V::DoubleValue(f64::NEG_INFINITY)).unwrap(),
            json!("-Infinity")
        );
        assert_eq!(
            v(DataType::Bytes, V::BytesValue(vec![0, 255])).unwrap(),
            json!("AP8=")
        );
        assert_eq!(
            v(DataType::Boolean, V::DatasetValue(Default::default())).unwrap_err(),
            "datatype Boolean cannot hold a dataset_value"
        );
    }

    #[test]
    fn packed_arrays_become_json_arrays() {
        let v =
            |d, bytes: Vec<u8>| metric_value(dt(d), Some(&V::BytesValue(bytes))).map(Value::from);
        assert_eq!(
            v(DataType::Int16Array, vec![0xfe, 0xff, 2, 0]).unwrap(),
            json!([-2, 2])
        );
        assert_eq!(
            v(DataType::DoubleArray, 1.5f64.to_le_bytes().to_vec()).unwrap(),
            json!([1.5])
        );
        // Count 3, bits 101.
        assert_eq!(
            v(DataType::BooleanArray, vec![3, 0, 0, 0, 0b1010_0000]).unwrap(),
            json!([true, false, true])
        );
        assert_eq!(
            v(DataType::StringArray, b"ab\0c\0".to_vec()).unwrap(),
            json!(["ab", "c"])
        );
        assert!(v(DataType::Int32Array, vec![1, 2, 3]).is_err());
        assert!(v(DataType::BooleanArray, vec![200, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn datasets_and_templates_carry_their_structure() {
        let set = payload::DataSet {
            num_of_columns: Some(2),
            columns: vec!["t".into(), "ok".into()],
            types: vec![dt(DataType::Int32), dt(DataType::Boolean)],
            rows: vec![data_set::Row {
                elements: vec![
                    data_set::DataSetValue {
                        value: Some(data_set::data_set_value::Value::IntValue(u32::MAX)),
                    },
                    data_set::DataSetValue {
                        value: Some(data_set::data_set_value::Value::BooleanValue(true)),
                    },
                ],
            }],
        };
        assert_eq!(
            Value::from(metric_value(dt(DataType::DataSet), Some(&V::DatasetValue(set))).unwrap()),
            json!({"columns": ["t", "ok"], "types": ["Int32", "Boolean"], "rows": [[-1, true]]})
        );
        let t = payload::Template {
            template_ref: Some("Motor".into()),
            metrics: vec![payload::Metric {
                name: Some("rpm".into()),
                datatype: Some(dt(DataType::Double)),
                value: Some(V::DoubleValue(1500.0)),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            Value::from(metric_value(dt(DataType::Template), Some(&V::TemplateValue(t))).unwrap()),
            json!({"template_ref": "Motor", "is_definition": false, "parameters": {},
                   "metrics": [{"name": "rpm", "datatype": "Double", "value": 1500.0}]})
        );
    }
}
