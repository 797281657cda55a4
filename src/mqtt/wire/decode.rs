//! The broker's packets, framed from the byte stream as it arrives.
//!
//! Framing is done here rather than by rumqttc so that a PUBLISH over the
//! packet limit is never held whole (its payload is hashed and dropped as
//! it streams in) and so that PUBLISH and its acks keep what rumqttc would
//! reject or drop; the remaining control packets go to rumqttc's decoders.

use super::publish::{publish_head, Head};
use super::{Inbound, WireError, MAX_CONTROL_PACKET_BYTES, MAX_PACKET_BYTES};
use crate::mqtt::{Defect, MqttProtocol};
use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use sha2::{Digest, Sha256};

const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;

/// Decodes the broker's packets on one connection. It keeps state between
/// calls (an oversized PUBLISH being discarded), so each connection needs a
/// new one.
pub struct Decoder {
    protocol: MqttProtocol,
    max_packet_bytes: usize,
    discarding: Option<Discard>,
}

/// An oversized PUBLISH whose variable header has been read and whose rest
/// is dropped as it arrives.
struct Discard {
    head: Head,
    packet_bytes: usize,
    /// Property bytes still to drop (a block too long to keep).
    skip: usize,
    /// Payload bytes still to hash and drop.
    remaining: usize,
    payload_bytes: usize,
    digest: Sha256,
}

/// The fixed header: the first byte and the remaining length.
struct Fixed {
    byte1: u8,
    header_len: usize,
    remaining: usize,
}

impl Fixed {
    fn packet_type(&self) -> u8 {
        self.byte1 >> 4
    }

    fn frame_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

impl Decoder {
    /// A decoder that holds PUBLISH packets of up to `max_packet_bytes`
    /// (fixed header included) in memory and streams larger ones.
    pub fn new(protocol: MqttProtocol, max_packet_bytes: usize) -> Self {
        Self {
            protocol,
            max_packet_bytes,
            discarding: None,
        }
    }

    /// Decodes one packet from the front of `buf`, or `None` when `buf`
    /// does not yet hold a whole one. While an oversized PUBLISH streams
    /// in, this consumes `buf` as it fills, so the caller's buffer stays
    /// small whatever the packet's size.
    ///
    /// An error means the stream cannot be framed (or the broker broke the
    /// protocol): the connection must end.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        if self.discarding.is_some() {
            return Ok(self.discard(buf));
        }
        let Some(fixed) = fixed_header(buf)? else {
            return Ok(None);
        };
        let frame_len = fixed.frame_len();
        match fixed.packet_type() {
            PUBLISH if frame_len > self.max_packet_bytes => {
                let available = &buf[fixed.header_len..buf.len().min(frame_len)];
                let Some(head) = publish_head(
                    self.protocol,
                    fixed.byte1,
                    available,
                    fixed.remaining,
                    false,
                )?
                else {
                    return Ok(None);
                };
                buf.advance(fixed.header_len + head.consumed);
                let skip = head.skipped_properties;
                let payload_bytes = fixed.remaining - head.consumed - skip;
                self.discarding = Some(Discard {
                    head,
                    packet_bytes: frame_len,
                    skip,
                    remaining: payload_bytes,
                    payload_bytes,
                    digest: Sha256::new(),
                });
                Ok(self.discard(buf))
            }
            PUBLISH => {
                if buf.len() < frame_len {
                    return Ok(None);
                }
                let frame = buf.split_to(frame_len).freeze();
                let body = frame.slice(fixed.header_len..);
                let head = publish_head(self.protocol, fixed.byte1, &body, fixed.remaining, true)?
                    .ok_or(WireError::Malformed("PUBLISH shorter than its header"))?;
                let payload = if head.malformed.is_some() {
                    Bytes::new()
                } else {
                    body.slice(head.consumed..)
                };
                Ok(Some(head.into_inbound(payload, None)))
            }
            PUBACK | PUBREC | PUBREL | PUBCOMP => {
                if fixed.remaining > MAX_CONTROL_PACKET_BYTES {
                    return Err(WireError::ControlTooLarge {
                        packet_type: fixed.packet_type(),
                        bytes: frame_len,
                    });
                }
                if buf.len() < frame_len {
                    return Ok(None);
                }
                let frame = buf.split_to(frame_len);
                let body = &frame[fixed.header_len..];
                let [high, low, ..] = *body else {
                    return Err(WireError::Malformed("publish ack without a packet id"));
                };
                let packet_id = u16::from_be_bytes([high, low]);
                // MQTT 5: a reason code follows unless it is 0 (Success);
                // properties after it are not needed.
                let reason = match self.protocol {
                    MqttProtocol::V5 => body.get(2).copied().unwrap_or(0),
                    MqttProtocol::V311 => 0,
                };
                Ok(Some(match fixed.packet_type() {
                    PUBACK => Inbound::PubAck { packet_id, reason },
                    PUBREC => Inbound::PubRec { packet_id, reason },
                    PUBREL => Inbound::PubRel(packet_id),
                    _ => Inbound::PubComp(packet_id),
                }))
            }
            packet_type => {
                if fixed.remaining > MAX_CONTROL_PACKET_BYTES {
                    return Err(WireError::ControlTooLarge {
                        packet_type,
                        bytes: frame_len,
                    });
                }
                if buf.len() < frame_len {
                    return Ok(None);
                }
                match self.protocol {
                    MqttProtocol::V311 => Ok(Some(inbound_v4(v4::Packet::read(buf, frame_len)?))),
                    MqttProtocol::V5 => Ok(Some(inbound_v5(v5::Packet::read(
                        buf,
                        Some(MAX_PACKET_BYTES),
                    )?))),
                }
            }
        }
    }

    /// Drops what `buf` holds of the oversized PUBLISH (hashing its
    /// payload); the message once the last byte has arrived.
    fn discard(&mut self, buf: &mut BytesMut) -> Option<Inbound> {
        let d = self.discarding.as_mut()?;
        let n = d.skip.min(buf.len());
        buf.advance(n);
        d.skip -= n;
        if d.skip > 0 {
            return None;
        }
        let n = d.remaining.min(buf.len());
        d.digest.update(&buf[..n]);
        buf.advance(n);
        d.remaining -= n;
        if d.remaining > 0 {
            return None;
        }
        let d = self.discarding.take()?;
        let defect = Defect::TooLarge {
            packet_bytes: d.packet_bytes,
            payload_bytes: d.payload_bytes,
            sha256: d.digest.finalize().into(),
        };
        Some(d.head.into_inbound(Bytes::new(), Some(defect)))
    }
}

