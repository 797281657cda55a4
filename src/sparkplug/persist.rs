//! Birth tables beyond a restart: each node's and each device's metrics
//! (name, alias, datatype) as records of the exactly-once state, written
//! in the transaction that carries the birth or death that changed them,
//! and read back at start-up. A restarted bridge then decodes DATA at once,
//! without the dead letter and rebirth round trip per node that a table
//! held only in memory costs.
//!
//! One record per node and one per device (a DBIRTH rewrites its device's
//! table alone), keyed `<group>/<edge node>[/<device>]` below the bridge's
//! own state keys; a table that is gone (a death, a new node session) is a
//! tombstone, so compaction removes it. `seq` is not kept: it changes with
//! every message, and the first message after a restart starts counting
//! again. What is not kept cannot be wrong: a table too large for one
//! record ([`MAX_RECORD_BYTES`]) is written as gone, and that node or
//! device is asked for a rebirth after a restart like before.

use super::sessions::{Known, Node, Sessions, MAX_HELD_BYTES, MAX_NODES};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A table larger than this is not persisted (Kafka's default record limit
/// is 1 MiB, and the record shares its transaction with data).
pub const MAX_RECORD_BYTES: usize = 512 * 1024;

/// Format version of a stored table; another version is not read.
const VERSION: u32 = 1;

/// One node's or device's table as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Table {
    v: u32,
    /// The node session's `bdSeq` (node tables only): a late will of an
    /// older session must still be told apart after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bd_seq: Option<u64>,
    /// (alias, name, datatype).
    metrics: Vec<(Option<u64>, String, u32)>,
}

/// A changed table: its key (`group/node[/device]`) and its value, `None`
/// when it is gone.
pub type Change = (String, Option<Vec<u8>>);

impl Sessions {
    /// Birth tables survive a restart: [`Self::take_changes`] returns what
    /// changed, for the exactly-once state, starting from `stored` (the
    /// tables as last committed).
    pub fn restore(stored: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        let mut sessions = Self::default();
        sessions.persisting = true;
        let mut devices = Vec::new();
        let mut skipped = 0usize;
        for (key, bytes) in stored {
            let parts: Vec<&str> = key.split('/').collect();
            let table = serde_json::from_slice::<Table>(&bytes)
                .ok()
                .filter(|t| t.v == VERSION);
            match (parts.as_slice(), table) {
                ([group, edge_node], Some(table)) => {
                    if !sessions.restore_node(group, edge_node, table) {
                        skipped += 1;
                    }
                }
                ([_, _, _], Some(table)) => devices.push((key, table)),
                _ => skipped += 1,
            }
        }
        // Devices after every node: a device belongs to its node's session.
        for (key, table) in devices {
            let mut parts = key.splitn(3, '/');
            let (Some(group), Some(edge_node), Some(device)) =
                (parts.next(), parts.next(), parts.next())
            else {
                unreachable!("three levels checked above")
            };
            if !sessions.restore_device(group, edge_node, device, table) {
                skipped += 1;
            }
        }
        if skipped > 0 {
            // Such a node decodes nothing until it is born again, which a
            // rebirth request asks for.
            tracing::warn!(
                skipped,
                "Sparkplug birth tables in the exactly-once state not restored (unreadable, or over the bounds)"
            );
        }
        tracing::info!(
            nodes = sessions.nodes.len,
            bytes = sessions.held,
            "Sparkplug birth tables restored"
        );
        sessions
    }

    fn restore_node(&mut self, group: &str, edge_node: &str, table: Table) -> bool {
        if self.nodes.len >= MAX_NODES || self.nodes.get(group, edge_node).is_some() {
            return false;
        }
        let mut node = Node::default();
        node.online = true;
        node.bd_seq = table.bd_seq;
        fill(&mut node, None, table.metrics);
        if self.held + node.held() > MAX_HELD_BYTES {
            return false;
        }
        self.held += node.held();
        self.nodes.insert(group, edge_node, node);
        true
    }

