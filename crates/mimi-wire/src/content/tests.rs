use super::cbor::{f16_to_f64, f64_to_f16};
use super::*;
use crate::testutil::XorShift;

/// The draft's `original` example (interop/mimi-content-examples/original.cbor).
const ORIGINAL: &[u8] = include_bytes!("../../../../interop/mimi-content-examples/original.cbor");
const MULTIPART: &[u8] =
    include_bytes!("../../../../interop/mimi-content-examples/multipart-1.cbor");
const EXPIRING: &[u8] = include_bytes!("../../../../interop/mimi-content-examples/expiring.cbor");
const VECTORS: &[&[u8]] = &[ORIGINAL, MULTIPART, EXPIRING];

const SENDER: &str = "mimi://example.com/u/alice-smith";
const ROOM: &str = "mimi://example.com/r/engineering_team";

fn salt() -> [u8; 16] {
    *b"0123456789abcdef"
}

/// A message whose body is `part`.
fn with_body(part: NestedPart) -> MimiContent {
    MimiContent::new(salt(), part)
}

fn text_part(s: &str) -> NestedPart {
    NestedPart::single(Disposition::RENDER, PLAIN_TEXT, s.as_bytes())
}

/// A chain of multiparts `levels` deep (the body is level 1).
fn nested(levels: usize) -> NestedPart {
    if levels <= 1 {
        return NestedPart::null(Disposition::RENDER);
    }
    NestedPart::multi(
        Disposition::RENDER,
        PartSemantics::ProcessAll,
        vec![nested(levels - 1), NestedPart::null(Disposition::RENDER)],
    )
}

/// Hand-built bytes of a message whose body is `body` (already encoded), bypassing the
/// encoder's checks.
fn raw_message(extensions: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = vec![0x87, 0x50];
    out.extend_from_slice(&salt());
    out.extend_from_slice(&[0xf6, 0x40, 0xf6, 0xf6]);
    out.extend_from_slice(extensions);
    out.extend_from_slice(body);
    out
}

fn raw_nested(levels: usize) -> Vec<u8> {
    // [1, "", 3, 2, [child, [1, "", 0]]], built without recursion
    const MULTI_HEAD: [u8; 6] = [0x85, 0x01, 0x60, 0x03, 0x02, 0x82];
    const NULL_PART: [u8; 4] = [0x83, 0x01, 0x60, 0x00];
    let n = levels.saturating_sub(1);
    let mut out = MULTI_HEAD.repeat(n);
    out.extend_from_slice(&NULL_PART);
    out.extend(NULL_PART.repeat(n));
    out
}

#[test]
fn builders_roundtrip() {
    let mut m = MimiContent::markdown(salt(), "hello *world*");
    m.extensions.set_sender_uri(SENDER);
    m.extensions.set_room_uri(ROOM);
    m.topic_id = b"topic".to_vec();
    m.expires = Some(Expiration {
        relative: true,
        time: 600,
    });
    let bytes = m.encode().unwrap();
    let d = MimiContent::decode_with_limits(&bytes, &ContentLimits::default()).unwrap();
    assert!(d.canonical);
    assert_eq!(d.content, m);

    let (bytes2, id) = m.encode_with_id(SENDER, ROOM).unwrap();
    assert_eq!(bytes2, bytes);
    assert_eq!(message_id(SENDER, ROOM, &bytes).unwrap(), id);

    let reply = MimiContent::reply(salt(), id, "sure");
    let back = MimiContent::decode(&reply.encode().unwrap()).unwrap();
    assert_eq!(back.in_reply_to, Some(id));
    assert_eq!(back.nested_part.as_single(), Some((MARKDOWN, &b"sure"[..])));
    assert_eq!(NestedPart::null(Disposition::RENDER).as_single(), None);

    let r = MimiContent::reaction(salt(), id, "👍");
    let back = MimiContent::decode(&r.encode().unwrap()).unwrap();
    assert_eq!(back.in_reply_to, Some(id));
    assert_eq!(back.nested_part.disposition, Disposition::REACTION);
}

