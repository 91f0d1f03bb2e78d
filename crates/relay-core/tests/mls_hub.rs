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
use std::collections::BTreeMap;

use mimi_wire::proto::IdentifierUri;
use mimi_wire::proto::room::{
    ParticipantListData, ParticipantListUpdate, UserIndexRolePair, UserRolePair, component,
};
use relay_core::mls::{AppDataChange, GroupState, HandshakeEffect, MlsReject, MlsValidator};
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

/// A validator whose "MLS" is the authenticated data of a PublicMessage: commands split by
/// `;`: `add URI`, `remove URI` (one client each), `noop`, `bad`, `panic`, and participant
/// list changes (an AppDataUpdate): `list+ URI ROLE`, `list- URI`, `role URI ROLE`. The
/// sender is the member at the leaf index. A room created with GroupInfo `gi+list` carries
/// a participant_list (its creator as role 4).
#[derive(Debug, Default)]
struct Fake {
    epoch: u64,
    members: Vec<String>,
    list: Option<ParticipantListData>,
    staged: Option<(u64, Vec<String>, Option<ParticipantListData>)>,
    hub_secret: Option<Vec<u8>>,
}

/// Each generated hub secret differs (as a random one would).
static SECRETS_MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn enc(epoch: u64, members: &[String], list: &Option<ParticipantListData>) -> Vec<u8> {
    let mut v = epoch.to_be_bytes().to_vec();
    let m = members.join(" ");
    v.extend_from_slice(&(m.len() as u32).to_be_bytes());
    v.extend_from_slice(m.as_bytes());
    if let Some(l) = list {
        v.extend_from_slice(&l.encode().unwrap());
    }
    v
}

fn app_data(list: &Option<ParticipantListData>) -> BTreeMap<u16, Vec<u8>> {
    list.iter()
        .map(|l| (component::PARTICIPANT_LIST, l.encode().unwrap()))
        .collect()
}

