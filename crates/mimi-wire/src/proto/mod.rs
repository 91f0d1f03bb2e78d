//! MIMI protocol-06 §5 message bodies.
//!
//! Owned types for building, validating and testing bodies. Each has `decode` (whole input
//! consumed, [`Limits`](crate::Limits) enforced), `encode`, and the `tls_codec` traits
//! `Serialize`, `Size` and `DeserializeBytes`. (The `Read`-based `tls_codec::Deserialize` is
//! not offered: MLS objects embedded without a length prefix can only be delimited over a
//! slice.) The relay never re-encodes a body it forwards; for that it uses the zero-copy
//! [`SubmitMessageView`] and [`split_fanout_sequence`].
//!
//! Conventions used throughout, where the draft leaves things open:
//! * `opaque x<V>` and `T x<V>` use the MLS varint length (RFC 9420 §2.1.2).
//! * `string` is UTF-8 in an `opaque<V>`.
//! * MLS structs (`KeyPackage`, `Welcome`, `GroupInfo`, `Credential`, `Capabilities`,
//!   `RequiredCapabilities`, `MLSMessage`) are carried as their exact bytes, delimited and
//!   checked by [`crate::mls`]. MLS values that are themselves vectors
//!   (`SignaturePublicKey`, `HPKEPublicKey`, `ProposalRef`, extension lists, the
//!   `AppDataDictionary` component list, a ratchet tree's node list) are carried as the
//!   contents of that vector in a [`VLBytes`], unparsed.
//! * `select (protocol)` where no protocol field precedes it (UpdateRequest,
//!   FanoutMessage) is the room's protocol, which is always mls10 here: nothing is on the
//!   wire for it.

mod abuse;
mod consent;
mod fanout;
mod group_info;
mod identifier;
mod key_material;
pub mod room;
pub mod room_defaults;
mod submit;
mod update;

pub use abuse::{AbuseReport, AbusiveMessage};
pub use consent::{ConsentEntry, ConsentOperation, ConsentScope};
pub use fanout::{
    FanoutExtra, FanoutMessage, FanoutView, encode_fanout_application, split_fanout_sequence,
};
pub use group_info::{
    GroupInfoCode, GroupInfoRatchetTreeTbe, GroupInfoRequest, GroupInfoResponse, GroupInfoStatus,
    PendingProposal,
};
pub use identifier::{
    FieldSource, IdentifierQueryCode, IdentifierRequest, IdentifierResponse, ProfileField,
    QueryElement, SearchIdentifierType, UserProfile,
};
pub use key_material::{
    ClientKeyMaterial, ClientKeyMaterialStatus, KeyMaterialClientCode, KeyMaterialRequest,
    KeyMaterialResponse, KeyMaterialUserCode,
};
pub use submit::{
    SubmitMessageRequest, SubmitMessageResponse, SubmitMessageView, SubmitResponseCode,
    SubmitStatus,
};
pub use update::{
    HandshakeBundle, UpdateOutcome, UpdateRequest, UpdateResponseCode, UpdateRoomResponse,
};

pub use tls_codec::VLBytes;

use crate::codec::{Decode, Encode, Reader, Writer, wire_type};
use crate::error::WireError;
use crate::mls::{self, ContentType, MlsMessageView, WireFormat};
use crate::uri::{MimiUri, RoomId, UriError};

/// A one-byte enum of MIMI code points: unknown values are [`WireError::BadValue`].
macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident, $what:literal {
        $($(#[$vm:meta])* $var:ident = $val:literal),* $(,)?
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vm])* $var = $val),*
        }

        impl $name {
            /// The code point.
            pub fn as_u8(self) -> u8 {
                self as u8
            }

            /// Map a code point.
            pub fn from_u8(v: u8) -> Result<Self, $crate::WireError> {
                match v {
                    $($val => Ok(Self::$var),)*
                    _ => Err($crate::WireError::BadValue { what: $what }),
                }
            }
        }

        impl<'a> $crate::codec::Decode<'a> for $name {
            fn decode_from(r: &mut $crate::codec::Reader<'a>) -> Result<Self, $crate::WireError> {
                Self::from_u8(r.u8()?)
            }
        }

        impl $crate::codec::Encode for $name {
            fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), $crate::WireError> {
                out.push(self.as_u8());
                Ok(())
            }
        }

        $crate::codec::wire_type!($name);
    };
}
pub(crate) use code_enum;

