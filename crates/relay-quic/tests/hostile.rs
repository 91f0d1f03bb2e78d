//! Hostile peers against a running QUIC adapter over loopback: streams, bytes, deadlines and
//! handshakes are each bounded per peer, and an honest peer keeps being served meanwhile.
//! Limits are small so that every case runs in well under a second or two. The cases every
//! transport shares (connection caps, failed handshakes, ...) are in relay-adapter's
//! conformance suite.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;
use quinn::{ConnectionError, RecvStream, SendStream, VarInt};
use relay_adapter::{AdapterStats, Budget, Limits};
use relay_adapter::{Inbound, Transport};
use relay_core::transport::{
    Request, Response, Status, Transmit, TransmitId, TransportError, TransportKind,
};
use relay_quic::framing::{ChunkQueue, Decoder, Frame, encode_ping, encode_request};
use relay_quic::{ALPN, Congestion, QuicConfig, QuicTransport, codes};
use relay_tls::{PeerTrust, TlsIdentity};

mod common;
use common::{identity, trusting};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{sleep, timeout};

const WAIT: Duration = Duration::from_secs(10);

type Outcome = (TransmitId, Result<Response, TransportError>);

/// The node side: answers every request `201` (once `gate` lets it, if set), counts the
/// requests it was handed, and reports outcomes.
#[derive(Clone)]
struct Fake {
    outcomes: mpsc::UnboundedSender<Outcome>,
    seen: Arc<AtomicUsize>,
    gate: Option<Arc<Semaphore>>,
}

impl Inbound for Fake {
    async fn request(&self, request: Request) -> Response {
        self.seen.fetch_add(1, Ordering::Relaxed);
        if let Some(gate) = &self.gate {
            let _ = gate.acquire().await.map(|p| p.forget());
        }
        Response {
            status: Status::Created,
            body: Bytes::new(),
            next_seq: request.seq.map(|s| s + 1),
            next_inc: None,
            retry_after: None,
        }
    }

    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        let _ = self.outcomes.send((id, outcome));
    }

    fn probe_outcome(&self, _: ProviderDomain, _: bool) {}
}

fn fake() -> (Fake, mpsc::UnboundedReceiver<Outcome>) {
    let (outcomes, rx) = mpsc::unbounded_channel();
    let fake = Fake {
        outcomes,
        seen: Arc::default(),
        gate: None,
    };
    (fake, rx)
}

fn config(me: &TlsIdentity, trust: PeerTrust, limits: Limits) -> QuicConfig {
    QuicConfig {
        identity: me.clone(),
        trust,
        listen: "127.0.0.1:0".parse().expect("addr"),
        peers: Default::default(),
        max_body: 64 * 1024,
        request_timeout: Duration::from_secs(5),
        congestion: Congestion::default(),
        adapter: relay_adapter::AdapterContext {
            limits,
            stats: Arc::new(AdapterStats::default()),
            pacer: Default::default(),
        },
    }
}

/// Node b, which trusts a (the hostile peer) and c (an honest one).
struct Server {
    b: QuicTransport,
    addr: SocketAddr,
    stats: Arc<AdapterStats>,
    a: TlsIdentity,
    b_id: TlsIdentity,
    c: TlsIdentity,
}

async fn server(limits: Limits, max_body: usize) -> Server {
    server_with(limits, max_body, fake().0).await
}

async fn server_with(limits: Limits, max_body: usize, fake: Fake) -> Server {
    let a = identity("a.example");
    let b_id = identity("b.example");
    let c = identity("c.example");
    let mut cfg = config(&b_id, trusting(&[&a, &c]), limits);
    cfg.max_body = max_body;
    let stats = cfg.adapter.stats.clone();
    let (b, addr) = QuicTransport::start(cfg, fake).await.expect("start b");
    Server {
        b,
        addr,
        stats,
        a,
        b_id,
        c,
    }
}

fn client_config(me: &TlsIdentity, server: &TlsIdentity) -> quinn::ClientConfig {
    let tls = relay_tls::client_config(me, &trusting(&[server]), vec![ALPN.to_vec()])
        .expect("client tls");
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
    ))
}

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind")
}

/// A raw connection from `me` to the server, bypassing the adapter's own sending side.
async fn connect(
    endpoint: &quinn::Endpoint,
    me: &TlsIdentity,
    s: &Server,
) -> Result<quinn::Connection, ConnectionError> {
    endpoint
        .connect_with(client_config(me, &s.b_id), s.addr, "b.example")
        .expect("connect")
        .await
}

