//! Hostile peers against a running XMPP adapter over loopback (issue 14): each attack is
//! refused with the protocol's own error while an honest peer keeps being answered. The cases
//! every transport shares (byte budgets, failed handshakes, ...) are in relay-adapter's
//! conformance suite.
//!
//! CPU bounds are measured as the on-CPU time of every thread of this test process
//! (`/proc/self/task/*/schedstat`), attacker and node together, so they are upper bounds on
//! the node's own work; the old scanner spent about 9 s on the deep stanza and then overflowed
//! its stack.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use relay_adapter::{AdapterContext, AdapterStats, Budget, Limits};
use relay_adapter::{Inbound, Transport};
use relay_core::transport::{
    Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind,
};
use relay_tls::{PeerTrust, TlsIdentity};
use relay_xmpp::{ALPN, XmppConfig, XmppTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(20);

/// Each provider dials from its own loopback address, as on a real network: a penalty on
/// one's address (refused at its connection cap) must spare the others.
fn source_of(me: &TlsIdentity) -> IpAddr {
    match me.domain.as_str() {
        "c.example" => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

async fn tcp_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// The node: answers `201` echoing the body.
#[derive(Clone)]
struct Fake {
    requests: mpsc::UnboundedSender<Request>,
    outcomes: mpsc::UnboundedSender<(TransmitId, Result<Response, TransportError>)>,
}

impl Inbound for Fake {
    fn request(&self, request: Request) -> impl Future<Output = Response> + Send {
        let this = self.clone();
        async move {
            let _ = this.requests.send(request.clone());
            Response::new(Status::Created, request.body)
        }
    }
    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        let _ = self.outcomes.send((id, outcome));
    }
    fn probe_outcome(&self, _: ProviderDomain, _: bool) {}
}

type Outcomes = mpsc::UnboundedReceiver<(TransmitId, Result<Response, TransportError>)>;

fn fake() -> (Fake, mpsc::UnboundedReceiver<Request>, Outcomes) {
    let (requests, rq) = mpsc::unbounded_channel();
    let (outcomes, oc) = mpsc::unbounded_channel();
    (Fake { requests, outcomes }, rq, oc)
}

fn identity(name: &str) -> TlsIdentity {
    let d: ProviderDomain = name.parse().unwrap();
    let g = relay_tls::generate(&d).unwrap();
    TlsIdentity::from_pem(d, &g.cert_pem, &g.key_pem).unwrap()
}

fn trusting(ids: &[&TlsIdentity]) -> PeerTrust {
    let mut trust = PeerTrust::new();
    for id in ids {
        trust.add(id.domain.clone(), id.cert().unwrap().clone());
    }
    trust
}

struct Node {
    a: TlsIdentity,
    b: TlsIdentity,
    c: TlsIdentity,
    t: XmppTransport,
    addr: SocketAddr,
    stats: Arc<AdapterStats>,
    /// Requests the node was handed, in order.
    requests: mpsc::UnboundedReceiver<Request>,
}

/// Node b, trusting a (the attacker) and c (the honest peer), with `limits`.
async fn node(limits: Limits) -> Node {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (a, b, c) = (
        identity("a.example"),
        identity("b.example"),
        identity("c.example"),
    );
    let stats = Arc::new(AdapterStats::default());
    let cfg = XmppConfig {
        identity: b.clone(),
        trust: trusting(&[&a, &c]),
        listen: "127.0.0.1:0".parse().unwrap(),
        peers: Default::default(),
        component: None,
        max_body: 1 << 20,
        request_timeout: Duration::from_secs(10),
        adapter: AdapterContext {
            limits,
            stats: stats.clone(),
            pacer: Default::default(),
        },
    };
    let (f, requests, _) = fake();
    let (t, addr) = XmppTransport::start(cfg, f).await.unwrap();
    Node {
        a,
        b,
        c,
        t,
        addr,
        stats,
        requests,
    }
}

/// A hand-written peer: raw XML over mutual TLS.
struct Raw {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    seen: String,
    me: String,
}

impl Raw {
    async fn open(me: &TlsIdentity, b: &TlsIdentity, addr: SocketAddr) -> Raw {
        let cfg = relay_tls::client_config(me, &trusting(&[b]), vec![ALPN.to_vec()]).unwrap();
        let tcp = tcp_from(source_of(me), addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("b.example".to_owned()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let mut raw = Raw {
            tls,
            seen: String::new(),
            me: me.domain.to_string(),
        };
        let from = raw.me.clone();
        raw.send(&format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
             xmlns:stream='http://etherx.jabber.org/streams' from='{from}' to='b.example' \
             version='1.0'>"
        ))
        .await;
        raw
    }

    /// Opens a stream and enables stream management; the session id.
    async fn enabled(me: &TlsIdentity, b: &TlsIdentity, addr: SocketAddr) -> (Raw, String) {
        let mut raw = Raw::open(me, b, addr).await;
        raw.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
            .await;
        assert!(raw.until("<enabled").await);
        assert!(raw.until(" id='").await);
        let id = raw.seen.split('\'').next().unwrap().to_owned();
        (raw, id)
    }

    async fn send(&mut self, s: &str) {
        self.tls.write_all(s.as_bytes()).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    /// Everything up to and including `needle`, consumed.
    async fn upto(&mut self, needle: &str) -> String {
        while !self.seen.contains(needle) {
            assert!(self.read_more().await, "stream ended before {needle}");
        }
        let i = self.seen.find(needle).unwrap_or(0);
        self.seen.drain(..i + needle.len()).collect()
    }

    /// Reads until `needle` (consuming up to it); `false` if the stream ended first.
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

    fn request_xml(&self, id: &str, body: &str) -> String {
        let me = &self.me;
        format!(
            "<iq type='set' id='{id}' from='{me}' to='b.example'><mimi xmlns='urn:mimi-relay:0' \
             endpoint='notify' target='mimi://{me}/r/x' seq='1'>{body}</mimi></iq>"
        )
    }

    /// One MIMI request, answered 201.
    async fn request(&mut self, id: &str) {
        let xml = self.request_xml(id, "aGk=");
        self.send(&xml).await;
        assert!(self.until(&format!("id='{id}'")).await, "{id} answered");
        assert!(self.until("status='201'").await, "{id} answered 201");
    }
}

/// On-CPU time of every thread of this process so far.
/// CPU time of the whole process, exited threads included (a sum over live threads went
/// backwards when a runtime thread exited between two samples). Clock ticks, 10 ms at most.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f[11] + f[12];
    Duration::from_millis(ticks * 1000 / clock_ticks())
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux this runs on; `getconf` says if not.
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// An honest peer (c) asking b again and again until stopped; how many answers it got.
struct Honest {
    task: tokio::task::JoinHandle<u32>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Honest {
    async fn start(n: &Node) -> Honest {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (c, b, addr) = (n.c.clone(), n.b.clone(), n.addr);
        let (mut raw, _) = Raw::enabled(&c, &b, addr).await;
        raw.request("first").await;
        let task = tokio::spawn(async move {
            let mut answered = 0;
            while !*stopped.borrow_and_update() {
                raw.request(&format!("h{answered}")).await;
                answered += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answered
        });
        Honest { task, stop }
    }

    /// Stops it once it has been answered a few more times.
    async fn finish(self) -> u32 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.stop.send(true).unwrap();
        timeout(WAIT, self.task).await.unwrap().unwrap()
    }
}

/// Sends `attack` on its own task (the node may close mid-write) and waits for the stream
/// error; the CPU time and wall time it took.
async fn refused_with(raw: Raw, attack: Vec<u8>, condition: &str) -> (Duration, Duration) {
    let (mut rd, mut wr) = tokio::io::split(raw.tls);
    let (cpu0, t0) = (cpu(), Instant::now());
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&attack).await;
        let _ = wr.flush().await;
        wr
    });
    let mut seen = raw.seen;
    let needle = format!("<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>");
    let mut buf = vec![0u8; 65536];
    while !seen.contains(&needle) {
        match timeout(WAIT, rd.read(&mut buf)).await.expect("in time") {
            Ok(0) | Err(_) => panic!("stream ended without {condition}: {seen}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    let took = (cpu().saturating_sub(cpu0), t0.elapsed());
    // The node closes the stream after the error.
    loop {
        match timeout(WAIT, rd.read(&mut buf))
            .await
            .expect("closed in time")
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    writer.abort();
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_stanza_is_refused_within_100ms_of_cpu_while_others_are_served() {
    let n = node(Limits::default()).await;
    let honest = Honest::start(&n).await;
    let (raw, _) = Raw::enabled(&n.a, &n.b, n.addr).await;
    // The stanza: 150,000 nested elements, about 1 MB, inside the stanza limit.
    let deep = format!("{}{}", "<a>".repeat(150_000), "</a>".repeat(150_000));
    let attack = raw.request_xml("deep", &deep).into_bytes();
    assert!(attack.len() > 1_000_000);
    let (cpu, wall) = refused_with(raw, attack, "policy-violation").await;
    assert!(cpu < Duration::from_millis(100), "{cpu:?} of cpu, {wall:?}");
    assert_eq!(n.stats.refusals(Budget::XmlDepth), 1);
    assert!(
        honest.finish().await > 0,
        "the honest peer was answered meanwhile"
    );
    // And after: a fresh stream of the same node is served.
    let (mut c, _) = Raw::enabled(&n.c, &n.b, n.addr).await;
    c.request("after").await;
    n.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_tag_that_never_ends_is_refused() {
    let limits = Limits {
        frame_deadline: Duration::from_millis(300),
        ..Limits::default()
    };
    let n = node(limits).await;
    let honest = Honest::start(&n).await;
    // `</` and then 1 MB of name: refused at the tag bound, fast.
    let (raw, _) = Raw::enabled(&n.a, &n.b, n.addr).await;
    let mut attack = b"</".to_vec();
    attack.extend(vec![b'n'; 1 << 20]);
    let (cpu, wall) = refused_with(raw, attack, "policy-violation").await;
    assert!(cpu < Duration::from_millis(100), "{cpu:?} of cpu, {wall:?}");
    // `</` and then nothing: refused at the frame deadline, inside a stanza and between.
    for attack in ["</", "<iq type='get' id='x' from='a.example'></"] {
        let (raw, _) = Raw::enabled(&n.a, &n.b, n.addr).await;
        let (_, wall) = refused_with(raw, attack.into(), "policy-violation").await;
        assert!(wall < Duration::from_secs(5), "{wall:?}");
    }
    assert_eq!(n.stats.refusals(Budget::FrameDeadline), 2);
    assert!(
        honest.finish().await > 0,
        "the honest peer was answered meanwhile"
    );
    n.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_not_buffered_without_bound() {
    // Over plain TCP (component mode: the XMPP server is the peer), so that nothing but the
    // adapter decides whether it keeps reading. The server asks for acknowledgements and
    // never reads one: the adapter stops reading once its output is full, so the flood
    // stalls in TCP instead of growing the adapter's queues.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let me = identity("a.example");
    let cfg = XmppConfig {
        identity: me.clone(),
        trust: PeerTrust::new(),
        listen: "127.0.0.1:0".parse().unwrap(),
        peers: Default::default(),
        component: Some(relay_xmpp::ComponentConfig {
            server,
            jid: "relay.a.example".into(),
            secret: "s".into(),
            peers: [("b.example".parse().unwrap(), "relay.b.example".into())].into(),
        }),
        max_body: 1 << 20,
        request_timeout: Duration::from_secs(10),
        adapter: Default::default(),
    };
    let (f, _, _) = fake();
    let (t, _) = XmppTransport::start(cfg, f).await.unwrap();
    let (mut tcp, _) = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    let mut seen = String::new();
    let mut buf = vec![0u8; 4096];
    let mut read_until = async |tcp: &mut TcpStream, needle: &str| {
        while !seen.contains(needle) {
            let k = timeout(WAIT, tcp.read(&mut buf)).await.unwrap().unwrap();
            assert!(k > 0);
            seen.push_str(&String::from_utf8_lossy(&buf[..k]));
        }
    };
    read_until(&mut tcp, "to='relay.a.example'>").await;
    tcp.write_all(
        b"<stream:stream xmlns='jabber:component:accept' \
          xmlns:stream='http://etherx.jabber.org/streams' id='x'>",
    )
    .await
    .unwrap();
    read_until(&mut tcp, "</handshake>").await;
    tcp.write_all(b"<handshake/>").await.unwrap();
    // Small writes, so that progress shows as long as the adapter reads.
    let flood = "<r xmlns='urn:xmpp:sm:3'/>".repeat(40).into_bytes();
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = written.clone();
    let task = tokio::spawn(async move {
        while tcp.write_all(&flood).await.is_ok() {
            w.fetch_add(flood.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    let (mut last, mut stalled_for) = (0, 0);
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        stalled_for = if now == last { stalled_for + 1 } else { 0 };
        last = now;
        if stalled_for >= 10 {
            break;
        }
    }
    assert!(
        stalled_for >= 10,
        "the flood never stalled ({last} bytes written)"
    );
    assert!(!task.is_finished(), "stalled by backpressure, not closed");
    task.abort();
    t.shutdown().await;
}

#[tokio::test]
async fn parked_sessions_are_capped_per_peer() {
    let n = node(Limits::default()).await;
    // c leaves one session behind, then a leaves six.
    let (c, c_id) = Raw::enabled(&n.c, &n.b, n.addr).await;
    drop(c);
    let mut a_ids = Vec::new();
    for _ in 0..6 {
        let (a, id) = Raw::enabled(&n.a, &n.b, n.addr).await;
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        a_ids.push(id);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resume = async |me: &TlsIdentity, id: &str| {
        let mut raw = Raw::open(me, &n.b, n.addr).await;
        raw.send(&format!(
            "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='0'/>"
        ))
        .await;
        let mut buf = String::new();
        while !buf.contains("<resumed") && !buf.contains("<failed") {
            let mut b = vec![0u8; 4096];
            let k = timeout(WAIT, raw.tls.read(&mut b)).await.unwrap().unwrap();
            assert!(k > 0);
            buf.push_str(&String::from_utf8_lossy(&b[..k]));
        }
        buf.contains("<resumed")
    };
    // a's two oldest went (max_parked_per_peer = 4); c's survived.
    assert!(!resume(&n.a, &a_ids[0]).await);
    assert!(!resume(&n.a, &a_ids[1]).await);
    assert!(resume(&n.a, &a_ids[5]).await);
    assert!(resume(&n.c, &c_id).await);
    assert_eq!(n.stats.refusals(Budget::Parked), 2);
    n.t.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_never_acknowledges_is_refused_at_max_unacked() {
    let limits = Limits {
        max_unacked: 16,
        ..Limits::default()
    };
    let n = node(limits).await;
    let (mut raw, _) = Raw::enabled(&n.a, &n.b, n.addr).await;
    for i in 0..40 {
        raw.send(&format!(
            "<iq type='get' id='p{i}' from='a.example' to='b.example'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await;
    }
    assert!(raw.until("<policy-violation").await);
    assert!(n.stats.refusals(Budget::Unacked) >= 1);
    n.t.shutdown().await;
}

#[tokio::test]
async fn an_honest_sender_stays_inside_a_small_unacked_window() {
    // Our own initiator sends 400 transmits to a node allowing 32 unacknowledged stanzas:
    // it waits for acknowledgements instead of being refused.
    let limits = Limits {
        max_unacked: 32,
        ..Limits::default()
    };
    let n = node(limits.clone()).await;
    let (f, _, mut outcomes) = fake();
    let cfg = XmppConfig {
        identity: n.c.clone(),
        trust: trusting(&[&n.b]),
        listen: "127.0.0.1:0".parse().unwrap(),
        peers: [(n.b.domain.clone(), n.addr.into())].into(),
        component: None,
        max_body: 1 << 20,
        request_timeout: Duration::from_secs(20),
        adapter: AdapterContext {
            limits,
            stats: Default::default(),
            pacer: Default::default(),
        },
    };
    let (c, _) = XmppTransport::start(cfg, f).await.unwrap();
    for i in 0..400u64 {
        c.send(Transmit {
            id: TransmitId(i),
            dest: n.b.domain.clone(),
            transport: TransportKind::Xmpp,
            endpoint: mimi_wire::endpoint::Endpoint::Notify,
            target: "mimi://c.example/r/x".into(),
            seq: Some(i),
            lineage: None,
            body: vec![bytes::Bytes::from_static(b"x")],
        });
    }
    for _ in 0..400 {
        let (id, o) = timeout(WAIT, outcomes.recv()).await.unwrap().unwrap();
        assert_eq!(o.map(|r| r.status), Ok(Status::Created), "{id:?}");
    }
    assert_eq!(n.stats.refusals(Budget::Unacked), 0);
    c.shutdown().await;
    n.t.shutdown().await;
}

#[tokio::test]
async fn connections_are_capped_before_and_after_authentication() {
    let limits = Limits {
        max_conns_per_peer: 2,
        max_handshakes: 1,
        ..Limits::default()
    };
    let n = node(limits).await;
    // Per peer: a third stream of a is refused politely; c still gets in.
    let (_a1, _) = Raw::enabled(&n.a, &n.b, n.addr).await;
    let (_a2, _) = Raw::enabled(&n.a, &n.b, n.addr).await;
    let mut a3 = Raw::open(&n.a, &n.b, n.addr).await;
    assert!(a3.until("<policy-violation").await);
    assert_eq!(n.stats.refusals(Budget::ConnsPerPeer), 1);
    let (mut c, _) = Raw::enabled(&n.c, &n.b, n.addr).await;
    c.request("c1").await;
    // Before authentication: one silent TCP connection holds the only handshake slot, so the
    // next is closed at once, before any TLS (from an address of their own: a's is under
    // penalty now).
    let anon = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
    let _silent = tcp_from(anon, n.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = tcp_from(anon, n.addr).await.unwrap();
    let mut b = [0u8; 16];
    let k = timeout(WAIT, second.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(k, 0, "closed without a handshake");
    assert!(n.stats.refusals(Budget::Handshakes) >= 1);
    n.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_one_byte_over_max_body_is_answered_413_before_any_dom_parse() {
    use base64::Engine;
    let mut n = node(Limits::default()).await;
    let (mut a, _) = Raw::enabled(&n.a, &n.b, n.addr).await;
    // max_body is 1 MiB: its base64 fits the stanza bound, so the scanner passes it on.
    let body = base64::engine::general_purpose::STANDARD.encode(vec![7u8; (1 << 20) + 1]);
    let xml = a.request_xml("big", &body);
    assert!(xml.len() <= relay_xmpp::binding::max_stanza(1 << 20));
    a.send(&xml).await;
    assert!(a.until("id='big'").await);
    let answer = a.upto("</iq>").await;
    for part in ["<policy-violation", "status='413'"] {
        assert!(answer.contains(part), "{part} in {answer}");
    }
    // The stream is kept, and the body never went through the DOM parser.
    a.request("after").await;
    let r = timeout(WAIT, n.requests.recv()).await.unwrap().unwrap();
    assert_eq!(r.body.as_ref(), b"hi");
    assert!(
        relay_xmpp::binding::largest_dom_parse() <= relay_xmpp::binding::MAX_ENVELOPE,
        "the DOM parser was given {} bytes",
        relay_xmpp::binding::largest_dom_parse()
    );
    n.t.shutdown().await;
}
