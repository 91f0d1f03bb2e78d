//! Our HTTPS client against a hub we did not write: HTTP/1.1 only, no ALPN, mutual TLS, and
//! its own directory (absolute URLs without a port, relative ones, its own variable names).

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::{AdapterContext, Inbound, Transport};
use relay_core::transport::{
    Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind,
};
use relay_https::{HttpsConfig, HttpsTransport};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::timeout;

use common::Provider;

const WAIT: Duration = Duration::from_secs(10);
const ROOM: &str = "mimi://hub.example/r/clubhouse";
const ROOM_ENC: &str = "mimi%3A%2F%2Fhub.example%2Fr%2Fclubhouse";

// ---------------------------------------------------------------------------------------------
// The hub: hyper's HTTP/1.1 server alone, no ALPN offered

/// One request the hub received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    host: Option<String>,
    from: Option<String>,
    version: http::Version,
    body: Bytes,
}

#[derive(Default)]
struct HubState {
    /// The directory document served, with its `Cache-Control`; None: 404.
    directory: Option<String>,
    /// Paths under these prefixes are answered as the endpoint; others 404.
    live: Vec<String>,
    /// When set, every endpoint request is answered this status with `Retry-After`.
    busy: Option<(u16, String)>,
    /// Each endpoint answer waits this long (to have requests overlap).
    delay: Duration,
    /// When set, an endpoint answer waits this long for its body instead.
    delay_of: Option<fn(&[u8]) -> Duration>,
    seen: Vec<Seen>,
    /// Paths and bodies in the order their requests were answered (taken in, for a hub).
    answered: Vec<(String, Bytes)>,
    /// Requests open now per path, and the most ever open at once for one path.
    open_per_path: BTreeMap<String, usize>,
    max_open_per_path: usize,
    directory_gets: usize,
    /// TLS sessions that negotiated an ALPN protocol (none should: none is offered).
    alpn: usize,
}

#[derive(Clone)]
struct Hub {
    addr: SocketAddr,
    state: Arc<Mutex<HubState>>,
    conns: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
}

impl Hub {
    fn with<T>(&self, f: impl FnOnce(&mut HubState) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    fn seen(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }
}

/// Starts the hub at `addr` (port 0: any); dropping the returned set stops it and closes
/// every connection. `h2`: the hub also speaks HTTP/2, offered by ALPN; else HTTP/1.1 alone
/// and no ALPN.
async fn start_hub(
    hub: &Provider,
    client: &Provider,
    addr: SocketAddr,
    state: Arc<Mutex<HubState>>,
    h2: bool,
) -> Result<(Hub, JoinSet<()>)> {
    let alpn = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![]
    };
    let tls = relay_tls::server_config(&hub.identity, &Provider::trusting(&[client])?, alpn)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind(addr).await?;
    let h = Hub {
        addr: listener.local_addr()?,
        state,
        conns: Default::default(),
        open: Default::default(),
        max_open: Default::default(),
    };
    let mut tasks = JoinSet::new();
    let hub2 = h.clone();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let hub = hub2.clone();
            conns.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol().is_some() {
                    hub.with(|s| s.alpn += 1);
                }
                hub.conns.fetch_add(1, Ordering::SeqCst);
                let now = hub.open.fetch_add(1, Ordering::SeqCst) + 1;
                hub.max_open.fetch_max(now, Ordering::SeqCst);
                let svc = {
                    let hub = hub.clone();
                    service_fn(move |req| {
                        let hub = hub.clone();
                        async move { Ok::<_, Infallible>(answer(&hub, req).await) }
                    })
                };
                let io = TokioIo::new(tls);
                let _ = if h2 {
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                        .map_err(Into::into)
                };
                hub.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok((h, tasks))
}

