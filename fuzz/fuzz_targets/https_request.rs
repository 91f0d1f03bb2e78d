//! The HTTPS binding's request head as a peer controls it: method, path (`/v1/{endpoint}/
//! {target}`, strict percent-decoding), `Host`/`:authority`, `From`, `MIMI-Seq` and
//! `Content-Length`, through the checks the server makes before it reads a body. None may
//! panic; an accepted target is one path segment's decoding (it re-encodes and decodes to
//! itself), and an accepted `MIMI-Seq` is the header's number.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mimi_wire::uri::ProviderDomain;
use relay_https::framing::{decode_target, encode_target};
use relay_https::fuzz::{Head, request_head};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: u8,
    authority: Option<&'a str>,
    path: &'a str,
    host: Vec<&'a [u8]>,
    from: Vec<&'a [u8]>,
    seq: Option<&'a [u8]>,
    length: Option<&'a [u8]>,
    other: Vec<(&'a str, &'a [u8])>,
}

const METHODS: [&str; 4] = ["POST", "GET", "PUT", "DELETE"];

fuzz_target!(|input: Input<'_>| {
    // The path parameter on its own.
    if let Some(t) = decode_target(input.path) {
        assert_eq!(decode_target(&encode_target(&t)).as_deref(), Some(&t[..]));
    }

    let uri = match input.authority {
        Some(a) => format!("https://{a}{}", input.path),
        None => input.path.to_owned(),
    };
    // What hyper would not hand us (an invalid request line) is not ours to check.
    let Ok(uri) = uri.parse::<http::Uri>() else {
        return;
    };
    let mut b = http::Request::builder()
        .method(METHODS[usize::from(input.method) % METHODS.len()])
        .uri(uri);
    let headers = b.headers_mut().expect("fresh builder");
    let mut put = |name: http::HeaderName, v: &[u8]| {
        if let Ok(v) = http::HeaderValue::from_bytes(v) {
            headers.append(name, v);
        }
    };
    for h in &input.host {
        put(http::header::HOST, h);
    }
    for f in &input.from {
        put(http::header::FROM, f);
    }
    if let Some(s) = input.seq {
        put(http::HeaderName::from_static(relay_https::MIMI_SEQ), s);
    }
    if let Some(l) = input.length {
        put(http::header::CONTENT_LENGTH, l);
    }
    for (n, v) in &input.other {
        if let Ok(n) = http::HeaderName::from_bytes(n.as_bytes()) {
            put(n, v);
        }
    }
    let Ok(req) = b.body(()) else { return };
    let ours: ProviderDomain = "a.example".parse().expect("domain");
    let peer: ProviderDomain = "b.example".parse().expect("domain");
    if let Ok(Head::Request {
        endpoint: _,
        target,
        seq,
        lineage,
        announced: _,
    }) = request_head(&req, &ours, &peer)
    {
        assert_eq!(
            decode_target(&encode_target(&target)).as_deref(),
            Some(&target[..])
        );
        if let Some(n) = seq {
            let raw = req
                .headers()
                .get(relay_https::MIMI_SEQ)
                .expect("seq header");
            let text = raw.to_str().expect("accepted as text").trim();
            assert_eq!(text.parse::<u64>().ok(), Some(n));
        }
        if let Some(l) = lineage {
            let raw = req
                .headers()
                .get(relay_https::MIMI_SEQ_INCARNATION)
                .expect("incarnation header");
            let text = raw.to_str().expect("accepted as text").trim();
            assert_eq!(text.parse::<u64>().ok(), Some(l.batch));
        }
    }
});
