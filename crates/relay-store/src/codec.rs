//! The byte layout of keys and values, and of the in-memory log of pending ops.
//!
//! Strings (room ids, provider domains) are a big-endian `u16` length and their bytes; numbers
//! are big-endian so that byte order is numeric order and a range of sequence numbers is a range
//! of keys. Every read from disk goes through [`Reader`], which fails with [`DecodeError`]
//! instead of panicking.

use bytes::Bytes;
use mimi_wire::uri::{MAX_URI_LEN, ProviderDomain, RoomId, UriError};
use relay_core::store::{InboxRecord, StoreOp};

// Every id fits the u16 length prefix: room URIs are at most MAX_URI_LEN bytes, domains 253.
const _: () = assert!(MAX_URI_LEN <= u16::MAX as usize);

/// Stored data that cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A key or value is malformed (truncated, trailing bytes, bad lengths).
    #[error("corrupt {table} record: {what}")]
    Corrupt {
        table: &'static str,
        what: &'static str,
    },
    /// A stored room id or provider domain does not parse.
    #[error("corrupt {table} record: bad identifier")]
    BadId {
        table: &'static str,
        #[source]
        source: UriError,
    },
    /// The file was written by an incompatible version of this crate.
    #[error("store format version {found} is not supported (this build reads {expected})")]
    UnsupportedFormat { found: u64, expected: u64 },
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    // Cannot truncate: see the assertion on MAX_URI_LEN above.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_be_bytes());
}

/// The key prefix shared by every entry of one queue, and the key of its acked mark.
pub(crate) fn queue_prefix(out: &mut Vec<u8>, room: &RoomId, dest: &ProviderDomain) {
    put_str(out, room.as_str());
    put_str(out, dest.as_str());
}

/// A bounds-checked cursor over stored bytes.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    table: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(table: &'static str, buf: &'a [u8]) -> Self {
        Reader { buf, table }
    }

    pub(crate) fn corrupt(&self, what: &'static str) -> DecodeError {
        DecodeError::Corrupt {
            table: self.table,
            what,
        }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.corrupt("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N)?;
        b.try_into().map_err(|_| self.corrupt("truncated"))
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn u128(&mut self) -> Result<u128, DecodeError> {
        Ok(u128::from_be_bytes(self.array()?))
    }

    /// The raw bytes of a length-prefixed string.
    pub(crate) fn str_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let b = self.str_bytes()?;
        std::str::from_utf8(b).map_err(|_| self.corrupt("identifier is not utf-8"))
    }

    pub(crate) fn room(&mut self) -> Result<RoomId, DecodeError> {
        let s = self.str()?;
        RoomId::parse(s).map_err(|source| DecodeError::BadId {
            table: self.table,
            source,
        })
    }

    pub(crate) fn domain(&mut self) -> Result<ProviderDomain, DecodeError> {
        let s = self.str()?;
        ProviderDomain::parse(s).map_err(|source| DecodeError::BadId {
            table: self.table,
            source,
        })
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Fails unless everything was read.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt("trailing bytes"))
        }
    }
}

/// Reads a whole key or value that is just a string (rooms and room seqs are keyed by room).
pub(crate) fn read_room_key(table: &'static str, key: &[u8]) -> Result<RoomId, DecodeError> {
    let s = std::str::from_utf8(key).map_err(|_| DecodeError::Corrupt {
        table,
        what: "identifier is not utf-8",
    })?;
    RoomId::parse(s).map_err(|source| DecodeError::BadId { table, source })
}

pub(crate) fn read_u64_value(table: &'static str, v: &[u8]) -> Result<u64, DecodeError> {
    let mut r = Reader::new(table, v);
    let n = r.u64()?;
    r.finish()?;
    Ok(n)
}

/// What kind of write a pending record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    Room,
    RoomSeq,
    Enqueue,
    Ack,
    Cursor,
    Inbox,
    InboxTrim,
    SubmitSeen,
    SubmitForget,
    Record,
    RecentHash,
}

