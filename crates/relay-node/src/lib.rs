//! One mimi-relay node: configuration, the core thread, the transports, the loopback API,
//! metrics and graceful shutdown.
//!
//! Contract: [`Node::start`] validates everything before it listens; once it returns, every
//! configured transport accepts peers and the API serves local clients. A reply that says
//! "accepted" is sent only after the store commit that made it durable. [`Node::shutdown`]
//! stops accepting, lets the core commit what it holds, and returns when it has.

mod api;
pub mod client;
pub mod config;
mod core_loop;
mod ingress;
pub mod metrics;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use relay_adapter::{Inbound, Transport};
use relay_core::{
    MemStore, Relay, RelayConfig, Request, Response, Status, Store, StoreError, TransmitId,
    TransportError, TransportKind,
};
use relay_tls::{PeerTrust, TlsIdentity};
use tokio::sync::{oneshot, watch};
use tracing::{error, info};

pub use api::encode_inbox;
#[doc(hidden)]
pub use api::fuzz;
pub use config::{ConfigError, NodeConfig, StoreKind};
pub use core_loop::StoreStats;
use core_loop::{CoreLoop, Event, Transports};

/// What requests from peers waiting for the core may weigh (see [`request_weight`]) before
/// new ones are answered 503: bounds the memory peers can make us hold.
const MAX_PENDING_WEIGHT: usize = 256 << 20;

/// A request's weight against [`MAX_PENDING_WEIGHT`]: its body plus a fixed overhead, so many
/// small requests count too.
pub(crate) fn request_weight(req: &Request) -> usize {
    req.body.len() + 1024
}

/// Whether the answer to a peer's request turned it away: what [`relay_adapter::Pacer`]
/// counts. An epoch race (`epochTooOld`, `wrongEpoch`), a sequence gap (409) or the node's
/// own trouble (5xx) is no fault of the peer's.
pub(crate) fn is_refusal(endpoint: mimi_wire::endpoint::Endpoint, r: &Response) -> bool {
    use mimi_wire::endpoint::Endpoint;
    use mimi_wire::proto::{
        SubmitMessageResponse, SubmitStatus, UpdateOutcome, UpdateRoomResponse,
    };
    match r.status {
        Status::BadRequest | Status::Forbidden | Status::NotFound | Status::TooLarge => true,
        Status::Ok => match endpoint {
            Endpoint::SubmitMessage => matches!(
                SubmitMessageResponse::decode(&r.body).map(|x| x.status),
                Ok(SubmitStatus::NotAllowed)
            ),
            Endpoint::Update => matches!(
                UpdateRoomResponse::decode(&r.body).map(|x| x.outcome),
                Ok(UpdateOutcome::NotAllowed)
            ),
            _ => false,
        },
        _ => false,
    }
}

