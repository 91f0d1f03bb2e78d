//! `--traffic mls`: the lab's load as real MLS traffic. One openmls client per (provider,
//! room); the hub's client creates each room and adds the followers' clients by their claimed
//! KeyPackages (they join by Welcome). Then every provider sends into every room from its
//! own node (a follower's /submitMessage crosses the link), reads its inbox and decrypts,
//! while commits move the rooms' epochs on, in turn: self-updates by random members; adds of a
//! provider's spare client (an owner claims its KeyPackage, commits the Add with the
//! AppDataUpdate listing it; the spare joins by the Welcome) and, every other time, removes of
//! one (the AppDataUpdate unlisting it); role changes (an owner promotes or demotes a
//! follower's user by AppDataUpdate, so followers commit adds and removes too). A spare
//! decrypts everything of the epochs it is a member of: from the epoch its Add made to the one
//! before its Remove. The plaintext carries the lab's marker, so loss, duplicates and order are
//! counted as for synthetic traffic (at every main and spare client); a message that did not
//! decrypt is a decryption failure.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use mimi_client::{Event, MlsClient, MlsClientError, UpdateResult, room_policy};
use mimi_wire::content::{Disposition, MimiContent, NestedPart};
use mimi_wire::proto::{
    FanoutExtra, FanoutMessage, HandshakeBundle, SubmitMessageRequest, SubmitMessageResponse,
    SubmitStatus, UpdateOutcome, UpdateRequest, UpdateRoomResponse,
};
use mimi_wire::uri::RoomId;
use mimi_wire::{ContentType, MlsMessageView};
use relay_node::client::inbox_records;

use super::{
    Admin, BenchOptions, CALL_BYTES, Progress, Row, Rx, SUBMIT_PATIENCE, find_marker, lock,
    marker_bytes, provider, room_id, unit,
};

/// Counters of an MLS row.
#[derive(Default)]
pub(super) struct MlsStats {
    pub decrypt_failures: AtomicU64,
    /// Messages encrypted again after the hub answered epochTooOld.
    pub retries: AtomicU64,
    pub mls_bytes: AtomicU64,
    pub mls_msgs: AtomicU64,
    pub commits: AtomicU64,
    /// Commits the hub refused (wrong epoch: another commit came first).
    pub commits_refused: AtomicU64,
    /// Accepted commits by kind: self-updates, adds of a spare client (key claim, Welcome,
    /// AppDataUpdate listing it), removes of one (AppDataUpdate unlisting it), role changes
    /// (AppDataUpdate only).
    pub self_updates: AtomicU64,
    pub adds: AtomicU64,
    pub removes: AtomicU64,
    pub role_changes: AtomicU64,
    /// Spare clients that joined by their Welcome, and that applied their own removal.
    pub spares_joined: AtomicU64,
    pub spares_left: AtomicU64,
    /// Thread CPU the clients spent in openmls: encrypting (senders), and applying what the
    /// inbox brought (decrypting messages, applying commits and Welcomes), in ns.
    pub encrypt_ns: AtomicU64,
    pub decrypt_ns: AtomicU64,
    /// Deferred decryption: messages decrypted after their phase's senders stopped, and
    /// times a reader held so many that it decrypted them all during the phase.
    pub decrypted_after: AtomicU64,
    pub forced_drains: AtomicU64,
    /// The first few decryption failures, for the row's note.
    pub failures: Mutex<Vec<String>>,
}

/// One member: its client, and hashes of the MLS messages it submitted, so that its own
/// messages coming back through its provider's inbox are skipped.
struct Member {
    client: MlsClient,
    own: HashSet<u64>,
    /// `--mls-encrypt ahead`: messages encrypted before the phase, in stream order, for the
    /// epoch `ahead_epoch`; dropped once the client's epoch moves on.
    ahead: VecDeque<Ahead>,
    ahead_epoch: Option<u64>,
    /// The receivers of a message sent in epoch `.0`: listing the members builds every
    /// member's credential, too costly for each message sent.
    receivers: (Option<u64>, u64),
    /// `--mls-encrypt ahead`: the room's commits planned before the phase, in order, each
    /// with this member's state after it and its pool for the epoch it starts.
    plans: VecDeque<Plan>,
    /// The planned commit adopted last: its fan-out, or the hub's answer to it, may still come.
    adopted: Option<u64>,
}

/// A commit planned before the phase, as one member will see it: the commit (by the digest
/// of its MLSMessage), a fork of the member's client that has applied it, and that fork's
/// pool of messages for the new epoch, whose counters end before `pool_end`.
struct Plan {
    commit: u64,
    client: MlsClient,
    pool: VecDeque<Ahead>,
    pool_end: u64,
}

impl Member {
    /// The next planned commit is `commit` (its MLSMessage's digest): take the planned state
    /// in place of processing it. A commit that is not the next planned one makes every plan
    /// of the room stale.
    fn adopt_planned(&mut self, commit: u64, marks: &AtomicU64) -> bool {
        if self.adopted == Some(commit) {
            return true;
        }
        let Some(plan) = self.plans.pop_front() else {
            return false;
        };
        if plan.commit != commit {
            self.plans.clear();
            return false;
        }
        self.client.adopt(plan.client);
        self.adopted = Some(commit);
        self.ahead = plan.pool;
        self.ahead_epoch = self.client.epoch();
        marks.fetch_max(plan.pool_end, Ordering::Relaxed);
        true
    }
}

impl Member {
    /// The room's members but this one, counted once per epoch (only commits change them).
    fn receivers(&mut self) -> u64 {
        let epoch = self.client.epoch();
        if self.receivers.0 != epoch || epoch.is_none() {
            let listed = self.client.members().len().saturating_sub(1) as u64;
            self.receivers = (epoch, listed);
        }
        self.receivers.1
    }
}

/// A message encrypted before the phase: its counter in the stream, its plaintext (to encrypt
/// it again if the hub answers epochTooOld), its submitMessage request and MLS size.
struct Ahead {
    k: u64,
    pt: Vec<u8>,
    body: Bytes,
    mls_len: usize,
}

/// The marker's send time of a message encrypted ahead: not known until it is submitted, so
/// the receivers look it up in `Shared::sched`.
const SCHED_LATER: u64 = u64::MAX;

/// A spare client of a provider in one room: added by a commit (key claim, Welcome), removed
/// by a later one. It only receives; it expects what is sent in the epochs it is a member of.
struct Spare {
    client: MlsClient,
    /// Whether its Welcome arrived.
    joined: bool,
}

/// The clients of one provider, one per room, and its spare clients (one per room at most).
/// Lock order: `members`, then `spares`.
struct Side {
    /// The provider's node, for new (spare) clients.
    admin: Admin,
    members: tokio::sync::Mutex<Vec<Member>>,
    spares: tokio::sync::Mutex<Vec<Option<Spare>>>,
}

