//! The XMPP adapter over loopback with generated certificates: resumption across a cut
//! connection, and a misbehaving peer's stanzas.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::{Inbound, Transport};
use relay_core::transport::{
    Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind,
};
use relay_tls::{PeerTrust, TlsIdentity};
use relay_xmpp::{ALPN, XmppConfig, XmppTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::sync::{Semaphore, mpsc};

use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

type Outcome = (TransmitId, Result<Response, TransportError>);

/// The node side of the adapter: records everything, answers `201` echoing the body with
/// `next_seq = seq + 1`, optionally only once the gate lets it.
#[derive(Clone)]
struct Fake {
    requests: mpsc::UnboundedSender<Request>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    probes: mpsc::UnboundedSender<(ProviderDomain, bool)>,
    gate: Option<Arc<Semaphore>>,
}

struct FakeRx {
    requests: mpsc::UnboundedReceiver<Request>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    probes: mpsc::UnboundedReceiver<(ProviderDomain, bool)>,
}

fn fake(gate: Option<Arc<Semaphore>>) -> (Fake, FakeRx) {
    let (requests, rq) = mpsc::unbounded_channel();
    let (outcomes, oc) = mpsc::unbounded_channel();
    let (probes, pr) = mpsc::unbounded_channel();
    (
        Fake {
            requests,
            outcomes,
            probes,
            gate,
        },
        FakeRx {
            requests: rq,
            outcomes: oc,
            probes: pr,
        },
    )
}

impl Inbound for Fake {
    fn request(&self, request: Request) -> impl Future<Output = Response> + Send {
        let this = self.clone();
        async move {
            let _ = this.requests.send(request.clone());
            if let Some(gate) = &this.gate {
                let _ = gate.acquire().await.map(|p| p.forget());
            }
            Response {
                status: Status::Created,
                body: request.body,
                next_seq: request.seq.map(|s| s + 1),
                next_inc: None,
                retry_after: None,
            }
        }
    }

    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        let _ = self.outcomes.send((id, outcome));
    }

    fn probe_outcome(&self, peer: ProviderDomain, alive: bool) {
        let _ = self.probes.send((peer, alive));
    }
}

impl FakeRx {
    async fn outcome(&mut self) -> Outcome {
        timeout(WAIT, self.outcomes.recv())
            .await
            .expect("an outcome in time")
            .expect("open")
    }

    async fn request(&mut self) -> Request {
        timeout(WAIT, self.requests.recv())
            .await
            .expect("a request in time")
            .expect("open")
    }

    async fn probe(&mut self) -> (ProviderDomain, bool) {
        timeout(WAIT, self.probes.recv())
            .await
            .expect("a probe outcome in time")
            .expect("open")
    }

    /// Nothing more arrives for a while: every transmit got exactly one outcome.
    async fn no_more_outcomes(&mut self) {
        let extra = timeout(Duration::from_millis(300), self.outcomes.recv()).await;
        assert!(extra.is_err(), "unexpected extra outcome: {extra:?}");
    }
}

fn domain(s: &str) -> ProviderDomain {
    s.parse().expect("valid test domain")
}

fn identity(name: &str) -> TlsIdentity {
    let d = domain(name);
    let g = relay_tls::generate(&d).expect("generate");
    TlsIdentity::from_pem(d, &g.cert_pem, &g.key_pem).expect("identity")
}

fn trusting(ids: &[&TlsIdentity]) -> PeerTrust {
    let mut trust = PeerTrust::new();
    for id in ids {
        trust.add(id.domain.clone(), id.cert().expect("cert").clone());
    }
    trust
}

fn config(me: &TlsIdentity, trust: PeerTrust, peers: &[(&TlsIdentity, SocketAddr)]) -> XmppConfig {
    XmppConfig {
        identity: me.clone(),
        trust,
        listen: "127.0.0.1:0".parse().expect("addr"),
        peers: peers
            .iter()
            .map(|(id, addr)| (id.domain.clone(), (*addr).into()))
            .collect(),
        component: None,
        max_body: 64 * 1024,
        request_timeout: Duration::from_secs(10),
        adapter: Default::default(),
    }
}

