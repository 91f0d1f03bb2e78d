//! MIMI content (draft-ietf-mimi-content-08): the CBOR message container carried inside MLS
//! application messages, and its message ID.
//!
//! Contract:
//! * [`MimiContent::encode`] writes deterministic CBOR (RFC 8949 section 4.2.1, content-08
//!   section 8.1): shortest heads and floats, definite lengths, extension map keys sorted by
//!   their encoded bytes. The draft's example vectors re-encode byte for byte.
//! * Decoding never panics. It accepts any well-formed CBOR that fits the CDDL (so a peer's
//!   non-deterministic encoding still reads) and reports in [`Decoded::canonical`] whether
//!   the input was deterministic; [`MimiContent::decode_canonical`] refuses it instead.
//!   Malformed CBOR, wrong types, out-of-range values, trailing bytes and nesting deeper than
//!   [`ContentLimits`] are typed [`ContentError`]s.
//! * The message ID ([`message_id`], content-08 section 2.3) is computed over the exact
//!   bytes of a message, never over a re-encoding, so it matches the sender's even for input
//!   that was not deterministic.
//! * No I/O, no clock, no randomness: the 16-byte salt is the caller's.

mod cbor;
mod error;
mod value;

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use cbor::{
    Dec, EncodeKey, MAJOR_NINT, MAJOR_TAG, MAJOR_TEXT, MAJOR_UINT, Seq, put_bool, put_bytes,
    put_head, put_int, put_text, put_value,
};
pub use error::{ContentError, ContentLimits};
pub use value::{ExtensionKey, MAX_SAFE_KEY, Value};

/// `text/markdown;variant=GFM-MIMI`, the rich-text type every MIMI client receives
/// (content-08 section 9.1).
pub const MARKDOWN: &str = "text/markdown;variant=GFM-MIMI";
/// `text/plain;charset=utf-8`.
pub const PLAIN_TEXT: &str = "text/plain;charset=utf-8";

/// A MIMI content message: `mimiContent` of content-08 section 2.5 and Appendix B.
#[derive(Debug, Clone, PartialEq)]
pub struct MimiContent {
    /// Per-message random salt (16 bytes).
    pub salt: [u8; 16],
    /// The message this one edits, deletes or un-reacts.
    pub replaces: Option<MessageId>,
    /// Groups messages into a topic; empty for none.
    pub topic_id: Vec<u8>,
    /// When receivers should delete the message.
    pub expires: Option<Expiration>,
    /// The message this one replies or reacts to.
    pub in_reply_to: Option<MessageId>,
    /// `mimiExtensions`, including the sender and room URIs when present.
    pub extensions: Extensions,
    /// The body.
    pub nested_part: NestedPart,
}

/// The result of a lenient decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// What the bytes say.
    pub content: MimiContent,
    /// True when the input was in deterministic encoding, so that [`MimiContent::encode`]
    /// gives back the same bytes.
    pub canonical: bool,
}

/// `Expiration` (content-08 section 2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiration {
    /// True: `time` seconds after it is read; false: at `time` seconds since the epoch.
    pub relative: bool,
    /// Seconds.
    pub time: u32,
}

/// `NestedPart` (content-08 section 2.7): disposition, language and one of four bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedPart {
    /// What the part is for.
    pub disposition: Disposition,
    /// Empty, or a comma-separated list of RFC 5646 language tags.
    pub language: String,
    /// The part's cardinality and content.
    pub body: PartBody,
}

/// The four forms of a part, by cardinality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartBody {
    /// `nullpart` (0): no content, as in a delete or unlike.
    Null,
    /// `single` (1): inline content.
    Single {
        /// IANA media type with parameters.
        content_type: String,
        /// The content.
        content: Vec<u8>,
    },
    /// `external` (2): content fetched from a URL.
    External(ExternalPart),
    /// `multi` (3): two or more nested parts.
    Multi {
        /// How the receiver treats the parts.
        semantics: PartSemantics,
        /// At least two parts.
        parts: Vec<NestedPart>,
    },
}

