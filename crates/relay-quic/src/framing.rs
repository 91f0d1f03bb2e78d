//! The frames carried on the adapter's QUIC streams (see `FRAMING.md` beside the crate).
//!
//! Encoding writes only the frame *head*; the body follows as separate [`Bytes`] segments so
//! that payloads are handed to quinn without being copied. Decoding is sans-IO: bytes are pushed
//! into a [`ChunkQueue`] as quinn yields them and [`Decoder::decode`] returns whole frames. A
//! declared length never causes an allocation beyond `max_body` (or 64 KiB for a target).

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A request: the sender asks the receiver to handle one MIMI endpoint call.
pub const KIND_REQUEST: u8 = 1;
/// The answer to one request, in request order.
pub const KIND_RESPONSE: u8 = 2;
/// A liveness probe; answered by a pong with the same nonce.
pub const KIND_PING: u8 = 3;
/// The answer to a ping.
pub const KIND_PONG: u8 = 4;

/// Bytes of a request head before the target: len, kind, id, endpoint, target_len.
const REQUEST_FIXED: usize = 4 + 1 + 8 + 1 + 2;
/// Bytes of a response head up to and including the next_seq flag: len, kind, id, status, flag.
const RESPONSE_FIXED: usize = 4 + 1 + 8 + 2 + 1;
/// A ping or pong: len, kind, nonce.
const PING_LEN: usize = 4 + 1 + 8;

/// Why a frame could not be encoded. Only our own input can cause this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("target of {0} bytes is over the 65535-byte limit")]
    TargetTooLong(usize),
    #[error("frame of {0} bytes is over the 4 GiB limit")]
    FrameTooLong(u64),
}

/// Why a byte stream is not a valid sequence of frames: the peer misbehaved. The stream cannot
/// be resynchronised and is reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame kind {0} is not expected on this stream")]
    Unexpected(u8),
    #[error("frame length {declared} does not match its contents ({actual})")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("invalid presence flag {0}")]
    BadFlag(u8),
    #[error("stream ended inside a frame")]
    Truncated,
}

/// A frame body, or the fact that it was over the limit and skipped unread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Bytes(Bytes),
    /// The declared length, which was over `max_body`; the bytes are discarded as they arrive.
    TooLarge(u32),
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Request {
        id: u64,
        /// `mimi_wire::endpoint::Endpoint::code`; not checked here.
        endpoint: u8,
        /// UTF-8 in a valid frame; not checked here so that the receiver can answer 400.
        target: Bytes,
        seq: Option<u64>,
        /// With `seq`: the hub incarnations `(batch, prev)` behind it.
        lineage: Option<(u64, u64)>,
        body: Body,
    },
    Response {
        id: u64,
        /// An HTTP status code.
        status: u16,
        next_seq: Option<u64>,
        /// With `next_seq`: the incarnation of the receiver's last event.
        next_inc: Option<u64>,
        retry_after_ms: Option<u64>,
        body: Body,
    },
    Ping(u64),
    Pong(u64),
}

/// A request's sequence field: flag 0 (none), 1 (`seq`), or 2 (`seq`, then the incarnations
/// of the batch and of the event before it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqHead {
    pub seq: Option<u64>,
    pub lineage: Option<(u64, u64)>,
}

impl From<Option<u64>> for SeqHead {
    fn from(seq: Option<u64>) -> Self {
        SeqHead { seq, lineage: None }
    }
}

impl SeqHead {
    fn words(&self) -> usize {
        match (self.seq, self.lineage) {
            (None, _) => 0,
            (Some(_), None) => 1,
            (Some(_), Some(_)) => 3,
        }
    }

    fn put(&self, buf: &mut BytesMut) {
        match (self.seq, self.lineage) {
            (None, _) => buf.put_u8(0),
            (Some(s), None) => {
                buf.put_u8(1);
                buf.put_u64(s);
            }
            (Some(s), Some((batch, prev))) => {
                buf.put_u8(2);
                buf.put_u64(s);
                buf.put_u64(batch);
                buf.put_u64(prev);
            }
        }
    }
}

/// A response's sequence field: flag 0 (none), 1 (`next_seq`), or 2 (`next_seq`, then the
/// incarnation of the receiver's last event).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHead {
    pub next_seq: Option<u64>,
    pub next_inc: Option<u64>,
}

