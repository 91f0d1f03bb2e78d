//! MIMI URIs (`mimi://a.example/u/alice`, `/r/room`, `/d/device`, `/g/group`) and provider
//! domains.
//!
//! Accepted syntax, stricter than RFC 3986 so that one identifier has one spelling:
//! `mimi://` + lower-case DNS name (no port, no userinfo) + `/` + kind segment + `/` + id,
//! where the id is non-empty printable ASCII without `?`, `#` or spaces (percent-escapes
//! are kept as written). At most 1024 bytes.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest MIMI URI accepted, in bytes.
pub const MAX_URI_LEN: usize = 1024;

const SCHEME: &str = "mimi://";

/// Why a URI or domain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriError {
    /// Not `mimi://`.
    #[error("uri scheme is not mimi")]
    WrongScheme,
    /// Over [`MAX_URI_LEN`] bytes.
    #[error("uri longer than {MAX_URI_LEN} bytes")]
    TooLong,
    /// The domain is empty.
    #[error("empty domain")]
    EmptyDomain,
    /// The domain is not a lower-case DNS name.
    #[error("invalid domain")]
    BadDomain,
    /// No `/kind/id` path.
    #[error("empty path")]
    EmptyPath,
    /// The path is malformed.
    #[error("invalid path")]
    BadPath,
    /// A valid URI of the wrong kind (e.g. a user URI where a room is required).
    #[error("uri is not a {expected} uri")]
    WrongKind {
        /// The kind required.
        expected: &'static str,
    },
    /// A path segment did not percent-decode to UTF-8.
    #[error("path segment is not valid percent-encoded utf-8")]
    BadEncoding,
}

/// What a MIMI URI names, from its first path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UriKind {
    /// `/u/`
    User,
    /// `/r/`
    Room,
    /// `/d/` (a client device)
    Device,
    /// `/g/` (an MLS group)
    Group,
    /// Any other segment; see [`MimiUri::kind_segment`].
    Other,
}

/// A syntactically valid MIMI URI.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MimiUri {
    // Shared, so that the relay's many copies of a room or provider name cost no allocation.
    text: Arc<str>,
    domain_end: usize,
    kind_end: usize,
}

/// Hashes as its text alone (the offsets follow from it), so that a [`RoomId`] key is found
/// by its `&str` too ([`std::borrow::Borrow`]).
impl std::hash::Hash for MimiUri {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl MimiUri {
    /// Parse and validate.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        if s.len() > MAX_URI_LEN {
            return Err(UriError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(UriError::WrongScheme)?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if domain.is_empty() {
            return Err(UriError::EmptyDomain);
        }
        validate_domain(domain)?;
        if path.is_empty() {
            return Err(UriError::EmptyPath);
        }
        let (kind, id) = path.split_once('/').ok_or(UriError::BadPath)?;
        let ok_char = |c: char| c.is_ascii_graphic() && c != '?' && c != '#';
        if kind.is_empty() || id.is_empty() || !path.chars().all(ok_char) {
            return Err(UriError::BadPath);
        }
        let domain_end = SCHEME.len() + domain.len();
        Ok(MimiUri {
            text: Arc::from(s),
            domain_end,
            kind_end: domain_end + 1 + kind.len(),
        })
    }

    /// The URI as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The provider domain (authority).
    pub fn domain(&self) -> &str {
        self.text.get(SCHEME.len()..self.domain_end).unwrap_or("")
    }

    /// The first path segment (`u`, `r`, `d`, `g`, ...).
    pub fn kind_segment(&self) -> &str {
        self.text
            .get(self.domain_end + 1..self.kind_end)
            .unwrap_or("")
    }

    /// What the URI names.
    pub fn kind(&self) -> UriKind {
        match self.kind_segment() {
            "u" => UriKind::User,
            "r" => UriKind::Room,
            "d" => UriKind::Device,
            "g" => UriKind::Group,
            _ => UriKind::Other,
        }
    }

    /// Everything after the kind segment, e.g. `alice` in `mimi://a.example/u/alice`.
    pub fn id(&self) -> &str {
        self.text.get(self.kind_end + 1..).unwrap_or("")
    }

    /// The domain as a [`ProviderDomain`].
    pub fn provider(&self) -> ProviderDomain {
        ProviderDomain(Arc::from(self.domain()))
    }
}

impl FromStr for MimiUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, UriError> {
        MimiUri::parse(s)
    }
}