code_enum!(
    /// `Protocol` (§5). Anything but mls10 is [`WireError::BadVersion`] when read as a
    /// protocol field.
    Protocol, "protocol" {
        /// MLS 1.0
        Mls10 = 1,
    }
);

impl Protocol {
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Protocol::from_u8(r.u8()?).map_err(|_| WireError::BadVersion)
    }
}

pub(crate) fn read_vlbytes(r: &mut Reader<'_>, what: &'static str) -> Result<VLBytes, WireError> {
    Ok(VLBytes::new(r.vec(what)?.to_vec()))
}

pub(crate) fn put_vlbytes(out: &mut Vec<u8>, v: &VLBytes) -> Result<(), WireError> {
    out.put_vec(v.as_slice())
}

/// `struct { opaque uri<V>; } IdentifierUri`, held as UTF-8 text. Its syntax is not checked
/// here (the draft admits other schemes); use [`IdentifierUri::mimi_uri`] for that.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentifierUri(String);

impl IdentifierUri {
    /// Wrap a URI string.
    pub fn new(uri: impl Into<String>) -> Self {
        IdentifierUri(uri.into())
    }

    /// The URI text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parse as a MIMI URI.
    pub fn mimi_uri(&self) -> Result<MimiUri, UriError> {
        MimiUri::parse(&self.0)
    }
}

impl From<&MimiUri> for IdentifierUri {
    fn from(u: &MimiUri) -> Self {
        IdentifierUri(u.as_str().to_owned())
    }
}

impl From<&RoomId> for IdentifierUri {
    fn from(r: &RoomId) -> Self {
        IdentifierUri(r.as_str().to_owned())
    }
}

impl<'a> Decode<'a> for IdentifierUri {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(IdentifierUri(r.utf8("identifier uri")?.to_owned()))
    }
}

impl Encode for IdentifierUri {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.put_vec(self.0.as_bytes())
    }
}
wire_type!(IdentifierUri);

/// An owned `MLSMessage`: its exact bytes plus the public fields read from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlsMessage {
    bytes: Vec<u8>,
    wire_format: WireFormat,
    /// Offset and length of the group id within `bytes`.
    group_id: Option<(usize, usize)>,
    epoch: Option<u64>,
    content_type: Option<ContentType>,
}

impl MlsMessage {
    /// Validate that `bytes` is exactly one MLSMessage.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, WireError> {
        Self::decode(&bytes)
    }

    fn from_view(view: &MlsMessageView<'_>) -> Self {
        let base = view.bytes.as_ptr() as usize;
        let group_id = view
            .group_id
            .map(|g| ((g.as_ptr() as usize).wrapping_sub(base), g.len()));
        MlsMessage {
            bytes: view.bytes.to_vec(),
            wire_format: view.wire_format,
            group_id,
            epoch: view.epoch,
            content_type: view.content_type,
        }
    }

    /// The exact bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Give back the bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The wire format.
    pub fn wire_format(&self) -> WireFormat {
        self.wire_format
    }

    /// The content type, for public and private messages.
    pub fn content_type(&self) -> Option<ContentType> {
        self.content_type
    }

    /// The epoch, where public.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// The group id, where public.
    pub fn group_id(&self) -> Option<&[u8]> {
        self.group_id
            .and_then(|(at, len)| self.bytes.get(at..at + len))
    }

    /// Borrow as a view.
    pub fn view(&self) -> MlsMessageView<'_> {
        MlsMessageView {
            bytes: &self.bytes,
            wire_format: self.wire_format,
            group_id: self.group_id(),
            epoch: self.epoch,
            content_type: self.content_type,
        }
    }
}

impl<'a> Decode<'a> for MlsMessage {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(MlsMessage::from_view(&MlsMessageView::read(r)?))
    }
}

impl Encode for MlsMessage {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.extend_from_slice(&self.bytes);
        Ok(())
    }
}
wire_type!(MlsMessage);

