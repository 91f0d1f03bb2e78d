//! A minimal MLS (RFC 9420) framing reader.
//!
//! MIMI structs embed MLS objects without a length prefix, so finding where an `MLSMessage`
//! ends means walking its structure. This module walks every field needed for that, checks
//! nothing cryptographic, and exposes what MLS leaves public (group id, epoch, content type).
//! Opaque vectors are skipped by their length. The proposal types delimited are RFC 9420's
//! (1-7) and draft-ietf-mls-extensions' AppDataUpdate (8), AppEphemeral (9) and SelfRemove
//! (10); other proposal and credential types are [`WireError::UnsupportedProposalType`] /
//! [`WireError::UnsupportedCredentialType`].
//!
//! Two walks: the strict one ([`MlsMessageView::parse`]) reads every proposal a commit
//! carries, for whoever validates it (the hub). The framing walk
//! ([`MlsMessageView::parse_framing`]) is for a receiver that only relays or stores the exact
//! bytes (a follower taking /notify): it checks the version, wire format, group id, epoch and
//! content type and delimits the message, but skips a commit's proposal vector by its length
//! and takes a standalone proposal of an unknown type as an opaque vector (the encoding
//! openmls gives custom and GREASE proposals), since judging proposals is the hub's job.

use crate::codec::{Reader, Writer};
use crate::error::{Limits, WireError};

/// `ProtocolVersion` mls10.
pub const MLS10: u16 = 1;

/// Proposal type code points (RFC 9420 §17.4; draft-ietf-mls-extensions §7.2).
pub mod proposal_type {
    pub const ADD: u16 = 1;
    pub const UPDATE: u16 = 2;
    pub const REMOVE: u16 = 3;
    pub const PSK: u16 = 4;
    pub const REINIT: u16 = 5;
    pub const EXTERNAL_INIT: u16 = 6;
    pub const GROUP_CONTEXT_EXTENSIONS: u16 = 7;
    pub const APP_DATA_UPDATE: u16 = 8;
    pub const APP_EPHEMERAL: u16 = 9;
    pub const SELF_REMOVE: u16 = 0x000a;
}

/// How much of a handshake's proposals a walk reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Walk {
    /// Every proposal, refusing types it cannot delimit.
    Strict,
    /// The framing only: a commit's proposal vector is skipped by its length, an unknown
    /// standalone proposal is read as `opaque<V>`.
    Framing,
}

/// RFC 9420 §6 / §17.2 wire formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum WireFormat {
    /// `mls_public_message`
    PublicMessage = 1,
    /// `mls_private_message`
    PrivateMessage = 2,
    /// `mls_welcome`
    Welcome = 3,
    /// `mls_group_info`
    GroupInfo = 4,
    /// `mls_key_package`
    KeyPackage = 5,
}

impl WireFormat {
    /// The code point.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Map a code point; unknown ones are an error because they cannot be delimited.
    pub fn from_u16(v: u16) -> Result<Self, WireError> {
        Ok(match v {
            1 => WireFormat::PublicMessage,
            2 => WireFormat::PrivateMessage,
            3 => WireFormat::Welcome,
            4 => WireFormat::GroupInfo,
            5 => WireFormat::KeyPackage,
            other => return Err(WireError::UnknownWireFormat(other)),
        })
    }
}

/// RFC 9420 §6 content types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ContentType {
    /// `application`
    Application = 1,
    /// `proposal`
    Proposal = 2,
    /// `commit`
    Commit = 3,
}

impl ContentType {
    /// The code point.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Map a code point.
    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => ContentType::Application,
            2 => ContentType::Proposal,
            3 => ContentType::Commit,
            _ => {
                return Err(WireError::BadValue {
                    what: "mls content type",
                });
            }
        })
    }
}

/// A delimited `MLSMessage` borrowed from a larger buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlsMessageView<'a> {
    /// Exactly the bytes of this MLSMessage, version field included.
    pub bytes: &'a [u8],
    /// The wire format.
    pub wire_format: WireFormat,
    /// Group id, for public/private messages and group infos.
    pub group_id: Option<&'a [u8]>,
    /// Epoch, for public/private messages and group infos.
    pub epoch: Option<u64>,
    /// Content type, for public and private messages.
    pub content_type: Option<ContentType>,
}

impl<'a> MlsMessageView<'a> {
    /// Delimit the MLSMessage at the start of `input` under the default [`Limits`].
    /// Returns the view and the number of bytes it spans.
    pub fn parse_prefix(input: &'a [u8]) -> Result<(MlsMessageView<'a>, usize), WireError> {
        Self::parse_prefix_with_limits(input, &Limits::default())
    }

