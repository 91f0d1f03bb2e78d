//! Direct mode: relay-to-relay XML streams over mutual TLS, with XEP-0198 stream management.
//!
//! Each node dials each peer it sends to (the initiator) and answers the streams its peers dial
//! (the responder), as the QUIC adapter does with its connections.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use relay_adapter::Inbound;
use relay_adapter::outcome::OutcomeSink;
use relay_adapter::{
    AdapterContext, AdapterStats, Budget, ByteBudget, Gate, HandshakePermit, LogLimiter,
};
use relay_core::transport::TransportError;
use relay_tls::PeerTrust;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use xmpp_parsers::sm;
use xmpp_parsers::stanza_error::DefinedCondition;
use xmpp_parsers::stream_features::StreamFeatures;

use crate::binding::{self, NS_COMPONENT, NS_SM, NS_STREAM};
use crate::link::{
    Addressing, Command, Ended, HandshakeError, Link, Reader, Sm, Writer, send_last, send_now,
    spawn_writer, token,
};
use crate::scanner::Item;

/// How long a responder keeps a broken session for its initiator to resume.
const RESUME_WINDOW: Duration = Duration::from_secs(crate::RESUME_WINDOW_SECS);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one failed-handshake warning per this interval (each is counted).
const FAILED_HANDSHAKE_LOG: Duration = Duration::from_secs(10);

/// Sends one nonza during the handshake.
fn send(writer: &Writer, e: impl Into<minidom::Element>) -> Result<(), HandshakeError> {
    let mut out = Vec::new();
    binding::write(&mut out, e);
    send_now(writer, out.into())
}

/// Our stream header, sent by both sides.
fn header(from: &str, to: &str, id: Option<&str>) -> Vec<u8> {
    let mut h = Vec::new();
    let _ = write!(
        h,
        "<?xml version='1.0'?><stream:stream xmlns='{NS_COMPONENT}' xmlns:stream='{NS_STREAM}' \
         from='{}' to='{}' version='1.0'",
        binding::escape(from),
        binding::escape(to)
    );
    if let Some(id) = id {
        let _ = write!(h, " id='{id}'");
    }
    h.push(b'>');
    h
}

/// The sending side towards one peer: connects, enables or resumes the session, and keeps
/// resuming it across broken connections until there is nothing left to resume.
pub(crate) struct Initiator<I> {
    pub(crate) link: Link<I>,
    pub(crate) peer: ProviderDomain,
    /// Resolved again at every connection attempt.
    pub(crate) addr: relay_adapter::PeerAddr,
    pub(crate) connector: TlsConnector,
    pub(crate) max_stanza: usize,
    pub(crate) connect_timeout: Duration,
}

