//! A small CBOR (RFC 8949) reader and writer, just what MIMI content needs.
//!
//! The reader accepts any well-formed CBOR but notes every departure from deterministic
//! encoding (section 4.2.1: shortest heads and floats, definite lengths, map keys sorted by
//! their encoded bytes) in [`Dec::canonical`]. Every length is checked against the remaining
//! input before it is used, and nothing is allocated from a declared length alone. The
//! writer always produces deterministic encoding.

use std::cmp::Ordering;

use super::error::ContentError;
use super::value::Value;

pub(crate) const MAJOR_UINT: u8 = 0;
pub(crate) const MAJOR_NINT: u8 = 1;
pub(crate) const MAJOR_BYTES: u8 = 2;
pub(crate) const MAJOR_TEXT: u8 = 3;
pub(crate) const MAJOR_ARRAY: u8 = 4;
pub(crate) const MAJOR_MAP: u8 = 5;
pub(crate) const MAJOR_TAG: u8 = 6;
pub(crate) const MAJOR_SIMPLE: u8 = 7;

const BREAK: u8 = 0xff;
pub(crate) const NULL: u8 = 0xf6;

/// A decoded head: major type and argument (`None` for indefinite length).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    pub at: usize,
    pub major: u8,
    /// The additional-information bits (to tell float widths apart).
    pub ai: u8,
    pub arg: Option<u64>,
}

/// Elements of an array or map still to read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seq {
    remaining: Option<u64>,
    field: &'static str,
}

