//! A simulated fleet of HVAC units: telemetry (JSON and legacy text),
//! diagnostics dumps, some malformed messages and actuator commands.

use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the fleet sent, for the summary line.
#[derive(Debug, Default)]
pub struct FleetCounts {
    pub telemetry: AtomicU64,
    pub malformed: AtomicU64,
    pub commands: AtomicU64,
    /// Wall-dial readings, which a relay route turns into setpoints.
    pub dials: AtomicU64,
}

/// One unit's slowly drifting state.
struct Unit {
    site: String,
    id: String,
    legacy: bool,
    ambient: f64,
    target: f64,
    humidity: f64,
    co2: u32,
    energy: f64,
}

impl Unit {
    fn step(&mut self) {
        let rnd = |span: f64| (fastrand::f64() - 0.5) * span;
        self.ambient =
            (self.ambient + (self.target - self.ambient) * 0.05 + rnd(0.4)).clamp(-20.0, 45.0);
        self.humidity = (self.humidity + rnd(1.0)).clamp(10.0, 95.0);
        self.co2 = (i64::from(self.co2) + fastrand::i64(-20..=20)).clamp(380, 2500) as u32;
        self.energy += 0.01 + fastrand::f64() * 0.02;
    }

    fn blower(&self) -> u32 {
        ((self.target - self.ambient).abs() * 25.0).clamp(10.0, 100.0) as u32
    }

    fn json(&self) -> String {
        serde_json::json!({
            "ts": chrono::Utc::now().timestamp_millis(),
            "ambient_c": round(self.ambient),
            "target_c": self.target,
            "humidity_pct": round(self.humidity),
            "air_quality_ppm": self.co2,
            "blower_pct": self.blower(),
            "load_pct": round(f64::from(self.blower()) * 0.9),
            "energy_kwh": (self.energy * 1000.0).round() / 1000.0,
            "mode": if self.target < self.ambient { "cool" } else { "heat" },
        })
        .to_string()
    }

    fn text(&self) -> String {
        format!(
            "T={:.1};SP={:.1};H={:.1};CO2={};FAN={};LOAD={:.1};E={:.3}",
            self.ambient,
            self.target,
            self.humidity,
            self.co2,
            self.blower(),
            f64::from(self.blower()) * 0.9,
            self.energy
        )
    }
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Publishes `rate` messages per second in total until `stop` fires.
pub async fn run(
    port: u16,
    units: usize,
    rate: u32,
    counts: Arc<FleetCounts>,
    stop: CancellationToken,
) {
    let mut options = MqttOptions::new("demo-fleet", "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 1000);
    let poller = tokio::spawn(async move {
        loop {
            if let Err(e) = events.poll().await {
                tracing::debug!(error = %e, "fleet connection error");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    let mut fleet: Vec<Unit> = (0..units)
        .map(|i| Unit {
            site: format!("site-{}", i % 3 + 1),
            id: format!("ahu-{:03}", i + 1),
            legacy: i % 4 == 3,
            ambient: 18.0 + fastrand::f64() * 8.0,
            target: [20.0, 21.0, 22.0, 23.0][i % 4],
            humidity: 35.0 + fastrand::f64() * 20.0,
            co2: 450 + fastrand::u32(0..300),
            energy: 1000.0 + fastrand::f64() * 500.0,
        })
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        n += 1;
        let unit = &mut fleet[(n as usize) % units];
        unit.step();
        let base = format!(
            "site/{}/{}/{}",
            unit.site,
            if unit.legacy { "hvac-legacy" } else { "hvac" },
            unit.id
        );
        let (topic, payload, counter) = match n % 100 {
            // A few broken messages: out-of-range humidity, truncated JSON,
            // a legacy unit with a garbled field.
            7 if !unit.legacy => (
                format!("{base}/telemetry"),
                unit.json()
                    .replace("\"humidity_pct\":", "\"humidity_pct\":1"),
                &counts.malformed,
            ),
            37 if !unit.legacy => (
                format!("{base}/telemetry"),
                unit.json()[..20].to_string(),
                &counts.malformed,
            ),
            67 if unit.legacy => (
                format!("{base}/telemetry"),
                unit.text().replace("CO2=", "CO2=x"),
                &counts.malformed,
            ),
            // Setpoint commands to units: M2M traffic that stays on MQTT.
            50 | 90 => (
                format!("site/{}/hvac/{}/cmd/setpoint", unit.site, unit.id),
                format!("{{\"target_c\": {}}}", 19 + fastrand::u32(0..6)),
                &counts.commands,
            ),
            // A wall dial in the unit's room: the relay route makes it a
            // setpoint command for the unit, on MQTT only.
            70 => (
                format!("site/{}/room/{}/thermostat/dial", unit.site, unit.id),
                format!("{{\"target_c\": {}}}", 19 + fastrand::u32(0..6)),
                &counts.dials,
            ),
            _ if unit.legacy => (format!("{base}/telemetry"), unit.text(), &counts.telemetry),
            _ => (format!("{base}/telemetry"), unit.json(), &counts.telemetry),
        };
        if client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            break;
        }
        counter.fetch_add(1, Ordering::Relaxed);
    }
    let _ = client.disconnect().await;
    poller.abort();
}
