//! The core routing 1 KiB messages from one hub to two followers, acknowledgements included,
//! with no I/O: the ceiling the routing logic puts on a node.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay_core::{
    MemStore, Now, Output, Relay, RelayConfig, ReplyToken, Response, Status, Store, TransportKind,
};

const BATCH: u64 = 1024;

fn submit_body(counter: u32) -> Bytes {
    let mut ct = vec![0xab; 1024];
    ct[..4].copy_from_slice(&counter.to_be_bytes());
    let mls = mimi_wire::mls::private_message(b"bench-group", 1, &ct);
    let uri = b"mimi://a.example/u/alice";
    let mut body = vec![1u8];
    body.extend_from_slice(&mls);
    body.push(uri.len() as u8);
    body.extend_from_slice(uri);
    Bytes::from(body)
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
    while let Some(out) = relay.poll_output() {
        match out {
            Output::Transmit(t) => transmits.push(t),
            Output::Reply { response, .. } => {
                black_box(response);
            }
            Output::Probe(_) => {}
        }
    }
    // Acknowledge; each outcome may release the next window of transmits.
    while !transmits.is_empty() {
        for t in std::mem::take(&mut transmits) {
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
    store.commit().expect("commit");
}

fn bodies() -> Vec<Bytes> {
    (0..BATCH as u32).map(submit_body).collect()
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub_fanout_1KiB_to_2_followers");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("mem_store", |b| {
        let mut store = MemStore::new();
        let mut relay = hub(&mut store);
        let base = Instant::now();
        let mut tick = 0;
        let mut counter = 0u32;
        b.iter_batched(
            || {
                // Fresh bodies each round: identical ones would be answered from the dedupe window.
                counter = counter.wrapping_add(1);
                let mut v = bodies();
                for (i, body) in v.iter_mut().enumerate() {
                    let mut m = body.to_vec();
                    m[40..44].copy_from_slice(&counter.to_be_bytes());
                    m[44..48].copy_from_slice(&(i as u32).to_be_bytes());
                    *body = Bytes::from(m);
                }
                v
            },
            |v| round(&mut relay, &mut store, &v, base, &mut tick),
            criterion::BatchSize::LargeInput,
        );
    });
    g.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
