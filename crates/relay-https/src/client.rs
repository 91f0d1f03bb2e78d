//! The sending side: one task per configured peer, over one HTTP/2 connection or a few
//! HTTP/1.1 keep-alive connections (whichever the peer picks by ALPN), with the URLs of the
//! peer's endpoints read from its directory.
//!
//! The task takes jobs in order from a bounded queue, (re)connects lazily, reads the peer's
//! directory when it has none or it is stale, hands each request to a connection in queue
//! order (on HTTP/1.1 to its target's connection, see [`H1Pool`], parking the jobs of a busy
//! one) and awaits the answers concurrently, so many transmits share the connections in
//! flight.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, FROM, HOST, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mimi_wire::endpoint::{DIRECTORY_PATH, Endpoint};
use mimi_wire::uri::ProviderDomain;
use relay_adapter::peers::PeerJob;
use relay_adapter::{AdapterStats, Inbound};
use relay_core::transport::{Response, Status, Transmit, TransportError};
use relay_tls::PeerTrust;
use rustls::pki_types::ServerName;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::body::Segments;
use crate::directory::{self, MAX_DIRECTORY_BYTES, PeerDirectory, Route};
use crate::server::header_u64;
use crate::{
    CONTENT_TYPE_BODY, MAX_H1_CONNS, MIMI_NEXT_SEQ, MIMI_NEXT_SEQ_INCARNATION, MIMI_SEQ,
    MIMI_SEQ_INCARNATION, MIMI_SEQ_PREV_INCARNATION, PEER_QUEUE,
};

/// A `Retry-After` is honoured up to this; a peer cannot park our queues for longer.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// After a failed directory fetch, a directory read before is used this long more.
const STALE_GRACE: Duration = Duration::from_secs(60);

/// Work for a peer task.
#[derive(Debug)]
pub(crate) enum Job {
    Transmit(Transmit),
    Probe,
}

impl PeerJob for Job {
    fn transmit(transmit: Transmit) -> Self {
        Job::Transmit(transmit)
    }

    fn probe() -> Self {
        Job::Probe
    }
}

/// Everything a peer task needs, fixed at start.
pub(crate) struct PeerCtx<I> {
    pub(crate) dest: ProviderDomain,
    /// Resolved again at every connection attempt.
    pub(crate) addr: relay_adapter::PeerAddr,
    /// `mimi@<our domain>`
    pub(crate) from: HeaderValue,
    pub(crate) connector: TlsConnector,
    pub(crate) trust: Arc<PeerTrust>,
    pub(crate) max_body: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) inbound: I,
    pub(crate) stats: Arc<AdapterStats>,
    /// When the peer last answered a request.
    pub(crate) last_answer: std::sync::Mutex<Option<Instant>>,
    /// Set on a 404 or 421 answer: the peer's endpoints may have moved.
    pub(crate) stale: AtomicBool,
    /// Set when an HTTP/1.1 connection to the peer ended: the directory is read again with the
    /// next request (an HTTP/2 reconnect is seen as such).
    pub(crate) dropped: Arc<AtomicBool>,
}

impl<I> PeerCtx<I> {
    fn last_answer(&self) -> Option<Instant> {
        *self
            .last_answer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn answered(&self) {
        *self
            .last_answer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
    }
}

/// The connections to a peer, by the protocol it picked.
enum Link {
    H2(http2::SendRequest<Segments>),
    H1(H1Pool),
}

/// The HTTP/1.1 connections to a peer: [`MAX_H1_CONNS`] slots, each with at most one
/// connection, which carries one request at a time (hyper does not pipeline).
///
/// A target (room, user) always uses the same slot ([`slot_of`]): its requests then leave one
/// after the other, each once the one before was answered, in the order the core handed them
/// over; with `MIMI-Seq`, a queue's `/notify`s rely on that. On HTTP/2 they leave in order on
/// the one connection but may be served concurrently, so the core keeps one forwarded
/// submission per room in flight over HTTPS (`TransportKind::keeps_room_order`). Different targets still spread over the slots, and a job
/// whose slot is busy waits in [`Parked`] while the others' go on.
#[derive(Clone)]
struct H1Pool {
    slots: Arc<[H1Slot]>,
}

struct H1Slot {
    /// The slot's connection while no request holds it.
    idle: std::sync::Mutex<Option<http1::SendRequest<Segments>>>,
    /// One permit: held by the request on the slot's connection until its answer is read.
    busy: Arc<Semaphore>,
}

impl H1Pool {
    fn new() -> Self {
        H1Pool {
            slots: (0..MAX_H1_CONNS)
                .map(|_| H1Slot {
                    idle: Default::default(),
                    busy: Arc::new(Semaphore::new(1)),
                })
                .collect(),
        }
    }