/// An MLS struct carried as its exact bytes, delimited by a [`crate::mls`] walker.
macro_rules! mls_bytes {
    ($(#[$m:meta])* $name:ident, $walk:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(Vec<u8>);

        impl $name {
            /// Validate that `bytes` is exactly one such struct.
            pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, WireError> {
                Self::decode(&bytes)
            }

            /// The exact bytes.
            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }

            /// Give back the bytes.
            pub fn into_bytes(self) -> Vec<u8> {
                self.0
            }
        }

        impl<'a> Decode<'a> for $name {
            fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
                Ok($name(mls::take(r, $walk)?.to_vec()))
            }
        }

        impl Encode for $name {
            fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
                out.extend_from_slice(&self.0);
                Ok(())
            }
        }
        wire_type!($name);
    };
}

mls_bytes!(
    /// An MLS `KeyPackage` struct (no MLSMessage header).
    KeyPackage, mls::key_package
);
mls_bytes!(
    /// An MLS `Welcome` struct (no MLSMessage header).
    Welcome, mls::welcome
);
mls_bytes!(
    /// An MLS `GroupInfo` struct (no MLSMessage header).
    GroupInfo, |r| mls::group_info(r).map(|_| ())
);
mls_bytes!(
    /// An MLS `Credential` (basic or x509).
    Credential, mls::credential
);
mls_bytes!(
    /// An MLS `Capabilities` struct.
    Capabilities, mls::capabilities
);
mls_bytes!(
    /// An MLS `RequiredCapabilities` extension body.
    RequiredCapabilities, mls::required_capabilities
);

/// `Frank` (§5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frank {
    /// `server_frank[32]`
    pub server_frank: [u8; 32],
    /// `franking_signature_ciphersuite`
    pub franking_signature_ciphersuite: u16,
    /// `franking_integrity_signature<V>`
    pub franking_integrity_signature: VLBytes,
}

impl<'a> Decode<'a> for Frank {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(Frank {
            server_frank: r.array()?,
            franking_signature_ciphersuite: r.u16()?,
            franking_integrity_signature: read_vlbytes(r, "franking_integrity_signature")?,
        })
    }
}

impl Encode for Frank {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.extend_from_slice(&self.server_frank);
        out.put_u16(self.franking_signature_ciphersuite);
        put_vlbytes(out, &self.franking_integrity_signature)
    }
}
wire_type!(Frank);

pub(crate) fn read_opt<'a, T: Decode<'a>>(
    r: &mut Reader<'a>,
    what: &'static str,
) -> Result<Option<T>, WireError> {
    if r.present(what)? {
        Ok(Some(T::decode_from(r)?))
    } else {
        Ok(None)
    }
}

pub(crate) fn put_opt<T: Encode>(out: &mut Vec<u8>, v: &Option<T>) -> Result<(), WireError> {
    match v {
        None => {
            out.push(0);
            Ok(())
        }
        Some(v) => {
            out.push(1);
            v.encode_to(out)
        }
    }
}

/// `RatchetTreeOption` from draft-mahy-mls-ratchet-tree-options (-02, the version with
/// `httpsUri`; its select label says `httpsUrl`, read as the same case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RatchetTreeOption {
    /// `full(1)`: the contents of the `ratchet_tree` node vector, unparsed.
    Full {
        /// Vector contents.
        ratchet_tree: VLBytes,
    },
    /// `httpsUri(2)`
    HttpsUri {
        /// `ratchet_tree_url<V>`
        ratchet_tree_url: VLBytes,
        /// `tree_signature<V>`
        tree_signature: VLBytes,
    },
    /// `outOfBand(3)`
    OutOfBand {
        /// `tree_signature<V>`
        tree_signature: VLBytes,
    },
    /// `distributionService(4)`
    DistributionService,
}

impl<'a> Decode<'a> for RatchetTreeOption {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(match r.u8()? {
            1 => RatchetTreeOption::Full {
                ratchet_tree: read_vlbytes(r, "ratchet_tree")?,
            },
            2 => RatchetTreeOption::HttpsUri {
                ratchet_tree_url: read_vlbytes(r, "ratchet_tree_url")?,
                tree_signature: read_vlbytes(r, "tree_signature")?,
            },
            3 => RatchetTreeOption::OutOfBand {
                tree_signature: read_vlbytes(r, "tree_signature")?,
            },
            4 => RatchetTreeOption::DistributionService,
            _ => {
                return Err(WireError::BadValue {
                    what: "ratchet tree representation",
                });
            }
        })
    }
}

