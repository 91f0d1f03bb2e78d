//! Durable state of mimi-relay: [`DurableStore`], the core's [`Store`] on an embedded,
//! crash-safe database ([redb](https://docs.rs/redb), one file, copy-on-write B-trees).
//!
//! # Contract
//!
//! - [`Store::apply`] only encodes the op into an in-memory buffer that keeps its capacity
//!   across commits, and keeps a reference-counted handle to the payload: no I/O, and no
//!   allocation per op once the buffer has grown. Ops applied but not committed are lost on a
//!   crash and are dropped when the store is dropped.
//! - [`Store::commit`] writes every buffered op in one write transaction and returns after one
//!   `fdatasync`: when it returns `Ok`, the whole batch survives `kill -9` and power loss; when
//!   it returns `Err` or the process dies first, none of it is visible after reopening (a commit
//!   is atomic). On `Err` the ops stay buffered, so a retried commit writes them. A commit with
//!   nothing buffered does nothing, and costs no fsync.
//! - A commit that fails for lack of space (a full disk, a quota) is a [`StoreError`] that
//!   says so ([`StoreError::is_storage_full`]); so is a sealed batch's write, which may be
//!   called again and writes the same batch. After any I/O failure the file is closed and
//!   opened again (redb refuses everything after a failed write until then), so reads go on.
//!   Opening a file of the current format needs no new space, so a store opens on a full
//!   disk; only recovering a file that was not closed cleanly may need some (then opening
//!   fails with a storage-full error until there is space).
//! - [`Store::load`] returns the [`Snapshot`] that [`MemStore`] would hold after the same
//!   sequence of committed ops, given what the core guarantees: per-queue `qseq`, inbox offsets
//!   and per-room `room_seq` of `SubmitSeen` are issued in increasing order. Stored data that
//!   does not decode is a [`StoreError`] whose source is a [`DecodeError`], never a panic.
//!   It leaves the inbox's records on disk: the snapshot has only their last offset and how
//!   many each provider sent, kept in a table of their own, so a start reads no record bodies.
//! - [`Store::read_inbox`] and [`Store::count_inbox`] read what the last successful commit left
//!   (one read transaction each, concurrent with a commit being written), never buffered ops;
//!   [`MemStore`] answers the same for the same committed ops.
//! - One process at a time: opening a file another process has open fails.
//!
//! # Layout
//!
//! A table per large kind of state (queues, bodies, inbox, submissions, records), and one,
//! `STATE`, for the small rows most commits change (room sequences, acked marks, cursors,
//! recent hashes, inbox counts and trim mark), told apart by a kind byte: every tree a commit
//! touches costs it a copy-on-write path of 4 KiB pages, however little changed in it, so
//! those rows share one. See the table definitions below. Composite keys are length-prefixed
//! strings and big-endian numbers (see `codec`), so a queue is a contiguous key range ordered
//! by `qseq` and an `Ack` is one range delete.
//!
//! A fanout is stored once however many destinations it waits for: queue entries hold the id
//! of a body in `BODIES`, and so does the hub's own inbox record of it (protocol-06 §5.5: the
//! hub's clients read every fanout too). A body is deleted in the transaction that deletes the
//! last entry or record naming it. How many name each body is not stored: the store counts
//! them in memory when it opens (a scan of the queue entries' 8-byte values and of `STATE`'s
//! list of inbox records naming a body) and keeps the count with every commit, so an
//! acknowledgement writes no reference counts.

mod codec;
mod db;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

pub use codec::DecodeError;
use mimi_wire::uri::ProviderDomain;
pub use relay_core::store::{
    InboxRange, InboxRecord, InboxSummary, MemStore, OwnedOp, RoomSnapshot, SealedCommit, Snapshot,
    Store, StoreError, StoreOp, SubmitSeen,
};

use codec::{PendingLog, Reader, Tag};

type Bytes2Bytes = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// room -> followers (`u16` count, then domains). A row exists for every room any op named
/// as a room (`Room`, `RoomSeq`, `SubmitSeen`), as in [`Snapshot::rooms`].
const ROOMS: Bytes2Bytes = TableDefinition::new("rooms");
/// (room, dest, qseq) -> body id (`u64`) in `BODIES`.
const QUEUES: Bytes2Bytes = TableDefinition::new("queues");
/// body id (`u64`) -> fanout bytes, one row per fanout whatever the number of `QUEUES` entries
/// and `INBOX` records naming it; deleted with the last of them.
const BODIES: Bytes2Bytes = TableDefinition::new("bodies");
/// (room, dest) -> (): every queue ever enqueued to, so an emptied queue loads as empty.
const QUEUE_KEYS: Bytes2Bytes = TableDefinition::new("queue_keys");
/// offset -> kind byte, room, from, accepted_ms, then the fanout bytes or a body id (see
/// `codec::INBOX_BODY`).
const INBOX: Bytes2Bytes = TableDefinition::new("inbox");
/// (room, room_seq) -> submission key (u128), accepted_ms.
const SEEN: Bytes2Bytes = TableDefinition::new("submit_seen");
/// The small rows most commits change, in one tree so that a commit copies one path of pages
/// for all of them rather than one per table. The first key byte says what a row is (`S_*`).
const STATE: Bytes2Bytes = TableDefinition::new("state");
/// Format version.
const META: Bytes2Bytes = TableDefinition::new("meta");
/// Keyed state records (MLS room state, key material, directory, consent, abuse reports).
const RECORDS: Bytes2Bytes = TableDefinition::new("records");

/// Every table of this format, created with the file.
const TABLES: [Bytes2Bytes; 9] = [
    ROOMS, QUEUES, BODIES, QUEUE_KEYS, INBOX, SEEN, STATE, META, RECORDS,
];

/// `STATE`: room -> next_seq, last_ms.
const S_ROOM_SEQ: u8 = 1;
/// `STATE`: (room, dest) -> highest acknowledged qseq.
const S_ACKED: u8 = 2;
/// `STATE`: (hub, room) -> next expected seq.
const S_CURSOR: u8 = 3;
/// `STATE`: from (length-prefixed) -> records of `INBOX` from that provider, so a start counts
/// them without reading the records.
const S_INBOX_COUNT: u8 = 5;
/// `STATE`: the inbox trim mark (the key is just the kind byte).
const S_INBOX_TRIMMED: u8 = 6;
/// `STATE`: inbox offset -> the body id its record names, for the records that name one, so a
/// start counts the references to bodies without reading the inbox.
const S_INBOX_BODY: u8 = 7;
/// `STATE`: (hub, room, slot u16) -> n, hash (u128): each follower cursor's ring of recent
/// FanoutMessage hashes. The largest kind, and numbered last: the rows above share the first
/// pages of the tree, so a commit copies one or two leaves for all of them.
const S_RECENT: u8 = 8;

// Tables of formats 1 to 3 that format 4 keeps in `STATE`.
const ROOM_SEQS_V3: Bytes2Bytes = TableDefinition::new("room_seqs");
const ACKED_V3: Bytes2Bytes = TableDefinition::new("acked");
const CURSORS_V3: Bytes2Bytes = TableDefinition::new("cursors");
const RECENT_V3: Bytes2Bytes = TableDefinition::new("recent_hashes");
const INBOX_COUNTS_V3: Bytes2Bytes = TableDefinition::new("inbox_counts");

const META_FORMAT: &[u8] = b"format";
/// Where formats 1 to 3 kept the inbox trim mark.
const META_INBOX_TRIMMED_V3: &[u8] = b"inbox_trimmed";
/// Bumped on any change to the layout above. Format 1 had no inbox counts, format 2 kept the
/// fanout bytes in every `QUEUES` entry (no `BODIES`), format 3 kept the rows of `STATE` in
/// tables of their own and every inbox record's fanout bytes; all are migrated on open.
const FORMAT: u64 = 4;
const FORMAT_1: u64 = 1;
const FORMAT_2: u64 = 2;
const FORMAT_3: u64 = 3;
/// A `ROOMS` value with no followers.
const NO_FOLLOWERS: &[u8] = &[0, 0];

