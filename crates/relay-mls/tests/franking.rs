//! Message franking end to end (protocol-06 §5.4.1, §5.9): real openmls clients, the routing
//! core with the openmls validator as the hub. alice's message is franked by the hub, the
//! Frank travels beside the unchanged MLS bytes, bob verifies it, and an abuse report is
//! accepted with the frank and refused with a tampered one.

use std::time::Instant;

use bytes::Bytes;
use mimi_wire::content::MimiContent;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::proto::room::{SafeAad, component};
use mimi_wire::proto::{
    AbuseReport, AbusiveMessage, FanoutExtra, FanoutMessage, Frank, GroupInfoOption,
    HandshakeBundle, IdentifierUri, MlsMessage, RatchetTreeOption, SubmitMessageRequest,
    SubmitMessageResponse, SubmitStatus, UpdateOutcome, UpdateRequest, UpdateRoomResponse, VLBytes,
};
use mimi_wire::uri::RoomId;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::RustCrypto;
use relay_core::{
    MemStore, Now, Output, Relay, RelayConfig, ReplyToken, Request, Response, Status, Store,
    TransportKind,
};
use relay_mls::{OpenMlsValidator, app_data_component, frank};

mod common;
use common::{CS, Client, d};

const ROOM: &str = "mimi://a.example/r/franked";
const ALICE: &str = "mimi://a.example/u/alice";
const BOB: &str = "mimi://b.example/u/bob";

/// Leaves support the app_data_dictionary extension (draft-ietf-mls-extensions).
fn caps() -> Capabilities {
    Capabilities::new(
        None,
        None,
        Some(&[ExtensionType::AppDataDictionary]),
        None,
        None,
    )
}

/// The GroupContext's app_data_dictionary with the hub as franking agent.
fn franking_extensions(hub_pk: &[u8]) -> Extensions<GroupContext> {
    let agent = frank::franking_agent_data(hub_pk, "mimi://a.example").expect("agent");
    let mut dict = AppDataDictionary::new();
    dict.insert(component::FRANKING_AGENT, agent);
    Extensions::single(Extension::AppDataDictionary(
        AppDataDictionaryExtension::new(dict),
    ))
    .expect("extensions")
}

struct Hub {
    relay: Relay,
    store: MemStore,
    now: Now,
    token: u64,
}

impl Hub {
    fn ask(&mut self, from: &str, endpoint: Endpoint, body: Vec<u8>) -> (Response, Vec<Bytes>) {
        self.token += 1;
        let token = ReplyToken(self.token);
        let req = Request {
            from: d(from),
            transport: TransportKind::Quic,
            endpoint,
            target: ROOM.into(),
            seq: None,
            lineage: None,
            body: Bytes::from(body),
        };
        self.relay
            .handle_request(self.now, &mut self.store, token, req);
        let (mut reply, mut notifies) = (None, Vec::new());
        // The follower takes every /notify (with our sequence extension), so queued ones
        // follow.
        loop {
            let mut sent = Vec::new();
            while let Some(o) = self.relay.poll_output() {
                match o {
                    Output::Reply { token: t, response } if t == token => reply = Some(response),
                    Output::Transmit(t) if t.endpoint == Endpoint::Notify => sent.push(t),
                    _ => {}
                }
            }
            if sent.is_empty() {
                break;
            }
            for t in sent {
                let mut r = Response::new(Status::Created, Bytes::new());
                r.next_seq = t.seq.map(|s| s + t.body.len() as u64);
                self.relay
                    .handle_outcome(self.now, &mut self.store, t.id, Ok(r));
                notifies.extend(t.body);
            }
        }
        (reply.expect("a reply"), notifies)
    }
}

