//! A peer's directory (protocol-06 §5.1): the URL of each endpoint on that peer, read from its
//! `/.well-known/mimi-protocol-directory` instead of assuming our own `/v1/...` layout.
//!
//! Everything here is pure: the peer task fetches the document and keeps the result.

use std::collections::BTreeMap;
use std::time::Duration;

use http::HeaderMap;
use http::header::CACHE_CONTROL;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::ProviderDomain;

use crate::path::encode_target;

/// Largest directory document read; the draft's example is under 1 KiB.
pub(crate) const MAX_DIRECTORY_BYTES: usize = 64 * 1024;
/// Longest URL template taken from a directory.
const MAX_TEMPLATE_LEN: usize = 2048;
/// How long a directory is kept when the peer says nothing (`Cache-Control: max-age`).
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Bounds on what a peer's `max-age` can ask: not a fetch before every request, not forever.
const MIN_TTL: Duration = Duration::from_secs(60);
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where requests for one endpoint go on the peer: `before` + encoded parameter + `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// `Host` / `:authority`: the URL's host (and port, if it names one).
    authority: String,
    before: String,
    after: String,
}

impl Route {
    /// The draft's layout, used for a peer that serves no directory: `/v1/{endpoint}/{param}`.
    pub(crate) fn fallback(peer: &ProviderDomain, endpoint: Endpoint) -> Route {
        Route {
            authority: peer.as_str().to_owned(),
            before: format!("/v1/{}/", endpoint.as_str()),
            after: String::new(),
        }
    }

    pub(crate) fn authority(&self) -> &str {
        &self.authority
    }

    /// The URL requests go to, with `{param}` where the parameter goes, for reports.
    pub(crate) fn template(&self) -> String {
        format!(
            "https://{}{}{{param}}{}",
            self.authority, self.before, self.after
        )
    }

    /// The path (and query) of a request for `target`, percent-encoded as one segment.
    pub(crate) fn path(&self, target: &str) -> String {
        format!("{}{}{}", self.before, encode_target(target), self.after)
    }
}

/// Why a peer's directory gives no usable URL for an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("not listed in the peer's directory")]
    Missing,
    /// An absolute URL on a host other than the peer's domain: we do not follow a directory to
    /// third parties (our mutual TLS authenticates the peer, not whoever it names).
    #[error("directory points to another host ({0})")]
    ForeignHost(String),
    #[error("unusable url template in the peer's directory: {0}")]
    BadTemplate(&'static str),
}

/// The routes read from one directory document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerDirectory {
    routes: BTreeMap<Endpoint, Result<Route, RouteError>>,
}

impl PeerDirectory {
    pub(crate) fn route(&self, endpoint: Endpoint) -> Result<Route, RouteError> {
        self.routes
            .get(&endpoint)
            .cloned()
            .unwrap_or(Err(RouteError::Missing))
    }

    /// Endpoints the directory lists with a usable URL.
    pub(crate) fn usable(&self) -> usize {
        self.routes.values().filter(|r| r.is_ok()).count()
    }
}

/// Reads a directory document. `None` when it is not one (not a JSON object, or an object
/// naming no endpoint): the peer then counts as serving no directory.
pub(crate) fn parse(body: &[u8], peer: &ProviderDomain) -> Option<PeerDirectory> {
    if body.len() > MAX_DIRECTORY_BYTES {
        return None;
    }
    // serde_json bounds nesting (128 levels); the size bound above bounds the rest.
    let doc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    let mut routes = BTreeMap::new();
    for e in Endpoint::ALL {
        match doc.get(e.as_str()) {
            None => {}
            Some(serde_json::Value::String(t)) => {
                routes.insert(e, parse_template(t, peer));
            }
            Some(_) => {
                routes.insert(e, Err(RouteError::BadTemplate("not a string")));
            }
        }
    }
    (!routes.is_empty()).then_some(PeerDirectory { routes })
}

/// One endpoint's URL template: absolute (`https://host[:port]/...`), or relative to the
/// directory's URL, with exactly one variable in its path or query, whatever its name.
fn parse_template(t: &str, peer: &ProviderDomain) -> Result<Route, RouteError> {
    if t.len() > MAX_TEMPLATE_LEN {
        return Err(RouteError::BadTemplate("too long"));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RouteError::BadTemplate("not printable ascii"));
    }
    if t.contains('#') {
        return Err(RouteError::BadTemplate("has a fragment"));
    }
    let open = t.find('{').ok_or(RouteError::BadTemplate("no variable"))?;
    let close = open
        + t[open..]
            .find('}')
            .ok_or(RouteError::BadTemplate("unclosed variable"))?;
    let (pre, name, post) = (&t[..open], &t[open + 1..close], &t[close + 1..]);
    if post.contains(['{', '}']) || pre.contains('}') {
        return Err(RouteError::BadTemplate("more than one variable"));
    }
    // RFC 6570: `{var}` is simple expansion, `{/var}` a path segment led by '/'. Other
    // operators would expand differently; refuse them rather than guess.
    let (slash, name) = match name.strip_prefix('/') {
        Some(n) => (true, n),
        None => (false, name),
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        return Err(RouteError::BadTemplate("unsupported variable"));
    }
    if post
        .split(['?', '/'])
        .skip(1)
        .any(|seg| seg == "." || seg == "..")
    {
        return Err(RouteError::BadTemplate("dot segment after the variable"));
    }

    let (authority, path) = split_reference(pre, peer)?;
    let mut before = remove_dot_segments(&path);
    if slash {
        before.push('/');
    }
    let route = Route {
        authority,
        before,
        after: post.to_owned(),
    };
    // What we send must parse; checked once here with a sample parameter.
    route
        .authority
        .parse::<http::uri::Authority>()
        .map_err(|_| RouteError::BadTemplate("bad host"))?;
    route
        .path("x")
        .parse::<http::uri::PathAndQuery>()
        .map_err(|_| RouteError::BadTemplate("bad path"))?;
    Ok(route)
}