#[test]
fn external_part_roundtrips_with_every_field() {
    let ext = ExternalPart {
        content_type: "image/png".into(),
        url: "https://example.com/x.png".into(),
        expires: u32::MAX,
        size: u64::MAX,
        enc_alg: 1,
        key: vec![1; 16],
        nonce: vec![2; 12],
        aad: vec![],
        hash_alg: 1,
        content_hash: vec![3; 32],
        description: "a picture".into(),
        filename: "x.png".into(),
    };
    let mut part = NestedPart::null(Disposition::ATTACHMENT);
    part.language = "en,fr".into();
    part.body = PartBody::External(ext);
    let m = with_body(NestedPart::multi(
        Disposition::RENDER,
        PartSemantics::SingleUnit,
        vec![text_part("see attached"), part],
    ));
    let bytes = m.encode().unwrap();
    assert_eq!(MimiContent::decode_canonical(&bytes).unwrap(), m);
    let parts = m.nested_part.parts_depth_first();
    assert_eq!(parts[2].part.cardinality(), Cardinality::External);
    assert_eq!(parts[2].index, 2);
}

#[test]
fn every_disposition_and_semantics_roundtrips() {
    for d in 0..=255u8 {
        let m = with_body(NestedPart::null(Disposition(d)));
        let back = MimiContent::decode(&m.encode().unwrap()).unwrap();
        assert_eq!(back.nested_part.disposition, Disposition(d));
        assert_eq!(Disposition(d).name().is_some(), d <= 8);
    }
    for s in [
        PartSemantics::ChooseOne,
        PartSemantics::SingleUnit,
        PartSemantics::ProcessAll,
    ] {
        assert_eq!(PartSemantics::from_u8(s.as_u8()), Some(s));
        let m = with_body(NestedPart::multi(
            Disposition::RENDER,
            s,
            vec![text_part("a"), text_part("b")],
        ));
        assert_eq!(MimiContent::decode(&m.encode().unwrap()).unwrap(), m);
    }
    assert_eq!(PartSemantics::from_u8(3), None);
}

#[test]
fn message_id_depends_on_every_input() {
    let m = MimiContent::markdown(salt(), "x");
    let bytes = m.encode().unwrap();
    let base = message_id(SENDER, ROOM, &bytes).unwrap();
    assert_ne!(message_id(ROOM, SENDER, &bytes).unwrap(), base);
    // Moving a byte between the two URIs changes the ID: the length prefixes matter.
    assert_ne!(
        message_id(
            "mimi://example.com/u/alice-smit",
            "hmimi://example.com/r/engineering_team",
            &bytes
        )
        .unwrap(),
        base
    );
    let mut other = m.clone();
    other.salt[0] ^= 1;
    assert_ne!(
        message_id(SENDER, ROOM, &other.encode().unwrap()).unwrap(),
        base
    );
    let long = "x".repeat(70_000);
    assert_eq!(
        message_id(&long, ROOM, &bytes),
        Err(ContentError::UriTooLong { len: 70_000 })
    );
    assert!(matches!(
        message_id(SENDER, ROOM, &[0x87, 0x4f]),
        Err(ContentError::Truncated { .. })
    ));
}

#[test]
fn message_id_text_forms() {
    let id = message_id(SENDER, ROOM, ORIGINAL).unwrap();
    let hex = id.to_hex();
    assert_eq!(hex.len(), 64);
    assert_eq!(hex, hex.to_lowercase());
    assert_eq!(hex.parse::<MessageId>().unwrap(), id);
    assert_eq!(id.to_string(), hex);
    assert!("zz".repeat(32).parse::<MessageId>().is_err());
    assert!("ab".parse::<MessageId>().is_err());
    assert!(MessageId::try_from(&[0u8; 31][..]).is_err());
}

