//! One XMPP session and the loop that drives it over a byte stream, shared by the three roles
//! (direct initiator, direct responder, component).
//!
//! A [`Link`] holds what outlives one TCP connection: the stream-management counters and the
//! stanzas sent but not acknowledged (XEP-0198), the requests we await answers for, and the
//! requests we are answering. [`Link::drive`] runs it over one connection until that ends.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::stream::{FuturesOrdered, StreamExt};
use mimi_wire::uri::ProviderDomain;
use minidom::Element;
use relay_adapter::Inbound;
use relay_adapter::outcome::OutcomeSink;
use relay_adapter::{AdapterContext, AdapterStats, Budget, ByteBudget, Limits, Pacer};
use relay_core::transport::{Request, Response, Status, Transmit, TransportError, TransportKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use xmpp_parsers::sm;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType};

use crate::binding::{self, Hot, Iq, NS_COMPONENT, NS_SM, Stanza};
use crate::scanner::{Item, ScanError, Scanner};

/// Requests of one link being answered at once; beyond it the link stops reading and TCP
/// pushes back.
pub const MAX_SERVING: usize = 256;
/// Transmits to one peer that may be unanswered before `send` reports `Busy`.
pub const MAX_IN_FLIGHT_PER_PEER: usize = 65_536;
/// Commands taken from the queue per write batch.
const MAX_BATCH: usize = 256;
/// With something unanswered, a connection silent for this long is considered dead.
const SILENCE: Duration = Duration::from_secs(5);
/// Chunks queued for a connection's writer task (the channel is bounded).
const WRITE_QUEUE: usize = 8;
/// Output held for a peer whose writer queue is full; past it the link stops reading from
/// that peer (and taking commands for it) until the peer reads.
const MAX_OUT: usize = 256 * 1024;
/// What a request costs in the per-peer byte budget beyond its body (ids, addresses, the
/// answer's framing).
const REQUEST_OVERHEAD: usize = 512;
/// When a peer over its byte budget should try again.
const BUDGET_RETRY: Duration = Duration::from_secs(1);

/// One transmit's right to exactly one outcome.
pub(crate) type Ticket = relay_adapter::outcome::Ticket;

pub(crate) enum Command {
    Transmit(Transmit, Arc<Ticket>),
    Probe(ProviderDomain),
}

enum Awaiting {
    Transmit(Arc<Ticket>),
    Probe(ProviderDomain),
}

/// Who may talk on a link, and under which XMPP address.
#[derive(Clone, Debug)]
pub(crate) struct Addressing {
    /// Our own address, the `from` of what we send.
    pub(crate) local: String,
    /// Peer address domain (lower-case) to provider.
    pub(crate) by_jid: HashMap<String, ProviderDomain>,
    /// Provider to peer address.
    pub(crate) by_domain: HashMap<ProviderDomain, String>,
    /// Direct mode: a stanza from outside `by_jid` is forged and ends the stream
    /// (`invalid-from`). Component mode: the server vouches for `from`, so an unknown sender
    /// only gets its IQ refused.
    pub(crate) strict: bool,
}

impl Addressing {
    pub(crate) fn direct(local: &ProviderDomain, peer: &ProviderDomain) -> Self {
        Addressing {
            local: local.as_str().to_owned(),
            by_jid: HashMap::from([(peer.as_str().to_ascii_lowercase(), peer.clone())]),
            by_domain: HashMap::from([(peer.clone(), peer.as_str().to_owned())]),
            strict: true,
        }
    }
}

/// XEP-0198 state of one session.
#[derive(Debug)]
pub(crate) struct Sm {
    pub(crate) id: String,
    /// Stanzas received and handled.
    pub(crate) h_in: u32,
    /// Stanzas sent (the number of the last one).
    pub(crate) sent: u32,
    /// Sent and not acknowledged, with their numbers.
    pub(crate) unacked: VecDeque<(u32, Bytes)>,
}

impl Sm {
    pub(crate) fn new(id: String) -> Self {
        Sm {
            id,
            h_in: 0,
            sent: 0,
            unacked: VecDeque::new(),
        }
    }

