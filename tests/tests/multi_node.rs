//! Three node processes on loopback; one is killed with SIGKILL mid-stream (twice) and
//! restarted; every message must arrive once, in order, at every other provider.
//!
//! The test binary doubles as the node: started with `MIMI_RELAY_TEST_NODE=1 <config>`, it runs
//! a node instead of the tests, so no separately built binary is needed.

use std::time::Duration;

use mimi_lab::demo::{self, DemoOptions, Launcher};

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    if std::env::var_os("MIMI_RELAY_TEST_NODE").is_some() {
        let config = std::env::args_os().nth(1).expect("config path argument");
        if let Err(e) = rt.block_on(relay_node::run(std::path::Path::new(&config))) {
            eprintln!("node failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let cases: [(&str, &str, usize); 6] = [
        ("quic_follower_killed_twice", "quic", 1),
        ("https_follower_killed_twice", "https", 2),
        ("quic_hub_killed_twice", "quic", 0),
        // One room over both transports: c, reached over HTTPS, is killed.
        ("mixed_follower_killed_twice", "mixed", 2),
        // XMPP direct mode: b's sessions die with it, so a's resumptions fail and it retries.
        ("xmpp_follower_killed_twice", "xmpp", 1),
        // Signed federation transactions; the hub's keys are re-fetched after each restart.
        ("matrix_follower_killed_twice", "matrix", 1),
    ];
    let mut failed = 0;
    for (name, transport, victim) in cases {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let launcher = Launcher {
            program: std::env::current_exe().expect("test binary path"),
            args: Vec::new(),
            env: vec![
                ("MIMI_RELAY_TEST_NODE".into(), "1".into()),
                ("RUST_LOG".into(), "warn".into()),
            ],
        };
        let opts = DemoOptions {
            messages: 900,
            transport: transport.into(),
            chaos: true,
            chaos_node: victim,
            settle: Duration::from_secs(60),
            ..DemoOptions::default()
        };
        match rt.block_on(demo::run(opts, launcher)) {
            // The MLS phase ran first: the room's policy and consent refused what they should,
            // as the relays themselves counted.
            Ok(r)
                if r.is_clean()
                    && r.chaos_kills == 2
                    && r.sent == 900
                    && r.policy_rejections >= 1
                    && r.consent_denials >= 1
                    && r.key_claims >= 3
                    && r.participants.len() == 3
                    && r.franks_issued > 0
                    && r.franks_verified > 0 =>
            {
                println!(
                    "test {name} ... ok ({} deliveries, {} submissions retried)",
                    r.delivered, r.submit_retries
                );
            }
            Ok(r) => {
                failed += 1;
                println!("test {name} ... FAILED\n{}", r.summary());
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e:#}");
            }
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
