//! The sending side: one task per peer owning its connection, one task pair per room stream,
//! and one timer for every transmit's deadline.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mimi_wire::uri::ProviderDomain;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use relay_adapter::PeerAddr;
use relay_adapter::outcome::{OutcomeSink, Progress};
use relay_core::transport::{Response, Status, Transmit, TransportError};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::codes;
use crate::framing::{Body, Frame, SeqHead, encode_ping, encode_request};
use crate::stream::FrameReader;

/// Most transmits written in one batch, and the body bytes after which a batch is cut.
const MAX_BATCH: usize = 256;
const MAX_BATCH_BYTES: usize = 1 << 20;
/// A room stream unused for between one and two of these is finished.
const ROOM_IDLE: Duration = Duration::from_secs(30);

/// State shared by everything that sends to one peer.
pub(crate) struct PeerShared {
    pub(crate) domain: ProviderDomain,
    pub(crate) sink: Arc<dyn OutcomeSink>,
}

/// The room stream a transmit was routed to: while that stream keeps being answered, the
/// transmit is making progress and its deadline moves (see [`relay_adapter::outcome`]).
#[derive(Default)]
pub(crate) struct RoomLink(OnceLock<Weak<Mutex<RoomState>>>);

impl Progress for RoomLink {
    /// When this transmit's room stream last got an answer, if it has a stream and one came.
    fn last_progress(&self) -> Option<Instant> {
        let room = self.0.get()?.upgrade()?;
        lock(&room).last_answer
    }
}

/// One transmit's right to exactly one outcome.
pub(crate) type Ticket = relay_adapter::outcome::Ticket<RoomLink>;

pub(crate) enum Command {
    Transmit(Transmit, Arc<Ticket>),
    Probe,
}

impl Command {
    fn fail(self, reason: &str) {
        match self {
            Command::Transmit(_, ticket) => {
                ticket.finish(Err(TransportError::Unreachable(reason.to_owned())));
            }
            Command::Probe => {}
        }
    }
}

struct Room {
    tx: mpsc::UnboundedSender<(Transmit, Arc<Ticket>)>,
    state: Arc<Mutex<RoomState>>,
    used: bool,
}

/// Owns the connection to one peer and routes its transmits to room streams.
pub(crate) struct PeerTask {
    shared: Arc<PeerShared>,
    /// Resolved again at every dial.
    addr: PeerAddr,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    max_body: usize,
    request_timeout: Duration,
    conn: Option<Connection>,
    rooms: HashMap<String, Room>,
    nonce: Arc<AtomicU64>,
}

