//! Round-trip, known-answer, truncation and mutation tests for every §5 body.

use super::*;
use crate::mls::testdata;
use crate::testutil::XorShift;
use crate::{Limits, WireError};
use tls_codec::{DeserializeBytes, Serialize as _};

fn vl(b: &[u8]) -> VLBytes {
    VLBytes::new(b.to_vec())
}

fn uri(s: &str) -> IdentifierUri {
    IdentifierUri::new(s)
}

fn msg(bytes: Vec<u8>) -> MlsMessage {
    MlsMessage::from_bytes(bytes).unwrap()
}

fn app_message() -> MlsMessage {
    msg(crate::mls::private_message(b"clubhouse", 3, b"sealed"))
}

fn frank() -> Frank {
    Frank {
        server_frank: [0x42; 32],
        franking_signature_ciphersuite: 1,
        franking_integrity_signature: vl(&[7; 64]),
    }
}

fn credential() -> Credential {
    let mut c = Vec::new();
    testdata::credential_basic(&mut c, b"mimi://a.example/u/alice");
    Credential::from_bytes(c).unwrap()
}

fn key_package() -> KeyPackage {
    KeyPackage::from_bytes(testdata::key_package()).unwrap()
}

fn capabilities() -> Capabilities {
    let mut c = Vec::new();
    testdata::capabilities(&mut c);
    Capabilities::from_bytes(c).unwrap()
}

fn proposal_msg() -> MlsMessage {
    msg(testdata::public_message(b"clubhouse", 3, 2, 1))
}

fn commit_msg() -> MlsMessage {
    msg(testdata::public_message(b"clubhouse", 3, 3, 1))
}

fn welcome_msg() -> MlsMessage {
    msg(testdata::mls_message(3, &testdata::welcome()))
}

/// One sample body per type and arm, with a decoder that checks decode-then-encode gives
/// back the same bytes.
type Check = fn(&[u8]) -> Result<(), WireError>;

macro_rules! check {
    ($t:ty) => {
        (|b: &[u8]| {
            let v = <$t>::decode(b)?;
            assert_eq!(
                v.encode().unwrap(),
                b,
                concat!("re-encode ", stringify!($t))
            );
            Ok(())
        }) as Check
    };
}