async fn next_frame(recv: &mut RecvStream, queue: &mut ChunkQueue) -> Option<Frame> {
    let mut decoder = Decoder::new(1 << 20);
    loop {
        if let Some(frame) = decoder.decode(queue).expect("valid frames") {
            return Some(frame);
        }
        queue.push(recv.read_chunk(usize::MAX, true).await.ok()??.bytes);
    }
}

/// Sends a ping on a fresh stream and waits for the pong: the connection is serving.
async fn ping(conn: &quinn::Connection) -> bool {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        let mut wire = BytesMut::new();
        encode_ping(&mut wire, 77, false);
        send.write_all(&wire).await.ok()?;
        send.finish().ok()?;
        next_frame(&mut recv, &mut ChunkQueue::new()).await
    };
    matches!(timeout(WAIT, exchange).await, Ok(Some(Frame::Pong(77))))
}

fn request_head(id: u64, body_len: usize) -> BytesMut {
    let mut wire = BytesMut::new();
    encode_request(
        &mut wire,
        id,
        Endpoint::Notify.code(),
        "mimi://b.example/r/room",
        Some(0),
        body_len,
    )
    .expect("encode");
    wire
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// Failed before the fix: the receiver allowed 4096 concurrent streams whatever the limits.
#[tokio::test]
async fn concurrent_streams_per_connection_are_capped() {
    let s = server(
        Limits {
            max_streams_per_conn: 4,
            ..Limits::default()
        },
        1024,
    )
    .await;
    let ep = client_endpoint();
    let conn = connect(&ep, &s.a, &s).await.expect("handshake");
    let mut open: Vec<(SendStream, RecvStream)> = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = conn.open_bi().await.expect("within the cap");
        send.write_all(&request_head(0, 10)[..5])
            .await
            .expect("write");
        open.push((send, recv));
    }
    assert!(
        timeout(Duration::from_millis(300), conn.open_bi())
            .await
            .is_err(),
        "a fifth concurrent stream must wait for credit"
    );
    // Closing one stream gives the credit back.
    let (mut send, _recv) = open.remove(0);
    send.reset(VarInt::from_u32(0)).expect("reset");
    drop(_recv);
    assert!(
        timeout(WAIT, conn.open_bi()).await.is_ok(),
        "credit returns once a stream is closed"
    );
    conn.close(VarInt::from_u32(0), b"done");
    s.b.shutdown().await;
}

/// Failed before the fix: every stream buffered its partial frame with no per-peer bound, so
/// nothing was ever refused.
#[tokio::test]
async fn partial_frames_of_one_peer_are_held_to_its_budget_while_another_is_served() {
    const BUDGET: usize = 96 * 1024;
    let s = server(
        Limits {
            max_peer_bytes: BUDGET,
            max_streams_per_conn: 64,
            ..Limits::default()
        },
        64 * 1024,
    )
    .await;
    let ep = client_endpoint();
    let conn = connect(&ep, &s.a, &s).await.expect("handshake");
    // 32 streams, each with a 60 KiB request of which 40 KiB is sent: 1.25 MiB if buffered.
    let mut streams = Vec::new();
    for i in 0..32 {
        let (mut send, recv) = conn.open_bi().await.expect("stream");
        let mut wire = request_head(i, 60 * 1024);
        wire.extend_from_slice(&[0xAB; 40 * 1024]);
        let wire = wire.freeze();
        streams.push((
            tokio::spawn(async move {
                let _ = send.write_all(&wire).await;
                send
            }),
            recv,
        ));
    }
    let a = s.a.domain.clone();
    eventually("the hostile peer is refused", || {
        s.stats.refusals(Budget::PeerBytes) > 0
    })
    .await;
    sleep(Duration::from_millis(200)).await;
    assert!(
        s.b.peer_bytes(&a) <= BUDGET,
        "{} bytes held",
        s.b.peer_bytes(&a)
    );

    // c, honest, still gets its answers at once.
    let (fake, mut outcomes) = fake();
    let mut c_cfg = config(&s.c, trusting(&[&s.b_id]), Limits::default());
    c_cfg.peers.insert(s.b_id.domain.clone(), s.addr.into());
    let (c, _) = QuicTransport::start(c_cfg, fake).await.expect("start c");
    for i in 0..20 {
        c.send(Transmit {
            id: TransmitId(i),
            dest: s.b_id.domain.clone(),
            transport: TransportKind::Quic,
            endpoint: Endpoint::Notify,
            target: format!("mimi://b.example/r/room{}", i % 4),
            seq: Some(i),
            lineage: None,
            body: vec![Bytes::from(vec![1u8; 8 * 1024])],
        });
    }
    for _ in 0..20 {
        let (_, outcome) = timeout(WAIT, outcomes.recv())
            .await
            .expect("c is answered")
            .expect("open");
        assert_eq!(outcome.expect("answered").status, Status::Created);
    }
    assert!(s.b.peer_bytes(&a) <= BUDGET);
    // Once a's streams go, so do its bytes.
    conn.close(VarInt::from_u32(0), b"done");
    eventually("a's bytes are given back", || s.b.peer_bytes(&a) == 0).await;
    c.shutdown().await;
    s.b.shutdown().await;
}

