//! A compiled route and what it makes of a message it matched: the size
//! and defect checks, parsing, schema, transform, then a Kafka record (or,
//! for a relay, an MQTT publish). Everything a device controls is checked
//! here, before it can reach Kafka and abort a transaction.

use super::format::Format;
use super::headers;
use super::reject::{self, DeadLetterLimits};
use super::schema::Schema;
use super::template::{Context, Template};
use super::transform::Transform;
use super::{Outcome, RejectReason, Rejection, TopicFilter};
use crate::kafka;
use crate::mqtt::{Defect, MqttMessage, OutgoingPublish, Qos};
use crate::sparkplug::{self, Sessions};
use bytes::Bytes;
use regex::Regex;
use serde_json::Value;

/// Where the record timestamp comes from.
#[derive(Debug)]
pub(super) enum Timestamp {
    Received,
    Field(String),
}

/// One compiled route.
#[derive(Debug)]
pub(super) struct Route {
    pub(super) name: String,
    /// `file:line` of the route, for `check` output and warnings.
    pub(super) origin: String,
    pub(super) filter: TopicFilter,
    pub(super) regex: Option<Regex>,
    /// Group names of `regex`, appended to the filter's captures.
    pub(super) regex_groups: Vec<String>,
    pub(super) captures: Vec<String>,
    pub(super) qos: Qos,
    pub(super) format: Format,
    pub(super) schema: Option<Schema>,
    pub(super) max_payload_bytes: usize,
    pub(super) transform: Option<Transform>,
    pub(super) target: Target,
    pub(super) dead_letter_topic: String,
    /// How a Sparkplug B message is wanted: as bytes with a header-only
    /// value when nothing reads its metrics (no schema, no transform, no
    /// template pointer past the header fields), else as a whole value.
    pub(super) sparkplug_form: sparkplug::Form,
    /// `sparkplug:` options (records per metric, online topic).
    pub(super) sparkplug: SparkplugOptions,
}

/// A `format: sparkplug_b` route's `sparkplug:` options, compiled.
#[derive(Debug, Default)]
pub(super) struct SparkplugOptions {
    pub(super) per_metric: bool,
    pub(super) online_topic: Option<String>,
}

impl KafkaTarget {
    /// Every `{/pointer}` its templates read (topic, key, headers) and its
    /// timestamp field.
    pub(super) fn pointers(&self) -> Vec<&str> {
        let mut pointers: Vec<&str> = self.topic.pointers().collect();
        if let Some(key) = &self.key {
            pointers.extend(key.pointers());
        }
        for (_, header) in &self.headers {
            pointers.extend(header.pointers());
        }
        if let Timestamp::Field(field) = &self.timestamp {
            pointers.push(field);
        }
        pointers
    }
}

/// Where a route sends what it made of a message.
#[derive(Debug)]
pub(super) enum Target {
    Kafka(KafkaTarget),
    /// A relay: back to MQTT.
    Mqtt(MqttTarget),
}

#[derive(Debug)]
pub(super) struct KafkaTarget {
    pub(super) topic: Template,
    /// Glob patterns a templated topic must match (empty: any).
    pub(super) allowed_topics: Vec<glob::Pattern>,
    pub(super) key: Option<Template>,
    pub(super) headers: Vec<(String, Template)>,
    pub(super) timestamp: Timestamp,
    pub(super) user_properties: bool,
    /// The schema-registry wire format (`kafka.encoding`), if not JSON.
    pub(super) encoding: Option<Box<crate::registry::Encoding>>,
}

#[derive(Debug)]
pub(super) struct MqttTarget {
    pub(super) topic: Template,
    pub(super) qos: Qos,
    pub(super) retain: bool,
}

/// Bounds on what one device message may carry, from `limits`.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    pub(super) max_user_properties: usize,
    pub(super) max_user_property_bytes: usize,
    pub(super) max_packet_bytes: usize,
    pub(super) timestamp_max_ahead_ms: i64,
    pub(super) timestamp_max_behind_ms: Option<i64>,
    pub(super) dead_letter: DeadLetterLimits,
    /// Topics a templated Kafka topic may never render to: the state topic
    /// and every dead-letter topic (internal `__` topics are refused too).
    pub(super) reserved_topics: Vec<String>,
}

