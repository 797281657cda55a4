//! What the bridge knows of each edge node: whether it is online, its
//! birth certificate's metrics (name, alias, datatype) and the last `seq`,
//! so that DATA messages, which carry aliases and values only, can be
//! decoded.
//!
//! Sparkplug's rules as the bridge applies them:
//! - NBIRTH starts a node's session: its metrics (and `bdSeq`) replace
//!   what was known, and its devices are forgotten until their DBIRTH.
//! - NDEATH ends it, unless its `bdSeq` is not the one of the birth (a late
//!   will message of an older session).
//! - DBIRTH/DDEATH do the same for one device, within its node's session.
//! - NDATA/DDATA resolve each metric by alias (or name) from the birth.
//! - `seq` counts 0..=255 over every message of a node's session but its
//!   death; a gap means messages were lost (counted, logged at debug).
//!
//! A message that cannot be decoded (DATA before any birth, an alias no
//! birth declared, a value its datatype cannot hold) is an error, which the
//! route turns into a dead letter with reason `sparkplug`.
//!
//! Memory is bounded whatever devices publish: at most [`MAX_NODES`] edge
//! nodes, and [`MAX_HELD_BYTES`] of birth tables over all of them (metric
//! names count by their length: a count alone would let a few births of
//! long names take gigabytes); a birth past either is refused.

use super::decode::{metric_out, MetricOut};
use super::proto::{payload::Metric, Payload};
use super::topic::{MessageType, SparkplugTopic};
use fnv::FnvHashMap;
use prost::Message;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Edge nodes tracked at most.
pub const MAX_NODES: usize = 10_000;
/// How often one edge node is asked to be born again, at most: a node that
/// keeps sending what cannot be decoded is not flooded with requests.
pub const REBIRTH_EVERY: Duration = Duration::from_secs(5);

/// Why a message cannot be decoded: for want of a birth (a rebirth request
/// can mend it), or for good.
enum Failure {
    Rebirth(String),
    Refused(String),
}

impl From<String> for Failure {
    fn from(why: String) -> Self {
        Self::Refused(why)
    }
}

impl From<&str> for Failure {
    fn from(why: &str) -> Self {
        Self::Refused(why.to_string())
    }
}
/// Metrics known from births, over all nodes and devices, at most.
pub const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;
/// The cost of one known metric besides its name (map entry, datatype).
const ENTRY_BYTES: usize = 64;

/// A metric declared in a birth certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Known {
    pub(super) name: String,
    pub(super) datatype: u32,
    /// The device that declared it; `None` for the node's own metrics.
    pub(super) device: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct Node {
    pub(super) online: bool,
    pub(super) bd_seq: Option<u64>,
    seq: Option<u8>,
    /// By alias: unique over the node and all its devices (Sparkplug 3.0).
    pub(super) aliases: HashMap<u64, Known>,
    /// Datatypes by name, for metrics sent without an alias: the node's
    /// under `None`, each device's under its id.
    pub(super) names: HashMap<Option<String>, HashMap<String, u32>>,
}

/// A node or device coming online or going offline, as the message just
/// decoded told: what a route's `sparkplug.online_topic` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub group: String,
    pub edge_node: String,
    pub device: Option<String>,
    pub online: bool,
    /// The message's own timestamp (ms), if it had one.
    pub timestamp: Option<u64>,
    /// The node session's `bdSeq` (births and deaths of nodes).
    pub bd_seq: Option<u64>,
    /// The message that told it (`NBIRTH`, `NDEATH`, `DBIRTH`, `DDEATH`).
    pub message_type: &'static str,
}

impl Node {
    /// The devices born in this session.
    pub(super) fn devices(&self) -> impl Iterator<Item = &str> {
        self.names.keys().filter_map(|d| d.as_deref())
    }

