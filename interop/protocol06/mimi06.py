"""MIMI protocol-06 bodies (draft-ietf-mimi-protocol-06 section 5) in the TLS presentation
language, written from the drafts' struct definitions alone, standard library only.

An independent second encoder for cross-checking mimi-relay's Rust one (crates/mimi-wire):
it shares no code or tables with it. Each type is a small codec object with
`enc(value) -> bytes` and `dec(reader) -> value`; values are plain JSON-able data (dicts,
lists, ints, enum names as strings, byte strings as lower-case hex strings).

Readings of the drafts (where they leave something open):
* Vectors `T x<V>` and `opaque x<V>` carry the MLS variable-length length (RFC 9420 2.1.2):
  MIMI embeds MLS structs and section 5 says nothing else, so the MLS convention is used.
* `optional<T>` / `optional T` is RFC 9420's: a uint8 presence flag (0 or 1), then T.
* `string` (UpdateRoomResponse.errorDescription, ProfileField.fieldName) is not defined by
  the draft; read as UTF-8 in an `opaque<V>`, as RFC 9420 and section 7.6's UTF8String do.
* `RoomId` (ConsentEntry, ConsentScope) is not defined; read as an IdentifierUri.
* A `select (protocol)` with no protocol field in the struct (UpdateRequest, FanoutMessage,
  ClientKeyMaterial) takes the protocol from context (the room or the enclosing struct):
  nothing on the wire. Only mls10 is defined.
* SubmitMessageResponse selects on `success`, which the enum calls `accepted(0)`.
* GroupInfoResponse's `select (protocol)` reads the `Protocol version` field.
* HandshakeBundle and FanoutMessage select on the MLS content type of the embedded message
  (FanoutMessage's `welcome` on its wire format): application (PrivateMessage), proposal,
  commit, or a Welcome MLSMessage.
* `Welcome` in `optional<Welcome>` and `GroupInfo` in GroupInfoOption/GroupInfoRatchetTreeTBE
  are the bare RFC 9420 structs (no MLSMessage header); `MLSMessage` fields carry the header.
* RatchetTreeOption and PartialGroupInfo follow draft-mahy-mls-ratchet-tree-options (the
  -03 text; protocol-06 cites -04). Its `case httpsUrl` is read as the enum's httpsUri(2); a
  full tree is RFC 9420's ratchet_tree extension contents, `optional<Node> ratchet_tree<V>`.
* AppDataDictionary is draft-ietf-mls-extensions': `ComponentData component_data<V>` with a
  uint16 ComponentID.
"""

from __future__ import annotations

import json


class DecodeError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Reader and primitive codecs


