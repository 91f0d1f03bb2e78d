//! The XMPP driver: hand-written XML streams over mutual TLS (direct mode), with stream
//! management enabled as the adapter's own initiator does.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use relay_adapter::{AdapterContext, AdapterStats, Limits};
use relay_core::transport::{Status, TransportKind};
use relay_xmpp::{ALPN, XmppConfig, XmppTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::driver::Driver;
use crate::support::{
    Answer, Backpressure, IMPOSTOR_SOURCE, MAX_BODY, NODE_TIMEOUT, Node, Outcomes, Peer, ROOM,
    WAIT, Who, World, closed_before_tls, tcp_from, trusting,
};

pub struct Xmpp {
    world: World,
    b: XmppTransport,
    addr: SocketAddr,
    impostor: Peer,
}

/// One stream of a peer: what it read and has not consumed yet, and answers read while
/// waiting for another.
pub struct Raw {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    seen: String,
    stash: Vec<String>,
    me: String,
}

impl Raw {
    async fn write(&mut self, s: &str) -> std::io::Result<()> {
        self.tls.write_all(s.as_bytes()).await?;
        self.tls.flush().await
    }

    /// Reads more; `false` once the stream ended.
    async fn read_more(&mut self) -> bool {
        let mut buf = vec![0u8; 65536];
        match timeout(WAIT, self.tls.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => false,
            Ok(Ok(n)) => {
                self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                true
            }
            Err(_) => panic!("nothing from b in time; read so far: {}", self.seen),
        }
    }

    /// The condition of the stream error b ended the stream with, if it did: the element in
    /// the stream errors' namespace (RFC 6120 section 4.9.3).
    fn stream_error(&self) -> Option<String> {
        let at = self
            .seen
            .find("xmlns='urn:ietf:params:xml:ns:xmpp-streams'")?;
        let open = self.seen[..at].rfind('<')?;
        Some(self.seen[open + 1..at].trim().to_owned())
    }

    /// Reads until `needle` or a stream error; `Err` carries the condition (or "closed").
    async fn until(&mut self, needle: &str) -> Result<(), String> {
        loop {
            if let Some(cond) = self.stream_error() {
                return Err(cond);
            }
            if let Some(i) = self.seen.find(needle) {
                self.seen.drain(..i + needle.len());
                return Ok(());
            }
            if !self.read_more().await {
                return Err(self.stream_error().unwrap_or_else(|| "closed".into()));
            }
        }
    }

    /// The next whole IQ stanza b sent (answers come in request order).
    async fn next_iq(&mut self) -> Result<String, String> {
        loop {
            if let Some(end) = self.seen.find("</iq>") {
                let stanza: String = self.seen.drain(..end + "</iq>".len()).collect();
                let start = stanza.rfind("<iq").unwrap_or(0);
                return Ok(stanza[start..].to_owned());
            }
            if let Some(cond) = self.stream_error() {
                return Err(cond);
            }
            if !self.read_more().await {
                return Err(self.stream_error().unwrap_or_else(|| "closed".into()));
            }
        }
    }
}

fn attr<'a>(stanza: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}='");
    let rest = &stanza[stanza.find(&key)? + key.len()..];
    Some(&rest[..rest.find('\'')?])
}

/// The answer in this binding's own terms (ARCHITECTURE.md, "The XMPP binding").
fn answer(iq: &str) -> Answer {
    let status = attr(iq, "status").and_then(|s| s.parse::<u16>().ok());
    let kind = attr(iq, "type");
    match (kind, status) {
        (Some("result"), Some(code)) => match Status::from_http_code(code) {
            Some(s) if s.is_success() => {
                Answer::Node(s, attr(iq, "next-seq").and_then(|v| v.parse().ok()))
            }
            _ => Answer::Other(iq.to_owned()),
        },
        (Some("error"), Some(413)) if iq.contains("<policy-violation") => Answer::TooLarge,
        (Some("error"), Some(503))
            if iq.contains("<resource-constraint") && attr(iq, "retry-after-ms").is_some() =>
        {
            Answer::Backpressure
        }
        _ => Answer::Other(iq.to_owned()),
    }
}

/// How a stream ended, in the cases' terms.
fn ended(condition: &str) -> Answer {
    match condition {
        "policy-violation" => Answer::DeadlineCut,
        "not-well-formed" => Answer::Malformed,
        other => Answer::Other(format!("stream ended: {other}")),
    }
}

impl Xmpp {
    async fn tls(
        &self,
        me: &Peer,
        source: std::net::IpAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let cfg = relay_tls::client_config(
            &me.identity,
            &trusting(&[&self.world.b]),
            vec![ALPN.to_vec()],
        )
        .expect("client tls");
        let tcp = tcp_from(source, self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("b.example").expect("name");
        tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
    }
}

impl Driver for Xmpp {
    const KIND: TransportKind = TransportKind::Xmpp;
    const BACKPRESSURE: Backpressure = Backpressure::Refusal;
    type Conn = Raw;
    /// The request's IQ id.
    type Pending = String;

