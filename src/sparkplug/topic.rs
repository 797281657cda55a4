//! The Sparkplug B topic namespace:
//! `spBv1.0/<group_id>/<message_type>/<edge_node_id>[/<device_id>]`, and
//! `spBv1.0/STATE/<host_id>` for host applications.

use std::fmt;

/// The namespace every Sparkplug B topic starts with.
pub const NAMESPACE: &str = "spBv1.0";

/// What a Sparkplug message is, from its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    NBirth,
    NDeath,
    DBirth,
    DDeath,
    NData,
    DData,
    NCmd,
    DCmd,
    State,
}

impl MessageType {
    fn parse(level: &str) -> Option<Self> {
        Some(match level {
            "NBIRTH" => Self::NBirth,
            "NDEATH" => Self::NDeath,
            "DBIRTH" => Self::DBirth,
            "DDEATH" => Self::DDeath,
            "NDATA" => Self::NData,
            "DDATA" => Self::DData,
            "NCMD" => Self::NCmd,
            "DCMD" => Self::DCmd,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NBirth => "NBIRTH",
            Self::NDeath => "NDEATH",
            Self::DBirth => "DBIRTH",
            Self::DDeath => "DDEATH",
            Self::NData => "NDATA",
            Self::DData => "DDATA",
            Self::NCmd => "NCMD",
            Self::DCmd => "DCMD",
            Self::State => "STATE",
        }
    }

    /// Whether the type names a device (its topic has a device level).
    pub fn is_device(self) -> bool {
        matches!(self, Self::DBirth | Self::DDeath | Self::DData | Self::DCmd)
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed Sparkplug topic. For `STATE`, `group` is empty and
/// `edge_node` holds the host application's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparkplugTopic<'a> {
    pub group: &'a str,
    pub message_type: MessageType,
    pub edge_node: &'a str,
    pub device: Option<&'a str>,
}

impl<'a> SparkplugTopic<'a> {
    /// Parses a topic of the namespace; the error says what is wrong with
    /// it (a device message without a device level, an unknown type...).
    pub fn parse(topic: &'a str) -> Result<Self, String> {
        let mut levels = topic.split('/');
        if levels.next() != Some(NAMESPACE) {
            return Err(format!("`{topic}` is not in the {NAMESPACE} namespace"));
        }
        let levels: Vec<&str> = levels.collect();
        if let ["STATE", host] = levels.as_slice() {
            return Ok(Self {
                group: "",
                message_type: MessageType::State,
                edge_node: host,
                device: None,
            });
        }
        let (group, kind, node, device) = match levels.as_slice() {
            [group, kind, node] => (*group, *kind, *node, None),
            [group, kind, node, device] => (*group, *kind, *node, Some(*device)),
            _ => {
                return Err(format!(
                    "`{topic}` is not {NAMESPACE}/<group>/<type>/<edge node>[/<device>]"
                ))
            }
        };
        let message_type = MessageType::parse(kind)
            .ok_or_else(|| format!("`{kind}` is not a Sparkplug B message type"))?;
        if [group, node]
            .iter()
            .chain(device.iter())
            .any(|l| l.is_empty())
        {
            return Err(format!("`{topic}` has an empty level"));
        }
        match (message_type.is_device(), device.is_some()) {
            (true, false) => return Err(format!("{message_type} needs a device level")),
            (false, true) => {
                return Err(format!(
                    "{message_type} is a node message: it has no device level"
                ))
            }
            _ => {}
        }
        Ok(Self {
            group,
            message_type,
            edge_node: node,
            device,
        })
    }

    /// `group/edge_node[/device]`: what identifies the sender (Sparkplug
    /// 3.0's "descriptor"), and the default record key.
    pub fn descriptor(&self) -> String {
        descriptor(self.group, self.edge_node, self.device)
    }
}

/// `group/edge_node[/device]`: who sent a message, as record keys, the
/// online topic and the persisted birth tables name it.
pub fn descriptor(group: &str, edge_node: &str, device: Option<&str>) -> String {
    match device {
        Some(device) => format!("{group}/{edge_node}/{device}"),
        None => format!("{group}/{edge_node}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_device_and_state_topics() {
        let t = SparkplugTopic::parse("spBv1.0/plant1/DDATA/edge7/press3").unwrap();
        assert_eq!(
            (t.group, t.message_type, t.edge_node, t.device),
            ("plant1", MessageType::DData, "edge7", Some("press3"))
        );
        assert_eq!(t.descriptor(), "plant1/edge7/press3");
        let t = SparkplugTopic::parse("spBv1.0/plant1/NBIRTH/edge7").unwrap();
        assert_eq!((t.message_type, t.device), (MessageType::NBirth, None));
        assert_eq!(t.descriptor(), "plant1/edge7");
        let t = SparkplugTopic::parse("spBv1.0/STATE/scada").unwrap();
        assert_eq!((t.message_type, t.edge_node), (MessageType::State, "scada"));
    }

    #[test]
    fn refuses_what_is_not_the_namespace() {
        for (topic, why) in [
            ("spAv1.0/g/NDATA/n", "namespace"),
            ("spBv1.0/g/NDATA", "is not spBv1.0/"),
            ("spBv1.0/g/XDATA/n", "not a Sparkplug B message type"),
            ("spBv1.0/g/DDATA/n", "DDATA needs a device level"),
            ("spBv1.0/g/NDATA/n/d", "NDATA is a node message"),
            ("spBv1.0//NDATA/n", "empty level"),
            ("spBv1.0/g/NDATA/n/d/e", "is not spBv1.0/"),
        ] {
            let error = SparkplugTopic::parse(topic).unwrap_err();
            assert!(error.contains(why), "{topic}: {error}");
        }
    }
}