class Reader:
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DecodeError(f"truncated: need {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def done(self) -> bool:
        return self.pos == len(self.data)


def varint_enc(n: int) -> bytes:
    """RFC 9420 2.1.2: the shortest of 1, 2 or 4 bytes, the top two bits giving the length."""
    if n < 0:
        raise ValueError("negative length")
    if n < 1 << 6:
        return bytes([n])
    if n < 1 << 14:
        return (n | 0x4000).to_bytes(2, "big")
    if n < 1 << 30:
        return (n | 0x80000000).to_bytes(4, "big")
    raise ValueError("length does not fit an MLS varint")


def varint_dec(r: Reader) -> int:
    first = r.take(1)[0]
    prefix = first >> 6
    if prefix == 3:
        raise DecodeError("invalid varint prefix 0b11")
    size = 1 << prefix
    raw = bytes([first & 0x3F]) + r.take(size - 1)
    n = int.from_bytes(raw, "big")
    # RFC 9420: the minimum number of bytes MUST be used.
    if size > 1 and n < (1 << (8 * (size // 2) - 2)):
        raise DecodeError(f"non-minimal varint {n} in {size} bytes")
    return n


class Uint:
    def __init__(self, size: int):
        self.size = size

    def enc(self, v):
        return int(v).to_bytes(self.size, "big")

    def dec(self, r):
        return int.from_bytes(r.take(self.size), "big")


U8, U16, U32, U64 = Uint(1), Uint(2), Uint(4), Uint(8)


class Enum:
    """A TLS enum; `(255)` maximum means one byte. Values are names; unknown ones are ints."""

    def __init__(self, name: str, values: dict, size: int = 1):
        self.name = name
        self.by_name = values
        self.by_num = {v: k for k, v in values.items()}
        self.uint = Uint(size)

    def enc(self, v):
        return self.uint.enc(self.by_name[v] if isinstance(v, str) else v)

    def dec(self, r):
        n = self.uint.dec(r)
        if n not in self.by_num:
            raise DecodeError(f"unknown {self.name} value {n}")
        return self.by_num[n]


class Opaque:
    """`opaque x<V>`; the value is a hex string."""

    def enc(self, v):
        b = bytes.fromhex(v)
        return varint_enc(len(b)) + b

    def dec(self, r):
        return r.take(varint_dec(r)).hex()


class Utf8:
    """`string`, read as UTF-8 in an `opaque<V>`; the value is a Python str."""

    def enc(self, v):
        b = v.encode("utf-8")
        return varint_enc(len(b)) + b

    def dec(self, r):
        raw = r.take(varint_dec(r))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError(f"string is not UTF-8: {e}") from None


class Fixed:
    def __init__(self, n: int):
        self.n = n

    def enc(self, v):
        b = bytes.fromhex(v)
        if len(b) != self.n:
            raise ValueError(f"fixed field needs {self.n} bytes, got {len(b)}")
        return b

    def dec(self, r):
        return r.take(self.n).hex()


class Vec:
    """`T x<V>`: a varint byte length, then the elements back to back."""

    def __init__(self, elem):
        self.elem = elem

    def enc(self, v):
        body = b"".join(self.elem.enc(x) for x in v)
        return varint_enc(len(body)) + body

    def dec(self, r):
        sub = Reader(r.take(varint_dec(r)))
        out = []
        while not sub.done():
            out.append(self.elem.dec(sub))
        return out


class Optional:
    def __init__(self, inner):
        self.inner = inner

    def enc(self, v):
        return b"\x00" if v is None else b"\x01" + self.inner.enc(v)

    def dec(self, r):
        flag = r.take(1)[0]
        if flag == 0:
            return None
        if flag == 1:
            return self.inner.dec(r)
        raise DecodeError(f"optional presence byte {flag}")


class Empty:
    def enc(self, v):
        return b""

    def dec(self, r):
        return {}


class Struct:
    """Fields in order. A field's codec may be a function of the fields before it (select)."""

    def __init__(self, name: str, fields: list):
        self.name = name
        self.fields = fields

    def _codec(self, c, ctx):
        return c(ctx) if callable(c) and not hasattr(c, "enc") else c

    def enc(self, v):
        out = b""
        for fname, c in self.fields:
            codec = self._codec(c, v)
            if codec is None:
                continue
            if fname not in v:
                raise ValueError(f"{self.name}: missing field {fname}")
            out += codec.enc(v[fname])
        return out

    def dec(self, r):
        v = {}
        for fname, c in self.fields:
            codec = self._codec(c, v)
            if codec is None:
                continue
            v[fname] = codec.dec(r)
        return v


class Lazy:
    """A codec defined later (recursive or forward references)."""

    def __init__(self, fn):
        self.fn = fn

    def enc(self, v):
        return self.fn().enc(v)

    def dec(self, r):
        return self.fn().dec(r)


def when(field: str, cases: dict):
    """`select (field) { case a: ...; }`; a missing case means no bytes (`struct {}`)."""

    def pick(ctx):
        return cases.get(ctx.get(field))

    return pick


# ---------------------------------------------------------------------------------------
# RFC 9420 (MLS) structs that MIMI bodies embed


ProtocolVersion = Enum("ProtocolVersion", {"reserved": 0, "mls10": 1}, size=2)
CipherSuite = U16
ExtensionType = U16
ProposalType = U16
CredentialType = U16
HPKEPublicKey = Opaque()
SignaturePublicKey = Opaque()

WireFormat = Enum("WireFormat", {
    "mls_public_message": 1, "mls_private_message": 2, "mls_welcome": 3,
    "mls_group_info": 4, "mls_key_package": 5}, size=2)
ContentType = Enum("ContentType", {"application": 1, "proposal": 2, "commit": 3})
SenderType = Enum("SenderType", {"member": 1, "external": 2, "new_member_proposal": 3,
                                 "new_member_commit": 4})
LeafNodeSource = Enum("LeafNodeSource", {"key_package": 1, "update": 2, "commit": 3})

Extension = Struct("Extension", [("extension_type", ExtensionType), ("extension_data", Opaque())])

Certificate = Struct("Certificate", [("cert_data", Opaque())])
Credential = Struct("Credential", [
    ("credential_type", Enum("CredentialType", {"basic": 1, "x509": 2}, size=2)),
    ("identity", when("credential_type", {"basic": Opaque()})),
    ("certificates", when("credential_type", {"x509": Vec(Certificate)})),
])

Capabilities = Struct("Capabilities", [
    ("versions", Vec(U16)),
    ("cipher_suites", Vec(CipherSuite)),
    ("extensions", Vec(ExtensionType)),
    ("proposals", Vec(ProposalType)),
    ("credentials", Vec(CredentialType)),
])

RequiredCapabilities = Struct("RequiredCapabilities", [
    ("extension_types", Vec(ExtensionType)),
    ("proposal_types", Vec(ProposalType)),
    ("credential_types", Vec(CredentialType)),
])

Lifetime = Struct("Lifetime", [("not_before", U64), ("not_after", U64)])

LeafNode = Struct("LeafNode", [
    ("encryption_key", HPKEPublicKey),
    ("signature_key", SignaturePublicKey),
    ("credential", Credential),
    ("capabilities", Capabilities),
    ("leaf_node_source", LeafNodeSource),
    ("lifetime", when("leaf_node_source", {"key_package": Lifetime})),
    ("parent_hash", when("leaf_node_source", {"commit": Opaque()})),
    ("extensions", Vec(Extension)),
    ("signature", Opaque()),
])

KeyPackage = Struct("KeyPackage", [
    ("version", ProtocolVersion),
    ("cipher_suite", CipherSuite),
    ("init_key", HPKEPublicKey),
    ("leaf_node", LeafNode),
    ("extensions", Vec(Extension)),
    ("signature", Opaque()),
])

ParentNode = Struct("ParentNode", [
    ("encryption_key", HPKEPublicKey),
    ("parent_hash", Opaque()),
    ("unmerged_leaves", Vec(U32)),
])
Node = Struct("Node", [
    ("node_type", Enum("NodeType", {"leaf": 1, "parent": 2})),
    ("leaf_node", when("node_type", {"leaf": LeafNode})),
    ("parent_node", when("node_type", {"parent": ParentNode})),
])
# RFC 9420 12.4.3.3: the ratchet_tree extension's contents.
RatchetTree = Vec(Optional(Node))

HPKECiphertext = Struct("HPKECiphertext", [("kem_output", Opaque()), ("ciphertext", Opaque())])

GroupContext = Struct("GroupContext", [
    ("version", ProtocolVersion),
    ("cipher_suite", CipherSuite),
    ("group_id", Opaque()),
    ("epoch", U64),
    ("tree_hash", Opaque()),
    ("confirmed_transcript_hash", Opaque()),
    ("extensions", Vec(Extension)),
])

GroupInfo = Struct("GroupInfo", [
    ("group_context", GroupContext),
    ("extensions", Vec(Extension)),
    ("confirmation_tag", Opaque()),
    ("signer", U32),
    ("signature", Opaque()),
])

EncryptedGroupSecrets = Struct("EncryptedGroupSecrets", [
    ("new_member", Opaque()),  # KeyPackageRef = opaque HashReference<V>
    ("encrypted_group_secrets", HPKECiphertext),
])
Welcome = Struct("Welcome", [
    ("cipher_suite", CipherSuite),
    ("secrets", Vec(EncryptedGroupSecrets)),
    ("encrypted_group_info", Opaque()),
])

PreSharedKeyID = Struct("PreSharedKeyID", [
    ("psktype", Enum("PSKType", {"external": 1, "resumption": 2})),
    ("psk_id", when("psktype", {"external": Opaque()})),
    ("usage", when("psktype", {"resumption": Enum("ResumptionPSKUsage",
                                                  {"application": 1, "reinit": 2, "branch": 3})})),
    ("psk_group_id", when("psktype", {"resumption": Opaque()})),
    ("psk_epoch", when("psktype", {"resumption": U64})),
    ("psk_nonce", Opaque()),
])

Proposal = Struct("Proposal", [
    ("proposal_type", Enum("ProposalType", {
        "add": 1, "update": 2, "remove": 3, "psk": 4, "reinit": 5, "external_init": 6,
        "group_context_extensions": 7}, size=2)),
    ("key_package", when("proposal_type", {"add": KeyPackage})),
    ("leaf_node", when("proposal_type", {"update": LeafNode})),
    ("removed", when("proposal_type", {"remove": U32})),
    ("psk", when("proposal_type", {"psk": PreSharedKeyID})),
    ("reinit", when("proposal_type", {"reinit": Struct("ReInit", [
        ("group_id", Opaque()), ("version", ProtocolVersion), ("cipher_suite", CipherSuite),
        ("extensions", Vec(Extension))])})),
    ("kem_output", when("proposal_type", {"external_init": Opaque()})),
    ("extensions", when("proposal_type", {"group_context_extensions": Vec(Extension)})),
])

ProposalOrRef = Struct("ProposalOrRef", [
    ("type", Enum("ProposalOrRefType", {"proposal": 1, "reference": 2})),
    ("proposal", when("type", {"proposal": Proposal})),
    ("reference", when("type", {"reference": Opaque()})),
])

UpdatePathNode = Struct("UpdatePathNode", [
    ("encryption_key", HPKEPublicKey),
    ("encrypted_path_secret", Vec(HPKECiphertext)),
])
UpdatePath = Struct("UpdatePath", [("leaf_node", LeafNode), ("nodes", Vec(UpdatePathNode))])
Commit = Struct("Commit", [("proposals", Vec(ProposalOrRef)), ("path", Optional(UpdatePath))])

Sender = Struct("Sender", [
    ("sender_type", SenderType),
    ("leaf_index", when("sender_type", {"member": U32})),
    ("sender_index", when("sender_type", {"external": U32})),
])

FramedContent = Struct("FramedContent", [
    ("group_id", Opaque()),
    ("epoch", U64),
    ("sender", Sender),
    ("authenticated_data", Opaque()),
    ("content_type", ContentType),
    ("application_data", when("content_type", {"application": Opaque()})),
    ("proposal", when("content_type", {"proposal": Proposal})),
    ("commit", when("content_type", {"commit": Commit})),
])


PublicMessage = Struct("PublicMessage", [
    ("content", FramedContent),
    # FramedContentAuthData
    ("signature", Opaque()),
    ("confirmation_tag", lambda v: Opaque() if v["content"]["content_type"] == "commit" else None),
    ("membership_tag", lambda v: Opaque() if v["content"]["sender"]["sender_type"] == "member" else None),
])

PrivateMessage = Struct("PrivateMessage", [
    ("group_id", Opaque()),
    ("epoch", U64),
    ("content_type", ContentType),
    ("authenticated_data", Opaque()),
    ("encrypted_sender_data", Opaque()),
    ("ciphertext", Opaque()),
])

MLSMessage = Struct("MLSMessage", [
    ("version", ProtocolVersion),
    ("wire_format", WireFormat),
    ("public_message", when("wire_format", {"mls_public_message": PublicMessage})),
    ("private_message", when("wire_format", {"mls_private_message": PrivateMessage})),
    ("welcome", when("wire_format", {"mls_welcome": Welcome})),
    ("group_info", when("wire_format", {"mls_group_info": GroupInfo})),
    ("key_package", when("wire_format", {"mls_key_package": KeyPackage})),
])


def mls_kind(msg: dict) -> str:
    """What a MIMI select on an MLSMessage sees: its content type, or `welcome`."""
    wf = msg["wire_format"]
    if wf == "mls_public_message":
        return msg["public_message"]["content"]["content_type"]
    if wf == "mls_private_message":
        return msg["private_message"]["content_type"]
    if wf == "mls_welcome":
        return "welcome"
    return wf


# ---------------------------------------------------------------------------------------
# Companion drafts: ratchet-tree options, mls-extensions


RatchetTreeOption = Struct("RatchetTreeOption", [
    ("representation", Enum("RatchetTreeRepresentation", {
        "reserved": 0, "full": 1, "httpsUri": 2, "outOfBand": 3, "distributionService": 4})),
    ("ratchet_tree", when("representation", {"full": RatchetTree})),
    ("ratchet_tree_url", when("representation", {"httpsUri": Opaque()})),
    ("tree_signature", when("representation", {"httpsUri": Opaque(), "outOfBand": Opaque()})),
])

PartialGroupInfo = Struct("PartialGroupInfo", [
    ("ratchet_tree_presence", Enum("RatchetTreePresence", {
        "no_ratchet_tree": 0, "present": 1, "removed": 2, "added": 3})),
    ("group_info_extensions", Vec(Extension)),
    ("signature", Opaque()),
])

ComponentData = Struct("ComponentData", [("component_id", U16), ("data", Opaque())])
AppDataDictionary = Struct("AppDataDictionary", [("component_data", Vec(ComponentData))])


# ---------------------------------------------------------------------------------------
# draft-ietf-mimi-protocol-06 section 5


Protocol = Enum("Protocol", {"reserved": 0, "mls10": 1})
IdentifierUri = Struct("IdentifierUri", [("uri", Utf8())])
ExternalSender = Struct("ExternalSender", [("signature_key", SignaturePublicKey),
                                           ("credential", Credential)])
Frank = Struct("Frank", [
    ("server_frank", Fixed(32)),
    ("franking_signature_ciphersuite", CipherSuite),
    ("franking_integrity_signature", Opaque()),
])

# 5.2 Fetch key material
KeyMaterialRequest = Struct("KeyMaterialRequest", [
    ("protocol", Protocol),
    ("requestingUser", IdentifierUri),
    ("targetUser", IdentifierUri),
    ("roomId", IdentifierUri),
    ("acceptableCiphersuites", when("protocol", {"mls10": Vec(CipherSuite)})),
    ("requiredCapabilities", when("protocol", {"mls10": RequiredCapabilities})),
    ("requesterSignatureKey", when("protocol", {"mls10": SignaturePublicKey})),
    ("requesterCredential", when("protocol", {"mls10": Credential})),
    ("key_material_request_signature", when("protocol", {"mls10": Opaque()})),
])

KeyMaterialUserCode = Enum("KeyMaterialUserCode", {
    "success": 0, "partialSuccess": 1, "incompatibleProtocol": 2, "noCompatibleMaterial": 3,
    "userUnknown": 4, "noConsent": 5, "noConsentForThisRoom": 6, "userDeleted": 7})
KeyMaterialClientCode = Enum("KeyMaterialClientCode", {
    "success": 0, "keyMaterialExhausted": 1, "nothingCompatible": 2})
# protocol comes from the enclosing KeyMaterialResponse (mls10 only).
ClientKeyMaterial = Struct("ClientKeyMaterial", [
    ("clientStatus", KeyMaterialClientCode),
    ("clientUri", IdentifierUri),
    ("keyPackage", when("clientStatus", {"success": KeyPackage})),
    ("clientCapabilities", when("clientStatus", {"nothingCompatible": Optional(Capabilities)})),
])
KeyMaterialResponse = Struct("KeyMaterialResponse", [
    ("protocol", Protocol),
    ("userStatus", KeyMaterialUserCode),
    ("userUri", IdentifierUri),
    ("clients", Vec(ClientKeyMaterial)),
])

# 5.3 Update room state
GroupInfoOption = Struct("GroupInfoOption", [
    ("representation", Enum("GroupInfoRepresentation", {"reserved": 0, "full": 1, "partial": 2})),
    ("groupInfo", when("representation", {"full": GroupInfo})),
    ("partialGroupInfo", when("representation", {"partial": PartialGroupInfo})),
])


def _bundle_tail(kind_cases):
    def pick(ctx):
        return kind_cases.get(mls_kind(ctx["proposalOrCommit"]))
    return pick


HandshakeBundle = Struct("HandshakeBundle", [
    ("proposalOrCommit", MLSMessage),
    ("welcome", _bundle_tail({"commit": Optional(Welcome)})),
    ("groupInfoOption", _bundle_tail({"commit": GroupInfoOption})),
    ("ratchetTreeOption", _bundle_tail({"commit": RatchetTreeOption})),
    ("moreProposals", _bundle_tail({"proposal": Vec(MLSMessage)})),
])
# select (room.protocol) { case mls10: HandshakeBundle bundle; }: nothing else on the wire.
UpdateRequest = Struct("UpdateRequest", [("bundle", HandshakeBundle)])

UpdateResponseCode = Enum("UpdateResponseCode", {
    "success": 0, "wrongEpoch": 1, "notAllowed": 2, "invalidProposal": 3})
UpdateRoomResponse = Struct("UpdateRoomResponse", [
    ("responseCode", UpdateResponseCode),
    ("errorDescription", Utf8()),
    ("accepted_timestamp", when("responseCode", {"success": U64})),
    ("currentEpoch", when("responseCode", {"wrongEpoch": U64})),
    ("invalidProposals", when("responseCode", {"invalidProposal": Vec(Opaque())})),
])

# 5.4 Submit a message
SubmitMessageRequest = Struct("SubmitMessageRequest", [
    ("protocol", Protocol),
    ("appMessage", when("protocol", {"mls10": MLSMessage})),
    ("sendingUri", when("protocol", {"mls10": IdentifierUri})),
])
SubmitResponseCode = Enum("SubmitResponseCode", {"accepted": 0, "notAllowed": 1, "epochTooOld": 2})
SubmitMessageResponse = Struct("SubmitMessageResponse", [
    ("protocol", Protocol),
    ("statusCode", when("protocol", {"mls10": SubmitResponseCode})),
    ("accepted_timestamp", when("statusCode", {"accepted": U64})),
    ("frank", when("statusCode", {"accepted": Optional(Frank)})),
    ("currentEpoch", when("statusCode", {"epochTooOld": U64})),
])

# 5.5 Fanout


def _fanout_tail(kind_cases):
    def pick(ctx):
        return kind_cases.get(mls_kind(ctx["message"]))
    return pick


FanoutMessage = Struct("FanoutMessage", [
    ("timestamp", U64),
    ("message", MLSMessage),
    ("frank", _fanout_tail({"application": Optional(Frank)})),
    ("ratchetTreeOption", _fanout_tail({"welcome": RatchetTreeOption})),
    ("moreProposals", _fanout_tail({"proposal": Vec(MLSMessage)})),
    ("externalProposals", _fanout_tail({"commit": Vec(MLSMessage)})),
])

# 5.6 Claim group key information
GroupInfoRequest = Struct("GroupInfoRequest", [
    ("protocol", Protocol),
    ("cipher_suite", when("protocol", {"mls10": CipherSuite})),
    ("requestingSignatureKey", when("protocol", {"mls10": SignaturePublicKey})),
    ("requestingCredential", when("protocol", {"mls10": Credential})),
    ("groupInfoPublicKey", when("protocol", {"mls10": HPKEPublicKey})),
    ("joiningCode", when("protocol", {"mls10": Opaque()})),
    ("signature", when("protocol", {"mls10": Opaque()})),
])
GroupInfoCode = Enum("GroupInfoCode", {"reserved": 0, "success": 1, "notAuthorized": 2,
                                       "noSuchRoom": 3})
PendingProposal = Struct("PendingProposal", [("proposal", MLSMessage), ("hub_accepted_time", U64)])
GroupInfoRatchetTreeTBE = Struct("GroupInfoRatchetTreeTBE", [
    ("groupInfo", GroupInfo),
    ("ratchetTreeOption", RatchetTreeOption),
    ("pending_proposals", Vec(PendingProposal)),
])


def _gi_success(codec):
    return lambda v: codec if v["status"] == "success" and v["version"] == "mls10" else None


GroupInfoResponse = Struct("GroupInfoResponse", [
    ("version", Protocol),
    ("room_id", Opaque()),
    ("status", GroupInfoCode),
    ("cipher_suite", _gi_success(CipherSuite)),
    ("hub_sender", _gi_success(ExternalSender)),
    ("encrypted_groupinfo_and_tree", _gi_success(HPKECiphertext)),
    ("signature", _gi_success(Opaque())),
])

# 5.7 Consent
ConsentOperation = Enum("ConsentOperation", {"cancel": 0, "request": 1, "grant": 2, "revoke": 3})
ConsentEntry = Struct("ConsentEntry", [
    ("consentOperation", ConsentOperation),
    ("requesterUri", IdentifierUri),
    ("targetUri", IdentifierUri),
    ("roomId", Optional(IdentifierUri)),
    ("clientKeyPackages", when("consentOperation", {"grant": Vec(KeyPackage)})),
    ("consent_extensions", AppDataDictionary),
])
ConsentScope = Struct("ConsentScope", [
    ("requesterUri", IdentifierUri),
    ("targetUri", IdentifierUri),
    ("roomId", Optional(IdentifierUri)),
])

# 5.8 Identifier query
SearchIdentifierType = Enum("SearchIdentifierType", {
    "reserved": 0, "handle": 1, "nick": 2, "email": 3, "phone": 4, "partialName": 5,
    "wholeProfile": 6, "oidcStdClaim": 7, "vcardField": 8})
QueryElement = Struct("QueryElement", [
    ("searchType", SearchIdentifierType),
    ("claimName", when("searchType", {"oidcStdClaim": Opaque()})),
    ("propertyName", when("searchType", {"vcardField": Opaque()})),
    ("searchValue", Opaque()),
])
IdentifierRequest = Struct("IdentifierRequest", [
    ("query_elements", Vec(QueryElement)),
    ("id_request_extensions", AppDataDictionary),
])
IdentifierQueryCode = Enum("IdentifierQueryCode", {
    "success": 0, "notFound": 1, "ambiguous": 2, "forbidden": 3, "unsupportedField": 4})
FieldSource = Enum("FieldSource", {"reserved": 0, "oidcStdClaim": 7, "vcardField": 8})
ProfileField = Struct("ProfileField", [
    ("fieldSource", FieldSource),
    ("fieldName", Utf8()),
    ("fieldValue", Opaque()),
])
UserProfile = Struct("UserProfile", [("stableUri", IdentifierUri), ("fields", Vec(ProfileField))])
IdentifierResponse = Struct("IdentifierResponse", [
    ("responseCode", IdentifierQueryCode),
    ("uri", Vec(IdentifierUri)),
    ("foundProfiles", Vec(UserProfile)),
    ("id_response_extensions", AppDataDictionary),
])

# 5.9 Report abuse
AbusiveMessage = Struct("AbusiveMessage", [
    ("message_content", Opaque()),
    ("frank", Frank),
    ("accepted_timestamp", U64),
])
AbuseReport = Struct("AbuseReport", [
    ("reportingUser", IdentifierUri),
    ("allegedAbuserUri", IdentifierUri),
    ("reasonCode", Enum("AbuseType", {"reserved": 0})),
    ("note", Opaque()),
    ("messages", Vec(AbusiveMessage)),
    ("abuse_extensions", AppDataDictionary),
])


# The section 5 bodies, by the draft's names.
BODIES = {
    "KeyMaterialRequest": KeyMaterialRequest,
    "KeyMaterialResponse": KeyMaterialResponse,
    "UpdateRequest": UpdateRequest,
    "UpdateRoomResponse": UpdateRoomResponse,
    "SubmitMessageRequest": SubmitMessageRequest,
    "SubmitMessageResponse": SubmitMessageResponse,
    "FanoutMessage": FanoutMessage,
    "GroupInfoRequest": GroupInfoRequest,
    "GroupInfoResponse": GroupInfoResponse,
    "GroupInfoRatchetTreeTBE": GroupInfoRatchetTreeTBE,
    "ConsentEntry": ConsentEntry,
    "ConsentScope": ConsentScope,
    "IdentifierRequest": IdentifierRequest,
    "IdentifierResponse": IdentifierResponse,
    "AbuseReport": AbuseReport,
}


def encode(struct: str, value) -> bytes:
    return BODIES[struct].enc(value)


def decode(struct: str, data: bytes):
    """Decode a whole body; trailing bytes are an error."""
    r = Reader(data)
    v = BODIES[struct].dec(r)
    if not r.done():
        raise DecodeError(f"{struct}: {len(r.data) - r.pos} trailing bytes")
    return v


def decode_fanout_sequence(data: bytes) -> list:
    """/notify may carry several FanoutMessages back to back (section 5.5)."""
    r = Reader(data)
    out = []
    while not r.done():
        out.append(FanoutMessage.dec(r))
    return out


def canonical_json(v) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))