/// The fixed header at the front of `buf`, `None` until it is all there.
fn fixed_header(buf: &[u8]) -> Result<Option<Fixed>, WireError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    match variable_int(&buf[1..]) {
        Ok(Some((remaining, len))) => Ok(Some(Fixed {
            byte1,
            header_len: 1 + len,
            remaining,
        })),
        Ok(None) => Ok(None),
        Err(()) => Err(WireError::Malformed("remaining length over four bytes")),
    }
}

/// An MQTT variable byte integer at the front of `bytes` and its length;
/// `None` until it is all there, `Err` when it runs over four bytes.
pub(super) fn variable_int(bytes: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    let mut value = 0;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(())
    } else {
        Ok(None)
    }
}

/// The broker's control packets (PUBLISH and its acks are decoded above).
fn inbound_v4(packet: v4::Packet) -> Inbound {
    match packet {
        v4::Packet::ConnAck(ack) => Inbound::ConnAck {
            session_present: ack.session_present,
            refused: (ack.code != v4::ConnectReturnCode::Success)
                .then(|| format!("{:?}", ack.code)),
            receive_maximum: None,
            max_packet_size: None,
            server_keep_alive: None,
            max_qos: None,
            retain_available: None,
        },
        v4::Packet::SubAck(ack) => Inbound::SubAck {
            refused: ack
                .return_codes
                .iter()
                .filter(|c| matches!(c, v4::SubscribeReasonCode::Failure))
                .count(),
        },
        v4::Packet::PingResp => Inbound::PingResp,
        _ => Inbound::Other,
    }
}

