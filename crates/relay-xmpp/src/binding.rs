//! The MIMI-over-XMPP binding: how a [`Transmit`] becomes an IQ and an IQ becomes a
//! [`Request`] or a [`Response`] (the spec is in ARCHITECTURE.md, "The XMPP binding").
//!
//! Stanzas are written by hand (they have one fixed shape, and the body is base64-encoded
//! straight from its segments) and read with minidom once the scanner has bounded their size.

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use minidom::Element;
use relay_core::transport::{Response, Status, Transmit};

/// Our namespace for the `<mimi/>` payload element.
pub const NS_MIMI: &str = "urn:mimi-relay:0";
/// The stream's default namespace, in both modes (XEP-0114).
pub const NS_COMPONENT: &str = "jabber:component:accept";
pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";
pub const NS_SM: &str = "urn:xmpp:sm:3";
pub const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
pub const NS_PING: &str = "urn:xmpp:ping";

/// Escapes an attribute value or text.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn iq_head(out: &mut Vec<u8>, kind: &str, id: &str, from: &str, to: &str) {
    let _ = write!(
        out,
        "<iq type='{kind}' id='{}' from='{}' to='{}'>",
        escape(id),
        escape(from),
        escape(to)
    );
}

fn base64_segments<'a>(out: &mut Vec<u8>, segments: impl IntoIterator<Item = &'a Bytes>) {
    let mut w = base64::write::EncoderWriter::new(out, &STANDARD);
    for s in segments {
        // Writing into a Vec cannot fail.
        let _ = w.write_all(s);
    }
    let _ = w.finish();
}

/// Appends the IQ set carrying `t`.
pub fn write_request(out: &mut Vec<u8>, id: &str, from: &str, to: &str, t: &Transmit) {
    iq_head(out, "set", id, from, to);
    let _ = write!(
        out,
        "<mimi xmlns='{NS_MIMI}' endpoint='{}' target='{}'",
        t.endpoint.as_str(),
        escape(&t.target)
    );
    if let Some(seq) = t.seq {
        let _ = write!(out, " seq='{seq}'");
    }
    out.push(b'>');
    base64_segments(out, &t.body);
    out.extend_from_slice(b"</mimi></iq>");
}

/// Appends an XEP-0199 ping.
pub fn write_ping(out: &mut Vec<u8>, id: &str, from: &str, to: &str) {
    iq_head(out, "get", id, from, to);
    let _ = write!(out, "<ping xmlns='{NS_PING}'/></iq>");
}

/// Appends an empty IQ result (the answer to a ping).
pub fn write_empty_result(out: &mut Vec<u8>, id: &str, from: &str, to: &str) {
    let _ = write!(
        out,
        "<iq type='result' id='{}' from='{}' to='{}'/>",
        escape(id),
        escape(from),
        escape(to)
    );
}

/// The RFC 6120 section 8.3 condition and error type a status maps to.
pub fn condition(status: Status) -> (&'static str, &'static str) {
    match status {
        Status::BadRequest => ("bad-request", "modify"),
        Status::Forbidden => ("forbidden", "auth"),
        Status::NotFound => ("item-not-found", "cancel"),
        Status::OutOfOrder => ("unexpected-request", "wait"),
        Status::TooLarge => ("policy-violation", "modify"),
        Status::NotImplemented => ("feature-not-implemented", "cancel"),
        Status::BadGateway => ("remote-server-not-found", "wait"),
        Status::Unavailable => ("resource-constraint", "wait"),
        _ => ("internal-server-error", "wait"),
    }
}

fn mimi_answer(out: &mut Vec<u8>, r: &Response) {
    let _ = write!(
        out,
        "<mimi xmlns='{NS_MIMI}' status='{}'",
        r.status.http_code()
    );
    if let Some(n) = r.next_seq {
        let _ = write!(out, " next-seq='{n}'");
    }
    if let Some(d) = r.retry_after {
        let _ = write!(out, " retry-after-ms='{}'", d.as_millis());
    }
    out.push(b'>');
    base64_segments(out, [&r.body]);
    out.extend_from_slice(b"</mimi>");
}

/// Appends the answer to request `id`: an IQ result for a success, else an IQ error with the
/// condition of [`condition`] and the `<mimi/>` answer as its application condition.
pub fn write_answer(out: &mut Vec<u8>, id: &str, from: &str, to: &str, r: &Response) {
    if r.status.is_success() {
        iq_head(out, "result", id, from, to);
        mimi_answer(out, r);
        out.extend_from_slice(b"</iq>");
    } else {
        iq_head(out, "error", id, from, to);
        let (cond, kind) = condition(r.status);
        let _ = write!(out, "<error type='{kind}'><{cond} xmlns='{NS_STANZAS}'/>");
        mimi_answer(out, r);
        out.extend_from_slice(b"</error></iq>");
    }
}