/// A cursor over untrusted CBOR bytes.
#[derive(Debug)]
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    /// False once anything not in deterministic encoding was seen.
    pub canonical: bool,
}

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Dec {
            buf,
            pos: 0,
            canonical: true,
        }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub(crate) fn finish(&self) -> Result<(), ContentError> {
        if self.pos < self.buf.len() {
            Err(ContentError::TrailingBytes { at: self.pos })
        } else {
            Ok(())
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ContentError> {
        let at = self.pos;
        let end = at.checked_add(n).ok_or(ContentError::Truncated { at })?;
        let out = self
            .buf
            .get(at..end)
            .ok_or(ContentError::Truncated { at })?;
        self.pos = end;
        Ok(out)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], ContentError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn peek(&self) -> Result<u8, ContentError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(ContentError::Truncated { at: self.pos })
    }

    /// Read one head, checking well-formedness and noting non-shortest arguments.
    pub(crate) fn head(&mut self) -> Result<Head, ContentError> {
        let at = self.pos;
        let b = self.take_array::<1>()?[0];
        let major = b >> 5;
        let ai = b & 0x1f;
        let arg = match ai {
            0..=23 => Some(u64::from(ai)),
            24 => {
                let v = u64::from(self.take_array::<1>()?[0]);
                if major == MAJOR_SIMPLE {
                    if v < 32 {
                        return Err(ContentError::Malformed {
                            at,
                            what: "two-byte simple value below 32",
                        });
                    }
                } else if v < 24 {
                    self.canonical = false;
                }
                Some(v)
            }
            25 => {
                let v = u64::from(u16::from_be_bytes(self.take_array()?));
                if major != MAJOR_SIMPLE && v <= 0xff {
                    self.canonical = false;
                }
                Some(v)
            }
            26 => {
                let v = u64::from(u32::from_be_bytes(self.take_array()?));
                if major != MAJOR_SIMPLE && v <= 0xffff {
                    self.canonical = false;
                }
                Some(v)
            }
            27 => {
                let v = u64::from_be_bytes(self.take_array()?);
                if major != MAJOR_SIMPLE && v <= 0xffff_ffff {
                    self.canonical = false;
                }
                Some(v)
            }
            28..=30 => {
                return Err(ContentError::Malformed {
                    at,
                    what: "reserved additional information",
                });
            }
            _ => match major {
                MAJOR_BYTES | MAJOR_TEXT | MAJOR_ARRAY | MAJOR_MAP => {
                    self.canonical = false;
                    None
                }
                MAJOR_SIMPLE => {
                    return Err(ContentError::Malformed {
                        at,
                        what: "unexpected break",
                    });
                }
                _ => {
                    return Err(ContentError::Malformed {
                        at,
                        what: "indefinite length on a type without length",
                    });
                }
            },
        };
        Ok(Head { at, major, ai, arg })
    }

    /// A length argument as a count bounded by the remaining input (each element or byte
    /// takes at least one byte), so a declared length never drives an allocation.
    fn bounded_len(&self, at: usize, n: u64) -> Result<usize, ContentError> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(ContentError::Truncated { at }),
        }
    }

    fn wrong(h: &Head, field: &'static str, expected: &'static str) -> ContentError {
        ContentError::WrongType {
            at: h.at,
            field,
            expected,
        }
    }

    /// Is the next item `null`?
    pub(crate) fn is_null(&self) -> Result<bool, ContentError> {
        Ok(self.peek()? == NULL)
    }

    /// Consume a `null` known to be next.
    pub(crate) fn skip_null(&mut self) -> Result<(), ContentError> {
        self.take(1).map(|_| ())
    }

    pub(crate) fn uint(&mut self, field: &'static str) -> Result<u64, ContentError> {
        let h = self.head()?;
        match (h.major, h.arg) {
            (MAJOR_UINT, Some(v)) => Ok(v),
            _ => Err(Self::wrong(&h, field, "unsigned integer")),
        }
    }

    /// An unsigned integer no larger than `max`.
    pub(crate) fn uint_max(&mut self, field: &'static str, max: u64) -> Result<u64, ContentError> {
        let at = self.pos;
        let v = self.uint(field)?;
        if v > max {
            return Err(ContentError::BadValue { at, field });
        }
        Ok(v)
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, ContentError> {
        let h = self.head()?;
        match (h.major, h.arg) {
            (MAJOR_SIMPLE, Some(20)) if h.ai == 20 => Ok(false),
            (MAJOR_SIMPLE, Some(21)) if h.ai == 21 => Ok(true),
            _ => Err(Self::wrong(&h, field, "bool")),
        }
    }

    /// The contents of a byte or text string whose head is `h` (definite or chunked).
    fn string_body(&mut self, h: &Head) -> Result<Vec<u8>, ContentError> {
        match h.arg {
            Some(n) => {
                let n = self.bounded_len(h.at, n)?;
                Ok(self.take(n)?.to_vec())
            }
            None => {
                let mut out = Vec::new();
                loop {
                    if self.peek()? == BREAK {
                        self.pos += 1;
                        return Ok(out);
                    }
                    let c = self.head()?;
                    let Some(n) = c.arg.filter(|_| c.major == h.major) else {
                        return Err(ContentError::Malformed {
                            at: c.at,
                            what: "bad chunk in an indefinite-length string",
                        });
                    };
                    let n = self.bounded_len(c.at, n)?;
                    let chunk = self.take(n)?;
                    // Each chunk of a text string must itself be valid UTF-8 (section 3.2.3).
                    if h.major == MAJOR_TEXT && std::str::from_utf8(chunk).is_err() {
                        return Err(ContentError::InvalidUtf8 { at: c.at });
                    }
                    out.extend_from_slice(chunk);
                }
            }
        }
    }

    fn text_body(&mut self, h: &Head) -> Result<String, ContentError> {
        let raw = self.string_body(h)?;
        String::from_utf8(raw).map_err(|_| ContentError::InvalidUtf8 { at: h.at })
    }

    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<Vec<u8>, ContentError> {
        let h = self.head()?;
        if h.major != MAJOR_BYTES {
            return Err(Self::wrong(&h, field, "byte string"));
        }
        self.string_body(&h)
    }

    /// A byte string of exactly `N` bytes.
    pub(crate) fn bytes_fixed<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], ContentError> {
        let at = self.pos;
        let v = self.bytes(field)?;
        <[u8; N]>::try_from(v.as_slice()).map_err(|_| ContentError::BadValue { at, field })
    }

    pub(crate) fn text(&mut self, field: &'static str) -> Result<String, ContentError> {
        let h = self.head()?;
        if h.major != MAJOR_TEXT {
            return Err(Self::wrong(&h, field, "text string"));
        }
        self.text_body(&h)
    }

    /// Start an array.
    pub(crate) fn array(&mut self, field: &'static str) -> Result<Seq, ContentError> {
        let h = self.head()?;
        if h.major != MAJOR_ARRAY {
            return Err(Self::wrong(&h, field, "array"));
        }
        let remaining = match h.arg {
            Some(n) => Some(self.bounded_len(h.at, n)? as u64),
            None => None,
        };
        Ok(Seq { remaining, field })
    }

    /// Start a map; the count is of key/value pairs.
    pub(crate) fn map(&mut self, field: &'static str) -> Result<Seq, ContentError> {
        let h = self.head()?;
        if h.major != MAJOR_MAP {
            return Err(Self::wrong(&h, field, "map"));
        }
        let remaining = match h.arg {
            Some(n) => {
                // two items per pair, each at least one byte
                let bound = (self.remaining() / 2) as u64;
                if n > bound {
                    return Err(ContentError::Truncated { at: h.at });
                }
                Some(n)
            }
            None => None,
        };
        Ok(Seq { remaining, field })
    }

    /// Is there another element in `seq`? Consumes the break of an indefinite sequence.
    pub(crate) fn has_next(&mut self, seq: &mut Seq) -> Result<bool, ContentError> {
        match &mut seq.remaining {
            Some(0) => Ok(false),
            Some(n) => {
                *n -= 1;
                Ok(true)
            }
            None => {
                if self.peek()? == BREAK {
                    self.pos += 1;
                    seq.remaining = Some(0);
                    Ok(false)
                } else {
                    Ok(true)
                }
            }
        }
    }

    /// Require one more element of a fixed-shape array.
    pub(crate) fn item(&mut self, seq: &mut Seq) -> Result<(), ContentError> {
        let at = self.pos;
        if self.has_next(seq)? {
            Ok(())
        } else {
            Err(ContentError::BadValue {
                at,
                field: seq.field,
            })
        }
    }

    /// Require the end of a fixed-shape array.
    pub(crate) fn end(&mut self, seq: &mut Seq) -> Result<(), ContentError> {
        let at = self.pos;
        if self.has_next(seq)? {
            Err(ContentError::BadValue {
                at,
                field: seq.field,
            })
        } else {
            Ok(())
        }
    }

    /// Any CBOR item, with containers (array, map, tag) at `depth` levels at most; the
    /// item itself, if a container, is at level `level`.
    pub(crate) fn value(&mut self, level: usize, max: usize) -> Result<Value, ContentError> {
        let h = self.head()?;
        let container = matches!(h.major, MAJOR_ARRAY | MAJOR_MAP | MAJOR_TAG);
        if container && level > max {
            return Err(ContentError::TooDeep {
                at: h.at,
                what: "extension value",
                max,
            });
        }
        match h.major {
            MAJOR_UINT | MAJOR_NINT => {
                let v = i128::from(h.arg.unwrap_or(0));
                Ok(Value::Int(if h.major == MAJOR_UINT { v } else { -1 - v }))
            }
            MAJOR_BYTES => Ok(Value::Bytes(self.string_body(&h)?)),
            MAJOR_TEXT => Ok(Value::Text(self.text_body(&h)?)),
            MAJOR_ARRAY => {
                let mut seq = Seq {
                    remaining: match h.arg {
                        Some(n) => Some(self.bounded_len(h.at, n)? as u64),
                        None => None,
                    },
                    field: "array",
                };
                let mut items = Vec::with_capacity(seq.remaining.unwrap_or(0) as usize);
                while self.has_next(&mut seq)? {
                    items.push(self.value(level + 1, max)?);
                }
                Ok(Value::Array(items))
            }
            MAJOR_MAP => {
                let mut seq = Seq {
                    remaining: match h.arg {
                        Some(n) if n <= (self.remaining() / 2) as u64 => Some(n),
                        Some(_) => return Err(ContentError::Truncated { at: h.at }),
                        None => None,
                    },
                    field: "map",
                };
                let mut entries = Vec::with_capacity(seq.remaining.unwrap_or(0) as usize);
                let mut last_key: Option<Vec<u8>> = None;
                while self.has_next(&mut seq)? {
                    let key_at = self.pos;
                    let key = self.value(level + 1, max)?;
                    if !key.is_map_key() {
                        return Err(ContentError::WrongType {
                            at: key_at,
                            field: "map key in an extension",
                            expected: "integer (|n| < 2^53), text or byte string",
                        });
                    }
                    let enc = encode_value_vec(&key);
                    self.note_key_order(key_at, &mut last_key, enc, &entries)?;
                    let v = self.value(level + 1, max)?;
                    entries.push((key, v));
                }
                Ok(Value::Map(entries))
            }
            MAJOR_TAG => {
                let tag = h.arg.unwrap_or(0);
                let inner = self.value(level + 1, max)?;
                Ok(self.preferred_bignum(tag, inner))
            }
            _ => self.simple(&h),
        }
    }

    /// A bignum (tags 2 and 3) that fits an integer, or has leading zeros, is not preferred
    /// serialization (sections 3.4.3 and 4.2.1): read it as what the deterministic form
    /// would say, and flag the input, so re-encoding gives the deterministic bytes.
    fn preferred_bignum(&mut self, tag: u64, inner: Value) -> Value {
        let Value::Bytes(b) = &inner else {
            return Value::Tag(tag, Box::new(inner));
        };
        if tag != 2 && tag != 3 {
            return Value::Tag(tag, Box::new(inner));
        }
        let digits = &b[b.iter().take_while(|&&x| x == 0).count()..];
        if digits.len() <= 8 {
            self.canonical = false;
            let n = digits.iter().fold(0u64, |n, &d| n << 8 | u64::from(d));
            let n = i128::from(n);
            return Value::Int(if tag == 2 { n } else { -1 - n });
        }
        if digits.len() != b.len() {
            self.canonical = false;
            return Value::Tag(tag, Box::new(Value::Bytes(digits.to_vec())));
        }
        Value::Tag(tag, Box::new(inner))
    }

    /// Check a map key against the greatest key so far (`last`): duplicates are errors,
    /// disorder is only non-canonical. `last` stays the greatest key, so a key repeated after
    /// an out-of-order one (`1, 3, 2, 3`) is still caught.
    pub(crate) fn note_key_order<K>(
        &mut self,
        at: usize,
        last: &mut Option<Vec<u8>>,
        enc: Vec<u8>,
        earlier: &[(K, Value)],
    ) -> Result<(), ContentError>
    where
        K: EncodeKey,
    {
        match last.as_deref().map(|l| cmp_keys(l, &enc)) {
            Some(Ordering::Less) | None => *last = Some(enc),
            Some(Ordering::Equal) => return Err(ContentError::DuplicateKey { at }),
            Some(Ordering::Greater) => {
                self.canonical = false;
                // Out of order: the duplicate may be anywhere before.
                if earlier.iter().any(|(k, _)| k.encoded_key() == enc) {
                    return Err(ContentError::DuplicateKey { at });
                }
            }
        }
        Ok(())
    }

    fn simple(&mut self, h: &Head) -> Result<Value, ContentError> {
        match h.ai {
            20 => Ok(Value::Bool(false)),
            21 => Ok(Value::Bool(true)),
            22 => Ok(Value::Null),
            23 => Ok(Value::Undefined),
            0..=19 => Ok(Value::Simple(h.ai)),
            24 => Ok(Value::Simple(h.arg.unwrap_or(0) as u8)),
            25 => {
                let bits = h.arg.unwrap_or(0) as u16;
                if f16_is_nan(bits) && bits != 0x7e00 {
                    self.canonical = false;
                }
                Ok(Value::Float(f16_to_f64(bits)))
            }
            26 => {
                let v = f64::from(f32::from_bits(h.arg.unwrap_or(0) as u32));
                if v.is_nan() || f64_to_f16(v).is_some() {
                    self.canonical = false;
                }
                Ok(Value::Float(v))
            }
            _ => {
                let v = f64::from_bits(h.arg.unwrap_or(0));
                if v.is_nan() || f64_to_f16(v).is_some() || f64::from(v as f32) == v {
                    self.canonical = false;
                }
                Ok(Value::Float(v))
            }
        }
    }
}

