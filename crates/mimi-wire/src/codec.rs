//! Bounds-checked reader and writer for the TLS presentation language with MLS varint
//! vectors (RFC 9420 §2.1.2). Every read checks the remaining input first, so no decoder
//! in this crate indexes past its input or allocates from a declared length.

use crate::error::{Limits, WireError};

/// Largest length an MLS varint can carry (30 bits).
pub(crate) const MAX_VARINT: usize = (1 << 30) - 1;

/// A cursor over untrusted bytes.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: Limits,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], limits: Limits) -> Self {
        Reader {
            buf,
            pos: 0,
            limits,
        }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The bytes not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    /// The bytes read since `start` (a value of [`Reader::position`]).
    pub(crate) fn since(&self, start: usize) -> &'a [u8] {
        self.buf.get(start..self.pos).unwrap_or(&[])
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let out = self.buf.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// An MLS varint length: 1, 2 or 4 bytes, minimal encoding, `0b11` prefix invalid.
    pub(crate) fn varint(&mut self) -> Result<usize, WireError> {
        let first = self.u8()?;
        let (len, min) = match first >> 6 {
            0 => return Ok(usize::from(first & 0x3f)),
            1 => (usize::from(first & 0x3f) << 8 | usize::from(self.u8()?), 64),
            2 => {
                let rest = self.array::<3>()?;
                let v = usize::from(first & 0x3f) << 24
                    | usize::from(rest[0]) << 16
                    | usize::from(rest[1]) << 8
                    | usize::from(rest[2]);
                (v, 1 << 14)
            }
            _ => {
                return Err(WireError::BadValue {
                    what: "vector length prefix",
                });
            }
        };
        if len < min {
            return Err(WireError::BadValue {
                what: "non-minimal vector length",
            });
        }
        Ok(len)
    }

    /// The contents of an `opaque x<V>` vector, bounded by `max_vector`.
    pub(crate) fn vec(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let len = self.varint()?;
        if len > self.limits.max_vector {
            return Err(WireError::TooLarge {
                what,
                len,
                max: self.limits.max_vector,
            });
        }
        self.bytes(len)
    }

    /// A reader over the contents of a `T x<V>` vector, to parse its elements.
    pub(crate) fn sub_vec(&mut self, what: &'static str) -> Result<Reader<'a>, WireError> {
        let contents = self.vec(what)?;
        Ok(Reader::new(contents, self.limits))
    }

    /// An `optional<T>` presence byte.
    pub(crate) fn present(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::BadValue { what }),
        }
    }

    pub(crate) fn utf8(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.vec(what)?).map_err(|_| WireError::BadValue { what })
    }

    pub(crate) fn finish(&self) -> Result<(), WireError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes)
        }
    }
}

/// Append-only encoder. Vectors longer than an MLS varint allows are reported, not
/// truncated.
pub(crate) trait Writer {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_varint(&mut self, len: usize) -> Result<(), WireError>;
    fn put_vec(&mut self, bytes: &[u8]) -> Result<(), WireError>;
    /// Write `f`'s output as the contents of a `<V>` vector.
    fn put_vec_with(
        &mut self,
        f: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
    ) -> Result<(), WireError>;
}

impl Writer for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_varint(&mut self, len: usize) -> Result<(), WireError> {
        match len {
            0..=0x3f => self.push(len as u8),
            0x40..=0x3fff => self.put_u16(0x4000 | len as u16),
            0x4000..=MAX_VARINT => self.put_u32(0x8000_0000 | len as u32),
            _ => {
                return Err(WireError::TooLarge {
                    what: "vector",
                    len,
                    max: MAX_VARINT,
                });
            }
        }
        Ok(())
    }
    fn put_vec(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.put_varint(bytes.len())?;
        self.extend_from_slice(bytes);
        Ok(())
    }
    fn put_vec_with(
        &mut self,
        f: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
    ) -> Result<(), WireError> {
        let mut inner = Vec::new();
        f(&mut inner)?;
        self.put_vec(&inner)
    }
}

/// Types this crate decodes from a [`Reader`].
pub(crate) trait Decode<'a>: Sized {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError>;
}

/// Types this crate encodes.
pub(crate) trait Encode {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError>;
}

/// Decode a whole body: size-checked, fully consumed.
pub(crate) fn decode_all<'a, T: Decode<'a>>(
    bytes: &'a [u8],
    limits: &Limits,
) -> Result<T, WireError> {
    if bytes.len() > limits.max_body {
        return Err(WireError::TooLarge {
            what: "body",
            len: bytes.len(),
            max: limits.max_body,
        });
    }
    let mut r = Reader::new(bytes, *limits);
    let v = T::decode_from(&mut r)?;
    r.finish()?;
    Ok(v)
}

