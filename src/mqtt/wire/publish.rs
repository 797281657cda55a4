//! The variable header of a PUBLISH: topic, packet id and the MQTT 5
//! properties the bridge keeps.
//!
//! Apart from framing because this is where a device's bytes are read
//! field by field: every length is checked against the packet, a topic
//! that is not UTF-8 or a broken property block becomes a [`Defect`]
//! rather than a lost connection, and what is kept is capped.

use super::decode::variable_int;
use super::{Inbound, WireError, MAX_KEPT_USER_PROPERTIES};
use crate::mqtt::{Defect, MqttMessage, MqttProtocol, Qos};
use bytes::Bytes;
use chrono::Utc;

/// MQTT 5 properties of an oversized PUBLISH up to this size are read and
/// kept (user properties, content type: evidence); a longer block is
/// discarded with the payload.
const MAX_KEPT_PROPERTY_BYTES: usize = 64 * 1024;

/// The variable header of a PUBLISH.
#[derive(Debug)]
pub(super) struct Head {
    qos: Qos,
    dup: bool,
    retain: bool,
    topic: String,
    topic_not_utf8: bool,
    packet_id: u16,
    user_properties: Vec<(String, String)>,
    content_type: Option<String>,
    /// Bytes after the fixed header up to the payload, or up to the
    /// property block when that is skipped.
    pub(super) consumed: usize,
    /// Property bytes left unread (too many to keep), or, when the block
    /// is malformed, everything after the packet id.
    pub(super) skipped_properties: usize,
    /// The MQTT 5 property block cannot be read (its length runs past the
    /// packet): the packet's framing still holds, so the message is taken,
    /// without payload, and dead-lettered rather than the connection ended.
    pub(super) malformed: Option<&'static str>,
}

impl Head {
    pub(super) fn into_inbound(self, payload: Bytes, too_large: Option<Defect>) -> Inbound {
        let defect = self
            .malformed
            .map(Defect::Malformed)
            .or(too_large)
            .or(self.topic_not_utf8.then_some(Defect::TopicNotUtf8));
        Inbound::Publish {
            packet_id: self.packet_id,
            message: MqttMessage {
                topic: self.topic,
                payload,
                qos: self.qos,
                retain: self.retain,
                dup: self.dup,
                user_properties: self.user_properties,
                content_type: self.content_type,
                received_at: Utc::now(),
                defect,
            },
        }
    }
}

/// Reads the variable header of a PUBLISH from `body` (what has arrived of
/// the `remaining` bytes after the fixed header). `None` until enough has
/// arrived; an error when a field runs past the packet or the broker broke
/// the protocol (QoS 3, packet id 0), as nothing of the packet can be
/// trusted then.
///
/// `keep_all_properties`: read the property block whatever its size (the
/// whole packet is in memory); otherwise a block over
/// [`MAX_KEPT_PROPERTY_BYTES`] is left to be skipped.
pub(super) fn publish_head(
    protocol: MqttProtocol,
    byte1: u8,
    body: &[u8],
    remaining: usize,
    keep_all_properties: bool,
) -> Result<Option<Head>, WireError> {
    // Whether `n` more bytes from `at` are there: an error past the packet,
    // false when they have not arrived yet.
    let have = |at: usize, n: usize, what: &'static str| -> Result<bool, WireError> {
        if at + n > remaining {
            Err(WireError::Malformed(what))
        } else {
            Ok(at + n <= body.len())
        }
    };
    let Some(qos) = Qos::from_u8((byte1 >> 1) & 0b11) else {
        return Err(WireError::Malformed("PUBLISH with QoS 3"));
    };
    if !have(0, 2, "PUBLISH topic length past the packet")? {
        return Ok(None);
    }
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    if !have(2, topic_len, "PUBLISH topic past the packet")? {
        return Ok(None);
    }
    let topic_bytes = &body[2..2 + topic_len];
    let mut at = 2 + topic_len;
    let mut packet_id = 0;
    if qos != Qos::AtMostOnce {
        if !have(at, 2, "PUBLISH packet id past the packet")? {
            return Ok(None);
        }
        packet_id = u16::from_be_bytes([body[at], body[at + 1]]);
        if packet_id == 0 {
            return Err(WireError::Malformed(
                "PUBLISH with QoS 1 or 2 and packet id 0",
            ));
        }
        at += 2;
    }
    let (mut user_properties, mut content_type, mut skipped_properties) = (Vec::new(), None, 0);
    let mut malformed = None;
    if protocol == MqttProtocol::V5 {
        // A broken property block inside an intact frame: skip the rest of
        // the packet (its length is known) and keep what identifies it.
        let after_id = at;
        let problem = match variable_int(&body[at..]) {
            Ok(Some((_, len_len))) if at + len_len > remaining => {
                Some("PUBLISH property length past the packet")
            }
            Ok(Some((properties_len, len_len))) if at + len_len + properties_len > remaining => {
                Some("PUBLISH properties past the packet")
            }
            Ok(Some((properties_len, len_len))) => {
                at += len_len;
                if keep_all_properties || properties_len <= MAX_KEPT_PROPERTY_BYTES {
                    if at + properties_len > body.len() {
                        return Ok(None);
                    }
                    (user_properties, content_type) =
                        publish_properties(&body[at..at + properties_len]);
                    at += properties_len;
                } else {
                    skipped_properties = properties_len;
                }
                None
            }
            Ok(None) if body.len() >= remaining => Some("PUBLISH property length past the packet"),
            Ok(None) => return Ok(None),
            Err(()) => Some("PUBLISH property length over four bytes"),
        };
        if let Some(what) = problem {
            malformed = Some(what);
            at = after_id;
            skipped_properties = remaining - after_id;
        }
    }
    let (topic, topic_not_utf8) = match std::str::from_utf8(topic_bytes) {
        Ok(t) => (t.to_string(), false),
        Err(_) => (String::from_utf8_lossy(topic_bytes).into_owned(), true),
    };
    Ok(Some(Head {
        qos,
        dup: byte1 & 0b1000 != 0,
        retain: byte1 & 0b0001 != 0,
        topic,
        topic_not_utf8,
        packet_id,
        user_properties,
        content_type,
        consumed: at,
        skipped_properties,
        malformed,
    }))
}