/// A node that could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tls")]
    Tls(#[from] relay_tls::TlsError),
    #[error("store at {path}")]
    Store {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("https transport")]
    Https(#[from] relay_https::HttpsError),
    #[error("quic transport")]
    Quic(#[from] relay_quic::QuicError),
    #[error("xmpp transport")]
    Xmpp(#[from] relay_xmpp::XmppError),
    #[error("matrix transport")]
    Matrix(#[from] relay_matrix::MatrixError),
    #[error("matrix signing key")]
    MatrixKey(#[from] relay_matrix::keys::KeyError),
    #[error("transport {0} is not part of this build")]
    NotBuilt(TransportKind),
    #[error("api listener on {addr}")]
    Api {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("room {room}")]
    Room {
        room: String,
        #[source]
        source: relay_core::RoomError,
    },
    #[error("the core thread stopped: {0}")]
    Core(String),
}

/// What the transports call into: requests go through the per-peer fair queue, the rest
/// straight to the core thread.
#[derive(Clone)]
struct NodeInbound {
    tx: Sender<Event>,
    ingress: Arc<ingress::Ingress>,
    /// Slows a peer whose requests keep being refused, before its next one is queued.
    pacer: Arc<relay_adapter::Pacer>,
}

impl Inbound for NodeInbound {
    fn request(&self, req: Request) -> impl Future<Output = Response> + Send {
        let tx = self.tx.clone();
        let ingress = self.ingress.clone();
        let pacer = self.pacer.clone();
        let weight = request_weight(&req);
        async move {
            let (from, endpoint) = (req.from.clone(), req.endpoint);
            // A peer in debt waits here, holding its request (within its byte budget): a
            // flood of refused requests is handled at the pacer's rate, and a flooder that
            // waits for its answers sends no faster than that.
            pacer.pace(&from).await;
            let (reply, rx) = oneshot::channel();
            match ingress.push(weight, (req, reply)) {
                Ok(true) => {
                    if tx.send(Event::Ingress).is_err() {
                        return Response::error(Status::Unavailable, "relay shutting down");
                    }
                }
                Ok(false) => {}
                Err(refused) => {
                    let (why, _) = *refused;
                    let text = match why {
                        ingress::Refused::PeerShare => {
                            pacer.refused(&from);
                            "relay overloaded by this peer's requests"
                        }
                        ingress::Refused::Total => "relay overloaded",
                    };
                    let mut r = Response::error(Status::Unavailable, text);
                    r.retry_after = Some(Duration::from_secs(1));
                    return r;
                }
            }
            let r = rx
                .await
                .unwrap_or_else(|_| Response::error(Status::Unavailable, "relay shutting down"));
            if is_refusal(endpoint, &r) {
                pacer.refused(&from);
            }
            r
        }
    }

    fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
        let _ = self.tx.send(Event::Outcome { id, outcome });
    }

    fn probe_outcome(&self, peer: ProviderDomain, alive: bool) {
        let _ = self.tx.send(Event::Probe { peer, alive });
    }
}

/// What [`Node::reload_tls`] reads again, and the live handles every adapter's TLS config
/// was built from.
struct Tls {
    cfg: NodeConfig,
    identity: TlsIdentity,
    trust: PeerTrust,
}

/// Our identity and the trust of every peer, read from the files `cfg` names: pinned
/// certificates (`cert`), CA bundles (`ca`), or the system roots for peers with neither.
pub fn load_tls(cfg: &NodeConfig) -> Result<(TlsIdentity, PeerTrust), relay_tls::TlsError> {
    let identity = TlsIdentity::load(cfg.domain.clone(), &cfg.cert, &cfg.key)?;
    let mut trust = PeerTrust::new();
    let mut system = false;
    for p in &cfg.peers {
        match (&p.cert, &p.ca) {
            (Some(cert), _) => trust.load_pem(p.domain.clone(), cert)?,
            (None, Some(ca)) => trust.load_ca(p.domain.clone(), ca)?,
            (None, None) => {
                trust.add_system(p.domain.clone());
                system = true;
            }
        }
    }
    if system {
        let n = trust.load_system_roots()?;
        tracing::debug!(roots = n, "system root certificates loaded");
    }
    Ok((identity, trust))
}

/// Days left below which our own or a pinned certificate is warned about.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// Logs certificates that are expired or about to be: ours, and the peers' pinned ones.
fn warn_expiry(identity: &TlsIdentity, trust: &PeerTrust) {
    for (whose, days) in metrics::tls_days_left(identity, trust) {
        if days < 0 {
            tracing::error!(certificate = %whose, "certificate has expired: peers will refuse it");
        } else if days < EXPIRY_WARNING_DAYS {
            tracing::warn!(certificate = %whose, days, "certificate expires in {days} days");
        }
    }
}

/// A running node.
pub struct Node {
    pub domain: ProviderDomain,
    pub admin: SocketAddr,
    /// The bound address of each transport, by kind.
    pub listening: BTreeMap<TransportKind, SocketAddr>,
    tls: Tls,
    tx: Sender<Event>,
    transports: Arc<Transports>,
    core: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
    api_stop: Option<oneshot::Sender<()>>,
    api_task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("domain", &self.domain)
            .field("admin", &self.admin)
            .finish()
    }
}

impl Node {
    /// Starts a node from a validated config. Must run inside a tokio runtime.
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (identity, trust) = load_tls(&cfg)?;
        warn_expiry(&identity, &trust);

        let mut core_cfg = RelayConfig::new(cfg.domain.clone());
        for p in &cfg.peers {
            core_cfg = core_cfg.with_route(p.domain.clone(), p.transport);
        }
        core_cfg.limits.max_body = cfg.max_body;
        core_cfg.max_queue = cfg.max_queue;
        core_cfg.max_inbox = cfg.max_inbox;
        core_cfg.max_inbox_per_peer = cfg.max_inbox_per_peer;
        core_cfg.max_inbox_memory = match cfg.store {
            StoreKind::Durable => cfg.max_inbox_memory,
            // Nothing to read back from: the inbox stays in memory, bounded by max_inbox.
            StoreKind::Memory => usize::MAX,
        };
        core_cfg.follows = cfg.follows.clone();
        core_cfg
            .pipeline
            .extend(cfg.pipeline.iter().map(|(k, v)| (*k, *v)));
        core_cfg.max_abuse_reports_per_peer = cfg.max_abuse_reports_per_peer;
        core_cfg.max_abuse_bytes_per_peer = cfg.max_abuse_bytes_per_peer;
        core_cfg.max_consent_per_peer = cfg.max_consent_per_peer;
        core_cfg.key_claims_per_minute = cfg.key_claims_per_minute;
        core_cfg.identifier_queries_per_minute = cfg.identifier_queries_per_minute;
        core_cfg.max_dead_letters_per_peer = cfg.max_dead_letters_per_peer;
        // The transports time out unanswered transmits themselves (QUIC counts from the last
        // answer on the room's stream, so a slow link is not taken for a dead one). The core's
        // own deadline only catches a transport that never reports: it must not be the one to
        // fire on a merely congested path, or its re-sends would feed the congestion.
        core_cfg.transmit_timeout = cfg.request_timeout * 4 + Duration::from_secs(1);
        core_cfg.seed = rand_seed();

        let store_path = cfg.data_dir.join("relay.redb");
        let store_err = |source| NodeError::Store {
            path: store_path.display().to_string(),
            source,
        };
        let (tx, rx) = mpsc::channel();
        let (inbox_tx, inbox_rx) = watch::channel(0);
        let ingress = Arc::new(ingress::Ingress::new(
            cfg.adapter_limits.max_peer_bytes.min(MAX_PENDING_WEIGHT),
            MAX_PENDING_WEIGHT,
        ));
        let pacer = relay_adapter::Pacer::new(cfg.adapter_limits.max_refusals_per_s);
        let inbound = NodeInbound {
            tx: tx.clone(),
            ingress: ingress.clone(),
            pacer: pacer.clone(),
        };

        let mut transports = Transports::default();
        let mut listening = BTreeMap::new();
        let mut adapter_stats = BTreeMap::new();
        for (&kind, &listen) in &cfg.listen {
            let peers = cfg
                .peers
                .iter()
                .filter(|p| p.transport == kind)
                .map(|p| (p.domain.clone(), p.address.clone()))
                .collect();
            // One set of refusal counters per transport, so /metrics can tell them apart.
            let adapter = relay_adapter::AdapterContext {
                limits: cfg.adapter_limits.clone(),
                stats: Arc::new(relay_adapter::AdapterStats::default()),
                pacer: pacer.clone(),
            };
            adapter_stats.insert(kind, adapter.stats.clone());
            let (t, addr): (Arc<dyn Transport>, SocketAddr) = match kind {
                TransportKind::Https => {
                    let hc = relay_https::HttpsConfig {
                        identity: identity.clone(),
                        trust: trust.clone(),
                        listen,
                        peers,
                        max_body: cfg.max_body,
                        request_timeout: cfg.request_timeout,
                        adapter: adapter.clone(),
                    };
                    let (t, addr) = relay_https::HttpsTransport::start(hc, inbound.clone()).await?;
                    (Arc::new(t), addr)
                }
                TransportKind::Quic => {
                    let qc = relay_quic::QuicConfig {
                        identity: identity.clone(),
                        trust: trust.clone(),
                        listen,
                        peers,
                        max_body: cfg.max_body,
                        request_timeout: cfg.request_timeout,
                        congestion: cfg.quic_congestion,
                        adapter: adapter.clone(),
                    };
                    let (t, addr) = relay_quic::QuicTransport::start(qc, inbound.clone()).await?;
                    (Arc::new(t), addr)
                }
                TransportKind::Xmpp => {
                    let component = cfg.xmpp.as_ref().map(|x| relay_xmpp::ComponentConfig {
                        server: x.server,
                        jid: x.component.clone(),
                        secret: x.secret.clone(),
                        peers: x.peers.clone(),
                    });
                    let xc = relay_xmpp::XmppConfig {
                        identity: identity.clone(),
                        trust: trust.clone(),
                        listen,
                        peers,
                        component,
                        max_body: cfg.max_body,
                        request_timeout: cfg.request_timeout,
                        adapter: adapter.clone(),
                    };
                    let (t, addr) = relay_xmpp::XmppTransport::start(xc, inbound.clone()).await?;
                    (Arc::new(t), addr)
                }
                TransportKind::Matrix => {
                    // The Matrix server name is the provider domain; the ed25519 signing key
                    // is derived from the TLS key (see relay_matrix::SigningKey::derive).
                    let mc = relay_matrix::MatrixConfig {
                        identity: identity.clone(),
                        trust: trust.clone(),
                        signing_key: relay_matrix::SigningKey::derive(&identity.key)?,
                        server_name: cfg.domain.to_string(),
                        listen,
                        peers: peers
                            .into_iter()
                            .map(|(d, addr): (ProviderDomain, relay_adapter::PeerAddr)| {
                                let server_name = d.to_string();
                                (d, relay_matrix::MatrixPeer { server_name, addr })
                            })
                            .collect(),
                        request_timeout: cfg.request_timeout,
                        edu_sink: None,
                        adapter: adapter.clone(),
                    };
                    let (t, addr) =
                        relay_matrix::MatrixTransport::start(mc, inbound.clone()).await?;
                    (Arc::new(t), addr)
                }
                other => return Err(NodeError::NotBuilt(other)),
            };
            transports.0.insert(kind, t);
            listening.insert(kind, addr);
        }
        let transports = Arc::new(transports);

        let wiring = Wiring {
            rx,
            tx: tx.clone(),
            transports: transports.clone(),
            inbox_durable: inbox_tx,
            ingress: ingress.clone(),
        };
        let core = match cfg.store {
            StoreKind::Durable => {
                std::fs::create_dir_all(&cfg.data_dir)
                    .map_err(|e| store_err(StoreError::new("create data_dir", e)))?;
                let store = open_store(&store_path).await.map_err(store_err)?;
                spawn_core(core_cfg, store, &cfg, wiring)?
            }
            // Nothing outlives the process here, so nothing is kept beside the core's own state.
            StoreKind::Memory => spawn_core(core_cfg, MemStore::discarding(), &cfg, wiring)?,
        };

        let listener = tokio::net::TcpListener::bind(cfg.admin)
            .await
            .map_err(|source| NodeError::Api {
                addr: cfg.admin,
                source,
            })?;
        let admin = listener.local_addr().map_err(|source| NodeError::Api {
            addr: cfg.admin,
            source,
        })?;
        let app = api::router(api::ApiState {
            tx: tx.clone(),
            inbox_durable: inbox_rx,
            max_body: cfg.max_body,
            adapter_stats: Arc::new(adapter_stats),
            ingress,
            tls: api::TlsHandles {
                identity: identity.clone(),
                trust: trust.clone(),
            },
            pacer,
        });
        let (api_stop, stop_rx) = oneshot::channel::<()>();
        let api_task = tokio::spawn(async move {
            // Answers go out at once: a client waits on each one.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stop_rx.await;
            });
            if let Err(e) = serve.await {
                error!(error = %e, "api server failed");
            }
        });
        info!(domain = %cfg.domain, admin = %admin, listen = ?listening, "node started");
        Ok(Node {
            domain: cfg.domain.clone(),
            admin,
            listening,
            tls: Tls {
                cfg,
                identity,
                trust,
            },
            tx,
            transports,
            core: Some(core),
            api_stop: Some(api_stop),
            api_task: Some(api_task),
        })
    }

    /// Stops accepting, lets the core commit, and waits for it.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        for t in self.transports.0.values() {
            t.shutdown().await;
        }
        if let Some(stop) = self.api_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.api_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let _ = self.tx.send(Event::Shutdown);
        let core = self.core.take();
        let joined = tokio::task::spawn_blocking(move || core.map(|c| c.join())).await;
        match joined {
            Ok(Some(Ok(Ok(())))) | Ok(None) => Ok(()),
            Ok(Some(Ok(Err(e)))) => Err(NodeError::Core(e.to_string())),
            Ok(Some(Err(_))) | Err(_) => Err(NodeError::Core("panicked".into())),
        }
    }

    /// Reads our certificate chain and key and every peer's pinned certificates and CA
    /// bundles again (SIGHUP): handshakes from now on use them; connections already open go
    /// on. On any error nothing changes and the error is returned.
    pub fn reload_tls(&self) -> Result<(), NodeError> {
        let (identity, trust) = load_tls(&self.tls.cfg)?;
        self.tls.identity.replace(&identity)?;
        self.tls.trust.replace(&trust);
        warn_expiry(&self.tls.identity, &self.tls.trust);
        info!(peers = trust.domains().len(), "tls certificates reloaded");
        Ok(())
    }

    /// Waits until the core thread stops on its own (a store failure).
    pub fn core_finished(&self) -> bool {
        self.core.as_ref().is_none_or(|c| c.is_finished())
    }
}