    /// Forgets what the peer has handled; `false` if it claims more than was sent.
    pub(crate) fn ack(&mut self, h: u32) -> bool {
        if h > self.sent {
            return false;
        }
        while self.unacked.front().is_some_and(|(n, _)| *n <= h) {
            self.unacked.pop_front();
        }
        true
    }
}

/// How one connection of a link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The peer closed its stream politely.
    Closed,
    /// The connection broke (read or write failed, or it went silent).
    Lost(String),
    /// We sent a stream error with this condition and closed.
    WeRefused(&'static str),
    /// The peer sent a stream error with this condition.
    PeerRefused(String),
    /// Our side is shutting down.
    Stopped,
}

type Answer = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

/// Bytes a read asks for at least (the scanner's buffer is grown to hold them).
const READ_CHUNK: usize = 64 * 1024;

/// Reads one connection.
pub(crate) struct Reader<R> {
    pub(crate) io: R,
    pub(crate) scanner: Scanner,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// A reader refusing stanzas over `max` bytes (skipped) or nested over `max_depth`.
    pub(crate) fn new(io: R, max: usize, max_depth: usize) -> Self {
        Reader {
            io,
            scanner: Scanner::new(max).with_max_depth(max_depth),
        }
    }

    /// Reads more bytes, straight into the scanner's buffer; `false` at end of input.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let n = self.io.read_buf(self.scanner.read_into(READ_CHUNK)).await?;
        Ok(n > 0)
    }

    /// The next item, reading as needed (for handshakes).
    pub(crate) async fn item(&mut self) -> Result<Item, HandshakeError> {
        loop {
            if let Some(item) = self.scanner.poll_item()? {
                return Ok(item);
            }
            if !self.fill().await? {
                return Err(HandshakeError::Eof);
            }
        }
    }

    /// The next parsed element (for handshakes).
    pub(crate) async fn element(&mut self) -> Result<Element, HandshakeError> {
        match self.item().await? {
            Item::Element(bytes) => {
                let e = binding::parse(&bytes).map_err(|_| HandshakeError::Protocol("xml"))?;
                if let Some(cond) = binding::peer_stream_error(&e) {
                    return Err(HandshakeError::Refused(cond));
                }
                Ok(e)
            }
            Item::Header(_) => Err(HandshakeError::Protocol("second header")),
            Item::TooLarge { .. } => Err(HandshakeError::Protocol("oversize element")),
            Item::End => Err(HandshakeError::Eof),
        }
    }
}

/// Why a stream could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("i/o")]
    Io(#[from] std::io::Error),
    #[error("stream ended during the handshake")]
    Eof,
    #[error("malformed stream")]
    Scan(#[from] ScanError),
    #[error("unexpected {0} during the handshake")]
    Protocol(&'static str),
    #[error("peer refused the stream: {0}")]
    Refused(String),
    #[error("tls")]
    Tls(#[source] std::io::Error),
    #[error("timed out")]
    Timeout,
}

/// Writes whatever the link hands it, in order, on its own task so that reading never waits
/// for a slow write (both peers writing at once cannot deadlock). The queue is bounded: a
/// peer that does not read fills it, and the link then stops reading from that peer.
pub(crate) fn spawn_writer<W: AsyncWrite + Unpin + Send + 'static>(
    mut io: W,
) -> (Writer, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut chunk = first;
            loop {
                if io.write_all(&chunk).await.is_err() {
                    return;
                }
                match rx.try_recv() {
                    Ok(next) => chunk = next,
                    Err(_) => break,
                }
            }
            if io.flush().await.is_err() {
                return;
            }
        }
        let _ = io.shutdown().await;
    });
    (tx, task)
}

/// The sending half of a connection, as the link sees it.
pub(crate) type Writer = mpsc::Sender<Bytes>;

/// Sends one chunk during a handshake, when the writer queue is all but empty.
pub(crate) fn send_now(writer: &Writer, bytes: Bytes) -> Result<(), HandshakeError> {
    writer.try_send(bytes).map_err(|_| HandshakeError::Eof)
}

/// Queues `bytes` and the stream's end, waiting a little for room (the stream ends anyway).
pub(crate) async fn send_last(writer: &Writer, bytes: Bytes) {
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.send(bytes)).await;
}