/// Failed before the fix: requests waiting for the node's answer were not bounded per peer,
/// so all forty reached the node at once.
#[tokio::test]
async fn requests_awaiting_the_node_count_against_the_budget_and_all_are_answered() {
    const BUDGET: usize = 96 * 1024;
    let gate = Arc::new(Semaphore::new(0));
    let (mut b_fake, _) = fake();
    b_fake.gate = Some(gate.clone());
    let seen = b_fake.seen.clone();
    let s = server_with(
        Limits {
            max_peer_bytes: BUDGET,
            ..Limits::default()
        },
        64 * 1024,
        b_fake,
    )
    .await;
    let (a_fake, mut outcomes) = fake();
    let mut a_cfg = config(&s.a, trusting(&[&s.b_id]), Limits::default());
    a_cfg.peers.insert(s.b_id.domain.clone(), s.addr.into());
    a_cfg.request_timeout = Duration::from_secs(20);
    let (a, _) = QuicTransport::start(a_cfg, a_fake).await.expect("start a");
    for i in 0..40 {
        a.send(Transmit {
            id: TransmitId(i),
            dest: s.b_id.domain.clone(),
            transport: TransportKind::Quic,
            endpoint: Endpoint::Notify,
            target: "mimi://b.example/r/slow".to_owned(),
            seq: Some(i),
            lineage: None,
            body: vec![Bytes::from(vec![2u8; 8 * 1024])],
        });
    }
    eventually("a is held at its budget", || {
        s.stats.refusals(Budget::PeerBytes) > 0
    })
    .await;
    sleep(Duration::from_millis(200)).await;
    let handed = seen.load(Ordering::Relaxed);
    assert!(
        handed * 8 * 1024 <= BUDGET,
        "{handed} requests of 8 KiB handed to the node"
    );
    assert!(s.b.peer_bytes(&s.a.domain) <= BUDGET);
    // The node catches up: everything is answered, in order, nothing lost.
    gate.add_permits(1000);
    for i in 0..40 {
        let (id, outcome) = timeout(WAIT, outcomes.recv())
            .await
            .expect("answered in time")
            .expect("open");
        assert_eq!(id, TransmitId(i));
        assert_eq!(outcome.expect("answered").status, Status::Created);
    }
    // An idle stream keeps only a small reservation to read its next frame; gone with it.
    sleep(Duration::from_millis(100)).await;
    assert!(s.b.peer_bytes(&s.a.domain) <= 1024);
    a.shutdown().await;
    eventually("the bytes are given back", || {
        s.b.peer_bytes(&s.a.domain) == 0
    })
    .await;
    s.b.shutdown().await;
}