async fn answer(hub: &Hub, req: http::Request<Incoming>) -> http::Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (method, path, version) = (
        req.method().to_string(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        req.version(),
    );
    // HTTP/1.1 `Host`, or HTTP/2 `:authority`.
    let host = header("host").or_else(|| req.uri().authority().map(|a| a.to_string()));
    let from = header("from");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let reply = |code: u16, headers: &[(&str, String)], body: Bytes| {
        let mut b = http::Response::builder().status(code);
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        b.body(Full::new(body))
            .unwrap_or_else(|_| http::Response::new(Full::new(Bytes::new())))
    };
    if path == "/.well-known/mimi-protocol-directory" {
        return match hub.with(|s| {
            s.directory_gets += 1;
            s.directory.clone()
        }) {
            Some(doc) => reply(
                200,
                &[("content-type", "application/json".to_owned())],
                Bytes::from(doc),
            ),
            None => reply(404, &[], Bytes::from_static(b"no such thing")),
        };
    }
    let (live, busy, delay) = hub.with(|s| {
        s.seen.push(Seen {
            method,
            path: path.clone(),
            host,
            from,
            version,
            body: body.clone(),
        });
        let open = s.open_per_path.entry(path.clone()).or_default();
        *open += 1;
        s.max_open_per_path = s.max_open_per_path.max(*open);
        (
            s.live.iter().any(|p| path.starts_with(p.as_str())),
            s.busy.clone(),
            s.delay_of.map_or(s.delay, |f| f(&body)),
        )
    });
    tokio::time::sleep(delay).await;
    hub.with(|s| {
        s.answered.push((path.clone(), body.clone()));
        if let Some(open) = s.open_per_path.get_mut(&path) {
            *open -= 1;
        }
    });
    if let Some((code, after)) = busy {
        return reply(code, &[("retry-after", after)], Bytes::from_static(b"busy"));
    }
    if !live {
        return reply(404, &[], Bytes::from_static(b"not found"));
    }
    if path.contains("/notify/") {
        reply(201, &[], Bytes::new())
    } else {
        let mut echoed = b"ack:".to_vec();
        echoed.extend_from_slice(&body);
        reply(200, &[], Bytes::from(echoed))
    }
}

// ---------------------------------------------------------------------------------------------
// Our side: the HTTPS adapter with a node that only collects outcomes

type Outcome = (TransmitId, Result<Response, TransportError>);

#[derive(Clone)]
struct Node {
    outcomes: mpsc::UnboundedSender<Outcome>,
    probes: mpsc::UnboundedSender<bool>,
}

impl Inbound for Node {
    async fn request(&self, _: Request) -> Response {
        Response::error(Status::NotFound, "not a hub")
    }

    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        let _ = self.outcomes.send((id, outcome));
    }

    fn probe_outcome(&self, _: ProviderDomain, alive: bool) {
        let _ = self.probes.send(alive);
    }
}

struct Setup {
    hub_p: Provider,
    us_p: Provider,
    hub: Hub,
    hub_tasks: JoinSet<()>,
    us: HttpsTransport,
    adapter: AdapterContext,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    probes: mpsc::UnboundedReceiver<bool>,
    next_id: u64,
}

async fn setup(directory: Option<&str>, live: &[&str]) -> Result<Setup> {
    setup_with(directory, live, false).await
}

async fn setup_with(directory: Option<&str>, live: &[&str], h2: bool) -> Result<Setup> {
    let hub_p = Provider::new("hub.example")?;
    let us_p = Provider::new("a.example")?;
    let state = Arc::new(Mutex::new(HubState {
        directory: directory.map(str::to_owned),
        live: live.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }));
    let (hub, hub_tasks) = start_hub(
        &hub_p,
        &us_p,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        state,
        h2,
    )
    .await?;
    let adapter = AdapterContext::default();
    let (otx, outcomes) = mpsc::unbounded_channel();
    let (ptx, probes) = mpsc::unbounded_channel();
    let config = HttpsConfig {
        identity: us_p.identity.clone(),
        trust: Provider::trusting(&[&hub_p])?,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        peers: BTreeMap::from([(hub_p.domain.clone(), hub.addr.into())]),
        max_body: 1 << 20,
        request_timeout: Duration::from_secs(5),
        adapter: adapter.clone(),
    };
    let node = Node {
        outcomes: otx,
        probes: ptx,
    };
    let (us, _) = HttpsTransport::start(config, node).await?;
    Ok(Setup {
        hub_p,
        us_p,
        hub,
        hub_tasks,
        us,
        adapter,
        outcomes,
        probes,
        next_id: 0,
    })
}

impl Setup {
    fn send(&mut self, endpoint: Endpoint, body: &'static [u8]) -> TransmitId {
        self.send_to(endpoint, ROOM, Bytes::from_static(body))
    }