pub(crate) struct Link<I> {
    pub(crate) addr: Addressing,
    pub(crate) max_body: usize,
    pub(crate) sm: Option<Sm>,
    awaiting: HashMap<String, Awaiting>,
    /// Commands taken while no connection was up.
    pub(crate) backlog: VecDeque<Command>,
    pub(crate) serving: FuturesOrdered<Answer>,
    inbound: Option<I>,
    next_id: u64,
    out: Vec<u8>,
    sink: Arc<dyn OutcomeSink>,
    limits: Limits,
    stats: Arc<AdapterStats>,
    /// Bytes of requests handed to the node and not yet answered, per peer.
    budget: Option<Arc<ByteBudget>>,
    /// On a peer's inbound stream: its refusal budget. The stream is not read while the
    /// peer is in debt, so TCP holds its bytes at its end.
    pacer: Option<(Arc<Pacer>, ProviderDomain)>,
    /// Our requests' addresses, by peer, checked as JIDs once.
    routes: HashMap<ProviderDomain, binding::Route>,
    /// Our answers' addresses, by the `from` they answer (a few: cleared when full).
    answer_routes: HashMap<String, Arc<binding::Route>>,
    /// The hot path's addresses (see [`Link::hot`]): each peer's exact address, if a JID
    /// and one `by_jid` maps to that peer; and ours, if a JID.
    hot_from: HashMap<String, ProviderDomain>,
    hot_to: Option<String>,
}

/// Most answer routes a link keeps (a component's server may route many senders to it).
const MAX_ANSWER_ROUTES: usize = 64;