fn inbound_v5(packet: v5::Packet) -> Inbound {
    match packet {
        v5::Packet::ConnAck(ack) => {
            let properties = ack.properties.as_ref();
            Inbound::ConnAck {
                session_present: ack.session_present,
                refused: (ack.code != v5::ConnectReturnCode::Success)
                    .then(|| format!("{:?}", ack.code)),
                receive_maximum: properties.and_then(|p| p.receive_max),
                max_packet_size: properties.and_then(|p| p.max_packet_size),
                server_keep_alive: properties.and_then(|p| p.server_keep_alive),
                max_qos: properties.and_then(|p| p.max_qos),
                retain_available: properties.and_then(|p| p.retain_available).map(|r| r != 0),
            }
        }
        v5::Packet::SubAck(ack) => Inbound::SubAck {
            refused: ack
                .return_codes
                .iter()
                .filter(|c| !matches!(c, v5::SubscribeReasonCode::Success(_)))
                .count(),
        },
        v5::Packet::PingResp(_) => Inbound::PingResp,
        v5::Packet::Disconnect(d) => Inbound::Disconnect(format!("{:?}", d.reason_code)),
        _ => Inbound::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{reason_code_name, DEFAULT_MAX_PACKET_BYTES};
    use super::*;
    use crate::mqtt::Qos;

    #[test]
    fn a_partial_packet_waits_for_more_bytes() {
        for protocol in BOTH {
            let mut publish = BytesMut::new();
            match protocol {
                MqttProtocol::V311 => {
                    let mut p = v4::Publish::new("a/b", rumqttc::QoS::ExactlyOnce, b"xyz".to_vec());
                    p.pkid = 7;
                    p.dup = true;
                    v4::Packet::Publish(p).write(&mut publish, 1000).unwrap();
                }
                MqttProtocol::V5 => {
                    let mut p = v5::Publish::new(
                        "a/b",
                        rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
                        b"xyz".to_vec(),
                        None,
                    );
                    p.pkid = 7;
                    p.dup = true;
                    v5::Packet::Publish(p).write(&mut publish, None).unwrap();
                }
            }
            // Byte by byte: nothing until the last one.
            let mut decoder = decoder(protocol);
            let mut buf = BytesMut::new();
            for (i, b) in publish.iter().enumerate() {
                buf.extend_from_slice(&[*b]);
                let decoded = decoder.decode(&mut buf).unwrap();
                if i + 1 < publish.len() {
                    assert!(decoded.is_none(), "{protocol:?}: decoded at byte {i}");
                    continue;
                }
                let (packet_id, message) = expect_publish(decoded);
                assert_eq!(packet_id, 7);
                assert_eq!(message.topic, "a/b");
                assert_eq!(&message.payload[..], b"xyz");
                assert_eq!(message.qos, Qos::ExactlyOnce);
                assert!(message.dup);
                assert_eq!(message.defect, None);
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn publish_acks_keep_their_reason_code() {
        let cases: [(&[u8], u8); 6] = [
            // No reason code: Success.
            (&[0x40, 2, 0, 5], 0),
            (&[0x40, 3, 0, 5, 0x87], 0x87),
            // With an empty property block.
            (&[0x40, 4, 0, 5, 0x97, 0], 0x97),
            // With a reason string: properties are skipped.
            (&[0x40, 8, 0, 5, 0x99, 4, 0x1f, 0, 1, b'x'], 0x99),
            // A code MQTT 5 does not define for PUBACK is kept as it is.
            (&[0x40, 3, 0, 5, 0x8f], 0x8f),
            (&[0x40, 3, 0, 5, 0x10], 0x10),
        ];
        for (bytes, code) in cases {
            let mut buf = BytesMut::from(bytes);
            match decoder(MqttProtocol::V5).decode(&mut buf).unwrap() {
                Some(Inbound::PubAck {
                    packet_id: 5,
                    reason,
                }) => assert_eq!(reason, code),
                other => panic!("{bytes:?}: {other:?}"),
            }
            assert!(buf.is_empty());
        }
        let mut buf = BytesMut::from(&[0x50, 3, 0, 9, 0x87, 0x70, 2, 0, 9][..]);
        let mut d = decoder(MqttProtocol::V5);
        assert!(matches!(
            d.decode(&mut buf).unwrap(),
            Some(Inbound::PubRec {
                packet_id: 9,
                reason: 0x87
            })
        ));
        assert!(matches!(
            d.decode(&mut buf).unwrap(),
            Some(Inbound::PubComp(9))
        ));
        // MQTT 3.1.1 has no reason codes.
        let mut buf = BytesMut::from(&[0x50, 2, 0, 9][..]);
        assert!(matches!(
            decoder(MqttProtocol::V311).decode(&mut buf).unwrap(),
            Some(Inbound::PubRec {
                packet_id: 9,
                reason: 0
            })
        ));
        assert_eq!(reason_code_name(0x87), "NotAuthorized");
    }

    #[test]
    fn broken_framing_is_an_error() {
        let cases: [(MqttProtocol, &[u8]); 5] = [
            // Remaining length over four bytes.
            (MqttProtocol::V5, &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            // Topic length past the packet.
            (MqttProtocol::V311, &[0x30, 4, 0, 9, b'a', b'b']),
            // QoS 3.
            (MqttProtocol::V311, &[0x36, 5, 0, 1, b'a', 0, 1]),
            // QoS 1 with packet id 0.
            (MqttProtocol::V311, &[0x32, 5, 0, 1, b'a', 0, 0]),
            // A publish ack without a packet id.
            (MqttProtocol::V5, &[0x40, 1, 0]),
        ];
        for (protocol, bytes) in cases {
            let mut buf = BytesMut::from(bytes);
            assert!(
                decoder(protocol).decode(&mut buf).is_err(),
                "{protocol:?} {bytes:?}"
            );
        }
    }

    /// Feeds an oversized PUBLISH (`head`, then `payload_bytes` of a
    /// pattern, then `after`) in 64 KiB reads, as the session would, and
    /// returns what was decoded and the largest buffer seen.
    fn stream_oversized(
        protocol: MqttProtocol,
        limit: usize,
        head: &[u8],
        payload_bytes: usize,
        after: &[u8],
    ) -> (Vec<Inbound>, usize, [u8; 32]) {
        const READ: usize = 64 * 1024;
        let mut d = Decoder::new(protocol, limit);
        let mut digest = Sha256::new();
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        let mut largest = 0;
        let mut sent = 0;
        let chunk: Vec<u8> = (0..READ).map(|i| (i % 251) as u8).collect();
        let mut feed = |buf: &mut BytesMut, bytes: &[u8]| {
            buf.extend_from_slice(bytes);
            largest = largest.max(buf.capacity());
            while let Some(inbound) = d.decode(buf).unwrap() {
                decoded.push(inbound);
            }
        };
        for part in head.chunks(READ) {
            feed(&mut buf, part);
        }
        while sent < payload_bytes {
            let n = READ.min(payload_bytes - sent);
            digest.update(&chunk[..n]);
            feed(&mut buf, &chunk[..n]);
            sent += n;
        }
        feed(&mut buf, after);
        assert!(buf.is_empty());
        (decoded, largest, digest.finalize().into())
    }

    #[test]
    fn an_oversized_publish_is_hashed_and_dropped_as_it_streams_in() {
        let payload_bytes = 32 * 1024 * 1024;
        for protocol in BOTH {
            let mut variable = vec![0, 5, b'b', b'i', b'g', b'/', b'x', 0x12, 0x34];
            if protocol == MqttProtocol::V5 {
                let props = [
                    &[0x26, 0, 1, b'k', 0, 1, b'v'][..],
                    &[0x03, 0, 4, b'j', b's', b'o', b'n'],
                ]
                .concat();
                variable.push(props.len() as u8);
                variable.extend_from_slice(&props);
            }
            let mut head = fixed(0x34 | 0x01, variable.len() + payload_bytes);
            let packet_bytes = head.len() + variable.len() + payload_bytes;
            head.extend_from_slice(&variable);
            let after = publish_bytes(protocol, "small", 9, b"next");
            let (decoded, largest, sha256) =
                stream_oversized(protocol, 1024, &head, payload_bytes, &after);
            assert!(
                largest <= 256 * 1024,
                "{protocol:?}: buffer grew to {largest}"
            );
            let mut decoded = decoded.into_iter();
            let (packet_id, message) = expect_publish(decoded.next());
            assert_eq!(packet_id, 0x1234);
            assert_eq!(message.topic, "big/x");
            assert_eq!((message.qos, message.retain), (Qos::ExactlyOnce, true));
            assert!(message.payload.is_empty());
            assert_eq!(
                message.defect,
                Some(Defect::TooLarge {
                    packet_bytes,
                    payload_bytes,
                    sha256
                })
            );
            if protocol == MqttProtocol::V5 {
                assert_eq!(message.user_properties, [("k".into(), "v".into())]);
                assert_eq!(message.content_type.as_deref(), Some("json"));
            }
            let (packet_id, message) = expect_publish(decoded.next());
            assert_eq!((packet_id, &message.payload[..]), (9, &b"next"[..]));
            assert!(decoded.next().is_none());
        }
    }

    #[test]
    fn an_oversized_publish_with_a_huge_property_block_skips_the_block() {
        let property = [&[0x26, 0, 4][..], b"name", &[0x03, 0xe8], &[b'v'; 1000]].concat();
        let props: Vec<u8> = property.repeat(200);
        let payload_bytes = 3 * 1024 * 1024;
        let mut variable = vec![0, 1, b't', 0, 1];
        let props_len = varint(props.len());
        variable.extend_from_slice(&props_len);
        variable.extend_from_slice(&props);
        let mut head = fixed(0x32, variable.len() + payload_bytes);
        head.extend_from_slice(&variable);
        let (decoded, largest, sha256) =
            stream_oversized(MqttProtocol::V5, 1024, &head, payload_bytes, &[]);
        assert!(largest <= 512 * 1024, "buffer grew to {largest}");
        let (packet_id, message) = expect_publish(decoded.into_iter().next());
        assert_eq!(packet_id, 1);
        assert!(message.user_properties.is_empty());
        match message.defect {
            Some(Defect::TooLarge {
                payload_bytes: p,
                sha256: s,
                ..
            }) => assert_eq!((p, s), (payload_bytes, sha256)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_publish_at_the_limit_is_held_whole() {
        for protocol in BOTH {
            let bytes = publish_bytes(protocol, "t", 1, &[7; 1000]);
            let mut at = Decoder::new(protocol, bytes.len());
            let (_, message) = expect_publish(at.decode(&mut BytesMut::from(&bytes[..])).unwrap());
            assert_eq!((message.payload.len(), message.defect), (1000, None));
            let mut over = Decoder::new(protocol, bytes.len() - 1);
            let (_, message) =
                expect_publish(over.decode(&mut BytesMut::from(&bytes[..])).unwrap());
            assert!(matches!(
                message.defect,
                Some(Defect::TooLarge { packet_bytes, payload_bytes: 1000, .. }) if packet_bytes == bytes.len()
            ));
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Feeds `chunks` to a decoder as a socket would deliver them and
        /// collects what it decodes, up to its first error. Bounded, so a
        /// decoder that stops making progress fails instead of hanging.
        fn feed(decoder: &mut Decoder, chunks: &[Vec<u8>]) -> (Vec<Inbound>, bool) {
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for chunk in chunks {
                buf.extend_from_slice(chunk);
                for _ in 0..10_000 {
                    match decoder.decode(&mut buf) {
                        Ok(Some(packet)) => out.push(packet),
                        Ok(None) => break,
                        Err(_) => return (out, true),
                    }
                }
            }
            (out, false)
        }

        fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                chunks.push(bytes[start..p].to_vec());
                start = p;
            }
            chunks
        }

        fn protocol() -> impl Strategy<Value = MqttProtocol> {
            prop_oneof![Just(MqttProtocol::V311), Just(MqttProtocol::V5)]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn arbitrary_bytes_never_panic_the_decoder(
                protocol in protocol(),
                bytes in prop::collection::vec(any::<u8>(), 0..600),
                cuts in prop::collection::vec(any::<usize>(), 0..6),
                max in 8usize..400,
            ) {
                let mut decoder = Decoder::new(protocol, max);
                let _ = feed(&mut decoder, &split(&bytes, &cuts));
            }

            #[test]
            fn a_publish_decodes_the_same_however_it_is_split(
                protocol in protocol(),
                topic in "[a-z/]{1,20}|\\PC{1,12}",
                payload in prop::collection::vec(any::<u8>(), 0..700),
                cuts in prop::collection::vec(any::<usize>(), 0..8),
                max in prop_oneof![Just(DEFAULT_MAX_PACKET_BYTES), 16usize..600],
            ) {
                let bytes = publish_bytes(protocol, &topic, 7, &payload);
                let mut decoder = Decoder::new(protocol, max);
                let (packets, failed) = feed(&mut decoder, &split(&bytes, &cuts));
                prop_assert!(!failed);
                prop_assert_eq!(packets.len(), 1);
                let Inbound::Publish { packet_id, message } = &packets[0] else {
                    panic!("not a publish: {:?}", packets[0]);
                };
                prop_assert_eq!(*packet_id, 7);
                prop_assert_eq!(&message.topic, &topic);
                if bytes.len() > max {
                    prop_assert!(message.payload.is_empty());
                    let digest: [u8; 32] = Sha256::digest(&payload).into();
                    prop_assert_eq!(
                        message.defect.clone(),
                        Some(Defect::TooLarge {
                            packet_bytes: bytes.len(),
                            payload_bytes: payload.len(),
                            sha256: digest,
                        })
                    );
                } else {
                    prop_assert_eq!(&message.payload[..], &payload[..]);
                    prop_assert_eq!(message.defect.clone(), None);
                }
            }
        }
    }
}
