//! Splits an XML stream into its header and its top-level elements without parsing them, so
//! that size and depth are bounded before anything is parsed or allocated beyond them.
//!
//! Sans-IO: [`Scanner::push`] the bytes as they arrive, then [`Scanner::poll_item`] until it says
//! it needs more. The scanner only tracks tags, quotes and depth; well-formedness of an
//! element's inside is checked by the parser once the element is whole. RFC 6120 section 11.1
//! restricts what an XMPP stream may hold: comments, processing instructions and DTDs are
//! refused here (`<!` and `<?` after the header).
//!
//! Bounds, all checked byte by byte as the bytes arrive:
//! - every byte is examined once: the scan position and state survive between reads, so the
//!   work is linear in the input however it is cut;
//! - a stanza nests at most `max_depth` elements (the stanza itself is depth 1): a deeper one
//!   is [`ScanError::TooDeep`] before any DOM is built (a recursive parser would overflow the
//!   stack on it);
//! - one tag (start or end, attributes included) holds at most [`MAX_TAG`] bytes, so an
//!   unterminated `</...` or `<a ...` is refused instead of being buffered forever;
//! - a top-level element over `max` bytes is skipped unparsed with only its head kept.

use bytes::{Buf, Bytes, BytesMut};

/// How much of an oversize element's start tag is kept to answer it (its `id`), and the
/// largest stream header.
const MAX_HEAD: usize = 4096;
/// The longest tag, `<` to `>`; longer is refused rather than buffered.
pub const MAX_TAG: usize = 16 * 1024;
/// The nesting depth [`Scanner::new`] allows (the `max_xml_depth` default).
pub const DEFAULT_MAX_DEPTH: usize = 32;

/// One unit of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The opening `<stream:stream ...>` tag, rewritten as an empty element (`.../>`) so that
    /// it parses on its own.
    Header(Bytes),
    /// One whole top-level element, exactly as received.
    Element(Bytes),
    /// A top-level element over the limit, skipped unparsed. `head` is its start tag as an
    /// empty element, if the start tag fit in the first bytes.
    TooLarge { head: Option<Bytes>, len: usize },
    /// `</stream:stream>`: the peer closed its stream.
    End,
}

/// The stream is not XML an XMPP peer may send; it cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    #[error("not well-formed: {0}")]
    NotWellFormed(&'static str),
    #[error("restricted xml (comment, processing instruction or dtd)")]
    Restricted,
    #[error("stream header over {0} bytes")]
    HeaderTooLarge(usize),
    #[error("elements nested over {0} deep")]
    TooDeep(usize),
    #[error("tag over {0} bytes")]
    TagTooLong(usize),
}

impl ScanError {
    /// The RFC 6120 section 4.9.3 stream error condition that answers it: a bound the peer
    /// went over is a `policy-violation` (4.9.3.18).
    pub fn condition(&self) -> &'static str {
        match self {
            ScanError::NotWellFormed(_) => "not-well-formed",
            ScanError::Restricted => "restricted-xml",
            ScanError::HeaderTooLarge(_) | ScanError::TooDeep(_) | ScanError::TagTooLong(_) => {
                "policy-violation"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the stream header (an XML declaration may come first).
    Prolog,
    /// After the header: between top-level elements at depth 0, inside one above.
    Body,
    /// After `</stream:stream>`.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagKind {
    Start,
    End,
    /// `<?...?>`, allowed in the prolog only (the XML declaration).
    Decl,
}

/// Where the byte scan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Character data (or whitespace between elements).
    Text,
    /// Just after `<`: the next byte says what kind of tag this is.
    Open,
    /// Inside a tag, `len` bytes long so far.
    Tag {
        kind: TagKind,
        quote: Option<u8>,
        /// The last non-space byte was `/` (an empty element so far).
        slash: bool,
        len: usize,
    },
}

/// The incremental splitter.
#[derive(Debug)]
pub struct Scanner {
    /// The current item's bytes from `start`; everything before `start` is whitespace already
    /// scanned.
    buf: BytesMut,
    start: usize,
    /// How far into `buf` has been scanned; never moves back.
    pos: usize,
    phase: Phase,
    lex: Lex,
    depth: usize,
    /// Where the first start tag of the current element ended (exclusive, from `start`).
    head_end: Option<usize>,
    max: usize,
    max_depth: usize,
    /// Skipping an oversize element: the bytes dropped so far, and its head if kept.
    skipping: Option<(usize, Option<Bytes>)>,
    /// Bytes examined in all, for the linearity test.
    examined: u64,
}

impl Scanner {
    /// A scanner refusing top-level elements over `max` bytes, nested at most
    /// [`DEFAULT_MAX_DEPTH`] deep.
    pub fn new(max: usize) -> Self {
        Scanner {
            buf: BytesMut::new(),
            start: 0,
            pos: 0,
            phase: Phase::Prolog,
            lex: Lex::Text,
            depth: 0,
            head_end: None,
            max,
            max_depth: DEFAULT_MAX_DEPTH,
            skipping: None,
            examined: 0,
        }
    }