/// Appends an IQ error without a MIMI answer (for IQs that are not MIMI requests).
pub fn write_plain_error(
    out: &mut Vec<u8>,
    id: &str,
    from: &str,
    to: &str,
    cond: &str,
    kind: &str,
) {
    iq_head(out, "error", id, from, to);
    let _ = write!(
        out,
        "<error type='{kind}'><{cond} xmlns='{NS_STANZAS}'/></error></iq>"
    );
}

/// Appends a stream error (RFC 6120 section 4.9) and the end of our stream.
pub fn write_stream_error(out: &mut Vec<u8>, cond: &str) {
    let _ = write!(
        out,
        "<stream:error><{cond} xmlns='{NS_STREAM_ERRORS}'/></stream:error></stream:stream>"
    );
}

/// Parses one element the scanner bounded, in the stream's namespaces.
pub fn parse(bytes: &[u8]) -> Result<Element, minidom::Error> {
    let prefixes: std::collections::BTreeMap<Option<String>, String> = [
        (None, NS_COMPONENT.to_owned()),
        (Some("stream".to_owned()), NS_STREAM.to_owned()),
    ]
    .into();
    Element::from_reader_with_prefixes(bytes, prefixes)
}

/// The domain part of a JID (`local@domain/resource`), lower-cased.
pub fn jid_domain(jid: &str) -> String {
    let bare = jid.split('/').next().unwrap_or(jid);
    let domain = bare.rsplit('@').next().unwrap_or(bare);
    domain.to_ascii_lowercase()
}

/// A MIMI request read from an IQ set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MimiRequest {
    pub endpoint: Endpoint,
    pub target: String,
    pub seq: Option<u64>,
    pub body: Bytes,
}