fn pair(user: &str, role: &str) -> UserRolePair {
    UserRolePair {
        user: IdentifierUri::new(user),
        role_index: role.parse().unwrap(),
    }
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

    fn create(&mut self, _: &str, gi: &[u8], tree: &[u8]) -> Result<GroupState, MlsReject> {
        self.epoch = 0;
        let creator = String::from_utf8(tree.to_vec()).unwrap();
        self.list = (gi == b"gi+list").then(|| ParticipantListData {
            participants: vec![pair(&creator, "4")],
        });
        self.members = vec![creator];
        Ok(GroupState {
            epoch: 0,
            members: self.members.clone(),
            state: enc(0, &self.members, &self.list),
            app_data: app_data(&self.list),
        })
    }

    fn restore(&mut self, _: &str, state: &[u8]) -> Result<GroupState, MlsReject> {
        self.epoch = u64::from_be_bytes(state[..8].try_into().unwrap());
        let n = u32::from_be_bytes(state[8..12].try_into().unwrap()) as usize;
        self.members = std::str::from_utf8(&state[12..12 + n])
            .unwrap()
            .split(' ')
            .map(str::to_owned)
            .collect();
        let rest = &state[12 + n..];
        self.list = (!rest.is_empty()).then(|| ParticipantListData::decode(rest).unwrap());
        Ok(GroupState {
            epoch: self.epoch,
            members: self.members.clone(),
            state: state.to_vec(),
            app_data: app_data(&self.list),
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
        let mut update = ParticipantListUpdate::default();
        let mut list_changed = false;
        let base = self.list.clone().unwrap_or_default();
        let index = |u: &str| {
            base.participants
                .iter()
                .position(|p| p.user.as_str() == u)
                .unwrap() as u32
        };
        for cmd in aad.split(';') {
            let words: Vec<&str> = cmd.split(' ').collect();
            match words[..] {
                ["add", u] => {
                    effect.added.push(u.to_owned());
                    members.push(u.to_owned());
                }
                ["remove", u] => {
                    effect.removed.push(u.to_owned());
                    if let Some(i) = members.iter().position(|m| m == u) {
                        members.remove(i);
                    }
                }
                ["list+", u, r] => {
                    list_changed = true;
                    update.added_participants.push(pair(u, r));
                }
                ["list-", u] => {
                    list_changed = true;
                    update.removed_indices.push(index(u));
                }
                ["role", u, r] => {
                    list_changed = true;
                    update.changed_role_participants.push(UserIndexRolePair {
                        user_index: index(u),
                        role_index: r.parse().unwrap(),
                    });
                }
                ["noop"] => {}
                _ => return Err(MlsReject::Invalid("bad signature".into())),
            }
        }
        let mut list = self.list.clone();
        if list_changed {
            let after = base
                .apply(&update)
                .map_err(|e| MlsReject::Invalid(e.to_string()))?;
            effect.app_data.push(AppDataChange {
                component: component::PARTICIPANT_LIST,
                before: self.list.as_ref().map(|l| l.encode().unwrap()),
                after: Some(after.encode().unwrap()),
            });
            list = Some(after);
        }
        effect.members_after = members.clone();
        self.staged = Some((self.epoch + 1, members, list));
        Ok(effect)
    }

    fn merge(&mut self, _: &str) -> Result<GroupState, MlsReject> {
        let (epoch, members, list) = self.staged.take().unwrap();
        self.epoch = epoch;
        self.members = members;
        self.list = list;
        Ok(GroupState {
            epoch,
            members: self.members.clone(),
            state: enc(epoch, &self.members, &self.list),
            app_data: app_data(&self.list),
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
    if n < 64 {
        out.push(n as u8);
    } else {
        assert!(n < 16384);
        out.extend_from_slice(&(0x4000 | n as u16).to_be_bytes());
    }
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
    let (n, at) = if m[at + 13] < 64 {
        (m[at + 13] as usize, at + 14)
    } else {
        (
            (u16::from_be_bytes([m[at + 13], m[at + 14]]) & 0x3fff) as usize,
            at + 15,
        )
    };
    let aad = String::from_utf8(m[at..at + n].to_vec()).unwrap();
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
        let (r, n) = self.update_full(from, body);
        (r.outcome, n)
    }

    fn update_full(&mut self, from: &str, body: Bytes) -> (UpdateRoomResponse, usize) {
        let (r, n) = self.ask(from, Endpoint::Update, body);
        (UpdateRoomResponse::decode(&r.body).unwrap(), n)
    }

    /// The participant list: (user, role index).
    fn participants(&self) -> Vec<(String, u32)> {
        self.relay
            .mls_participants(ROOM)
            .unwrap()
            .into_iter()
            .map(|p| (p.user, p.role_index))
            .collect()
    }

    /// Like [`Hub::room_of_three`], in a room whose group carries its participant list:
    /// alice (4) adds bob as ordinary user (2) and carol as group admin (3).
    fn listed_room_of_three() -> Hub {
        let mut h = Hub::new();
        h.relay
            .handle_create_mls_room(
                &mut h.store,
                ROOM.parse::<RoomId>().unwrap(),
                b"gi+list",
                ALICE.as_bytes(),
            )
            .unwrap();
        for (e, u, r) in [(0, BOB, 2), (1, CAROL, 3)] {
            let aad = format!("add {u};list+ {u} {r}");
            let (o, _) = h.update("a.example", update_body(e, 0, &aad));
            assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
        }
        h
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
    let p: Vec<_> = h
        .relay
        .mls_participants(ROOM)
        .unwrap()
        .into_iter()
        .map(|p| (p.user, p.role_index, p.role_name))
        .collect();
    assert_eq!(
        p,
        vec![
            (ALICE.to_owned(), 4, "super_admin".to_owned()),
            (CAROL.to_owned(), 2, "ordinary_user".to_owned())
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

fn pairs(v: &[(&str, u32)]) -> Vec<(String, u32)> {
    v.iter().map(|(u, r)| ((*u).to_owned(), *r)).collect()
}

#[test]
fn an_allowed_add_updates_the_participant_list() {
    let h = Hub::listed_room_of_three();
    assert_eq!(h.relay.mls_epoch(ROOM), Some(2));
    assert_eq!(h.participants(), pairs(&[(ALICE, 4), (BOB, 2), (CAROL, 3)]));
    let p = h.relay.mls_participants(ROOM).unwrap();
    assert_eq!(p[2].role_name, "group_admin");
}

#[test]
fn a_refused_add_is_not_allowed_and_nothing_is_fanned_out() {
    let mut h = Hub::listed_room_of_three();
    let dave = "mimi://d.example/u/dave";
    // bob, an ordinary user, may not add dave.
    let (r, n) = h.update_full(
        "b.example",
        update_body(2, 1, &format!("add {dave};list+ {dave} 2")),
    );
    assert_eq!(r.outcome, UpdateOutcome::NotAllowed);
    assert!(
        r.error_description.contains("canAddParticipant"),
        "{}",
        r.error_description
    );
    assert_eq!(n, 0, "nothing fanned out");
    assert_eq!(h.relay.stats().policy_rejections, 1);
    // alice may not add him to the group without listing him (protocol-06 §5.3).
    let (r, n) = h.update_full("a.example", update_body(2, 0, &format!("add {dave}")));
    assert_eq!(r.outcome, UpdateOutcome::NotAllowed);
    assert!(
        r.error_description.contains("not in the participant list"),
        "{}",
        r.error_description
    );
    assert_eq!(n, 0);
    assert_eq!(h.relay.stats().policy_rejections, 2);
    assert_eq!(h.relay.mls_epoch(ROOM), Some(2));
    assert_eq!(h.participants(), pairs(&[(ALICE, 4), (BOB, 2), (CAROL, 3)]));
    // The refused commits left nothing staged: the next valid one goes through.
    let (o, n) = h.update(
        "c.example",
        update_body(2, 2, &format!("add {dave};list+ {dave} 2")),
    );
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    assert_eq!(n, 2, "to b.example and c.example");
    assert_eq!(h.participants().last(), Some(&(dave.to_owned(), 2)));
}

#[test]
fn a_banned_or_removed_user_may_not_submit() {
    // ann is a user of the hub's own provider, so her submissions reach the room's policy
    // (a provider with no member left is refused before: it no longer follows the room).
    let ann = "mimi://a.example/u/ann";
    let mut h = Hub::listed_room_of_three();
    let (o, _) = h.update(
        "a.example",
        update_body(2, 0, &format!("add {ann};list+ {ann} 2")),
    );
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    assert!(matches!(
        submit(&mut h, "a.example", ann, 3),
        SubmitStatus::Accepted { .. }
    ));
    // carol, an admin, bans ann: her role becomes 1 and her client goes.
    let (o, _) = h.update(
        "c.example",
        update_body(3, 2, &format!("remove {ann};role {ann} 1")),
    );
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    assert_eq!(
        h.participants(),
        pairs(&[(ALICE, 4), (BOB, 2), (CAROL, 3), (ann, 1)])
    );
    let before = h.relay.stats().policy_rejections;
    assert_eq!(
        submit(&mut h, "a.example", ann, 4),
        SubmitStatus::NotAllowed
    );
    assert_eq!(h.relay.stats().policy_rejections, before + 1);
    // Never listed: refused by the policy too.
    assert_eq!(
        submit(&mut h, "a.example", "mimi://a.example/u/mallory", 4),
        SubmitStatus::NotAllowed
    );
    assert_eq!(h.relay.stats().policy_rejections, before + 2);
    // alice removes bob from the list with his client: he may not submit either.
    let (o, _) = h.update(
        "a.example",
        update_body(4, 0, &format!("remove {BOB};list- {BOB}")),
    );
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    assert_eq!(
        submit(&mut h, "b.example", BOB, 5),
        SubmitStatus::NotAllowed
    );
    assert!(matches!(
        submit(&mut h, "a.example", ALICE, 5),
        SubmitStatus::Accepted { .. }
    ));
}

#[test]
fn the_participant_list_survives_a_restart() {
    let h = Hub::listed_room_of_three();
    let before = h.participants();
    let mut h = h.restart();
    assert_eq!(h.participants(), before);
    // And the restored policy still holds: bob may not remove carol, carol may remove bob.
    let (o, _) = h.update(
        "b.example",
        update_body(2, 1, &format!("remove {CAROL};list- {CAROL}")),
    );
    assert_eq!(o, UpdateOutcome::NotAllowed);
    let (o, _) = h.update(
        "c.example",
        update_body(2, 2, &format!("remove {BOB};list- {BOB}")),
    );
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
    let h = h.restart();
    assert_eq!(h.participants(), pairs(&[(ALICE, 4), (CAROL, 3)]));
}

#[test]
fn a_hub_kept_list_survives_a_restart() {
    // A group without a participant_list: the hub keeps and persists the list.
    let h = Hub::room_of_three();
    assert_eq!(h.participants(), pairs(&[(ALICE, 4), (BOB, 2), (CAROL, 2)]));
    let mut h = h.restart();
    assert_eq!(h.participants(), pairs(&[(ALICE, 4), (BOB, 2), (CAROL, 2)]));
    // bob is still ordinary after the restart: he adds nobody.
    let (o, _) = h.update("b.example", update_body(2, 1, "add mimi://b.example/u/eve"));
    assert_eq!(o, UpdateOutcome::NotAllowed);
    let (o, _) = h.update("a.example", update_body(2, 0, "add mimi://b.example/u/eve"));
    assert!(matches!(o, UpdateOutcome::Success { .. }), "{o:?}");
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

/// A commit covering one GREASE proposal (type 0x0a0a, an opaque body) by value.
fn commit_with_grease(epoch: u64, leaf: u32) -> Vec<u8> {
    let mut b = vec![0, 1, 0, 1];
    vec(&mut b, b"group");
    b.extend_from_slice(&epoch.to_be_bytes());
    b.push(1);
    b.extend_from_slice(&leaf.to_be_bytes());
    vec(&mut b, b"noop");
    b.push(3);
    let mut props = vec![1, 0x0a, 0x0a]; // by value, GREASE type
    vec(&mut props, b"opaque");
    vec(&mut b, &props);
    b.push(0); // no path
    vec(&mut b, &[9; 32]);
    vec(&mut b, &[8; 32]);
    vec(&mut b, &[7; 32]);
    b
}

#[test]
fn a_commit_the_hub_cannot_read_is_refused_with_a_typed_answer() {
    let mut h = Hub::room_of_three();
    let mut body = commit_with_grease(2, 1);
    body.extend_from_slice(&[0, 2, 0, 0, 0, 4]);
    let (r, n) = h.ask("b.example", Endpoint::Update, Bytes::from(body));
    assert_eq!(r.status, Status::BadRequest, "{r:?}");
    assert_eq!(n, 0, "nothing fanned out");
    assert_eq!(h.relay.mls_epoch(ROOM), Some(2));
}

#[test]
fn a_follower_takes_a_notify_whose_commit_it_cannot_read() {
    // A follower of a room at a.example (bob's provider) gets the hub's fanout of a commit
    // with a proposal type it does not know: it relays it as it is, validation being the
    // hub's job.
    let cfg = RelayConfig::new(d("b.example")).with_route(d("a.example"), TransportKind::Quic);
    let now = Now {
        mono: Instant::now(),
        unix_ms: 1_700_000_000_000,
    };
    let mut store = MemStore::new();
    let mut relay = Relay::new(cfg, store.load().unwrap(), now);
    relay
        .handle_follow_room(&mut store, &ROOM.parse::<RoomId>().unwrap())
        .unwrap();
    let mut fanout = 1_700_000_000_000u64.to_be_bytes().to_vec();
    fanout.extend_from_slice(&commit_with_grease(2, 1));
    fanout.push(0); // externalProposals<V> empty
    let req = Request {
        from: d("a.example"),
        transport: TransportKind::Quic,
        endpoint: Endpoint::Notify,
        target: ROOM.into(),
        seq: None,
        lineage: None,
        body: Bytes::from(fanout.clone()),
    };
    relay.handle_request(now, &mut store, ReplyToken(1), req);
    store.commit().unwrap();
    let next = relay.inbox_next();
    relay.handle_inbox_durable(next);
    let mut status = None;
    while let Some(o) = relay.poll_output() {
        if let Output::Reply { response, .. } = o {
            status = Some(response.status);
        }
    }
    assert_eq!(status, Some(Status::Created));
    // A broken framing is still refused: the commit cut short.
    let mut cut = fanout;
    cut.truncate(cut.len() - 40);
    let req = Request {
        from: d("a.example"),
        transport: TransportKind::Quic,
        endpoint: Endpoint::Notify,
        target: ROOM.into(),
        seq: None,
        lineage: None,
        body: Bytes::from(cut),
    };
    relay.handle_request(now, &mut store, ReplyToken(2), req);
    let mut status = None;
    while let Some(o) = relay.poll_output() {
        if let Output::Reply { response, .. } = o {
            status = Some(response.status);
        }
    }
    assert_eq!(status, Some(Status::BadRequest));
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