/// `kind ++ rest`: a `STATE` key.
fn state_key(out: &mut Vec<u8>, kind: u8, rest: &[u8]) {
    out.clear();
    out.push(kind);
    out.extend_from_slice(rest);
}

/// The core's state in one redb file. See the crate documentation for the contract.
pub struct DurableStore {
    db: Arc<db::Db>,
    pending: PendingLog,
    /// Shared with the sealed commits, which write one at a time.
    bodies: Arc<Mutex<BodyRefs>>,
}

/// How many committed `QUEUES` entries and `INBOX` records name each body: derived from the
/// file (counted on open) and changed only by a commit that succeeded, so it is always the
/// file's count.
#[derive(Debug, Default)]
struct BodyRefs {
    refs: HashMap<u64, u64>,
    /// Above every body id in the file: ids are never reused while a row may name them.
    next_id: u64,
}

impl BodyRefs {
    /// Counts the references in the file. A value that is no body id is left to `load` to
    /// report, so a store with a corrupt entry still opens and says what is wrong.
    fn count(db: &Database) -> Result<BodyRefs, Fail> {
        let tx = db.begin_read()?;
        let mut out = BodyRefs::default();
        for row in tx.open_table(QUEUES)?.iter()? {
            let (_, v) = row?;
            if let Ok(id) = codec::read_u64_value("queues", v.value()) {
                *out.refs.entry(id).or_default() += 1;
                out.next_id = out.next_id.max(id.saturating_add(1));
            }
        }
        // The inbox records naming a body, as `STATE` lists them.
        let lo = [S_INBOX_BODY];
        let hi = [S_INBOX_BODY + 1];
        for row in tx.open_table(STATE)?.range(lo.as_slice()..hi.as_slice())? {
            let (_, v) = row?;
            if let Ok(id) = codec::read_u64_value("state", v.value()) {
                *out.refs.entry(id).or_default() += 1;
                out.next_id = out.next_id.max(id.saturating_add(1));
            }
        }
        if let Some((k, _)) = tx.open_table(BODIES)?.last()?
            && let Ok(id) = codec::read_u64_value("bodies", k.value())
        {
            out.next_id = out.next_id.max(id.saturating_add(1));
        }
        Ok(out)
    }
}

// The node moves the store into its own task or thread.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<DurableStore>();
};

impl fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableStore")
            .field("path", &self.db.path())
            .field("pending_ops", &self.pending.ops)
            .finish_non_exhaustive()
    }
}

/// Why an internal step failed; becomes the source of a [`StoreError`].
#[derive(Debug)]
enum Fail {
    Db(redb::Error),
    Decode(DecodeError),
}

impl Fail {
    fn into_store(self, op: &'static str) -> StoreError {
        match self {
            Fail::Db(redb::Error::Io(e)) if is_full(&e) => StoreError::storage_full(op, e),
            Fail::Db(e) => StoreError::new(op, e),
            Fail::Decode(e) => StoreError::new(op, e),
        }
    }

    /// redb refuses every later operation after this one, until the file is reopened.
    fn closes_db(&self) -> bool {
        matches!(
            self,
            Fail::Db(redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed)
        )
    }
}

/// No space left for the write (a full disk, a quota, a file size limit).
fn is_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge
    )
}