impl Encode for RatchetTreeOption {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            RatchetTreeOption::Full { ratchet_tree } => {
                out.push(1);
                put_vlbytes(out, ratchet_tree)
            }
            RatchetTreeOption::HttpsUri {
                ratchet_tree_url,
                tree_signature,
            } => {
                out.push(2);
                put_vlbytes(out, ratchet_tree_url)?;
                put_vlbytes(out, tree_signature)
            }
            RatchetTreeOption::OutOfBand { tree_signature } => {
                out.push(3);
                put_vlbytes(out, tree_signature)
            }
            RatchetTreeOption::DistributionService => {
                out.push(4);
                Ok(())
            }
        }
    }
}
wire_type!(RatchetTreeOption);

code_enum!(
    /// `RatchetTreePresence` (draft-mahy-mls-ratchet-tree-options).
    RatchetTreePresence, "ratchet_tree_presence" {
        /// `no_ratchet_tree(0)`
        NoRatchetTree = 0,
        /// `present(1)`
        Present = 1,
        /// `removed(2)`
        Removed = 2,
        /// `added(3)`
        Added = 3,
    }
);

/// `PartialGroupInfo` (draft-mahy-mls-ratchet-tree-options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialGroupInfo {
    /// `ratchet_tree_presence`
    pub ratchet_tree_presence: RatchetTreePresence,
    /// Contents of `Extension group_info_extensions<V>`.
    pub group_info_extensions: VLBytes,
    /// `signature<V>`
    pub signature: VLBytes,
}

impl<'a> Decode<'a> for PartialGroupInfo {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(PartialGroupInfo {
            ratchet_tree_presence: RatchetTreePresence::decode_from(r)?,
            group_info_extensions: read_vlbytes(r, "group_info_extensions")?,
            signature: read_vlbytes(r, "partial group info signature")?,
        })
    }
}

impl Encode for PartialGroupInfo {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.ratchet_tree_presence.encode_to(out)?;
        put_vlbytes(out, &self.group_info_extensions)?;
        put_vlbytes(out, &self.signature)
    }
}
wire_type!(PartialGroupInfo);

/// `GroupInfoOption` (§5.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupInfoOption {
    /// `full(1)`
    Full(GroupInfo),
    /// `partial(2)`
    Partial(PartialGroupInfo),
}

impl<'a> Decode<'a> for GroupInfoOption {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(match r.u8()? {
            1 => GroupInfoOption::Full(GroupInfo::decode_from(r)?),
            2 => GroupInfoOption::Partial(PartialGroupInfo::decode_from(r)?),
            _ => {
                return Err(WireError::BadValue {
                    what: "group info representation",
                });
            }
        })
    }
}

impl Encode for GroupInfoOption {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            GroupInfoOption::Full(g) => {
                out.push(1);
                g.encode_to(out)
            }
            GroupInfoOption::Partial(p) => {
                out.push(2);
                p.encode_to(out)
            }
        }
    }
}
wire_type!(GroupInfoOption);

/// MLS `HPKECiphertext`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HpkeCiphertext {
    /// `kem_output<V>`
    pub kem_output: VLBytes,
    /// `ciphertext<V>`
    pub ciphertext: VLBytes,
}

impl<'a> Decode<'a> for HpkeCiphertext {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(HpkeCiphertext {
            kem_output: read_vlbytes(r, "kem_output")?,
            ciphertext: read_vlbytes(r, "hpke ciphertext")?,
        })
    }
}

impl Encode for HpkeCiphertext {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        put_vlbytes(out, &self.kem_output)?;
        put_vlbytes(out, &self.ciphertext)
    }
}
wire_type!(HpkeCiphertext);

/// MLS `ExternalSender`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalSender {
    /// `SignaturePublicKey` contents.
    pub signature_key: VLBytes,
    /// `Credential`
    pub credential: Credential,
}

impl<'a> Decode<'a> for ExternalSender {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(ExternalSender {
            signature_key: read_vlbytes(r, "signature_key")?,
            credential: Credential::decode_from(r)?,
        })
    }
}

impl Encode for ExternalSender {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        put_vlbytes(out, &self.signature_key)?;
        self.credential.encode_to(out)
    }
}
wire_type!(ExternalSender);

/// Read a `MLSMessage x<V>` vector.
pub(crate) fn read_messages(
    r: &mut Reader<'_>,
    what: &'static str,
) -> Result<Vec<MlsMessage>, WireError> {
    crate::codec::decode_list(r, what)
}

#[cfg(test)]
pub(crate) mod tests;