    fn restore_device(&mut self, group: &str, edge_node: &str, device: &str, table: Table) -> bool {
        let Some(node) = self.nodes.get_mut(group, edge_node) else {
            return false;
        };
        let before = node.held();
        fill(node, Some(device), table.metrics);
        let after = node.held();
        if self.held - before + after > MAX_HELD_BYTES {
            node.forget_device(device);
            return false;
        }
        self.held = self.held - before + after;
        true
    }

    /// The tables changed since the last call, each as its record value
    /// (or `None` when gone): empty unless the sessions were
    /// [restored](Self::restore), which is how persisting is asked for.
    pub fn take_changes(&mut self) -> Vec<Change> {
        let changed = std::mem::take(&mut self.changed);
        changed
            .into_iter()
            .map(|(group, edge_node, device)| {
                let value = self
                    .nodes
                    .get(&group, &edge_node)
                    .filter(|n| n.online)
                    .and_then(|node| table(node, device.as_deref()))
                    .map(|t| serde_json::to_vec(&t).expect("a table serialises"));
                let key = super::topic::descriptor(&group, &edge_node, device.as_deref());
                let value = match value {
                    Some(bytes) if bytes.len() > MAX_RECORD_BYTES => {
                        tracing::warn!(
                            descriptor = %key,
                            bytes = bytes.len(),
                            limit = MAX_RECORD_BYTES,
                            "Sparkplug birth table too large to persist; after a restart this one is asked for a rebirth"
                        );
                        None
                    }
                    other => other,
                };
                (key, value)
            })
            .collect()
    }
}

/// The stored table of `node`'s own metrics or of `device`'s; `None` if
/// that device is not born.
fn table(node: &Node, device: Option<&str>) -> Option<Table> {
    let key = device.map(str::to_string);
    let names = node.names.get(&key)?;
    let mut metrics: Vec<(Option<u64>, String, u32)> = node
        .aliases
        .iter()
        .filter(|(_, k)| k.device.as_deref() == device)
        .map(|(&alias, k)| (Some(alias), k.name.clone(), k.datatype))
        .chain(names.iter().map(|(n, &t)| (None, n.clone(), t)))
        .collect();
    // Stable bytes for one table, whatever the map order.
    metrics.sort_unstable();
    Some(Table {
        v: VERSION,
        bd_seq: if device.is_none() { node.bd_seq } else { None },
        metrics,
    })
}

/// Puts stored metrics into `node` as `device`'s (or its own). An alias
/// another device already holds keeps its first owner.
fn fill(node: &mut Node, device: Option<&str>, metrics: Vec<(Option<u64>, String, u32)>) {
    let key = device.map(str::to_string);
    let names = node.names.entry(key).or_default();
    let mut aliased = HashMap::new();
    for (alias, name, datatype) in metrics {
        match alias {
            Some(alias) => {
                aliased.insert(alias, (name, datatype));
            }
            None => {
                names.insert(name, datatype);
            }
        }
    }
    for (alias, (name, datatype)) in aliased {
        node.aliases.entry(alias).or_insert(Known {
            name,
            datatype,
            device: device.map(str::to_string),
        });
    }
}

#[cfg(test)]
mod tests {
    //! Births by Eclipse Tahu's JavaScript library (`tests/sparkplug`).

    use super::super::{device, fixture, node};
    use super::*;
    use serde_json::json;

    /// What a restart reads back: the last value of each key.
    fn store(stored: &mut HashMap<String, Vec<u8>>, changes: Vec<Change>) {
        for (key, value) in changes {
            match value {
                Some(v) => stored.insert(key, v),
                None => stored.remove(&key),
            };
        }
    }