/// The authority and absolute path of the part of a template before its variable.
fn split_reference(pre: &str, peer: &ProviderDomain) -> Result<(String, String), RouteError> {
    let lower = pre.to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &pre["https://".len()..]
    } else if let Some(rest) = pre.strip_prefix("//") {
        rest
    } else if has_scheme(pre) {
        return Err(RouteError::BadTemplate("not an https url"));
    } else if pre.starts_with('/') {
        return Ok((peer.as_str().to_owned(), pre.to_owned()));
    } else {
        // Relative to the directory's own URL, whose last segment it replaces.
        return Ok((peer.as_str().to_owned(), format!("/.well-known/{pre}")));
    };
    let end = rest
        .find(['/', '?'])
        .ok_or(RouteError::BadTemplate("variable in the host"))?;
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(RouteError::BadTemplate("user info in the url"));
    }
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        Some(_) => return Err(RouteError::BadTemplate("bad port")),
        None => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if !host.eq_ignore_ascii_case(peer.as_str()) {
        return Err(RouteError::ForeignHost(authority.to_owned()));
    }
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    Ok((authority.to_owned(), path))
}

fn has_scheme(s: &str) -> bool {
    match s.split_once(':') {
        Some((scheme, _)) => {
            scheme
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic())
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
                && !scheme.contains('/')
        }
        None => false,
    }
}

/// RFC 3986 §5.2.4 on the complete segments of `path` (the last, unfinished one is where the
/// variable goes and is kept as it is). The query, if any, is left alone.
fn remove_dot_segments(path: &str) -> String {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let (complete, tail) = path.rsplit_once('/').unwrap_or(("", path));
    let mut out: Vec<&str> = Vec::new();
    for seg in complete.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(path.len() + 1);
    for seg in out {
        s.push('/');
        s.push_str(seg);
    }
    s.push('/');
    s.push_str(tail);
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    s
}

