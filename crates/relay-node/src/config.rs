//! The node's TOML configuration, validated at start. Every error names the file, the key and
//! what is wrong with it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_adapter::PeerAddr;
use relay_core::TransportKind;
use serde::{Deserialize, Serialize};

/// A configuration that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    // The cause is part of the message (not a `source`): it is what names the key and line.
    #[error("{file}: cannot read: {reason}")]
    Read {
        file: PathBuf,
        reason: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Parse {
        file: PathBuf,
        reason: Box<toml::de::Error>,
    },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// The file as written, before validation: what `NodeConfig::parse` reads the TOML into and
/// checks. Public, and serializable, so that tools that write node configs (the lab, the demo)
/// build this type rather than text: a key the node renames or drops then fails their build.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub node: RawNode,
    pub tls: RawTls,
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<RawPeer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<RawRoom>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub limits: RawLimits,
    #[serde(default)]
    pub xmpp: Option<RawXmpp>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub quic: RawQuic,
    #[serde(default, skip_serializing_if = "is_default")]
    pub pipeline: RawPipeline,
}

/// A section left at its defaults is left out of a written file.
fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

/// `[pipeline]`: transmits in flight per (room, destination), by transport; the core's
/// defaults where left out.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub https: Option<u32>,
    pub quic: Option<u32>,
    pub xmpp: Option<u32>,
    pub matrix: Option<u32>,
}

/// `[quic]`: tuning of the QUIC transport.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuic {
    /// bbr (the default), cubic or new_reno.
    pub congestion: Option<String>,
}

/// `[xmpp]`: reach XMPP peers through an XMPP server as an XEP-0114 component.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawXmpp {
    pub server: String,
    pub component: String,
    pub secret: String,
    /// Provider domain to that provider's component address.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub domain: String,
    pub data_dir: PathBuf,
    pub admin: String,
    #[serde(default)]
    pub store: Option<String>,
    /// Rooms hosted by peers that this node follows from the start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub follows: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `system` or `none` (the default): the roots of peers with neither `cert` nor `ca`.
    pub roots: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub https: Option<String>,
    pub quic: Option<String>,
    pub xmpp: Option<String>,
    pub matrix: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub domain: String,
    pub transport: String,
    /// `host:port`; the provider domain on port 443 when left out.
    pub address: Option<String>,
    pub cert: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoom {
    pub id: String,
    pub followers: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_body: Option<usize>,
    pub max_queue: Option<usize>,
    pub max_inbox: Option<usize>,
    pub max_inbox_per_peer: Option<usize>,
    pub max_inbox_memory: Option<usize>,
    pub request_timeout_ms: Option<u64>,
    pub max_conns_per_peer: Option<usize>,
    pub max_handshakes: Option<usize>,
    pub max_streams_per_conn: Option<u32>,
    pub max_peer_bytes: Option<usize>,
    pub frame_deadline_ms: Option<u64>,
    pub max_parked_per_peer: Option<usize>,
    pub max_unacked: Option<usize>,
    pub max_xml_depth: Option<usize>,
    pub source_penalty_ms: Option<u64>,
    pub max_refusals_per_s: Option<u32>,
    pub max_abuse_reports_per_peer: Option<usize>,
    pub max_abuse_bytes_per_peer: Option<usize>,
    pub max_consent_per_peer: Option<usize>,
    pub max_dead_letters_per_peer: Option<usize>,
    pub key_claims_per_minute: Option<usize>,
    pub identifier_queries_per_minute: Option<usize>,
}

/// Where the node keeps its durable state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded crash-safe store (the default).
    Durable,
    /// Memory only: the core's own state and nothing more; everything is lost on exit. For
    /// benchmarks and tests.
    Memory,
}

/// A peer provider, as configured.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub domain: ProviderDomain,
    pub transport: TransportKind,
    /// Where to dial it: a host name is resolved at every connection attempt.
    pub address: PeerAddr,
    /// `cert`: the peer's pinned end-entity certificate(s) (PEM), whoever issued them. Paths
    /// here are already resolved against the config's directory.
    pub cert: Option<PathBuf>,
    /// `ca`: the CA bundle (PEM) its chain must lead to. At most one of `cert` and `ca` is
    /// set; with neither, the peer is trusted by the system roots (`[tls] roots`).
    pub ca: Option<PathBuf>,
}

/// `[tls] roots`: what trusts peers configured with neither `cert` nor `ca`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Roots {
    /// Nothing: every peer needs `cert` or `ca`.
    #[default]
    None,
    /// The platform's root certificates.
    System,
}

/// Component mode of the XMPP transport (`[xmpp]`).
#[derive(Clone)]
pub struct XmppComponentConfig {
    /// The XMPP server's component port.
    pub server: SocketAddr,
    /// Our component address, e.g. `relay.a.localhost`.
    pub component: String,
    pub secret: String,
    /// The component address of each peer reached through the server.
    pub peers: BTreeMap<ProviderDomain, String>,
}

