//! Dead letters: events a peer refused for good (a final 4xx, or an endpoint it does not serve).
//!
//! Sending the same bytes again would only get the same answer, and holding the queue would
//! stop every later event of the room for that peer. So the event leaves the queue and is kept
//! as a store record for the operator, a bounded ring per peer: record `n` goes to slot
//! `n % max`, replacing record `n - max`. Whether a peer speaks our sequence extension is a
//! record here too, so a restarted hub keeps sending a draft-mode peer the same bodies as before.

use bytes::Bytes;
use mimi_wire::uri::{ProviderDomain, RoomId};

use crate::stats::DeadCause;

/// Store record of a dead letter: this byte, the peer's length (u16), the peer, the slot (u32
/// big-endian). The value is `n` (u64), the status (u16, 0: unsupported), the time (u64 ms
/// since the UNIX epoch), the room's length (u16), the room, then the exact FanoutMessage.
const REC_DEAD_LETTER: u8 = 13;
/// Store record of whether a peer speaks our sequence extension: this byte, then the peer. The
/// value is one byte: 1 draft mode, 2 sequence extension.
const REC_PEER_MODE: u8 = 14;

pub(super) fn key(peer: &ProviderDomain, slot: u32) -> Vec<u8> {
    let p = peer.as_str().as_bytes();
    let mut k = Vec::with_capacity(7 + p.len());
    k.push(REC_DEAD_LETTER);
    k.extend_from_slice(&(p.len().min(u16::MAX as usize) as u16).to_be_bytes());
    k.extend_from_slice(p);
    k.extend_from_slice(&slot.to_be_bytes());
    k
}

pub(super) fn value(
    n: u64,
    cause: DeadCause,
    unix_ms: u64,
    room: &RoomId,
    fanout: &[u8],
) -> Vec<u8> {
    let code = match cause {
        DeadCause::Status(c) => c,
        DeadCause::Unsupported => 0,
    };
    let r = room.as_str().as_bytes();
    let mut v = Vec::with_capacity(20 + r.len() + fanout.len());
    v.extend_from_slice(&n.to_be_bytes());
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&unix_ms.to_be_bytes());
    v.extend_from_slice(&(r.len().min(u16::MAX as usize) as u16).to_be_bytes());
    v.extend_from_slice(r);
    v.extend_from_slice(fanout);
    v
}

/// One stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub peer: ProviderDomain,
    /// Numbers the peer's dead letters in the order they were written.
    pub n: u64,
    pub room: RoomId,
    pub cause: DeadCause,
    pub unix_ms: u64,
    /// The exact FanoutMessage the peer refused.
    pub fanout: Bytes,
}

/// A stored dead-letter record; `None` for any other record, or one we did not write.
pub(super) fn parse(k: &[u8], v: &Bytes) -> Option<DeadLetter> {
    let (&tag, rest) = k.split_first()?;
    if tag != REC_DEAD_LETTER {
        return None;
    }
    let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let peer = std::str::from_utf8(rest.get(2..2 + len)?)
        .ok()?
        .parse()
        .ok()?;
    let n = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let code = u16::from_be_bytes(v.get(8..10)?.try_into().ok()?);
    let unix_ms = u64::from_be_bytes(v.get(10..18)?.try_into().ok()?);
    let rlen = u16::from_be_bytes(v.get(18..20)?.try_into().ok()?) as usize;
    let room = std::str::from_utf8(v.get(20..20 + rlen)?)
        .ok()?
        .parse()
        .ok()?;
    let cause = match code {
        0 => DeadCause::Unsupported,
        c => DeadCause::Status(c),
    };
    Some(DeadLetter {
        peer,
        n,
        room,
        cause,
        unix_ms,
        fanout: v.slice(20 + rlen..),
    })
}

pub(super) fn mode_key(peer: &ProviderDomain) -> Vec<u8> {
    let mut k = vec![REC_PEER_MODE];
    k.extend_from_slice(peer.as_str().as_bytes());
    k
}

pub(super) fn mode_value(seq_ext: bool) -> u8 {
    if seq_ext { 2 } else { 1 }
}

/// A stored peer mode: `(peer, speaks the sequence extension)`.
pub(super) fn parse_mode(k: &[u8], v: &[u8]) -> Option<(ProviderDomain, bool)> {
    let (&tag, rest) = k.split_first()?;
    if tag != REC_PEER_MODE {
        return None;
    }
    let peer = std::str::from_utf8(rest).ok()?.parse().ok()?;
    match v {
        [1] => Some((peer, false)),
        [2] => Some((peer, true)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let peer: ProviderDomain = "b.example".parse().expect("domain");
        let room: RoomId = "mimi://a.example/r/x".parse().expect("room");
        let v = Bytes::from(value(7, DeadCause::Status(403), 99, &room, b"fanout"));
        let d = parse(&key(&peer, 3), &v).expect("parses");
        assert_eq!(
            (d.peer, d.n, d.room, d.cause, d.unix_ms, &d.fanout[..]),
            (
                peer.clone(),
                7,
                room.clone(),
                DeadCause::Status(403),
                99,
                &b"fanout"[..]
            )
        );
        let v = Bytes::from(value(1, DeadCause::Unsupported, 0, &room, b""));
        assert_eq!(
            parse(&key(&peer, 1), &v).map(|d| d.cause),
            Some(DeadCause::Unsupported)
        );
        assert_eq!(parse(&key(&peer, 1), &v.slice(..19)), None, "torn value");
        for seq_ext in [false, true] {
            let v = [mode_value(seq_ext)];
            assert_eq!(
                parse_mode(&mode_key(&peer), &v),
                Some((peer.clone(), seq_ext))
            );
        }
        assert_eq!(parse_mode(&mode_key(&peer), &[3]), None);
    }
}