/// Map keys that can report their deterministic encoding.
pub(crate) trait EncodeKey {
    fn encoded_key(&self) -> Vec<u8>;
}

impl EncodeKey for Value {
    fn encoded_key(&self) -> Vec<u8> {
        encode_value_vec(self)
    }
}

/// The order of section 4.2.1: bytewise lexicographic over the encoded keys.
pub(crate) fn cmp_keys(a: &[u8], b: &[u8]) -> Ordering {
    a.cmp(b)
}

/// Append a head in its shortest form.
pub(crate) fn put_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        out.push(m | arg as u8);
    } else if arg <= 0xff {
        out.push(m | 24);
        out.push(arg as u8);
    } else if arg <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_head(out, MAJOR_BYTES, b.len() as u64);
    out.extend_from_slice(b);
}

pub(crate) fn put_text(out: &mut Vec<u8>, s: &str) {
    put_head(out, MAJOR_TEXT, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_int(out: &mut Vec<u8>, v: i128) {
    if v >= 0 {
        put_head(out, MAJOR_UINT, v as u64);
    } else {
        put_head(out, MAJOR_NINT, (-1 - v) as u64);
    }
}

pub(crate) fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.push(if v { 0xf5 } else { 0xf4 });
}

/// The shortest float that keeps the value; NaN is always `0xf97e00`.
pub(crate) fn put_float(out: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        out.extend_from_slice(&[0xf9, 0x7e, 0x00]);
    } else if let Some(h) = f64_to_f16(v) {
        out.push(0xf9);
        out.extend_from_slice(&h.to_be_bytes());
    } else if f64::from(v as f32) == v {
        out.push(0xfa);
        out.extend_from_slice(&(v as f32).to_bits().to_be_bytes());
    } else {
        out.push(0xfb);
        out.extend_from_slice(&v.to_bits().to_be_bytes());
    }
}

