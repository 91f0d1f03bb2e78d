//! MLS rooms end to end through three in-process nodes on loopback: the demo scenario over
//! HTTPS and QUIC, an epoch race between two followers, a reused KeyPackage, and a refused
//! commit that must not break the room for the others, and a join by external commit with
//! the GroupInfo fetched from the hub (/groupInfo).
#![allow(clippy::unwrap_used)]

use mimi_client::scenario;
use mimi_client::{Event, MlsClient, SubmitResult, UpdateResult};
use mimi_lab::demo;
use mimi_wire::proto::GroupInfoCode;
use mimi_wire::uri::RoomId;
use relay_node::{Node, NodeConfig};

const ALICE: &str = "mimi://a.example/u/alice";
const BOB: &str = "mimi://b.example/u/bob";
const CAROL: &str = "mimi://c.example/u/carol";
const DAVE: &str = "mimi://b.example/u/dave";
const ERIN: &str = "mimi://b.example/u/erin";

struct Net {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl Net {
    async fn start(transport: &str) -> Net {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // prepare() picks free ports and lets them go; a test running beside may take one
        // before a node binds it, so a layout whose ports are taken is made afresh.
        'attempt: for attempt in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let layout = demo::prepare(dir.path(), transport, "durable", false).unwrap();
            let mut nodes = Vec::new();
            for c in &layout.configs {
                match Node::start(NodeConfig::load(c).unwrap()).await {
                    Ok(n) => nodes.push(n),
                    Err(e) if attempt < 3 && format!("{e:?}").contains("AddrInUse") => {
                        for n in nodes {
                            n.shutdown().await.unwrap();
                        }
                        continue 'attempt;
                    }
                    Err(e) => panic!("node start: {e:?}"),
                }
            }
            return Net { _dir: dir, nodes };
        }
        unreachable!()
    }

    fn admins(&self) -> [std::net::SocketAddr; 3] {
        [
            self.nodes[0].admin,
            self.nodes[1].admin,
            self.nodes[2].admin,
        ]
    }

    async fn stop(self) {
        for n in self.nodes {
            n.shutdown().await.unwrap();
        }
    }
}