    fn send_to(&mut self, endpoint: Endpoint, target: &str, body: Bytes) -> TransmitId {
        self.next_id += 1;
        let id = TransmitId(self.next_id);
        self.us.send(Transmit {
            id,
            dest: self.hub_p.domain.clone(),
            transport: TransportKind::Https,
            endpoint,
            target: target.to_owned(),
            seq: None,
            lineage: None,
            body: vec![body],
        });
        id
    }

    async fn outcome(&mut self) -> Result<Outcome> {
        timeout(WAIT, self.outcomes.recv())
            .await?
            .context("outcome channel closed")
    }

    /// Sends one request and returns its outcome.
    async fn exchange(
        &mut self,
        endpoint: Endpoint,
        body: &'static [u8],
    ) -> Result<Result<Response, TransportError>> {
        let id = self.send(endpoint, body);
        let (got, outcome) = self.outcome().await?;
        ensure!(got == id, "outcome for {got:?}, not {id:?}");
        Ok(outcome)
    }
}

/// A hub's own layout: absolute URLs without a port, relative ones, its own variable names.
const HUB_DIRECTORY: &str = r#"{
  "submitMessage": "https://hub.example/mimi/pl/submitMessage/{recipient}",
  "notify": "/mimi/pl/notify/{roomId}",
  "update": "../mimi/pl/update/{room}",
  "groupInfo": "https://elsewhere.example/mimi/pl/groupInfo/{roomId}",
  "keyMaterial": "https://hub.example/mimi/pl/keyMaterial/{user}"
}"#;

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn endpoints_come_from_the_hubs_directory_over_http1_without_alpn() -> Result<()> {
    endpoints_from_the_directory(false).await
}

#[tokio::test]
async fn endpoints_come_from_the_hubs_directory_over_h2() -> Result<()> {
    endpoints_from_the_directory(true).await
}

async fn endpoints_from_the_directory(h2: bool) -> Result<()> {
    let mut s = setup_with(Some(HUB_DIRECTORY), &["/mimi/pl/"], h2).await?;

    let resp = s.exchange(Endpoint::SubmitMessage, b"hello").await??;
    assert_eq!(resp.status, Status::Ok);
    assert_eq!(&resp.body[..], b"ack:hello");
    let resp = s.exchange(Endpoint::Notify, b"fanout").await??;
    assert_eq!(resp.status, Status::Created);
    let resp = s.exchange(Endpoint::Update, b"commit").await??;
    assert_eq!(resp.status, Status::Ok);

    let seen = s.hub.seen();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            format!("/mimi/pl/submitMessage/{ROOM_ENC}"),
            format!("/mimi/pl/notify/{ROOM_ENC}"),
            format!("/mimi/pl/update/{ROOM_ENC}"),
        ]
    );
    for r in &seen {
        assert_eq!(r.method, "POST");
        let version = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(r.version, version);
        // The URL named the hub without a port: that is the Host, whatever address we dial.
        assert_eq!(r.host.as_deref(), Some("hub.example"));
        assert_eq!(r.from.as_deref(), Some("mimi@a.example"));
    }
    assert_eq!(&seen[1].body[..], b"fanout");
    assert_eq!(
        s.hub.with(|h| h.alpn),
        if h2 { 1 } else { 0 },
        "ALPN only where the hub offers it"
    );
    assert_eq!(
        s.hub.with(|h| h.directory_gets),
        1,
        "the directory is read once and kept"
    );
    Ok(())
}

#[tokio::test]
async fn an_endpoint_missing_or_on_another_host_is_unsupported_not_sent() -> Result<()> {
    let mut s = setup(Some(HUB_DIRECTORY), &["/mimi/pl/"]).await?;
    for endpoint in [Endpoint::ReportAbuse, Endpoint::GroupInfo] {
        let outcome = s.exchange(endpoint, b"x").await?;
        match outcome {
            Err(TransportError::Unsupported { endpoint: e, .. }) => assert_eq!(e, endpoint),
            other => panic!("{endpoint}: {other:?}"),
        }
    }
    assert!(s.hub.seen().is_empty(), "nothing was sent for them");
    assert_eq!(s.adapter.stats.unsupported_endpoints(), 2);
    // The endpoints it lists still work.
    assert_eq!(
        s.exchange(Endpoint::Notify, b"f").await??.status,
        Status::Created
    );
    Ok(())
}

