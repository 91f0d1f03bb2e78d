//! Group commit: a batch of 1 KiB messages, each enqueued for two destinations with its room
//! sequence and submission record, plus the acknowledgements of the previous batch; then one
//! durable commit (fdatasync). Throughput is in messages, at batch sizes 1 to 256.
//!
//! The database lives under the target directory, not /tmp, which may be a tmpfs where fsync
//! costs nothing. `MemStore` runs the same workload as the no-I/O baseline.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_store::{DurableStore, MemStore, Store, StoreOp, SubmitSeen};

const ROOMS: usize = 4;

struct Workload {
    rooms: Vec<RoomId>,
    dests: [ProviderDomain; 2],
    payload: Vec<u8>,
    /// Next sequence per room (one queue sequence per room serves both destinations).
    seq: [u64; ROOMS],
    /// Highest sequence of the previous batch per room, acknowledged with the next batch.
    unacked: [u64; ROOMS],
}

impl Workload {
    fn new() -> Self {
        let d = |s: &str| ProviderDomain::parse(s).expect("domain");
        Workload {
            rooms: (0..ROOMS)
                .map(|i| RoomId::parse(&format!("mimi://hub.example/r/room{i}")).expect("room"))
                .collect(),
            dests: [d("b.example"), d("c.example")],
            payload: vec![0xab; 1024],
            seq: [0; ROOMS],
            unacked: [0; ROOMS],
        }
    }

    fn batch(&mut self, store: &mut impl Store, msgs: usize) {
        for (r, upto) in self.unacked.iter_mut().enumerate() {
            if *upto > 0 {
                for dest in &self.dests {
                    store.apply(StoreOp::Ack {
                        room: &self.rooms[r],
                        dest,
                        upto: *upto,
                    });
                }
                *upto = 0;
            }
        }
        for i in 0..msgs {
            let r = i % ROOMS;
            let room = &self.rooms[r];
            self.seq[r] += 1;
            let seq = self.seq[r];
            // Its own handle per message, as the core makes one per fanout: one body each.
            let fanout = Bytes::copy_from_slice(&self.payload);
            for dest in &self.dests {
                store.apply(StoreOp::Enqueue {
                    room,
                    dest,
                    qseq: seq,
                    fanout: &fanout,
                });
            }
            store.apply(StoreOp::RoomSeq {
                room,
                next_seq: seq + 1,
                last_ms: seq,
            });
            let seen = SubmitSeen {
                key: u128::from(seq),
                room_seq: seq,
                accepted_ms: seq,
            };
            store.apply(StoreOp::SubmitSeen { room, seen: &seen });
            if seq > 1000 {
                store.apply(StoreOp::SubmitForget {
                    room,
                    upto_seq: seq - 1000,
                });
            }
            self.unacked[r] = seq;
        }
    }
}

fn run(store: &mut impl Store, w: &mut Workload, msgs: usize, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        w.batch(store, msgs);
        store.commit().expect("commit");
    }
    start.elapsed()
}

fn group_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("group_commit");
    g.sample_size(20).warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    for msgs in [1usize, 16, 64, 256] {
        g.throughput(Throughput::Elements(msgs as u64));
        g.bench_with_input(BenchmarkId::new("durable", msgs), &msgs, |b, &msgs| {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
            let mut store = DurableStore::open(dir.path().join("bench.redb")).expect("open");
            let mut w = Workload::new();
            b.iter_custom(|iters| run(&mut store, &mut w, msgs, iters));
        });
        g.bench_with_input(BenchmarkId::new("mem", msgs), &msgs, |b, &msgs| {
            let mut store = MemStore::new();
            let mut w = Workload::new();
            b.iter_custom(|iters| run(&mut store, &mut w, msgs, iters));
        });
    }
    g.finish();
}

fn load(c: &mut Criterion) {
    // Restart cost: a store holding 10 000 unacknowledged 1 KiB messages for two destinations.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let mut store = DurableStore::open(dir.path().join("bench.redb")).expect("open");
    let mut w = Workload::new();
    for _ in 0..40 {
        w.batch(&mut store, 250);
        w.unacked = [0; ROOMS];
        store.commit().expect("commit");
    }
    let mut g = c.benchmark_group("load");
    g.sample_size(10).throughput(Throughput::Elements(10_000));
    g.bench_function("10k_queued", |b| b.iter(|| store.load().expect("load")));
    g.finish();
}

criterion_group!(benches, group_commit, load);
criterion_main!(benches);
