//! What every driver shares: the three providers, the node under test, the honest peer, the
//! normalised answers, and a counter of warnings.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::{AdapterStats, Inbound, Pacer, Transport};
use relay_core::transport::{
    Lineage, Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind,
};
use relay_tls::{PeerTrust, TlsIdentity};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

/// How long anything may take before a case gives up.
pub const WAIT: Duration = Duration::from_secs(10);
/// The node's own request timeout: longer than [`WAIT`], so that only the bound under test
/// (not a generic timeout) can end a case in time.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest body the node under test accepts, where the transport has that setting.
pub const MAX_BODY: usize = 64 * 1024;
/// The hostile peer's room and the honest peer's.
pub const ROOM: &str = "mimi://b.example/r/room";
pub const HONEST_ROOM: &str = "mimi://b.example/r/honest";

/// One provider: its domain and a fresh certificate.
#[derive(Clone)]
pub struct Peer {
    pub domain: ProviderDomain,
    pub identity: TlsIdentity,
    pub cert_pem: String,
}

impl Peer {
    /// A provider with a fresh key: for a name already in use, an impostor nobody trusts.
    pub fn new(name: &str) -> Peer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let domain: ProviderDomain = name.parse().expect("test domain");
        let g = relay_tls::generate(&domain).expect("certificate");
        let identity =
            TlsIdentity::from_pem(domain.clone(), &g.cert_pem, &g.key_pem).expect("identity");
        Peer {
            domain,
            identity,
            cert_pem: g.cert_pem,
        }
    }
}

pub fn trusting(peers: &[&Peer]) -> PeerTrust {
    let mut trust = PeerTrust::new();
    for p in peers {
        trust
            .add_pem(p.domain.clone(), &p.cert_pem)
            .expect("pinned certificate");
    }
    trust
}

/// Which provider a raw connection speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// a.example: the hostile peer.
    A,
    /// c.example: the honest one (which also has a real adapter sending to b).
    C,
}

impl Who {
    /// The loopback address its raw connections come from: each peer its own, as on a real
    /// network, so that a penalty on one source address is seen to spare the other.
    pub fn source(self) -> IpAddr {
        match self {
            Who::A => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            // The address c's real adapter dials from too.
            Who::C => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// Where the handshakes that must fail (an impostor, plain text) come from.
pub const IMPOSTOR_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// A TCP connection to `addr` from `source` (any 127/8 address is loopback on Linux).
pub async fn tcp_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Whether a TLS handshake ended because b closed the connection before answering it: the
/// refusal of a source under penalty, before any TLS work.
pub fn closed_before_tls(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// What the node under test answered a raw request with, in the transport's terms mapped to
/// one vocabulary. A driver maps only the protocol's own form of each refusal to its variant
/// (and anything else to `Other`), so the cases check the protocol's own error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The node's answer, relayed: its status and `next_seq`.
    Node(Status, Option<u64>),
    /// Over the size limit: HTTP 413 `too-large`, Matrix 413 `M_TOO_LARGE`, an XMPP IQ error
    /// with MIMI status 413, a QUIC response with status 413.
    TooLarge,
    /// Over the peer's byte budget, with a hint when to retry: HTTP 503 `over-budget` with
    /// `Retry-After`, Matrix 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`, an XMPP IQ error
    /// `resource-constraint` with status 503 and `retry-after-ms`.
    Backpressure,
    /// A frame or body started and not finished in time: HTTP 408 `body-timeout`, Matrix 408,
    /// a QUIC stream reset with `FRAME_DEADLINE`, the XMPP stream error `policy-violation`.
    DeadlineCut,
    /// Bytes that are not the protocol: HTTP 400, Matrix 400 `M_NOT_JSON`, a QUIC stream reset
    /// with `FRAME_ERROR`, the XMPP stream error `not-well-formed`.
    Malformed,
    /// A connection past the peer's cap: the HTTPS connection closed once its certificate is
    /// known, a QUIC close with `TOO_MANY_CONNECTIONS`, the XMPP stream error
    /// `policy-violation`, Matrix 429 `M_LIMIT_EXCEEDED` on its first transaction.
    TooManyConnections,
    /// A connection refused before its handshake, its source address under penalty: closed
    /// before b answers the TLS ClientHello; for QUIC, a close with `CONNECTION_REFUSED`.
    RefusedBeforeTls,
    /// Anything else, described.
    Other(String),
}

/// How a transport holds back a peer over its byte budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backpressure {
    /// The request that does not fit is answered with the protocol's backpressure error.
    Refusal,
    /// The request that does not fit is not read until the peer's bytes are freed (QUIC flow
    /// control), then served.
    FlowControl,
}

/// The node behind the adapter under test: records every request and answers `/notify` 201
/// with `next_seq = seq + 1` and `next_inc` the batch's incarnation, once it is not holding.
#[derive(Clone)]
pub struct Node {
    seen: Arc<Mutex<Vec<Request>>>,
    hold: Arc<watch::Sender<bool>>,
}

impl Default for Node {
    fn default() -> Self {
        Node {
            seen: Arc::default(),
            hold: Arc::new(watch::channel(false).0),
        }
    }
}

impl Node {
    /// Requests from now on wait for [`Node::release`].
    pub fn hold(&self) {
        self.hold.send_replace(true);
    }

    pub fn release(&self) {
        self.hold.send_replace(false);
    }

    pub fn seen(&self) -> Vec<Request> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn seen_from(&self, who: &ProviderDomain) -> usize {
        self.seen().iter().filter(|r| &r.from == who).count()
    }
}

impl Inbound for Node {
    fn request(&self, request: Request) -> impl Future<Output = Response> + Send {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request.clone());
        let mut hold = self.hold.subscribe();
        async move {
            let _ = hold.wait_for(|h| !*h).await;
            match request.endpoint {
                Endpoint::Notify => Response {
                    status: Status::Created,
                    body: Bytes::new(),
                    next_seq: request.seq.map(|s| s + 1),
                    next_inc: request.lineage.map(|l| l.batch),
                    retry_after: None,
                },
                _ => Response::error(Status::NotImplemented, "not in this test"),
            }
        }
    }

    fn outcome(&self, _: TransmitId, _: Result<Response, TransportError>) {}

    fn probe_outcome(&self, _: ProviderDomain, _: bool) {}
}

pub type Outcome = (TransmitId, Result<Response, TransportError>);

/// The honest peer's node: it only sends, and hears its outcomes.
#[derive(Clone)]
pub struct Outcomes(mpsc::UnboundedSender<Outcome>);

impl Outcomes {
    pub fn new() -> (Outcomes, mpsc::UnboundedReceiver<Outcome>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Outcomes(tx), rx)
    }
}

