//! The Matrix driver: X-Matrix-signed `/send` transactions over raw HTTP/2. Matrix
//! authenticates requests, not connections: a connection counts for a peer once a verified
//! transaction of that peer arrives on it, so `connect` sends an empty one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mimi_wire::endpoint::Endpoint;
use relay_adapter::{AdapterContext, AdapterStats, Limits};
use relay_core::transport::{Status, TransportKind};
use relay_matrix::client::sign_request;
use relay_matrix::wire::{EDU_REQUEST, MAX_TXN_BODY, SendResponse, fragments};
use relay_matrix::{MatrixConfig, MatrixPeer, MatrixTransport, SigningKey};
use ruma::OwnedServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::driver::Driver;
use crate::support::{
    Answer, Backpressure, IMPOSTOR_SOURCE, NODE_TIMEOUT, Node, Outcomes, Peer, ROOM, WAIT, Who,
    World, closed_before_tls, tcp_from, trusting,
};

type RawBody = BoxBody<Bytes, Infallible>;

/// Each provider's signing key, by seed.
const SEED_A: u8 = 1;
const SEED_B: u8 = 2;
const SEED_C: u8 = 3;

pub struct Matrix {
    world: World,
    b: MatrixTransport,
    addr: SocketAddr,
    /// a.example's own adapter, there to serve a's keys to b.
    a_keys: MatrixTransport,
    txn: Arc<AtomicU64>,
}

/// An HTTP/2 connection, and the provider whose key signs what goes on it.
pub struct Conn {
    h2: SendRequest<RawBody>,
    origin: OwnedServerName,
    seed: u8,
}

/// A body fed by the test; it ends when the sender is dropped.
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

fn name(s: &str) -> OwnedServerName {
    OwnedServerName::try_from(s.to_owned()).expect("server name")
}

/// A free loopback port, so that each adapter can name the others before they start.
fn reserve() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn config(
    me: &Peer,
    seed: u8,
    listen: SocketAddr,
    peers: &[(&Peer, SocketAddr)],
    adapter: AdapterContext,
) -> MatrixConfig {
    MatrixConfig {
        identity: me.identity.clone(),
        trust: trusting(&peers.iter().map(|(p, _)| *p).collect::<Vec<_>>()),
        signing_key: SigningKey::from_seed([seed; 32]).expect("key"),
        server_name: me.domain.to_string(),
        listen,
        peers: peers
            .iter()
            .map(|(p, addr)| {
                let peer = MatrixPeer {
                    server_name: p.domain.to_string(),
                    addr: (*addr).into(),
                };
                (p.domain.clone(), peer)
            })
            .collect(),
        request_timeout: NODE_TIMEOUT,
        edu_sink: None,
        adapter,
    }
}

/// The answer in this binding's own terms (ARCHITECTURE.md, "Matrix binding"): a
/// transaction's refusal, or the answer to its one MIMI request `id`.
async fn answer(
    resp: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
    id: &str,
) -> Answer {
    let resp = match resp {
        Ok(resp) => resp,
        Err(e) => return Answer::Other(format!("no answer: {e}")),
    };
    let status = resp.status().as_u16();
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Answer::Other(format!("{status}, body broke off: {e}")),
    };
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let errcode = v.get("errcode").and_then(Value::as_str).unwrap_or("");
    match (status, errcode) {
        (200, _) => {
            let Ok(r) = serde_json::from_slice::<SendResponse>(&body) else {
                return Answer::Other(format!("200 {v}"));
            };
            match r
                .responses
                .get(id)
                .map(|c| (Status::from_http_code(c.status), c))
            {
                Some((Some(s), c)) if s.is_success() => Answer::Node(s, c.next_seq),
                _ => Answer::Other(format!("200 {v}")),
            }
        }
        (413, "M_TOO_LARGE") => Answer::TooLarge,
        (429, "M_LIMIT_EXCEEDED") if v.get("retry_after_ms").is_some() => Answer::Backpressure,
        (408, _) => Answer::DeadlineCut,
        (400, "M_NOT_JSON") => Answer::Malformed,
        _ => Answer::Other(format!("{status} {v}")),
    }
}

impl Matrix {
    fn put(&self, conn: &Conn, content: &[u8], body: RawBody) -> http::Request<RawBody> {
        let path = format!(
            "/_matrix/federation/v1/send/t{}",
            self.txn.fetch_add(1, Ordering::Relaxed)
        );
        let key = SigningKey::from_seed([conn.seed; 32]).expect("key");
        let auth =
            sign_request(&conn.origin, &name("b.example"), &key, &path, content).expect("sign");
        let mut req = http::Request::new(body);
        *req.method_mut() = http::Method::PUT;
        *req.uri_mut() = format!("https://b.example{path}").parse().expect("uri");
        req.headers_mut().insert(http::header::AUTHORIZATION, auth);
        req
    }

