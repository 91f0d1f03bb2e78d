//! The MIMI-over-XMPP binding: how a [`Transmit`] becomes an IQ and an IQ becomes a
//! [`Request`] or a [`Response`] (the spec is in ARCHITECTURE.md, "The XMPP binding").
//!
//! The XMPP framing is xmpp-parsers' typed stanzas (`Iq`, `Ping`, `StanzaError`,
//! `StreamError`); only our `<mimi/>` payload is read and built here, with minidom. Stanzas
//! are parsed once the scanner has bounded their size.
//!
//! [`Request`]: relay_core::transport::Request

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use minidom::Element;
use minidom::rxml::{Namespace, NcName};
use relay_core::transport::{Lineage, Response, Status, Transmit};
use xmpp_parsers::iq::Iq as XmppIq;
use xmpp_parsers::jid::Jid;
use xmpp_parsers::ping::Ping;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use xmpp_parsers::stream_error::{self, StreamError};

/// Our namespace for the `<mimi/>` payload element.
pub const NS_MIMI: &str = "urn:mimi-relay:0";
/// The stream's default namespace, in both modes (XEP-0114). It is also xmpp-parsers'
/// default stanza namespace, because we build it with its `component` feature.
pub const NS_COMPONENT: &str = xmpp_parsers::ns::DEFAULT_NS;
pub const NS_STREAM: &str = xmpp_parsers::ns::STREAM;
pub const NS_SM: &str = xmpp_parsers::ns::SM;
pub const NS_STANZAS: &str = xmpp_parsers::ns::XMPP_STANZAS;
pub const NS_STREAM_ERRORS: &str = xmpp_parsers::ns::XMPP_STREAMS;
pub const NS_PING: &str = xmpp_parsers::ns::PING;

/// Escapes an attribute value or text (for the stream header, which is not an element).
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return std::borrow::Cow::Borrowed(s);
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
    std::borrow::Cow::Owned(out)
}

/// An address as a JID; `None` (the attribute is left out) if it is not one.
fn jid(s: &str) -> Option<Jid> {
    Jid::new(s).ok()
}

/// Appends one serialized element (a stanza or a nonza).
pub fn write(out: &mut Vec<u8>, e: impl Into<Element>) {
    let e: Element = e.into();
    // Writing into a Vec cannot fail, and every name we write is valid.
    let _ = e.write_to(out);
}

/// Sets an attribute of our own element (the names are literals of this module).
fn set_attr(e: &mut Element, name: &'static str, value: String) {
    if let Ok(name) = NcName::try_from(name) {
        e.set_attr(Namespace::NONE, name, value);
    }
}

fn base64_segments<'a>(segments: impl IntoIterator<Item = &'a Bytes>) -> String {
    let mut w = base64::write::EncoderStringWriter::new(&STANDARD);
    for s in segments {
        // Writing into a String cannot fail.
        let _ = w.write_all(s);
    }
    w.into_inner()
}

/// The `<mimi/>` element of a request.
pub fn mimi_request(t: &Transmit) -> Element {
    let mut m = Element::bare("mimi", NS_MIMI);
    set_attr(&mut m, "endpoint", t.endpoint.as_str().to_owned());
    set_attr(&mut m, "target", t.target.clone());
    if let Some(seq) = t.seq {
        set_attr(&mut m, "seq", seq.to_string());
    }
    if let Some(l) = t.lineage {
        set_attr(&mut m, "inc", l.batch.to_string());
        set_attr(&mut m, "prev-inc", l.prev.to_string());
    }
    m.append_text(base64_segments(&t.body));
    m
}

/// Appends the IQ set carrying `t`.
pub fn write_request(out: &mut Vec<u8>, id: &str, from: &str, to: &str, t: &Transmit) {
    write_request_on(out, id, &Route::new(from, to), t);
}

/// The `from` and `to` of the stanzas between two addresses, each checked as a JID once (an
/// address that is not one is left out, as the typed stanzas leave it out), kept written.
#[derive(Debug, Clone)]
pub struct Route {
    from: Option<Jid>,
    to: Option<Jid>,
    /// ` from='..' to='..'`, escaped.
    attrs: Vec<u8>,
}

impl Route {
    pub fn new(from: &str, to: &str) -> Route {
        let (from_jid, to_jid) = (jid(from), jid(to));
        let mut attrs = Vec::new();
        if from_jid.is_some() {
            push_attr(&mut attrs, "from", from);
        }
        if to_jid.is_some() {
            push_attr(&mut attrs, "to", to);
        }
        Route {
            from: from_jid,
            to: to_jid,
            attrs,
        }
    }
}

/// Appends ` name='value'`, the value escaped as minidom escapes it.
fn push_attr(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(b' ');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"='");
    let mut rest = value.as_bytes();
    while let Some(at) = rest
        .iter()
        .position(|c| matches!(c, b'&' | b'<' | b'>' | b'\'' | b'"'))
    {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(match rest[at] {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'\'' => b"&apos;",
            _ => b"&quot;",
        });
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'\'');
}

fn push_u64_attr(out: &mut Vec<u8>, name: &str, value: u64) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, " {name}='{value}'");
}

/// Appends the base64 of the segments, encoded straight into `out`.
fn push_base64<'a>(out: &mut Vec<u8>, segments: impl IntoIterator<Item = &'a Bytes>) {
    let mut w = base64::write::EncoderWriter::new(out, &STANDARD);
    for s in segments {
        // Writing into a Vec cannot fail.
        let _ = w.write_all(s);
    }
    let _ = w.finish();
}

/// [`write_request`] on a [`Route`]: the IQ set written straight out, no DOM built (the
/// same stanza [`mimi_request`] in an `Iq` serializes to, up to attribute order).
pub fn write_request_on(out: &mut Vec<u8>, id: &str, route: &Route, t: &Transmit) {
    out.reserve(t.body_len().div_ceil(3) * 4 + 256 + t.target.len());
    out.extend_from_slice(b"<iq xmlns='");
    out.extend_from_slice(NS_COMPONENT.as_bytes());
    out.extend_from_slice(b"' type='set'");
    out.extend_from_slice(&route.attrs);
    push_attr(out, "id", id);
    out.extend_from_slice(b"><mimi xmlns='");
    out.extend_from_slice(NS_MIMI.as_bytes());
    out.push(b'\'');
    push_attr(out, "endpoint", t.endpoint.as_str());
    push_attr(out, "target", &t.target);
    if let Some(seq) = t.seq {
        push_u64_attr(out, "seq", seq);
    }
    if let Some(l) = t.lineage {
        push_u64_attr(out, "inc", l.batch);
        push_u64_attr(out, "prev-inc", l.prev);
    }
    out.push(b'>');
    push_base64(out, &t.body);
    out.extend_from_slice(b"</mimi></iq>");
}

/// Appends an XEP-0198 ack request, `<r/>`.
pub fn write_ack_request(out: &mut Vec<u8>) {
    out.extend_from_slice(b"<r xmlns='urn:xmpp:sm:3'/>");
}

