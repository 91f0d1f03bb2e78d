//! Joins by external commit under a preauth_list (draft-ietf-mimi-room-policy §4, §8.1.1),
//! through the routing core with the openmls validator as the hub: the room preauthorizes
//! every user of b.example as a regular participant. dave (of b) lists himself in his
//! external commit and is in; as owner he is refused; erin (of b) joining without listing
//! herself is refused; carol (of c, not preauthorized) is refused before any MLS work. Then
//! a role without canSendMessage keeps a member from submitting.

use std::time::Instant;

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::proto::room::{ParticipantListUpdate, component};
use mimi_wire::proto::room_defaults::{self, OWNER_ROLE, REGULAR_ROLE};
use mimi_wire::proto::{
    GroupInfoOption, HandshakeBundle, MlsMessage, RatchetTreeOption, SubmitMessageRequest,
    SubmitMessageResponse, SubmitStatus, UpdateOutcome, UpdateRequest, UpdateRoomResponse, VLBytes,
};
use mimi_wire::uri::RoomId;
use openmls::messages::group_info::{GroupInfo, VerifiableGroupInfo};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use relay_core::{
    MemStore, Now, Output, Relay, RelayConfig, ReplyToken, Request, Response, Store, TransportKind,
};
use relay_mls::OpenMlsValidator;

mod common;
use common::{CS, Client, caps, d};

const ROOM: &str = "mimi://a.example/r/preauth";
const ALICE: &str = "mimi://a.example/u/alice";
const DAVE: &str = "mimi://b.example/u/dave";
const ERIN: &str = "mimi://b.example/u/erin";
const CAROL: &str = "mimi://c.example/u/carol";

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
            .with_route(d("c.example"), TransportKind::Quic);
        let now = Now {
            mono: Instant::now(),
            unix_ms: 1_700_000_000_000,
        };
        let mut store = MemStore::new();
        let snap = store.load().expect("load");
        let records = snap.records.clone();
        let mut relay = Relay::new(cfg, snap, now);
        relay.set_mls_validator(Box::new(OpenMlsValidator::for_hub("a.example")), &records);
        Hub {
            relay,
            store,
            now,
            token: 0,
        }
    }

    fn ask(&mut self, from: &str, endpoint: Endpoint, body: Vec<u8>) -> Response {
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
        let mut reply = None;
        while let Some(o) = self.relay.poll_output() {
            if let Output::Reply { token: t, response } = o
                && t == token
            {
                reply = Some(response);
            }
        }
        reply.expect("a reply")
    }

    /// An /update from `from` carrying `commit` (and its GroupInfo).
    fn update(
        &mut self,
        from: &str,
        commit: &MlsMessageOut,
        gi: Option<&GroupInfo>,
    ) -> UpdateRoomResponse {
        let req = UpdateRequest {
            bundle: HandshakeBundle::Commit {
                commit: MlsMessage::from_bytes(commit.to_bytes().expect("commit")).expect("commit"),
                welcome: None,
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
        let r = self.ask(from, Endpoint::Update, req.encode().expect("update"));
        UpdateRoomResponse::decode(&r.body).expect("update response")
    }

    fn participants(&self) -> Vec<(String, u32)> {
        self.relay
            .mls_participants(ROOM)
            .expect("an MLS room")
            .into_iter()
            .map(|p| (p.user, p.role_index))
            .collect()
    }
}

/// alice's group with the default room state and a preauth_list for b.example; the hub
/// hosts it.
fn create(hub: &mut Hub, alice: &Client) -> MlsGroup {
    let mut dict = AppDataDictionary::new();
    for (id, data) in room_defaults::initial_app_data(ALICE).expect("defaults") {
        dict.insert(id, data);
    }
    dict.insert(
        component::PREAUTH_LIST,
        room_defaults::preauth_domain("b.example")
            .encode()
            .expect("preauth"),
    );
    let extensions = Extensions::from_vec(vec![
        Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
            &[ExtensionType::AppDataDictionary],
            &[ProposalType::AppDataUpdate, ProposalType::SelfRemove],
            &[],
        )),
        Extension::AppDataDictionary(AppDataDictionaryExtension::new(dict)),
    ])
    .expect("extensions");
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CS)
        .capabilities(caps())
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .with_group_context_extensions(extensions)
        .build();
    let group = MlsGroup::new_with_group_id(
        &alice.provider,
        &alice.signer,
        &config,
        GroupId::from_slice(ROOM.as_bytes()),
        alice.cred.clone(),
    )
    .expect("group");
    let gi = group
        .export_group_info(alice.provider.crypto(), &alice.signer, false)
        .expect("group info")
        .to_bytes()
        .expect("group info bytes");
    let tree = group
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
    group
}