fn samples() -> Vec<(&'static str, Vec<u8>, Check)> {
    let commit = UpdateRequest {
        bundle: HandshakeBundle::Commit {
            commit: commit_msg(),
            welcome: Some(Welcome::from_bytes(testdata::welcome()).unwrap()),
            group_info_option: GroupInfoOption::Full(
                GroupInfo::from_bytes(testdata::group_info(b"clubhouse", 4)).unwrap(),
            ),
            ratchet_tree_option: RatchetTreeOption::Full {
                ratchet_tree: vl(&[1, 2, 3]),
            },
        },
    };
    let commit_partial = UpdateRequest {
        bundle: HandshakeBundle::Commit {
            commit: commit_msg(),
            welcome: None,
            group_info_option: GroupInfoOption::Partial(PartialGroupInfo {
                ratchet_tree_presence: RatchetTreePresence::Present,
                group_info_extensions: vl(&[]),
                signature: vl(&[9; 64]),
            }),
            ratchet_tree_option: RatchetTreeOption::HttpsUri {
                ratchet_tree_url: vl(b"https://hub.example/tree"),
                tree_signature: vl(&[8; 64]),
            },
        },
    };
    let proposal = UpdateRequest {
        bundle: HandshakeBundle::Proposal {
            proposal: proposal_msg(),
            more_proposals: vec![proposal_msg(), msg(testdata::public_message(b"c", 3, 2, 2))],
        },
    };
    let fanouts = [
        FanoutMessage {
            timestamp: 1,
            message: app_message(),
            extra: FanoutExtra::Application {
                frank: Some(frank()),
            },
        },
        FanoutMessage {
            timestamp: 2,
            message: welcome_msg(),
            extra: FanoutExtra::Welcome {
                ratchet_tree_option: RatchetTreeOption::DistributionService,
            },
        },
        FanoutMessage {
            timestamp: 3,
            message: proposal_msg(),
            extra: FanoutExtra::Proposal {
                more_proposals: vec![proposal_msg()],
            },
        },
        FanoutMessage {
            timestamp: 4,
            message: commit_msg(),
            extra: FanoutExtra::Commit {
                external_proposals: vec![],
            },
        },
    ];
    let kmr = KeyMaterialRequest {
        protocol: Protocol::Mls10,
        requesting_user: uri("mimi://a.example/u/alice"),
        target_user: uri("mimi://b.example/u/bob"),
        room_id: uri("mimi://a.example/r/clubhouse"),
        acceptable_ciphersuites: vec![1, 3],
        required_capabilities: RequiredCapabilities::from_bytes(vec![0, 2, 0, 1, 0]).unwrap(),
        requester_signature_key: vl(&[3; 32]),
        requester_credential: credential(),
        signature: vl(&[4; 64]),
    };
    let kmresp = KeyMaterialResponse {
        protocol: Protocol::Mls10,
        user_status: KeyMaterialUserCode::PartialSuccess,
        user_uri: uri("mimi://b.example/u/bob"),
        clients: vec![
            ClientKeyMaterial {
                client_uri: uri("mimi://b.example/d/1"),
                status: ClientKeyMaterialStatus::Success {
                    key_package: key_package(),
                },
            },
            ClientKeyMaterial {
                client_uri: uri("mimi://b.example/d/2"),
                status: ClientKeyMaterialStatus::KeyMaterialExhausted,
            },
            ClientKeyMaterial {
                client_uri: uri("mimi://b.example/d/3"),
                status: ClientKeyMaterialStatus::NothingCompatible {
                    client_capabilities: Some(capabilities()),
                },
            },
        ],
    };
    let gireq = GroupInfoRequest {
        protocol: Protocol::Mls10,
        cipher_suite: 1,
        requesting_signature_key: vl(&[5; 32]),
        requesting_credential: credential(),
        group_info_public_key: vl(&[6; 32]),
        joining_code: vl(b"letmein"),
        signature: vl(&[7; 64]),
    };
    let giresp = GroupInfoResponse {
        protocol: Protocol::Mls10,
        room_id: vl(b"mimi://a.example/r/clubhouse"),
        status: GroupInfoStatus::Success {
            cipher_suite: 1,
            hub_sender: ExternalSender {
                signature_key: vl(&[1; 32]),
                credential: credential(),
            },
            encrypted_groupinfo_and_tree: HpkeCiphertext {
                kem_output: vl(&[2; 32]),
                ciphertext: vl(&[3; 200]),
            },
            signature: vl(&[4; 64]),
        },
    };
    let tbe = GroupInfoRatchetTreeTbe {
        group_info: GroupInfo::from_bytes(testdata::group_info(b"g", 1)).unwrap(),
        ratchet_tree_option: RatchetTreeOption::OutOfBand {
            tree_signature: vl(&[1; 8]),
        },
        pending_proposals: vec![PendingProposal {
            proposal: proposal_msg(),
            hub_accepted_time: 9,
        }],
    };
    let grant = ConsentEntry {
        operation: ConsentOperation::Grant,
        requester_uri: uri("mimi://a.example/u/alice"),
        target_uri: uri("mimi://b.example/u/bob"),
        room_id: Some(uri("mimi://a.example/r/clubhouse")),
        client_key_packages: vec![key_package(), key_package()],
        consent_extensions: vl(&[]),
    };
    let request = ConsentEntry {
        operation: ConsentOperation::Request,
        room_id: None,
        client_key_packages: vec![],
        ..grant.clone()
    };
    let idreq = IdentifierRequest {
        query_elements: vec![
            QueryElement {
                search_type: SearchIdentifierType::Handle,
                field_name: None,
                search_value: vl(b"im:alice.smith@a.example"),
            },
            QueryElement {
                search_type: SearchIdentifierType::OidcStdClaim,
                field_name: Some(vl(b"given_name")),
                search_value: vl(b"Alice"),
            },
        ],
        id_request_extensions: vl(&[]),
    };
    let idresp = IdentifierResponse {
        response_code: IdentifierQueryCode::Success,
        uris: vec![uri("mimi://a.example/u/alice")],
        found_profiles: vec![UserProfile {
            stable_uri: uri("mimi://a.example/u/alice"),
            fields: vec![ProfileField {
                field_source: FieldSource::VcardField,
                field_name: "FN".into(),
                field_value: vl(b"Alice Smith"),
            }],
        }],
        id_response_extensions: vl(&[]),
    };
    let abuse = AbuseReport {
        reporting_user: uri(""),
        alleged_abuser_uri: uri("mimi://c.example/u/mallory"),
        reason_code: 0,
        note: vl(b"spam"),
        messages: vec![AbusiveMessage {
            message_content: vl(b"buy now"),
            frank: frank(),
            accepted_timestamp: 1_700_000_000_000,
        }],
        abuse_extensions: vl(&[]),
    };
    let submit = SubmitMessageRequest {
        protocol: Protocol::Mls10,
        app_message: app_message(),
        sending_uri: uri("mimi://b.example/u/bob"),
    };

    let mut out: Vec<(&'static str, Vec<u8>, Check)> = vec![
        (
            "submit request",
            submit.encode().unwrap(),
            check!(SubmitMessageRequest),
        ),
        (
            "submit accepted",
            SubmitMessageResponse::accepted(5).encode().unwrap(),
            check!(SubmitMessageResponse),
        ),
        (
            "submit accepted franked",
            SubmitMessageResponse {
                protocol: Protocol::Mls10,
                status: SubmitStatus::Accepted {
                    accepted_timestamp: 5,
                    frank: Some(frank()),
                },
            }
            .encode()
            .unwrap(),
            check!(SubmitMessageResponse),
        ),
        (
            "submit epoch too old",
            SubmitMessageResponse::epoch_too_old(4).encode().unwrap(),
            check!(SubmitMessageResponse),
        ),
        (
            "update commit",
            commit.encode().unwrap(),
            check!(UpdateRequest),
        ),
        (
            "update commit partial",
            commit_partial.encode().unwrap(),
            check!(UpdateRequest),
        ),
        (
            "update proposal",
            proposal.encode().unwrap(),
            check!(UpdateRequest),
        ),
        (
            "update response success",
            UpdateRoomResponse::success(7).encode().unwrap(),
            check!(UpdateRoomResponse),
        ),
        (
            "update response invalid proposal",
            UpdateRoomResponse {
                error_description: "bad".into(),
                outcome: UpdateOutcome::InvalidProposal {
                    invalid_proposals: vec![vl(&[1; 32]), vl(&[2; 32])],
                },
            }
            .encode()
            .unwrap(),
            check!(UpdateRoomResponse),
        ),
        (
            "key material request",
            kmr.encode().unwrap(),
            check!(KeyMaterialRequest),
        ),
        (
            "key material response",
            kmresp.encode().unwrap(),
            check!(KeyMaterialResponse),
        ),
        (
            "group info request",
            gireq.encode().unwrap(),
            check!(GroupInfoRequest),
        ),
        (
            "group info response",
            giresp.encode().unwrap(),
            check!(GroupInfoResponse),
        ),
        (
            "group info tbe",
            tbe.encode().unwrap(),
            check!(GroupInfoRatchetTreeTbe),
        ),
        (
            "consent grant",
            grant.encode().unwrap(),
            check!(ConsentEntry),
        ),
        (
            "consent request",
            request.encode().unwrap(),
            check!(ConsentEntry),
        ),
        (
            "consent scope",
            grant.scope().encode().unwrap(),
            check!(ConsentScope),
        ),
        (
            "identifier request",
            idreq.encode().unwrap(),
            check!(IdentifierRequest),
        ),
        (
            "identifier response",
            idresp.encode().unwrap(),
            check!(IdentifierResponse),
        ),
        ("abuse report", abuse.encode().unwrap(), check!(AbuseReport)),
    ];
    for f in fanouts {
        out.push(("fanout", f.encode().unwrap(), check!(FanoutMessage)));
    }
    out
}