    /// [`MlsMessageView::parse_prefix`] under explicit limits.
    pub fn parse_prefix_with_limits(
        input: &'a [u8],
        limits: &Limits,
    ) -> Result<(MlsMessageView<'a>, usize), WireError> {
        let mut r = Reader::new(input, *limits);
        let view = Self::read(&mut r)?;
        Ok((view, r.position()))
    }

    /// Parse `input` as exactly one MLSMessage.
    pub fn parse(input: &'a [u8]) -> Result<MlsMessageView<'a>, WireError> {
        let (view, used) = Self::parse_prefix(input)?;
        if used != input.len() {
            return Err(WireError::TrailingBytes);
        }
        Ok(view)
    }

    /// Parse `input` as exactly one MLSMessage, reading its framing only (see the module
    /// doc): a commit or proposal the strict walk cannot read is still delimited.
    pub fn parse_framing(input: &'a [u8]) -> Result<MlsMessageView<'a>, WireError> {
        let mut r = Reader::new(input, Limits::default());
        let view = Self::read_with(&mut r, Walk::Framing)?;
        if !r.is_empty() {
            return Err(WireError::TrailingBytes);
        }
        Ok(view)
    }

    /// The `ciphertext` of a PrivateMessage (RFC 9420 section 6.3.1); None for other formats.
    pub fn private_ciphertext(&self) -> Option<&'a [u8]> {
        if self.wire_format != WireFormat::PrivateMessage {
            return None;
        }
        let mut r = Reader::new(self.bytes, Limits::default());
        r.u16().ok()?; // version
        r.u16().ok()?; // wire_format
        r.vec("group_id").ok()?;
        r.u64().ok()?;
        r.u8().ok()?;
        r.vec("authenticated_data").ok()?;
        r.vec("encrypted_sender_data").ok()?;
        r.vec("ciphertext").ok()
    }

    /// The `authenticated_data` of a PrivateMessage (public framing, RFC 9420 §6.3.1: where a
    /// sender puts its SafeAAD, e.g. a franking tag); None for other formats.
    pub fn private_authenticated_data(&self) -> Option<&'a [u8]> {
        if self.wire_format != WireFormat::PrivateMessage {
            return None;
        }
        let mut r = Reader::new(self.bytes, Limits::default());
        r.u16().ok()?; // version
        r.u16().ok()?; // wire_format
        r.vec("group_id").ok()?;
        r.u64().ok()?;
        r.u8().ok()?;
        r.vec("authenticated_data").ok()
    }

    pub(crate) fn read(r: &mut Reader<'a>) -> Result<MlsMessageView<'a>, WireError> {
        Self::read_with(r, Walk::Strict)
    }

    pub(crate) fn read_with(
        r: &mut Reader<'a>,
        walk: Walk,
    ) -> Result<MlsMessageView<'a>, WireError> {
        let start = r.position();
        if r.u16()? != MLS10 {
            return Err(WireError::BadVersion);
        }
        let wire_format = WireFormat::from_u16(r.u16()?)?;
        let (mut group_id, mut epoch, mut content_type) = (None, None, None);
        match wire_format {
            WireFormat::PublicMessage => {
                let h = public_message(r, walk)?;
                group_id = Some(h.group_id);
                epoch = Some(h.epoch);
                content_type = Some(h.content_type);
            }
            WireFormat::PrivateMessage => {
                group_id = Some(r.vec("group_id")?);
                epoch = Some(r.u64()?);
                content_type = Some(ContentType::from_u8(r.u8()?)?);
                r.vec("authenticated_data")?;
                r.vec("encrypted_sender_data")?;
                r.vec("ciphertext")?;
            }
            WireFormat::Welcome => welcome(r)?,
            WireFormat::GroupInfo => {
                let (g, e) = group_info(r)?;
                group_id = Some(g);
                epoch = Some(e);
            }
            WireFormat::KeyPackage => key_package(r)?,
        }
        Ok(MlsMessageView {
            bytes: r.since(start),
            wire_format,
            group_id,
            epoch,
            content_type,
        })
    }

    /// True for a PrivateMessage carrying application data, the only thing /submitMessage
    /// accepts.
    pub fn is_private_application(&self) -> bool {
        self.wire_format == WireFormat::PrivateMessage
            && self.content_type == Some(ContentType::Application)
    }
}

/// Length of the bare `KeyPackage` struct (no MLSMessage header) at the start of `input`.
pub fn key_package_len(input: &[u8], limits: &Limits) -> Result<usize, WireError> {
    prefix_len(input, limits, key_package)
}