    fn take(&self, slot: usize) -> Option<http1::SendRequest<Segments>> {
        self.slots[slot]
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// The HTTP/1.1 slot of a target; probes and directory reads use the job's slot.
fn slot_of(job: &Job) -> usize {
    use std::hash::{Hash, Hasher};
    match job {
        Job::Transmit(t) => {
            // Fixed keys: the same target maps to the same slot for the life of the task.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            t.target.hash(&mut h);
            (h.finish() % MAX_H1_CONNS as u64) as usize
        }
        Job::Probe => 0,
    }
}

/// A connection ready for one request.
enum Ready {
    H2(http2::SendRequest<Segments>),
    H1(PooledH1),
}

/// An HTTP/1.1 connection taken from its slot; back into it on drop once its answer was read
/// in full (else it is closed: what is left of the answer would be read as the next one).
struct PooledH1 {
    sender: Option<http1::SendRequest<Segments>>,
    pool: H1Pool,
    slot: usize,
    reusable: bool,
    _busy: OwnedSemaphorePermit,
}

impl Drop for PooledH1 {
    fn drop(&mut self) {
        if let Some(s) = self.sender.take()
            && self.reusable
            && !s.is_closed()
        {
            *self.pool.slots[self.slot]
                .idle
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(s);
        }
    }
}

type AnswerFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, hyper::Error>> + Send>>;

impl Ready {
    fn is_h2(&self) -> bool {
        matches!(self, Ready::H2(_))
    }

    /// Queues the request on the connection now (so requests leave in the order they were
    /// sent); the future is its answer.
    fn send(&mut self, req: http::Request<Segments>) -> AnswerFuture {
        match self {
            Ready::H2(s) => Box::pin(s.send_request(req)),
            Ready::H1(p) => match p.sender.as_mut() {
                Some(s) => Box::pin(s.send_request(req)),
                // Never: `sender` is only taken on drop.
                None => Box::pin(std::future::pending()),
            },
        }
    }

    /// The answer was read in full: an HTTP/1.1 connection may carry the next request.
    fn done(&mut self) {
        if let Ready::H1(p) = self {
            p.reusable = true;
        }
    }
}

/// What the peer's directory said, and until when we believe it.
#[derive(Default)]
struct DirCache {
    known: Option<(Known, Instant)>,
    /// The kind last logged, so that each change is logged once.
    logged: Option<bool>,
    /// Endpoints already warned about as unsupported since the directory last changed.
    warned: BTreeSet<Endpoint>,
}

#[derive(Clone, PartialEq, Eq)]
enum Known {
    Directory(PeerDirectory),
    /// The peer serves no directory: the draft's `/v1/...` layout.
    Fallback,
}

/// The result of one directory fetch.
enum Fetched {
    Known(Known, Duration),
    /// No usable answer: the status the peer gave, or why there was none.
    Failed(Result<Response, TransportError>),
}

/// Runs until the queue is closed (shutdown) and drained, then waits for the answers in flight.
pub(crate) async fn run_peer<I: Inbound>(
    ctx: PeerCtx<I>,
    mut rx: mpsc::Receiver<Job>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ctx = Arc::new(ctx);
    let mut link: Option<Link> = None;
    let mut dir = DirCache::default();
    let mut inflight = JoinSet::new();
    let mut parked = Parked::default();
    let mut closing = false;
    let mut open = true;
    while open || parked.len > 0 {
        tokio::select! {
            // Parked jobs count against the queue: past it, `send` answers busy.
            job = rx.recv(), if open && parked.len < PEER_QUEUE => match job {
                Some(job) => {
                    let slot = slot_of(&job);
                    if parked.must_wait(&link, slot) {
                        parked.push(slot, job);
                    } else {
                        dispatch(&ctx, job, &mut link, &mut dir, &mut inflight, &mut rx, &mut parked).await;
                    }
                }
                None => open = false,
            },
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {
                // A request was answered: its slot may be free for the jobs waiting on it.
                while let Some(job) = parked.next_ready(&link) {
                    dispatch(&ctx, job, &mut link, &mut dir, &mut inflight, &mut rx, &mut parked).await;
                }
            }
            _ = shutdown.changed(), if !closing => {
                // New sends are refused from here on; what is queued is still carried.
                closing = true;
                rx.close();
            }
        }
    }
    while inflight.join_next().await.is_some() {}
    debug!(peer = %ctx.dest, "https peer task stopped");
}

/// Jobs whose HTTP/1.1 slot carries a request, in order per slot, so that the peer task goes
/// on with the other slots' jobs meanwhile. Every slot with parked jobs is busy, so a request
/// in flight will wake the task for them.
#[derive(Default)]
struct Parked {
    jobs: [std::collections::VecDeque<Job>; MAX_H1_CONNS],
    len: usize,
}

impl Parked {
    /// Whether a job for `slot` must wait: the slot is busy, or jobs before it wait already.
    fn must_wait(&self, link: &Option<Link>, slot: usize) -> bool {
        !self.jobs[slot].is_empty() || slot_busy(link, slot)
    }

    fn push(&mut self, slot: usize, job: Job) {
        self.jobs[slot].push_back(job);
        self.len += 1;
    }

    /// Every parked job, each slot's in order.
    fn take_all(&mut self) -> Vec<Job> {
        self.len = 0;
        self.jobs.iter_mut().flat_map(|q| q.drain(..)).collect()
    }

    /// The first job of a slot that is free now.
    fn next_ready(&mut self, link: &Option<Link>) -> Option<Job> {
        let slot = (0..MAX_H1_CONNS).find(|&s| !self.jobs[s].is_empty() && !slot_busy(link, s))?;
        self.len -= 1;
        self.jobs[slot].pop_front()
    }
}

fn slot_busy(link: &Option<Link>, slot: usize) -> bool {
    matches!(link, Some(Link::H1(pool)) if pool.slots[slot].busy.available_permits() == 0)
}

async fn dispatch<I: Inbound>(
    ctx: &Arc<PeerCtx<I>>,
    job: Job,
    link: &mut Option<Link>,
    dir: &mut DirCache,
    inflight: &mut JoinSet<()>,
    rx: &mut mpsc::Receiver<Job>,
    parked: &mut Parked,
) {
    let had_h2 = matches!(link, Some(Link::H2(s)) if !s.is_closed());
    let slot = slot_of(&job);
    let mut ready = match checkout(ctx, link, slot).await {
        Ok(r) => r,
        Err(error) => {
            warn!(peer = %ctx.dest, addr = %ctx.addr, %error, "https connect failed");
            // Fail what is queued now instead of retrying the connect once per job;
            // the core's retry timers decide when to try again.
            let reason = error.to_string();
            fail(ctx, job, &reason);
            for job in parked.take_all() {
                fail(ctx, job, &reason);
            }
            while let Ok(job) = rx.try_recv() {
                fail(ctx, job, &reason);
            }
            return;
        }
    };
    // After a reconnect (a new HTTP/2 connection, or an HTTP/1.1 one closed since the last
    // request), on a 404 or 421, or when it expired, the directory is read again.
    let reconnected = ready.is_h2() && !had_h2;
    let refresh = matches!(job, Job::Probe)
        | reconnected
        | ctx.dropped.swap(false, Ordering::Relaxed)
        | ctx.stale.swap(false, Ordering::Relaxed)
        | dir
            .known
            .as_ref()
            .is_none_or(|(_, until)| *until <= Instant::now());
    let mut failed_fetch = None;
    if refresh {
        match fetch_directory(ctx, ready).await {
            Fetched::Known(known, ttl) => dir.learn(ctx, known, ttl),
            Fetched::Failed(outcome) => {
                debug!(peer = %ctx.dest, outcome = ?outcome.as_ref().map(|r| r.status), "directory fetch failed");
                // A directory read before still holds for a while; a peer we never read
                // fails the job with the fetch's outcome.
                if let Some((_, until)) = dir.known.as_mut() {
                    *until = Instant::now() + STALE_GRACE;
                } else {
                    failed_fetch = Some(outcome);
                }
            }
        }
        if let Job::Probe = job {
            let alive = failed_fetch.is_none() && dir.known.is_some();
            ctx.inbound.probe_outcome(ctx.dest.clone(), alive);
            return;
        }
        ready = match checkout(ctx, link, slot).await {
            Ok(r) => r,
            Err(error) => {
                fail(ctx, job, &error.to_string());
                return;
            }
        };
    }
    let Job::Transmit(t) = job else {
        // A probe always refreshes above.
        return;
    };
    if let Some(outcome) = failed_fetch {
        ctx.inbound.outcome(t.id, outcome);
        return;
    }
    let route = match dir.route(ctx, t.endpoint) {
        Ok(route) => route,
        Err(outcome) => {
            ctx.stats.unsupported_endpoint();
            ctx.inbound.outcome(t.id, Err(outcome));
            return;
        }
    };
    let id = t.id;
    let request = build_transmit(ctx, t, &route, ready.is_h2());
    let answer = ready.send(request);
    let ctx = ctx.clone();
    inflight.spawn(async move {
        let sent = Instant::now();
        let work = async {
            let resp = answer.await.map_err(|e| classify(&ctx.dest, &e))?;
            let code = resp.status().as_u16();
            if code == 404 || code == 421 {
                // Maybe the endpoints moved: the next request reads the directory again.
                ctx.stale.store(true, Ordering::Relaxed);
            }
            read_response(resp, ctx.max_body).await
        };
        tokio::pin!(work);
        // The timeout counts from the later of the send and the peer's last answer:
        // a connection that keeps answering is slow (TCP backing off under loss), not
        // dead, and failing this request would only have the core send it again on
        // the same connection.
        let outcome = loop {
            let since = ctx.last_answer().map_or(sent, |t| t.max(sent));
            match tokio::time::timeout_at(since + ctx.request_timeout, &mut work).await {
                Ok(outcome) => break outcome,
                Err(_) if ctx.last_answer().is_some_and(|t| t > since) => {}
                Err(_) => break Err(TransportError::Timeout),
            }
        };
        if outcome.is_ok() {
            ctx.answered();
            ready.done();
        }
        drop(ready);
        ctx.inbound.outcome(id, outcome);
    });
}

impl DirCache {
    fn learn<I>(&mut self, ctx: &PeerCtx<I>, known: Known, ttl: Duration) {
        let has_dir = matches!(known, Known::Directory(_));
        if self.logged != Some(has_dir) {
            match &known {
                Known::Directory(d) => info!(peer = %ctx.dest, endpoints = d.usable(),
                    "peer serves a directory; its endpoints are used"),
                Known::Fallback => info!(peer = %ctx.dest,
                    "peer serves no directory; using the draft's /v1/{{endpoint}}/{{param}} paths"),
            }
            self.logged = Some(has_dir);
        }
        if self.known.as_ref().is_none_or(|(k, _)| *k != known) {
            self.warned.clear();
        }
        self.known = Some((known, Instant::now() + ttl));
    }

    fn route<I>(&mut self, ctx: &PeerCtx<I>, endpoint: Endpoint) -> Result<Route, TransportError> {
        let Some((known, _)) = &self.known else {
            return Ok(Route::fallback(&ctx.dest, endpoint));
        };
        match known {
            Known::Fallback => Ok(Route::fallback(&ctx.dest, endpoint)),
            Known::Directory(d) => d.route(endpoint).map_err(|e| {
                if self.warned.insert(endpoint) {
                    warn!(peer = %ctx.dest, %endpoint, reason = %e, "endpoint not supported by the peer");
                }
                TransportError::Unsupported {
                    endpoint,
                    reason: e.to_string(),
                }
            }),
        }
    }
}

/// `GET /.well-known/mimi-protocol-directory` on the peer, answer bounded in size and time.
async fn fetch_directory<I>(ctx: &PeerCtx<I>, mut ready: Ready) -> Fetched {
    let h2 = ready.is_h2();
    let answer = ready.send(build_probe(ctx, h2));
    let work = async {
        let resp = answer.await.map_err(|e| classify(&ctx.dest, &e))?;
        let (parts, body) = resp.into_parts();
        let body = match Limited::new(body, MAX_DIRECTORY_BYTES).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                return Err(TransportError::BadResponse(
                    "directory over the size limit".to_owned(),
                ));
            }
            Err(_) => return Err(TransportError::ConnectionLost),
        };
        Ok((parts, body))
    };
    let (parts, body) = match tokio::time::timeout(ctx.request_timeout, work).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Fetched::Failed(Err(e)),
        Err(_) => return Fetched::Failed(Err(TransportError::Timeout)),
    };
    ready.done();
    ctx.answered();
    match parts.status.as_u16() {
        200 => match directory::parse(&body, &ctx.dest) {
            Some(d) => Fetched::Known(Known::Directory(d), directory::ttl(&parts.headers)),
            None => Fetched::Known(Known::Fallback, directory::DEFAULT_TTL),
        },
        404 | 410 => Fetched::Known(Known::Fallback, directory::DEFAULT_TTL),
        code => Fetched::Failed(to_response(code, &parts.headers, body)),
    }
}

