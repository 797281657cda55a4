//! Rejections and the dead-letter records that carry them: one builder for
//! ingest and commands alike, so every dead-letter record has the same
//! headers and the same bounds.
//!
//! A dead-letter record is evidence, and what the device sent is
//! untrusted: its size is bounded whatever the input (a prefix of the
//! payload, a detail cut at [`MAX_DETAIL_BYTES`], user properties within a
//! budget), and it always says how large the original was and what its
//! SHA-256 digest is, so the whole original can be matched later even when
//! only a prefix (or nothing) was kept.

use crate::kafka;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::fmt;

/// Which rule a rejected message broke. The label values of the
/// dead-letter counters, so the set stays small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    TooLarge,
    NotUtf8,
    Parse,
    Schema,
    Transform,
    Key,
    Topic,
    Header,
    Timestamp,
    /// Kafka itself refused the record (e.g. over the topic's
    /// `max.message.bytes`, a timestamp out of its window, a topic that does
    /// not exist or is not authorised).
    KafkaRejected,
    /// The MQTT broker refused a publish (a reason code of 0x80 or more in
    /// its PUBACK or PUBREC).
    MqttRefused,
    /// A Sparkplug B message that cannot be decoded: DATA before its
    /// birth, an alias no birth declared, not Sparkplug protobuf.
    Sparkplug,
    /// The record does not fit the schema of the route's
    /// `kafka.encoding` (Avro, protobuf, JSON Schema).
    Encode,
}

impl RejectReason {
    pub const ALL: [Self; 13] = [
        Self::TooLarge,
        Self::NotUtf8,
        Self::Parse,
        Self::Schema,
        Self::Transform,
        Self::Key,
        Self::Topic,
        Self::Header,
        Self::Timestamp,
        Self::KafkaRejected,
        Self::MqttRefused,
        Self::Sparkplug,
        Self::Encode,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::NotUtf8 => "not_utf8",
            Self::Parse => "parse",
            Self::Schema => "schema",
            Self::Transform => "transform",
            Self::Key => "key",
            Self::Topic => "topic",
            Self::Header => "header",
            Self::Timestamp => "timestamp",
            Self::KafkaRejected => "kafka_rejected",
            Self::MqttRefused => "mqtt_refused",
            Self::Sparkplug => "sparkplug",
            Self::Encode => "encode",
        }
    }
}

/// Why a message went to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    /// Human-readable detail, e.g. the schema validator's message. Cut to
    /// [`MAX_DETAIL_BYTES`] in the record.
    pub detail: String,
    /// JSON pointer into the payload where the problem is, when known.
    pub path: Option<String>,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            path: None,
        }
    }

    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

/// Header names the bridge writes. MQTT user properties with these names
/// (or any `bridge.` name), in any letter case, are not carried over, so a
/// device cannot forge the source topic or a dead-letter reason.
pub mod headers {
    pub fn is_reserved(name: &str) -> bool {
        name.eq_ignore_ascii_case(MQTT_TOPIC)
            || name.eq_ignore_ascii_case(CONTENT_TYPE)
            || name
                .get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("bridge."))
    }

    pub const MQTT_TOPIC: &str = "mqtt.topic";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const ROUTE: &str = "bridge.route";
    pub const ERROR_REASON: &str = "bridge.error.reason";
    pub const ERROR_DETAIL: &str = "bridge.error.detail";
    pub const ERROR_PATH: &str = "bridge.error.path";
    /// The broker's error name when Kafka refused the record.
    pub const ERROR_KAFKA: &str = "bridge.error.kafka";
    /// The original payload's size in bytes (decimal).
    pub const ORIGINAL_SIZE: &str = "bridge.original.size";
    /// The original payload's SHA-256, lower-case hex.
    pub const ORIGINAL_SHA256: &str = "bridge.original.sha256";
    /// Present (`true`) when the record holds only a prefix of the payload.
    pub const ORIGINAL_TRUNCATED: &str = "bridge.original.truncated";
    /// The source: the MQTT topic of a message, or the Kafka topic of a
    /// command record. In stubs, which carry no other header.
    pub const SOURCE: &str = "bridge.source";
}

/// What one carried user property costs against
/// `max_user_property_bytes` beyond its name and value: a Kafka header's
/// own framing. Without it, a million empty properties would cost nothing
/// and all be copied.
pub const HEADER_OVERHEAD_BYTES: usize = 16;