/// The channels and handles the core thread is wired to.
struct Wiring {
    rx: mpsc::Receiver<Event>,
    tx: Sender<Event>,
    transports: Arc<Transports>,
    inbox_durable: watch::Sender<u64>,
    ingress: Arc<ingress::Ingress>,
}

fn spawn_core<S: Store + Send + 'static>(
    core_cfg: RelayConfig,
    mut store: S,
    cfg: &NodeConfig,
    w: Wiring,
) -> Result<std::thread::JoinHandle<Result<(), StoreError>>, NodeError> {
    let store_err = |source| NodeError::Store {
        path: cfg.data_dir.display().to_string(),
        source,
    };
    let snapshot = store.load().map_err(store_err)?;
    let records = snapshot.records.clone();
    let mut relay = Relay::new(core_cfg, snapshot, core_loop::now());
    let validator = relay_mls::OpenMlsValidator::for_hub(cfg.domain.as_str());
    relay.set_mls_validator(Box::new(validator), &records);
    relay.handle_hub_secret(&mut store, &records);
    for room in &cfg.rooms {
        relay
            .handle_create_room(&mut store, room.id.clone(), room.followers.clone())
            .map_err(|source| NodeError::Room {
                room: room.id.to_string(),
                source,
            })?;
    }
    match store.commit() {
        Ok(()) => {}
        // The core loop writes it first thing, and waits for space like any commit.
        Err(e) if e.is_storage_full() => {
            tracing::warn!(error = %e, "store out of space at start: starting in the \
                disk-full state")
        }
        Err(e) => return Err(store_err(e)),
    }
    relay.handle_inbox_durable(relay.inbox_next());
    w.inbox_durable.send_replace(relay.inbox_durable());
    let core = CoreLoop {
        relay,
        store,
        rx: w.rx,
        tx: w.tx,
        transports: w.transports,
        inbox_durable: w.inbox_durable,
        store_stats: Default::default(),
        ingress: w.ingress,
    };
    std::thread::Builder::new()
        .name("relay-core".into())
        .spawn(move || core.run())
        .map_err(|e| NodeError::Core(e.to_string()))
}