/// A connection for the next request: the HTTP/2 one, or the HTTP/1.1 one of `slot` (waiting
/// while it carries a request, opening it when there is none).
async fn checkout<I>(
    ctx: &PeerCtx<I>,
    link: &mut Option<Link>,
    slot: usize,
) -> Result<Ready, ConnectError> {
    match link {
        Some(Link::H2(s)) if !s.is_closed() => return Ok(Ready::H2(s.clone())),
        Some(Link::H1(pool)) => {
            let pool = pool.clone();
            let busy = pool.slots[slot]
                .busy
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ConnectError::Timeout)?;
            if let Some(mut s) = pool.take(slot)
                && !s.is_closed()
                && let Ok(Ok(())) = tokio::time::timeout(ctx.request_timeout, s.ready()).await
            {
                return Ok(Ready::H1(PooledH1 {
                    sender: Some(s),
                    pool,
                    slot,
                    reusable: false,
                    _busy: busy,
                }));
            }
            return Ok(match connect(ctx).await? {
                Opened::H1(s) => Ready::H1(PooledH1 {
                    sender: Some(s),
                    pool,
                    slot,
                    reusable: false,
                    _busy: busy,
                }),
                Opened::H2(s) => {
                    *link = Some(Link::H2(s.clone()));
                    Ready::H2(s)
                }
            });
        }
        _ => {}
    }
    *link = None;
    Ok(match connect(ctx).await? {
        Opened::H2(s) => {
            *link = Some(Link::H2(s.clone()));
            Ready::H2(s)
        }
        Opened::H1(s) => {
            let pool = H1Pool::new();
            let busy = pool.slots[slot]
                .busy
                .clone()
                .try_acquire_owned()
                .map_err(|_| ConnectError::Timeout)?;
            *link = Some(Link::H1(pool.clone()));
            Ready::H1(PooledH1 {
                sender: Some(s),
                pool,
                slot,
                reusable: false,
                _busy: busy,
            })
        }
    })
}

