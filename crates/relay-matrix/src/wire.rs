//! The binding's JSON: MIMI requests as EDUs, their answers in the `/send` response, and the
//! Matrix error bodies. See ARCHITECTURE.md, "Matrix binding".

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use bytes::{Bytes, BytesMut};
use mimi_wire::endpoint::Endpoint;
use relay_core::transport::{Lineage, Response, Status};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// EDU type of a MIMI request (or one fragment of it).
pub const EDU_REQUEST: &str = "org.mimi-relay.request";
/// Key of the `/send` response object that carries the answers, by request id.
pub const RESPONSES_KEY: &str = "org.mimi-relay.responses";
/// The Matrix limit on one event, applied to every EDU we send or accept (its JSON bytes).
pub const MAX_EVENT_BYTES: usize = 65_536;
/// Matrix limits per transaction.
pub const MAX_PDUS: usize = 50;
pub const MAX_EDUS: usize = 100;
/// Payload bytes per fragment: 45,000 bytes are 60,000 base64 characters, which leaves room
/// for the other fields inside [`MAX_EVENT_BYTES`].
pub const FRAGMENT_BYTES: usize = 45_000;
/// Longest target (room URI ...) carried; keeps every fragment under [`MAX_EVENT_BYTES`].
pub const MAX_TARGET: usize = 2_048;
/// Largest `/send` body accepted: a full transaction of maximal EDUs plus framing.
pub const MAX_TXN_BODY: usize = (MAX_EDUS + 1) * MAX_EVENT_BYTES;

/// The content of an [`EDU_REQUEST`] EDU.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RequestContent {
    /// Names the request inside its transaction; the answer is keyed by it.
    pub id: String,
    /// The MIMI endpoint name (`notify`, `submitMessage` ...).
    pub endpoint: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// With `seq`: the hub incarnations that numbered the batch and the event before it.
    /// Decimal strings: incarnations use all 64 bits, and canonical JSON allows integers only
    /// up to 2^53.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "u64_text")]
    pub inc: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "u64_text")]
    pub prev_inc: Option<u64>,
    /// This fragment's index and the number of fragments; all travel in one transaction.
    pub part: u32,
    pub parts: u32,
    /// Unpadded standard base64 of this fragment's payload bytes.
    pub body: String,
}

/// An optional u64 as a decimal string.
mod u64_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.collect_str(n),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let text: Option<std::borrow::Cow<'de, str>> = Option::deserialize(d)?;
        text.map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// One EDU as it appears in a transaction.
#[derive(Debug, Serialize, Deserialize)]
pub struct Edu<'a> {
    pub edu_type: String,
    #[serde(borrow)]
    pub content: &'a RawValue,
}

/// A transaction body, as received (PDUs are kept raw and ignored).
#[derive(Debug, Deserialize)]
pub struct IncomingTxn<'a> {
    pub origin: String,
    pub origin_server_ts: u64,
    #[serde(default, borrow)]
    pub pdus: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    pub edus: Vec<Edu<'a>>,
}

/// One answer in the `/send` response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResponseContent {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_seq: Option<u64>,
    /// With `next_seq`: the incarnation of the receiver's last event (a decimal string).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "u64_text")]
    pub next_inc: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
}

/// The `/send` response: Matrix's `pdus` map plus our answers.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SendResponse {
    #[serde(default)]
    pub pdus: BTreeMap<String, serde_json::Value>,
    #[serde(rename = "org.mimi-relay.responses", default)]
    pub responses: BTreeMap<String, ResponseContent>,
}

/// A Matrix error body (`{"errcode": .., "error": ..}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MatrixError {
    pub errcode: String,
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

pub fn encode_b64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

pub fn decode_b64(s: &str) -> Option<Vec<u8>> {
    STANDARD_NO_PAD.decode(s).ok()
}

impl ResponseContent {
    pub fn from_response(r: &Response) -> Self {
        ResponseContent {
            status: r.status.http_code(),
            next_seq: r.next_seq,
            next_inc: r.next_inc,
            retry_after_ms: r
                .retry_after
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            body: if r.body.is_empty() {
                String::new()
            } else {
                encode_b64(&r.body)
            },
        }
    }

