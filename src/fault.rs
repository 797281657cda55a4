//! Crash points for the exactly-once tests.
//!
//! `MQTT_KAFKA_BRIDGE_CRASH_AT=<point>:<n>` makes the process abort (as a
//! SIGKILL or power cut would end it: no destructors, no DISCONNECT, no
//! flush) the `n`th time it reaches `<point>`. The points are the steps of
//! the delivery protocol; see docs/delivery.md. Unset, each point costs one
//! load of an initialised `OnceLock`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const ENV: &str = "MQTT_KAFKA_BRIDGE_CRASH_AT";

/// Every crash point, in protocol order.
pub const POINTS: &[&str] = &[
    // A message was read from the broker.
    "after_receive",
    // Its record was enqueued in the open transaction.
    "after_produce",
    // Records delivered, EndTxn not yet sent.
    "before_commit",
    // EndTxn sent, its answer not yet received (the crash lands while the
    // commit call runs).
    "during_commit",
    // Committed; nothing acknowledged yet.
    "after_commit",
    // Acks (PUBACK, PUBREC or PUBCOMP) written to the broker.
    "after_ack",
    // A PUBREL received; its removal not yet committed.
    "after_pubrel",
    // A command from Kafka acknowledged by the MQTT broker; its offset not
    // yet committed.
    "command_before_commit",
];

struct Plan {
    point: String,
    at: u64,
    seen: AtomicU64,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let value = std::env::var(ENV).ok()?;
        let (point, at) = value.split_once(':').unwrap_or((value.as_str(), "1"));
        if !POINTS.contains(&point) {
            tracing::error!(point, "unknown crash point in {ENV}; ignored");
            return None;
        }
        Some(Plan {
            point: point.to_string(),
            at: at.parse().unwrap_or(1),
            seen: AtomicU64::new(0),
        })
    })
    .as_ref()
}

/// Aborts the process if this is the planned crash.
pub fn point(name: &str) {
    if let Some(plan) = plan() {
        if plan.point == name && plan.seen.fetch_add(1, Ordering::Relaxed) + 1 == plan.at {
            eprintln!("crash point {name} reached ({ENV}); aborting");
            std::process::abort();
        }
    }
}

/// For a point inside a blocking call: aborts from another thread shortly
/// after the call has started.
pub fn point_soon(name: &str) {
    if let Some(plan) = plan() {
        if plan.point == name && plan.seen.fetch_add(1, Ordering::Relaxed) + 1 == plan.at {
            std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(1));
                eprintln!("crash point during_commit reached ({ENV}); aborting");
                std::process::abort();
            });
        }
    }
}