fn fail<I: Inbound>(ctx: &PeerCtx<I>, job: Job, reason: &str) {
    match job {
        Job::Transmit(t) => ctx
            .inbound
            .outcome(t.id, Err(TransportError::Unreachable(reason.to_owned()))),
        Job::Probe => ctx.inbound.probe_outcome(ctx.dest.clone(), false),
    }
}

/// Why a connection to a peer could not be set up.
#[derive(Debug)]
enum ConnectError {
    Timeout,
    Tcp(std::io::Error),
    Tls(std::io::Error),
    /// The server's certificate authenticates another provider than the one we dialled.
    WrongPeer(String),
    Http(hyper::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timed out"),
            ConnectError::Tcp(e) => write!(f, "tcp: {e}"),
            ConnectError::Tls(e) => write!(f, "tls: {e}"),
            ConnectError::WrongPeer(e) => write!(f, "peer certificate: {e}"),
            ConnectError::Http(e) => write!(f, "http handshake: {e}"),
        }
    }
}

/// A new connection, in the protocol the peer picked.
enum Opened {
    H2(http2::SendRequest<Segments>),
    H1(http1::SendRequest<Segments>),
}

async fn connect<I>(ctx: &PeerCtx<I>) -> Result<Opened, ConnectError> {
    tokio::time::timeout(ctx.request_timeout, connect_inner(ctx))
        .await
        .unwrap_or(Err(ConnectError::Timeout))
}

