//! The HTTPS transport of mimi-relay: the MIMI protocol draft's own binding (protocol-06 §4.1, §5).
//!
//! # Contract
//!
//! [`HttpsTransport::start`] binds a listener and starts one task per configured peer. It
//! implements [`relay_adapter::Transport`] (kind [`TransportKind::Https`]).
//!
//! **Serving.** HTTP/1.1 and HTTP/2 (ALPN `h2`, `http/1.1`; a client that offers no ALPN is
//! served whichever it speaks, told apart by the HTTP/2 preface) over mutual TLS; a connection is
//! kept only if the client certificate authenticates a trusted provider
//! ([`relay_tls::peer_domain`]). Every request must then carry
//! - `Host` (or HTTP/2 `:authority`) naming our provider domain, port ignored: missing → 400,
//!   another name → **421 Misdirected Request** (the request reached a server that cannot answer
//!   for that provider; nothing is wrong with the peer's credentials);
//! - `From: mimi@<domain>` equal to the certificate's provider → else **403**.
//!
//! Routes:
//! - `GET /.well-known/mimi-protocol-directory` → 200, the [`Directory`] JSON for
//!   `https://<our domain>:<bound port>/v1`;
//! - `POST /v1/{endpoint}/{target}` (`GET` for `proxyDownload`, per [`Endpoint::method`]):
//!   `endpoint` is a MIMI endpoint name, `target` its percent-encoded path parameter (a room
//!   URI, user URI or domain). It is strictly percent-decoded into [`Request::target`];
//!   unescaped `/` are accepted as-is. Optional `MIMI-Seq: <u64>` → [`Request::seq`]. The body
//!   goes to [`Inbound::request`] as exact bytes.
//!
//! Answers carry [`Status::http_code`], `MIMI-Next-Seq: <u64>` when the node gave
//! [`Response::next_seq`], `Retry-After: <secs>` (rounded up) for [`Response::retry_after`].
//! Adapter-level refusals answer before the node sees anything, with a [`Rejection`] token as
//! the body: unknown path or endpoint → 404, wrong method → 405, malformed percent-encoding or
//! `MIMI-Seq` → 400, body over `max_body` → 413 (from `Content-Length` before reading, and again
//! while streaming, so a lying client cannot make us buffer more than `max_body`), body not
//! received within `request_timeout` → 408. Every answer leaves the connection usable, except
//! that an HTTP/1.1 body we refused without reading cannot be skipped, so hyper closes that
//! connection after the 413; on HTTP/2 (what peers use) only the stream is reset. The draft
//! names no media type, so bodies are `application/octet-stream` and error reasons `text/plain`.
//!
//! **Budgets** (from [`HttpsConfig::adapter`], one [`relay_adapter::Gate`] and
//! [`relay_adapter::ByteBudget`] per listener). A TCP connection takes a handshake slot
//! (`max_handshakes` node-wide) before TLS starts, or is closed at once; once its certificate
//! names the peer it takes one of the peer's `max_conns_per_peer` slots instead, or is closed.
//! A failed handshake is counted and logged at WARN at most once per 10 s. HTTP/2 connections
//! allow `min(max_streams_per_conn, MAX_H2_STREAMS)` streams. Every body byte read counts in
//! the peer's `max_peer_bytes` from the moment it arrives (or, with `Content-Length`, the whole
//! announced length at once) until the node has answered; a request that would go over is
//! answered **503** `over-budget` with `Retry-After: 1`, and other peers are unaffected. A body
//! must arrive within the shorter of `request_timeout` and `frame_deadline` (else 408). HTTP/2
//! itself buffers at most its adaptive connection window (16 MiB at most) of bytes not yet
//! read per connection.
//!
//! The future of [`Inbound::request`] is dropped if the peer resets the stream or the
//! connection breaks before the answer: the node must not depend on it running to completion.
//!
//! **Sending.** One task per peer. The connection is HTTP/2 when the peer picks `h2` by ALPN
//! (TLS server name = the peer's domain, whose certificate must authenticate that same
//! provider), else HTTP/1.1 (the peer picked it or offers no ALPN) over up to
//! [`MAX_H1_CONNS`] keep-alive connections, each carrying one request at a time; opened on
//! first use and reopened after a failure. Requests for one target (room, user) leave in the
//! order they were sent: on HTTP/2 on the one connection, on HTTP/1.1 always over the same
//! connection of the pool (chosen by the target), each once the one before was answered, so
//! a room's forwarded submissions reach an HTTP/1.1 hub in its clients' order. While requests are open, an HTTP/2 connection from
//! which no frame came for `request_timeout` is pinged and closed if the ping is not acked
//! within as long, so a path that moves nothing is left for a new connection.
//!
//! **The peer's directory** (protocol-06 §5.1) says where each endpoint is: it is fetched
//! (`GET /.well-known/mimi-protocol-directory`, at most 64 KiB) before the first request,
//! kept for the answer's `max-age` (1 min to 24 h, else 1 h), and fetched again after an
//! answer 404 or 421, after a reconnect, and by every probe. A template's one variable gets
//! the percent-encoded target whatever its name; relative URLs resolve against the
//! directory's; an absolute URL must name the peer's domain (we still dial the configured
//! address; `Host`/`:authority` is the URL's host). A peer that answers the directory 404 or
//! with something that is not a JSON object of endpoints gets the draft's
//! `/v1/{endpoint}/{target}`. An endpoint the directory does not list, lists on another host
//! or with an unusable template is never sent: [`TransportError::Unsupported`] (counted in
//! the adapter's stats). A directory fetch that fails otherwise keeps the directory read
//! before for another minute, or fails the transmit with the fetch's outcome.
//!
//! [`Transport::send`] never blocks: a full per-peer queue ([`PEER_QUEUE`] jobs) answers
//! [`TransportError::Busy`]. Each transmit carries `From: mimi@<our domain>`,
//! `Content-Length`, `MIMI-Seq` when set, and the segments streamed without concatenating them
//! into one buffer (segments of 16 KiB or more go out untouched; smaller neighbours are joined
//! into frames of up to 16 KiB, because HTTP/2 servers treat bursts of tiny DATA frames as a
//! flood). Requests leave in send order per peer and their answers are awaited concurrently.
//! Every transmit gets exactly one [`Inbound::outcome`]:
//! - any HTTP answer with a known status → `Ok(Response)`, 429 read as 503; `Retry-After`
//!   (delta-seconds or HTTP-date, at most an hour) → [`Response::retry_after`] (unknown status
//!   or malformed `MIMI-Next-Seq` → `BadResponse`);
//! - unknown destination → `NoRoute`; cannot connect → `Unreachable` (everything queued for that
//!   peer at that moment fails at once; the core's timers decide when to retry);
//! - connection broken before the answer → `ConnectionLost`; no full answer within
//!   `request_timeout` → `Timeout`; after shutdown → `Closed`; endpoint not served by the
//!   peer → `Unsupported`.
//!
//! [`Transport::probe`] fetches the directory over the (possibly new) connection and reports
//! alive when the peer served one or answered that it has none (404).
//!
//! **Shutdown.** [`HttpsTransport::shutdown`] stops accepting, lets open connections finish
//! their in-flight requests (HTTP/2 GOAWAY), carries what is already queued, refuses new
//! sends with `Closed`, and returns when all that is done, each part bounded by
//! `request_timeout`. Dropping the transport without shutdown aborts everything at once; the
//! outcomes still outstanding are then never reported.
//!
//! **Checking a peer.** [`check::check`] reads a peer's directory as the sending side does
//! and asks whether it speaks our sequence extension, for `mimi-relay check-peers`.
//!
//! Payload bytes are never logged. Connects, disconnects and refusals are `tracing` events.