impl PeerTask {
    pub(crate) fn new(
        shared: Arc<PeerShared>,
        addr: PeerAddr,
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        max_body: usize,
        request_timeout: Duration,
    ) -> Self {
        PeerTask {
            shared,
            addr,
            endpoint,
            client,
            max_body,
            request_timeout,
            conn: None,
            rooms: HashMap::new(),
            nonce: Arc::new(AtomicU64::new(1)),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut sweep = tokio::time::interval(ROOM_IDLE);
        loop {
            tokio::select! {
                command = rx.recv() => match command {
                    Some(command) => self.handle(command, &mut rx).await,
                    None => break,
                },
                _ = sweep.tick() => self.close_idle_rooms(),
                _ = stop.changed() => break,
            }
        }
        // Queued commands are dropped with `rx`; their tickets report `Closed`.
    }

    async fn handle(&mut self, command: Command, rx: &mut mpsc::UnboundedReceiver<Command>) {
        let conn = match self.connection().await {
            Ok(conn) => conn,
            Err(reason) => {
                if matches!(command, Command::Probe) {
                    self.shared
                        .sink
                        .probe_outcome(self.shared.domain.clone(), false);
                }
                command.fail(&reason);
                // Everything that queued up while we tried fails the same way; the next
                // command tries again.
                while let Ok(command) = rx.try_recv() {
                    if matches!(command, Command::Probe) {
                        self.shared
                            .sink
                            .probe_outcome(self.shared.domain.clone(), false);
                    }
                    command.fail(&reason);
                }
                return;
            }
        };
        match command {
            Command::Transmit(transmit, ticket) => self.route(&conn, transmit, ticket),
            Command::Probe => {
                let nonce = self.nonce.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(probe(
                    conn,
                    self.shared.clone(),
                    nonce,
                    self.request_timeout,
                ));
            }
        }
    }

    /// The peer's address now: the first the resolver gives in the family our socket can
    /// reach (an IPv4 socket cannot send to IPv6).
    async fn resolve(&self) -> Result<SocketAddr, String> {
        let addrs = self
            .addr
            .resolve()
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.addr))?;
        let v4_only = self.endpoint.local_addr().is_ok_and(|a| a.is_ipv4());
        addrs
            .iter()
            .find(|a| !v4_only || a.is_ipv4())
            .copied()
            .ok_or_else(|| format!("{} has no IPv4 address for our IPv4 socket", self.addr))
    }

    /// The live connection, dialling if there is none.
    async fn connection(&mut self) -> Result<Connection, String> {
        let peer = &self.shared.domain;
        if let Some(conn) = &self.conn {
            match conn.close_reason() {
                None => return Ok(conn.clone()),
                Some(reason) => {
                    tracing::info!(%peer, %reason, "outbound quic connection lost");
                    self.conn = None;
                    // Their tasks end with the connection; new streams go on the new one.
                    self.rooms.clear();
                }
            }
        }
        let addr = tokio::time::timeout(self.request_timeout, self.resolve())
            .await
            .map_err(|_| format!("resolving {} timed out", self.addr))??;
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, peer.as_str())
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        match tokio::time::timeout(self.request_timeout, connecting).await {
            Ok(Ok(conn)) => {
                tracing::info!(%peer, %addr, "outbound quic connection established");
                self.conn = Some(conn.clone());
                Ok(conn)
            }
            Ok(Err(error)) => {
                tracing::warn!(%peer, %addr, %error, "quic connect failed");
                Err(format!("connecting to {addr}: {error}"))
            }
            Err(_) => {
                tracing::warn!(%peer, %addr, "quic connect timed out");
                Err(format!("connecting to {addr} timed out"))
            }
        }
    }

    fn route(&mut self, conn: &Connection, transmit: Transmit, ticket: Arc<Ticket>) {
        if ticket.is_done() {
            return; // timed out while queued
        }
        let mut item = (transmit, ticket);
        if let Some(room) = self.rooms.get_mut(&item.0.target) {
            let _ = item.1.extra().0.set(Arc::downgrade(&room.state));
            match room.tx.send(item) {
                Ok(()) => {
                    room.used = true;
                    return;
                }
                // The room's stream died: open a new one below.
                Err(mpsc::error::SendError(back)) => item = back,
            }
        }
        let target = item.0.target.clone();
        let state = Arc::new(Mutex::new(RoomState::default()));
        // A ticket whose first stream died keeps that stream's clock: it is only read for
        // answers after the ticket's own deadline, and a dead stream gets none.
        let _ = item.1.extra().0.set(Arc::downgrade(&state));
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(item);
        tokio::spawn(room_writer(
            conn.clone(),
            self.shared.clone(),
            target.clone(),
            rx,
            state.clone(),
            self.max_body,
        ));
        self.rooms.insert(
            target,
            Room {
                tx,
                state,
                used: true,
            },
        );
    }

    /// Finishes room streams unused since the last sweep, so that rooms that went quiet do not
    /// hold a stream forever.
    fn close_idle_rooms(&mut self) {
        self.rooms
            .retain(|_, room| std::mem::take(&mut room.used) && !room.tx.is_closed());
    }
}

/// Requests written on a room stream and not yet answered, by request id.
#[derive(Default)]
struct RoomState {
    pending: BTreeMap<u64, Arc<Ticket>>,
    /// Set when the stream failed: nothing more may be registered.
    dead: bool,
    /// When the stream last got an answer.
    last_answer: Option<Instant>,
}

fn lock(state: &Mutex<RoomState>) -> MutexGuard<'_, RoomState> {
    // A panic elsewhere cannot leave the map inconsistent: every change is one insert/remove.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Marks the stream dead and drops what it still owes; the tickets report `ConnectionLost`.
fn fail_pending(state: &Mutex<RoomState>) {
    let lost = {
        let mut st = lock(state);
        st.dead = true;
        std::mem::take(&mut st.pending)
    };
    drop(lost);
}

