//! What a `format: sparkplug_b` route makes of a decoded message besides
//! its record: one record per metric (`sparkplug.records: per_metric`),
//! and the online state of nodes and devices (`sparkplug.online_topic`).

use crate::kafka;
use crate::mqtt::MqttMessage;
use crate::sparkplug::{self, Transition};
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

/// Records one message may become with `records: per_metric`: each record
/// repeats the message's fields and headers, so a payload of tiny metrics
/// would otherwise multiply into a transaction of hundreds of thousands.
pub const MAX_RECORDS_PER_MESSAGE: usize = 10_000;

/// A decoded message as one value per metric: the message's fields with
/// `metric` (one of its `metrics`) in place of `metrics`. A message
/// without metrics stays one value, so that nothing it told is dropped.
/// More than [`MAX_RECORDS_PER_MESSAGE`] metrics is an error.
pub(super) fn per_metric(value: Value) -> Result<Vec<Value>, String> {
    let Value::Object(mut message) = value else {
        return Ok(vec![value]);
    };
    let metrics = match message.remove("metrics") {
        Some(Value::Array(metrics)) if !metrics.is_empty() => metrics,
        _ => return Ok(vec![Value::Object(message)]),
    };
    if metrics.len() > MAX_RECORDS_PER_MESSAGE {
        return Err(format!(
            "{} metrics, more than the {MAX_RECORDS_PER_MESSAGE} records one message may become with `records: per_metric`",
            metrics.len()
        ));
    }
    Ok(metrics
        .into_iter()
        .map(|metric| {
            let mut one = message.clone();
            one.insert("metric".into(), metric);
            Value::Object(one)
        })
        .collect())
}

/// An online-state record's value.
#[derive(Serialize)]
struct OnlineState<'a> {
    group: &'a str,
    edge_node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    descriptor: &'a str,
    online: bool,
    message_type: &'a str,
    /// The birth's or death's own timestamp (ms), if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bd_seq: Option<u64>,
}

/// One record per transition for the online topic, keyed by descriptor
/// (`group/edge_node[/device]`), so a compacted topic keeps each one's
/// last state. Stamped with the time the message arrived: a device's clock
/// must not make Kafka refuse the record.
pub(super) fn online_records(
    topic: &str,
    transitions: &[Transition],
    message: &MqttMessage,
) -> Vec<kafka::Record> {
    transitions
        .iter()
        .map(|t| {
            let descriptor =
                sparkplug::topic::descriptor(&t.group, &t.edge_node, t.device.as_deref());
            let value = serde_json::to_vec(&OnlineState {
                group: &t.group,
                edge_node: &t.edge_node,
                device: t.device.as_deref(),
                descriptor: &descriptor,
                online: t.online,
                message_type: t.message_type,
                timestamp: t.timestamp,
                bd_seq: t.bd_seq,
            })
            .expect("an online state serialises");
            kafka::Record {
                topic: topic.to_string(),
                key: Some(descriptor),
                value: Bytes::from(value),
                headers: vec![(
                    super::headers::CONTENT_TYPE.to_string(),
                    b"application/json".to_vec(),
                )],
                timestamp_ms: message.received_at.timestamp_millis(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_metric_is_a_value_with_the_messages_fields() {
        let message = json!({"group": "g", "seq": 4, "metrics": [{"name": "a"}, {"name": "b"}]});
        assert_eq!(
            per_metric(message).unwrap(),
            vec![
                json!({"group": "g", "seq": 4, "metric": {"name": "a"}}),
                json!({"group": "g", "seq": 4, "metric": {"name": "b"}}),
            ]
        );
        assert_eq!(
            per_metric(json!({"group": "g", "metrics": []})).unwrap(),
            vec![json!({"group": "g"})]
        );
        assert_eq!(
            per_metric(json!({"message_type": "STATE"})).unwrap(),
            vec![json!({"message_type": "STATE"})]
        );
        let many = vec![json!({}); MAX_RECORDS_PER_MESSAGE + 1];
        assert!(per_metric(json!({"metrics": many}))
            .unwrap_err()
            .starts_with("10001 metrics, more than the 10000 records"));
    }
}
