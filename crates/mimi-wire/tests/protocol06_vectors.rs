//! Byte-exact cross-check of every protocol-06 body against an independent encoder:
//! `interop/protocol06/mimi06.py`, written from the draft's struct definitions alone, generated
//! the vectors in `interop/protocol06/vectors/`.
//!
//! * Every vector decodes and re-encodes byte for byte (and a /notify sequence splits).
//! * Bodies built here from the vectors' JSON values (not from their bytes) encode to exactly
//!   the Python bytes.
//! * Malformed variants of the vectors are refused.
//! * Our encodings are written to `protocol06-rust-encodings.json` under the test's tmp dir
//!   (or `$MIMI_PROTOCOL06_RUST_OUT`) for `check.py --rust` to decode with the Python side.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;
use sha2::{Digest, Sha256};

use mimi_wire::proto::{
    AbuseReport, ConsentEntry, ConsentOperation, ConsentScope, FanoutMessage,
    GroupInfoRatchetTreeTbe, GroupInfoRequest, GroupInfoResponse, GroupInfoStatus,
    IdentifierRequest, IdentifierResponse, KeyMaterialRequest, KeyMaterialResponse,
    SubmitMessageRequest, SubmitMessageResponse, SubmitStatus, UpdateOutcome, UpdateRequest,
    UpdateRoomResponse, VLBytes, split_fanout_sequence,
};
use mimi_wire::{Limits, WireError};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/protocol06/vectors")
}

struct Vector {
    name: String,
    body: String,
    bytes: Vec<u8>,
    value: Value,
}