fn transmit(id: u64, dest: &ProviderDomain, target: &str, seq: u64, body: Vec<Bytes>) -> Transmit {
    Transmit {
        id: TransmitId(id),
        dest: dest.clone(),
        transport: TransportKind::Xmpp,
        endpoint: Endpoint::Notify,
        target: target.to_owned(),
        seq: Some(seq),
        lineage: None,
        body,
    }
}

/// A TCP proxy whose connections can all be cut at once (as a dropped link would).
struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

async fn proxy(backend: SocketAddr) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, cut_rx) = watch::channel(0u64);
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut cut = cut_rx.clone();
            cut.borrow_and_update();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(backend).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.changed() => {}
                }
                // Both sockets drop here: each side sees its connection end mid-stream.
            });
        }
    });
    Proxy {
        addr,
        cut,
        connections,
    }
}

#[tokio::test]
async fn a_cut_connection_resumes_with_nothing_lost_or_duplicated() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let a_id = identity("a.example");
    let b_id = identity("b.example");
    // b answers slowly enough that requests and answers are in flight when the link is cut.
    let gate = Arc::new(Semaphore::new(0));
    let (b_fake, mut b_rx) = fake(Some(gate.clone()));
    let (b, b_addr) = XmppTransport::start(config(&b_id, trusting(&[&a_id]), &[]), b_fake)
        .await
        .unwrap();
    let px = proxy(b_addr).await;
    let (a_fake, mut a_rx) = fake(None);
    let (a, _) = XmppTransport::start(
        config(&a_id, trusting(&[&b_id]), &[(&b_id, px.addr)]),
        a_fake,
    )
    .await
    .unwrap();
    let n = 400u64;
    for i in 0..n {
        let body = vec![Bytes::from(format!("event {i}").into_bytes())];
        a.send(transmit(i, &b_id.domain, "mimi://a.example/r/x", i, body));
    }
    let mut seen = Vec::new();
    // Let a third through, then cut while the rest is queued, sent or being answered.
    gate.add_permits(130);
    while seen.len() < 150 {
        seen.push(b_rx.request().await.seq.unwrap());
    }
    px.cut.send(1).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(10_000);
    while seen.len() < n as usize {
        seen.push(b_rx.request().await.seq.unwrap());
    }
    assert_eq!(
        seen,
        (0..n).collect::<Vec<_>>(),
        "each request once, in order"
    );
    let mut outcomes = Vec::new();
    for _ in 0..n {
        let (id, outcome) = a_rx.outcome().await;
        let r = outcome.unwrap_or_else(|e| panic!("transmit {id:?} failed: {e}"));
        assert_eq!(r.status, Status::Created);
        assert_eq!(r.body, Bytes::from(format!("event {}", id.0).into_bytes()));
        outcomes.push(id.0);
    }
    outcomes.sort_unstable();
    assert_eq!(outcomes, (0..n).collect::<Vec<_>>());
    a_rx.no_more_outcomes().await;
    let extra = timeout(Duration::from_millis(300), b_rx.requests.recv()).await;
    assert!(extra.is_err(), "a request was delivered twice: {extra:?}");
    assert!(
        px.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the cut forced a second connection"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn probes_and_unknown_peers() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a_id = identity("a.example");
    let b_id = identity("b.example");
    let (b_fake, _b_rx) = fake(None);
    let (b, b_addr) = XmppTransport::start(config(&b_id, trusting(&[&a_id]), &[]), b_fake)
        .await
        .unwrap();
    let (a_fake, mut a_rx) = fake(None);
    let (a, _) = XmppTransport::start(
        config(&a_id, trusting(&[&b_id]), &[(&b_id, b_addr)]),
        a_fake,
    )
    .await
    .unwrap();
    a.probe(&b_id.domain);
    assert_eq!(a_rx.probe().await, (b_id.domain.clone(), true));
    let stranger = domain("z.example");
    a.send(transmit(1, &stranger, "r", 0, vec![]));
    let (_, outcome) = a_rx.outcome().await;
    assert_eq!(outcome, Err(TransportError::NoRoute(stranger)));
    b.shutdown().await;
    a.probe(&b_id.domain);
    assert_eq!(a_rx.probe().await, (b_id.domain.clone(), false));
    a.shutdown().await;
}

