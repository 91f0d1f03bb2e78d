//! The three-provider example in `config/` is valid and consistent: a.example hosts the room,
//! b and c follow, and every peer address is where that peer listens.

use std::path::Path;

use relay_node::NodeConfig;

#[test]
fn example_configs_validate_and_agree() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["a.example.toml", "b.example.toml", "c.example.toml"] {
        std::fs::copy(src.join(name), dir.path().join(name)).expect("copy config");
    }
    let domains = [
        "a.example".to_owned(),
        "b.example".to_owned(),
        "c.example".to_owned(),
    ];
    // As the examples' first line says: issued by a local CA, which a and c trust each other by.
    mimi_relay::keygen::keygen(
        &domains,
        &dir.path().join("certs"),
        false,
        Some("example-ca"),
    )
    .expect("keygen");

    let configs: Vec<NodeConfig> = domains
        .iter()
        .map(|d| {
            NodeConfig::load(&dir.path().join(format!("{d}.toml"))).expect("valid example config")
        })
        .collect();
    let hub = &configs[0];
    assert_eq!(hub.rooms.len(), 1);
    assert_eq!(hub.rooms[0].id.as_str(), "mimi://a.example/r/clubhouse");
    let followers: Vec<&str> = hub.rooms[0].followers.iter().map(|f| f.as_str()).collect();
    assert_eq!(followers, ["b.example", "c.example"]);
    for c in &configs[1..] {
        assert!(c.rooms.is_empty(), "{} must follow, not host", c.domain);
    }
    // One example peer is trusted by CA, both ways, and the certificates load as configured.
    let by_ca = |c: &NodeConfig, peer: &str| {
        c.peers
            .iter()
            .any(|p| p.domain.as_str() == peer && p.ca.is_some() && p.cert.is_none())
    };
    assert!(by_ca(&configs[0], "c.example") && by_ca(&configs[2], "a.example"));
    for c in &configs {
        let (_, trust) = relay_node::load_tls(c).expect("the example certificates load");
        assert_eq!(trust.domains().len(), 2);
    }
    for c in &configs {
        assert_eq!(c.peers.len(), 2, "{} peers with both others", c.domain);
        for p in &c.peers {
            let other = configs
                .iter()
                .find(|o| o.domain == p.domain)
                .expect("peer is a provider");
            let listens = other.listen.get(&p.transport).copied().map(Into::into);
            assert_eq!(
                listens,
                Some(p.address.clone()),
                "{} reaches {} where it listens",
                c.domain,
                p.domain
            );
        }
    }
}