impl<I: Inbound> Initiator<I> {
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut failures: u32 = 0;
        loop {
            if !self.link.is_busy() {
                tokio::select! {
                    c = rx.recv() => match c {
                        Some(c) => self.link.backlog.push_back(c),
                        None => return,
                    },
                    _ = stop.changed() => return,
                }
            }
            let connected = tokio::time::timeout(self.connect_timeout, self.connect()).await;
            let (mut reader, writer, wtask) = match connected {
                Ok(Ok(c)) => c,
                Ok(Err(error)) => {
                    failures += 1;
                    tracing::debug!(peer = %self.peer, %error, failures, "xmpp connect failed");
                    self.after_failure(failures, &error.to_string(), &mut rx, &mut stop)
                        .await;
                    continue;
                }
                Err(_) => {
                    failures += 1;
                    self.after_failure(failures, "connect timed out", &mut rx, &mut stop)
                        .await;
                    continue;
                }
            };
            failures = 0;
            let ended = self
                .link
                .drive(&mut reader, &writer, Some(&mut rx), &mut stop)
                .await;
            drop(writer);
            self.link.reset_connection();
            match &ended {
                Ended::Stopped => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), wtask).await;
                    return;
                }
                Ended::Lost(reason) => {
                    tracing::info!(peer = %self.peer, %reason, "xmpp stream lost, resuming");
                }
                other => {
                    // A stream error ends the session: what was in flight is retried by the
                    // core.
                    tracing::warn!(peer = %self.peer, ?other, "xmpp stream ended");
                    self.link.fail_all(&TransportError::ConnectionLost);
                }
            }
            wtask.abort();
        }
    }

    /// After a failed connect: retry soon while the session may still be resumed, give up on
    /// it (failing what it owes) after a few attempts.
    async fn after_failure(
        &mut self,
        failures: u32,
        reason: &str,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        stop: &mut watch::Receiver<bool>,
    ) {
        if failures >= 3 {
            let error = TransportError::Unreachable(reason.to_owned());
            self.link.fail_all(&error);
            while let Ok(c) = rx.try_recv() {
                self.link.backlog.push_back(c);
            }
            self.link.fail_all(&error);
            return;
        }
        let pause = Duration::from_millis(50 << failures);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }

    #[allow(clippy::type_complexity)]
    async fn connect(
        &mut self,
    ) -> Result<
        (
            Reader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>,
            Writer,
            tokio::task::JoinHandle<()>,
        ),
        HandshakeError,
    > {
        let tcp = self.addr.connect_tcp().await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.peer.as_str().to_owned())
            .map_err(|_| HandshakeError::Protocol("peer domain as a tls name"))?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(HandshakeError::Tls)?;
        let (r, w) = tokio::io::split(tls);
        let mut reader = Reader::new(r, self.max_stanza, self.link.limits().max_xml_depth);
        let (writer, wtask) = spawn_writer(w);
        let hello = header(&self.link.addr.local, self.peer.as_str(), None);
        send_now(&writer, hello.into())?;
        let handshake = async {
            match reader.item().await? {
                Item::Header(h) => {
                    let h = binding::parse(&h).map_err(|_| HandshakeError::Protocol("header"))?;
                    if h.attr("from").map(binding::jid_domain).as_deref()
                        != Some(&self.peer.as_str().to_ascii_lowercase())
                    {
                        return Err(HandshakeError::Protocol("header from another domain"));
                    }
                }
                _ => return Err(HandshakeError::Protocol("element before the header")),
            }
            let features = StreamFeatures::try_from(reader.element().await?)
                .map_err(|_| HandshakeError::Protocol("element instead of features"))?;
            if features.stream_management.is_none() {
                return Err(HandshakeError::Protocol("no stream management offered"));
            }
            if let Some(sm) = &self.link.sm {
                let resume = sm::Resume {
                    h: sm.h_in,
                    previd: sm::StreamId(sm.id.clone()),
                };
                send(&writer, resume)?;
                let answer = reader.element().await?;
                if answer.is("resumed", NS_SM) {
                    let resumed = sm::Resumed::try_from(answer).ok();
                    let acked = match (resumed, self.link.sm.as_mut()) {
                        (Some(r), Some(sm)) => sm.ack(r.h),
                        _ => false,
                    };
                    if !acked {
                        return Err(HandshakeError::Protocol("resumed with a bad h"));
                    }
                    tracing::info!(peer = %self.peer, "xmpp session resumed");
                    self.link.resend_unacked();
                    return Ok(());
                }
                if sm::Failed::try_from(answer).is_err() {
                    return Err(HandshakeError::Protocol("answer to resume"));
                }
                // The peer lost the session (it restarted): what we await will not come.
                tracing::info!(peer = %self.peer, "xmpp session not resumable, starting anew");
                self.link.fail_all(&TransportError::ConnectionLost);
            }
            send(&writer, sm::Enable::new().with_resume())?;
            let id = sm::Enabled::try_from(reader.element().await?)
                .ok()
                .and_then(|e| e.id)
                .ok_or(HandshakeError::Protocol("answer to enable"))?;
            self.link.sm = Some(Sm::new(id.0));
            Ok(())
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(())) => Ok((reader, writer, wtask)),
            Ok(Err(e)) => {
                wtask.abort();
                Err(e)
            }
            Err(_) => {
                wtask.abort();
                Err(HandshakeError::Timeout)
            }
        }
    }
}

/// A responder's session between connections.
enum Slot {
    /// A connection is driving it; sending on the channel asks that connection to let go.
    Attached(watch::Sender<bool>),
    Parked(Parked),
}

struct Parked {
    peer: ProviderDomain,
    sm: Sm,
    since: Instant,
    /// Parking order, set by [`Sessions::park`] (instants may tie).
    order: u64,
}

