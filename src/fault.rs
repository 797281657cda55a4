//! Crash points for the exactly-once tests.
//!
//! `MQTT_KAFKA_BRIDGE_CRASH_AT=<point>:<n>` makes the process abort (as a
//! SIGKILL or power cut would end it: no destructors, no DISCONNECT, no
//! flush) the `n`th time it reaches `<point>`. The points are the steps of
//! the delivery protocol; see docs/delivery.md. Unset, each point costs one
//! load of an initialised `OnceLock`.
//!
//! `<point>:<n>:freeze` stops the process there instead (SIGSTOP to itself,
//! every thread at once), for the zombie tests: a successor takes over while
//! this one is frozen at a known step, and it carries on from that step when
//! the test sends SIGCONT, as a paused VM or a long GC pause would.

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
    freeze: bool,
}

impl Plan {
    /// Counts a visit of `name`; true if this is the planned one.
    fn hit(&self, name: &str) -> bool {
        self.point == name && self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.at
    }

    fn act(&self, name: &str) {
        if self.freeze {
            eprintln!("crash point {name} reached ({ENV}); freezing");
            // SAFETY: raise has no preconditions; SIGSTOP cannot be caught.
            unsafe {
                libc::raise(libc::SIGSTOP);
            }
            eprintln!("crash point {name}: thawed, carrying on");
        } else {
            eprintln!("crash point {name} reached ({ENV}); aborting");
            std::process::abort();
        }
    }
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let value = std::env::var(ENV).ok()?;
        let mut parts = value.split(':');
        let point = parts.next().unwrap_or_default();
        let at = parts.next().unwrap_or("1");
        let freeze = match parts.next() {
            None => false,
            Some("freeze") => true,
            Some(other) => {
                tracing::error!(action = other, "unknown crash action in {ENV}; ignored");
                return None;
            }
        };
        if !POINTS.contains(&point) {
            tracing::error!(point, "unknown crash point in {ENV}; ignored");
            return None;
        }
        Some(Plan {
            point: point.to_string(),
            at: at.parse().unwrap_or(1),
            seen: AtomicU64::new(0),
            freeze,
        })
    })
    .as_ref()
}

/// Aborts (or freezes) the process if this is the planned crash.
pub fn point(name: &str) {
    if let Some(plan) = plan().filter(|p| p.hit(name)) {
        plan.act(name);
    }
}

/// For a point inside a blocking call: aborts (or freezes) from another
/// thread shortly after the call has started.
pub fn point_soon(name: &'static str) {
    if let Some(plan) = plan().filter(|p| p.hit(name)) {
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(1));
            plan.act(name);
        });
    }
}
