//! Fleets of node processes, shared by the lab and the demo: how a node process is started
//! (the [`Launcher`]), the config it reads (built as the node's own file type,
//! `relay_node::config::Raw`, and serialized, so that a key the node renames fails this build
//! rather than a run), the certificates, and how a fleet is stopped.
//!
//! Both harnesses lay out one working directory the same way: `certs/DOMAIN.crt` and `.key`,
//! `DOMAIN.toml`, `DOMAIN.log`, and each node's state under `data/DOMAIN` (relative paths in a
//! config resolve against its own directory).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mimi_wire::uri::ProviderDomain;
use relay_core::TransportKind;
pub use relay_node::config::{
    Raw as NodeFile, RawLimits, RawListen, RawNode, RawPeer, RawPipeline, RawQuic, RawRoom, RawTls,
};

/// How to start one node process: the program and the arguments before the config path.
#[derive(Clone, Debug)]
pub struct Launcher {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Launcher {
    /// This very binary, `mimi-relay run --config FILE`.
    pub fn this_binary() -> Result<Launcher> {
        Ok(Launcher {
            program: std::env::current_exe().context("locating the mimi-relay binary")?,
            args: vec!["run".into(), "--config".into()],
            env: Vec::new(),
        })
    }

    /// The command that runs the node of `config` with its stdout and stderr into `log`,
    /// inside network namespace `netns` when given (`ip netns exec`). Its `RUST_LOG` is
    /// `rust_log` unless this process has one of its own.
    pub fn command(
        &self,
        config: &Path,
        log: std::fs::File,
        netns: Option<&str>,
        rust_log: &str,
    ) -> Result<Command> {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args)
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", rust_log);
        }
        Ok(cmd)
    }
}

/// Writes a fresh self-signed certificate and key for each provider into `dir/certs`.
pub fn write_certs<'a>(dir: &Path, providers: impl IntoIterator<Item = &'a str>) -> Result<()> {
    std::fs::create_dir_all(dir.join("certs"))?;
    for p in providers {
        let d: ProviderDomain = p.parse()?;
        let g = relay_tls::generate(&d)?;
        std::fs::write(dir.join(format!("certs/{p}.crt")), g.cert_pem)?;
        std::fs::write(dir.join(format!("certs/{p}.key")), g.key_pem)?;
    }
    Ok(())
}

/// The config of provider `domain` in the harnesses' layout: state under `data/DOMAIN`, its
/// certificate and key from `certs/`, its API on loopback port `admin`, and `store`
/// (`durable` or `memory`). Listeners, peers and rooms are the caller's to add.
pub fn node_file(domain: &str, admin: u16, store: &str) -> NodeFile {
    NodeFile {
        node: RawNode {
            domain: domain.to_owned(),
            data_dir: PathBuf::from(format!("data/{domain}")),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)).to_string(),
            store: Some(store.to_owned()),
            follows: Vec::new(),
        },
        tls: RawTls {
            cert: PathBuf::from(format!("certs/{domain}.crt")),
            key: PathBuf::from(format!("certs/{domain}.key")),
            roots: None,
        },
        ..NodeFile::default()
    }
}

/// Sets `[listen] KIND = addr`.
pub fn listen(file: &mut NodeFile, kind: TransportKind, addr: SocketAddr) -> Result<()> {
    let slot = match kind {
        TransportKind::Https => &mut file.listen.https,
        TransportKind::Quic => &mut file.listen.quic,
        TransportKind::Xmpp => &mut file.listen.xmpp,
        TransportKind::Matrix => &mut file.listen.matrix,
        other => bail!("no [listen] key for {other}"),
    };
    *slot = Some(addr.to_string());
    Ok(())
}

