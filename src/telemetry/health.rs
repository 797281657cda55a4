//! What `/readyz` answers: one verdict from the states the parts report.
//!
//! Each part sets its own state as it changes (the MQTT session on CONNACK,
//! SUBACK and loss; the sink on `init_transactions` and from librdkafka's
//! statistics; the commit loop around each commit), and a probe reads them
//! all at once. Plain atomics: a probe never waits on the parts, so a
//! bridge busy committing still answers, and a stuck part shows as a stuck
//! state rather than as a probe timeout.
//!
//! The same states drive the connection gauges, so the scrape and the
//! probe cannot disagree.

use super::names;
use metrics::gauge;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// How long a commit may go on (retries included) before the bridge calls
/// itself not ready, unless configured (`metrics.max_commit_wait_ms`).
pub const DEFAULT_MAX_COMMIT_WAIT: Duration = Duration::from_secs(30);

const MQTT_NEVER_CONNECTED: u8 = 0;
const MQTT_DISCONNECTED: u8 = 1;
const MQTT_SUBSCRIBING: u8 = 2;
const MQTT_SUBSCRIBED: u8 = 3;
const MQTT_REFUSED: u8 = 4;

const STATE_NOT_USED: u8 = 0;
const STATE_READING: u8 = 1;
const STATE_READ: u8 = 2;

/// The bridge's parts, as last reported. Shared by the parts and the
/// probe endpoint.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    max_commit_wait: Duration,
    mqtt: AtomicU8,
    /// Subscriptions the last SUBACK refused.
    refused: AtomicU32,
    kafka_initialised: AtomicBool,
    /// Broker connections up by the last statistics; -1 before the first.
    brokers_up: AtomicI64,
    state: AtomicU8,
    /// When the current commit started, in milliseconds since `started`,
    /// plus one; 0 while no commit is under way.
    commit_since: AtomicU64,
    stopping: AtomicBool,
    /// A standby waiting for its identity's lease: ready (it is doing its
    /// job, which is waiting), with nothing else to check.
    standby: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_COMMIT_WAIT)
    }
}

impl Health {
    pub fn new(max_commit_wait: Duration) -> Self {
        Self {
            started: Instant::now(),
            max_commit_wait,
            mqtt: AtomicU8::new(MQTT_NEVER_CONNECTED),
            refused: AtomicU32::new(0),
            kafka_initialised: AtomicBool::new(false),
            brokers_up: AtomicI64::new(-1),
            state: AtomicU8::new(STATE_NOT_USED),
            commit_since: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            standby: AtomicBool::new(false),
        }
    }

    /// CONNACK accepted; subscribed at once when there is nothing to
    /// subscribe to.
    pub(crate) fn mqtt_connected(&self, subscribing: bool) {
        gauge!(names::MQTT_CONNECTED).set(1.0);
        if subscribing {
            self.mqtt.store(MQTT_SUBSCRIBING, Ordering::Relaxed);
            gauge!(names::MQTT_SUBSCRIBED).set(0.0);
        } else {
            self.mqtt_subscribed(0);
        }
    }

    /// SUBACK: `refused` of the filters were refused.
    pub(crate) fn mqtt_subscribed(&self, refused: u32) {
        self.refused.store(refused, Ordering::Relaxed);
        let (state, gauge) = if refused == 0 {
            (MQTT_SUBSCRIBED, 1.0)
        } else {
            (MQTT_REFUSED, 0.0)
        };
        self.mqtt.store(state, Ordering::Relaxed);
        gauge!(names::MQTT_SUBSCRIBED).set(gauge);
    }

    pub(crate) fn mqtt_lost(&self) {
        self.mqtt.store(MQTT_DISCONNECTED, Ordering::Relaxed);
        gauge!(names::MQTT_CONNECTED).set(0.0);
        gauge!(names::MQTT_SUBSCRIBED).set(0.0);
    }

