//! The Matrix federation transport of mimi-relay: MIMI requests as EDUs inside X-Matrix-signed
//! federation transactions (the binding is specified in ARCHITECTURE.md, "Matrix binding").
//!
//! # Contract
//!
//! [`MatrixTransport::start`] binds an HTTPS listener and starts one task per configured peer.
//! It implements [`relay_adapter::Transport`] (kind [`TransportKind::Matrix`]).
//!
//! **Serving.** The relay is a Matrix federation server for [`MatrixConfig::server_name`]:
//! - `GET /_matrix/key/v2/server`: its ed25519 verify key, self-signed, valid one week;
//! - `GET /_matrix/federation/v1/version`;
//! - `PUT /_matrix/federation/v1/send/{txnId}`: the request must carry an `Authorization:
//!   X-Matrix` header naming a configured peer as origin, us (or nobody) as destination, and a
//!   valid signature by one of the origin's keys. Keys are fetched from the peer's key endpoint
//!   (over TLS with the peer's pinned certificate) and cached. Refusals use the codes a
//!   homeserver gives, before anything is delivered: body over [`wire::MAX_TXN_BODY`] or an
//!   event over 65,536 bytes → 413 `M_TOO_LARGE`; not JSON → 400 `M_NOT_JSON`; not an object,
//!   not a transaction, over 50 PDUs / 100 EDUs, malformed MIMI EDUs → 400 `M_BAD_JSON`;
//!   missing or bad signature, unknown origin or key, wrong destination → 401
//!   `M_UNAUTHORIZED`; transaction `origin` other than the signer → 403 `M_FORBIDDEN`.
//!   A transaction id already answered (by origin and id; the last [`server::TXN_MEMORY`] are kept) gets the
//!   stored answer and delivers nothing; one still running is awaited, not run twice.
//!   The MIMI requests of a transaction go to [`Inbound::request`] in transaction order; the
//!   200 answer carries each answer under `org.mimi-relay.responses`. Other EDU types (for
//!   example `m.direct_to_device` from a homeserver) go to [`MatrixConfig::edu_sink`]; PDUs are
//!   ignored (the relay joins no rooms).
//!
//! `/send` does the cheap checks first: the `Authorization` header (at most
//! [`server::MAX_AUTH_HEADER`] bytes and [`server::MAX_AUTH_PARAMS`] parameters) must name a
//! configured peer as origin and us (or nobody) as destination before a byte of the body is
//! read (else 401, the body left unread); then the body (size, deadline, byte budget), JSON
//! (nested at most [`server::MAX_JSON_DEPTH`] deep, else 400 `M_BAD_JSON`), the origin's keys
//! and the signature. Keys are fetched once at a time per origin (other requests wait for that
//! fetch, up to `request_timeout`, then 503); a failed fetch is not repeated for
//! [`server::FAILED_FETCH_TTL`], requests meanwhile get 401.
//!
//! **Budgets** (from [`MatrixConfig::adapter`]). A TCP connection takes a handshake slot
//! (`max_handshakes` node-wide) before TLS, or is closed at once. Matrix authenticates requests,
//! not connections, so a connection keeps that slot until its first verified `/send` binds it
//! to the origin's `max_conns_per_peer` slots (over the cap: 429 `M_LIMIT_EXCEEDED` with
//! `retry_after_ms`); one still unbound after `request_timeout` is closed. Body bytes count
//! from arrival (or the announced `Content-Length`) until the transaction is answered: on a
//! connection bound to the origin, in the origin's `max_peer_bytes`; on any other, in a
//! separate pool per claimed origin, so someone claiming to be a peer can never use up that
//! peer's own share. Over budget: 429 `M_LIMIT_EXCEEDED` (Matrix's own backpressure) with
//! `Retry-After`. A body must arrive within `min(request_timeout, frame_deadline)` (else 408).
//! HTTP/2 allows `min(max_streams_per_conn, MAX_H2_STREAMS)` streams per connection. Failed
//! handshakes are counted and logged at WARN at most once per 10 s.
//!
//! TLS: the listener presents the relay's certificate and asks for no client certificate
//! (Matrix authenticates requests, not connections), so a homeserver can federate with it.
//!
//! **Sending.** One task and one HTTP/1.1 connection per peer; the peer's certificate must be
//! the one pinned for its provider domain. One transaction is in flight per destination, as
//! the Matrix spec requires; transmits queued meanwhile are packed into the next transaction
//! (at most 100 EDUs; a transmit over 45,000 bytes becomes several fragments in one
//! transaction; one that needs more than 100 is answered 413 locally so the core halves its
//! batch), which is built and signed while the previous one is out. Bodies are written as
//! canonical JSON, so they are signed as bytes, without a JSON tree. [`Transport::send`] never blocks: a full queue ([`PEER_QUEUE`]) answers
//! [`TransportError::Busy`]. Every transmit gets one outcome: its answer from the `/send`
//! response; a refused transaction maps to 403 (401/403), 413, 503 (429, with
//! `retry_after_ms`) or its status; connect failure → `Unreachable`; a broken connection →
//! `ConnectionLost`; no answer within `request_timeout` → `Timeout`. A failed transaction is
//! not retried by the adapter: the core's timers re-send, and its sequence numbers and
//! submission window make that idempotent.
//!
//! Payload bytes are never logged.