    pub fn to_response(&self) -> Option<Response> {
        Some(Response {
            status: Status::from_http_code(self.status)?,
            body: if self.body.is_empty() {
                Bytes::new()
            } else {
                Bytes::from(decode_b64(&self.body)?)
            },
            next_seq: self.next_seq,
            next_inc: self.next_inc,
            retry_after: self.retry_after_ms.map(Duration::from_millis),
        })
    }
}

/// Appends `s` as a JSON string, escaped as canonical JSON (serde_json's escaping, which is
/// what ruma signs).
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends one [`EDU_REQUEST`] EDU in canonical JSON (keys sorted, no spaces), so the
/// transaction body can be signed as it is, without a parse and re-serialization. The
/// base64 body needs no escaping and is copied as it is.
pub fn write_request_edu(out: &mut Vec<u8>, c: &RequestContent) {
    out.extend_from_slice(br#"{"content":{"body":""#);
    out.extend_from_slice(c.body.as_bytes());
    out.extend_from_slice(br#"","endpoint":"#);
    write_str(out, &c.endpoint);
    out.extend_from_slice(br#","id":"#);
    write_str(out, &c.id);
    if let Some(inc) = c.inc {
        out.extend_from_slice(format!(r#","inc":"{inc}""#).as_bytes());
    }
    out.extend_from_slice(format!(r#","part":{},"parts":{}"#, c.part, c.parts).as_bytes());
    if let Some(prev) = c.prev_inc {
        out.extend_from_slice(format!(r#","prev_inc":"{prev}""#).as_bytes());
    }
    if let Some(seq) = c.seq {
        out.extend_from_slice(format!(r#","seq":{seq}"#).as_bytes());
    }
    out.extend_from_slice(br#","target":"#);
    write_str(out, &c.target);
    out.extend_from_slice(br#"},"edu_type":""#);
    out.extend_from_slice(EDU_REQUEST.as_bytes());
    out.extend_from_slice(br#""}"#);
}

/// Appends an EDU of any type, its content brought into canonical JSON; `None` if the
/// content has no canonical form (floats, integers beyond 2^53, ...).
pub fn write_other_edu(out: &mut Vec<u8>, edu_type: &str, content: &RawValue) -> Option<()> {
    let canonical: ruma::CanonicalJsonValue = serde_json::from_str(content.get()).ok()?;
    out.extend_from_slice(br#"{"content":"#);
    serde_json::to_writer(&mut *out, &canonical).ok()?;
    out.extend_from_slice(br#","edu_type":"#);
    write_str(out, edu_type);
    out.push(b'}');
    Some(())
}

/// A transaction body in canonical JSON around `edus` (EDU objects joined by commas).
pub fn txn_body(origin: &str, origin_server_ts: u64, edus: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(edus.len() + origin.len() + 64);
    out.extend_from_slice(br#"{"edus":["#);
    out.extend_from_slice(edus);
    out.extend_from_slice(br#"],"origin":"#);
    write_str(&mut out, origin);
    out.extend_from_slice(
        format!(r#","origin_server_ts":{origin_server_ts},"pdus":[]}}"#).as_bytes(),
    );
    out
}

/// The bytes an X-Matrix signature covers for `PUT {uri}` with a body that is canonical
/// JSON: the canonical request object (`content`, `destination`, `method`, `origin`, `uri`)
/// with the body spliced in as it is.
pub fn x_matrix_signed_bytes(
    body: &[u8],
    destination: &str,
    method: &str,
    origin: &str,
    uri: &str,
) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(body.len() + destination.len() + origin.len() + uri.len() + 80);
    out.extend_from_slice(br#"{"content":"#);
    out.extend_from_slice(body);
    out.extend_from_slice(br#","destination":"#);
    write_str(&mut out, destination);
    out.extend_from_slice(br#","method":"#);
    write_str(&mut out, method);
    out.extend_from_slice(br#","origin":"#);
    write_str(&mut out, origin);
    out.extend_from_slice(br#","uri":"#);
    write_str(&mut out, uri);
    out.push(b'}');
    out
}

/// Splits a transmit into the contents of its EDUs: the segments are concatenated and cut into
/// [`FRAGMENT_BYTES`] pieces (one empty fragment for an empty body).
pub fn fragments(
    id: &str,
    endpoint: Endpoint,
    target: &str,
    seq: Option<u64>,
    body: &[Bytes],
) -> Vec<RequestContent> {
    let total: usize = body.iter().map(Bytes::len).sum();
    let parts = total.div_ceil(FRAGMENT_BYTES).max(1);
    let mut out = Vec::with_capacity(parts);
    let mut chunk = Vec::with_capacity(total.min(FRAGMENT_BYTES));
    let push = |chunk: &mut Vec<u8>, out: &mut Vec<RequestContent>| {
        out.push(RequestContent {
            id: id.to_owned(),
            endpoint: endpoint.as_str().to_owned(),
            target: target.to_owned(),
            seq,
            inc: None,
            prev_inc: None,
            part: u32::try_from(out.len()).unwrap_or(u32::MAX),
            parts: u32::try_from(parts).unwrap_or(u32::MAX),
            body: encode_b64(chunk),
        });
        chunk.clear();
    };
    for seg in body {
        let mut rest = &seg[..];
        while !rest.is_empty() {
            let take = (FRAGMENT_BYTES - chunk.len()).min(rest.len());
            chunk.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if chunk.len() == FRAGMENT_BYTES {
                push(&mut chunk, &mut out);
            }
        }
    }
    if !chunk.is_empty() || out.is_empty() {
        push(&mut chunk, &mut out);
    }
    out
}

/// A request reassembled from its fragments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembled {
    pub id: String,
    pub endpoint: Endpoint,
    pub target: String,
    pub seq: Option<u64>,
    pub lineage: Option<Lineage>,
    pub body: Bytes,
}

/// Why the EDUs of a transaction do not form valid requests (answered `M_BAD_JSON`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    #[error("edu content is not a mimi request: {0}")]
    Content(String),
    #[error("unknown mimi endpoint {0:?}")]
    Endpoint(String),
    #[error("body is not unpadded base64")]
    Base64,
    #[error("fragments of request {0:?} are incomplete or out of order")]
    Fragments(String),
    #[error("request id {0:?} is used twice in one transaction")]
    DuplicateId(String),
    #[error("target longer than {MAX_TARGET} bytes")]
    Target,
}

/// Collects fragment contents (in transaction order) into whole requests.
#[derive(Debug, Default)]
pub struct Reassembler {
    done: Vec<Assembled>,
    /// The request being reassembled: its first fragment, the bytes so far, fragments seen.
    open: Option<(RequestContent, BytesMut, u32)>,
}

impl Reassembler {
    pub fn push(&mut self, c: RequestContent) -> Result<(), BindingError> {
        if c.target.len() > MAX_TARGET {
            return Err(BindingError::Target);
        }
        let bytes = decode_b64(&c.body).ok_or(BindingError::Base64)?;
        let (first, mut buf, seen) = match self.open.take() {
            None => {
                if c.part != 0 || c.parts == 0 {
                    return Err(BindingError::Fragments(c.id));
                }
                if self.done.iter().any(|d| d.id == c.id) {
                    return Err(BindingError::DuplicateId(c.id));
                }
                (c, BytesMut::from(&bytes[..]), 1)
            }
            Some((first, mut buf, seen)) => {
                if c.id != first.id
                    || c.part != seen
                    || c.parts != first.parts
                    || c.endpoint != first.endpoint
                    || c.target != first.target
                    || c.seq != first.seq
                    || c.inc != first.inc
                    || c.prev_inc != first.prev_inc
                {
                    return Err(BindingError::Fragments(first.id));
                }
                buf.extend_from_slice(&bytes);
                (first, buf, seen + 1)
            }
        };
        if seen < first.parts {
            self.open = Some((first, buf, seen));
            return Ok(());
        }
        let endpoint: Endpoint = first
            .endpoint
            .parse()
            .map_err(|_| BindingError::Endpoint(first.endpoint.clone()))?;
        self.done.push(Assembled {
            id: first.id,
            endpoint,
            target: first.target,
            seq: first.seq,
            lineage: first.inc.map(|batch| Lineage {
                batch,
                prev: first.prev_inc.unwrap_or(0),
            }),
            body: std::mem::take(&mut buf).freeze(),
        });
        Ok(())
    }

    /// The whole requests, in order; an unfinished one is an error.
    pub fn finish(self) -> Result<Vec<Assembled>, BindingError> {
        if let Some((first, _, _)) = self.open {
            return Err(BindingError::Fragments(first.id));
        }
        Ok(self.done)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn roundtrip(body: Vec<Bytes>) -> Assembled {
        let frags = fragments(
            "7",
            Endpoint::Notify,
            "mimi://a.example/r/x",
            Some(3),
            &body,
        );
        let total: usize = body.iter().map(Bytes::len).sum();
        assert_eq!(frags.len(), total.div_ceil(FRAGMENT_BYTES).max(1));
        let mut r = Reassembler::default();
        for f in frags {
            assert!(serde_json::to_vec(&f).unwrap().len() < MAX_EVENT_BYTES - MAX_TARGET);
            r.push(f).unwrap();
        }
        let mut done = r.finish().unwrap();
        assert_eq!(done.len(), 1);
        done.remove(0)
    }

    #[test]
    fn fragments_reassemble_to_the_exact_bytes() {
        for sizes in [
            vec![],
            vec![0],
            vec![10, 20],
            vec![FRAGMENT_BYTES],
            vec![FRAGMENT_BYTES - 1, 2, 100_000],
        ] {
            let body: Vec<Bytes> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Bytes::from((0..n).map(|k| (k * 7 + i) as u8).collect::<Vec<_>>()))
                .collect();
            let joined: Vec<u8> = body.iter().flat_map(|b| b.iter().copied()).collect();
            let a = roundtrip(body);
            assert_eq!(&a.body[..], &joined[..]);
            assert_eq!(a.seq, Some(3));
            assert_eq!(a.endpoint, Endpoint::Notify);
        }
    }

    #[test]
    fn bad_fragment_sequences_are_refused() {
        let body = vec![Bytes::from(vec![1u8; FRAGMENT_BYTES * 2 + 5])];
        let frags = fragments("1", Endpoint::Notify, "t", None, &body);
        assert_eq!(frags.len(), 3);
        // A fragment missing at the end.
        let mut r = Reassembler::default();
        r.push(frags[0].clone()).unwrap();
        r.push(frags[1].clone()).unwrap();
        assert!(matches!(r.finish(), Err(BindingError::Fragments(_))));
        // Out of order.
        let mut r = Reassembler::default();
        r.push(frags[0].clone()).unwrap();
        assert!(r.push(frags[2].clone()).is_err());
        // A later fragment first.
        let mut r = Reassembler::default();
        assert!(r.push(frags[1].clone()).is_err());
        // The same id twice.
        let one = fragments("9", Endpoint::Notify, "t", None, &[]);
        let mut r = Reassembler::default();
        r.push(one[0].clone()).unwrap();
        assert!(matches!(
            r.push(one[0].clone()),
            Err(BindingError::DuplicateId(_))
        ));
        // Not base64.
        let mut bad = one[0].clone();
        bad.body = "***".into();
        assert_eq!(Reassembler::default().push(bad), Err(BindingError::Base64));
    }

    #[test]
    fn incarnations_travel_as_text_within_canonical_json() {
        let mut f = fragments(
            "1",
            Endpoint::Notify,
            "t",
            Some(3),
            &[Bytes::from_static(b"x")],
        );
        (f[0].inc, f[0].prev_inc) = (Some(u64::MAX), Some(1 << 60));
        let json = serde_json::to_string(&f[0]).expect("serializes");
        assert!(json.contains("\"inc\":\"18446744073709551615\""), "{json}");
        let back: RequestContent = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, f[0]);
        let bad = json.replace("\"18446744073709551615\"", "18446744073709551615");
        assert!(serde_json::from_str::<RequestContent>(&bad).is_err());
    }

    #[test]
    fn responses_roundtrip() {
        let mut r = Response::new(Status::OutOfOrder, Bytes::from_static(b"gap"));
        r.next_seq = Some(17);
        r.next_inc = Some(u64::MAX);
        r.retry_after = Some(Duration::from_millis(1500));
        assert_eq!(ResponseContent::from_response(&r).to_response(), Some(r));
        let bad = ResponseContent {
            status: 299,
            next_seq: None,
            next_inc: None,
            retry_after_ms: None,
            body: String::new(),
        };
        assert_eq!(bad.to_response(), None);
    }
}