impl Inbound for Outcomes {
    async fn request(&self, _: Request) -> Response {
        Response::error(Status::NotImplemented, "the honest peer serves nothing")
    }

    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        let _ = self.0.send((id, outcome));
    }

    fn probe_outcome(&self, _: ProviderDomain, _: bool) {}
}

/// Everything a case looks at, whatever the transport: b (the node under test, trusting a
/// and c), its counters and node, and c's real adapter sending to b.
pub struct World {
    pub kind: TransportKind,
    pub a: Peer,
    pub b: Peer,
    pub c: Peer,
    pub stats: Arc<AdapterStats>,
    /// b's refusal budgets per peer.
    pub pacer: Arc<Pacer>,
    pub node: Node,
    pub honest: Box<dyn Transport>,
    pub outcomes: mpsc::UnboundedReceiver<Outcome>,
    next_id: u64,
}

impl World {
    pub fn peers() -> (Peer, Peer, Peer) {
        (
            Peer::new("a.example"),
            Peer::new("b.example"),
            Peer::new("c.example"),
        )
    }

    pub fn new(
        kind: TransportKind,
        (a, b, c): (Peer, Peer, Peer),
        (stats, pacer): (Arc<AdapterStats>, Arc<Pacer>),
        node: Node,
        honest: Box<dyn Transport>,
        outcomes: mpsc::UnboundedReceiver<Outcome>,
    ) -> World {
        World {
            kind,
            a,
            b,
            c,
            stats,
            pacer,
            node,
            honest,
            outcomes,
            next_id: 0,
        }
    }

    /// c's adapter sends b a `/notify`; its id, to await with [`World::honest_outcome`].
    pub fn honest_send(&mut self, seq: u64, body: Vec<u8>) -> TransmitId {
        self.next_id += 1;
        let id = TransmitId(self.next_id);
        self.honest.send(Transmit {
            id,
            dest: self.b.domain.clone(),
            transport: self.kind,
            endpoint: Endpoint::Notify,
            target: HONEST_ROOM.to_owned(),
            seq: Some(seq),
            lineage: Some(honest_lineage(seq)),
            body: vec![Bytes::from(body)],
        });
        id
    }

    pub async fn honest_outcome(&mut self, id: TransmitId) -> Result<Response, TransportError> {
        loop {
            let (got, outcome) = timeout(WAIT, self.outcomes.recv())
                .await
                .expect("the honest peer got an outcome in time")
                .expect("outcomes open");
            if got == id {
                return outcome;
            }
        }
    }

    /// The honest peer is served: a `/notify` from c's adapter is answered 201.
    pub async fn honest_is_served(&mut self) {
        self.next_id += 1;
        let seq = 1000 + self.next_id;
        let id = self.honest_send(seq, b"honest".to_vec());
        let outcome = self.honest_outcome(id).await;
        assert_eq!(
            outcome.map(|r| (r.status, r.next_seq, r.next_inc)),
            Ok((
                Status::Created,
                Some(seq + 1),
                Some(honest_lineage(seq).batch)
            )),
            "the honest peer must be served, the incarnations carried both ways"
        );
        let seen = self.node.seen();
        let got = seen.iter().rev().find(|r| r.seq == Some(seq));
        assert_eq!(
            got.and_then(|r| r.lineage),
            Some(honest_lineage(seq)),
            "the node got the incarnations as sent"
        );
    }
}

/// Incarnations that use all 64 bits, so a binding that narrows them shows.
pub fn honest_lineage(seq: u64) -> Lineage {
    Lineage {
        batch: u64::MAX - seq,
        prev: (1 << 63) | seq,
    }
}

/// Waits until `check` holds, or fails the case after [`WAIT`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Counts the WARN lines about failed handshakes emitted on this thread while it lives (the
/// cases run on a current-thread runtime, so the adapters' tasks emit on this thread too).
pub struct HandshakeWarnings {
    count: Arc<AtomicUsize>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl HandshakeWarnings {
    pub fn start() -> HandshakeWarnings {
        use tracing_subscriber::layer::SubscriberExt;
        let count = Arc::new(AtomicUsize::new(0));
        let layer = CountLayer(count.clone());
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        HandshakeWarnings {
            count,
            _guard: guard,
        }
    }

    pub fn lines(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

struct CountLayer(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::WARN {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if message.0.starts_with("inbound handshake failed") {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }
}