pub mod client;
pub mod keys;
pub mod server;
pub mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use relay_adapter::peers::PeerTasks;
use relay_adapter::{Inbound, Transport};
use relay_core::transport::{Transmit, TransportError, TransportKind};
use relay_tls::{PeerTrust, TlsError, TlsIdentity};
use ruma::OwnedServerName;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::info;

pub use keys::SigningKey;

/// How many jobs may wait for one peer's task before `send` answers `Busy`.
pub const PEER_QUEUE: usize = 4096;
/// HTTP/2 streams per connection at most, whatever `max_streams_per_conn` says: every open
/// stream may hold a body in assembly.
pub const MAX_H2_STREAMS: u32 = 64;
/// At most one failed-handshake warning per this interval; the rest are counted.
const HANDSHAKE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One peer: where to reach it and its Matrix server name.
#[derive(Clone, Debug)]
pub struct MatrixPeer {
    pub server_name: String,
    /// Resolved again at every connection attempt.
    pub addr: relay_adapter::PeerAddr,
}

/// An EDU of a type other than the binding's, received in a verified transaction.
#[derive(Debug, Clone)]
pub struct ReceivedEdu {
    pub origin: String,
    pub edu_type: String,
    pub content: Box<RawValue>,
}

/// Counters, readable at any time.
#[derive(Debug, Default)]
pub struct MatrixStats {
    pub txns_sent: AtomicU64,
    pub edus_sent: AtomicU64,
    pub txns_received: AtomicU64,
    pub edus_received: AtomicU64,
    /// Transactions answered from the stored answer (retries).
    pub replayed: AtomicU64,
    /// Transactions refused before delivery.
    pub rejected: AtomicU64,
    /// Time spent verifying X-Matrix signatures, in nanoseconds.
    pub verify_ns: AtomicU64,
}

/// Everything the Matrix adapter needs.
pub struct MatrixConfig {
    /// The TLS certificate and key we present; the key of client connections too.
    pub identity: TlsIdentity,
    /// Pinned certificates of the peers, by provider domain.
    pub trust: PeerTrust,
    pub signing_key: SigningKey,
    /// Our Matrix server name (the provider domain, or `host:port` for a homeserver test).
    pub server_name: String,
    pub listen: SocketAddr,
    pub peers: BTreeMap<ProviderDomain, MatrixPeer>,
    pub request_timeout: Duration,
    /// Where EDUs of other types go; dropped if `None`.
    pub edu_sink: Option<mpsc::UnboundedSender<ReceivedEdu>>,
    /// Per-peer budgets and refusal counters shared with the other adapters.
    pub adapter: relay_adapter::AdapterContext,
}

