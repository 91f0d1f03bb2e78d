//! Multi-node tests of mimi-relay through its public interfaces (see `tests/`), and the
//! fixtures they share.

use std::path::Path;

use bytes::Bytes;
use mimi_wire::proto::SubmitMessageRequest;
use relay_node::NodeConfig;

/// The room every fixture node hosts.
pub const ROOM: &str = "mimi://a.example/r/clubhouse";

/// Certificates for a, b and c.example in `dir`, as `mimi-relay keygen` makes them.
pub fn certificates(dir: &Path) {
    let domains: Vec<String> = ["a.example", "b.example", "c.example"]
        .map(String::from)
        .to_vec();
    mimi_relay::keygen::keygen(&domains, dir, false, None).expect("keygen");
}

/// A SubmitMessageRequest from `mimi://{provider}/u/bob` whose ciphertext is 300 bytes of `n`.
pub fn submit_body(provider: &str, n: u8) -> Bytes {
    let mls = mimi_wire::mls::private_message(b"g", 1, &[n; 300]);
    let req = SubmitMessageRequest::mls10(mls, format!("mimi://{provider}/u/bob"));
    Bytes::from(req.and_then(|r| r.encode()).expect("a valid request"))
}

/// A FanoutMessage of an application message: timestamp, MLSMessage, absent Frank.
pub fn fanout(timestamp_ms: u64, text: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    let mls = mimi_wire::mls::private_message(b"x", 3, text);
    mimi_wire::proto::encode_fanout_application(timestamp_ms, &mls, &mut f);
    f
}

/// a.example hosting [`ROOM`] for b and c over `transport`, in memory, with a 64 KiB body
/// limit; peers point at the discard port, since the tests act as b themselves.
pub fn hub_config(dir: &Path, transport: &str) -> NodeConfig {
    let text = format!(
        r#"
[node]
domain = "a.example"
data_dir = "data"
admin = "127.0.0.1:0"
store = "memory"
follows = ["mimi://b.example/r/x", "mimi://b.example/r/y", "mimi://c.example/r/z"]
[tls]
cert = "a.example.crt"
key = "a.example.key"
[listen]
{transport} = "127.0.0.1:0"
[[peers]]
domain = "b.example"
transport = "{transport}"
address = "127.0.0.1:9"
cert = "b.example.crt"
[[peers]]
domain = "c.example"
transport = "{transport}"
address = "127.0.0.1:9"
cert = "c.example.crt"
[[rooms]]
id = "{ROOM}"
followers = ["b.example", "c.example"]
[limits]
max_body = 65536
"#
    );
    NodeConfig::parse(&dir.join("a.toml"), &text).expect("config")
}

/// A running [`hub_config`] node over `transport`, with its directory (kept while it runs).
pub async fn start_hub(transport: &str) -> (tempfile::TempDir, relay_node::Node) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    certificates(dir.path());
    let node = relay_node::Node::start(hub_config(dir.path(), transport))
        .await
        .expect("node starts");
    (dir, node)
}