/// A hand-written peer: a's certificate, raw XML on the stream to b.
struct Raw {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    seen: String,
}

impl Raw {
    async fn connect(me: &TlsIdentity, b: &TlsIdentity, addr: SocketAddr) -> Raw {
        let cfg = relay_tls::client_config(me, &trusting(&[b]), vec![ALPN.to_vec()]).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(b.domain.as_str().to_owned()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        Raw {
            tls,
            seen: String::new(),
        }
    }

    async fn open(me: &TlsIdentity, b: &TlsIdentity, addr: SocketAddr, from: &str) -> Raw {
        let mut raw = Raw::connect(me, b, addr).await;
        raw.send(&format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
             xmlns:stream='http://etherx.jabber.org/streams' from='{from}' to='{}' version='1.0'>",
            b.domain
        ))
        .await;
        raw
    }

    async fn send(&mut self, s: &str) {
        self.tls.write_all(s.as_bytes()).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    /// Reads until `needle` has been received (consuming up to it); `false` if the stream
    /// ended first.
    async fn until(&mut self, needle: &str) -> bool {
        loop {
            if let Some(i) = self.seen.find(needle) {
                self.seen.drain(..i + needle.len());
                return true;
            }
            if !self.read_more().await {
                return false;
            }
        }
    }

    /// Reads until a start tag `<name ..>` carrying every one of `attrs` (in any order) has
    /// been received (consuming up to it); `false` if the stream ended first.
    async fn until_tag(&mut self, name: &str, attrs: &[&str]) -> bool {
        self.tag(name, attrs).await.is_some()
    }

    /// The next start tag `<name ..>` carrying every one of `attrs`, as [`Raw::until_tag`].
    async fn tag(&mut self, name: &str, attrs: &[&str]) -> Option<String> {
        let open = format!("<{name} ");
        loop {
            while let Some(i) = self.seen.find(&open) {
                let Some(len) = self.seen[i..].find('>') else {
                    break;
                };
                let tag: String = self.seen.drain(..i + len + 1).skip(i).collect();
                if attrs.iter().all(|a| tag.contains(a)) {
                    return Some(tag);
                }
            }
            if !self.read_more().await {
                return None;
            }
        }
    }

    async fn read_more(&mut self) -> bool {
        let mut buf = vec![0u8; 65536];
        match timeout(WAIT, self.tls.read(&mut buf))
            .await
            .expect("in time")
        {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                true
            }
        }
    }

    /// The stream ends (after the stream error, if any).
    async fn ends(&mut self) -> bool {
        self.until("\u{0}never").await
    }
}

async fn server() -> (TlsIdentity, TlsIdentity, XmppTransport, SocketAddr, FakeRx) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a_id = identity("a.example");
    let b_id = identity("b.example");
    let (b_fake, b_rx) = fake(None);
    let mut cfg = config(&b_id, trusting(&[&a_id]), &[]);
    cfg.max_body = 4096;
    let (b, b_addr) = XmppTransport::start(cfg, b_fake).await.unwrap();
    (a_id, b_id, b, b_addr, b_rx)
}

const PING: &str =
    "<iq type='get' id='ping1' from='a.example' to='b.example'><ping xmlns='urn:xmpp:ping'/></iq>";