impl From<DecodeError> for Fail {
    fn from(e: DecodeError) -> Self {
        Fail::Decode(e)
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Self {
                Fail::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl DurableStore {
    /// Opens the database file at `path`, creating it (not its directory) if missing.
    ///
    /// After a crash this also recovers the file to its last commit, which reads the whole file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let db = db::Db::open(path.as_ref()).map_err(|e| e.into_store("open"))?;
        let mut store = DurableStore {
            db: Arc::new(db),
            pending: PendingLog::default(),
            bodies: Arc::default(),
        };
        store.db.with(init).map_err(|e| e.into_store("open"))?;
        let bodies = store
            .db
            .with(BodyRefs::count)
            .map_err(|e| e.into_store("open"))?;
        store.bodies = Arc::new(Mutex::new(bodies));
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// Ops applied since the last successful commit.
    pub fn pending_ops(&self) -> usize {
        self.pending.ops
    }

    /// How many fanout bodies the last commit left in the file: one per fanout that some
    /// destination has not acknowledged yet, however many destinations wait for it.
    pub fn bodies(&self) -> Result<u64, StoreError> {
        self.db
            .with(|db| Ok(db.begin_read()?.open_table(BODIES)?.len()?))
            .map_err(|e| e.into_store("count bodies"))
    }
}

/// Creates the tables of a new file, or checks the format of an existing one (and migrates an
/// older one it can read). Opening a file of this format writes nothing.
fn init(db: &Database) -> Result<(), Fail> {
    let tx = db.begin_write()?;
    let found = {
        let meta = tx.open_table(META)?;
        let v = meta.get(META_FORMAT)?;
        v.map(|v| codec::read_u64_value("meta", v.value()))
            .transpose()?
    };
    match found {
        Some(FORMAT) => tx.abort()?,
        Some(older @ (FORMAT_1 | FORMAT_2 | FORMAT_3)) => {
            if older == FORMAT_1 {
                count_inbox_v1(&tx)?;
            }
            if older <= FORMAT_2 {
                move_bodies_v2(&tx)?;
            }
            merge_state_v3(&tx)?;
            for t in TABLES {
                tx.open_table(t)?;
            }
            tx.open_table(META)?
                .insert(META_FORMAT, FORMAT.to_be_bytes().as_slice())?;
            tx.commit()?;
        }
        Some(found) => {
            return Err(DecodeError::UnsupportedFormat {
                found,
                expected: FORMAT,
            }
            .into());
        }
        None => {
            tx.open_table(META)?
                .insert(META_FORMAT, FORMAT.to_be_bytes().as_slice())?;
            for t in TABLES {
                tx.open_table(t)?;
            }
            tx.commit()?;
        }
    }
    Ok(())
}

/// Format 1 to 2: counts the inbox once (in the table format 3 kept the counts in); from then
/// on every commit keeps the counts.
fn count_inbox_v1(tx: &redb::WriteTransaction) -> Result<(), Fail> {
    let mut counts: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for row in tx.open_table(INBOX)?.iter()? {
        let (_, v) = row?;
        let from = codec::inbox_from_v3("inbox", v.value())?;
        *counts.entry(from.to_vec()).or_default() += 1;
    }
    let mut table = tx.open_table(INBOX_COUNTS_V3)?;
    for (from, n) in counts {
        table.insert(from.as_slice(), n.to_be_bytes().as_slice())?;
    }
    Ok(())
}

/// Format 2 to 3: moves the fanout bytes of every queue entry into `BODIES`, one body per
/// entry (format 2 did not say which entries held the same fanout).
fn move_bodies_v2(tx: &redb::WriteTransaction) -> Result<(), Fail> {
    let mut queues = tx.open_table(QUEUES)?;
    let mut bodies = tx.open_table(BODIES)?;
    let mut entries = Vec::new();
    for row in queues.iter()? {
        let (k, v) = row?;
        entries.push((k.value().to_vec(), v.value().to_vec()));
    }
    for (id, (key, fanout)) in (0u64..).zip(entries) {
        bodies.insert(id.to_be_bytes().as_slice(), fanout.as_slice())?;
        queues.insert(key.as_slice(), id.to_be_bytes().as_slice())?;
    }
    Ok(())
}

/// Format 3 to 4: moves the rows of the small tables into `STATE` under their kind byte (and
/// drops those tables), and gives every inbox record the kind byte of a record that holds its
/// fanout bytes.
fn merge_state_v3(tx: &redb::WriteTransaction) -> Result<(), Fail> {
    let mut state = tx.open_table(STATE)?;
    let mut key = Vec::new();
    for (table, kind) in [
        (ROOM_SEQS_V3, S_ROOM_SEQ),
        (ACKED_V3, S_ACKED),
        (CURSORS_V3, S_CURSOR),
        (RECENT_V3, S_RECENT),
        (INBOX_COUNTS_V3, S_INBOX_COUNT),
    ] {
        // Opening creates a table an older format did not have yet (recent hashes).
        for row in tx.open_table(table)?.iter()? {
            let (k, v) = row?;
            state_key(&mut key, kind, k.value());
            state.insert(key.as_slice(), v.value())?;
        }
        tx.delete_table(table)?;
    }
    let mut meta = tx.open_table(META)?;
    if let Some(trimmed) = meta.remove(META_INBOX_TRIMMED_V3)? {
        state.insert([S_INBOX_TRIMMED].as_slice(), trimmed.value())?;
    }
    let mut inbox = tx.open_table(INBOX)?;
    let mut records = Vec::new();
    for row in inbox.iter()? {
        let (k, v) = row?;
        let mut value = vec![codec::INBOX_INLINE];
        value.extend_from_slice(v.value());
        records.push((k.value().to_vec(), value));
    }
    for (k, v) in records {
        inbox.insert(k.as_slice(), v.as_slice())?;
    }
    Ok(())
}

/// Writes one batch of ops in one write transaction, durably, and on success updates
/// `bodies` to the file's new reference counts.
fn write_log(db: &Database, pending: &PendingLog, bodies: &Mutex<BodyRefs>) -> Result<(), Fail> {
    // Held for the whole write: the counts change only with a commit that succeeded.
    let mut body_refs = bodies.lock().unwrap_or_else(PoisonError::into_inner);
    // Reference changes per body in this batch, and the body written for each payload.
    let mut refs_delta: HashMap<u64, i64> = HashMap::new();
    let mut body_of: HashMap<usize, u64> = HashMap::new();
    let mut next_id = body_refs.next_id;
    {
        let mut tx = db.begin_write()?;
        // The default, stated because the contract depends on it: fsync before commit returns.
        tx.set_durability(Durability::Immediate)?;
        {
            let mut rooms = tx.open_table(ROOMS)?;
            let mut queues = tx.open_table(QUEUES)?;
            let mut queue_keys = tx.open_table(QUEUE_KEYS)?;
            let mut state = tx.open_table(STATE)?;
            let mut inbox = tx.open_table(INBOX)?;
            // Changes to the inbox counts, written once at the end.
            let mut counted: HashMap<Vec<u8>, i64> = HashMap::new();
            let mut count = |from: &[u8], by: i64| match counted.get_mut(from) {
                Some(n) => *n += by,
                None => {
                    counted.insert(from.to_vec(), by);
                }
            };
            let mut seen = tx.open_table(SEEN)?;
            let mut state_records = tx.open_table(RECORDS)?;

            let mut body_table = tx.open_table(BODIES)?;
            let payload = |index: usize| {
                pending
                    .payloads
                    .get(index)
                    .ok_or_else(|| bug("payload missing"))
            };
            // Rows checked in this commit: most ops repeat the room or queue of the one before.
            let mut have_room: HashSet<&[u8]> = HashSet::new();
            let mut have_queue: HashSet<&[u8]> = HashSet::new();
            let (mut lo, mut hi, mut value) = (Vec::new(), Vec::new(), Vec::new());
            let mut skey = Vec::new();
            // Offsets of trimmed records that named a body.
            let mut named: Vec<Vec<u8>> = Vec::new();

            let mut records = pending.records();
            while let Some(codec::Record { tag, key, val }) = records.next_record()? {
                match tag {
                    Tag::Room => {
                        rooms.insert(key, val)?;
                        have_room.insert(key);
                    }
                    Tag::RoomSeq => {
                        ensure(&mut rooms, &mut have_room, key, NO_FOLLOWERS)?;
                        state_key(&mut skey, S_ROOM_SEQ, key);
                        state.insert(skey.as_slice(), val)?;
                    }
                    Tag::Enqueue => {
                        let (index, _) = codec::payload_ref(val)?;
                        let id = match body_of.get(&index) {
                            Some(id) => *id,
                            None => {
                                let id = next_id;
                                next_id = next_id
                                    .checked_add(1)
                                    .ok_or_else(|| bug("body ids exhausted"))?;
                                body_table
                                    .insert(id.to_be_bytes().as_slice(), &payload(index)?[..])?;
                                body_of.insert(index, id);
                                id
                            }
                        };
                        *refs_delta.entry(id).or_default() += 1;
                        // A number written again (a renumbered queue) drops the body it named.
                        let old = queues.insert(key, id.to_be_bytes().as_slice())?;
                        if let Some(old) = old {
                            let old = codec::read_u64_value("queues", old.value())?;
                            *refs_delta.entry(old).or_default() -= 1;
                        }
                        let prefix = key.get(..key.len().saturating_sub(8)).unwrap_or_default();
                        ensure(&mut queue_keys, &mut have_queue, prefix, &[])?;
                    }
                    Tag::Ack => {
                        let upto = codec::read_u64_value("pending log", val)?;
                        key_range(&mut lo, &mut hi, key, 0, upto);
                        let mut corrupt = None;
                        queues.retain_in(lo.as_slice()..=hi.as_slice(), |_, v| {
                            match codec::read_u64_value("queues", v) {
                                Ok(id) => *refs_delta.entry(id).or_default() -= 1,
                                Err(e) => corrupt = Some(e),
                            }
                            false
                        })?;
                        if let Some(e) = corrupt {
                            return Err(e.into());
                        }
                        state_key(&mut skey, S_ACKED, key);
                        raise_mark(&mut state, &skey, upto)?;
                    }
                    Tag::Cursor => {
                        state_key(&mut skey, S_CURSOR, key);
                        state.insert(skey.as_slice(), val)?;
                    }
                    Tag::RecentHash => {
                        state_key(&mut skey, S_RECENT, key);
                        state.insert(skey.as_slice(), val)?;
                    }
                    Tag::Inbox => {
                        let (index, header) = codec::payload_ref(val)?;
                        state_key(&mut skey, S_INBOX_BODY, key);
                        value.clear();
                        // The hub's own delivery of a fanout this batch queued names its body.
                        let body = body_of.get(&index).copied();
                        value.push(match body {
                            Some(_) => codec::INBOX_BODY,
                            None => codec::INBOX_INLINE,
                        });
                        value.extend_from_slice(header);
                        match body {
                            Some(id) => {
                                value.extend_from_slice(&id.to_be_bytes());
                                *refs_delta.entry(id).or_default() += 1;
                                state.insert(skey.as_slice(), id.to_be_bytes().as_slice())?;
                            }
                            None => value.extend_from_slice(payload(index)?),
                        }
                        if let Some(old) = inbox.insert(key, value.as_slice())? {
                            let old = old.value();
                            count(codec::inbox_from("inbox", old)?, -1);
                            if let Some(id) = codec::inbox_body("inbox", old)? {
                                *refs_delta.entry(id).or_default() -= 1;
                                if body.is_none() {
                                    state.remove(skey.as_slice())?;
                                }
                            }
                        }
                        count(codec::inbox_from_v3("pending log", header)?, 1);
                    }
                    Tag::InboxTrim => {
                        let upto = codec::read_u64_value("pending log", val)?;
                        key_range(&mut lo, &mut hi, &[], 0, upto);
                        let mut corrupt = None;
                        named.clear();
                        inbox.retain_in(lo.as_slice()..=hi.as_slice(), |k, v| {
                            match codec::inbox_from("inbox", v)
                                .and_then(|from| Ok((from, codec::inbox_body("inbox", v)?)))
                            {
                                Ok((from, body)) => {
                                    count(from, -1);
                                    if let Some(id) = body {
                                        *refs_delta.entry(id).or_default() -= 1;
                                        named.push(k.to_vec());
                                    }
                                }
                                Err(e) => corrupt = Some(e),
                            }
                            false
                        })?;
                        if let Some(e) = corrupt {
                            return Err(e.into());
                        }
                        // Row by row: a range delete would visit the tree even when no
                        // record named a body (a follower's inbox).
                        for offset in &named {
                            state_key(&mut skey, S_INBOX_BODY, offset);
                            state.remove(skey.as_slice())?;
                        }
                        raise_mark(&mut state, &[S_INBOX_TRIMMED], upto)?;
                    }
                    Tag::SubmitSeen => {
                        let room = Reader::new("pending log", key).str_bytes()?;
                        ensure(&mut rooms, &mut have_room, room, NO_FOLLOWERS)?;
                        seen.insert(key, val)?;
                    }
                    Tag::SubmitForget => {
                        let upto = codec::read_u64_value("pending log", val)?;
                        key_range(&mut lo, &mut hi, key, 0, upto);
                        seen.retain_in(lo.as_slice()..=hi.as_slice(), |_, _| false)?;
                    }
                    Tag::Record => match val.split_first() {
                        Some((1, value)) => {
                            state_records.insert(key, value)?;
                        }
                        Some((0, [])) => {
                            state_records.remove(key)?;
                        }
                        _ => return Err(bug("record presence byte")),
                    },
                }
            }
            for (from, by) in counted {
                state_key(&mut skey, S_INBOX_COUNT, &from);
                let old = match state.get(skey.as_slice())? {
                    Some(v) => codec::read_u64_value("state", v.value())?,
                    None => 0,
                };
                match old.checked_add_signed(by) {
                    Some(0) => {
                        state.remove(skey.as_slice())?;
                    }
                    Some(n) => {
                        state.insert(skey.as_slice(), n.to_be_bytes().as_slice())?;
                    }
                    None => return Err(bug("inbox count below zero")),
                }
            }
            // Bodies no entry names any more, in key order.
            let mut freed = Vec::new();
            for (id, by) in &refs_delta {
                let had = body_refs.refs.get(id).copied().unwrap_or(0);
                match had.checked_add_signed(*by) {
                    Some(0) => freed.push(*id),
                    Some(_) => {}
                    None => return Err(bug("body reference count below zero")),
                }
            }
            freed.sort_unstable();
            for id in freed {
                body_table.remove(id.to_be_bytes().as_slice())?;
            }
        }
        tx.commit()?;
    }
    for (id, by) in refs_delta {
        let n = body_refs.refs.entry(id).or_default();
        // Checked above, before the commit.
        *n = n.saturating_add_signed(by);
        if *n == 0 {
            body_refs.refs.remove(&id);
        }
    }
    body_refs.next_id = next_id;
    Ok(())
}

impl DurableStore {
    fn read_all(db: &Database) -> Result<Snapshot, Fail> {
        let tx = db.begin_read()?;
        let mut snap = Snapshot::default();

        for row in tx.open_table(ROOMS)?.iter()? {
            let (k, v) = row?;
            let room = codec::read_room_key("rooms", k.value())?;
            snap.rooms.entry(room).or_default().followers =
                codec::decode_followers("rooms", v.value())?;
        }
        for row in tx.open_table(SEEN)?.iter()? {
            let (k, v) = row?;
            let mut r = Reader::new("submit_seen", k.value());
            let (room, room_seq) = (r.room()?, r.u64()?);
            r.finish()?;
            let mut r = Reader::new("submit_seen", v.value());
            let (key, accepted_ms) = (r.u128()?, r.u64()?);
            r.finish()?;
            let seen = SubmitSeen {
                key,
                room_seq,
                accepted_ms,
            };
            snap.rooms.entry(room).or_default().seen.push_back(seen);
        }

        for row in tx.open_table(QUEUE_KEYS)?.iter()? {
            let (k, _) = row?;
            let mut r = Reader::new("queue_keys", k.value());
            let key = (r.room()?, r.domain()?);
            r.finish()?;
            snap.queues.entry(key).or_default();
        }
        // Each body once, shared by every queue entry naming it.
        let mut bodies: HashMap<u64, Bytes> = HashMap::new();
        for row in tx.open_table(BODIES)?.iter()? {
            let (k, v) = row?;
            let id = codec::read_u64_value("bodies", k.value())?;
            bodies.insert(id, Bytes::copy_from_slice(v.value()));
        }
        // Entries of one queue are adjacent: parse its (room, dest) prefix once.
        let mut prefix: Vec<u8> = Vec::new();
        let mut entries: Option<&mut VecDeque<(u64, Bytes)>> = None;
        for row in tx.open_table(QUEUES)?.iter()? {
            let (k, v) = row?;
            let k = k.value();
            let mut r = Reader::new("queues", k);
            r.str_bytes()?;
            r.str_bytes()?;
            let this_prefix = k.get(..k.len() - r.rest().len()).unwrap_or_default();
            let mut r = Reader::new("queues", k.get(this_prefix.len()..).unwrap_or_default());
            let qseq = r.u64()?;
            r.finish()?;
            let q = match entries.take() {
                Some(q) if prefix == this_prefix => q,
                _ => {
                    let mut r = Reader::new("queues", this_prefix);
                    let key = (r.room()?, r.domain()?);
                    prefix.clear();
                    prefix.extend_from_slice(this_prefix);
                    snap.queues.entry(key).or_default()
                }
            };
            let id = codec::read_u64_value("queues", v.value())?;
            let body = bodies.get(&id).ok_or(DecodeError::Corrupt {
                table: "queues",
                what: "entry names a missing body",
            })?;
            q.push_back((qseq, body.clone()));
            entries = Some(q);
        }

        // The inbox's records stay on disk (`read_inbox`): only its last offset and counts.
        if let Some((k, _)) = tx.open_table(INBOX)?.last()? {
            snap.inbox.last = codec::read_u64_value("inbox", k.value())?;
        }
        for row in tx.open_table(STATE)?.iter()? {
            let (k, v) = row?;
            let (k, v) = (k.value(), v.value());
            let Some((&kind, k)) = k.split_first() else {
                return Err(DecodeError::Corrupt {
                    table: "state",
                    what: "empty key",
                }
                .into());
            };
            match kind {
                S_ROOM_SEQ => {
                    let room = codec::read_room_key("state", k)?;
                    let mut r = Reader::new("state", v);
                    let (next_seq, last_ms) = (r.u64()?, r.u64()?);
                    r.finish()?;
                    let entry = snap.rooms.entry(room).or_default();
                    entry.next_seq = next_seq;
                    entry.last_ms = last_ms;
                }
                S_ACKED => {
                    let mut r = Reader::new("state", k);
                    let key = (r.room()?, r.domain()?);
                    r.finish()?;
                    snap.acked.insert(key, codec::read_u64_value("state", v)?);
                }
                S_CURSOR => {
                    let mut r = Reader::new("state", k);
                    let key = (r.domain()?, r.room()?);
                    r.finish()?;
                    snap.cursors.insert(key, codec::read_u64_value("state", v)?);
                }
                S_RECENT => {
                    let mut r = Reader::new("state", k);
                    let key = (r.domain()?, r.room()?);
                    let slot = r.u16()?;
                    r.finish()?;
                    let mut r = Reader::new("state", v);
                    let (n, hash) = (r.u64()?, r.u128()?);
                    r.finish()?;
                    snap.recent.entry(key).or_default().insert(slot, (n, hash));
                }
                S_INBOX_COUNT => {
                    let from = codec::read_domain_key("state", k)?;
                    let n = codec::read_u64_value("state", v)?;
                    snap.inbox.by_from.insert(from, n);
                }
                S_INBOX_TRIMMED if k.is_empty() => {
                    snap.inbox_trimmed = codec::read_u64_value("state", v)?;
                }
                // Checked when the records are read or trimmed; counted on open.
                S_INBOX_BODY => {
                    codec::read_u64_value("state", k)?;
                    codec::read_u64_value("state", v)?;
                }
                _ => {
                    return Err(DecodeError::Corrupt {
                        table: "state",
                        what: "unknown row kind",
                    }
                    .into());
                }
            }
        }
        // Stores written before state records existed have no such table yet.
        match tx.open_table(RECORDS) {
            Ok(table) => {
                for row in table.iter()? {
                    let (k, v) = row?;
                    snap.records
                        .insert(k.value().to_vec(), Bytes::copy_from_slice(v.value()));
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(snap)
    }
}

impl DurableStore {
    /// The inbox keys `after < offset <= upto`, or `None` for an empty range.
    fn inbox_keys(after: u64, upto: u64) -> Option<([u8; 8], [u8; 8])> {
        let from = after.checked_add(1).filter(|f| *f <= upto)?;
        Some((from.to_be_bytes(), upto.to_be_bytes()))
    }

    fn read_inbox_range(db: &Database, range: InboxRange) -> Result<Vec<(u64, InboxRecord)>, Fail> {
        let mut out = Vec::new();
        let Some((lo, hi)) = Self::inbox_keys(range.after, range.upto) else {
            return Ok(out);
        };
        let tx = db.begin_read()?;
        let table = tx.open_table(INBOX)?;
        let bodies = tx.open_table(BODIES)?;
        let mut bytes = 0usize;
        for row in table.range(lo.as_slice()..=hi.as_slice())? {
            if range.filled(out.len(), bytes) {
                break;
            }
            let (k, v) = row?;
            let offset = codec::read_u64_value("inbox", k.value())?;
            let (mut record, fanout) = codec::decode_inbox("inbox", v.value())?;
            record.fanout = match fanout {
                codec::InboxFanout::Inline(b) => Bytes::copy_from_slice(b),
                codec::InboxFanout::Body(id) => {
                    let body = bodies.get(id.to_be_bytes().as_slice())?;
                    let body = body.ok_or(DecodeError::Corrupt {
                        table: "inbox",
                        what: "record names a missing body",
                    })?;
                    Bytes::copy_from_slice(body.value())
                }
            };
            bytes = bytes.saturating_add(record.fanout.len());
            out.push((offset, record));
        }
        Ok(out)
    }

    fn count_inbox_range(
        db: &Database,
        after: u64,
        upto: u64,
    ) -> Result<BTreeMap<ProviderDomain, u64>, Fail> {
        let mut counts: HashMap<Vec<u8>, u64> = HashMap::new();
        if let Some((lo, hi)) = Self::inbox_keys(after, upto) {
            let tx = db.begin_read()?;
            let table = tx.open_table(INBOX)?;
            for row in table.range(lo.as_slice()..=hi.as_slice())? {
                let (_, v) = row?;
                let from = codec::inbox_from("inbox", v.value())?;
                match counts.get_mut(from) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(from.to_vec(), 1);
                    }
                }
            }
        }
        let mut out = BTreeMap::new();
        for (from, n) in counts {
            out.insert(codec::read_domain_key("inbox", &from)?, n);
        }
        Ok(out)
    }
}

impl Store for DurableStore {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.db
            .with(Self::read_all)
            .map_err(|e| e.into_store("load"))
    }

    fn read_inbox(&self, range: InboxRange) -> Result<Vec<(u64, InboxRecord)>, StoreError> {
        self.db
            .with(|db| Self::read_inbox_range(db, range))
            .map_err(|e| e.into_store("read inbox"))
    }

    fn count_inbox(
        &self,
        after: u64,
        upto: u64,
    ) -> Result<BTreeMap<ProviderDomain, u64>, StoreError> {
        self.db
            .with(|db| Self::count_inbox_range(db, after, upto))
            .map_err(|e| e.into_store("count inbox"))
    }

    fn apply(&mut self, op: StoreOp<'_>) {
        self.pending.push(op);
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.pending.unsupported {
            return Err(StoreError::new("commit", UnsupportedOp));
        }
        let (pending, bodies) = (&self.pending, &*self.bodies);
        self.db
            .with(|db| write_log(db, pending, bodies))
            .map_err(|e| e.into_store("commit"))?;
        self.pending.clear();
        Ok(())
    }

    fn seal(&mut self) -> Result<Option<SealedCommit>, StoreError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        if self.pending.unsupported {
            return Err(StoreError::new("commit", UnsupportedOp));
        }
        let batch = std::mem::take(&mut self.pending);
        let db = Arc::clone(&self.db);
        let bodies = Arc::clone(&self.bodies);
        // Callable again after a failure: the batch stays with it until written.
        Ok(Some(Box::new(move || {
            db.with(|d| write_log(d, &batch, &bodies))
                .map_err(|e| e.into_store("commit"))
        })))
    }
}

/// The core sent a [`StoreOp`] variant newer than this crate.
#[derive(Debug, thiserror::Error)]
#[error("store op not supported by this relay-store version")]
struct UnsupportedOp;

/// The pending log is written and read only by this crate; an inconsistency in it is our bug,
/// reported as an error rather than a panic.
fn bug(what: &'static str) -> Fail {
    Fail::Decode(DecodeError::Corrupt {
        table: "pending log",
        what,
    })
}

/// Inserts `key` with `value` unless the row exists; checks each key once per commit.
fn ensure<'k>(
    table: &mut redb::Table<'_, &'static [u8], &'static [u8]>,
    checked: &mut HashSet<&'k [u8]>,
    key: &'k [u8],
    value: &[u8],
) -> Result<(), Fail> {
    if checked.insert(key) && table.get(key)?.is_none() {
        table.insert(key, value)?;
    }
    Ok(())
}

/// Sets the `u64` at `key` to `max(stored, n)`.
fn raise_mark(
    table: &mut redb::Table<'_, &'static [u8], &'static [u8]>,
    key: &[u8],
    n: u64,
) -> Result<(), Fail> {
    let old = match table.get(key)? {
        Some(v) => codec::read_u64_value("mark", v.value())?,
        None => 0,
    };
    // A missing mark is created even when n is 0, as MemStore does.
    table.insert(key, n.max(old).to_be_bytes().as_slice())?;
    Ok(())
}

/// `prefix ++ from` ..= `prefix ++ to`, big-endian.
fn key_range(lo: &mut Vec<u8>, hi: &mut Vec<u8>, prefix: &[u8], from: u64, to: u64) {
    lo.clear();
    lo.extend_from_slice(prefix);
    codec::put_u64(lo, from);
    hi.clear();
    hi.extend_from_slice(prefix);
    codec::put_u64(hi, to);
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimi_wire::uri::{ProviderDomain, RoomId};

    fn ids() -> (RoomId, ProviderDomain) {
        let room = RoomId::parse("mimi://a.example/r/x").expect("room");
        (room, ProviderDomain::parse("b.example").expect("domain"))
    }

    fn enqueue(store: &mut DurableStore, qseq: u64) {
        let (room, dest) = ids();
        let fanout = Bytes::from(vec![qseq as u8; 64]);
        store.apply(StoreOp::Enqueue {
            room: &room,
            dest: &dest,
            qseq,
            fanout: &fanout,
        });
    }

    #[test]
    fn empty_commit_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let mut store = DurableStore::open(&path).expect("open");
        let before = std::fs::read(&path).expect("read");
        store.commit().expect("commit");
        store.commit().expect("commit");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "empty commit touched the file"
        );
        enqueue(&mut store, 1);
        assert_eq!(store.pending_ops(), 1);
        store.commit().expect("commit");
        assert_eq!(store.pending_ops(), 0);
        assert_ne!(std::fs::read(&path).expect("read"), before);
    }

    #[test]
    fn sealed_batches_written_on_another_thread_are_durable_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let mut store = DurableStore::open(&path).expect("open");
        assert!(
            store.seal().expect("seal").is_none(),
            "nothing applied: nothing to write"
        );
        enqueue(&mut store, 1);
        let mut first = store.seal().expect("seal").expect("a batch");
        assert_eq!(store.pending_ops(), 0, "sealing takes the pending ops");
        enqueue(&mut store, 2);
        let mut second = store.seal().expect("seal").expect("a batch");
        enqueue(&mut store, 3); // applied but never sealed: lost like any uncommitted op
        std::thread::spawn(move || {
            first().expect("write first");
            second().expect("write second");
        })
        .join()
        .expect("writer thread");
        drop(store);
        let snap = DurableStore::open(&path)
            .expect("reopen")
            .load()
            .expect("load");
        let seqs: Vec<u64> = snap.queues.values().flatten().map(|(q, _)| *q).collect();
        assert_eq!(seqs, [1, 2]);
    }

    #[test]
    fn uncommitted_ops_are_dropped_with_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let mut store = DurableStore::open(&path).expect("open");
        enqueue(&mut store, 1);
        store.commit().expect("commit");
        enqueue(&mut store, 2);
        drop(store);
        let snap = DurableStore::open(&path)
            .expect("reopen")
            .load()
            .expect("load");
        let q: Vec<u64> = snap.queues.values().flatten().map(|(s, _)| *s).collect();
        assert_eq!(q, [1]);
    }

    #[test]
    fn second_open_of_the_same_file_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let _store = DurableStore::open(&path).expect("open");
        assert!(DurableStore::open(&path).is_err());
    }

    /// Writes `value` under `key` in `table` behind the store's back.
    fn tamper(path: &Path, table: Bytes2Bytes, key: &[u8], value: &[u8]) {
        let db = Database::create(path).expect("db");
        let tx = db.begin_write().expect("tx");
        tx.open_table(table)
            .expect("table")
            .insert(key, value)
            .expect("insert");
        tx.commit().expect("commit");
    }

    fn load_error(path: &Path) -> StoreError {
        let mut store = DurableStore::open(path).expect("open");
        store.load().expect_err("corrupt data loaded")
    }

    /// The destinations of the fanout tests.
    fn dests() -> [ProviderDomain; 3] {
        ["b.example", "c.example", "d.example"].map(|d| ProviderDomain::parse(d).expect("domain"))
    }

    /// Enqueues one fanout (one handle, as the core does) under `qseq` for every destination.
    fn fan_out(store: &mut DurableStore, qseq: u64) -> Bytes {
        let (room, _) = ids();
        let fanout = Bytes::from(vec![qseq as u8; 1000]);
        for dest in &dests() {
            store.apply(StoreOp::Enqueue {
                room: &room,
                dest,
                qseq,
                fanout: &fanout,
            });
        }
        fanout
    }

    fn ack(store: &mut DurableStore, dest: &ProviderDomain, upto: u64) {
        let (room, _) = ids();
        store.apply(StoreOp::Ack {
            room: &room,
            dest,
            upto,
        });
    }

    /// The ids of the bodies in the file.
    fn body_rows(store: &DurableStore) -> Vec<u64> {
        store
            .db
            .with(|db| {
                let tx = db.begin_read()?;
                let mut ids = Vec::new();
                for row in tx.open_table(BODIES)?.iter()? {
                    ids.push(codec::read_u64_value("bodies", row?.0.value())?);
                }
                Ok(ids)
            })
            .expect("read bodies")
    }

    /// Every queue's bytes, by destination.
    fn queued(store: &mut DurableStore) -> BTreeMap<ProviderDomain, Vec<(u64, Bytes)>> {
        let snap = store.load().expect("load");
        snap.queues
            .into_iter()
            .map(|((_, dest), q)| (dest, q.into_iter().collect()))
            .collect()
    }

    #[test]
    fn a_fanout_is_stored_once_and_freed_with_its_last_acknowledgement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let mut store = DurableStore::open(&path).expect("open");
        let [b, c, d] = dests();
        let fanouts: Vec<Bytes> = (1..=4).map(|q| fan_out(&mut store, q)).collect();
        store.commit().expect("commit");
        assert_eq!(
            body_rows(&store).len(),
            4,
            "one body per fanout, not per destination"
        );
        let all: Vec<(u64, Bytes)> = (1..=4).zip(fanouts.iter().cloned()).collect();
        let want = BTreeMap::from([
            (b.clone(), all.clone()),
            (c.clone(), all.clone()),
            (d.clone(), all),
        ]);
        assert_eq!(queued(&mut store), want);

        // b and c have 1..=2, d nothing yet: bodies 1 and 2 stay, d still waits for them.
        ack(&mut store, &b, 2);
        ack(&mut store, &c, 2);
        store.commit().expect("commit");
        assert_eq!(body_rows(&store).len(), 4);

        // After a restart the references are counted again from the file.
        drop(store);
        let mut store = DurableStore::open(&path).expect("reopen");
        let snap = store.load().expect("load");
        assert_eq!(
            snap.queues.values().map(VecDeque::len).collect::<Vec<_>>(),
            [2, 2, 4]
        );
        // A body loads once, shared by every queue naming it.
        let mut loaded: BTreeMap<u64, HashSet<*const u8>> = BTreeMap::new();
        for (qseq, body) in snap.queues.values().flatten() {
            assert_eq!(body, &fanouts[*qseq as usize - 1]);
            loaded.entry(*qseq).or_default().insert(body.as_ptr());
        }
        assert!(loaded.values().all(|p| p.len() == 1), "{loaded:?}");

        ack(&mut store, &d, 1);
        store.commit().expect("commit");
        assert_eq!(
            body_rows(&store).len(),
            3,
            "body 1 went with its last reference"
        );
        for dest in [&b, &c, &d] {
            ack(&mut store, dest, 4);
        }
        store.commit().expect("commit");
        assert!(body_rows(&store).is_empty());
        assert!(queued(&mut store).values().all(Vec::is_empty));
    }

    #[test]
    fn a_renumbered_entry_drops_the_body_it_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let mut store = DurableStore::open(&path).expect("open");
        let [b, ..] = dests();
        fan_out(&mut store, 1);
        store.commit().expect("commit");
        let first = body_rows(&store);
        // b's queue renumbered: its qseq 1 now holds another event; the others still name
        // the first body.
        let (room, _) = ids();
        let other = Bytes::from_static(b"another event");
        store.apply(StoreOp::Enqueue {
            room: &room,
            dest: &b,
            qseq: 1,
            fanout: &other,
        });
        store.commit().expect("commit");
        assert_eq!(body_rows(&store).len(), 2);
        assert_eq!(queued(&mut store)[&b], [(1, other)]);
        for dest in &dests()[1..] {
            ack(&mut store, dest, 1);
        }
        store.commit().expect("commit");
        let left = body_rows(&store);
        assert_eq!(left.len(), 1);
        assert!(!first.contains(&left[0]), "the first body went, b's stays");
        // Enqueued and acknowledged within one batch (b's renumbered entry with it): no body
        // outlives the batch.
        fan_out(&mut store, 2);
        for dest in &dests() {
            ack(&mut store, dest, 2);
        }
        store.commit().expect("commit");
        assert!(body_rows(&store).is_empty());
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let (room, dest) = ids();
        let mut prefix = Vec::new();
        codec::queue_prefix(&mut prefix, &room, &dest);
        let mut bad_qseq = prefix.clone();
        bad_qseq.extend_from_slice(&[1, 2, 3]);
        let mut bad_room = Vec::new();
        codec::put_str(&mut bad_room, "mimi://a.example/u/not-a-room");
        codec::put_str(&mut bad_room, "b.example");
        let mut recent_key = vec![S_RECENT];
        codec::put_str(&mut recent_key, dest.as_str());
        codec::put_str(&mut recent_key, room.as_str());
        recent_key.extend_from_slice(&[0, 1]);
        let mut counts_key = vec![S_INBOX_COUNT];
        codec::put_str(&mut counts_key, dest.as_str());
        let mut acked_key = vec![S_ACKED];
        acked_key.extend_from_slice(&prefix);
        let mut seq_key = vec![S_ROOM_SEQ];
        seq_key.extend_from_slice(room.as_str().as_bytes());
        let mut entry = prefix.clone();
        entry.extend_from_slice(&1u64.to_be_bytes());
        let cases: [(Bytes2Bytes, &[u8], &[u8]); 18] = [
            (QUEUES, &bad_qseq, &[0; 8]),
            (QUEUES, &[0, 200, b'a'], &[0; 8]),
            // Not a body id, and the id of a body that is not there.
            (QUEUES, &entry, b"x"),
            (QUEUES, &entry, &99u64.to_be_bytes()),
            (BODIES, &[0; 3], b"x"),
            (QUEUE_KEYS, &bad_room, b""),
            (STATE, &acked_key, &[1, 2]),
            (ROOMS, room.as_str().as_bytes(), &[0, 1, 0, 0]),
            (STATE, &seq_key, &[0; 15]),
            (INBOX, &[0; 3], &[0, 0, 3, b'a']),
            (STATE, &counts_key, &[1, 2]),
            (STATE, &[], &[]),
            (STATE, &[99], &[]),
            (STATE, &[S_INBOX_BODY, 1], &[0; 8]),
            // The body row of an inbox record: a short key, a value that is no body id.
            (STATE, &[S_INBOX_BODY, 0, 0, 0, 0, 0, 0, 0, 1], b"x"),
            (SEEN, &prefix, &[0; 24]),
            (STATE, &[S_INBOX_TRIMMED], &[]),
            (STATE, &recent_key, &[0; 23]),
        ];
        for (i, (table, key, value)) in cases.into_iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("s.redb");
            drop(DurableStore::open(&path).expect("create"));
            tamper(&path, table, key, value);
            let e = load_error(&path);
            let source = std::error::Error::source(&e).expect("source");
            assert!(
                source.downcast_ref::<DecodeError>().is_some(),
                "case {i}: {source}"
            );
        }
    }

    #[test]
    fn corrupt_inbox_records_are_read_errors_not_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        drop(DurableStore::open(&path).expect("create"));
        tamper(&path, INBOX, &7u64.to_be_bytes(), &[0, 3, b'a']);
        let store = DurableStore::open(&path).expect("open");
        for e in [
            store.read_inbox(InboxRange::after(0)).expect_err("read"),
            store.count_inbox(0, 9).map(|_| ()).expect_err("count"),
        ] {
            let source = std::error::Error::source(&e).expect("source");
            assert!(source.downcast_ref::<DecodeError>().is_some(), "{source}");
        }
        // A record that names a body the file does not hold.
        let (room, from) = ids();
        let mut v = vec![codec::INBOX_BODY];
        codec::put_str(&mut v, room.as_str());
        codec::put_str(&mut v, from.as_str());
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&42u64.to_be_bytes());
        drop(store);
        tamper(&path, INBOX, &7u64.to_be_bytes(), &v);
        let store = DurableStore::open(&path).expect("open");
        let e = store.read_inbox(InboxRange::after(0)).expect_err("read");
        let source = std::error::Error::source(&e).expect("source");
        assert!(source.downcast_ref::<DecodeError>().is_some(), "{source}");
    }

    /// The hub's own delivery of a fanout, as the core applies it after the enqueues.
    fn deliver(store: &mut DurableStore, offset: u64, fanout: &Bytes) {
        let (room, from) = ids();
        let record = InboxRecord {
            room,
            from,
            accepted_ms: offset,
            fanout: fanout.clone(),
        };
        store.apply(StoreOp::Inbox {
            offset,
            record: &record,
        });
    }

    fn inbox(store: &DurableStore) -> Vec<(u64, Bytes)> {
        let records = store.read_inbox(InboxRange::after(0)).expect("read");
        records.into_iter().map(|(o, r)| (o, r.fanout)).collect()
    }

    #[test]
    fn the_hubs_own_delivery_names_the_queued_body() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let mut store = DurableStore::open(&path).expect("open");
        let first = fan_out(&mut store, 1);
        deliver(&mut store, 1, &first);
        // Delivered without being queued in this batch: the record holds its bytes.
        let alone = Bytes::from_static(b"delivered only");
        deliver(&mut store, 2, &alone);
        store.commit().expect("commit");
        assert_eq!(
            body_rows(&store).len(),
            1,
            "one body for the queues and the inbox"
        );
        let value = store
            .db
            .with(|db| {
                let tx = db.begin_read()?;
                let table = tx.open_table(INBOX)?;
                let v = table.get(1u64.to_be_bytes().as_slice())?;
                Ok(v.map(|v| v.value().len()))
            })
            .expect("read")
            .expect("record 1");
        assert!(value < 64, "the record names the body: {value} bytes");
        let want = vec![(1, first.clone()), (2, alone.clone())];
        assert_eq!(inbox(&store), want);

        // Every destination acknowledged: the inbox still names the body.
        for dest in &dests() {
            ack(&mut store, dest, 1);
        }
        store.commit().expect("commit");
        assert_eq!(body_rows(&store).len(), 1);
        drop(store);
        let mut store = DurableStore::open(&path).expect("reopen");
        assert_eq!(inbox(&store), want);
        assert_eq!(store.load().expect("load").inbox.last, 2);

        // Counted again on open: trimming the record frees the body.
        store.apply(StoreOp::InboxTrim { upto: 1 });
        store.commit().expect("commit");
        assert!(body_rows(&store).is_empty());
        assert_eq!(inbox(&store), [(2, alone)]);

        // Trimmed first, acknowledged after: the body goes with the last acknowledgement.
        let third = fan_out(&mut store, 3);
        deliver(&mut store, 3, &third);
        store.apply(StoreOp::InboxTrim { upto: 3 });
        store.commit().expect("commit");
        assert_eq!(body_rows(&store).len(), 1);
        for dest in &dests() {
            ack(&mut store, dest, 3);
        }
        store.commit().expect("commit");
        assert!(body_rows(&store).is_empty());
        let bodies_named = store
            .db
            .with(|db| Ok(db.begin_read()?.open_table(STATE)?.len()?))
            .expect("state");
        // The three acked marks and the trim mark: no inbox counts, no body rows left.
        assert_eq!(bodies_named, 4);
    }

    #[test]
    fn an_inbox_record_rewritten_drops_the_body_it_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let mut store = DurableStore::open(&path).expect("open");
        let first = fan_out(&mut store, 1);
        deliver(&mut store, 1, &first);
        store.commit().expect("commit");
        for dest in &dests() {
            ack(&mut store, dest, 1);
        }
        let other = Bytes::from_static(b"another record");
        deliver(&mut store, 1, &other);
        store.commit().expect("commit");
        assert!(body_rows(&store).is_empty());
        assert_eq!(inbox(&store), [(1, other)]);
        drop(store);
        let mut store = DurableStore::open(&path).expect("reopen");
        let snap = store.load().expect("load");
        assert_eq!(snap.inbox.by_from.values().sum::<u64>(), 1);
        assert_eq!(inbox(&store).len(), 1);
    }

    /// A file as format `format` (1 to 3) left it: rooms, queues, the small tables apart,
    /// inbox records holding their fanout bytes with no kind byte; inbox counts from format 2
    /// on, `BODIES` from format 3 on.
    fn old_store(path: &Path, format: u64) {
        let (room, dest) = ids();
        let from = ProviderDomain::parse("c.example").expect("domain");
        let db = Database::create(path).expect("db");
        let tx = db.begin_write().expect("tx");
        let put = |table: Bytes2Bytes, k: &[u8], v: &[u8]| {
            tx.open_table(table)
                .expect("table")
                .insert(k, v)
                .expect("insert");
        };
        put(META, META_FORMAT, &format.to_be_bytes());
        put(META, META_INBOX_TRIMMED_V3, &2u64.to_be_bytes());
        let mut followers = Vec::new();
        followers.extend_from_slice(&1u16.to_be_bytes());
        codec::put_str(&mut followers, dest.as_str());
        put(ROOMS, room.as_str().as_bytes(), &followers);
        let mut seq = 9u64.to_be_bytes().to_vec();
        seq.extend_from_slice(&1234u64.to_be_bytes());
        put(ROOM_SEQS_V3, room.as_str().as_bytes(), &seq);
        let mut prefix = Vec::new();
        codec::queue_prefix(&mut prefix, &room, &dest);
        put(QUEUE_KEYS, &prefix, &[]);
        put(ACKED_V3, &prefix, &4u64.to_be_bytes());
        let mut entry = prefix.clone();
        entry.extend_from_slice(&5u64.to_be_bytes());
        if format == FORMAT_2 || format == FORMAT_1 {
            put(QUEUES, &entry, b"old fanout");
        } else {
            put(QUEUES, &entry, &0u64.to_be_bytes());
            put(BODIES, &0u64.to_be_bytes(), b"old fanout");
        }
        let mut cursor = Vec::new();
        codec::put_str(&mut cursor, from.as_str());
        codec::put_str(&mut cursor, room.as_str());
        put(CURSORS_V3, &cursor, &17u64.to_be_bytes());
        let mut slot = cursor.clone();
        slot.extend_from_slice(&3u16.to_be_bytes());
        let mut hash = 3u64.to_be_bytes().to_vec();
        hash.extend_from_slice(&99u128.to_be_bytes());
        put(RECENT_V3, &slot, &hash);
        for offset in [3u64, 4] {
            let mut v = Vec::new();
            codec::put_str(&mut v, room.as_str());
            codec::put_str(&mut v, from.as_str());
            v.extend_from_slice(&offset.to_be_bytes());
            v.extend_from_slice(b"inbox fanout");
            put(INBOX, &offset.to_be_bytes(), &v);
        }
        if format >= FORMAT_2 {
            let mut k = Vec::new();
            codec::put_str(&mut k, from.as_str());
            put(INBOX_COUNTS_V3, &k, &2u64.to_be_bytes());
        }
        tx.commit().expect("commit");
    }

    #[test]
    fn older_formats_are_migrated() {
        let (room, dest) = ids();
        let from = ProviderDomain::parse("c.example").expect("domain");
        for format in [FORMAT_1, FORMAT_2, FORMAT_3] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("s.redb");
            old_store(&path, format);
            let mut store = DurableStore::open(&path).expect("migrated");
            let snap = store.load().expect("load");
            let ctx = format!("format {format}");
            assert_eq!(
                snap.rooms[&room].followers,
                std::slice::from_ref(&dest),
                "{ctx}"
            );
            assert_eq!(
                (snap.rooms[&room].next_seq, snap.rooms[&room].last_ms),
                (9, 1234),
                "{ctx}"
            );
            let key = (room.clone(), dest.clone());
            assert_eq!(snap.acked.get(&key), Some(&4), "{ctx}");
            let queued: Vec<_> = snap.queues[&key].iter().cloned().collect();
            assert_eq!(queued, [(5, Bytes::from_static(b"old fanout"))], "{ctx}");
            let cursor = (from.clone(), room.clone());
            assert_eq!(snap.cursors.get(&cursor), Some(&17), "{ctx}");
            assert_eq!(snap.recent[&cursor].get(&3), Some(&(3, 99)), "{ctx}");
            assert_eq!(snap.inbox.by_from.get(&from), Some(&2), "{ctx}");
            assert_eq!((snap.inbox.last, snap.inbox_trimmed), (4, 2), "{ctx}");
            let inbox = store.read_inbox(InboxRange::after(2)).expect("read");
            assert_eq!(
                inbox
                    .iter()
                    .map(|(o, r)| (*o, &r.fanout[..]))
                    .collect::<Vec<_>>(),
                [(3, &b"inbox fanout"[..]), (4, &b"inbox fanout"[..])],
                "{ctx}"
            );
            assert_eq!(body_rows(&store).len(), 1, "{ctx}");
            // The old tables are gone, and the migrated rows are written like new ones.
            let old_tables = store
                .db
                .with(|db| {
                    let tx = db.begin_read()?;
                    let names: Vec<String> = tx
                        .list_tables()?
                        .map(|t| redb::TableHandle::name(&t).to_string())
                        .collect();
                    Ok(names)
                })
                .expect("tables");
            for gone in [
                "room_seqs",
                "acked",
                "cursors",
                "recent_hashes",
                "inbox_counts",
            ] {
                assert!(!old_tables.iter().any(|t| t == gone), "{ctx}: {gone}");
            }
            enqueue(&mut store, 6);
            ack(&mut store, &dest, 5);
            store.apply(StoreOp::InboxTrim { upto: 3 });
            store.commit().expect("commit");
            assert_eq!(
                body_rows(&store).len(),
                1,
                "{ctx}: the acknowledged body went"
            );
            drop(store);
            let mut store = DurableStore::open(&path).expect("reopen");
            let snap = store.load().expect("load");
            assert_eq!(snap.acked.get(&key), Some(&5), "{ctx}");
            assert_eq!(snap.inbox.by_from.get(&from), Some(&1), "{ctx}");
            assert_eq!(snap.inbox_trimmed, 3, "{ctx}");
        }
    }

    #[test]
    fn corrupt_mark_fails_the_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        drop(DurableStore::open(&path).expect("create"));
        let (room, dest) = ids();
        let mut prefix = Vec::new();
        codec::queue_prefix(&mut prefix, &room, &dest);
        let mut key = vec![S_ACKED];
        key.extend_from_slice(&prefix);
        tamper(&path, STATE, &key, b"bad");
        let mut store = DurableStore::open(&path).expect("open");
        store.apply(StoreOp::Ack {
            room: &room,
            dest: &dest,
            upto: 1,
        });
        assert!(store.commit().is_err());
        assert_eq!(store.pending_ops(), 1, "a failed commit keeps its ops");
    }

    #[test]
    fn other_format_versions_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        drop(DurableStore::open(&path).expect("create"));
        tamper(&path, META, META_FORMAT, &99u64.to_be_bytes());
        let e = DurableStore::open(&path).expect_err("opened a future format");
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<DecodeError>());
        assert_eq!(
            source,
            Some(&DecodeError::UnsupportedFormat {
                found: 99,
                expected: FORMAT
            })
        );
    }
}