async fn scenario_over(transport: &str) {
    let net = Net::start(transport).await;
    let room: RoomId = "mimi://a.example/r/mls".parse().unwrap();
    let r = scenario::run(net.admins(), &room).await.unwrap();
    assert_eq!(r.decrypt_failures, 0, "{r:?}");
    assert_eq!(r.mls_epochs, vec![0, 1, 2], "{r:?}");
    // 7 messages to three receivers, one (after carol's removal) to two.
    assert_eq!(r.messages_sent, 8, "{r:?}");
    assert_eq!(r.messages_decrypted, 23, "{r:?}");
    // bob's 3 messages reach dave and dave's 1 reaches bob, through the relay, though they
    // share b.example; and every sender saw its own message come back.
    assert_eq!(r.same_provider_decrypted, 4, "{r:?}");
    assert_eq!(r.own_echoes, 8, "{r:?}");
    assert!(r.removed_member_cut_off, "{r:?}");
    // The refusals the scenario provokes on purpose: bob's removal of carol (the policy) and
    // alice's claim for frank, who never consented.
    assert_eq!(r.policy_rejections, 1, "{r:?}");
    assert_eq!(r.consent_denials, 1, "{r:?}");
    assert_eq!(r.key_claims, 3, "{r:?}");
    assert!(r.refusals[0].contains("NoConsent"), "{r:?}");
    assert!(r.refusals[1].contains("forged frank: 422"), "{r:?}");
    assert!(r.refusals[2].contains("canRemoveParticipant"), "{r:?}");
    // The room's participant list, as its AppDataUpdate commits left it: carol is gone.
    assert_eq!(
        r.participants,
        vec![(ALICE.into(), 3), (BOB.into(), 2), (DAVE.into(), 2)],
        "{r:?}"
    );
    // The hub franked every message; each receiver verified each Frank (§5.4.1.3).
    assert_eq!((r.franks_verified, r.franks_failed), (23, 0), "{r:?}");
    // bob reported carol's message with the frank he kept: the hub took it (§5.9) and
    // refused the same report with one bit of the frank changed.
    assert_eq!(
        (r.abuse_reports_accepted, r.abuse_reports_refused),
        (1, 1),
        "{r:?}"
    );
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_scenario_over_mixed_transports() {
    scenario_over("mixed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_scenario_over_https() {
    scenario_over("https").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_scenario_over_quic() {
    scenario_over("quic").await;
}

/// Polls until `want`; panics on anything failed or after 20 s.
async fn wait_for(c: &mut MlsClient, mut want: impl FnMut(&Event) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(e) = c.next_event(200).await.unwrap() {
            assert!(!matches!(e, Event::Failed { .. }), "{}: {e:?}", c.user);
            if want(&e) {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} waited in vain",
            c.user
        );
    }
}

/// alice hosts `room` with bob and carol in it (epoch 1).
async fn room_of_three(net: &Net, room: &RoomId) -> [MlsClient; 3] {
    let a = net.admins();
    let mut alice = MlsClient::new(ALICE, a[0]).unwrap();
    let mut bob = MlsClient::new(BOB, a[1]).unwrap();
    let mut carol = MlsClient::new(CAROL, a[2]).unwrap();
    bob.publish_key_packages(1).await.unwrap();
    carol.publish_key_packages(1).await.unwrap();
    bob.set_consent(ALICE, Some(room), true).await.unwrap();
    carol.set_consent(ALICE, Some(room), true).await.unwrap();
    alice.create_room(room).await.unwrap();
    let kb = alice.claim(BOB, room).await.unwrap().unwrap();
    let kc = alice.claim(CAROL, room).await.unwrap().unwrap();
    assert_eq!(
        alice.add(room, &[kb, kc]).await.unwrap(),
        UpdateResult::Accepted
    );
    wait_for(&mut bob, |e| matches!(e, Event::Joined { epoch: 1 })).await;
    wait_for(&mut carol, |e| matches!(e, Event::Joined { epoch: 1 })).await;
    [alice, bob, carol]
}

async fn check_message(
    room: &RoomId,
    from: &mut MlsClient,
    to: &mut [&mut MlsClient],
    text: &[u8],
) {
    assert_eq!(from.send(room, text).await.unwrap(), SubmitResult::Accepted);
    for c in to {
        let sender = from.user.clone();
        wait_for(c, |e| {
            matches!(e, Event::Message { sender: s, payload } if *s == sender && payload == text)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_race_one_commit_wins_the_other_rebases() {
    let net = Net::start("quic").await;
    let room: RoomId = "mimi://a.example/r/race".parse().unwrap();
    let [mut alice, mut bob, mut carol] = room_of_three(&net, &room).await;
    // Both followers commit for epoch 1 at once.
    let bb = bob.prepare_self_update().unwrap();
    let cb = carol.prepare_self_update().unwrap();
    let (rb, rc) = tokio::join!(bob.send_update(&room, bb), carol.send_update(&room, cb));
    let (rb, rc) = (rb.unwrap(), rc.unwrap());
    let outcomes = [&rb, &rc];
    assert_eq!(
        outcomes
            .iter()
            .filter(|r| ***r == UpdateResult::Accepted)
            .count(),
        1,
        "{rb:?} {rc:?}"
    );
    assert!(
        outcomes.iter().any(|r| **r == UpdateResult::WrongEpoch(2)),
        "{rb:?} {rc:?}"
    );
    let (winner, loser) = if rb == UpdateResult::Accepted {
        (&mut bob, &mut carol)
    } else {
        (&mut carol, &mut bob)
    };
    // The loser applies the winner's commit, then commits again for epoch 2.
    wait_for(loser, |e| matches!(e, Event::Commit { epoch: 2, .. })).await;
    assert_eq!(
        loser.self_update(&room).await.unwrap(),
        UpdateResult::Accepted
    );
    assert_eq!(loser.epoch(), Some(3));
    wait_for(winner, |e| matches!(e, Event::Commit { epoch: 3, .. })).await;
    wait_for(&mut alice, |e| matches!(e, Event::Commit { epoch: 2, .. })).await;
    wait_for(&mut alice, |e| matches!(e, Event::Commit { epoch: 3, .. })).await;
    check_message(&room, &mut alice, &mut [winner, loser], b"all at epoch 3").await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_package_is_handed_out_and_used_once() {
    let net = Net::start("https").await;
    let a = net.admins();
    let room: RoomId = "mimi://a.example/r/once".parse().unwrap();
    let mut alice = MlsClient::new(ALICE, a[0]).unwrap();
    let mut bob = MlsClient::new(BOB, a[1]).unwrap();
    bob.publish_key_packages(1).await.unwrap();
    alice.create_room(&room).await.unwrap();
    // Consent (protocol-06 §5.2, §5.7): none yet, then for another room only, then for
    // every room.
    assert_eq!(
        alice.claim(BOB, &room).await.unwrap().unwrap_err(),
        "NoConsent"
    );
    let elsewhere: RoomId = "mimi://a.example/r/elsewhere".parse().unwrap();
    bob.set_consent(ALICE, Some(&elsewhere), true)
        .await
        .unwrap();
    assert_eq!(
        alice.claim(BOB, &room).await.unwrap().unwrap_err(),
        "NoConsentForThisRoom"
    );
    bob.set_consent(ALICE, None, true).await.unwrap();
    let kp = alice.claim(BOB, &room).await.unwrap().unwrap();
    // The only KeyPackage is gone: the provider has nothing more for bob.
    assert_eq!(
        alice.claim(BOB, &room).await.unwrap().unwrap_err(),
        "NoCompatibleMaterial"
    );
    // A user no one knows has granted nothing: noConsent, which says nothing of whether
    // the user exists.
    assert_eq!(
        alice
            .claim("mimi://b.example/u/nobody", &room)
            .await
            .unwrap()
            .unwrap_err(),
        "NoConsent"
    );
    assert_eq!(
        alice.add(&room, std::slice::from_ref(&kp)).await.unwrap(),
        UpdateResult::Accepted
    );
    wait_for(&mut bob, |e| matches!(e, Event::Joined { epoch: 1 })).await;
    assert_eq!(
        alice.remove(&room, BOB).await.unwrap(),
        UpdateResult::Accepted
    );
    // Adding bob again with the KeyPackage already used is refused by the hub.
    match alice.add(&room, &[kp]).await.unwrap() {
        UpdateResult::Refused(why) => assert!(why.contains("second time"), "{why}"),
        other => panic!("reused KeyPackage accepted: {other:?}"),
    }
    assert_eq!(alice.epoch(), Some(2));
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_does_not_break_the_room() {
    let net = Net::start("quic").await;
    let room: RoomId = "mimi://a.example/r/refused".parse().unwrap();
    let [mut alice, mut bob, mut carol] = room_of_three(&net, &room).await;

    // bob, an ordinary participant, may not remove carol.
    match bob.remove(&room, CAROL).await.unwrap() {
        UpdateResult::Refused(why) => assert!(why.contains("canRemoveParticipant"), "{why}"),
        other => panic!("policy let a regular member remove another: {other:?}"),
    }
    // A tampered commit fails MLS validation: invalidProposal.
    let body = carol.prepare_self_update().unwrap();
    let mut req = mimi_wire::proto::UpdateRequest::decode(&body).unwrap();
    if let mimi_wire::proto::HandshakeBundle::Commit { commit, .. } = &mut req.bundle {
        let mut b = commit.as_bytes().to_vec();
        // Inside the signed content (the hub cannot check the membership tag at the end:
        // it has no membership key).
        let mid = b.len() / 2;
        b[mid] ^= 0x5a;
        *commit = mimi_wire::proto::MlsMessage::from_bytes(b).unwrap();
    }
    let tampered = bytes::Bytes::from(req.encode().unwrap());
    assert!(matches!(
        carol.send_update(&room, tampered).await.unwrap(),
        UpdateResult::Refused(_)
    ));
    // A commit for an old epoch: wrongEpoch with the current one; a message of the old
    // epoch: epochTooOld.
    let stale = bob.prepare_self_update().unwrap();
    assert_eq!(
        alice.self_update(&room).await.unwrap(),
        UpdateResult::Accepted
    );
    assert_eq!(
        bob.send_update(&room, stale).await.unwrap(),
        UpdateResult::WrongEpoch(2)
    );
    assert_eq!(
        bob.send(&room, b"from epoch 1").await.unwrap(),
        SubmitResult::EpochTooOld(2)
    );
    // Everyone still talks at the room's epoch.
    wait_for(&mut bob, |e| matches!(e, Event::Commit { epoch: 2, .. })).await;
    wait_for(&mut carol, |e| matches!(e, Event::Commit { epoch: 2, .. })).await;
    check_message(
        &room,
        &mut bob,
        &mut [&mut alice, &mut carol],
        b"still here",
    )
    .await;
    check_message(&room, &mut carol, &mut [&mut alice, &mut bob], b"me too").await;
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifier_queries_consent_and_abuse_reports() {
    use mimi_wire::proto::{
        AbuseReport, ConsentEntry, ConsentOperation, IdentifierQueryCode, IdentifierRequest,
        IdentifierResponse, IdentifierUri, QueryElement, SearchIdentifierType, VLBytes,
    };
    use relay_node::client::{LocalClient, StatusCode};
    let net = Net::start("https").await;
    let a = net.admins();
    let mut at_a = LocalClient::new(a[0]);
    let mut at_b = LocalClient::new(a[1]);
    at_b.list_in_directory(4, "+12125551212", BOB)
        .await
        .unwrap();
    at_b.list_in_directory(1, "im:bob@b.example", BOB)
        .await
        .unwrap();
    // A provider lists only its own users.
    assert!(at_b.list_in_directory(4, "+1999", ALICE).await.is_err());

    let query = |elems: Vec<(SearchIdentifierType, &str)>| {
        let req = IdentifierRequest {
            query_elements: elems
                .into_iter()
                .map(|(t, v)| QueryElement {
                    search_type: t,
                    field_name: None,
                    search_value: VLBytes::new(v.as_bytes().to_vec()),
                })
                .collect(),
            id_request_extensions: VLBytes::new(Vec::new()),
        };
        bytes::Bytes::from(req.encode().unwrap())
    };
    for (elems, code, uris) in [
        (
            vec![(SearchIdentifierType::Phone, "+12125551212")],
            IdentifierQueryCode::Success,
            vec![BOB],
        ),
        (
            vec![
                (SearchIdentifierType::Phone, "+12125551212"),
                (SearchIdentifierType::Handle, "im:bob@b.example"),
            ],
            IdentifierQueryCode::Success,
            vec![BOB],
        ),
        (
            vec![(SearchIdentifierType::Phone, "+10000000000")],
            IdentifierQueryCode::NotFound,
            vec![],
        ),
        (
            vec![(SearchIdentifierType::PartialName, "bo")],
            IdentifierQueryCode::UnsupportedField,
            vec![],
        ),
    ] {
        let (st, body) = at_a
            .post("/v1/client/identifierQuery/b.example", query(elems))
            .await
            .unwrap();
        assert_eq!(st, StatusCode::OK);
        let r = IdentifierResponse::decode(&body).unwrap();
        assert_eq!(r.response_code, code);
        let got: Vec<&str> = r.uris.iter().map(IdentifierUri::as_str).collect();
        assert_eq!(got, uris);
        assert!(
            r.found_profiles.is_empty(),
            "no profile fields are given out"
        );
    }

    let entry = |op, requester: &str, target: &str| {
        let e = ConsentEntry {
            operation: op,
            requester_uri: IdentifierUri::new(requester),
            target_uri: IdentifierUri::new(target),
            room_id: None,
            client_key_packages: Vec::new(),
            consent_extensions: VLBytes::new(Vec::new()),
        };
        bytes::Bytes::from(e.encode().unwrap())
    };
    let (st, _) = at_a
        .post(
            "/v1/client/requestConsent",
            entry(ConsentOperation::Request, ALICE, BOB),
        )
        .await
        .unwrap();
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = at_b
        .post(
            "/v1/client/updateConsent",
            entry(ConsentOperation::Grant, ALICE, BOB),
        )
        .await
        .unwrap();
    assert_eq!(st, StatusCode::CREATED);
    // a.example may not ask in carol's name... nor for one of its own users as the target.
    let (st, _) = at_a
        .post(
            "/v1/client/requestConsent",
            entry(ConsentOperation::Request, CAROL, BOB),
        )
        .await
        .unwrap();
    assert_eq!(st, StatusCode::FORBIDDEN);

    let room: RoomId = "mimi://a.example/r/abuse".parse().unwrap();
    let mut alice = MlsClient::new(ALICE, a[0]).unwrap();
    alice.create_room(&room).await.unwrap();
    let report = AbuseReport {
        reporting_user: IdentifierUri::new(BOB),
        alleged_abuser_uri: IdentifierUri::new(ALICE),
        reason_code: 0,
        note: VLBytes::new(b"spam".to_vec()),
        messages: Vec::new(),
        abuse_extensions: VLBytes::new(Vec::new()),
    };
    let body = bytes::Bytes::from(report.encode().unwrap());
    let path = format!("/v1/client/reportAbuse/{}", room.to_path_segment());
    let (st, _) = at_b.post(&path, body.clone()).await.unwrap();
    assert_eq!(st, StatusCode::CREATED);
    let unknown = format!(
        "/v1/client/reportAbuse/{}",
        "mimi://a.example/r/none"
            .parse::<RoomId>()
            .unwrap()
            .to_path_segment()
    );
    let (st, _) = at_b.post(&unknown, body).await.unwrap();
    assert_eq!(st, StatusCode::NOT_FOUND);
    net.stop().await;
}

/// protocol-06 §3.6 and §5.6: dave, a user of b listed in the room by its owner,
/// fetches the GroupInfo through b from hub a, joins by external commit sent via /update,
/// the members process it, and dave and alice read each other. carol, of c (no member in
/// the room), is refused with notAuthorized; an unknown room answers noSuchRoom; dave is
/// refused while he is not in the participant list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_join_with_group_info_from_the_hub() {
    let net = Net::start("https").await;
    let a = net.admins();
    let room: RoomId = "mimi://a.example/r/open".parse().unwrap();
    let mut alice = MlsClient::new(ALICE, a[0]).unwrap();
    let mut bob = MlsClient::new(BOB, a[1]).unwrap();
    let mut carol = MlsClient::new(CAROL, a[2]).unwrap();
    let mut dave = MlsClient::new(DAVE, a[1]).unwrap();
    bob.publish_key_packages(1).await.unwrap();
    bob.set_consent(ALICE, Some(&room), true).await.unwrap();
    // The room names its hub as franking agent: joiners by external commit support that.
    let hub_key = alice.fetch_hub_key().await.unwrap();
    alice.create_room(&room).await.unwrap();
    let kb = alice.claim(BOB, &room).await.unwrap().unwrap();
    assert_eq!(
        alice.add(&room, &[kb]).await.unwrap(),
        UpdateResult::Accepted
    );
    wait_for(&mut bob, |e| matches!(e, Event::Joined { epoch: 1 })).await;

    // Refused by the join policy: c has no member in the room.
    assert_eq!(
        carol.join_external(&room).await.unwrap(),
        Err(GroupInfoCode::NotAuthorized)
    );
    let nowhere: RoomId = "mimi://a.example/r/nowhere".parse().unwrap();
    assert_eq!(
        carol.fetch_group_info(&nowhere).await.unwrap().err(),
        Some(GroupInfoCode::NoSuchRoom)
    );
    assert_eq!(carol.epoch(), None);

    // Nor may dave join while he is not in the participant list: the room's roles give role
    // 0 no canOpenJoin (draft-ietf-mimi-room-policy §8.1.1).
    assert_eq!(
        dave.join_external(&room).await.unwrap(),
        Err(GroupInfoCode::NotAuthorized)
    );
    assert_eq!(dave.epoch(), None);
    // alice lists him, erin and fay (inactive participants); each then adds their own client.
    let listed = mimi_client::room_policy::add_participants(
        [DAVE, ERIN, "mimi://b.example/u/fay"],
        mimi_client::room_policy::REGULAR_ROLE,
    );
    assert_eq!(
        alice
            .update_participants(&room, Some(listed), &[], &[])
            .await
            .unwrap(),
        UpdateResult::Accepted
    );
    wait_for(&mut bob, |e| matches!(e, Event::Commit { epoch: 2, .. })).await;
    // The hub publishes its key (GET /v1/client/hubKey) with its credential; dave checks
    // the GroupInfoResponse against it. fay, who pinned another node's key, refuses it.
    let agent = mimi_wire::proto::room::FrankingAgentData::decode(&hub_key).unwrap();
    assert!(
        agent
            .credential
            .as_bytes()
            .windows(16)
            .any(|w| w == b"mimi://a.example")
    );
    dave.pin_hub_key("a.example", hub_key);
    let other = relay_node::client::LocalClient::new(a[1])
        .hub_key()
        .await
        .unwrap();
    assert_ne!(
        mimi_wire::proto::room::FrankingAgentData::decode(&other)
            .unwrap()
            .franking_signature_key,
        agent.franking_signature_key
    );
    let mut fay = MlsClient::new("mimi://b.example/u/fay", a[1]).unwrap();
    fay.pin_hub_key("a.example", other.to_vec());
    let refused = fay.join_external(&room).await;
    assert!(
        matches!(&refused, Err(mimi_client::MlsClientError::Mls(m)) if m.contains("bad hub signature")),
        "{refused:?}"
    );
    assert_eq!(fay.epoch(), None);
    assert_eq!(
        dave.join_external(&room).await.unwrap(),
        Ok(UpdateResult::Accepted)
    );
    assert_eq!(dave.epoch(), Some(3));
    wait_for(&mut alice, |e| matches!(e, Event::Commit { epoch: 3, .. })).await;
    wait_for(&mut bob, |e| matches!(e, Event::Commit { epoch: 3, .. })).await;
    let mut members = alice.members();
    members.sort();
    assert_eq!(members, [ALICE, BOB, DAVE]);

    // bob, also of b, gets dave's message through the hub (§5.5: to every member), and dave
    // gets his own back.
    check_message(
        &room,
        &mut dave,
        &mut [&mut alice, &mut bob],
        b"hello from dave",
    )
    .await;
    wait_for(
        &mut dave,
        |e| matches!(e, Event::OwnMessage { payload } if payload == b"hello from dave"),
    )
    .await;
    check_message(
        &room,
        &mut alice,
        &mut [&mut dave, &mut bob],
        b"welcome dave",
    )
    .await;

    // The hub now serves the GroupInfo dave's external commit carried (epoch 3).
    let mut erin = MlsClient::new(ERIN, a[1]).unwrap();
    assert_eq!(
        erin.join_external(&room).await.unwrap(),
        Ok(UpdateResult::Accepted)
    );
    assert_eq!(erin.epoch(), Some(4));
    wait_for(&mut alice, |e| matches!(e, Event::Commit { epoch: 4, .. })).await;
    wait_for(&mut dave, |e| matches!(e, Event::Commit { epoch: 4, .. })).await;
    check_message(
        &room,
        &mut erin,
        &mut [&mut alice, &mut bob, &mut dave],
        b"hello from erin",
    )
    .await;
    // MIMI content (with its salt) is franked by the hub and checked by every receiver,
    // the joiners by external commit among them; the sender and room URIs it asserts are
    // compared with the credential and the group (§5.4.1.3).
    let mut content = mimi_wire::content::MimiContent::markdown(alice.salt().unwrap(), "franked");
    content.extensions.set_sender_uri(ALICE);
    content.extensions.set_room_uri(room.as_str());
    let content = content.encode().unwrap();
    check_message(
        &room,
        &mut alice,
        &mut [&mut dave, &mut bob, &mut erin],
        &content,
    )
    .await;
    for c in [&dave, &bob, &erin] {
        assert_eq!((c.franks_verified, c.franks_failed), (1, 0), "{}", c.user);
    }
    // The same content under another sender's name fails the receivers' URI check.
    let mut forged = mimi_wire::content::MimiContent::markdown(alice.salt().unwrap(), "forged");
    forged.extensions.set_sender_uri(BOB);
    forged.extensions.set_room_uri(room.as_str());
    let forged = forged.encode().unwrap();
    check_message(&room, &mut alice, &mut [&mut dave, &mut erin], &forged).await;
    for c in [&dave, &erin] {
        assert_eq!((c.franks_verified, c.franks_failed), (1, 1), "{}", c.user);
    }

    // erin pinned nothing: the key her GroupInfoResponse carried was checked against the
    // room's franking agent. A room whose members named another key as its agent: the
    // hub's response no longer matches, and an unpinned client refuses it.
    let misnamed: RoomId = "mimi://a.example/r/misnamed".parse().unwrap();
    let mut owner = MlsClient::new(ALICE, a[0]).unwrap();
    owner.pin_hub_key("a.example", other.to_vec());
    owner.create_room(&misnamed).await.unwrap();
    let listed =
        mimi_client::room_policy::add_participants([ERIN], mimi_client::room_policy::REGULAR_ROLE);
    assert_eq!(
        owner
            .update_participants(&misnamed, Some(listed), &[], &[])
            .await
            .unwrap(),
        UpdateResult::Accepted
    );
    let mut erin2 = MlsClient::new(ERIN, a[1]).unwrap();
    let refused = erin2.fetch_group_info(&misnamed).await;
    assert!(
        matches!(&refused, Err(mimi_client::MlsClientError::Mls(m)) if m.contains("not the room's franking agent")),
        "{refused:?}"
    );
    net.stop().await;
}

/// draft-ietf-mimi-room-policy §4 and §8.1.1: alice's room preauthorizes b's users as
/// regular participants (a preauth_list she commits). dave, of b, may then fetch the
/// GroupInfo and join by an external commit that lists himself as regular; as owner he is
/// refused by the hub. carol, of c, is not preauthorized: notAuthorized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preauthorized_user_joins_by_an_external_commit_listing_itself() {
    use mimi_client::room_policy::{OWNER_ROLE, REGULAR_ROLE, preauth_domain};
    let net = Net::start("https").await;
    let a = net.admins();
    let room: RoomId = "mimi://a.example/r/preauth".parse().unwrap();
    let mut alice = MlsClient::new(ALICE, a[0]).unwrap();
    let mut carol = MlsClient::new(CAROL, a[2]).unwrap();
    let mut dave = MlsClient::new(DAVE, a[1]).unwrap();
    dave.pin_hub_key("a.example", alice.fetch_hub_key().await.unwrap());
    alice.create_room(&room).await.unwrap();

    // Neither listed nor preauthorized yet.
    assert_eq!(
        dave.join_external_as(&room, REGULAR_ROLE).await.unwrap(),
        Err(GroupInfoCode::NotAuthorized)
    );
    assert_eq!(
        alice
            .set_preauth(&room, &preauth_domain("b.example"))
            .await
            .unwrap(),
        UpdateResult::Accepted
    );
    assert_eq!(
        carol.join_external_as(&room, REGULAR_ROLE).await.unwrap(),
        Err(GroupInfoCode::NotAuthorized)
    );
    let refused = dave.join_external_as(&room, OWNER_ROLE).await.unwrap();
    assert!(
        matches!(&refused, Ok(UpdateResult::Refused(d)) if d.contains("may not join")),
        "{refused:?}"
    );
    assert_eq!(dave.epoch(), None);
    assert_eq!(
        dave.join_external_as(&room, REGULAR_ROLE).await.unwrap(),
        Ok(UpdateResult::Accepted)
    );
    assert_eq!(dave.epoch(), Some(2));
    wait_for(&mut alice, |e| matches!(e, Event::Commit { epoch: 2, .. })).await;
    assert!(
        alice
            .participants()
            .contains(&(DAVE.to_owned(), REGULAR_ROLE)),
        "{:?}",
        alice.participants()
    );
    check_message(&room, &mut dave, &mut [&mut alice], b"hello, preauthorized").await;
    net.stop().await;
}