/// What one IQ is, once classified.
#[derive(Debug)]
pub enum Iq {
    /// A MIMI request, or the reason it cannot be one (answered with that status).
    Request(Result<MimiRequest, (Status, &'static str)>),
    /// A ping (XEP-0199).
    Ping,
    /// An IQ get/set whose payload is not ours: answered `service-unavailable`.
    Unsupported,
    /// The answer to one of our requests (also for an IQ error that carries a MIMI answer).
    Answer(Result<Response, String>),
    /// An empty result: the answer to a ping.
    Pong,
    /// An IQ error without a MIMI answer, e.g. from an XMPP server that could not route ours.
    Failed(String),
}

fn opt_u64(e: &Element, name: &str) -> Result<Option<u64>, ()> {
    e.attr(name).map(|v| v.parse().map_err(|_| ())).transpose()
}

fn decode_body(e: &Element, max: usize) -> Result<Bytes, (Status, &'static str)> {
    let text: String = e.texts().collect();
    let text = text.trim();
    if text.len() / 4 * 3 > max + 3 {
        return Err((Status::TooLarge, "body over the limit"));
    }
    let body = STANDARD
        .decode(text)
        .map_err(|_| (Status::BadRequest, "body is not base64"))?;
    if body.len() > max {
        return Err((Status::TooLarge, "body over the limit"));
    }
    Ok(Bytes::from(body))
}

fn answer(m: &Element, max: usize) -> Result<Response, String> {
    let code: u16 = m
        .attr("status")
        .and_then(|s| s.parse().ok())
        .ok_or("answer without a status")?;
    let status = Status::from_http_code(code).ok_or(format!("unknown status {code}"))?;
    let next_seq = opt_u64(m, "next-seq").map_err(|()| "bad next-seq")?;
    let retry = opt_u64(m, "retry-after-ms").map_err(|()| "bad retry-after-ms")?;
    let body = decode_body(m, max).map_err(|(_, why)| why.to_owned())?;
    Ok(Response {
        status,
        body,
        next_seq,
        retry_after: retry.map(Duration::from_millis),
    })
}

/// Classifies an `<iq/>` element. `None` if it is not a valid IQ at all (no id or type):
/// RFC 6120 section 8.2.3 makes that a stream-level `bad-request`... we answer it as such.
pub fn classify(iq: &Element, max_body: usize) -> Option<(String, Iq)> {
    let id = iq.attr("id")?.to_owned();
    let kind = iq.attr("type")?;
    let c = match kind {
        "set" | "get" => {
            let mut children = iq.children();
            let (Some(child), None) = (children.next(), children.next()) else {
                return Some((id, Iq::Unsupported));
            };
            if kind == "get" && child.is("ping", NS_PING) {
                Iq::Ping
            } else if kind == "set" && child.is("mimi", NS_MIMI) {
                Iq::Request(request(child, max_body))
            } else {
                Iq::Unsupported
            }
        }
        "result" => match iq.get_child("mimi", NS_MIMI) {
            Some(m) => Iq::Answer(answer(m, max_body)),
            None => Iq::Pong,
        },
        "error" => {
            let err = iq.get_child("error", NS_COMPONENT);
            match err.and_then(|e| e.get_child("mimi", NS_MIMI)) {
                Some(m) => Iq::Answer(answer(m, max_body)),
                None => Iq::Failed(
                    err.and_then(|e| e.children().find(|c| c.ns() == NS_STANZAS))
                        .map_or_else(|| "iq error".to_owned(), |c| c.name().to_owned()),
                ),
            }
        }
        _ => return None,
    };
    Some((id, c))
}

fn request(m: &Element, max_body: usize) -> Result<MimiRequest, (Status, &'static str)> {
    let endpoint = m
        .attr("endpoint")
        .and_then(|e| e.parse::<Endpoint>().ok())
        .ok_or((Status::NotFound, "unknown endpoint"))?;
    let target = m
        .attr("target")
        .ok_or((Status::BadRequest, "missing target"))?
        .to_owned();
    let seq = opt_u64(m, "seq").map_err(|()| (Status::BadRequest, "bad seq"))?;
    let body = decode_body(m, max_body)?;
    Ok(MimiRequest {
        endpoint,
        target,
        seq,
        body,
    })
}

/// The largest stanza that can carry a body of `max_body` bytes (base64 plus the head).
pub fn max_stanza(max_body: usize) -> usize {
    max_body.div_ceil(3) * 4 + 16 * 1024
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use mimi_wire::uri::ProviderDomain;
    use relay_core::transport::{TransmitId, TransportKind};

    fn transmit(body: Vec<Bytes>) -> Transmit {
        Transmit {
            id: TransmitId(1),
            dest: "b.example".parse::<ProviderDomain>().unwrap(),
            transport: TransportKind::Xmpp,
            endpoint: Endpoint::Notify,
            target: "mimi://a.example/r/x&y".into(),
            seq: Some(42),
            body,
        }
    }

    #[test]
    fn request_round_trips_with_exact_bytes_across_segments() {
        let t = transmit(vec![
            Bytes::from_static(b"\x00\x01"),
            Bytes::from_static(b"abcde"),
            Bytes::from_static(b""),
            Bytes::from_static(b"\xff"),
        ]);
        let mut out = Vec::new();
        write_request(&mut out, "m1", "a.example", "b.example", &t);
        let e = parse(&out).unwrap();
        assert_eq!(e.attr("from"), Some("a.example"));
        let (id, iq) = classify(&e, 1024).unwrap();
        assert_eq!(id, "m1");
        let Iq::Request(Ok(r)) = iq else {
            panic!("{iq:?}")
        };
        assert_eq!(r.endpoint, Endpoint::Notify);
        assert_eq!(r.target, "mimi://a.example/r/x&y");
        assert_eq!(r.seq, Some(42));
        assert_eq!(&r.body[..], b"\x00\x01abcde\xff");
    }

    #[test]
    fn answers_round_trip_as_result_or_error() {
        for (status, kind) in [(Status::Created, "result"), (Status::OutOfOrder, "error")] {
            let mut r = Response::new(status, Bytes::from_static(b"why"));
            r.next_seq = Some(7);
            r.retry_after = Some(Duration::from_millis(250));
            let mut out = Vec::new();
            write_answer(&mut out, "m9", "b.example", "a.example", &r);
            let e = parse(&out).unwrap();
            assert_eq!(e.attr("type"), Some(kind));
            let (_, iq) = classify(&e, 1024).unwrap();
            let Iq::Answer(Ok(back)) = iq else {
                panic!("{iq:?}")
            };
            assert_eq!(back, r);
        }
    }

    #[test]
    fn body_over_the_limit_and_unknown_payloads_are_classified() {
        let t = transmit(vec![Bytes::from(vec![7u8; 2000])]);
        let mut out = Vec::new();
        write_request(&mut out, "m1", "a", "b", &t);
        let (_, iq) = classify(&parse(&out).unwrap(), 1000).unwrap();
        assert!(
            matches!(iq, Iq::Request(Err((Status::TooLarge, _)))),
            "{iq:?}"
        );
        let e = parse(b"<iq type='set' id='z'><q xmlns='urn:other'/></iq>").unwrap();
        assert!(matches!(classify(&e, 10), Some((_, Iq::Unsupported))));
        let e = parse(b"<iq type='error' id='z'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>").unwrap();
        match classify(&e, 10) {
            Some((_, Iq::Failed(c))) => assert_eq!(c, "service-unavailable"),
            other => panic!("{other:?}"),
        }
        assert_eq!(jid_domain("relay@B.example/x"), "b.example");
    }
}
