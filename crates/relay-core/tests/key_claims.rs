//! /keyMaterial claims in the core (protocol-06 §5.2, §5.7), with a fake validator: the
//! request's signature, the binding of the requester to the asking provider, the target's
//! consent (global, per room, revoked), KeyPackage lifetimes and per-peer rates, and the
//! same rate on /identifierQuery.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::proto::{
    ClientKeyMaterialStatus, ConsentEntry, ConsentOperation, Credential, IdentifierRequest,
    IdentifierUri, KeyMaterialRequest, KeyMaterialResponse, KeyMaterialUserCode, Protocol,
    RequiredCapabilities, SearchIdentifierType, VLBytes,
};
use mimi_wire::uri::ProviderDomain;
use relay_core::mls::{GroupState, HandshakeEffect, MlsReject, MlsValidator};
use relay_core::{
    MemStore, Now, Output, Relay, RelayConfig, ReplyToken, Request, Response, Status, Store,
    TransportKind,
};

const ALICE: &str = "mimi://a.example/u/alice";
const BOB: &str = "mimi://b.example/u/bob";
const MALLORY: &str = "mimi://m.example/u/mallory";
const ROOM: &str = "mimi://a.example/r/one";
const OTHER_ROOM: &str = "mimi://a.example/r/two";
const MALLORY_ROOM: &str = "mimi://m.example/r/mine";
const T0: u64 = 1_700_000_000;

/// A validator whose "signature" over a KeyMaterialRequest is its TBS itself (so any change
/// to a signed field breaks it), and whose requester is the identity of the basic
/// credential. Rooms are the fake of `mls_hub.rs`: the ratchet tree names the creator.
#[derive(Debug, Default)]
struct Fake;

