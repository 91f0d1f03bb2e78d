//! A request body made of the transmit's segments, sent back to back.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};

/// Segments at least this long go out as they are (no copy); shorter neighbours are joined
/// up to this size. 16 KiB is HTTP/2's default maximum frame size.
pub(crate) const COALESCE_BELOW: usize = 16 * 1024;

/// Yields the segments as DATA frames (HTTP/2) or writes (HTTP/1.1).
///
/// Small segments are joined: a burst of tiny non-final DATA frames is what HTTP/2 servers
/// treat as a flood (h2 answers GOAWAY `ENHANCE_YOUR_CALM`), and TLS copies every byte into
/// a record anyway, so joining costs one extra copy of small data only. Large segments are
/// passed through untouched.
#[derive(Debug)]
pub(crate) struct Segments {
    chunks: std::vec::IntoIter<Bytes>,
    remaining: u64,
}

impl Segments {
    pub(crate) fn new(segments: Vec<Bytes>) -> Self {
        let remaining = segments.iter().map(|s| s.len() as u64).sum();
        Segments {
            chunks: coalesce(segments).into_iter(),
            remaining,
        }
    }

    pub(crate) fn empty() -> Self {
        Segments {
            chunks: Vec::new().into_iter(),
            remaining: 0,
        }
    }
}

pub(crate) fn coalesce(segments: Vec<Bytes>) -> Vec<Bytes> {
    fn flush(out: &mut Vec<Bytes>, pending: &mut Vec<Bytes>) {
        match pending.len() {
            0 => {}
            1 => out.append(pending),
            _ => {
                let mut joined = BytesMut::with_capacity(pending.iter().map(Bytes::len).sum());
                for p in pending.drain(..) {
                    joined.extend_from_slice(&p);
                }
                out.push(joined.freeze());
            }
        }
    }
    let mut out = Vec::with_capacity(segments.len());
    let mut pending: Vec<Bytes> = Vec::new();
    let mut pending_len = 0;
    for s in segments.into_iter().filter(|s| !s.is_empty()) {
        if s.len() >= COALESCE_BELOW {
            flush(&mut out, &mut pending);
            pending_len = 0;
            out.push(s);
            continue;
        }
        if pending_len + s.len() > COALESCE_BELOW {
            flush(&mut out, &mut pending);
            pending_len = 0;
        }
        pending_len += s.len();
        pending.push(s);
    }
    flush(&mut out, &mut pending);
    out
}

impl Body for Segments {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(this.chunks.next().map(|s| {
            this.remaining -= s.len() as u64;
            Ok(Frame::data(s))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn frames(mut b: Segments) -> Vec<Bytes> {
        let mut frames = Vec::new();
        while let Some(f) = b.frame().await {
            let Ok(f) = f;
            frames.push(f.into_data().unwrap_or_default());
        }
        assert!(b.is_end_stream());
        frames
    }

    #[tokio::test]
    async fn small_segments_are_joined_in_order() {
        let b = Segments::new(vec![
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"cde"),
        ]);
        assert_eq!(b.size_hint().exact(), Some(5));
        assert_eq!(frames(b).await, vec![Bytes::from_static(b"abcde")]);
    }

    #[tokio::test]
    async fn large_segments_pass_through_uncopied() {
        let big = Bytes::from(vec![1u8; COALESCE_BELOW]);
        let mid = Bytes::from(vec![2u8; COALESCE_BELOW / 2 + 1]);
        let segs = vec![
            Bytes::from_static(b"x"),
            big.clone(),
            mid.clone(),
            mid.clone(),
            Bytes::from_static(b"y"),
        ];
        let total: usize = segs.iter().map(Bytes::len).sum();
        let out = frames(Segments::new(segs)).await;
        assert_eq!(out.len(), 4);
        assert_eq!(&out[0][..], b"x");
        assert_eq!(out[1].as_ptr(), big.as_ptr(), "large segment copied");
        assert_eq!(out[2].as_ptr(), mid.as_ptr(), "lone segment copied");
        assert_eq!(out[3].len(), mid.len() + 1);
        assert_eq!(out.iter().map(Bytes::len).sum::<usize>(), total);
    }

    #[tokio::test]
    async fn empty_body() {
        assert!(frames(Segments::new(vec![Bytes::new()])).await.is_empty());
        assert!(frames(Segments::empty()).await.is_empty());
    }
}