const TAGS: [Tag; 11] = [
    Tag::Room,
    Tag::RoomSeq,
    Tag::Enqueue,
    Tag::Ack,
    Tag::Cursor,
    Tag::Inbox,
    Tag::InboxTrim,
    Tag::SubmitSeen,
    Tag::SubmitForget,
    Tag::Record,
    Tag::RecentHash,
];

/// Ops applied since the last commit, pre-encoded into the table layout so that `apply` costs a
/// few `memcpy`s into buffers that keep their capacity across commits.
///
/// A record is a tag byte, then the key and the value, each as a little-endian `u32` length and
/// bytes. Payloads (`Enqueue`, `Inbox`) stay as [`Bytes`] handles in `payloads`; their records'
/// values start with the payload's index there (a big-endian `u32`). A fanout enqueued for
/// several destinations is one payload: the core passes the same handle for each, and each
/// record names the same index, so the commit writes its body once.
#[derive(Debug, Default)]
pub(crate) struct PendingLog {
    pub(crate) log: Vec<u8>,
    pub(crate) payloads: Vec<Bytes>,
    pub(crate) ops: usize,
    /// An op variant this build does not know (`StoreOp` is non-exhaustive): the next commit
    /// fails rather than silently dropping it.
    pub(crate) unsupported: bool,
}

impl PendingLog {
    pub(crate) fn is_empty(&self) -> bool {
        self.ops == 0 && !self.unsupported
    }

    pub(crate) fn clear(&mut self) {
        self.log.clear();
        self.payloads.clear();
        self.ops = 0;
        self.unsupported = false;
    }

    /// Starts a length-prefixed field; returns where to patch its length.
    fn open_field(&mut self) -> usize {
        let at = self.log.len();
        self.log.extend_from_slice(&[0; 4]);
        at
    }

    fn close_field(&mut self, at: usize) {
        // Fields are ids and a few numbers: far below 4 GiB.
        let len = (self.log.len() - at - 4) as u32;
        if let Some(slot) = self.log.get_mut(at..at + 4) {
            slot.copy_from_slice(&len.to_le_bytes());
        }
    }

    /// The index of `payload` in `payloads`: the last one's if it holds the same bytes (the
    /// same fanout enqueued for the next destination), else a new one.
    fn payload_index(&mut self, payload: &Bytes) -> u32 {
        let same = self.payloads.last().is_some_and(|last| {
            last.len() == payload.len()
                && (last.as_ptr() == payload.as_ptr() || last[..] == payload[..])
        });
        if !same {
            self.payloads.push(payload.clone());
        }
        // A batch holds far fewer than 4 billion payloads: they are all in memory.
        (self.payloads.len() - 1) as u32
    }

    fn record(&mut self, tag: Tag, key: impl FnOnce(&mut Vec<u8>), val: impl FnOnce(&mut Vec<u8>)) {
        self.log.push(tag as u8);
        let k = self.open_field();
        key(&mut self.log);
        self.close_field(k);
        let v = self.open_field();
        val(&mut self.log);
        self.close_field(v);
        self.ops += 1;
    }