/// Sessions a responder keeps for resumption, by id.
#[derive(Default)]
pub(crate) struct Sessions(
    Mutex<HashMap<String, (ProviderDomain, Slot)>>,
    std::sync::atomic::AtomicU64,
);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ProviderDomain, Slot)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attach(&self, id: &str, peer: &ProviderDomain) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        self.lock()
            .insert(id.to_owned(), (peer.clone(), Slot::Attached(tx)));
        rx
    }

    /// Keeps a broken session for resumption. Each peer keeps at most `max_parked` (its
    /// oldest goes first), so no peer can evict another's sessions.
    fn park(&self, id: &str, mut parked: Parked, max_parked: usize, stats: &AdapterStats) {
        parked.order = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = self.lock();
        map.retain(|_, (_, s)| !matches!(s, Slot::Parked(p) if p.since.elapsed() > RESUME_WINDOW));
        let mut own: Vec<(u64, String)> = map
            .iter()
            .filter_map(|(k, (owner, s))| match s {
                Slot::Parked(p) if *owner == parked.peer => Some((p.order, k.clone())),
                _ => None,
            })
            .collect();
        own.sort();
        let excess = (own.len() + 1).saturating_sub(max_parked.max(1));
        for (_, k) in own.into_iter().take(excess) {
            stats.refused(Budget::Parked);
            map.remove(&k);
        }
        map.insert(id.to_owned(), (parked.peer.clone(), Slot::Parked(parked)));
    }

    /// Sessions parked for `peer` now.
    #[cfg(test)]
    fn parked(&self, peer: &ProviderDomain) -> usize {
        self.lock()
            .values()
            .filter(|(owner, s)| owner == peer && matches!(s, Slot::Parked(_)))
            .count()
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Takes session `id` of `peer` for resumption, asking a connection still attached to it
    /// to let go first.
    async fn take(&self, id: &str, peer: &ProviderDomain) -> Option<Sm> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            {
                let mut map = self.lock();
                match map.get(id) {
                    Some((owner, _)) if owner != peer => return None,
                    None => return None,
                    Some((_, Slot::Attached(tx))) => {
                        let _ = tx.send(true);
                    }
                    Some((_, Slot::Parked(p))) if p.since.elapsed() > RESUME_WINDOW => {
                        map.remove(id);
                        return None;
                    }
                    Some((_, Slot::Parked(_))) => {
                        if let Some((_, Slot::Parked(p))) = map.remove(id) {
                            return Some(p.sm);
                        }
                        return None;
                    }
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub(crate) struct ResponderCtx<I> {
    pub(crate) inbound: I,
    pub(crate) sink: Arc<dyn OutcomeSink>,
    pub(crate) local: ProviderDomain,
    pub(crate) trust: PeerTrust,
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) max_body: usize,
    pub(crate) sessions: Sessions,
    pub(crate) adapter: AdapterContext,
    /// Connection caps: unauthenticated node-wide, then per peer.
    pub(crate) gate: Arc<Gate>,
    /// Bytes of requests at the node, per peer (shared by all of a peer's streams).
    pub(crate) budget: Arc<ByteBudget>,
    pub(crate) failed_log: LogLimiter,
}

impl<I> ResponderCtx<I> {
    fn failed(&self, remote: SocketAddr, error: &dyn std::fmt::Display) {
        relay_adapter::failed_handshake(
            &self.adapter.stats,
            &self.failed_log,
            "xmpp",
            &remote,
            error,
        );
        self.gate.handshake_failed(remote.ip());
    }
}

/// A fresh limiter for failed-handshake warnings.
pub(crate) fn failed_log() -> LogLimiter {
    LogLimiter::new(FAILED_HANDSHAKE_LOG)
}

pub(crate) async fn accept_loop<I: Inbound>(
    listener: TcpListener,
    ctx: Arc<ResponderCtx<I>>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let mut stop_accept = stop.clone();
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop_accept.changed() => return,
        };
        match accepted {
            Ok((tcp, remote)) => {
                // A source under penalty, or over the node's cap on unauthenticated
                // connections: closed at once, before any TLS work.
                let permit = match ctx.gate.admit(remote.ip()) {
                    Ok(permit) => permit,
                    Err(over) => {
                        tracing::debug!(%remote, %over, "xmpp connection refused before tls");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                tokio::spawn(respond(tcp, remote, ctx.clone(), stop.clone(), permit));
            }
            Err(error) => {
                tracing::warn!(%error, "xmpp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn respond<I: Inbound>(
    tcp: TcpStream,
    remote: SocketAddr,
    ctx: Arc<ResponderCtx<I>>,
    mut stop: watch::Receiver<bool>,
    handshake: HandshakePermit,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, ctx.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => return ctx.failed(remote, &error),
        Err(_) => return ctx.failed(remote, &"tls handshake timed out"),
    };
    let peer = match tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or(relay_tls::TlsError::NoPeerCertificate)
        .and_then(|chain| relay_tls::peer_domain(&ctx.trust, chain))
    {
        Ok(peer) => peer,
        Err(error) => {
            ctx.adapter.stats.refused(Budget::Unauthenticated);
            return ctx.failed(remote, &error);
        }
    };
    let (r, w) = tokio::io::split(tls);
    let limits = &ctx.adapter.limits;
    let mut reader = Reader::new(r, binding::max_stanza(ctx.max_body), limits.max_xml_depth);
    let (writer, wtask) = spawn_writer(w);
    let _peer_permit = match ctx.gate.peer(&peer) {
        Ok(permit) => permit,
        Err(over) => {
            // Authenticated but over its connection cap: told so politely, and its retries
            // are refused before TLS for a while.
            ctx.gate.penalize(remote.ip());
            tracing::debug!(%remote, %peer, %over, "refusing inbound xmpp stream");
            let mut out = header(ctx.local.as_str(), peer.as_str(), Some(&token()));
            binding::write_stream_error(&mut out, "policy-violation");
            send_last(&writer, out.into()).await;
            drop(writer);
            let _ = tokio::time::timeout(Duration::from_secs(1), wtask).await;
            return;
        }
    };
    let mut link = Link::new(
        Addressing::direct(&ctx.local, &peer),
        ctx.max_body,
        Some(ctx.inbound.clone()),
        ctx.sink.clone(),
        &ctx.adapter,
        Some(ctx.budget.clone()),
    )
    .paced(ctx.adapter.pacer.clone(), peer.clone());
    let session = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        open(&mut link, &mut reader, &writer, &ctx, &peer),
    )
    .await
    {
        Ok(Ok(session)) => session,
        Ok(Err(Refusal::Stream(cond))) => {
            let mut out = Vec::new();
            binding::write_stream_error(&mut out, cond);
            send_last(&writer, out.into()).await;
            ctx.failed(remote, &format_args!("{peer}: {cond}"));
            drop(writer);
            let _ = tokio::time::timeout(Duration::from_secs(1), wtask).await;
            return;
        }
        Ok(Err(Refusal::Handshake(error))) => {
            tracing::debug!(%remote, %peer, %error, "inbound xmpp stream failed to open");
            return;
        }
        Err(_) => return,
    };
    drop(handshake);
    tracing::info!(%peer, %remote, resumable = session.is_some(), "inbound xmpp stream");
    let mut detach = match &session {
        Some(id) => ctx.sessions.attach(id, &peer),
        None => watch::channel(false).1,
    };
    let ended = tokio::select! {
        ended = link.drive(&mut reader, &writer, None, &mut stop) => ended,
        _ = detach.changed() => Ended::Lost("replaced by a resumption".into()),
    };
    drop(writer);
    link.reset_connection();
    tracing::info!(%peer, %remote, ?ended, "inbound xmpp stream ended");
    match (session, ended) {
        (Some(id), Ended::Lost(_)) => {
            // Keep answering what was asked; the answers wait for the resumption.
            link.settle_serving().await;
            if let Some(sm) = link.sm.take() {
                ctx.sessions.park(
                    &id,
                    Parked {
                        peer,
                        sm,
                        since: Instant::now(),
                        order: 0,
                    },
                    ctx.adapter.limits.max_parked_per_peer,
                    &ctx.adapter.stats,
                );
            }
            wtask.abort();
        }
        (Some(id), _) => {
            ctx.sessions.forget(&id);
            let _ = tokio::time::timeout(Duration::from_secs(1), wtask).await;
        }
        (None, _) => {
            let _ = tokio::time::timeout(Duration::from_secs(1), wtask).await;
        }
    }
}

enum Refusal {
    Stream(&'static str),
    Handshake(HandshakeError),
}

impl From<HandshakeError> for Refusal {
    fn from(e: HandshakeError) -> Self {
        Refusal::Handshake(e)
    }
}

/// The responder's half of opening: check the header, offer stream management, then enable
/// a session or resume one. Returns the session id.
async fn open<I: Inbound, R: tokio::io::AsyncRead + Unpin>(
    link: &mut Link<I>,
    reader: &mut Reader<R>,
    writer: &Writer,
    ctx: &ResponderCtx<I>,
    peer: &ProviderDomain,
) -> Result<Option<String>, Refusal> {
    let h = match reader.item().await {
        Ok(Item::Header(h)) => h,
        Ok(_) => return Err(Refusal::Stream("not-well-formed")),
        Err(HandshakeError::Scan(e)) => return Err(Refusal::Stream(e.condition())),
        Err(e) => return Err(e.into()),
    };
    let h = binding::parse(&h).map_err(|_| Refusal::Stream("not-well-formed"))?;
    let local = ctx.local.as_str();
    let mut hello = header(local, peer.as_str(), Some(&token()));
    if h.ns() != NS_STREAM || h.name() != "stream" {
        let _ = send_now(writer, hello.into());
        return Err(Refusal::Stream("invalid-namespace"));
    }
    let features = StreamFeatures {
        stream_management: Some(sm::StreamManagement { optional: false }),
        ..Default::default()
    };
    binding::write(&mut hello, features);
    send_now(writer, hello.into())?;
    // The stream's `from` must be the provider the certificate authenticated.
    if h.attr("from").map(binding::jid_domain) != Some(peer.as_str().to_ascii_lowercase()) {
        return Err(Refusal::Stream("invalid-from"));
    }
    if h.attr("to").map(binding::jid_domain) != Some(local.to_ascii_lowercase()) {
        return Err(Refusal::Stream("host-unknown"));
    }
    loop {
        let e = reader.element().await?;
        if e.is("enable", NS_SM) {
            if sm::Enable::try_from(e).is_err() {
                return Err(Refusal::Stream("bad-format"));
            }
            let id = token();
            link.sm = Some(Sm::new(id.clone()));
            let enabled = sm::Enabled {
                id: Some(sm::StreamId(id.clone())),
                location: None,
                max: None,
                resume: true,
            };
            send(writer, enabled)?;
            return Ok(Some(id));
        }
        if e.is("resume", NS_SM) {
            // A resume we cannot read resumes nothing: it gets `<failed/>` below.
            let resume = sm::Resume::try_from(e).ok();
            let previd = resume
                .as_ref()
                .map(|r| r.previd.0.clone())
                .unwrap_or_default();
            let taken = match &resume {
                Some(r) => ctx.sessions.take(&r.previd.0, peer).await,
                None => None,
            };
            let resumed = match (resume, taken) {
                (Some(r), Some(mut sm)) => sm.ack(r.h).then_some(sm),
                _ => None,
            };
            match resumed {
                Some(sm) => {
                    let mut answer = Vec::new();
                    let resumed = sm::Resumed {
                        h: sm.h_in,
                        previd: sm::StreamId(previd.clone()),
                    };
                    binding::write(&mut answer, resumed);
                    link.sm = Some(sm);
                    link.write_raw(&answer);
                    link.resend_unacked();
                    if let Some(bytes) = link.take_out() {
                        send_now(writer, bytes)?;
                    }
                    return Ok(Some(previd));
                }
                _ => {
                    let failed = sm::Failed {
                        h: None,
                        error: Some(DefinedCondition::ItemNotFound),
                    };
                    send(writer, failed)?;
                    // The initiator goes on with `<enable/>`.
                }
            }
            continue;
        }
        return Err(Refusal::Stream("unsupported-stanza-type"));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parked(peer: &ProviderDomain) -> Parked {
        Parked {
            peer: peer.clone(),
            sm: Sm::new(String::new()),
            since: Instant::now(),
            order: 0,
        }
    }

    #[test]
    fn a_peer_parking_many_sessions_evicts_only_its_own_oldest() {
        let stats = AdapterStats::default();
        let sessions = Sessions::default();
        let a: ProviderDomain = "a.example".parse().unwrap();
        let c: ProviderDomain = "c.example".parse().unwrap();
        sessions.park("c1", parked(&c), 4, &stats);
        for i in 0..100 {
            sessions.park(&format!("a{i}"), parked(&a), 4, &stats);
        }
        assert_eq!(sessions.parked(&a), 4);
        assert_eq!(sessions.parked(&c), 1, "another peer's session survives");
        assert_eq!(stats.refusals(Budget::Parked), 96);
        let map = sessions.lock();
        assert!(map.contains_key("a99") && map.contains_key("a96"));
        assert!(!map.contains_key("a95"), "the oldest went first");
    }
}