#[test]
fn every_sample_round_trips() {
    for (name, bytes, check) in samples() {
        check(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn every_truncation_is_an_error() {
    for (name, bytes, check) in samples() {
        for cut in 0..bytes.len() {
            assert!(check(&bytes[..cut]).is_err(), "{name} cut at {cut}");
        }
    }
}

#[test]
fn trailing_bytes_rejected() {
    for (name, mut bytes, check) in samples() {
        bytes.push(0);
        assert_eq!(check(&bytes), Err(WireError::TrailingBytes), "{name}");
    }
}

#[test]
fn mutated_and_random_input_never_panics() {
    let mut rng = XorShift::new(7);
    let samples = samples();
    for (_, bytes, check) in &samples {
        for _ in 0..300 {
            let mut m = bytes.clone();
            rng.mutate(&mut m);
            // Whatever decodes must re-encode to the same bytes (checked inside).
            let _ = check(&m);
        }
        for _ in 0..100 {
            let n = rng.below(200);
            let _ = check(&rng.bytes(n));
        }
    }
    for _ in 0..500 {
        let n = rng.below(300);
        let b = rng.bytes(n);
        let _ = SubmitMessageView::parse(&b);
        let _ = split_fanout_sequence(&b, &Limits::default());
    }
}

#[test]
fn oversize_vectors_and_bodies_rejected() {
    let big = SubmitMessageRequest {
        protocol: Protocol::Mls10,
        app_message: msg(crate::mls::private_message(b"g", 1, &[0; 2000])),
        sending_uri: uri("mimi://b.example/u/bob"),
    }
    .encode()
    .unwrap();
    let limits = Limits {
        max_vector: 1000,
        ..Limits::default()
    };
    assert!(matches!(
        SubmitMessageRequest::decode_with_limits(&big, &limits),
        Err(WireError::TooLarge {
            what: "ciphertext",
            len: 2000,
            max: 1000
        })
    ));
    assert!(matches!(
        SubmitMessageView::parse_with_limits(&big, &limits),
        Err(WireError::TooLarge { .. })
    ));
    let limits = Limits {
        max_body: 100,
        ..Limits::default()
    };
    assert!(matches!(
        SubmitMessageRequest::decode_with_limits(&big, &limits),
        Err(WireError::TooLarge { what: "body", .. })
    ));
    assert!(matches!(
        split_fanout_sequence(&big, &limits),
        Err(WireError::TooLarge { what: "body", .. })
    ));
    // A declared 1 GiB vector in a tiny body is refused before anything is allocated.
    let mut b = vec![1, 0, 1, 0, 2, 0xbf, 0xff, 0xff, 0xff];
    b.extend_from_slice(&[0; 16]);
    assert!(matches!(
        SubmitMessageRequest::decode(&b),
        Err(WireError::TooLarge { .. })
    ));
}

#[test]
fn submit_response_known_answers() {
    let accepted = SubmitMessageResponse::accepted(1_700_000_000_000);
    let expected = [
        0x01, 0x00, 0x00, 0x00, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00, 0x00,
    ];
    assert_eq!(accepted.encode().unwrap(), expected);
    assert_eq!(accepted.tls_serialize_detached().unwrap(), expected);
    assert_eq!(SubmitMessageResponse::decode(&expected).unwrap(), accepted);
    assert_eq!(
        SubmitMessageResponse::not_allowed().encode().unwrap(),
        [0x01, 0x01]
    );
    assert_eq!(
        SubmitMessageResponse::epoch_too_old(0x0102)
            .encode()
            .unwrap(),
        [0x01, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x02]
    );
    assert_eq!(
        SubmitMessageResponse::decode(&[0x02, 0x01]),
        Err(WireError::BadVersion)
    );
    assert!(matches!(
        SubmitMessageResponse::decode(&[0x01, 0x03]),
        Err(WireError::BadValue { .. })
    ));
    // frank presence byte must be 0 or 1
    let mut bad = expected.to_vec();
    bad[10] = 2;
    assert!(SubmitMessageResponse::decode(&bad).is_err());
}

#[test]
fn code_points() {
    assert_eq!(Protocol::Mls10.as_u8(), 1);
    assert_eq!(SubmitResponseCode::Accepted.as_u8(), 0);
    assert_eq!(SubmitResponseCode::NotAllowed.as_u8(), 1);
    assert_eq!(SubmitResponseCode::EpochTooOld.as_u8(), 2);
    assert_eq!(UpdateResponseCode::Success.as_u8(), 0);
    assert_eq!(UpdateResponseCode::WrongEpoch.as_u8(), 1);
    assert_eq!(UpdateResponseCode::NotAllowed.as_u8(), 2);
    assert_eq!(UpdateResponseCode::InvalidProposal.as_u8(), 3);
    assert_eq!(KeyMaterialUserCode::UserDeleted.as_u8(), 7);
    assert_eq!(KeyMaterialUserCode::NoConsentForThisRoom.as_u8(), 6);
    assert_eq!(KeyMaterialClientCode::NothingCompatible.as_u8(), 2);
    assert_eq!(GroupInfoCode::Success.as_u8(), 1);
    assert_eq!(GroupInfoCode::NoSuchRoom.as_u8(), 3);
    assert_eq!(ConsentOperation::Cancel.as_u8(), 0);
    assert_eq!(ConsentOperation::Revoke.as_u8(), 3);
    assert_eq!(SearchIdentifierType::VcardField.as_u8(), 8);
    assert_eq!(IdentifierQueryCode::UnsupportedField.as_u8(), 4);
    assert_eq!(FieldSource::OidcStdClaim.as_u8(), 7);
    assert_eq!(RatchetTreePresence::Added.as_u8(), 3);
    assert!(GroupInfoCode::from_u8(0).is_err());
    assert!(SearchIdentifierType::from_u8(0).is_err());
}

#[test]
fn hand_built_layouts() {
    assert_eq!(
        UpdateRoomResponse::success(0x0a0b).encode().unwrap(),
        [0x00, 0x00, 0, 0, 0, 0, 0, 0, 0x0a, 0x0b]
    );
    assert_eq!(
        UpdateRoomResponse::not_allowed("no").encode().unwrap(),
        [0x02, 0x02, b'n', b'o']
    );
    assert_eq!(uri("mimi://a/u/b").encode().unwrap(), b"\x0cmimi://a/u/b");
    let request = ConsentEntry {
        operation: ConsentOperation::Request,
        requester_uri: uri("a"),
        target_uri: uri("b"),
        room_id: None,
        client_key_packages: vec![],
        consent_extensions: vl(&[]),
    };
    assert_eq!(
        request.encode().unwrap(),
        [0x01, 0x01, b'a', 0x01, b'b', 0x00, 0x00]
    );
    let mut f = vec![0x42; 32];
    f.extend_from_slice(&[0x00, 0x01, 0x02, 0xaa, 0xbb]);
    let fr = Frank {
        server_frank: [0x42; 32],
        franking_signature_ciphersuite: 1,
        franking_integrity_signature: vl(&[0xaa, 0xbb]),
    };
    assert_eq!(fr.encode().unwrap(), f);
    assert_eq!(
        RatchetTreeOption::DistributionService.encode().unwrap(),
        [0x04]
    );
}

#[test]
fn tls_codec_traits_agree() {
    for (name, bytes, _) in samples().into_iter().take(3) {
        let v = SubmitMessageResponse::tls_deserialize_bytes(&bytes);
        if name.starts_with("submit accepted") {
            let (v, rest) = v.unwrap();
            assert!(rest.is_empty());
            assert_eq!(v.tls_serialize_detached().unwrap(), bytes);
            assert_eq!(tls_codec::Size::tls_serialized_len(&v), bytes.len());
        }
    }
    let mut two = UpdateRoomResponse::success(1).encode().unwrap();
    two.extend_from_slice(&[9, 9]);
    let (_, rest) = UpdateRoomResponse::tls_deserialize_bytes(&two).unwrap();
    assert_eq!(rest, [9, 9]);
    assert!(UpdateRoomResponse::tls_deserialize_bytes(&two[..3]).is_err());
}

#[test]
fn submit_view_borrows_exact_message() {
    let app = app_message();
    let body = SubmitMessageRequest {
        protocol: Protocol::Mls10,
        app_message: app.clone(),
        sending_uri: uri("mimi://b.example/u/bob"),
    }
    .encode()
    .unwrap();
    let v = SubmitMessageView::parse(&body).unwrap();
    assert_eq!(v.protocol, Protocol::Mls10);
    assert_eq!(v.app_message.bytes, app.as_bytes());
    assert_eq!(v.app_message.bytes.as_ptr(), body[1..].as_ptr());
    assert_eq!(v.app_message.epoch, Some(3));
    assert_eq!(v.app_message.group_id, Some(&b"clubhouse"[..]));
    assert_eq!(v.sending_uri, "mimi://b.example/u/bob");

    // A PublicMessage is not an application message submission.
    let mut bad = vec![1];
    bad.extend_from_slice(proposal_msg().as_bytes());
    bad.extend_from_slice(b"\x01x");
    assert!(matches!(
        SubmitMessageView::parse(&bad),
        Err(WireError::BadValue { .. })
    ));
    assert!(matches!(
        SubmitMessageRequest::decode(&bad),
        Err(WireError::BadValue { .. })
    ));
    // sendingUri must be UTF-8.
    let mut bad = vec![1];
    bad.extend_from_slice(app.as_bytes());
    bad.extend_from_slice(&[1, 0xff]);
    assert!(matches!(
        SubmitMessageView::parse(&bad),
        Err(WireError::BadValue { .. })
    ));
    let mut trailing = body.clone();
    trailing.push(0);
    assert_eq!(
        SubmitMessageView::parse(&trailing),
        Err(WireError::TrailingBytes)
    );
}

#[test]
fn fanout_application_known_answer() {
    let m = crate::mls::private_message(b"g", 1, b"c");
    let mut out = vec![0xee];
    encode_fanout_application(1_700_000_000_000, &m, &mut out);
    let mut expected = vec![0xee, 0x00, 0x00, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00];
    expected.extend_from_slice(&m);
    expected.push(0x00);
    assert_eq!(out, expected);
    let f = FanoutMessage::decode(&out[1..]).unwrap();
    assert_eq!(f.timestamp, 1_700_000_000_000);
    assert_eq!(f.message.as_bytes(), &m[..]);
    assert_eq!(f.extra, FanoutExtra::Application { frank: None });
}

#[test]
fn split_fanout_sequence_views() {
    let parts: Vec<Vec<u8>> = samples()
        .into_iter()
        .filter(|(n, _, _)| *n == "fanout")
        .map(|(_, b, _)| b)
        .collect();
    let mut body = Vec::new();
    encode_fanout_application(99, app_message().as_bytes(), &mut body);
    let first_len = body.len();
    for p in &parts {
        body.extend_from_slice(p);
    }
    let views = split_fanout_sequence(&body, &Limits::default()).unwrap();
    assert_eq!(views.len(), 1 + parts.len());
    assert_eq!(views[0].bytes, &body[..first_len]);
    assert_eq!(views[0].timestamp, 99);
    assert_eq!(views[0].message.bytes, app_message().as_bytes());
    for (v, p) in views[1..].iter().zip(&parts) {
        assert_eq!(v.bytes, &p[..]);
    }
    assert_eq!(views[2].message.wire_format, crate::WireFormat::Welcome);
    assert_eq!(
        views[4].message.content_type,
        Some(crate::ContentType::Commit)
    );

    let few = Limits {
        max_fanouts_per_body: 2,
        ..Limits::default()
    };
    assert!(matches!(
        split_fanout_sequence(&body, &few),
        Err(WireError::TooLarge {
            what: "fanout messages per body",
            ..
        })
    ));
    assert_eq!(
        split_fanout_sequence(&[], &Limits::default()),
        Err(WireError::Truncated)
    );
    for cut in 1..body.len() {
        if views
            .iter()
            .scan(0, |end, v| {
                *end += v.bytes.len();
                Some(*end)
            })
            .any(|e| e == cut)
        {
            continue; // a cut on a message boundary is a shorter valid body
        }
        assert!(
            split_fanout_sequence(&body[..cut], &Limits::default()).is_err(),
            "cut {cut}"
        );
    }
    // GroupInfo and KeyPackage are not fanned out.
    let mut gi = 5u64.to_be_bytes().to_vec();
    gi.extend_from_slice(&testdata::mls_message(4, &testdata::group_info(b"g", 1)));
    assert!(matches!(
        split_fanout_sequence(&gi, &Limits::default()),
        Err(WireError::BadValue { .. })
    ));
}

#[test]
fn encode_refuses_inconsistent_selects() {
    let f = FanoutMessage {
        timestamp: 1,
        message: app_message(),
        extra: FanoutExtra::Commit {
            external_proposals: vec![],
        },
    };
    assert!(f.encode().is_err());
    let b = HandshakeBundle::Proposal {
        proposal: commit_msg(),
        more_proposals: vec![],
    };
    assert!(b.encode().is_err());
    let c = ConsentEntry {
        operation: ConsentOperation::Revoke,
        requester_uri: uri("a"),
        target_uri: uri("b"),
        room_id: None,
        client_key_packages: vec![key_package()],
        consent_extensions: vl(&[]),
    };
    assert!(c.encode().is_err());
    let q = QueryElement {
        search_type: SearchIdentifierType::Nick,
        field_name: Some(vl(b"x")),
        search_value: vl(b"y"),
    };
    assert!(q.encode().is_err());
}

#[test]
fn update_request_rejects_application_message() {
    let mut body = app_message().into_bytes();
    body.extend_from_slice(&[0]);
    assert!(matches!(
        UpdateRequest::decode(&body),
        Err(WireError::BadValue { .. })
    ));
}

#[test]
fn mls_message_owned_accessors() {
    let m = commit_msg();
    assert_eq!(m.group_id(), Some(&b"clubhouse"[..]));
    assert_eq!(m.epoch(), Some(3));
    assert_eq!(m.content_type(), Some(crate::ContentType::Commit));
    assert_eq!(
        m.view(),
        crate::MlsMessageView::parse(m.as_bytes()).unwrap()
    );
    assert!(MlsMessage::from_bytes(vec![0, 1, 0, 2]).is_err());
}

#[test]
fn key_material_tbs_is_request_without_signature() {
    let (_, bytes, _) = samples()
        .into_iter()
        .find(|(n, _, _)| *n == "key material request")
        .unwrap();
    let req = KeyMaterialRequest::decode(&bytes).unwrap();
    let tbs = req.tbs().unwrap();
    assert_eq!(&bytes[..tbs.len()], &tbs[..]);
    assert_eq!(bytes.len(), tbs.len() + 2 + 64); // 64 needs a 2-byte varint
    assert_eq!(req.acceptable_ciphersuites, [1, 3]);
}
