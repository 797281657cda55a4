//! Several bridges on one topic tree: how the work is split between them.
//!
//! Two ways, each built on what the brokers already do. A **share group**
//! (`mqtt.share_group`) lets the MQTT broker spread messages over the
//! bridges of the group (`$share/<group>/<filter>`), for throughput; which
//! bridge gets a message is the broker's choice, so one device's messages
//! may be split and their order per key in Kafka is not kept. **Partitioned**
//! (`partition`, this module) keeps that order: every bridge receives every
//! message and keeps only those it owns, the owner being a stable hash of
//! the record key (or the MQTT topic) modulo the number of bridges, at the
//! cost of each message crossing the broker N times. A message a bridge does
//! not own is acknowledged with its batch, like one no route matches.
//! **Standby** (`ha.mode: standby`, `lease`) is the other axis: several
//! bridges with one identity, of which only the holder of a Kafka lease
//! runs.

mod lease;

pub use lease::{HaConfig, HaMode, Lease, LeaseError};

use crate::route::Outcome;
use serde::Deserialize;

/// The `partition` section: which share of the keys this bridge owns.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    /// How many bridges split the keys.
    pub instances: u32,
    /// This bridge's slot, `0..instances`, or `ordinal`: the number the
    /// host name ends with (`bridge-2` is 2), which a Kubernetes
    /// StatefulSet gives each pod.
    pub instance: Instance,
    /// What decides the owner.
    #[serde(default)]
    pub by: PartitionBy,
}

/// A slot given outright, or read from the host name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Instance {
    Slot(u32),
    Named(InstanceName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceName {
    Ordinal,
}

/// What a message's owner is computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionBy {
    /// The record's key (the MQTT topic for a record without one, a dead
    /// letter or a relay): one key's records in order, wherever they come
    /// from.
    #[default]
    Key,
    /// The MQTT topic: one topic's messages in order.
    Topic,
}

/// The slots of a partitioned bridge, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub instances: u32,
    pub slot: u32,
    pub by: PartitionBy,
}

impl PartitionConfig {
    /// The slot this bridge owns; `host` is the host name (for `ordinal`).
    /// The error is for `partition.instance` or `partition.instances`.
    pub fn resolve(&self, host: &str) -> Result<Partition, (String, String)> {
        if self.instances == 0 {
            return Err(("partition.instances".into(), "must be at least 1".into()));
        }
        let slot = match self.instance {
            Instance::Slot(slot) => slot,
            Instance::Named(InstanceName::Ordinal) => ordinal(host).ok_or_else(|| {
                (
                    "partition.instance".to_string(),
                    format!("is `ordinal`, but the host name `{host}` does not end with `-<number>` (as a StatefulSet's pods do)"),
                )
            })?,
        };
        if slot >= self.instances {
            return Err((
                "partition.instance".into(),
                format!(
                    "is {slot}, out of range for {} instances (0 to {})",
                    self.instances,
                    self.instances - 1
                ),
            ));
        }
        Ok(Partition {
            instances: self.instances,
            slot,
            by: self.by,
        })
    }
}

/// This machine's host name: `HOSTNAME` (set in every Kubernetes pod to
/// the pod's name), else the kernel's.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
}

/// The number a host name ends with after its last `-`.
fn ordinal(host: &str) -> Option<u32> {
    host.rsplit_once('-')?.1.parse().ok()
}

impl Partition {
    /// Whether this bridge owns the message `outcome` came from (on MQTT
    /// topic `topic`).
    pub fn owns(&self, outcome: &Outcome, topic: &str) -> bool {
        let basis = match (self.by, outcome) {
            (
                PartitionBy::Key,
                Outcome::Forward {
                    record: crate::kafka::Record { key: Some(key), .. },
                    ..
                },
            ) => key.as_str(),
            _ => topic,
        };
        self.slot_of(basis) == self.slot
    }

    /// The slot that owns `basis`: FNV-1a (64 bit) of its bytes modulo the
    /// instances. Part of the contract: every bridge of a group, of any
    /// version, must compute the same owner.
    pub fn slot_of(&self, basis: &str) -> u32 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in basis.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (hash % u64::from(self.instances)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(instances: u32, instance: Instance) -> PartitionConfig {
        PartitionConfig {
            instances,
            instance,
            by: PartitionBy::Key,
        }
    }

    #[test]
    fn slots_come_from_the_config_or_the_host_name() {
        assert_eq!(config(3, Instance::Slot(2)).resolve("x").unwrap().slot, 2);
        let ordinal = config(3, Instance::Named(InstanceName::Ordinal));
        assert_eq!(ordinal.resolve("bridge-1").unwrap().slot, 1);
        assert_eq!(
            ordinal.resolve("bridge").unwrap_err().0,
            "partition.instance"
        );
        let (field, message) = ordinal.resolve("bridge-3").unwrap_err();
        assert_eq!(field, "partition.instance");
        assert_eq!(message, "is 3, out of range for 3 instances (0 to 2)");
        assert_eq!(
            config(0, Instance::Slot(0)).resolve("x").unwrap_err().0,
            "partition.instances"
        );
    }

    #[test]
    fn every_key_has_exactly_one_owner_and_the_hash_is_fixed() {
        let slots: Vec<Partition> = (0..3)
            .map(|slot| config(3, Instance::Slot(slot)).resolve("x").unwrap())
            .collect();
        let mut per_slot = [0u32; 3];
        for unit in 0..3000 {
            let key = format!("site-1.ahu-{unit:04}");
            let owners: Vec<u32> = slots
                .iter()
                .filter(|p| p.slot_of(&key) == p.slot)
                .map(|p| p.slot)
                .collect();
            assert_eq!(owners.len(), 1, "{key}");
            per_slot[owners[0] as usize] += 1;
        }
        // Spread evenly enough: each slot within 10 % of a third.
        assert!(
            per_slot.iter().all(|&n| (900..=1100).contains(&n)),
            "{per_slot:?}"
        );
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c: the hash is the contract.
        assert_eq!(
            slots[0].slot_of("a"),
            (0xaf63_dc4c_8601_ec8c_u64 % 3) as u32
        );
    }
}