mod body;
pub mod check;
mod client;
mod directory;
mod path;
mod server;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use mimi_wire::endpoint::Directory;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::peers::PeerTasks;
use relay_adapter::{Inbound, Transport};
use relay_core::transport::{Transmit, TransportKind};
use relay_tls::{PeerTrust, TlsError, TlsIdentity};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::info;

#[cfg(doc)]
use mimi_wire::endpoint::Endpoint;
#[cfg(doc)]
use relay_core::transport::{Request, Response, Status, TransportError};

pub use server::Rejection;

/// The adapter's own framing steps (the request target in the path, the body's DATA frames),
/// public for its criterion bench; not a stable API. HTTP/1.1 and HTTP/2 framing proper is
/// hyper's.
#[doc(hidden)]
pub mod framing {
    use bytes::Bytes;

    /// The `/v1/{endpoint}/{target}` path segment of `target`.
    pub fn encode_target(target: &str) -> String {
        crate::path::encode_target(target)
    }

    /// The target of a raw path segment; None if it is refused.
    pub fn decode_target(raw: &str) -> Option<String> {
        crate::path::decode_target(raw).ok()
    }

    /// The DATA frames (HTTP/2) or writes (HTTP/1.1) a body of these segments goes out as.
    pub fn body_frames(segments: Vec<Bytes>) -> Vec<Bytes> {
        crate::body::coalesce(segments)
    }
}

