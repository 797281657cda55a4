//! What the bridge must remember about MQTT packet ids to produce each
//! message once: the state written to Kafka in every transaction.
//!
//! An entry says "the message with this packet id is in Kafka". It is added
//! in the transaction that produced the message and removed when the broker
//! can no longer resend that message:
//!
//! - QoS 2: on PUBREL. The broker cannot reuse the id before our PUBCOMP,
//!   and the PUBCOMP goes out only after the transaction that removed the
//!   entry committed, so a PUBLISH whose id is in the state is always a
//!   resend of the same message. Exact.
//! - QoS 1: there is no PUBREL, and the broker may reuse the id as soon as
//!   it has our PUBACK. A resend carries DUP=1; it is a duplicate when the
//!   entry has the same fingerprint (topic and payload). The entry is
//!   removed once a PINGRESP proves the broker processed the PUBACK. Best
//!   effort in one case: a new message reusing the id, with identical topic
//!   and payload, that is itself a resend (DUP=1) before the old entry was
//!   confirmed away. Such drops are counted.
//!
//! The state is kept in 64 buckets of 1 024 packet ids, and a transaction
//! writes only the buckets it changed, one record each. Brokers hand out
//! packet ids in sequence, so a batch touches one or two buckets, and the
//! bytes written per transaction stay bounded however far the broker's
//! confirmations lag (under saturation they lagged by 20 000 acks).

use crate::mqtt::Qos;
use std::collections::HashMap;
use std::hash::Hasher;

/// Format of [`ProducedIds::encode_bucket`]; bumped on any change.
const FORMAT_VERSION: u8 = 1;
/// Packet id (2), QoS (1), fingerprint (8).
const ENTRY_BYTES: usize = 11;
/// Packet ids per bucket: 1 024, so 64 buckets.
const BUCKET_BITS: u32 = 10;
pub const BUCKETS: usize = 1 << (16 - BUCKET_BITS);

fn bucket(packet_id: u16) -> usize {
    usize::from(packet_id >> BUCKET_BITS)
}

/// The head record: a version byte and the token (u64, big endian) of the
/// last committed transaction. Every exactly-once transaction writes a new
/// random token, so reading the head back says which transaction committed
/// last, and whether it was one of ours (see `delivery::settle`).
pub fn encode_head(token: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&token.to_be_bytes());
    out
}

pub fn decode_head(bytes: &[u8]) -> Result<u64, StateError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => rest
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StateError::Truncated(bytes.len())),
        Some((&version, _)) => Err(StateError::Version(version)),
        None => Err(StateError::Truncated(0)),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("state record has format version {0}; this bridge reads version {FORMAT_VERSION}")]
    Version(u8),
    #[error("state record is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("state record holds QoS {0}")]
    Qos(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    qos: Qos,
    fingerprint: u64,
    /// Number of the PUBACK sent for it (QoS 1), once sent; see
    /// `Intake::AcksConfirmed`.
    ack_seq: Option<u64>,
}

/// Whether a received message is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    /// Produced before; acknowledge it again and produce nothing. `exact`
    /// is false for a QoS 1 decision made on the fingerprint.
    Duplicate {
        exact: bool,
    },
}

/// Packet ids produced to Kafka and not yet known to be done with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedIds {
    buckets: Vec<HashMap<u16, Entry>>,
    /// Bit `b`: bucket `b` changed since it was last encoded.
    dirty: u64,
}

impl Default for ProducedIds {
    fn default() -> Self {
        Self {
            buckets: vec![HashMap::new(); BUCKETS],
            dirty: 0,
        }
    }
}

/// Identifies a message's content for QoS 1 duplicate detection. FNV-1a:
/// stable across builds and versions, which the state written to Kafka
/// needs (std's hasher is not).
pub fn fingerprint(topic: &str, payload: &[u8]) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(topic.as_bytes());
    hasher.write(&[0]);
    hasher.write(payload);
    hasher.finish()
}

impl ProducedIds {
    pub fn len(&self) -> usize {
        self.buckets.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(HashMap::is_empty)
    }

