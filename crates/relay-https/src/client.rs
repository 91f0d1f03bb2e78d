//! The sending side: one task and one HTTP/2 connection per configured peer.
//!
//! The task takes jobs in order from a bounded queue, (re)connects lazily, hands each request
//! to the connection in queue order and awaits the answers concurrently, so many transmits
//! share one connection in flight.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, FROM, RETRY_AFTER};
use http::{HeaderValue, Method, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mimi_wire::endpoint::DIRECTORY_PATH;
use mimi_wire::uri::ProviderDomain;
use relay_adapter::Inbound;
use relay_adapter::peers::PeerJob;
use relay_core::transport::{Response, Status, Transmit, TransportError};
use relay_tls::PeerTrust;
use rustls::pki_types::ServerName;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::body::Segments;
use crate::path::encode_target;
use crate::server::header_u64;
use crate::{CONTENT_TYPE_BODY, MIMI_NEXT_SEQ, MIMI_SEQ};

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
    /// When the peer last answered a request.
    pub(crate) last_answer: std::sync::Mutex<Option<Instant>>,
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

type Sender = http2::SendRequest<Segments>;

/// Runs until the queue is closed (shutdown) and drained, then waits for the answers in flight.
pub(crate) async fn run_peer<I: Inbound>(
    ctx: PeerCtx<I>,
    mut rx: mpsc::Receiver<Job>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ctx = Arc::new(ctx);
    let mut conn: Option<Sender> = None;
    let mut inflight = JoinSet::new();
    let mut closing = false;
    loop {
        tokio::select! {
            job = rx.recv() => match job {
                Some(job) => dispatch(&ctx, job, &mut conn, &mut inflight, &mut rx).await,
                None => break,
            },
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
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

async fn dispatch<I: Inbound>(
    ctx: &Arc<PeerCtx<I>>,
    job: Job,
    conn: &mut Option<Sender>,
    inflight: &mut JoinSet<()>,
    rx: &mut mpsc::Receiver<Job>,
) {
    let sender = match conn {
        Some(s) if !s.is_closed() => s,
        _ => {
            *conn = None;
            match connect(ctx).await {
                Ok(s) => conn.insert(s),
                Err(error) => {
                    warn!(peer = %ctx.dest, addr = %ctx.addr, %error, "https connect failed");
                    // Fail what is queued now instead of retrying the connect once per job;
                    // the core's retry timers decide when to try again.
                    let reason = error.to_string();
                    fail(ctx, job, &reason);
                    while let Ok(job) = rx.try_recv() {
                        fail(ctx, job, &reason);
                    }
                    return;
                }
            }
        }
    };
    match job {
        Job::Transmit(t) => {
            let id = t.id;
            let request = build_transmit(ctx, t);
            // Queued on the connection now, so requests leave in the order they were sent.
            let answer = sender.send_request(request);
            let ctx = ctx.clone();
            inflight.spawn(async move {
                let sent = Instant::now();
                let work = async {
                    let resp = answer.await.map_err(|e| classify(&ctx.dest, &e))?;
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
                }
                ctx.inbound.outcome(id, outcome);
            });
        }
        Job::Probe => {
            let answer = sender.send_request(build_probe(ctx));
            let ctx = ctx.clone();
            inflight.spawn(async move {
                let alive = matches!(
                    tokio::time::timeout(ctx.request_timeout, answer).await,
                    Ok(Ok(resp)) if resp.status() == http::StatusCode::OK
                );
                ctx.inbound.probe_outcome(ctx.dest.clone(), alive);
            });
        }
    }
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
    Http2(hyper::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timed out"),
            ConnectError::Tcp(e) => write!(f, "tcp: {e}"),
            ConnectError::Tls(e) => write!(f, "tls: {e}"),
            ConnectError::WrongPeer(e) => write!(f, "peer certificate: {e}"),
            ConnectError::Http2(e) => write!(f, "http/2 handshake: {e}"),
        }
    }
}

async fn connect<I: Inbound>(ctx: &PeerCtx<I>) -> Result<Sender, ConnectError> {
    tokio::time::timeout(ctx.request_timeout, connect_inner(ctx))
        .await
        .unwrap_or(Err(ConnectError::Timeout))
}

async fn connect_inner<I: Inbound>(ctx: &PeerCtx<I>) -> Result<Sender, ConnectError> {
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
        // black-holed is closed, so the next send (or the core's probe) reconnects instead of
        // waiting on it.
        .keep_alive_interval(ctx.request_timeout)
        .keep_alive_timeout(ctx.request_timeout)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(ConnectError::Http2)?;
    let dest = ctx.dest.clone();
    tokio::spawn(async move {
        match connection.await {
            Ok(()) => debug!(peer = %dest, "https connection closed"),
            Err(error) => info!(peer = %dest, %error, "https connection lost"),
        }
    });
    info!(peer = %ctx.dest, addr = %ctx.addr, "https connected");
    Ok(sender)
}

fn build_transmit<I>(ctx: &PeerCtx<I>, t: Transmit) -> http::Request<Segments> {
    let len = t.body_len();
    let uri = format!(
        "https://{}/v1/{}/{}",
        ctx.dest,
        t.endpoint.as_str(),
        encode_target(&t.target)
    );
    let method = Method::from_bytes(t.endpoint.method().as_bytes()).unwrap_or(Method::POST);
    let mut req = http::Request::new(Segments::new(t.body));
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/"));
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
    req
}

fn build_probe<I>(ctx: &PeerCtx<I>) -> http::Request<Segments> {
    let mut req = http::Request::new(Segments::empty());
    let uri = format!("https://{}{DIRECTORY_PATH}", ctx.dest);
    *req.uri_mut() = uri.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/"));
    req.headers_mut().insert(FROM, ctx.from.clone());
    req
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
    let status = Status::from_http_code(code)
        .ok_or_else(|| TransportError::BadResponse(format!("unexpected status {code}")))?;
    let next_seq = header_u64(&parts.headers, MIMI_NEXT_SEQ)
        .map_err(|()| TransportError::BadResponse("malformed mimi-next-seq".to_owned()))?;
    // Only the delta-seconds form; an HTTP-date is ignored rather than failing the answer.
    let retry_after = header_u64(&parts.headers, RETRY_AFTER.as_str())
        .ok()
        .flatten()
        .map(Duration::from_secs);
    let body: Bytes = match Limited::new(body, max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(TransportError::BadResponse(
                "response body over the limit".to_owned(),
            ));
        }
        Err(_) => return Err(TransportError::ConnectionLost),
    };
    Ok(Response {
        status,
        body,
        next_seq,
        retry_after,
    })
}