/// Entry points for the `cargo fuzz` targets in `fuzz/` (outside the workspace); not an API.
#[doc(hidden)]
pub mod fuzz {
    use mimi_wire::endpoint::{DIRECTORY_PATH, Endpoint};
    use mimi_wire::uri::ProviderDomain;

    use crate::server::{Rejection, check_from, check_host, header_lineage, header_u64};

    /// What the client makes of a peer's directory document: for each endpoint with a usable
    /// URL, the `Host` it sends and the path of a request for `target`. `None` when the
    /// document is not a directory (the `/v1` fallback).
    pub fn directory_requests(
        body: &[u8],
        peer: &ProviderDomain,
        target: &str,
    ) -> Option<Vec<(Endpoint, String, String)>> {
        let dir = crate::directory::parse(body, peer)?;
        Some(
            Endpoint::ALL
                .into_iter()
                .filter_map(|e| {
                    let r = dir.route(e).ok()?;
                    Some((e, r.authority().to_owned(), r.path(target)))
                })
                .collect(),
        )
    }

    /// What the server reads of a request before its body.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Head {
        Directory,
        WrongMethod(Endpoint),
        Request {
            endpoint: Endpoint,
            target: String,
            seq: Option<u64>,
            lineage: Option<relay_core::Lineage>,
            announced: Option<u64>,
        },
    }

    /// A request's line and headers through the checks `server::route` makes before it
    /// reads the body, in its order: `Host`/`:authority`, `From`, the path, `MIMI-Seq`.
    pub fn request_head<B>(
        req: &http::Request<B>,
        ours: &ProviderDomain,
        peer: &ProviderDomain,
    ) -> Result<Head, Rejection> {
        check_host(req, ours)?;
        check_from(req.headers(), peer)?;
        let path = req.uri().path();
        if path == DIRECTORY_PATH {
            return Ok(Head::Directory);
        }
        let rest = path.strip_prefix("/v1/").ok_or(Rejection::NotFound)?;
        let (name, raw_target) = rest.split_once('/').ok_or(Rejection::NotFound)?;
        let endpoint: Endpoint = name.parse().map_err(|_| Rejection::NotFound)?;
        if req.method().as_str() != endpoint.method() {
            return Ok(Head::WrongMethod(endpoint));
        }
        if raw_target.is_empty() {
            return Err(Rejection::NotFound);
        }
        let target = crate::path::decode_target(raw_target).map_err(|_| Rejection::BadEncoding)?;
        let seq = header_u64(req.headers(), crate::MIMI_SEQ).map_err(|()| Rejection::BadSeq)?;
        let lineage = header_lineage(req.headers())?;
        let announced = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        Ok(Head::Request {
            endpoint,
            target,
            seq,
            lineage,
            announced,
        })
    }
}