#[tokio::test]
async fn unknown_namespace_and_oversize_stanza_get_iq_errors_and_the_stream_survives() {
    let (a_id, b_id, b, addr, mut b_rx) = server().await;
    let mut raw = Raw::open(&a_id, &b_id, addr, "a.example").await;
    assert!(raw.until("<sm xmlns='urn:xmpp:sm:3'/>").await);
    raw.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await;
    assert!(raw.until("<enabled").await);
    // An IQ whose payload is in a namespace we do not serve.
    raw.send("<iq type='set' id='q1' from='a.example' to='b.example'><query xmlns='urn:example:other'/></iq>").await;
    assert!(raw.until("id='q1'").await);
    assert!(raw.until("<service-unavailable").await);
    // A request over the limit (4096-byte bodies): answered 413 unparsed.
    let big = "QUFB".repeat(40_000);
    raw.send(&format!(
        "<iq type='set' id='big1' from='a.example' to='b.example'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='r' seq='0'>{big}</mimi></iq>"
    ))
    .await;
    assert!(raw.until("id='big1'").await);
    assert!(raw.until("<policy-violation").await);
    assert!(raw.until("status='413'").await);
    // A body that decodes over the limit but fits the stanza bound: also 413.
    let over = "QUFB".repeat(1500);
    raw.send(&format!(
        "<iq type='set' id='big2' from='a.example' to='b.example'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='r' seq='0'>{over}</mimi></iq>"
    ))
    .await;
    assert!(raw.until("id='big2'").await);
    assert!(raw.until("status='413'").await);
    // An unknown endpoint gets 404; bad base64 400.
    raw.send("<iq type='set' id='e1' from='a.example' to='b.example'><mimi xmlns='urn:mimi-relay:0' endpoint='teleport' target='r'>AA==</mimi></iq>").await;
    assert!(raw.until("id='e1'").await);
    assert!(raw.until("status='404'").await);
    raw.send("<iq type='set' id='e2' from='a.example' to='b.example'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='r'>*not base64*</mimi></iq>").await;
    assert!(raw.until("id='e2'").await);
    assert!(raw.until("status='400'").await);
    // The stream is still up: a ping and a real request are answered.
    raw.send(PING).await;
    assert!(raw.until_tag("iq", &["type='result'", "id='ping1'"]).await);
    raw.send("<iq type='set' id='ok1' from='a.example' to='b.example'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='mimi://a.example/r/x' seq='5'>aGVsbG8=</mimi></iq>").await;
    assert!(raw.until("id='ok1'").await);
    assert!(
        raw.until_tag("mimi", &["status='201'", "next-seq='6'"])
            .await
    );
    let req = b_rx.request().await;
    assert_eq!(req.from, a_id.domain);
    assert_eq!(&req.body[..], b"hello");
    // None of the refused ones reached the node.
    assert!(
        timeout(Duration::from_millis(200), b_rx.requests.recv())
            .await
            .is_err()
    );
    // Stream management counted every stanza, refused ones included: 7 handled.
    raw.send("<r xmlns='urn:xmpp:sm:3'/>").await;
    assert!(raw.until("<a xmlns='urn:xmpp:sm:3' h='7'/>").await);
    b.shutdown().await;
}

#[tokio::test]
async fn forged_from_ends_the_stream_with_invalid_from() {
    let (a_id, b_id, b, addr, mut b_rx) = server().await;
    // In a stanza.
    let mut raw = Raw::open(&a_id, &b_id, addr, "a.example").await;
    raw.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
    assert!(raw.until("<enabled").await);
    raw.send("<iq type='set' id='f1' from='c.example' to='b.example'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='r'>AA==</mimi></iq>").await;
    assert!(
        raw.until("<invalid-from xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>")
            .await
    );
    assert!(!raw.ends().await);
    // In the stream header: the certificate says a.example.
    let mut raw = Raw::open(&a_id, &b_id, addr, "c.example").await;
    assert!(raw.until("<invalid-from").await);
    assert!(!raw.ends().await);
    assert!(
        timeout(Duration::from_millis(200), b_rx.requests.recv())
            .await
            .is_err()
    );
    b.shutdown().await;
}

#[tokio::test]
async fn malformed_xml_ends_the_stream_with_not_well_formed() {
    let (a_id, b_id, b, addr, _b_rx) = server().await;
    for bad in [
        "<iq type='get' id='x' from='a.example'><ping xmlns='urn:xmpp:ping'></pong></iq>",
        "<iq type='get' id='x' from='a.example' <<>",
        "just text",
    ] {
        let mut raw = Raw::open(&a_id, &b_id, addr, "a.example").await;
        raw.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
        assert!(raw.until("<enabled").await);
        raw.send(bad).await;
        assert!(raw.until("<not-well-formed").await, "{bad}");
        assert!(!raw.ends().await);
    }
    // A first-level element in a namespace we do not know.
    let mut raw = Raw::open(&a_id, &b_id, addr, "a.example").await;
    raw.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
    assert!(raw.until("<enabled").await);
    raw.send("<x xmlns='urn:example:other' from='a.example'/>")
        .await;
    assert!(raw.until("<unsupported-stanza-type").await);
    assert!(!raw.ends().await);
    // Comments are restricted XML (RFC 6120 section 11.1).
    let mut raw = Raw::open(&a_id, &b_id, addr, "a.example").await;
    raw.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
    assert!(raw.until("<enabled").await);
    raw.send("<!-- hello -->").await;
    assert!(raw.until("<restricted-xml").await);
    b.shutdown().await;
}

