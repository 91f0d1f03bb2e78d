#!/usr/bin/env python3
"""Generate protocol-06 test vectors with mimi06.py: one or more per section 5 body and per
select branch, deterministic (fixed seed, no clock).

    interop/protocol06/gen_vectors.py [--check]

Writes vectors/<name>.bin (the body's exact bytes) and vectors/index.json (name, struct,
file, sha256, value). With --check, regenerates in memory and fails if the committed files
differ (so the vectors cannot drift from the script).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import mimi06 as m

HERE = Path(__file__).resolve().parent
OUT = HERE / "vectors"

rng = random.Random(0x6D696D69)  # "mimi"


def rb(n: int) -> str:
    return bytes(rng.getrandbits(8) for _ in range(n)).hex()


def uri(s: str) -> dict:
    return {"uri": s}


ALICE = "mimi://a.example/u/alice"
BOB = "mimi://b.example/u/bob"
ROOM = "mimi://hub.example/r/Rl33FWLCYWOwxHrYnpWDQg"
GROUP_ID = rb(16)
SUITE = 1  # MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519


def basic_cred(name: str) -> dict:
    return {"credential_type": "basic", "identity": name.encode().hex()}


def x509_cred() -> dict:
    return {"credential_type": "x509", "certificates": [{"cert_data": rb(40)}, {"cert_data": rb(33)}]}


def capabilities() -> dict:
    return {"versions": [1], "cipher_suites": [1, 3], "extensions": [0x000A, 0xF001],
            "proposals": [0x0008], "credentials": [1, 2]}


def leaf_node(source: str = "key_package", cred=None) -> dict:
    ln = {"encryption_key": rb(32), "signature_key": rb(32),
          "credential": cred or basic_cred(BOB), "capabilities": capabilities(),
          "leaf_node_source": source, "extensions": [], "signature": rb(64)}
    if source == "key_package":
        ln["lifetime"] = {"not_before": 1_767_225_600, "not_after": 1_798_761_600}
    if source == "commit":
        ln["parent_hash"] = rb(32)
    return ln


def key_package(cred=None) -> dict:
    return {"version": "mls10", "cipher_suite": SUITE, "init_key": rb(32),
            "leaf_node": leaf_node("key_package", cred),
            "extensions": [{"extension_type": 0xF002, "extension_data": rb(5)}],
            "signature": rb(64)}


def group_context(epoch: int) -> dict:
    return {"version": "mls10", "cipher_suite": SUITE, "group_id": GROUP_ID, "epoch": epoch,
            "tree_hash": rb(32), "confirmed_transcript_hash": rb(32),
            "extensions": [{"extension_type": 0x0005, "extension_data": rb(12)}]}


def group_info(epoch: int) -> dict:
    return {"group_context": group_context(epoch),
            "extensions": [{"extension_type": 0x0004, "extension_data": rb(32)}],
            "confirmation_tag": rb(32), "signer": 2, "signature": rb(64)}


def welcome() -> dict:
    return {"cipher_suite": SUITE,
            "secrets": [{"new_member": rb(32),
                         "encrypted_group_secrets": {"kem_output": rb(32), "ciphertext": rb(48)}}],
            "encrypted_group_info": rb(120)}


def ratchet_tree() -> list:
    return [{"node_type": "leaf", "leaf_node": leaf_node("commit", basic_cred(ALICE))},
            {"node_type": "parent", "parent_node": {"encryption_key": rb(32), "parent_hash": b"".hex(),
                                                    "unmerged_leaves": [2]}},
            {"node_type": "leaf", "leaf_node": leaf_node("update")},
            None,
            {"node_type": "leaf", "leaf_node": leaf_node("key_package", x509_cred())}]


def mls(wire_format: str, body_key: str, body: dict) -> dict:
    return {"version": "mls10", "wire_format": wire_format, body_key: body}


def private_app(epoch: int, size: int) -> dict:
    return mls("mls_private_message", "private_message", {
        "group_id": GROUP_ID, "epoch": epoch, "content_type": "application",
        "authenticated_data": rb(36), "encrypted_sender_data": rb(29), "ciphertext": rb(size)})


def public_proposal(epoch: int, proposal: dict, sender=None) -> dict:
    sender = sender or {"sender_type": "member", "leaf_index": 1}
    pm = {"content": {"group_id": GROUP_ID, "epoch": epoch, "sender": sender,
                      "authenticated_data": "", "content_type": "proposal", "proposal": proposal},
          "signature": rb(64)}
    if sender["sender_type"] == "member":
        pm["membership_tag"] = rb(32)
    return mls("mls_public_message", "public_message", pm)


def public_commit(epoch: int, with_path: bool) -> dict:
    commit = {"proposals": [
        {"type": "proposal", "proposal": {"proposal_type": "remove", "removed": 3}},
        {"type": "reference", "reference": rb(32)},
        {"type": "proposal", "proposal": {"proposal_type": "add", "key_package": key_package()}},
        {"type": "proposal", "proposal": {"proposal_type": "psk", "psk": {
            "psktype": "resumption", "usage": "application", "psk_group_id": GROUP_ID,
            "psk_epoch": epoch - 1, "psk_nonce": rb(32)}}},
        {"type": "proposal", "proposal": {"proposal_type": "group_context_extensions",
                                          "extensions": [{"extension_type": 2, "extension_data": rb(6)}]}},
    ], "path": None}
    if with_path:
        commit["path"] = {"leaf_node": leaf_node("commit", basic_cred(ALICE)), "nodes": [
            {"encryption_key": rb(32), "encrypted_path_secret": [
                {"kem_output": rb(32), "ciphertext": rb(48)}]}]}
    pm = {"content": {"group_id": GROUP_ID, "epoch": epoch,
                      "sender": {"sender_type": "member", "leaf_index": 0},
                      "authenticated_data": rb(4), "content_type": "commit", "commit": commit},
          "signature": rb(64), "confirmation_tag": rb(32), "membership_tag": rb(32)}
    return mls("mls_public_message", "public_message", pm)


def frank() -> dict:
    return {"server_frank": rb(32), "franking_signature_ciphersuite": SUITE,
            "franking_integrity_signature": rb(64)}


def app_data(n: int) -> dict:
    return {"component_data": [{"component_id": 0x8000 + i, "data": rb(3 + i)} for i in range(n)]}


def vectors() -> list:
    v = []

    def add(name, struct, value):
        v.append((name, struct, value))

    add("key_material_request_basic", "KeyMaterialRequest", {
        "protocol": "mls10", "requestingUser": uri(ALICE), "targetUser": uri(BOB),
        "roomId": uri(ROOM), "acceptableCiphersuites": [1, 3, 7],
        "requiredCapabilities": {"extension_types": [0x000A], "proposal_types": [0x0008],
                                 "credential_types": [1]},
        "requesterSignatureKey": rb(32), "requesterCredential": basic_cred(ALICE),
        "key_material_request_signature": rb(64)})
    # No room: the struct has no optional, so "no room" can only be an empty URI.
    add("key_material_request_no_room_x509", "KeyMaterialRequest", {
        "protocol": "mls10", "requestingUser": uri(ALICE), "targetUser": uri(BOB),
        "roomId": uri(""), "acceptableCiphersuites": [1],
        "requiredCapabilities": {"extension_types": [], "proposal_types": [], "credential_types": []},
        "requesterSignatureKey": rb(32), "requesterCredential": x509_cred(),
        "key_material_request_signature": rb(64)})

    add("key_material_response_success", "KeyMaterialResponse", {
        "protocol": "mls10", "userStatus": "success", "userUri": uri(BOB), "clients": [
            {"clientStatus": "success", "clientUri": uri("mimi://b.example/d/bob-phone"),
             "keyPackage": key_package()},
            {"clientStatus": "success", "clientUri": uri("mimi://b.example/d/bob-laptop"),
             "keyPackage": key_package(x509_cred())}]})
    add("key_material_response_partial", "KeyMaterialResponse", {
        "protocol": "mls10", "userStatus": "partialSuccess", "userUri": uri(BOB), "clients": [
            {"clientStatus": "success", "clientUri": uri("mimi://b.example/d/bob-phone"),
             "keyPackage": key_package()},
            {"clientStatus": "keyMaterialExhausted", "clientUri": uri("mimi://b.example/d/bob-tablet")},
            {"clientStatus": "nothingCompatible", "clientUri": uri("mimi://b.example/d/bob-watch"),
             "clientCapabilities": capabilities()},
            {"clientStatus": "nothingCompatible", "clientUri": uri("mimi://b.example/d/bob-tv"),
             "clientCapabilities": None}]})
    add("key_material_response_user_unknown", "KeyMaterialResponse", {
        "protocol": "mls10", "userStatus": "userUnknown", "userUri": uri(BOB), "clients": []})

    add("update_request_commit_full", "UpdateRequest", {"bundle": {
        "proposalOrCommit": public_commit(7, with_path=True), "welcome": welcome(),
        "groupInfoOption": {"representation": "full", "groupInfo": group_info(8)},
        "ratchetTreeOption": {"representation": "full", "ratchet_tree": ratchet_tree()}}})
    add("update_request_commit_partial", "UpdateRequest", {"bundle": {
        "proposalOrCommit": public_commit(9, with_path=False), "welcome": None,
        "groupInfoOption": {"representation": "partial", "partialGroupInfo": {
            "ratchet_tree_presence": "present", "group_info_extensions": [], "signature": rb(64)}},
        "ratchetTreeOption": {"representation": "distributionService"}}})
    add("update_request_commit_tree_uri", "UpdateRequest", {"bundle": {
        "proposalOrCommit": public_commit(10, with_path=False), "welcome": welcome(),
        "groupInfoOption": {"representation": "full", "groupInfo": group_info(11)},
        "ratchetTreeOption": {"representation": "httpsUri",
                              "ratchet_tree_url": b"https://hub.example/trees/42".hex(),
                              "tree_signature": rb(64)}}})
    add("update_request_proposal", "UpdateRequest", {"bundle": {
        "proposalOrCommit": public_proposal(12, {"proposal_type": "remove", "removed": 5}),
        "moreProposals": [
            public_proposal(12, {"proposal_type": "update", "leaf_node": leaf_node("update")}),
            public_proposal(12, {"proposal_type": "add", "key_package": key_package()},
                            {"sender_type": "external", "sender_index": 0})]}})

    add("update_room_response_success", "UpdateRoomResponse", {
        "responseCode": "success", "errorDescription": "", "accepted_timestamp": 1_764_979_200_123})
    add("update_room_response_wrong_epoch", "UpdateRoomResponse", {
        "responseCode": "wrongEpoch", "errorDescription": "epoch is 41", "currentEpoch": 41})
    add("update_room_response_not_allowed", "UpdateRoomResponse", {
        "responseCode": "notAllowed", "errorDescription": "r\u00f4le lacks capability"})
    add("update_room_response_invalid_proposal", "UpdateRoomResponse", {
        "responseCode": "invalidProposal", "errorDescription": "two bad",
        "invalidProposals": [rb(32), rb(32)]})

    add("submit_message_request", "SubmitMessageRequest", {
        "protocol": "mls10", "appMessage": private_app(41, 150), "sendingUri": uri(ALICE)})
    add("submit_message_request_large", "SubmitMessageRequest", {
        "protocol": "mls10", "appMessage": private_app(2**40 + 3, 16400), "sendingUri": uri(ALICE)})

    add("submit_message_response_accepted", "SubmitMessageResponse", {
        "protocol": "mls10", "statusCode": "accepted", "accepted_timestamp": 1_764_979_200_456,
        "frank": None})
    add("submit_message_response_accepted_frank", "SubmitMessageResponse", {
        "protocol": "mls10", "statusCode": "accepted", "accepted_timestamp": 1_764_979_200_789,
        "frank": frank()})
    add("submit_message_response_not_allowed", "SubmitMessageResponse", {
        "protocol": "mls10", "statusCode": "notAllowed"})
    add("submit_message_response_epoch_too_old", "SubmitMessageResponse", {
        "protocol": "mls10", "statusCode": "epochTooOld", "currentEpoch": 2**33})

    add("fanout_application", "FanoutMessage", {
        "timestamp": 1_764_979_201_000, "message": private_app(41, 80), "frank": None})
    add("fanout_application_frank", "FanoutMessage", {
        "timestamp": 1_764_979_201_001, "message": private_app(41, 300), "frank": frank()})
    add("fanout_welcome", "FanoutMessage", {
        "timestamp": 1_764_979_201_002, "message": mls("mls_welcome", "welcome", welcome()),
        "ratchetTreeOption": {"representation": "full", "ratchet_tree": ratchet_tree()}})
    add("fanout_welcome_out_of_band", "FanoutMessage", {
        "timestamp": 1_764_979_201_003, "message": mls("mls_welcome", "welcome", welcome()),
        "ratchetTreeOption": {"representation": "outOfBand", "tree_signature": rb(64)}})
    add("fanout_proposal", "FanoutMessage", {
        "timestamp": 1_764_979_201_004,
        "message": public_proposal(42, {"proposal_type": "remove", "removed": 1},
                                   {"sender_type": "external", "sender_index": 0}),
        "moreProposals": [public_proposal(42, {"proposal_type": "remove", "removed": 2})]})
    add("fanout_commit", "FanoutMessage", {
        "timestamp": 1_764_979_201_005, "message": public_commit(42, with_path=True),
        "externalProposals": []})
    add("fanout_commit_stapled", "FanoutMessage", {
        "timestamp": 1_764_979_201_006, "message": public_commit(43, with_path=False),
        "externalProposals": [public_proposal(44, {"proposal_type": "remove", "removed": 4},
                                              {"sender_type": "external", "sender_index": 1})]})

    add("group_info_request", "GroupInfoRequest", {
        "protocol": "mls10", "cipher_suite": SUITE, "requestingSignatureKey": rb(32),
        "requestingCredential": basic_cred(BOB), "groupInfoPublicKey": rb(32),
        "joiningCode": b"JOIN-4711".hex(), "signature": rb(64)})
    add("group_info_request_no_code", "GroupInfoRequest", {
        "protocol": "mls10", "cipher_suite": SUITE, "requestingSignatureKey": rb(32),
        "requestingCredential": x509_cred(), "groupInfoPublicKey": rb(32),
        "joiningCode": "", "signature": rb(64)})

    add("group_info_response_success", "GroupInfoResponse", {
        "version": "mls10", "room_id": ROOM.encode().hex(), "status": "success",
        "cipher_suite": SUITE,
        "hub_sender": {"signature_key": rb(32), "credential": basic_cred("hub.example")},
        "encrypted_groupinfo_and_tree": {"kem_output": rb(32), "ciphertext": rb(400)},
        "signature": rb(64)})
    add("group_info_response_not_authorized", "GroupInfoResponse", {
        "version": "mls10", "room_id": ROOM.encode().hex(), "status": "notAuthorized"})
    add("group_info_response_no_such_room", "GroupInfoResponse", {
        "version": "mls10", "room_id": ROOM.encode().hex(), "status": "noSuchRoom"})

    add("group_info_ratchet_tree_tbe", "GroupInfoRatchetTreeTBE", {
        "groupInfo": group_info(50),
        "ratchetTreeOption": {"representation": "full", "ratchet_tree": ratchet_tree()},
        "pending_proposals": [
            {"proposal": public_proposal(50, {"proposal_type": "remove", "removed": 2}),
             "hub_accepted_time": 1_764_979_202_000}]})

    add("consent_entry_request_room", "ConsentEntry", {
        "consentOperation": "request", "requesterUri": uri(ALICE), "targetUri": uri(BOB),
        "roomId": uri(ROOM), "consent_extensions": app_data(0)})
    add("consent_entry_cancel", "ConsentEntry", {
        "consentOperation": "cancel", "requesterUri": uri(ALICE), "targetUri": uri(BOB),
        "roomId": None, "consent_extensions": app_data(0)})
    add("consent_entry_grant", "ConsentEntry", {
        "consentOperation": "grant", "requesterUri": uri(ALICE), "targetUri": uri(BOB),
        "roomId": None, "clientKeyPackages": [key_package(), key_package(x509_cred())],
        "consent_extensions": app_data(2)})
    add("consent_entry_grant_empty", "ConsentEntry", {
        "consentOperation": "grant", "requesterUri": uri(ALICE), "targetUri": uri(BOB),
        "roomId": uri(ROOM), "clientKeyPackages": [], "consent_extensions": app_data(0)})
    add("consent_entry_revoke", "ConsentEntry", {
        "consentOperation": "revoke", "requesterUri": uri(ALICE), "targetUri": uri(BOB),
        "roomId": None, "consent_extensions": app_data(1)})

    add("consent_scope_room", "ConsentScope", {
        "requesterUri": uri(ALICE), "targetUri": uri(BOB), "roomId": uri(ROOM)})
    add("consent_scope_any_room", "ConsentScope", {
        "requesterUri": uri(ALICE), "targetUri": uri(BOB), "roomId": None})

    add("identifier_request", "IdentifierRequest", {
        "query_elements": [
            {"searchType": "handle", "searchValue": b"im:alice.smith@a.example".hex()},
            {"searchType": "oidcStdClaim", "claimName": b"given_name".hex(),
             "searchValue": "Alice".encode().hex()},
            {"searchType": "vcardField", "propertyName": b"ORG".hex(),
             "searchValue": "Example Org".encode().hex()},
            {"searchType": "partialName", "searchValue": "Mat\u00e9o".encode().hex()}],
        "id_request_extensions": app_data(1)})
    add("identifier_response_success", "IdentifierResponse", {
        "responseCode": "success", "uri": [uri(ALICE), uri("mimi://a.example/u/alice2")],
        "foundProfiles": [{"stableUri": uri(ALICE), "fields": [
            {"fieldSource": "oidcStdClaim", "fieldName": "given_name", "fieldValue": b"Alice".hex()},
            {"fieldSource": "vcardField", "fieldName": "ORG", "fieldValue": b"Example Org".hex()}]}],
        "id_response_extensions": app_data(0)})
    add("identifier_response_not_found", "IdentifierResponse", {
        "responseCode": "notFound", "uri": [], "foundProfiles": [],
        "id_response_extensions": app_data(0)})

    add("abuse_report", "AbuseReport", {
        "reportingUser": uri(BOB), "allegedAbuserUri": uri(ALICE), "reasonCode": "reserved",
        "note": "spam, twice".encode().hex(), "messages": [
            {"message_content": rb(90), "frank": frank(), "accepted_timestamp": 1_764_979_203_000},
            {"message_content": rb(20), "frank": frank(), "accepted_timestamp": 1_764_979_203_001}],
        "abuse_extensions": app_data(1)})
    add("abuse_report_anonymous", "AbuseReport", {
        "reportingUser": uri(""), "allegedAbuserUri": uri(ALICE), "reasonCode": "reserved",
        "note": "", "messages": [], "abuse_extensions": app_data(0)})
    return v


def build() -> dict:
    """name -> (bytes, index entry)."""
    out = {}
    for name, struct, value in vectors():
        data = m.encode(struct, value)
        back = m.decode(struct, data)
        if m.canonical_json(back) != m.canonical_json(value) or m.encode(struct, back) != data:
            raise SystemExit(f"{name}: the Python codec does not round-trip its own value")
        out[name] = (data, {"name": name, "struct": struct, "file": f"{name}.bin",
                            "sha256": hashlib.sha256(data).hexdigest(), "value": value})
    # /notify may carry several FanoutMessages back to back (section 5.5).
    seq = b"".join(out[n][0] for n in ("fanout_application", "fanout_commit_stapled", "fanout_welcome"))
    out["fanout_sequence"] = (seq, {"name": "fanout_sequence", "struct": "FanoutMessage*",
                                    "file": "fanout_sequence.bin",
                                    "sha256": hashlib.sha256(seq).hexdigest(),
                                    "parts": ["fanout_application", "fanout_commit_stapled",
                                              "fanout_welcome"]})
    return out


def index_text(built: dict) -> str:
    entries = [e for _, e in built.values()]
    return json.dumps({"draft": "draft-ietf-mimi-protocol-06", "generator": "interop/protocol06/gen_vectors.py",
                       "vectors": entries}, indent=1, sort_keys=True) + "\n"


def main() -> int:
    built = build()
    check = "--check" in sys.argv[1:]
    text = index_text(built)
    if check:
        bad = []
        if (OUT / "index.json").read_text() != text:
            bad.append("index.json")
        for name, (data, entry) in built.items():
            p = OUT / entry["file"]
            if not p.exists() or p.read_bytes() != data:
                bad.append(entry["file"])
        if bad:
            print("vectors differ from gen_vectors.py: " + ", ".join(bad), file=sys.stderr)
            return 1
        print(f"protocol06 vectors: {len(built)} up to date")
        return 0
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.bin"):
        old.unlink()
    for data, entry in built.values():
        (OUT / entry["file"]).write_bytes(data)
    (OUT / "index.json").write_text(text)
    print(f"wrote {len(built)} vectors to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
