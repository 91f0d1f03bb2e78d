//! The lab's messages: a marker (stream, counter, scheduled time) inside an MLS-framed
//! ciphertext, and the names of the lab's providers and rooms.

use anyhow::{Result, anyhow};
use bytes::Bytes;

use crate::model::unit;

pub(crate) const MAGIC: &[u8; 4] = b"MLAB";
/// The stream id of the setup probe (rooms use 0..rooms).
pub(crate) const PROBE_STREAM: u32 = u32::MAX;

/// The message marker inside the MLS ciphertext: stream (room), counter, scheduled send time.
pub(crate) fn marker_bytes(stream: u32, counter: u32, sched_ns: u64) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[..4].copy_from_slice(MAGIC);
    m[4..8].copy_from_slice(&stream.to_be_bytes());
    m[8..12].copy_from_slice(&counter.to_be_bytes());
    m[12..20].copy_from_slice(&sched_ns.to_be_bytes());
    m
}

pub(crate) fn find_marker(b: &[u8]) -> Option<(u32, u32, u64)> {
    let at = b.windows(4).position(|w| w == MAGIC)?;
    let s = u32::from_be_bytes(b.get(at + 4..at + 8)?.try_into().ok()?);
    let c = u32::from_be_bytes(b.get(at + 8..at + 12)?.try_into().ok()?);
    let t = u64::from_be_bytes(b.get(at + 12..at + 20)?.try_into().ok()?);
    Some((s, c, t))
}

/// A ciphertext of `size` bytes starting with the marker.
pub(crate) fn ciphertext(marker: [u8; 20], size: usize, rng: &mut u64) -> Vec<u8> {
    let mut ct = Vec::with_capacity(size.max(20) + 8);
    ct.extend_from_slice(&marker);
    while ct.len() < size {
        unit(rng);
        ct.extend_from_slice(&rng.to_le_bytes());
    }
    ct.truncate(size.max(20));
    ct
}

pub(crate) fn submit_body(hub: &str, room: u32, ct: &[u8]) -> Result<Bytes> {
    let mls = mimi_wire::mls::private_message(format!("room{room}").as_bytes(), 1, ct);
    let req = mimi_wire::proto::SubmitMessageRequest::mls10(mls, format!("mimi://{hub}/u/bench"))
        .map_err(|e| anyhow!("building a submit request: {e}"))?;
    Ok(Bytes::from(
        req.encode()
            .map_err(|e| anyhow!("encoding a submit request: {e}"))?,
    ))
}

pub(crate) fn provider(i: usize) -> String {
    format!("{}.example", (b'a' + (i as u8 % 26)) as char)
}

pub(crate) fn room_id(r: usize) -> String {
    format!("mimi://a.example/r/room{r}")
}

/// The room of the flooding follower in a hostile row (the victim is not a member).
pub(crate) const FLOOD_ROOM: &str = "mimi://a.example/r/flood";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_inside_a_ciphertext() {
        let mut rng = 1;
        let ct = ciphertext(marker_bytes(3, 77, 123_456_789), 1024, &mut rng);
        assert_eq!(ct.len(), 1024);
        let body = submit_body("a.example", 3, &ct).unwrap();
        assert_eq!(find_marker(&body), Some((3, 77, 123_456_789)));
    }
}