/// Writes one room's requests on its own stream, in batches.
async fn room_writer(
    conn: Connection,
    peer: Arc<PeerShared>,
    target: String,
    mut rx: mpsc::UnboundedReceiver<(Transmit, Arc<Ticket>)>,
    state: Arc<Mutex<RoomState>>,
    max_body: usize,
) {
    let domain = &peer.domain;
    let (mut send, recv) = match conn.open_bi().await {
        Ok(streams) => streams,
        Err(error) => {
            tracing::debug!(peer = %domain, %error, "cannot open a room stream");
            return; // `rx` is dropped: queued tickets report `ConnectionLost`
        }
    };
    let stream = send.id();
    tracing::debug!(peer = %domain, ?stream, room = %target, "room stream opened");
    let mut reader = tokio::spawn(read_responses(
        recv,
        state.clone(),
        max_body,
        domain.clone(),
        stream,
    ));
    let mut next_id: u64 = 0;
    let mut heads = BytesMut::new();
    let mut out: Vec<Bytes> = Vec::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut unframable = Vec::new();
    loop {
        let first = tokio::select! {
            item = rx.recv() => item,
            _ = &mut reader => {
                // The answers side ended first: the stream is gone.
                fail_pending(&state);
                return;
            }
        };
        let Some(first) = first else {
            // The peer task let go of this room: no more requests.
            let _ = send.finish();
            return;
        };
        batch.push(first);
        let mut bytes = 0;
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(item) => {
                    bytes += item.0.body_len();
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        {
            let mut st = lock(&state);
            if st.dead {
                break;
            }
            for (transmit, ticket) in batch.drain(..) {
                if ticket.is_done() {
                    continue; // timed out while queued: do not send it late
                }
                let id = next_id;
                match encode_request(
                    &mut heads,
                    id,
                    transmit.endpoint.code(),
                    &transmit.target,
                    SeqHead {
                        seq: transmit.seq,
                        lineage: transmit.lineage.map(|l| (l.batch, l.prev)),
                    },
                    transmit.body_len(),
                ) {
                    Ok(()) => {
                        next_id += 1;
                        out.push(heads.split().freeze());
                        out.extend(transmit.body.into_iter().filter(|b| !b.is_empty()));
                        st.pending.insert(id, ticket);
                    }
                    Err(error) => unframable.push((ticket, error)),
                }
            }
        }
        for (ticket, error) in unframable.drain(..) {
            ticket.finish(Err(TransportError::Unreachable(format!(
                "cannot frame the request: {error}"
            ))));
        }
        if out.is_empty() {
            continue;
        }
        if let Err(error) = send.write_all_chunks(&mut out).await {
            tracing::debug!(peer = %domain, ?stream, %error, "writing requests failed");
            break;
        }
        out.clear();
    }
    // Failed: what was written gets `ConnectionLost`, and so does what is still queued (when
    // `rx` and `batch` drop).
    fail_pending(&state);
    reader.abort();
    let _ = send.reset(VarInt::from_u32(codes::SHUTDOWN));
}

/// Reads a room stream's answers and reports each transmit's outcome.
async fn read_responses(
    recv: RecvStream,
    state: Arc<Mutex<RoomState>>,
    max_body: usize,
    peer: ProviderDomain,
    stream: quinn::StreamId,
) {
    let mut reader = FrameReader::new(recv, max_body);
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                tracing::debug!(%peer, ?stream, "room stream finished");
                break;
            }
            Err(error) => {
                tracing::debug!(%peer, ?stream, %error, "room stream failed");
                break;
            }
        };
        let Frame::Response {
            id,
            status,
            next_seq,
            next_inc,
            retry_after_ms,
            body,
        } = frame
        else {
            tracing::warn!(%peer, ?stream, "unexpected frame on a room stream, resetting it");
            reader.stop(codes::FRAME_ERROR);
            break;
        };
        let ticket = {
            let mut st = lock(&state);
            if !st.dead {
                st.last_answer = Some(Instant::now());
            }
            st.pending.remove(&id)
        };
        let Some(ticket) = ticket else {
            // Its outcome was already reported (a timeout); the late answer is dropped.
            tracing::debug!(%peer, ?stream, id, "answer to an unknown or expired request");
            continue;
        };
        let outcome = match (Status::from_http_code(status), body) {
            (Some(status), Body::Bytes(body)) => Ok(Response {
                status,
                body,
                next_seq,
                next_inc,
                retry_after: retry_after_ms.map(Duration::from_millis),
            }),
            (None, _) => Err(TransportError::BadResponse(format!(
                "unknown status {status}"
            ))),
            (Some(_), Body::TooLarge(n)) => Err(TransportError::BadResponse(format!(
                "response body of {n} bytes is over the limit"
            ))),
        };
        ticket.finish(outcome);
    }
    fail_pending(&state);
}

/// One ping on a fresh stream; reports whether the pong came back in time.
async fn probe(conn: Connection, peer: Arc<PeerShared>, nonce: u64, timeout: Duration) {
    let round_trip = async {
        let (mut send, recv): (SendStream, RecvStream) = conn.open_bi().await.ok()?;
        let mut ping = BytesMut::new();
        encode_ping(&mut ping, nonce, false);
        send.write_all(&ping).await.ok()?;
        send.finish().ok()?;
        match FrameReader::new(recv, 0).next().await {
            Ok(Some(Frame::Pong(n))) if n == nonce => Some(()),
            _ => None,
        }
    };
    let alive = matches!(
        tokio::time::timeout(timeout, round_trip).await,
        Ok(Some(()))
    );
    tracing::debug!(peer = %peer.domain, alive, "quic probe");
    peer.sink.probe_outcome(peer.domain.clone(), alive);
}