/// Sets `[pipeline] KIND = n`.
pub fn pipeline(file: &mut NodeFile, kind: TransportKind, n: u32) -> Result<()> {
    let slot = match kind {
        TransportKind::Https => &mut file.pipeline.https,
        TransportKind::Quic => &mut file.pipeline.quic,
        TransportKind::Xmpp => &mut file.pipeline.xmpp,
        TransportKind::Matrix => &mut file.pipeline.matrix,
        other => bail!("no [pipeline] key for {other}"),
    };
    *slot = Some(n);
    Ok(())
}

/// A `[[peers]]` entry: `domain` over `kind` at `addr`, its certificate pinned from `certs/`.
pub fn peer(domain: &str, kind: TransportKind, addr: SocketAddr) -> RawPeer {
    RawPeer {
        domain: domain.to_owned(),
        transport: kind.to_string(),
        address: Some(addr.to_string()),
        cert: Some(PathBuf::from(format!("certs/{domain}.crt"))),
        ca: None,
    }
}

/// A `[[rooms]]` entry: room `id` hosted here, with these follower providers.
pub fn room(id: &str, followers: impl IntoIterator<Item = String>) -> RawRoom {
    RawRoom {
        id: id.to_owned(),
        followers: followers.into_iter().collect(),
    }
}

/// Writes `file` as TOML to `path`.
pub fn write_config(path: &Path, file: &NodeFile) -> Result<()> {
    let text = toml::to_string(file).context("writing a node config as TOML")?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// SIGTERM to every node (graceful shutdown), then SIGKILL whatever is still running after
/// `grace`; every child is reaped. Returns how many did not exit cleanly on SIGTERM.
pub fn stop<'a>(children: impl IntoIterator<Item = &'a mut Child>, grace: Duration) -> usize {
    let mut children: Vec<&mut Child> = children.into_iter().collect();
    for c in &children {
        if let Ok(pid) = i32::try_from(c.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = Instant::now() + grace;
    let mut unclean = 0;
    for c in &mut children {
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !status.is_some_and(|s| s.success()) {
            unclean += 1;
            let _ = c.kill();
        }
        let _ = c.wait();
    }
    unclean
}

/// The last `lines` lines of a node's log, for an error message.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file built here is one the node accepts, and says what was built.
    #[test]
    fn a_written_config_is_what_the_node_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_certs(dir.path(), ["a.example", "b.example"]).expect("certificates");
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let mut f = node_file("a.example", 9100, "memory");
        listen(&mut f, TransportKind::Quic, addr(7001)).expect("quic");
        pipeline(&mut f, TransportKind::Quic, 8).expect("quic");
        f.peers
            .push(peer("b.example", TransportKind::Quic, addr(7002)));
        f.rooms
            .push(room("mimi://a.example/r/room0", ["b.example".to_owned()]));
        f.quic.congestion = Some("cubic".into());
        f.limits.max_inbox = Some(64);
        let path = dir.path().join("a.example.toml");
        write_config(&path, &f).expect("write");
        let text = std::fs::read_to_string(&path).expect("read back");
        let c = relay_node::NodeConfig::parse(&path, &text).expect("the node accepts it");
        assert_eq!(c.domain.to_string(), "a.example");
        assert_eq!(c.admin, addr(9100));
        assert_eq!(c.store, relay_node::StoreKind::Memory);
        assert_eq!(c.listen.get(&TransportKind::Quic), Some(&addr(7001)));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].transport, TransportKind::Quic);
        assert_eq!(c.rooms.len(), 1);
        assert_eq!(c.data_dir, dir.path().join("data/a.example"));
        // Unset keys stay out of the file rather than being written as defaults.
        assert!(!text.contains("roots"), "{text}");
        assert!(!text.contains("xmpp"), "{text}");
        let bare = dir.path().join("b.example.toml");
        write_config(&bare, &node_file("b.example", 9101, "durable")).expect("write");
        let text = std::fs::read_to_string(&bare).expect("read back");
        assert!(
            !text.contains("[limits]") && !text.contains("[pipeline]"),
            "{text}"
        );
        relay_node::NodeConfig::parse(&bare, &text).expect("the node accepts it");
    }
}