/// Length of the bare `Welcome` struct at the start of `input`.
pub fn welcome_len(input: &[u8], limits: &Limits) -> Result<usize, WireError> {
    prefix_len(input, limits, welcome)
}

/// Length of the bare `GroupInfo` struct at the start of `input`.
pub fn group_info_len(input: &[u8], limits: &Limits) -> Result<usize, WireError> {
    prefix_len(input, limits, |r| group_info(r).map(|_| ()))
}

/// Length of a `Credential` at the start of `input`.
pub fn credential_len(input: &[u8], limits: &Limits) -> Result<usize, WireError> {
    prefix_len(input, limits, credential)
}

/// Length of a `Capabilities` struct at the start of `input`.
pub fn capabilities_len(input: &[u8], limits: &Limits) -> Result<usize, WireError> {
    prefix_len(input, limits, capabilities)
}

/// Length of a `RequiredCapabilities` extension body at the start of `input`.
pub fn required_capabilities_len(input: &[u8], limits: &Limits) -> Result<usize, WireError> {
    prefix_len(input, limits, required_capabilities)
}

fn prefix_len(
    input: &[u8],
    limits: &Limits,
    f: impl FnOnce(&mut Reader<'_>) -> Result<(), WireError>,
) -> Result<usize, WireError> {
    let mut r = Reader::new(input, *limits);
    f(&mut r)?;
    Ok(r.position())
}

/// Run `f` over a reader and return exactly the bytes it consumed.
pub(crate) fn take<'a>(
    r: &mut Reader<'a>,
    f: impl FnOnce(&mut Reader<'a>) -> Result<(), WireError>,
) -> Result<&'a [u8], WireError> {
    let start = r.position();
    f(r)?;
    Ok(r.since(start))
}

pub(crate) fn key_package(r: &mut Reader<'_>) -> Result<(), WireError> {
    key_package_walk(r).map(|_| ())
}

/// Walks a bare KeyPackage; returns its leaf node's lifetime, if the leaf has one.
fn key_package_walk(r: &mut Reader<'_>) -> Result<Option<Lifetime>, WireError> {
    if r.u16()? != MLS10 {
        return Err(WireError::BadVersion);
    }
    r.u16()?; // cipher_suite
    r.vec("init_key")?;
    let lifetime = leaf_node(r)?;
    r.vec("key package extensions")?;
    r.vec("key package signature")?;
    Ok(lifetime)
}

/// A leaf node's `Lifetime` (RFC 9420 §7.2): seconds since the Unix epoch, both inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub not_before: u64,
    pub not_after: u64,
}

impl Lifetime {
    /// Whether `unix_s` lies inside the lifetime.
    pub fn contains(&self, unix_s: u64) -> bool {
        (self.not_before..=self.not_after).contains(&unix_s)
    }
}

/// The lifetime of the bare `KeyPackage` struct at the start of `input` (`None`: its leaf
/// node is not of source key_package, so it has none, which RFC 9420 forbids).
pub fn key_package_lifetime(input: &[u8], limits: &Limits) -> Result<Option<Lifetime>, WireError> {
    let mut r = Reader::new(input, *limits);
    key_package_walk(&mut r)
}

pub(crate) fn welcome(r: &mut Reader<'_>) -> Result<(), WireError> {
    r.u16()?; // cipher_suite
    r.vec("welcome secrets")?;
    r.vec("encrypted_group_info")?;
    Ok(())
}

/// Returns the group id and epoch from the GroupContext.
pub(crate) fn group_info<'a>(r: &mut Reader<'a>) -> Result<(&'a [u8], u64), WireError> {
    if r.u16()? != MLS10 {
        return Err(WireError::BadVersion);
    }
    r.u16()?; // cipher_suite
    let group_id = r.vec("group_id")?;
    let epoch = r.u64()?;
    r.vec("tree_hash")?;
    r.vec("confirmed_transcript_hash")?;
    r.vec("group context extensions")?;
    r.vec("group info extensions")?;
    r.vec("confirmation_tag")?;
    r.u32()?; // signer
    r.vec("group info signature")?;
    Ok((group_id, epoch))
}

pub(crate) fn credential(r: &mut Reader<'_>) -> Result<(), WireError> {
    match r.u16()? {
        1 => {
            r.vec("credential identity")?;
        }
        2 => {
            r.vec("certificates")?;
        }
        other => return Err(WireError::UnsupportedCredentialType(other)),
    }
    Ok(())
}