/// Longest `bridge.error.detail` (and `bridge.source` in a stub) written.
pub const MAX_DETAIL_BYTES: usize = 1024;

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// How much of an untrusted original a dead-letter record may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterLimits {
    /// Longest payload prefix kept.
    pub max_payload_bytes: usize,
    /// Budget for the source's user properties (names + values) carried as
    /// headers; the rest are left out.
    pub max_user_property_bytes: usize,
}

impl Default for DeadLetterLimits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 256 * 1024,
            max_user_property_bytes: 8 * 1024,
        }
    }
}

/// What is known of the original that failed.
pub struct Evidence<'a> {
    /// The MQTT topic (ingest) or Kafka topic (command) it came from.
    pub source: &'a str,
    /// Whether `source` is an MQTT topic (written as `mqtt.topic` and used
    /// as the key) rather than a Kafka topic.
    pub from_mqtt: bool,
    /// The record key to write; `None` keys the record by `source` when it
    /// came from MQTT.
    pub key: Option<&'a str>,
    /// What was kept of the payload (all of it, unless it was discarded as
    /// it streamed in).
    pub payload: &'a Bytes,
    /// Size and digest of the whole original when `payload` is not all of
    /// it; computed from `payload` otherwise.
    pub original: Option<(usize, [u8; 32])>,
    pub user_properties: &'a [(String, String)],
    pub timestamp_ms: i64,
}

/// Which form of dead-letter record to build. When Kafka refuses one form,
/// the next, smaller one is tried: the full record, then a stub that
/// carries only `bridge.*` headers and no payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Form {
    Full,
    Stub,
}