    /// What the node's birth tables hold, in bytes: names (which devices
    /// choose, up to the payload limit each) and a fixed cost per entry.
    pub(super) fn held(&self) -> usize {
        let aliases: usize = self
            .aliases
            .values()
            .map(|k| ENTRY_BYTES + k.name.len() + k.device.as_ref().map_or(0, String::len))
            .sum();
        let names: usize = self
            .names
            .iter()
            .map(|(device, names)| {
                device.as_ref().map_or(0, String::len)
                    + names.keys().map(|n| ENTRY_BYTES + n.len()).sum::<usize>()
            })
            .sum();
        aliases + names
    }

    pub(super) fn forget_device(&mut self, device: &str) {
        self.aliases
            .retain(|_, k| k.device.as_deref() != Some(device));
        self.names.remove(&Some(device.to_string()));
    }
}

/// Edge nodes by group, then by id: looked up by the topic's `&str` levels
/// without building a key (every message does it, more than once).
#[derive(Debug, Default)]
pub(super) struct Nodes {
    groups: FnvHashMap<String, FnvHashMap<String, Node>>,
    pub(super) len: usize,
}

impl Nodes {
    pub(super) fn get(&self, group: &str, edge_node: &str) -> Option<&Node> {
        self.groups.get(group)?.get(edge_node)
    }

    pub(super) fn get_mut(&mut self, group: &str, edge_node: &str) -> Option<&mut Node> {
        self.groups.get_mut(group)?.get_mut(edge_node)
    }

    pub(super) fn insert(&mut self, group: &str, edge_node: &str, node: Node) {
        let nodes = self.groups.entry(group.to_string()).or_default();
        if nodes.insert(edge_node.to_string(), node).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, group: &str, edge_node: &str) {
        if let Some(nodes) = self.groups.get_mut(group) {
            if nodes.remove(edge_node).is_some() {
                self.len -= 1;
            }
            if nodes.is_empty() {
                self.groups.remove(group);
            }
        }
    }
}

/// How a decoded message is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The whole message as a JSON value (for a schema, a transform, or
    /// templates that read metrics).
    Value,
    /// The record's bytes, serialised straight from the decoded message,
    /// and a value of the header fields alone (`group`, `message_type`,
    /// `edge_node`, `device`, `descriptor`, `timestamp`, `seq`, `uuid`) for
    /// the templates: about a third of the cost of building the value.
    Bytes,
}

/// A decoded message: the value, and in [`Form::Bytes`] the record's bytes.
#[derive(Debug)]
pub struct Decoded {
    pub value: Value,
    pub bytes: Option<Vec<u8>>,
}

/// The header fields of a decoded message, which [`Form::Bytes`] keeps as
/// a value: what a template may read without the metrics.
pub const HEADER_FIELDS: [&str; 8] = [
    "group",
    "message_type",
    "edge_node",
    "device",
    "descriptor",
    "timestamp",
    "seq",
    "uuid",
];

/// A message as the record shows it (field order as in the docs).
#[derive(Serialize)]
struct MessageOut<'a> {
    group: &'a str,
    message_type: &'static str,
    edge_node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    descriptor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Vec<MetricOut<'a>>>,
}

/// The decoded message in `form`.
fn output(
    topic: &SparkplugTopic<'_>,
    message: &Payload,
    metrics: Vec<MetricOut<'_>>,
    form: Form,
) -> Decoded {
    let mut out = MessageOut {
        group: topic.group,
        message_type: topic.message_type.as_str(),
        edge_node: topic.edge_node,
        device: topic.device,
        descriptor: topic.descriptor(),
        timestamp: message.timestamp,
        seq: message.seq,
        uuid: message.uuid.as_deref(),
        metrics: Some(metrics),
    };
    match form {
        Form::Value => Decoded {
            value: serde_json::to_value(&out).expect("a decoded message serialises"),
            bytes: None,
        },
        Form::Bytes => {
            let bytes = serde_json::to_vec(&out).expect("a decoded message serialises");
            out.metrics = None;
            Decoded {
                value: serde_json::to_value(&out).expect("a decoded message serialises"),
                bytes: Some(bytes),
            }
        }
    }
}