    fn get(&self, packet_id: u16) -> Option<&Entry> {
        self.buckets[bucket(packet_id)].get(&packet_id)
    }

    /// Whether a received message is new. `fingerprint` is called only when
    /// it decides (a QoS 1 resend of an id we hold), so most messages are
    /// not hashed here.
    pub fn check(
        &mut self,
        packet_id: u16,
        qos: Qos,
        dup: bool,
        fingerprint: impl FnOnce() -> u64,
    ) -> Verdict {
        match (qos, self.buckets[bucket(packet_id)].get_mut(&packet_id)) {
            // The broker cannot have reused the id: a resend, DUP flag or not.
            (Qos::ExactlyOnce, Some(entry)) if entry.qos == Qos::ExactlyOnce => {
                Verdict::Duplicate { exact: true }
            }
            (Qos::AtLeastOnce, Some(entry))
                if dup && entry.qos == Qos::AtLeastOnce && entry.fingerprint == fingerprint() =>
            {
                // The broker resent it, so the ack we sent before did not
                // reach it (lost with its connection, or dropped by the
                // session as stale): a confirmation that counts that ack
                // must not forget the entry. The new ack numbers it again.
                entry.ack_seq = None;
                Verdict::Duplicate { exact: false }
            }
            _ => Verdict::New,
        }
    }

    /// The message is in the open transaction.
    pub fn record(&mut self, packet_id: u16, qos: Qos, fingerprint: u64) {
        self.dirty |= 1 << bucket(packet_id);
        self.buckets[bucket(packet_id)].insert(
            packet_id,
            Entry {
                qos,
                fingerprint,
                ack_seq: None,
            },
        );
    }

    /// The PUBACK for `packet_id` is the session's `seq`th ack.
    pub fn acked(&mut self, packet_id: u16, seq: u64) {
        if let Some(entry) = self.buckets[bucket(packet_id)].get_mut(&packet_id) {
            if entry.qos == Qos::AtLeastOnce {
                entry.ack_seq = Some(seq);
            }
        }
    }

    /// PUBREL: forget a QoS 2 id. Returns whether it was known.
    pub fn release(&mut self, packet_id: u16) -> bool {
        match self.get(packet_id) {
            Some(entry) if entry.qos == Qos::ExactlyOnce => {
                self.buckets[bucket(packet_id)].remove(&packet_id);
                self.dirty |= 1 << bucket(packet_id);
                true
            }
            _ => false,
        }
    }

    /// The broker has processed the first `acks` acks: QoS 1 messages acked
    /// among them will not be resent. Returns whether anything was removed.
    pub fn confirm(&mut self, acks: u64) -> bool {
        let mut removed = false;
        for (b, entries) in self.buckets.iter_mut().enumerate() {
            let before = entries.len();
            entries.retain(|_, e| {
                !(e.qos == Qos::AtLeastOnce && e.ack_seq.is_some_and(|seq| seq <= acks))
            });
            if entries.len() != before {
                self.dirty |= 1 << b;
                removed = true;
            }
        }
        removed
    }

    /// The broker kept no session for us: nothing it sent before will be
    /// resent, so every entry goes (and every bucket is written again).
    pub fn forget_all(&mut self) {
        for (b, entries) in self.buckets.iter_mut().enumerate() {
            if !entries.is_empty() {
                entries.clear();
                self.dirty |= 1 << b;
            }
        }
    }

    /// The buckets changed since the last call, encoded, as (bucket, bytes).
    pub fn take_dirty(&mut self) -> Vec<(usize, Vec<u8>)> {
        let dirty = std::mem::take(&mut self.dirty);
        (0..BUCKETS)
            .filter(|b| dirty & (1 << b) != 0)
            .map(|b| (b, self.encode_bucket(b)))
            .collect()
    }

