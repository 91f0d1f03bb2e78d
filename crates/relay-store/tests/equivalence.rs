//! `DurableStore` against the reference `MemStore`: random op sequences, commits at random points,
//! crashes (uncommitted ops dropped) and reopenings; after each reopening both must hold the same
//! snapshot.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use bytes::Bytes;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_core::rng::SplitMix64;
use relay_store::{
    DurableStore, InboxRange, InboxRecord, MemStore, Snapshot, Store, StoreOp, SubmitSeen,
};

/// splitmix64: deterministic, so a failing seed reproduces.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
    fn bytes(&mut self, max: u64) -> Bytes {
        let n = self.below(max + 1);
        (0..n)
            .map(|_| self.next() as u8)
            .collect::<Vec<u8>>()
            .into()
    }
}

/// Snapshot has no PartialEq; its Debug output covers every field.
fn same(a: &Snapshot, b: &Snapshot) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fn assert_same(durable: &Snapshot, mem: &Snapshot, ctx: &str) {
    if !same(durable, mem) {
        panic!("{ctx}: durable and mem snapshots differ\n durable: {durable:#?}\n mem: {mem:#?}");
    }
}

/// Loads both and compares them, the inbox records (which `load` leaves on disk) included:
/// all of them, a window of them, and who sent those in a window. The durable store holds a
/// body for every distinct queued fanout and no more than one per handle the core passed
/// (MemStore keeps the handles) to a queue or to the inbox (the hub's own delivery names the
/// body it queued), so none leaks and none is freed early.
fn check(durable: &mut DurableStore, mem: &mut MemStore, ctx: &str) {
    assert_same(&durable.load().expect("load"), mem.committed(), ctx);
    let queued = || mem.committed().queues.values().flatten().map(|(_, b)| b);
    let contents: HashSet<&[u8]> = queued().map(|b| &b[..]).collect();
    let inboxed = mem.read_inbox(InboxRange::after(0)).expect("read");
    let handles: HashSet<(*const u8, usize)> = queued()
        .chain(inboxed.iter().map(|(_, r)| &r.fanout))
        .map(|b| (b.as_ptr(), b.len()))
        .collect();
    let bodies = durable.bodies().expect("bodies") as usize;
    assert!(
        (contents.len()..=handles.len()).contains(&bodies),
        "{ctx}: {bodies} bodies for {} distinct fanouts in {} handles",
        contents.len(),
        handles.len()
    );
    let all = InboxRange::after(0);
    assert_eq!(
        durable.read_inbox(all).expect("read"),
        mem.read_inbox(all).expect("read"),
        "{ctx}: inbox records"
    );
    let last = mem.committed().inbox.last;
    for (after, upto, max, max_bytes) in [
        (last / 3, last - last / 3, 5, usize::MAX),
        (0, u64::MAX, usize::MAX, 300),
        (last, last, 1, 0),
    ] {
        let range = InboxRange {
            after,
            upto,
            max,
            max_bytes,
        };
        assert_eq!(
            durable.read_inbox(range).expect("read"),
            mem.read_inbox(range).expect("read"),
            "{ctx}: inbox records in {range:?}"
        );
        assert_eq!(
            durable.count_inbox(after, upto).expect("count"),
            mem.count_inbox(after, upto).expect("count"),
            "{ctx}: inbox counts in {after}..={upto}"
        );
    }
}

struct Gen {
    rooms: Vec<RoomId>,
    domains: Vec<ProviderDomain>,
    qseq: BTreeMap<(usize, usize), u64>,
    room_seq: BTreeMap<usize, u64>,
    offset: u64,
}

impl Gen {
    fn new() -> Self {
        let long = format!("mimi://hub.example/r/{}", "x".repeat(900));
        Gen {
            rooms: [
                "mimi://hub.example/r/a",
                "mimi://b.example/r/a",
                long.as_str(),
            ]
            .iter()
            .map(|s| RoomId::parse(s).expect("room"))
            .collect(),
            domains: ["hub.example", "b.example", "c.example"]
                .iter()
                .map(|s| ProviderDomain::parse(s).expect("domain"))
                .collect(),
            qseq: BTreeMap::new(),
            room_seq: BTreeMap::new(),
            offset: 0,
        }
    }

