//! The validator on commits that change the room state in the app_data_dictionary
//! (AppDataUpdate), on SelfRemove, and the mimi-wire reader on what openmls encodes.

use mimi_wire::mls::MlsMessageView;
use mimi_wire::proto::room::{ParticipantListData, ParticipantListUpdate, component};
use mimi_wire::proto::room_defaults::{self, OWNER_ROLE, REGULAR_ROLE};
use openmls::component::ComponentData;
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use relay_core::mls::{MlsReject, MlsValidator};
use relay_mls::OpenMlsValidator;

mod common;
use common::{CS, Client, caps};

const ALICE: &str = "mimi://a.example/u/alice";
const BOB: &str = "mimi://b.example/u/bob";
const ROOM: &str = "mimi://a.example/r/app";

fn client(user: &str) -> Client {
    Client::new(user)
}

fn key_package(c: &Client) -> KeyPackage {
    KeyPackage::builder()
        .leaf_node_capabilities(caps())
        .build(CS, &c.provider, &c.signer, c.cred.clone())
        .expect("key package")
        .key_package()
        .clone()
}

fn create(alice: &Client) -> (MlsGroup, OpenMlsValidator) {
    let mut dict = AppDataDictionary::new();
    for (id, data) in room_defaults::initial_app_data(ALICE).expect("defaults") {
        dict.insert(id, data);
    }
    let extensions = Extensions::from_vec(vec![
        Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
            &[ExtensionType::AppDataDictionary],
            &[ProposalType::AppDataUpdate, ProposalType::SelfRemove],
            &[],
        )),
        Extension::AppDataDictionary(AppDataDictionaryExtension::new(dict)),
    ])
    .expect("extensions");
    let cfg = MlsGroupCreateConfig::builder()
        .ciphersuite(CS)
        .capabilities(caps())
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .with_group_context_extensions(extensions)
        .build();
    let group =
        MlsGroup::new(&alice.provider, &alice.signer, &cfg, alice.cred.clone()).expect("group");
    let gi = group
        .export_group_info(alice.provider.crypto(), &alice.signer, false)
        .expect("group info")
        .to_bytes()
        .expect("bytes");
    let tree = group
        .export_ratchet_tree()
        .tls_serialize_detached()
        .expect("tree");
    let mut v = OpenMlsValidator::new();
    let state = v.create(ROOM, &gi, &tree).expect("create");
    assert_eq!(
        state.app_data.keys().copied().collect::<Vec<_>>(),
        vec![
            component::PARTICIPANT_LIST,
            component::ROLES_LIST,
            component::BASE_ROOM_POLICY
        ]
    );
    (group, v)
}

/// Alice's commit of `proposals` with the dictionary she computes from `update` (her view;
/// the hub computes its own).
fn commit(
    alice: &Client,
    group: &mut MlsGroup,
    adds: Vec<KeyPackage>,
    update: &ParticipantListUpdate,
    claimed_after: Option<Vec<u8>>,
) -> (MlsMessageOut, Option<Welcome>) {
    let mut stage = group
        .commit_builder()
        .propose_adds(adds)
        .add_proposal(Proposal::AppDataUpdate(Box::new(
            AppDataUpdateProposal::update(
                component::PARTICIPANT_LIST,
                update.encode().expect("encode"),
            ),
        )))
        .load_psks(alice.provider.storage())
        .expect("psks");
    let mut updater = stage.app_data_dictionary_updater();
    let after = claimed_after.unwrap_or_else(|| {
        let before = ParticipantListData::decode(
            updater
                .old_value(component::PARTICIPANT_LIST)
                .expect("listed"),
        )
        .expect("list");
        before
            .apply(update)
            .expect("applies")
            .encode()
            .expect("encode")
    });
    updater.set(ComponentData::from_parts(
        component::PARTICIPANT_LIST,
        after.into(),
    ));
    stage.with_app_data_dictionary_updates(updater.changes());
    let bundle = stage
        .build(
            alice.provider.rand(),
            alice.provider.crypto(),
            &alice.signer,
            |_| true,
        )
        .expect("build")
        .stage_commit(&alice.provider)
        .expect("stage");
    let (commit, welcome, _) = bundle.into_contents();
    (commit, welcome)
}