impl fmt::Debug for XmppComponentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XmppComponentConfig")
            .field("server", &self.server)
            .field("component", &self.component)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// A room this node hosts as hub.
#[derive(Clone, Debug)]
pub struct RoomConfig {
    pub id: RoomId,
    pub followers: Vec<ProviderDomain>,
}

/// A validated node configuration. Relative paths are resolved against the config file's
/// directory.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub file: PathBuf,
    pub domain: ProviderDomain,
    pub data_dir: PathBuf,
    pub store: StoreKind,
    /// The loopback listener for the local client API and `/metrics`.
    pub admin: SocketAddr,
    /// Our certificate: the end-entity certificate, then any intermediates (sent as a chain).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `[tls] roots`.
    pub roots: Roots,
    /// Where each configured transport listens for peers.
    pub listen: BTreeMap<TransportKind, SocketAddr>,
    pub peers: Vec<PeerConfig>,
    pub rooms: Vec<RoomConfig>,
    /// `[node] follows`: rooms hosted by peers whose events this node takes from the start.
    pub follows: Vec<RoomId>,
    pub max_body: usize,
    pub max_queue: usize,
    pub max_inbox: usize,
    /// `[limits] max_inbox_per_peer`: undelivered inbox records one provider may have waiting
    /// for local clients (those of the rooms it hosts, or of the rooms hosted here for this
    /// node's own hub) before that provider is answered 503 with Retry-After. Default
    /// `max_inbox / 4`: a hub flooding the inbox while local clients are away takes a quarter
    /// of it and leaves the rest to the others, and up to four busy hubs still fill it.
    pub max_inbox_per_peer: usize,
    /// `[limits] max_inbox_memory`: bytes of undelivered inbox records kept in memory
    /// (default 64 MiB); older ones stay only in the store and are read back from it. A store
    /// of `memory` keeps the whole inbox in memory, bounded by `max_inbox`.
    pub max_inbox_memory: usize,
    pub request_timeout: Duration,
    /// Stored abuse reports (count, bytes) and consent scopes per provider.
    pub max_abuse_reports_per_peer: usize,
    pub max_abuse_bytes_per_peer: usize,
    pub max_consent_per_peer: usize,
    /// `[limits] max_dead_letters_per_peer`: events a peer refused for good, kept per peer
    /// (the oldest replaced).
    pub max_dead_letters_per_peer: usize,
    /// `[limits] key_claims_per_minute`, `identifier_queries_per_minute`: /keyMaterial
    /// claims and /identifierQuery requests each peer may make a minute (a minute's worth at
    /// once); past that it is answered 429 with Retry-After, and no other peer's share shrinks.
    pub key_claims_per_minute: u32,
    pub identifier_queries_per_minute: u32,
    /// The per-peer budgets every transport adapter enforces.
    pub adapter_limits: relay_adapter::Limits,
    /// `[xmpp]`: XMPP peers reached as a component of an XMPP server.
    pub xmpp: Option<XmppComponentConfig>,
    /// `[quic] congestion`: the QUIC connections' congestion controller.
    pub quic_congestion: relay_quic::Congestion,
    /// `[pipeline]`: transmits in flight per (room, destination) for the transports given
    /// there (1 to 4096); the others keep the core's default.
    pub pipeline: BTreeMap<TransportKind, u32>,
}

struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, key: impl fmt::Display, message: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    fn addr(&self, key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
        s.parse()
            .map_err(|_| self.err(key, format!("{s:?} is not an address like 127.0.0.1:4433")))
    }

    fn domain(&self, key: impl fmt::Display, s: &str) -> Result<ProviderDomain, ConfigError> {
        s.parse()
            .map_err(|e| self.err(key, format!("{s:?} is not a provider domain: {e}")))
    }
}