/// Appends an XEP-0198 ack, `<a h=''/>`.
pub fn write_ack(out: &mut Vec<u8>, h: u32) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "<a xmlns='urn:xmpp:sm:3' h='{h}'/>");
}

/// Appends an XEP-0199 ping.
pub fn write_ping(out: &mut Vec<u8>, id: &str, from: &str, to: &str) {
    let iq = XmppIq::Get {
        from: jid(from),
        to: jid(to),
        id: id.to_owned(),
        payload: Ping.into(),
    };
    write(out, iq);
}

/// Appends an empty IQ result (the answer to a ping).
pub fn write_empty_result(out: &mut Vec<u8>, id: &str, from: &str, to: &str) {
    let iq = XmppIq::Result {
        from: jid(from),
        to: jid(to),
        id: id.to_owned(),
        payload: None,
    };
    write(out, iq);
}

/// The RFC 6120 section 8.3 condition and error type a status maps to.
pub fn condition(status: Status) -> (DefinedCondition, ErrorType) {
    match status {
        Status::BadRequest => (DefinedCondition::BadRequest, ErrorType::Modify),
        Status::Forbidden => (DefinedCondition::Forbidden, ErrorType::Auth),
        Status::NotFound => (DefinedCondition::ItemNotFound, ErrorType::Cancel),
        Status::OutOfOrder => (DefinedCondition::UnexpectedRequest, ErrorType::Wait),
        Status::TooLarge => (DefinedCondition::PolicyViolation, ErrorType::Modify),
        Status::NotImplemented => (DefinedCondition::FeatureNotImplemented, ErrorType::Cancel),
        Status::BadGateway => (DefinedCondition::RemoteServerNotFound, ErrorType::Wait),
        Status::Unavailable | Status::TooManyRequests => {
            (DefinedCondition::ResourceConstraint, ErrorType::Wait)
        }
        _ => (DefinedCondition::InternalServerError, ErrorType::Wait),
    }
}

/// The `<mimi/>` element of an answer.
pub fn mimi_answer(r: &Response) -> Element {
    let mut m = Element::bare("mimi", NS_MIMI);
    set_attr(&mut m, "status", r.status.http_code().to_string());
    if let Some(n) = r.next_seq {
        set_attr(&mut m, "next-seq", n.to_string());
    }
    if let Some(inc) = r.next_inc {
        set_attr(&mut m, "next-inc", inc.to_string());
    }
    if let Some(d) = r.retry_after {
        set_attr(&mut m, "retry-after-ms", d.as_millis().to_string());
    }
    if !r.body.is_empty() {
        m.append_text(base64_segments([&r.body]));
    }
    m
}

fn stanza_error(cond: DefinedCondition, kind: ErrorType, other: Option<Element>) -> StanzaError {
    StanzaError {
        type_: kind,
        by: None,
        defined_condition: cond,
        texts: Default::default(),
        other,
    }
}

/// Appends the answer to request `id`: an IQ result for a success, else an IQ error with the
/// condition of [`condition`] and the `<mimi/>` answer as its application condition.
pub fn write_answer(out: &mut Vec<u8>, id: &str, from: &str, to: &str, r: &Response) {
    write_answer_on(out, id, &Route::new(from, to), r);
}

/// [`write_answer`] on a [`Route`]. A success (the hot path) is written straight out, no DOM
/// built; an error goes through the typed stanzas.
pub fn write_answer_on(out: &mut Vec<u8>, id: &str, route: &Route, r: &Response) {
    if !r.status.is_success() {
        let (cond, kind) = condition(r.status);
        let iq = XmppIq::Error {
            from: route.from.clone(),
            to: route.to.clone(),
            id: id.to_owned(),
            error: stanza_error(cond, kind, Some(mimi_answer(r))),
            payload: None,
        };
        return write(out, iq);
    }
    out.reserve(r.body.len().div_ceil(3) * 4 + 256);
    out.extend_from_slice(b"<iq xmlns='");
    out.extend_from_slice(NS_COMPONENT.as_bytes());
    out.extend_from_slice(b"' type='result'");
    out.extend_from_slice(&route.attrs);
    push_attr(out, "id", id);
    out.extend_from_slice(b"><mimi xmlns='");
    out.extend_from_slice(NS_MIMI.as_bytes());
    out.push(b'\'');
    push_u64_attr(out, "status", r.status.http_code().into());
    if let Some(n) = r.next_seq {
        push_u64_attr(out, "next-seq", n);
    }
    if let Some(inc) = r.next_inc {
        push_u64_attr(out, "next-inc", inc);
    }
    if let Some(d) = r.retry_after {
        push_u64_attr(
            out,
            "retry-after-ms",
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        );
    }
    if r.body.is_empty() {
        out.extend_from_slice(b"/></iq>");
    } else {
        out.push(b'>');
        push_base64(out, [&r.body]);
        out.extend_from_slice(b"</mimi></iq>");
    }
}

/// Appends an IQ error without a MIMI answer (for IQs that are not MIMI requests).
pub fn write_plain_error(
    out: &mut Vec<u8>,
    id: &str,
    from: &str,
    to: &str,
    cond: DefinedCondition,
    kind: ErrorType,
) {
    let iq = XmppIq::Error {
        from: jid(from),
        to: jid(to),
        id: id.to_owned(),
        error: stanza_error(cond, kind, None),
        payload: None,
    };
    write(out, iq);
}

/// The typed RFC 6120 section 4.9.3 condition of a stream error we send.
pub fn stream_condition(name: &str) -> stream_error::DefinedCondition {
    use stream_error::DefinedCondition as C;
    match name {
        "bad-format" => C::BadFormat,
        "host-unknown" => C::HostUnknown,
        "improper-addressing" => C::ImproperAddressing,
        "invalid-from" => C::InvalidFrom,
        "invalid-namespace" => C::InvalidNamespace,
        "not-authorized" => C::NotAuthorized,
        "not-well-formed" => C::NotWellFormed,
        "policy-violation" => C::PolicyViolation,
        "resource-constraint" => C::ResourceConstraint,
        "restricted-xml" => C::RestrictedXml,
        "system-shutdown" => C::SystemShutdown,
        "unsupported-stanza-type" => C::UnsupportedStanzaType,
        _ => C::UndefinedCondition,
    }
}

/// The name of an element's first child: the condition of a stanza or stream error.
fn condition_name(e: impl Into<Element>) -> String {
    let e: Element = e.into();
    e.name().to_owned()
}

/// Appends a stream error (RFC 6120 section 4.9) and the end of our stream.
pub fn write_stream_error(out: &mut Vec<u8>, cond: &str) {
    let error = StreamError {
        condition: stream_condition(cond),
        texts: Default::default(),
        application_specific: Vec::new(),
    };
    write(out, error);
    out.extend_from_slice(b"</stream:stream>");
}

/// The condition of a stream error the peer sent (`<stream:error/>`), if `e` is one.
pub fn peer_stream_error(e: &Element) -> Option<String> {
    if !e.is("error", NS_STREAM) {
        return None;
    }
    Some(match StreamError::try_from(e.clone()) {
        Ok(error) => condition_name(error.condition),
        // Not one we can read: still a stream error.
        Err(_) => e
            .children()
            .next()
            .map_or_else(|| "undefined-condition".to_owned(), |c| c.name().to_owned()),
    })
}