fn vectors() -> Vec<Vector> {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("index.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for v in index["vectors"].as_array().unwrap() {
        let file = v["file"].as_str().unwrap();
        let bytes = std::fs::read(dir().join(file)).unwrap();
        assert_eq!(
            hex(&Sha256::digest(&bytes)),
            v["sha256"].as_str().unwrap(),
            "{file}: bytes differ from index.json"
        );
        out.push(Vector {
            name: v["name"].as_str().unwrap().to_owned(),
            body: v["struct"].as_str().unwrap().to_owned(),
            bytes,
            value: v.get("value").cloned().unwrap_or(Value::Null),
        });
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Decode with our types and re-encode. `None`: not a body this test knows.
fn reencode(body: &str, bytes: &[u8]) -> Option<Result<Vec<u8>, WireError>> {
    macro_rules! rt {
        ($t:ty) => {
            Some(<$t>::decode(bytes).and_then(|v| v.encode()))
        };
    }
    match body {
        "KeyMaterialRequest" => rt!(KeyMaterialRequest),
        "KeyMaterialResponse" => rt!(KeyMaterialResponse),
        "UpdateRequest" => rt!(UpdateRequest),
        "UpdateRoomResponse" => rt!(UpdateRoomResponse),
        "SubmitMessageRequest" => rt!(SubmitMessageRequest),
        "SubmitMessageResponse" => rt!(SubmitMessageResponse),
        "FanoutMessage" => rt!(FanoutMessage),
        "GroupInfoRequest" => rt!(GroupInfoRequest),
        "GroupInfoResponse" => rt!(GroupInfoResponse),
        "GroupInfoRatchetTreeTBE" => rt!(GroupInfoRatchetTreeTbe),
        "ConsentEntry" => rt!(ConsentEntry),
        "ConsentScope" => rt!(ConsentScope),
        "IdentifierRequest" => rt!(IdentifierRequest),
        "IdentifierResponse" => rt!(IdentifierResponse),
        "AbuseReport" => rt!(AbuseReport),
        _ => None,
    }
}

#[test]
fn every_python_vector_decodes_and_reencodes_byte_for_byte() {
    let vs = vectors();
    let mut failures = Vec::new();
    let mut bodies = std::collections::BTreeSet::new();
    for v in vs.iter().filter(|v| v.body != "FanoutMessage*") {
        bodies.insert(v.body.clone());
        match reencode(&v.body, &v.bytes) {
            None => failures.push(format!("{}: unknown body {}", v.name, v.body)),
            Some(Err(e)) => failures.push(format!("{} ({}): we refuse it: {e}", v.name, v.body)),
            Some(Ok(ours)) if ours != v.bytes => failures.push(format!(
                "{} ({}): re-encoding differs at byte {} (ours {} bytes, theirs {})",
                v.name,
                v.body,
                ours.iter()
                    .zip(&v.bytes)
                    .take_while(|(a, b)| a == b)
                    .count(),
                ours.len(),
                v.bytes.len()
            )),
            Some(Ok(_)) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "cross-check findings:\n{}",
        failures.join("\n")
    );
    // Every body mimi-wire implements has at least one vector.
    assert_eq!(bodies.len(), 15, "bodies covered: {bodies:?}");
}

#[test]
fn a_notify_sequence_splits_into_its_fanout_messages() {
    let vs = vectors();
    let seq = vs.iter().find(|v| v.name == "fanout_sequence").unwrap();
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("index.json")).unwrap()).unwrap();
    let parts: Vec<&str> = index["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "fanout_sequence")
        .unwrap()["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let views = split_fanout_sequence(&seq.bytes, &Limits::default()).unwrap();
    assert_eq!(views.len(), parts.len());
    for (view, part) in views.iter().zip(parts) {
        let want = &vs.iter().find(|v| v.name == part).unwrap().bytes;
        assert_eq!(view.bytes, &want[..], "{part}");
    }
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

fn uri(v: &Value) -> mimi_wire::proto::IdentifierUri {
    mimi_wire::proto::IdentifierUri::new(v["uri"].as_str().unwrap())
}

fn opt_uri(v: &Value) -> Option<mimi_wire::proto::IdentifierUri> {
    if v.is_null() { None } else { Some(uri(v)) }
}

/// MLS varint (RFC 9420 §2.1.2), for the AppDataDictionary contents built below.
fn varint(n: usize, out: &mut Vec<u8>) {
    if n < 1 << 6 {
        out.push(n as u8);
    } else if n < 1 << 14 {
        out.extend_from_slice(&(n as u16 | 0x4000).to_be_bytes());
    } else {
        out.extend_from_slice(&(n as u32 | 0x8000_0000).to_be_bytes());
    }
}

/// The contents of `ComponentData component_data<V>` (mimi-wire carries them unparsed).
fn app_data(v: &Value) -> VLBytes {
    let mut out = Vec::new();
    for c in v["component_data"].as_array().unwrap() {
        out.extend_from_slice(&(c["component_id"].as_u64().unwrap() as u16).to_be_bytes());
        let data = unhex(c["data"].as_str().unwrap());
        varint(data.len(), &mut out);
        out.extend_from_slice(&data);
    }
    VLBytes::new(out)
}

/// Build our value from the vector's JSON value (not from its bytes) and encode it, for the
/// bodies whose fields are all plain (no embedded MLS objects, which we only carry as bytes).
fn build(v: &Vector) -> Option<Vec<u8>> {
    let j = &v.value;
    let encoded = match v.body.as_str() {
        "SubmitMessageResponse" => SubmitMessageResponse {
            protocol: mimi_wire::proto::Protocol::Mls10,
            status: match j["statusCode"].as_str().unwrap() {
                "accepted" => SubmitStatus::Accepted {
                    accepted_timestamp: u64_of(&j["accepted_timestamp"]),
                    frank: (!j["frank"].is_null()).then(|| {
                        let f = &j["frank"];
                        mimi_wire::proto::Frank {
                            server_frank: unhex(f["server_frank"].as_str().unwrap())
                                .try_into()
                                .unwrap(),
                            franking_signature_ciphersuite: f["franking_signature_ciphersuite"]
                                .as_u64()
                                .unwrap()
                                as u16,
                            franking_integrity_signature: VLBytes::new(unhex(
                                f["franking_integrity_signature"].as_str().unwrap(),
                            )),
                        }
                    }),
                },
                "notAllowed" => SubmitStatus::NotAllowed,
                "epochTooOld" => SubmitStatus::EpochTooOld {
                    current_epoch: u64_of(&j["currentEpoch"]),
                },
                other => panic!("{other}"),
            },
        }
        .encode(),
        "UpdateRoomResponse" => UpdateRoomResponse {
            error_description: j["errorDescription"].as_str().unwrap().to_owned(),
            outcome: match j["responseCode"].as_str().unwrap() {
                "success" => UpdateOutcome::Success {
                    accepted_timestamp: u64_of(&j["accepted_timestamp"]),
                },
                "wrongEpoch" => UpdateOutcome::WrongEpoch {
                    current_epoch: u64_of(&j["currentEpoch"]),
                },
                "notAllowed" => UpdateOutcome::NotAllowed,
                "invalidProposal" => UpdateOutcome::InvalidProposal {
                    invalid_proposals: j["invalidProposals"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| VLBytes::new(unhex(r.as_str().unwrap())))
                        .collect(),
                },
                other => panic!("{other}"),
            },
        }
        .encode(),
        "ConsentScope" => ConsentScope {
            requester_uri: uri(&j["requesterUri"]),
            target_uri: uri(&j["targetUri"]),
            room_id: opt_uri(&j["roomId"]),
        }
        .encode(),
        "ConsentEntry" if j["consentOperation"] != "grant" => ConsentEntry {
            operation: match j["consentOperation"].as_str().unwrap() {
                "cancel" => ConsentOperation::Cancel,
                "request" => ConsentOperation::Request,
                "revoke" => ConsentOperation::Revoke,
                other => panic!("{other}"),
            },
            requester_uri: uri(&j["requesterUri"]),
            target_uri: uri(&j["targetUri"]),
            room_id: opt_uri(&j["roomId"]),
            client_key_packages: Vec::new(),
            consent_extensions: app_data(&j["consent_extensions"]),
        }
        .encode(),
        "GroupInfoResponse" if j["status"] != "success" => GroupInfoResponse {
            protocol: mimi_wire::proto::Protocol::Mls10,
            room_id: VLBytes::new(unhex(j["room_id"].as_str().unwrap())),
            status: match j["status"].as_str().unwrap() {
                "notAuthorized" => GroupInfoStatus::NotAuthorized,
                "noSuchRoom" => GroupInfoStatus::NoSuchRoom,
                other => panic!("{other}"),
            },
        }
        .encode(),
        _ => return None,
    };
    Some(encoded.unwrap_or_else(|e| panic!("{}: we cannot encode our own value: {e}", v.name)))
}

#[test]
fn our_encodings_of_the_same_values_are_the_python_bytes() {
    let vs = vectors();
    let mut built = 0;
    let mut failures = Vec::new();
    for v in &vs {
        if let Some(ours) = build(v) {
            built += 1;
            if ours != v.bytes {
                failures.push(format!(
                    "{}: ours {} / theirs {}",
                    v.name,
                    hex(&ours),
                    hex(&v.bytes)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "encodings differ:\n{}",
        failures.join("\n")
    );
    assert!(built >= 15, "built {built} values");
}

/// Malformed variants of valid vectors that RFC 9420's rules (and mimi-wire's contract: the
/// whole input is consumed) make invalid, so both sides must refuse them.
fn malformed(v: &Vector) -> Vec<(&'static str, Vec<u8>)> {
    let mut trailing = v.bytes.clone();
    trailing.push(0);
    let truncated = v.bytes[..v.bytes.len() - 1].to_vec();
    vec![("trailing byte", trailing), ("truncated", truncated)]
}

#[test]
fn malformed_variants_are_refused() {
    let vs = vectors();
    for v in vs.iter().filter(|v| v.body != "FanoutMessage*") {
        for (what, bytes) in malformed(v) {
            let r = reencode(&v.body, &bytes).unwrap();
            assert!(r.is_err(), "{} with a {what} was accepted", v.name);
        }
    }
    // An optional's presence byte other than 0 or 1 (ConsentScope ends with roomId absent).
    let scope = vs
        .iter()
        .find(|v| v.name == "consent_scope_any_room")
        .unwrap();
    let mut bad = scope.bytes.clone();
    *bad.last_mut().unwrap() = 2;
    assert!(
        ConsentScope::decode(&bad).is_err(),
        "optional presence byte 2 was accepted"
    );
    // A varint with the reserved 0b11 prefix (the first URI's length).
    let mut bad = scope.bytes.clone();
    bad[0] |= 0xC0;
    assert!(
        ConsentScope::decode(&bad).is_err(),
        "varint prefix 0b11 was accepted"
    );
    // A non-minimal varint: RFC 9420 §2.1.2 requires the shortest form.
    let mut bad = vec![0x40, scope.bytes[0]];
    bad.extend_from_slice(&scope.bytes[1..]);
    assert!(
        ConsentScope::decode(&bad).is_err(),
        "a non-minimal varint was accepted"
    );
}

/// Write our encodings for the Python side (`check.py --rust FILE`): every vector as we
/// re-encode it and every value we build ourselves.
#[test]
fn write_our_encodings_for_the_python_check() {
    let vs = vectors();
    let mut out = BTreeMap::new();
    for v in vs.iter().filter(|v| v.body != "FanoutMessage*") {
        if let Some(Ok(ours)) = reencode(&v.body, &v.bytes) {
            out.insert(
                format!("{}/reencoded", v.name),
                (v.name.clone(), v.body.clone(), hex(&ours)),
            );
        }
        if let Some(ours) = build(v) {
            out.insert(
                format!("{}/built", v.name),
                (v.name.clone(), v.body.clone(), hex(&ours)),
            );
        }
    }
    let entries: Vec<Value> = out
        .into_iter()
        .map(|(id, (name, body, hex))| {
            serde_json::json!({"id": id, "name": name, "struct": body, "hex": hex})
        })
        .collect();
    let path = std::env::var_os("MIMI_PROTOCOL06_RUST_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("protocol06-rust-encodings.json")
        });
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&entries).unwrap() + "\n",
    )
    .unwrap();
    assert!(!entries.is_empty());
}