impl NodeConfig {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|reason| ConfigError::Read {
            file: file.to_path_buf(),
            reason,
        })?;
        Self::parse(file, &text)
    }

    /// Validates `text` as if read from `file` (relative paths resolve against its directory).
    pub fn parse(file: &Path, text: &str) -> Result<NodeConfig, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            reason: Box::new(e),
        })?;
        let cx = Ctx { file };
        let base = file.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let domain = cx.domain("node.domain", &raw.node.domain)?;
        let admin = cx.addr("node.admin", &raw.node.admin)?;
        if !admin.ip().is_loopback() {
            return Err(cx.err(
                "node.admin",
                "the client API has no authentication, so it must listen on loopback",
            ));
        }
        let store = match raw.node.store.as_deref() {
            None | Some("durable") => StoreKind::Durable,
            Some("memory") => StoreKind::Memory,
            Some(other) => {
                return Err(cx.err(
                    "node.store",
                    format!("{other:?}: expected durable or memory"),
                ));
            }
        };
        let mut listen = BTreeMap::new();
        for (kind, addr) in [
            (TransportKind::Https, &raw.listen.https),
            (TransportKind::Quic, &raw.listen.quic),
            (TransportKind::Xmpp, &raw.listen.xmpp),
            (TransportKind::Matrix, &raw.listen.matrix),
        ] {
            if let Some(s) = addr {
                listen.insert(kind, cx.addr(&format!("listen.{kind}"), s)?);
            }
        }

        let roots = match raw.tls.roots.as_deref() {
            None | Some("none") => Roots::None,
            Some("system") => Roots::System,
            Some(other) => {
                return Err(cx.err(
                    "tls.roots",
                    format!(
                        "{other:?}: expected \"system\" (the platform's root certificates) or \"none\""
                    ),
                ));
            }
        };
        let mut peers = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, p) in raw.peers.iter().enumerate() {
            let key = |k: &str| format!("peers[{i}].{k}");
            let d = cx.domain(key("domain"), &p.domain)?;
            if d == domain {
                return Err(cx.err(key("domain"), "a node cannot be its own peer"));
            }
            if !seen.insert(d.clone()) {
                return Err(cx.err(key("domain"), format!("{d} is listed twice")));
            }
            let transport: TransportKind = p
                .transport
                .parse()
                .map_err(|e| cx.err(key("transport"), e))?;
            if !listen.contains_key(&transport) {
                return Err(cx.err(
                    key("transport"),
                    format!("peer {d} uses {transport}, but listen.{transport} is not set"),
                ));
            }
            let (cert, ca) = match (&p.cert, &p.ca) {
                (Some(_), Some(_)) => {
                    return Err(cx.err(
                        key("ca"),
                        format!(
                            "peer {d} sets both cert and ca: set cert to pin its certificate, \
                             or ca to verify its chain against a CA, not both"
                        ),
                    ));
                }
                (None, None) if roots != Roots::System => {
                    return Err(cx.err(
                        key("cert"),
                        format!(
                            "peer {d} has no trust: set cert (its certificate, pinned) or ca \
                             (a CA bundle), or [tls] roots = \"system\" to use the system's roots"
                        ),
                    ));
                }
                (c, a) => (c.as_deref().map(&resolve), a.as_deref().map(&resolve)),
            };
            for (k, path) in [("cert", &cert), ("ca", &ca)] {
                if let Some(path) = path {
                    readable(&cx, &key(k), path)?;
                }
            }
            let address = match &p.address {
                Some(a) => a.parse().map_err(|e| cx.err(key("address"), e))?,
                None => PeerAddr::new(d.as_str(), 443).map_err(|e| cx.err(key("address"), e))?,
            };
            peers.push(PeerConfig {
                domain: d,
                transport,
                address,
                cert,
                ca,
            });
        }

        let mut rooms = Vec::new();
        for (i, r) in raw.rooms.iter().enumerate() {
            let key = |k: &str| format!("rooms[{i}].{k}");
            let id: RoomId =
                r.id.parse()
                    .map_err(|e| cx.err(key("id"), format!("{:?}: {e}", r.id)))?;
            if id.domain() != domain.as_str() {
                return Err(cx.err(
                    key("id"),
                    format!(
                        "{id} is hosted by {}, not by this node ({domain})",
                        id.domain()
                    ),
                ));
            }
            let mut followers = Vec::new();
            for (j, f) in r.followers.iter().enumerate() {
                let fd = cx.domain(key(&format!("followers[{j}]")), f)?;
                if !peers.iter().any(|p| p.domain == fd) {
                    return Err(cx.err(
                        key(&format!("followers[{j}]")),
                        format!("{fd} is not among the peers"),
                    ));
                }
                followers.push(fd);
            }
            rooms.push(RoomConfig { id, followers });
        }
        let mut follows = Vec::new();
        for (i, f) in raw.node.follows.iter().enumerate() {
            let key = format!("node.follows[{i}]");
            let id: RoomId = f
                .parse()
                .map_err(|e| cx.err(&key, format!("{f:?} is not a room URI: {e}")))?;
            if id.domain() == domain.as_str() {
                return Err(cx.err(
                    &key,
                    format!("{id} is hosted here; list it under [[rooms]], not follows"),
                ));
            }
            if !peers.iter().any(|p| p.domain.as_str() == id.domain()) {
                return Err(cx.err(
                    &key,
                    format!("the room's hub {} is not among the peers", id.domain()),
                ));
            }
            follows.push(id);
        }

        let cert = resolve(&raw.tls.cert);
        let key = resolve(&raw.tls.key);
        for (k, p) in [("tls.cert", &cert), ("tls.key", &key)] {
            readable(&cx, k, p)?;
        }
        let max_body = raw.limits.max_body.unwrap_or(1 << 20);
        if !(1024..=64 << 20).contains(&max_body) {
            return Err(cx.err("limits.max_body", "must be between 1024 and 67108864 bytes"));
        }
        let max_queue = raw.limits.max_queue.unwrap_or(100_000);
        if max_queue == 0 {
            return Err(cx.err("limits.max_queue", "must be at least 1"));
        }
        let max_inbox = raw.limits.max_inbox.unwrap_or(1_000_000);
        if max_inbox == 0 {
            return Err(cx.err("limits.max_inbox", "must be at least 1"));
        }
        let max_inbox_per_peer = raw
            .limits
            .max_inbox_per_peer
            .unwrap_or((max_inbox / 4).max(1));
        if !(1..=max_inbox).contains(&max_inbox_per_peer) {
            return Err(cx.err(
                "limits.max_inbox_per_peer",
                format!("must be between 1 and max_inbox ({max_inbox})"),
            ));
        }
        let max_inbox_memory = raw.limits.max_inbox_memory.unwrap_or(64 << 20);
        // At least the largest record, so the newest always fits; at most 64 GiB.
        if !(max_body..=64 << 30).contains(&max_inbox_memory) {
            return Err(cx.err(
                "limits.max_inbox_memory",
                format!("must be between max_body ({max_body}) and 68719476736 bytes"),
            ));
        }
        let request_timeout = Duration::from_millis(raw.limits.request_timeout_ms.unwrap_or(5_000));
        if request_timeout < Duration::from_millis(10) {
            return Err(cx.err("limits.request_timeout_ms", "must be at least 10"));
        }

        let adapter_limits = adapter_limits(&cx, &raw.limits, max_body)?;
        let per_peer = |key: &str, v: Option<usize>, default: usize, max: usize| {
            let v = v.unwrap_or(default);
            if !(1..=max).contains(&v) {
                return Err(cx.err(
                    format!("limits.{key}"),
                    format!("must be between 1 and {max}"),
                ));
            }
            Ok(v)
        };
        let l = &raw.limits;
        let max_abuse_reports_per_peer = per_peer(
            "max_abuse_reports_per_peer",
            l.max_abuse_reports_per_peer,
            1_000,
            1 << 20,
        )?;
        let max_abuse_bytes_per_peer = per_peer(
            "max_abuse_bytes_per_peer",
            l.max_abuse_bytes_per_peer,
            16 << 20,
            1 << 30,
        )?;
        if max_abuse_bytes_per_peer < max_body {
            return Err(cx.err(
                "limits.max_abuse_bytes_per_peer",
                "must be at least max_body, or no report of the largest size could be kept",
            ));
        }
        let max_consent_per_peer = per_peer(
            "max_consent_per_peer",
            l.max_consent_per_peer,
            100_000,
            1 << 24,
        )?;
        let max_dead_letters_per_peer = per_peer(
            "max_dead_letters_per_peer",
            l.max_dead_letters_per_peer,
            1_000,
            1 << 20,
        )?;

        // u32 in the core; at most 1,000,000 a minute (one every 60 us).
        let per_minute = |key: &str, v: Option<usize>| {
            per_peer(key, v, 600, 1_000_000).map(|v| u32::try_from(v).unwrap_or(u32::MAX))
        };
        let key_claims_per_minute = per_minute("key_claims_per_minute", l.key_claims_per_minute)?;
        let identifier_queries_per_minute = per_minute(
            "identifier_queries_per_minute",
            l.identifier_queries_per_minute,
        )?;

        let xmpp = match &raw.xmpp {
            None => None,
            Some(x) => Some(xmpp_component(&cx, x, &peers)?),
        };
        let quic_congestion = match &raw.quic.congestion {
            None => relay_quic::Congestion::default(),
            Some(c) => c.parse().map_err(|e| cx.err("quic.congestion", e))?,
        };

        let mut pipeline = BTreeMap::new();
        let p = &raw.pipeline;
        for (kind, v) in [
            (TransportKind::Https, p.https),
            (TransportKind::Quic, p.quic),
            (TransportKind::Xmpp, p.xmpp),
            (TransportKind::Matrix, p.matrix),
        ] {
            if let Some(v) = v {
                if !(1..=MAX_PIPELINE).contains(&v) {
                    return Err(cx.err(
                        format!("pipeline.{kind}"),
                        format!("must be between 1 and {MAX_PIPELINE}"),
                    ));
                }
                pipeline.insert(kind, v);
            }
        }

        Ok(NodeConfig {
            pipeline,
            file: file.to_path_buf(),
            domain,
            data_dir: resolve(&raw.node.data_dir),
            store,
            admin,
            cert,
            key,
            roots,
            listen,
            peers,
            rooms,
            follows,
            max_body,
            max_queue,
            max_inbox,
            max_inbox_per_peer,
            max_inbox_memory,
            request_timeout,
            max_abuse_reports_per_peer,
            max_abuse_bytes_per_peer,
            max_consent_per_peer,
            max_dead_letters_per_peer,
            key_claims_per_minute,
            identifier_queries_per_minute,
            adapter_limits,
            xmpp,
            quic_congestion,
        })
    }
}