    #[test]
    fn a_restart_decodes_data_with_the_tables_of_births_before_it() {
        let mut stored = HashMap::new();
        let mut before = Sessions::restore([]);
        before.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
        before
            .decode(&device("DBIRTH"), &fixture("dbirth"))
            .unwrap();
        let mut changes = before.take_changes();
        changes.sort();
        assert_eq!(
            changes.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["plant1/edge7", "plant1/edge7/press3"]
        );
        store(&mut stored, changes);
        // Data changes no table.
        before.decode(&node("NDATA"), &fixture("ndata")).unwrap();
        assert!(before.take_changes().is_empty());

        let mut after = Sessions::restore(stored.clone());
        assert_eq!(after.held, before.held);
        let node_data = after.decode(&node("NDATA"), &fixture("ndata")).unwrap();
        assert_eq!(
            node_data["metrics"],
            json!([
                {"name": "press/count", "alias": 1, "datatype": "Int32", "value": -7},
                {"name": "press/pressure", "alias": 2, "datatype": "Double", "value": 99.5},
            ])
        );
        // The first seq after a restart is not a gap.
        assert_eq!(after.take_gaps(), 0);
        assert!(after.take_rebirths().is_empty());
        let device_data = Sessions::restore(stored.clone())
            .decode(&device("DDATA"), &fixture("ddata"))
            .unwrap();
        assert_eq!(device_data["metrics"][1]["name"], "speed");
        // The restored bdSeq still tells a late will from the real death.
        after
            .decode(&node("NDEATH"), &fixture("ndeath_stale"))
            .unwrap();
        assert!(after.is_online("plant1", "edge7"));

        // The death removes both tables; a restart then knows nothing.
        after.decode(&node("NDEATH"), &fixture("ndeath")).unwrap();
        let gone = after.take_changes();
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|(_, v)| v.is_none()));
        store(&mut stored, gone);
        assert!(stored.is_empty());
    }

    #[test]
    fn a_device_death_removes_its_table_only() {
        let mut s = Sessions::restore([]);
        s.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
        s.decode(&device("DBIRTH"), &fixture("dbirth")).unwrap();
        s.take_changes();
        s.decode(&device("DDEATH"), &fixture("ddeath")).unwrap();
        assert_eq!(
            s.take_changes(),
            [("plant1/edge7/press3".to_string(), None)]
        );
    }

    #[test]
    fn nothing_is_noted_unless_persisting() {
        let mut s = Sessions::default();
        s.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
        assert!(s.take_changes().is_empty());
        assert!(s.changed.is_empty());
    }

    #[test]
    fn unreadable_tables_are_skipped_not_fatal() {
        let good = {
            let mut s = Sessions::restore([]);
            s.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
            s.take_changes().remove(0)
        };
        let s = Sessions::restore([
            ("plant1/edge7".to_string(), good.1.unwrap()),
            ("plant1/edge8".to_string(), b"not json".to_vec()),
            (
                "plant1/edge9".to_string(),
                br#"{"v":99,"metrics":[]}"#.to_vec(),
            ),
            ("a/b/c/d".to_string(), br#"{"v":1,"metrics":[]}"#.to_vec()),
            // A device whose node is not known.
            (
                "plant1/edge0/x".to_string(),
                br#"{"v":1,"metrics":[]}"#.to_vec(),
            ),
        ]);
        assert!(s.is_online("plant1", "edge7"));
        assert!(!s.is_online("plant1", "edge8"));
        assert_eq!(s.nodes.len, 1);
    }

    #[test]
    fn births_and_deaths_are_transitions() {
        let mut s = Sessions::default();
        s.decode(&node("NBIRTH"), &fixture("nbirth")).unwrap();
        let t = s.transitions().to_vec();
        assert_eq!(t.len(), 1);
        assert_eq!(
            (
                t[0].device.as_deref(),
                t[0].online,
                t[0].bd_seq,
                t[0].message_type
            ),
            (None, true, Some(7), "NBIRTH")
        );
        s.decode(&device("DBIRTH"), &fixture("dbirth")).unwrap();
        assert_eq!(s.transitions()[0].device.as_deref(), Some("press3"));
        s.decode(&node("NDATA"), &fixture("ndata")).unwrap();
        assert!(s.transitions().is_empty());
        s.decode(&node("NDEATH"), &fixture("ndeath_stale")).unwrap();
        assert!(s.transitions().is_empty(), "a late will changes nothing");
        // The node's death takes its devices offline too.
        s.decode(&node("NDEATH"), &fixture("ndeath")).unwrap();
        let t: Vec<_> = s
            .transitions()
            .iter()
            .map(|t| (t.device.clone(), t.online))
            .collect();
        assert_eq!(t, [(Some("press3".to_string()), false), (None, false)]);
        // A failed decode reports none.
        assert!(s.decode(&node("NDATA"), &fixture("ndata")).is_err());
        assert!(s.transitions().is_empty());
    }
}
