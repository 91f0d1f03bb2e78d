//! Encode and decode cost of the QUIC adapter's frames, for 1 KiB notify requests.

use std::hint::black_box;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay_quic::framing::{ChunkQueue, Decoder, Frame, encode_request, encode_response};

const TARGET: &str = "mimi://hub.example/r/0123456789abcdef";
const BATCH: usize = 64;

fn encode(c: &mut Criterion) {
    let body = Bytes::from(vec![0x5a; 1024]);
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("request_head_x64", |b| {
        let mut heads = BytesMut::with_capacity(4096);
        let mut out: Vec<Bytes> = Vec::with_capacity(2 * BATCH);
        b.iter(|| {
            out.clear();
            for i in 0..BATCH as u64 {
                encode_request(&mut heads, i, 3, TARGET, Some(i), body.len()).ok();
                out.push(heads.split().freeze());
                out.push(body.clone());
            }
            black_box(&out);
        });
    });
    g.bench_function("response_head_x64", |b| {
        let mut heads = BytesMut::with_capacity(4096);
        b.iter(|| {
            for i in 0..BATCH as u64 {
                encode_response(&mut heads, i, 201, Some(i + 1), None, 0).ok();
            }
            black_box(heads.split().freeze());
        });
    });
    g.finish();
}

/// 64 framed requests, cut into 1200-byte chunks as quinn would deliver them.
fn wire() -> Vec<Bytes> {
    let mut w = BytesMut::new();
    for i in 0..BATCH as u64 {
        encode_request(&mut w, i, 3, TARGET, Some(i), 1024).ok();
        w.put_bytes(0x5a, 1024);
    }
    w.freeze()
        .chunks(1200)
        .map(Bytes::copy_from_slice)
        .collect()
}

fn decode(c: &mut Criterion) {
    let chunks = wire();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("request_1k_x64", |b| {
        b.iter(|| {
            let mut q = ChunkQueue::new();
            let mut d = Decoder::new(64 * 1024);
            let mut n = 0;
            for chunk in &chunks {
                q.push(chunk.clone());
                while let Ok(Some(frame)) = d.decode(&mut q) {
                    if let Frame::Request { .. } = frame {
                        n += 1;
                    }
                    black_box(frame);
                }
            }
            assert_eq!(n, BATCH);
        });
    });
    g.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
