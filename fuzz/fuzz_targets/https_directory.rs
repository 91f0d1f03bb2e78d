//! A peer's `/.well-known/mimi-protocol-directory` as the HTTPS client reads it: any bytes,
//! any URL templates. Nothing panics, and every route it yields is a request line our client
//! can send: a path-absolute URI, an authority that parses, a target that stays one segment.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mimi_wire::uri::ProviderDomain;
use relay_https::fuzz::directory_requests;

fuzz_target!(|input: (&[u8], &str)| {
    let (body, target) = input;
    let peer: ProviderDomain = "hub.example".parse().expect("domain");
    let Some(routes) = directory_requests(body, &peer, target) else {
        return;
    };
    for (endpoint, authority, path) in routes {
        assert!(path.starts_with('/'), "{endpoint:?}: {path}");
        assert!(
            path.parse::<http::uri::PathAndQuery>().is_ok(),
            "{endpoint:?}: {path}"
        );
        assert!(
            authority.parse::<http::uri::Authority>().is_ok(),
            "{endpoint:?}: {authority}"
        );
    }
});