    /// The producer has its transactional id (`init_transactions` done).
    pub(crate) fn kafka_initialised(&self) {
        self.kafka_initialised.store(true, Ordering::Relaxed);
    }

    /// From librdkafka's statistics: how many broker connections are up.
    pub(crate) fn kafka_brokers_up(&self, up: usize) {
        self.brokers_up.store(up as i64, Ordering::Relaxed);
        gauge!(names::KAFKA_BROKERS_UP).set(up as f64);
    }

    pub(crate) fn state_reading(&self) {
        self.state.store(STATE_READING, Ordering::Relaxed);
    }

    pub(crate) fn state_read(&self) {
        self.state.store(STATE_READ, Ordering::Relaxed);
    }

    /// A commit (with its retries) begins; a no-op while one is under way.
    pub(crate) fn commit_started(&self) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let _ = self
            .commit_since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The commit ended (committed, or given up at shutdown).
    pub(crate) fn commit_finished(&self) {
        self.commit_since.store(0, Ordering::Relaxed);
    }

    /// Shutdown has begun: not ready, so traffic moves elsewhere first.
    /// Waiting for the lease (`ha.mode: standby`), until [`Self::active`].
    pub(crate) fn standby(&self) {
        self.standby.store(true, Ordering::Relaxed);
        gauge!(names::STANDBY).set(1.0);
    }

    /// Holding the lease: the usual checks apply from now on.
    pub(crate) fn active(&self) {
        self.standby.store(false, Ordering::Relaxed);
        gauge!(names::STANDBY).set(0.0);
    }

    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The verdict, with each check's state; also sets the `ready` gauge.
    pub fn readiness(&self) -> Readiness {
        if self.standby.load(Ordering::Relaxed) {
            gauge!(names::READY).set(1.0);
            return Readiness {
                ready: true,
                stopping: false,
                standby: true,
                checks: [
                    ("mqtt", Check::NotUsed),
                    ("kafka", Check::NotUsed),
                    ("exactly_once_state", Check::NotUsed),
                    ("commit", Check::NotUsed),
                ],
            };
        }
        let mqtt = match self.mqtt.load(Ordering::Relaxed) {
            MQTT_SUBSCRIBED => Check::Ok,
            MQTT_NEVER_CONNECTED => Check::Failing("connecting".into()),
            MQTT_DISCONNECTED => Check::Failing("disconnected".into()),
            MQTT_SUBSCRIBING => Check::Failing("subscribing".into()),
            _ => Check::Failing(format!(
                "{} subscriptions refused",
                self.refused.load(Ordering::Relaxed)
            )),
        };
        let kafka = match (
            self.kafka_initialised.load(Ordering::Relaxed),
            self.brokers_up.load(Ordering::Relaxed),
        ) {
            (false, _) => Check::Failing("connecting".into()),
            (true, 0) => Check::Failing("no broker connection".into()),
            // Initialised means connected; statistics may not have come yet.
            (true, _) => Check::Ok,
        };
        let state = match self.state.load(Ordering::Relaxed) {
            STATE_READING => Check::Failing("reading".into()),
            STATE_READ => Check::Ok,
            _ => Check::NotUsed,
        };
        let commit = match self.commit_since.load(Ordering::Relaxed) {
            0 => Check::Ok,
            since => {
                let waited = self
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since - 1));
                if waited >= self.max_commit_wait {
                    Check::Failing(format!("committing for {} s", waited.as_secs()))
                } else {
                    Check::Ok
                }
            }
        };
        let stopping = self.stopping.load(Ordering::Relaxed);
        let checks = [
            ("mqtt", mqtt),
            ("kafka", kafka),
            ("exactly_once_state", state),
            ("commit", commit),
        ];
        let ready = !stopping && checks.iter().all(|(_, c)| !matches!(c, Check::Failing(_)));
        gauge!(names::READY).set(if ready { 1.0 } else { 0.0 });
        Readiness {
            ready,
            stopping,
            standby: false,
            checks,
        }
    }
}