    pub(crate) fn push(&mut self, op: StoreOp<'_>) {
        match op {
            StoreOp::Room { room, followers } => self.record(
                Tag::Room,
                |k| k.extend_from_slice(room.as_str().as_bytes()),
                |v| encode_followers(v, followers),
            ),
            StoreOp::RoomSeq {
                room,
                next_seq,
                last_ms,
            } => self.record(
                Tag::RoomSeq,
                |k| k.extend_from_slice(room.as_str().as_bytes()),
                |v| {
                    put_u64(v, next_seq);
                    put_u64(v, last_ms);
                },
            ),
            StoreOp::Enqueue {
                room,
                dest,
                qseq,
                fanout,
            } => {
                let index = self.payload_index(fanout);
                self.record(
                    Tag::Enqueue,
                    |k| {
                        queue_prefix(k, room, dest);
                        put_u64(k, qseq);
                    },
                    |v| v.extend_from_slice(&index.to_be_bytes()),
                );
            }
            StoreOp::Ack { room, dest, upto } => self.record(
                Tag::Ack,
                |k| queue_prefix(k, room, dest),
                |v| put_u64(v, upto),
            ),
            StoreOp::Cursor { hub, room, next } => self.record(
                Tag::Cursor,
                |k| {
                    put_str(k, hub.as_str());
                    put_str(k, room.as_str());
                },
                |v| put_u64(v, next),
            ),
            StoreOp::RecentHash {
                hub,
                room,
                slot,
                n,
                hash,
            } => self.record(
                Tag::RecentHash,
                |k| {
                    put_str(k, hub.as_str());
                    put_str(k, room.as_str());
                    k.extend_from_slice(&slot.to_be_bytes());
                },
                |v| {
                    put_u64(v, n);
                    v.extend_from_slice(&hash.to_be_bytes());
                },
            ),
            StoreOp::Inbox { offset, record } => {
                let index = self.payload_index(&record.fanout);
                self.record(
                    Tag::Inbox,
                    |k| put_u64(k, offset),
                    |v| {
                        v.extend_from_slice(&index.to_be_bytes());
                        inbox_header(v, record);
                    },
                );
            }
            StoreOp::InboxTrim { upto } => {
                self.record(Tag::InboxTrim, |_| {}, |v| put_u64(v, upto))
            }
            StoreOp::SubmitSeen { room, seen } => self.record(
                Tag::SubmitSeen,
                |k| {
                    put_str(k, room.as_str());
                    put_u64(k, seen.room_seq);
                },
                |v| {
                    v.extend_from_slice(&seen.key.to_be_bytes());
                    put_u64(v, seen.accepted_ms);
                },
            ),
            StoreOp::SubmitForget { room, upto_seq } => self.record(
                Tag::SubmitForget,
                |k| put_str(k, room.as_str()),
                |v| put_u64(v, upto_seq),
            ),
            // The value is a presence byte (1 put, 0 delete) and the bytes.
            StoreOp::Record { key, value } => self.record(
                Tag::Record,
                |k| k.extend_from_slice(key),
                |v| {
                    if let Some(value) = value {
                        v.push(1);
                        v.extend_from_slice(value);
                    } else {
                        v.push(0);
                    }
                },
            ),
            _ => self.unsupported = true,
        }
    }

    pub(crate) fn records(&self) -> Records<'_> {
        Records { buf: &self.log }
    }
}

fn encode_followers(out: &mut Vec<u8>, followers: &[ProviderDomain]) {
    // A room has far fewer than 65536 followers; saturate rather than wrap if it ever had more,
    // so that load reports corruption instead of misreading.
    let n = u16::try_from(followers.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    for f in followers.iter().take(usize::from(n)) {
        put_str(out, f.as_str());
    }
}

pub(crate) fn decode_followers(
    table: &'static str,
    v: &[u8],
) -> Result<Vec<ProviderDomain>, DecodeError> {
    let mut r = Reader::new(table, v);
    let n = r.u16()?;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        out.push(r.domain()?);
    }
    r.finish()?;
    Ok(out)
}

/// The inbox value is this header followed by the fanout bytes.
fn inbox_header(out: &mut Vec<u8>, record: &InboxRecord) {
    put_str(out, record.room.as_str());
    put_str(out, record.from.as_str());
    put_u64(out, record.accepted_ms);
}

/// The first byte of a stored inbox value (format 4): the fanout bytes follow the header, or
/// the id of a body in `BODIES` does (the hub's own delivery of a fanout it also queued).
pub(crate) const INBOX_INLINE: u8 = 0;
pub(crate) const INBOX_BODY: u8 = 1;