/// Request header: the per-(room, destination) sequence number of the first segment.
pub const MIMI_SEQ: &str = "mimi-seq";
/// Response header: the receiver's next expected sequence number.
pub const MIMI_NEXT_SEQ: &str = "mimi-next-seq";
/// Request header, with `MIMI-Seq`: the hub incarnation that numbered the batch.
pub const MIMI_SEQ_INCARNATION: &str = "mimi-seq-incarnation";
/// Request header, with `MIMI-Seq`: the hub incarnation that numbered the event before it.
pub const MIMI_SEQ_PREV_INCARNATION: &str = "mimi-seq-prev-incarnation";
/// Response header, with `MIMI-Next-Seq`: the incarnation of the receiver's last event.
pub const MIMI_NEXT_SEQ_INCARNATION: &str = "mimi-next-seq-incarnation";
/// Media type of request and success bodies; the draft names none.
pub const CONTENT_TYPE_BODY: &str = "application/octet-stream";
/// Media type of error reasons.
pub const CONTENT_TYPE_REASON: &str = "text/plain; charset=utf-8";
/// How many jobs may wait for one peer's task before `send` answers `Busy`.
pub const PEER_QUEUE: usize = 1024;
/// HTTP/1.1 connections to one peer at most (kept alive and reused): a request holds one
/// until its answer is read, so this bounds the requests in flight to a peer without HTTP/2.
/// Each target (room, user) keeps to one of them, so its requests stay in order.
pub const MAX_H1_CONNS: usize = 4;
/// HTTP/2 streams per connection at most, whatever `max_streams_per_conn` says: every open
/// stream may hold a body in assembly.
pub const MAX_H2_STREAMS: u32 = 64;
/// At most one failed-handshake warning per this interval; the rest are counted.
const HANDSHAKE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Everything the HTTPS adapter needs.
pub struct HttpsConfig {
    /// Our provider's certificate and key; its domain is what `Host` must name and what we
    /// send in `From`.
    pub identity: TlsIdentity,
    /// Which peer certificates authenticate which providers.
    pub trust: PeerTrust,
    /// Where to listen; port 0 picks a free one (see the address `start` returns).
    pub listen: SocketAddr,
    /// Where to reach each peer provider (a host name is resolved at every connection
    /// attempt). Others are `NoRoute`.
    pub peers: BTreeMap<ProviderDomain, relay_adapter::PeerAddr>,
    /// Largest request or response body accepted, in bytes.
    pub max_body: usize,
    /// Bounds each outbound request (connect included), each inbound upload and handshake,
    /// and each phase of a graceful shutdown.
    pub request_timeout: Duration,
    /// Per-peer budgets and refusal counters shared with the other adapters.
    pub adapter: relay_adapter::AdapterContext,
}

impl fmt::Debug for HttpsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Identity and trust stay out: key material has no place in logs.
        f.debug_struct("HttpsConfig")
            .field("domain", &self.identity.domain)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("max_body", &self.max_body)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Why the adapter could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpsError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The identity or trust could not be turned into a TLS configuration.
    #[error("invalid tls configuration")]
    Tls(#[from] TlsError),
    /// `start` was not polled inside a tokio runtime.
    #[error("https transport must start inside a tokio runtime")]
    NoRuntime,
}

/// The running HTTPS adapter. See the crate docs for the contract.
pub struct HttpsTransport {
    domain: ProviderDomain,
    local_addr: SocketAddr,
    /// The listener, one task per peer, and the outcomes reported without a peer.
    tasks: PeerTasks<client::Job>,
}

impl fmt::Debug for HttpsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpsTransport")
            .field("domain", &self.domain)
            .field("local_addr", &self.local_addr)
            .field("peers", &self.tasks.peers().collect::<Vec<_>>())
            .field("closed", &self.tasks.is_closed())
            .finish()
    }
}

