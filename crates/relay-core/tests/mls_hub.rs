//! The hub's MLS rules in the core, with a fake validator (no MLS library): wrong epochs,
//! first commit wins, invalid handshakes, the room policy, epochTooOld, and a restart.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::proto::{
    SubmitMessageRequest, SubmitMessageResponse, SubmitStatus, UpdateOutcome, UpdateRoomResponse,
};
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_core::mls::{GroupState, HandshakeEffect, MlsReject, MlsValidator, Role};
use relay_core::{
    MemStore, Now, Output, Relay, RelayConfig, ReplyToken, Request, Response, Status, Store,
    TransportKind,
};

const ROOM: &str = "mimi://a.example/r/fake";
const ALICE: &str = "mimi://a.example/u/alice";
const BOB: &str = "mimi://b.example/u/bob";
const CAROL: &str = "mimi://c.example/u/carol";

thread_local! {
    /// Calls of `Fake::stage` on this test's thread: the expensive MLS work.
    static STAGED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A validator whose "MLS" is the authenticated data of a PublicMessage: `add URI`,
/// `remove URI`, `noop` or `bad`; the sender is the member at the leaf index.
#[derive(Debug, Default)]
struct Fake {
    epoch: u64,
    members: Vec<String>,
    staged: Option<(u64, Vec<String>)>,
    hub_secret: Option<Vec<u8>>,
}

/// Each generated hub secret differs (as a random one would).
static SECRETS_MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn enc(epoch: u64, members: &[String]) -> Vec<u8> {
    let mut v = epoch.to_be_bytes().to_vec();
    v.extend_from_slice(members.join(" ").as_bytes());
    v
}

impl MlsValidator for Fake {
    fn generate_hub_secret(&mut self) -> Option<Vec<u8>> {
        let n = SECRETS_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(n.to_be_bytes().to_vec())
    }

    fn set_hub_secret(&mut self, secret: &[u8]) {
        self.hub_secret = Some(secret.to_vec());
    }

    fn hub_signature_public_key(&self) -> Option<Vec<u8>> {
        // A stand-in derivation: what matters here is that it follows the secret.
        let mut k = self.hub_secret.clone()?;
        k.reverse();
        Some(k)
    }

    /// A stand-in Frank that shows what the core handed over: the tag as the server frank,
    /// sender, room and time as the "signature".
    fn frank(
        &self,
        _room: &str,
        franking_tag: &[u8; 32],
        sender_uri: &str,
        room_uri: &str,
        accepted_ms: u64,
    ) -> Option<mimi_wire::proto::Frank> {
        self.hub_secret.as_ref()?;
        Some(mimi_wire::proto::Frank {
            server_frank: *franking_tag,
            franking_signature_ciphersuite: 1,
            franking_integrity_signature: mimi_wire::proto::VLBytes::new(
                format!("{sender_uri} {room_uri} {accepted_ms}").into_bytes(),
            ),
        })
    }

    fn create(&mut self, _: &str, _gi: &[u8], tree: &[u8]) -> Result<GroupState, MlsReject> {
        self.epoch = 0;
        self.members = vec![String::from_utf8(tree.to_vec()).unwrap()];
        Ok(GroupState {
            epoch: 0,
            members: self.members.clone(),
            state: enc(0, &self.members),
            app_data: Default::default(),
        })
    }

    fn restore(&mut self, _: &str, state: &[u8]) -> Result<GroupState, MlsReject> {
        self.epoch = u64::from_be_bytes(state[..8].try_into().unwrap());
        self.members = std::str::from_utf8(&state[8..])
            .unwrap()
            .split(' ')
            .map(str::to_owned)
            .collect();
        Ok(GroupState {
            epoch: self.epoch,
            members: self.members.clone(),
            state: state.to_vec(),
            app_data: Default::default(),
        })
    }

    fn stage(&mut self, _: &str, message: &[u8]) -> Result<HandshakeEffect, MlsReject> {
        STAGED.with(|s| s.set(s.get() + 1));
        let (epoch, leaf, aad) = parse(message);
        if aad == "panic" {
            panic!("a third-party validator's bug, reached by a peer's input");
        }
        if epoch != self.epoch {
            return Err(MlsReject::WrongEpoch {
                current: self.epoch,
            });
        }
        let sender = self.members.get(leaf as usize).cloned().unwrap_or_default();
        let mut effect = HandshakeEffect {
            sender,
            is_commit: true,
            epoch: self.epoch + 1,
            ..HandshakeEffect::default()
        };
        let mut members = self.members.clone();
        match aad.split_once(' ') {
            Some(("add", u)) => {
                effect.added.push(u.to_owned());
                members.push(u.to_owned());
            }
            Some(("remove", u)) => {
                effect.removed.push(u.to_owned());
                members.retain(|m| m != u);
            }
            _ if aad == "noop" => {}
            _ => return Err(MlsReject::Invalid("bad signature".into())),
        }
        self.staged = Some((self.epoch + 1, members));
        Ok(effect)
    }

    fn merge(&mut self, _: &str) -> Result<GroupState, MlsReject> {
        let (epoch, members) = self.staged.take().unwrap();
        self.epoch = epoch;
        self.members = members;
        Ok(GroupState {
            epoch,
            members: self.members.clone(),
            state: enc(epoch, &self.members),
            app_data: Default::default(),
        })
    }

    fn discard(&mut self, _: &str) {
        self.staged = None;
    }

    fn key_package_ref(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

fn varint(out: &mut Vec<u8>, n: usize) {
    assert!(n < 64);
    out.push(n as u8);
}

fn vec(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len());
    out.extend_from_slice(b);
}

/// A PublicMessage commit (no proposals, no path) from a member: RFC 9420 §6.2.
fn commit(epoch: u64, leaf: u32, aad: &str) -> Vec<u8> {
    let mut b = vec![0, 1, 0, 1]; // mls10, public message
    vec(&mut b, b"group");
    b.extend_from_slice(&epoch.to_be_bytes());
    b.push(1); // member
    b.extend_from_slice(&leaf.to_be_bytes());
    vec(&mut b, aad.as_bytes());
    b.push(3); // commit
    b.extend_from_slice(&[0, 0]); // proposals<V> empty, no path
    vec(&mut b, &[9; 32]); // signature
    vec(&mut b, &[8; 32]); // confirmation tag
    vec(&mut b, &[7; 32]); // membership tag
    b
}

fn parse(m: &[u8]) -> (u64, u32, String) {
    let gid = m[4] as usize;
    let at = 5 + gid;
    let epoch = u64::from_be_bytes(m[at..at + 8].try_into().unwrap());
    let leaf = u32::from_be_bytes(m[at + 9..at + 13].try_into().unwrap());
    let n = m[at + 13] as usize;
    let aad = String::from_utf8(m[at + 14..at + 14 + n].to_vec()).unwrap();
    (epoch, leaf, aad)
}

/// UpdateRequest: the commit, no Welcome, a partial GroupInfo, tree from the DS.
fn update_body(epoch: u64, leaf: u32, aad: &str) -> Bytes {
    let mut b = commit(epoch, leaf, aad);
    b.extend_from_slice(&[0, 2, 0, 0, 0, 4]);
    Bytes::from(b)
}

fn d(s: &str) -> ProviderDomain {
    s.parse().unwrap()
}

struct Hub {
    relay: Relay,
    store: MemStore,
    now: Now,
    token: u64,
}

impl Hub {
    fn new() -> Hub {
        let cfg = RelayConfig::new(d("a.example"))
            .with_route(d("b.example"), TransportKind::Quic)
            .with_route(d("c.example"), TransportKind::Https)
            .with_route(d("d.example"), TransportKind::Https);
        let now = Now {
            mono: Instant::now(),
            unix_ms: 1_700_000_000_000,
        };
        let mut store = MemStore::new();
        let snap = store.load().unwrap();
        let records = snap.records.clone();
        let mut relay = Relay::new(cfg, snap, now);
        relay.set_mls_validator(Box::<Fake>::default(), &records);
        relay.handle_hub_secret(&mut store, &records);
        Hub {
            relay,
            store,
            now,
            token: 0,
        }
    }

    /// The same hub after a restart from what was committed.
    fn restart(mut self) -> Hub {
        self.store.commit().unwrap();
        let mut store = self.store.clone();
        let snap = store.load().unwrap();
        let records = snap.records.clone();
        let cfg = self.relay.config().clone();
        let mut relay = Relay::new(cfg, snap, self.now);
        relay.set_mls_validator(Box::<Fake>::default(), &records);
        relay.handle_hub_secret(&mut store, &records);
        Hub {
            relay,
            store,
            now: self.now,
            token: 0,
        }
    }

    fn ask(&mut self, from: &str, endpoint: Endpoint, body: Bytes) -> (Response, usize) {
        self.token += 1;
        let token = ReplyToken(self.token);
        let req = Request {
            from: d(from),
            transport: TransportKind::Quic,
            endpoint,
            target: ROOM.into(),
            seq: None,
            lineage: None,
            body,
        };
        self.relay
            .handle_request(self.now, &mut self.store, token, req);
        let mut reply = None;
        let mut notifies = Vec::new();
        while let Some(o) = self.relay.poll_output() {
            match o {
                Output::Reply { token: t, response } if t == token => reply = Some(response),
                Output::Transmit(t) if t.endpoint == Endpoint::Notify => notifies.push(t),
                _ => {}
            }
        }
        // The followers take them, as followers with our sequence extension.
        let n = notifies.len();
        for t in notifies {
            let mut r = Response::new(Status::Created, Bytes::new());
            r.next_seq = t.seq.map(|s| s + t.body.len() as u64);
            self.relay
                .handle_outcome(self.now, &mut self.store, t.id, Ok(r));
        }
        while self.relay.poll_output().is_some() {}
        (reply.unwrap(), n)
    }

    fn update(&mut self, from: &str, body: Bytes) -> (UpdateOutcome, usize) {
        let (r, n) = self.ask(from, Endpoint::Update, body);
        (UpdateRoomResponse::decode(&r.body).unwrap().outcome, n)
    }

    /// alice (leaf 0) hosts the room; bob (leaf 1) and carol (leaf 2) are added: epoch 2.
    fn room_of_three() -> Hub {
        let mut h = Hub::new();
        h.relay
            .handle_create_mls_room(
                &mut h.store,
                ROOM.parse::<RoomId>().unwrap(),
                b"gi",
                ALICE.as_bytes(),
            )
            .unwrap();
        // alice's own commits come through her provider, the hub itself.
        for (e, u) in [(0, BOB), (1, CAROL)] {
            let (o, _) = h.update("a.example", update_body(e, 0, &format!("add {u}")));
            assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
        }
        h
    }
}

fn submit(h: &mut Hub, from: &str, user: &str, epoch: u64) -> SubmitStatus {
    let mls = mimi_wire::mls::private_message(b"group", epoch, b"ciphertext");
    let body = SubmitMessageRequest::mls10(mls, user)
        .unwrap()
        .encode()
        .unwrap();
    let (r, _) = h.ask(from, Endpoint::SubmitMessage, Bytes::from(body));
    SubmitMessageResponse::decode(&r.body).unwrap().status
}

#[test]
fn wrong_epoch_is_answered_with_the_current_one() {
    let mut h = Hub::room_of_three();
    assert_eq!(h.relay.mls_epoch(ROOM), Some(2));
    let (o, n) = h.update("b.example", update_body(1, 1, "noop"));
    assert_eq!(o, UpdateOutcome::WrongEpoch { current_epoch: 2 });
    assert_eq!(n, 0, "nothing fanned out");
}

#[test]
fn the_first_valid_commit_of_an_epoch_wins_and_is_fanned_out() {
    let mut h = Hub::room_of_three();
    let (o, n) = h.update("b.example", update_body(2, 1, "noop"));
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    assert_eq!(n, 2, "to b.example (its other clients) and c.example");
    let (o, _) = h.update("c.example", update_body(2, 2, "noop"));
    assert_eq!(o, UpdateOutcome::WrongEpoch { current_epoch: 3 });
    // carol rebases onto epoch 3 and wins that one.
    let (o, _) = h.update("c.example", update_body(3, 2, "noop"));
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    assert_eq!(h.relay.mls_epoch(ROOM), Some(4));
}

#[test]
fn invalid_handshakes_and_policy_refusals_change_nothing() {
    let mut h = Hub::room_of_three();
    let (o, n) = h.update("b.example", update_body(2, 1, "bad"));
    assert!(matches!(o, UpdateOutcome::InvalidProposal { .. }), "{o:?}");
    assert_eq!(n, 0);
    // bob is a regular participant: he may not remove carol, nor add anyone.
    let (o, _) = h.update("b.example", update_body(2, 1, &format!("remove {CAROL}")));
    assert_eq!(o, UpdateOutcome::NotAllowed);
    let (o, _) = h.update("b.example", update_body(2, 1, "add mimi://b.example/u/eve"));
    assert_eq!(o, UpdateOutcome::NotAllowed);
    // b.example may not commit as carol (leaf 2, a c.example user).
    let (o, _) = h.update("b.example", update_body(2, 2, "noop"));
    assert_eq!(o, UpdateOutcome::NotAllowed);
    assert_eq!(h.relay.mls_epoch(ROOM), Some(2));
    // bob may leave by himself; then the room goes on with alice and carol.
    let (o, _) = h.update("b.example", update_body(2, 1, &format!("remove {BOB}")));
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    let p = h.relay.mls_participants(ROOM).unwrap();
    assert_eq!(
        p,
        vec![
            (ALICE.to_owned(), Role::Owner),
            (CAROL.to_owned(), Role::Regular)
        ]
    );
}

#[test]
fn submissions_of_an_old_epoch_or_by_non_members_are_refused() {
    let mut h = Hub::room_of_three();
    assert_eq!(
        submit(&mut h, "b.example", BOB, 1),
        SubmitStatus::EpochTooOld { current_epoch: 2 }
    );
    assert!(matches!(
        submit(&mut h, "b.example", BOB, 2),
        SubmitStatus::Accepted { .. }
    ));
    assert_eq!(
        submit(&mut h, "b.example", "mimi://b.example/u/mallory", 2),
        SubmitStatus::NotAllowed
    );
}

#[test]
fn the_room_state_survives_a_restart() {
    let mut h = Hub::room_of_three();
    let (o, _) = h.update("c.example", update_body(2, 2, "noop"));
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    let mut h = h.restart();
    assert_eq!(h.relay.mls_epoch(ROOM), Some(3));
    let (o, _) = h.update("b.example", update_body(2, 1, "noop"));
    assert_eq!(o, UpdateOutcome::WrongEpoch { current_epoch: 3 });
    let (o, n) = h.update("b.example", update_body(3, 1, "noop"));
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    assert_eq!(
        n, 2,
        "b.example and c.example still follow after the restart"
    );
}

#[test]
fn a_validator_panic_is_a_refusal_and_the_hub_goes_on() {
    // Before: the panic unwound through the core thread and ended the node.
    let mut h = Hub::room_of_three();
    let (o, n) = h.update("b.example", update_body(2, 1, "panic"));
    assert!(matches!(o, UpdateOutcome::InvalidProposal { .. }), "{o:?}");
    assert_eq!(n, 0);
    assert_eq!(h.relay.stats().mls_panics, 1);
    let (o, _) = h.update("b.example", update_body(2, 1, "noop"));
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
}

#[test]
fn a_provider_with_no_member_in_the_room_costs_no_mls_work() {
    // Before: d.example's commit went through MLS validation before any membership check.
    let mut h = Hub::room_of_three();
    let before = STAGED.with(|s| s.get());
    let (o, n) = h.update("d.example", update_body(2, 1, "noop"));
    assert_eq!(o, UpdateOutcome::NotAllowed);
    assert_eq!(n, 0);
    assert_eq!(
        STAGED.with(|s| s.get()),
        before,
        "no MLS work for a non-member"
    );
}

#[test]
fn the_hub_secret_is_made_once_and_its_key_outlives_a_restart() {
    let hub = Hub::new();
    let key = hub
        .relay
        .hub_signature_public_key()
        .expect("a hub key once the secret is set");
    let hub = hub.restart();
    assert_eq!(
        hub.relay.hub_signature_public_key().as_deref(),
        Some(&key[..]),
        "the restarted hub derives the same key from its stored secret"
    );
    // A hub that lost its store makes a new secret, hence a new key.
    let fresh = Hub::new();
    assert_ne!(fresh.relay.hub_signature_public_key(), Some(key));
}

/// A PrivateMessage whose authenticated_data is `aad`.
fn private_with_aad(epoch: u64, aad: &[u8]) -> Vec<u8> {
    let m = mimi_wire::mls::private_message(b"group", epoch, b"ciphertext");
    // version, wire format, group_id<V>, epoch, content type: then authenticated_data<V>.
    let at = 4 + 1 + b"group".len() + 8 + 1;
    assert_eq!(m[at], 0, "the sample has no AAD");
    let mut out = m[..at].to_vec();
    vec(&mut out, aad);
    out.extend_from_slice(&m[at + 1..]);
    out
}

#[test]
fn a_submission_with_a_franking_tag_is_franked_once_and_deduplicated_with_the_same_frank() {
    use mimi_wire::proto::room::SafeAad;
    let mut h = Hub::room_of_three();
    let tag = [0x42; 32];
    let mls = private_with_aad(2, &SafeAad::frank(tag).encode().unwrap());
    let body = Bytes::from(
        SubmitMessageRequest::mls10(mls, BOB)
            .unwrap()
            .encode()
            .unwrap(),
    );
    let answer = |h: &mut Hub| {
        let (r, _) = h.ask("b.example", Endpoint::SubmitMessage, body.clone());
        SubmitMessageResponse::decode(&r.body).unwrap().status
    };
    let SubmitStatus::Accepted {
        accepted_timestamp,
        frank: Some(frank),
    } = answer(&mut h)
    else {
        panic!("not franked")
    };
    // The core found the tag in the SafeAAD and named the sender, the room and the time.
    assert_eq!(frank.server_frank, tag);
    assert_eq!(
        frank.franking_integrity_signature.as_slice(),
        format!("{BOB} {ROOM} {accepted_timestamp}").as_bytes()
    );
    assert_eq!(h.relay.stats().franks_issued, 1);
    // A retry is answered from the dedupe window with the same frank, not franked again.
    let SubmitStatus::Accepted { frank: again, .. } = answer(&mut h) else {
        panic!("not accepted")
    };
    assert_eq!(again, Some(frank));
    assert_eq!(h.relay.stats().franks_issued, 1);
    // No frank_aad (an empty AAD, or one that is not a SafeAAD): no frank.
    for aad in [&b""[..], b"free-form aad"] {
        let mls = private_with_aad(2, aad);
        let body = SubmitMessageRequest::mls10(mls, BOB)
            .unwrap()
            .encode()
            .unwrap();
        let (r, _) = h.ask("b.example", Endpoint::SubmitMessage, Bytes::from(body));
        assert!(matches!(
            SubmitMessageResponse::decode(&r.body).unwrap().status,
            SubmitStatus::Accepted { frank: None, .. }
        ));
    }
    assert_eq!(h.relay.stats().franks_issued, 1);
}
