//! Packets as the broker would send them, for the codec's tests.

use super::{Decoder, Inbound, Outbound, OutgoingPublish, Wire, DEFAULT_MAX_PACKET_BYTES};
use crate::mqtt::{MqttMessage, MqttProtocol, Qos};
use bytes::{Bytes, BytesMut};

pub(super) const BOTH: [MqttProtocol; 2] = [MqttProtocol::V311, MqttProtocol::V5];

/// Bytes of a packet as the other side would encode it.
pub(super) fn roundtrip(protocol: MqttProtocol, packet: Outbound) -> BytesMut {
    let mut buf = BytesMut::new();
    Wire::new(protocol).encode(packet, &mut buf).unwrap();
    buf
}

pub(super) fn decoder(protocol: MqttProtocol) -> Decoder {
    Decoder::new(protocol, DEFAULT_MAX_PACKET_BYTES)
}

/// A PUBLISH as the broker would encode it.
pub(super) fn publish_bytes(
    protocol: MqttProtocol,
    topic: &str,
    packet_id: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let publish = OutgoingPublish {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload),
        qos: if packet_id == 0 {
            Qos::AtMostOnce
        } else {
            Qos::AtLeastOnce
        },
        retain: false,
    };
    Wire::new(protocol)
        .encode_publish(packet_id, &publish, false, &mut buf)
        .unwrap();
    buf.to_vec()
}

/// A fixed header for `packet_type` with `remaining` bytes to follow.
pub(in crate::mqtt) fn fixed(byte1: u8, remaining: usize) -> Vec<u8> {
    let mut out = vec![byte1];
    out.extend(varint(remaining));
    out
}

/// MQTT's variable byte integer (remaining length, property length).
pub(super) fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

pub(super) fn expect_publish(inbound: Option<Inbound>) -> (u16, MqttMessage) {
    match inbound {
        Some(Inbound::Publish { packet_id, message }) => (packet_id, message),
        other => panic!("not a PUBLISH: {other:?}"),
    }
}