    fn transaction(origin: &OwnedServerName, edus: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "origin": origin.as_str(), "origin_server_ts": 1, "pdus": [], "edus": edus,
        }))
        .expect("json")
    }

    async fn tls(
        &self,
        source: std::net::IpAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        // Matrix asks for no client certificate; the connection is pinned to b's.
        let cfg = relay_tls::client_config(
            &self.world.c.identity,
            &trusting(&[&self.world.b]),
            vec![b"h2".to_vec()],
        )
        .expect("client tls");
        let tcp = tcp_from(source, self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("b.example").expect("name");
        tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
    }

    /// Plain text to the TLS listener: a handshake that fails.
    async fn plain_text(&self) {
        let mut tcp = tcp_from(IMPOSTOR_SOURCE, self.addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: b.example\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        loop {
            match timeout(WAIT, tcp.read(&mut buf))
                .await
                .expect("closed in time")
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

impl Driver for Matrix {
    const KIND: TransportKind = TransportKind::Matrix;
    const BACKPRESSURE: Backpressure = Backpressure::Refusal;
    type Conn = Conn;
    type Pending = JoinHandle<Answer>;

    async fn start(limits: Limits) -> Self {
        let peers = World::peers();
        let (a, b, c) = &peers;
        let (la, lb, lc) = (reserve(), reserve(), reserve());
        let (a_keys, _) = MatrixTransport::start(
            config(a, SEED_A, la, &[(b, lb)], AdapterContext::default()),
            Outcomes::new().0,
        )
        .await
        .expect("a");
        let (inbound, outcomes) = Outcomes::new();
        let mut c_cfg = config(c, SEED_C, lc, &[(b, lb)], AdapterContext::default());
        c_cfg.request_timeout = WAIT;
        let (tc, _) = MatrixTransport::start(c_cfg, inbound).await.expect("c");
        let stats = Arc::new(AdapterStats::default());
        let pacer = relay_adapter::Pacer::new(limits.max_refusals_per_s);
        let node = Node::default();
        let adapter = AdapterContext {
            limits: limits.clone(),
            stats: stats.clone(),
            pacer: pacer.clone(),
        };
        let b_cfg = config(b, SEED_B, lb, &[(a, la), (c, lc)], adapter);
        let (tb, addr) = MatrixTransport::start(b_cfg, node.clone())
            .await
            .expect("b");
        let world = World::new(
            Self::KIND,
            peers,
            (stats, pacer),
            node,
            Box::new(tc),
            outcomes,
        );
        Matrix {
            world,
            b: tb,
            addr,
            a_keys,
            txn: Arc::default(),
        }
    }

    fn world(&mut self) -> &mut World {
        &mut self.world
    }

    fn max_body(&self) -> usize {
        MAX_TXN_BODY
    }

    async fn connect(&mut self, who: Who) -> Result<Self::Conn, Answer> {
        let (origin, seed) = match who {
            Who::A => (name("a.example"), SEED_A),
            Who::C => (name("c.example"), SEED_C),
        };
        let tls = self.tls(who.source()).await.map_err(|e| match e {
            e if closed_before_tls(&e) => Answer::RefusedBeforeTls,
            e => Answer::Other(format!("tls: {e}")),
        })?;
        let (h2, driver) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| Answer::Other(format!("h2: {e}")))?;
        tokio::spawn(driver);
        let mut conn = Conn { h2, origin, seed };
        let empty = Matrix::transaction(&conn.origin, Vec::new());
        let hello = self.put(&conn, &empty, Full::new(Bytes::from(empty.clone())).boxed());
        let resp = timeout(WAIT, conn.h2.send_request(hello))
            .await
            .map_err(|_| Answer::Other("no answer".into()))?;
        if resp.as_ref().is_ok_and(|r| r.status() == 200) {
            return Ok(conn);
        }
        // The binding's refusal of a peer over its connection cap is its backpressure error
        // on the transaction that would bind the connection.
        Err(match answer(resp, "").await {
            Answer::Backpressure => Answer::TooManyConnections,
            other => other,
        })
    }

    async fn send(&mut self, conn: &mut Self::Conn, seq: u64, body: Vec<u8>) -> Self::Pending {
        let id = format!("r{seq}");
        let edus = fragments(&id, Endpoint::Notify, ROOM, Some(seq), &[Bytes::from(body)])
            .into_iter()
            .map(|c| json!({"edu_type": EDU_REQUEST, "content": c}))
            .collect();
        let txn = Matrix::transaction(&conn.origin, edus);
        // Past the size limit the signature is never checked: sign a stand-in, cheaply.
        let signed = if txn.len() > MAX_TXN_BODY {
            b"{}".to_vec()
        } else {
            txn.clone()
        };
        let req = self.put(conn, &signed, Full::new(Bytes::from(txn)).boxed());
        let mut h2 = conn.h2.clone();
        tokio::spawn(async move { answer(h2.send_request(req).await, &id).await })
    }

    async fn answer(&mut self, _: &mut Self::Conn, pending: Self::Pending) -> Answer {
        timeout(WAIT, pending)
            .await
            .expect("answered in time")
            .expect("request task")
    }

    async fn stall(&mut self, conn: &mut Self::Conn) -> Answer {
        let (feed, rx) = mpsc::channel(1);
        let mut req = self.put(conn, b"{}", Fed(rx).boxed());
        req.headers_mut()
            .insert("content-length", http::HeaderValue::from(100));
        feed.send(Bytes::from_static(b"{\"origin\":"))
            .await
            .expect("feed");
        let answer = timeout(WAIT, async {
            answer(conn.h2.send_request(req).await, "").await
        })
        .await
        .unwrap_or(Answer::Other("not cut in time".into()));
        drop(feed);
        answer
    }

    async fn garbage_after_auth(&mut self) -> Answer {
        let mut conn = self.connect(Who::A).await.expect("a connects");
        let req = self.put(
            &conn,
            b"{}",
            Full::new(Bytes::from_static(b"\x00 not json")).boxed(),
        );
        answer(conn.h2.send_request(req).await, "").await
    }

    async fn garbage_before_auth(&mut self) {
        self.plain_text().await;
    }

    async fn failed_handshake(&mut self) {
        self.plain_text().await;
    }

    async fn shutdown(self) {
        self.world.honest.shutdown().await;
        self.b.shutdown().await;
        self.a_keys.shutdown().await;
    }
}