impl<I: Inbound> Link<I> {
    pub(crate) fn new(
        addr: Addressing,
        max_body: usize,
        inbound: Option<I>,
        sink: Arc<dyn OutcomeSink>,
        adapter: &AdapterContext,
        budget: Option<Arc<ByteBudget>>,
    ) -> Self {
        let is_jid = |s: &str| xmpp_parsers::jid::Jid::new(s).is_ok();
        let routes = addr
            .by_domain
            .iter()
            .map(|(d, to)| (d.clone(), binding::Route::new(&addr.local, to)))
            .collect();
        let hot_from = addr
            .by_domain
            .iter()
            .filter(|(d, jid)| {
                is_jid(jid) && addr.by_jid.get(&binding::jid_domain(jid)) == Some(*d)
            })
            .map(|(d, jid)| (jid.clone(), d.clone()))
            .collect();
        let hot_to = is_jid(&addr.local).then(|| addr.local.clone());
        Link {
            routes,
            answer_routes: HashMap::new(),
            hot_from,
            hot_to,
            addr,
            max_body,
            sm: None,
            awaiting: HashMap::new(),
            backlog: VecDeque::new(),
            serving: FuturesOrdered::new(),
            inbound,
            next_id: 1,
            out: Vec::new(),
            sink,
            limits: adapter.limits.clone(),
            stats: adapter.stats.clone(),
            budget,
            pacer: None,
        }
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts this stream's refusals against `peer` and paces its reading by them.
    pub(crate) fn paced(mut self, pacer: Arc<Pacer>, peer: ProviderDomain) -> Self {
        self.pacer = Some((pacer, peer));
        self
    }

    /// A request of the peer's refused here (the node counts the core's refusals).
    fn refused_peer(&self) {
        if let Some((p, peer)) = &self.pacer {
            p.refused(peer);
        }
    }

    /// Whether more of our own stanzas may be sent: the peer has acknowledged enough. Half
    /// of `max_unacked`, so that a peer answering as fast as it can never pushes our
    /// answers it has not yet acknowledged past `max_unacked` on its side.
    fn has_window(&self) -> bool {
        let window = (self.limits.max_unacked / 2).max(1);
        self.sm.as_ref().is_none_or(|s| s.unacked.len() < window) && self.out.len() < MAX_OUT
    }

    /// Whether anything is owed to or by the peer.
    pub(crate) fn is_busy(&self) -> bool {
        !self.awaiting.is_empty()
            || !self.backlog.is_empty()
            || self.sm.as_ref().is_some_and(|s| !s.unacked.is_empty())
    }

    /// Fails everything we await and forgets the session: nothing of it will be resent.
    pub(crate) fn fail_all(&mut self, error: &TransportError) {
        self.sm = None;
        for (_, a) in self.awaiting.drain() {
            match a {
                Awaiting::Transmit(t) => t.finish(Err(error.clone())),
                Awaiting::Probe(p) => self.sink.probe_outcome(p, false),
            }
        }
        for c in self.backlog.drain(..) {
            match c {
                Command::Transmit(_, t) => t.finish(Err(error.clone())),
                Command::Probe(p) => self.sink.probe_outcome(p, false),
            }
        }
    }

    /// Queues one stanza for writing, numbering it when stream management is on.
    fn emit(&mut self, stanza: Vec<u8>) {
        match &mut self.sm {
            Some(sm) => {
                sm.sent = sm.sent.wrapping_add(1);
                self.out.extend_from_slice(&stanza);
                sm.unacked.push_back((sm.sent, Bytes::from(stanza)));
            }
            None => self.out.extend_from_slice(&stanza),
        }
    }

    /// Queues again every stanza not acknowledged (after a resumption).
    pub(crate) fn resend_unacked(&mut self) {
        if let Some(sm) = &self.sm {
            for (_, s) in &sm.unacked {
                self.out.extend_from_slice(s);
            }
            if !sm.unacked.is_empty() {
                self.request_ack();
            }
        }
    }

    fn request_ack(&mut self) {
        if self.sm.is_some() {
            binding::write_ack_request(&mut self.out);
        }
    }

    /// The addresses of our answers to a stanza from `from`.
    fn answer_route(&mut self, from: &str) -> Arc<binding::Route> {
        if let Some(r) = self.answer_routes.get(from) {
            return r.clone();
        }
        if self.answer_routes.len() >= MAX_ANSWER_ROUTES {
            self.answer_routes.clear();
        }
        let r = Arc::new(binding::Route::new(&self.addr.local, from));
        self.answer_routes.insert(from.to_owned(), r.clone());
        r
    }

    pub(crate) fn write_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    pub(crate) fn take_out(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.out)))
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Transmit(t, ticket) => {
                if ticket.is_done() {
                    return; // timed out while queued: do not send it late
                }
                let Some(route) = self.routes.get(&t.dest) else {
                    ticket.finish(Err(TransportError::NoRoute(t.dest.clone())));
                    return;
                };
                let id = format!("m{}", self.next_id);
                self.next_id += 1;
                let mut s = Vec::new();
                binding::write_request_on(&mut s, &id, route, &t);
                self.awaiting.insert(id, Awaiting::Transmit(ticket));
                self.emit(s);
            }
            Command::Probe(peer) => {
                let Some(to) = self.addr.by_domain.get(&peer).cloned() else {
                    self.sink.probe_outcome(peer, false);
                    return;
                };
                let id = format!("p{}", self.next_id);
                self.next_id += 1;
                let mut s = Vec::new();
                binding::write_ping(&mut s, &id, &self.addr.local, &to);
                self.awaiting.insert(id, Awaiting::Probe(peer));
                self.emit(s);
            }
        }
    }

    /// Runs the link over one connection until it ends. `rx` feeds our own requests (absent on
    /// a responder); `stop` ends it politely.
    ///
    /// Bounds per connection: the writer queue and [`MAX_OUT`] (a peer that does not read
    /// stops being read), [`MAX_SERVING`] requests at the node at once, our own stanzas sent
    /// only while the peer has acknowledged all but half of `max_unacked`, and a peer that
    /// leaves more than `max_unacked` of our stanzas unacknowledged, or takes longer than
    /// `frame_deadline` to finish a stanza it started, gets `policy-violation`.
    pub(crate) async fn drive<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut Reader<R>,
        writer: &Writer,
        mut rx: Option<&mut mpsc::UnboundedReceiver<Command>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut last_read = Instant::now();
        let mut partial_since: Option<Instant> = None;
        let deadline = self.limits.frame_deadline;
        let period = (deadline / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        loop {
            // Items already buffered (after a handshake, or held back while too many requests
            // were being answered) come before reading more.
            if let Some(end) = self.scan(reader) {
                return self.end(writer, end).await;
            }
            if self
                .sm
                .as_ref()
                .is_some_and(|s| s.unacked.len() > self.limits.max_unacked)
            {
                self.stats.refused(Budget::Unacked);
                return self.refuse(writer, "policy-violation").await;
            }
            // Our own requests, as far as the peer's acknowledgements allow.
            let mut sent = false;
            while self.has_window() {
                let Some(c) = self.backlog.pop_front() else {
                    break;
                };
                self.command(c);
                sent = true;
            }
            if sent {
                self.request_ack();
            }
            if !self.out.is_empty() {
                match writer.try_reserve() {
                    Ok(permit) => permit.send(Bytes::from(std::mem::take(&mut self.out))),
                    Err(mpsc::error::TrySendError::Full(())) => {}
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        return Ended::Lost("write failed".into());
                    }
                }
            }
            if writer.is_closed() {
                return Ended::Lost("write failed".into());
            }
            let pause = self
                .pacer
                .as_ref()
                .map_or(Duration::ZERO, |(p, peer)| p.debt(peer));
            let can_read =
                self.serving.len() < MAX_SERVING && self.out.len() < MAX_OUT && pause.is_zero();
            partial_since = if can_read && reader.scanner.is_partial() {
                partial_since.or(Some(Instant::now()))
            } else {
                None
            };
            let can_take = rx.is_some() && self.backlog.is_empty() && self.has_window();
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    self.out.extend_from_slice(b"</stream:stream>");
                    return self.end(writer, Ended::Stopped).await;
                }
                permit = writer.reserve(), if !self.out.is_empty() => match permit {
                    Ok(permit) => permit.send(Bytes::from(std::mem::take(&mut self.out))),
                    Err(_) => return Ended::Lost("write failed".into()),
                },
                Some(answer) = self.serving.next(), if !self.serving.is_empty() => {
                    self.emit(answer);
                    while let Some(Some(answer)) = self.serving.next().now_or_never() {
                        self.emit(answer);
                    }
                    self.request_ack();
                }
                c = recv(&mut rx), if can_take => {
                    let Some(c) = c else {
                        self.out.extend_from_slice(b"</stream:stream>");
                        return self.end(writer, Ended::Stopped).await;
                    };
                    self.command(c);
                    let mut n = 1;
                    while n < MAX_BATCH && self.has_window() {
                        let Some(rx) = rx.as_mut() else { break };
                        match rx.try_recv() {
                            Ok(c) => self.command(c),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                    self.request_ack();
                }
                () = tokio::time::sleep(pause), if !pause.is_zero() => {}
                read = reader.fill(), if can_read => {
                    match read {
                        Ok(true) => last_read = Instant::now(),
                        Ok(false) => return Ended::Lost("connection closed".into()),
                        Err(e) => return Ended::Lost(e.to_string()),
                    }
                }
                _ = tick.tick() => {
                    if partial_since.is_some_and(|t| t.elapsed() > deadline) {
                        // A started stanza (or an unterminated tag) that does not finish.
                        self.stats.refused(Budget::FrameDeadline);
                        return self.refuse(writer, "policy-violation").await;
                    }
                    // Only with stream management: resuming is lossless. A component's
                    // server may legitimately hold our IQs while it reaches a peer.
                    if self.sm.is_some() && self.is_busy() && last_read.elapsed() > SILENCE {
                        return Ended::Lost("peer silent".into());
                    }
                    if self.sm.as_ref().is_some_and(|s| !s.unacked.is_empty()) {
                        self.request_ack();
                    }
                }
            }
        }
    }

    /// Handles the items the scanner holds, while there is room to answer them.
    fn scan<R>(&mut self, reader: &mut Reader<R>) -> Option<Ended> {
        while self.serving.len() < MAX_SERVING && self.out.len() < MAX_OUT {
            let item = match reader.scanner.poll_item() {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(e) => {
                    match e {
                        ScanError::TooDeep(_) => self.stats.refused(Budget::XmlDepth),
                        ScanError::TagTooLong(_) => self.stats.refused(Budget::BodySize),
                        _ => {}
                    }
                    self.refused_peer();
                    tracing::debug!(error = %e, "refusing an xmpp stream");
                    return Some(Ended::WeRefused(e.condition()));
                }
            };
            if let Some(end) = self.item(item) {
                return Some(end);
            }
        }
        None
    }

    /// Ends the connection: a stream error if we refuse, then whatever output is left.
    async fn end(&mut self, writer: &Writer, ended: Ended) -> Ended {
        match ended {
            Ended::WeRefused(cond) => self.refuse(writer, cond).await,
            Ended::Lost(_) => ended,
            _ => {
                if let Some(bytes) = self.take_out() {
                    send_last(writer, bytes).await;
                }
                ended
            }
        }
    }

    async fn refuse(&mut self, writer: &Writer, cond: &'static str) -> Ended {
        tracing::info!(
            condition = cond,
            "ending an xmpp stream with a stream error"
        );
        binding::write_stream_error(&mut self.out, cond);
        if let Some(bytes) = self.take_out() {
            send_last(writer, bytes).await;
        }
        Ended::WeRefused(cond)
    }

    /// Handles one item; `Some` if the stream ends.
    fn item(&mut self, item: Item) -> Option<Ended> {
        match item {
            Item::End => Some(Ended::Closed),
            Item::Header(_) => Some(Ended::WeRefused("not-well-formed")),
            Item::TooLarge { head, len } => {
                tracing::debug!(len, "oversize stanza skipped unparsed");
                self.stats.refused(Budget::BodySize);
                self.refused_peer();
                let Some(el) = head.and_then(|h| binding::parse(&h).ok()) else {
                    return Some(Ended::WeRefused("policy-violation"));
                };
                let is_request = el.is("iq", NS_COMPONENT)
                    && matches!(el.attr("type"), Some("set" | "get"))
                    && el.attr("id").is_some();
                if !is_request {
                    return Some(Ended::WeRefused("policy-violation"));
                }
                if let Some(end) = self.check_from(&el) {
                    return end;
                }
                self.count_in();
                let id = el.attr("id").unwrap_or_default().to_owned();
                let to = el.attr("from").unwrap_or_default().to_owned();
                let mut s = Vec::new();
                let r = Response::error(Status::TooLarge, "stanza over the limit");
                binding::write_answer(&mut s, &id, &self.addr.local, &to, &r);
                self.serving.push_back(Box::pin(std::future::ready(s)));
                None
            }
            Item::Element(bytes) => match self.hot(&bytes) {
                Some(handled) => handled,
                None => self.dom(&bytes),
            },
        }
    }

    /// The hot path: a stanza [`binding::read_hot`] reads, from a peer at its exact address
    /// (a JID, so the typed `Iq` would take it too), handled as [`Link::element`] would
    /// handle its DOM. `None` leaves the stanza to the DOM.
    fn hot(&mut self, bytes: &[u8]) -> Option<Option<Ended>> {
        match binding::read_hot(bytes, self.max_body)? {
            Hot::AckRequest => {
                let h = self.sm.as_ref().map_or(0, |s| s.h_in);
                binding::write_ack(&mut self.out, h);
                Some(None)
            }
            Hot::Ack(h) => Some(self.ack(h)),
            Hot::Iq { from, to, id, iq } => {
                let peer = self.hot_from.get(&from)?.clone();
                if to.is_some() && to != self.hot_to {
                    return None;
                }
                self.count_in();
                Some(self.iq(peer, from, id, iq))
            }
        }
    }

    /// Reads a stanza with the DOM (all but the hot path).
    fn dom(&mut self, bytes: &Bytes) -> Option<Ended> {
        match binding::parse_stanza(bytes) {
            Ok(Stanza::Parsed(el, text)) => self.element(el, text),
            Ok(Stanza::Oversize { head }) => self.item(Item::TooLarge {
                head,
                len: bytes.len(),
            }),
            Err(_) => Some(Ended::WeRefused("not-well-formed")),
        }
    }

    fn count_in(&mut self) {
        if let Some(sm) = &mut self.sm {
            sm.h_in = sm.h_in.wrapping_add(1);
        }
    }

    /// `Some(end)` if the stanza's `from` must end the stream, `Some(None)` if the stanza is
    /// refused alone (and already answered), `None` if the sender is a known peer.
    fn check_from(&mut self, el: &Element) -> Option<Option<Ended>> {
        let Some(from) = el.attr("from") else {
            return Some(Some(Ended::WeRefused("improper-addressing")));
        };
        if self.addr.by_jid.contains_key(&binding::jid_domain(from)) {
            return None;
        }
        if self.addr.strict {
            return Some(Some(Ended::WeRefused("invalid-from")));
        }
        // A server routed us a stanza from someone who is not a configured peer.
        self.count_in();
        if el.is("iq", NS_COMPONENT)
            && matches!(el.attr("type"), Some("set" | "get"))
            && let Some(id) = el.attr("id")
        {
            let mut s = Vec::new();
            let r = Response::error(Status::Forbidden, "not a configured peer");
            binding::write_answer(&mut s, id, &self.addr.local, from, &r);
            self.serving.push_back(Box::pin(std::future::ready(s)));
        }
        Some(None)
    }

    fn element(&mut self, el: Element, text: Option<&[u8]>) -> Option<Ended> {
        if el.ns() == NS_SM {
            match el.name() {
                "r" => {
                    let h = self.sm.as_ref().map_or(0, |s| s.h_in);
                    binding::write_ack(&mut self.out, h);
                }
                "a" => {
                    let Ok(a) = sm::A::try_from(el) else {
                        return Some(Ended::WeRefused("undefined-condition"));
                    };
                    return self.ack(a.h);
                }
                _ => return Some(Ended::WeRefused("unsupported-stanza-type")),
            }
            return None;
        }
        if let Some(cond) = binding::peer_stream_error(&el) {
            return Some(Ended::PeerRefused(cond));
        }
        if el.ns() != NS_COMPONENT {
            // RFC 6120 section 4.9.3.24: a first-level child we do not support.
            return Some(Ended::WeRefused("unsupported-stanza-type"));
        }
        match el.name() {
            "iq" => {}
            // Not part of the binding: handled (counted) and dropped.
            "message" | "presence" => {
                if let Some(end) = self.check_from(&el) {
                    return end;
                }
                self.count_in();
                return None;
            }
            _ => return Some(Ended::WeRefused("unsupported-stanza-type")),
        }
        if let Some(end) = self.check_from(&el) {
            return end;
        }
        self.count_in();
        let from_attr = el.attr("from").unwrap_or_default().to_owned();
        let Some(from) = self
            .addr
            .by_jid
            .get(&binding::jid_domain(&from_attr))
            .cloned()
        else {
            return None; // checked above
        };
        let Some((id, iq)) = binding::classify(el, text, self.max_body) else {
            return Some(Ended::WeRefused("bad-format"));
        };
        self.iq(from, from_attr, id, iq)
    }

    /// The peer's acknowledgement of our first `h` stanzas.
    fn ack(&mut self, h: u32) -> Option<Ended> {
        match self.sm.as_mut().map(|sm| sm.ack(h)) {
            Some(true) => None,
            _ => Some(Ended::WeRefused("undefined-condition")),
        }
    }

    /// Handles an IQ from `from` (its address as written: `from_attr`), already counted.
    fn iq(&mut self, from: ProviderDomain, from_attr: String, id: String, iq: Iq) -> Option<Ended> {
        let local = self.addr.local.clone();
        let local = local.as_str();
        match iq {
            Iq::Request(Ok(r)) => {
                let route = self.answer_route(&from_attr);
                // What the node has not answered yet counts against this peer's share only.
                let held = match &self.budget {
                    Some(budget) if self.inbound.is_some() => {
                        match budget.reserve(&from, r.body.len() + REQUEST_OVERHEAD) {
                            Ok(held) => Some(held),
                            Err(_) => {
                                let mut s = Vec::new();
                                let mut busy =
                                    Response::error(Status::Unavailable, "peer over its budget");
                                busy.retry_after = Some(BUDGET_RETRY);
                                binding::write_answer_on(&mut s, &id, &route, &busy);
                                self.serving.push_back(Box::pin(std::future::ready(s)));
                                return None;
                            }
                        }
                    }
                    _ => None,
                };
                let answer: Answer = match &self.inbound {
                    Some(inbound) => {
                        let inbound = inbound.clone();
                        let request = Request {
                            from,
                            transport: TransportKind::Xmpp,
                            endpoint: r.endpoint,
                            target: r.target,
                            seq: r.seq,
                            lineage: r.lineage,
                            body: r.body,
                        };
                        Box::pin(async move {
                            let response = inbound.request(request).await;
                            drop(held);
                            let mut s = Vec::new();
                            binding::write_answer_on(&mut s, &id, &route, &response);
                            s
                        })
                    }
                    None => {
                        let mut s = Vec::new();
                        binding::write_plain_error(
                            &mut s,
                            &id,
                            local,
                            &from_attr,
                            DefinedCondition::ServiceUnavailable,
                            ErrorType::Cancel,
                        );
                        Box::pin(std::future::ready(s))
                    }
                };
                self.serving.push_back(answer);
            }
            Iq::Request(Err((status, why))) => {
                if status == Status::TooLarge {
                    self.stats.refused(Budget::BodySize);
                }
                self.refused_peer();
                let mut s = Vec::new();
                let route = self.answer_route(&from_attr);
                binding::write_answer_on(&mut s, &id, &route, &Response::error(status, why));
                self.serving.push_back(Box::pin(std::future::ready(s)));
            }
            Iq::Ping => {
                let mut s = Vec::new();
                binding::write_empty_result(&mut s, &id, local, &from_attr);
                self.serving.push_back(Box::pin(std::future::ready(s)));
            }
            Iq::Unsupported => {
                let mut s = Vec::new();
                binding::write_plain_error(
                    &mut s,
                    &id,
                    local,
                    &from_attr,
                    DefinedCondition::ServiceUnavailable,
                    ErrorType::Cancel,
                );
                self.serving.push_back(Box::pin(std::future::ready(s)));
            }
            Iq::Answer(outcome) => match self.awaiting.remove(&id) {
                Some(Awaiting::Transmit(t)) => {
                    t.finish(outcome.map_err(TransportError::BadResponse));
                }
                Some(Awaiting::Probe(p)) => self.sink.probe_outcome(p, true),
                None => tracing::debug!(id, "answer to an unknown or expired request"),
            },
            Iq::Pong => match self.awaiting.remove(&id) {
                Some(Awaiting::Probe(p)) => self.sink.probe_outcome(p, true),
                Some(Awaiting::Transmit(t)) => t.finish(Err(TransportError::BadResponse(
                    "empty result to a request".into(),
                ))),
                None => {}
            },
            Iq::Failed(cond) => match self.awaiting.remove(&id) {
                Some(Awaiting::Transmit(t)) => t.finish(Err(TransportError::Unreachable(cond))),
                Some(Awaiting::Probe(p)) => self.sink.probe_outcome(p, false),
                None => {}
            },
        }
        None
    }

    /// Emits the answers still being worked on, without a connection to send them on: they
    /// wait among the unacknowledged stanzas for a resumption.
    pub(crate) async fn settle_serving(&mut self) {
        while let Some(answer) = self.serving.next().await {
            self.emit(answer);
        }
        self.out.clear();
    }

    /// Drops the connection-bound leftovers (unsent bytes) after a connection ended.
    pub(crate) fn reset_connection(&mut self) {
        self.out.clear();
    }

    /// Fails what we await when there is no session to resume (no stream management).
    pub(crate) fn fail_awaiting(&mut self, error: &TransportError) {
        for (_, a) in self.awaiting.drain() {
            match a {
                Awaiting::Transmit(t) => t.finish(Err(error.clone())),
                Awaiting::Probe(p) => self.sink.probe_outcome(p, false),
            }
        }
    }
}

async fn recv(rx: &mut Option<&mut mpsc::UnboundedReceiver<Command>>) -> Option<Command> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A random hex token (stream and session ids).
pub(crate) fn token() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 12];
    // SystemRandom only fails if the OS has no randomness at all; a fixed id then still works
    // (it only weakens resumption ids, which are also bound to the authenticated peer).
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    hex::encode(b)
}
