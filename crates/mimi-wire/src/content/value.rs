//! Generic CBOR values, for the extension values MIMI content leaves open (`value = any`).

use std::fmt;

use super::cbor::{EncodeKey, encode_value_vec};
use super::error::ContentError;

/// Largest integer magnitude allowed as a map key: 2^53 - 1 (content-08 section 8.2).
pub const MAX_SAFE_KEY: i64 = (1 << 53) - 1;

/// Any CBOR data item (RFC 8949 section 3).
///
/// Maps keep their entries in the order they were read or built; encoding sorts them as
/// section 4.2.1 requires. Floats of every width decode to `f64` and encode in their
/// shortest exact width.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Major types 0 and 1: -2^64 ..= 2^64 - 1.
    Int(i128),
    /// Major type 2.
    Bytes(Vec<u8>),
    /// Major type 3.
    Text(String),
    /// Major type 4.
    Array(Vec<Value>),
    /// Major type 5.
    Map(Vec<(Value, Value)>),
    /// Major type 6.
    Tag(u64, Box<Value>),
    /// `false` / `true`.
    Bool(bool),
    /// `null`.
    Null,
    /// `undefined`.
    Undefined,
    /// Another simple value (0..=19 or 32..=255).
    Simple(u8),
    /// A half, single or double float.
    Float(f64),
}

impl Value {
    /// May this value be a map key inside an extension (content-08 section 8.2)?
    pub fn is_map_key(&self) -> bool {
        match self {
            Value::Int(i) => i.unsigned_abs() <= MAX_SAFE_KEY as u128,
            Value::Text(_) | Value::Bytes(_) => true,
            _ => false,
        }
    }

    /// The text, if this is a text string.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The bytes, if this is a byte string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// Can this value be encoded inside an extension with containers at `level` and
    /// below no deeper than `max`?
    pub(crate) fn check(&self, level: usize, max: usize) -> Result<(), ContentError> {
        let bad = |field| ContentError::BadValue { at: 0, field };
        let deep = || ContentError::TooDeep {
            at: 0,
            what: "extension value",
            max,
        };
        match self {
            Value::Int(i) if *i < -(1i128 << 64) || *i >= (1i128 << 64) => {
                return Err(bad("integer out of cbor range"));
            }
            Value::Simple(s) if (20..=31).contains(s) => return Err(bad("simple value")),
            Value::Array(items) => {
                if level > max {
                    return Err(deep());
                }
                for i in items {
                    i.check(level + 1, max)?;
                }
            }
            Value::Map(entries) => {
                if level > max {
                    return Err(deep());
                }
                let mut keys = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    if !k.is_map_key() {
                        return Err(ContentError::WrongType {
                            at: 0,
                            field: "map key in an extension",
                            expected: "integer (|n| < 2^53), text or byte string",
                        });
                    }
                    k.check(level + 1, max)?;
                    v.check(level + 1, max)?;
                    keys.push(encode_value_vec(k));
                }
                keys.sort();
                if keys.windows(2).any(|w| w[0] == w[1]) {
                    return Err(ContentError::DuplicateKey { at: 0 });
                }
            }
            Value::Tag(_, inner) => {
                if level > max {
                    return Err(deep());
                }
                inner.check(level + 1, max)?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// A key of the extensions map: an integer or a text string of 1 to 255 bytes
/// (content-08 section 2.6).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExtensionKey {
    /// Positive keys are IANA-registered; negative ones are private use. |n| < 2^53.
    Int(i64),
    /// Private use.
    Text(String),
}

impl ExtensionKey {
    /// `senderUri` (1): the sender's URI, a text string.
    pub const SENDER_URI: ExtensionKey = ExtensionKey::Int(1);
    /// `roomUri` (2): the room's URI, a text string.
    pub const ROOM_URI: ExtensionKey = ExtensionKey::Int(2);

    pub(crate) fn is_valid(&self) -> bool {
        match self {
            ExtensionKey::Int(i) => i.unsigned_abs() <= MAX_SAFE_KEY as u64,
            ExtensionKey::Text(s) => (1..=255).contains(&s.len()),
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        match self {
            ExtensionKey::Int(i) => Value::Int(i128::from(*i)),
            ExtensionKey::Text(s) => Value::Text(s.clone()),
        }
    }
}

impl EncodeKey for ExtensionKey {
    fn encoded_key(&self) -> Vec<u8> {
        encode_value_vec(&self.to_value())
    }
}

impl fmt::Display for ExtensionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtensionKey::Int(i) => write!(f, "{i}"),
            ExtensionKey::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// Diagnostic notation (RFC 8949 section 8), for people reading a message.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Bytes(b) => {
                f.write_str("h'")?;
                for x in b {
                    write!(f, "{x:02x}")?;
                }
                f.write_str("'")
            }
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Array(items) => {
                f.write_str("[")?;
                for (n, i) in items.iter().enumerate() {
                    if n > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{i}")?;
                }
                f.write_str("]")
            }
            Value::Map(entries) => {
                f.write_str("{")?;
                for (n, (k, v)) in entries.iter().enumerate() {
                    if n > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
            Value::Tag(t, inner) => write!(f, "{t}({inner})"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Null => f.write_str("null"),
            Value::Undefined => f.write_str("undefined"),
            Value::Simple(s) => write!(f, "simple({s})"),
            Value::Float(x) => write!(f, "{x:?}"),
        }
    }
}
