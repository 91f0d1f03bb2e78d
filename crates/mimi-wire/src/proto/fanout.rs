//! §5.5 Fanout messages (`POST /notify/{roomId}`).
//!
//! The draft's select in FanoutMessage mixes labels: `application`, `proposal` and
//! `commit` are content types, `welcome` is a wire format. We read it as: a Welcome wire
//! format carries a `RatchetTreeOption`; a PublicMessage or PrivateMessage is then
//! selected by its content type. Other wire formats (GroupInfo, KeyPackage) are not
//! fanned out and are rejected.
//!
//! A fanout's receiver (a follower, a client) relays or stores what the hub ordered; it does
//! not validate it. So the MLS messages are read by their framing only
//! ([`MlsMessageView::parse_framing`]): a commit carrying a proposal type this reader does not
//! know is still taken, as long as it is delimited.

use super::{Frank, MlsMessage, RatchetTreeOption, put_opt, read_opt};
use crate::codec::{Decode, Encode, Reader, Writer, encode_list, wire_type};
use crate::error::{Limits, WireError};
use crate::mls::{ContentType, MlsMessageView, Walk, WireFormat};

/// Which select arm a message takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    Application,
    Welcome,
    Proposal,
    Commit,
}

fn arm(m: &MlsMessageView<'_>) -> Result<Arm, WireError> {
    match (m.wire_format, m.content_type) {
        (WireFormat::Welcome, _) => Ok(Arm::Welcome),
        (WireFormat::PublicMessage | WireFormat::PrivateMessage, Some(ct)) => Ok(match ct {
            ContentType::Application => Arm::Application,
            ContentType::Proposal => Arm::Proposal,
            ContentType::Commit => Arm::Commit,
        }),
        _ => Err(WireError::BadValue {
            what: "fanout message wire format",
        }),
    }
}

/// The select part of a [`FanoutMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FanoutExtra {
    /// Application message: `optional Frank frank`.
    Application {
        /// The hub's frank, if any.
        frank: Option<Frank>,
    },
    /// Welcome: `RatchetTreeOption ratchetTreeOption`.
    Welcome {
        /// How to get the tree.
        ratchet_tree_option: RatchetTreeOption,
    },
    /// Proposal: `MLSMessage moreProposals<V>`.
    Proposal {
        /// Further proposals.
        more_proposals: Vec<MlsMessage>,
    },
    /// Commit: `MLSMessage externalProposals<V>`.
    Commit {
        /// Hub proposals stapled to an external commit.
        external_proposals: Vec<MlsMessage>,
    },
}

impl FanoutExtra {
    fn arm(&self) -> Arm {
        match self {
            FanoutExtra::Application { .. } => Arm::Application,
            FanoutExtra::Welcome { .. } => Arm::Welcome,
            FanoutExtra::Proposal { .. } => Arm::Proposal,
            FanoutExtra::Commit { .. } => Arm::Commit,
        }
    }
}

/// `FanoutMessage` (owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanoutMessage {
    /// Hub acceptance time, ms since the UNIX epoch.
    pub timestamp: u64,
    /// The MLS message.
    pub message: MlsMessage,
    /// The select arm; must match the message's wire format / content type.
    pub extra: FanoutExtra,
}

fn read_extra(r: &mut Reader<'_>, arm: Arm) -> Result<FanoutExtra, WireError> {
    Ok(match arm {
        Arm::Application => FanoutExtra::Application {
            frank: read_opt(r, "frank presence")?,
        },
        Arm::Welcome => FanoutExtra::Welcome {
            ratchet_tree_option: RatchetTreeOption::decode_from(r)?,
        },
        Arm::Proposal => FanoutExtra::Proposal {
            more_proposals: read_framed_messages(r, "moreProposals")?,
        },
        Arm::Commit => FanoutExtra::Commit {
            external_proposals: read_framed_messages(r, "externalProposals")?,
        },
    })
}