    async fn start(limits: Limits) -> Self {
        let peers = World::peers();
        let (a, b, c) = &peers;
        let stats = Arc::new(AdapterStats::default());
        let pacer = relay_adapter::Pacer::new(limits.max_refusals_per_s);
        let node = Node::default();
        let cfg = XmppConfig {
            identity: b.identity.clone(),
            trust: trusting(&[a, c]),
            listen: "127.0.0.1:0".parse().expect("addr"),
            peers: Default::default(),
            component: None,
            max_body: MAX_BODY,
            request_timeout: NODE_TIMEOUT,
            adapter: AdapterContext {
                limits: limits.clone(),
                stats: stats.clone(),
                pacer: pacer.clone(),
            },
        };
        let (tb, addr) = XmppTransport::start(cfg, node.clone()).await.expect("b");
        let (inbound, outcomes) = Outcomes::new();
        let cfg = XmppConfig {
            identity: c.identity.clone(),
            trust: trusting(&[b]),
            listen: "127.0.0.1:0".parse().expect("addr"),
            peers: [(b.domain.clone(), addr.into())].into(),
            component: None,
            max_body: MAX_BODY,
            request_timeout: WAIT,
            adapter: AdapterContext::default(),
        };
        let (tc, _) = XmppTransport::start(cfg, inbound).await.expect("c");
        let world = World::new(
            Self::KIND,
            peers,
            (stats, pacer),
            node,
            Box::new(tc),
            outcomes,
        );
        Xmpp {
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
        let me = match who {
            Who::A => self.world.a.clone(),
            Who::C => self.world.c.clone(),
        };
        let tls = self.tls(&me, who.source()).await.map_err(|e| match e {
            e if closed_before_tls(&e) => Answer::RefusedBeforeTls,
            e => Answer::Other(format!("tls: {e}")),
        })?;
        let mut raw = Raw {
            tls,
            seen: String::new(),
            stash: Vec::new(),
            me: me.domain.to_string(),
        };
        let from = raw.me.clone();
        raw.write(&format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
             xmlns:stream='http://etherx.jabber.org/streams' from='{from}' to='b.example' \
             version='1.0'><enable xmlns='urn:xmpp:sm:3' resume='true'/>"
        ))
        .await
        .map_err(|e| Answer::Other(e.to_string()))?;
        match raw.until("<enabled").await {
            Ok(()) => Ok(raw),
            Err(cond) if cond == "policy-violation" => Err(Answer::TooManyConnections),
            Err(cond) => Err(Answer::Other(format!("stream ended: {cond}"))),
        }
    }

    async fn send(&mut self, conn: &mut Self::Conn, seq: u64, body: Vec<u8>) -> Self::Pending {
        let id = format!("n{seq}");
        let body = base64::engine::general_purpose::STANDARD.encode(body);
        let me = &conn.me;
        let xml = format!(
            "<iq type='set' id='{id}' from='{me}' to='b.example'><mimi xmlns='urn:mimi-relay:0' \
             endpoint='notify' target='{ROOM}' seq='{seq}'>{body}</mimi></iq>"
        );
        conn.write(&xml).await.expect("write");
        id
    }

    async fn answer(&mut self, conn: &mut Self::Conn, id: Self::Pending) -> Answer {
        let mine = |iq: &String| attr(iq, "id") == Some(id.as_str());
        if let Some(i) = conn.stash.iter().position(mine) {
            return answer(&conn.stash.remove(i));
        }
        loop {
            match conn.next_iq().await {
                Ok(iq) if mine(&iq) => return answer(&iq),
                Ok(iq) => conn.stash.push(iq),
                Err(cond) => return ended(&cond),
            }
        }
    }

    async fn stall(&mut self, conn: &mut Self::Conn) -> Answer {
        conn.write("</").await.expect("write");
        match conn.until("</stream:stream>").await {
            Ok(()) => Answer::Other("stream closed without an error".into()),
            Err(cond) => ended(&cond),
        }
    }

    async fn garbage_after_auth(&mut self) -> Answer {
        let mut raw = self.connect(Who::A).await.expect("a connects");
        raw.write("<<not xml>>").await.expect("write");
        match raw.until("</stream:stream>").await {
            Ok(()) => Answer::Other("stream closed without an error".into()),
            Err(cond) => ended(&cond),
        }
    }

    async fn garbage_before_auth(&mut self) {
        let mut tcp = tcp_from(IMPOSTOR_SOURCE, self.addr).await.expect("connect");
        tcp.write_all(b"<stream:stream to='b.example'>")
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

    async fn failed_handshake(&mut self) {
        let impostor = self.impostor.clone();
        // TLS 1.3: the client may finish before b refuses its certificate; then b closes.
        if let Ok(mut tls) = self.tls(&impostor, IMPOSTOR_SOURCE).await {
            let mut buf = [0u8; 256];
            let _ = timeout(WAIT, tls.read(&mut buf))
                .await
                .expect("closed in time");
        }
    }

    async fn shutdown(self) {
        self.world.honest.shutdown().await;
        self.b.shutdown().await;
    }
}
