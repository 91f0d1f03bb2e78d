//! The QUIC transport adapter of mimi-relay.
//!
//! Contract:
//! - **Authentication** is mutual TLS from `relay-tls` (pinned peer certificates, ALPN
//!   [`ALPN`], no 0-RTT). A peer's provider domain is its certificate, not its address: an
//!   inbound connection's requests carry the domain `relay_tls::peer_domain` derives from the
//!   verified client certificate, and outbound connections dial the configured address of
//!   `Transmit::dest` with that domain as the TLS server name.
//! - **Streams.** One connection per peer and direction, opened lazily by the first send or
//!   probe and re-opened after loss. Each distinct `Transmit::target` (a room) gets one
//!   long-lived bidirectional stream opened by the sender, so per-room order holds without
//!   head-of-line blocking across rooms. Requests on a stream are pipelined; the receiver
//!   handles them in order through [`Inbound::request`] (at most [`MAX_OUTSTANDING_PER_STREAM`]
//!   at a time, then it stops reading: flow control pushes back) and answers in order. The
//!   byte format is in `FRAMING.md` and [`framing`].
//! - **Outcomes.** Every [`Transmit`] handed to [`Transport::send`] gets exactly one
//!   [`Inbound::outcome`]: the peer's response, or `NoRoute` (unknown peer), `Busy` (more than
//!   [`MAX_IN_FLIGHT_PER_PEER`] unanswered transmits for that peer), `Unreachable` (connect
//!   failed), `ConnectionLost` (the stream or connection died first), `Timeout` (no answer
//!   within `request_timeout` of the `send` call) or `Closed` (after [`QuicTransport::shutdown`]).
//!   Each probe gets exactly one [`Inbound::probe_outcome`].
//! - **Limits.** A received body over `max_body` is never allocated: the request is answered
//!   413 and its bytes are skipped, keeping the stream usable. A malformed frame resets that
//!   stream only; the connection stays up. From `adapter.limits`: a peer may open
//!   `max_streams_per_conn` streams at once per connection and hold `max_conns_per_peer`
//!   connections (the next is closed with [`codes::TOO_MANY_CONNECTIONS`]); the bytes it has
//!   in frames in assembly and in requests awaiting the node's answer, across all its
//!   connections, stay within `max_peer_bytes` (a frame is admitted whole or not read: the
//!   stream stops reading and QUIC flow control pushes back on that peer alone); a frame not
//!   complete `frame_deadline` after it started resets its stream with
//!   [`codes::FRAME_DEADLINE`].
//! - **Before authentication.** At most `max_handshakes` inbound handshakes at once, the rest
//!   refused; from half that many on, an address not yet validated is sent a Retry first
//!   (counted in `AdapterStats::retries_sent`). Failed handshakes are counted and logged at most once per
//!   10 s (`relay_adapter::failed_handshake`).
//! - **Socket.** The endpoint asks the kernel for [`socket::SOCKET_BUFFER`] bytes of UDP
//!   buffer each way, since QUIC's flow control does not stop a burst at the socket; it warns
//!   at start when it gets less.
//! - Payload bytes are passed as [`bytes::Bytes`] and never copied on send; on receive a body
//!   that lies within one QUIC chunk is sliced, not copied. Payloads are never logged.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{TransportConfig, VarInt};
use relay_adapter::outcome::{OutcomeSink, Outcomes, PeerOutcomes};
use relay_adapter::{ByteBudget, Gate};
use relay_adapter::{Inbound, Transport};
use relay_core::transport::{Transmit, TransportKind};
use relay_tls::{PeerTrust, TlsError, TlsIdentity};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

mod client;
mod congestion;
pub mod framing;
mod server;
pub mod socket;
mod stream;

use client::{Command, PeerShared, RoomLink};

/// The ALPN protocol identifier of this adapter.
pub const ALPN: &[u8] = b"mimi-relay/1";

/// How many requests of one stream the receiver handles at once before it stops reading.
pub const MAX_OUTSTANDING_PER_STREAM: usize = 64;

/// How many transmits to one peer may be unanswered before `send` reports `Busy`.
pub const MAX_IN_FLIGHT_PER_PEER: usize = 65_536;

const CONNECTION_WINDOW: u32 = 16 << 20;
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// QUIC application error codes (connection close and stream reset).
pub mod codes {
    /// The endpoint is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// The peer's certificate authenticates no configured provider.
    pub const UNTRUSTED_PEER: u32 = 1;
    /// A stream carried bytes that are not valid frames; that stream is reset.
    pub const FRAME_ERROR: u32 = 2;
    /// The peer already holds `max_conns_per_peer` connections; the new one is closed.
    pub const TOO_MANY_CONNECTIONS: u32 = 3;
    /// A frame was started but not completed within `frame_deadline`; that stream is reset.
    pub const FRAME_DEADLINE: u32 = 4;
}

