//! The HTTPS flooder: HTTP/2 over mutual TLS as the flooding provider, as relay-https's own
//! tests build a raw client (hyper's h2 client, relay-tls's client config). Also the h2
//! plumbing the Matrix flooder shares.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    DEPTH, FloodTarget, Lane, Mix, PARTIAL_OPEN, RECONNECT_PAUSE, Reply, Shot, Tally, run_lanes,
};

pub(super) type Body = BoxBody<Bytes, Infallible>;
pub(super) type H2 = SendRequest<Body>;

/// The longest the flooder waits for one answer before it counts a timeout.
pub(super) const ANSWER_WAIT: Duration = Duration::from_secs(10);

pub(super) fn full(b: Bytes) -> Body {
    Full::new(b).boxed()
}

/// A body that sends `first` and then never ends: a partial request left open.
pub(super) fn never_ending(first: Bytes) -> Body {
    let s = futures::stream::once(async move { Ok::<_, Infallible>(Frame::data(first)) })
        .chain(futures::stream::pending());
    BodyExt::boxed(StreamBody::new(s))
}

/// An h2 connection to the hub (ALPN `h2`), its driver spawned.
pub(super) async fn connect(t: &FloodTarget, tally: &Tally) -> Option<H2> {
    let tls = match t.tls(b"h2").await {
        Ok(tls) => tls,
        Err(_) => {
            tally.outcome("connect failed");
            return None;
        }
    };
    let (send, conn) = match hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    {
        Ok(x) => x,
        Err(_) => {
            // The TLS handshake passed and the hub closed at once: the connection cap.
            tally.outcome("connection closed at open");
            return None;
        }
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tally.connected();
    Some(send)
}

/// Sends one request and tallies its answer; `false` when the connection is gone.
pub(super) async fn exchange(
    mut h2: H2,
    req: hyper::Request<Body>,
    tally: &Tally,
    reply: Reply,
) -> bool {
    tally.sent(1);
    let answer = async {
        let resp = h2.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    };
    match tokio::time::timeout(ANSWER_WAIT, answer).await {
        Ok(Ok((status, body))) => {
            tally.status(status, reply, &body);
            true
        }
        Ok(Err(e)) => tally.h2_failure(Some(&e), h2.is_closed()),
        Err(_) => tally.h2_failure(None, h2.is_closed()),
    }
}

/// Keeps `depth` requests from `next` in flight on one connection after another.
pub(super) async fn pipeline<N>(t: &FloodTarget, tally: &Tally, depth: usize, mut next: N)
where
    N: FnMut(&FloodTarget) -> (hyper::Request<Body>, Reply),
{
    loop {
        let Some(h2) = connect(t, tally).await else {
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        };
        let mut inflight = FuturesUnordered::new();
        let mut alive = true;
        while alive {
            while inflight.len() < depth && !h2.is_closed() {
                let (req, reply) = next(t);
                inflight.push(exchange(h2.clone(), req, tally, reply));
            }
            match inflight.next().await {
                Some(ok) => alive = ok && !h2.is_closed(),
                None => alive = false,
            }
        }
        // Let what is still in flight finish or fail before reconnecting.
        while inflight.next().await.is_some() {}
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// Percent-encodes a room URI as one path segment.
pub(super) fn segment(target: &str) -> String {
    let mut s = String::with_capacity(target.len() + 8);
    for b in target.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn post(path: &str, from: Option<&str>, host: &str, body: Body) -> hyper::Request<Body> {
    let mut b = hyper::Request::builder()
        .method("POST")
        .uri(format!("https://{host}{path}"));
    if let Some(f) = from {
        b = b.header("from", f);
    }
    b.body(body)
        .unwrap_or_else(|_| hyper::Request::new(full(Bytes::new())))
}

fn shot_request(t: &FloodTarget, s: Shot) -> hyper::Request<Body> {
    let from = format!("mimi@{}", t.me());
    let path = format!("/v1/{}/{}", s.endpoint.as_str(), segment(&s.target));
    let mut req = post(&path, Some(&from), t.hub.as_str(), full(s.body));
    if let Some(seq) = s.seq
        && let Ok(v) = hyper::header::HeaderValue::from_str(&seq.to_string())
    {
        req.headers_mut().insert("mimi-seq", v);
    }
    req
}

pub(super) async fn flood(t: &FloodTarget, tally: &Tally) {
    run_lanes(t, |lane, i| async move {
        match lane {
            Lane::Valid => {
                let mut mix = Mix::new(0x4854_5450 + i as u64);
                pipeline(t, tally, DEPTH, |t| {
                    let s = mix.next(t);
                    let reply = s.reply();
                    (shot_request(t, s), reply)
                })
                .await;
            }
            Lane::Oversize => {
                // One byte over max_body, announced by Content-Length: refused before reading.
                let big = Bytes::from(vec![0x42u8; t.limits.max_body + 1]);
                let shot = Shot {
                    endpoint: mimi_wire::endpoint::Endpoint::SubmitMessage,
                    target: t.member_room.clone(),
                    seq: None,
                    body: big,
                };
                pipeline(t, tally, 4, |t| (shot_request(t, shot.clone()), None)).await;
            }
            Lane::Partial => {
                // 64 KiB announced, 1 KiB sent, the rest never: the hub must give up on it.
                pipeline(t, tally, PARTIAL_OPEN, |t| {
                    let from = format!("mimi@{}", t.me());
                    let path = format!("/v1/submitMessage/{}", segment(&t.victim_room));
                    let mut req = post(
                        &path,
                        Some(&from),
                        t.hub.as_str(),
                        never_ending(Bytes::from(vec![0u8; 1024])),
                    );
                    req.headers_mut().insert(
                        hyper::header::CONTENT_LENGTH,
                        hyper::header::HeaderValue::from_static("65536"),
                    );
                    (req, None)
                })
                .await;
            }
            Lane::Malformed => malformed(t, tally).await,
        }
    })
    .await;
}

/// Requests the adapter's parser must refuse, and now and then a connection that sends
/// garbage instead of HTTP/2.
async fn malformed(t: &FloodTarget, tally: &Tally) {
    let mut k = 0u64;
    let garbage = async || {
        if let Ok(mut tls) = t.tls(b"h2").await {
            tally.connected();
            tally.sent(1);
            let _ = tls
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff")
                .await;
            let mut buf = [0u8; 4096];
            let end = async {
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            match tokio::time::timeout(ANSWER_WAIT, end).await {
                Ok(()) => tally.outcome("connection closed"),
                Err(_) => tally.outcome("no answer"),
            }
        }
    };
    loop {
        pipeline_bounded(t, tally, 64, &mut k).await;
        garbage().await;
    }
}

/// One connection's worth (`n` requests, DEPTH in flight) of malformed requests.
async fn pipeline_bounded(t: &FloodTarget, tally: &Tally, n: u64, k: &mut u64) {
    let Some(h2) = connect(t, tally).await else {
        tokio::time::sleep(RECONNECT_PAUSE).await;
        return;
    };
    let me = format!("mimi@{}", t.me());
    let room = segment(&t.victim_room);
    let mut inflight = FuturesUnordered::new();
    for _ in 0..n {
        while inflight.len() >= DEPTH {
            inflight.next().await;
        }
        if h2.is_closed() {
            break;
        }
        *k += 1;
        let body = full(Bytes::from_static(b"x"));
        let req = match *k % 7 {
            0 => post("/v1/submitMessage/mimi%zz", Some(&me), t.hub.as_str(), body),
            1 => post(
                &format!("/v1/frobnicate/{room}"),
                Some(&me),
                t.hub.as_str(),
                body,
            ),
            2 => post(
                &format!("/v2/submitMessage/{room}"),
                Some(&me),
                t.hub.as_str(),
                body,
            ),
            3 => {
                let mut r = post(
                    &format!("/v1/submitMessage/{room}"),
                    Some(&me),
                    t.hub.as_str(),
                    body,
                );
                *r.method_mut() = hyper::Method::GET;
                r
            }
            4 => post(
                &format!("/v1/submitMessage/{room}"),
                Some(&me),
                "elsewhere.example",
                body,
            ),
            5 => post(
                &format!("/v1/submitMessage/{room}"),
                None,
                t.hub.as_str(),
                body,
            ),
            _ => post(
                &format!("/v1/submitMessage/{room}"),
                Some("mimi@b.example"),
                t.hub.as_str(),
                body,
            ),
        };
        inflight.push(exchange(h2.clone(), req, tally, None));
    }
    while inflight.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_uri_is_one_path_segment() {
        assert_eq!(
            segment("mimi://a.example/r/room0"),
            "mimi%3A%2F%2Fa.example%2Fr%2Froom0"
        );
    }
}
