//! A simulated Sparkplug B edge node for the demo: a press line that is
//! born with aliased metrics, then sends DATA by alias, and is born again
//! when the bridge asks (NCMD `Node Control/Rebirth`), as Sparkplug nodes
//! are. Its will is an NDEATH with the birth's `bdSeq`.

use crate::sparkplug::proto::payload::{metric::Value, Metric};
use crate::sparkplug::proto::{DataType, Payload};
use prost::Message;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const GROUP: &str = "plant1";
const NODE: &str = "press-line-1";

/// (name, alias, datatype) of the node's metrics.
const METRICS: [(&str, u64, DataType); 4] = [
    ("Line/Speed", 1, DataType::Double),
    ("Line/PartsMade", 2, DataType::Int64),
    ("Line/Running", 3, DataType::Boolean),
    ("Press/Temperature", 4, DataType::Float),
];

fn topic(kind: &str) -> String {
    format!("spBv1.0/{GROUP}/{kind}/{NODE}")
}

fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

/// The line's state, drifting.
struct Line {
    speed: f64,
    parts: i64,
    temperature: f32,
}

impl Line {
    fn values(&self) -> [Value; 4] {
        [
            Value::DoubleValue(self.speed),
            Value::LongValue(self.parts as u64),
            Value::BooleanValue(self.speed > 0.5),
            Value::FloatValue(self.temperature),
        ]
    }

    fn step(&mut self) {
        self.speed = (self.speed + (fastrand::f64() - 0.5) * 0.2).clamp(0.0, 3.0);
        self.parts += fastrand::i64(0..4);
        self.temperature = (self.temperature + (fastrand::f32() - 0.5)).clamp(40.0, 90.0);
    }
}

/// NBIRTH: every metric with its name, alias and datatype, and `bdSeq`.
fn birth(line: &Line, bd_seq: u64) -> Vec<u8> {
    let ts = now_ms();
    let mut metrics = vec![Metric {
        name: Some("bdSeq".into()),
        datatype: Some(DataType::Int64 as u32),
        value: Some(Value::LongValue(bd_seq)),
        ..Default::default()
    }];
    metrics.extend(
        METRICS
            .iter()
            .zip(line.values())
            .map(|((name, alias, datatype), value)| Metric {
                name: Some((*name).into()),
                alias: Some(*alias),
                timestamp: Some(ts),
                datatype: Some(*datatype as u32),
                value: Some(value),
                ..Default::default()
            }),
    );
    Payload {
        timestamp: Some(ts),
        seq: Some(0),
        metrics,
        ..Default::default()
    }
    .encode_to_vec()
}

/// NDATA: values by alias only, as Sparkplug sends them.
fn data(line: &Line, seq: u8) -> Vec<u8> {
    let ts = now_ms();
    Payload {
        timestamp: Some(ts),
        seq: Some(u64::from(seq)),
        metrics: METRICS
            .iter()
            .zip(line.values())
            .map(|((_, alias, _), value)| Metric {
                alias: Some(*alias),
                timestamp: Some(ts),
                value: Some(value),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn death(bd_seq: u64) -> Vec<u8> {
    Payload {
        timestamp: Some(now_ms()),
        metrics: vec![Metric {
            name: Some("bdSeq".into()),
            datatype: Some(DataType::Int64 as u32),
            value: Some(Value::LongValue(bd_seq)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

/// Runs the edge node until `stop`, counting what it published in `sent`
/// and the rebirths it was asked for in `rebirths`.
pub async fn run(
    port: u16,
    sent: Arc<AtomicU64>,
    rebirths: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let bd_seq = 0;
    let mut options = MqttOptions::new("demo-edge-node", "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(15))
        .set_last_will(LastWill::new(
            topic("NDEATH"),
            death(bd_seq),
            QoS::AtLeastOnce,
            false,
        ));
    let (client, mut events) = AsyncClient::new(options, 100);
    let (rebirth_tx, mut rebirth_rx) = tokio::sync::mpsc::channel::<()>(1);
    let poller = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p)))
                    if p.topic.ends_with("/NCMD/press-line-1") =>
                {
                    let _ = rebirth_tx.try_send(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "edge node connection error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    let _ = client.subscribe(topic("NCMD"), QoS::AtMostOnce).await;
    let mut line = Line {
        speed: 1.2,
        parts: 0,
        temperature: 61.5,
    };
    let publish = |topic: String, payload: Vec<u8>| {
        let client = client.clone();
        let sent = sent.clone();
        async move {
            if client
                .publish(topic, QoS::AtMostOnce, false, payload)
                .await
                .is_ok()
            {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    publish(topic("NBIRTH"), birth(&line, bd_seq)).await;
    let mut seq: u8 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(()) = rebirth_rx.recv() => {
                rebirths.fetch_add(1, Ordering::Relaxed);
                seq = 0;
                publish(topic("NBIRTH"), birth(&line, bd_seq)).await;
            }
            _ = tick.tick() => {
                line.step();
                seq = seq.wrapping_add(1);
                publish(topic("NDATA"), data(&line, seq)).await;
            }
        }
    }
    // A clean goodbye, as the will would have said.
    if client
        .publish(topic("NDEATH"), QoS::AtLeastOnce, false, death(bd_seq))
        .await
        .is_ok()
    {
        sent.fetch_add(1, Ordering::Relaxed);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    poller.abort();
}