async fn connect_inner<I>(ctx: &PeerCtx<I>) -> Result<Opened, ConnectError> {
    let tcp = ctx.addr.connect_tcp().await.map_err(ConnectError::Tcp)?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(ctx.dest.as_str().to_owned())
        .map_err(|e| ConnectError::WrongPeer(e.to_string()))?;
    let tls = ctx
        .connector
        .connect(name, tcp)
        .await
        .map_err(ConnectError::Tls)?;
    // The TLS config already verified the chain for the name dialled; this checks it names
    // that peer by its pin or DNS names.
    let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
    relay_tls::server_is(&ctx.trust, &ctx.dest, certs)
        .map_err(|e| ConnectError::WrongPeer(e.to_string()))?;
    // HTTP/2 only when the server picked it; no ALPN at all means HTTP/1.1 (RFC 9113 §3.3).
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let dest = ctx.dest.clone();
    let opened = if h2 {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Window sized from measured bandwidth-delay: many concurrent notifies share one
            // connection, and the fixed 64 KiB default would throttle them.
            .adaptive_window(true)
            // Our servers allow this many streams: a burst sent before their SETTINGS arrive
            // stays within it instead of being refused.
            .initial_max_send_streams(crate::MAX_H2_STREAMS as usize)
            // While requests are open, a ping goes out after `request_timeout` without a frame
            // from the peer and must be acked within as long. A peer slow to answer still acks
            // (h2 does, not the handler) and keeps its connection; one stuck in TCP backoff or
            // black-holed is closed, so the next send (or the core's probe) reconnects instead
            // of waiting on it.
            .keep_alive_interval(ctx.request_timeout)
            .keep_alive_timeout(ctx.request_timeout)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(ConnectError::Http)?;
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => debug!(peer = %dest, "https connection closed"),
                Err(error) => info!(peer = %dest, %error, "https connection lost"),
            }
        });
        Opened::H2(sender)
    } else {
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(tls))
            .await
            .map_err(ConnectError::Http)?;
        let dropped = ctx.dropped.clone();
        tokio::spawn(async move {
            let result = connection.await;
            dropped.store(true, Ordering::Relaxed);
            match result {
                Ok(()) => debug!(peer = %dest, "https/1.1 connection closed"),
                Err(error) => debug!(peer = %dest, %error, "https/1.1 connection lost"),
            }
        });
        Opened::H1(sender)
    };
    info!(peer = %ctx.dest, addr = %ctx.addr, http = if h2 { "2" } else { "1.1" }, "https connected");
    Ok(opened)
}