/// `ExternalPart` (content-08 section 2.8).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExternalPart {
    /// IANA media type of the content.
    pub content_type: String,
    /// Where the content can be fetched.
    pub url: String,
    /// Seconds since the epoch after which the URL is invalid; 0 for never.
    pub expires: u32,
    /// Size in bytes; 0 if not given.
    pub size: u64,
    /// IANA AEAD algorithm, or 0 when not encrypted.
    pub enc_alg: u16,
    /// AEAD key.
    pub key: Vec<u8>,
    /// AEAD nonce.
    pub nonce: Vec<u8>,
    /// AEAD additional authenticated data.
    pub aad: Vec<u8>,
    /// IANA Named Information hash algorithm of `content_hash`.
    pub hash_alg: u8,
    /// Hash of the content at the URL.
    pub content_hash: Vec<u8>,
    /// Optional text description.
    pub description: String,
    /// Optional suggested file name.
    pub filename: String,
}

/// The cardinality of a part (content-08 section 2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cardinality {
    /// 0
    NullPart,
    /// 1
    Single,
    /// 2
    External,
    /// 3
    Multi,
}

impl Cardinality {
    /// The code point.
    pub fn as_u8(self) -> u8 {
        match self {
            Cardinality::NullPart => 0,
            Cardinality::Single => 1,
            Cardinality::External => 2,
            Cardinality::Multi => 3,
        }
    }

    /// The CDDL name.
    pub fn name(self) -> &'static str {
        match self {
            Cardinality::NullPart => "nullpart",
            Cardinality::Single => "single",
            Cardinality::External => "external",
            Cardinality::Multi => "multi",
        }
    }
}

/// `partSemantics` of a multipart (content-08 section 2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PartSemantics {
    /// 0: the receiver picks one part.
    ChooseOne,
    /// 1: all parts form one unit.
    SingleUnit,
    /// 2: each part is processed on its own.
    ProcessAll,
}

impl PartSemantics {
    /// The code point.
    pub fn as_u8(self) -> u8 {
        match self {
            PartSemantics::ChooseOne => 0,
            PartSemantics::SingleUnit => 1,
            PartSemantics::ProcessAll => 2,
        }
    }

    /// Map a code point; an unknown one marks a malicious message (content-08 section 10.1).
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(PartSemantics::ChooseOne),
            1 => Some(PartSemantics::SingleUnit),
            2 => Some(PartSemantics::ProcessAll),
            _ => None,
        }
    }

    /// The CDDL name.
    pub fn name(self) -> &'static str {
        match self {
            PartSemantics::ChooseOne => "chooseOne",
            PartSemantics::SingleUnit => "singleUnit",
            PartSemantics::ProcessAll => "processAll",
        }
    }
}

/// A part's disposition (content-08 section 2.7 and the IANA registry of section 11):
/// 0..=8 are the base values, 9..=255 unknown (treated as render by receivers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Disposition(pub u8);

impl Disposition {
    /// 0
    pub const UNSPECIFIED: Disposition = Disposition(0);
    /// 1
    pub const RENDER: Disposition = Disposition(1);
    /// 2
    pub const REACTION: Disposition = Disposition(2);
    /// 3
    pub const PROFILE: Disposition = Disposition(3);
    /// 4
    pub const INLINE: Disposition = Disposition(4);
    /// 5
    pub const ICON: Disposition = Disposition(5);
    /// 6
    pub const ATTACHMENT: Disposition = Disposition(6);
    /// 7
    pub const SESSION: Disposition = Disposition(7);
    /// 8
    pub const PREVIEW: Disposition = Disposition(8);

    /// The base disposition's name, `None` for 9..=255.
    pub fn name(self) -> Option<&'static str> {
        const NAMES: [&str; 9] = [
            "unspecified",
            "render",
            "reaction",
            "profile",
            "inline",
            "icon",
            "attachment",
            "session",
            "preview",
        ];
        NAMES.get(usize::from(self.0)).copied()
    }
}

impl fmt::Display for Disposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "unknown({})", self.0),
        }
    }
}

/// The `mimiExtensions` map: keys unique, kept in deterministic order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Extensions {
    /// Sorted by the keys' encoded bytes.
    entries: Vec<(ExtensionKey, Value)>,
}

