//! The core routing 1 KiB messages from one hub to two followers, acknowledgements included,
//! with no I/O: the ceiling the routing logic puts on a node. Each round checks that every
//! submission was accepted and every event acknowledged, so a bench of rejections cannot pass
//! for a bench of routing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mimi_wire::proto::{SubmitMessageRequest, SubmitMessageResponse, SubmitStatus};
use relay_core::{
    MemStore, Now, Output, Relay, RelayConfig, ReplyToken, Response, Status, Store, TransportKind,
};

// The allocator the mimi-relay binary runs with.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: u64 = 1024;

/// A valid SubmitMessageRequest with a 1 KiB ciphertext unique to (round, i).
fn submit_body(round: u32, i: u32) -> Bytes {
    let mut ct = vec![0xab; 1024];
    ct[..4].copy_from_slice(&round.to_be_bytes());
    ct[4..8].copy_from_slice(&i.to_be_bytes());
    let mls = mimi_wire::mls::private_message(b"bench-group", 1, &ct);
    let req = SubmitMessageRequest::mls10(mls, "mimi://a.example/u/alice");
    Bytes::from(req.and_then(|r| r.encode()).expect("a valid request"))
}

fn hub<S: Store>(store: &mut S) -> Relay {
    let d = |s: &str| s.parse().expect("domain");
    let cfg = RelayConfig::new(d("a.example"))
        .with_route(d("b.example"), TransportKind::Quic)
        .with_route(d("c.example"), TransportKind::Quic);
    let now = Now {
        mono: Instant::now(),
        unix_ms: 1_700_000_000_000,
    };
    let mut relay = Relay::new(cfg, store.load().expect("load"), now);
    relay
        .handle_create_room(
            store,
            "mimi://a.example/r/bench".parse().expect("room"),
            vec![d("b.example"), d("c.example")],
        )
        .expect("room");
    relay
}

/// Submits `BATCH` messages, commits, then acknowledges every transmit: one group-commit round.
fn round<S: Store>(
    relay: &mut Relay,
    store: &mut S,
    bodies: &[Bytes],
    base: Instant,
    tick: &mut u64,
) {
    *tick += 1;
    let now = Now {
        mono: base + Duration::from_micros(*tick),
        unix_ms: 1_700_000_000_000 + *tick,
    };
    for (i, body) in bodies.iter().enumerate() {
        relay.handle_client_submit(
            now,
            store,
            ReplyToken(i as u64),
            "mimi://a.example/r/bench",
            body.clone(),
        );
    }
    store.commit().expect("commit");
    let mut transmits = Vec::new();
    let mut accepted = 0;
    while let Some(out) = relay.poll_output() {
        match out {
            Output::Transmit(t) => transmits.push(t),
            Output::Reply { response, .. } => {
                let ok = response.status == Status::Ok
                    && matches!(
                        SubmitMessageResponse::decode(&response.body).map(|r| r.status),
                        Ok(SubmitStatus::Accepted { .. })
                    );
                accepted += usize::from(ok);
                black_box(response);
            }
            Output::Probe(_) => {}
        }
    }
    assert_eq!(accepted, bodies.len(), "every submission must be accepted");
    // Acknowledge; each outcome may release the next window of transmits.
    let mut acknowledged = 0;
    while !transmits.is_empty() {
        for t in std::mem::take(&mut transmits) {
            acknowledged += t.body.len();
            let last = t.seq.expect("notify seq") + t.body.len() as u64;
            let mut resp = Response::new(Status::Created, Bytes::new());
            resp.next_seq = Some(last);
            relay.handle_outcome(now, store, t.id, Ok(resp));
        }
        while let Some(out) = relay.poll_output() {
            if let Output::Transmit(t) = out {
                transmits.push(t);
            }
        }
    }
    assert_eq!(
        acknowledged,
        2 * bodies.len(),
        "every event fanned out to both followers"
    );
    store.commit().expect("commit");
    // The hub's local clients keep up with its inbox (every accepted message reaches it too):
    // without a reader the inbox share fills, and submissions are refused after ~250 rounds.
    let delivered = relay.inbox_next() - 1;
    relay.handle_inbox_durable(delivered + 1);
    relay
        .handle_inbox_read(store, delivered)
        .expect("inbox read");
}

type NewStore = fn() -> MemStore;

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub_fanout_1KiB_to_2_followers");
    g.throughput(Throughput::Elements(BATCH));
    // The test store, which records every change so a crash can be simulated, and the store of
    // a `store = "memory"` node, which keeps nothing beside the core's own state.
    // Criterion calls each function several times: every call starts from a fresh store.
    let stores: [(&str, NewStore); 2] = [
        ("mem_store", MemStore::new),
        ("discarding_store", MemStore::discarding),
    ];
    for (name, new_store) in stores {
        g.bench_function(name, |b| {
            let mut store = new_store();
            let mut relay = hub(&mut store);
            let base = Instant::now();
            let mut tick = 0;
            let mut counter = 0u32;
            b.iter_batched(
                || {
                    // Fresh bodies each round: identical ones would be answered from the dedupe window.
                    counter = counter.wrapping_add(1);
                    (0..BATCH as u32)
                        .map(|i| submit_body(counter, i))
                        .collect::<Vec<_>>()
                },
                |v| round(&mut relay, &mut store, &v, base, &mut tick),
                criterion::BatchSize::LargeInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
