//! The protocol-06 codec on the relay's hot path: a 1 KiB SubmitMessageRequest (owned decode
//! and encode, and the zero-copy view the hub uses), a /notify body of 64 FanoutMessages split
//! into views, and one MLSMessage delimited. Each input is validated once before it is
//! measured.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mimi_wire::Limits;
use mimi_wire::mls::{self, MlsMessageView};
use mimi_wire::proto::{
    SubmitMessageRequest, SubmitMessageView, encode_fanout_application, split_fanout_sequence,
};

// The allocator the mimi-relay binary runs with.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const FANOUTS: usize = 64;

fn app_message(i: u32) -> Vec<u8> {
    let mut ct = vec![0xab; 1024];
    ct[..4].copy_from_slice(&i.to_be_bytes());
    mls::private_message(b"bench-group-0123456789abcdef", 7, &ct)
}

fn proto(c: &mut Criterion) {
    let limits = Limits::default();

    let mls = app_message(0);
    let req = SubmitMessageRequest::mls10(mls.clone(), "mimi://a.example/u/alice")
        .expect("valid request");
    let body = req.encode().expect("encodes");
    assert_eq!(SubmitMessageRequest::decode(&body).expect("decodes"), req);
    let view = SubmitMessageView::parse(&body).expect("parses");
    assert_eq!(view.app_message.bytes, mls.as_slice());

    let mut g = c.benchmark_group("proto/submit_message_1KiB");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("decode", |b| {
        b.iter(|| SubmitMessageRequest::decode(black_box(&body)).expect("decodes"))
    });
    g.bench_function("encode", |b| {
        b.iter(|| black_box(&req).encode().expect("encodes"))
    });
    g.bench_function("view_parse", |b| {
        b.iter(|| SubmitMessageView::parse(black_box(&body)).expect("parses"))
    });
    g.finish();

    let mut notify = Vec::new();
    for i in 0..FANOUTS {
        encode_fanout_application(
            1_700_000_000_000 + i as u64,
            &app_message(i as u32),
            &mut notify,
        );
    }
    let split = split_fanout_sequence(&notify, &limits).expect("splits");
    assert_eq!(split.len(), FANOUTS);
    let mut g = c.benchmark_group(format!("proto/notify_{FANOUTS}x1KiB"));
    g.throughput(Throughput::Elements(FANOUTS as u64));
    g.bench_function("split_fanout_sequence", |b| {
        b.iter(|| split_fanout_sequence(black_box(&notify), &limits).expect("splits"))
    });
    g.bench_function("encode_fanout_application", |b| {
        let mut out = Vec::with_capacity(notify.len());
        b.iter(|| {
            out.clear();
            for v in &split {
                encode_fanout_application(v.timestamp, v.message.bytes, &mut out);
            }
            black_box(out.len())
        })
    });
    g.finish();

    let parsed = MlsMessageView::parse(&mls).expect("parses");
    assert!(parsed.is_private_application());
    let mut g = c.benchmark_group("proto/mls_message_view_1KiB");
    g.throughput(Throughput::Bytes(mls.len() as u64));
    g.bench_function("parse", |b| {
        b.iter(|| MlsMessageView::parse(black_box(&mls)).expect("parses"))
    });
    g.finish();
}

criterion_group!(benches, proto);
criterion_main!(benches);
