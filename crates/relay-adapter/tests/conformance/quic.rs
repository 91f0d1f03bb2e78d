//! The QUIC driver: raw quinn connections speaking the adapter's frames (FRAMING.md), one
//! stream per request.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mimi_wire::endpoint::Endpoint;
use quinn::{ConnectionError, ReadError, RecvStream, VarInt};
use relay_adapter::{AdapterContext, AdapterStats, Limits};
use relay_core::transport::{Status, TransportKind};
use relay_quic::framing::{Body, ChunkQueue, Decoder, Frame, encode_ping, encode_request};
use relay_quic::{ALPN, Congestion, QuicConfig, QuicTransport, codes};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::driver::Driver;
use crate::support::{
    Answer, Backpressure, IMPOSTOR_SOURCE, MAX_BODY, NODE_TIMEOUT, Node, Outcomes, Peer, ROOM,
    WAIT, Who, World, trusting,
};

pub struct Quic {
    world: World,
    b: QuicTransport,
    addr: SocketAddr,
    /// One client endpoint per source address (a's, c's, the impostor's).
    endpoints: Vec<(IpAddr, quinn::Endpoint)>,
    impostor: Peer,
}

/// A request on its own stream: its answer side, and the task writing it (a request the
/// peer's budget holds back may wait for flow control).
pub struct Pending {
    recv: RecvStream,
    writer: JoinHandle<()>,
}

fn config(me: &Peer, trust: relay_tls::PeerTrust, limits: Limits) -> QuicConfig {
    QuicConfig {
        identity: me.identity.clone(),
        trust,
        listen: "127.0.0.1:0".parse().expect("addr"),
        peers: Default::default(),
        max_body: MAX_BODY,
        request_timeout: NODE_TIMEOUT,
        congestion: Congestion::default(),
        adapter: AdapterContext {
            pacer: relay_adapter::Pacer::new(limits.max_refusals_per_s),
            limits,
            stats: Arc::new(AdapterStats::default()),
        },
    }
}

impl Quic {
    fn client_config(&self, me: &Peer) -> quinn::ClientConfig {
        let tls = relay_tls::client_config(
            &me.identity,
            &trusting(&[&self.world.b]),
            vec![ALPN.to_vec()],
        )
        .expect("client tls");
        quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
        ))
    }

    async fn dial(&self, me: &Peer, source: IpAddr) -> Result<quinn::Connection, ConnectionError> {
        let endpoint = self
            .endpoints
            .iter()
            .find(|(ip, _)| *ip == source)
            .map(|(_, e)| e)
            .expect("an endpoint for every source");
        endpoint
            .connect_with(self.client_config(me), self.addr, "b.example")
            .expect("connect")
            .await
    }
}

/// The first frame on `recv`, or how the stream ended without one.
async fn frame(recv: &mut RecvStream) -> Result<Frame, Answer> {
    let mut queue = ChunkQueue::new();
    let mut decoder = Decoder::new(1 << 20);
    loop {
        match decoder.decode(&mut queue) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(Answer::Other(format!("b sent a bad frame: {e}"))),
        }
        match timeout(WAIT, recv.read_chunk(usize::MAX, true)).await {
            Err(_) => return Err(Answer::Other("no answer in time".into())),
            Ok(Ok(Some(chunk))) => queue.push(chunk.bytes),
            Ok(Ok(None)) => return Err(Answer::Other("stream finished unanswered".into())),
            Ok(Err(ReadError::Reset(code))) if code == VarInt::from_u32(codes::FRAME_DEADLINE) => {
                return Err(Answer::DeadlineCut);
            }
            Ok(Err(ReadError::Reset(code))) if code == VarInt::from_u32(codes::FRAME_ERROR) => {
                return Err(Answer::Malformed);
            }
            Ok(Err(e)) => return Err(Answer::Other(format!("stream failed: {e}"))),
        }
    }
}

/// A ping on a fresh stream, answered by the adapter itself.
async fn ping(conn: &quinn::Connection) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut wire = BytesMut::new();
    encode_ping(&mut wire, 77, false);
    send.write_all(&wire).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    match frame(&mut recv).await {
        Ok(Frame::Pong(77)) => Ok(()),
        Ok(other) => Err(format!("{other:?}")),
        Err(answer) => Err(format!("{answer:?}")),
    }
}

fn head(seq: u64, body_len: usize) -> BytesMut {
    let mut wire = BytesMut::new();
    encode_request(
        &mut wire,
        seq,
        Endpoint::Notify.code(),
        ROOM,
        Some(seq),
        body_len,
    )
    .expect("encode");
    wire
}

impl Driver for Quic {
    const KIND: TransportKind = TransportKind::Quic;
    const BACKPRESSURE: Backpressure = Backpressure::FlowControl;
    type Conn = quinn::Connection;
    type Pending = Pending;

