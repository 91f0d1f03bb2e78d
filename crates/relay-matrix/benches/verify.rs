//! What X-Matrix signing and verification cost per transaction (canonical JSON plus one
//! ed25519 operation), and whether ed25519 batch verification would help.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signer, SigningKey as DalekKey, Verifier};
use mimi_wire::endpoint::Endpoint;
use relay_matrix::SigningKey;
use relay_matrix::client::sign_request;
use relay_matrix::keys::verify_key_document;
use relay_matrix::wire::{EDU_REQUEST, fragments};
use ruma::OwnedServerName;
use ruma::api::federation::authentication::XMatrix;
use ruma::signatures::PublicKeyMap;

const PATH: &str = "/_matrix/federation/v1/send/m1700000000000.1";

/// A transaction of `n` notify EDUs with 1 KiB payloads, as the adapter builds it.
fn txn(n: usize) -> Vec<u8> {
    let edus: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let f = fragments(
                &i.to_string(),
                Endpoint::Notify,
                "mimi://a.example/r/0123456789abcdef",
                Some(i as u64),
                &[Bytes::from(vec![0x5a; 1024])],
            );
            serde_json::json!({"edu_type": EDU_REQUEST, "content": f[0]})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "origin": "a.example", "origin_server_ts": 1_700_000_000_000u64, "pdus": [], "edus": edus
    }))
    .unwrap()
}

fn xmatrix(c: &mut Criterion) {
    let key = SigningKey::from_seed([1; 32]).unwrap();
    let (oa, ob) = (
        OwnedServerName::try_from("a.example".to_owned()).unwrap(),
        OwnedServerName::try_from("b.example".to_owned()).unwrap(),
    );
    let keys = verify_key_document("a.example", &key.key_document("a.example"))
        .unwrap()
        .keys;
    let map = PublicKeyMap::from([("a.example".to_owned(), keys)]);
    let mut g = c.benchmark_group("txn");
    for n in [1usize, 100] {
        let body = txn(n);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("sign", n), &body, |b, body| {
            b.iter(|| black_box(sign_request(&oa, &ob, &key, PATH, body).unwrap()));
        });
        let auth = sign_request(&oa, &ob, &key, PATH, &body).unwrap();
        g.bench_with_input(BenchmarkId::new("verify", n), &body, |b, body| {
            b.iter(|| {
                let xm = XMatrix::try_from(&auth).unwrap();
                let req = http::Request::builder()
                    .method("PUT")
                    .uri(PATH)
                    .body(&body[..])
                    .unwrap();
                xm.verify_http_request(&req, &ob, &map).unwrap();
            });
        });
    }
    g.finish();
}

fn ed25519(c: &mut Criterion) {
    const N: usize = 64;
    let keys: Vec<DalekKey> = (0..N)
        .map(|i| DalekKey::from_bytes(&[i as u8 + 1; 32]))
        .collect();
    let msgs: Vec<Vec<u8>> = (0..N).map(|i| vec![i as u8; 300]).collect();
    let sigs: Vec<ed25519_dalek::Signature> =
        keys.iter().zip(&msgs).map(|(k, m)| k.sign(m)).collect();
    let vks: Vec<_> = keys.iter().map(DalekKey::verifying_key).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    let mut g = c.benchmark_group("ed25519");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("verify_one_by_one_x64", |b| {
        b.iter(|| {
            for ((vk, m), s) in vks.iter().zip(&msgs).zip(&sigs) {
                vk.verify(m, s).unwrap();
            }
        });
    });
    g.bench_function("verify_batch_x64", |b| {
        b.iter(|| ed25519_dalek::verify_batch(&refs, &sigs, &vks).unwrap());
    });
    g.finish();
}

criterion_group!(benches, xmatrix, ed25519);
criterion_main!(benches);
