//! The HTTPS adapter over loopback with generated certificates and a fake node. The hostile
//! cases every transport shares are in relay-adapter's conformance suite.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mimi_wire::endpoint::{Directory, Endpoint};
use mimi_wire::uri::ProviderDomain;
use relay_adapter::{Inbound, Transport};
use relay_core::transport::{
    Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind,
};
use relay_https::{HttpsConfig, HttpsTransport, Rejection};
use relay_tls::TlsIdentity;
use rustls::pki_types::ServerName;
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use common::Provider;

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Providers and their certificates

impl Provider {
    fn config(
        &self,
        trusted: &[&Provider],
        peers: &[(&Provider, SocketAddr)],
        listen: SocketAddr,
        max_body: usize,
    ) -> Result<HttpsConfig> {
        Ok(HttpsConfig {
            identity: self.identity.clone(),
            trust: Provider::trusting(trusted)?,
            listen,
            peers: peers
                .iter()
                .map(|(p, a)| (p.domain.clone(), (*a).into()))
                .collect(),
            max_body,
            request_timeout: Duration::from_secs(5),
            adapter: Default::default(),
        })
    }
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

// ---------------------------------------------------------------------------------------------
// A fake node

type Outcome = (TransmitId, Result<Response, TransportError>);

#[derive(Clone)]
struct Fake {
    inner: Arc<FakeInner>,
}

struct FakeInner {
    requests: Mutex<Vec<Request>>,
    received: watch::Sender<usize>,
    hang: AtomicBool,
    delay: Mutex<Duration>,
    /// The n-th request (from 1) is answered after n times this.
    stagger: Mutex<Duration>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    probes: mpsc::UnboundedSender<(ProviderDomain, bool)>,
}

struct FakeEvents {
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    probes: mpsc::UnboundedReceiver<(ProviderDomain, bool)>,
}

impl Fake {
    fn new() -> (Fake, FakeEvents) {
        let (otx, orx) = mpsc::unbounded_channel();
        let (ptx, prx) = mpsc::unbounded_channel();
        let fake = Fake {
            inner: Arc::new(FakeInner {
                requests: Mutex::new(Vec::new()),
                received: watch::channel(0).0,
                hang: AtomicBool::new(false),
                delay: Mutex::new(Duration::ZERO),
                stagger: Mutex::new(Duration::ZERO),
                outcomes: otx,
                probes: ptx,
            }),
        };
        (
            fake,
            FakeEvents {
                outcomes: orx,
                probes: prx,
            },
        )
    }

    fn requests(&self) -> Vec<Request> {
        self.inner
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    async fn wait_received(&self, n: usize) -> Result<()> {
        let mut rx = self.inner.received.subscribe();
        timeout(WAIT, rx.wait_for(|&k| k >= n))
            .await
            .context("waiting for requests")??;
        Ok(())
    }
}

impl Inbound for Fake {
    fn request(&self, request: Request) -> impl Future<Output = Response> + Send {
        let inner = self.inner.clone();
        async move {
            if let Ok(mut r) = inner.requests.lock() {
                r.push(request.clone());
            }
            let mut nth = 0;
            inner.received.send_modify(|n| {
                *n += 1;
                nth = *n;
            });
            let stagger = inner.stagger.lock().map(|d| *d).unwrap_or_default();
            if !stagger.is_zero() {
                tokio::time::sleep(stagger * nth as u32).await;
            }
            if inner.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            let delay = inner.delay.lock().map(|d| *d).unwrap_or_default();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match request.endpoint {
                Endpoint::Notify => Response {
                    status: Status::Created,
                    body: Bytes::new(),
                    next_seq: request.seq.map(|s| s + 1),
                    next_inc: None,
                    retry_after: None,
                },
                Endpoint::SubmitMessage => {
                    let mut body = b"ack:".to_vec();
                    body.extend_from_slice(&request.body);
                    Response::new(Status::Ok, body)
                }
                _ => {
                    let mut r = Response::error(Status::Unavailable, "busy");
                    r.retry_after = Some(Duration::from_secs(3));
                    r
                }
            }
        }
    }

    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        let _ = self.inner.outcomes.send((id, outcome));
    }

    fn probe_outcome(&self, peer: ProviderDomain, alive: bool) {
        let _ = self.inner.probes.send((peer, alive));
    }
}

impl FakeEvents {
    async fn outcome(&mut self) -> Result<Outcome> {
        timeout(WAIT, self.outcomes.recv())
            .await?
            .context("outcome channel closed")
    }