/// A minimal XEP-0114 server: checks each component's handshake and routes stanzas by the
/// domain of `to`; a stanza for no connected component is bounced `service-unavailable`.
async fn component_router(secret: &'static str) -> SocketAddr {
    use relay_xmpp::scanner::{Item, Scanner};
    type Routes =
        Arc<std::sync::Mutex<std::collections::HashMap<String, mpsc::UnboundedSender<Bytes>>>>;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes: Routes = Arc::default();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            n += 1;
            let routes = routes.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.into_split();
                let mut sc = Scanner::new(1 << 22);
                let mut buf = vec![0u8; 65536];
                let mut next = async |sc: &mut Scanner| loop {
                    if let Some(item) = sc.poll_item().unwrap() {
                        return Some(item);
                    }
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => return None,
                        Ok(k) => sc.push(&buf[..k]),
                    }
                };
                let Some(Item::Header(h)) = next(&mut sc).await else {
                    return;
                };
                let jid = relay_xmpp::binding::parse(&h)
                    .unwrap()
                    .attr("to")
                    .unwrap()
                    .to_owned();
                let id = format!("s{n}");
                wr.write_all(format!("<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' from='{jid}' id='{id}'>").as_bytes()).await.unwrap();
                let Some(Item::Element(hs)) = next(&mut sc).await else {
                    return;
                };
                let hs = relay_xmpp::binding::parse(&hs).unwrap();
                if hs.text() != relay_xmpp::handshake_digest(&id, secret) {
                    let _ = wr.write_all(b"<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>").await;
                    return;
                }
                wr.write_all(b"<handshake/>").await.unwrap();
                let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
                routes.lock().unwrap().insert(jid.clone(), tx.clone());
                tokio::spawn(async move {
                    while let Some(b) = rx.recv().await {
                        if wr.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                });
                while let Some(Item::Element(e)) = next(&mut sc).await {
                    let el = relay_xmpp::binding::parse(&e).unwrap();
                    let to = el.attr("to").unwrap_or_default().to_owned();
                    let route = routes.lock().unwrap().get(&to).cloned();
                    match route {
                        Some(r) => {
                            let _ = r.send(e);
                        }
                        None if el.attr("type") == Some("set") => {
                            let bounce = format!(
                                "<iq type='error' id='{}' from='{to}' to='{}'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
                                el.attr("id").unwrap_or_default(),
                                el.attr("from").unwrap_or_default()
                            );
                            let _ = tx.send(Bytes::from(bounce));
                        }
                        None => {}
                    }
                }
                routes.lock().unwrap().remove(&jid);
            });
        }
    });
    addr
}

fn component_config(
    me: &TlsIdentity,
    server: SocketAddr,
    secret: &str,
    peer: &ProviderDomain,
    peer_jid: &str,
) -> XmppConfig {
    let mut c = config(me, PeerTrust::new(), &[]);
    c.component = Some(relay_xmpp::ComponentConfig {
        server,
        jid: format!("relay.{}", me.domain),
        secret: secret.to_owned(),
        peers: [(peer.clone(), peer_jid.to_owned())].into(),
    });
    c
}