/// The rejection a message's defect calls for, if it has one.
pub(super) fn defect_rejection(message: &MqttMessage, limits: &Limits) -> Option<Rejection> {
    Some(match message.defect.as_ref()? {
        Defect::TooLarge { packet_bytes, .. } => Rejection::new(
            RejectReason::TooLarge,
            format!(
                "the packet is {packet_bytes} bytes, over limits.max_packet_bytes ({}); its payload was discarded as it arrived",
                limits.max_packet_bytes
            ),
        ),
        Defect::TopicNotUtf8 => Rejection::new(
            RejectReason::NotUtf8,
            "the topic is not UTF-8 (invalid bytes shown as U+FFFD)",
        ),
        Defect::Malformed(what) => Rejection::new(
            RejectReason::Parse,
            format!("the MQTT packet is malformed ({what}); its payload is not kept"),
        ),
    })
}

/// Bytes of user-property names and values.
fn property_bytes(message: &MqttMessage) -> usize {
    message
        .user_properties
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum()
}

/// Refuses a message over any size limit, before any work is spent on it.
fn check_size(message: &MqttMessage, max_bytes: usize, limits: &Limits) -> Result<(), Rejection> {
    let too_large = |detail: String| Err(Rejection::new(RejectReason::TooLarge, detail));
    let count = message.user_properties.len();
    if count > limits.max_user_properties {
        return too_large(format!(
            "{count} user properties, the limit is {} (limits.max_user_properties)",
            limits.max_user_properties
        ));
    }
    let props = property_bytes(message);
    if props > limits.max_user_property_bytes {
        return too_large(format!(
            "user properties of {props} bytes, the limit is {} (limits.max_user_property_bytes)",
            limits.max_user_property_bytes
        ));
    }
    let size = message.payload.len()
        + message.topic.len()
        + props
        + message.content_type.as_ref().map_or(0, String::len);
    if size > max_bytes {
        return too_large(format!(
            "message is {size} bytes (payload {}, topic {}, user properties {props}), the limit is {max_bytes}",
            message.payload.len(),
            message.topic.len(),
        ));
    }
    Ok(())
}