/// `group`'s GroupInfo (with its tree) as a joiner receives it.
fn group_info(group: &MlsGroup, member: &Client) -> VerifiableGroupInfo {
    let out = group
        .export_group_info(member.provider.crypto(), &member.signer, true)
        .expect("group info");
    match MlsMessageIn::tls_deserialize_exact(out.to_bytes().expect("bytes"))
        .expect("message in")
        .extract()
    {
        MlsMessageBodyIn::GroupInfo(gi) => gi,
        _ => panic!("not a GroupInfo"),
    }
}

/// `joiner`'s external commit, carrying `listing` (an AppDataUpdate of the participant
/// list) when given.
fn external_commit(
    joiner: &Client,
    gi: VerifiableGroupInfo,
    listing: Option<ParticipantListUpdate>,
) -> (MlsGroup, MlsMessageOut, Option<GroupInfo>) {
    let config = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let mut builder = MlsGroup::external_commit_builder()
        .with_config(config)
        .build_group(&joiner.provider, gi, joiner.cred.clone())
        .expect("external commit builder")
        .leaf_node_parameters(
            LeafNodeParameters::builder()
                .with_capabilities(caps())
                .build(),
        );
    if let Some(u) = listing {
        builder = builder.add_app_data_update_proposal(AppDataUpdateProposal::update(
            component::PARTICIPANT_LIST,
            u.encode().expect("listing"),
        ));
    }
    let mut stage = builder.load_psks(joiner.provider.storage()).expect("psks");
    let proposals: Vec<AppDataUpdateProposal> =
        stage.app_data_update_proposals().cloned().collect();
    if !proposals.is_empty() {
        let (updates, _) =
            relay_mls::resolve_app_data_updates(stage.app_data_dictionary_updater(), &proposals)
                .expect("the listing applies");
        stage.with_app_data_dictionary_updates(updates);
    }
    let (group, bundle) = stage
        .build(
            joiner.provider.rand(),
            joiner.provider.crypto(),
            &joiner.signer,
            |_| true,
        )
        .expect("build")
        .finalize(&joiner.provider)
        .expect("finalize");
    let (commit, _, gi) = bundle.into_contents();
    (group, commit, gi)
}

fn refusal(resp: &UpdateRoomResponse) -> &str {
    assert!(
        !matches!(resp.outcome, UpdateOutcome::Success { .. }),
        "accepted: {resp:?}"
    );
    &resp.error_description
}

