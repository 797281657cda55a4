//! Crash and freeze points for the exactly-once tests.
//!
//! `MQTT_KAFKA_BRIDGE_CRASH_AT=<point>:<n>` makes the process abort (as a
//! SIGKILL or power cut would end it: no destructors, no DISCONNECT, no
//! flush) the `n`th time it reaches `<point>`. The points are the steps of
//! the delivery protocol; see docs/delivery.md.
//!
//! `<point>:<n>:freeze` stops the process there instead (SIGSTOP to itself,
//! every thread at once), for the zombie tests: a successor takes over while
//! this one is frozen at a known step, and it carries on from that step when
//! the test sends SIGCONT, as a paused VM or a long GC pause would.
//!
//! The points exist only in builds with the `fault` cargo feature. The test
//! suite turns it on (the crate is its own dev-dependency with that
//! feature), so `cargo test` runs a binary with the points; `cargo build`
//! and the container image do not have them, and no environment variable
//! can make a production bridge abort itself. Without the feature
//! [`point`] is an empty inline function.

/// The environment variable that arms a point (read once, at the first
/// point reached).
pub const ENV: &str = "MQTT_KAFKA_BRIDGE_CRASH_AT";

/// Every crash point, in protocol order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A message was read from the broker.
    AfterReceive,
    /// Its record was enqueued in the open transaction.
    AfterProduce,
    /// Records delivered, EndTxn not yet sent.
    BeforeCommit,
    /// EndTxn sent, its answer not yet received (the crash lands while the
    /// commit call runs).
    DuringCommit,
    /// Committed; nothing acknowledged yet.
    AfterCommit,
    /// Acks (PUBACK, PUBREC or PUBCOMP) written to the broker.
    AfterAck,
    /// A PUBREL received; its removal not yet committed.
    AfterPubrel,
    /// A command from Kafka acknowledged by the MQTT broker; its offset not
    /// yet committed.
    CommandBeforeCommit,
}

impl Point {
    /// Every point, in protocol order.
    pub const ALL: [Point; 8] = [
        Point::AfterReceive,
        Point::AfterProduce,
        Point::BeforeCommit,
        Point::DuringCommit,
        Point::AfterCommit,
        Point::AfterAck,
        Point::AfterPubrel,
        Point::CommandBeforeCommit,
    ];

    /// The name [`ENV`] uses.
    pub fn name(self) -> &'static str {
        match self {
            Point::AfterReceive => "after_receive",
            Point::AfterProduce => "after_produce",
            Point::BeforeCommit => "before_commit",
            Point::DuringCommit => "during_commit",
            Point::AfterCommit => "after_commit",
            Point::AfterAck => "after_ack",
            Point::AfterPubrel => "after_pubrel",
            Point::CommandBeforeCommit => "command_before_commit",
        }
    }

    /// The point with this name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// Aborts (or freezes) the process if this is the planned crash.
#[inline]
pub fn point(at: Point) {
    #[cfg(feature = "fault")]
    armed::point(at);
    #[cfg(not(feature = "fault"))]
    let _ = at;
}

/// For a point inside a blocking call: aborts (or freezes) from another
/// thread shortly after the call has started.
#[inline]
pub fn point_soon(at: Point) {
    #[cfg(feature = "fault")]
    armed::point_soon(at);
    #[cfg(not(feature = "fault"))]
    let _ = at;
}

/// The planned crash, from [`ENV`]'s text: `<point>[:<n>[:freeze]]`.
#[cfg(any(feature = "fault", test))]
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    point: Point,
    at: u64,
    freeze: bool,
}

#[cfg(any(feature = "fault", test))]
impl Plan {
    fn parse(value: &str) -> Result<Self, String> {
        let mut parts = value.split(':');
        let name = parts.next().unwrap_or_default();
        let point =
            Point::from_name(name).ok_or_else(|| format!("unknown crash point `{name}`"))?;
        let at = match parts.next() {
            None => 1,
            Some(n) => n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("`{n}` is not a visit count (1 or more)"))?,
        };
        let freeze = match parts.next() {
            None => false,
            Some("freeze") => true,
            Some(other) => return Err(format!("unknown crash action `{other}`")),
        };
        Ok(Self { point, at, freeze })
    }
}

#[cfg(feature = "fault")]
mod armed {
    use super::{Plan, Point, ENV};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    struct Armed {
        plan: Plan,
        seen: AtomicU64,
    }

    impl Armed {
        /// Counts a visit of `at`; true if this is the planned one.
        fn hit(&self, at: Point) -> bool {
            self.plan.point == at && self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.plan.at
        }

        fn act(&self) {
            let name = self.plan.point.name();
            if self.plan.freeze {
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

    /// The plan, read once; unset costs one load of an initialised
    /// `OnceLock` per point.
    fn armed() -> Option<&'static Armed> {
        static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
        ARMED
            .get_or_init(|| {
                let value = std::env::var(ENV).ok()?;
                match Plan::parse(&value) {
                    Ok(plan) => Some(Armed {
                        plan,
                        seen: AtomicU64::new(0),
                    }),
                    Err(e) => {
                        tracing::error!("{ENV}={value}: {e}; ignored");
                        None
                    }
                }
            })
            .as_ref()
    }

    pub(super) fn point(at: Point) {
        if let Some(armed) = armed().filter(|a| a.hit(at)) {
            armed.act();
        }
    }

    pub(super) fn point_soon(at: Point) {
        if let Some(armed) = armed().filter(|a| a.hit(at)) {
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(1));
                armed.act();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Point::ALL {
            assert_eq!(Point::from_name(p.name()), Some(p));
        }
        assert_eq!(Point::from_name("after_lunch"), None);
    }

    #[test]
    fn plans_parse_with_defaults_and_refuse_nonsense() {
        assert_eq!(
            Plan::parse("after_commit"),
            Ok(Plan {
                point: Point::AfterCommit,
                at: 1,
                freeze: false
            })
        );
        assert_eq!(
            Plan::parse("after_ack:3:freeze"),
            Ok(Plan {
                point: Point::AfterAck,
                at: 3,
                freeze: true
            })
        );
        assert!(Plan::parse("after_ack:0").is_err());
        assert!(Plan::parse("after_ack:x").is_err());
        assert!(Plan::parse("after_ack:1:explode").is_err());
        assert!(Plan::parse("nowhere:1").is_err());
    }
}