pub(crate) fn capabilities(r: &mut Reader<'_>) -> Result<(), WireError> {
    for what in [
        "versions",
        "cipher_suites",
        "extensions",
        "proposals",
        "credentials",
    ] {
        r.vec(what)?;
    }
    Ok(())
}

pub(crate) fn required_capabilities(r: &mut Reader<'_>) -> Result<(), WireError> {
    for what in ["extension_types", "proposal_types", "credential_types"] {
        r.vec(what)?;
    }
    Ok(())
}

fn leaf_node(r: &mut Reader<'_>) -> Result<Option<Lifetime>, WireError> {
    r.vec("encryption_key")?;
    r.vec("signature_key")?;
    credential(r)?;
    capabilities(r)?;
    let lifetime = match r.u8()? {
        1 => Some(Lifetime {
            not_before: r.u64()?,
            not_after: r.u64()?,
        }),
        2 => None,
        3 => {
            r.vec("parent_hash")?;
            None
        }
        _ => {
            return Err(WireError::BadValue {
                what: "leaf_node_source",
            });
        }
    };
    r.vec("leaf node extensions")?;
    r.vec("leaf node signature")?;
    Ok(lifetime)
}

struct PublicHeader<'a> {
    group_id: &'a [u8],
    epoch: u64,
    content_type: ContentType,
}

fn public_message<'a>(r: &mut Reader<'a>, walk: Walk) -> Result<PublicHeader<'a>, WireError> {
    // FramedContent
    let group_id = r.vec("group_id")?;
    let epoch = r.u64()?;
    let sender_type = r.u8()?;
    match sender_type {
        1 | 2 => {
            r.u32()?; // leaf_index / sender_index
        }
        3 | 4 => {}
        _ => {
            return Err(WireError::BadValue {
                what: "sender_type",
            });
        }
    }
    r.vec("authenticated_data")?;
    let content_type = ContentType::from_u8(r.u8()?)?;
    match content_type {
        ContentType::Application => {
            r.vec("application_data")?;
        }
        ContentType::Proposal => proposal(r, walk)?,
        ContentType::Commit => commit(r, walk)?,
    }
    // FramedContentAuthData
    r.vec("signature")?;
    if content_type == ContentType::Commit {
        r.vec("confirmation_tag")?;
    }
    if sender_type == 1 {
        r.vec("membership_tag")?;
    }
    Ok(PublicHeader {
        group_id,
        epoch,
        content_type,
    })
}

fn commit(r: &mut Reader<'_>, walk: Walk) -> Result<(), WireError> {
    let mut proposals = r.sub_vec("proposals")?;
    // The framing walk leaves the proposals, delimited by the vector, to the hub.
    while walk == Walk::Strict && !proposals.is_empty() {
        match proposals.u8()? {
            1 => proposal(&mut proposals, walk)?,
            2 => {
                proposals.vec("proposal reference")?;
            }
            _ => {
                return Err(WireError::BadValue {
                    what: "proposal_or_ref type",
                });
            }
        }
    }
    if r.present("update path presence")? {
        leaf_node(r)?;
        r.vec("update path nodes")?;
    }
    Ok(())
}

fn proposal(r: &mut Reader<'_>, walk: Walk) -> Result<(), WireError> {
    match r.u16()? {
        1 => key_package(r)?,
        2 => {
            leaf_node(r)?;
        }
        3 => {
            r.u32()?; // removed
        }
        4 => {
            match r.u8()? {
                1 => {
                    r.vec("psk_id")?;
                }
                2 => {
                    r.u8()?; // usage
                    r.vec("psk_group_id")?;
                    r.u64()?; // psk_epoch
                }
                _ => return Err(WireError::BadValue { what: "psk type" }),
            }
            r.vec("psk_nonce")?;
        }
        5 => {
            r.vec("reinit group_id")?;
            r.u16()?; // version
            r.u16()?; // cipher_suite
            r.vec("reinit extensions")?;
        }
        6 => {
            r.vec("kem_output")?;
        }
        7 => {
            r.vec("group context extensions")?;
        }
        proposal_type::APP_DATA_UPDATE => {
            r.u16()?; // component_id
            match r.u8()? {
                1 => {
                    r.vec("app data update")?;
                }
                2 => {} // remove
                _ => {
                    return Err(WireError::BadValue {
                        what: "app data update operation",
                    });
                }
            }
        }
        proposal_type::APP_EPHEMERAL => {
            r.u16()?; // component_id
            r.vec("app ephemeral data")?;
        }
        proposal_type::SELF_REMOVE => {}
        _ if walk == Walk::Framing => {
            r.vec("unknown proposal")?;
        }
        other => return Err(WireError::UnsupportedProposalType(other)),
    }
    Ok(())
}