    /// The same, refusing elements nested over `max_depth` deep (at least 1).
    pub fn with_max_depth(mut self, max_depth: usize) -> Self {
        self.max_depth = max_depth.max(1);
        self
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer [`Scanner::push`] appends to, for a reader to read into directly (saving a
    /// copy); with room for at least `additional` more bytes. Only append to it.
    pub(crate) fn read_into(&mut self, additional: usize) -> &mut BytesMut {
        self.buf.reserve(additional);
        &mut self.buf
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether an item has been started and not finished (for a per-item deadline).
    pub fn is_partial(&self) -> bool {
        self.lex != Lex::Text || self.depth > 0 || self.skipping.is_some()
    }

    /// The next item, `Ok(None)` if more bytes are needed.
    pub fn poll_item(&mut self) -> Result<Option<Item>, ScanError> {
        loop {
            if self.phase == Phase::Done {
                return Ok(None);
            }
            if self.lex == Lex::Text && self.depth > 0 {
                // Character data inside an element (a MIMI stanza's base64, mostly): only a
                // `<` changes the state, so the bytes before one are passed over at once.
                let rest = self.buf.get(self.pos..).unwrap_or_default();
                let skip = rest.iter().position(|&c| c == b'<').unwrap_or(rest.len());
                self.pos += skip;
                self.examined += skip as u64;
            }
            let Some(&b) = self.buf.get(self.pos) else {
                self.compact();
                return Ok(None);
            };
            self.examined += 1;
            let i = self.pos;
            self.pos += 1;
            if let Some(item) = self.step(b, i)? {
                return Ok(Some(item));
            }
        }
    }

    /// Drops what is no longer needed once the buffered bytes are all scanned: whitespace
    /// before the next item, and the scanned part of an element being skipped.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.advance(self.start);
            self.pos -= self.start;
            self.start = 0;
        }
        let taken = self.pos;
        if self.phase == Phase::Body && self.depth > 0 && taken > 0 {
            if let Some((dropped, _)) = &mut self.skipping {
                *dropped += taken;
            } else if taken > self.max {
                let head = self.head();
                self.skipping = Some((taken, head));
            } else {
                return;
            }
            self.buf.advance(taken);
            self.pos = 0;
            self.head_end = None;
        }
    }

    /// Scans byte `b` at index `i`; `Some` when it completes an item.
    fn step(&mut self, b: u8, i: usize) -> Result<Option<Item>, ScanError> {
        match self.lex {
            Lex::Text => {
                if b == b'<' {
                    if self.depth == 0 {
                        // A new item starts here; the whitespace before it goes.
                        self.start = i;
                    }
                    self.lex = Lex::Open;
                } else if self.depth == 0 {
                    if !b.is_ascii_whitespace() {
                        return Err(ScanError::NotWellFormed(match self.phase {
                            Phase::Prolog => "stream does not start with a tag",
                            _ => "text outside any element",
                        }));
                    }
                    self.start = i + 1;
                }
                Ok(None)
            }
            Lex::Open => {
                let kind = match (b, self.phase) {
                    (b'!', _) => return Err(ScanError::Restricted),
                    (b'?', Phase::Prolog) => TagKind::Decl,
                    (b'?', _) => return Err(ScanError::Restricted),
                    (b'/', _) => TagKind::End,
                    (b'<' | b'>', _) => return Err(ScanError::NotWellFormed("empty tag")),
                    _ => TagKind::Start,
                };
                self.lex = Lex::Tag {
                    kind,
                    quote: None,
                    slash: false,
                    len: 2,
                };
                Ok(None)
            }
            Lex::Tag {
                kind,
                quote,
                slash,
                len,
            } => {
                let len = len + 1;
                let limit = if self.phase == Phase::Prolog {
                    MAX_HEAD
                } else {
                    MAX_TAG
                };
                if len > limit {
                    return Err(if self.phase == Phase::Prolog {
                        ScanError::HeaderTooLarge(MAX_HEAD)
                    } else {
                        ScanError::TagTooLong(MAX_TAG)
                    });
                }
                let (quote, slash) = match (quote, b) {
                    (Some(q), b) if b == q => (None, false),
                    (Some(q), _) => (Some(q), false),
                    (None, b'"' | b'\'') => (Some(b), false),
                    (None, b'>') => {
                        self.lex = Lex::Text;
                        return self.tag_end(kind, slash, i + 1);
                    }
                    (None, b'<') => return Err(ScanError::NotWellFormed("'<' inside a tag")),
                    (None, b'/') => (None, true),
                    (None, b) if b.is_ascii_whitespace() => (None, slash),
                    (None, _) => (None, false),
                };
                self.lex = Lex::Tag {
                    kind,
                    quote,
                    slash,
                    len,
                };
                Ok(None)
            }
        }
    }

    /// A tag ended just before `end` (exclusive index into `buf`).
    fn tag_end(
        &mut self,
        kind: TagKind,
        empty: bool,
        end: usize,
    ) -> Result<Option<Item>, ScanError> {
        if self.phase == Phase::Prolog {
            return self.prolog_tag(kind, empty, end);
        }
        match kind {
            TagKind::Decl => return Err(ScanError::Restricted),
            TagKind::End if self.depth == 0 => {
                // `</stream:stream>` (any end tag at the top closes the stream).
                self.buf.advance(end);
                self.pos = 0;
                self.start = 0;
                self.phase = Phase::Done;
                return Ok(Some(Item::End));
            }
            TagKind::End => self.depth -= 1,
            // An empty element is one level deeper too.
            TagKind::Start if empty => {
                if self.depth >= self.max_depth {
                    return Err(ScanError::TooDeep(self.max_depth));
                }
            }
            TagKind::Start => {
                self.depth += 1;
                if self.depth > self.max_depth {
                    return Err(ScanError::TooDeep(self.max_depth));
                }
            }
        }
        if self.head_end.is_none() && self.skipping.is_none() {
            self.head_end = Some(end - self.start);
        }
        if self.depth > 0 {
            return Ok(None);
        }
        // The top-level element is whole.
        let head_end = self.head_end.take();
        let item = if let Some((dropped, head)) = self.skipping.take() {
            self.buf.advance(end);
            Item::TooLarge {
                head,
                len: dropped + end,
            }
        } else {
            self.buf.advance(self.start);
            let len = end - self.start;
            self.start = 0;
            if len > self.max {
                let head = head_end.and_then(|e| self.head_at(e));
                self.buf.advance(len);
                Item::TooLarge { head, len }
            } else {
                Item::Element(self.buf.split_to(len).freeze())
            }
        };
        self.pos = 0;
        self.start = 0;
        Ok(Some(item))
    }

    fn prolog_tag(
        &mut self,
        kind: TagKind,
        empty: bool,
        end: usize,
    ) -> Result<Option<Item>, ScanError> {
        let tag = &self.buf[self.start..end];
        let item = match kind {
            TagKind::Decl if tag.starts_with(b"<?xml") && tag.ends_with(b"?>") => None,
            TagKind::Decl => return Err(ScanError::Restricted),
            TagKind::End => {
                return Err(ScanError::NotWellFormed("stream header is not an open tag"));
            }
            TagKind::Start if empty => {
                return Err(ScanError::NotWellFormed("stream header is not an open tag"));
            }
            TagKind::Start => {
                let mut header = BytesMut::with_capacity(tag.len() + 1);
                header.extend_from_slice(&tag[..tag.len() - 1]);
                header.extend_from_slice(b"/>");
                self.phase = Phase::Body;
                Some(Item::Header(header.freeze()))
            }
        };
        self.buf.advance(end);
        self.pos = 0;
        self.start = 0;
        Ok(item)
    }

    /// The current element's start tag as an empty element, if it is complete and small.
    fn head(&self) -> Option<Bytes> {
        self.head_at(self.head_end?)
    }

    /// The element's first `end` bytes (its start tag) as an empty element, if small.
    fn head_at(&self, end: usize) -> Option<Bytes> {
        if !(2..=MAX_HEAD).contains(&end) {
            return None;
        }
        let tag = self.buf.get(self.start..self.start + end)?;
        let mut head = BytesMut::with_capacity(end + 1);
        if tag.ends_with(b"/>") {
            head.extend_from_slice(tag);
        } else {
            head.extend_from_slice(&tag[..end - 1]);
            head.extend_from_slice(b"/>");
        }
        Some(head.freeze())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn all(s: &mut Scanner) -> Vec<Item> {
        let mut v = Vec::new();
        while let Some(item) = s.poll_item().unwrap() {
            v.push(item);
        }
        v
    }

    const HEAD: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='a'>";

    #[test]
    fn splits_header_elements_and_end_at_any_cut() {
        let text = format!(
            "{HEAD}<iq id='1' a='x>y'><mimi xmlns='u'>QUJD</mimi></iq> <r xmlns='urn:xmpp:sm:3'/><a h=\"3\"/></stream:stream>"
        );
        for cut in 0..text.len() {
            let mut s = Scanner::new(1000);
            s.push(&text.as_bytes()[..cut]);
            let mut items = all(&mut s);
            s.push(&text.as_bytes()[cut..]);
            items.extend(all(&mut s));
            assert_eq!(items.len(), 5, "cut at {cut}: {items:?}");
            assert!(matches!(&items[0], Item::Header(h) if h.ends_with(b"to='a'/>")));
            assert_eq!(
                items[1],
                Item::Element(Bytes::from_static(
                    b"<iq id='1' a='x>y'><mimi xmlns='u'>QUJD</mimi></iq>"
                ))
            );
            assert_eq!(
                items[2],
                Item::Element(Bytes::from_static(b"<r xmlns='urn:xmpp:sm:3'/>"))
            );
            assert_eq!(items[3], Item::Element(Bytes::from_static(b"<a h=\"3\"/>")));
            assert_eq!(items[4], Item::End);
        }
    }

    #[test]
    fn oversize_element_is_skipped_with_its_head_and_the_next_one_survives() {
        let big = "A".repeat(5000);
        let text = format!("{HEAD}<iq id='7' type='set'><m>{big}</m></iq><iq id='8'/>");
        let mut s = Scanner::new(1000);
        let mut items = Vec::new();
        for chunk in text.as_bytes().chunks(333) {
            s.push(chunk);
            items.extend(all(&mut s));
            assert!(s.buffered() < 1400, "buffered {}", s.buffered());
        }
        assert_eq!(items.len(), 3, "{items:?}");
        match &items[1] {
            Item::TooLarge { head, len } => {
                assert_eq!(head.as_deref(), Some(&b"<iq id='7' type='set'/>"[..]));
                assert!(*len > 5000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(items[2], Item::Element(Bytes::from_static(b"<iq id='8'/>")));
    }

    #[test]
    fn refuses_comments_and_stray_text() {
        let mut s = Scanner::new(1000);
        s.push(format!("{HEAD}<!-- hi -->").as_bytes());
        assert!(matches!(s.poll_item(), Ok(Some(Item::Header(_)))));
        assert_eq!(s.poll_item(), Err(ScanError::Restricted));
        let mut s = Scanner::new(1000);
        s.push(format!("{HEAD}hello<iq/>").as_bytes());
        assert!(matches!(s.poll_item(), Ok(Some(Item::Header(_)))));
        assert!(matches!(s.poll_item(), Err(ScanError::NotWellFormed(_))));
    }

    /// Feeds `bytes` in `chunk`-sized reads, polling after each; the items, or the first error
    /// with how many bytes had been pushed when it came.
    fn feed(s: &mut Scanner, bytes: &[u8], chunk: usize) -> Result<Vec<Item>, (ScanError, usize)> {
        let mut items = Vec::new();
        let mut pushed = 0;
        for c in bytes.chunks(chunk) {
            s.push(c);
            pushed += c.len();
            loop {
                match s.poll_item() {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) => break,
                    Err(e) => return Err((e, pushed)),
                }
            }
        }
        Ok(items)
    }

    #[test]
    fn a_deep_stanza_is_refused_at_the_first_level_too_many() {
        // The attack: 150,000 nested elements, about 1 MB, under the size limit.
        let text = format!("{HEAD}<iq>{}", "<a>".repeat(150_000));
        let mut s = Scanner::new(1 << 22);
        let (e, pushed) = feed(&mut s, text.as_bytes(), 64 * 1024).unwrap_err();
        assert_eq!(e, ScanError::TooDeep(DEFAULT_MAX_DEPTH));
        assert_eq!(e.condition(), "policy-violation");
        assert_eq!(pushed, 64 * 1024, "refused in the first read");
        assert!(
            s.examined < (HEAD.len() + 200) as u64,
            "stopped at the bound: {}",
            s.examined
        );
        // Exactly at the bound is fine, and the bound is configurable.
        let ok = format!("{HEAD}{}{}", "<a>".repeat(32), "</a>".repeat(32));
        let items = feed(&mut Scanner::new(1 << 20), ok.as_bytes(), 7).unwrap();
        assert!(matches!(&items[1], Item::Element(e) if e.len() == 32 * 7));
        let mut s = Scanner::new(1 << 20).with_max_depth(4);
        let deep = format!("{HEAD}<a><b><c><d/></c></b></a><a><b><c><d><e/>");
        let (e, _) = feed(&mut s, deep.as_bytes(), 3).unwrap_err();
        assert_eq!(e, ScanError::TooDeep(4));
    }

    #[test]
    fn a_deep_stanza_over_the_size_limit_is_refused_too() {
        // Skipping an oversize element still counts its depth.
        let text = format!("{HEAD}<iq id='1'>{}{}", "x".repeat(2000), "<a>".repeat(100));
        let (e, _) = feed(&mut Scanner::new(1000), text.as_bytes(), 100).unwrap_err();
        assert_eq!(e, ScanError::TooDeep(DEFAULT_MAX_DEPTH));
    }

    #[test]
    fn an_unterminated_end_tag_is_refused_not_buffered() {
        // Inside a stanza and at the top level, read one byte at a time: the tag bound ends it
        // long before the stanza bound, and every byte is examined once (no rescans).
        let name = "n".repeat(40_000);
        for text in [format!("{HEAD}<iq></{name}"), format!("{HEAD}</{name}")] {
            let mut s = Scanner::new(1 << 20);
            let (e, pushed) = feed(&mut s, text.as_bytes(), 1).unwrap_err();
            assert_eq!(e, ScanError::TagTooLong(MAX_TAG));
            assert_eq!(e.condition(), "policy-violation");
            assert!(pushed < HEAD.len() + MAX_TAG + 8, "{pushed}");
            assert_eq!(s.examined, pushed as u64);
        }
        // A start tag that never ends, likewise.
        let text = format!("{HEAD}<iq a='{name}");
        let (e, _) = feed(&mut Scanner::new(1 << 20), text.as_bytes(), 1000).unwrap_err();
        assert_eq!(e, ScanError::TagTooLong(MAX_TAG));
    }

    #[test]
    fn every_byte_is_examined_once_however_the_stream_is_cut() {
        let big = "QUFB".repeat(10_000);
        let mut text = format!("{HEAD}\n");
        for i in 0..200 {
            text.push_str(&format!(
                "<iq id='{i}' type='set'><mimi xmlns='u' a=\"<'>\">AAAA</mimi></iq>\n <r/>"
            ));
        }
        text.push_str(&format!("<iq id='big'><m>{big}</m></iq></stream:stream>"));
        for chunk in [1, 2, 3, 61, 4096, text.len()] {
            let mut s = Scanner::new(20_000);
            let items = feed(&mut s, text.as_bytes(), chunk).unwrap();
            assert_eq!(items.len(), 1 + 400 + 2, "chunk {chunk}");
            assert!(matches!(items[401], Item::TooLarge { len, .. } if len > 40_000));
            assert_eq!(items[402], Item::End);
            assert_eq!(s.examined, text.len() as u64, "chunk {chunk}");
            assert!(!s.is_partial());
        }
    }

    #[test]
    fn partial_items_are_reported_for_the_frame_deadline() {
        let mut s = Scanner::new(1000);
        s.push(HEAD.as_bytes());
        assert!(matches!(s.poll_item(), Ok(Some(Item::Header(_)))));
        assert!(!s.is_partial());
        s.push(b"  ");
        assert_eq!(s.poll_item(), Ok(None));
        assert!(!s.is_partial());
        assert_eq!(s.buffered(), 0);
        s.push(b"</");
        assert_eq!(s.poll_item(), Ok(None));
        assert!(s.is_partial());
    }

    #[test]
    fn the_header_is_bounded_and_must_be_an_open_tag() {
        let mut s = Scanner::new(1000);
        s.push(format!("<stream:stream a='{}", "x".repeat(5000)).as_bytes());
        assert_eq!(s.poll_item(), Err(ScanError::HeaderTooLarge(MAX_HEAD)));
        let mut s = Scanner::new(1000);
        s.push(b"<stream:stream/>");
        assert!(matches!(s.poll_item(), Err(ScanError::NotWellFormed(_))));
        let mut s = Scanner::new(1000);
        s.push(b"<?php ?>");
        assert_eq!(s.poll_item(), Err(ScanError::Restricted));
    }
}