    async fn probe(&mut self) -> Result<(ProviderDomain, bool)> {
        timeout(WAIT, self.probes.recv())
            .await?
            .context("probe channel closed")
    }
}

fn transmit(
    id: u64,
    dest: &Provider,
    endpoint: Endpoint,
    target: &str,
    seq: Option<u64>,
    body: Vec<Bytes>,
) -> Transmit {
    Transmit {
        id: TransmitId(id),
        dest: dest.domain.clone(),
        transport: TransportKind::Https,
        endpoint,
        target: target.to_owned(),
        seq,
        lineage: None,
        body,
    }
}

const ROOM: &str = "mimi://b.example/r/clubhouse";

/// b.example serving (trusting a.example), and a.example able to send to it.
struct Pair {
    a: Provider,
    b: Provider,
    ta: HttpsTransport,
    tb: HttpsTransport,
    b_addr: SocketAddr,
    fb: Fake,
    ea: FakeEvents,
}

async fn pair(b_max_body: usize) -> Result<Pair> {
    let a = Provider::new("a.example")?;
    let b = Provider::new("b.example")?;
    let (fb, _eb) = Fake::new();
    let (tb, b_addr) =
        HttpsTransport::start(b.config(&[&a], &[], any_port(), b_max_body)?, fb.clone()).await?;
    let (fa, ea) = Fake::new();
    let (ta, _) =
        HttpsTransport::start(a.config(&[&b], &[(&b, b_addr)], any_port(), 1 << 20)?, fa).await?;
    Ok(Pair {
        a,
        b,
        ta,
        tb,
        b_addr,
        fb,
        ea,
    })
}

// ---------------------------------------------------------------------------------------------
// A raw client, for requests our own client never makes

type RawBody = BoxBody<Bytes, Infallible>;

async fn raw_tls(
    me: &Provider,
    server: &Provider,
    addr: SocketAddr,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = relay_tls::client_config(
        &me.identity,
        &Provider::trusting(&[server])?,
        vec![alpn.to_vec()],
    )?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server.domain.as_str().to_owned())?;
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?)
}