impl MlsValidator for Fake {
    fn create(&mut self, _: &str, _: &[u8], tree: &[u8]) -> Result<GroupState, MlsReject> {
        let me = String::from_utf8(tree.to_vec()).unwrap();
        Ok(GroupState {
            epoch: 0,
            members: vec![me.clone()],
            state: me.into_bytes(),
            app_data: Default::default(),
        })
    }
    fn restore(&mut self, _: &str, state: &[u8]) -> Result<GroupState, MlsReject> {
        self.create("", &[], state)
    }
    fn stage(&mut self, _: &str, _: &[u8]) -> Result<HandshakeEffect, MlsReject> {
        Err(MlsReject::Invalid("not in these tests".into()))
    }
    fn merge(&mut self, _: &str) -> Result<GroupState, MlsReject> {
        Err(MlsReject::NoGroup)
    }
    fn discard(&mut self, _: &str) {}
    fn key_package_ref(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn key_material_requester(&self, request: &[u8]) -> Result<String, MlsReject> {
        let req =
            KeyMaterialRequest::decode(request).map_err(|e| MlsReject::Invalid(e.to_string()))?;
        if req.signature.as_slice() != req.tbs().unwrap().as_slice() {
            return Err(MlsReject::NotAllowed("bad signature".into()));
        }
        Ok(String::from_utf8(req.requester_credential.as_bytes()[3..].to_vec()).unwrap())
    }
}

/// An MLS variable-length vector.
fn vec(out: &mut Vec<u8>, b: &[u8]) {
    if b.len() < 64 {
        out.push(b.len() as u8);
    } else {
        out.extend_from_slice(&(0x4000 | b.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(b);
}

fn basic_credential(identity: &str) -> Vec<u8> {
    let mut c = vec![0, 1];
    vec(&mut c, identity.as_bytes());
    c
}

/// A bare KeyPackage (RFC 9420 §10) of ciphersuite 1 valid in [not_before, not_after];
/// `n` makes each distinct.
fn key_package(n: u8, not_before: u64, not_after: u64) -> Bytes {
    let mut kp = vec![0, 1, 0, 1];
    vec(&mut kp, &[n; 32]); // init_key
    vec(&mut kp, &[1; 32]); // encryption_key
    vec(&mut kp, &[2; 32]); // signature_key
    kp.extend_from_slice(&basic_credential(BOB));
    for _ in 0..5 {
        vec(&mut kp, &[]); // capabilities
    }
    kp.push(1); // leaf_node_source key_package
    kp.extend_from_slice(&not_before.to_be_bytes());
    kp.extend_from_slice(&not_after.to_be_bytes());
    vec(&mut kp, &[]); // leaf extensions
    vec(&mut kp, &[4; 64]); // leaf signature
    vec(&mut kp, &[]); // extensions
    vec(&mut kp, &[6; 64]); // signature
    Bytes::from(kp)
}

fn claim(requester: &str, target: &str, room: &str) -> KeyMaterialRequest {
    let mut req = KeyMaterialRequest {
        protocol: Protocol::Mls10,
        requesting_user: IdentifierUri::new(requester),
        target_user: IdentifierUri::new(target),
        room_id: IdentifierUri::new(room),
        acceptable_ciphersuites: vec![1],
        required_capabilities: RequiredCapabilities::from_bytes(vec![0, 0, 0]).unwrap(),
        requester_signature_key: VLBytes::new(vec![9; 32]),
        requester_credential: Credential::from_bytes(basic_credential(requester)).unwrap(),
        signature: VLBytes::new(Vec::new()),
    };
    req.signature = VLBytes::new(req.tbs().unwrap());
    req
}

fn d(s: &str) -> ProviderDomain {
    s.parse().unwrap()
}

struct Node {
    relay: Relay,
    store: MemStore,
    now: Now,
    token: u64,
}

impl Node {
    fn new(local: &str, tune: impl FnOnce(&mut RelayConfig)) -> Node {
        let mut cfg = RelayConfig::new(d(local));
        for p in ["a.example", "b.example", "c.example", "m.example"] {
            if p != local {
                cfg = cfg.with_route(d(p), TransportKind::Https);
            }
        }
        tune(&mut cfg);
        let now = Now {
            mono: Instant::now(),
            unix_ms: T0 * 1000,
        };
        let mut store = MemStore::new();
        let snap = store.load().unwrap();
        let records = snap.records.clone();
        let mut relay = Relay::new(cfg, snap, now);
        relay.set_mls_validator(Box::new(Fake), &records);
        Node {
            relay,
            store,
            now,
            token: 0,
        }
    }

    /// b.example, bob's provider, with `n` KeyPackages of bob valid for a day.
    fn target(n: u8, tune: impl FnOnce(&mut RelayConfig)) -> Node {
        let mut node = Node::new("b.example", tune);
        let kps = (0..n)
            .map(|i| key_package(i, T0 - 60, T0 + 86_400))
            .collect();
        let now = node.now;
        assert_eq!(
            node.relay.handle_publish_key_packages(
                now,
                &mut node.store,
                BOB,
                "mimi://b.example/d/1",
                kps
            ),
            Ok(usize::from(n))
        );
        node
    }

    fn restart(mut self) -> Node {
        self.store.commit().unwrap();
        let mut store = self.store.clone();
        let snap = store.load().unwrap();
        let records = snap.records.clone();
        let mut relay = Relay::new(self.relay.config().clone(), snap, self.now);
        relay.set_mls_validator(Box::new(Fake), &records);
        Node {
            relay,
            store,
            now: self.now,
            token: 0,
        }
    }

    fn reply(&mut self, token: ReplyToken) -> (Option<Response>, Vec<relay_core::Transmit>) {
        let mut reply = None;
        let mut sent = Vec::new();
        while let Some(o) = self.relay.poll_output() {
            match o {
                Output::Reply { token: t, response } if t == token => reply = Some(response),
                Output::Transmit(t) => sent.push(t),
                _ => {}
            }
        }
        self.store.commit().unwrap();
        (reply, sent)
    }

    /// A peer's request; its answer, or the transmits it caused when it was forwarded.
    fn peer(
        &mut self,
        from: &str,
        endpoint: Endpoint,
        target: &str,
        body: Vec<u8>,
    ) -> (Option<Response>, Vec<relay_core::Transmit>) {
        self.token += 1;
        let token = ReplyToken(self.token);
        let req = Request {
            from: d(from),
            transport: TransportKind::Https,
            endpoint,
            target: target.to_owned(),
            seq: None,
            lineage: None,
            body: Bytes::from(body),
        };
        self.relay
            .handle_request(self.now, &mut self.store, token, req);
        self.reply(token)
    }

    fn client(
        &mut self,
        endpoint: Endpoint,
        target: &str,
        body: Vec<u8>,
    ) -> (Option<Response>, Vec<relay_core::Transmit>) {
        self.token += 1;
        let token = ReplyToken(self.token);
        self.relay.handle_client_request(
            self.now,
            &mut self.store,
            token,
            endpoint,
            target,
            Bytes::from(body),
        );
        self.reply(token)
    }

    /// A claim from `from`, answered here.
    fn claim(&mut self, from: &str, req: &KeyMaterialRequest) -> Response {
        let target = req.target_user.as_str().to_owned();
        let (r, sent) = self.peer(from, Endpoint::KeyMaterial, &target, req.encode().unwrap());
        assert!(
            sent.is_empty(),
            "a claim for a local user is never forwarded"
        );
        r.expect("answered here")
    }

    /// The user status of a claim answered 200.
    fn claim_code(&mut self, from: &str, req: &KeyMaterialRequest) -> KeyMaterialUserCode {
        let r = self.claim(from, req);
        assert_eq!(r.status, Status::Ok, "{:?}", r.body);
        let resp = KeyMaterialResponse::decode(&r.body).unwrap();
        if !matches!(
            resp.user_status,
            KeyMaterialUserCode::Success | KeyMaterialUserCode::PartialSuccess
        ) && resp.user_status != KeyMaterialUserCode::NoCompatibleMaterial
        {
            assert!(resp.clients.is_empty(), "no clients listed on a refusal");
        }
        resp.user_status
    }

    /// bob (a local user here) grants or revokes consent to `requester`.
    fn consent(&mut self, op: ConsentOperation, requester: &str, room: Option<&str>) {
        let entry = ConsentEntry {
            operation: op,
            requester_uri: IdentifierUri::new(requester),
            target_uri: IdentifierUri::new(BOB),
            room_id: room.map(IdentifierUri::new),
            client_key_packages: Vec::new(),
            consent_extensions: VLBytes::new(Vec::new()),
        };
        let (r, sent) = self.client(Endpoint::UpdateConsent, BOB, entry.encode().unwrap());
        // Kept here, then sent on to the requester's provider as notice.
        assert!(r.is_none(), "{r:?}");
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].endpoint, Endpoint::UpdateConsent);
    }
}

#[test]
fn a_bad_signature_or_another_users_credential_is_refused_and_costs_nothing() {
    let mut b = Node::target(1, |_| {});
    b.consent(ConsentOperation::Grant, ALICE, None);
    let mut forged = claim(ALICE, BOB, ROOM);
    forged.signature = VLBytes::new(b"not the signature".to_vec());
    assert_eq!(b.claim("a.example", &forged).status, Status::Forbidden);
    // Signed by mallory's key, naming alice as the requester.
    let mut other = claim(MALLORY, BOB, ROOM);
    other.requesting_user = IdentifierUri::new(ALICE);
    other.signature = VLBytes::new(other.tbs().unwrap());
    assert_eq!(b.claim("a.example", &other).status, Status::Forbidden);
    assert_eq!(b.relay.stats().key_claims, 0);
    // The one KeyPackage is still there for a good claim.
    assert_eq!(
        b.claim_code("a.example", &claim(ALICE, BOB, ROOM)),
        KeyMaterialUserCode::Success
    );
    assert_eq!(b.relay.stats().key_claims, 1);
}

#[test]
fn the_requester_is_bound_to_the_asking_provider_or_the_rooms_hub() {
    let mut b = Node::target(3, |_| {});
    b.consent(ConsentOperation::Grant, ALICE, Some(ROOM));
    // m asks as alice for a room of a: neither alice's provider nor the room's hub.
    assert_eq!(
        b.claim("m.example", &claim(ALICE, BOB, ROOM)).status,
        Status::Forbidden
    );
    // Outside a room only the requester's own provider asks.
    assert_eq!(
        b.claim("m.example", &claim(ALICE, BOB, "")).status,
        Status::Forbidden
    );
    // m names a room of its own and claims as alice: it passes as that room's hub, but bob
    // consented to alice for a's room only.
    assert_eq!(
        b.claim_code("m.example", &claim(ALICE, BOB, MALLORY_ROOM)),
        KeyMaterialUserCode::NoConsentForThisRoom
    );
    // As its own user, which bob never consented to.
    assert_eq!(
        b.claim_code("m.example", &claim(MALLORY, BOB, MALLORY_ROOM)),
        KeyMaterialUserCode::NoConsent
    );
    assert_eq!(b.relay.stats().consent_denials, 2);
    // Nothing was drained: alice's provider and the room's hub each get one of the three.
    assert_eq!(
        b.claim_code("a.example", &claim(ALICE, BOB, ROOM)),
        KeyMaterialUserCode::Success
    );
    assert_eq!(
        b.claim_code("a.example", &claim(ALICE, BOB, ROOM)),
        KeyMaterialUserCode::Success
    );
    assert_eq!(
        b.claim_code("a.example", &claim(ALICE, BOB, ROOM)),
        KeyMaterialUserCode::Success
    );
    assert_eq!(
        b.claim_code("a.example", &claim(ALICE, BOB, ROOM)),
        KeyMaterialUserCode::NoCompatibleMaterial
    );
}

#[test]
fn mallory_cannot_drain_keypackages_past_her_rate() {
    let mut b = Node::target(2, |c| c.key_claims_per_minute = 5);
    for _ in 0..5 {
        assert_eq!(
            b.claim_code("m.example", &claim(MALLORY, BOB, MALLORY_ROOM)),
            KeyMaterialUserCode::NoConsent
        );
    }
    let r = b.claim("m.example", &claim(MALLORY, BOB, MALLORY_ROOM));
    assert_eq!(r.status, Status::TooManyRequests);
    let wait = r.retry_after.expect("Retry-After");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(12),
        "{wait:?}"
    );
    // a's share is its own.
    b.consent(ConsentOperation::Grant, ALICE, None);
    assert_eq!(
        b.claim_code("a.example", &claim(ALICE, BOB, ROOM)),
        KeyMaterialUserCode::Success
    );
    // One more for m once a fifth of the minute has passed, not two.
    b.now.mono += Duration::from_secs(12);
    assert_eq!(
        b.claim_code("m.example", &claim(MALLORY, BOB, MALLORY_ROOM)),
        KeyMaterialUserCode::NoConsent
    );
    assert_eq!(
        b.claim("m.example", &claim(MALLORY, BOB, MALLORY_ROOM))
            .status,
        Status::TooManyRequests
    );
    let rejects = b.relay.stats().rejects[relay_core::RejectReason::RateLimited as usize];
    assert_eq!(rejects, 2);
}

#[test]
fn consent_global_per_room_and_revoked_the_later_decision_wins() {
    let mut b = Node::target(8, |_| {});
    let code = |b: &mut Node, room: &str| b.claim_code("a.example", &claim(ALICE, BOB, room));
    assert_eq!(code(&mut b, ROOM), KeyMaterialUserCode::NoConsent);
    // For one room.
    b.consent(ConsentOperation::Grant, ALICE, Some(ROOM));
    assert_eq!(code(&mut b, ROOM), KeyMaterialUserCode::Success);
    assert_eq!(
        code(&mut b, OTHER_ROOM),
        KeyMaterialUserCode::NoConsentForThisRoom
    );
    // Consent for a room is not consent outside rooms.
    assert_eq!(code(&mut b, ""), KeyMaterialUserCode::NoConsent);
    // For every room.
    b.consent(ConsentOperation::Grant, ALICE, None);
    assert_eq!(code(&mut b, OTHER_ROOM), KeyMaterialUserCode::Success);
    // Revoked for one room after the global grant: that room only.
    b.consent(ConsentOperation::Revoke, ALICE, Some(OTHER_ROOM));
    assert_eq!(
        code(&mut b, OTHER_ROOM),
        KeyMaterialUserCode::NoConsentForThisRoom
    );
    assert_eq!(code(&mut b, ROOM), KeyMaterialUserCode::Success);
    // Revoked globally after the room grant: everywhere.
    b.consent(ConsentOperation::Revoke, ALICE, None);
    assert_eq!(code(&mut b, ROOM), KeyMaterialUserCode::NoConsent);
    // Granted for one room again, after the global revoke: that room.
    b.consent(ConsentOperation::Grant, ALICE, Some(ROOM));
    assert_eq!(code(&mut b, ROOM), KeyMaterialUserCode::Success);
    assert_eq!(
        code(&mut b, OTHER_ROOM),
        KeyMaterialUserCode::NoConsentForThisRoom
    );
    // A peer's new request for the scope does not undo bob's decision.
    let request = ConsentEntry {
        operation: ConsentOperation::Request,
        requester_uri: IdentifierUri::new(ALICE),
        target_uri: IdentifierUri::new(BOB),
        room_id: Some(IdentifierUri::new(ROOM)),
        client_key_packages: Vec::new(),
        consent_extensions: VLBytes::new(Vec::new()),
    };
    let (r, _) = b.peer(
        "a.example",
        Endpoint::RequestConsent,
        BOB,
        request.encode().unwrap(),
    );
    assert_eq!(r.unwrap().status, Status::Created);
    assert_eq!(code(&mut b, ROOM), KeyMaterialUserCode::Success);
    // A room grant, then a global revoke: the revoke is later, so nowhere.
    const THIRD: &str = "mimi://a.example/r/three";
    b.consent(ConsentOperation::Grant, ALICE, Some(THIRD));
    assert_eq!(code(&mut b, THIRD), KeyMaterialUserCode::Success);
    b.consent(ConsentOperation::Revoke, ALICE, None);
    assert_eq!(code(&mut b, THIRD), KeyMaterialUserCode::NoConsent);
    assert_eq!(code(&mut b, ROOM), KeyMaterialUserCode::NoConsent);
    // The order of decisions survives a restart.
    let mut b = b.restart();
    assert_eq!(code(&mut b, THIRD), KeyMaterialUserCode::NoConsent);
    b.consent(ConsentOperation::Grant, ALICE, Some(ROOM));
    assert_eq!(code(&mut b, ROOM), KeyMaterialUserCode::Success);
    assert_eq!(
        code(&mut b, THIRD),
        KeyMaterialUserCode::NoConsentForThisRoom
    );
    assert_eq!(code(&mut b, ""), KeyMaterialUserCode::NoConsent);
}

#[test]
fn a_peer_cannot_grant_consent_for_a_local_user() {
    let mut b = Node::target(1, |_| {});
    // An updateConsent from a (alice's provider) naming bob as the one who grants: it is
    // a's notice about its own users only.
    let entry = ConsentEntry {
        operation: ConsentOperation::Grant,
        requester_uri: IdentifierUri::new(ALICE),
        target_uri: IdentifierUri::new(BOB),
        room_id: None,
        client_key_packages: Vec::new(),
        consent_extensions: VLBytes::new(Vec::new()),
    };
    let (r, _) = b.peer(
        "a.example",
        Endpoint::UpdateConsent,
        ALICE,
        entry.encode().unwrap(),
    );
    assert_eq!(r.unwrap().status, Status::Forbidden);
    assert_eq!(
        b.claim_code("a.example", &claim(ALICE, BOB, ROOM)),
        KeyMaterialUserCode::NoConsent
    );
}

#[test]
fn expired_and_not_yet_valid_key_packages_are_never_handed_out() {
    let mut b = Node::new("b.example", |_| {});
    let now = b.now;
    let client = "mimi://b.example/d/1";
    let publish = |b: &mut Node, kp: Bytes| {
        b.relay
            .handle_publish_key_packages(now, &mut b.store, BOB, client, vec![kp])
    };
    assert!(publish(&mut b, key_package(1, T0 - 100, T0 - 1)).is_err());
    assert!(publish(&mut b, key_package(2, T0 + 10, T0 + 100)).is_err());
    assert_eq!(publish(&mut b, key_package(3, T0 - 10, T0 + 100)), Ok(1));
    b.consent(ConsentOperation::Grant, ALICE, None);
    // Before its not_before (the core's clock, not the system's): held back, kept.
    b.now.unix_ms = (T0 - 11) * 1000;
    assert_eq!(
        b.claim_code("a.example", &claim(ALICE, BOB, ROOM)),
        KeyMaterialUserCode::NoCompatibleMaterial
    );
    // Inside its lifetime: handed out.
    b.now.unix_ms = (T0 + 100) * 1000;
    let r = b.claim("a.example", &claim(ALICE, BOB, ROOM));
    let resp = KeyMaterialResponse::decode(&r.body).unwrap();
    assert_eq!(resp.user_status, KeyMaterialUserCode::Success);
    assert!(matches!(
        &resp.clients[0].status,
        ClientKeyMaterialStatus::Success { key_package } if key_package.lifetime().unwrap().not_after == T0 + 100
    ));
    // Past its not_after: dropped, for good (also after a restart).
    assert_eq!(publish(&mut b, key_package(4, T0 - 10, T0 + 100)), Ok(1));
    b.now.unix_ms = (T0 + 101) * 1000;
    let r = b.claim("a.example", &claim(ALICE, BOB, ROOM));
    let resp = KeyMaterialResponse::decode(&r.body).unwrap();
    assert_eq!(resp.user_status, KeyMaterialUserCode::NoCompatibleMaterial);
    assert_eq!(
        resp.clients[0].status,
        ClientKeyMaterialStatus::KeyMaterialExhausted
    );
    // After a restart, even at a time inside its lifetime, it is not back (bob has no
    // KeyPackage left at all, so the user is unknown until he publishes again).
    let mut b = b.restart();
    b.now.unix_ms = (T0 + 50) * 1000;
    assert_eq!(
        b.claim_code("a.example", &claim(ALICE, BOB, ROOM)),
        KeyMaterialUserCode::UserUnknown
    );
}

#[test]
fn the_hub_forwards_only_a_members_claim_from_its_own_provider() {
    let mut a = Node::new("a.example", |_| {});
    let room = ROOM.parse().unwrap();
    a.relay
        .handle_create_mls_room(&mut a.store, room, b"gi", ALICE.as_bytes())
        .unwrap();
    // alice, a member, through her own provider (a local client): forwarded to b.
    let (r, sent) = a.client(
        Endpoint::KeyMaterial,
        BOB,
        claim(ALICE, BOB, ROOM).encode().unwrap(),
    );
    assert!(r.is_none(), "{r:?}");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].dest, d("b.example"));
    // A local client naming another provider's user as requester.
    let (r, _) = a.client(
        Endpoint::KeyMaterial,
        BOB,
        claim(MALLORY, BOB, ROOM).encode().unwrap(),
    );
    assert_eq!(r.unwrap().status, Status::Forbidden);
    // A local non-member.
    let eve = "mimi://a.example/u/eve";
    let (r, _) = a.client(
        Endpoint::KeyMaterial,
        BOB,
        claim(eve, BOB, ROOM).encode().unwrap(),
    );
    assert_eq!(r.unwrap().status, Status::Forbidden);
    // m takes no part in the room.
    let (r, sent) = a.peer(
        "m.example",
        Endpoint::KeyMaterial,
        BOB,
        claim(MALLORY, BOB, ROOM).encode().unwrap(),
    );
    assert_eq!(r.unwrap().status, Status::Forbidden);
    assert!(sent.is_empty());
    // A room a does not host, from a peer: no forwarding for others.
    let (r, sent) = a.peer(
        "m.example",
        Endpoint::KeyMaterial,
        BOB,
        claim(MALLORY, BOB, "mimi://c.example/r/x")
            .encode()
            .unwrap(),
    );
    assert_eq!(r.unwrap().status, Status::Forbidden);
    assert!(sent.is_empty());
}