#[tokio::test]
async fn component_mode_carries_requests_both_ways_through_a_server() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = component_router("s3cret").await;
    let a_id = identity("a.example");
    let b_id = identity("b.example");
    let (a_fake, mut a_rx) = fake(None);
    let (b_fake, mut b_rx) = fake(None);
    let (a, _) = XmppTransport::start(
        component_config(&a_id, server, "s3cret", &b_id.domain, "relay.b.example"),
        a_fake,
    )
    .await
    .unwrap();
    // Until b's component is connected, the server bounces: the transmit fails, unanswered.
    a.send(transmit(0, &b_id.domain, "mimi://a.example/r/x", 0, vec![]));
    let (_, early) = a_rx.outcome().await;
    assert!(
        matches!(&early, Err(TransportError::Unreachable(c)) if c == "service-unavailable"),
        "{early:?}"
    );
    let (b, _) = XmppTransport::start(
        component_config(&b_id, server, "s3cret", &a_id.domain, "relay.a.example"),
        b_fake,
    )
    .await
    .unwrap();
    b.probe(&a_id.domain);
    assert_eq!(b_rx.probe().await, (a_id.domain.clone(), true));
    for i in 1..=200u64 {
        let body = vec![Bytes::from(format!("a{i}").into_bytes())];
        a.send(transmit(i, &b_id.domain, "mimi://a.example/r/x", i, body));
    }
    for i in 1..=200u64 {
        let r = b_rx.request().await;
        assert_eq!(r.from, a_id.domain);
        assert_eq!(r.seq, Some(i));
        assert_eq!(r.body, Bytes::from(format!("a{i}").into_bytes()));
    }
    for _ in 1..=200 {
        let (id, outcome) = a_rx.outcome().await;
        let r = outcome.unwrap();
        assert_eq!((r.status, r.next_seq), (Status::Created, Some(id.0 + 1)));
    }
    // And the other way on the same component streams.
    b.send(transmit(
        7,
        &a_id.domain,
        "mimi://a.example/r/x",
        3,
        vec![Bytes::from_static(b"hi")],
    ));
    assert_eq!(&a_rx.request().await.body[..], b"hi");
    let (id, outcome) = b_rx.outcome().await;
    assert_eq!(
        (id, outcome.unwrap().status),
        (TransmitId(7), Status::Created)
    );
    a_rx.no_more_outcomes().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn component_with_a_wrong_secret_is_refused_and_reports_unreachable() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = component_router("s3cret").await;
    let a_id = identity("a.example");
    let b = domain("b.example");
    let (a_fake, mut a_rx) = fake(None);
    let (a, _) = XmppTransport::start(
        component_config(&a_id, server, "wrong", &b, "relay.b.example"),
        a_fake,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.send(transmit(1, &b, "r", 0, vec![]));
    let (_, outcome) = a_rx.outcome().await;
    assert!(
        matches!(&outcome, Err(TransportError::Unreachable(why)) if why.contains("not-authorized")),
        "{outcome:?}"
    );
    a.shutdown().await;
}

#[tokio::test]
async fn a_session_is_resumable_only_by_the_provider_that_created_it() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a_id = identity("a.example");
    let b_id = identity("b.example");
    let c_id = identity("c.example");
    let (b_fake, _b_rx) = fake(None);
    let (b, addr) = XmppTransport::start(config(&b_id, trusting(&[&a_id, &c_id]), &[]), b_fake)
        .await
        .unwrap();
    let mut raw = Raw::open(&a_id, &b_id, addr, "a.example").await;
    raw.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await;
    let enabled = raw
        .tag("enabled", &["xmlns='urn:xmpp:sm:3'", "resume='true'"])
        .await
        .unwrap();
    let (_, id) = enabled.split_once(" id='").unwrap();
    let id: String = id.chars().take_while(|&c| c != '\'').collect();
    assert!(!id.is_empty());
    drop(raw); // the connection breaks; b parks the session
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut thief = Raw::open(&c_id, &b_id, addr, "c.example").await;
    thief
        .send(&format!(
            "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>"
        ))
        .await;
    assert!(thief.until_tag("failed", &["xmlns='urn:xmpp:sm:3'"]).await);
    let mut owner = Raw::open(&a_id, &b_id, addr, "a.example").await;
    owner
        .send(&format!(
            "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>"
        ))
        .await;
    let previd = format!("previd='{id}'");
    assert!(
        owner
            .until_tag("resumed", &["xmlns='urn:xmpp:sm:3'", &previd, "h='0'"])
            .await
    );
    b.shutdown().await;
}