/// Decode a sequence of `T` that fills a vector's contents.
pub(crate) fn decode_list<'a, T: Decode<'a>>(
    r: &mut Reader<'a>,
    what: &'static str,
) -> Result<Vec<T>, WireError> {
    let mut sub = r.sub_vec(what)?;
    let mut out = Vec::new();
    while !sub.is_empty() {
        out.push(T::decode_from(&mut sub)?);
    }
    Ok(out)
}

/// Encode a list as a `T x<V>` vector.
pub(crate) fn encode_list<T: Encode>(out: &mut Vec<u8>, items: &[T]) -> Result<(), WireError> {
    out.put_vec_with(|w| items.iter().try_for_each(|i| i.encode_to(w)))
}

/// Give an owned type the public `decode`/`encode` methods and the `tls_codec` traits.
macro_rules! wire_type {
    ($t:ty) => {
        impl $t {
            /// Decode from exactly `bytes` under the default [`crate::Limits`].
            pub fn decode(bytes: &[u8]) -> Result<Self, $crate::WireError> {
                $crate::codec::decode_all(bytes, &$crate::Limits::default())
            }

            /// Decode from exactly `bytes` under `limits`.
            pub fn decode_with_limits(
                bytes: &[u8],
                limits: &$crate::Limits,
            ) -> Result<Self, $crate::WireError> {
                $crate::codec::decode_all(bytes, limits)
            }

            /// Encode to a new buffer.
            pub fn encode(&self) -> Result<Vec<u8>, $crate::WireError> {
                let mut out = Vec::new();
                $crate::codec::Encode::encode_to(self, &mut out)?;
                Ok(out)
            }
        }

        impl tls_codec::Size for $t {
            fn tls_serialized_len(&self) -> usize {
                self.encode().map(|v| v.len()).unwrap_or(0)
            }
        }

        impl tls_codec::Serialize for $t {
            fn tls_serialize<W: std::io::Write>(
                &self,
                writer: &mut W,
            ) -> Result<usize, tls_codec::Error> {
                let bytes = self.encode().map_err($crate::WireError::into_codec)?;
                writer
                    .write_all(&bytes)
                    .map_err(|e| tls_codec::Error::EncodingError(e.to_string()))?;
                Ok(bytes.len())
            }
        }

        impl tls_codec::DeserializeBytes for $t {
            fn tls_deserialize_bytes(bytes: &[u8]) -> Result<(Self, &[u8]), tls_codec::Error> {
                let mut r = $crate::codec::Reader::new(bytes, $crate::Limits::default());
                let v = <$t as $crate::codec::Decode>::decode_from(&mut r)
                    .map_err($crate::WireError::into_codec)?;
                Ok((v, r.rest()))
            }
        }
    };
}
pub(crate) use wire_type;

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(b: &[u8]) -> Reader<'_> {
        Reader::new(b, Limits::default())
    }

    #[test]
    fn varint_known_answers() {
        // RFC 9420 §2.1.2 examples.
        assert_eq!(rd(&[0x25]).varint(), Ok(37));
        assert_eq!(rd(&[0x7b, 0xbd]).varint(), Ok(15293));
        assert_eq!(rd(&[0x9d, 0x7f, 0x3e, 0x7d]).varint(), Ok(494_878_333));
        for n in [0usize, 1, 63, 64, 16383, 16384, MAX_VARINT] {
            let mut v = Vec::new();
            v.put_varint(n).unwrap();
            assert_eq!(rd(&v).varint(), Ok(n));
        }
    }

    #[test]
    fn varint_rejects_bad_forms() {
        assert!(matches!(
            rd(&[0xc0, 0, 0, 0, 0, 0, 0, 1]).varint(),
            Err(WireError::BadValue { .. })
        ));
        assert!(matches!(
            rd(&[0x40, 0x01]).varint(),
            Err(WireError::BadValue { .. })
        ));
        assert!(matches!(
            rd(&[0x80, 0, 0x10, 0]).varint(),
            Err(WireError::BadValue { .. })
        ));
        assert_eq!(rd(&[0x40]).varint(), Err(WireError::Truncated));
        let mut v = Vec::new();
        assert!(v.put_varint(MAX_VARINT + 1).is_err());
    }

    #[test]
    fn vec_limits() {
        let limits = Limits {
            max_vector: 4,
            ..Limits::default()
        };
        let mut r = Reader::new(&[5, 1, 2, 3, 4, 5], limits);
        assert!(matches!(
            r.vec("x"),
            Err(WireError::TooLarge { len: 5, max: 4, .. })
        ));
        // Declared length past the end is truncation, checked before any allocation.
        assert_eq!(rd(&[0x80, 0x10, 0, 0]).vec("x"), Err(WireError::Truncated));
        assert!(matches!(
            rd(&[0xbf, 0xff, 0xff, 0xff]).vec("x"),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn optional_presence() {
        assert_eq!(rd(&[0]).present("o"), Ok(false));
        assert_eq!(rd(&[1]).present("o"), Ok(true));
        assert!(rd(&[2]).present("o").is_err());
    }
}