/// Every edge node's session, as far as its messages told.
#[derive(Debug, Default)]
pub struct Sessions {
    pub(super) nodes: Nodes,
    /// Bytes the birth tables of all nodes hold (for [`MAX_HELD_BYTES`]).
    pub(super) held: usize,
    /// Online/offline changes the last message decoded made.
    transitions: Vec<Transition>,
    /// Whether birth tables are kept beyond this process (the exactly-once
    /// state): only then are changes noted for [`Self::take_changes`],
    /// which nothing would drain otherwise.
    pub(super) persisting: bool,
    /// Tables changed since [`Self::take_changes`]: (group, edge node,
    /// device), `None` for the node's own.
    pub(super) changed: HashSet<(String, String, Option<String>)>,
    /// `seq` gaps seen and not yet taken ([`Self::take_gaps`]).
    gaps: u64,
    /// The message being decoded showed a `seq` gap.
    gap: bool,
    /// Edge nodes to ask for a rebirth, (group, edge node), not yet taken.
    rebirths: Vec<(String, String)>,
    /// When each node was last asked (bounded like `nodes`).
    asked: HashMap<(String, String), Instant>,
}

impl Sessions {
    /// Decodes one Sparkplug message into JSON, updating what is known of
    /// its node. The error says why it cannot be decoded. A message that
    /// needs a birth the bridge has not seen (DATA before it, an unknown
    /// alias, a `seq` gap) also queues a rebirth request for its node:
    /// [`Self::take_rebirths`].
    pub fn decode(&mut self, topic: &str, payload: &[u8]) -> Result<Value, String> {
        self.decode_at(topic, payload, Instant::now(), Form::Value)
            .map(|d| d.value)
    }

    /// `seq` gaps seen since the last call.
    pub fn take_gaps(&mut self) -> u64 {
        std::mem::take(&mut self.gaps)
    }