#[test]
fn extensions_keep_deterministic_order() {
    let mut e = Extensions::new();
    e.insert(ExtensionKey::Text("z".into()), Value::Int(1));
    e.insert(ExtensionKey::Int(-1), Value::Null);
    e.insert(ExtensionKey::Int(300), Value::Bool(true));
    e.insert(ExtensionKey::Int(2), Value::Text(ROOM.into()));
    e.insert(ExtensionKey::Int(1), Value::Text(SENDER.into()));
    // encoded: 01 < 02 < 19 012c < 20 < 61 7a
    let keys: Vec<_> = e.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(
        keys,
        [
            ExtensionKey::Int(1),
            ExtensionKey::Int(2),
            ExtensionKey::Int(300),
            ExtensionKey::Int(-1),
            ExtensionKey::Text("z".into())
        ]
    );
    assert_eq!(
        e.insert(ExtensionKey::Int(300), Value::Null),
        Some(Value::Bool(true))
    );
    assert_eq!(e.len(), 5);
    let mut m = MimiContent::markdown(salt(), "x");
    m.extensions = e;
    let bytes = m.encode().unwrap();
    let d = MimiContent::decode_with_limits(&bytes, &ContentLimits::default()).unwrap();
    assert!(d.canonical);
    assert_eq!(d.content, m);
    assert_eq!(m.extensions.sender_uri(), Some(SENDER));
    assert!(
        m.extensions
            .clone()
            .remove(&ExtensionKey::Int(300))
            .is_some()
    );
}

#[test]
fn extension_values_of_every_type_roundtrip() {
    let v = Value::Array(vec![
        Value::Int(-(1i128 << 64)),
        Value::Int((1i128 << 64) - 1),
        Value::Bytes(vec![0; 300]),
        Value::Text("ü".into()),
        Value::Map(vec![
            (Value::Text("b".into()), Value::Undefined),
            (Value::Int(-5), Value::Simple(99)),
            (Value::Bytes(vec![1]), Value::Null),
        ]),
        Value::Tag(32, Box::new(Value::Text("http://example.com".into()))),
        Value::Float(1.5),
        Value::Float(100000.0),
        Value::Float(1.1),
        Value::Float(f64::INFINITY),
        Value::Float(-0.0),
        Value::Float(5.960464477539063e-8),
        Value::Simple(5),
    ]);
    let mut m = MimiContent::markdown(salt(), "x");
    m.extensions.insert(ExtensionKey::Int(256), v);
    let bytes = m.encode().unwrap();
    let d = MimiContent::decode_with_limits(&bytes, &ContentLimits::default()).unwrap();
    assert!(d.canonical);
    assert_eq!(d.content.encode().unwrap(), bytes);
    let Some(Value::Array(items)) = d.content.extensions.get(&ExtensionKey::Int(256)) else {
        panic!("extension lost")
    };
    // The map came back sorted by encoded key: 0x24 (-5) < 0x41 01 < 0x61 62.
    let Value::Map(entries) = &items[4] else {
        panic!()
    };
    assert_eq!(entries[0].0, Value::Int(-5));
    assert_eq!(entries[2].0, Value::Text("b".into()));
}

#[test]
fn floats_take_their_shortest_exact_width() {
    for (v, len) in [
        (0.0, 3),
        (1.5, 3),
        (65504.0, 3),
        (5.960464477539063e-8, 3),
        (f64::NEG_INFINITY, 3),
        (100000.0, 5),
        (3.4028234663852886e38, 5),
        (1.1, 9),
        (1e300, 9),
    ] {
        let mut out = Vec::new();
        cbor::put_float(&mut out, v);
        assert_eq!(out.len(), len, "{v}");
        let mut d = cbor::Dec::new(&out);
        assert_eq!(d.value(1, 4).unwrap(), Value::Float(v));
        assert!(d.canonical, "{v}");
    }
    let mut nan = Vec::new();
    cbor::put_float(&mut nan, f64::NAN);
    assert_eq!(nan, [0xf9, 0x7e, 0x00]);
    for h in 0..=u16::MAX {
        let f = f16_to_f64(h);
        if !f.is_nan() {
            assert_eq!(f64_to_f16(f), Some(h), "{h:#x}");
        }
    }
}

