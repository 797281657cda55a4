//! Publishing to MQTT as devices do, and the HVAC telemetry they send.

use super::unique;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::time::Duration;

/// One message to publish.
#[derive(Clone, Debug)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub user_properties: Vec<(String, String)>,
}

impl Publish {
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>, qos: u8) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            user_properties: Vec::new(),
        }
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Publishes everything and waits until the broker acknowledged every
/// QoS 1/2 message (QoS 0: until written to the socket).
pub async fn publish_all(port: u16, messages: &[Publish]) {
    let mut options = MqttOptions::new(unique("publisher"), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(Some(1 << 24));
    let (client, mut events) = AsyncClient::new(options, messages.len() + 16);
    let expected_acks = messages.iter().filter(|m| m.qos > 0).count();
    let expected_zero = messages.len() - expected_acks;
    let feeder = {
        let client = client.clone();
        let messages = messages.to_vec();
        tokio::spawn(async move {
            for m in messages {
                let props = PublishProperties {
                    user_properties: m.user_properties.clone(),
                    ..Default::default()
                };
                client
                    .publish_with_properties(m.topic, qos(m.qos), false, m.payload, props)
                    .await
                    .expect("queue publish");
            }
        })
    };
    let (mut acks, mut zero_sent) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acks < expected_acks || zero_sent < expected_zero {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("publisher timed out waiting for acks")
            .expect("publisher connection");
        match event {
            Event::Incoming(Packet::PubAck(_)) | Event::Incoming(Packet::PubComp(_)) => acks += 1,
            Event::Outgoing(rumqttc::Outgoing::Publish(0)) => zero_sent += 1,
            _ => {}
        }
    }
    feeder.await.unwrap();
    client.disconnect().await.ok();
    // Drive the loop until DISCONNECT is written, bounded.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                _ => {}
            }
        }
    })
    .await;
}

/// An HVAC telemetry payload valid for `mappings/hvac.yaml`, carrying
/// `seq` so tests can count what landed.
pub fn telemetry(unit: u32, seq: u32) -> String {
    serde_json::json!({
        "ts": 1_700_000_000_000u64 + u64::from(seq),
        "ambient_c": 21.5, "target_c": 22.0, "humidity_pct": 40.0,
        "air_quality_ppm": 600, "blower_pct": 55, "load_pct": 48.0,
        "energy_kwh": 1000.0 + f64::from(seq), "seq": seq, "unit_no": unit
    })
    .to_string()
}

/// `count` telemetry messages spread over `units` units of one site.
pub fn telemetry_messages(site: &str, count: u32, units: u32, qos: u8) -> Vec<Publish> {
    (0..count)
        .map(|seq| {
            let unit = seq % units;
            Publish::new(
                format!("site/{site}/hvac/u{unit}/telemetry"),
                telemetry(unit, seq),
                qos,
            )
        })
        .collect()
}