impl Extensions {
    /// No extensions.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value under `key`.
    pub fn get(&self, key: &ExtensionKey) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Set `key`, returning the value it replaces.
    pub fn insert(&mut self, key: ExtensionKey, value: Value) -> Option<Value> {
        if let Some(slot) = self.entries.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(&mut slot.1, value));
        }
        let enc = key.encoded_key();
        let at = self.entries.partition_point(|(k, _)| k.encoded_key() < enc);
        self.entries.insert(at, (key, value));
        None
    }

    /// Remove `key`.
    pub fn remove(&mut self, key: &ExtensionKey) -> Option<Value> {
        let at = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(at).1)
    }

    /// Entries in deterministic (wire) order.
    pub fn iter(&self) -> impl Iterator<Item = (&ExtensionKey, &Value)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `senderUri` (key 1).
    pub fn sender_uri(&self) -> Option<&str> {
        self.get(&ExtensionKey::SENDER_URI).and_then(Value::as_text)
    }

    /// `roomUri` (key 2).
    pub fn room_uri(&self) -> Option<&str> {
        self.get(&ExtensionKey::ROOM_URI).and_then(Value::as_text)
    }

    /// Set `senderUri` (key 1).
    pub fn set_sender_uri(&mut self, uri: impl Into<String>) {
        self.insert(ExtensionKey::SENDER_URI, Value::Text(uri.into()));
    }

    /// Set `roomUri` (key 2).
    pub fn set_room_uri(&mut self, uri: impl Into<String>) {
        self.insert(ExtensionKey::ROOM_URI, Value::Text(uri.into()));
    }
}

/// A MIMI message ID (content-08 section 2.3): a hash algorithm octet followed by the first
/// 31 bytes of the hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 32]);

impl MessageId {
    /// The hash algorithm octet of SHA-256 (IANA Named Information registry).
    pub const SHA256: u8 = 0x01;

    /// `hashAlg || SHA-256(len16(sender) || sender || len16(room) || room || message ||
    /// salt)[0..31]`, where `message` is the message's exact bytes (which contain the salt
    /// as well: the second copy defeats length extension).
    pub fn compute(
        sender_uri: &str,
        room_uri: &str,
        message: &[u8],
        salt: &[u8; 16],
    ) -> Result<MessageId, ContentError> {
        let len16 =
            |s: &str| u16::try_from(s.len()).map_err(|_| ContentError::UriTooLong { len: s.len() });
        let mut h = Sha256::new();
        h.update(len16(sender_uri)?.to_be_bytes());
        h.update(sender_uri.as_bytes());
        h.update(len16(room_uri)?.to_be_bytes());
        h.update(room_uri.as_bytes());
        h.update(message);
        h.update(salt);
        let digest = h.finalize();
        let mut id = [0u8; 32];
        id[0] = Self::SHA256;
        id[1..].copy_from_slice(&digest[..31]);
        Ok(MessageId(id))
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The hash algorithm octet (1 = SHA-256).
    pub fn hash_alg(&self) -> u8 {
        self.0[0]
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl TryFrom<&[u8]> for MessageId {
    type Error = ContentError;

    fn try_from(b: &[u8]) -> Result<Self, ContentError> {
        <[u8; 32]>::try_from(b)
            .map(MessageId)
            .map_err(|_| ContentError::BadValue {
                at: 0,
                field: "MessageId",
            })
    }
}

impl FromStr for MessageId {
    type Err = ContentError;

    /// 64 hex digits.
    fn from_str(s: &str) -> Result<Self, ContentError> {
        let bad = ContentError::BadValue {
            at: 0,
            field: "MessageId",
        };
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad);
        }
        let mut id = [0u8; 32];
        for (i, b) in id.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or(bad.clone())?;
            *b = u8::from_str_radix(pair, 16).map_err(|_| bad.clone())?;
        }
        Ok(MessageId(id))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.to_hex())
    }
}

pub(crate) fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
    s
}

/// The 16-byte salt of a MIMI content message's exact bytes (the first element of its
/// top-level array), e.g. for its franking tag (protocol-06 §5.4.1.1).
pub fn content_salt(message: &[u8]) -> Result<[u8; 16], ContentError> {
    let mut d = Dec::new(message);
    let mut seq = d.array("mimiContent")?;
    d.item(&mut seq)?;
    d.bytes_fixed::<16>("salt")
}

/// The message ID of a received (or sent) message's exact bytes.
///
/// Only the salt is read from `message` (the first element of the top-level array); the
/// rest is hashed as it is, so this works for non-deterministic input too. Decode the
/// message separately to validate it.
pub fn message_id(
    sender_uri: &str,
    room_uri: &str,
    message: &[u8],
) -> Result<MessageId, ContentError> {
    let mut d = Dec::new(message);
    let mut seq = d.array("mimiContent")?;
    d.item(&mut seq)?;
    let salt = d.bytes_fixed::<16>("salt")?;
    MessageId::compute(sender_uri, room_uri, message, &salt)
}