#[test]
fn a_preauthorized_user_joins_by_an_external_commit_that_lists_it() {
    let mut hub = Hub::new();
    let alice = Client::new(ALICE);
    let ga = create(&mut hub, &alice);
    assert_eq!(hub.participants(), [(ALICE.to_owned(), OWNER_ROLE)]);

    // carol's provider is not preauthorized: refused before any MLS work.
    let carol = Client::new(CAROL);
    let (_, c, gi) = external_commit(
        &carol,
        group_info(&ga, &alice),
        Some(room_defaults::self_listing(CAROL, REGULAR_ROLE)),
    );
    let resp = hub.update("c.example", &c, gi.as_ref());
    assert!(refusal(&resp).contains("takes no part"), "{resp:?}");

    // dave, of b, may not list himself as owner: b's users are preauthorized as regular.
    let dave = Client::new(DAVE);
    let (_, c, gi) = external_commit(
        &dave,
        group_info(&ga, &alice),
        Some(room_defaults::self_listing(DAVE, OWNER_ROLE)),
    );
    let resp = hub.update("b.example", &c, gi.as_ref());
    assert!(refusal(&resp).contains("may not join"), "{resp:?}");

    // erin, of b too, joins without listing herself: the room's list must name her.
    let erin = Client::new(ERIN);
    let (_, c, gi) = external_commit(&erin, group_info(&ga, &alice), None);
    let resp = hub.update("b.example", &c, gi.as_ref());
    assert!(
        refusal(&resp).contains("not in the participant list"),
        "{resp:?}"
    );
    assert_eq!(hub.participants(), [(ALICE.to_owned(), OWNER_ROLE)]);

    // dave lists himself as regular: in.
    let (gd, c, gi) = external_commit(
        &dave,
        group_info(&ga, &alice),
        Some(room_defaults::self_listing(DAVE, REGULAR_ROLE)),
    );
    let resp = hub.update("b.example", &c, gi.as_ref());
    assert!(
        matches!(resp.outcome, UpdateOutcome::Success { .. }),
        "{resp:?}"
    );
    assert_eq!(
        hub.participants(),
        [
            (ALICE.to_owned(), OWNER_ROLE),
            (DAVE.to_owned(), REGULAR_ROLE)
        ]
    );
    assert_eq!(gd.epoch().as_u64(), 1);

    // dave, an active regular participant, may submit.
    let mut gd = gd;
    let mut ga = ga;
    process(&mut ga, &alice, &c);
    assert_eq!(submit(&mut hub, &mut gd, &dave, "b.example"), "accepted");

    // alice (owner: canChangeUserRole) takes canSendMessage from the regular role.
    let mut roles = room_defaults::default_roles();
    for r in roles
        .roles
        .iter_mut()
        .filter(|r| r.role_index == REGULAR_ROLE)
    {
        r.role_capabilities
            .retain(|c| *c != mimi_wire::proto::room::capability::SEND_MESSAGE);
    }
    let mut stage = ga
        .commit_builder()
        .add_proposal(Proposal::AppDataUpdate(Box::new(
            AppDataUpdateProposal::update(component::ROLES_LIST, roles.encode().expect("roles")),
        )))
        .load_psks(alice.provider.storage())
        .expect("psks");
    let proposals: Vec<AppDataUpdateProposal> =
        stage.app_data_update_proposals().cloned().collect();
    let (updates, _) =
        relay_mls::resolve_app_data_updates(stage.app_data_dictionary_updater(), &proposals)
            .expect("roles apply");
    stage.with_app_data_dictionary_updates(updates);
    let (c, _, gi) = stage
        .build(
            alice.provider.rand(),
            alice.provider.crypto(),
            &alice.signer,
            |_| true,
        )
        .expect("build")
        .stage_commit(&alice.provider)
        .expect("stage")
        .into_contents();
    let resp = hub.update("a.example", &c, gi.as_ref());
    assert!(
        matches!(resp.outcome, UpdateOutcome::Success { .. }),
        "{resp:?}"
    );
    ga.merge_pending_commit(&alice.provider).expect("merge");
    process(&mut gd, &dave, &c);
    assert_eq!((ga.epoch().as_u64(), gd.epoch().as_u64()), (2, 2));
    // Now dave may not send (room-policy §8.3); alice, the owner, still may.
    assert_eq!(submit(&mut hub, &mut gd, &dave, "b.example"), "notAllowed");
    assert_eq!(submit(&mut hub, &mut ga, &alice, "a.example"), "accepted");
}

/// `member` processes `commit` (resolving its AppDataUpdates as the hub does) and merges it.
fn process(group: &mut MlsGroup, member: &Client, commit: &MlsMessageOut) {
    let msg = MlsMessageIn::tls_deserialize_exact(commit.to_bytes().expect("bytes"))
        .expect("message in")
        .try_into_protocol_message()
        .expect("protocol message");
    let staged = match group
        .process_message(&member.provider, msg)
        .expect("process")
        .into_content()
    {
        ProcessedMessageContent::UnresolvedAppDataCommit(u) => {
            let (updates, _) = relay_mls::resolve_app_data_updates(
                group.app_data_dictionary_updater(),
                u.app_data_update_proposals(),
            )
            .expect("app data");
            group
                .stage_app_data_commit(&member.provider, *u, updates)
                .expect("stage")
        }
        ProcessedMessageContent::StagedCommitMessage(c) => *c,
        _ => panic!("not a commit"),
    };
    group
        .merge_staged_commit(&member.provider, staged)
        .expect("merge");
}

/// A message from `member` submitted by `provider`: the hub's answer.
fn submit(hub: &mut Hub, group: &mut MlsGroup, member: &Client, provider: &str) -> &'static str {
    let user = String::from_utf8_lossy(member.cred.credential.serialized_content()).into_owned();
    let sent = group
        .create_message(&member.provider, &member.signer, b"hello")
        .expect("message")
        .to_bytes()
        .expect("bytes");
    let body = SubmitMessageRequest::mls10(sent, &user)
        .expect("request")
        .encode()
        .expect("request bytes");
    let r = hub.ask(provider, Endpoint::SubmitMessage, body);
    match SubmitMessageResponse::decode(&r.body)
        .expect("submit response")
        .status
    {
        SubmitStatus::Accepted { .. } => "accepted",
        SubmitStatus::NotAllowed => "notAllowed",
        SubmitStatus::EpochTooOld { .. } => "epochTooOld",
    }
}