    /// Compact binary form of one bucket for the state topic: a version
    /// byte, then per entry the packet id (u16), QoS (u8) and fingerprint
    /// (u64), big endian, in no particular order. An empty bucket is the
    /// version byte alone.
    pub fn encode_bucket(&self, b: usize) -> Vec<u8> {
        let entries = &self.buckets[b];
        let mut out = Vec::with_capacity(1 + entries.len() * ENTRY_BYTES);
        out.push(FORMAT_VERSION);
        for (id, e) in entries {
            out.extend_from_slice(&id.to_be_bytes());
            out.push(e.qos.as_u8());
            out.extend_from_slice(&e.fingerprint.to_be_bytes());
        }
        out
    }

    /// Adds what [`Self::encode_bucket`] wrote. Entries come back without
    /// ack numbers: acks of an earlier run are never confirmed, so its QoS 1
    /// entries stay until their packet id is used again.
    pub fn merge_bucket(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let Some((&version, rest)) = bytes.split_first() else {
            return Err(StateError::Truncated(0));
        };
        if version != FORMAT_VERSION {
            return Err(StateError::Version(version));
        }
        if rest.len() % ENTRY_BYTES != 0 {
            return Err(StateError::Truncated(bytes.len()));
        }
        for c in rest.chunks_exact(ENTRY_BYTES) {
            let id = u16::from_be_bytes([c[0], c[1]]);
            let qos = Qos::from_u8(c[2]).ok_or(StateError::Qos(c[2]))?;
            let fingerprint = u64::from_be_bytes(c[3..11].try_into().expect("8 bytes"));
            self.buckets[bucket(id)].insert(
                id,
                Entry {
                    qos,
                    fingerprint,
                    ack_seq: None,
                },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q1: Qos = Qos::AtLeastOnce;
    const Q2: Qos = Qos::ExactlyOnce;

    #[test]
    fn a_lost_session_forgets_every_id_and_rewrites_their_buckets() {
        let mut s = ProducedIds::default();
        s.record(7, Q2, 1);
        s.record(301, Q1, 2);
        s.take_dirty();
        s.forget_all();
        // A new session's message may reuse the id: new, not a duplicate.
        assert_eq!(s.check(7, Q2, false, || 1), Verdict::New);
        assert!(s.is_empty());
        let written: Vec<usize> = s.take_dirty().into_iter().map(|(b, _)| b).collect();
        let mut expected = vec![bucket(7), bucket(301)];
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(written, expected);
    }

    #[test]
    fn qos2_resend_is_a_duplicate_until_released() {
        let mut s = ProducedIds::default();
        assert_eq!(s.check(7, Q2, false, || 1), Verdict::New);
        s.record(7, Q2, 1);
        // Resent with or without DUP, any content: the id is ours.
        assert_eq!(
            s.check(7, Q2, true, || 1),
            Verdict::Duplicate { exact: true }
        );
        assert_eq!(
            s.check(7, Q2, false, || 99),
            Verdict::Duplicate { exact: true }
        );
        // Confirmations concern QoS 1 only.
        s.acked(7, 1);
        assert!(!s.confirm(10));
        assert!(s.release(7));
        assert_eq!(s.check(7, Q2, false, || 1), Verdict::New);
        assert!(!s.release(7), "an unknown PUBREL is not an error");
    }

    #[test]
    fn qos1_duplicate_needs_dup_flag_and_same_fingerprint() {
        let mut s = ProducedIds::default();
        s.record(3, Q1, 42);
        assert_eq!(
            s.check(3, Q1, true, || 42),
            Verdict::Duplicate { exact: false }
        );
        // DUP=0 is a first attempt: a new message reusing the id.
        assert_eq!(s.check(3, Q1, false, || 42), Verdict::New);
        assert_eq!(s.check(3, Q1, true, || 43), Verdict::New);
        // A QoS 2 message with the id is never a QoS 1 resend.
        assert_eq!(s.check(3, Q2, true, || 42), Verdict::New);
    }

    #[test]
    fn confirmed_acks_forget_qos1_entries() {
        let mut s = ProducedIds::default();
        s.record(1, Q1, 10);
        s.record(2, Q1, 20);
        s.record(3, Q1, 30);
        s.acked(1, 5);
        s.acked(2, 6);
        assert!(s.confirm(5));
        assert_eq!(s.check(1, Q1, true, || 10), Verdict::New);
        assert_eq!(s.len(), 2);
        // Not yet acked: kept whatever is confirmed.
        assert!(s.confirm(100));
        assert_eq!(s.take_dirty().len(), 1, "one bucket changed");
        assert_eq!(s.len(), 1);
        assert_eq!(
            s.check(3, Q1, true, || 30),
            Verdict::Duplicate { exact: false }
        );
    }

    #[test]
    fn a_resend_keeps_its_entry_until_its_new_ack_is_confirmed() {
        let mut s = ProducedIds::default();
        s.record(4, Q1, 40);
        // Acked as the 5th ack, but the connection was lost and the broker
        // resends it: the old ack did not count.
        s.acked(4, 5);
        assert_eq!(
            s.check(4, Q1, true, || 40),
            Verdict::Duplicate { exact: false }
        );
        assert!(!s.confirm(5), "a confirmation of the old ack keeps it");
        assert_eq!(
            s.check(4, Q1, true, || 40),
            Verdict::Duplicate { exact: false }
        );
        s.acked(4, 9);
        assert!(!s.confirm(8));
        assert!(s.confirm(9), "its new ack confirmed: forgotten");
        assert!(s.is_empty());
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let mut s = ProducedIds::default();
        s.record(1, Q1, 0x0102_0304_0506_0708);
        assert_eq!(
            s.encode_bucket(0),
            [FORMAT_VERSION, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8],
            "the documented layout"
        );
        s.record(65535, Q2, u64::MAX);
        s.record(1023, Q1, 7);
        let dirty = s.take_dirty();
        assert_eq!(
            dirty.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
            [0, 63],
            "ids 1 and 1023 share bucket 0"
        );
        assert!(s.take_dirty().is_empty(), "written: clean until changed");
        let mut back = ProducedIds::default();
        for (_, bytes) in &dirty {
            back.merge_bucket(bytes).unwrap();
        }
        assert_eq!(back.buckets, s.buckets);
        assert_eq!(back.len(), 3);
        // A release dirties its bucket and writes it smaller.
        assert!(s.release(65535));
        assert_eq!(s.take_dirty(), vec![(63, vec![FORMAT_VERSION])]);
        let mut empty = ProducedIds::default();
        assert_eq!(empty.merge_bucket(&[]), Err(StateError::Truncated(0)));
        assert_eq!(empty.merge_bucket(&[9]), Err(StateError::Version(9)));
        assert_eq!(
            empty.merge_bucket(&[FORMAT_VERSION, 0, 1, 1, 1]),
            Err(StateError::Truncated(5))
        );
        // A QoS this format never writes: corrupt, not a silent entry.
        assert_eq!(
            empty.merge_bucket(&[FORMAT_VERSION, 0, 1, 3, 1, 2, 3, 4, 5, 6, 7, 8]),
            Err(StateError::Qos(3))
        );
    }

    #[test]
    fn head_round_trips_and_rejects_garbage() {
        assert_eq!(decode_head(&encode_head(0xfeed_beef)), Ok(0xfeed_beef));
        assert_eq!(encode_head(1).len(), 9);
        assert_eq!(decode_head(&[]), Err(StateError::Truncated(0)));
        assert_eq!(
            decode_head(&[FORMAT_VERSION, 1]),
            Err(StateError::Truncated(2))
        );
        assert_eq!(decode_head(&[7; 9]), Err(StateError::Version(7)));
    }

    #[test]
    fn fingerprint_separates_topic_from_payload() {
        assert_ne!(fingerprint("a/b", b"c"), fingerprint("a/", b"bc"));
        // Pinned: the value is stored in Kafka and must not change.
        // (FNV-1a 64 of the single byte 0x00.)
        assert_eq!(fingerprint("", b""), 0xaf63_bd4c_8601_b7df);
    }
}