/// Where a stored inbox record's fanout bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InboxFanout<'a> {
    Inline(&'a [u8]),
    Body(u64),
}

/// A stored inbox value: its record without the fanout, and where the fanout is.
pub(crate) fn decode_inbox<'a>(
    table: &'static str,
    v: &'a [u8],
) -> Result<(InboxRecord, InboxFanout<'a>), DecodeError> {
    let mut r = Reader::new(table, v);
    let kind = r.bytes(1)?;
    let room = r.room()?;
    let from = r.domain()?;
    let accepted_ms = r.u64()?;
    let fanout = match kind {
        [INBOX_INLINE] => InboxFanout::Inline(r.rest()),
        [INBOX_BODY] => {
            let id = r.u64()?;
            r.finish()?;
            InboxFanout::Body(id)
        }
        _ => return Err(r.corrupt("unknown inbox value kind")),
    };
    let record = InboxRecord {
        room,
        from,
        accepted_ms,
        fanout: Bytes::new(),
    };
    Ok((record, fanout))
}

/// The body id a stored inbox value names, if it names one.
pub(crate) fn inbox_body(table: &'static str, v: &[u8]) -> Result<Option<u64>, DecodeError> {
    match v.first() {
        Some(&INBOX_BODY) => {
            let id = v.len().checked_sub(8).and_then(|at| v.get(at..));
            let id = id.ok_or(DecodeError::Corrupt {
                table,
                what: "truncated",
            })?;
            read_u64_value(table, id).map(Some)
        }
        _ => Ok(None),
    }
}

/// The `from` of a stored inbox value (its length-prefixed bytes), without reading the rest.
pub(crate) fn inbox_from<'a>(table: &'static str, v: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    match v.split_first() {
        Some((&(INBOX_INLINE | INBOX_BODY), rest)) => inbox_from_v3(table, rest),
        _ => Err(DecodeError::Corrupt {
            table,
            what: "unknown inbox value kind",
        }),
    }
}

/// [`inbox_from`] on an inbox value as formats 1 to 3 wrote it (no kind byte), and on the
/// header of a pending `Inbox` record.
pub(crate) fn inbox_from_v3<'a>(table: &'static str, v: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let mut r = Reader::new(table, v);
    r.str_bytes()?;
    let start = v.len() - r.buf.len();
    r.str_bytes()?;
    let end = v.len() - r.buf.len();
    v.get(start..end).ok_or_else(|| r.corrupt("truncated"))
}

/// Splits a pending `Enqueue` or `Inbox` value into its payload index and the rest.
pub(crate) fn payload_ref(val: &[u8]) -> Result<(usize, &[u8]), DecodeError> {
    let (index, rest) = val.split_first_chunk::<4>().ok_or(DecodeError::Corrupt {
        table: "pending log",
        what: "payload index missing",
    })?;
    Ok((u32::from_be_bytes(*index) as usize, rest))
}

/// Reads a provider domain written by [`put_str`] as a whole key.
pub(crate) fn read_domain_key(
    table: &'static str,
    key: &[u8],
) -> Result<ProviderDomain, DecodeError> {
    let mut r = Reader::new(table, key);
    let d = r.domain()?;
    r.finish()?;
    Ok(d)
}

/// One pending write: key and value in the layout of the table `tag` selects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record<'a> {
    pub(crate) tag: Tag,
    pub(crate) key: &'a [u8],
    pub(crate) val: &'a [u8],
}

/// Iterates the records of a [`PendingLog`].
pub(crate) struct Records<'a> {
    buf: &'a [u8],
}

impl<'a> Records<'a> {
    fn field(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.buf.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (field, rest) = rest.split_at(len);
        self.buf = rest;
        Some(field)
    }