/// Most transmits in flight per (room, destination) that `[pipeline]` may ask for.
const MAX_PIPELINE: u32 = 4096;

/// A file the node will read at start (and on reload): it must exist and open.
fn readable(cx: &Ctx<'_>, key: &str, path: &Path) -> Result<(), ConfigError> {
    if !path.is_file() {
        return Err(cx.err(key, format!("{} does not exist", path.display())));
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| cx.err(key, format!("cannot read {}: {e}", path.display())))
}

/// `[limits]`'s adapter budgets: defaults from [`relay_adapter::Limits`], each bounded so that
/// a typo cannot switch a bound off.
fn adapter_limits(
    cx: &Ctx<'_>,
    raw: &RawLimits,
    max_body: usize,
) -> Result<relay_adapter::Limits, ConfigError> {
    let d = relay_adapter::Limits::default();
    let min_peer_bytes = 2 * max_body + (64 << 10);
    let range = |key: &str, v: Option<usize>, def: usize, lo: usize, hi: usize| match v {
        None => Ok(def),
        Some(v) if (lo..=hi).contains(&v) => Ok(v),
        Some(_) => Err(cx.err(key, format!("must be between {lo} and {hi}"))),
    };
    let l = relay_adapter::Limits {
        max_conns_per_peer: range(
            "limits.max_conns_per_peer",
            raw.max_conns_per_peer,
            d.max_conns_per_peer,
            1,
            1024,
        )?,
        max_handshakes: range(
            "limits.max_handshakes",
            raw.max_handshakes,
            d.max_handshakes,
            1,
            65_536,
        )?,
        max_streams_per_conn: range(
            "limits.max_streams_per_conn",
            raw.max_streams_per_conn.map(|v| v as usize),
            d.max_streams_per_conn as usize,
            1,
            65_536,
        )? as u32,
        // A peer must be able to have at least two of the largest frames (body and head) in
        // flight, or a full-size one could never be admitted.
        max_peer_bytes: range(
            "limits.max_peer_bytes",
            raw.max_peer_bytes,
            d.max_peer_bytes.max(min_peer_bytes),
            min_peer_bytes,
            16 << 30,
        )
        .map_err(|_| {
            cx.err(
                "limits.max_peer_bytes",
                format!(
                    "must be at least {min_peer_bytes} bytes (twice max_body plus 64 KiB of \
                     frame heads)"
                ),
            )
        })?,
        frame_deadline: std::time::Duration::from_millis(range(
            "limits.frame_deadline_ms",
            raw.frame_deadline_ms.map(|v| v as usize),
            d.frame_deadline.as_millis() as usize,
            100,
            600_000,
        )? as u64),
        max_parked_per_peer: range(
            "limits.max_parked_per_peer",
            raw.max_parked_per_peer,
            d.max_parked_per_peer,
            0,
            1024,
        )?,
        max_unacked: range(
            "limits.max_unacked",
            raw.max_unacked,
            d.max_unacked,
            16,
            1 << 20,
        )?,
        max_xml_depth: range(
            "limits.max_xml_depth",
            raw.max_xml_depth,
            d.max_xml_depth,
            4,
            256,
        )?,
        // A minute at most, since the window grows 32-fold.
        source_penalty: std::time::Duration::from_millis(range(
            "limits.source_penalty_ms",
            raw.source_penalty_ms.map(|v| v as usize),
            d.source_penalty.as_millis() as usize,
            10,
            60_000,
        )? as u64),
        max_refusals_per_s: range(
            "limits.max_refusals_per_s",
            raw.max_refusals_per_s.map(|v| v as usize),
            d.max_refusals_per_s as usize,
            1,
            1_000_000,
        )? as u32,
    };
    Ok(l)
}