async fn raw_h2(
    me: &Provider,
    server: &Provider,
    addr: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<RawBody>> {
    let tls = raw_tls(me, server, addr, b"h2").await?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(send)
}

fn raw_request(
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: RawBody,
) -> Result<http::Request<RawBody>> {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    Ok(b.body(body)?)
}

fn full(b: &'static [u8]) -> RawBody {
    Full::new(Bytes::from_static(b)).boxed()
}

/// A body that announces no length, to exercise the streaming cap.
struct Unsized(Vec<Bytes>);

impl Body for Unsized {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(if this.0.is_empty() {
            None
        } else {
            Some(Ok(Frame::data(this.0.remove(0))))
        })
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

async fn status_and_body<B>(resp: http::Response<B>) -> Result<(u16, Bytes)>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn notify_round_trip_is_201_with_next_seq() -> Result<()> {
    let mut p = pair(1 << 20).await?;
    let segments = vec![
        Bytes::from_static(b"fanout-1"),
        Bytes::new(),
        Bytes::from_static(b"fanout-2"),
    ];
    p.ta.send(transmit(
        1,
        &p.b,
        Endpoint::Notify,
        ROOM,
        Some(41),
        segments,
    ));
    let (id, outcome) = p.ea.outcome().await?;
    assert_eq!(id, TransmitId(1));
    let resp = outcome?;
    assert_eq!(resp.status, Status::Created);
    assert_eq!(resp.next_seq, Some(42));
    let reqs = p.fb.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.from, p.a.domain);
    assert_eq!(r.transport, TransportKind::Https);
    assert_eq!(r.endpoint, Endpoint::Notify);
    assert_eq!(r.target, ROOM);
    assert_eq!(r.seq, Some(41));
    assert_eq!(&r.body[..], b"fanout-1fanout-2");
    Ok(())
}

#[tokio::test]
async fn submit_message_is_200_with_body_passthrough() -> Result<()> {
    let mut p = pair(1 << 20).await?;
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let segments = vec![
        Bytes::copy_from_slice(&payload[..1000]),
        Bytes::copy_from_slice(&payload[1000..]),
    ];
    p.ta.send(transmit(
        7,
        &p.b,
        Endpoint::SubmitMessage,
        ROOM,
        None,
        segments,
    ));
    let (id, outcome) = p.ea.outcome().await?;
    assert_eq!(id, TransmitId(7));
    let resp = outcome?;
    assert_eq!(resp.status, Status::Ok);
    assert_eq!(resp.next_seq, None);
    assert_eq!(&resp.body[..4], b"ack:");
    assert_eq!(&resp.body[4..], &payload[..]);
    assert_eq!(p.fb.requests()[0].seq, None);

    // Retry-After travels back as a Duration.
    p.ta.send(transmit(8, &p.b, Endpoint::ReportAbuse, ROOM, None, vec![]));
    let (_, outcome) = p.ea.outcome().await?;
    let resp = outcome?;
    assert_eq!(resp.status, Status::Unavailable);
    assert_eq!(resp.retry_after, Some(Duration::from_secs(3)));
    assert_eq!(&resp.body[..], b"busy");
    Ok(())
}

#[tokio::test]
async fn directory_is_served_and_probe_reports_alive() -> Result<()> {
    let mut p = pair(1 << 20).await?;
    let mut h2 = raw_h2(&p.a, &p.b, p.b_addr).await?;
    let req = raw_request(
        "GET",
        "https://b.example/.well-known/mimi-protocol-directory",
        &[("from", "mimi@a.example")],
        full(b""),
    )?;
    let resp = h2.send_request(req).await?;
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let (status, body) = status_and_body(resp).await?;
    assert_eq!(status, 200);
    let dir = Directory::from_json(std::str::from_utf8(&body)?)?;
    let base = format!("https://b.example:{}/v1", p.b_addr.port());
    assert_eq!(dir, Directory::for_base(&base));

    p.ta.probe(&p.b.domain);
    assert_eq!(p.ea.probe().await?, (p.b.domain.clone(), true));
    Ok(())
}

#[tokio::test]
async fn probe_false_for_dead_or_unknown_peer() -> Result<()> {
    let a = Provider::new("a.example")?;
    let d = Provider::new("d.example")?;
    // A port that was free a moment ago: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (fa, mut ea) = Fake::new();
    let (ta, _) =
        HttpsTransport::start(a.config(&[&d], &[(&d, dead)], any_port(), 1024)?, fa).await?;
    ta.probe(&d.domain);
    assert_eq!(ea.probe().await?, (d.domain.clone(), false));
    let unknown: ProviderDomain = "z.example".parse()?;
    ta.probe(&unknown);
    assert_eq!(ea.probe().await?, (unknown.clone(), false));

    // And transmits: unknown destination → NoRoute, dead peer → Unreachable.
    let mut t = transmit(1, &d, Endpoint::Notify, ROOM, Some(0), vec![]);
    t.dest = unknown.clone();
    ta.send(t);
    assert_eq!(
        ea.outcome().await?,
        (TransmitId(1), Err(TransportError::NoRoute(unknown)))
    );
    ta.send(transmit(2, &d, Endpoint::Notify, ROOM, Some(0), vec![]));
    let (id, outcome) = ea.outcome().await?;
    assert_eq!(id, TransmitId(2));
    assert!(
        matches!(outcome, Err(TransportError::Unreachable(_))),
        "{outcome:?}"
    );
    Ok(())
}

#[tokio::test]
async fn from_missing_or_mismatched_is_403_and_the_connection_survives() -> Result<()> {
    let p = pair(1 << 20).await?;
    let uri = "https://b.example/v1/notify/mimi%3A%2F%2Fb.example%2Fr%2Fclubhouse";
    let mut h2 = raw_h2(&p.a, &p.b, p.b_addr).await?;

    let cases: [(&[(&str, &str)], Rejection); 3] = [
        (&[], Rejection::MissingFrom),
        (&[("from", "mimi@c.example")], Rejection::FromMismatch),
        (&[("from", "alice@a.example")], Rejection::MalformedFrom),
    ];
    for (headers, rejection) in cases {
        let (status, body) = status_and_body(
            h2.send_request(raw_request("POST", uri, headers, full(b"x"))?)
                .await?,
        )
        .await?;
        assert_eq!(status, 403);
        assert_eq!(&body[..], rejection.as_str().as_bytes());
    }
    let ok = raw_request(
        "POST",
        uri,
        &[("from", "mimi@a.example"), ("mimi-seq", "3")],
        full(b"x"),
    )?;
    let resp = h2.send_request(ok).await?;
    assert_eq!(
        resp.headers()
            .get("mimi-next-seq")
            .and_then(|v| v.to_str().ok()),
        Some("4")
    );
    assert_eq!(status_and_body(resp).await?.0, 201);
    assert_eq!(
        p.fb.requests().len(),
        1,
        "refused requests never reach the node"
    );

    // The same over HTTP/1.1 keep-alive.
    let tls = raw_tls(&p.a, &p.b, p.b_addr, b"http/1.1").await?;
    let (mut h1, conn) =
        hyper::client::conn::http1::handshake::<_, RawBody>(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let path = "/v1/notify/mimi%3A%2F%2Fb.example%2Fr%2Fclubhouse";
    let bad = raw_request(
        "POST",
        path,
        &[("host", "b.example:443"), ("from", "mimi@c.example")],
        full(b"x"),
    )?;
    assert_eq!(status_and_body(h1.send_request(bad).await?).await?.0, 403);
    h1.ready().await?;
    let good = raw_request(
        "POST",
        path,
        &[("host", "b.example:443"), ("from", "mimi@a.example")],
        full(b"x"),
    )?;
    assert_eq!(status_and_body(h1.send_request(good).await?).await?.0, 201);
    Ok(())
}

#[tokio::test]
async fn adapter_refusals_map_to_their_codes() -> Result<()> {
    let p = pair(1 << 20).await?;
    let mut h2 = raw_h2(&p.a, &p.b, p.b_addr).await?;
    let from = ("from", "mimi@a.example");
    // (method, uri, headers, status, body)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, u16, Rejection);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "https://b.example/v1/notify/mimi%zz",
            vec![from],
            400,
            Rejection::BadEncoding,
        ),
        (
            "POST",
            "https://b.example/v1/notify/%ff%fe",
            vec![from],
            400,
            Rejection::BadEncoding,
        ),
        (
            "POST",
            "https://b.example/v1/notify/x",
            vec![from, ("mimi-seq", "-1")],
            400,
            Rejection::BadSeq,
        ),
        (
            "POST",
            "https://b.example/v1/frobnicate/x",
            vec![from],
            404,
            Rejection::NotFound,
        ),
        (
            "POST",
            "https://b.example/v2/notify/x",
            vec![from],
            404,
            Rejection::NotFound,
        ),
        (
            "POST",
            "https://b.example/v1/notify/",
            vec![from],
            404,
            Rejection::NotFound,
        ),
        (
            "GET",
            "https://b.example/v1/notify/x",
            vec![from],
            405,
            Rejection::MethodNotAllowed,
        ),
        (
            "POST",
            "https://b.example/.well-known/mimi-protocol-directory",
            vec![from],
            405,
            Rejection::MethodNotAllowed,
        ),
        (
            "POST",
            "https://c.example/v1/notify/x",
            vec![from],
            421,
            Rejection::WrongHost,
        ),
    ];
    for (method, uri, headers, code, rejection) in cases {
        let req = raw_request(method, uri, &headers, full(b"x"))?;
        let (status, body) = status_and_body(h2.send_request(req).await?).await?;
        assert_eq!(
            (status, &body[..]),
            (code, rejection.as_str().as_bytes()),
            "{method} {uri}"
        );
    }
    // Unescaped slashes are taken as they are (the draft's own example flow).
    let req = raw_request(
        "POST",
        "https://b.example/v1/notify/b.example/r/clubhouse",
        &[from],
        full(b"x"),
    )?;
    assert_eq!(status_and_body(h2.send_request(req).await?).await?.0, 201);
    assert_eq!(
        p.fb.requests().last().map(|r| r.target.clone()).as_deref(),
        Some("b.example/r/clubhouse")
    );
    Ok(())
}