/// Opens the durable store. Opening needs no new space, except to recover a file that was not
/// closed cleanly; on a full disk that waits for space, saying so once.
async fn open_store(path: &std::path::Path) -> Result<relay_store::DurableStore, StoreError> {
    let mut delay = Duration::from_millis(100);
    let mut said = false;
    loop {
        match relay_store::DurableStore::open(path) {
            Err(e) if e.is_storage_full() => {
                if !said {
                    tracing::warn!(path = %path.display(), error = %e,
                        "the store needs space to recover after an unclean stop: waiting for \
                         space on its disk");
                    said = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Ok(store) => {
                if said {
                    tracing::warn!(path = %path.display(), "store recovered and opened");
                }
                return Ok(store);
            }
            Err(e) => return Err(e),
        }
    }
}

fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Runs a node from `config` until SIGTERM or Ctrl-C, then shuts it down gracefully. SIGHUP
/// reloads the TLS certificates, keys and CA bundles ([`Node::reload_tls`]).
pub async fn run(config: &std::path::Path) -> Result<(), NodeError> {
    let cfg = NodeConfig::load(config)?;
    let node = Node::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| NodeError::Core(format!("cannot install SIGTERM handler: {e}")))?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| NodeError::Core(format!("cannot install SIGHUP handler: {e}")))?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = hup.recv() => {
                if let Err(e) = node.reload_tls() {
                    error!(error = %error_chain(&e), "SIGHUP: tls reload failed; keeping the \
                        certificates in use");
                }
            }
            _ = tokio::signal::ctrl_c() => { info!("interrupt: shutting down"); break; }
            _ = tick.tick() => {
                if node.core_finished() { break; }
            }
        }
    }
    node.shutdown().await
}