impl NestedPart {
    /// A part with no content (delete, unlike).
    pub fn null(disposition: Disposition) -> Self {
        NestedPart {
            disposition,
            language: String::new(),
            body: PartBody::Null,
        }
    }

    /// An inline part.
    pub fn single(
        disposition: Disposition,
        content_type: impl Into<String>,
        content: impl Into<Vec<u8>>,
    ) -> Self {
        NestedPart {
            disposition,
            language: String::new(),
            body: PartBody::Single {
                content_type: content_type.into(),
                content: content.into(),
            },
        }
    }

    /// A multipart (it needs at least two parts to encode).
    pub fn multi(
        disposition: Disposition,
        semantics: PartSemantics,
        parts: Vec<NestedPart>,
    ) -> Self {
        NestedPart {
            disposition,
            language: String::new(),
            body: PartBody::Multi { semantics, parts },
        }
    }

    /// Content type and content of a single (inline) part; `None` for the other forms.
    pub fn as_single(&self) -> Option<(&str, &[u8])> {
        match &self.body {
            PartBody::Single {
                content_type,
                content,
            } => Some((content_type, content)),
            _ => None,
        }
    }

    /// This part's cardinality.
    pub fn cardinality(&self) -> Cardinality {
        match self.body {
            PartBody::Null => Cardinality::NullPart,
            PartBody::Single { .. } => Cardinality::Single,
            PartBody::External(_) => Cardinality::External,
            PartBody::Multi { .. } => Cardinality::Multi,
        }
    }

    /// Every part in part-index order (content-08 section 2.7: zero-based, depth first,
    /// this part being index 0), with its nesting level (this part is level 1).
    pub fn parts_depth_first(&self) -> Vec<IndexedPart<'_>> {
        fn walk<'a>(p: &'a NestedPart, depth: usize, out: &mut Vec<IndexedPart<'a>>) {
            out.push(IndexedPart {
                index: out.len(),
                depth,
                part: p,
            });
            if let PartBody::Multi { parts, .. } = &p.body {
                parts.iter().for_each(|c| walk(c, depth + 1, out));
            }
        }
        let mut out = Vec::new();
        walk(self, 1, &mut out);
        out
    }

    /// The part with this part index (as used in `cid:N@local.invalid`).
    pub fn part(&self, index: usize) -> Option<&NestedPart> {
        self.parts_depth_first().get(index).map(|p| p.part)
    }
}

/// One entry of [`NestedPart::parts_depth_first`].
#[derive(Debug, Clone, Copy)]
pub struct IndexedPart<'a> {
    /// The implied part index.
    pub index: usize,
    /// Nesting level, the body being 1.
    pub depth: usize,
    /// The part.
    pub part: &'a NestedPart,
}

impl MimiContent {
    /// A message with this salt and body and every other field empty.
    pub fn new(salt: [u8; 16], nested_part: NestedPart) -> Self {
        MimiContent {
            salt,
            replaces: None,
            topic_id: Vec::new(),
            expires: None,
            in_reply_to: None,
            extensions: Extensions::new(),
            nested_part,
        }
    }

    /// A GFM-MIMI markdown message (the draft's `original` example shape).
    pub fn markdown(salt: [u8; 16], text: &str) -> Self {
        Self::new(
            salt,
            NestedPart::single(Disposition::RENDER, MARKDOWN, text.as_bytes()),
        )
    }

    /// A markdown reply to `target` (the draft's `reply` example shape).
    pub fn reply(salt: [u8; 16], target: MessageId, text: &str) -> Self {
        let mut m = Self::markdown(salt, text);
        m.in_reply_to = Some(target);
        m
    }

    /// A reaction (`text/plain`, disposition reaction) to `target`.
    pub fn reaction(salt: [u8; 16], target: MessageId, reaction: &str) -> Self {
        let mut m = Self::new(
            salt,
            NestedPart::single(Disposition::REACTION, PLAIN_TEXT, reaction.as_bytes()),
        );
        m.in_reply_to = Some(target);
        m
    }

    /// Decode leniently under the default [`ContentLimits`].
    pub fn decode(bytes: &[u8]) -> Result<MimiContent, ContentError> {
        Self::decode_with_limits(bytes, &ContentLimits::default()).map(|d| d.content)
    }