/// Builds a dead-letter record of the given form.
pub fn dead_letter_record(
    topic: &str,
    route: &str,
    evidence: &Evidence<'_>,
    rejection: &Rejection,
    kafka_error: Option<&str>,
    limits: &DeadLetterLimits,
    form: Form,
) -> kafka::Record {
    let (size, digest) = match evidence.original {
        Some((size, digest)) => (size, hex(&digest)),
        None => (evidence.payload.len(), sha256_hex(evidence.payload)),
    };
    let mut headers = Vec::with_capacity(10);
    let full = form == Form::Full;
    if full && evidence.from_mqtt {
        headers.push((
            headers::MQTT_TOPIC.to_string(),
            evidence.source.as_bytes().to_vec(),
        ));
    }
    if !full {
        headers.push((
            headers::SOURCE.to_string(),
            truncate(evidence.source, MAX_DETAIL_BYTES)
                .as_bytes()
                .to_vec(),
        ));
    }
    let mut push = |name: &str, value: &str| headers.push((name.to_string(), value.into()));
    push(headers::ROUTE, truncate(route, MAX_DETAIL_BYTES));
    push(headers::ERROR_REASON, rejection.reason.as_str());
    push(
        headers::ERROR_DETAIL,
        truncate(&rejection.detail, MAX_DETAIL_BYTES),
    );
    if let Some(path) = &rejection.path {
        push(headers::ERROR_PATH, truncate(path, MAX_DETAIL_BYTES));
    }
    if let Some(error) = kafka_error {
        push(headers::ERROR_KAFKA, truncate(error, MAX_DETAIL_BYTES));
    }
    push(headers::ORIGINAL_SIZE, &size.to_string());
    push(headers::ORIGINAL_SHA256, &digest);
    let kept = if full {
        evidence
            .payload
            .slice(..evidence.payload.len().min(limits.max_payload_bytes))
    } else {
        Bytes::new()
    };
    if kept.len() < size {
        push(headers::ORIGINAL_TRUNCATED, "true");
    }
    if full {
        let mut budget = limits.max_user_property_bytes;
        for (k, v) in evidence.user_properties {
            // Every header written above has a reserved name.
            if headers::is_reserved(k) {
                continue;
            }
            let Some(left) = budget.checked_sub(k.len() + v.len() + HEADER_OVERHEAD_BYTES) else {
                break;
            };
            budget = left;
            headers.push((k.clone(), v.as_bytes().to_vec()));
        }
    }
    let key = match (evidence.key, evidence.from_mqtt) {
        (Some(key), _) => Some(key),
        (None, true) => Some(evidence.source),
        (None, false) => None,
    };
    kafka::Record {
        topic: topic.to_string(),
        key: key.map(|k| {
            if full {
                k.to_string()
            } else {
                truncate(k, MAX_DETAIL_BYTES).to_string()
            }
        }),
        value: kept,
        headers,
        timestamp_ms: evidence.timestamp_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence<'a>(payload: &'a Bytes, props: &'a [(String, String)]) -> Evidence<'a> {
        Evidence {
            source: "site/s1/hvac/u7/telemetry",
            from_mqtt: true,
            key: None,
            payload,
            original: None,
            user_properties: props,
            timestamp_ms: 1,
        }
    }

    #[test]
    fn reserved_names_match_in_any_case() {
        for name in [
            "Bridge.route",
            "BRIDGE.error.reason",
            "MQTT.Topic",
            "Content-Type",
        ] {
            assert!(headers::is_reserved(name), "{name}");
        }
        assert!(!headers::is_reserved("bridgeroute"));
        assert!(!headers::is_reserved("schema"));
        assert!(!headers::is_reserved("é"));
    }

    #[test]
    fn full_record_is_bounded_and_carries_size_and_digest() {
        let payload = Bytes::from(vec![b'x'; 10_000]);
        let props: Vec<_> = (0..100)
            .map(|i| (format!("p{i}"), "v".repeat(100)))
            .collect();
        let limits = DeadLetterLimits {
            max_payload_bytes: 1000,
            max_user_property_bytes: 1000,
        };
        let rejection = Rejection::new(RejectReason::Schema, "é".repeat(2000));
        let r = dead_letter_record(
            "dlq",
            "r",
            &evidence(&payload, &props),
            &rejection,
            None,
            &limits,
            Form::Full,
        );
        assert_eq!(r.value.len(), 1000);
        assert_eq!(r.header(headers::ORIGINAL_SIZE), Some(&b"10000"[..]));
        assert_eq!(
            r.header(headers::ORIGINAL_SHA256).unwrap(),
            sha256_hex(&payload).as_bytes()
        );
        assert_eq!(r.header(headers::ORIGINAL_TRUNCATED), Some(&b"true"[..]));
        assert!(r.header(headers::ERROR_DETAIL).unwrap().len() <= MAX_DETAIL_BYTES);
        let carried = r.headers.iter().filter(|(k, _)| k.starts_with('p')).count();
        assert_eq!(
            carried, 8,
            "1000-byte budget, 102 bytes + 16 of overhead each"
        );
        assert_eq!(r.key.as_deref(), Some("site/s1/hvac/u7/telemetry"));
    }

    #[test]
    fn empty_properties_still_spend_the_budget() {
        let payload = Bytes::from_static(b"{}");
        let props = vec![(String::new(), String::new()); 100_000];
        let r = dead_letter_record(
            "dlq",
            "r",
            &evidence(&payload, &props),
            &Rejection::new(RejectReason::TooLarge, "bomb"),
            None,
            &DeadLetterLimits::default(),
            Form::Full,
        );
        assert_eq!(
            r.headers.iter().filter(|(k, _)| k.is_empty()).count(),
            8 * 1024 / HEADER_OVERHEAD_BYTES
        );
    }

    #[test]
    fn stub_has_only_bridge_headers_and_no_payload() {
        let payload = Bytes::from_static(b"{}");
        let props = vec![("schema".to_string(), "v1".to_string())];
        let r = dead_letter_record(
            "dlq",
            "r",
            &evidence(&payload, &props),
            &Rejection::new(RejectReason::KafkaRejected, "refused"),
            Some("INVALID_RECORD"),
            &DeadLetterLimits::default(),
            Form::Stub,
        );
        assert!(r.value.is_empty());
        assert!(r.headers.iter().all(|(k, _)| k.starts_with("bridge.")));
        assert_eq!(r.header(headers::ORIGINAL_SIZE), Some(&b"2"[..]));
        assert_eq!(r.header(headers::ERROR_KAFKA), Some(&b"INVALID_RECORD"[..]));
        assert!(r.header(headers::ORIGINAL_TRUNCATED).is_some());
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("aé", 3), "aé");
        assert_eq!(truncate("", 0), "");
    }
}
