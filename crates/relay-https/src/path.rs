//! The `/v1/{endpoint}/{target}` path parameter: strict percent-decoding in, one encoded
//! segment out.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// Everything but RFC 3986 unreserved characters is escaped, so a target is one path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Encodes `target` as one path segment (`mimi://a.example/r/x` → `mimi%3A%2F%2Fa.example%2Fr%2Fx`).
pub(crate) fn encode_target(target: &str) -> String {
    utf8_percent_encode(target, SEGMENT).to_string()
}

/// Why a path parameter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
}

/// Decodes the raw path parameter.
///
/// `percent_decode_str` passes a malformed `%zz` through unchanged; we refuse it instead, so
/// one target has one spelling on the wire. Unescaped `/` are accepted as they are: the
/// draft's example flow writes `POST /notify/a.example/r/clubhouse`.
pub(crate) fn decode_target(raw: &str) -> Result<String, DecodeError> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while let Some(off) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + off;
        let ok = bytes.get(at + 1).is_some_and(u8::is_ascii_hexdigit)
            && bytes.get(at + 2).is_some_and(u8::is_ascii_hexdigit);
        if !ok {
            return Err(DecodeError::BadEscape);
        }
        i = at + 3;
    }
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| DecodeError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for t in [
            "mimi://a.example/r/room",
            "mimi://b.example/u/alice%20x",
            "b.example",
            "ü/?#",
        ] {
            let enc = encode_target(t);
            assert!(!enc.contains('/'), "{enc}");
            assert_eq!(decode_target(&enc).as_deref(), Ok(t));
        }
        assert_eq!(
            encode_target("mimi://a.example/r/x"),
            "mimi%3A%2F%2Fa.example%2Fr%2Fx"
        );
    }

    #[test]
    fn unescaped_slashes_accepted() {
        assert_eq!(
            decode_target("a.example/r/clubhouse").as_deref(),
            Ok("a.example/r/clubhouse")
        );
    }

    #[test]
    fn malformed_refused() {
        assert_eq!(decode_target("%"), Err(DecodeError::BadEscape));
        assert_eq!(decode_target("ab%2"), Err(DecodeError::BadEscape));
        assert_eq!(decode_target("%zz"), Err(DecodeError::BadEscape));
        assert_eq!(decode_target("%4g"), Err(DecodeError::BadEscape));
        assert_eq!(decode_target("%ff%fe"), Err(DecodeError::NotUtf8));
        assert_eq!(decode_target("%41%2f"), Ok("A/".to_owned()));
    }
}