/// Failed before the fix: a partial frame was kept forever.
#[tokio::test]
async fn a_partial_frame_past_the_deadline_resets_its_stream_only() {
    let s = server(
        Limits {
            frame_deadline: Duration::from_millis(300),
            ..Limits::default()
        },
        1024,
    )
    .await;
    let ep = client_endpoint();
    let conn = connect(&ep, &s.a, &s).await.expect("handshake");

    // An idle stream between frames is not a started frame: it is never reset.
    let (mut idle_send, mut idle_recv) = conn.open_bi().await.expect("stream");
    let mut wire = BytesMut::new();
    encode_ping(&mut wire, 1, false);
    idle_send.write_all(&wire).await.expect("write");
    let mut idle_queue = ChunkQueue::new();
    assert_eq!(
        next_frame(&mut idle_recv, &mut idle_queue).await,
        Some(Frame::Pong(1))
    );

    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let head = request_head(1, 100);
    send.write_all(&head[..10]).await.expect("half a head");
    let err = timeout(WAIT, recv.read_to_end(1024))
        .await
        .expect("refused in time")
        .expect_err("stream reset");
    assert!(
        matches!(err, quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)) if code == VarInt::from_u32(codes::FRAME_DEADLINE)),
        "{err:?}"
    );
    assert_eq!(s.stats.refusals(Budget::FrameDeadline), 1);

    // The connection and the idle stream carry on.
    assert!(ping(&conn).await);
    let mut wire = BytesMut::new();
    encode_ping(&mut wire, 2, false);
    idle_send.write_all(&wire).await.expect("write");
    assert_eq!(
        next_frame(&mut idle_recv, &mut idle_queue).await,
        Some(Frame::Pong(2))
    );
    conn.close(VarInt::from_u32(0), b"done");
    s.b.shutdown().await;
}

/// A handshake that never completes: a QUIC Initial from a socket that then goes quiet. If
/// the server answers with Retry, the Initial is sent again with the token (so the address is
/// validated), and then the socket goes quiet.
async fn half_open(s: &Server) -> tokio::net::UdpSocket {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = std::time::Instant::now();
    let (_, mut conn) = ep
        .connect(now, client_config(&s.a, &s.b_id), s.addr, "b.example")
        .expect("connect");
    let mut buf = Vec::new();
    let flush = |conn: &mut quinn_proto::Connection, buf: &mut Vec<u8>| {
        let mut out = Vec::new();
        while let Some(t) = conn.poll_transmit(std::time::Instant::now(), 1, buf) {
            out.push(buf[..t.size].to_vec());
            buf.clear();
        }
        out
    };
    for d in flush(&mut conn, &mut buf) {
        socket.send_to(&d, s.addr).await.expect("send");
    }
    let mut rx = vec![0u8; 65536];
    let Ok(Ok((n, from))) = timeout(Duration::from_secs(1), socket.recv_from(&mut rx)).await else {
        return socket;
    };
    // A long header of type Retry (QUIC v1: form bit set, type 3).
    if n > 0 && rx[0] & 0x80 != 0 && (rx[0] >> 4) & 0x03 == 3 {
        let mut resp = Vec::new();
        if let Some(quinn_proto::DatagramEvent::ConnectionEvent(_, event)) = ep.handle(
            std::time::Instant::now(),
            from,
            None,
            None,
            BytesMut::from(&rx[..n]),
            &mut resp,
        ) {
            conn.handle_event(event);
            for d in flush(&mut conn, &mut buf) {
                socket.send_to(&d, s.addr).await.expect("send");
            }
        }
    }
    socket
}

/// Failed before the fix: no Retry was ever sent and handshakes were not capped.
#[tokio::test]
async fn handshake_load_gets_retry_and_the_cap_refuses_the_rest() {
    let s = server(
        Limits {
            max_handshakes: 2,
            ..Limits::default()
        },
        1024,
    )
    .await;
    let ep = client_endpoint();
    let before = connect(&ep, &s.c, &s).await.expect("no load yet");
    assert_eq!(s.stats.retries_sent(), 0, "no Retry without load");

    // One handshake stuck in progress: half of the cap.
    let _stuck = half_open(&s).await;
    eventually("one handshake in progress", || {
        s.b.handshakes_in_progress() == 1
    })
    .await;
    let conn = connect(&ep, &s.a, &s)
        .await
        .expect("connects after a Retry");
    assert!(ping(&conn).await);
    assert_eq!(s.stats.retries_sent(), 1);

    // A second, validated, stuck handshake fills the cap: the next is refused.
    let _stuck2 = half_open(&s).await;
    eventually("two handshakes in progress", || {
        s.b.handshakes_in_progress() == 2
    })
    .await;
    let refused = connect(&ep, &s.a, &s).await;
    assert!(
        matches!(refused, Err(ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );
    assert!(s.stats.refusals(Budget::Handshakes) >= 1);
    // Connections made before are untouched.
    assert!(ping(&before).await);
    assert!(ping(&conn).await);
    s.b.shutdown().await;
}