impl Route {
    pub(super) fn matches<'t>(&self, topic: &'t str, captures: &mut Vec<&'t str>) -> bool {
        if !self.filter.matches(topic, captures) {
            return false;
        }
        let Some(regex) = &self.regex else {
            return true;
        };
        let Some(caps) = regex.captures(topic) else {
            return false;
        };
        for name in &self.regex_groups {
            captures.push(caps.name(name).map_or("", |m| m.as_str()));
        }
        true
    }

    /// What this route makes of a message it matched; `index` is the
    /// route's own position, which the outcome carries. Records that go
    /// with the outcome whatever it is (a Sparkplug node's online state,
    /// which decoding changed) are pushed to `also`; a
    /// [`Outcome::Forward`] comes back with its own `also` empty.
    pub(super) fn process(
        &self,
        index: usize,
        message: &MqttMessage,
        captures: &[&str],
        limits: &Limits,
        sparkplug: &mut Sessions,
        also: &mut Vec<kafka::Record>,
    ) -> Result<Outcome, Rejection> {
        debug_assert_eq!(captures.len(), self.captures.len());
        if let Some(rejection) = defect_rejection(message, limits) {
            return Err(rejection);
        }
        check_size(message, self.max_payload_bytes, limits)?;
        let (parsed, ready) = match self
            .format
            .parse_as(message, sparkplug, self.sparkplug_form)?
        {
            Some(decoded) => (Some(decoded.value), decoded.bytes.map(Bytes::from)),
            None => (None, None),
        };
        if let Some(topic) = &self.sparkplug.online_topic {
            also.extend(super::sparkplug::online_records(
                topic,
                sparkplug.transitions(),
                message,
            ));
        }
        let parsed = match (self.sparkplug.per_metric, parsed) {
            // Each metric is a record of its own, or the message is
            // dead-lettered whole: never part of a message in Kafka.
            (true, Some(value)) => {
                let mut records = super::sparkplug::per_metric(value)
                    .map_err(|e| Rejection::new(RejectReason::Sparkplug, e))?
                    .into_iter()
                    .map(|value| {
                        match self.finish(index, message, captures, limits, Some(value), None)? {
                            Outcome::Forward { record, .. } => Ok(record),
                            _ => unreachable!("a Sparkplug route is an ingest route"),
                        }
                    })
                    .collect::<Result<Vec<_>, Rejection>>()?
                    .into_iter();
                let record = records.next().expect("a message is at least one record");
                also.splice(0..0, records);
                return Ok(Outcome::Forward {
                    route: index,
                    record,
                    also: Vec::new(),
                });
            }
            (_, parsed) => parsed,
        };
        self.finish(index, message, captures, limits, parsed, ready)
    }

    /// The outcome of a parsed message (`ready`: its record's bytes if the
    /// format serialised them already): schema, transform, then the record
    /// or the relay publish.
    fn finish(
        &self,
        index: usize,
        message: &MqttMessage,
        captures: &[&str],
        limits: &Limits,
        parsed: Option<Value>,
        ready: Option<Bytes>,
    ) -> Result<Outcome, Rejection> {
        if let (Some(schema), Some(value)) = (&self.schema, &parsed) {
            schema.validate(value)?;
        }
        let (value, bytes) = match (parsed, &self.transform) {
            // Serialised by the format itself (Sparkplug B, nothing reading
            // its metrics): the value holds what templates may read.
            (Some(value), None) if ready.is_some() => (Some(value), ready.expect("guarded")),
            (Some(value), Some(transform)) => {
                let out = transform
                    .apply(value, captures, message)
                    .map_err(|e| Rejection::new(RejectReason::Transform, e))?;
                let bytes =
                    Bytes::from(serde_json::to_vec(&out).expect("a Value always serializes"));
                (Some(out), bytes)
            }
            // JSON passes through byte for byte: no re-encoding cost, and
            // the consumer sees exactly what the device sent.
            (Some(value), None) if matches!(self.format, Format::Json) => {
                (Some(value), message.payload.clone())
            }
            (Some(value), None) => {
                let bytes =
                    Bytes::from(serde_json::to_vec(&value).expect("a Value always serializes"));
                (Some(value), bytes)
            }
            (None, _) => (None, message.payload.clone()),
        };
        let ctx = Context {
            captures,
            message,
            value: value.as_ref(),
        };
        match &self.target {
            Target::Kafka(kafka) => kafka
                .record(&ctx, message, value.as_ref(), bytes, limits)
                .map(|record| Outcome::Forward {
                    route: index,
                    record,
                    also: Vec::new(),
                }),
            Target::Mqtt(mqtt) => {
                let topic = mqtt
                    .topic
                    .render_mqtt_topic(&ctx)
                    .map_err(|e| Rejection::new(RejectReason::Topic, format!("topic: {e}")))?;
                Ok(Outcome::Relay {
                    route: index,
                    publish: OutgoingPublish {
                        topic,
                        payload: bytes,
                        qos: mqtt.qos,
                        retain: mqtt.retain,
                    },
                })
            }
        }
    }
}