impl From<Option<u64>> for NextHead {
    fn from(next_seq: Option<u64>) -> Self {
        NextHead {
            next_seq,
            next_inc: None,
        }
    }
}

impl NextHead {
    fn words(&self) -> usize {
        match (self.next_seq, self.next_inc) {
            (None, _) => 0,
            (Some(_), None) => 1,
            (Some(_), Some(_)) => 2,
        }
    }

    fn put(&self, buf: &mut BytesMut) {
        match (self.next_seq, self.next_inc) {
            (None, _) => buf.put_u8(0),
            (Some(n), None) => {
                buf.put_u8(1);
                buf.put_u64(n);
            }
            (Some(n), Some(inc)) => {
                buf.put_u8(2);
                buf.put_u64(n);
                buf.put_u64(inc);
            }
        }
    }
}

fn put_opt(buf: &mut BytesMut, v: Option<u64>) {
    match v {
        Some(v) => {
            buf.put_u8(1);
            buf.put_u64(v);
        }
        None => buf.put_u8(0),
    }
}

fn opt_len(v: Option<u64>) -> usize {
    if v.is_some() { 9 } else { 1 }
}

/// The value of the leading length field: everything after it.
fn frame_len(head: usize, body_len: usize) -> Result<u32, EncodeError> {
    let total = (head - 4) as u64 + body_len as u64;
    u32::try_from(total).map_err(|_| EncodeError::FrameTooLong(total))
}

/// Appends a request head to `buf`; the caller then writes exactly `body_len` body bytes.
pub fn encode_request(
    buf: &mut BytesMut,
    id: u64,
    endpoint: u8,
    target: &str,
    seq: impl Into<SeqHead>,
    body_len: usize,
) -> Result<(), EncodeError> {
    let seq = seq.into();
    let target_len =
        u16::try_from(target.len()).map_err(|_| EncodeError::TargetTooLong(target.len()))?;
    let head = REQUEST_FIXED + target.len() + 1 + 8 * seq.words() + 4;
    let len = frame_len(head, body_len)?;
    buf.reserve(head);
    buf.put_u32(len);
    buf.put_u8(KIND_REQUEST);
    buf.put_u64(id);
    buf.put_u8(endpoint);
    buf.put_u16(target_len);
    buf.put_slice(target.as_bytes());
    seq.put(buf);
    // Cannot truncate: frame_len above bounds body_len by u32::MAX.
    buf.put_u32(body_len as u32);
    Ok(())
}

/// Appends a response head to `buf`; the caller then writes exactly `body_len` body bytes.
pub fn encode_response(
    buf: &mut BytesMut,
    id: u64,
    status: u16,
    next: impl Into<NextHead>,
    retry_after_ms: Option<u64>,
    body_len: usize,
) -> Result<(), EncodeError> {
    let next = next.into();
    let head = RESPONSE_FIXED + 8 * next.words() + opt_len(retry_after_ms) + 4;
    let len = frame_len(head, body_len)?;
    buf.reserve(head);
    buf.put_u32(len);
    buf.put_u8(KIND_RESPONSE);
    buf.put_u64(id);
    buf.put_u16(status);
    next.put(buf);
    put_opt(buf, retry_after_ms);
    buf.put_u32(body_len as u32);
    Ok(())
}

/// Appends a ping (`pong == false`) or pong frame.
pub fn encode_ping(buf: &mut BytesMut, nonce: u64, pong: bool) {
    buf.reserve(PING_LEN);
    buf.put_u32((PING_LEN - 4) as u32);
    buf.put_u8(if pong { KIND_PONG } else { KIND_PING });
    buf.put_u64(nonce);
}