impl fmt::Debug for MatrixConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatrixConfig")
            .field("server_name", &self.server_name)
            .field("key_id", &self.signing_key.id())
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Why the adapter could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MatrixError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid tls configuration")]
    Tls(#[from] TlsError),
    #[error("cannot build the tls server configuration")]
    Rustls(#[source] rustls::Error),
    #[error("{0:?} is not a matrix server name")]
    ServerName(String),
    #[error("matrix transport must start inside a tokio runtime")]
    NoRuntime,
}

/// The running Matrix adapter. See the crate docs for the contract.
pub struct MatrixTransport {
    server_name: OwnedServerName,
    local_addr: SocketAddr,
    /// The listener, one task per peer, and the outcomes reported without a peer.
    tasks: PeerTasks<client::Job>,
    stats: Arc<MatrixStats>,
}

impl fmt::Debug for MatrixTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatrixTransport")
            .field("server_name", &self.server_name)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

fn server_name(s: &str) -> Result<OwnedServerName, MatrixError> {
    OwnedServerName::try_from(s.to_owned()).map_err(|_| MatrixError::ServerName(s.to_owned()))
}

impl MatrixTransport {
    /// Binds the listener and starts the tasks; returns the transport and the bound address.
    pub async fn start<I: Inbound>(
        config: MatrixConfig,
        inbound: I,
    ) -> Result<(MatrixTransport, SocketAddr), MatrixError> {
        // Checked first: every task below is spawned on the current runtime.
        tokio::runtime::Handle::try_current().map_err(|_| MatrixError::NoRuntime)?;
        let MatrixConfig {
            identity,
            trust,
            signing_key,
            server_name: ours,
            listen,
            peers,
            request_timeout,
            edu_sink,
            adapter,
        } = config;
        let ours = server_name(&ours)?;

        // Presents the identity current at each handshake, so a reload reaches it too.
        let server_tls = relay_tls::server_config_without_client_auth(
            &identity,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )?;
        let client_tls = relay_tls::client_config(&identity, &trust, vec![b"http/1.1".to_vec()])?;
        let connector = TlsConnector::from(client_tls);

        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| MatrixError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| MatrixError::Bind {
            addr: listen,
            source,
        })?;

        let mut dials = BTreeMap::new();
        for (domain, p) in &peers {
            let dial = client::Dial {
                domain: domain.clone(),
                addr: p.addr.clone(),
                server_name: server_name(&p.server_name)?,
                connector: connector.clone(),
                timeout: request_timeout,
            };
            dials.insert(domain.clone(), dial);
        }

        let key = Arc::new(signing_key);
        let stats = Arc::new(MatrixStats::default());
        let mut tasks = PeerTasks::new(inbound.clone());
        let ctx = Arc::new(server::ServerCtx {
            inbound: inbound.clone(),
            server_name: ours.clone(),
            key: key.clone(),
            peers: dials
                .values()
                .map(|d| (d.server_name.clone(), d.clone()))
                .collect(),
            keys: server::KeyCache::default(),
            txns: server::TxnCache::default(),
            edu_sink,
            request_timeout,
            stats: stats.clone(),
            body_deadline: request_timeout.min(adapter.limits.frame_deadline),
            gate: relay_adapter::Gate::new(adapter.limits.clone(), adapter.stats.clone()),
            budget: relay_adapter::ByteBudget::new(
                adapter.limits.max_peer_bytes,
                adapter.stats.clone(),
            ),
            preauth: relay_adapter::ByteBudget::new(
                adapter.limits.max_peer_bytes,
                adapter.stats.clone(),
            ),
            adapter_stats: adapter.stats.clone(),
            pacer: adapter.pacer.clone(),
            handshake_log: relay_adapter::LogLimiter::new(HANDSHAKE_LOG_INTERVAL),
            h2_streams: adapter.limits.max_streams_per_conn.min(MAX_H2_STREAMS),
            cpu: dials
                .values()
                .map(|d| {
                    let slot = || Arc::new(tokio::sync::Semaphore::new(1));
                    (d.server_name.clone(), [slot(), slot()])
                })
                .collect(),
        });
        let gate = ctx.gate.clone();
        let acceptor = TlsAcceptor::from(server_tls);
        let stop = tasks.stopping();
        tasks.spawn_listener(relay_adapter::peers::accept_loop(
            "matrix",
            listener,
            gate,
            tasks.stopping(),
            request_timeout,
            move |tcp, remote, permit| {
                server::serve_conn(
                    ctx.clone(),
                    acceptor.clone(),
                    tcp,
                    remote,
                    permit,
                    stop.clone(),
                )
            },
        ));

        for (domain, dial) in dials {
            let ctx = client::PeerCtx {
                dial,
                origin: ours.clone(),
                key: key.clone(),
                inbound: inbound.clone(),
                stats: stats.clone(),
            };
            tasks.spawn_peer(domain, PEER_QUEUE, |rx, stop| {
                client::run_peer(ctx, rx, stop)
            });
        }
        info!(server = %ours, key = key.id(), addr = %local_addr, peers = tasks.peers().count(), "matrix transport started");
        Ok((
            MatrixTransport {
                server_name: ours,
                local_addr,
                tasks,
                stats,
            },
            local_addr,
        ))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> &MatrixStats {
        &self.stats
    }

    /// Queues an EDU of any type (for example `m.direct_to_device`) for `dest`; it travels in
    /// the same transactions as the MIMI traffic. Resolves once the peer answered the
    /// transaction (200) or it failed.
    pub fn send_edu(
        &self,
        dest: &ProviderDomain,
        edu_type: &str,
        content: Box<RawValue>,
    ) -> oneshot::Receiver<Result<(), TransportError>> {
        let (done, rx) = oneshot::channel();
        let job = client::Job::Edu {
            edu_type: edu_type.to_owned(),
            content,
            done,
        };
        if let Err((job, error)) = self.tasks.queue(dest, job) {
            fail(job, error);
        }
        rx
    }

    /// Stops accepting and sending, finishes what is in flight, then returns. Idempotent.
    pub async fn shutdown(&self) {
        if self.tasks.shutdown().await {
            info!(server = %self.server_name, "matrix transport shut down");
        }
    }
}

fn fail(job: client::Job, e: TransportError) {
    if let client::Job::Edu { done, .. } = job {
        let _ = done.send(Err(e));
    }
}

impl Transport for MatrixTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Matrix
    }

    fn send(&self, transmit: Transmit) {
        self.tasks.send(transmit);
    }

    fn probe(&self, peer: &ProviderDomain) {
        self.tasks.probe(peer);
    }

    fn shutdown(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(MatrixTransport::shutdown(self))
    }
}

