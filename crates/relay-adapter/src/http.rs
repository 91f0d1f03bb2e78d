//! The bounded request-body reader of the HTTP adapters (HTTPS, Matrix).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use http_body::Body;
use http_body_util::BodyExt;
use mimi_wire::uri::ProviderDomain;

use crate::{Budget, ByteBudget, Held};

/// Why a request body was refused; each maps to the protocol's own answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyRefusal {
    /// Over the size limit, announced or streamed (413).
    TooLarge,
    /// The peer already holds its share of bytes in the adapter (backpressure).
    OverBudget,
    /// Not received in full within the deadline (408).
    Timeout,
    /// The body stream broke off (400).
    Aborted,
}

/// The bounds of one body.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// Largest body accepted.
    pub max: usize,
    /// How long the whole body may take to arrive.
    pub deadline: Duration,
}

/// Reads `peer`'s request body within `limits`, its bytes counted in `budget` from arrival (an
/// announced `Content-Length` at once, so an announced oversize or over-budget body is refused
/// unread) until the returned [`Held`] is dropped, which the caller does once the node has
/// answered. Refusals are counted in the budget's stats (`body_size`, `frame_deadline`; the
/// budget itself counts `peer_bytes`). A lying `Content-Length` gains nothing: the streamed
/// length is capped and counted too.
pub async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    peer: &ProviderDomain,
    budget: &Arc<ByteBudget>,
    limits: BodyLimits,
) -> Result<(Bytes, Held), BodyRefusal>
where
    B: Body<Data = Bytes> + Unpin,
{
    let stats = budget.stats();
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limits.max as u64) {
        stats.refused(Budget::BodySize);
        return Err(BodyRefusal::TooLarge);
    }
    let mut held = budget
        .reserve(peer, announced.unwrap_or(0) as usize)
        .map_err(|_| BodyRefusal::OverBudget)?;
    match tokio::time::timeout(limits.deadline, collect(body, limits.max, &mut held)).await {
        Ok(Ok(bytes)) => Ok((bytes, held)),
        Ok(Err(refusal)) => {
            if refusal == BodyRefusal::TooLarge {
                stats.refused(Budget::BodySize);
            }
            Err(refusal)
        }
        Err(_) => {
            stats.refused(Budget::FrameDeadline);
            Err(BodyRefusal::Timeout)
        }
    }
}

/// Reads a body of at most `max` bytes, each byte counted in `held` as it arrives. One data
/// frame is passed on uncopied; several are joined.
async fn collect<B>(mut body: B, max: usize, held: &mut Held) -> Result<Bytes, BodyRefusal>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyRefusal::Aborted)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing for us
        };
        len = len.saturating_add(data.len());
        if len > max {
            return Err(BodyRefusal::TooLarge);
        }
        if len > held.bytes() {
            held.grow(len - held.bytes())
                .map_err(|_| BodyRefusal::OverBudget)?;
        }
        if !data.is_empty() {
            chunks.push(data);
        }
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut joined = BytesMut::with_capacity(len);
            for c in chunks {
                joined.extend_from_slice(&c);
            }
            joined.freeze()
        }
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use http_body_util::Full;

    use super::*;
    use crate::AdapterStats;

    fn peer() -> ProviderDomain {
        "a.example".parse().expect("domain")
    }

    fn limits(max: usize) -> BodyLimits {
        BodyLimits {
            max,
            deadline: Duration::from_secs(5),
        }
    }

    fn announcing(n: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from(n));
        h
    }

    /// A body of these frames; with `open`, it then never ends.
    struct Frames(std::collections::VecDeque<Bytes>, bool);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            use std::task::Poll;
            let this = self.get_mut();
            match this.0.pop_front() {
                Some(b) => Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
                None if this.1 => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Frames {
        Frames(parts.iter().map(|p| Bytes::from_static(p)).collect(), false)
    }

    #[tokio::test]
    async fn within_bounds_the_bytes_are_held_until_dropped() {
        let stats = Arc::new(AdapterStats::default());
        let budget = ByteBudget::new(100, stats.clone());
        let one = Bytes::from_static(b"hello");
        let (b, held) = read_body(
            &announcing(5),
            Full::new(one.clone()),
            &peer(),
            &budget,
            limits(10),
        )
        .await
        .expect("read");
        assert_eq!(b.as_ptr(), one.as_ptr(), "one frame is not copied");
        assert_eq!(budget.held(&peer()), 5);
        drop(held);
        assert_eq!(budget.held(&peer()), 0);
        let (b, _held) = read_body(
            &HeaderMap::new(),
            chunks(&[b"ab", b"", b"cd"]),
            &peer(),
            &budget,
            limits(10),
        )
        .await
        .expect("read");
        assert_eq!(&b[..], b"abcd");
    }

    #[tokio::test]
    async fn oversize_announced_or_streamed_is_refused_and_counted() {
        let stats = Arc::new(AdapterStats::default());
        let budget = ByteBudget::new(1000, stats.clone());
        let r = read_body(
            &announcing(11),
            Full::new(Bytes::new()),
            &peer(),
            &budget,
            limits(10),
        )
        .await;
        assert_eq!(r.map(|_| ()), Err(BodyRefusal::TooLarge));
        let r = read_body(
            &HeaderMap::new(),
            chunks(&[b"123456", b"78901"]),
            &peer(),
            &budget,
            limits(10),
        )
        .await;
        assert_eq!(r.map(|_| ()), Err(BodyRefusal::TooLarge));
        assert_eq!(stats.refusals(Budget::BodySize), 2);
        assert_eq!(budget.held(&peer()), 0);
    }

    #[tokio::test]
    async fn over_the_peer_budget_is_refused() {
        let stats = Arc::new(AdapterStats::default());
        let budget = ByteBudget::new(8, stats.clone());
        let _other = budget.reserve(&peer(), 4).expect("fits");
        let r = read_body(
            &announcing(5),
            Full::new(Bytes::new()),
            &peer(),
            &budget,
            limits(10),
        )
        .await;
        assert_eq!(r.map(|_| ()), Err(BodyRefusal::OverBudget));
        let r = read_body(
            &HeaderMap::new(),
            chunks(&[b"12345"]),
            &peer(),
            &budget,
            limits(10),
        )
        .await;
        assert_eq!(r.map(|_| ()), Err(BodyRefusal::OverBudget));
        assert_eq!(stats.refusals(Budget::PeerBytes), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_is_cut_at_the_deadline() {
        let stats = Arc::new(AdapterStats::default());
        let budget = ByteBudget::new(100, stats.clone());
        let body = Frames([Bytes::from_static(b"12")].into(), true);
        let r = read_body(&announcing(10), body, &peer(), &budget, limits(10)).await;
        assert_eq!(r.map(|_| ()), Err(BodyRefusal::Timeout));
        assert_eq!(stats.refusals(Budget::FrameDeadline), 1);
        assert_eq!(budget.held(&peer()), 0);
    }
}