/// Encode a value that was already checked ([`Value::check`]).
pub(crate) fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Int(i) => put_int(out, *i),
        Value::Bytes(b) => put_bytes(out, b),
        Value::Text(s) => put_text(out, s),
        Value::Array(items) => {
            put_head(out, MAJOR_ARRAY, items.len() as u64);
            items.iter().for_each(|i| put_value(out, i));
        }
        Value::Map(entries) => {
            let mut encoded: Vec<(Vec<u8>, &Value)> = entries
                .iter()
                .map(|(k, v)| (encode_value_vec(k), v))
                .collect();
            encoded.sort_by(|a, b| cmp_keys(&a.0, &b.0));
            put_head(out, MAJOR_MAP, encoded.len() as u64);
            for (k, v) in encoded {
                out.extend_from_slice(&k);
                put_value(out, v);
            }
        }
        Value::Tag(t, inner) => {
            put_head(out, MAJOR_TAG, *t);
            put_value(out, inner);
        }
        Value::Bool(b) => put_bool(out, *b),
        Value::Null => out.push(NULL),
        Value::Undefined => out.push(0xf7),
        Value::Simple(s) => put_head(out, MAJOR_SIMPLE, u64::from(*s)),
        Value::Float(f) => put_float(out, *f),
    }
}