#[test]
fn non_canonical_input_is_read_and_flagged() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // salt length in a one-byte argument (0x58 0x10) instead of 0x50
        ("long salt head", {
            let mut b = vec![0x87, 0x58, 0x10];
            b.extend_from_slice(&ORIGINAL[2..]);
            b
        }),
        // top-level array of indefinite length
        ("indefinite array", {
            let mut b = vec![0x9f];
            b.extend_from_slice(&ORIGINAL[1..]);
            b.push(0xff);
            b
        }),
        // extension keys 2 before 1
        ("unsorted map", {
            let ext_at = ORIGINAL.iter().position(|&b| b == 0xa2).unwrap();
            let k1_len = 2 + 1 + 32; // 01 78 20 <32>
            let k2_len = 2 + 1 + 37; // 02 78 25 <37>
            let mut b = ORIGINAL[..=ext_at].to_vec();
            b.extend_from_slice(&ORIGINAL[ext_at + 1 + k1_len..ext_at + 1 + k1_len + k2_len]);
            b.extend_from_slice(&ORIGINAL[ext_at + 1..ext_at + 1 + k1_len]);
            b.extend_from_slice(&ORIGINAL[ext_at + 1 + k1_len + k2_len..]);
            b
        }),
        // the content as an indefinite byte string of two chunks
        ("chunked bytes", {
            let m = MimiContent::decode(ORIGINAL).unwrap();
            let PartBody::Single { content, .. } = &m.nested_part.body else {
                panic!()
            };
            let tail = ORIGINAL.len() - content.len() - 2; // 58 39 head
            let mut b = ORIGINAL[..tail].to_vec();
            b.push(0x5f);
            cbor::put_bytes(&mut b, &content[..10]);
            cbor::put_bytes(&mut b, &content[10..]);
            b.push(0xff);
            b
        }),
        // a float extension value written as a double that fits a half
        ("wide float", {
            let mut ext = vec![0xa1, 0x19, 0x01, 0x00, 0xfb];
            ext.extend_from_slice(&1.5f64.to_bits().to_be_bytes());
            raw_message(&ext, &[0x83, 0x01, 0x60, 0x00])
        }),
    ];
    let canonical = MimiContent::decode(ORIGINAL).unwrap();
    let mut cases = cases;
    // bignums that fit an integer or carry leading zeros (RFC 8949 section 3.4.3)
    for (name, ext) in [
        (
            "small bignum",
            vec![0xa1, 0x19, 0x01, 0x00, 0xc2, 0x42, 0x01, 0x00],
        ),
        ("bignum with a leading zero", {
            let mut e = vec![0xa1, 0x19, 0x01, 0x00, 0xc3, 0x4a, 0x00];
            e.extend_from_slice(&[0xff; 9]);
            e
        }),
    ] {
        cases.push((name, raw_message(&ext, &[0x83, 0x01, 0x60, 0x00])));
    }
    for (name, bytes) in cases {
        let d = MimiContent::decode_with_limits(&bytes, &ContentLimits::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!d.canonical, "{name}: not flagged");
        assert_eq!(
            MimiContent::decode_canonical(&bytes),
            Err(ContentError::NonCanonical),
            "{name}"
        );
        let again = d.content.encode().unwrap();
        assert_ne!(again, bytes, "{name}");
        if !name.contains("float") && !name.contains("bignum") {
            assert_eq!(d.content, canonical, "{name}");
            assert_eq!(again, ORIGINAL, "{name}");
            // The ID is over the exact bytes, so it differs from the canonical form's.
            assert_ne!(
                message_id(SENDER, ROOM, &bytes).unwrap(),
                message_id(SENDER, ROOM, ORIGINAL).unwrap()
            );
        }
    }
}