/// Delimits the select part without building it.
fn skip_extra(r: &mut Reader<'_>, arm: Arm) -> Result<(), WireError> {
    let mut list = match arm {
        Arm::Application | Arm::Welcome => return read_extra(r, arm).map(drop),
        Arm::Proposal => r.sub_vec("moreProposals")?,
        Arm::Commit => r.sub_vec("externalProposals")?,
    };
    while !list.is_empty() {
        MlsMessageView::read_with(&mut list, Walk::Framing)?;
    }
    Ok(())
}

/// A `MLSMessage x<V>` vector, each element read by its framing.
fn read_framed_messages(
    r: &mut Reader<'_>,
    what: &'static str,
) -> Result<Vec<MlsMessage>, WireError> {
    let mut list = r.sub_vec(what)?;
    let mut out = Vec::new();
    while !list.is_empty() {
        out.push(MlsMessage::from_view(&MlsMessageView::read_with(
            &mut list,
            Walk::Framing,
        )?));
    }
    Ok(out)
}

impl<'a> Decode<'a> for FanoutMessage {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let timestamp = r.u64()?;
        let message = MlsMessage::from_view(&MlsMessageView::read_with(r, Walk::Framing)?);
        let extra = read_extra(r, arm(&message.view())?)?;
        Ok(FanoutMessage {
            timestamp,
            message,
            extra,
        })
    }
}

impl Encode for FanoutMessage {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        if arm(&self.message.view())? != self.extra.arm() {
            return Err(WireError::BadValue {
                what: "fanout select arm",
            });
        }
        out.put_u64(self.timestamp);
        self.message.encode_to(out)?;
        match &self.extra {
            FanoutExtra::Application { frank } => put_opt(out, frank),
            FanoutExtra::Welcome {
                ratchet_tree_option,
            } => ratchet_tree_option.encode_to(out),
            FanoutExtra::Proposal {
                more_proposals: list,
            }
            | FanoutExtra::Commit {
                external_proposals: list,
            } => encode_list(out, list),
        }
    }
}
wire_type!(FanoutMessage);

/// One FanoutMessage inside a /notify body, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutView<'a> {
    /// The whole FanoutMessage (timestamp, MLS message and select arm).
    pub bytes: &'a [u8],
    /// Hub acceptance time, ms since the UNIX epoch.
    pub timestamp: u64,
    /// The MLS message.
    pub message: MlsMessageView<'a>,
}

/// Append a FanoutMessage for an application message: `timestamp || mls_message || 0`
/// (no frank). `mls_message` is copied as is; the caller has validated it.
pub fn encode_fanout_application(timestamp_ms: u64, mls_message: &[u8], out: &mut Vec<u8>) {
    out.reserve(8 + mls_message.len() + 1);
    out.put_u64(timestamp_ms);
    out.extend_from_slice(mls_message);
    out.push(0);
}

/// Split a /notify body into its FanoutMessages, validating each. An empty body is
/// [`WireError::Truncated`]: the draft's body holds at least one message.
pub fn split_fanout_sequence<'a>(
    body: &'a [u8],
    limits: &Limits,
) -> Result<Vec<FanoutView<'a>>, WireError> {
    if body.len() > limits.max_body {
        return Err(WireError::TooLarge {
            what: "body",
            len: body.len(),
            max: limits.max_body,
        });
    }
    if body.is_empty() {
        return Err(WireError::Truncated);
    }
    let mut r = Reader::new(body, *limits);
    let mut out = Vec::new();
    while !r.is_empty() {
        if out.len() == limits.max_fanouts_per_body {
            return Err(WireError::TooLarge {
                what: "fanout messages per body",
                len: out.len() + 1,
                max: limits.max_fanouts_per_body,
            });
        }
        let start = r.position();
        let timestamp = r.u64()?;
        let message = MlsMessageView::read_with(&mut r, Walk::Framing)?;
        skip_extra(&mut r, arm(&message)?)?;
        out.push(FanoutView {
            bytes: r.since(start),
            timestamp,
            message,
        });
    }
    Ok(out)
}