    async fn start(limits: Limits) -> Self {
        let peers = World::peers();
        let (a, b, c) = &peers;
        let cfg = config(b, trusting(&[a, c]), limits.clone());
        let stats = cfg.adapter.stats.clone();
        let pacer = cfg.adapter.pacer.clone();
        let node = Node::default();
        let (tb, addr) = QuicTransport::start(cfg, node.clone()).await.expect("b");
        let (inbound, outcomes) = Outcomes::new();
        let mut cfg = config(c, trusting(&[b]), Limits::default());
        cfg.peers.insert(b.domain.clone(), addr.into());
        cfg.request_timeout = WAIT;
        let (tc, _) = QuicTransport::start(cfg, inbound).await.expect("c");
        let world = World::new(
            Self::KIND,
            peers,
            (stats, pacer),
            node,
            Box::new(tc),
            outcomes,
        );
        Quic {
            world,
            b: tb,
            addr,
            endpoints: [Who::A.source(), Who::C.source(), IMPOSTOR_SOURCE]
                .into_iter()
                .map(|ip| {
                    let e = quinn::Endpoint::client(SocketAddr::new(ip, 0)).expect("bind");
                    (ip, e)
                })
                .collect(),
            impostor: Peer::new("a.example"),
        }
    }

    fn world(&mut self) -> &mut World {
        &mut self.world
    }

    fn max_body(&self) -> usize {
        MAX_BODY
    }

    async fn connect(&mut self, who: Who) -> Result<Self::Conn, Answer> {
        let me = match who {
            Who::A => self.world.a.clone(),
            Who::C => self.world.c.clone(),
        };
        let conn = self.dial(&me, who.source()).await.map_err(|e| match e {
            ConnectionError::ConnectionClosed(c)
                if c.error_code == quinn_proto::TransportErrorCode::CONNECTION_REFUSED =>
            {
                Answer::RefusedBeforeTls
            }
            e => Answer::Other(e.to_string()),
        })?;
        match ping(&conn).await {
            Ok(()) => Ok(conn),
            Err(e) => Err(match conn.close_reason() {
                Some(ConnectionError::ApplicationClosed(c))
                    if c.error_code == VarInt::from_u32(codes::TOO_MANY_CONNECTIONS) =>
                {
                    Answer::TooManyConnections
                }
                reason => Answer::Other(format!("{e}, {reason:?}")),
            }),
        }
    }

    async fn send(&mut self, conn: &mut Self::Conn, seq: u64, body: Vec<u8>) -> Self::Pending {
        let (mut send, recv) = conn.open_bi().await.expect("stream");
        let mut wire = head(seq, body.len());
        wire.extend_from_slice(&body);
        let writer = tokio::spawn(async move {
            let _ = send.write_all(&wire).await;
            let _ = send.finish();
            // Keep the stream open until the answer is read.
            let _ = send.stopped().await;
        });
        Pending { recv, writer }
    }

    async fn answer(&mut self, _: &mut Self::Conn, mut pending: Self::Pending) -> Answer {
        let answer = match frame(&mut pending.recv).await {
            Ok(Frame::Response {
                status,
                next_seq,
                body: Body::Bytes(_),
                ..
            }) => match Status::from_http_code(status) {
                Some(Status::TooLarge) => Answer::TooLarge,
                Some(s) if s.is_success() => Answer::Node(s, next_seq),
                _ => Answer::Other(format!("status {status}")),
            },
            Ok(other) => Answer::Other(format!("{other:?}")),
            Err(answer) => answer,
        };
        pending.writer.abort();
        answer
    }

    async fn stall(&mut self, conn: &mut Self::Conn) -> Answer {
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(&head(1, 100)[..10])
            .await
            .expect("half a head");
        let answer = match frame(&mut recv).await {
            Ok(other) => Answer::Other(format!("{other:?}")),
            Err(answer) => answer,
        };
        // The rest of the connection is untouched.
        assert_eq!(ping(conn).await, Ok(()));
        answer
    }

    async fn garbage_after_auth(&mut self) -> Answer {
        let conn = self.connect(Who::A).await.expect("a connects");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(&[0xEE; 64]).await.expect("write");
        let answer = match frame(&mut recv).await {
            Ok(other) => Answer::Other(format!("{other:?}")),
            Err(answer) => answer,
        };
        assert_eq!(ping(&conn).await, Ok(()), "only the stream is reset");
        answer
    }

    async fn garbage_before_auth(&mut self) {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        for junk in [
            vec![0xAB; 1200],
            vec![0xC0; 40],
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ] {
            socket.send_to(&junk, self.addr).await.expect("send");
        }
        // Datagrams are dropped or answered statelessly; give b a moment to see them.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    async fn failed_handshake(&mut self) {
        let impostor = self.impostor.clone();
        // TLS 1.3: the client may finish before b refuses its certificate; then b closes.
        if let Ok(conn) = self.dial(&impostor, IMPOSTOR_SOURCE).await {
            timeout(WAIT, conn.closed()).await.expect("closed by b");
        }
    }

    async fn shutdown(self) {
        self.world.honest.shutdown().await;
        self.b.shutdown().await;
        for (_, e) in &self.endpoints {
            e.close(VarInt::from_u32(0), b"done");
        }
    }
}