    /// Calls `f` with one random op (or one fanout's enqueues), in the order the core would
    /// issue such ops.
    fn op(&mut self, rng: &mut Rng, mut f: impl FnMut(StoreOp<'_>)) {
        let r = rng.below(self.rooms.len() as u64) as usize;
        let d = rng.below(self.domains.len() as u64) as usize;
        let room = &self.rooms[r];
        let dest = &self.domains[d];
        match rng.below(15) {
            0 => {
                let followers: Vec<ProviderDomain> = self
                    .domains
                    .iter()
                    .filter(|_| rng.below(2) == 0)
                    .cloned()
                    .collect();
                f(StoreOp::Room {
                    room,
                    followers: &followers,
                })
            }
            1 => f(StoreOp::RoomSeq {
                room,
                next_seq: rng.below(1000),
                last_ms: rng.next(),
            }),
            2 | 3 => {
                // One fanout for every destination, as the hub enqueues it: one handle, so
                // the durable store keeps one body for all of them.
                let fanout = rng.bytes(300);
                for (d, dest) in self.domains.iter().enumerate() {
                    let q = self.qseq.entry((r, d)).or_default();
                    *q += 1 + rng.below(2);
                    f(StoreOp::Enqueue {
                        room,
                        dest,
                        qseq: *q,
                        fanout: &fanout,
                    })
                }
                // Sometimes the hub's own clients get it too: the same handle.
                if rng.below(2) == 0 {
                    self.offset += 1 + rng.below(2);
                    let record = InboxRecord {
                        room: room.clone(),
                        from: rng.pick(&self.domains).clone(),
                        accepted_ms: rng.next(),
                        fanout,
                    };
                    f(StoreOp::Inbox {
                        offset: self.offset,
                        record: &record,
                    })
                }
            }
            4 | 5 => {
                let q = self.qseq.entry((r, d)).or_default();
                *q += 1 + rng.below(2);
                let fanout = rng.bytes(300);
                f(StoreOp::Enqueue {
                    room,
                    dest,
                    qseq: *q,
                    fanout: &fanout,
                })
            }
            6 | 7 => {
                let top = self.qseq.get(&(r, d)).copied().unwrap_or(0);
                f(StoreOp::Ack {
                    room,
                    dest,
                    upto: rng.below(top + 3),
                })
            }
            8 => f(StoreOp::Cursor {
                hub: dest,
                room,
                next: rng.below(1 << 40),
            }),
            9 | 10 => {
                self.offset += 1 + rng.below(2);
                let record = InboxRecord {
                    room: room.clone(),
                    from: rng.pick(&self.domains).clone(),
                    accepted_ms: rng.next(),
                    fanout: rng.bytes(200),
                };
                f(StoreOp::Inbox {
                    offset: self.offset,
                    record: &record,
                })
            }
            11 => f(StoreOp::InboxTrim {
                upto: rng.below(self.offset + 2),
            }),
            12 => {
                let s = self.room_seq.entry(r).or_default();
                *s += 1 + rng.below(3);
                let seen = SubmitSeen {
                    key: u128::from(rng.next()) << 64 | u128::from(rng.next()),
                    room_seq: *s,
                    accepted_ms: rng.next(),
                };
                f(StoreOp::SubmitSeen { room, seen: &seen })
            }
            13 => {
                // A small ring, so slots are replaced as well as filled.
                let n = rng.below(40);
                f(StoreOp::RecentHash {
                    hub: dest,
                    room,
                    slot: (n % 8) as u16,
                    n,
                    hash: u128::from(rng.next()) << 64 | u128::from(rng.next()),
                })
            }
            _ => {
                let top = self.room_seq.get(&r).copied().unwrap_or(0);
                f(StoreOp::SubmitForget {
                    room,
                    upto_seq: rng.below(top + 2),
                })
            }
        }
    }
}

fn reopen(path: &Path) -> DurableStore {
    DurableStore::open(path).expect("reopen")
}

fn run(seed: u64, ops: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let mut rng = Rng(SplitMix64::new(seed));
    let mut g = Gen::new();
    let mut mem = MemStore::new();
    let mut durable = DurableStore::open(&path).expect("open");
    check(&mut durable, &mut mem, "fresh");

    for i in 0..ops {
        g.op(&mut rng, |op| {
            mem.apply(op);
            durable.apply(op);
        });
        match rng.below(40) {
            0..=4 => {
                mem.commit().expect("mem commit");
                durable.commit().expect("commit");
                let ctx = format!("seed {seed} op {i}: after commit");
                check(&mut durable, &mut mem, &ctx);
            }
            5 => {
                // A crash: the uncommitted tail is lost on both sides.
                mem.crash();
                drop(durable);
                durable = reopen(&path);
                let ctx = format!("seed {seed} op {i}: after crash");
                check(&mut durable, &mut mem, &ctx);
            }
            6 => {
                mem.commit().expect("mem commit");
                durable.commit().expect("commit");
                drop(durable);
                durable = reopen(&path);
                let ctx = format!("seed {seed} op {i}: after reopen");
                check(&mut durable, &mut mem, &ctx);
            }
            _ => {}
        }
    }
    mem.commit().expect("mem commit");
    durable.commit().expect("commit");
    drop(durable);
    let mut durable = reopen(&path);
    check(&mut durable, &mut mem, &format!("seed {seed}: end"));
    let snap = durable.load().expect("load");
    // The run must have exercised something: queues, inbox and rooms are all non-trivial.
    assert!(!snap.rooms.is_empty() && !snap.queues.is_empty() && !snap.acked.is_empty());
    assert!(snap.inbox_trimmed > 0 && !snap.inbox.is_empty());
}

#[test]
fn random_op_sequences_match_mem_store() {
    for seed in 1..=8 {
        run(seed, 400);
    }
}

#[test]
fn one_long_sequence_matches_mem_store() {
    run(0xdead_beef, 3000);
}