impl fmt::Display for MimiUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl AsRef<str> for MimiUri {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

/// A MIMI room URI (`mimi://domain/r/...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(MimiUri);

/// Everything but RFC 3986 unreserved characters is escaped, so the segment holds no `/`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A map keyed by room ids answers for the URI text: equality, order and hash are the text's.
impl std::borrow::Borrow<str> for RoomId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl RoomId {
    /// Parse a room URI.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        RoomId::try_from(MimiUri::parse(s)?)
    }

    /// The URI.
    pub fn uri(&self) -> &MimiUri {
        &self.0
    }

    /// The URI text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The hub's domain (the room URI's authority).
    pub fn domain(&self) -> &str {
        self.0.domain()
    }

    /// The room id percent-encoded as one path segment (for `/notify/{roomId}` etc).
    pub fn to_path_segment(&self) -> String {
        utf8_percent_encode(self.as_str(), SEGMENT).to_string()
    }

    /// Inverse of [`RoomId::to_path_segment`].
    pub fn from_path_segment(segment: &str) -> Result<Self, UriError> {
        if segment.len() > 3 * MAX_URI_LEN {
            return Err(UriError::TooLong);
        }
        let decoded = percent_decode_str(segment)
            .decode_utf8()
            .map_err(|_| UriError::BadEncoding)?;
        RoomId::parse(&decoded)
    }
}

impl TryFrom<MimiUri> for RoomId {
    type Error = UriError;
    fn try_from(uri: MimiUri) -> Result<Self, UriError> {
        if uri.kind() == UriKind::Room {
            Ok(RoomId(uri))
        } else {
            Err(UriError::WrongKind { expected: "room" })
        }
    }
}

impl From<RoomId> for MimiUri {
    fn from(r: RoomId) -> MimiUri {
        r.0
    }
}