impl HttpsTransport {
    /// Binds the listener and starts the tasks; returns the transport and the bound address.
    pub async fn start<I: Inbound>(
        config: HttpsConfig,
        inbound: I,
    ) -> Result<(HttpsTransport, SocketAddr), HttpsError> {
        // Checked first: every task below is spawned on the current runtime.
        tokio::runtime::Handle::try_current().map_err(|_| HttpsError::NoRuntime)?;
        let HttpsConfig {
            identity,
            trust,
            listen,
            peers,
            max_body,
            request_timeout,
            adapter,
        } = config;

        let server_tls = relay_tls::server_config(
            &identity,
            &trust,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )?;
        // h2 preferred; a peer that picks HTTP/1.1 or offers no ALPN gets HTTP/1.1.
        let client_tls = relay_tls::client_config(
            &identity,
            &trust,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )?;
        let domain = identity.domain.clone();
        let trust = Arc::new(trust);

        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| HttpsError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| HttpsError::Bind {
            addr: listen,
            source,
        })?;

        let mut tasks = PeerTasks::new(inbound.clone());

        let base = if local_addr.port() == 443 {
            format!("https://{domain}/v1")
        } else {
            format!("https://{domain}:{}/v1", local_addr.port())
        };
        let directory = serde_json::to_vec(&Directory::for_base(&base))
            .map(Bytes::from)
            .unwrap_or_default();
        let server_ctx = Arc::new(server::ServerCtx {
            inbound: inbound.clone(),
            domain: domain.clone(),
            trust: trust.clone(),
            directory,
            max_body,
            request_timeout,
            body_deadline: request_timeout.min(adapter.limits.frame_deadline),
            gate: relay_adapter::Gate::new(adapter.limits.clone(), adapter.stats.clone()),
            budget: relay_adapter::ByteBudget::new(
                adapter.limits.max_peer_bytes,
                adapter.stats.clone(),
            ),
            stats: adapter.stats.clone(),
            pacer: adapter.pacer.clone(),
            handshake_log: relay_adapter::LogLimiter::new(HANDSHAKE_LOG_INTERVAL),
            h2_streams: adapter.limits.max_streams_per_conn.min(MAX_H2_STREAMS),
        });
        let gate = server_ctx.gate.clone();
        let acceptor = TlsAcceptor::from(server_tls);
        let stop = tasks.stopping();
        tasks.spawn_listener(relay_adapter::peers::accept_loop(
            "https",
            listener,
            gate,
            tasks.stopping(),
            request_timeout,
            move |tcp, remote, permit| {
                server::serve_conn(
                    server_ctx.clone(),
                    acceptor.clone(),
                    tcp,
                    remote,
                    permit,
                    stop.clone(),
                )
            },
        ));

        // The domain is a validated DNS name, so it is always a valid header value.
        let from = HeaderValue::try_from(format!("mimi@{domain}"))
            .unwrap_or_else(|_| HeaderValue::from_static("mimi@invalid"));
        let connector = TlsConnector::from(client_tls);
        for (dest, addr) in peers {
            let ctx = client::PeerCtx {
                dest: dest.clone(),
                addr,
                from: from.clone(),
                connector: connector.clone(),
                trust: trust.clone(),
                max_body,
                request_timeout,
                inbound: inbound.clone(),
                stats: adapter.stats.clone(),
                last_answer: Default::default(),
                stale: Default::default(),
                dropped: Default::default(),
            };
            tasks.spawn_peer(dest, PEER_QUEUE, |rx, stop| client::run_peer(ctx, rx, stop));
        }

        info!(%domain, addr = %local_addr, peers = tasks.peers().count(), "https transport started");
        let transport = HttpsTransport {
            domain,
            local_addr,
            tasks,
        };
        Ok((transport, local_addr))
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and sending, finishes what is in flight, then returns. Idempotent.
    pub async fn shutdown(&self) {
        if self.tasks.shutdown().await {
            info!(domain = %self.domain, "https transport shut down");
        }
    }
}

impl Transport for HttpsTransport {
    fn shutdown(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(HttpsTransport::shutdown(self))
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Https
    }

    fn send(&self, transmit: Transmit) {
        self.tasks.send(transmit);
    }

    fn probe(&self, peer: &ProviderDomain) {
        self.tasks.probe(peer);
    }
}