impl KafkaTarget {
    fn record(
        &self,
        ctx: &Context<'_>,
        message: &MqttMessage,
        value: Option<&Value>,
        bytes: Bytes,
        limits: &Limits,
    ) -> Result<kafka::Record, Rejection> {
        let topic = self
            .topic
            .render(ctx)
            .map_err(|e| Rejection::new(RejectReason::Topic, format!("topic: {e}")))?;
        if self.topic.as_literal().is_none() {
            self.check_topic(&topic, limits)?;
        }
        let bytes = match (&self.encoding, value) {
            (Some(encoding), Some(value)) => Bytes::from(
                encoding
                    .encode(value)
                    .map_err(|e| Rejection::new(RejectReason::Encode, e))?,
            ),
            _ => bytes,
        };
        let key = match &self.key {
            Some(t) => Some(
                t.render(ctx)
                    .map_err(|e| Rejection::new(RejectReason::Key, format!("key: {e}")))?,
            ),
            None => None,
        };
        let mut headers =
            Vec::with_capacity(2 + self.headers.len() + message.user_properties.len());
        headers.push((
            headers::MQTT_TOPIC.to_string(),
            message.topic.as_bytes().to_vec(),
        ));
        if let Some(ct) = &message.content_type {
            headers.push((headers::CONTENT_TYPE.to_string(), ct.as_bytes().to_vec()));
        }
        if self.user_properties {
            // Configured headers win over a device's property of the same
            // name: a device cannot shadow `schema` or `tenant`.
            let carried = message.user_properties.iter().filter(|(k, _)| {
                !headers::is_reserved(k)
                    && !self.headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(k))
            });
            for (k, v) in carried {
                headers.push((k.clone(), v.as_bytes().to_vec()));
            }
        }
        for (name, template) in &self.headers {
            let v = template.render(ctx).map_err(|e| {
                Rejection::new(RejectReason::Header, format!("header `{name}`: {e}"))
            })?;
            headers.push((name.clone(), v.into_bytes()));
        }
        let timestamp_ms = match &self.timestamp {
            Timestamp::Received => message.received_at.timestamp_millis(),
            Timestamp::Field(ptr) => {
                let ts = timestamp_from(value, ptr)?;
                check_timestamp(ts, message.received_at.timestamp_millis(), limits)
                    .map_err(|e| e.with_path(ptr.as_str()))?;
                ts
            }
        };
        Ok(kafka::Record {
            topic,
            key,
            value: bytes,
            headers,
            timestamp_ms,
        })
    }
}

impl KafkaTarget {
    /// A topic that data chose must be a valid Kafka name, never one of
    /// the bridge's own topics or an internal one, and within the route's
    /// allow-list.
    fn check_topic(&self, topic: &str, limits: &Limits) -> Result<(), Rejection> {
        let refuse = |why: &str| {
            Err(Rejection::new(
                RejectReason::Topic,
                format!(
                    "`{}` {why}",
                    reject::truncate(topic, reject::MAX_DETAIL_BYTES / 2)
                ),
            ))
        };
        if !kafka::is_valid_topic_name(topic) {
            return refuse("is not a valid Kafka topic name");
        }
        if topic.starts_with("__") {
            return refuse("is an internal Kafka topic");
        }
        if limits.reserved_topics.iter().any(|t| t == topic) {
            return refuse("is the bridge's own state or dead-letter topic");
        }
        if !self.allowed_topics.is_empty() && !self.allowed_topics.iter().any(|p| p.matches(topic))
        {
            return refuse("is not in the route's kafka.allowed_topics");
        }
        Ok(())
    }
}

/// Refuses a timestamp Kafka would refuse (or that is absurd), before one
/// record aborts a whole transaction.
fn check_timestamp(ts: i64, now: i64, limits: &Limits) -> Result<(), Rejection> {
    let reject = |detail: String| Err(Rejection::new(RejectReason::Timestamp, detail));
    if ts < 0 {
        return reject(format!("timestamp {ts} is before 1970"));
    }
    let ahead = ts.saturating_sub(now);
    if ahead > limits.timestamp_max_ahead_ms {
        return reject(format!(
            "timestamp {ts} is {ahead} ms ahead of the bridge's clock; the limit is {} (limits.timestamp_max_ahead_ms)",
            limits.timestamp_max_ahead_ms
        ));
    }
    if let Some(behind) = limits.timestamp_max_behind_ms {
        let age = now.saturating_sub(ts);
        if age > behind {
            return reject(format!(
                "timestamp {ts} is {age} ms old; the limit is {behind} (limits.timestamp_max_behind_ms)"
            ));
        }
    }
    Ok(())
}

/// Reads a record timestamp: epoch milliseconds or an RFC 3339 string.
fn timestamp_from(value: Option<&Value>, ptr: &str) -> Result<i64, Rejection> {
    let reject = |detail: String| Rejection::new(RejectReason::Timestamp, detail).with_path(ptr);
    match value.and_then(|v| v.pointer(ptr)) {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .filter(|ms| *ms >= 0)
            .ok_or_else(|| {
                reject(format!(
                    "timestamp {n} is not non-negative epoch milliseconds"
                ))
            }),
        Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .map_err(|e| reject(format!("timestamp {s:?} is not RFC 3339: {e}"))),
        Some(other) => Err(reject(format!(
            "timestamp field holds {other}, not a number or string"
        ))),
        None => Err(reject(format!("payload has no timestamp field at `{ptr}`"))),
    }
}
