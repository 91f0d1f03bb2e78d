//! The content module's error type and decoding limits.

/// Why MIMI content bytes could not be decoded, or a value could not be encoded.
///
/// `at` is the byte offset in the input where the problem was found (0 on encode).
/// Everything but [`ContentError::UriTooLong`] and the encode-side uses of
/// [`ContentError::BadValue`] / [`ContentError::TooDeep`] describes bytes from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// The input ended in the middle of a CBOR item.
    #[error("input truncated at byte {at}")]
    Truncated {
        /// Where more bytes were needed.
        at: usize,
    },
    /// The top-level item ended before the input did.
    #[error("trailing bytes after the message at byte {at}")]
    TrailingBytes {
        /// Offset of the first extra byte.
        at: usize,
    },
    /// Not well-formed CBOR (RFC 8949 section 3): reserved additional information, a
    /// misplaced break, an indefinite-length string with a foreign chunk, ...
    #[error("malformed cbor at byte {at}: {what}")]
    Malformed {
        /// Offset of the offending head.
        at: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// Well-formed CBOR of a type the content format does not allow here.
    #[error("{field}: expected {expected} at byte {at}")]
    WrongType {
        /// Offset of the item.
        at: usize,
        /// The field of draft-ietf-mimi-content-08's CDDL being read.
        field: &'static str,
        /// The type the CDDL asks for.
        expected: &'static str,
    },
    /// The right type with a value the format does not allow (size, range, count).
    #[error("{field}: invalid value at byte {at}")]
    BadValue {
        /// Offset of the item.
        at: usize,
        /// Which field.
        field: &'static str,
    },
    /// A text string that is not valid UTF-8.
    #[error("invalid utf-8 in a text string at byte {at}")]
    InvalidUtf8 {
        /// Offset of the string's head.
        at: usize,
    },
    /// A map holds the same key twice.
    #[error("duplicate map key at byte {at}")]
    DuplicateKey {
        /// Offset of the second occurrence.
        at: usize,
    },
    /// Nested parts or extension values deeper than the limit (content-08 section 8.3).
    #[error("{what} nested deeper than {max} levels at byte {at}")]
    TooDeep {
        /// Offset of the item that went too deep.
        at: usize,
        /// `"nested part"` or `"extension value"`.
        what: &'static str,
        /// The limit in force.
        max: usize,
    },
    /// The input, or its number of parts, is over its limit.
    #[error("{what} too large: {len} > {max}")]
    TooLarge {
        /// Which count.
        what: &'static str,
        /// What was found.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The input is valid but not in deterministic encoding (RFC 8949 section 4.2.1); only
    /// from [`super::MimiContent::decode_canonical`].
    #[error("not deterministically encoded (rfc 8949 section 4.2.1)")]
    NonCanonical,
    /// A sender or room URI longer than the message ID's 16-bit length prefix allows.
    #[error("uri too long for the message id: {len} bytes")]
    UriTooLong {
        /// The URI's length in bytes.
        len: usize,
    },
}

/// Bounds applied while decoding MIMI content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentLimits {
    /// Largest input accepted, in bytes (default 1 MiB).
    pub max_input: usize,
    /// Deepest NestedPart: the body is level 1 (default 4, content-08 section 8.3).
    /// Values above 64 are treated as 64 so recursion stays shallow.
    pub max_part_depth: usize,
    /// Most NestedParts in one message, counting every level (default 1024, content-08
    /// section 10.1).
    pub max_parts: usize,
    /// Deepest tag, map or array in the extensions: the extensions map is level 1
    /// (default 4, content-08 section 8.3). Values above 64 are treated as 64.
    pub max_extension_depth: usize,
}

/// The hard ceiling on both depth limits, which bounds the decoder's recursion.
pub(crate) const MAX_DEPTH_CEILING: usize = 64;

impl Default for ContentLimits {
    fn default() -> Self {
        ContentLimits {
            max_input: crate::DEFAULT_MAX_BODY,
            max_part_depth: 4,
            max_parts: 1024,
            max_extension_depth: 4,
        }
    }
}

impl ContentLimits {
    pub(crate) fn part_depth(&self) -> usize {
        self.max_part_depth.min(MAX_DEPTH_CEILING)
    }

    pub(crate) fn extension_depth(&self) -> usize {
        self.max_extension_depth.min(MAX_DEPTH_CEILING)
    }
}