fn build_transmit<I>(
    ctx: &PeerCtx<I>,
    t: Transmit,
    route: &Route,
    h2: bool,
) -> http::Request<Segments> {
    let len = t.body_len();
    let method = Method::from_bytes(t.endpoint.method().as_bytes()).unwrap_or(Method::POST);
    let mut req = http::Request::new(Segments::new(t.body));
    *req.method_mut() = method.clone();
    target(&mut req, route.authority(), &route.path(&t.target), h2);
    let h = req.headers_mut();
    h.insert(FROM, ctx.from.clone());
    if method == Method::POST {
        // Announced up front so the receiver can refuse an oversize body before reading it.
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    if len > 0 {
        h.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_BODY));
    }
    if let Some(seq) = t.seq {
        h.insert(MIMI_SEQ, HeaderValue::from(seq));
    }
    if let Some(l) = t.lineage {
        h.insert(MIMI_SEQ_INCARNATION, HeaderValue::from(l.batch));
        h.insert(MIMI_SEQ_PREV_INCARNATION, HeaderValue::from(l.prev));
    }
    req
}

fn build_probe<I>(ctx: &PeerCtx<I>, h2: bool) -> http::Request<Segments> {
    let mut req = http::Request::new(Segments::empty());
    target(&mut req, ctx.dest.as_str(), DIRECTORY_PATH, h2);
    req.headers_mut().insert(FROM, ctx.from.clone());
    req
}

