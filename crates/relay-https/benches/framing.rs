//! Encode and decode cost of the HTTPS adapter's own framing steps for a batch of 64 notify
//! requests with 1 KiB fanouts: the room target as a path segment (out and back in) and the
//! body's DATA frames. HTTP/1.1 and HTTP/2 framing proper is hyper's and is not measured here.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay_https::framing::{body_frames, decode_target, encode_target};

const TARGET: &str = "mimi://hub.example/r/0123456789abcdef";
const BATCH: usize = 64;

fn framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("https");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("encode_target_x64", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                black_box(encode_target(black_box(TARGET)));
            }
        });
    });
    let encoded = encode_target(TARGET);
    assert_eq!(decode_target(&encoded).as_deref(), Some(TARGET));
    g.bench_function("decode_target_x64", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                black_box(decode_target(black_box(&encoded)));
            }
        });
    });
    // A notify body: a small head segment, then the 1 KiB fanout, per event; 64 events.
    let head = Bytes::from_static(&[0u8; 24]);
    let fanout = Bytes::from(vec![0x5a; 1024]);
    let segments: Vec<Bytes> = (0..BATCH)
        .flat_map(|_| [head.clone(), fanout.clone()])
        .collect();
    let total: usize = segments.iter().map(Bytes::len).sum();
    let frames = body_frames(segments.clone());
    assert_eq!(frames.iter().map(Bytes::len).sum::<usize>(), total);
    g.bench_function("body_frames_x64", |b| {
        b.iter(|| black_box(body_frames(black_box(segments.clone()))));
    });
    g.finish();
}

criterion_group!(benches, framing);
criterion_main!(benches);
