//! MIMI content (draft-ietf-mimi-content-08): decode, deterministic encode and the message ID,
//! over three of the draft's vectors and a 1 KiB markdown message (the demo's size). Each
//! input is checked once before it is measured, so a bench of errors cannot pass for one of
//! decoding.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mimi_wire::content::{ContentLimits, MimiContent, message_id};

// The allocator the mimi-relay binary runs with.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SENDER: &str = "mimi://example.com/u/alice-smith";
const ROOM: &str = "mimi://example.com/r/engineering_team";

fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    let mut big = MimiContent::markdown([7; 16], &"lorem ipsum *dolor* sit amet, ".repeat(34));
    big.in_reply_to = Some(mimi_wire::content::MessageId([1; 32]));
    big.extensions.set_sender_uri(SENDER);
    big.extensions.set_room_uri(ROOM);
    vec![
        (
            "original",
            include_bytes!("../../../interop/mimi-content-examples/original.cbor").to_vec(),
        ),
        (
            "multipart-2",
            include_bytes!("../../../interop/mimi-content-examples/multipart-2.cbor").to_vec(),
        ),
        (
            "expiring",
            include_bytes!("../../../interop/mimi-content-examples/expiring.cbor").to_vec(),
        ),
        ("markdown-1KiB", big.encode().expect("encodes")),
    ]
}

fn content(c: &mut Criterion) {
    for (name, bytes) in inputs() {
        let decoded = MimiContent::decode_with_limits(&bytes, &ContentLimits::default())
            .expect("vector decodes");
        assert!(decoded.canonical);
        let m = decoded.content;
        assert_eq!(m.encode().expect("encodes"), bytes, "{name} re-encodes");
        message_id(SENDER, ROOM, &bytes).expect("id");

        let mut g = c.benchmark_group(format!("content/{name}"));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function("decode", |b| {
            b.iter(|| MimiContent::decode(black_box(&bytes)).expect("decodes"))
        });
        g.bench_function("encode", |b| {
            b.iter(|| black_box(&m).encode().expect("encodes"))
        });
        g.bench_function("message_id", |b| {
            b.iter(|| {
                message_id(black_box(SENDER), black_box(ROOM), black_box(&bytes)).expect("id")
            })
        });
        g.finish();
    }
}

criterion_group!(benches, content);
criterion_main!(benches);