#[tokio::test]
async fn a_hub_without_a_directory_gets_the_drafts_paths() -> Result<()> {
    for doc in [None, Some("<html>welcome</html>")] {
        let mut s = setup(doc, &["/v1/"]).await?;
        assert_eq!(
            s.exchange(Endpoint::Notify, b"f").await??.status,
            Status::Created
        );
        assert_eq!(
            s.exchange(Endpoint::SubmitMessage, b"m").await??.status,
            Status::Ok
        );
        let paths: Vec<String> = s.hub.seen().into_iter().map(|r| r.path).collect();
        assert_eq!(
            paths,
            [
                format!("/v1/notify/{ROOM_ENC}"),
                format!("/v1/submitMessage/{ROOM_ENC}")
            ],
            "{doc:?}"
        );
        // A hub without a directory still answers: it is alive.
        s.us.probe(&s.hub_p.domain);
        assert_eq!(timeout(WAIT, s.probes.recv()).await?, Some(true));
    }
    Ok(())
}

#[tokio::test]
async fn a_404_has_the_directory_read_again() -> Result<()> {
    let old = r#"{"notify": "/old/notify/{roomId}"}"#;
    let new = r#"{"notify": "https://hub.example/new/notify/{roomId}"}"#;
    let mut s = setup(Some(old), &["/old/"]).await?;
    assert_eq!(
        s.exchange(Endpoint::Notify, b"1").await??.status,
        Status::Created
    );
    // The hub moves its endpoint.
    s.hub.with(|h| {
        h.directory = Some(new.to_owned());
        h.live = vec!["/new/".to_owned()];
    });
    assert_eq!(
        s.exchange(Endpoint::Notify, b"2").await??.status,
        Status::NotFound,
        "the cached directory still says /old"
    );
    assert_eq!(
        s.exchange(Endpoint::Notify, b"3").await??.status,
        Status::Created
    );
    let paths: Vec<String> = s.hub.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            format!("/old/notify/{ROOM_ENC}"),
            format!("/old/notify/{ROOM_ENC}"),
            format!("/new/notify/{ROOM_ENC}"),
        ]
    );
    assert_eq!(s.hub.with(|h| h.directory_gets), 2);
    Ok(())
}

#[tokio::test]
async fn a_reconnect_has_the_directory_read_again() -> Result<()> {
    for h2 in [false, true] {
        reconnect_reads_the_directory_again(h2)
            .await
            .with_context(|| format!("h2: {h2}"))?;
    }
    Ok(())
}

