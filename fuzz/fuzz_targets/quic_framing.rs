//! The QUIC adapter's frame decoder over arbitrary bytes in arbitrary chunkings: it must never
//! panic, whatever a peer sends on a stream.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_quic::framing::{ChunkQueue, Decoder};

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let mut q = ChunkQueue::new();
    let mut d = Decoder::new(4096);
    for piece in rest.chunks(usize::from(step).max(1)) {
        q.push(Bytes::copy_from_slice(piece));
        loop {
            match d.decode(&mut q) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = d.finish(&q);
});