    /// Decode under the default limits, refusing input not in deterministic encoding.
    pub fn decode_canonical(bytes: &[u8]) -> Result<MimiContent, ContentError> {
        let d = Self::decode_with_limits(bytes, &ContentLimits::default())?;
        if d.canonical {
            Ok(d.content)
        } else {
            Err(ContentError::NonCanonical)
        }
    }

    /// Decode leniently, reporting whether the input was deterministic.
    pub fn decode_with_limits(
        bytes: &[u8],
        limits: &ContentLimits,
    ) -> Result<Decoded, ContentError> {
        check_input(bytes, limits)?;
        let mut d = Dec::new(bytes);
        let content = decode_content(&mut d, limits)?;
        d.finish()?;
        Ok(Decoded {
            content,
            canonical: d.canonical,
        })
    }

    /// Deterministic encoding. Fails if the value breaks the CDDL or the default limits
    /// (fewer than two parts in a multipart, too deep, bad extension keys, ...).
    pub fn encode(&self) -> Result<Vec<u8>, ContentError> {
        let limits = ContentLimits::default();
        let mut out = Vec::with_capacity(128);
        put_head(&mut out, cbor::MAJOR_ARRAY, 7);
        put_bytes(&mut out, &self.salt);
        put_opt_id(&mut out, self.replaces.as_ref());
        put_bytes(&mut out, &self.topic_id);
        match &self.expires {
            None => out.push(cbor::NULL),
            Some(e) => {
                put_head(&mut out, cbor::MAJOR_ARRAY, 2);
                put_bool(&mut out, e.relative);
                put_head(&mut out, MAJOR_UINT, u64::from(e.time));
            }
        }
        put_opt_id(&mut out, self.in_reply_to.as_ref());
        encode_extensions(&mut out, &self.extensions, &limits)?;
        let mut count = 0;
        encode_part(&mut out, &self.nested_part, 1, &mut count, &limits)?;
        Ok(out)
    }

    /// Encode and compute the message ID of the encoding.
    pub fn encode_with_id(
        &self,
        sender_uri: &str,
        room_uri: &str,
    ) -> Result<(Vec<u8>, MessageId), ContentError> {
        let bytes = self.encode()?;
        let id = MessageId::compute(sender_uri, room_uri, &bytes, &self.salt)?;
        Ok((bytes, id))
    }
}

fn check_input(bytes: &[u8], limits: &ContentLimits) -> Result<(), ContentError> {
    if bytes.len() > limits.max_input {
        return Err(ContentError::TooLarge {
            what: "input",
            len: bytes.len(),
            max: limits.max_input,
        });
    }
    Ok(())
}

fn put_opt_id(out: &mut Vec<u8>, id: Option<&MessageId>) {
    match id {
        None => out.push(cbor::NULL),
        Some(id) => put_bytes(out, &id.0),
    }
}

fn decode_opt_id(d: &mut Dec<'_>, field: &'static str) -> Result<Option<MessageId>, ContentError> {
    if d.is_null()? {
        d.skip_null()?;
        Ok(None)
    } else {
        Ok(Some(MessageId(d.bytes_fixed::<32>(field)?)))
    }
}

fn decode_content(d: &mut Dec<'_>, limits: &ContentLimits) -> Result<MimiContent, ContentError> {
    let mut seq = d.array("mimiContent")?;
    d.item(&mut seq)?;
    let salt = d.bytes_fixed::<16>("salt")?;
    d.item(&mut seq)?;
    let replaces = decode_opt_id(d, "replaces")?;
    d.item(&mut seq)?;
    let topic_id = d.bytes("topicId")?;
    d.item(&mut seq)?;
    let expires = if d.is_null()? {
        d.skip_null()?;
        None
    } else {
        let mut e = d.array("Expiration")?;
        d.item(&mut e)?;
        let relative = d.bool("Expiration.relative")?;
        d.item(&mut e)?;
        let time = d.uint_max("Expiration.time", u64::from(u32::MAX))? as u32;
        d.end(&mut e)?;
        Some(Expiration { relative, time })
    };
    d.item(&mut seq)?;
    let in_reply_to = decode_opt_id(d, "inReplyTo")?;
    d.item(&mut seq)?;
    let extensions = decode_extensions(d, limits)?;
    d.item(&mut seq)?;
    let mut count = 0;
    let nested_part = decode_part(d, 1, &mut count, limits)?;
    d.end(&mut seq)?;
    Ok(MimiContent {
        salt,
        replaces,
        topic_id,
        expires,
        in_reply_to,
        extensions,
        nested_part,
    })
}