/// The largest input the DOM parser has been given in this process (for the tests that
/// check no large stanza reaches it).
static LARGEST_DOM_PARSE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[doc(hidden)]
pub fn largest_dom_parse() -> usize {
    LARGEST_DOM_PARSE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Parses one element the scanner bounded, in the stream's namespaces.
pub fn parse(bytes: &[u8]) -> Result<Element, minidom::Error> {
    LARGEST_DOM_PARSE.fetch_max(bytes.len(), std::sync::atomic::Ordering::Relaxed);
    let prefixes: std::collections::BTreeMap<Option<String>, String> = [
        (None, NS_COMPONENT.to_owned()),
        (Some("stream".to_owned()), NS_STREAM.to_owned()),
    ]
    .into();
    Element::from_reader_with_prefixes(bytes, prefixes)
}

/// One stanza the scanner returned, read by [`parse_stanza`].
#[derive(Debug)]
pub enum Stanza<'a> {
    /// The stanza's element. With `Some(text)`, the `<mimi/>` element's text was taken out
    /// before the parse (the element is empty) and is `text`, to pass to [`classify`].
    Parsed(Element, Option<&'a [u8]>),
    /// Over [`MAX_ENVELOPE`] and not a MIMI stanza of the shape the fast path takes: not
    /// parsed, like a stanza the scanner skipped. `head` is its start tag as an empty element,
    /// if it is small.
    Oversize { head: Option<Bytes> },
}

/// Reads one stanza the scanner bounded, in time linear in its length: the base64 text of
/// its `<mimi/>` element (the bulk of a MIMI stanza) is located by a byte scan and kept out of
/// the DOM parser, which only sees the rest (at most [`MAX_ENVELOPE`] bytes); the text is
/// decoded by [`classify`]. Any other stanza over [`MAX_ENVELOPE`] is not parsed.
pub fn parse_stanza(bytes: &[u8]) -> Result<Stanza<'_>, minidom::Error> {
    if let Some(text) = mimi_text(bytes)
        && bytes.len() - text.len() <= MAX_ENVELOPE
    {
        let mut envelope = Vec::with_capacity(bytes.len() - text.len());
        envelope.extend_from_slice(&bytes[..text.start]);
        envelope.extend_from_slice(&bytes[text.end..]);
        return Ok(Stanza::Parsed(parse(&envelope)?, Some(&bytes[text])));
    }
    if bytes.len() > MAX_ENVELOPE {
        return Ok(Stanza::Oversize { head: head(bytes) });
    }
    Ok(Stanza::Parsed(parse(bytes)?, None))
}

/// The tag starting at `b[at] == '<'`: the index just past its `>`, quotes respected.
fn tag_end(b: &[u8], at: usize) -> Option<usize> {
    let mut quote = None;
    for (i, &c) in b.iter().enumerate().skip(at + 1) {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(c),
            (None, b'>') => return Some(i + 1),
            (None, _) => {}
        }
    }
    None
}

/// The start tag of `b` as an empty element, if it is at most 4 KiB (as the scanner keeps
/// the head of a stanza it skips).
fn head(b: &[u8]) -> Option<Bytes> {
    if b.first() != Some(&b'<') {
        return None;
    }
    let end = tag_end(b, 0).filter(|&e| e <= 4096)?;
    let tag = &b[..end];
    let mut h = Vec::with_capacity(end + 1);
    if tag.ends_with(b"/>") {
        h.extend_from_slice(tag);
    } else {
        h.extend_from_slice(&tag[..end - 1]);
        h.extend_from_slice(b"/>");
    }
    Some(Bytes::from(h))
}

/// Where the text of the stanza's `<mimi/>` element is, if the stanza has the shape our
/// writer gives it: exactly one element named `mimi` in the whole stanza (with any prefix),
/// unprefixed, holding nothing but that text, which is base64 and XML whitespace only (no
/// entity, so the bytes are the text). Whether it is the element [`classify`] reads (the
/// IQ's payload, in our namespace) is then checked on the parsed envelope: it is the only
/// `mimi` there is. One pass over the bytes.
fn mimi_text(b: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut mimis = 0;
    let mut text = None;
    // Just after an unprefixed `<mimi ...>` start tag, where its text starts.
    let mut open: Option<usize> = None;
    let mut i = 0;
    while let Some(at) = b[i..].iter().position(|&c| c == b'<') {
        i += at;
        let end = tag_end(b, i)?;
        let tag = &b[i..end];
        let (close, name_at) = match tag.get(1)? {
            b'!' | b'?' => return None,
            b'/' => (true, 2),
            _ => (false, 1),
        };
        let name = &tag[name_at..];
        let name = &name[..name
            .iter()
            .position(|&c| matches!(c, b' ' | b'\t' | b'\r' | b'\n' | b'/' | b'>'))?];
        let local = name.rsplit(|&c| c == b':').next()?;
        if close {
            if name == b"mimi"
                && let Some(start) = open
            {
                text = Some(start..i);
            }
        } else if local == b"mimi" {
            mimis += 1;
        }
        open = (!close && name == b"mimi" && !tag.ends_with(b"/>")).then_some(end);
        i = end;
    }
    let text = text.filter(|_| mimis == 1)?;
    b[text.clone()]
        .iter()
        .all(|&c| TEXT_BYTE[usize::from(c)])
        .then_some(text)
}

/// The bytes the fast path takes in the text: base64's and XML whitespace.
const TEXT_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') || is_xml_space(b);
        c += 1;
    }
    t
};

const fn is_xml_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
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
    pub lineage: Option<Lineage>,
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

