//! Cost of reading one MIMI request stanza, by body size (issue 14): the binding's reader
//! (`parse_stanza` then `classify`) should cost about the same per byte from 16 KiB to 1 MiB;
//! `dom_whole` is the old read (the whole stanza through the DOM parser), for comparison.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mimi_wire::endpoint::Endpoint;
use relay_core::transport::{Transmit, TransmitId, TransportKind};
use relay_xmpp::binding::{self, Stanza};

const MAX_BODY: usize = 2 << 20;

fn stanza(n: usize) -> Vec<u8> {
    let t = Transmit {
        id: TransmitId(1),
        dest: "b.example".parse().unwrap_or_else(|_| unreachable!()),
        transport: TransportKind::Xmpp,
        endpoint: Endpoint::Notify,
        target: "mimi://a.example/r/0123456789abcdef".into(),
        seq: Some(42),
        lineage: None,
        body: vec![Bytes::from(vec![0x5a; n])],
    };
    let mut out = Vec::new();
    binding::write_request(&mut out, "m1", "a.example", "b.example", &t);
    out
}

fn read(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_request");
    g.sample_size(20);
    for kib in [16, 64, 256, 512, 1024] {
        let s = stanza(kib * 1024);
        g.throughput(Throughput::Bytes(s.len() as u64));
        g.bench_with_input(BenchmarkId::new("fast", kib), &s, |b, s| {
            b.iter(|| match binding::parse_stanza(black_box(s)) {
                Ok(Stanza::Parsed(el, text)) => black_box(binding::classify(el, text, MAX_BODY)),
                _ => None,
            });
        });
        if kib <= 256 {
            g.bench_with_input(BenchmarkId::new("dom_whole", kib), &s, |b, s| {
                b.iter(|| {
                    binding::parse(black_box(s))
                        .ok()
                        .and_then(|el| black_box(binding::classify(el, None, MAX_BODY)))
                });
            });
        }
    }
    g.finish();
}

criterion_group!(benches, read);
criterion_main!(benches);
