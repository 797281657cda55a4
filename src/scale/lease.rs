//! Hot standby: several bridges share one identity, and only the holder of
//! a lease runs. The lease is Kafka's own: a consumer group (named after
//! the identity) on a one-partition lease topic, whose assignment says who
//! is active. The group coordinator elects; the bridge only reads the
//! assignment. Static membership (the host name) lets a restarted active
//! rejoin without handing over; a short session timeout bounds how long a
//! dead active keeps the lease.
//!
//! The new holder's `init_transactions` fences whatever the old one still
//! had open in Kafka, and its MQTT CONNECT with the shared client id takes
//! the broker session over; a frozen old holder that thaws has lost the
//! lease (its group membership is gone) and its producer is fenced, so it
//! stops.

use crate::kafka::{client_config, state_store, KafkaConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The `ha` section of the bridge file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    #[serde(default)]
    pub mode: HaMode,
    /// The one-partition topic the lease group consumes (created if
    /// missing; it holds no records).
    #[serde(default = "default_lease_topic")]
    pub lease_topic: String,
    /// How long a silent holder keeps the lease: Kafka's
    /// `session.timeout.ms` for the lease group (the broker allows 6 000
    /// at least by default).
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HaMode {
    /// Run at once (one bridge per identity).
    #[default]
    Active,
    /// Run only while holding the identity's lease.
    Standby,
}

fn default_lease_topic() -> String {
    "mqtt-bridge.lease".into()
}

fn default_session_timeout_ms() -> u64 {
    6_000
}

/// Why the lease could not be taken part in.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("cannot join the lease group {group}: {error}")]
    Join { group: String, error: String },
}

/// This bridge's part in its identity's lease group.
pub struct Lease {
    held: watch::Receiver<bool>,
    /// Held once, then not: latched, whatever the group does after.
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    /// Joins the lease group of `identity` (as member `member`, the host
    /// name) and waits until this bridge holds the lease, or `shutdown`.
    /// `None` if shut down first.
    pub async fn acquire(
        kafka: &KafkaConfig,
        ha: &HaConfig,
        identity: &str,
        member: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, LeaseError> {
        state_store::create_topic(
            kafka,
            &ha.lease_topic,
            "the standby lease",
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| LeaseError::Topic {
            topic: ha.lease_topic.clone(),
            reason: e.to_string(),
        })?;
        let group = format!("{identity}.lease");
        let join = |error: String| LeaseError::Join {
            group: group.clone(),
            error,
        };
        let mut config = client_config(kafka);
        config
            .set("group.id", &group)
            .set("group.instance.id", member)
            .set("session.timeout.ms", ha.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (ha.session_timeout_ms / 6).max(100).to_string(),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Incremental rebalancing: a standby joining the group does not
            // take the partition from the holder even for a moment (the
            // eager protocol revokes every assignment on each join, which
            // made the active stop whenever a standby started).
            .set("partition.assignment.strategy", "cooperative-sticky");
        let consumer: BaseConsumer = config.create().map_err(|e| join(e.to_string()))?;
        consumer
            .subscribe(&[&ha.lease_topic])
            .map_err(|e| join(e.to_string()))?;
        let (tx, mut held) = watch::channel(false);
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, lost) = (stop.clone(), lost.clone());
            // The group protocol runs in the consumer's poll: a thread of
            // its own, so that no runtime stall makes the holder miss its
            // heartbeats.
            std::thread::spawn(move || {
                // Each new error once: a standby that cannot join (not
                // authorised for the group, a session timeout the broker
                // refuses) must say so, not wait in silence.
                let mut last_error = String::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(Err(error)) = consumer.poll(Duration::from_millis(100)) {
                        let text = error.to_string();
                        if text != last_error {
                            tracing::warn!(error = %text, "lease group");
                            last_error = text;
                        }
                    }
                    // A fatal error (another process with this member id:
                    // `FENCED_INSTANCE_ID`) ends the membership for good.
                    let fatal = consumer.client().fatal_error();
                    if let Some((code, reason)) = &fatal {
                        tracing::error!(
                            ?code,
                            reason,
                            "lease group: fatal error; giving the lease up"
                        );
                    }
                    let holds = fatal.is_none()
                        && consumer
                            .assignment()
                            .map(|a| a.count() > 0)
                            .unwrap_or(false);
                    tx.send_if_modified(|was| {
                        let changed = *was != holds;
                        if *was && !holds {
                            lost.store(true, Ordering::Relaxed);
                        }
                        *was = holds;
                        changed
                    });
                    if fatal.is_some() {
                        return;
                    }
                }
            })
        };
        tracing::info!(group, member, "standby: waiting for the lease");
        let mut lease = Self {
            held: held.clone(),
            lost,
            stop,
            thread: Some(thread),
        };
        tokio::select! {
            taken = held.wait_for(|holds| *holds) => {
                if taken.is_err() {
                    return Err(join("the lease thread ended".into()));
                }
            }
            _ = shutdown.cancelled() => {
                lease.release();
                return Ok(None);
            }
        }
        tracing::info!(
            group,
            member,
            "took the lease: this bridge is now the active one"
        );
        Ok(Some(lease))
    }

    /// Whether this bridge holds the lease, as it changes: `false` once
    /// another member took it over, or the group lost this one.
    pub fn watcher(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }

    /// Whether the lease has been lost since it was taken.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    fn release(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}