fn xmpp_component(
    cx: &Ctx<'_>,
    x: &RawXmpp,
    peers: &[PeerConfig],
) -> Result<XmppComponentConfig, ConfigError> {
    let server = cx.addr("xmpp.server", &x.server)?;
    let is_jid = |s: &str| {
        !s.is_empty()
            && s.len() <= 1023
            && !s.contains(['@', '/', ' ', '<', '>', '&', '\'', '"'])
            && s.split('.').all(|l| !l.is_empty())
    };
    if !is_jid(&x.component) {
        return Err(cx.err(
            "xmpp.component",
            format!(
                "{:?} is not a component address like relay.a.example",
                x.component
            ),
        ));
    }
    if x.secret.is_empty() {
        return Err(cx.err("xmpp.secret", "must not be empty"));
    }
    let mut out = BTreeMap::new();
    for (domain, jid) in &x.peers {
        let key = format!("xmpp.peers.{domain}");
        let d = cx.domain(&key, domain)?;
        match peers.iter().find(|p| p.domain == d) {
            Some(p) if p.transport == TransportKind::Xmpp => {}
            Some(p) => {
                return Err(cx.err(&key, format!("peer {d} uses {}, not xmpp", p.transport)));
            }
            None => return Err(cx.err(&key, format!("{d} is not among the peers"))),
        }
        if !is_jid(jid) {
            return Err(cx.err(&key, format!("{jid:?} is not a component address")));
        }
        out.insert(d, jid.to_ascii_lowercase());
    }
    Ok(XmppComponentConfig {
        server,
        component: x.component.to_ascii_lowercase(),
        secret: x.secret.clone(),
        peers: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_files(text: &str) -> (tempfile::TempDir, Result<NodeConfig, ConfigError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["a.crt", "a.key", "b.crt"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let file = dir.path().join("node.toml");
        let r = NodeConfig::parse(&file, text);
        (dir, r)
    }

    const GOOD: &str = r#"
[node]
domain = "a.example"
data_dir = "data"
admin = "127.0.0.1:9100"
[tls]
cert = "a.crt"
key = "a.key"
[listen]
quic = "127.0.0.1:4433"
[[peers]]
domain = "b.example"
transport = "quic"
address = "127.0.0.1:4434"
cert = "b.crt"
[[rooms]]
id = "mimi://a.example/r/clubhouse"
followers = ["b.example"]
"#;

    #[test]
    fn good_config_resolves_paths() {
        let (dir, r) = with_files(GOOD);
        let c = r.expect("valid");
        assert_eq!(c.domain.as_str(), "a.example");
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.peers[0].cert, Some(dir.path().join("b.crt")));
        assert_eq!(c.peers[0].ca, None);
        assert_eq!(c.peers[0].address.to_string(), "127.0.0.1:4434");
        assert_eq!(c.roots, Roots::None);
        assert_eq!(c.rooms[0].followers.len(), 1);
        assert_eq!(c.store, StoreKind::Durable);
    }

    fn invalid(text: &str) -> (String, String) {
        match with_files(text).1 {
            Err(ConfigError::Invalid { key, message, .. }) => (key, message),
            other => panic!("expected an invalid-key error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_key() {
        let (k, _) = invalid(&GOOD.replace("\"quic\"\naddress", "\"carrier-pigeon\"\naddress"));
        assert_eq!(k, "peers[0].transport");
        let (k, m) = invalid(&GOOD.replace("127.0.0.1:4434", "nowhere"));
        assert_eq!(k, "peers[0].address");
        assert!(m.contains("nowhere"));
        let (k, _) =
            invalid(&GOOD.replace("followers = [\"b.example\"]", "followers = [\"z.example\"]"));
        assert_eq!(k, "rooms[0].followers[0]");
        let (k, _) = invalid(&GOOD.replace("mimi://a.example/r/", "mimi://b.example/r/"));
        assert_eq!(k, "rooms[0].id");
        let (k, _) = invalid(&GOOD.replace("b.crt", "missing.crt"));
        assert_eq!(k, "peers[0].cert");
        let (k, _) =
            invalid(&GOOD.replace("admin = \"127.0.0.1:9100\"", "admin = \"0.0.0.0:9100\""));
        assert_eq!(k, "node.admin");
        let (k, _) = invalid(&GOOD.replace("[listen]\nquic = \"127.0.0.1:4433\"", "[listen]"));
        assert_eq!(k, "peers[0].transport");
    }

    #[test]
    fn pipeline_is_per_transport_and_bounded() {
        let (_d, r) = with_files(GOOD);
        assert!(r.expect("valid").pipeline.is_empty(), "core defaults");
        let (_d, r) = with_files(&format!("{GOOD}\n[pipeline]\nhttps = 4\nquic = 16\n"));
        let p = r.expect("valid").pipeline;
        assert_eq!(p.get(&TransportKind::Https), Some(&4));
        assert_eq!(p.get(&TransportKind::Quic), Some(&16));
        assert_eq!(p.get(&TransportKind::Xmpp), None);
        let (k, _) = invalid(&format!("{GOOD}\n[pipeline]\nquic = 0\n"));
        assert_eq!(k, "pipeline.quic");
    }

    #[test]
    fn adapter_limits_have_defaults_and_are_bounded_by_key() {
        let (_d, r) = with_files(GOOD);
        assert_eq!(
            r.expect("valid").adapter_limits,
            relay_adapter::Limits::default()
        );
        let with = |kv: &str| format!("{GOOD}\n[limits]\n{kv}\n");
        let (_d, r) = with_files(&with(
            "max_conns_per_peer = 2\nframe_deadline_ms = 500\nsource_penalty_ms = 40",
        ));
        let cfg = r.expect("valid");
        assert_eq!(cfg.max_abuse_reports_per_peer, 1_000);
        assert_eq!(cfg.max_consent_per_peer, 100_000);
        assert_eq!(cfg.max_dead_letters_per_peer, 1_000);
        assert_eq!(cfg.key_claims_per_minute, 600);
        assert_eq!(cfg.identifier_queries_per_minute, 600);
        let l = cfg.adapter_limits;
        assert_eq!(l.max_conns_per_peer, 2);
        assert_eq!(l.frame_deadline, Duration::from_millis(500));
        assert_eq!(l.source_penalty, Duration::from_millis(40));
        for (kv, key) in [
            ("max_conns_per_peer = 0", "limits.max_conns_per_peer"),
            ("max_handshakes = 0", "limits.max_handshakes"),
            ("max_streams_per_conn = 0", "limits.max_streams_per_conn"),
            ("max_peer_bytes = 1000", "limits.max_peer_bytes"),
            ("frame_deadline_ms = 1", "limits.frame_deadline_ms"),
            ("max_unacked = 1", "limits.max_unacked"),
            ("max_xml_depth = 100000", "limits.max_xml_depth"),
            ("source_penalty_ms = 0", "limits.source_penalty_ms"),
            ("max_refusals_per_s = 0", "limits.max_refusals_per_s"),
            (
                "max_abuse_reports_per_peer = 0",
                "limits.max_abuse_reports_per_peer",
            ),
            (
                "max_abuse_bytes_per_peer = 4096",
                "limits.max_abuse_bytes_per_peer",
            ),
            ("max_consent_per_peer = 0", "limits.max_consent_per_peer"),
            (
                "max_dead_letters_per_peer = 0",
                "limits.max_dead_letters_per_peer",
            ),
            ("key_claims_per_minute = 0", "limits.key_claims_per_minute"),
            (
                "identifier_queries_per_minute = 1000001",
                "limits.identifier_queries_per_minute",
            ),
        ] {
            let (k, m) = invalid(&with(kv));
            assert_eq!(k, key, "{kv}: {m}");
        }
    }

    #[test]
    fn inbox_limits_have_defaults_and_are_bounded_by_key() {
        let (_d, r) = with_files(GOOD);
        let c = r.expect("valid");
        assert_eq!(
            (c.max_inbox, c.max_inbox_per_peer, c.max_inbox_memory),
            (1_000_000, 250_000, 64 << 20)
        );
        let with = |kv: &str| format!("{GOOD}\n[limits]\n{kv}\n");
        let (_d, r) = with_files(&with("max_inbox = 100\nmax_inbox_memory = 2097152"));
        let c = r.expect("valid");
        assert_eq!((c.max_inbox_per_peer, c.max_inbox_memory), (25, 2 << 20));
        for (kv, key) in [
            ("max_inbox_per_peer = 0", "limits.max_inbox_per_peer"),
            (
                "max_inbox = 10\nmax_inbox_per_peer = 11",
                "limits.max_inbox_per_peer",
            ),
            ("max_inbox_memory = 1000", "limits.max_inbox_memory"),
        ] {
            let (k, m) = invalid(&with(kv));
            assert_eq!(k, key, "{kv}: {m}");
        }
    }

    #[test]
    fn follows_name_rooms_of_peers() {
        let text = GOOD.replace(
            "admin = \"127.0.0.1:9100\"",
            "admin = \"127.0.0.1:9100\"\nfollows = [\"mimi://b.example/r/annex\"]",
        );
        let (_d, r) = with_files(&text);
        assert_eq!(
            r.expect("valid").follows[0].as_str(),
            "mimi://b.example/r/annex"
        );
        let (k, m) = invalid(&text.replace("mimi://b.example/r/annex", "mimi://z.example/r/x"));
        assert_eq!(k, "node.follows[0]");
        assert!(m.contains("not among the peers"), "{m}");
        let (k, m) = invalid(&text.replace("mimi://b.example/r/annex", "mimi://a.example/r/x"));
        assert_eq!(k, "node.follows[0]");
        assert!(m.contains("hosted here"), "{m}");
        let (k, _) = invalid(&text.replace("mimi://b.example/r/annex", "not a room"));
        assert_eq!(k, "node.follows[0]");
    }

    #[test]
    fn xmpp_component_section_is_validated_by_key() {
        let xmpp = GOOD.replace("quic", "xmpp");
        let ok = format!(
            "{xmpp}\n[xmpp]\nserver = \"127.0.0.1:5347\"\ncomponent = \"relay.a.localhost\"\nsecret = \"s\"\npeers = {{ \"b.example\" = \"relay.b.localhost\" }}\n"
        );
        let (_d, r) = with_files(&ok);
        let x = r.expect("valid").xmpp.expect("xmpp section");
        assert_eq!(
            x.peers.values().next().map(String::as_str),
            Some("relay.b.localhost")
        );
        let (k, _) = invalid(&ok.replace("127.0.0.1:5347", "nowhere"));
        assert_eq!(k, "xmpp.server");
        let (k, _) = invalid(&ok.replace("relay.a.localhost", "a@b"));
        assert_eq!(k, "xmpp.component");
        let (k, _) = invalid(&ok.replace("secret = \"s\"", "secret = \"\""));
        assert_eq!(k, "xmpp.secret");
        let (k, m) = invalid(&ok.replace("\"b.example\" =", "\"z.example\" ="));
        assert_eq!(k, "xmpp.peers.z.example");
        assert!(m.contains("not among the peers"), "{m}");
    }

    #[test]
    fn quic_congestion_is_parsed_and_validated() {
        let (_d, r) = with_files(GOOD);
        assert_eq!(
            r.expect("valid").quic_congestion,
            relay_quic::Congestion::Bbr
        );
        let (_d, r) = with_files(&format!("{GOOD}\n[quic]\ncongestion = \"cubic\"\n"));
        assert_eq!(
            r.expect("valid").quic_congestion,
            relay_quic::Congestion::Cubic
        );
        let (k, m) = invalid(&format!("{GOOD}\n[quic]\ncongestion = \"vegas\"\n"));
        assert_eq!(k, "quic.congestion");
        assert!(m.contains("vegas") && m.contains("bbr"), "{m}");
    }

    #[test]
    fn matrix_peers_need_listen_matrix() {
        let text = GOOD.replace("transport = \"quic\"", "transport = \"matrix\"");
        let (k, m) = invalid(&text);
        assert_eq!(k, "peers[0].transport");
        assert!(m.contains("listen.matrix"), "{m}");
        let (_d, r) =
            with_files(&text.replace("[listen]", "[listen]\nmatrix = \"127.0.0.1:8448\""));
        let c = r.expect("valid");
        assert_eq!(c.peers[0].transport, TransportKind::Matrix);
        assert!(c.listen.contains_key(&TransportKind::Matrix));
    }

    #[test]
    fn peer_trust_is_cert_or_ca_or_system_roots() {
        let ca = GOOD.replace("cert = \"b.crt\"", "ca = \"b.crt\"");
        let (dir, r) = with_files(&ca);
        let p = &r.expect("valid with ca").peers[0];
        assert_eq!(
            (p.cert.clone(), p.ca.clone()),
            (None, Some(dir.path().join("b.crt")))
        );

        let both = GOOD.replace("cert = \"b.crt\"", "cert = \"b.crt\"\nca = \"b.crt\"");
        let (k, m) = invalid(&both);
        assert_eq!(k, "peers[0].ca");
        assert!(m.contains("not both"), "{m}");

        let neither = GOOD.replace("cert = \"b.crt\"\n", "");
        let (k, m) = invalid(&neither);
        assert_eq!(k, "peers[0].cert");
        assert!(m.contains("roots = \"system\""), "{m}");
        let system = neither.replace("key = \"a.key\"", "key = \"a.key\"\nroots = \"system\"");
        let (_d, r) = with_files(&system);
        let c = r.expect("valid with system roots");
        assert_eq!(c.roots, Roots::System);
        assert_eq!(
            (c.peers[0].cert.clone(), c.peers[0].ca.clone()),
            (None, None)
        );

        let (k, m) = invalid(&system.replace("\"system\"", "\"webpki\""));
        assert_eq!(k, "tls.roots");
        assert!(m.contains("webpki") && m.contains("system"), "{m}");

        let (k, m) = invalid(&ca.replace("ca = \"b.crt\"", "ca = \"no-such-ca.pem\""));
        assert_eq!(k, "peers[0].ca");
        assert!(m.contains("no-such-ca.pem"), "{m}");
        // A directory is not a readable certificate file.
        let (k, _) = invalid(&ca.replace("ca = \"b.crt\"", "ca = \".\""));
        assert_eq!(k, "peers[0].ca");
    }

    #[test]
    fn peer_address_is_a_host_name_or_the_domain_on_443() {
        let named = GOOD.replace("127.0.0.1:4434", "mimi.b.example:8443");
        let (_d, r) = with_files(&named);
        let a = r.expect("valid").peers[0].address.clone();
        assert_eq!((a.host(), a.port()), ("mimi.b.example", 8443));
        let omitted = GOOD.replace("address = \"127.0.0.1:4434\"\n", "");
        let (_d, r) = with_files(&omitted);
        assert_eq!(
            r.expect("valid").peers[0].address.to_string(),
            "b.example:443"
        );
        let (k, m) = invalid(&GOOD.replace("127.0.0.1:4434", "mimi.b.example"));
        assert_eq!(k, "peers[0].address");
        assert!(m.contains("mimi.b.example:443"), "{m}");
    }

    #[test]
    fn unknown_keys_are_parse_errors_with_the_file() {
        let (_d, r) = with_files(&GOOD.replace("[tls]", "[tls]\ncolour = \"blue\""));
        let e = r.expect_err("unknown key");
        let s = e.to_string();
        assert!(s.contains("node.toml") && s.contains("colour"), "{s}");
    }
}