/// Received bytes not yet decoded, kept as the chunks quinn handed out so that a body lying
/// inside one chunk is sliced, not copied.
#[derive(Debug, Default)]
pub struct ChunkQueue {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl ChunkQueue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `out.len()` bytes starting `offset` bytes in, if that many are buffered.
    fn peek(&self, mut offset: usize, out: &mut [u8]) -> bool {
        if offset + out.len() > self.len {
            return false;
        }
        let mut filled = 0;
        for chunk in &self.chunks {
            if offset >= chunk.len() {
                offset -= chunk.len();
                continue;
            }
            let n = (chunk.len() - offset).min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&chunk[offset..offset + n]);
            filled += n;
            offset = 0;
            if filled == out.len() {
                break;
            }
        }
        true
    }

    fn peek_u8(&self, offset: usize) -> Option<u8> {
        let mut b = [0u8; 1];
        self.peek(offset, &mut b).then_some(b[0])
    }

    /// Discards up to `n` bytes; returns how many were discarded.
    fn advance(&mut self, mut n: usize) -> usize {
        let mut done = 0;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                done += front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                done += n;
                n = 0;
            }
        }
        self.len -= done;
        done
    }

    /// Removes the next `n` bytes (which must be buffered): a slice of the front chunk when it
    /// holds them all, one copy otherwise.
    fn take(&mut self, n: usize) -> Bytes {
        debug_assert!(n <= self.len);
        if n == 0 {
            return Bytes::new();
        }
        if let Some(front) = self.chunks.front_mut()
            && front.len() >= n
        {
            let out = front.split_to(n);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            self.len -= n;
            return out;
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let k = front.len().min(n - out.len());
            out.put_slice(&front[..k]);
            front.advance(k);
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        self.len -= out.len();
        out.freeze()
    }

    fn take_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.peek(0, &mut b);
        self.advance(8);
        u64::from_be_bytes(b)
    }
}

/// Decodes frames from a [`ChunkQueue`], skipping over-limit bodies as they arrive.
#[derive(Debug)]
pub struct Decoder {
    max_body: usize,
    /// Bytes of an over-limit body still to discard before the next frame.
    skip: u64,
}

fn check_len(declared: u32, head: usize, body: u64) -> Result<(), FrameError> {
    let actual = (head - 4) as u64 + body;
    if u64::from(declared) != actual {
        return Err(FrameError::LengthMismatch {
            declared: u64::from(declared),
            actual,
        });
    }
    Ok(())
}

/// The head so far must fit in the declared length; checked early so that a garbage length
/// is caught before waiting for a long target.
fn check_fits(declared: u32, head_so_far: usize) -> Result<(), FrameError> {
    if (head_so_far - 4) as u64 > u64::from(declared) {
        return Err(FrameError::LengthMismatch {
            declared: u64::from(declared),
            actual: (head_so_far - 4) as u64,
        });
    }
    Ok(())
}

/// A sequence field's flag: 0 (absent), 1 (one u64), 2 (`with_lineage` u64s).
fn words(b: u8, with_lineage: usize) -> Result<usize, FrameError> {
    match b {
        0 => Ok(0),
        1 => Ok(1),
        2 => Ok(with_lineage),
        other => Err(FrameError::BadFlag(other)),
    }
}

fn flag(b: u8) -> Result<bool, FrameError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(FrameError::BadFlag(other)),
    }
}

impl Decoder {
    pub fn new(max_body: usize) -> Self {
        Decoder { max_body, skip: 0 }
    }

    /// True between frames (nothing half-decoded is pending in the decoder itself).
    pub fn is_idle(&self) -> bool {
        self.skip == 0
    }