    /// The next record; `Err` only if the log is malformed, which would be a bug in this crate.
    pub(crate) fn next_record(&mut self) -> Result<Option<Record<'a>>, DecodeError> {
        let Some((&tag, rest)) = self.buf.split_first() else {
            return Ok(None);
        };
        self.buf = rest;
        let bad = DecodeError::Corrupt {
            table: "pending log",
            what: "malformed record",
        };
        let tag = *TAGS.get(usize::from(tag)).ok_or(bad.clone())?;
        let key = self.field().ok_or(bad.clone())?;
        let val = self.field().ok_or(bad)?;
        Ok(Some(Record { tag, key, val }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_rejects_truncation_and_trailing_bytes() {
        let mut r = Reader::new("t", &[0, 5, b'a']);
        assert_eq!(
            r.str_bytes(),
            Err(DecodeError::Corrupt {
                table: "t",
                what: "truncated"
            })
        );
        let r = Reader::new("t", &[1]);
        assert!(r.finish().is_err());
        assert!(read_u64_value("t", &[0; 7]).is_err());
        assert!(read_u64_value("t", &[0; 9]).is_err());
        assert_eq!(read_u64_value("t", &7u64.to_be_bytes()), Ok(7));
    }

    #[test]
    fn bad_ids_are_errors() {
        let mut v = Vec::new();
        put_str(&mut v, "Not A Domain");
        assert!(matches!(
            Reader::new("t", &v).domain(),
            Err(DecodeError::BadId { .. })
        ));
        assert!(matches!(
            read_room_key("t", b"mimi://a.example/u/alice"),
            Err(DecodeError::BadId { .. })
        ));
        assert!(read_room_key("t", &[0xff, 0xfe]).is_err());
        assert!(decode_followers("t", &[0, 2, 0, 1, b'a']).is_err());
        assert!(decode_inbox("t", &[0, 0]).is_err());
        assert!(decode_inbox("t", &[]).is_err());
        assert!(inbox_from("t", &[7, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn pending_log_round_trip() {
        let room = RoomId::parse("mimi://a.example/r/x").expect("room");
        let dest = ProviderDomain::parse("b.example").expect("domain");
        let fanout = Bytes::from_static(b"payload");
        let other = Bytes::from_static(b"another");
        let mut p = PendingLog::default();
        // The same fanout for two destinations, then another one: two payloads.
        for (qseq, body) in [(7, &fanout), (7, &fanout), (8, &other)] {
            p.push(StoreOp::Enqueue {
                room: &room,
                dest: &dest,
                qseq,
                fanout: body,
            });
        }
        p.push(StoreOp::InboxTrim { upto: 3 });
        let mut recs = p.records();
        for (qseq, index) in [(7, 0), (7, 0), (8, 1)] {
            let Record { tag, key, val } = recs.next_record().expect("ok").expect("record");
            assert_eq!(tag, Tag::Enqueue);
            let mut r = Reader::new("q", key);
            assert_eq!(r.room().expect("room"), room);
            assert_eq!(r.domain().expect("dest"), dest);
            assert_eq!(r.u64().expect("qseq"), qseq);
            assert!(r.finish().is_ok());
            assert_eq!(payload_ref(val), Ok((index, &[][..])));
        }
        let Record { tag, key, val } = recs.next_record().expect("ok").expect("record");
        assert_eq!(
            (tag, key, read_u64_value("v", val)),
            (Tag::InboxTrim, &[][..], Ok(3))
        );
        assert!(recs.next_record().expect("ok").is_none());
        assert_eq!(p.payloads, vec![fanout, other]);
    }

    #[test]
    fn equal_bytes_in_another_handle_are_one_payload() {
        let mut p = PendingLog::default();
        let a = Bytes::from(vec![1u8; 16]);
        assert_eq!(p.payload_index(&a), 0);
        assert_eq!(p.payload_index(&Bytes::from(vec![1u8; 16])), 0);
        assert_eq!(p.payload_index(&Bytes::from(vec![2u8; 16])), 1);
        assert_eq!(p.payload_index(&a), 2, "only the last payload is compared");
    }
}
