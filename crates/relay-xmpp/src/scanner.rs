//! Splits an XML stream into its header and its top-level elements without parsing them, so
//! that the size limit is enforced before anything is parsed or allocated beyond it.
//!
//! Sans-IO: [`Scanner::push`] the bytes as they arrive, then [`Scanner::poll_item`] until it says
//! it needs more. The scanner only tracks tags, quotes and depth; well-formedness of an
//! element's inside is checked by the parser once the element is whole. RFC 6120 section 11.1
//! restricts what an XMPP stream may hold: comments, processing instructions and DTDs are
//! refused here (`<!` and `<?` after the header).

use bytes::{Buf, Bytes, BytesMut};

/// How much of an oversize element's start tag is kept to answer it (its `id`).
const MAX_HEAD: usize = 4096;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the stream header (an XML declaration may come first).
    Prolog,
    /// Between top-level elements.
    Top,
    /// Inside a top-level element.
    Element,
    /// After `</stream:stream>`.
    Done,
}

/// The incremental splitter.
#[derive(Debug)]
pub struct Scanner {
    buf: BytesMut,
    /// How far into `buf` has been scanned.
    pos: usize,
    phase: Phase,
    depth: usize,
    /// Inside a tag: the quote character we are inside, if any.
    quote: Option<u8>,
    in_tag: bool,
    /// The current tag is an end tag (`</...`).
    end_tag: bool,
    /// The last non-space byte of the current tag was `/`.
    slash: bool,
    /// Where the first start tag of the current element ended (exclusive).
    head_end: Option<usize>,
    max: usize,
    /// Skipping an oversize element: the bytes seen so far, and its head if kept.
    skipping: Option<(usize, Option<Bytes>)>,
}