/// Build a syntactically valid `MLSMessage(PrivateMessage)` with content type application,
/// empty authenticated data and a 16-byte filler for `encrypted_sender_data`.
///
/// For demos and tests that need relayable bytes before real MLS is wired in; the result
/// decrypts to nothing.
///
/// # Panics
///
/// If `group_id` or `ciphertext` is 2^30 bytes or longer (an MLS vector cannot hold it).
pub fn private_message(group_id: &[u8], epoch: u64, ciphertext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + group_id.len() + 8 + 1 + 1 + 17 + ciphertext.len() + 8);
    out.put_u16(MLS10);
    out.put_u16(WireFormat::PrivateMessage.as_u16());
    let body = (|| {
        out.put_vec(group_id)?;
        out.put_u64(epoch);
        out.put_u8(ContentType::Application.as_u8());
        out.put_vec(&[])?;
        out.put_vec(&[0xa5; 16])?;
        out.put_vec(ciphertext)
    })();
    assert!(
        body.is_ok(),
        "private_message: vector longer than 2^30-1 bytes"
    );
    out
}

#[cfg(test)]
mod view_tests {
    use super::*;

    #[test]
    fn private_ciphertext_is_the_last_vector() {
        let long = vec![7u8; 300];
        for ct in [&b"hello"[..], &long[..], &[][..]] {
            let mls = private_message(b"group", 9, ct);
            let view = MlsMessageView::parse(&mls).expect("valid");
            assert_eq!(view.private_ciphertext(), Some(ct));
        }
        let gi = testdata::mls_message(4, &testdata::group_info(b"g", 1));
        let view = MlsMessageView::parse(&gi).expect("valid");
        assert_eq!(view.private_ciphertext(), None);
    }
}

#[cfg(test)]
pub(crate) mod testdata {
    //! Hand-built MLS objects, field by field from RFC 9420.
    use crate::codec::Writer;

    pub fn credential_basic(out: &mut Vec<u8>, identity: &[u8]) {
        out.put_u16(1);
        out.put_vec(identity).unwrap();
    }

    pub fn capabilities(out: &mut Vec<u8>) {
        out.put_vec(&[0, 1]).unwrap(); // versions: mls10
        out.put_vec(&[0, 1]).unwrap(); // cipher_suites
        out.put_vec(&[]).unwrap();
        out.put_vec(&[]).unwrap();
        out.put_vec(&[0, 1]).unwrap(); // credentials: basic
    }

    pub fn leaf_node(out: &mut Vec<u8>, source: u8) {
        out.put_vec(&[1; 32]).unwrap(); // encryption_key
        out.put_vec(&[2; 32]).unwrap(); // signature_key
        credential_basic(out, b"mimi://a.example/d/ClientA1");
        capabilities(out);
        out.put_u8(source);
        match source {
            1 => {
                out.put_u64(1_700_000_000);
                out.put_u64(1_800_000_000);
            }
            3 => out.put_vec(&[3; 32]).unwrap(),
            _ => {}
        }
        out.put_vec(&[]).unwrap(); // extensions
        out.put_vec(&[4; 64]).unwrap(); // signature
    }