fn list(bytes: &[u8]) -> ParticipantListData {
    ParticipantListData::decode(bytes).expect("participant list")
}

#[test]
fn add_with_participant_list_update_reports_the_change() {
    let alice = client(ALICE);
    let bob = client(BOB);
    let (mut group, mut v) = create(&alice);
    let update = room_defaults::add_participants([BOB], REGULAR_ROLE);
    let (c, _) = commit(&alice, &mut group, vec![key_package(&bob)], &update, None);
    let bytes = c.to_bytes().expect("bytes");
    // Our reader delimits what openmls encodes, strictly.
    assert_eq!(
        MlsMessageView::parse(&bytes).expect("delimited").bytes,
        &bytes[..]
    );

    let effect = v.stage(ROOM, &bytes).expect("valid");
    assert!(effect.is_commit);
    assert_eq!(effect.added, vec![BOB.to_owned()]);
    assert_eq!(effect.members_after, vec![ALICE.to_owned(), BOB.to_owned()]);
    assert_eq!(effect.app_data.len(), 1);
    let change = &effect.app_data[0];
    assert_eq!(change.component, component::PARTICIPANT_LIST);
    let before = list(change.before.as_deref().expect("before"));
    let after = list(change.after.as_deref().expect("after"));
    assert_eq!(before.role_of(BOB), 0);
    assert_eq!(after.role_of(BOB), REGULAR_ROLE);
    assert_eq!(after.role_of(ALICE), OWNER_ROLE);

    let state = v.merge(ROOM).expect("merge");
    assert_eq!(state.epoch, 1);
    assert_eq!(state.members, vec![ALICE.to_owned(), BOB.to_owned()]);
    assert_eq!(
        list(&state.app_data[&component::PARTICIPANT_LIST]).role_of(BOB),
        REGULAR_ROLE
    );
    // The hub's dictionary is the one the committer computed.
    group.merge_pending_commit(&alice.provider).expect("merge");
    assert_eq!(
        group
            .extensions()
            .app_data_dictionary()
            .and_then(|d| d.dictionary().get(&component::PARTICIPANT_LIST))
            .map(<[u8]>::to_vec),
        state.app_data.get(&component::PARTICIPANT_LIST).cloned()
    );
    // And a restarted validator has the same room state.
    let mut again = OpenMlsValidator::new();
    assert_eq!(
        again.restore(ROOM, &state.state).expect("restore").app_data,
        state.app_data
    );
}

#[test]
fn a_participant_list_update_that_does_not_apply_is_refused() {
    let alice = client(ALICE);
    let (mut group, mut v) = create(&alice);
    // Removes index 5 of a one-entry list; alice claims some result anyway.
    let update = ParticipantListUpdate {
        removed_indices: vec![5],
        ..ParticipantListUpdate::default()
    };
    let claimed = room_defaults::initial_participants(ALICE)
        .encode()
        .expect("encode");
    let (c, _) = commit(&alice, &mut group, Vec::new(), &update, Some(claimed));
    let r = v.stage(ROOM, &c.to_bytes().expect("bytes"));
    assert!(
        matches!(&r, Err(MlsReject::Invalid(e)) if e.contains("participant list")),
        "{r:?}"
    );
    // Nothing is staged; the room is unchanged.
    assert!(v.merge(ROOM).is_err());
    // Adding a user listed already does not apply either.
    let update = room_defaults::add_participants([ALICE], REGULAR_ROLE);
    group
        .clear_pending_commit(alice.provider.storage())
        .expect("clear");
    let claimed = room_defaults::initial_participants(ALICE)
        .encode()
        .expect("encode");
    let (c, _) = commit(&alice, &mut group, Vec::new(), &update, Some(claimed));
    assert!(matches!(
        v.stage(ROOM, &c.to_bytes().expect("bytes")),
        Err(MlsReject::Invalid(_))
    ));
}