/// The user properties and content type of a PUBLISH property block.
/// Lenient: what the bridge does not use is skipped, text that is not
/// UTF-8 has its bytes replaced, and reading stops (keeping what was read)
/// at a property it cannot size; the payload's place is known from the
/// block's length either way.
fn publish_properties(mut block: &[u8]) -> (Vec<(String, String)>, Option<String>) {
    fn take<'a>(block: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if block.len() < n {
            return None;
        }
        let (taken, rest) = block.split_at(n);
        *block = rest;
        Some(taken)
    }
    fn binary<'a>(block: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = take(block, 2)?;
        take(block, usize::from(u16::from_be_bytes([len[0], len[1]])))
    }
    fn text(block: &mut &[u8]) -> Option<String> {
        binary(block).map(|b| String::from_utf8_lossy(b).into_owned())
    }
    let mut user_properties = Vec::new();
    let mut content_type = None;
    let mut read = |block: &mut &[u8]| -> Option<()> {
        match take(block, 1)?[0] {
            // Payload format indicator.
            0x01 => {
                take(block, 1)?;
            }
            // Message expiry interval.
            0x02 => {
                take(block, 4)?;
            }
            0x03 => content_type = Some(text(block)?),
            // Response topic, correlation data.
            0x08 | 0x09 => {
                binary(block)?;
            }
            // Subscription identifier.
            0x0b => {
                let (_, len) = variable_int(block).ok()??;
                take(block, len)?;
            }
            // Topic alias.
            0x23 => {
                take(block, 2)?;
            }
            0x26 if user_properties.len() > MAX_KEPT_USER_PROPERTIES => {
                binary(block)?;
                binary(block)?;
            }
            0x26 => {
                let name = text(block)?;
                let value = text(block)?;
                user_properties.push((name, value));
            }
            _ => return None,
        }
        Some(())
    };
    while !block.is_empty() {
        if read(&mut block).is_none() {
            break;
        }
    }
    (user_properties, content_type)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{Decoder, DEFAULT_MAX_PACKET_BYTES};
    use super::*;
    use bytes::BytesMut;
    use rumqttc::v5::mqttbytes::v5::{self, PublishProperties};

    #[test]
    fn a_topic_that_is_not_utf8_becomes_a_defective_message() {
        for protocol in BOTH {
            // PUBLISH QoS 1, topic "a\xffb", packet id 7, payload "xy",
            // then a valid one: both are decoded, in order.
            let mut body = vec![0, 3, b'a', 0xff, b'b', 0, 7];
            if protocol == MqttProtocol::V5 {
                body.push(0);
            }
            body.extend_from_slice(b"xy");
            let mut bytes = fixed(0x32, body.len());
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(&publish_bytes(protocol, "a/b", 8, b"ok"));
            let mut buf = BytesMut::from(&bytes[..]);
            let mut d = decoder(protocol);
            let (packet_id, message) = expect_publish(d.decode(&mut buf).unwrap());
            assert_eq!(packet_id, 7);
            assert_eq!(message.topic, "a\u{fffd}b");
            assert_eq!(&message.payload[..], b"xy");
            assert_eq!(message.defect, Some(Defect::TopicNotUtf8));
            let (packet_id, message) = expect_publish(d.decode(&mut buf).unwrap());
            assert_eq!((packet_id, message.defect), (8, None));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn publish_properties_are_read_and_bad_ones_do_not_break_the_packet() {
        let mut p = v5::Publish::new(
            "a/b",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            b"payload".to_vec(),
            Some(PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                response_topic: Some("r/t".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into()), ("k2".into(), "v2".into())],
                subscription_identifiers: vec![300],
                content_type: Some("application/json".into()),
                topic_alias: None,
            }),
        );
        p.pkid = 3;
        let mut buf = BytesMut::new();
        v5::Packet::Publish(p).write(&mut buf, None).unwrap();
        let (_, message) = expect_publish(decoder(MqttProtocol::V5).decode(&mut buf).unwrap());
        assert_eq!(
            message.user_properties,
            [("k".into(), "v".into()), ("k2".into(), "v2".into())]
        );
        assert_eq!(message.content_type.as_deref(), Some("application/json"));
        assert_eq!(&message.payload[..], b"payload");

        // A user property value that is not UTF-8, then an unknown
        // property: the first is kept (bytes replaced), the rest skipped,
        // the payload found by the block's length.
        let props = [&[0x26, 0, 1, b'k', 0, 2, b'v', 0xfe][..], &[0x7f, 1, 2, 3]].concat();
        let mut body = vec![0, 1, b't', 0, 4, props.len() as u8];
        body.extend_from_slice(&props);
        body.extend_from_slice(b"data");
        let mut bytes = fixed(0x32, body.len());
        bytes.extend_from_slice(&body);
        let mut buf = BytesMut::from(&bytes[..]);
        let (packet_id, message) =
            expect_publish(decoder(MqttProtocol::V5).decode(&mut buf).unwrap());
        assert_eq!(packet_id, 4);
        assert_eq!(message.user_properties, [("k".into(), "v\u{fffd}".into())]);
        assert_eq!(&message.payload[..], b"data");
        assert_eq!(message.defect, None);
    }

    /// Half a million empty user properties fit in a 2 MiB packet; the
    /// decoder keeps one more than its cap, so memory stays bounded and the
    /// count still trips any `limits.max_user_properties`.
    #[test]
    fn user_property_bombs_are_kept_only_up_to_the_cap() {
        let mut props = Vec::new();
        for _ in 0..100_000 {
            props.extend_from_slice(&[0x26, 0, 0, 0, 0]);
        }
        let mut body = vec![0, 1, b'a', 0, 7];
        let len = varint(props.len());
        body.extend_from_slice(&len);
        body.extend_from_slice(&props);
        body.extend_from_slice(b"{}");
        let mut buf = BytesMut::from(&fixed(0x32, body.len())[..]);
        buf.extend_from_slice(&body);
        let Some(Inbound::Publish { message, .. }) =
            decoder(MqttProtocol::V5).decode(&mut buf).unwrap()
        else {
            panic!("no publish");
        };
        assert_eq!(message.user_properties.len(), MAX_KEPT_USER_PROPERTIES + 1);
        assert_eq!(&message.payload[..], b"{}");
    }

    /// A property block that runs past an intact frame is not worth a
    /// reconnect (the broker would resend the same packet first): the
    /// message comes out without payload, marked malformed, with its
    /// packet id so it is acked in order, and the next packet decodes.
    #[test]
    fn a_broken_property_block_is_a_defect_not_a_lost_connection() {
        let broken: [&[u8]; 3] = [
            // QoS 1, id 7, property length 9 in a 2-byte remainder.
            &[0x32, 7, 0, 1, b'a', 0, 7, 9, 0],
            // Property length over four bytes.
            &[0x32, 10, 0, 1, b'a', 0, 7, 0xff, 0xff, 0xff, 0xff, 0x01],
            // Property length itself cut by the frame's end.
            &[0x32, 6, 0, 1, b'a', 0, 7, 0xff],
        ];
        for limit in [DEFAULT_MAX_PACKET_BYTES, 8] {
            for bytes in broken {
                let mut buf = BytesMut::from(bytes);
                buf.extend_from_slice(&publish_bytes(MqttProtocol::V5, "next", 8, b"ok"));
                let mut d = Decoder::new(MqttProtocol::V5, limit);
                let Some(Inbound::Publish { packet_id, message }) = d.decode(&mut buf).unwrap()
                else {
                    panic!("{bytes:?}: no publish");
                };
                assert_eq!(packet_id, 7);
                assert_eq!(message.topic, "a");
                assert!(message.payload.is_empty());
                assert!(
                    matches!(message.defect, Some(Defect::Malformed(_))),
                    "{bytes:?}: {:?}",
                    message.defect
                );
                let mut next = None;
                for _ in 0..4 {
                    if let Some(p) = d.decode(&mut buf).unwrap() {
                        next = Some(p);
                        break;
                    }
                }
                let Some(Inbound::Publish { packet_id, message }) = next else {
                    panic!("{bytes:?}: the next packet did not decode");
                };
                assert_eq!((packet_id, message.topic.as_str()), (8, "next"));
            }
        }
    }
}