/// How long to keep a directory: the answer's `max-age`, within bounds, else the default.
pub(crate) fn ttl(headers: &HeaderMap) -> Duration {
    let Some(cc) = headers.get(CACHE_CONTROL).and_then(|v| v.to_str().ok()) else {
        return DEFAULT_TTL;
    };
    let mut ttl = None;
    for directive in cc.split(',').map(str::trim) {
        let (k, v) = directive.split_once('=').unwrap_or((directive, ""));
        if k.eq_ignore_ascii_case("max-age") {
            ttl = v
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        } else if k.eq_ignore_ascii_case("no-store") || k.eq_ignore_ascii_case("no-cache") {
            return MIN_TTL;
        }
    }
    ttl.map_or(DEFAULT_TTL, |t| t.clamp(MIN_TTL, MAX_TTL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> ProviderDomain {
        ProviderDomain::parse("hub.example").unwrap_or_else(|e| panic!("{e}"))
    }

    fn route(t: &str) -> Result<Route, RouteError> {
        parse_template(t, &peer())
    }

    const ROOM: &str = "mimi://hub.example/r/x";
    const ENC: &str = "mimi%3A%2F%2Fhub.example%2Fr%2Fx";

    #[test]
    fn any_variable_name_gets_the_parameter() {
        for name in ["roomId", "recipient", "r", "room_id"] {
            let r = route(&format!(
                "https://hub.example/mimi/pl/submitMessage/{{{name}}}"
            ))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.authority(), "hub.example");
            assert_eq!(r.path(ROOM), format!("/mimi/pl/submitMessage/{ENC}"));
        }
    }

    #[test]
    fn absolute_relative_and_port_forms() {
        let r = route("https://HUB.example:8443/a/{roomId}?v=1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.authority(), "HUB.example:8443");
        assert_eq!(r.path(ROOM), format!("/a/{ENC}?v=1"));
        let r = route("/x/notify/{roomId}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.authority(), "hub.example");
        assert_eq!(r.path(ROOM), format!("/x/notify/{ENC}"));
        let r = route("../mimi/notify/{roomId}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.path(ROOM), format!("/mimi/notify/{ENC}"));
        let r = route("notify/{roomId}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.path(ROOM), format!("/.well-known/notify/{ENC}"));
        let r = route("//hub.example/n/./m/../o{/roomId}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.path(ROOM), format!("/n/o/{ENC}"));
        let r = route("https://hub.example/q?room={roomId}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.path(ROOM), format!("/q?room={ENC}"));
    }

    #[test]
    fn foreign_hosts_and_bad_templates_are_refused() {
        assert_eq!(
            route("https://evil.example/n/{roomId}"),
            Err(RouteError::ForeignHost("evil.example".to_owned()))
        );
        assert_eq!(
            route("https://hub.example.evil/n/{roomId}"),
            Err(RouteError::ForeignHost("hub.example.evil".to_owned()))
        );
        for bad in [
            "http://hub.example/n/{roomId}",
            "ftp://hub.example/n/{roomId}",
            "https://{roomId}/n",
            "https://user@hub.example/n/{roomId}",
            "https://hub.example:x/n/{roomId}",
            "/n/{roomId}/{other}",
            "/n/{roomId}/../x",
            "/n/{+roomId}",
            "/n/{}",
            "/n/{roomId",
            "/n/x",
            "/n/{roomId}#f",
            "/n /{roomId}",
        ] {
            assert!(
                matches!(route(bad), Err(RouteError::BadTemplate(_))),
                "{bad}: {:?}",
                route(bad)
            );
        }
        assert!(route(&format!("/{}{{r}}", "a".repeat(MAX_TEMPLATE_LEN))).is_err());
    }

    #[test]
    fn documents() {
        let p = peer();
        let d = parse(
            br#"{"notify":"/n/{roomId}","submitMessage":7,"update":"https://evil.example/{r}","x":[]}"#,
            &p,
        )
        .unwrap_or_else(|| panic!("a directory"));
        assert!(d.route(Endpoint::Notify).is_ok());
        assert_eq!(d.usable(), 1);
        assert!(matches!(
            d.route(Endpoint::SubmitMessage),
            Err(RouteError::BadTemplate(_))
        ));
        assert!(matches!(
            d.route(Endpoint::Update),
            Err(RouteError::ForeignHost(_))
        ));
        assert_eq!(d.route(Endpoint::GroupInfo), Err(RouteError::Missing));
        // Not a directory: the peer serves none.
        assert!(parse(b"<html>not found</html>", &p).is_none());
        assert!(parse(b"[\"notify\"]", &p).is_none());
        assert!(parse(br#"{"error":"x"}"#, &p).is_none());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse(deep.as_bytes(), &p).is_none());
        let mut big = br#"{"notify":"/n/{roomId}","pad":""#.to_vec();
        big.resize(MAX_DIRECTORY_BYTES + 1, b'a');
        big.extend_from_slice(b"\"}");
        assert!(parse(&big, &p).is_none());
        // Our own server's directory reads back as the draft's layout.
        let ours = serde_json::to_vec(&mimi_wire::endpoint::Directory::for_base(
            "https://hub.example:8443/v1",
        ))
        .unwrap_or_default();
        let d = parse(&ours, &p).unwrap_or_else(|| panic!("ours"));
        assert_eq!(d.usable(), Endpoint::ALL.len());
        for e in Endpoint::ALL {
            let r = d.route(e).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.path(ROOM), Route::fallback(&p, e).path(ROOM));
        }
    }

    #[test]
    fn ttl_from_cache_control() {
        let mut h = HeaderMap::new();
        assert_eq!(ttl(&h), DEFAULT_TTL);
        h.insert(
            CACHE_CONTROL,
            http::HeaderValue::from_static("public, max-age=600"),
        );
        assert_eq!(ttl(&h), Duration::from_secs(600));
        h.insert(CACHE_CONTROL, http::HeaderValue::from_static("max-age=0"));
        assert_eq!(ttl(&h), MIN_TTL);
        h.insert(
            CACHE_CONTROL,
            http::HeaderValue::from_static("max-age=99999999999"),
        );
        assert_eq!(ttl(&h), MAX_TTL);
        h.insert(CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
        assert_eq!(ttl(&h), MIN_TTL);
        h.insert(CACHE_CONTROL, http::HeaderValue::from_static("max-age=abc"));
        assert_eq!(ttl(&h), DEFAULT_TTL);
    }
}