/// An error and its causes on one line, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    use mimi_wire::endpoint::Endpoint;
    use relay_core::TransportKind;

    fn dom(s: &str) -> ProviderDomain {
        s.parse().expect("domain")
    }

    fn notify(from: &ProviderDomain) -> Request {
        Request {
            from: from.clone(),
            transport: TransportKind::Https,
            endpoint: Endpoint::Notify,
            target: "mimi://hub.example/r/room".to_owned(),
            seq: Some(1),
            lineage: None,
            body: bytes::Bytes::new(),
        }
    }

    /// The node's inbound with a stand-in core that refuses c.example (403) and takes
    /// everyone else's requests (201).
    fn inbound(rate: u32) -> NodeInbound {
        let (tx, rx) = mpsc::channel::<Event>();
        let ingress = Arc::new(ingress::Ingress::new(1 << 20, 1 << 24));
        let core = ingress.clone();
        std::thread::spawn(move || {
            let mut batch = Vec::new();
            while let Ok(ev) = rx.recv() {
                if matches!(ev, Event::Ingress) {
                    core.pop_batch(usize::MAX, &mut batch);
                    for (req, reply) in batch.drain(..) {
                        let status = if req.from.as_str() == "c.example" {
                            Status::Forbidden
                        } else {
                            Status::Created
                        };
                        let _ = reply.send(Response::new(status, bytes::Bytes::new()));
                    }
                }
            }
        });
        NodeInbound {
            tx,
            ingress,
            pacer: relay_adapter::Pacer::new(rate),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_keeps_being_refused_waits_for_its_next_answer_and_no_other_does() {
        let rate = 10;
        let node = inbound(rate);
        let (b, c) = (dom("b.example"), dom("c.example"));
        // c uses up its burst, then runs a second of refusals into debt.
        for _ in 0..rate * (relay_adapter::REFUSAL_BURST_SECS + 1) {
            let r = node.request(notify(&c)).await;
            assert_eq!(r.status, Status::Forbidden);
        }
        let t0 = tokio::time::Instant::now();
        assert_eq!(node.request(notify(&b)).await.status, Status::Created);
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "b owes nothing and waits for nothing"
        );
        let _ = node.request(notify(&c)).await;
        assert!(
            t0.elapsed() >= Duration::from_millis(900),
            "c waited for its debt: {:?}",
            t0.elapsed()
        );
        assert!(node.pacer.paced() >= 1);
    }

    #[test]
    fn refusals_are_the_peers_fault_and_nothing_else() {
        use mimi_wire::proto::{SubmitMessageResponse, UpdateRoomResponse};
        let r = |s| Response::new(s, bytes::Bytes::new());
        for s in [
            Status::BadRequest,
            Status::Forbidden,
            Status::NotFound,
            Status::TooLarge,
        ] {
            assert!(is_refusal(Endpoint::Notify, &r(s)), "{s:?}");
        }
        for s in [
            Status::Created,
            Status::OutOfOrder,
            Status::Unavailable,
            Status::Internal,
        ] {
            assert!(!is_refusal(Endpoint::Notify, &r(s)), "{s:?}");
        }
        let body = |b: Vec<u8>| Response::new(Status::Ok, bytes::Bytes::from(b));
        let refused = SubmitMessageResponse::not_allowed()
            .encode()
            .expect("encode");
        let accepted = SubmitMessageResponse::accepted(5).encode().expect("encode");
        assert!(is_refusal(Endpoint::SubmitMessage, &body(refused)));
        assert!(!is_refusal(Endpoint::SubmitMessage, &body(accepted)));
        let refused = UpdateRoomResponse::not_allowed("no")
            .encode()
            .expect("encode");
        assert!(is_refusal(Endpoint::Update, &body(refused)));
    }
}
