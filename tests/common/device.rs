//! A device on MQTT, as the bridge's commands and relays reach it: a
//! subscriber that hands the test every message it gets.

use super::unique;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a device waits for its subscription and for each message.
const ARRIVE: Duration = Duration::from_secs(60);

/// A subscribed device; messages are (topic, payload as text).
pub struct Device {
    /// Kept so the connection lives as long as the device.
    _client: AsyncClient,
    messages: mpsc::UnboundedReceiver<(String, String)>,
}

impl Device {
    /// Connects to the broker on `port` and subscribes to `filter`,
    /// returning once the broker acknowledged the subscription, so that
    /// nothing sent afterwards is missed.
    pub async fn subscribe(port: u16, filter: &str, qos: QoS) -> Self {
        let (client, mut events) =
            AsyncClient::new(MqttOptions::new(unique("device"), "127.0.0.1", port), 64);
        client
            .subscribe(filter, qos)
            .await
            .expect("queue SUBSCRIBE");
        let (tx, messages) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            while let Ok(event) = events.poll().await {
                match event {
                    Event::Incoming(Packet::SubAck(_)) => {
                        if let Some(s) = subscribed_tx.take() {
                            let _ = s.send(());
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let payload = String::from_utf8_lossy(&p.payload).into_owned();
                        if tx.send((topic, payload)).is_err() {
                            break;
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(ARRIVE, subscribed)
            .await
            .expect("SUBACK in time")
            .expect("device connection");
        Self {
            _client: client,
            messages,
        }
    }

    /// The next `n` messages, in arrival order; panics with those that
    /// came if one takes longer than a minute.
    pub async fn receive(&mut self, n: usize) -> Vec<(String, String)> {
        let mut got = Vec::new();
        while got.len() < n {
            let next = tokio::time::timeout(ARRIVE, self.messages.recv())
                .await
                .unwrap_or_else(|_| panic!("{} of {n} messages arrived: {got:?}", got.len()));
            got.push(next.expect("device connection"));
        }
        got
    }

    /// A message that has arrived and was not received yet, if any.
    pub fn try_next(&mut self) -> Option<(String, String)> {
        self.messages.try_recv().ok()
    }
}