/// Entry points for the `cargo fuzz` targets in `fuzz/` (outside the workspace); not an API.
#[doc(hidden)]
pub mod fuzz {
    use crate::server::{MAX_JSON_DEPTH, json_depth_within as depth_within, x_matrix};
    use crate::wire::{
        Assembled, EDU_REQUEST, IncomingTxn, MAX_EDUS, MAX_EVENT_BYTES, MAX_PDUS, Reassembler,
        RequestContent,
    };
    use serde_json::value::RawValue;

    /// The bounded `Authorization: X-Matrix` parser on one header value: (origin, key id,
    /// destination) if it is accepted.
    pub fn x_matrix_header(value: &[u8]) -> Option<(String, String, Option<String>)> {
        let value = http::HeaderValue::from_bytes(value).ok()?;
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value);
        let xm = x_matrix(&headers)?;
        Some((
            xm.origin.to_string(),
            xm.key.to_string(),
            xm.destination.map(|d| d.to_string()),
        ))
    }

    /// The linear JSON depth scan.
    pub fn json_depth_within(text: &[u8], max: usize) -> bool {
        depth_within(text, max)
    }

    /// A `/send` body through the checks `server::send` makes, in its order (the signature
    /// check between them left out): the requests it carries, or why it is refused.
    pub fn send_body(body: &[u8]) -> Result<Vec<Assembled>, String> {
        let raw: &RawValue = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if !raw.get().trim_start().starts_with('{') {
            return Err("not an object".into());
        }
        if !depth_within(body, MAX_JSON_DEPTH) {
            return Err("too deep".into());
        }
        let txn: IncomingTxn<'_> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if txn.pdus.len() > MAX_PDUS || txn.edus.len() > MAX_EDUS {
            return Err("too many".into());
        }
        if txn.pdus.iter().any(|p| p.get().len() > MAX_EVENT_BYTES) {
            return Err("pdu too large".into());
        }
        let mut reassembler = Reassembler::default();
        for edu in &txn.edus {
            if edu.content.get().len() + edu.edu_type.len() + 30 > MAX_EVENT_BYTES {
                return Err("edu too large".into());
            }
            if edu.edu_type == EDU_REQUEST {
                let c: RequestContent =
                    serde_json::from_str(edu.content.get()).map_err(|e| e.to_string())?;
                reassembler.push(c).map_err(|e| e.to_string())?;
            }
        }
        reassembler.finish().map_err(|e| e.to_string())
    }
}
