//! The crate's single error type and the decoding limits.

/// Why bytes could not be decoded (or, rarely, encoded).
///
/// Every variant except [`WireError::Codec`] and [`WireError::TooLarge`] on encode describes
/// input that came from a peer: the relay rejects such a request rather than treating it as
/// its own fault. [`WireError::UnsupportedProposalType`],
/// [`WireError::UnsupportedCredentialType`] and [`WireError::UnknownWireFormat`] mark input
/// that may be valid but that this reader cannot delimit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The input ended in the middle of a structure.
    #[error("input truncated")]
    Truncated,
    /// The structure ended before the input did.
    #[error("trailing bytes after the message")]
    TrailingBytes,
    /// A body, vector or count is over its limit.
    #[error("{what} too large: {len} > {max}")]
    TooLarge {
        /// Which field or body.
        what: &'static str,
        /// The length or count found.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A protocol or MLS version other than mls10 (1).
    #[error("unsupported protocol version")]
    BadVersion,
    /// An MLS wire format this reader does not know.
    #[error("unknown mls wire format {0}")]
    UnknownWireFormat(u16),
    /// An MLS proposal type whose extent this reader cannot determine.
    #[error("unsupported mls proposal type {0}")]
    UnsupportedProposalType(u16),
    /// An MLS credential type whose extent this reader cannot determine.
    #[error("unsupported mls credential type {0}")]
    UnsupportedCredentialType(u16),
    /// A field holds a value the protocol does not allow here.
    #[error("invalid value for {what}")]
    BadValue {
        /// Which field.
        what: &'static str,
    },
    /// An error raised by `tls_codec` (only when this crate's types are used through it).
    #[error("tls codec error")]
    Codec(#[source] tls_codec::Error),
}

impl WireError {
    /// Map into `tls_codec`'s error for the trait impls.
    pub(crate) fn into_codec(self) -> tls_codec::Error {
        match self {
            WireError::Truncated => tls_codec::Error::EndOfStream,
            WireError::TrailingBytes => tls_codec::Error::TrailingData,
            WireError::Codec(e) => e,
            other => tls_codec::Error::DecodingError(other.to_string()),
        }
    }
}

/// Bounds applied while decoding untrusted bytes.
///
/// A peer can declare any vector length; these limits stop it before any allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request or response body accepted (default 1 MiB).
    pub max_body: usize,
    /// Largest single variable-length vector, in bytes (default 1 MiB).
    pub max_vector: usize,
    /// Most FanoutMessages accepted in one /notify body (default 1024).
    pub max_fanouts_per_body: usize,
}

/// 1 MiB, the default body and vector limit.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: DEFAULT_MAX_BODY,
            max_vector: DEFAULT_MAX_BODY,
            max_fanouts_per_body: 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_lower_case() {
        let errs = [
            WireError::Truncated,
            WireError::TrailingBytes,
            WireError::TooLarge {
                what: "body",
                len: 2,
                max: 1,
            },
            WireError::BadVersion,
            WireError::UnknownWireFormat(9),
            WireError::UnsupportedProposalType(9),
            WireError::UnsupportedCredentialType(9),
            WireError::BadValue { what: "x" },
            WireError::Codec(tls_codec::Error::EndOfStream),
        ];
        for e in errs {
            let s = e.to_string();
            assert!(s.chars().next().is_some_and(|c| c.is_lowercase()), "{s}");
            assert!(!s.ends_with('.'));
        }
    }

    #[test]
    fn default_limits() {
        let l = Limits::default();
        assert_eq!(l.max_body, 1024 * 1024);
        assert!(l.max_vector <= l.max_body);
    }
}
