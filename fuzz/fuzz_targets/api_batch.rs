//! The local API's binary bodies: the `submitBatch` body (`room u16-len, request u32-len`
//! per item, big-endian) as the node splits it, and the inbox records as the client decodes
//! them. Neither may panic. A batch is accepted only with 1..=MAX_BATCH items and exactly as
//! the client encodes them (nothing left over, nothing skipped); an inbox answer decodes only
//! if the node's encoder gives back the same bytes.
#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use relay_core::store::InboxRecord;
use relay_node::client::{MAX_BATCH, decode_inbox};
use relay_node::encode_inbox;
use relay_node::fuzz::split_batch;

/// The client's encoder (`Client::submit_batch`).
fn encode_batch(items: &[(String, Bytes)]) -> Bytes {
    let mut b = BytesMut::new();
    for (room, body) in items {
        b.put_u16(u16::try_from(room.len()).expect("a parsed room fits"));
        b.put_slice(room.as_bytes());
        b.put_u32(u32::try_from(body.len()).expect("a parsed body fits"));
        b.put_slice(body);
    }
    b.freeze()
}

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(items) = split_batch(bytes.clone()) {
        assert!(!items.is_empty() && items.len() <= MAX_BATCH);
        assert_eq!(encode_batch(&items), bytes);
    }
    if let Ok(records) = decode_inbox(bytes.clone()) {
        // Records whose names are valid re-encode to the input exactly.
        let typed: Option<Vec<(u64, InboxRecord)>> = records
            .iter()
            .map(|r| {
                Some((
                    r.offset,
                    InboxRecord {
                        room: r.room.parse().ok()?,
                        from: r.from.parse().ok()?,
                        accepted_ms: r.accepted_ms,
                        fanout: r.fanout.clone(),
                    },
                ))
            })
            .collect();
        if let Some(typed) = typed
            && typed
                .iter()
                .zip(&records)
                .all(|((_, t), r)| t.room.as_str() == r.room && t.from.as_str() == r.from)
        {
            assert_eq!(encode_inbox(&typed), bytes);
        }
    }
});