/// The attributes of a `<mimi/>` element: a DOM element's, or those [`read_hot`] read.
trait Attrs {
    fn attr(&self, name: &'static str) -> Option<&str>;
    /// The element's text, when it was not taken out of it.
    fn dom_text(&self) -> String;
}

impl Attrs for Element {
    fn attr(&self, name: &'static str) -> Option<&str> {
        Element::attr(self, name)
    }
    fn dom_text(&self) -> String {
        self.texts().collect()
    }
}

fn opt_u64(e: &impl Attrs, name: &'static str) -> Result<Option<u64>, ()> {
    e.attr(name).map(|v| v.parse().map_err(|_| ())).transpose()
}

/// The body of `<mimi/>` element `e`, whose text is `text` if [`parse_stanza`] took it out.
fn decode_body(
    e: &impl Attrs,
    text: Option<&[u8]>,
    max: usize,
) -> Result<Bytes, (Status, &'static str)> {
    let dom: String;
    let (text, len) = match text {
        Some(raw) => {
            // As the DOM would read it: trimmed, and each CR LF one character (XML 2.11).
            let start = raw
                .iter()
                .position(|&c| !is_xml_space(c))
                .unwrap_or(raw.len());
            let end = raw
                .iter()
                .rposition(|&c| !is_xml_space(c))
                .map_or(start, |e| e + 1);
            let raw = &raw[start..end];
            let crlf = raw.windows(2).filter(|w| w == b"\r\n").count();
            (raw, raw.len() - crlf)
        }
        None => {
            dom = e.dom_text();
            let t = dom.trim();
            (t.as_bytes(), t.len())
        }
    };
    // From the length alone, before any decoding.
    if len / 4 * 3 > max + 3 {
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

fn answer(m: &impl Attrs, text: Option<&[u8]>, max: usize) -> Result<Response, String> {
    let code: u16 = m
        .attr("status")
        .and_then(|s| s.parse().ok())
        .ok_or("answer without a status")?;
    let status = Status::from_http_code(code).ok_or(format!("unknown status {code}"))?;
    let next_seq = opt_u64(m, "next-seq").map_err(|()| "bad next-seq")?;
    let next_inc = opt_u64(m, "next-inc").map_err(|()| "bad next-inc")?;
    let retry = opt_u64(m, "retry-after-ms").map_err(|()| "bad retry-after-ms")?;
    let body = decode_body(m, text, max).map_err(|(_, why)| why.to_owned())?;
    Ok(Response {
        status,
        body,
        next_seq,
        next_inc,
        retry_after: retry.map(Duration::from_millis),
    })
}

/// Classifies an `<iq/>` element (read with xmpp-parsers' `Iq`), with the `<mimi/>` text
/// [`parse_stanza`] took out of it. `None` if it is not a valid IQ at all (no id or type):
/// RFC 6120 section 8.2.3 makes that a stream-level `bad-format`.
pub fn classify(iq: Element, text: Option<&[u8]>, max_body: usize) -> Option<(String, Iq)> {
    let id = iq.attr("id")?.to_owned();
    let kind = iq.attr("type")?.to_owned();
    // RFC 6120 section 8.2.3: a get/set has exactly one child (xmpp-parsers would take the
    // first of several).
    if matches!(kind.as_str(), "get" | "set") && iq.children().count() != 1 {
        return Some((id, Iq::Unsupported));
    }
    let Ok(parsed) = XmppIq::try_from(iq) else {
        // An id and a known type, but not a well-formed IQ (e.g. a get/set without exactly
        // one child, RFC 6120 section 8.2.3): refuse a request, ignore an answer.
        return match kind.as_str() {
            "get" | "set" => Some((id, Iq::Unsupported)),
            "result" | "error" => Some((id, Iq::Failed("malformed iq".to_owned()))),
            _ => None,
        };
    };
    let c = match parsed {
        XmppIq::Get { payload, .. } => {
            if Ping::try_from(payload).is_ok() {
                Iq::Ping
            } else {
                Iq::Unsupported
            }
        }
        XmppIq::Set { payload, .. } => {
            if payload.is("mimi", NS_MIMI) {
                Iq::Request(request(&payload, text, max_body))
            } else {
                Iq::Unsupported
            }
        }
        XmppIq::Result { payload, .. } => match payload.filter(|p| p.is("mimi", NS_MIMI)) {
            Some(m) => Iq::Answer(answer(&m, text, max_body)),
            None => Iq::Pong,
        },
        XmppIq::Error { error, .. } => match error.other.filter(|o| o.is("mimi", NS_MIMI)) {
            Some(m) => Iq::Answer(answer(&m, text, max_body)),
            None => Iq::Failed(condition_name(error.defined_condition)),
        },
    };
    Some((id, c))
}

fn request(
    m: &impl Attrs,
    text: Option<&[u8]>,
    max_body: usize,
) -> Result<MimiRequest, (Status, &'static str)> {
    let endpoint = m
        .attr("endpoint")
        .and_then(|e| e.parse::<Endpoint>().ok())
        .ok_or((Status::NotFound, "unknown endpoint"))?;
    let target = m
        .attr("target")
        .ok_or((Status::BadRequest, "missing target"))?
        .to_owned();
    let seq = opt_u64(m, "seq").map_err(|()| (Status::BadRequest, "bad seq"))?;
    let batch = opt_u64(m, "inc").map_err(|()| (Status::BadRequest, "bad inc"))?;
    let prev = opt_u64(m, "prev-inc").map_err(|()| (Status::BadRequest, "bad prev-inc"))?;
    let body = decode_body(m, text, max_body)?;
    Ok(MimiRequest {
        endpoint,
        target,
        seq,
        lineage: batch.map(|batch| Lineage {
            batch,
            prev: prev.unwrap_or(0),
        }),
        body,
    })
}

/// A stanza of the hot path, read by [`read_hot`] without the DOM.
#[derive(Debug)]
pub enum Hot {
    /// XEP-0198's `<r/>`.
    AckRequest,
    /// XEP-0198's `<a h=''/>`.
    Ack(u32),
    /// A MIMI request (IQ set) or a successful answer (IQ result) with its addresses as
    /// written. The typed `Iq` would also check that `from` and `to` are JIDs: the caller
    /// takes the stanza only if it knows them to be, else it reads it with the DOM.
    Iq {
        from: String,
        to: Option<String>,
        id: String,
        iq: Iq,
    },
}

/// Most attributes a hot-path tag has (`<mimi/>` of a request: xmlns, endpoint, target, seq,
/// inc, prev-inc).
const MAX_HOT_ATTRS: usize = 6;

/// One start tag read by [`hot_tag`]: unprefixed names, values unescaped.
struct HotTag<'a> {
    name: &'a [u8],
    attrs: [(&'a [u8], std::borrow::Cow<'a, str>); MAX_HOT_ATTRS],
    n: usize,
    empty: bool,
    /// Just past its `>`.
    end: usize,
}

impl Attrs for HotTag<'_> {
    fn attr(&self, name: &'static str) -> Option<&str> {
        self.attrs[..self.n]
            .iter()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, v)| &**v)
    }
    fn dom_text(&self) -> String {
        String::new()
    }
}

impl HotTag<'_> {
    /// Whether every attribute is one of `names`.
    fn only(&self, names: &[&str]) -> bool {
        self.attrs[..self.n]
            .iter()
            .all(|(n, _)| names.iter().any(|k| k.as_bytes() == *n))
    }
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')
}

