//! §5.3 Update room state: `UpdateRequest` / `HandshakeBundle` and `UpdateRoomResponse`.

use super::{
    GroupInfoOption, MlsMessage, RatchetTreeOption, VLBytes, Welcome, code_enum, put_opt,
    put_vlbytes, read_messages, read_opt, read_vlbytes,
};
use crate::codec::{Decode, Encode, Reader, Writer, decode_list, encode_list, wire_type};
use crate::error::WireError;
use crate::mls::{ContentType, WireFormat};

/// `HandshakeBundle`: a proposal or commit plus what the hub needs alongside it. The
/// variant is the `content_type` of the leading MLSMessage, which must be a public or
/// private message (SemiPrivateMessage has no wire format code yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeBundle {
    /// `case commit`
    Commit {
        /// The commit.
        commit: MlsMessage,
        /// `optional<Welcome> welcome` (bare Welcome struct, without ratchet_tree).
        welcome: Option<Welcome>,
        /// `GroupInfoOption groupInfoOption`
        group_info_option: GroupInfoOption,
        /// `RatchetTreeOption ratchetTreeOption`
        ratchet_tree_option: RatchetTreeOption,
    },
    /// `case proposal`
    Proposal {
        /// The proposal.
        proposal: MlsMessage,
        /// `MLSMessage moreProposals<V>`
        more_proposals: Vec<MlsMessage>,
    },
}

impl HandshakeBundle {
    /// The leading proposal or commit.
    pub fn message(&self) -> &MlsMessage {
        match self {
            HandshakeBundle::Commit { commit, .. } => commit,
            HandshakeBundle::Proposal { proposal, .. } => proposal,
        }
    }
}

fn handshake_content_type(m: &MlsMessage) -> Result<ContentType, WireError> {
    match (m.wire_format(), m.content_type()) {
        (WireFormat::PublicMessage | WireFormat::PrivateMessage, Some(ct)) => Ok(ct),
        _ => Err(WireError::BadValue {
            what: "proposalOrCommit wire format",
        }),
    }
}

impl<'a> Decode<'a> for HandshakeBundle {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let message = MlsMessage::decode_from(r)?;
        match handshake_content_type(&message)? {
            ContentType::Commit => Ok(HandshakeBundle::Commit {
                commit: message,
                welcome: read_opt(r, "welcome presence")?,
                group_info_option: GroupInfoOption::decode_from(r)?,
                ratchet_tree_option: RatchetTreeOption::decode_from(r)?,
            }),
            ContentType::Proposal => Ok(HandshakeBundle::Proposal {
                proposal: message,
                more_proposals: read_messages(r, "moreProposals")?,
            }),
            ContentType::Application => Err(WireError::BadValue {
                what: "proposalOrCommit content type",
            }),
        }
    }
}

impl Encode for HandshakeBundle {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            HandshakeBundle::Commit {
                commit,
                welcome,
                group_info_option,
                ratchet_tree_option,
            } => {
                if handshake_content_type(commit)? != ContentType::Commit {
                    return Err(WireError::BadValue {
                        what: "commit content type",
                    });
                }
                commit.encode_to(out)?;
                put_opt(out, welcome)?;
                group_info_option.encode_to(out)?;
                ratchet_tree_option.encode_to(out)
            }
            HandshakeBundle::Proposal {
                proposal,
                more_proposals,
            } => {
                if handshake_content_type(proposal)? != ContentType::Proposal {
                    return Err(WireError::BadValue {
                        what: "proposal content type",
                    });
                }
                proposal.encode_to(out)?;
                encode_list(out, more_proposals)
            }
        }
    }
}
wire_type!(HandshakeBundle);

/// `UpdateRequest`: for mls10 exactly a [`HandshakeBundle`] (no protocol byte on the wire).
/// The hub can read the leading message's group id and epoch without decoding the rest
/// with [`crate::mls::MlsMessageView::parse_prefix`] on the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRequest {
    /// The bundle.
    pub bundle: HandshakeBundle,
}

impl<'a> Decode<'a> for UpdateRequest {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(UpdateRequest {
            bundle: HandshakeBundle::decode_from(r)?,
        })
    }
}

impl Encode for UpdateRequest {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.bundle.encode_to(out)
    }
}
wire_type!(UpdateRequest);

