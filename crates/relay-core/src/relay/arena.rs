//! Where the hub writes its FanoutMessages: slices of shared chunks, not one allocation each.
//!
//! A fanout is written once and then only shared (each follower's queue, the store, the local
//! inbox hold a `Bytes` of it). Allocating each on its own costs an allocation, and another
//! for `Bytes`' shared header on its first clone; carving them out of a chunk costs one
//! allocation per chunk.
//!
//! A chunk is freed when its last fanout is dropped, so chunks are per room: a room's fanouts
//! are released in the order they were made (acknowledgements are cumulative, the inbox is
//! read in order), so the live ones of a room pin at most their own bytes and the two chunks
//! at the ends of their run. With one chunk for all rooms, a follower that never acknowledges
//! a quiet room would pin a whole chunk per event of it. Only the rooms that fanned out
//! lately keep a chunk open (`SLOTS`), and a room's chunks grow from the size of one fanout
//! while it keeps its slot, so a room heard from now and then wastes little.

use bytes::{BufMut, Bytes, BytesMut};
use mimi_wire::proto::Frank;

use super::RoomIdx;

/// The largest chunk: small enough that the chunks at the ends of a room's run pin little.
const CHUNK: usize = 16 << 10;
/// Fanouts longer than this are allocated alone.
const OWN_CHUNK_ABOVE: usize = CHUNK / 4;
/// Rooms with an open chunk.
const SLOTS: usize = 16;

#[derive(Debug, Default)]
pub(super) struct FanoutArena {
    slots: Vec<Slot>,
    /// The slot the next room without one takes.
    next_evict: usize,
}

#[derive(Debug)]
struct Slot {
    room: RoomIdx,
    /// The unused tail of the room's current chunk.
    free: BytesMut,
    /// The size of the room's next chunk.
    next_chunk: usize,
}

impl FanoutArena {
    /// A FanoutMessage of room `room` for an application message: timestamp, the exact
    /// MLSMessage, and the hub's Frank if it franked it (the bytes of mimi-wire's
    /// `encode_fanout_application`, with the `optional Frank` filled in).
    pub(super) fn application(
        &mut self,
        room: RoomIdx,
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
            let slot = self.slot(room);
            if slot.free.capacity() < len {
                let size = slot.next_chunk.max(len);
                slot.free = BytesMut::with_capacity(size);
                slot.next_chunk = (size * 2).min(CHUNK);
            }
            &mut slot.free
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

    /// Room `room`'s slot; a room without one takes the oldest, and starts with a chunk of
    /// just its next fanout.
    fn slot(&mut self, room: RoomIdx) -> &mut Slot {
        let i = match self.slots.iter().position(|s| s.room == room) {
            Some(i) => i,
            None => {
                let fresh = Slot {
                    room,
                    free: BytesMut::new(),
                    next_chunk: 0,
                };
                if self.slots.len() < SLOTS {
                    self.slots.push(fresh);
                    self.slots.len() - 1
                } else {
                    let i = self.next_evict;
                    self.next_evict = (i + 1) % SLOTS;
                    self.slots[i] = fresh;
                    i
                }
            }
        };
        &mut self.slots[i]
    }
}

#[cfg(test)]
mod tests {
    use mimi_wire::proto::encode_fanout_application;

    use super::*;

    #[test]
    fn fanout_is_timestamp_message_absent_frank() {
        let f = FanoutArena::default().application(0, 0x0102_0304_0506_0708, b"mls", None);
        assert_eq!(&f[..], &[1, 2, 3, 4, 5, 6, 7, 8, b'm', b'l', b's', 0]);
    }

    #[test]
    fn fanouts_are_the_wire_encoding_across_chunks_and_alone() {
        let mut arena = FanoutArena::default();
        let mut kept = Vec::new();
        // Enough to fill several chunks, with sizes that straddle their ends, some fanouts
        // large enough to get their own buffer, and more rooms than slots.
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
        .take(400)
        .enumerate()
        {
            let mls: Vec<u8> = (0..*n).map(|b| (b + i) as u8).collect();
            let f = arena.application(i % 20, i as u64, &mls, None);
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
        let f = FanoutArena::default().application(0, 5, b"mls", Some(&frank));
        let mut want = Vec::new();
        encode_fanout_application(5, b"mls", &mut want);
        // `optional Frank`: present, then the Frank.
        *want.last_mut().expect("the presence byte") = 1;
        want.extend_from_slice(&frank.encode().expect("a frank encodes"));
        assert_eq!(&f[..], &want[..]);
    }

    #[test]
    fn a_room_has_chunks_of_its_own_growing_while_it_keeps_its_slot() {
        let mut arena = FanoutArena::default();
        let mls = [7u8; 100];
        let a1 = arena.application(1, 0, &mls, None);
        let b1 = arena.application(2, 0, &mls, None);
        let a2 = arena.application(1, 0, &mls, None);
        let a3 = arena.application(1, 0, &mls, None);
        let end = |b: &Bytes| b.as_ptr() as usize + b.len();
        // The first fanout of a room gets a chunk of its own size, the next ones a doubled one.
        assert_ne!(
            end(&a1),
            a2.as_ptr() as usize,
            "a new room starts with an exact chunk"
        );
        assert_eq!(
            end(&a2),
            a3.as_ptr() as usize,
            "then its fanouts follow each other"
        );
        assert_ne!(end(&a2), b1.as_ptr() as usize);
        assert_ne!(
            end(&b1),
            a2.as_ptr() as usize,
            "another room never shares the chunk"
        );
        // More rooms than slots: room 1 loses its slot and starts small again.
        for r in 10..10 + SLOTS {
            arena.application(r, 0, &mls, None);
        }
        assert_eq!(arena.slots.len(), SLOTS);
        assert!(arena.slots.iter().all(|s| s.room != 1));
        let a4 = arena.application(1, 0, &mls, None);
        let slot = arena
            .slots
            .iter()
            .find(|s| s.room == 1)
            .expect("room 1 has a slot again");
        assert_eq!(slot.free.capacity(), 0, "an exact chunk: nothing left over");
        assert_eq!(&a4[8..108], &mls[..]);
    }
}
