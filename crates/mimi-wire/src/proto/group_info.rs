//! §5.6 Claim group key information.

use super::{
    Credential, ExternalSender, GroupInfo, HpkeCiphertext, MlsMessage, Protocol, RatchetTreeOption,
    VLBytes, code_enum, put_vlbytes, read_vlbytes,
};
use crate::codec::{Decode, Encode, Reader, Writer, decode_list, encode_list, wire_type};
use crate::error::WireError;

/// `GroupInfoRequest` (mls10 arm). The draft's TBS makes `joiningCode` optional while the
/// request does not; we follow the request: a plain `opaque joiningCode<V>`, empty if unused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfoRequest {
    /// `protocol`
    pub protocol: Protocol,
    /// `cipher_suite`
    pub cipher_suite: u16,
    /// `requestingSignatureKey` contents
    pub requesting_signature_key: VLBytes,
    /// `requestingCredential`
    pub requesting_credential: Credential,
    /// `groupInfoPublicKey` (HPKEPublicKey contents)
    pub group_info_public_key: VLBytes,
    /// `joiningCode`
    pub joining_code: VLBytes,
    /// `signature`
    pub signature: VLBytes,
}

impl GroupInfoRequest {
    /// `GroupInfoRequestTBS`: the request without its signature. `joiningCode` is encoded as
    /// the TBS's `optional` (absent when empty).
    pub fn tbs(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.protocol.encode_to(&mut out)?;
        out.put_u16(self.cipher_suite);
        put_vlbytes(&mut out, &self.requesting_signature_key)?;
        self.requesting_credential.encode_to(&mut out)?;
        put_vlbytes(&mut out, &self.group_info_public_key)?;
        if self.joining_code.as_slice().is_empty() {
            out.push(0);
        } else {
            out.push(1);
            put_vlbytes(&mut out, &self.joining_code)?;
        }
        Ok(out)
    }
}

impl<'a> Decode<'a> for GroupInfoRequest {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(GroupInfoRequest {
            protocol: Protocol::read(r)?,
            cipher_suite: r.u16()?,
            requesting_signature_key: read_vlbytes(r, "requestingSignatureKey")?,
            requesting_credential: Credential::decode_from(r)?,
            group_info_public_key: read_vlbytes(r, "groupInfoPublicKey")?,
            joining_code: read_vlbytes(r, "joiningCode")?,
            signature: read_vlbytes(r, "signature")?,
        })
    }
}

impl Encode for GroupInfoRequest {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.protocol.encode_to(out)?;
        out.put_u16(self.cipher_suite);
        put_vlbytes(out, &self.requesting_signature_key)?;
        self.requesting_credential.encode_to(out)?;
        put_vlbytes(out, &self.group_info_public_key)?;
        put_vlbytes(out, &self.joining_code)?;
        put_vlbytes(out, &self.signature)
    }
}
wire_type!(GroupInfoRequest);

code_enum!(
    /// `GroupInfoCode` (§5.6).
    GroupInfoCode, "group info code" {
        /// `success(1)`
        Success = 1,
        /// `notAuthorized(2)`
        NotAuthorized = 2,
        /// `noSuchRoom(3)`
        NoSuchRoom = 3,
    }
);

/// The status-specific part of a [`GroupInfoResponse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupInfoStatus {
    /// `success` (mls10 arm)
    Success {
        /// `cipher_suite`
        cipher_suite: u16,
        /// `hub_sender`
        hub_sender: ExternalSender,
        /// `encrypted_groupinfo_and_tree`
        encrypted_groupinfo_and_tree: HpkeCiphertext,
        /// `signature`
        signature: VLBytes,
    },
    /// `notAuthorized`
    NotAuthorized,
    /// `noSuchRoom`
    NoSuchRoom,
}

/// `GroupInfoResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfoResponse {
    /// `version` (a Protocol)
    pub protocol: Protocol,
    /// `room_id<V>`
    pub room_id: VLBytes,
    /// `status` and its fields.
    pub status: GroupInfoStatus,
}