pub(crate) fn encode_value_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    put_value(&mut out, v);
    out
}

fn f16_is_nan(h: u16) -> bool {
    h & 0x7c00 == 0x7c00 && h & 0x03ff != 0
}

/// IEEE 754 half to double (exact).
pub(crate) fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let mant = f64::from(h & 0x03ff);
    match exp {
        0 => sign * mant * 2f64.powi(-24),
        31 if mant == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        _ => sign * (1024.0 + mant) * 2f64.powi(exp - 25),
    }
}

/// The half-precision bits of `v` when the conversion is exact (NaN excluded).
pub(crate) fn f64_to_f16(v: f64) -> Option<u16> {
    if v.is_nan() {
        return None;
    }
    let bits = v.to_bits();
    let sign = ((bits >> 63) as u16) << 15;
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let mant = bits & ((1u64 << 52) - 1);
    if exp == 0x7ff {
        return Some(sign | 0x7c00);
    }
    if exp == 0 {
        // zero is exact; a double subnormal is far below the half range
        return (mant == 0).then_some(sign);
    }
    let e = exp - 1023;
    if (-14..=15).contains(&e) {
        if mant & ((1u64 << 42) - 1) != 0 {
            return None;
        }
        return Some(sign | (((e + 15) as u16) << 10) | (mant >> 42) as u16);
    }
    if (-24..-14).contains(&e) {
        let shift = (52 - (e + 24)) as u32;
        let full = (1u64 << 52) | mant;
        if full & ((1u64 << shift) - 1) != 0 {
            return None;
        }
        return Some(sign | (full >> shift) as u16);
    }
    None
}
