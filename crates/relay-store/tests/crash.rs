//! `kill -9` in the middle of a run: every commit the child reported survives, and no batch is
//! half there.
//!
//! The child is this test binary re-executed with [`CHILD_ENV`] set, running only
//! [`crash_child`]: it applies and commits numbered batches forever, printing `COMMITTED n` after
//! each commit returns. The parent kills it with SIGKILL after a while, reopens the file, and
//! compares it with `MemStore` fed exactly the batches found, which must be all of those
//! reported and at most one more (killed between commit and print).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_store::{DurableStore, InboxRecord, MemStore, Snapshot, Store, StoreOp, SubmitSeen};

const CHILD_ENV: &str = "RELAY_STORE_CRASH_CHILD";
const MSGS: u64 = 8;

struct Ids {
    room: RoomId,
    hub: ProviderDomain,
    dests: [ProviderDomain; 2],
}

fn ids() -> Ids {
    let d = |s: &str| ProviderDomain::parse(s).expect("domain");
    Ids {
        room: RoomId::parse("mimi://hub.example/r/crash").expect("room"),
        hub: d("hub.example"),
        dests: [d("b.example"), d("c.example")],
    }
}

/// Batch `i` (from 1): every kind of op, with contents derived from `i` so a torn batch shows.
fn batch(ids: &Ids, i: u64, store: &mut impl Store) {
    let room = &ids.room;
    store.apply(StoreOp::RoomSeq {
        room,
        next_seq: i + 1,
        last_ms: i,
    });
    for j in 0..MSGS {
        let qseq = i * MSGS + j;
        let fanout = Bytes::from(vec![(qseq % 251) as u8; 2048]);
        for dest in &ids.dests {
            store.apply(StoreOp::Enqueue {
                room,
                dest,
                qseq,
                fanout: &fanout,
            });
        }
    }
    // The first destination acknowledges the previous batch; the second only now and then.
    store.apply(StoreOp::Ack {
        room,
        dest: &ids.dests[0],
        upto: i * MSGS - 1,
    });
    if i.is_multiple_of(10) {
        store.apply(StoreOp::Ack {
            room,
            dest: &ids.dests[1],
            upto: i * MSGS - 1,
        });
    }
    let seen = SubmitSeen {
        key: u128::from(i) << 64 | 7,
        room_seq: i,
        accepted_ms: i,
    };
    store.apply(StoreOp::SubmitSeen { room, seen: &seen });
    if i > 5 {
        store.apply(StoreOp::SubmitForget {
            room,
            upto_seq: i - 5,
        });
    }
    store.apply(StoreOp::Cursor {
        hub: &ids.hub,
        room,
        next: i,
    });
    let record = InboxRecord {
        room: room.clone(),
        from: ids.hub.clone(),
        accepted_ms: i,
        fanout: Bytes::from(i.to_be_bytes().to_vec()),
    };
    store.apply(StoreOp::Inbox {
        offset: i,
        record: &record,
    });
    store.apply(StoreOp::InboxTrim {
        upto: i.saturating_sub(3),
    });
}

/// Batches found in a snapshot: the room's `next_seq - 1`.
fn batches_in(snap: &Snapshot, ids: &Ids) -> u64 {
    snap.rooms
        .get(&ids.room)
        .map_or(0, |r| r.next_seq.saturating_sub(1))
}

fn expected(n: u64) -> Snapshot {
    let ids = ids();
    let mut mem = MemStore::new();
    for i in 1..=n {
        batch(&ids, i, &mut mem);
    }
    mem.commit().expect("commit");
    mem.committed().clone()
}

/// The child's body; a no-op in a normal test run.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let ids = ids();
    let mut store = DurableStore::open(&path).expect("open");
    let start = batches_in(&store.load().expect("load"), &ids);
    let mut out = std::io::stdout().lock();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Bounded so an orphaned child stops by itself.
    for i in start + 1..start + 100_000 {
        batch(&ids, i, &mut store);
        store.commit().expect("commit");
        writeln!(out, "COMMITTED {i}").expect("stdout");
        out.flush().expect("stdout");
        if Instant::now() > deadline {
            break;
        }
    }
}

/// Runs the child until it has reported `commits` more commits, SIGKILLs it (after `delay`),
/// and returns the highest commit it reported.
fn run_and_kill(path: &Path, commits: usize, delay: Duration) -> u64 {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut reported = 0;
    let mut seen = 0;
    while seen < commits {
        let Some(line) = lines.next() else {
            panic!("child exited before {commits} commits")
        };
        if let Some(n) = line.expect("read").strip_prefix("COMMITTED ") {
            reported = n.parse().expect("number");
            seen += 1;
        }
    }
    std::thread::sleep(delay);
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    // Whatever the child printed before it died was committed too.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(n) = line.strip_prefix("COMMITTED ") {
            reported = n.parse().expect("number");
        }
    }
    reported
}

#[test]
fn kill_9_keeps_every_reported_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let ids = ids();
    let mut before = 0;
    // Kill delays spread over a commit's duration, so deaths land in apply, write and fsync.
    let rounds = [
        (20, 0),
        (7, 150),
        (33, 400),
        (1, 700),
        (5, 1000),
        (12, 1500),
        (3, 2200),
        (9, 3000),
    ];
    for (round, (commits, delay_us)) in rounds.into_iter().enumerate() {
        let reported = run_and_kill(&path, commits, Duration::from_micros(delay_us));
        assert!(
            reported >= before + commits as u64,
            "round {round}: child restarted wrongly"
        );
        let snap = DurableStore::open(&path)
            .expect("reopen")
            .load()
            .expect("load");
        let found = batches_in(&snap, &ids);
        eprintln!("round {round}: child reported {reported} commits, file holds {found}");
        assert!(
            found == reported || found == reported + 1,
            "round {round}: reported {reported} commits, found {found}"
        );
        let want = expected(found);
        assert_eq!(
            format!("{snap:?}"),
            format!("{want:?}"),
            "round {round}: torn batch {found}"
        );
        before = found;
    }
}