/// The start tag at `b[at]`, if it is of the plain shape the hot path takes: unprefixed
/// ASCII names, at most [`MAX_HOT_ATTRS`] attributes, none twice, values of printable ASCII
/// with only the five predefined entities. `None` leaves the stanza to the DOM parser.
fn hot_tag(b: &[u8], at: usize) -> Option<HotTag<'_>> {
    if b.get(at) != Some(&b'<') {
        return None;
    }
    let mut i = at + 1;
    let name_len = b[i..].iter().take_while(|&&c| is_name_byte(c)).count();
    if name_len == 0 || !b[i].is_ascii_alphabetic() {
        return None;
    }
    let name = &b[i..i + name_len];
    i += name_len;
    let mut tag = HotTag {
        name,
        attrs: Default::default(),
        n: 0,
        empty: false,
        end: 0,
    };
    loop {
        let spaces = b[i..].iter().take_while(|&&c| is_xml_space(c)).count();
        i += spaces;
        match b.get(i)? {
            b'>' => {
                tag.end = i + 1;
                return Some(tag);
            }
            b'/' if b.get(i + 1) == Some(&b'>') => {
                tag.empty = true;
                tag.end = i + 2;
                return Some(tag);
            }
            _ if spaces == 0 || tag.n == MAX_HOT_ATTRS => return None,
            _ => {}
        }
        let len = b[i..].iter().take_while(|&&c| is_name_byte(c)).count();
        if len == 0 || !b[i].is_ascii_alphabetic() {
            return None;
        }
        let attr = &b[i..i + len];
        i += len;
        i += b[i..].iter().take_while(|&&c| is_xml_space(c)).count();
        if b.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        i += b[i..].iter().take_while(|&&c| is_xml_space(c)).count();
        let quote = *b.get(i).filter(|&&q| q == b'\'' || q == b'"')?;
        i += 1;
        let len = b[i..].iter().position(|&c| c == quote)?;
        let value = hot_value(&b[i..i + len])?;
        i += len + 1;
        if tag.attrs[..tag.n].iter().any(|(n, _)| *n == attr) {
            return None; // the DOM parser refuses it
        }
        tag.attrs[tag.n] = (attr, value);
        tag.n += 1;
    }
}