#[test]
fn self_remove_proposal_and_its_commit_validate() {
    let alice = client(ALICE);
    let bob = client(BOB);
    let (mut group, mut v) = create(&alice);
    let update = room_defaults::add_participants([BOB], REGULAR_ROLE);
    let (c, welcome) = commit(&alice, &mut group, vec![key_package(&bob)], &update, None);
    v.stage(ROOM, &c.to_bytes().expect("bytes")).expect("add");
    let added = v.merge(ROOM).expect("merge");
    group.merge_pending_commit(&alice.provider).expect("merge");
    let join = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let mut bob_group =
        StagedWelcome::new_from_welcome(&bob.provider, &join, welcome.expect("welcome"), None)
            .and_then(|s| s.into_group(&bob.provider))
            .expect("bob joins");

    // Bob leaves: a SelfRemove proposal, which the hub accepts and queues.
    let leave = bob_group
        .leave_group_via_self_remove(&bob.provider, &bob.signer)
        .expect("self remove");
    let leave_bytes = leave.to_bytes().expect("bytes");
    assert!(MlsMessageView::parse(&leave_bytes).is_ok());
    let effect = v.stage(ROOM, &leave_bytes).expect("valid proposal");
    assert!(!effect.is_commit);
    assert_eq!(effect.self_removed, vec![BOB.to_owned()]);
    v.merge(ROOM).expect("queued");

    // Alice commits it by reference, with the participant-list removal.
    let processed = group
        .process_message(
            &alice.provider,
            MlsMessageIn::from(leave)
                .try_into_protocol_message()
                .expect("protocol message"),
        )
        .expect("alice reads the proposal");
    let ProcessedMessageContent::ProposalMessage(p) = processed.into_content() else {
        panic!("not a proposal");
    };
    group
        .store_pending_proposal(alice.provider.storage(), *p)
        .expect("store");
    let now = list(&added.app_data[&component::PARTICIPANT_LIST]);
    let update = room_defaults::remove_participant(&now, BOB).expect("bob listed");
    let (c, _) = commit(&alice, &mut group, Vec::new(), &update, None);
    let effect = v
        .stage(ROOM, &c.to_bytes().expect("bytes"))
        .expect("valid commit");
    assert_eq!(effect.self_removed, vec![BOB.to_owned()]);
    assert_eq!(effect.members_after, vec![ALICE.to_owned()]);
    let state = v.merge(ROOM).expect("merge");
    assert_eq!(state.members, vec![ALICE.to_owned()]);
    assert_eq!(
        list(&state.app_data[&component::PARTICIPANT_LIST]).role_of(BOB),
        0
    );
}

#[test]
fn extension_proposal_encodings_match_the_reader() {
    // openmls's encodings of the extension proposals, delimited by our reader inside a
    // larger buffer.
    for p in [
        Proposal::AppDataUpdate(Box::new(AppDataUpdateProposal::update(0x22, vec![1, 2, 3]))),
        Proposal::AppDataUpdate(Box::new(AppDataUpdateProposal::remove(0x25))),
        Proposal::AppEphemeral(Box::new(AppEphemeralProposal::new(0x20, vec![9; 70]))),
        Proposal::SelfRemove,
    ] {
        let body = p.tls_serialize_detached().expect("encode");
        // A member's PublicMessage proposal around it, by hand (signature and tag filler).
        let mut m = vec![0, 1, 0, 1, 1, b'g'];
        m.extend_from_slice(&7u64.to_be_bytes());
        m.extend_from_slice(&[1, 0, 0, 0, 0, 0, 2]);
        m.extend_from_slice(&body);
        m.extend_from_slice(&[2, 0xaa, 0xbb, 1, 0xcc]);
        let mut buf = m.clone();
        buf.extend_from_slice(b"rest");
        let (_, used) = MlsMessageView::parse_prefix(&buf).expect("delimited");
        assert_eq!(used, m.len(), "{p:?}");
    }
}