impl FromStr for RoomId {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, UriError> {
        RoomId::parse(s)
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider's lower-case DNS name: at most 253 bytes, labels of 1..=63 bytes of
/// `a-z`, `0-9` and inner `-`, no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderDomain(Arc<str>);

impl ProviderDomain {
    /// Validate a domain name.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        if s.is_empty() {
            return Err(UriError::EmptyDomain);
        }
        validate_domain(s)?;
        Ok(ProviderDomain(Arc::from(s)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate_domain(s: &str) -> Result<(), UriError> {
    if s.is_empty() || s.len() > 253 {
        return Err(UriError::BadDomain);
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(UriError::BadDomain);
        }
    }
    Ok(())
}

impl FromStr for ProviderDomain {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, UriError> {
        ProviderDomain::parse(s)
    }
}

impl fmt::Display for ProviderDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ProviderDomain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

macro_rules! serde_as_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                <$t>::from_str(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_str!(MimiUri);
serde_as_str!(RoomId);
serde_as_str!(ProviderDomain);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_id_key_is_found_by_its_text() {
        let id = RoomId::parse("mimi://a.example/r/clubhouse").expect("room id");
        let mut hashed = std::collections::HashMap::new();
        hashed.insert(id.clone(), 1);
        let mut ordered = std::collections::BTreeMap::new();
        ordered.insert(id.clone(), 1);
        assert_eq!(hashed.get("mimi://a.example/r/clubhouse"), Some(&1));
        assert_eq!(ordered.get("mimi://a.example/r/clubhouse"), Some(&1));
        assert_eq!(hashed.get("mimi://a.example/r/clubhous"), None);
        let hash = |v: &dyn Fn(&mut std::collections::hash_map::DefaultHasher)| {
            use std::hash::Hasher;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            v(&mut h);
            h.finish()
        };
        use std::hash::Hash;
        assert_eq!(hash(&|h| id.hash(h)), hash(&|h| id.as_str().hash(h)));
    }

    #[test]
    fn draft_examples() {
        for (s, kind, id) in [
            ("mimi://a.example/u/alice", UriKind::User, "alice"),
            ("mimi://a.example/d/ClientA1", UriKind::Device, "ClientA1"),
            ("mimi://a.example/r/clubhouse", UriKind::Room, "clubhouse"),
            ("mimi://a.example/g/clubhouse", UriKind::Group, "clubhouse"),
            (
                "mimi://hub.example/r/Rl33FWLCYWOwxHrYnpWDQg",
                UriKind::Room,
                "Rl33FWLCYWOwxHrYnpWDQg",
            ),
            ("mimi://b.example/b/bob", UriKind::Other, "bob"),
        ] {
            let u = MimiUri::parse(s).unwrap();
            assert_eq!(u.kind(), kind, "{s}");
            assert_eq!(u.id(), id);
            assert_eq!(u.as_str(), s);
            assert_eq!(u.to_string(), s);
        }
        let u = MimiUri::parse("mimi://a.example/u/alice").unwrap();
        assert_eq!(u.domain(), "a.example");
        assert_eq!(u.kind_segment(), "u");
        assert_eq!(u.provider().as_str(), "a.example");
    }

    #[test]
    fn rejects() {
        use UriError::*;
        let long = format!("mimi://a.example/r/{}", "x".repeat(1024));
        for (s, e) in [
            ("https://a.example/u/alice", WrongScheme),
            ("mimi:/a.example/u/alice", WrongScheme),
            ("mimi:///u/alice", EmptyDomain),
            ("mimi://a.example", EmptyPath),
            ("mimi://a.example/", EmptyPath),
            ("mimi://a.example/u", BadPath),
            ("mimi://a.example/u/", BadPath),
            ("mimi://a.example//alice", BadPath),
            ("mimi://a.example/u/al ice", BadPath),
            ("mimi://a.example/u/alice#x", BadPath),
            ("mimi://A.example/u/alice", BadDomain),
            ("mimi://a_b.example/u/alice", BadDomain),
            ("mimi://a.example:443/u/alice", BadDomain),
            ("mimi://bob@a.example/u/alice", BadDomain),
            ("mimi://-a.example/u/alice", BadDomain),
            ("mimi://a..example/u/alice", BadDomain),
            (long.as_str(), TooLong),
        ] {
            assert_eq!(MimiUri::parse(s), Err(e), "{s}");
        }
    }

    #[test]
    fn room_id_must_be_room() {
        assert!(RoomId::parse("mimi://a.example/r/clubhouse").is_ok());
        assert_eq!(
            RoomId::parse("mimi://a.example/u/alice"),
            Err(UriError::WrongKind { expected: "room" })
        );
    }

    #[test]
    fn path_segment_round_trip() {
        let r = RoomId::parse("mimi://a.example/r/club~house_1.x-y%20z").unwrap();
        let seg = r.to_path_segment();
        assert_eq!(seg, "mimi%3A%2F%2Fa.example%2Fr%2Fclub~house_1.x-y%2520z");
        assert!(!seg.contains('/'));
        assert_eq!(RoomId::from_path_segment(&seg).unwrap(), r);
        assert_eq!(
            RoomId::from_path_segment("%ff%fe"),
            Err(UriError::BadEncoding)
        );
        assert_eq!(
            RoomId::from_path_segment("mimi%3A%2F%2Fa.example%2Fu%2Fx"),
            Err(UriError::WrongKind { expected: "room" })
        );
    }

    #[test]
    fn provider_domain() {
        let d: ProviderDomain = "a.example".parse().unwrap();
        assert_eq!(d.to_string(), "a.example");
        assert_eq!(
            ProviderDomain::parse("localhost").unwrap().as_str(),
            "localhost"
        );
        assert_eq!(ProviderDomain::parse(""), Err(UriError::EmptyDomain));
        assert_eq!(
            ProviderDomain::parse(&"a".repeat(64)),
            Err(UriError::BadDomain)
        );
        let too_long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
        ]
        .join(".");
        assert_eq!(ProviderDomain::parse(&too_long), Err(UriError::BadDomain));
        let max = [
            &"a".repeat(63)[..],
            &"b".repeat(63),
            &"c".repeat(63),
            &"d".repeat(61),
        ]
        .join(".");
        assert_eq!(max.len(), 253);
        assert!(ProviderDomain::parse(&max).is_ok());
        assert_eq!(
            ProviderDomain::parse(&format!("{max}e")),
            Err(UriError::BadDomain)
        );
        assert_eq!(
            ProviderDomain::parse("a.example."),
            Err(UriError::BadDomain)
        );
        assert_eq!(ProviderDomain::parse("é.example"), Err(UriError::BadDomain));
    }

    #[test]
    fn serde_as_strings() {
        let r = RoomId::parse("mimi://a.example/r/x").unwrap();
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(j, "\"mimi://a.example/r/x\"");
        assert_eq!(serde_json::from_str::<RoomId>(&j).unwrap(), r);
        assert!(serde_json::from_str::<RoomId>("\"mimi://a.example/u/x\"").is_err());
        let d: ProviderDomain = serde_json::from_str("\"b.example\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"b.example\"");
        let u: MimiUri = serde_json::from_str("\"mimi://a.example/u/alice\"").unwrap();
        assert_eq!(u.kind(), UriKind::User);
    }
}