/// An attribute value as the DOM reads it, if it is printable ASCII with at most the five
/// predefined entities (whitespace would be normalised, other references resolved: the DOM
/// parser reads those).
fn hot_value(raw: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    if !raw.iter().all(|&c| (0x20..0x7f).contains(&c) && c != b'<') {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?;
    if !raw.contains(&b'&') {
        return Some(std::borrow::Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let entity = &rest[at..];
        let (c, len) = [
            ("&amp;", '&'),
            ("&lt;", '<'),
            ("&gt;", '>'),
            ("&quot;", '"'),
            ("&apos;", '\''),
        ]
        .iter()
        .find(|(e, _)| entity.starts_with(e))
        .map(|(e, c)| (*c, e.len()))?;
        out.push(c);
        rest = &entity[len..];
    }
    out.push_str(rest);
    Some(std::borrow::Cow::Owned(out))
}

/// Reads the stanzas of the hot path (MIMI requests, successful MIMI answers, XEP-0198
/// acks) straight from their bytes, with no DOM: one pass over the envelope's two start
/// tags, the base64 text handed to the decoder where it lies. `None` for anything else, or
/// anything of an unusual shape (prefixes, other attributes, entities other than the five
/// predefined, whitespace between tags): the DOM parser reads those, and reads what this
/// takes the same way (the equivalence tests and the fuzz target hold it to that).
pub fn read_hot(b: &[u8], max_body: usize) -> Option<Hot> {
    let first = hot_tag(b, 0)?;
    match first.name {
        b"r" | b"a" => {
            if !first.empty
                || first.end != b.len()
                || first.attr("xmlns") != Some(NS_SM)
                || !first.only(&["xmlns", "h"])
            {
                return None;
            }
            return match first.name {
                b"r" if first.n == 1 => Some(Hot::AckRequest),
                b"a" => {
                    let h = first.attr("h")?;
                    // As the typed `A` reads it: a plain decimal u32.
                    if !h.bytes().all(|c| c.is_ascii_digit()) {
                        return None;
                    }
                    Some(Hot::Ack(h.parse().ok()?))
                }
                _ => None,
            };
        }
        b"iq" => {}
        _ => return None,
    }
    if first.empty
        || !first.only(&["xmlns", "type", "id", "from", "to"])
        || first.attr("xmlns").is_some_and(|ns| ns != NS_COMPONENT)
    {
        return None;
    }
    let set = match first.attr("type")? {
        "set" => true,
        "result" => false,
        _ => return None,
    };
    let mimi = hot_tag(b, first.end)?;
    let names: &[&str] = if set {
        &["xmlns", "endpoint", "target", "seq", "inc", "prev-inc"]
    } else {
        &["xmlns", "status", "next-seq", "next-inc", "retry-after-ms"]
    };
    if mimi.name != b"mimi" || mimi.attr("xmlns") != Some(NS_MIMI) || !mimi.only(names) {
        return None;
    }
    let (text, rest) = if mimi.empty {
        (&b[mimi.end..mimi.end], mimi.end)
    } else {
        let len = b[mimi.end..].iter().position(|&c| c == b'<')?;
        let text = &b[mimi.end..mimi.end + len];
        let close = mimi.end + len;
        if !b[close..].starts_with(b"</mimi>") {
            return None;
        }
        (text, close + b"</mimi>".len())
    };
    if &b[rest..] != b"</iq>" || !text.iter().all(|&c| TEXT_BYTE[usize::from(c)]) {
        return None;
    }
    let iq = if set {
        Iq::Request(request(&mimi, Some(text), max_body))
    } else {
        Iq::Answer(answer(&mimi, Some(text), max_body))
    };
    Some(Hot::Iq {
        from: first.attr("from")?.to_owned(),
        to: first.attr("to").map(str::to_owned),
        id: first.attr("id")?.to_owned(),
        iq,
    })
}

/// The largest stanza without its `<mimi/>` text (the envelope): the most the DOM parser is
/// ever given.
pub const MAX_ENVELOPE: usize = 16 * 1024;

/// The largest stanza that can carry a body of `max_body` bytes (base64 plus the envelope).
pub fn max_stanza(max_body: usize) -> usize {
    max_body.div_ceil(3) * 4 + MAX_ENVELOPE
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
            lineage: Some(Lineage {
                batch: u64::MAX,
                prev: 7,
            }),
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
        let (id, iq) = classify(e, None, 1024).unwrap();
        assert_eq!(id, "m1");
        let Iq::Request(Ok(r)) = iq else {
            panic!("{iq:?}")
        };
        assert_eq!(r.endpoint, Endpoint::Notify);
        assert_eq!(r.target, "mimi://a.example/r/x&y");
        assert_eq!(r.seq, Some(42));
        assert_eq!(
            r.lineage,
            Some(Lineage {
                batch: u64::MAX,
                prev: 7
            })
        );
        assert_eq!(&r.body[..], b"\x00\x01abcde\xff");
    }

    /// `bytes` read by the fast path (which must take it) and by the DOM parser whole.
    fn both(bytes: &[u8], max: usize) -> (String, String) {
        let Stanza::Parsed(el, text) = parse_stanza(bytes).unwrap() else {
            panic!("oversize")
        };
        assert!(text.is_some(), "{}", String::from_utf8_lossy(bytes));
        let fast = format!("{:?}", classify(el, text, max));
        let dom = format!("{:?}", classify(parse(bytes).unwrap(), None, max));
        (fast, dom)
    }

    #[test]
    fn the_fast_path_reads_our_writer_output_as_the_dom_does() {
        let max = 30;
        for n in [1, 2, 3, 4, 29, 30, 31, 32, 33, 34, 60] {
            let t = transmit(vec![Bytes::from(
                (0..n).map(|i| i as u8).collect::<Vec<_>>(),
            )]);
            let mut out = Vec::new();
            write_request(&mut out, "m1", "a.example", "b.example", &t);
            let (fast, dom) = both(&out, max);
            assert_eq!(fast, dom, "{n} bytes");
            let tag = if n <= max { "Request(Ok(" } else { "TooLarge" };
            assert!(fast.contains(tag), "{n}: {fast}");
            for status in [Status::Created, Status::OutOfOrder, Status::TooLarge] {
                let mut r = Response::new(status, Bytes::from(vec![9u8; n]));
                r.next_seq = Some(3);
                let mut out = Vec::new();
                write_answer(&mut out, "m2", "b.example", "a.example", &r);
                let (fast, dom) = both(&out, max);
                assert_eq!(fast, dom, "{status:?} {n}");
                assert!(fast.contains("Answer("), "{fast}");
            }
        }
    }

    #[test]
    fn the_fast_path_reads_hand_written_variants_as_the_dom_does() {
        let iq = |attrs: &str, mimi: &str, text: &str, close: &str| {
            format!("<iq {attrs}><{mimi}>{text}</{close}></iq>")
        };
        let set = "type='set' id='1' from='a.example'";
        let m = "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t' seq='5'";
        let cases = [
            // Attribute order and quotes.
            iq(set, m, "QUJD", "mimi"),
            iq(
                "from=\"a.example\" id=\"1\" type=\"set\"",
                "mimi seq=\"5\" target=\"t&amp;u&#62;\" endpoint=\"notify\" xmlns=\"urn:mimi-relay:0\"",
                "QUJD",
                "mimi",
            ),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target=\"'>\"", "QUJD", "mimi"),
            // Whitespace in tags and around the text, CR LF as XML normalises it.
            iq(set, "mimi\n  xmlns = 'urn:mimi-relay:0'\tendpoint='notify' target='t' ", "\r\n  QUJD\r\n", "mimi "),
            // Whitespace inside the text: not base64.
            iq(set, m, "QU JD", "mimi"),
            // CR LF counts once towards the length bound (400 here, not 413).
            iq(set, m, "QUJDREVG\r\nSGlqaw", "mimi"),
            // Bad base64, bad attributes, an empty text.
            iq(set, m, "QUJ", "mimi"),
            iq(set, m, "Q===", "mimi"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='nope' target='t'", "QUJD", "mimi"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t' seq='x'", "QUJD", "mimi"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify'", "QUJD", "mimi"),
            iq(set, m, " \n ", "mimi"),
            // Not our namespace, not a set, not a MIMI answer: the text is not read at all.
            iq(set, "mimi xmlns='urn:other' endpoint='notify' target='t'", "QUJD", "mimi"),
            iq("type='get' id='1'", m, "QUJD", "mimi"),
            iq("type='result' id='1'", "mimi xmlns='urn:mimi-relay:0' status='201' next-seq='2'", "QUJD", "mimi"),
            iq("type='result' id='1'", "mimi xmlns='urn:mimi-relay:0'", "QUJD", "mimi"),
            "<iq type='error' id='1'><error type='wait'><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><mimi xmlns='urn:mimi-relay:0' status='425' retry-after-ms='9'>QUJD</mimi></error></iq>".to_owned(),
            "<iq type='error' id='1'><error type='wait'><mimi xmlns='urn:mimi-relay:0' status='425'>QUJD</mimi></error></iq>".to_owned(),
            // Not an IQ at all.
            "<iq id='1'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t'>QUJD</mimi></iq>".to_owned(),
            "<message from='a'><mimi xmlns='urn:mimi-relay:0'>QUJD</mimi></message>".to_owned(),
        ];
        for case in &cases {
            let (fast, dom) = both(case.as_bytes(), 6);
            assert_eq!(fast, dom, "{case}");
        }
        // Shapes the fast path leaves to the DOM: entities in the text, a prefixed or second
        // `mimi`, a child element.
        for case in [
            iq(set, m, "QU&#74;D", "mimi"),
            iq(set, m, "QUJD&amp;", "mimi"),
            iq(set, "m:mimi xmlns:m='urn:mimi-relay:0' endpoint='notify' target='t'", "QUJD", "m:mimi"),
            iq(set, m, "<mimi xmlns='urn:mimi-relay:0'>QUJD</mimi>", "mimi"),
            iq(set, m, "<x/>QUJD", "mimi"),
            "<iq type='set' id='1'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t'/><x:mimi xmlns:x='u'>QUJD</x:mimi></iq>".to_owned(),
        ] {
            let Stanza::Parsed(el, None) = parse_stanza(case.as_bytes()).unwrap() else {
                panic!("fast path taken: {case}")
            };
            let dom = format!("{:?}", classify(parse(case.as_bytes()).unwrap(), None, 6));
            assert_eq!(format!("{:?}", classify(el, None, 6)), dom, "{case}");
        }
        // Text the DOM refuses is refused with the fast path too.
        let bad = "<iq type='set' id='1'><mimi xmlns='urn:mimi-relay:0'>QUJD</mimi></iq";
        assert!(parse_stanza(bad.as_bytes()).is_err());
    }

    #[test]
    fn only_the_envelope_is_bounded_by_max_envelope() {
        let big = "QUFB".repeat(MAX_ENVELOPE);
        let ok = format!(
            "<iq type='set' id='7' from='a'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t'>{big}</mimi></iq>"
        );
        let Stanza::Parsed(el, text) = parse_stanza(ok.as_bytes()).unwrap() else {
            panic!("oversize")
        };
        let Some((_, Iq::Request(Ok(r)))) = classify(el, text, 3 * MAX_ENVELOPE) else {
            panic!()
        };
        assert_eq!(r.body.len(), 3 * MAX_ENVELOPE);
        // A large envelope, or a large stanza not of the fast path's shape, is not parsed.
        let pad = "x".repeat(MAX_ENVELOPE);
        for case in [
            format!(
                "<iq type='set' id='7' pad='{pad}'><mimi xmlns='urn:mimi-relay:0'>QUJD</mimi></iq>"
            ),
            format!("<iq type='set' id='7'><mimi xmlns='urn:mimi-relay:0'>{big}&#65;</mimi></iq>"),
            format!("<iq type='set' id='7'><q xmlns='urn:other'>{big}</q></iq>"),
        ] {
            match parse_stanza(case.as_bytes()).unwrap() {
                Stanza::Oversize { head } => {
                    let head = head.map(|h| parse(&h).unwrap());
                    if !case.contains("pad=") {
                        assert_eq!(head.unwrap().attr("id"), Some("7"));
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn answers_round_trip_as_result_or_error() {
        for (status, kind) in [(Status::Created, "result"), (Status::OutOfOrder, "error")] {
            let mut r = Response::new(status, Bytes::from_static(b"why"));
            r.next_seq = Some(7);
            r.next_inc = Some(0xdead_beef);
            r.retry_after = Some(Duration::from_millis(250));
            let mut out = Vec::new();
            write_answer(&mut out, "m9", "b.example", "a.example", &r);
            let e = parse(&out).unwrap();
            assert_eq!(e.attr("type"), Some(kind));
            let (_, iq) = classify(e, None, 1024).unwrap();
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
        let (_, iq) = classify(parse(&out).unwrap(), None, 1000).unwrap();
        assert!(
            matches!(iq, Iq::Request(Err((Status::TooLarge, _)))),
            "{iq:?}"
        );
        let e = parse(b"<iq type='set' id='z'><q xmlns='urn:other'/></iq>").unwrap();
        assert!(matches!(classify(e, None, 10), Some((_, Iq::Unsupported))));
        let e = parse(b"<iq type='error' id='z'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>").unwrap();
        match classify(e, None, 10) {
            Some((_, Iq::Failed(c))) => assert_eq!(c, "service-unavailable"),
            other => panic!("{other:?}"),
        }
        assert_eq!(jid_domain("relay@B.example/x"), "b.example");
    }

    #[test]
    fn stanzas_are_written_in_the_component_namespace() {
        // xmpp-parsers' `component` feature makes its stanzas ours (`jabber:component:accept`);
        // without it they would be `jabber:client` and servers would refuse them.
        assert_eq!(NS_COMPONENT, "jabber:component:accept");
        let mut out = Vec::new();
        write_ping(&mut out, "p1", "a.example", "b.example");
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(
            text.starts_with("<iq xmlns='jabber:component:accept'"),
            "{text}"
        );
        assert!(text.contains("<ping xmlns='urn:xmpp:ping'/>"), "{text}");
        let (id, iq) = classify(parse(&out).unwrap(), None, 10).unwrap();
        assert_eq!(id, "p1");
        assert!(matches!(iq, Iq::Ping), "{iq:?}");
        // A client-namespace IQ is not one of ours.
        let e = parse(
            b"<iq xmlns='jabber:client' type='get' id='c'><ping xmlns='urn:xmpp:ping'/></iq>",
        )
        .unwrap();
        assert_eq!(e.ns(), "jabber:client");
    }

    #[test]
    fn every_stream_error_we_send_keeps_its_condition() {
        for cond in [
            "bad-format",
            "host-unknown",
            "improper-addressing",
            "invalid-from",
            "invalid-namespace",
            "not-well-formed",
            "policy-violation",
            "resource-constraint",
            "restricted-xml",
            "undefined-condition",
            "unsupported-stanza-type",
        ] {
            let mut out = Vec::new();
            write_stream_error(&mut out, cond);
            let text = String::from_utf8(out).unwrap();
            let end = "</stream:stream>";
            assert!(text.ends_with(end), "{text}");
            let e = parse(&text.as_bytes()[..text.len() - end.len()]).unwrap();
            assert_eq!(peer_stream_error(&e).as_deref(), Some(cond), "{text}");
        }
    }

    #[test]
    fn iq_errors_without_a_mimi_answer_carry_their_condition() {
        let mut out = Vec::new();
        write_plain_error(
            &mut out,
            "z",
            "b.example",
            "a.example",
            DefinedCondition::ServiceUnavailable,
            ErrorType::Cancel,
        );
        match classify(parse(&out).unwrap(), None, 10) {
            Some((id, Iq::Failed(c))) => {
                assert_eq!(id, "z");
                assert_eq!(c, "service-unavailable");
            }
            other => panic!("{other:?}"),
        }
        // A get without exactly one child is no IQ request we serve.
        let e = parse(b"<iq type='get' id='two' from='a'><ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/></iq>").unwrap();
        assert!(matches!(classify(e, None, 10), Some((_, Iq::Unsupported))));
        // No type: not an IQ at all.
        let e = parse(b"<iq id='none'/>").unwrap();
        assert!(classify(e, None, 10).is_none());
    }

    /// `bytes` read by the hot path (which must take it, from `a.example`) and by the DOM.
    fn hot_and_dom(bytes: &[u8], max: usize) -> (String, String) {
        let Some(Hot::Iq { from, to, id, iq }) = read_hot(bytes, max) else {
            panic!("not taken: {}", String::from_utf8_lossy(bytes))
        };
        let el = parse(bytes).unwrap();
        assert_eq!(Some(from.as_str()), el.attr("from"));
        assert_eq!(to.as_deref(), el.attr("to"));
        let dom = format!("{:?}", classify(el, None, max));
        (format!("{:?}", Some((id, iq))), dom)
    }

    #[test]
    fn the_hot_path_reads_our_writer_output_as_the_dom_does() {
        let max = 30;
        for n in [0, 1, 2, 3, 4, 29, 30, 31, 32, 60] {
            let t = transmit(vec![Bytes::from(
                (0..n).map(|i| i as u8).collect::<Vec<_>>(),
            )]);
            let mut out = Vec::new();
            write_request(&mut out, "m1", "a.example", "b.example", &t);
            let (hot, dom) = hot_and_dom(&out, max);
            assert_eq!(hot, dom, "{n} bytes");
            let tag = if n <= max { "Request(Ok(" } else { "TooLarge" };
            assert!(hot.contains(tag), "{n}: {hot}");
            for status in [Status::Ok, Status::Created] {
                let mut r = Response::new(status, Bytes::from(vec![9u8; n]));
                r.next_seq = Some(3);
                r.next_inc = (n % 2 == 0).then_some(u64::MAX);
                r.retry_after = (n % 3 == 0).then_some(Duration::from_millis(n as u64));
                let mut out = Vec::new();
                write_answer(&mut out, "m2", "b.example", "a.example", &r);
                let (hot, dom) = hot_and_dom(&out, max);
                assert_eq!(hot, dom, "{status:?} {n}");
                assert!(hot.contains("Answer("), "{hot}");
            }
        }
    }

    #[test]
    fn the_hot_path_reads_hand_written_variants_as_the_dom_does_or_leaves_them() {
        let iq =
            |attrs: &str, mimi: &str, text: &str| format!("<iq {attrs}><{mimi}>{text}</mimi></iq>");
        let set = "type='set' id='1' from='a.example'";
        let m = "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t' seq='5'";
        let taken = [
            iq(set, m, "QUJD"),
            iq(
                "from=\"a.example\" id=\"1\" type=\"set\" to='b.example' xmlns='jabber:component:accept'",
                "mimi seq=\"5\" target=\"t&amp;u&gt;&lt;&quot;&apos;\" endpoint=\"notify\" xmlns=\"urn:mimi-relay:0\"",
                "QUJD",
            ),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target=\"'>\"", "QUJD"),
            iq(set, "mimi\n  xmlns = 'urn:mimi-relay:0'\tendpoint='notify' target='t' ", "\r\n  QUJD\r\n"),
            iq(set, m, "QU JD"),
            iq(set, m, "QUJDREVG\r\nSGlqaw"),
            iq(set, m, "QUJ"),
            iq(set, m, "Q==="),
            iq(set, m, " \n "),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='nope' target='t'", "QUJD"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t' seq='x'", "QUJD"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify'", "QUJD"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t' inc='1'", "QUJD"),
            iq("type='result' id='1' from='a.example'", "mimi xmlns='urn:mimi-relay:0' status='201' next-seq='2'", "QUJD"),
            iq("type='result' id='1' from='a.example'", "mimi xmlns='urn:mimi-relay:0'", "QUJD"),
            iq("type='result' id='1' from='a.example'", "mimi xmlns='urn:mimi-relay:0' status='999'", ""),
            iq("type='result' id='' from='a.example'", "mimi xmlns='urn:mimi-relay:0' status='425' next-seq='-1'", ""),
            "<iq type='result' id='2' from='a.example'><mimi xmlns='urn:mimi-relay:0' status='200'/></iq>".to_owned(),
        ];
        for case in &taken {
            let (hot, dom) = hot_and_dom(case.as_bytes(), 6);
            assert_eq!(hot, dom, "{case}");
        }
        // Shapes left to the DOM, which reads them (or refuses them) on its own.
        for case in [
            iq(set, m, "QU&#74;D"),
            iq(set, m, "QUJD&amp;"),
            iq(set, m, "<x/>QUJD"),
            iq("type='get' id='1' from='a.example'", m, "QUJD"),
            iq("type='error' id='1' from='a.example'", m, "QUJD"),
            iq("type='set' id='1'", m, "QUJD"),
            iq("type='set' from='a.example'", m, "QUJD"),
            iq("type='set' id='1' from='a.example' xml:lang='en'", m, "QUJD"),
            iq("type='set' id='1' from='a.example' xmlns='jabber:client'", m, "QUJD"),
            iq("type='set' id='1' from='a.example' id='2'", m, "QUJD"),
            iq("type='set' id='1' from='a.example' lang='en'", m, "QUJD"),
            iq(set, "mimi endpoint='notify' target='t'", "QUJD"),
            iq(set, "mimi xmlns='urn:other' endpoint='notify' target='t'", "QUJD"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t' status='1'", "QUJD"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='a\tb'", "QUJD"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='\u{e9}'", "QUJD"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='&#65;'", "QUJD"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='&bogus;'", "QUJD"),
            iq(set, "mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t'target='u'", "QUJD"),
            "<iq type='set' id='1' from='a.example'><m:mimi xmlns:m='urn:mimi-relay:0' endpoint='notify' target='t'>QUJD</m:mimi></iq>".to_owned(),
            "<iq type='set' id='1' from='a.example'> <mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t'>QUJD</mimi></iq>".to_owned(),
            "<iq type='set' id='1' from='a.example'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t'>QUJD</mimi></iq >".to_owned(),
            "<iq type='set' id='1' from='a.example'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t'>QUJD</mimi ></iq>".to_owned(),
            "<iq type='set' id='1' from='a.example'><mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='t'>QUJD</mimi><x/></iq>".to_owned(),
            "<iq type='set' id='1' from='a.example'/>".to_owned(),
            "<message from='a.example'><mimi xmlns='urn:mimi-relay:0'>QUJD</mimi></message>".to_owned(),
            "<r xmlns='urn:xmpp:sm:3' h='1'/>".to_owned(),
            "<r xmlns='urn:xmpp:sm:2'/>".to_owned(),
            "<r xmlns='urn:xmpp:sm:3'></r>".to_owned(),
            "<a xmlns='urn:xmpp:sm:3' h='+1'/>".to_owned(),
            "<a xmlns='urn:xmpp:sm:3' h=''/>".to_owned(),
            "<a xmlns='urn:xmpp:sm:3' h='4294967296'/>".to_owned(),
            "<a xmlns='urn:xmpp:sm:3'/>".to_owned(),
        ] {
            assert!(read_hot(case.as_bytes(), 6).is_none(), "taken: {case}");
        }
        assert!(matches!(
            read_hot(b"<r xmlns='urn:xmpp:sm:3'/>", 6),
            Some(Hot::AckRequest)
        ));
        assert!(matches!(
            read_hot(b"<a h=\"4294967295\" xmlns=\"urn:xmpp:sm:3\" />", 6),
            Some(Hot::Ack(u32::MAX))
        ));
        let mut out = Vec::new();
        write_ack(&mut out, 7);
        write_ack_request(&mut out);
        let text = String::from_utf8(out).unwrap();
        let (a, r) = text.split_at(text.find("<r").unwrap());
        assert!(parse(a.as_bytes()).unwrap().is("a", NS_SM), "{a}");
        assert_eq!(
            xmpp_parsers::sm::A::try_from(parse(a.as_bytes()).unwrap())
                .unwrap()
                .h,
            7
        );
        assert!(matches!(read_hot(a.as_bytes(), 6), Some(Hot::Ack(7))));
        assert!(parse(r.as_bytes()).unwrap().is("r", NS_SM), "{r}");
    }

    #[test]
    fn the_direct_writer_writes_what_the_typed_stanzas_wrote() {
        // The old writer, through minidom, for comparison: the same elements on the wire.
        let typed_request = |id: &str, from: &str, to: &str, t: &Transmit| {
            let mut out = Vec::new();
            let iq = XmppIq::Set {
                from: jid(from),
                to: jid(to),
                id: id.to_owned(),
                payload: mimi_request(t),
            };
            write(&mut out, iq);
            parse(&out).unwrap()
        };
        for body in [
            vec![],
            vec![Bytes::from_static(b"x")],
            vec![Bytes::from(vec![1u8; 1000]), Bytes::from_static(b"yz")],
        ] {
            let mut t = transmit(body);
            for (from, to) in [
                ("a.example", "b.example"),
                ("relay.a.localhost", "not a jid@@"),
            ] {
                let mut out = Vec::new();
                write_request(&mut out, "m'1<", from, to, &t);
                assert_eq!(parse(&out).unwrap(), typed_request("m'1<", from, to, &t));
                t.seq = None;
                t.lineage = None;
                t.target = "\"&<>'".into();
            }
        }
        for status in [
            Status::Ok,
            Status::Created,
            Status::OutOfOrder,
            Status::TooLarge,
        ] {
            for body in [Bytes::new(), Bytes::from_static(b"\x00\xffabc")] {
                let mut r = Response::new(status, body);
                r.next_seq = Some(9);
                r.retry_after = Some(Duration::from_millis(1500));
                let mut out = Vec::new();
                write_answer(&mut out, "m2", "b.example", "a.example", &r);
                let (from, to) = (jid("b.example"), jid("a.example"));
                let typed = if status.is_success() {
                    XmppIq::Result {
                        from,
                        to,
                        id: "m2".into(),
                        payload: Some(mimi_answer(&r)),
                    }
                } else {
                    let (cond, kind) = condition(status);
                    XmppIq::Error {
                        from,
                        to,
                        id: "m2".into(),
                        error: stanza_error(cond, kind, Some(mimi_answer(&r))),
                        payload: None,
                    }
                };
                let mut old = Vec::new();
                write(&mut old, typed);
                assert_eq!(parse(&out).unwrap(), parse(&old).unwrap(), "{status:?}");
            }
        }
    }
}