/// HTTP/2 takes the authority from an absolute URI (`:authority`); HTTP/1.1 sends the path
/// alone with a `Host` header.
fn target<B>(req: &mut http::Request<B>, authority: &str, path: &str, h2: bool) {
    let uri = if h2 {
        format!("https://{authority}{path}").parse::<Uri>()
    } else {
        if let Ok(host) = HeaderValue::from_str(authority) {
            req.headers_mut().insert(HOST, host);
        }
        path.parse::<Uri>()
    };
    // Routes are checked to parse when the directory is read; `/` is never reached.
    *req.uri_mut() = uri.unwrap_or_else(|_| Uri::from_static("/"));
}

fn classify(dest: &ProviderDomain, e: &hyper::Error) -> TransportError {
    debug!(peer = %dest, error = %e, "https request failed");
    if e.is_parse() || e.is_parse_status() {
        TransportError::BadResponse(e.to_string())
    } else {
        TransportError::ConnectionLost
    }
}

async fn read_response(
    resp: http::Response<Incoming>,
    max_body: usize,
) -> Result<Response, TransportError> {
    let (parts, body) = resp.into_parts();
    let code = parts.status.as_u16();
    if status_of(code).is_none() {
        return Err(TransportError::BadResponse(format!(
            "unexpected status {code}"
        )));
    }
    let body: Bytes = match Limited::new(body, max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(TransportError::BadResponse(
                "response body over the limit".to_owned(),
            ));
        }
        Err(_) => return Err(TransportError::ConnectionLost),
    };
    to_response(code, &parts.headers, body)
}

/// 429 Too Many Requests is the core's "busy, retry later" like 503.
fn status_of(code: u16) -> Option<Status> {
    match code {
        429 => Some(Status::Unavailable),
        code => Status::from_http_code(code),
    }
}

fn to_response(code: u16, headers: &HeaderMap, body: Bytes) -> Result<Response, TransportError> {
    let status = status_of(code)
        .ok_or_else(|| TransportError::BadResponse(format!("unexpected status {code}")))?;
    let next_seq = header_u64(headers, MIMI_NEXT_SEQ)
        .map_err(|()| TransportError::BadResponse("malformed mimi-next-seq".to_owned()))?;
    let next_inc = header_u64(headers, MIMI_NEXT_SEQ_INCARNATION).map_err(|()| {
        TransportError::BadResponse("malformed mimi-next-seq-incarnation".to_owned())
    })?;
    Ok(Response {
        status,
        body,
        next_seq,
        next_inc,
        retry_after: retry_after(headers, std::time::SystemTime::now()),
    })
}

/// `Retry-After` as delta-seconds or an HTTP-date (RFC 9110 §10.2.3), at most
/// [`MAX_RETRY_AFTER`]; a malformed one is ignored rather than failing the answer.
fn retry_after(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let after = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(after.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_or_date_and_bounded() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&later).unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&past).unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("99999999999"));
        assert_eq!(retry_after(&h, now), Some(MAX_RETRY_AFTER));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn too_many_requests_is_busy() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let r = to_response(429, &h, Bytes::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, Status::Unavailable);
        assert_eq!(r.retry_after, Some(Duration::from_secs(7)));
        // Any other 4xx is the peer's answer; the core decides whether it is final.
        let r = to_response(418, &h, Bytes::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, Status::Other(418));
        assert!(to_response(302, &h, Bytes::new()).is_err());
    }
}