/// CPU time of the calling thread in ns (the scheduler's own accounting), 0 when unknown:
/// what a batch of synchronous openmls calls cost, whatever else ran on the machine.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The lab's own key for an MLS message (not hostile input: a fast unkeyed hash will do).
fn digest(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

fn user(p: usize, r: usize) -> String {
    format!("mimi://{}/u/lab{r}", provider(p))
}

fn spare_user(p: usize, r: usize) -> String {
    format!("mimi://{}/u/spare{r}", provider(p))
}

fn room(r: usize) -> Result<RoomId> {
    room_id(r).parse().map_err(|e| anyhow!("room id: {e}"))
}

/// Each provider's clients in every room, joined: the hub's create the rooms and add the
/// followers'. The readers must already run (they apply the Welcomes).
async fn setup(admins: &[Admin], rooms: usize, deferred: bool) -> Result<Vec<Arc<Side>>> {
    let mut sides = Vec::new();
    for (p, admin) in admins.iter().enumerate() {
        let mut members = Vec::new();
        for r in 0..rooms {
            let mut client = MlsClient::with_api(&user(p, r), admin.client())?;
            if deferred {
                client.set_past_epochs(LAB_PAST_EPOCHS);
            }
            if p > 0 {
                client.publish_key_packages(1).await?;
                // No claim succeeds without the target's consent (protocol-06 §5.2, §5.7).
                client
                    .set_consent(&user(0, r), Some(&room(r)?), true)
                    .await?;
            }
            members.push(Member {
                client,
                own: HashSet::new(),
                ahead: VecDeque::new(),
                ahead_epoch: None,
                receivers: (None, 0),
                plans: VecDeque::new(),
                adopted: None,
            });
        }
        sides.push(Arc::new(Side {
            admin: admin.clone(),
            members: tokio::sync::Mutex::new(members),
            spares: tokio::sync::Mutex::new((0..rooms).map(|_| None).collect()),
        }));
    }
    Ok(sides)
}

async fn create_rooms(sides: &[Arc<Side>], rooms: usize) -> Result<()> {
    let mut hub = sides[0].members.lock().await;
    for (r, m) in hub.iter_mut().enumerate().take(rooms) {
        let id = room(r)?;
        // The hub's published key, so that the room names it as franking agent and its
        // application messages are franked as every MIMI room's are (protocol-06 §5.4.1).
        m.client.fetch_hub_key().await.context("the hub's key")?;
        m.client.create_room(&id).await.context("creating a room")?;
        let mut kps = Vec::new();
        for p in 1..sides.len() {
            match m.client.claim(&user(p, r), &id).await? {
                Ok(kp) => kps.push(kp),
                Err(why) => bail!("no KeyPackage of {}: {why}", user(p, r)),
            }
        }
        match m.client.add(&id, &kps).await? {
            UpdateResult::Accepted => {}
            other => bail!("adding the followers to {id}: {other:?}"),
        }
    }
    Ok(())
}

/// Waits until every follower client has joined its room.
async fn joined(sides: &[Arc<Side>], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for (p, side) in sides.iter().enumerate() {
        loop {
            if side
                .members
                .lock()
                .await
                .iter()
                .all(|m| m.client.epoch().is_some())
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}'s clients did not all join within {timeout:?}",
                    provider(p)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// What the readers and senders share besides the clients.
struct Shared {
    rx: Arc<Mutex<Rx>>,
    stats: Arc<MlsStats>,
    /// The stream (room * n + sender) of each MLS message a sender submitted, by the digest of
    /// its bytes: a reader knows what arrived before it decrypts.
    streams: Mutex<HashMap<u64, u32>>,
    /// Arrivals per stream at the main clients of the other providers: the closed loop's
    /// window moves on arrival, whenever the message is decrypted.
    arrived: Vec<AtomicU64>,
    /// Deferred decryption: set at the end of a phase, when the readers decrypt all they hold.
    drain: AtomicBool,
    deferred: bool,
    /// `--mls-encrypt ahead`: the send time of each message taken from a pool, by (stream,
    /// counter), set when it is submitted.
    sched: Mutex<HashMap<(u32, u32), u64>>,
    /// Messages from the pools that the hub accepted.
    from_pools: AtomicU64,
    /// Per stream, the next message counter no message was encrypted with: pools take ranges
    /// of them ahead of time (a planned epoch's from a block of its own), inline encryption
    /// one at a time. Counters rise along a stream, with gaps where a pool was dropped.
    marks: Vec<AtomicU64>,
    /// Deferred decryption: per provider's reader, memory touched before the phase that it
    /// copies the items it holds into, so that holding them costs no fresh pages (and page
    /// faults) inside the phase, and each inbox answer is freed once read.
    slabs: Mutex<Vec<Option<BytesMut>>>,
}

/// The MLS message of an inbox item's FanoutMessage (`timestamp || MLSMessage || select
/// arm`), borrowed, and whether it is an application message: what a reader needs of every
/// item, without copying it out. `None` if it does not parse (its client counts that).
fn fanout_mls(fanout: &[u8]) -> Option<(&[u8], bool)> {
    let (m, _) = MlsMessageView::parse_prefix(fanout.get(8..)?).ok()?;
    Some((m.bytes, m.content_type == Some(ContentType::Application)))
}

/// Bytes of a FanoutMessage beyond its MLS message, at most as the lab sends: the timestamp,
/// the select arm and a frank.
const FANOUT_EXTRA: u64 = 8 + 1 + 160;

/// One inbox item held for decryption: its FanoutMessage and when it arrived.
type Held = (Bytes, Instant, To);

/// Which of a provider's clients in a room apply a held item.
#[derive(Clone, Copy, PartialEq, Eq)]
enum To {
    Both,
    /// A handshake the main client applied ahead: the spare applies it in order.
    Spare,
    /// That handshake, applied ahead by the main client alone.
    Main,
}

/// Most items a reader holds undecrypted; beyond it decrypts them all at once (counted).
const HOLD_MAX: usize = 1 << 18;

/// Deferred decryption: past epochs the main clients keep decryptable, and the most commits
/// a reader applies ahead of a room's held application messages (those stay decryptable as
/// long as they are at most this many epochs old).
const LAB_PAST_EPOCHS: usize = 8;
const AHEAD_SPAN: usize = LAB_PAST_EPOCHS - 2;

/// Reads provider `p`'s inbox and applies each item to the clients of its room (the main
/// client and the spare, if any); records each decrypted message at its receiver with the
/// time it arrived. Inline, every batch is decrypted as it arrives; deferred, application
/// messages wait in per-room queues until the end of the phase, while handshakes (commits,
/// Welcomes) are applied at once, ahead of them (the main clients keep past epochs for it),
/// so that the senders move to the new epoch; a spare client, which keeps no past epochs,
/// applies them in order, after what it holds. Where a room's held messages span too many
/// epochs, a handshake is applied in order by both.
fn start_readers(
    admins: &[Admin],
    sides: &[Arc<Side>],
    rooms: usize,
    shared: &Arc<Shared>,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinSet<()> {
    let index: Arc<HashMap<Box<[u8]>, usize>> = Arc::new(
        (0..rooms)
            .map(|r| (room_id(r).into_bytes().into_boxed_slice(), r))
            .collect(),
    );
    let mut set = tokio::task::JoinSet::new();
    let n = sides.len();
    for (p, (admin, side)) in admins.iter().zip(sides).enumerate() {
        let (mut client, side) = (admin.client(), side.clone());
        let (sh, stop, index) = (shared.clone(), stop.clone(), index.clone());
        set.spawn(async move {
            let mut after = 0u64;
            let mut held: Vec<std::collections::VecDeque<Held>> =
                (0..rooms).map(|_| Default::default()).collect();
            let mut holding = 0usize;
            // Commits applied ahead of each room's held messages.
            let mut spans = vec![0usize; rooms];
            let mut slab = BytesMut::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(s) = lock(&sh.slabs).get_mut(p).and_then(Option::take) {
                    slab = s;
                }
                // Kept in the slab while it has room, else as a slice of its answer.
                let mut keep = |fanout: Bytes| -> Bytes {
                    if slab.capacity() - slab.len() < fanout.len() {
                        return fanout;
                    }
                    slab.extend_from_slice(&fanout);
                    slab.split().freeze()
                };
                let Ok(answer) = client.inbox_raw(after, 1024, 100).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let now = Instant::now();
                // A spare's slot is filled before its Add is submitted: a batch holding the
                // Add sees it.
                let spare: Vec<bool> = side
                    .spares
                    .lock()
                    .await
                    .iter()
                    .map(Option::is_some)
                    .collect();
                // Rooms to decrypt now, up to which held item (inclusive).
                let mut due: Vec<(usize, usize)> = Vec::new();
                // Handshakes applied ahead of their rooms' held messages.
                let mut ahead: Vec<(usize, Vec<Held>)> = Vec::new();
                {
                    let streams = lock(&sh.streams);
                    // Walked in place: an item is kept as a slice of the answer.
                    for item in inbox_records(&answer) {
                        let Ok(item) = item else {
                            break; // nothing after a malformed record can be trusted
                        };
                        after = after.max(item.offset);
                        let Some(&r) = index.get(item.room) else {
                            continue;
                        };
                        let fanout = answer.slice_ref(item.fanout);
                        let mut own = false;
                        let app = match fanout_mls(item.fanout) {
                            Some((mls, app)) => {
                                if app && let Some(&s) = streams.get(&digest(mls)) {
                                    own = s as usize % n == p;
                                    if !own && let Some(a) = sh.arrived.get(s as usize) {
                                        a.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                app
                            }
                            None => false, // a failure, when its client applies it
                        };
                        // The main client's own message, back from the hub: only a spare
                        // would apply it.
                        if own && !spare.get(r).copied().unwrap_or(true) {
                            continue;
                        }
                        if sh.deferred && !app && spans[r] < AHEAD_SPAN {
                            if !held[r].is_empty() {
                                spans[r] += 1;
                            }
                            // A spare client (none of whose epochs are kept) applies it in
                            // order, after what it holds of earlier epochs.
                            if spare.get(r).copied().unwrap_or(true) {
                                ahead.push((r, vec![(fanout.clone(), now, To::Main)]));
                                held[r].push_back((keep(fanout), now, To::Spare));
                                holding += 1;
                            } else {
                                ahead.push((r, vec![(fanout, now, To::Both)]));
                            }
                            continue;
                        }
                        held[r].push_back((keep(fanout), now, To::Both));
                        holding += 1;
                        if !sh.deferred || !app {
                            due.retain(|(q, _)| *q != r);
                            due.push((r, held[r].len()));
                        }
                    }
                }
                let all = sh.drain.load(Ordering::Relaxed) || holding > HOLD_MAX;
                if holding > HOLD_MAX && !sh.drain.load(Ordering::Relaxed) {
                    sh.stats.forced_drains.fetch_add(1, Ordering::Relaxed);
                }
                if all {
                    due = (0..rooms)
                        .filter(|r| !held[*r].is_empty())
                        .map(|r| (r, held[r].len()))
                        .collect();
                }
                // Handshakes first: what is held after them is of their new epochs.
                if !ahead.is_empty() {
                    apply_held(&side, p, n, ahead, &sh).await;
                }
                if !due.is_empty() {
                    let batch: Vec<(usize, Vec<Held>)> = due
                        .into_iter()
                        .map(|(r, k)| (r, held[r].drain(..k).collect()))
                        .collect();
                    holding -= batch.iter().map(|(_, v)| v.len()).sum::<usize>();
                    for (r, _) in &batch {
                        if held[*r].is_empty() {
                            spans[*r] = 0;
                        }
                    }
                    apply_held(&side, p, n, batch, &sh).await;
                }
                lock(&sh.rx).progress.notify_one();
            }
        });
    }
    set
}

/// Inbox items [`apply_held`] applies between two looks at its provider's clients.
const APPLY_SLICE: usize = 64;

/// Applies held inbox items, in order per room, to provider `p`'s clients, and records what
/// decrypted at its receiver (main `p`, spare `n + p`) as of its arrival.
async fn apply_held(side: &Side, p: usize, n: usize, batch: Vec<(usize, Vec<Held>)>, sh: &Shared) {
    let stats = &sh.stats;
    let mut got = Vec::new();
    let late = sh.drain.load(Ordering::Relaxed);
    let mut seen = |receiver: usize, r: usize, at: Instant, event: Event| {
        let fail = match event {
            Event::Message { payload, .. } => match find_marker(&payload) {
                Some(mark) => {
                    got.push((receiver, mark, at));
                    None
                }
                None => Some("a message without the lab's marker".to_owned()),
            },
            Event::Failed { what } => Some(format!("{what} in {}", room_id(r))),
            _ => None,
        };
        if let Some(what) = fail {
            stats.decrypt_failures.fetch_add(1, Ordering::Relaxed);
            let mut f = lock(&stats.failures);
            if f.len() < 3 {
                let who = if receiver < n { "" } else { " (spare)" };
                f.push(format!("{}{who}: {what}", provider(p)));
            }
        }
    };
    // In slices, letting go of the clients between them: a room that decrypts a long
    // backlog at once (one with a spare client, at a handshake) must not hold up the
    // provider's sender in every other room meanwhile.
    let mut items = batch
        .into_iter()
        .flat_map(|(r, items)| items.into_iter().map(move |item| (r, item)))
        .peekable();
    while items.peek().is_some() {
        let mut members = side.members.lock().await;
        let mut spares = side.spares.lock().await;
        let cpu0 = thread_cpu_ns();
        for (r, (fanout, at, to)) in items.by_ref().take(APPLY_SLICE) {
            if to != To::Spare
                && let Some(m) = members.get_mut(r)
            {
                let (own, planned) = match fanout_mls(&fanout) {
                    Some((mls, true)) => (m.own.remove(&digest(mls)), false),
                    // A handshake planned before the phase: the member takes the state its
                    // fork reached by applying it.
                    Some((mls, false)) => {
                        (false, m.adopt_planned(digest(mls), &sh.marks[r * n + p]))
                    }
                    None => (false, false),
                };
                // Our own message, back from the hub, is not applied again.
                if !own && !planned {
                    seen(p, r, at, m.client.handle_fanout(&fanout));
                }
            }
            // The provider's spare client in the room, if any, applies everything (its
            // provider's main client's messages included) until it is removed.
            if to != To::Main
                && let Some(slot) = spares.get_mut(r)
                && let Some(sp) = slot.as_mut()
            {
                match sp.client.handle_fanout(&fanout) {
                    Event::Commit {
                        removed_me: true, ..
                    } => {
                        *slot = None;
                        stats.spares_left.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Joined { epoch } if epoch > 0 && !sp.joined => {
                        sp.joined = true;
                        stats.spares_joined.fetch_add(1, Ordering::Relaxed);
                    }
                    event => seen(n + p, r, at, event),
                }
            }
        }
        stats
            .decrypt_ns
            .fetch_add(thread_cpu_ns().saturating_sub(cpu0), Ordering::Relaxed);
        drop((members, spares));
        tokio::task::yield_now().await;
    }
    if late {
        stats
            .decrypted_after
            .fetch_add(got.len() as u64, Ordering::Relaxed);
    }
    let sched = lock(&sh.sched);
    let mut t = lock(&sh.rx);
    for (receiver, (s, c, mut at_ns), at) in got {
        if at_ns == SCHED_LATER {
            match sched.get(&(s, c)) {
                Some(ns) => at_ns = *ns,
                None => {
                    // Only a bug can bring one: a pool message is recorded when taken.
                    stats.decrypt_failures.fetch_add(1, Ordering::Relaxed);
                    let mut f = lock(&stats.failures);
                    if f.len() < 3 {
                        f.push(format!("message {s}/{c}: encrypted ahead, never submitted"));
                    }
                    continue;
                }
            }
        }
        t.record(receiver, s, c, at_ns, at);
    }
}

/// One message waiting to be (re-)encrypted: room, plaintext, send time.
type Plain = (usize, Vec<u8>, u64);

/// A message a sender submits next: a new one (its room and send time) or one the hub
/// refused as of an old epoch.
enum Pick {
    New { r: usize, sched_ns: u64 },
    Again(Plain),
}

/// The plaintext of message `k` of `stream` (room `stream / n`, provider `stream % n`), of
/// about `size` bytes, starting with or holding the lab's marker. Franked (`--mls-frank`):
/// MIMI content (draft-ietf-mimi-content) whose one part carries the marker and padding,
/// with the sender and room URIs a franked message asserts (protocol-06 §5.4.1.1), so that
/// the sender puts its franking tag in the AAD and the hub franks it.
fn plaintext(
    stream: u32,
    n: usize,
    k: u64,
    sched_ns: u64,
    size: usize,
    frank: bool,
    rng: &mut u64,
) -> Vec<u8> {
    let padded = |len: usize, rng: &mut u64| {
        let mut b = Vec::with_capacity(len.max(20) + 8);
        b.extend_from_slice(&marker_bytes(stream, k as u32, sched_ns));
        while b.len() < len {
            unit(rng);
            b.extend_from_slice(&rng.to_le_bytes());
        }
        b.truncate(len.max(20));
        b
    };
    if !frank {
        return padded(size, rng);
    }
    let (r, p) = (stream as usize / n.max(1), stream as usize % n.max(1));
    let mut salt = [0u8; 16];
    for half in salt.chunks_mut(8) {
        unit(rng);
        half.copy_from_slice(&rng.to_le_bytes());
    }
    let content = |body: Vec<u8>| {
        let part = NestedPart::single(Disposition::RENDER, LAB_CONTENT_TYPE, body);
        let mut m = MimiContent::new(salt, part);
        m.extensions.set_sender_uri(user(p, r));
        m.extensions.set_room_uri(room_id(r));
        m.encode()
    };
    // The body's length prefix grows by two bytes past 23 and by one past 255.
    let frame = content(Vec::new()).map_or(0, |c| c.len()) + 3;
    let body = padded(size.saturating_sub(frame), rng);
    // Our own fields always encode; were one not to, the bare payload goes unfranked.
    content(body.clone()).unwrap_or(body)
}

/// The lab's part: opaque bytes (its marker and padding), not text.
const LAB_CONTENT_TYPE: &str = "application/octet-stream";

/// Encrypts `pt` at member `m`, noting the MLS message as its own and as of `stream`:
/// the submitMessage request and the MLS message's size.
fn encrypt(m: &mut Member, pt: &[u8], stream: u32, sh: &Shared) -> Result<(Bytes, usize)> {
    encrypt_with(&mut m.client, &mut m.own, pt, stream, sh)
}

/// [`encrypt`] with a client of the member's (its own, or a fork planning ahead).
fn encrypt_with(
    client: &mut MlsClient,
    own: &mut HashSet<u64>,
    pt: &[u8],
    stream: u32,
    sh: &Shared,
) -> Result<(Bytes, usize)> {
    let body = client.encrypt(pt)?;
    let req =
        SubmitMessageRequest::decode(&body).map_err(|e| anyhow!("our own submit request: {e}"))?;
    let mls = req.app_message.as_bytes();
    let d = digest(mls);
    own.insert(d);
    lock(&sh.streams).insert(d, stream);
    Ok((body, mls.len()))
}

/// The next pool message of member `m` if the pool is still of the client's epoch; else the
/// pool is dropped (a commit that was not planned moved the epoch on).
fn take_ahead(m: &mut Member) -> Option<Ahead> {
    if m.ahead.is_empty() {
        return None;
    }
    if m.ahead_epoch != m.client.epoch() {
        m.ahead.clear();
        return None;
    }
    m.ahead.pop_front()
}

/// `--mls-encrypt ahead`: fills every member's pool with `per_stream` messages of its stream
/// for its current epoch, numbered on from the stream's counter; one task per provider.
/// Returns the messages encrypted.
async fn encrypt_ahead(
    sides: &[Arc<Side>],
    per_stream: u64,
    (size, frank): (usize, bool),
    sh: &Arc<Shared>,
) -> Result<u64> {
    let n = sides.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (p, side) in sides.iter().enumerate() {
        let (side, sh) = (side.clone(), sh.clone());
        tasks.spawn(async move {
            let mut members = side.members.lock().await;
            let mut done = 0u64;
            for (r, m) in members.iter_mut().enumerate() {
                let stream = (r * n + p) as u32;
                let from = sh.marks[stream as usize].fetch_add(per_stream, Ordering::Relaxed);
                let mut rng = 0xa076_1d64_78bd_642f ^ ((u64::from(stream) + 1) << 24);
                m.ahead.clear();
                m.ahead_epoch = m.client.epoch();
                for k in from..from + per_stream {
                    let pt = plaintext(stream, n, k, SCHED_LATER, size, frank, &mut rng);
                    let (body, mls_len) = encrypt(m, &pt, stream, &sh)?;
                    m.ahead.push_back(Ahead {
                        k,
                        pt,
                        body,
                        mls_len,
                    });
                    done += 1;
                }
            }
            Ok::<_, anyhow::Error>(done)
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r.map_err(|e| anyhow!("encrypting ahead: {e}"))??;
    }
    Ok(total)
}

/// Messages per second of a closed-loop phase that `--mls-encrypt ahead` encrypts for:
/// above the rates a closed loop reaches on the 2-core machine (a pool that runs dry
/// turns its stream to inline encryption, and the phase then measures the lab's crypto).
const CLOSED_LOOP_AHEAD_RATE: f64 = 100_000.0;

/// Pool messages per stream for `--mls-encrypt ahead`: the open loop's schedule, or
/// [`CLOSED_LOOP_AHEAD_RATE`] over all streams in a closed loop (beyond it, inline).
fn ahead_per_stream(opts: &BenchOptions, streams: usize) -> u64 {
    let secs = opts.duration.as_secs_f64();
    let total = opts
        .rate
        .map_or(CLOSED_LOOP_AHEAD_RATE * secs, |rate| rate * secs);
    (total / streams.max(1) as f64).ceil() as u64 + 1
}

/// What a sender needs besides its provider's clients.
struct SendCtx {
    p: usize,
    n: usize,
    rooms: usize,
    window: u64,
    rate: Option<f64>,
    batch_max: usize,
    size: usize,
    /// `--mls-frank`: franked MIMI content.
    frank: bool,
    until: Instant,
    epoch: Instant,
    sh: Arc<Shared>,
    stop: Arc<AtomicBool>,
    /// Messages handed out per stream (room * n + provider).
    counters: Arc<Vec<AtomicU64>>,
    /// Deliveries expected from what the hub accepted (members at encryption but the sender).
    expected: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

/// Provider `p`'s sender: encrypts for its rooms (closed loop: those with window space; open
/// loop: those with messages due) and submits to its own node. Messages the hub refused as
/// of an old epoch are encrypted again, in order, once the client has caught up.
async fn sender(side: Arc<Side>, admin: Admin, c: SendCtx) -> Result<()> {
    let mut client = admin.client();
    let receivers = (c.n - 1).max(1) as u64;
    let start = Instant::now();
    let streams = (c.rooms * c.n) as f64;
    let interval = c
        .rate
        .map(|rate| Duration::from_secs_f64(streams / rate.max(1e-3)));
    let mut rngs: Vec<u64> = (0..c.rooms)
        .map(|r| 0x9e37_79b9_7f4a_7c15 ^ (((c.p * c.rooms + r) as u64 + 1) << 20))
        .collect();
    let mut retry: Vec<Plain> = Vec::new();
    let mut first = 0usize;
    // Where this phase's counters start: an open loop's schedule counts from there.
    let base: Vec<u64> = c
        .counters
        .iter()
        .map(|x| x.load(Ordering::Relaxed))
        .collect();
    while !c.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= c.until && retry.is_empty() {
            break;
        }
        let mut picks: Vec<Pick> = retry.drain(..).map(Pick::Again).collect();
        if now < c.until {
            for r in (0..c.rooms).map(|i| (first + i) % c.rooms) {
                let stream = r * c.n + c.p;
                let sent = c.counters[stream].load(Ordering::Relaxed);
                let free = match interval {
                    None => {
                        let done = c.sh.arrived[stream].load(Ordering::Relaxed);
                        (c.window + done / receivers).saturating_sub(sent)
                    }
                    Some(i) => {
                        let offset = i.mul_f64(stream as f64 / streams);
                        let due = now.saturating_duration_since(start + offset);
                        let due = (due.as_secs_f64() / i.as_secs_f64()).floor() as u64 + 1;
                        due.saturating_sub(sent - base[stream])
                    }
                };
                // The follower keeps a room's forwards in its clients' order (relay-core's
                // forward queue), so a follower's client may batch several per room too.
                let free = (free as usize).min(c.batch_max.saturating_sub(picks.len()));
                for _ in 0..free {
                    let k = c.counters[stream].fetch_add(1, Ordering::Relaxed);
                    let sched = match interval {
                        Some(i) => {
                            let k = (k - base[stream]) as u32;
                            start + i.mul_f64(stream as f64 / streams) + i * k
                        }
                        None => now,
                    };
                    let sched_ns = sched.saturating_duration_since(c.epoch).as_nanos() as u64;
                    picks.push(Pick::New { r, sched_ns });
                }
            }
        }
        first = (first + 1) % c.rooms;
        if picks.is_empty() {
            let wake = lock(&c.sh.rx).progress.clone();
            let wait = if interval.is_some() { 2 } else { 5 };
            let _ = tokio::time::timeout(Duration::from_millis(wait), wake.notified()).await;
            continue;
        }
        // Encrypt under the lock; each body with its room, plaintext and receivers.
        // Room, plaintext, request, receivers, send time, whether from a pool.
        let mut batch: Vec<(usize, Vec<u8>, Bytes, u64, u64, bool)> =
            Vec::with_capacity(picks.len());
        {
            let mut members = side.members.lock().await;
            let cpu0 = thread_cpu_ns();
            for pick in picks {
                let stream = |r: usize| (r * c.n + c.p) as u32;
                let (r, sched_ns, refused) = match pick {
                    Pick::Again((r, pt, sched_ns)) => (r, sched_ns, Some(pt)),
                    Pick::New { r, sched_ns } => (r, sched_ns, None),
                };
                // A refused message was never accepted, so the pool's next one (of the new
                // epoch, a planned commit's) takes its place and its send time. Encrypted
                // again instead, it would come before the pool's first generations, and the
                // receivers' ratchets do not go back that far.
                let (pt, body, mls_len, pooled) = match take_ahead(&mut members[r]) {
                    Some(a) => {
                        lock(&c.sh.sched).insert((stream(r), a.k as u32), sched_ns);
                        (a.pt, a.body, a.mls_len, true)
                    }
                    None => {
                        let pt = refused.unwrap_or_else(|| {
                            let k = c.sh.marks[stream(r) as usize].fetch_add(1, Ordering::Relaxed);
                            plaintext(stream(r), c.n, k, sched_ns, c.size, c.frank, &mut rngs[r])
                        });
                        let (body, len) = encrypt(&mut members[r], &pt, stream(r), &c.sh)?;
                        (pt, body, len, false)
                    }
                };
                c.sh.stats
                    .mls_bytes
                    .fetch_add(mls_len as u64, Ordering::Relaxed);
                c.sh.stats.mls_msgs.fetch_add(1, Ordering::Relaxed);
                let rcv = members[r].receivers();
                batch.push((r, pt, body, rcv, sched_ns, pooled));
            }
            c.sh.stats
                .encrypt_ns
                .fetch_add(thread_cpu_ns().saturating_sub(cpu0), Ordering::Relaxed);
        }
        let ids: Vec<String> = (0..c.rooms).map(room_id).collect();
        let mut rest = &batch[..];
        let mut refused_since: Option<Instant> = None;
        while !rest.is_empty() {
            let mut bytes = 0;
            let take = rest
                .iter()
                .take_while(|x| {
                    bytes += x.2.len();
                    bytes <= CALL_BYTES
                })
                .count()
                .max(1);
            let call: Vec<(&str, Bytes)> = rest[..take]
                .iter()
                .map(|(r, _, b, ..)| (ids[*r].as_str(), b.clone()))
                .collect();
            let answers = match client.submit_batch(&call).await {
                Ok(a) => a,
                Err(e) => {
                    wait_or_fail(&mut refused_since, &c.stop, &format!("{e:#}")).await?;
                    if c.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    continue;
                }
            };
            let mut done = 0;
            let mut again = None;
            for ((r, pt, _, rcv, sched_ns, pooled), (st, b)) in rest.iter().zip(&answers) {
                let status = (*st == hyper::StatusCode::OK)
                    .then(|| SubmitMessageResponse::decode(b).ok())
                    .flatten()
                    .map(|x| x.status);
                match status {
                    Some(SubmitStatus::Accepted { .. }) => {
                        c.sent.fetch_add(1, Ordering::Relaxed);
                        c.expected.fetch_add(*rcv, Ordering::Relaxed);
                        if *pooled {
                            c.sh.from_pools.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(SubmitStatus::EpochTooOld { .. }) => {
                        c.sh.stats.retries.fetch_add(1, Ordering::Relaxed);
                        retry.push((*r, pt.clone(), *sched_ns));
                    }
                    _ => {
                        again = Some(format!("{st}: {}", String::from_utf8_lossy(b)));
                        break;
                    }
                }
                done += 1;
            }
            rest = &rest[done..];
            if let Some(why) = again {
                // The same bytes again: the hub answers a repeat from its dedupe window.
                wait_or_fail(&mut refused_since, &c.stop, &why).await?;
                if c.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
        }
        if !retry.is_empty() {
            // Give the reader a moment to apply the commit that made the epoch old.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(())
}

async fn wait_or_fail(since: &mut Option<Instant>, stop: &AtomicBool, why: &str) -> Result<()> {
    let t = *since.get_or_insert_with(Instant::now);
    if !stop.load(Ordering::Relaxed) && t.elapsed() > SUBMIT_PATIENCE {
        bail!("a node refused a message for {SUBMIT_PATIENCE:?}: {why}");
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

/// The kinds of commit the lab makes, in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommitKind {
    /// A random member updates its own leaf.
    SelfUpdate,
    /// An owner adds a provider's spare client to the room (claiming its KeyPackage, the
    /// AppDataUpdate listing it), or removes it (the AppDataUpdate unlisting it).
    Membership,
    /// An owner promotes a follower's user to owner or demotes it (AppDataUpdate only).
    Role,
}

const COMMIT_CYCLE: [CommitKind; 3] = [
    CommitKind::SelfUpdate,
    CommitKind::Membership,
    CommitKind::Role,
];

fn pick(rng: &mut u64, n: usize) -> usize {
    (unit(rng) * n as f64) as usize % n.max(1)
}

type CommitResult = Result<UpdateResult, MlsClientError>;

/// Counts a commit the hub answered: accepted by its kind (`add`: a Membership commit's),
/// refused as such.
fn count_commit(stats: &MlsStats, kind: CommitKind, add: bool, accepted: bool) {
    if !accepted {
        stats.commits_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stats.commits.fetch_add(1, Ordering::Relaxed);
    let counter = match kind {
        CommitKind::SelfUpdate => &stats.self_updates,
        CommitKind::Membership if add => &stats.adds,
        CommitKind::Membership => &stats.removes,
        CommitKind::Role => &stats.role_changes,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The role that toggles `target` between owner and regular, as `client` sees the room;
/// `None` if it is not listed.
fn toggled_role(client: &MlsClient, target: &str) -> Option<u32> {
    match client.participants().iter().find(|(u, _)| u == target) {
        Some((_, role)) if *role == room_policy::OWNER_ROLE => Some(room_policy::REGULAR_ROLE),
        Some(_) => Some(room_policy::OWNER_ROLE),
        None => None,
    }
}

/// A commit planned before the phase and sent at its turn: who commits in which room, its
/// UpdateRequest and its digest, and for an Add the spare client it adds (whose KeyPackage
/// the owner claimed while planning).
struct Planned {
    r: usize,
    by: usize,
    kind: CommitKind,
    add: bool,
    body: Bytes,
    commit: u64,
    spare: Option<(usize, MlsClient)>,
}

/// The commit of an UpdateRequest the lab built, as the hub fans it out, and its digest.
fn commit_fanout(update: &[u8]) -> Result<(Vec<u8>, u64)> {
    let req = UpdateRequest::decode(update).map_err(|e| anyhow!("our own update: {e}"))?;
    let HandshakeBundle::Commit { commit, .. } = req.bundle else {
        bail!("our own update carries no commit");
    };
    let d = digest(commit.as_bytes());
    let fanout = FanoutMessage {
        timestamp: 0,
        message: commit,
        extra: FanoutExtra::Commit {
            external_proposals: Vec::new(),
        },
    }
    .encode()
    .map_err(|e| anyhow!("a planned commit's fan-out: {e}"))?;
    Ok((fanout, d))
}

/// What sizes and numbers the pools of planned epochs: messages per stream for the whole
/// phase, the phase, the commits' interval, and the counters each planned epoch's pool
/// numbers from (`(j + 1) * block` for commit `j`).
struct PlanPools {
    per_stream: u64,
    duration: Duration,
    every: Duration,
    block: u64,
    size: usize,
    frank: bool,
}

/// `--mls-encrypt ahead`: plans the phase's first `count` commits before it, as
/// [`commit_step`] makes them at their turn (kinds in turn, random rooms and committers), on
/// forks of the room's main clients: the committer's builds the commit and merges it, the
/// others apply it, and each then encrypts its pool for the epoch the commit starts, sized
/// for the rest of the phase. An Add's spare client publishes its KeyPackage and consents,
/// and the owner claims it, now. Each main client keeps its plans; the commits are returned
/// in order. The spare clients apply every commit themselves, at their turn.
async fn plan_commits(
    sides: &[Arc<Side>],
    rooms: usize,
    count: usize,
    pools: &PlanPools,
    sh: &Shared,
) -> Result<VecDeque<Planned>> {
    let n = sides.len();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut text_rng = 0x9fb2_1c65_1e98_df25_u64;
    // Each provider's client in each room as planned so far: a fork, made at first use.
    let mut state: Vec<Vec<Option<MlsClient>>> =
        (0..n).map(|_| (0..rooms).map(|_| None).collect()).collect();
    let mut spare_in = vec![vec![false; rooms]; n];
    let accepted = Bytes::from(
        UpdateRoomResponse::success(0)
            .encode()
            .map_err(|e| anyhow!("an answer: {e}"))?,
    );
    let mut out = VecDeque::new();
    for j in 0..count {
        let kind = COMMIT_CYCLE[j % 3];
        let mut r = pick(&mut rng, rooms);
        let mut q = pick(&mut rng, n);
        if kind == CommitKind::Membership {
            let present: Vec<(usize, usize)> = (0..n)
                .flat_map(|q| (0..rooms).map(move |r| (r, q)))
                .filter(|(r, q)| spare_in[*q][*r])
                .collect();
            if (j / 3) % 2 == 1 && !present.is_empty() {
                (r, q) = present[pick(&mut rng, present.len())];
            }
        }
        for (p, side) in sides.iter().enumerate() {
            if state[p][r].is_none() {
                let members = side.members.lock().await;
                let m = members.get(r).context("a room's member")?;
                state[p][r] = Some(m.client.fork(side.admin.client())?);
            }
        }
        let at = |state: &Vec<Vec<Option<MlsClient>>>, p: usize| -> Result<Vec<(String, u32)>> {
            Ok(state[p][r].as_ref().context("a fork")?.participants())
        };
        let mut owners = Vec::new();
        for p in 0..n {
            if at(&state, p)?
                .iter()
                .any(|(u, role)| *u == user(p, r) && *role == room_policy::OWNER_ROLE)
            {
                owners.push(p);
            }
        }
        let owner = *owners
            .get(pick(&mut rng, owners.len().max(1)))
            .context("no owner in a room")?;
        let id = room(r)?;
        let mut spare = None;
        let mut add = false;
        let by = match kind {
            CommitKind::SelfUpdate => q,
            CommitKind::Role if n < 2 => continue,
            CommitKind::Role | CommitKind::Membership => owner,
        };
        let fork = state[by][r].as_mut().context("a fork")?;
        let body = match kind {
            CommitKind::SelfUpdate => fork.prepare_self_update()?,
            CommitKind::Role => {
                let target = user(1 + pick(&mut rng, n - 1), r);
                let Some(role) = toggled_role(fork, &target) else {
                    continue;
                };
                fork.prepare_change_role(&target, role)?
            }
            CommitKind::Membership if spare_in[q][r] => {
                spare_in[q][r] = false;
                fork.prepare_remove(&spare_user(q, r))?
            }
            CommitKind::Membership => {
                let mut client = MlsClient::with_api(&spare_user(q, r), sides[q].admin.client())?;
                client.publish_key_packages(1).await?;
                client.set_consent(&user(by, r), Some(&id), true).await?;
                let claim = fork.prepare_claim(&spare_user(q, r), &id)?;
                let (st, answer) = sides[by].admin.client().key_material(claim).await?;
                let kp = match fork.finish_claim(st, &answer)? {
                    Ok(kp) => kp,
                    Err(why) => bail!("planning an add: the claim was refused: {why}"),
                };
                spare_in[q][r] = true;
                spare = Some((q, client));
                add = true;
                fork.prepare_add(&[kp])?
            }
        };
        let (fanout, commit) = commit_fanout(&body)?;
        match fork.finish_commit(hyper::StatusCode::OK, &accepted)? {
            UpdateResult::Accepted => {}
            other => bail!("planning a commit: {other:?}"),
        }
        for (p, row) in state.iter_mut().enumerate() {
            if p == by {
                continue;
            }
            let other = row[r].as_mut().context("a fork")?;
            match other.handle_fanout(&fanout) {
                Event::Commit { .. } => {}
                event => bail!("planning a commit, {} saw {event:?}", provider(p)),
            }
        }
        // The pools of the epoch it starts, for the rest of the phase.
        let at_s = pools.every.as_secs_f64() * (j + 1) as f64;
        let left = (pools.duration.as_secs_f64() - at_s).max(0.0) / pools.duration.as_secs_f64();
        let len = (pools.per_stream as f64 * left * 1.1).ceil() as u64 + 1;
        let from = (j as u64 + 1) * pools.block;
        for (p, side) in sides.iter().enumerate() {
            let stream = (r * n + p) as u32;
            let fork = state[p][r].as_mut().context("a fork")?;
            let mut members = side.members.lock().await;
            let m = members.get_mut(r).context("a room's member")?;
            let mut pool = VecDeque::with_capacity(len as usize);
            for k in from..from + len {
                let pt = plaintext(
                    stream,
                    n,
                    k,
                    SCHED_LATER,
                    pools.size,
                    pools.frank,
                    &mut text_rng,
                );
                let (body, mls_len) = encrypt_with(fork, &mut m.own, &pt, stream, sh)?;
                pool.push_back(Ahead {
                    k,
                    pt,
                    body,
                    mls_len,
                });
            }
            m.plans.push_back(Plan {
                commit,
                client: fork.fork(side.admin.client())?,
                pool,
                pool_end: from + len,
            });
        }
        out.push_back(Planned {
            r,
            by,
            kind,
            add,
            body,
            commit,
            spare,
        });
    }
    Ok(out)
}

/// Sends planned commit `c` at its turn. Accepted, the committer takes its planned state (if
/// its reader has not, from the fan-out); the other members take theirs from the fan-out.
/// Returns whether the hub accepted it: if not, the room's later plans cannot happen.
async fn planned_step(sides: &[Arc<Side>], c: Planned, sh: &Shared) -> bool {
    let (stats, n) = (&sh.stats, sides.len());
    let Ok(id) = room(c.r) else { return false };
    let spare_side = c.spare.as_ref().map(|(q, _)| *q);
    if let Some((q, client)) = c.spare
        && let Some(slot) = sides[q].spares.lock().await.get_mut(c.r)
    {
        // In place before its Welcome can reach the provider's reader.
        *slot = Some(Spare {
            client,
            joined: false,
        });
    }
    let answer = sides[c.by].admin.client().update(&id, c.body).await;
    let accepted = answer.as_ref().is_ok_and(|(st, b)| {
        st.is_success()
            && UpdateRoomResponse::decode(b)
                .is_ok_and(|x| matches!(x.outcome, UpdateOutcome::Success { .. }))
    });
    count_commit(stats, c.kind, c.add, accepted);
    if accepted {
        let mut members = sides[c.by].members.lock().await;
        if let Some(m) = members.get_mut(c.r) {
            m.adopt_planned(c.commit, &sh.marks[c.r * n + c.by]);
        }
    } else if let Some(q) = spare_side
        && let Some(slot) = sides[q].spares.lock().await.get_mut(c.r)
    {
        // No Welcome will come.
        *slot = None;
    }
    accepted
}

/// Sends the commit that `build` makes with provider `p`'s client in room `r`. The provider's
/// clients are locked only to build it and to apply the hub's answer, not while it crosses to
/// the hub and back under load: the provider's sender and reader go on meanwhile (the reader
/// may apply the commit's fan-out before the answer comes; the client merges it then).
async fn commit_in(
    side: &Side,
    r: usize,
    build: impl FnOnce(&mut MlsClient) -> Result<Bytes, MlsClientError>,
) -> CommitResult {
    let id = room(r).map_err(|e| MlsClientError::Mls(format!("{e:#}")))?;
    let body = {
        let mut members = side.members.lock().await;
        let m = members.get_mut(r).ok_or(MlsClientError::NoGroup)?;
        build(&mut m.client)?
    };
    let (st, answer) = side.admin.client().update(&id, body).await?;
    let mut members = side.members.lock().await;
    let m = members.get_mut(r).ok_or(MlsClientError::NoGroup)?;
    m.client.finish_commit(st, &answer)
}

/// One commit of kind `COMMIT_CYCLE[k % 3]` in a random room (a follower's /update crosses
/// the link). Counted by kind when the hub accepts it, as refused otherwise.
async fn commit_step(sides: &[Arc<Side>], rooms: usize, k: u64, rng: &mut u64, stats: &MlsStats) {
    let r = pick(rng, rooms);
    let kind = COMMIT_CYCLE[(k % 3) as usize];
    let (result, add) = match kind {
        CommitKind::SelfUpdate => {
            let p = pick(rng, sides.len());
            (
                commit_in(&sides[p], r, MlsClient::prepare_self_update).await,
                false,
            )
        }
        CommitKind::Membership => {
            // Adds and removes take turns: every other one removes a spare that is in.
            let mut present = Vec::new();
            for (q, side) in sides.iter().enumerate() {
                let spares = side.spares.lock().await;
                present.extend((0..rooms).filter(|r| spares[*r].is_some()).map(|r| (r, q)));
            }
            let (r, q) = if (k / 3) % 2 == 1 && !present.is_empty() {
                present[pick(rng, present.len())]
            } else {
                (r, pick(rng, sides.len()))
            };
            match membership(sides, r, q, rng).await {
                Some(done) => done,
                None => return,
            }
        }
        CommitKind::Role => {
            if sides.len() < 2 {
                return;
            }
            // The room's creator (the hub's user) stays owner; a follower's user toggles.
            let target = user(1 + pick(rng, sides.len() - 1), r);
            let Some(o) = owner(sides, r, rng).await else {
                return;
            };
            let result = commit_in(&sides[o], r, |c| {
                let role = toggled_role(c, &target)
                    .ok_or_else(|| MlsClientError::Mls(format!("{target} is not listed")))?;
                c.prepare_change_role(&target, role)
            })
            .await;
            (result, false)
        }
    };
    count_commit(
        stats,
        kind,
        add,
        matches!(result, Ok(UpdateResult::Accepted)),
    );
}

/// A random provider whose client in room `r` is an owner, as its own view of the room has it
/// (the hub's always is).
async fn owner(sides: &[Arc<Side>], r: usize, rng: &mut u64) -> Option<usize> {
    let mut owners = Vec::new();
    for (p, side) in sides.iter().enumerate() {
        let members = side.members.lock().await;
        let me = user(p, r);
        if members.get(r).is_some_and(|m| {
            m.client
                .participants()
                .iter()
                .any(|(u, role)| *u == me && *role == room_policy::OWNER_ROLE)
        }) {
            owners.push(p);
        }
    }
    (!owners.is_empty()).then(|| owners[pick(rng, owners.len())])
}

/// Adds provider `q`'s spare client to room `r`, or removes it when it is a member: the
/// commit's result and whether it was an add. `None`: nothing was tried (no owner, or the
/// spare could not be set up).
async fn membership(
    sides: &[Arc<Side>],
    r: usize,
    q: usize,
    rng: &mut u64,
) -> Option<(CommitResult, bool)> {
    let id = room(r).ok()?;
    let o = owner(sides, r, rng).await?;
    let spare = spare_user(q, r);
    let present = sides[q].spares.lock().await.get(r)?.is_some();
    let listed = {
        let members = sides[o].members.lock().await;
        members.get(r)?.client.members().contains(&spare)
    };
    if present {
        // Not listed: its removal is accepted but not yet applied by its reader.
        if !listed {
            return None;
        }
        let result = commit_in(&sides[o], r, |c| c.prepare_remove(&spare)).await;
        return Some((result, false));
    }
    // A fresh client with a fresh KeyPackage, consenting to the owner's claim, in place
    // before its Welcome can reach the provider's reader.
    let mut client = MlsClient::with_api(&spare, sides[q].admin.client()).ok()?;
    client.publish_key_packages(1).await.ok()?;
    client
        .set_consent(&user(o, r), Some(&id), true)
        .await
        .ok()?;
    *sides[q].spares.lock().await.get_mut(r)? = Some(Spare {
        client,
        joined: false,
    });
    // The claim too crosses to the hub with the owner's provider's clients unlocked.
    let claim = {
        let members = sides[o].members.lock().await;
        members.get(r)?.client.prepare_claim(&spare, &id)
    };
    let claimed = match claim {
        Ok(body) => match sides[o].admin.client().key_material(body).await {
            Ok((st, answer)) => {
                let members = sides[o].members.lock().await;
                members.get(r)?.client.finish_claim(st, &answer)
            }
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e),
    };
    let result = match claimed {
        Ok(Ok(kp)) => commit_in(&sides[o], r, |c| c.prepare_add(&[kp])).await,
        Ok(Err(why)) => Ok(UpdateResult::Refused(why)),
        Err(e) => Err(e),
    };
    if !matches!(result, Ok(UpdateResult::Accepted)) {
        // No Welcome will come: the next add starts afresh.
        *sides[q].spares.lock().await.get_mut(r)? = None;
    }
    Some((result, true))
}

/// Application messages that reached a main client of a provider other than the sender's.
fn arrivals(sh: &Shared) -> u64 {
    sh.arrived.iter().map(|a| a.load(Ordering::Relaxed)).sum()
}

/// One phase's load: which senders, at what rate, for how long, with what commits.
struct Load<'a> {
    admins: &'a [Admin],
    sides: &'a [Arc<Side>],
    opts: &'a BenchOptions,
    epoch: Instant,
    sh: &'a Arc<Shared>,
    counters: &'a Arc<Vec<AtomicU64>>,
    /// Commits planned before the phase, sent in turn before any made on the spot.
    planned: &'a tokio::sync::Mutex<VecDeque<Planned>>,
    rate: Option<f64>,
    commit_rate: f64,
    duration: Duration,
}

/// Runs one phase's senders (and commits) to its end; `tick` is called every 50 ms with the
/// time since the start and what was accepted and delivered. Returns (messages accepted,
/// deliveries expected).
async fn phase(l: Load<'_>, mut tick: impl FnMut(Duration, u64, u64, u64)) -> Result<(u64, u64)> {
    let (n, rooms) = (l.admins.len(), l.sides[0].members.lock().await.len());
    let stop = Arc::new(AtomicBool::new(false));
    let (expected, sent) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let until = start + l.duration;
    l.sh.drain.store(false, Ordering::Relaxed);
    let arrived0 = arrivals(l.sh);
    let mut senders = tokio::task::JoinSet::new();
    for (p, (side, admin)) in l.sides.iter().zip(l.admins).enumerate() {
        let ctx = SendCtx {
            p,
            n,
            rooms,
            window: l.opts.window,
            rate: l.rate,
            batch_max: l.opts.submit_batch.max(1) as usize,
            size: l.opts.sizes.app,
            frank: l.opts.mls_frank,
            until,
            epoch: l.epoch,
            sh: l.sh.clone(),
            stop: stop.clone(),
            counters: l.counters.clone(),
            expected: expected.clone(),
            sent: sent.clone(),
        };
        senders.spawn(sender(side.clone(), admin.clone(), ctx));
    }
    let mut rng = 0x5851_f42d_4c95_7f2d_u64 ^ start.duration_since(l.epoch).as_nanos() as u64;
    let every = (l.commit_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / l.commit_rate));
    let mut next_commit = every.map(|e| start + e);
    let mut tried = 0u64;
    let mut failed = None;
    // Rooms where a planned commit was refused: their later plans cannot happen.
    let mut broken = HashSet::new();
    loop {
        tokio::select! {
            r = senders.join_next() => match r {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    failed.get_or_insert(e);
                    stop.store(true, Ordering::Relaxed);
                }
                Some(Err(e)) => {
                    failed.get_or_insert(anyhow!("a sender: {e}"));
                    stop.store(true, Ordering::Relaxed);
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if let (Some(at), Some(e)) = (next_commit, every)
                    && Instant::now() >= at
                    && Instant::now() < until
                {
                    let planned = l.planned.lock().await.pop_front();
                    match planned {
                        Some(c) if !broken.contains(&c.r) => {
                            let r = c.r;
                            if !planned_step(l.sides, c, l.sh).await {
                                broken.insert(r);
                            }
                        }
                        _ => commit_step(l.sides, rooms, tried, &mut rng, &l.sh.stats).await,
                    }
                    tried += 1;
                    next_commit = Some(at + e);
                }
                tick(
                    start.elapsed(),
                    sent.load(Ordering::Relaxed),
                    lock(&l.sh.rx).delivered,
                    l.sh.stats.commits.load(Ordering::Relaxed),
                );
            }
        }
    }
    if l.sh.deferred && failed.is_none() {
        // Every accepted message reaches the other providers' main clients before their
        // readers turn to decrypting what they hold: a reader busy decrypting (seconds) reads
        // no inbox, and what arrived meanwhile would be recorded late.
        let want = arrived0 + sent.load(Ordering::Relaxed) * (n as u64).saturating_sub(1);
        let deadline = Instant::now() + l.opts.settle.max(Duration::from_secs(5));
        while arrivals(l.sh) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Deferred decryption: the readers now decrypt all they hold.
    l.sh.drain.store(true, Ordering::Relaxed);
    match failed {
        Some(e) => Err(e),
        None => Ok((
            sent.load(Ordering::Relaxed),
            expected.load(Ordering::Relaxed),
        )),
    }
}

/// The MLS row: setup (not measured), the measured phase, the last deliveries and, in
/// namespaces, the recovery from a cut link (low rate, no commits).
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    admins: &[Admin],
    pids: &[u32],
    opts: &BenchOptions,
    profile: &super::Profile,
    lab: Option<&super::NetLab>,
    epoch: Instant,
    row: &mut Row,
    progress: &Progress,
    label: &str,
) -> Result<()> {
    let n = admins.len();
    let rooms = opts.rooms.max(1);
    // Receivers: each provider's main clients (0..n), then its spare clients (n..2n).
    let mut rx = Rx::new(epoch, 2 * n)?;
    rx.window_receivers = n;
    let sh = Arc::new(Shared {
        rx: Arc::new(Mutex::new(rx)),
        stats: Arc::new(MlsStats::default()),
        streams: Mutex::new(HashMap::new()),
        arrived: (0..rooms * n).map(|_| AtomicU64::new(0)).collect(),
        drain: AtomicBool::new(false),
        deferred: opts.mls_deferred,
        sched: Mutex::new(HashMap::new()),
        from_pools: AtomicU64::new(0),
        marks: (0..rooms * n).map(|_| AtomicU64::new(0)).collect(),
        slabs: Mutex::new((0..n).map(|_| None).collect()),
    });
    let (rx, stats) = (&sh.rx, &sh.stats);
    let stop_readers = Arc::new(AtomicBool::new(false));
    progress.line(&format!("{label} MLS setup: {rooms} rooms, {n} providers"));
    let t0 = Instant::now();
    let sides = setup(admins, rooms, opts.mls_deferred)
        .await
        .context("MLS clients")?;
    let mut readers = start_readers(admins, &sides, rooms, &sh, &stop_readers);
    let result = async {
        create_rooms(&sides, rooms).await?;
        joined(&sides, Duration::from_secs(30)).await?;
        row.setup_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        lock(rx).new_phase();
        stats.mls_bytes.store(0, Ordering::Relaxed);
        stats.mls_msgs.store(0, Ordering::Relaxed);
        let counters: Arc<Vec<AtomicU64>> =
            Arc::new((0..rooms * n).map(|_| AtomicU64::new(0)).collect());
        let planned = tokio::sync::Mutex::new(VecDeque::new());
        if opts.mls_ahead {
            let per_stream = ahead_per_stream(opts, rooms * n);
            // Sized once, so that no phase's insert copies a table of this size.
            let pooled = per_stream as usize * rooms * n;
            lock(&sh.sched).reserve(pooled);
            lock(&sh.streams).reserve(2 * pooled);
            progress.line(&format!(
                "{label} encrypting ahead: {per_stream} messages per room and provider"
            ));
            let t = Instant::now();
            let done = encrypt_ahead(
                &sides,
                per_stream,
                (opts.sizes.app, opts.mls_frank),
                &sh,
            ).await?;
            progress.line(&format!(
                "{label} encrypted {done} messages ahead in {:.1} s",
                t.elapsed().as_secs_f64()
            ));
            // The phase's commits, planned with the pools of the epochs they start.
            if opts.commit_rate > 0.0 {
                let every = Duration::from_secs_f64(1.0 / opts.commit_rate);
                let count = (1u32..)
                    .map(|k| every * k)
                    .take_while(|t| *t < opts.duration)
                    .count();
                let block = (per_stream * 12 / 10 + 2).next_power_of_two();
                // Counters are u32 in the lab's marker.
                if (count as u64 + 2) * block < u64::from(u32::MAX) {
                    let t = Instant::now();
                    let pools = PlanPools {
                        per_stream,
                        duration: opts.duration,
                        every,
                        block,
                        size: opts.sizes.app,
                        frank: opts.mls_frank,
                    };
                    let plans = plan_commits(&sides, rooms, count, &pools, &sh)
                        .await
                        .context("planning the phase's commits")?;
                    progress.line(&format!(
                        "{label} planned {} commits and their epochs' pools in {:.1} s",
                        plans.len(),
                        t.elapsed().as_secs_f64()
                    ));
                    *planned.lock().await = plans;
                }
            }
        }

        if opts.mls_deferred && opts.mls_ahead {
            // What each reader will hold: the other providers' pooled messages as fan-outs.
            let mut pooled = vec![0u64; n];
            for (p, side) in sides.iter().enumerate() {
                for m in side.members.lock().await.iter() {
                    let pools = std::iter::once(&m.ahead).chain(m.plans.iter().map(|x| &x.pool));
                    pooled[p] += pools
                        .flatten()
                        .map(|a| a.mls_len as u64 + FANOUT_EXTRA)
                        .sum::<u64>();
                }
            }
            let all: u64 = pooled.iter().sum();
            let mut slabs = Vec::with_capacity(n);
            for own in &pooled {
                let cap = ((all - own) as f64 * 1.05) as usize;
                let mut slab = BytesMut::with_capacity(cap);
                slab.resize(cap, 0);
                slab.clear();
                slabs.push(Some(slab));
            }
            *lock(&sh.slabs) = slabs;
        }
        let cpu0 = super::CpuSnap::now(pids);
        stats.encrypt_ns.store(0, Ordering::Relaxed);
        stats.decrypt_ns.store(0, Ordering::Relaxed);
        let link0 = lab.map(super::NetLab::snapshot).unwrap_or_default();
        if let Some(lab) = lab {
            lab.take_drops();
        }
        let load = |rate, commit_rate, duration| Load {
            admins,
            sides: &sides,
            opts,
            epoch,
            sh: &sh,
            counters: &counters,
            planned: &planned,
            rate,
            commit_rate,
            duration,
        };
        let secs = opts.duration.as_secs_f64();
        let (sent, expected) = phase(
            load(opts.rate, opts.commit_rate, opts.duration),
            |t, sent, delivered, commits| {
                progress.line(&format!(
                    "{label} mls {:.1}/{secs:.0} s  accepted {sent}  delivered {delivered}  commits {commits}",
                    t.as_secs_f64().min(secs),
                ));
            },
        )
        .await?;
        progress.line(&format!("{label} waiting for the last deliveries"));
        super::settle(rx, expected, opts.settle).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cpu1 = super::CpuSnap::now(pids);
        let encrypt_ns = stats.encrypt_ns.load(Ordering::Relaxed);
        let crypto_ns = encrypt_ns + stats.decrypt_ns.load(Ordering::Relaxed);
        let link = lab
            .map(super::NetLab::snapshot)
            .unwrap_or_default()
            .since(link0);
        let drops = lab.map(super::NetLab::take_drops).unwrap_or_default();
        {
            let t = lock(rx);
            row.sent = sent;
            row.delivered = t.delivered;
            super::fill_latency(row, &t, &drops, profile, epoch);
            cpu0.fill(&cpu1, t.delivered, row);
            if sent > 0 {
                row.client_crypto_us_per_msg = Some(crypto_ns as f64 / 1e3 / sent as f64);
                row.client_encrypt_us_per_msg = Some(encrypt_ns as f64 / 1e3 / sent as f64);
            }
            if t.delivered > 0 && lab.is_some() {
                row.wire_bytes_per_msg = Some(link.bytes as f64 / t.delivered as f64);
            }
            row.link_drops = lab.map(|_| link.dropped);
            row.socket_drops = link.socket_drops;
        }
        let mut lost = expected.saturating_sub(lock(rx).delivered);

        // Recovery, as for synthetic traffic: 20 msg/s, the link cut from 1 s to 6 s; the
        // time from the restore until every message scheduled before it was delivered.
        if let (Some(lab), true) = (lab, opts.recovery) {
            lock(rx).new_phase();
            let t0 = Instant::now();
            let (cut_at, restore_at) = (t0 + Duration::from_secs(1), t0 + Duration::from_secs(6));
            let mut cut = false;
            let mut restored = false;
            let r = phase(
                load(Some(20.0), 0.0, Duration::from_secs(8)),
                |_, _, _, _| {
                    let now = Instant::now();
                    if !cut && now >= cut_at {
                        lab.set_cut(true);
                        cut = true;
                    }
                    if cut && !restored && now >= restore_at {
                        lab.set_cut(false);
                        restored = true;
                    }
                    progress.line(&format!(
                        "{label} recovery: link {}",
                        if cut && !restored { "cut" } else { "up" }
                    ));
                },
            )
            .await;
            lab.set_cut(false);
            let (sent2, expected2) = r?;
            let all = super::settle(rx, expected2, opts.settle.max(Duration::from_secs(30))).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t = lock(rx);
            lost += expected2.saturating_sub(t.delivered);
            if all {
                row.recovery_ms = super::recovery_ms(&t.samples, epoch, restore_at);
            }
            row.sent += sent2;
        }
        row.lost = Some(lost);
        Ok::<_, anyhow::Error>(())
    }
    .await;
    stop_readers.store(true, Ordering::Relaxed);
    while readers.join_next().await.is_some() {}
    {
        let t = lock(rx);
        row.duplicated = Some(t.duplicated);
        row.out_of_order = Some(t.out_of_order);
    }
    let msgs = stats.mls_msgs.load(Ordering::Relaxed);
    row.mls_msg_bytes =
        (msgs > 0).then(|| stats.mls_bytes.load(Ordering::Relaxed) as f64 / msgs as f64);
    // Every application message is franked by the hub and checked by each receiver
    // (§5.4.1.3); a frank that does not verify counts as a failure.
    let (mut verified, mut refused) = (0, 0);
    for side in &sides {
        for m in side.members.lock().await.iter() {
            verified += m.client.franks_verified;
            refused += m.client.franks_failed;
        }
        for sp in side.spares.lock().await.iter().flatten() {
            verified += sp.client.franks_verified;
            refused += sp.client.franks_failed;
        }
    }
    row.franks_verified = Some(verified);
    row.decrypt_failures = Some(stats.decrypt_failures.load(Ordering::Relaxed) + refused);
    row.retries = Some(stats.retries.load(Ordering::Relaxed));
    row.commits = Some(stats.commits.load(Ordering::Relaxed));
    row.commits_refused = Some(stats.commits_refused.load(Ordering::Relaxed));
    row.mls_decrypt = Some(if sh.deferred { "deferred" } else { "inline" }.to_owned());
    row.mls_encrypt = Some(if opts.mls_ahead { "ahead" } else { "inline" }.to_owned());
    if opts.mls_ahead {
        row.encrypted_ahead = Some(sh.from_pools.load(Ordering::Relaxed));
    }
    if sh.deferred {
        row.decrypted_after_phase = Some(stats.decrypted_after.load(Ordering::Relaxed));
        let forced = stats.forced_drains.load(Ordering::Relaxed);
        if forced > 0 {
            row.note = format!(
                "readers held too many messages and decrypted them {forced} times during the phase"
            );
        }
    }
    for (k, v) in [
        ("self_update", &stats.self_updates),
        ("add", &stats.adds),
        ("remove", &stats.removes),
        ("role", &stats.role_changes),
        ("spares_joined", &stats.spares_joined),
        ("spares_left", &stats.spares_left),
    ] {
        row.commit_kinds
            .insert(k.to_owned(), v.load(Ordering::Relaxed));
    }
    let failures = lock(&stats.failures).clone();
    if !failures.is_empty() {
        row.note = format!("decryption failures, e.g. {}", failures.join("; "));
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// An MLSMessage framing a PrivateMessage of `content_type` (its body is opaque here).
    fn private_message(content_type: u8) -> Vec<u8> {
        let mut m = vec![0, 1, 0, 2]; // mls10, private_message
        m.extend_from_slice(&[4, b'r', b'o', b'o', b'm']); // group_id
        m.extend_from_slice(&7u64.to_be_bytes()); // epoch
        m.push(content_type);
        m.extend_from_slice(&[0]); // authenticated_data
        m.extend_from_slice(&[3, 1, 2, 3]); // encrypted_sender_data
        m.extend_from_slice(&[5, 9, 9, 9, 9, 9]); // ciphertext
        m
    }

    #[test]
    fn a_franked_plaintext_is_mimi_content_of_its_size_holding_the_marker() {
        let (stream, n, size) = (2 * 3 + 1, 3, 1024);
        let mut rng = 5;
        let bare = plaintext(stream, n, 9, 77, size, false, &mut rng);
        assert_eq!(bare.len(), size);
        assert_eq!(find_marker(&bare), Some((stream, 9, 77)));
        let pt = plaintext(stream, n, 9, 77, size, true, &mut rng);
        assert!(pt.len().abs_diff(size) <= 3, "{}", pt.len());
        assert_eq!(find_marker(&pt), Some((stream, 9, 77)));
        // Room 2, provider 1: the URIs a receiver compares with the credential and group.
        let m = MimiContent::decode(&pt).unwrap();
        assert_eq!(m.extensions.sender_uri(), Some(user(1, 2).as_str()));
        assert_eq!(m.extensions.room_uri(), Some(room_id(2).as_str()));
        assert!(mimi_wire::content::content_salt(&pt).is_ok());
    }

    #[test]
    fn a_reader_finds_the_mls_message_of_a_fanout_in_place() {
        let app = private_message(1);
        let mut fanout = Vec::new();
        mimi_wire::proto::encode_fanout_application(42, &app, &mut fanout);
        assert_eq!(fanout_mls(&fanout), Some((&app[..], true)));
        // A commit's arm is not an application message's; the bytes are still found.
        let commit = private_message(3);
        let mut fanout = 42u64.to_be_bytes().to_vec();
        fanout.extend_from_slice(&commit);
        fanout.extend_from_slice(&[0]);
        assert_eq!(fanout_mls(&fanout), Some((&commit[..], false)));
        assert_eq!(fanout_mls(&fanout[..6]), None);
        assert_eq!(fanout_mls(&fanout[..20]), None);
    }
}
