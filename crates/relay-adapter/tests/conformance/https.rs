//! The HTTPS driver: raw HTTP/2 (and HTTP/1.1 for garbage) over mutual TLS.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use relay_adapter::{AdapterContext, AdapterStats, Limits};
use relay_core::transport::{Status, TransportKind};
use relay_https::{HttpsConfig, HttpsTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::driver::Driver;
use crate::support::{
    Answer, Backpressure, IMPOSTOR_SOURCE, MAX_BODY, NODE_TIMEOUT, Node, Outcomes, Peer, ROOM,
    WAIT, Who, World, closed_before_tls, tcp_from, trusting,
};

type RawBody = BoxBody<Bytes, Infallible>;

/// An authenticated HTTP/2 connection and whom it speaks for.
pub struct Conn {
    h2: SendRequest<RawBody>,
    me: Peer,
}

pub struct Https {
    world: World,
    b: HttpsTransport,
    addr: SocketAddr,
    /// Claims to be a.example with a key nobody trusts.
    impostor: Peer,
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

impl Https {
    async fn tls(
        &self,
        me: &Peer,
        source: std::net::IpAddr,
        alpn: &[u8],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let cfg = relay_tls::client_config(
            &me.identity,
            &trusting(&[&self.world.b]),
            vec![alpn.to_vec()],
        )
        .expect("client tls");
        let tcp = tcp_from(source, self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("b.example").expect("name");
        tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
    }

    fn notify(who: &Peer, seq: u64, body: RawBody) -> http::Request<RawBody> {
        let path = relay_https::framing::encode_target(ROOM);
        http::Request::builder()
            .method("POST")
            .uri(format!("https://b.example/v1/notify/{path}"))
            .header("from", format!("mimi@{}", who.domain))
            .header(relay_https::MIMI_SEQ, seq.to_string())
            .body(body)
            .expect("request")
    }

    fn peer(&self, who: Who) -> Peer {
        match who {
            Who::A => self.world.a.clone(),
            Who::C => self.world.c.clone(),
        }
    }
}

/// The answer in this binding's own terms (crate docs of relay-https).
async fn answer(resp: Result<http::Response<hyper::body::Incoming>, hyper::Error>) -> Answer {
    let resp = match resp {
        Ok(resp) => resp,
        Err(e) => return Answer::Other(format!("no answer: {e}")),
    };
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let next_seq = header(relay_https::MIMI_NEXT_SEQ).and_then(|v| v.parse().ok());
    let retry_after = header("retry-after");
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Answer::Other(format!("{status}, body broke off: {e}")),
    };
    match (status, &body[..]) {
        (413, b"too-large") => Answer::TooLarge,
        (503, b"over-budget") if retry_after.is_some() => Answer::Backpressure,
        (408, b"body-timeout") => Answer::DeadlineCut,
        (code, _) => match Status::from_http_code(code) {
            Some(s) if s.is_success() => Answer::Node(s, next_seq),
            _ => Answer::Other(format!("{code} {}", String::from_utf8_lossy(&body))),
        },
    }
}

/// Reads until the server closes the connection (or the wait ends); what it sent.
async fn until_closed(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(WAIT, io.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was never closed"),
        }
    }
}

impl Driver for Https {
    const KIND: TransportKind = TransportKind::Https;
    const BACKPRESSURE: Backpressure = Backpressure::Refusal;
    type Conn = Conn;
    type Pending = JoinHandle<Answer>;

    async fn start(limits: Limits) -> Self {
        let peers = World::peers();
        let (a, b, c) = &peers;
        let stats = Arc::new(AdapterStats::default());
        let pacer = relay_adapter::Pacer::new(limits.max_refusals_per_s);
        let node = Node::default();
        let cfg = HttpsConfig {
            identity: b.identity.clone(),
            trust: trusting(&[a, c]),
            listen: "127.0.0.1:0".parse().expect("addr"),
            peers: Default::default(),
            max_body: MAX_BODY,
            request_timeout: NODE_TIMEOUT,
            adapter: AdapterContext {
                limits: limits.clone(),
                stats: stats.clone(),
                pacer: pacer.clone(),
            },
        };
        let (tb, addr) = HttpsTransport::start(cfg, node.clone()).await.expect("b");
        let (inbound, outcomes) = Outcomes::new();
        let cfg = HttpsConfig {
            identity: c.identity.clone(),
            trust: trusting(&[b]),
            listen: "127.0.0.1:0".parse().expect("addr"),
            peers: [(b.domain.clone(), addr.into())].into(),
            max_body: MAX_BODY,
            request_timeout: WAIT,
            adapter: AdapterContext::default(),
        };
        let (tc, _) = HttpsTransport::start(cfg, inbound).await.expect("c");
        let world = World::new(
            Self::KIND,
            peers,
            (stats, pacer),
            node,
            Box::new(tc),
            outcomes,
        );
        Https {
            world,
            b: tb,
            addr,
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
        let me = self.peer(who);
        let tls = self
            .tls(&me, who.source(), b"h2")
            .await
            .map_err(|e| match e {
                e if closed_before_tls(&e) => Answer::RefusedBeforeTls,
                e => Answer::Other(format!("tls: {e}")),
            })?;
        // From here on a failure is b closing an authenticated connection: the binding's
        // refusal of a peer over its connection cap.
        let (mut h2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|_| Answer::TooManyConnections)?;
        tokio::spawn(conn);
        let hello = http::Request::builder()
            .uri(format!(
                "https://b.example{}",
                mimi_wire::endpoint::DIRECTORY_PATH
            ))
            .header("from", format!("mimi@{}", me.domain))
            .body(Full::new(Bytes::new()).boxed())
            .expect("request");
        match timeout(WAIT, h2.send_request(hello)).await {
            Ok(Ok(r)) if r.status() == 200 => Ok(Conn { h2, me }),
            Ok(Ok(r)) => Err(Answer::Other(format!("directory answered {}", r.status()))),
            Ok(Err(_)) => Err(Answer::TooManyConnections),
            Err(_) => Err(Answer::Other("no answer".into())),
        }
    }

    async fn send(&mut self, conn: &mut Self::Conn, seq: u64, body: Vec<u8>) -> Self::Pending {
        let req = Https::notify(&conn.me, seq, Full::new(Bytes::from(body)).boxed());
        let mut h2 = conn.h2.clone();
        tokio::spawn(async move { answer(h2.send_request(req).await).await })
    }

    async fn answer(&mut self, _: &mut Self::Conn, pending: Self::Pending) -> Answer {
        timeout(WAIT, pending)
            .await
            .expect("answered in time")
            .expect("request task")
    }

    async fn stall(&mut self, conn: &mut Self::Conn) -> Answer {
        let (feed, rx) = mpsc::channel(1);
        let mut req = Https::notify(&conn.me, 1, Fed(rx).boxed());
        req.headers_mut()
            .insert("content-length", http::HeaderValue::from(100));
        feed.send(Bytes::from_static(b"0123456789"))
            .await
            .expect("feed");
        let answer = timeout(WAIT, async {
            answer(conn.h2.send_request(req).await).await
        })
        .await
        .unwrap_or(Answer::Other("not cut in time".into()));
        drop(feed);
        answer
    }

    async fn garbage_after_auth(&mut self) -> Answer {
        let a = self.world.a.clone();
        let mut tls = self
            .tls(&a, Who::A.source(), b"http/1.1")
            .await
            .expect("tls");
        tls.write_all(b"\x01\x02 this is not http\r\n\r\n")
            .await
            .expect("write");
        let seen = until_closed(&mut tls).await;
        if seen.starts_with(b"HTTP/1.1 400") {
            Answer::Malformed
        } else {
            Answer::Other(String::from_utf8_lossy(&seen).into_owned())
        }
    }

    async fn garbage_before_auth(&mut self) {
        let mut tcp = tcp_from(IMPOSTOR_SOURCE, self.addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: b.example\r\n\r\n")
            .await
            .expect("write");
        let seen = until_closed(&mut tcp).await;
        assert!(
            !seen.starts_with(b"HTTP"),
            "b answered plain HTTP before TLS"
        );
    }

    async fn failed_handshake(&mut self) {
        let impostor = self.impostor.clone();
        // TLS 1.3: the client may finish before b refuses its certificate; then b closes.
        if let Ok(mut tls) = self.tls(&impostor, IMPOSTOR_SOURCE, b"h2").await {
            let _ = until_closed(&mut tls).await;
        }
    }

    async fn shutdown(self) {
        self.world.honest.shutdown().await;
        self.b.shutdown().await;
    }
}