#[test]
fn a_franked_message_verifies_at_the_receiver_and_backs_an_abuse_report() {
    // The hub: the core with the openmls validator and its persistent hub secret.
    let cfg = RelayConfig::new(d("a.example")).with_route(d("b.example"), TransportKind::Quic);
    let now = Now {
        mono: Instant::now(),
        unix_ms: 1_700_000_000_000,
    };
    let mut store = MemStore::new();
    let snap = store.load().expect("load");
    let records = snap.records.clone();
    let mut relay = Relay::new(cfg, snap, now);
    relay.set_mls_validator(Box::new(OpenMlsValidator::for_hub("a.example")), &records);
    relay.handle_hub_secret(&mut store, &records);
    let hub_pk = relay.hub_signature_public_key().expect("hub key");
    let mut hub = Hub {
        relay,
        store,
        now,
        token: 0,
    };

    // alice makes the group with the hub as franking agent and adds bob.
    let (alice, bob) = (Client::new(ALICE), Client::new(BOB));
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CS)
        .capabilities(caps())
        .with_group_context_extensions(franking_extensions(&hub_pk))
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let mut ga = MlsGroup::new_with_group_id(
        &alice.provider,
        &alice.signer,
        &config,
        GroupId::from_slice(ROOM.as_bytes()),
        alice.cred.clone(),
    )
    .expect("group");
    // The hub hosts the room from alice's GroupInfo and tree (she is its only member).
    let gi = ga
        .export_group_info(alice.provider.crypto(), &alice.signer, false)
        .expect("group info")
        .to_bytes()
        .expect("group info bytes");
    let tree = ga
        .export_ratchet_tree()
        .tls_serialize_detached()
        .expect("tree");
    hub.relay
        .handle_create_mls_room(
            &mut hub.store,
            ROOM.parse::<RoomId>().expect("room"),
            &gi,
            &tree,
        )
        .expect("room at the hub");

    let kp = KeyPackage::builder()
        .leaf_node_capabilities(caps())
        .build(CS, &bob.provider, &bob.signer, bob.cred.clone())
        .expect("key package");
    let (commit, welcome, gi) = ga
        .add_members(&alice.provider, &alice.signer, &[kp.key_package().clone()])
        .expect("add bob");
    // The add goes through the hub's /update, as a PublicMessage commit with the Welcome.
    let update = UpdateRequest {
        bundle: HandshakeBundle::Commit {
            commit: MlsMessage::from_bytes(commit.to_bytes().expect("commit")).expect("commit"),
            welcome: Some(
                mimi_wire::proto::Welcome::from_bytes(
                    welcome.to_bytes().expect("welcome")[4..].to_vec(),
                )
                .expect("welcome"),
            ),
            group_info_option: GroupInfoOption::Full(
                mimi_wire::proto::GroupInfo::from_bytes(
                    gi.expect("group info")
                        .tls_serialize_detached()
                        .expect("gi"),
                )
                .expect("gi"),
            ),
            ratchet_tree_option: RatchetTreeOption::OutOfBand {
                tree_signature: VLBytes::new(Vec::new()),
            },
        },
    };
    let (r, _) = hub.ask(
        "a.example",
        Endpoint::Update,
        update.encode().expect("update"),
    );
    let outcome = UpdateRoomResponse::decode(&r.body)
        .expect("update response")
        .outcome;
    assert!(
        matches!(outcome, UpdateOutcome::Success { .. }),
        "{outcome:?}"
    );
    ga.merge_pending_commit(&alice.provider).expect("merge");
    let welcome = match MlsMessageIn::tls_deserialize_exact(
        welcome.tls_serialize_detached().expect("welcome"),
    )
    .expect("welcome in")
    .extract()
    {
        MlsMessageBodyIn::Welcome(w) => w,
        _ => panic!("not a welcome"),
    };
    let join = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let mut gb = StagedWelcome::new_from_welcome(&bob.provider, &join, welcome, None)
        .and_then(|s| s.into_group(&bob.provider))
        .expect("bob joins");

    // alice sends MIMI content with its franking tag in the SafeAAD.
    let crypto = RustCrypto::default();
    let salt = [0x5a; 16];
    let content = MimiContent::markdown(salt, "hello bob")
        .encode()
        .expect("content");
    let tag = frank::franking_tag(&crypto, &salt, &content).expect("tag");
    ga.set_aad(SafeAad::frank(tag).encode().expect("aad"));
    let sent = ga
        .create_message(&alice.provider, &alice.signer, &content)
        .expect("message")
        .to_bytes()
        .expect("message bytes");
    let body = SubmitMessageRequest::mls10(sent.clone(), ALICE)
        .expect("request")
        .encode()
        .expect("request bytes");
    let (r, notifies) = hub.ask("a.example", Endpoint::SubmitMessage, body);
    assert_eq!(r.status, Status::Ok);
    let SubmitStatus::Accepted {
        accepted_timestamp,
        frank: Some(franked),
    } = SubmitMessageResponse::decode(&r.body)
        .expect("response")
        .status
    else {
        panic!("accepted without a frank")
    };
    assert_eq!(hub.relay.stats().franks_issued, 1);

    // The fanout to bob's provider: the exact MLS bytes, the same Frank beside them.
    assert_eq!(notifies.len(), 1, "one /notify to b.example");
    let fanout = FanoutMessage::decode(&notifies[0]).expect("fanout");
    assert_eq!(fanout.message.as_bytes(), &sent[..]);
    assert_eq!(fanout.timestamp, accepted_timestamp);
    let FanoutExtra::Application {
        frank: Some(fanned),
    } = &fanout.extra
    else {
        panic!("fanout without a frank: {:?}", fanout.extra)
    };
    assert_eq!(fanned, &franked);

    // bob decrypts, and verifies the frank under the franking agent of his GroupContext.
    let msg = MlsMessageIn::tls_deserialize_exact(fanout.message.as_bytes()).expect("mls");
    let pm = gb
        .process_message(
            &bob.provider,
            msg.try_into_protocol_message().expect("protocol message"),
        )
        .expect("bob decrypts");
    let aad_tag = SafeAad::franking_tag(pm.aad()).expect("frank_aad in the AAD");
    let ProcessedMessageContent::ApplicationMessage(app) = pm.into_content() else {
        panic!("not an application message")
    };
    let received = app.into_bytes();
    assert_eq!(received, content);
    let agent = mimi_wire::proto::room::FrankingAgentData::decode(
        &app_data_component(gb.extensions(), component::FRANKING_AGENT).expect("franking_agent"),
    )
    .expect("agent data");
    let key = agent.franking_signature_key.as_slice();
    let ctx = frank::server_franking_context(ALICE, ROOM, accepted_timestamp).expect("context");
    assert_eq!(
        frank::verify_frank(&crypto, key, fanned, &aad_tag, &received, &ctx),
        Ok(())
    );
    // A follower that moved the timestamp is caught.
    let moved =
        frank::server_franking_context(ALICE, ROOM, accepted_timestamp + 1).expect("context");
    assert_eq!(
        frank::verify_frank(&crypto, key, fanned, &aad_tag, &received, &moved),
        Err(frank::FrankError::Signature)
    );

    // bob reports the message: accepted with the hub's frank, refused with a tampered one.
    let report = |f: Frank| {
        AbuseReport {
            reporting_user: IdentifierUri::new(BOB),
            alleged_abuser_uri: IdentifierUri::new(ALICE),
            reason_code: 0,
            note: VLBytes::new(b"spam".to_vec()),
            messages: vec![AbusiveMessage {
                message_content: VLBytes::new(received.clone()),
                frank: f,
                accepted_timestamp,
            }],
            abuse_extensions: VLBytes::new(Vec::new()),
        }
        .encode()
        .expect("report")
    };
    let mut tampered = franked.clone();
    tampered.server_frank[31] ^= 0x80;
    let (r, _) = hub.ask("b.example", Endpoint::ReportAbuse, report(tampered));
    assert_eq!(r.status, Status::Other(422), "a tampered frank is refused");
    let (r, _) = hub.ask("b.example", Endpoint::ReportAbuse, report(franked.clone()));
    assert_eq!(r.status, Status::Created, "the hub's own frank is accepted");
    let s = hub.relay.stats();
    assert_eq!((s.franks_verified, s.franks_refused), (1, 1));
    assert_eq!(s.rejects[relay_core::RejectReason::BadFrank as usize], 1);
}

/// A room the validator does not host is not franked.
#[test]
fn no_room_no_frank() {
    let mut v = OpenMlsValidator::for_hub("a.example");
    relay_core::mls::MlsValidator::set_hub_secret(&mut v, &[1; 32]);
    assert!(relay_core::mls::MlsValidator::frank(&v, ROOM, &[0; 32], ALICE, ROOM, 1).is_none());
}