#[test]
fn bignums_read_as_their_preferred_form() {
    let body = [0x83, 0x01, 0x60, 0x00];
    let key = ExtensionKey::Int(256);
    // 2(h'0100') is 256; 3(h'0100') is -257
    for (tag, want) in [(0xc2, 256), (0xc3, -257)] {
        let m = MimiContent::decode(&raw_message(
            &[0xa1, 0x19, 0x01, 0x00, tag, 0x42, 0x01, 0x00],
            &body,
        ))
        .unwrap();
        assert_eq!(m.extensions.get(&key), Some(&Value::Int(want)));
    }
    // nine significant bytes stay a bignum, without the leading zero
    let mut ext = vec![0xa1, 0x19, 0x01, 0x00, 0xc2, 0x4a, 0x00];
    ext.extend_from_slice(&[0xff; 9]);
    let m = MimiContent::decode(&raw_message(&ext, &body)).unwrap();
    assert_eq!(
        m.extensions.get(&key),
        Some(&Value::Tag(2, Box::new(Value::Bytes(vec![0xff; 9]))))
    );
}

#[test]
fn malformed_and_mistyped_input_gives_typed_errors() {
    use ContentError as E;
    let body = [0x83, 0x01, 0x60, 0x00];
    let empty_ext = [0xa0];
    type Case = (&'static str, Vec<u8>, fn(&ContentError) -> bool);
    let cases: Vec<Case> = vec![
        ("empty", vec![], |e| matches!(e, E::Truncated { at: 0 })),
        ("reserved ai", vec![0x1c], |e| {
            matches!(e, E::Malformed { .. })
        }),
        ("lone break", vec![0xff], |e| {
            matches!(e, E::Malformed { .. })
        }),
        ("indefinite uint", vec![0x1f], |e| {
            matches!(e, E::Malformed { .. })
        }),
        ("simple 24 below 32", vec![0xf8, 0x10], |e| {
            matches!(e, E::Malformed { .. })
        }),
        ("not an array", vec![0xa0], |e| {
            matches!(
                e,
                E::WrongType {
                    field: "mimiContent",
                    ..
                }
            )
        }),
        (
            "trailing",
            [ORIGINAL, &[0x00]].concat(),
            |e| matches!(e, E::TrailingBytes { at } if *at == ORIGINAL.len()),
        ),
        (
            "salt as text",
            {
                let mut b = ORIGINAL.to_vec();
                b[1] = 0x70;
                b
            },
            |e| matches!(e, E::WrongType { field: "salt", .. }),
        ),
        (
            "short salt",
            {
                let mut b = vec![0x87, 0x4f];
                b.extend_from_slice(&ORIGINAL[2..17]);
                b.extend_from_slice(&ORIGINAL[18..]);
                b
            },
            |e| matches!(e, E::BadValue { field: "salt", .. }),
        ),
        (
            "six elements",
            {
                let mut b = ORIGINAL.to_vec();
                b[0] = 0x86;
                b
            },
            |e| matches!(e, E::TrailingBytes { .. } | E::BadValue { .. }),
        ),
        (
            "eight elements",
            {
                let mut b = ORIGINAL.to_vec();
                b[0] = 0x88;
                b
            },
            |e| matches!(e, E::Truncated { .. } | E::BadValue { .. }),
        ),
        (
            "cardinality 4",
            raw_message(&empty_ext, &[0x83, 0x01, 0x60, 0x04]),
            |e| {
                matches!(
                    e,
                    E::BadValue {
                        field: "cardinality",
                        ..
                    }
                )
            },
        ),
        (
            "null part with content",
            raw_message(&empty_ext, &[0x84, 0x01, 0x60, 0x00, 0x40]),
            |e| {
                matches!(
                    e,
                    E::BadValue {
                        field: "NestedPart",
                        ..
                    }
                )
            },
        ),
        (
            "disposition 256",
            raw_message(&empty_ext, &[0x83, 0x19, 0x01, 0x00, 0x60, 0x00]),
            |e| {
                matches!(
                    e,
                    E::BadValue {
                        field: "disposition",
                        ..
                    }
                )
            },
        ),
        (
            "semantics 3",
            raw_message(
                &empty_ext,
                &[
                    0x85, 0x01, 0x60, 0x03, 0x03, 0x82, 0x83, 0x01, 0x60, 0x00, 0x83, 0x01, 0x60,
                    0x00,
                ],
            ),
            |e| {
                matches!(
                    e,
                    E::BadValue {
                        field: "partSemantics",
                        ..
                    }
                )
            },
        ),
        (
            "multi with one part",
            raw_message(
                &empty_ext,
                &[0x85, 0x01, 0x60, 0x03, 0x00, 0x81, 0x83, 0x01, 0x60, 0x00],
            ),
            |e| {
                matches!(
                    e,
                    E::BadValue {
                        field: "parts (at least two)",
                        ..
                    }
                )
            },
        ),
        (
            "language not utf-8",
            raw_message(&empty_ext, &[0x83, 0x01, 0x61, 0xff, 0x00]),
            |e| matches!(e, E::InvalidUtf8 { .. }),
        ),
        (
            "duplicate extension key",
            raw_message(&[0xa2, 0x05, 0x00, 0x05, 0x01], &body),
            |e| matches!(e, E::DuplicateKey { .. }),
        ),
        (
            "duplicate key out of order",
            raw_message(&[0xa3, 0x05, 0x00, 0x06, 0x00, 0x05, 0x01], &body),
            |e| matches!(e, E::DuplicateKey { .. }),
        ),
        (
            // Found by fuzzing: after the out-of-order 6, the repeated 7 was compared with 6
            // only, decoded, and then could not be re-encoded.
            "duplicate of the greatest key after an out-of-order one",
            raw_message(
                &[0xa4, 0x05, 0x00, 0x07, 0x00, 0x06, 0x00, 0x07, 0x01],
                &body,
            ),
            |e| matches!(e, E::DuplicateKey { .. }),
        ),
        (
            "duplicate key after disorder, in a nested map",
            raw_message(
                &[
                    0xa1, 0x05, 0xa4, 0x01, 0x00, 0x03, 0x00, 0x02, 0x00, 0x03, 0x00,
                ],
                &body,
            ),
            |e| matches!(e, E::DuplicateKey { .. }),
        ),
        (
            "sender uri not text",
            raw_message(&[0xa1, 0x01, 0x40], &body),
            |e| matches!(e, E::WrongType { .. }),
        ),
        (
            "empty text key",
            raw_message(&[0xa1, 0x60, 0x00], &body),
            |e| {
                matches!(
                    e,
                    E::BadValue {
                        field: "extension key",
                        ..
                    }
                )
            },
        ),
        (
            "key beyond 2^53",
            raw_message(&[0xa1, 0x1b, 0, 0x20, 0, 0, 0, 0, 0, 0, 0x00], &body),
            |e| {
                matches!(
                    e,
                    E::BadValue {
                        field: "extension key",
                        ..
                    }
                )
            },
        ),
        (
            "bytes key",
            raw_message(&[0xa1, 0x41, 0x00, 0x00], &body),
            |e| {
                matches!(
                    e,
                    E::WrongType {
                        field: "extension key",
                        ..
                    }
                )
            },
        ),
        (
            "array as nested map key",
            raw_message(&[0xa1, 0x05, 0xa1, 0x80, 0x00], &body),
            |e| matches!(e, E::WrongType { .. }),
        ),
        (
            "expires time over u32",
            {
                let mut b = vec![0x87, 0x50];
                b.extend_from_slice(&salt());
                b.extend_from_slice(&[
                    0xf6, 0x40, 0x82, 0xf4, 0x1b, 0, 0, 0, 1, 0, 0, 0, 0, 0xf6, 0xa0,
                ]);
                b.extend_from_slice(&body);
                b
            },
            |e| {
                matches!(
                    e,
                    E::BadValue {
                        field: "Expiration.time",
                        ..
                    }
                )
            },
        ),
        (
            "huge declared length",
            vec![0x87, 0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            |e| matches!(e, E::Truncated { .. }),
        ),
        (
            "huge array",
            vec![0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            |e| matches!(e, E::Truncated { .. }),
        ),
        (
            "text chunk in byte string",
            raw_message(
                &empty_ext,
                &[0x85, 0x01, 0x60, 0x01, 0x60, 0x5f, 0x61, 0x41, 0xff],
            ),
            |e| matches!(e, E::Malformed { .. }),
        ),
    ];
    for (name, bytes, want) in cases {
        match MimiContent::decode(&bytes) {
            Ok(m) => panic!("{name}: decoded {m:?}"),
            Err(e) => assert!(want(&e), "{name}: got {e:?}"),
        }
    }
}

#[test]
fn truncation_at_every_byte_is_a_typed_error() {
    for v in VECTORS {
        for cut in 0..v.len() {
            match MimiContent::decode(&v[..cut]) {
                Err(ContentError::Truncated { at }) => assert!(at <= cut),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }
}

#[test]
fn part_depth_limit_is_enforced_both_ways() {
    // Four levels (content-08 section 8.3) are fine.
    let ok = raw_message(&[0xa0], &raw_nested(4));
    let m = MimiContent::decode_canonical(&ok).unwrap();
    assert_eq!(m.encode().unwrap(), ok);
    assert_eq!(
        m.nested_part
            .parts_depth_first()
            .iter()
            .map(|p| p.depth)
            .max(),
        Some(4)
    );
    assert_eq!(with_body(nested(4)).encode().unwrap(), ok);

    let deep = raw_message(&[0xa0], &raw_nested(5));
    assert!(matches!(
        MimiContent::decode(&deep),
        Err(ContentError::TooDeep {
            what: "nested part",
            max: 4,
            ..
        })
    ));
    assert!(matches!(
        with_body(nested(5)).encode(),
        Err(ContentError::TooDeep { .. })
    ));
    // A raised limit reads it; a limit far beyond the ceiling cannot blow the stack.
    let limits = ContentLimits {
        max_part_depth: 5,
        ..ContentLimits::default()
    };
    assert!(MimiContent::decode_with_limits(&deep, &limits).is_ok());
    let very_deep = raw_message(&[0xa0], &raw_nested(100_000));
    let limits = ContentLimits {
        max_part_depth: usize::MAX,
        max_parts: usize::MAX,
        ..ContentLimits::default()
    };
    assert!(matches!(
        MimiContent::decode_with_limits(&very_deep, &limits),
        Err(ContentError::TooDeep { max: 64, .. })
    ));
}

#[test]
fn part_count_and_input_size_limits() {
    let many: Vec<NestedPart> = (0..5).map(|i| text_part(&i.to_string())).collect();
    let m = with_body(NestedPart::multi(
        Disposition::RENDER,
        PartSemantics::ProcessAll,
        many,
    ));
    let bytes = m.encode().unwrap();
    let limits = ContentLimits {
        max_parts: 5,
        ..ContentLimits::default()
    };
    assert!(matches!(
        MimiContent::decode_with_limits(&bytes, &limits),
        Err(ContentError::TooLarge {
            what: "parts",
            len: 6,
            max: 5
        })
    ));
    let limits = ContentLimits {
        max_input: bytes.len() - 1,
        ..ContentLimits::default()
    };
    assert!(matches!(
        MimiContent::decode_with_limits(&bytes, &limits),
        Err(ContentError::TooLarge { what: "input", .. })
    ));
    // 1025 parts break the default limit (content-08 section 10.1).
    let many: Vec<NestedPart> = (0..1024).map(|_| text_part("")).collect();
    let m = with_body(NestedPart::multi(
        Disposition::RENDER,
        PartSemantics::ProcessAll,
        many,
    ));
    assert!(matches!(m.encode(), Err(ContentError::TooLarge { .. })));
}

#[test]
fn extension_depth_limit() {
    // {256: [[32("x")]]}: map 1, array 2, array 3, tag 4: allowed.
    let ok = [0xa1, 0x19, 0x01, 0x00, 0x81, 0x81, 0xd8, 0x20, 0x61, 0x78];
    let body = [0x83, 0x01, 0x60, 0x00];
    let m = MimiContent::decode_canonical(&raw_message(&ok, &body)).unwrap();
    assert_eq!(m.encode().unwrap(), raw_message(&ok, &body));
    // One more array: level 5.
    let deep = [
        0xa1, 0x19, 0x01, 0x00, 0x81, 0x81, 0x81, 0xd8, 0x20, 0x61, 0x78,
    ];
    assert!(matches!(
        MimiContent::decode(&raw_message(&deep, &body)),
        Err(ContentError::TooDeep {
            what: "extension value",
            ..
        })
    ));
    let mut m2 = m.clone();
    m2.extensions.insert(
        ExtensionKey::Int(7),
        Value::Array(vec![Value::Array(vec![Value::Array(vec![Value::Null])])]),
    );
    assert!(m2.encode().is_ok(), "levels 2 to 4 are allowed");
    m2.extensions.insert(
        ExtensionKey::Int(7),
        Value::Array(vec![Value::Array(vec![Value::Array(vec![Value::Array(
            vec![],
        )])])]),
    );
    assert!(matches!(m2.encode(), Err(ContentError::TooDeep { .. })));
}

#[test]
fn encoder_refuses_what_breaks_the_cddl() {
    let one = with_body(NestedPart::multi(
        Disposition::RENDER,
        PartSemantics::ChooseOne,
        vec![text_part("a")],
    ));
    assert!(matches!(one.encode(), Err(ContentError::BadValue { .. })));
    let mut m = MimiContent::markdown(salt(), "x");
    m.extensions
        .insert(ExtensionKey::Text(String::new()), Value::Null);
    assert!(m.encode().is_err());
    let mut m = MimiContent::markdown(salt(), "x");
    m.extensions.insert(ExtensionKey::SENDER_URI, Value::Int(1));
    assert!(matches!(m.encode(), Err(ContentError::WrongType { .. })));
    let mut m = MimiContent::markdown(salt(), "x");
    m.extensions.insert(ExtensionKey::Int(9), Value::Simple(22));
    assert!(m.encode().is_err());
    let mut m = MimiContent::markdown(salt(), "x");
    m.extensions.insert(
        ExtensionKey::Int(9),
        Value::Map(vec![
            (Value::Int(1), Value::Null),
            (Value::Int(1), Value::Null),
        ]),
    );
    assert!(matches!(m.encode(), Err(ContentError::DuplicateKey { .. })));
}

#[test]
fn mutated_vectors_never_panic_and_reencode_consistently() {
    let mut rng = XorShift::new(8);
    for round in 0..20_000 {
        let mut b = VECTORS[round % VECTORS.len()].to_vec();
        rng.mutate(&mut b);
        if let Ok(d) = MimiContent::decode_with_limits(&b, &ContentLimits::default()) {
            let again = d.content.encode().unwrap();
            assert_eq!(again == b, d.canonical, "canonical flag wrong for {b:02x?}");
            assert_eq!(MimiContent::decode(&again).unwrap(), d.content);
        }
        let _ = message_id(SENDER, ROOM, &b);
        let _ = MessageDerivedValues::decode(&b);
    }
    for _ in 0..20_000 {
        let n = rng.below(64);
        let b = rng.bytes(n);
        let _ = MimiContent::decode(&b);
    }
}

#[test]
fn error_messages_are_lower_case() {
    let errs = [
        ContentError::Truncated { at: 1 },
        ContentError::TrailingBytes { at: 1 },
        ContentError::Malformed { at: 1, what: "x" },
        ContentError::WrongType {
            at: 1,
            field: "salt",
            expected: "byte string",
        },
        ContentError::BadValue {
            at: 1,
            field: "salt",
        },
        ContentError::InvalidUtf8 { at: 1 },
        ContentError::DuplicateKey { at: 1 },
        ContentError::TooDeep {
            at: 1,
            what: "nested part",
            max: 4,
        },
        ContentError::TooLarge {
            what: "parts",
            len: 2,
            max: 1,
        },
        ContentError::NonCanonical,
        ContentError::UriTooLong { len: 1 },
    ];
    for e in errs {
        let s = e.to_string();
        assert!(!s.ends_with('.'));
        // field names from the CDDL keep their camelCase; the rest starts lower-case
        assert!(!s.chars().next().unwrap().is_uppercase(), "{s}");
    }
}