impl Scanner {
    /// A scanner refusing top-level elements over `max` bytes.
    pub fn new(max: usize) -> Self {
        Scanner {
            buf: BytesMut::new(),
            pos: 0,
            phase: Phase::Prolog,
            depth: 0,
            quote: None,
            in_tag: false,
            end_tag: false,
            slash: false,
            head_end: None,
            max,
            skipping: None,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next item, `Ok(None)` if more bytes are needed.
    pub fn poll_item(&mut self) -> Result<Option<Item>, ScanError> {
        loop {
            match self.phase {
                Phase::Done => return Ok(None),
                Phase::Prolog => return self.prolog(),
                Phase::Top => {
                    // Skip whitespace between elements.
                    let skip = self
                        .buf
                        .iter()
                        .take_while(|b| b.is_ascii_whitespace())
                        .count();
                    self.buf.advance(skip);
                    self.pos = 0;
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    match (self.buf[0], self.buf[1]) {
                        (b'<', b'/') => {
                            let Some(end) = self.buf.iter().position(|&b| b == b'>') else {
                                return Ok(None);
                            };
                            self.buf.advance(end + 1);
                            self.phase = Phase::Done;
                            return Ok(Some(Item::End));
                        }
                        (b'<', b'!' | b'?') => return Err(ScanError::Restricted),
                        (b'<', _) => {
                            self.phase = Phase::Element;
                            self.depth = 0;
                            self.head_end = None;
                        }
                        _ => return Err(ScanError::NotWellFormed("text outside any element")),
                    }
                }
                Phase::Element => return self.element(),
            }
        }
    }

    fn prolog(&mut self) -> Result<Option<Item>, ScanError> {
        loop {
            let skip = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            self.buf.advance(skip);
            if self.buf.len() < 2 {
                return Ok(None);
            }
            if self.buf[0] != b'<' {
                return Err(ScanError::NotWellFormed("stream does not start with a tag"));
            }
            // The header's attribute values cannot hold `>` in any sane stream; quotes are
            // still honoured.
            let Some(end) = tag_end(&self.buf) else {
                if self.buf.len() > MAX_HEAD {
                    return Err(ScanError::HeaderTooLarge(MAX_HEAD));
                }
                return Ok(None);
            };
            let tag = self.buf.split_to(end + 1).freeze();
            if tag.starts_with(b"<?xml") && tag.ends_with(b"?>") {
                continue;
            }
            if tag.starts_with(b"<!") || tag.starts_with(b"<?") {
                return Err(ScanError::Restricted);
            }
            if tag.ends_with(b"/>") || tag.starts_with(b"</") {
                return Err(ScanError::NotWellFormed("stream header is not an open tag"));
            }
            let mut header = BytesMut::with_capacity(tag.len() + 1);
            header.extend_from_slice(&tag[..tag.len() - 1]);
            header.extend_from_slice(b"/>");
            self.phase = Phase::Top;
            return Ok(Some(Item::Header(header.freeze())));
        }
    }

    fn element(&mut self) -> Result<Option<Item>, ScanError> {
        let mut i = self.pos;
        let buf = &self.buf[..];
        let mut finished = None;
        while i < buf.len() {
            let b = buf[i];
            if self.in_tag {
                if let Some(q) = self.quote {
                    if b == q {
                        self.quote = None;
                    }
                } else {
                    match b {
                        b'"' | b'\'' => {
                            self.quote = Some(b);
                            self.slash = false;
                        }
                        b'>' => {
                            self.in_tag = false;
                            if self.end_tag {
                                self.depth = self
                                    .depth
                                    .checked_sub(1)
                                    .ok_or(ScanError::NotWellFormed("unbalanced end tag"))?;
                            } else if !self.slash {
                                self.depth += 1;
                            }
                            if self.head_end.is_none() {
                                self.head_end = Some(i + 1);
                            }
                            if self.depth == 0 {
                                finished = Some(i + 1);
                                break;
                            }
                        }
                        b'<' => return Err(ScanError::NotWellFormed("'<' inside a tag")),
                        b'/' => self.slash = true,
                        b if b.is_ascii_whitespace() => {}
                        _ => self.slash = false,
                    }
                }
            } else if b == b'<' {
                match buf.get(i + 1) {
                    None => break, // need the next byte to know what this is
                    Some(b'!' | b'?') => return Err(ScanError::Restricted),
                    Some(b'/') => {
                        self.end_tag = true;
                        i += 1;
                    }
                    Some(_) => self.end_tag = false,
                }
                self.in_tag = true;
                self.slash = false;
            }
            i += 1;
        }
        if let Some(end) = finished {
            self.pos = 0;
            self.phase = Phase::Top;
            if let Some((seen, head)) = self.skipping.take() {
                self.buf.advance(end);
                return Ok(Some(Item::TooLarge {
                    head,
                    len: seen + end,
                }));
            }
            if end > self.max {
                let head = self.head();
                self.buf.advance(end);
                return Ok(Some(Item::TooLarge { head, len: end }));
            }
            let element = self.buf.split_to(end).freeze();
            return Ok(Some(Item::Element(element)));
        }
        self.pos = i;
        let seen = self.skipping.as_ref().map_or(0, |s| s.0);
        if self.skipping.is_some() || seen + self.pos > self.max {
            // Over the limit: keep only the head, drop what has been scanned.
            let head = match self.skipping.take() {
                Some((_, head)) => head,
                None => self.head(),
            };
            self.buf.advance(self.pos);
            self.skipping = Some((seen + self.pos, head));
            self.pos = 0;
        }
        Ok(None)
    }

    /// The current element's start tag as an empty element, if it is complete and small.
    fn head(&self) -> Option<Bytes> {
        let end = self.head_end?;
        if !(2..=MAX_HEAD).contains(&end) {
            return None;
        }
        let tag = &self.buf[..end];
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

/// The index of the `>` ending the tag at the start of `buf`, honouring quotes.
fn tag_end(buf: &[u8]) -> Option<usize> {
    let mut quote = None;
    for (i, &b) in buf.iter().enumerate() {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'>' => return Some(i),
            None => {}
        }
    }
    None
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
}