    /// The edge nodes to ask for a rebirth now, (group, edge node): at
    /// most one request per node per [`REBIRTH_EVERY`].
    pub fn take_rebirths(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.rebirths)
    }

    fn want_rebirth(&mut self, topic: &SparkplugTopic<'_>, now: Instant) {
        let key = (topic.group.to_string(), topic.edge_node.to_string());
        if let Some(last) = self.asked.get(&key) {
            if now.saturating_duration_since(*last) < REBIRTH_EVERY {
                return;
            }
        } else if self.asked.len() >= MAX_NODES {
            // Nodes asked long ago make room; if none, no request now.
            self.asked
                .retain(|_, last| now.saturating_duration_since(*last) < REBIRTH_EVERY);
            if self.asked.len() >= MAX_NODES {
                return;
            }
        }
        self.asked.insert(key.clone(), now);
        self.rebirths.push(key);
    }

    /// [`Self::decode`] at `now` (for the rebirth rate limit), in `form`.
    pub fn decode_at(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        form: Form,
    ) -> Result<Decoded, String> {
        self.transitions.clear();
        let topic = SparkplugTopic::parse(topic)?;
        if topic.message_type == MessageType::State {
            let value = state_message(&topic, payload);
            let bytes = (form == Form::Bytes)
                .then(|| serde_json::to_vec(&value).expect("a Value serialises"));
            return Ok(Decoded { value, bytes });
        }
        let message =
            Payload::decode(payload).map_err(|e| format!("not a Sparkplug B payload: {e}"))?;
        // Counted whether or not the metrics can be decoded: the message
        // arrived, and only lost ones make a gap.
        if matches!(
            topic.message_type,
            MessageType::DBirth | MessageType::DDeath | MessageType::NData | MessageType::DData
        ) {
            self.sequence(&topic, &message);
            if std::mem::take(&mut self.gap) {
                self.want_rebirth(&topic, now);
            }
        }
        let decoded = match topic.message_type {
            MessageType::NBirth => self.node_birth(&topic, &message),
            MessageType::DBirth => self.device_birth(&topic, &message),
            MessageType::NDeath => self.node_death(&topic, &message),
            MessageType::DDeath => self.device_death(&topic, &message),
            MessageType::NData | MessageType::DData => self.data(&topic, &message),
            // Commands from host applications name their metrics.
            MessageType::NCmd | MessageType::DCmd | MessageType::State => {
                declared(&message.metrics).map_err(Failure::from)
            }
        };
        let out = match decoded {
            Ok(metrics) => Ok(output(&topic, &message, metrics, form)),
            Err(failure) => Err(failure),
        };
        match out {
            Ok(decoded) => Ok(decoded),
            Err(Failure::Rebirth(why)) => {
                self.want_rebirth(&topic, now);
                Err(why)
            }
            Err(Failure::Refused(why)) => Err(why),
        }
    }

    /// The nodes and devices the last message decoded brought online or
    /// took offline, in the order it did.
    pub fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    /// Notes a transition, and the table it changed for persisting.
    fn transition(
        &mut self,
        topic: &SparkplugTopic<'_>,
        message: &Payload,
        device: Option<&str>,
        online: bool,
        bd_seq: Option<u64>,
    ) {
        self.note_changed(topic.group, topic.edge_node, device);
        self.transitions.push(Transition {
            group: topic.group.to_string(),
            edge_node: topic.edge_node.to_string(),
            device: device.map(str::to_string),
            online,
            timestamp: message.timestamp,
            bd_seq,
            message_type: topic.message_type.as_str(),
        });
    }

    fn note_changed(&mut self, group: &str, edge_node: &str, device: Option<&str>) {
        if self.persisting {
            self.changed.insert((
                group.to_string(),
                edge_node.to_string(),
                device.map(str::to_string),
            ));
        }
    }

    /// Whether the node is online (born, not dead).
    pub fn is_online(&self, group: &str, edge_node: &str) -> bool {
        self.nodes.get(group, edge_node).is_some_and(|n| n.online)
    }

    fn node_birth<'m>(
        &mut self,
        topic: &SparkplugTopic<'_>,
        message: &'m Payload,
    ) -> Result<Vec<MetricOut<'m>>, Failure> {
        let known = self.nodes.get(topic.group, topic.edge_node);
        if known.is_none() && self.nodes.len >= MAX_NODES {
            return Err(format!(
                "NBIRTH of a new edge node past the {MAX_NODES} the bridge tracks"
            )
            .into());
        }
        let previous = known.map_or(0, Node::held);
        let mut node = Node {
            online: true,
            seq: message.seq.map(|s| s as u8),
            ..Node::default()
        };
        let metrics = register(&mut node, None, &message.metrics)?;
        node.bd_seq = bd_seq(message);
        let total = self.held - previous + node.held();
        if total > MAX_HELD_BYTES {
            return Err(format!(
                "NBIRTH past the {} MiB the bridge keeps of birth certificates over all edge nodes",
                MAX_HELD_BYTES >> 20
            )
            .into());
        }
        self.held = total;
        let bd_seq = node.bd_seq;
        let earlier_devices = self
            .nodes
            .get(topic.group, topic.edge_node)
            .map(|n| n.devices().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default();
        self.nodes.insert(topic.group, topic.edge_node, node);
        // A new session: the devices of the last one are offline until
        // their own births.
        for device in earlier_devices {
            self.transition(topic, message, Some(&device), false, None);
        }
        self.transition(topic, message, None, true, bd_seq);
        Ok(metrics)
    }

    fn device_birth<'m>(
        &mut self,
        topic: &SparkplugTopic<'_>,
        message: &'m Payload,
    ) -> Result<Vec<MetricOut<'m>>, Failure> {
        let device = topic.device.expect("a device message").to_string();
        let node = self.online_node(topic)?;
        let before = node.held();
        // Staged on a copy, so that a refused birth leaves the node as it
        // was (births are rare; the copy is one node's tables).
        let mut staged = Node {
            aliases: node.aliases.clone(),
            names: node.names.clone(),
            ..Node::default()
        };
        staged.forget_device(&device);
        let metrics = register(&mut staged, Some(&device), &message.metrics)?;
        let after = staged.held();
        if self.held - before + after > MAX_HELD_BYTES {
            return Err(format!(
                "DBIRTH past the {} MiB the bridge keeps of birth certificates over all edge nodes",
                MAX_HELD_BYTES >> 20
            )
            .into());
        }
        let node = self.online_node(topic)?;
        node.aliases = staged.aliases;
        node.names = staged.names;
        self.held = self.held - before + after;
        self.transition(topic, message, Some(&device), true, None);
        Ok(metrics)
    }

    fn node_death<'m>(
        &mut self,
        topic: &SparkplugTopic<'_>,
        message: &'m Payload,
    ) -> Result<Vec<MetricOut<'m>>, Failure> {
        let metrics = declared(&message.metrics)?;
        let bd_seq = bd_seq(message);
        if let Some(node) = self.nodes.get(topic.group, topic.edge_node) {
            // A will message of an older session (its bdSeq is not the
            // birth's) says nothing about the session now.
            let stale = matches!((node.bd_seq, bd_seq), (Some(born), Some(died)) if born != died);
            if !stale {
                let gone = node.held();
                let devices: Vec<String> = node.devices().map(str::to_string).collect();
                self.held -= gone;
                self.nodes.remove(topic.group, topic.edge_node);
                for device in devices {
                    self.transition(topic, message, Some(&device), false, None);
                }
                self.transition(topic, message, None, false, bd_seq);
            }
        }
        Ok(metrics)
    }

    fn device_death<'m>(
        &mut self,
        topic: &SparkplugTopic<'_>,
        message: &'m Payload,
    ) -> Result<Vec<MetricOut<'m>>, Failure> {
        let device = topic.device.expect("a device message");
        // Decoded first: a death that is dead-lettered changes nothing
        // (else the table went from memory but not from the state topic
        // or the online topic).
        let metrics = declared(&message.metrics)?;
        let node = self.online_node(topic)?;
        let before = node.held();
        node.forget_device(device);
        let after = node.held();
        self.held -= before - after;
        self.transition(topic, message, Some(device), false, None);
        Ok(metrics)
    }

    /// DATA metrics with names and datatypes from the birth: borrowed from
    /// what the node's birth left here, so no name is copied.
    fn data<'a>(
        &'a mut self,
        topic: &SparkplugTopic<'_>,
        message: &'a Payload,
    ) -> Result<Vec<MetricOut<'a>>, Failure> {
        let node = self.online_node(topic)?;
        // A born device has an entry here (`register` makes it), aliases
        // or not.
        let device = topic.device.map(str::to_string);
        if let Some(d) = topic.device {
            if !node.names.contains_key(&device) {
                return Err(Failure::Rebirth(format!(
                    "DDATA from device `{d}` before its DBIRTH"
                )));
            }
        }
        let mut out = Vec::with_capacity(message.metrics.len());
        for m in &message.metrics {
            let (name, datatype) = match (m.alias, &m.name) {
                (Some(alias), _) => {
                    let known = node.aliases.get(&alias).ok_or_else(|| {
                        Failure::Rebirth(format!("alias {alias} is not in the birth certificate"))
                    })?;
                    if known.device.as_deref() != topic.device {
                        return Err(Failure::Rebirth(format!(
                            "alias {alias} belongs to {}, not to this {}",
                            known
                                .device
                                .as_deref()
                                .map_or("the node".into(), |d| format!("device `{d}`")),
                            if topic.device.is_some() {
                                "device"
                            } else {
                                "node"
                            }
                        )));
                    }
                    (known.name.as_str(), m.datatype.unwrap_or(known.datatype))
                }
                (None, Some(name)) => {
                    let datatype = node
                        .names
                        .get(&device)
                        .and_then(|names| names.get(name))
                        .copied()
                        .or(m.datatype)
                        .ok_or_else(|| {
                            Failure::Rebirth(format!(
                                "metric `{name}` is not in the birth certificate"
                            ))
                        })?;
                    (name.as_str(), datatype)
                }
                (None, None) => return Err("a metric with neither alias nor name".into()),
            };
            out.push(metric_out(m, Some(name), datatype)?);
        }
        Ok(out)
    }

    fn online_node(&mut self, topic: &SparkplugTopic<'_>) -> Result<&mut Node, Failure> {
        self.nodes
            .get_mut(topic.group, topic.edge_node)
            .filter(|n| n.online)
            .ok_or_else(|| {
                Failure::Rebirth(format!(
                    "{} from edge node `{}/{}` before its NBIRTH",
                    topic.message_type, topic.group, topic.edge_node
                ))
            })
    }

    /// Notes the message's `seq`: the next after the node's last, or a gap.
    fn sequence(&mut self, topic: &SparkplugTopic<'_>, message: &Payload) {
        let Some(seq) = message.seq else { return };
        let seq = seq as u8;
        if let Some(node) = self.nodes.get_mut(topic.group, topic.edge_node) {
            if let Some(last) = node.seq {
                if seq != last.wrapping_add(1) {
                    self.gaps += 1;
                    self.gap = true;
                    tracing::debug!(
                        descriptor = %topic.descriptor(),
                        expected = last.wrapping_add(1),
                        got = seq,
                        "Sparkplug seq gap: messages of this edge node were lost"
                    );
                }
            }
            node.seq = Some(seq);
        }
    }
}

