//! relay-mls's handshake validation (`OpenMlsValidator::stage`) on a room created from a real
//! GroupInfo and ratchet tree (three members, made once with openmls): arbitrary bytes as the
//! handshake message, and real commits and a proposal for the room's epoch with bytes flipped,
//! cut or spliced. Nothing may panic; a message that stages merges, and a commit moves the
//! room to the epoch `stage` announced. The other peer-fed entry points (GroupInfo request,
//! KeyPackage ref) get the same bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use relay_core::mls::MlsValidator;
use relay_mls::OpenMlsValidator;

const CS: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
const ROOM: &str = "mimi://a.example/r/fuzz";

struct Fixture {
    /// The validator's state for the room at epoch 1 (three members).
    state: Vec<u8>,
    /// Valid handshakes for that epoch: a path update, a remove, an add, a remove proposal.
    messages: Vec<Vec<u8>>,
}

fn member(provider: &OpenMlsRustCrypto, name: &str) -> (SignatureKeyPair, CredentialWithKey) {
    let signer = SignatureKeyPair::new(CS.signature_algorithm()).expect("keys");
    signer.store(provider.storage()).expect("store");
    let cred = CredentialWithKey {
        credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    (signer, cred)
}

fn key_package(provider: &OpenMlsRustCrypto, name: &str) -> KeyPackage {
    let (s, c) = member(provider, name);
    KeyPackage::builder()
        .build(CS, provider, &s, c)
        .expect("key package")
        .key_package()
        .clone()
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let provider = OpenMlsRustCrypto::default();
        let (signer, cred) = member(&provider, "mimi://a.example/u/alice");
        let cfg = MlsGroupCreateConfig::builder()
            .ciphersuite(CS)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .build();
        let mut group = MlsGroup::new(&provider, &signer, &cfg, cred).expect("group");
        let others = OpenMlsRustCrypto::default();
        let kps = [
            key_package(&others, "mimi://b.example/u/bob"),
            key_package(&others, "mimi://c.example/u/carol"),
        ];
        group.add_members(&provider, &signer, &kps).expect("add");
        group.merge_pending_commit(&provider).expect("merge");
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
        let state = v.create(ROOM, &gi, &tree).expect("create").state;

        let mut messages = Vec::new();
        let (update, _, _) = group
            .self_update(&provider, &signer, LeafNodeParameters::default())
            .expect("self update")
            .into_contents();
        messages.push(update.to_bytes().expect("bytes"));
        group
            .clear_pending_commit(provider.storage())
            .expect("clear");
        let (remove, _, _) = group
            .remove_members(&provider, &signer, &[LeafNodeIndex::new(2)])
            .expect("remove");
        messages.push(remove.to_bytes().expect("bytes"));
        group
            .clear_pending_commit(provider.storage())
            .expect("clear");
        let dave = key_package(&others, "mimi://d.example/u/dave");
        let (add, _, _) = group.add_members(&provider, &signer, &[dave]).expect("add");
        messages.push(add.to_bytes().expect("bytes"));
        group
            .clear_pending_commit(provider.storage())
            .expect("clear");
        let (proposal, _) = group
            .propose_remove_member(&provider, &signer, LeafNodeIndex::new(1))
            .expect("proposal");
        messages.push(proposal.to_bytes().expect("bytes"));

        // Checked once: every fixture message is valid for the room.
        for m in &messages {
            let mut v = OpenMlsValidator::new();
            v.restore(ROOM, &state).expect("restore");
            v.stage(ROOM, m).expect("a fixture message stages");
        }
        Fixture { state, messages }
    })
}

/// The message to try: the input as it is, or a fixture message mutated by the input.
fn message(f: &Fixture, data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    let (&pick, rest) = rest.split_first().unwrap_or((&0, &[]));
    let base = &f.messages[usize::from(pick) % f.messages.len()];
    Some(match mode % 4 {
        0 => rest.to_vec(),
        1 => {
            // (position u16, xor) pairs.
            let mut m = base.clone();
            for p in rest.chunks_exact(3) {
                let at = usize::from(u16::from_be_bytes([p[0], p[1]])) % m.len();
                m[at] ^= p[2];
            }
            m
        }
        2 => {
            // Keep a prefix, append the rest.
            let (&cut, tail) = rest.split_first().unwrap_or((&0, &[]));
            let keep = base.len() * usize::from(cut) / 256;
            let mut m = base[..keep].to_vec();
            m.extend_from_slice(tail);
            m
        }
        _ => {
            // Replace a window.
            let (&at, tail) = rest.split_first().unwrap_or((&0, &[]));
            let at = base.len() * usize::from(at) / 256;
            let mut m = base.clone();
            let end = (at + tail.len()).min(m.len());
            m.splice(at..end, tail.iter().copied());
            m
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some(msg) = message(f, data) else { return };
    let mut v = OpenMlsValidator::new();
    let before = v.restore(ROOM, &f.state).expect("restore");
    match v.stage(ROOM, &msg) {
        Ok(effect) => {
            let after = v.merge(ROOM).expect("what stages merges");
            if effect.is_commit {
                assert_eq!(effect.epoch, before.epoch + 1);
                assert_eq!(after.epoch, effect.epoch);
            } else {
                assert_eq!(after.epoch, before.epoch);
            }
        }
        Err(_) => {
            v.discard(ROOM);
            assert!(v.merge(ROOM).is_err(), "nothing staged after a refusal");
        }
    }
    let _ = v.group_info_requester(&msg);
    let _ = v.key_package_ref(&msg);
});