#[tokio::test]
async fn untrusted_client_certificate_is_refused_at_tls() -> Result<()> {
    let p = pair(1 << 20).await?;
    // c.example trusts b.example, but b.example does not trust c.example.
    let c = Provider::new("c.example")?;
    let (fc, mut ec) = Fake::new();
    let (tc, _) = HttpsTransport::start(
        c.config(&[&p.b], &[(&p.b, p.b_addr)], any_port(), 1024)?,
        fc,
    )
    .await?;
    tc.send(transmit(
        1,
        &p.b,
        Endpoint::Notify,
        ROOM,
        Some(0),
        vec![Bytes::from_static(b"x")],
    ));
    let (_, outcome) = ec.outcome().await?;
    assert!(
        matches!(
            outcome,
            Err(TransportError::Unreachable(_) | TransportError::ConnectionLost)
        ),
        "{outcome:?}"
    );

    // A raw TLS client sees the refusal at the latest on its first read (TLS 1.3 sends the
    // client's certificate after the client considers the handshake done).
    let refused = match raw_tls(&c, &p.b, p.b_addr, b"h2").await {
        Err(_) => true,
        Ok(mut tls) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            !matches!(timeout(WAIT, tls.read(&mut buf)).await?, Ok(n) if n > 0)
        }
    };
    assert!(refused);
    assert!(p.fb.requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn oversize_body_is_413_and_the_next_request_works() -> Result<()> {
    let mut p = pair(1024).await?;
    // Announced by Content-Length: refused before reading.
    p.ta.send(transmit(
        1,
        &p.b,
        Endpoint::SubmitMessage,
        ROOM,
        None,
        vec![Bytes::from(vec![7u8; 64 * 1024])],
    ));
    let (id, outcome) = p.ea.outcome().await?;
    assert_eq!(id, TransmitId(1));
    let resp = outcome?;
    assert_eq!(resp.status, Status::TooLarge);
    assert_eq!(&resp.body[..], Rejection::TooLarge.as_str().as_bytes());

    p.ta.send(transmit(
        2,
        &p.b,
        Endpoint::SubmitMessage,
        ROOM,
        None,
        vec![Bytes::from_static(b"small")],
    ));
    let (id, outcome) = p.ea.outcome().await?;
    assert_eq!(id, TransmitId(2));
    assert_eq!(outcome?.status, Status::Ok);

    // No length announced: the streaming cap catches it, and the connection carries on.
    let mut h2 = raw_h2(&p.a, &p.b, p.b_addr).await?;
    let uri = "https://b.example/v1/submitMessage/x";
    let big = Unsized(vec![
        Bytes::from(vec![1u8; 1000]),
        Bytes::from(vec![2u8; 1000]),
    ])
    .boxed();
    let req = raw_request("POST", uri, &[("from", "mimi@a.example")], big)?;
    let (status, body) = status_and_body(h2.send_request(req).await?).await?;
    assert_eq!(
        (status, &body[..]),
        (413, Rejection::TooLarge.as_str().as_bytes())
    );
    let req = raw_request("POST", uri, &[("from", "mimi@a.example")], full(b"fits"))?;
    assert_eq!(status_and_body(h2.send_request(req).await?).await?.0, 200);
    assert_eq!(p.fb.requests().len(), 2);
    Ok(())
}

#[tokio::test]
async fn server_restart_fails_outstanding_then_reconnects() -> Result<()> {
    let Pair {
        a,
        b,
        ta,
        tb,
        b_addr,
        fb,
        mut ea,
    } = pair(1 << 20).await?;
    fb.inner.hang.store(true, Ordering::SeqCst);
    for i in 0..3 {
        ta.send(transmit(
            i,
            &b,
            Endpoint::SubmitMessage,
            ROOM,
            None,
            vec![Bytes::from_static(b"m")],
        ));
    }
    fb.wait_received(3).await?;
    drop(tb); // abrupt: no graceful shutdown
    let mut lost = Vec::new();
    for _ in 0..3 {
        let (id, outcome) = ea.outcome().await?;
        assert_eq!(outcome, Err(TransportError::ConnectionLost), "{id:?}");
        lost.push(id.0);
    }
    lost.sort_unstable();
    assert_eq!(lost, vec![0, 1, 2]);

    // Same address, fresh node.
    let (fb2, _) = Fake::new();
    let mut restarted = None;
    for _ in 0..50 {
        match HttpsTransport::start(b.config(&[&a], &[], b_addr, 1 << 20)?, fb2.clone()).await {
            Ok(t) => {
                restarted = Some(t);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let Some((_tb2, addr2)) = restarted else {
        bail!("could not rebind {b_addr}")
    };
    assert_eq!(addr2, b_addr);
    ta.send(transmit(
        10,
        &b,
        Endpoint::SubmitMessage,
        ROOM,
        None,
        vec![Bytes::from_static(b"again")],
    ));
    let (id, outcome) = ea.outcome().await?;
    assert_eq!(id, TransmitId(10));
    assert_eq!(&outcome?.body[..], b"ack:again");
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() -> Result<()> {
    let mut p = pair(1 << 20).await?;
    if let Ok(mut d) = p.fb.inner.delay.lock() {
        *d = Duration::from_millis(300);
    }
    p.ta.send(transmit(
        1,
        &p.b,
        Endpoint::Notify,
        ROOM,
        Some(9),
        vec![Bytes::from_static(b"m")],
    ));
    p.fb.wait_received(1).await?;
    timeout(WAIT, p.tb.shutdown()).await?;
    let (id, outcome) = p.ea.outcome().await?;
    assert_eq!((id, outcome?.next_seq), (TransmitId(1), Some(10)));

    // The listener is gone: a fresh connection cannot be made.
    assert!(raw_h2(&p.a, &p.b, p.b_addr).await.is_err());

    // The sender side too: after shutdown every send is answered Closed.
    timeout(WAIT, p.ta.shutdown()).await?;
    p.ta.send(transmit(2, &p.b, Endpoint::Notify, ROOM, Some(10), vec![]));
    assert_eq!(
        p.ea.outcome().await?,
        (TransmitId(2), Err(TransportError::Closed))
    );
    ensure!(p.tb.local_addr() == p.b_addr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_transmits_each_get_exactly_one_outcome() -> Result<()> {
    let mut p = pair(1 << 20).await?;
    const N: u64 = 2000;
    // Batches stay under the peer queue, so nothing is Busy, and each is well over HTTP/2's
    // concurrent-stream limit, so requests also queue inside the connection.
    const BATCH: u64 = 500;
    let mut seen: HashMap<u64, Response> = HashMap::new();
    for batch in 0..N / BATCH {
        let ids = batch * BATCH..(batch + 1) * BATCH;
        for i in ids.clone() {
            let body = vec![
                Bytes::from(format!("message {i}")),
                Bytes::from_static(b"!"),
            ];
            p.ta.send(transmit(i, &p.b, Endpoint::Notify, ROOM, Some(i), body));
        }
        for _ in ids {
            let (id, outcome) = p.ea.outcome().await?;
            let resp = outcome.map_err(|e| anyhow::anyhow!("transmit {id:?}: {e}"))?;
            ensure!(
                seen.insert(id.0, resp).is_none(),
                "second outcome for {id:?}"
            );
        }
    }
    assert_eq!(seen.len() as u64, N);
    for (i, r) in &seen {
        assert_eq!((r.status, r.next_seq), (Status::Created, Some(i + 1)));
    }
    let requests = p.fb.requests();
    assert_eq!(requests.len() as u64, N);
    for r in &requests {
        let seq = r.seq.context("seq")?;
        assert_eq!(r.body, Bytes::from(format!("message {seq}!")));
    }
    // Nothing more arrives.
    assert!(
        timeout(Duration::from_millis(200), p.ea.outcomes.recv())
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn full_peer_queue_answers_busy() -> Result<()> {
    let mut p = pair(1 << 20).await?;
    let n = relay_https::PEER_QUEUE as u64 + 10;
    // No await in this loop: the peer task cannot drain, so the queue overflows exactly.
    for i in 0..n {
        p.ta.send(transmit(
            i,
            &p.b,
            Endpoint::Notify,
            ROOM,
            Some(i),
            vec![Bytes::from_static(b"m")],
        ));
    }
    let (mut ok, mut busy) = (0, 0);
    for _ in 0..n {
        match p.ea.outcome().await?.1 {
            Ok(r) if r.status == Status::Created => ok += 1,
            Err(TransportError::Busy) => busy += 1,
            other => bail!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, busy), (relay_https::PEER_QUEUE, 10));
    Ok(())
}

/// b.example answering through `fb`, and a.example sending to it with `request_timeout`.
struct TimedPair {
    b: Provider,
    fb: Fake,
    ta: HttpsTransport,
    ea: FakeEvents,
    _tb: HttpsTransport,
}

async fn timed_pair(request_timeout: Duration) -> Result<TimedPair> {
    let a = Provider::new("a.example")?;
    let b = Provider::new("b.example")?;
    let (fb, _) = Fake::new();
    let (tb, b_addr) =
        HttpsTransport::start(b.config(&[&a], &[], any_port(), 1024)?, fb.clone()).await?;
    let (fa, ea) = Fake::new();
    let mut config = a.config(&[&b], &[(&b, b_addr)], any_port(), 1024)?;
    config.request_timeout = request_timeout;
    let (ta, _) = HttpsTransport::start(config, fa).await?;
    Ok(TimedPair {
        b,
        fb,
        ta,
        ea,
        _tb: tb,
    })
}

#[tokio::test]
async fn slow_answer_times_out_and_the_connection_is_reused() -> Result<()> {
    let TimedPair {
        b,
        fb,
        ta,
        mut ea,
        _tb,
    } = timed_pair(Duration::from_millis(300)).await?;

    fb.inner.hang.store(true, Ordering::SeqCst);
    ta.send(transmit(
        1,
        &b,
        Endpoint::Notify,
        ROOM,
        Some(0),
        vec![Bytes::from_static(b"m")],
    ));
    assert_eq!(
        ea.outcome().await?,
        (TransmitId(1), Err(TransportError::Timeout))
    );

    fb.inner.hang.store(false, Ordering::SeqCst);
    ta.send(transmit(
        2,
        &b,
        Endpoint::Notify,
        ROOM,
        Some(0),
        vec![Bytes::from_static(b"m")],
    ));
    let (id, outcome) = ea.outcome().await?;
    assert_eq!((id, outcome?.status), (TransmitId(2), Status::Created));
    Ok(())
}

/// A peer that keeps answering is slow, not dead: requests waiting behind others are not timed
/// out (the core would only send them again on the same connection); once the answers stop,
/// what is left times out.
#[tokio::test]
async fn a_peer_that_keeps_answering_does_not_time_out_the_queue() -> Result<()> {
    let TimedPair {
        b,
        fb,
        ta,
        mut ea,
        _tb,
    } = timed_pair(Duration::from_millis(350)).await?;
    *fb.inner.stagger.lock().expect("lock") = Duration::from_millis(100);
    // Answered 100, 200, ... 800 ms after they arrive: the last ones long after 350 ms.
    for i in 0..8 {
        let body = vec![Bytes::from(format!("m{i}").into_bytes())];
        ta.send(transmit(i, &b, Endpoint::Notify, ROOM, Some(i), body));
    }
    for _ in 0..8 {
        let (id, outcome) = ea.outcome().await?;
        assert!(outcome.is_ok(), "transmit {id:?} got {outcome:?}");
    }
    // Now the peer stops answering: the next one times out.
    fb.inner.hang.store(true, Ordering::SeqCst);
    ta.send(transmit(
        8,
        &b,
        Endpoint::Notify,
        ROOM,
        Some(8),
        vec![Bytes::from_static(b"x")],
    ));
    assert_eq!(
        ea.outcome().await?,
        (TransmitId(8), Err(TransportError::Timeout))
    );
    Ok(())
}

/// A TCP relay in front of b.example whose existing connections can be frozen: their bytes
/// stop moving both ways while the sockets stay open, as on a black-holed path. Connections
/// accepted afterwards carry traffic.
struct FreezingRelay {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl FreezingRelay {
    async fn start(target: SocketAddr) -> Result<FreezingRelay> {
        let listener = tokio::net::TcpListener::bind(any_port()).await?;
        let addr = listener.local_addr()?;
        let conns: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let registry = conns.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                registry.lock().expect("lock").push(frozen.clone());
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pipe(ri, wo, frozen.clone()));
                tokio::spawn(pipe(ro, wi, frozen));
            }
        });
        Ok(FreezingRelay { addr, conns })
    }

    fn freeze_existing(&self) -> usize {
        let conns = self.conns.lock().expect("lock");
        for c in conns.iter() {
            c.store(true, Ordering::SeqCst);
        }
        conns.len()
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Frozen: hold the sockets open and move nothing more.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A connection that moves no bytes at all (a black-holed path, or TCP deep in backoff) is
/// closed by the h2 ping within about two request timeouts, and the next transmit goes on a
/// new connection instead of waiting on the dead one.
#[tokio::test]
async fn a_connection_that_moves_nothing_is_replaced() -> Result<()> {
    let request_timeout = Duration::from_millis(300);
    let a = Provider::new("a.example")?;
    let b = Provider::new("b.example")?;
    let (fb, _) = Fake::new();
    let (_tb, b_addr) =
        HttpsTransport::start(b.config(&[&a], &[], any_port(), 1024)?, fb.clone()).await?;
    let relay = FreezingRelay::start(b_addr).await?;
    let (fa, mut ea) = Fake::new();
    let mut config = a.config(&[&b], &[(&b, relay.addr)], any_port(), 1024)?;
    config.request_timeout = request_timeout;
    let (ta, _) = HttpsTransport::start(config, fa).await?;
    let notify = |id: u64| {
        let body = vec![Bytes::from(format!("m{id}").into_bytes())];
        transmit(id, &b, Endpoint::Notify, ROOM, Some(id), body)
    };

    ta.send(notify(0));
    let (id, outcome) = ea.outcome().await?;
    assert_eq!((id, outcome?.status), (TransmitId(0), Status::Created));
    assert_eq!(relay.freeze_existing(), 1, "one connection so far");

    ta.send(notify(1));
    let (id, outcome) = ea.outcome().await?;
    assert_eq!(id, TransmitId(1));
    assert!(
        matches!(
            outcome,
            Err(TransportError::Timeout | TransportError::ConnectionLost)
        ),
        "{outcome:?}"
    );
    // The ping goes out after one request timeout without a frame and fails after another.
    tokio::time::sleep(request_timeout * 3).await;

    ta.send(notify(2));
    let (id, outcome) = ea.outcome().await?;
    assert_eq!((id, outcome?.status), (TransmitId(2), Status::Created));
    assert_eq!(
        relay.conns.lock().expect("lock").len(),
        2,
        "a new connection"
    );
    assert_eq!(fb.requests().len(), 2, "the frozen request never arrived");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Budgets: connections, handshakes, bytes

/// b.example serving a.example and c.example under `limits`.
struct Budgeted {
    a: Provider,
    b: Provider,
    c: Provider,
    _tb: HttpsTransport,
    b_addr: SocketAddr,
    stats: Arc<relay_adapter::AdapterStats>,
}

async fn budgeted(limits: relay_adapter::Limits, max_body: usize) -> Result<Budgeted> {
    let a = Provider::new("a.example")?;
    let b = Provider::new("b.example")?;
    let c = Provider::new("c.example")?;
    let (fb, _eb) = Fake::new();
    let mut cfg = b.config(&[&a, &c], &[], any_port(), max_body)?;
    cfg.adapter.limits = limits;
    let stats = cfg.adapter.stats.clone();
    let (tb, b_addr) = HttpsTransport::start(cfg, fb).await?;
    Ok(Budgeted {
        a,
        b,
        c,
        _tb: tb,
        b_addr,
        stats,
    })
}

/// A request body fed by the test, one chunk at a time; it ends when the sender is dropped.
struct Fed(mpsc::Receiver<Bytes>);

impl Body for Fed {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

fn fed() -> (mpsc::Sender<Bytes>, RawBody) {
    let (tx, rx) = mpsc::channel(4);
    (tx, Fed(rx).boxed())
}

async fn notify_from(
    h2: &mut hyper::client::conn::http2::SendRequest<RawBody>,
    who: &ProviderDomain,
    body: RawBody,
) -> Result<http::Response<Incoming>> {
    let from = format!("mimi@{who}");
    let req = raw_request(
        "POST",
        "https://b.example/v1/notify/x",
        &[("from", &from)],
        body,
    )?;
    Ok(h2.send_request(req).await?)
}

/// Before the fix every TCP connection started a TLS handshake, however many were open.
#[tokio::test]
async fn handshakes_over_the_node_cap_are_refused_and_failures_counted() -> Result<()> {
    let limits = relay_adapter::Limits {
        max_handshakes: 1,
        ..Default::default()
    };
    let p = budgeted(limits, 1 << 20).await?;
    // A connection that never says a word holds the only handshake slot.
    let idle = tokio::net::TcpStream::connect(p.b_addr).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = match raw_h2(&p.a, &p.b, p.b_addr).await {
        Err(_) => true,
        Ok(mut h2) => timeout(WAIT, notify_from(&mut h2, &p.a.domain, full(b"x")))
            .await?
            .is_err(),
    };
    assert!(refused, "a handshake over the cap was served");
    assert!(p.stats.refusals(relay_adapter::Budget::Handshakes) >= 1);

    // Its end is a failed handshake (counted, not a WARN each) and frees the slot.
    drop(idle);
    let mut served = false;
    for _ in 0..100 {
        if let Ok(mut h2) = raw_h2(&p.a, &p.b, p.b_addr).await
            && let Ok(Ok(r)) = timeout(WAIT, notify_from(&mut h2, &p.a.domain, full(b"x"))).await
        {
            served = r.status() == 201;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the slot never came back");
    assert!(p.stats.failed_handshakes() >= 1);
    Ok(())
}

/// Before the fix 40 streams of 16 KiB each were all held, waiting for the rest of their
/// bodies; now what does not fit in the peer's budget is refused at once.
#[tokio::test]
async fn many_h2_streams_with_partial_bodies_are_held_to_the_budget() -> Result<()> {
    const STREAMS: usize = 40;
    const CHUNK: usize = 16 * 1024;
    const BUDGET: usize = 256 * 1024;
    let limits = relay_adapter::Limits {
        max_peer_bytes: BUDGET,
        ..Default::default()
    };
    let p = budgeted(limits, 1 << 20).await?;
    let h2 = raw_h2(&p.a, &p.b, p.b_addr).await?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut feeds = Vec::new();
    for _ in 0..STREAMS {
        let (feed, body) = fed();
        feed.send(Bytes::from(vec![7u8; CHUNK])).await?;
        feeds.push(feed);
        let mut h2 = h2.clone();
        let a = p.a.domain.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let status = notify_from(&mut h2, &a, body)
                .await
                .map(|r| r.status().as_u16());
            let _ = done.send(status.ok());
        });
    }
    // Those that fit stay open; the rest are answered 503.
    let must_refuse = STREAMS - BUDGET / CHUNK;
    for _ in 0..must_refuse {
        let status = timeout(WAIT, done_rx.recv()).await?.flatten();
        assert_eq!(status, Some(503));
    }
    assert!(p.stats.refusals(relay_adapter::Budget::PeerBytes) >= must_refuse as u64);
    // c.example is served meanwhile.
    let mut other = raw_h2(&p.c, &p.b, p.b_addr).await?;
    assert_eq!(
        notify_from(&mut other, &p.c.domain, full(b"x"))
            .await?
            .status(),
        201
    );
    drop(feeds);
    Ok(())
}

/// A peer with a CA-issued certificate, trusted by `ca`, at a host name: `localhost:port` is
/// resolved when dialling, and b's chain is verified by its CA in both directions' sense (a
/// checks b's server certificate by CA; b pins a).
#[tokio::test]
async fn a_peer_by_host_name_with_a_ca_issued_certificate() -> Result<()> {
    let a = Provider::new("a.example")?;
    let ca = relay_tls::LocalCa::generate("B's CA")?;
    let b_domain: ProviderDomain = "b.example".parse()?;
    let issued = ca.issue(&b_domain)?;
    let b = Provider {
        identity: TlsIdentity::from_pem(b_domain.clone(), &issued.cert_pem, &issued.key_pem)?,
        domain: b_domain.clone(),
        cert_pem: issued.cert_pem,
    };
    let (fb, _eb) = Fake::new();
    let (_tb, b_addr) =
        HttpsTransport::start(b.config(&[&a], &[], any_port(), 1 << 20)?, fb.clone()).await?;
    let (fa, mut ea) = Fake::new();
    let mut cfg = a.config(&[], &[], any_port(), 1 << 20)?;
    cfg.trust.add_ca_pem(b_domain.clone(), &ca.cert_pem)?;
    cfg.peers.insert(
        b_domain.clone(),
        relay_adapter::PeerAddr::new("localhost", b_addr.port())?,
    );
    let (ta, _) = HttpsTransport::start(cfg, fa).await?;
    ta.send(transmit(
        7,
        &b,
        Endpoint::Notify,
        ROOM,
        Some(1),
        vec![Bytes::from_static(b"by name")],
    ));
    let (id, outcome) = ea.outcome().await?;
    assert_eq!(id, TransmitId(7));
    assert_eq!(outcome?.status, Status::Created);
    assert_eq!(fb.requests()[0].from, a.domain);
    Ok(())
}