/// Records a birth's metrics in `node` (as `device`'s) and returns them as
/// JSON. Every metric of a birth must name itself and its datatype.
fn register<'m>(
    node: &mut Node,
    device: Option<&str>,
    metrics: &'m [Metric],
) -> Result<Vec<MetricOut<'m>>, String> {
    let mut out = Vec::with_capacity(metrics.len());
    let names = node.names.entry(device.map(str::to_string)).or_default();
    for m in metrics {
        let name = m
            .name
            .clone()
            .ok_or("a birth certificate metric without a name")?;
        let datatype = m
            .datatype
            .ok_or_else(|| format!("birth certificate metric `{name}` has no datatype"))?;
        if let Some(alias) = m.alias {
            if let Some(other) = node.aliases.get(&alias) {
                if other.name != name || other.device.as_deref() != device {
                    return Err(format!(
                        "alias {alias} is declared for `{}` and `{name}`",
                        other.name
                    ));
                }
            }
            node.aliases.insert(
                alias,
                Known {
                    name: name.clone(),
                    datatype,
                    device: device.map(str::to_string),
                },
            );
        } else {
            names.insert(name.clone(), datatype);
        }
        out.push(metric_out(m, m.name.as_deref(), datatype)?);
    }
    Ok(out)
}

/// The `bdSeq` metric of a birth or death: which session of the node's
/// MQTT connection it belongs to.
fn bd_seq(message: &Payload) -> Option<u64> {
    use super::proto::payload::metric::Value as V;
    let metric = message
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))?;
    match metric.value {
        Some(V::LongValue(v)) => Some(v),
        Some(V::IntValue(v)) => Some(u64::from(v)),
        _ => None,
    }
}

/// Metrics that name themselves and their datatype (deaths, commands).
fn declared(metrics: &[Metric]) -> Result<Vec<MetricOut<'_>>, String> {
    metrics
        .iter()
        .map(|m| metric_out(m, m.name.as_deref(), m.datatype.unwrap_or(0)))
        .collect()
}

/// `spBv1.0/STATE/<host>`: Sparkplug 3.0 sends JSON (`{"online": true,
/// "timestamp": ...}`), 2.2 the text `ONLINE`/`OFFLINE`.
fn state_message(topic: &SparkplugTopic<'_>, payload: &[u8]) -> Value {
    let body = serde_json::from_slice::<Value>(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
    json!({"message_type": "STATE", "host": topic.edge_node, "state": body})
}