/// One check's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ok,
    /// Not part of this configuration (the exactly-once state under at
    /// least once).
    NotUsed,
    /// Why not.
    Failing(String),
}

/// What `/readyz` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub stopping: bool,
    /// Waiting for the lease: ready, nothing running to check.
    pub standby: bool,
    pub checks: [(&'static str, Check); 4],
}

impl Readiness {
    /// One line of JSON, e.g. `{"status":"ready","checks":{"mqtt":"ok",...}}`.
    pub fn to_json(&self) -> String {
        let checks: serde_json::Map<String, serde_json::Value> = self
            .checks
            .iter()
            .map(|(name, check)| {
                let text = match check {
                    Check::Ok => "ok",
                    Check::NotUsed => "not used",
                    Check::Failing(why) => why,
                };
                (name.to_string(), text.into())
            })
            .collect();
        let status = match (self.ready, self.stopping) {
            _ if self.standby => "standby",
            (true, _) => "ready",
            (false, true) => "stopping",
            (false, false) => "not ready",
        };
        serde_json::json!({ "status": status, "checks": checks }).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(health: &Health, name: &str) -> Check {
        let readiness = health.readiness();
        readiness
            .checks
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c.clone())
            .expect("known check")
    }

    fn ready_health() -> Health {
        let health = Health::default();
        health.mqtt_connected(true);
        health.mqtt_subscribed(0);
        health.kafka_initialised();
        health
    }

    #[test]
    fn ready_only_when_every_part_is() {
        let health = Health::default();
        assert!(!health.readiness().ready);
        assert_eq!(check(&health, "mqtt"), Check::Failing("connecting".into()));
        assert_eq!(check(&health, "kafka"), Check::Failing("connecting".into()));
        health.kafka_initialised();
        health.state_reading();
        health.mqtt_connected(true);
        assert_eq!(check(&health, "mqtt"), Check::Failing("subscribing".into()));
        health.mqtt_subscribed(0);
        assert!(!health.readiness().ready, "the state is still being read");
        health.state_read();
        let readiness = health.readiness();
        assert!(readiness.ready, "{readiness:?}");
        assert_eq!(
            readiness.to_json(),
            r#"{"status":"ready","checks":{"mqtt":"ok","kafka":"ok","exactly_once_state":"ok","commit":"ok"}}"#
        );
    }

    #[test]
    fn a_refused_subscription_or_a_lost_connection_is_not_ready() {
        let health = ready_health();
        assert!(health.readiness().ready);
        health.mqtt_connected(true);
        health.mqtt_subscribed(2);
        assert_eq!(
            check(&health, "mqtt"),
            Check::Failing("2 subscriptions refused".into())
        );
        health.mqtt_lost();
        assert_eq!(
            check(&health, "mqtt"),
            Check::Failing("disconnected".into())
        );
        health.mqtt_connected(false);
        assert!(health.readiness().ready, "nothing to subscribe to");
    }

    #[test]
    fn no_broker_connection_is_not_ready_until_one_is_back() {
        let health = ready_health();
        health.kafka_brokers_up(0);
        assert_eq!(
            check(&health, "kafka"),
            Check::Failing("no broker connection".into())
        );
        health.kafka_brokers_up(1);
        assert!(health.readiness().ready);
    }

    #[test]
    fn a_commit_going_on_past_the_bound_is_not_ready() {
        let health = Health::new(Duration::ZERO);
        health.mqtt_connected(false);
        health.kafka_initialised();
        health.commit_started();
        assert!(
            matches!(check(&health, "commit"), Check::Failing(why) if why.starts_with("committing for")),
        );
        health.commit_finished();
        assert!(health.readiness().ready);
    }

    #[test]
    fn stopping_is_not_ready() {
        let health = ready_health();
        health.stopping();
        let readiness = health.readiness();
        assert!(!readiness.ready);
        assert!(readiness.to_json().starts_with(r#"{"status":"stopping""#));
    }
}