/// The adapter's configuration.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    pub identity: TlsIdentity,
    pub trust: PeerTrust,
    /// Where to listen; port 0 picks a free port (see the address `start` returns).
    pub listen: SocketAddr,
    /// The UDP address of each peer provider we send to (a host name is resolved at every
    /// dial).
    pub peers: BTreeMap<ProviderDomain, relay_adapter::PeerAddr>,
    /// The largest request or response body accepted from a peer.
    pub max_body: usize,
    /// How long a transmit may wait for its answer, counted from `send`.
    pub request_timeout: Duration,
    /// The congestion controller of every connection.
    pub congestion: Congestion,
    /// Per-peer budgets and refusal counters shared with the other adapters.
    pub adapter: relay_adapter::AdapterContext,
}

/// Which congestion controller quinn runs. Ours defaults to BBR, quinn's to Cubic: Cubic reads
/// every random loss as congestion, and in the lab (benches/results) the relay over QUIC fell
/// from 9,025 msgs/s with BBR to 314 with Cubic at 1% loss and 40 ms RTT, while on clean links
/// neither was ahead beyond run-to-run noise. Quinn marks its BBR experimental; `cubic` stays
/// one setting away (`[quic] congestion`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    NewReno,
    #[default]
    Bbr,
}

impl Congestion {
    pub const ALL: [Congestion; 3] = [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr];

    pub fn as_str(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "new_reno",
            Congestion::Bbr => "bbr",
        }
    }

    /// Sets this controller on `t`.
    pub fn apply(self, t: &mut TransportConfig) {
        use quinn::congestion::{CubicConfig, NewRenoConfig};
        match self {
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
            }
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(congestion::FlooredBbrConfig::default()))
            }
        };
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Congestion::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!("unknown congestion controller {s:?}: expected cubic, new_reno or bbr")
            })
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors starting the adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    #[error("invalid TLS setup")]
    Tls(#[from] TlsError),
    #[error("the TLS configuration cannot be used for QUIC")]
    Crypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

struct PeerHandle {
    tx: mpsc::UnboundedSender<Command>,
    outcomes: Arc<PeerOutcomes>,
}

/// The running QUIC adapter. Dropping it closes the endpoint; [`QuicTransport::shutdown`]
/// does so gracefully.
pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    gate: Arc<Gate>,
    budget: Arc<ByteBudget>,
    peers: BTreeMap<ProviderDomain, PeerHandle>,
    outcomes: Outcomes<RoomLink>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicTransport")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .field("closed", &self.outcomes.is_closed())
            .finish_non_exhaustive()
    }
}

/// The stateless-reset key and the connection-ID key, derived from the node's private key so
/// that they survive a restart: a peer still holding a connection to our previous incarnation
/// gets a valid stateless reset (RFC 9000 section 10.3) on its next packet and reconnects at
/// once, instead of waiting for the idle timeout.
fn restart_keys(identity: &TlsIdentity) -> (ring::hmac::Key, u64) {
    let derive = |label: &[u8]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(label);
        ctx.update(identity.key.secret_der());
        ctx.finish()
    };
    let reset = derive(b"mimi-relay/1 stateless reset key\0");
    let cid = derive(b"mimi-relay/1 connection id key\0");
    let mut k = [0u8; 8];
    k.copy_from_slice(&cid.as_ref()[..8]);
    (
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref()),
        u64::from_le_bytes(k),
    )
}

/// `max_streams` bounds the bidirectional streams the peer may have open at once.
fn transport_config(congestion: Congestion, max_streams: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    congestion.apply(&mut t);
    t.max_idle_timeout(Some(
        VarInt::from_u32(IDLE_TIMEOUT.as_millis() as u32).into(),
    ))
    .keep_alive_interval(Some(KEEP_ALIVE))
    .max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
    .max_concurrent_uni_streams(VarInt::from_u32(0))
    // Bounds what one peer can make us buffer across all its streams (quinn's default is
    // unlimited).
    .receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t
}