    /// Bare KeyPackage struct.
    pub fn key_package() -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u16(1);
        out.put_u16(1);
        out.put_vec(&[5; 32]).unwrap();
        leaf_node(&mut out, 1);
        out.put_vec(&[]).unwrap();
        out.put_vec(&[6; 64]).unwrap();
        out
    }

    /// Bare Welcome struct.
    pub fn welcome() -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u16(1);
        out.put_vec(&[7; 40]).unwrap();
        out.put_vec(&[8; 100]).unwrap();
        out
    }

    /// Bare GroupInfo struct.
    pub fn group_info(group_id: &[u8], epoch: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u16(1);
        out.put_u16(1);
        out.put_vec(group_id).unwrap();
        out.put_u64(epoch);
        out.put_vec(&[9; 32]).unwrap();
        out.put_vec(&[10; 32]).unwrap();
        out.put_vec(&[]).unwrap();
        out.put_vec(&[]).unwrap();
        out.put_vec(&[11; 32]).unwrap();
        out.put_u32(0);
        out.put_vec(&[12; 64]).unwrap();
        out
    }

    pub fn mls_message(wire_format: u16, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 1];
        out.put_u16(wire_format);
        out.extend_from_slice(body);
        out
    }

    /// A PublicMessage from a member.
    pub fn public_message(
        group_id: &[u8],
        epoch: u64,
        content_type: u8,
        sender_type: u8,
    ) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_vec(group_id).unwrap();
        b.put_u64(epoch);
        b.put_u8(sender_type);
        if sender_type <= 2 {
            b.put_u32(3);
        }
        b.put_vec(b"aad").unwrap();
        b.put_u8(content_type);
        match content_type {
            1 => b.put_vec(b"hello").unwrap(),
            2 => {
                // an Add carrying a full KeyPackage
                b.put_u16(1);
                b.extend_from_slice(&key_package());
            }
            _ => {
                // Commit: one Remove by value, one reference, then an UpdatePath.
                let mut props = Vec::new();
                props.put_u8(1);
                props.put_u16(3);
                props.put_u32(7);
                props.put_u8(2);
                props.put_vec(&[13; 32]).unwrap();
                b.put_vec(&props).unwrap();
                b.put_u8(1);
                leaf_node(&mut b, 3);
                b.put_vec(&[14; 50]).unwrap();
            }
        }
        b.put_vec(&[15; 64]).unwrap(); // signature
        if content_type == 3 {
            b.put_vec(&[16; 32]).unwrap();
        }
        if sender_type == 1 {
            b.put_vec(&[17; 32]).unwrap();
        }
        mls_message(1, &b)
    }

    /// One message of every wire format, content type and sender shape.
    pub fn all_samples() -> Vec<Vec<u8>> {
        vec![
            super::private_message(b"group", 7, b"ciphertext"),
            public_message(b"g", 1, 1, 1),
            public_message(b"g", 2, 2, 2),
            public_message(b"g", 3, 3, 1),
            public_message(b"g", 4, 2, 3),
            public_message(b"g", 5, 3, 4),
            mls_message(3, &welcome()),
            mls_message(4, &group_info(b"grp", 9)),
            mls_message(5, &key_package()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::testdata::{self as td, all_samples, credential_basic, mls_message};
    use super::*;

    #[test]
    fn code_points() {
        assert_eq!(WireFormat::PublicMessage.as_u16(), 1);
        assert_eq!(WireFormat::PrivateMessage.as_u16(), 2);
        assert_eq!(WireFormat::Welcome.as_u16(), 3);
        assert_eq!(WireFormat::GroupInfo.as_u16(), 4);
        assert_eq!(WireFormat::KeyPackage.as_u16(), 5);
        assert_eq!(ContentType::Application.as_u8(), 1);
        assert_eq!(ContentType::Proposal.as_u8(), 2);
        assert_eq!(ContentType::Commit.as_u8(), 3);
        for v in 1..=5 {
            assert_eq!(WireFormat::from_u16(v).unwrap().as_u16(), v);
        }
        assert_eq!(
            WireFormat::from_u16(6),
            Err(WireError::UnknownWireFormat(6))
        );
        assert!(ContentType::from_u8(0).is_err());
    }

    #[test]
    fn private_message_known_answer() {
        let m = private_message(b"g1", 0x0102, b"ct");
        let mut expected = vec![0, 1, 0, 2, 2, b'g', b'1', 0, 0, 0, 0, 0, 0, 1, 2, 1, 0, 16];
        expected.extend_from_slice(&[0xa5; 16]);
        expected.extend_from_slice(&[2, b'c', b't']);
        assert_eq!(m, expected);
        let v = MlsMessageView::parse(&m).unwrap();
        assert_eq!(v.wire_format, WireFormat::PrivateMessage);
        assert_eq!(v.group_id, Some(&b"g1"[..]));
        assert_eq!(v.epoch, Some(0x0102));
        assert_eq!(v.content_type, Some(ContentType::Application));
        assert!(v.is_private_application());
        assert_eq!(v.bytes, &m[..]);
        assert_eq!(v.private_authenticated_data(), Some(&[][..]));
    }

    #[test]
    fn delimits_every_sample_inside_a_larger_buffer() {
        for sample in all_samples() {
            let mut buf = sample.clone();
            buf.extend_from_slice(b"trailing struct fields");
            let (v, used) = MlsMessageView::parse_prefix(&buf).unwrap();
            assert_eq!(used, sample.len());
            assert_eq!(v.bytes, &sample[..]);
        }
    }

    #[test]
    fn public_fields() {
        let m = td::public_message(b"room-group", 42, 3, 1);
        let v = MlsMessageView::parse(&m).unwrap();
        assert_eq!(v.wire_format, WireFormat::PublicMessage);
        assert_eq!(v.group_id, Some(&b"room-group"[..]));
        assert_eq!(v.epoch, Some(42));
        assert_eq!(v.content_type, Some(ContentType::Commit));

        let gi = mls_message(4, &td::group_info(b"grp", 9));
        let v = MlsMessageView::parse(&gi).unwrap();
        assert_eq!(
            (v.group_id, v.epoch, v.content_type),
            (Some(&b"grp"[..]), Some(9), None)
        );

        let kp = mls_message(5, &td::key_package());
        let v = MlsMessageView::parse(&kp).unwrap();
        assert_eq!((v.group_id, v.epoch), (None, None));
    }

    #[test]
    fn key_package_lifetime_is_read_from_its_leaf() {
        let lt = key_package_lifetime(&td::key_package(), &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (lt.not_before, lt.not_after),
            (1_700_000_000, 1_800_000_000)
        );
        assert!(lt.contains(1_700_000_000) && lt.contains(1_800_000_000));
        assert!(!lt.contains(1_699_999_999) && !lt.contains(1_800_000_001));
        // Truncated inside the lifetime: an error, not a guess.
        let kp = td::key_package();
        assert!(key_package_lifetime(&kp[..kp.len() - 80], &Limits::default()).is_err());
    }

    #[test]
    fn bare_struct_lengths() {
        let l = Limits::default();
        let kp = td::key_package();
        assert_eq!(key_package_len(&kp, &l), Ok(kp.len()));
        let w = td::welcome();
        assert_eq!(welcome_len(&w, &l), Ok(w.len()));
        let gi = td::group_info(b"x", 1);
        assert_eq!(group_info_len(&gi, &l), Ok(gi.len()));
        let mut c = Vec::new();
        credential_basic(&mut c, b"id");
        assert_eq!(credential_len(&c, &l), Ok(c.len()));
        let mut caps = Vec::new();
        td::capabilities(&mut caps);
        assert_eq!(capabilities_len(&caps, &l), Ok(caps.len()));
        assert_eq!(required_capabilities_len(&[0, 0, 0], &l), Ok(3));
    }

    #[test]
    fn rejects_bad_version_unknown_format_and_proposal() {
        let mut m = private_message(b"g", 1, b"c");
        m[1] = 2;
        assert_eq!(MlsMessageView::parse(&m), Err(WireError::BadVersion));
        let m = mls_message(9, &[]);
        assert_eq!(
            MlsMessageView::parse(&m),
            Err(WireError::UnknownWireFormat(9))
        );

        let mut b = Vec::new();
        b.put_vec(b"g").unwrap();
        b.put_u64(1);
        b.put_u8(2);
        b.put_u32(0);
        b.put_vec(&[]).unwrap();
        b.put_u8(2);
        b.put_u16(0x0a0a);
        let m = mls_message(1, &b);
        assert_eq!(
            MlsMessageView::parse(&m),
            Err(WireError::UnsupportedProposalType(0x0a0a))
        );

        let mut kp = td::key_package();
        // credential_type sits after version, suite, init_key, encryption_key, signature_key
        let at = 4 + 33 + 33 + 33;
        kp[at..at + 2].copy_from_slice(&[0x0a, 0x0a]);
        assert_eq!(
            key_package_len(&kp, &Limits::default()),
            Err(WireError::UnsupportedCredentialType(0x0a0a))
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        for sample in all_samples() {
            for cut in 0..sample.len() {
                assert!(
                    MlsMessageView::parse_prefix(&sample[..cut]).is_err(),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_rejected_by_parse() {
        let mut m = private_message(b"g", 1, b"c");
        m.push(0);
        assert_eq!(MlsMessageView::parse(&m), Err(WireError::TrailingBytes));
    }

    #[test]
    fn vector_limit_applies() {
        let m = private_message(b"g", 1, &[0; 100]);
        let limits = Limits {
            max_vector: 50,
            ..Limits::default()
        };
        assert!(matches!(
            MlsMessageView::parse_prefix_with_limits(&m, &limits),
            Err(WireError::TooLarge {
                what: "ciphertext",
                len: 100,
                max: 50
            })
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = crate::testutil::XorShift::new(1);
        for sample in all_samples() {
            for _ in 0..200 {
                let mut m = sample.clone();
                rng.mutate(&mut m);
                let _ = MlsMessageView::parse_prefix(&m);
            }
        }
        for _ in 0..2000 {
            let mut m = rng.bytes(64);
            m[0] = 0;
            m[1] = 1;
            m[2] = 0;
            m[3] %= 6;
            let _ = MlsMessageView::parse_prefix(&m);
        }
    }
}

#[cfg(test)]
mod extension_proposal_tests {
    use super::testdata::mls_message;
    use super::*;

    /// A member's PublicMessage around `content` (content type and body).
    fn framed(content_type: u8, content: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_vec(b"g").unwrap();
        b.put_u64(3);
        b.put_u8(1); // member
        b.put_u32(0);
        b.put_vec(&[]).unwrap();
        b.put_u8(content_type);
        b.extend_from_slice(content);
        b.put_vec(&[15; 64]).unwrap(); // signature
        if content_type == 3 {
            b.put_vec(&[16; 32]).unwrap(); // confirmation_tag
        }
        b.put_vec(&[17; 32]).unwrap(); // membership_tag
        mls_message(1, &b)
    }

    fn commit_of(proposals: &[Vec<u8>]) -> Vec<u8> {
        let mut props = Vec::new();
        for p in proposals {
            props.put_u8(1); // by value
            props.extend_from_slice(p);
        }
        let mut c = Vec::new();
        c.put_vec(&props).unwrap();
        c.put_u8(0); // no path
        framed(3, &c)
    }

    fn app_data_update(component: u16, update: Option<&[u8]>) -> Vec<u8> {
        let mut p = Vec::new();
        p.put_u16(proposal_type::APP_DATA_UPDATE);
        p.put_u16(component);
        match update {
            Some(u) => {
                p.put_u8(1);
                p.put_vec(u).unwrap();
            }
            None => p.put_u8(2),
        }
        p
    }

    fn app_ephemeral(component: u16, data: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.put_u16(proposal_type::APP_EPHEMERAL);
        p.put_u16(component);
        p.put_vec(data).unwrap();
        p
    }

    fn self_remove() -> Vec<u8> {
        proposal_type::SELF_REMOVE.to_be_bytes().to_vec()
    }

    #[test]
    fn extension_proposals_are_delimited_strictly() {
        let samples = [
            framed(2, &app_data_update(0x22, Some(b"diff"))),
            framed(2, &app_data_update(0x22, None)),
            framed(2, &app_ephemeral(0x20, b"aad")),
            framed(2, &self_remove()),
            commit_of(&[
                app_data_update(0x22, Some(&[1; 300])),
                app_data_update(0x25, None),
                app_ephemeral(0x20, b""),
                self_remove(),
            ]),
        ];
        for m in samples {
            let mut buf = m.clone();
            buf.extend_from_slice(b"next field");
            let (v, used) = MlsMessageView::parse_prefix(&buf).expect("delimited");
            assert_eq!(used, m.len());
            assert_eq!((v.group_id, v.epoch), (Some(&b"g"[..]), Some(3)));
            for cut in 0..m.len() {
                assert!(
                    MlsMessageView::parse_prefix(&m[..cut]).is_err(),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn bad_app_data_update_operation_is_refused() {
        let mut p = app_data_update(0x22, None);
        let last = p.len() - 1;
        p[last] = 0; // invalid(0)
        assert_eq!(
            MlsMessageView::parse(&framed(2, &p)),
            Err(WireError::BadValue {
                what: "app data update operation"
            })
        );
    }

    #[test]
    fn framing_walk_takes_what_the_strict_walk_cannot_read() {
        // A GREASE proposal inside a commit: the strict walk refuses, the framing walk
        // delimits the commit by its proposal vector.
        let mut grease = 0x0a0a_u16.to_be_bytes().to_vec();
        grease.put_vec(b"whatever").unwrap();
        let commit = commit_of(&[self_remove(), grease.clone()]);
        assert_eq!(
            MlsMessageView::parse(&commit),
            Err(WireError::UnsupportedProposalType(0x0a0a))
        );
        let v = MlsMessageView::parse_framing(&commit).expect("framing is sound");
        assert_eq!(v.content_type, Some(ContentType::Commit));
        assert_eq!(v.bytes, &commit[..]);

        // A standalone one is read as opaque<V>, as openmls encodes custom proposals.
        let proposal = framed(2, &grease);
        assert!(MlsMessageView::parse(&proposal).is_err());
        let v = MlsMessageView::parse_framing(&proposal).expect("framing is sound");
        assert_eq!(v.content_type, Some(ContentType::Proposal));

        // The framing itself is still checked: version, truncation, trailing bytes.
        let mut bad = commit.clone();
        bad[1] = 2;
        assert_eq!(
            MlsMessageView::parse_framing(&bad),
            Err(WireError::BadVersion)
        );
        for cut in 0..commit.len() {
            assert!(MlsMessageView::parse_framing(&commit[..cut]).is_err());
        }
        let mut long = commit;
        long.push(0);
        assert_eq!(
            MlsMessageView::parse_framing(&long),
            Err(WireError::TrailingBytes)
        );
    }
}