#[test]
fn identifier_queries_are_rate_limited_per_peer() {
    let mut b = Node::new("b.example", |c| c.identifier_queries_per_minute = 2);
    b.relay
        .handle_directory_entry(&mut b.store, SearchIdentifierType::Handle, "bob", BOB)
        .unwrap();
    let query = IdentifierRequest {
        query_elements: vec![mimi_wire::proto::QueryElement {
            search_type: SearchIdentifierType::Handle,
            field_name: None,
            search_value: VLBytes::new(b"bob".to_vec()),
        }],
        id_request_extensions: VLBytes::new(Vec::new()),
    }
    .encode()
    .unwrap();
    let ask = |b: &mut Node, from: &str| {
        b.peer(from, Endpoint::IdentifierQuery, "b.example", query.clone())
            .0
            .unwrap()
    };
    assert_eq!(ask(&mut b, "m.example").status, Status::Ok);
    assert_eq!(ask(&mut b, "m.example").status, Status::Ok);
    let r = ask(&mut b, "m.example");
    assert_eq!(r.status, Status::TooManyRequests);
    assert!(r.retry_after.is_some());
    assert_eq!(ask(&mut b, "c.example").status, Status::Ok);
    b.now.mono += Duration::from_secs(30);
    assert_eq!(ask(&mut b, "m.example").status, Status::Ok);
    assert_eq!(ask(&mut b, "m.example").status, Status::TooManyRequests);
}
