//! Where the hub writes its FanoutMessages: slices of shared chunks, not one allocation each.
//!
//! A fanout is written once and then only shared (each follower's queue, the store, the local
//! inbox hold a `Bytes` of it). Allocating each on its own costs an allocation, and another
//! for `Bytes`' shared header on its first clone; carving them out of a chunk costs one
//! allocation per chunk. A chunk is freed when its last fanout is dropped: fanouts are made
//! and released (acknowledged, read from the inbox) in about the same order, so at most the
//! chunks around the live fanouts stay. Fanouts above `OWN_CHUNK_ABOVE` get a buffer of
//! their own, so a large one never pins a chunk of small ones or the reverse for long.

use bytes::{BufMut, Bytes, BytesMut};
use mimi_wire::proto::Frank;

/// Bytes per chunk: small enough that one long-lived fanout pins little memory.
const CHUNK: usize = 32 << 10;
/// Fanouts longer than this are allocated alone.
const OWN_CHUNK_ABOVE: usize = CHUNK / 4;

#[derive(Debug, Default)]
pub(super) struct FanoutArena {
    /// The unused tail of the current chunk.
    free: BytesMut,
}

impl FanoutArena {
    /// A FanoutMessage for an application message: timestamp, the exact MLSMessage, and the
    /// hub's Frank if it franked it (the bytes of mimi-wire's `encode_fanout_application`,
    /// with the `optional Frank` filled in).
    pub(super) fn application(
        &mut self,
        accepted_ms: u64,
        mls: &[u8],
        frank: Option<&Frank>,
    ) -> Bytes {
        // A Frank that cannot be encoded goes out absent, as before.
        let frank = frank.and_then(|f| f.encode().ok());
        let len = 8 + mls.len() + 1 + frank.as_ref().map_or(0, Vec::len);
        let mut own;
        let buf = if len > OWN_CHUNK_ABOVE {
            own = BytesMut::with_capacity(len);
            &mut own
        } else {
            if self.free.capacity() < len {
                self.free = BytesMut::with_capacity(CHUNK);
            }
            &mut self.free
        };
        buf.put_u64(accepted_ms);
        buf.extend_from_slice(mls);
        match frank {
            Some(enc) => {
                buf.put_u8(1);
                buf.extend_from_slice(&enc);
            }
            None => buf.put_u8(0),
        }
        buf.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use mimi_wire::proto::encode_fanout_application;

    use super::*;

    #[test]
    fn fanout_is_timestamp_message_absent_frank() {
        let f = FanoutArena::default().application(0x0102_0304_0506_0708, b"mls", None);
        assert_eq!(&f[..], &[1, 2, 3, 4, 5, 6, 7, 8, b'm', b'l', b's', 0]);
    }

    #[test]
    fn fanouts_are_the_wire_encoding_across_chunks_and_alone() {
        let mut arena = FanoutArena::default();
        let mut kept = Vec::new();
        // Enough to fill several chunks, with sizes that straddle their ends, and some
        // fanouts large enough to get their own buffer.
        for (i, n) in [
            0usize,
            1,
            1000,
            1033,
            5000,
            OWN_CHUNK_ABOVE,
            OWN_CHUNK_ABOVE + 1,
            40_000,
        ]
        .iter()
        .cycle()
        .take(200)
        .enumerate()
        {
            let mls: Vec<u8> = (0..*n).map(|b| (b + i) as u8).collect();
            let f = arena.application(i as u64, &mls, None);
            let mut want = Vec::new();
            encode_fanout_application(i as u64, &mls, &mut want);
            assert_eq!(&f[..], &want[..], "fanout {i} of {n} bytes");
            kept.push((f, want));
        }
        // Later writes into the chunks did not touch earlier fanouts.
        for (f, want) in &kept {
            assert_eq!(&f[..], &want[..]);
        }
    }

    #[test]
    fn a_frank_fills_the_optional_after_the_message() {
        let frank = Frank {
            server_frank: [3; 32],
            franking_signature_ciphersuite: 7,
            franking_integrity_signature: mimi_wire::proto::VLBytes::new(vec![9; 64]),
        };
        let f = FanoutArena::default().application(5, b"mls", Some(&frank));
        let mut want = Vec::new();
        encode_fanout_application(5, b"mls", &mut want);
        // `optional Frank`: present, then the Frank.
        *want.last_mut().expect("the presence byte") = 1;
        want.extend_from_slice(&frank.encode().expect("a frank encodes"));
        assert_eq!(&f[..], &want[..]);
    }
}