code_enum!(
    /// `UpdateResponseCode` (§5.3).
    UpdateResponseCode, "update response code" {
        /// `success(0)`
        Success = 0,
        /// `wrongEpoch(1)`
        WrongEpoch = 1,
        /// `notAllowed(2)`
        NotAllowed = 2,
        /// `invalidProposal(3)`
        InvalidProposal = 3,
    }
);

/// The code-specific part of an [`UpdateRoomResponse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// `success`: hub acceptance time, ms since the UNIX epoch.
    Success {
        /// `accepted_timestamp`
        accepted_timestamp: u64,
    },
    /// `wrongEpoch`: the hub's current epoch.
    WrongEpoch {
        /// `currentEpoch`
        current_epoch: u64,
    },
    /// `notAllowed`
    NotAllowed,
    /// `invalidProposal`: `ProposalRef invalidProposals<V>`, each ref's contents.
    InvalidProposal {
        /// The refs.
        invalid_proposals: Vec<VLBytes>,
    },
}

/// `UpdateRoomResponse` (§5.3). Wire order: code, `errorDescription`, then the outcome's
/// fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRoomResponse {
    /// `string errorDescription` (may be empty).
    pub error_description: String,
    /// Code and its fields.
    pub outcome: UpdateOutcome,
}

impl UpdateRoomResponse {
    /// Accepted at `accepted_timestamp` ms.
    pub fn success(accepted_timestamp: u64) -> Self {
        UpdateRoomResponse {
            error_description: String::new(),
            outcome: UpdateOutcome::Success { accepted_timestamp },
        }
    }

    /// Rejected: the hub is at `current_epoch`.
    pub fn wrong_epoch(current_epoch: u64) -> Self {
        UpdateRoomResponse {
            error_description: "wrong epoch".into(),
            outcome: UpdateOutcome::WrongEpoch { current_epoch },
        }
    }

    /// Rejected by policy.
    pub fn not_allowed(description: impl Into<String>) -> Self {
        UpdateRoomResponse {
            error_description: description.into(),
            outcome: UpdateOutcome::NotAllowed,
        }
    }

    /// The response code.
    pub fn code(&self) -> UpdateResponseCode {
        match self.outcome {
            UpdateOutcome::Success { .. } => UpdateResponseCode::Success,
            UpdateOutcome::WrongEpoch { .. } => UpdateResponseCode::WrongEpoch,
            UpdateOutcome::NotAllowed => UpdateResponseCode::NotAllowed,
            UpdateOutcome::InvalidProposal { .. } => UpdateResponseCode::InvalidProposal,
        }
    }
}

struct ProposalRef(VLBytes);

impl<'a> Decode<'a> for ProposalRef {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(ProposalRef(read_vlbytes(r, "proposal ref")?))
    }
}

impl<'a> Decode<'a> for UpdateRoomResponse {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let code = UpdateResponseCode::decode_from(r)?;
        let error_description = r.utf8("errorDescription")?.to_owned();
        let outcome = match code {
            UpdateResponseCode::Success => UpdateOutcome::Success {
                accepted_timestamp: r.u64()?,
            },
            UpdateResponseCode::WrongEpoch => UpdateOutcome::WrongEpoch {
                current_epoch: r.u64()?,
            },
            UpdateResponseCode::NotAllowed => UpdateOutcome::NotAllowed,
            UpdateResponseCode::InvalidProposal => UpdateOutcome::InvalidProposal {
                invalid_proposals: decode_list::<ProposalRef>(r, "invalidProposals")?
                    .into_iter()
                    .map(|p| p.0)
                    .collect(),
            },
        };
        Ok(UpdateRoomResponse {
            error_description,
            outcome,
        })
    }
}

impl Encode for UpdateRoomResponse {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.code().encode_to(out)?;
        out.put_vec(self.error_description.as_bytes())?;
        match &self.outcome {
            UpdateOutcome::Success { accepted_timestamp } => out.put_u64(*accepted_timestamp),
            UpdateOutcome::WrongEpoch { current_epoch } => out.put_u64(*current_epoch),
            UpdateOutcome::NotAllowed => {}
            UpdateOutcome::InvalidProposal { invalid_proposals } => {
                out.put_vec_with(|w| invalid_proposals.iter().try_for_each(|p| put_vlbytes(w, p)))?;
            }
        }
        Ok(())
    }
}
wire_type!(UpdateRoomResponse);