    /// The size on the wire of the frame at the front of `q`, once its length field is there;
    /// `None` while skipping an over-limit body or before four bytes arrived.
    pub fn next_frame_len(&self, q: &ChunkQueue) -> Option<usize> {
        let mut len = [0u8; 4];
        (self.skip == 0 && q.peek(0, &mut len)).then(|| 4 + u32::from_be_bytes(len) as usize)
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self, q: &mut ChunkQueue) -> Result<Option<Frame>, FrameError> {
        if self.skip > 0 {
            let n = usize::try_from(self.skip).unwrap_or(usize::MAX);
            self.skip -= q.advance(n) as u64;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let mut first = [0u8; 5];
        if !q.peek(0, &mut first) {
            return Ok(None);
        }
        let declared = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
        match first[4] {
            KIND_PING | KIND_PONG => {
                check_len(declared, PING_LEN, 0)?;
                if q.len() < PING_LEN {
                    return Ok(None);
                }
                q.advance(5);
                let nonce = q.take_u64();
                Ok(Some(if first[4] == KIND_PING {
                    Frame::Ping(nonce)
                } else {
                    Frame::Pong(nonce)
                }))
            }
            KIND_REQUEST => self.decode_request(q, declared),
            KIND_RESPONSE => self.decode_response(q, declared),
            other => Err(FrameError::UnknownKind(other)),
        }
    }

    fn decode_request(
        &mut self,
        q: &mut ChunkQueue,
        declared: u32,
    ) -> Result<Option<Frame>, FrameError> {
        let mut fixed = [0u8; REQUEST_FIXED];
        if !q.peek(0, &mut fixed) {
            return Ok(None);
        }
        let target_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let flag_at = REQUEST_FIXED + target_len;
        check_fits(declared, flag_at + 1 + 4)?;
        let Some(seq_flag) = q.peek_u8(flag_at) else {
            return Ok(None);
        };
        let seq_words = words(seq_flag, 3)?;
        let body_len_at = flag_at + 1 + 8 * seq_words;
        let head = body_len_at + 4;
        check_fits(declared, head)?;
        let mut bl = [0u8; 4];
        if !q.peek(body_len_at, &mut bl) {
            return Ok(None);
        }
        let body_len = u32::from_be_bytes(bl);
        check_len(declared, head, u64::from(body_len))?;
        let oversize = body_len as usize > self.max_body;
        // Wait for the whole frame unless the body is to be skipped.
        if !oversize && q.len() < head + body_len as usize {
            return Ok(None);
        }
        let id = u64::from_be_bytes(fixed[5..13].try_into().unwrap_or_default());
        let endpoint = fixed[13];
        q.advance(REQUEST_FIXED);
        let target = q.take(target_len);
        q.advance(1);
        let seq = (seq_words > 0).then(|| q.take_u64());
        let lineage = (seq_words == 3).then(|| (q.take_u64(), q.take_u64()));
        q.advance(4);
        let body = self.body(q, body_len, oversize);
        Ok(Some(Frame::Request {
            id,
            endpoint,
            target,
            seq,
            lineage,
            body,
        }))
    }

    fn decode_response(
        &mut self,
        q: &mut ChunkQueue,
        declared: u32,
    ) -> Result<Option<Frame>, FrameError> {
        let mut fixed = [0u8; RESPONSE_FIXED];
        if !q.peek(0, &mut fixed) {
            return Ok(None);
        }
        let next_words = words(fixed[15], 2)?;
        let retry_flag_at = RESPONSE_FIXED + 8 * next_words;
        check_fits(declared, retry_flag_at + 1 + 4)?;
        let Some(retry_flag) = q.peek_u8(retry_flag_at) else {
            return Ok(None);
        };
        let has_retry = flag(retry_flag)?;
        let body_len_at = retry_flag_at + 1 + if has_retry { 8 } else { 0 };
        let head = body_len_at + 4;
        check_fits(declared, head)?;
        let mut bl = [0u8; 4];
        if !q.peek(body_len_at, &mut bl) {
            return Ok(None);
        }
        let body_len = u32::from_be_bytes(bl);
        check_len(declared, head, u64::from(body_len))?;
        let oversize = body_len as usize > self.max_body;
        if !oversize && q.len() < head + body_len as usize {
            return Ok(None);
        }
        let id = u64::from_be_bytes(fixed[5..13].try_into().unwrap_or_default());
        let status = u16::from_be_bytes([fixed[13], fixed[14]]);
        q.advance(RESPONSE_FIXED);
        let next_seq = (next_words > 0).then(|| q.take_u64());
        let next_inc = (next_words == 2).then(|| q.take_u64());
        q.advance(1);
        let retry_after_ms = has_retry.then(|| q.take_u64());
        q.advance(4);
        let body = self.body(q, body_len, oversize);
        Ok(Some(Frame::Response {
            id,
            status,
            next_seq,
            next_inc,
            retry_after_ms,
            body,
        }))
    }

    fn body(&mut self, q: &mut ChunkQueue, body_len: u32, oversize: bool) -> Body {
        if oversize {
            // Discard what is here now, the rest lazily on the next calls.
            let n = body_len as usize;
            self.skip = (n - q.advance(n)) as u64;
            Body::TooLarge(body_len)
        } else {
            Body::Bytes(q.take(body_len as usize))
        }
    }

    /// Called at end of stream: an error if a frame was cut short.
    pub fn finish(&self, q: &ChunkQueue) -> Result<(), FrameError> {
        if self.skip > 0 || !q.is_empty() {
            Err(FrameError::Truncated)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64, target: &str, seq: Option<u64>, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_request(&mut b, id, 3, target, seq, body.len()).expect("encodes");
        b.put_slice(body);
        b.to_vec()
    }

    fn response(
        id: u64,
        status: u16,
        next: Option<u64>,
        retry: Option<u64>,
        body: &[u8],
    ) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_response(&mut b, id, status, next, retry, body.len()).expect("encodes");
        b.put_slice(body);
        b.to_vec()
    }

    /// Feeds `wire` in pieces of `step` bytes and collects every frame.
    fn decode_all(wire: &[u8], step: usize, max_body: usize) -> Result<Vec<Frame>, FrameError> {
        let mut q = ChunkQueue::new();
        let mut d = Decoder::new(max_body);
        let mut out = Vec::new();
        for piece in wire.chunks(step.max(1)) {
            q.push(Bytes::copy_from_slice(piece));
            while let Some(f) = d.decode(&mut q)? {
                out.push(f);
            }
        }
        d.finish(&q)?;
        Ok(out)
    }

    fn sample() -> (Vec<u8>, Vec<Frame>) {
        let mut wire = request(7, "mimi://a.example/r/room1", Some(42), b"hello");
        wire.extend(request(8, "", None, b""));
        wire.extend(response(7, 201, Some(43), None, b""));
        wire.extend(response(9, 503, None, Some(1500), b"busy"));
        let mut p = BytesMut::new();
        let seq = SeqHead {
            seq: Some(44),
            lineage: Some((0xfeed, 0xbeef)),
        };
        encode_request(&mut p, 10, 3, "r", seq, 2).expect("encodes");
        p.put_slice(b"ab");
        let next = NextHead {
            next_seq: Some(46),
            next_inc: Some(0xfeed),
        };
        encode_response(&mut p, 10, 201, next, Some(5), 0).expect("encodes");
        encode_ping(&mut p, 5, false);
        encode_ping(&mut p, 5, true);
        wire.extend_from_slice(&p);
        let frames = vec![
            Frame::Request {
                id: 7,
                endpoint: 3,
                target: Bytes::from_static(b"mimi://a.example/r/room1"),
                seq: Some(42),
                lineage: None,
                body: Body::Bytes(Bytes::from_static(b"hello")),
            },
            Frame::Request {
                id: 8,
                endpoint: 3,
                target: Bytes::new(),
                seq: None,
                lineage: None,
                body: Body::Bytes(Bytes::new()),
            },
            Frame::Response {
                id: 7,
                status: 201,
                next_seq: Some(43),
                next_inc: None,
                retry_after_ms: None,
                body: Body::Bytes(Bytes::new()),
            },
            Frame::Response {
                id: 9,
                status: 503,
                next_seq: None,
                next_inc: None,
                retry_after_ms: Some(1500),
                body: Body::Bytes(Bytes::from_static(b"busy")),
            },
            Frame::Request {
                id: 10,
                endpoint: 3,
                target: Bytes::from_static(b"r"),
                seq: Some(44),
                lineage: Some((0xfeed, 0xbeef)),
                body: Body::Bytes(Bytes::from_static(b"ab")),
            },
            Frame::Response {
                id: 10,
                status: 201,
                next_seq: Some(46),
                next_inc: Some(0xfeed),
                retry_after_ms: Some(5),
                body: Body::Bytes(Bytes::new()),
            },
            Frame::Ping(5),
            Frame::Pong(5),
        ];
        (wire, frames)
    }

    #[test]
    fn round_trip_at_every_chunking() {
        let (wire, frames) = sample();
        for step in 1..=wire.len() {
            assert_eq!(
                decode_all(&wire, step, 1024).expect("decodes"),
                frames,
                "step {step}"
            );
        }
    }

    #[test]
    fn request_layout_is_as_documented() {
        let wire = request(1, "ab", Some(2), b"xyz");
        let expect: Vec<u8> = [
            &[0, 0, 0, 30][..],           // frame_len: 1+8+1+2+2+1+8+4 + 3
            &[1],                         // kind
            &[0, 0, 0, 0, 0, 0, 0, 1],    // id
            &[3],                         // endpoint
            &[0, 2, b'a', b'b'],          // target
            &[1, 0, 0, 0, 0, 0, 0, 0, 2], // seq
            &[0, 0, 0, 3],                // body_len
            b"xyz",
        ]
        .concat();
        assert_eq!(wire, expect);
    }

    #[test]
    fn oversize_body_is_skipped_and_the_next_frame_decodes() {
        let mut wire = request(1, "t", None, &[0xAA; 100]);
        wire.extend(request(2, "t", None, b"ok"));
        for step in [1, 7, 64, 1000] {
            let frames = decode_all(&wire, step, 10).expect("decodes");
            assert_eq!(frames.len(), 2);
            assert!(matches!(
                frames[0],
                Frame::Request {
                    id: 1,
                    body: Body::TooLarge(100),
                    ..
                }
            ));
            assert!(
                matches!(&frames[1], Frame::Request { id: 2, body: Body::Bytes(b), .. } if b == "ok")
            );
        }
    }

    #[test]
    fn huge_declared_lengths_allocate_nothing_and_fail_or_skip() {
        // A request claiming a 4 GiB body: skipped, never allocated.
        let mut b = BytesMut::new();
        encode_request(&mut b, 1, 3, "t", None, u32::MAX as usize - 100).expect("encodes");
        let mut q = ChunkQueue::new();
        q.push(b.freeze());
        let mut d = Decoder::new(1 << 20);
        let f = d.decode(&mut q).expect("valid head");
        assert!(matches!(
            f,
            Some(Frame::Request {
                body: Body::TooLarge(_),
                ..
            })
        ));
        assert!(!d.is_idle());
        // A length field that disagrees with the head is garbage.
        let mut wire = request(1, "t", None, b"abc");
        wire[3] = 200;
        assert!(matches!(
            decode_all(&wire, 5, 100),
            Err(FrameError::LengthMismatch { .. })
        ));
        // A target length past the declared frame length is caught before the target arrives.
        let mut q = ChunkQueue::new();
        q.push(Bytes::from_static(&[
            0, 0, 0, 20, 1, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0xFF, 0xFF,
        ]));
        assert!(matches!(
            Decoder::new(10).decode(&mut q),
            Err(FrameError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn garbage_is_rejected() {
        assert_eq!(
            decode_all(&[0, 0, 0, 1, 99], 5, 10),
            Err(FrameError::UnknownKind(99))
        );
        let mut wire = request(1, "t", Some(1), b"");
        wire[17] = 7; // the seq flag
        assert_eq!(decode_all(&wire, 100, 10), Err(FrameError::BadFlag(7)));
        let wire = request(1, "t", None, b"abc");
        assert_eq!(
            decode_all(&wire[..wire.len() - 1], 3, 10),
            Err(FrameError::Truncated)
        );
    }

    #[test]
    fn mutated_and_random_bytes_never_panic() {
        // A deterministic stand-in for the fuzz target in fuzz/: flip bytes of valid frames and
        // feed pure noise, in every chunking; decoding must only ever return Ok or Err.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (wire, _) = sample();
        for _ in 0..2000 {
            let mut w = wire.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % w.len();
                w[i] = next() as u8;
            }
            let _ = decode_all(&w, (next() % 40 + 1) as usize, (next() % 64) as usize);
            let noise: Vec<u8> = (0..(next() % 200)).map(|_| next() as u8).collect();
            let _ = decode_all(&noise, (next() % 16 + 1) as usize, 1 << 20);
        }
    }

    #[test]
    fn body_inside_one_chunk_is_not_copied() {
        let wire = Bytes::from(request(1, "t", None, b"payload"));
        let mut q = ChunkQueue::new();
        q.push(wire.clone());
        let Ok(Some(Frame::Request {
            body: Body::Bytes(body),
            ..
        })) = Decoder::new(100).decode(&mut q)
        else {
            panic!("expected a request");
        };
        assert_eq!(body.as_ptr(), wire[wire.len() - 7..].as_ptr());
    }

    #[test]
    fn encode_limits() {
        let long = "x".repeat(70_000);
        assert_eq!(
            encode_request(&mut BytesMut::new(), 1, 1, &long, None, 0),
            Err(EncodeError::TargetTooLong(70_000))
        );
        assert!(matches!(
            encode_request(&mut BytesMut::new(), 1, 1, "t", None, u32::MAX as usize),
            Err(EncodeError::FrameTooLong(_))
        ));
    }
}