fn decode_extensions(d: &mut Dec<'_>, limits: &ContentLimits) -> Result<Extensions, ContentError> {
    let max = limits.extension_depth();
    let mut seq: Seq = d.map("mimiExtensions")?;
    let mut entries: Vec<(ExtensionKey, Value)> = Vec::new();
    let mut last = None;
    while d.has_next(&mut seq)? {
        let at = d.pos();
        let key_head = d.peek()? >> 5;
        let key = match key_head {
            MAJOR_UINT | MAJOR_NINT | MAJOR_TEXT => d.value(2, max)?,
            _ => {
                return Err(ContentError::WrongType {
                    at,
                    field: "extension key",
                    expected: "integer or text string",
                });
            }
        };
        let key = match key {
            Value::Int(i) => i64::try_from(i).ok().map(ExtensionKey::Int),
            Value::Text(s) => Some(ExtensionKey::Text(s)),
            _ => None,
        }
        .filter(ExtensionKey::is_valid)
        .ok_or(ContentError::BadValue {
            at,
            field: "extension key",
        })?;
        d.note_key_order(at, &mut last, key.encoded_key(), &entries)?;
        let value_at = d.pos();
        let value = d.value(2, max)?;
        let is_uri = key == ExtensionKey::SENDER_URI || key == ExtensionKey::ROOM_URI;
        if is_uri && value.as_text().is_none() {
            return Err(ContentError::WrongType {
                at: value_at,
                field: "senderUri/roomUri extension",
                expected: "text string",
            });
        }
        entries.push((key, value));
    }
    // Out-of-order input (already noted as non-canonical) is kept sorted.
    if !d.canonical {
        entries.sort_by_cached_key(|(k, _)| k.encoded_key());
    }
    Ok(Extensions { entries })
}

fn encode_extensions(
    out: &mut Vec<u8>,
    ext: &Extensions,
    limits: &ContentLimits,
) -> Result<(), ContentError> {
    put_head(out, cbor::MAJOR_MAP, ext.entries.len() as u64);
    for (k, v) in &ext.entries {
        if !k.is_valid() {
            return Err(ContentError::BadValue {
                at: 0,
                field: "extension key",
            });
        }
        if (*k == ExtensionKey::SENDER_URI || *k == ExtensionKey::ROOM_URI) && v.as_text().is_none()
        {
            return Err(ContentError::WrongType {
                at: 0,
                field: "senderUri/roomUri extension",
                expected: "text string",
            });
        }
        v.check(2, limits.extension_depth())?;
        put_value(out, &k.to_value());
        put_value(out, v);
    }
    Ok(())
}

fn decode_part(
    d: &mut Dec<'_>,
    depth: usize,
    count: &mut usize,
    limits: &ContentLimits,
) -> Result<NestedPart, ContentError> {
    let at = d.pos();
    let max = limits.part_depth();
    if depth > max {
        return Err(ContentError::TooDeep {
            at,
            what: "nested part",
            max,
        });
    }
    *count += 1;
    if *count > limits.max_parts {
        return Err(ContentError::TooLarge {
            what: "parts",
            len: *count,
            max: limits.max_parts,
        });
    }
    let mut seq = d.array("NestedPart")?;
    d.item(&mut seq)?;
    let disposition = Disposition(d.uint_max("disposition", 255)? as u8);
    d.item(&mut seq)?;
    let language = d.text("language")?;
    d.item(&mut seq)?;
    let card_at = d.pos();
    let body = match d.uint("cardinality")? {
        0 => PartBody::Null,
        1 => {
            d.item(&mut seq)?;
            let content_type = d.text("contentType")?;
            d.item(&mut seq)?;
            let content = d.bytes("content")?;
            PartBody::Single {
                content_type,
                content,
            }
        }
        2 => PartBody::External(decode_external(d, &mut seq)?),
        3 => {
            d.item(&mut seq)?;
            let sem_at = d.pos();
            let semantics = PartSemantics::from_u8(d.uint_max("partSemantics", 255)? as u8).ok_or(
                ContentError::BadValue {
                    at: sem_at,
                    field: "partSemantics",
                },
            )?;
            d.item(&mut seq)?;
            let parts_at = d.pos();
            let mut ps = d.array("parts")?;
            let mut parts = Vec::new();
            while d.has_next(&mut ps)? {
                parts.push(decode_part(d, depth + 1, count, limits)?);
            }
            if parts.len() < 2 {
                return Err(ContentError::BadValue {
                    at: parts_at,
                    field: "parts (at least two)",
                });
            }
            PartBody::Multi { semantics, parts }
        }
        _ => {
            return Err(ContentError::BadValue {
                at: card_at,
                field: "cardinality",
            });
        }
    };
    d.end(&mut seq)?;
    Ok(NestedPart {
        disposition,
        language,
        body,
    })
}

