//! The hub's cost to validate one commit (a path update by a member, RFC 9420 §12.4) in
//! groups of 2, 10 and 100 members: `stage` (parse, verify, check the path and the new tree)
//! and `stage` + `merge` on a fresh copy of the group each time.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use relay_core::mls::MlsValidator;
use relay_mls::OpenMlsValidator;

const CS: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

fn member(provider: &OpenMlsRustCrypto, name: &str) -> (SignatureKeyPair, CredentialWithKey) {
    let signer = SignatureKeyPair::new(CS.signature_algorithm()).expect("keys");
    signer.store(provider.storage()).expect("store");
    let cred = CredentialWithKey {
        credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    (signer, cred)
}

/// A validator tracking a group of `n`, its state bytes, and a commit for its current epoch.
fn setup(n: usize) -> (Vec<u8>, Vec<u8>) {
    let provider = OpenMlsRustCrypto::default();
    let (signer, cred) = member(&provider, "mimi://a.example/u/m0");
    let cfg = MlsGroupCreateConfig::builder()
        .ciphersuite(CS)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let mut group = MlsGroup::new(&provider, &signer, &cfg, cred).expect("group");
    let others = OpenMlsRustCrypto::default();
    let kps: Vec<KeyPackage> = (1..n)
        .map(|i| {
            let (s, c) = member(&others, &format!("mimi://b.example/u/m{i}"));
            KeyPackage::builder()
                .build(CS, &others, &s, c)
                .expect("key package")
                .key_package()
                .clone()
        })
        .collect();
    if !kps.is_empty() {
        group.add_members(&provider, &signer, &kps).expect("add");
        group.merge_pending_commit(&provider).expect("merge");
    }
    let gi = group
        .export_group_info(provider.crypto(), &signer, false)
        .expect("group info")
        .to_bytes()
        .expect("bytes");
    let tree = group
        .export_ratchet_tree()
        .tls_serialize_detached()
        .expect("tree");
    let mut v = OpenMlsValidator::new();
    let state = v.create("room", &gi, &tree).expect("create").state;
    let bundle = group
        .self_update(&provider, &signer, LeafNodeParameters::default())
        .expect("self update");
    let (commit, _, _) = bundle.into_contents();
    (state, commit.to_bytes().expect("commit bytes"))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub_commit_validation");
    for n in [2usize, 10, 16, 100] {
        let (state, commit) = setup(n);
        let mut v = OpenMlsValidator::new();
        v.restore("room", &state).expect("restore");
        // Checked once outside the timing: the commit is valid.
        v.stage("room", &commit).expect("valid commit");
        v.discard("room");
        g.bench_with_input(BenchmarkId::new("stage", n), &n, |b, _| {
            b.iter(|| {
                v.stage("room", &commit).expect("valid commit");
                v.discard("room");
            })
        });
        g.bench_with_input(BenchmarkId::new("stage_merge", n), &n, |b, _| {
            b.iter_batched(
                || {
                    let mut v = OpenMlsValidator::new();
                    v.restore("room", &state).expect("restore");
                    v
                },
                |mut v| {
                    v.stage("room", &commit).expect("valid commit");
                    v.merge("room").expect("merge")
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