impl QuicTransport {
    /// Binds the endpoint, starts accepting peers and returns the adapter with the bound
    /// address. Must be called inside a tokio runtime.
    pub async fn start<I: Inbound>(
        config: QuicConfig,
        inbound: I,
    ) -> Result<(QuicTransport, SocketAddr), QuicError> {
        let alpn = vec![ALPN.to_vec()];
        let server_tls = relay_tls::server_config(&config.identity, &config.trust, alpn.clone())?;
        let client_tls = relay_tls::client_config(&config.identity, &config.trust, alpn)?;
        let limits = &config.adapter.limits;
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
        server.transport_config(Arc::new(transport_config(
            config.congestion,
            limits.max_streams_per_conn,
        )));
        let mut client =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
        // A peer we dial never opens streams towards us.
        client.transport_config(Arc::new(transport_config(config.congestion, 0)));

        let bind_err = |source| QuicError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind_err)?;
        match socket::enlarge_buffers(&socket) {
            Ok(b) => match b.shortfall() {
                None => tracing::debug!(recv = b.recv, send = b.send, "udp socket buffers"),
                Some(advice) => tracing::warn!(recv = b.recv, send = b.send, "{advice}"),
            },
            Err(error) => tracing::warn!(%error, "cannot read the udp socket buffer sizes"),
        }
        let (reset, cid_key) = restart_keys(&config.identity);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset));
        // quinn only answers with a reset for connection IDs its generator recognises, so the
        // generator's key must survive the restart too.
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        let local = endpoint.local_addr().map_err(bind_err)?;
        tracing::info!(%local, domain = %config.identity.domain, "quic adapter listening");

        let (stop, stop_rx) = watch::channel(false);
        let sink: Arc<dyn OutcomeSink> = Arc::new(inbound.clone());
        let (outcomes, deadlines) = Outcomes::new(sink.clone(), config.request_timeout);
        let limits = config.adapter.limits.clone();
        let gate = Gate::new(limits.clone(), config.adapter.stats.clone());
        let budget = ByteBudget::new(limits.max_peer_bytes, config.adapter.stats.clone());
        let mut tasks = vec![
            tokio::spawn(deadlines),
            tokio::spawn(server::accept_loop(
                endpoint.clone(),
                Arc::new(server::ServerCtx::new(
                    inbound,
                    config.trust.clone(),
                    config.max_body,
                    config.adapter.clone(),
                    gate.clone(),
                    budget.clone(),
                )),
            )),
        ];
        let mut peers = BTreeMap::new();
        for (domain, addr) in config.peers {
            let shared = Arc::new(PeerShared {
                domain: domain.clone(),
                sink: sink.clone(),
            });
            let (tx, rx) = mpsc::unbounded_channel();
            let task = client::PeerTask::new(
                shared.clone(),
                addr,
                endpoint.clone(),
                client.clone(),
                config.max_body,
                config.request_timeout,
            );
            tasks.push(tokio::spawn(task.run(rx, stop_rx.clone())));
            let outcomes = outcomes.peer(MAX_IN_FLIGHT_PER_PEER);
            peers.insert(domain, PeerHandle { tx, outcomes });
        }
        let transport = QuicTransport {
            endpoint,
            gate,
            budget,
            peers,
            outcomes,
            stop,
            tasks: Mutex::new(tasks),
        };
        Ok((transport, local))
    }

    /// Inbound connections that have not finished authenticating.
    pub fn handshakes_in_progress(&self) -> usize {
        self.gate.handshakes_in_progress()
    }

    /// Inbound connections `peer` holds now.
    pub fn peer_connections(&self, peer: &ProviderDomain) -> usize {
        self.gate.peer_conns(peer)
    }

    /// Bytes `peer` holds in this adapter now: frames in assembly and requests waiting for
    /// the node's answer.
    pub fn peer_bytes(&self, peer: &ProviderDomain) -> usize {
        self.budget.held(peer)
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Closes every connection, fails what is still queued with `Closed` (unanswered requests
    /// on the wire with `ConnectionLost` or `Closed`), and waits briefly for the peers to
    /// acknowledge the close.
    pub async fn shutdown(&self) {
        self.outcomes.close();
        let _ = self.stop.send(true);
        self.endpoint
            .close(VarInt::from_u32(codes::SHUTDOWN), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        let tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        tracing::info!("quic adapter shut down");
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.outcomes.close();
        let _ = self.stop.send(true);
        self.endpoint
            .close(VarInt::from_u32(codes::SHUTDOWN), b"shutdown");
        if let Ok(tasks) = self.tasks.get_mut() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}

impl Transport for QuicTransport {
    fn shutdown(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(QuicTransport::shutdown(self))
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    fn send(&self, transmit: Transmit) {
        let peer = self.peers.get(&transmit.dest);
        let Some(ticket) =
            self.outcomes
                .issue(&transmit, peer.map(|p| &p.outcomes), RoomLink::default())
        else {
            return;
        };
        if let Some(peer) = peer {
            // On failure the command is dropped and the ticket reports `Closed`/`ConnectionLost`.
            let _ = peer.tx.send(Command::Transmit(transmit, ticket));
        }
    }

    fn probe(&self, peer: &ProviderDomain) {
        let sent = !self.outcomes.is_closed()
            && self
                .peers
                .get(peer)
                .is_some_and(|p| p.tx.send(Command::Probe).is_ok());
        if !sent {
            self.outcomes.sink().probe_outcome(peer.clone(), false);
        }
    }
}