impl GroupInfoResponse {
    /// The status code.
    pub fn code(&self) -> GroupInfoCode {
        match self.status {
            GroupInfoStatus::Success { .. } => GroupInfoCode::Success,
            GroupInfoStatus::NotAuthorized => GroupInfoCode::NotAuthorized,
            GroupInfoStatus::NoSuchRoom => GroupInfoCode::NoSuchRoom,
        }
    }
}

impl GroupInfoResponse {
    /// `GroupInfoResponseTBS` of a success: the response without its signature. `None` for
    /// the other codes (they carry no signature).
    pub fn tbs(&self) -> Result<Option<Vec<u8>>, WireError> {
        let GroupInfoStatus::Success {
            cipher_suite,
            hub_sender,
            encrypted_groupinfo_and_tree,
            ..
        } = &self.status
        else {
            return Ok(None);
        };
        let mut out = Vec::new();
        self.protocol.encode_to(&mut out)?;
        put_vlbytes(&mut out, &self.room_id)?;
        self.code().encode_to(&mut out)?;
        out.put_u16(*cipher_suite);
        hub_sender.encode_to(&mut out)?;
        encrypted_groupinfo_and_tree.encode_to(&mut out)?;
        Ok(Some(out))
    }
}

impl<'a> Decode<'a> for GroupInfoResponse {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let protocol = Protocol::read(r)?;
        let room_id = read_vlbytes(r, "room_id")?;
        let status = match GroupInfoCode::decode_from(r)? {
            GroupInfoCode::Success => GroupInfoStatus::Success {
                cipher_suite: r.u16()?,
                hub_sender: ExternalSender::decode_from(r)?,
                encrypted_groupinfo_and_tree: HpkeCiphertext::decode_from(r)?,
                signature: read_vlbytes(r, "signature")?,
            },
            GroupInfoCode::NotAuthorized => GroupInfoStatus::NotAuthorized,
            GroupInfoCode::NoSuchRoom => GroupInfoStatus::NoSuchRoom,
        };
        Ok(GroupInfoResponse {
            protocol,
            room_id,
            status,
        })
    }
}

impl Encode for GroupInfoResponse {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.protocol.encode_to(out)?;
        put_vlbytes(out, &self.room_id)?;
        self.code().encode_to(out)?;
        if let GroupInfoStatus::Success {
            cipher_suite,
            hub_sender,
            encrypted_groupinfo_and_tree,
            signature,
        } = &self.status
        {
            out.put_u16(*cipher_suite);
            hub_sender.encode_to(out)?;
            encrypted_groupinfo_and_tree.encode_to(out)?;
            put_vlbytes(out, signature)?;
        }
        Ok(())
    }
}
wire_type!(GroupInfoResponse);

/// `PendingProposal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingProposal {
    /// `proposal`
    pub proposal: MlsMessage,
    /// `hub_accepted_time`
    pub hub_accepted_time: u64,
}

impl<'a> Decode<'a> for PendingProposal {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(PendingProposal {
            proposal: MlsMessage::decode_from(r)?,
            hub_accepted_time: r.u64()?,
        })
    }
}

impl Encode for PendingProposal {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.proposal.encode_to(out)?;
        out.put_u64(self.hub_accepted_time);
        Ok(())
    }
}
wire_type!(PendingProposal);

/// `GroupInfoRatchetTreeTBE`: the plaintext HPKE-encrypted to the requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfoRatchetTreeTbe {
    /// `groupInfo` (without embedded ratchet_tree)
    pub group_info: GroupInfo,
    /// `ratchetTreeOption`
    pub ratchet_tree_option: RatchetTreeOption,
    /// `pending_proposals<V>`
    pub pending_proposals: Vec<PendingProposal>,
}

impl<'a> Decode<'a> for GroupInfoRatchetTreeTbe {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(GroupInfoRatchetTreeTbe {
            group_info: GroupInfo::decode_from(r)?,
            ratchet_tree_option: RatchetTreeOption::decode_from(r)?,
            pending_proposals: decode_list(r, "pending_proposals")?,
        })
    }
}

impl Encode for GroupInfoRatchetTreeTbe {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.group_info.encode_to(out)?;
        self.ratchet_tree_option.encode_to(out)?;
        encode_list(out, &self.pending_proposals)
    }
}
wire_type!(GroupInfoRatchetTreeTbe);