fn decode_external(d: &mut Dec<'_>, seq: &mut Seq) -> Result<ExternalPart, ContentError> {
    d.item(seq)?;
    let content_type = d.text("contentType")?;
    d.item(seq)?;
    let url = d.text("url")?;
    d.item(seq)?;
    let expires = d.uint_max("expires", u64::from(u32::MAX))? as u32;
    d.item(seq)?;
    let size = d.uint("size")?;
    d.item(seq)?;
    let enc_alg = d.uint_max("encAlg", u64::from(u16::MAX))? as u16;
    d.item(seq)?;
    let key = d.bytes("key")?;
    d.item(seq)?;
    let nonce = d.bytes("nonce")?;
    d.item(seq)?;
    let aad = d.bytes("aad")?;
    d.item(seq)?;
    let hash_alg = d.uint_max("hashAlg", 255)? as u8;
    d.item(seq)?;
    let content_hash = d.bytes("contentHash")?;
    d.item(seq)?;
    let description = d.text("description")?;
    d.item(seq)?;
    let filename = d.text("filename")?;
    Ok(ExternalPart {
        content_type,
        url,
        expires,
        size,
        enc_alg,
        key,
        nonce,
        aad,
        hash_alg,
        content_hash,
        description,
        filename,
    })
}

fn encode_part(
    out: &mut Vec<u8>,
    p: &NestedPart,
    depth: usize,
    count: &mut usize,
    limits: &ContentLimits,
) -> Result<(), ContentError> {
    let max = limits.part_depth();
    if depth > max {
        return Err(ContentError::TooDeep {
            at: 0,
            what: "nested part",
            max,
        });
    }
    *count += 1;
    if *count > limits.max_parts {
        return Err(ContentError::TooLarge {
            what: "parts",
            len: *count,
            max: limits.max_parts,
        });
    }
    let len = match &p.body {
        PartBody::Null => 3,
        PartBody::Single { .. } | PartBody::Multi { .. } => 5,
        PartBody::External(_) => 15,
    };
    put_head(out, cbor::MAJOR_ARRAY, len);
    put_head(out, MAJOR_UINT, u64::from(p.disposition.0));
    put_text(out, &p.language);
    put_head(out, MAJOR_UINT, u64::from(p.cardinality().as_u8()));
    match &p.body {
        PartBody::Null => {}
        PartBody::Single {
            content_type,
            content,
        } => {
            put_text(out, content_type);
            put_bytes(out, content);
        }
        PartBody::External(e) => {
            put_text(out, &e.content_type);
            put_text(out, &e.url);
            put_head(out, MAJOR_UINT, u64::from(e.expires));
            put_head(out, MAJOR_UINT, e.size);
            put_head(out, MAJOR_UINT, u64::from(e.enc_alg));
            put_bytes(out, &e.key);
            put_bytes(out, &e.nonce);
            put_bytes(out, &e.aad);
            put_head(out, MAJOR_UINT, u64::from(e.hash_alg));
            put_bytes(out, &e.content_hash);
            put_text(out, &e.description);
            put_text(out, &e.filename);
        }
        PartBody::Multi { semantics, parts } => {
            if parts.len() < 2 {
                return Err(ContentError::BadValue {
                    at: 0,
                    field: "parts (at least two)",
                });
            }
            put_head(out, MAJOR_UINT, u64::from(semantics.as_u8()));
            put_head(out, cbor::MAJOR_ARRAY, parts.len() as u64);
            for c in parts {
                encode_part(out, c, depth + 1, count, limits)?;
            }
        }
    }
    Ok(())
}