async fn reconnect_reads_the_directory_again(h2: bool) -> Result<()> {
    let old = r#"{"notify": "/old/notify/{roomId}"}"#;
    let new = r#"{"notify": "/new/notify/{roomId}"}"#;
    let mut s = setup_with(Some(old), &["/old/"], h2).await?;
    assert_eq!(
        s.exchange(Endpoint::Notify, b"1").await??.status,
        Status::Created
    );
    // The hub restarts on the same address with its endpoints elsewhere.
    let before = s.hub.seen().len();
    let addr = s.hub.addr;
    s.hub_tasks.shutdown().await;
    s.hub.with(|h| {
        h.directory = Some(new.to_owned());
        h.live = vec!["/new/".to_owned()];
    });
    let (hub, tasks) = start_hub(&s.hub_p, &s.us_p, addr, s.hub.state.clone(), h2).await?;
    s.hub_tasks = tasks;
    // Our side notices the closed connection before or with this request.
    let mut last = None;
    for _ in 0..3 {
        match s.exchange(Endpoint::Notify, b"2").await? {
            Ok(r) => {
                last = Some(r.status);
                break;
            }
            Err(TransportError::ConnectionLost) => {}
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(last, Some(Status::Created));
    // Nothing went to the old path after the restart: no 404 was needed to learn the new one.
    let after: Vec<String> = hub.seen()[before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(
        after
            .iter()
            .all(|p| *p == format!("/new/notify/{ROOM_ENC}")),
        "{after:?}"
    );
    assert_eq!(hub.with(|h| h.directory_gets), 2);
    Ok(())
}

#[tokio::test]
async fn retry_after_of_a_busy_hub_reaches_the_core() -> Result<()> {
    let mut s = setup(Some(HUB_DIRECTORY), &["/mimi/pl/"]).await?;
    let cases = [
        (503, "7".to_owned(), Duration::from_secs(7)),
        (429, "30".to_owned(), Duration::from_secs(30)),
    ];
    for (code, header, want) in cases {
        s.hub.with(|h| h.busy = Some((code, header.clone())));
        let resp = s.exchange(Endpoint::SubmitMessage, b"m").await??;
        assert_eq!(resp.status, Status::Unavailable, "{code}");
        assert_eq!(resp.retry_after, Some(want), "{code}");
    }
    // An HTTP-date, some time ahead (whole seconds, so up to one less).
    let at = std::time::SystemTime::now() + Duration::from_secs(120);
    s.hub
        .with(|h| h.busy = Some((429, httpdate::fmt_http_date(at))));
    let resp = s.exchange(Endpoint::Notify, b"f").await??;
    let after = resp.retry_after.context("a retry-after")?;
    assert!(
        after > Duration::from_secs(100) && after <= Duration::from_secs(120),
        "{after:?}"
    );
    Ok(())
}

#[tokio::test]
async fn http1_requests_share_a_bounded_pool_of_keep_alive_connections() -> Result<()> {
    let mut s = setup(Some(HUB_DIRECTORY), &["/mimi/pl/"]).await?;
    s.hub.with(|h| h.delay = Duration::from_millis(50));
    // Many rooms: a room keeps to one connection, different rooms spread over the pool.
    let n = 24;
    for i in 0..n {
        let room = format!("mimi://hub.example/r/room{i}");
        s.send_to(Endpoint::SubmitMessage, &room, Bytes::from_static(b"m"));
    }
    for _ in 0..n {
        let (_, outcome) = s.outcome().await?;
        assert_eq!(outcome?.status, Status::Ok);
    }
    let conns = s.hub.conns.load(Ordering::SeqCst);
    assert!(
        conns <= relay_https::MAX_H1_CONNS,
        "{conns} connections for {n} requests"
    );
    let max_open = s.hub.max_open.load(Ordering::SeqCst);
    assert!(
        (2..=relay_https::MAX_H1_CONNS).contains(&max_open),
        "{max_open} connections open at once for {n} rooms"
    );
    assert_eq!(s.hub.seen().len(), n);
    Ok(())
}

/// The core hands a room's forwarded submissions over in the order its clients sent them, and
/// retries none of them: over HTTP/1.1 the transport must not spread one room's requests over
/// several connections, where a later one can overtake an earlier one at the hub.
#[tokio::test]
async fn http1_requests_for_one_room_reach_the_hub_in_order() -> Result<()> {
    let mut s = setup(Some(HUB_DIRECTORY), &["/mimi/pl/"]).await?;
    const N: u8 = 8;
    // Earlier requests take the hub longer: on parallel connections the later ones would be
    // taken in first.
    s.hub.with(|h| {
        h.delay_of = Some(|body| {
            let i = body.first().map_or(0, |b| b.saturating_sub(b'0'));
            Duration::from_millis(40 * u64::from(N - i.min(N)))
        })
    });
    let other = "mimi://hub.example/r/other";
    for i in 0..N {
        let body = Bytes::from(vec![b'0' + i]);
        s.send_to(Endpoint::SubmitMessage, ROOM, body.clone());
        // Another room's traffic in between still gets through.
        s.send_to(Endpoint::SubmitMessage, other, body);
    }
    for _ in 0..2 * N {
        let (_, outcome) = s.outcome().await?;
        assert_eq!(outcome?.status, Status::Ok);
    }
    let room_path = format!("/mimi/pl/submitMessage/{ROOM_ENC}");
    let in_room = |(path, body): (String, Bytes)| (path == room_path).then(|| body[0]);
    let arrived: Vec<u8> = s
        .hub
        .seen()
        .into_iter()
        .filter_map(|r| in_room((r.path, r.body)))
        .collect();
    let taken: Vec<u8> = s
        .hub
        .with(|h| h.answered.clone())
        .into_iter()
        .filter_map(in_room)
        .collect();
    let expected: Vec<u8> = (0..N).map(|i| b'0' + i).collect();
    assert_eq!(arrived, expected, "order of arrival");
    assert_eq!(taken, expected, "order taken in");
    // Never two of the room's requests at the hub at once.
    assert_eq!(s.hub.with(|h| h.max_open_per_path), 1);
    Ok(())
}

/// A room the hub is slow to answer holds only its own connection of the pool: the next
/// request for that room waits for it, the other rooms' requests go on over the rest.
#[tokio::test]
async fn a_slow_room_does_not_hold_up_other_rooms_over_http1() -> Result<()> {
    let mut s = setup(Some(HUB_DIRECTORY), &["/mimi/pl/"]).await?;
    s.hub.with(|h| {
        h.delay_of = Some(|body| {
            if body.starts_with(b"slow") {
                Duration::from_secs(2)
            } else {
                Duration::ZERO
            }
        })
    });
    let slow = [
        s.send_to(Endpoint::SubmitMessage, ROOM, Bytes::from_static(b"slow1")),
        s.send_to(Endpoint::SubmitMessage, ROOM, Bytes::from_static(b"slow2")),
    ];
    let mut others = Vec::new();
    for i in 0..8 {
        let room = format!("mimi://hub.example/r/other{i}");
        others.push(s.send_to(Endpoint::SubmitMessage, &room, Bytes::from_static(b"fast")));
    }
    let mut order = Vec::new();
    for _ in 0..slow.len() + others.len() {
        let (id, outcome) = s.outcome().await?;
        assert_eq!(outcome?.status, Status::Ok);
        order.push(id);
    }
    assert!(
        others.contains(&order[0]),
        "another room was answered first, not the slow one: {order:?}"
    );
    let slow_order: Vec<TransmitId> = order.into_iter().filter(|id| slow.contains(id)).collect();
    assert_eq!(slow_order, slow, "the slow room's own requests in order");
    Ok(())
}

/// `check-peers` reads the directory and then probes the sequence extension over the same
/// HTTP/1.1 connection: the probe must wait until the connection takes a second request, not
/// be cancelled when sent too early (it was, about every other time, against such a hub).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_probes_the_sequence_extension_over_one_http1_connection() -> Result<()> {
    let s = setup(Some(HUB_DIRECTORY), &["/mimi/pl/"]).await?;
    let room: mimi_wire::uri::RoomId = ROOM.parse()?;
    let trust = Provider::trusting(&[&s.hub_p])?;
    for _ in 0..20 {
        let report = relay_https::check::check(
            &s.us_p.identity,
            &trust,
            &s.hub_p.domain,
            &s.hub.addr.into(),
            Some(&room),
            WAIT,
        )
        .await?;
        assert_eq!(report.http, "1.1");
        // The hub answers the empty /notify 201 without MIMI-Next-Seq: the draft's rules.
        match report.seq {
            Some(relay_https::check::SeqSupport::DraftOnly { status: 201 }) => {}
            other => panic!("{other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn our_server_speaks_http1_to_a_client_without_alpn() -> Result<()> {
    let server = Provider::new("b.example")?;
    let client = Provider::new("a.example")?;
    let (node, _) = mpsc::unbounded_channel();
    let (probes, _) = mpsc::unbounded_channel();
    let config = HttpsConfig {
        identity: server.identity.clone(),
        trust: Provider::trusting(&[&client])?,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        peers: BTreeMap::new(),
        max_body: 1 << 20,
        request_timeout: Duration::from_secs(5),
        adapter: AdapterContext::default(),
    };
    let (_t, addr) = HttpsTransport::start(
        config,
        Node {
            outcomes: node,
            probes,
        },
    )
    .await?;
    let tls_config =
        relay_tls::client_config(&client.identity, &Provider::trusting(&[&server])?, vec![])?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("b.example")?;
    let tls = tokio_rustls::TlsConnector::from(tls_config)
        .connect(name, tcp)
        .await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let (mut h1, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    for _ in 0..2 {
        h1.ready().await?;
        let req = http::Request::get("/.well-known/mimi-protocol-directory")
            .header("host", "b.example")
            .header("from", "mimi@a.example")
            .body(Full::new(Bytes::new()))?;
        let resp = h1.send_request(req).await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_11);
        let body = resp.into_body().collect().await?.to_bytes();
        ensure!(body.starts_with(b"{"), "a JSON directory");
    }
    Ok(())
}