/// The hub's accepted timestamp (content-08 section 2.10).
#[derive(Debug, Clone, PartialEq)]
pub enum Timestamp {
    /// Milliseconds since the UNIX epoch.
    Millis(u64),
    /// RFC 9581 extended time: the map inside tag 1001.
    Extended(Vec<(Value, Value)>),
}

/// `MessageDerivedValues` (content-08 section 2.10): what a receiver knows about a message
/// besides its content. The draft's `implied-original` example is one.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageDerivedValues {
    /// The message's ID.
    pub message_id: MessageId,
    /// When the hub accepted it.
    pub hub_accepted_timestamp: Timestamp,
    /// The MLS group ID.
    pub mls_group_id: Vec<u8>,
    /// The sender's leaf index.
    pub sender_leaf_index: u32,
    /// The sender's client URI.
    pub sender_client_url: String,
    /// The sender's user URI.
    pub sender_user_url: String,
    /// The room's URI.
    pub room_url: String,
}

/// Tag of RFC 9581 extended time.
const TAG_EXTENDED_TIME: u64 = 1001;

impl MessageDerivedValues {
    /// Decode leniently under the default limits, reporting whether the input was
    /// deterministic.
    pub fn decode(bytes: &[u8]) -> Result<(MessageDerivedValues, bool), ContentError> {
        let limits = ContentLimits::default();
        check_input(bytes, &limits)?;
        let mut d = Dec::new(bytes);
        let mut seq = d.array("MessageDerivedValues")?;
        d.item(&mut seq)?;
        let message_id = MessageId(d.bytes_fixed::<32>("messageId")?);
        d.item(&mut seq)?;
        let ts_at = d.pos();
        let hub_accepted_timestamp = match d.peek()? >> 5 {
            MAJOR_UINT => Timestamp::Millis(d.uint("hubAcceptedTimestamp")?),
            MAJOR_TAG => match d.value(1, limits.extension_depth())? {
                Value::Tag(TAG_EXTENDED_TIME, inner) => match *inner {
                    Value::Map(m) => Timestamp::Extended(m),
                    _ => {
                        return Err(ContentError::WrongType {
                            at: ts_at,
                            field: "hubAcceptedTimestamp",
                            expected: "map in tag 1001",
                        });
                    }
                },
                _ => {
                    return Err(ContentError::WrongType {
                        at: ts_at,
                        field: "hubAcceptedTimestamp",
                        expected: "tag 1001",
                    });
                }
            },
            _ => {
                return Err(ContentError::WrongType {
                    at: ts_at,
                    field: "hubAcceptedTimestamp",
                    expected: "unsigned integer or tag 1001",
                });
            }
        };
        d.item(&mut seq)?;
        let mls_group_id = d.bytes("mlsGroupId")?;
        d.item(&mut seq)?;
        let sender_leaf_index = d.uint_max("senderLeafIndex", u64::from(u32::MAX))? as u32;
        d.item(&mut seq)?;
        let sender_client_url = d.text("senderClientUrl")?;
        d.item(&mut seq)?;
        let sender_user_url = d.text("senderUserUrl")?;
        d.item(&mut seq)?;
        let room_url = d.text("roomUrl")?;
        d.end(&mut seq)?;
        d.finish()?;
        Ok((
            MessageDerivedValues {
                message_id,
                hub_accepted_timestamp,
                mls_group_id,
                sender_leaf_index,
                sender_client_url,
                sender_user_url,
                room_url,
            },
            d.canonical,
        ))
    }

    /// Deterministic encoding.
    pub fn encode(&self) -> Result<Vec<u8>, ContentError> {
        let mut out = Vec::with_capacity(128);
        put_head(&mut out, cbor::MAJOR_ARRAY, 7);
        put_bytes(&mut out, &self.message_id.0);
        match &self.hub_accepted_timestamp {
            Timestamp::Millis(ms) => put_head(&mut out, MAJOR_UINT, *ms),
            Timestamp::Extended(m) => {
                let v = Value::Map(m.clone());
                v.check(2, ContentLimits::default().extension_depth())?;
                put_head(&mut out, MAJOR_TAG, TAG_EXTENDED_TIME);
                put_value(&mut out, &v);
            }
        }
        put_bytes(&mut out, &self.mls_group_id);
        put_int(&mut out, i128::from(self.sender_leaf_index));
        put_text(&mut out, &self.sender_client_url);
        put_text(&mut out, &self.sender_user_url);
        put_text(&mut out, &self.room_url);
        Ok(out)
    }
}
