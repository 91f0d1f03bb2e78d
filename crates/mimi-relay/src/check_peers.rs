//! `mimi-relay check-peers`: dial every configured peer as the node would and say, per peer,
//! what was verified and how, what its directory offers, whether it speaks our sequence
//! extension, the round-trip time, and in plain words what is wrong when something is.
//!
//! Peers are checked concurrently; each step is bounded by the timeout and a whole peer by
//! three times it, so a dead peer costs at most that.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_adapter::PeerAddr;
use relay_core::TransportKind;
use relay_https::check::{DirectoryFound, EndpointGap, HttpsCheckError, SeqSupport};
use relay_node::NodeConfig;
use relay_node::config::PeerConfig;
use relay_tls::check::{CheckError, check_peer, recording_client_config};
use relay_tls::{PeerTrust, TlsIdentity, TrustFailure, TrustMode, Validity};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::Serialize;

/// Endpoints a room cannot work without: a peer's directory lacking one is a fault. The
/// others (consent, identifier queries, abuse reports, downloads) are only noted.
const CORE_ENDPOINTS: [Endpoint; 5] = [
    Endpoint::Notify,
    Endpoint::SubmitMessage,
    Endpoint::Update,
    Endpoint::GroupInfo,
    Endpoint::KeyMaterial,
];
/// Days left below which a peer's certificate is warned about (as the node does).
const EXPIRY_WARNING_DAYS: i64 = 14;

#[derive(Clone, Copy, Debug)]
pub struct CheckOptions {
    /// Bounds each step (resolve, connect, handshake, each request).
    pub timeout: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            timeout: Duration::from_secs(5),
        }
    }
}

/// What was found, for all peers.
#[derive(Debug, Serialize)]
pub struct Report {
    /// This node's provider domain.
    pub node: String,
    pub peers: Vec<PeerReport>,
}

/// One peer.
#[derive(Debug, Serialize)]
pub struct PeerReport {
    pub domain: String,
    pub transport: String,
    pub address: String,
    /// How we are configured to trust it: `pinned`, `ca` or `system-roots`.
    pub trust: String,
    /// The file behind `trust`, if any (`cert` or `ca`).
    pub trust_file: Option<String>,
    /// Set when its TLS identity was verified.
    pub identity: Option<Identity>,
    /// `2` or `1.1` (HTTPS peers).
    pub http: Option<String>,
    pub directory: Option<DirectoryReport>,
    pub sequence: Sequence,
    pub rtt_ms: Option<f64>,
    /// What `rtt_ms` measured.
    pub rtt_of: Option<String>,
    /// What stops peering, each with what to do. Non-empty: the exit status is non-zero.
    pub faults: Vec<Fault>,
    /// Worth knowing, not blocking.
    pub warnings: Vec<String>,
}

impl PeerReport {
    pub fn is_ok(&self) -> bool {
        self.faults.is_empty()
    }

    pub fn has_fault(&self, kind: FaultKind) -> bool {
        self.faults.iter().any(|f| f.kind == kind)
    }
}

/// The identity a peer proved.
#[derive(Debug, Serialize)]
pub struct Identity {
    /// The provider domain its certificate was verified for.
    pub verified_as: String,
    /// `pinned`, `ca` or `system-roots`.
    pub mode: String,
    /// The address reached.
    pub addr: String,
    pub alpn: Option<String>,
    /// Whole days until its certificate expires.
    pub days_left: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct DirectoryReport {
    /// False: the peer serves none and the node uses `/v1/{endpoint}/{param}`.
    pub served: bool,
    /// Why there is none (served = false).
    pub fallback: Option<String>,
    /// Endpoint name to the URL it goes to (`{param}` for the parameter).
    pub endpoints: BTreeMap<String, String>,
    /// Endpoints the directory does not list.
    pub missing: Vec<String>,
    /// Endpoints listed with a URL the node will not use, and why.
    pub unusable: BTreeMap<String, String>,
}

/// Whether the peer speaks our sequence extension (`MIMI-Seq` / `MIMI-Next-Seq`).
#[derive(Debug, Serialize)]
pub struct Sequence {
    /// `yes`, `no` (the draft's rules only), or `unknown`.
    pub speaks: &'static str,
    pub detail: String,
}

impl Sequence {
    fn unknown(detail: impl Into<String>) -> Sequence {
        Sequence {
            speaks: "unknown",
            detail: detail.into(),
        }
    }
}

/// The kinds of fault, stable names for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    PeerDown,
    Unresolvable,
    Timeout,
    WrongCa,
    WrongName,
    Expired,
    NotYetValid,
    PinMismatch,
    BadCertificate,
    NoTrust,
    RefusedByPeer,
    Handshake,
    NoDirectory,
    EndpointMissing,
    DirectoryRefused,
    Http,
}

#[derive(Debug, Serialize)]
pub struct Fault {
    pub kind: FaultKind,
    /// What is wrong and what to do, in one line.
    pub message: String,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.peers.iter().all(PeerReport::is_ok)
    }

    pub fn peer(&self, domain: &str) -> Option<&PeerReport> {
        self.peers.iter().find(|p| p.domain == domain)
    }

    /// The human-readable form: a block per peer, then a summary line.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for p in &self.peers {
            let _ = writeln!(
                s,
                "{}  {} {}  {}",
                p.domain,
                p.transport,
                p.address,
                if p.is_ok() { "OK" } else { "FAULT" }
            );
            let how = match (p.trust.as_str(), &p.trust_file) {
                ("pinned", Some(f)) => format!("its certificate pinned in {f}"),
                ("ca", Some(f)) => format!("the CA in {f}"),
                _ => "the system roots".to_owned(),
            };
            match &p.identity {
                Some(id) => {
                    let mut line =
                        format!("verified as {} by {how}, at {}", id.verified_as, id.addr);
                    if let Some(a) = &id.alpn {
                        let _ = write!(line, ", ALPN {a}");
                    }
                    if let Some(d) = id.days_left {
                        let _ = write!(line, ", certificate expires in {d} days");
                    }
                    row(&mut s, "identity", &line);
                }
                None => row(
                    &mut s,
                    "identity",
                    &format!("not verified (trusted by {how})"),
                ),
            }
            if let Some(h) = &p.http {
                row(&mut s, "http", &format!("HTTP/{h}"));
            }
            if let Some(d) = &p.directory {
                let line = if d.served {
                    let mut line =
                        format!("{} of {} endpoints", d.endpoints.len(), Endpoint::ALL.len());
                    if !d.missing.is_empty() {
                        let _ = write!(line, "; missing: {}", d.missing.join(", "));
                    }
                    if !d.unusable.is_empty() {
                        let list: Vec<_> = d.unusable.keys().cloned().collect();
                        let _ = write!(line, "; unusable: {}", list.join(", "));
                    }
                    line
                } else {
                    format!(
                        "none ({}): using /v1/{{endpoint}}/{{param}}",
                        d.fallback.as_deref().unwrap_or("")
                    )
                };
                row(&mut s, "directory", &line);
                // The fallback's paths are the same for every peer: in --json only.
                if d.served {
                    for (name, url) in &d.endpoints {
                        row(&mut s, "", &format!("{name:<16} {url}"));
                    }
                }
            }
            row(
                &mut s,
                "sequence",
                &format!("{}: {}", p.sequence.speaks, p.sequence.detail),
            );
            if let (Some(ms), Some(of)) = (p.rtt_ms, &p.rtt_of) {
                row(&mut s, "rtt", &format!("{ms:.1} ms ({of})"));
            }
            for w in &p.warnings {
                row(&mut s, "warning", w);
            }
            for f in &p.faults {
                let kind = serde_json::to_value(f.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                row(&mut s, "FAULT", &format!("[{kind}] {}", f.message));
            }
            s.push('\n');
        }
        let bad = self.peers.iter().filter(|p| !p.is_ok()).count();
        let _ = writeln!(
            s,
            "{}: {} peers checked, {} OK, {} with faults",
            self.node,
            self.peers.len(),
            self.peers.len() - bad,
            bad
        );
        s
    }
}

fn row(s: &mut String, label: &str, text: &str) {
    let _ = writeln!(s, "  {label:<10} {text}");
}

/// Checks every peer of the node configured in `cfg`, concurrently.
pub async fn run(cfg: &NodeConfig, opts: CheckOptions) -> Result<Report> {
    let (identity, trust) = relay_node::load_tls(cfg)
        .with_context(|| format!("{}: loading certificates", cfg.file.display()))?;
    let cx = Arc::new(Cx {
        cfg: cfg.clone(),
        identity,
        trust,
        timeout: opts.timeout,
    });
    let whole = opts.timeout * 3;
    let checks = cfg.peers.iter().map(|p| {
        let cx = cx.clone();
        let p = p.clone();
        async move {
            match tokio::time::timeout(whole, check_one(&cx, &p)).await {
                Ok(r) => r,
                Err(_) => {
                    let mut r = blank(&p);
                    r.faults.push(Fault {
                        kind: FaultKind::Timeout,
                        message: format!(
                            "the check of {} took longer than {whole:?}: the peer answers too slowly \
                             to be relayed to; is its node overloaded, or is something between \
                             us dropping packets?",
                            p.domain
                        ),
                    });
                    r
                }
            }
        }
    });
    let peers = futures::future::join_all(checks).await;
    Ok(Report {
        node: cfg.domain.to_string(),
        peers,
    })
}

struct Cx {
    cfg: NodeConfig,
    identity: TlsIdentity,
    trust: PeerTrust,
    timeout: Duration,
}

fn blank(p: &PeerConfig) -> PeerReport {
    let (trust, file) = match (&p.cert, &p.ca) {
        (Some(c), _) => ("pinned", Some(c.display().to_string())),
        (None, Some(a)) => ("ca", Some(a.display().to_string())),
        (None, None) => ("system-roots", None),
    };
    PeerReport {
        domain: p.domain.to_string(),
        transport: p.transport.to_string(),
        address: p.address.to_string(),
        trust: trust.to_owned(),
        trust_file: file,
        identity: None,
        http: None,
        directory: None,
        sequence: Sequence::unknown("not probed (no connection)"),
        rtt_ms: None,
        rtt_of: None,
        faults: Vec::new(),
        warnings: Vec::new(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn check_one(cx: &Cx, p: &PeerConfig) -> PeerReport {
    let mut r = blank(p);
    match p.transport {
        TransportKind::Quic => {
            check_quic(cx, p, &mut r).await;
            if r.identity.is_some() {
                r.sequence = Sequence {
                    speaks: "yes",
                    detail: "part of mimi-relay's QUIC framing".to_owned(),
                };
            }
        }
        TransportKind::Xmpp
            if cx
                .cfg
                .xmpp
                .as_ref()
                .is_some_and(|x| x.peers.contains_key(&p.domain)) =>
        {
            check_component(cx, p, &mut r).await;
        }
        kind => {
            let alpn: Vec<Vec<u8>> = match kind {
                TransportKind::Https => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                TransportKind::Xmpp => vec![relay_xmpp::ALPN.to_vec()],
                _ => vec![b"http/1.1".to_vec()],
            };
            let tls = check_peer(
                &cx.identity,
                &cx.trust,
                &p.domain,
                p.address.host(),
                p.address.port(),
                alpn,
                cx.timeout,
            )
            .await;
            match tls {
                Ok(ok) => {
                    r.rtt_ms = Some(ms(ok.connect_time));
                    r.rtt_of = Some("TCP connect".to_owned());
                    r.identity = Some(identity(&p.domain, ok.mode, ok.addr, ok.alpn, &ok.chain));
                    expiry_warning(&mut r);
                    if kind == TransportKind::Https {
                        check_https(cx, p, &mut r).await;
                    } else {
                        r.sequence = Sequence {
                            speaks: "yes",
                            detail: format!("part of mimi-relay's {kind} binding; not probed"),
                        };
                    }
                }
                Err(e) => r.faults.push(tls_fault(cx, p, e)),
            }
        }
    }
    r
}

fn identity(
    domain: &ProviderDomain,
    mode: TrustMode,
    addr: SocketAddr,
    alpn: Option<Vec<u8>>,
    chain: &[CertificateDer<'_>],
) -> Identity {
    let now = UnixTime::now().as_secs() as i64;
    Identity {
        verified_as: domain.to_string(),
        mode: mode.as_str().to_owned(),
        addr: addr.to_string(),
        alpn: alpn.map(|a| String::from_utf8_lossy(&a).into_owned()),
        days_left: chain
            .first()
            .and_then(|c| Validity::of(c))
            .map(|v| v.days_left(now)),
    }
}

fn expiry_warning(r: &mut PeerReport) {
    if let Some(d) = r.identity.as_ref().and_then(|i| i.days_left)
        && d < EXPIRY_WARNING_DAYS
    {
        r.warnings.push(format!(
            "{}'s certificate expires in {d} days: ask them to renew it{}",
            r.domain,
            if r.trust == "pinned" {
                ", and pin the new one"
            } else {
                ""
            }
        ));
    }
}

/// The config key that holds a peer's trust, as the operator wrote it (resolved path).
fn trust_key(p: &PeerConfig) -> String {
    match (&p.cert, &p.ca) {
        (Some(c), _) => format!("cert = \"{}\"", c.display()),
        (None, Some(a)) => format!("ca = \"{}\"", a.display()),
        (None, None) => "[tls] roots = \"system\"".to_owned(),
    }
}

fn trust_fault(p: &PeerConfig, f: TrustFailure) -> Fault {
    let d = &p.domain;
    let (kind, advice) = match &f {
        TrustFailure::UnknownIssuer { .. } => (
            FaultKind::WrongCa,
            match (&p.cert, &p.ca) {
                (None, Some(ca)) => format!(
                    "ca = \"{ca}\" did not issue it: ask {d} for the CA bundle that did (and \
                     that their server sends its intermediates), or pin their certificate \
                     with cert = \"...\"",
                    ca = ca.display()
                ),
                _ => format!(
                    "no system root issued it: set ca = \"...\" to {d}'s CA bundle, or pin \
                     their certificate with cert = \"...\""
                ),
            },
        ),
        TrustFailure::WrongName { .. } => (
            FaultKind::WrongName,
            format!(
                "either {addr} is another provider's server (check address), or {d} must \
                 use a certificate naming {d} in its subjectAltName",
                addr = p.address
            ),
        ),
        TrustFailure::Expired { .. } => (
            FaultKind::Expired,
            format!(
                "{d} must renew it{}",
                if p.cert.is_some() {
                    "; then pin the new one in cert = \"...\""
                } else {
                    ""
                }
            ),
        ),
        TrustFailure::NotYetValid { .. } => (
            FaultKind::NotYetValid,
            "check this machine's clock, and theirs".to_owned(),
        ),
        TrustFailure::PinMismatch { .. } => (
            FaultKind::PinMismatch,
            format!(
                "{d} may have replaced its certificate: get the new one and pin it in {}, or \
                 trust their CA with ca = \"...\" instead",
                trust_key(p)
            ),
        ),
        TrustFailure::NotConfigured { .. } => (FaultKind::NoTrust, "see peers[].cert".to_owned()),
        _ => (
            FaultKind::BadCertificate,
            format!("ask {d} to check the certificate their server presents"),
        ),
    };
    Fault {
        kind,
        message: format!("{f}; {advice}"),
    }
}

fn tls_fault(cx: &Cx, p: &PeerConfig, e: CheckError) -> Fault {
    let d = &p.domain;
    let (kind, message) = match e {
        CheckError::Untrusted(f) => return trust_fault(p, f),
        CheckError::Resolve { address, source } => (
            FaultKind::Unresolvable,
            format!(
                "cannot resolve {address} ({source}): check the peer's address in {} or DNS",
                cx.cfg.file.display()
            ),
        ),
        CheckError::Connect { address, source } => (
            FaultKind::PeerDown,
            format!(
                "nothing accepts connections at {address} ({source}): is {d}'s node running \
                 and listening for {} there? check its address",
                p.transport
            ),
        ),
        CheckError::Timeout { address, after } => (
            FaultKind::Timeout,
            format!(
                "no answer from {address} within {after:?}: the node may be down or hung, or \
                 a firewall drops the packets"
            ),
        ),
        CheckError::RefusedByPeer { alert } => (
            FaultKind::RefusedByPeer,
            format!(
                "{d} refused our certificate ({alert}): give them ours ({}) to pin, or the CA \
                 that issued it, and check they list {} as a peer",
                cx.cfg.cert.display(),
                cx.cfg.domain
            ),
        ),
        CheckError::Handshake { address, source } => (
            FaultKind::Handshake,
            format!(
                "the TLS handshake with {address} failed ({source}): is that {d}'s {} \
                 listener, speaking TLS?",
                p.transport
            ),
        ),
        other => (FaultKind::Handshake, other.to_string()),
    };
    Fault { kind, message }
}

/// The first room hosted here that lists `peer` as a follower.
fn probe_room<'a>(cfg: &'a NodeConfig, peer: &ProviderDomain) -> Option<&'a RoomId> {
    cfg.rooms
        .iter()
        .find(|r| r.followers.contains(peer))
        .map(|r| &r.id)
}

async fn check_https(cx: &Cx, p: &PeerConfig, r: &mut PeerReport) {
    let d = &p.domain;
    let room = probe_room(&cx.cfg, d);
    let checked =
        relay_https::check::check(&cx.identity, &cx.trust, d, &p.address, room, cx.timeout).await;
    let c = match checked {
        Ok(c) => c,
        Err(HttpsCheckError::DirectoryRefused { status, reason }) => {
            let hint = match status {
                421 => format!(
                    "their server does not answer for {d} at {}: check address",
                    p.address
                ),
                403 => format!(
                    "they do not take us as {}: check they configured our domain and certificate",
                    cx.cfg.domain
                ),
                _ => format!("ask {d} what their server expects"),
            };
            r.faults.push(Fault {
                kind: FaultKind::DirectoryRefused,
                message: format!(
                    "the request for {d}'s directory was answered {status} {reason}; {hint}"
                ),
            });
            return;
        }
        Err(e) => {
            r.faults.push(Fault {
                kind: FaultKind::Http,
                message: format!(
                    "TLS was fine, but reading {d}'s directory failed: {e}; is it an HTTPS \
                     MIMI server?"
                ),
            });
            return;
        }
    };
    r.http = Some(c.http.to_owned());
    r.rtt_ms = Some(ms(c.rtt));
    r.rtt_of = Some("directory request".to_owned());
    let mut report = DirectoryReport {
        served: false,
        fallback: None,
        endpoints: BTreeMap::new(),
        missing: Vec::new(),
        unusable: BTreeMap::new(),
    };
    match c.directory {
        DirectoryFound::Served { endpoints } => {
            report.served = true;
            for (e, found) in endpoints {
                match found {
                    Ok(url) => {
                        report.endpoints.insert(e.as_str().to_owned(), url);
                    }
                    Err(EndpointGap::Missing) => report.missing.push(e.as_str().to_owned()),
                    Err(EndpointGap::Unusable(why)) => {
                        report.unusable.insert(e.as_str().to_owned(), why);
                    }
                    Err(other) => {
                        report
                            .unusable
                            .insert(e.as_str().to_owned(), format!("{other:?}"));
                    }
                }
            }
            let gaps = |core: bool| -> Vec<String> {
                report
                    .missing
                    .iter()
                    .chain(report.unusable.keys())
                    .filter(|n| CORE_ENDPOINTS.iter().any(|e| e.as_str() == *n) == core)
                    .cloned()
                    .collect()
            };
            let core = gaps(true);
            if !core.is_empty() {
                let why: Vec<String> = report
                    .unusable
                    .iter()
                    .filter(|(n, _)| core.contains(n))
                    .map(|(n, w)| format!("{n}: {w}"))
                    .collect();
                r.faults.push(Fault {
                    kind: FaultKind::EndpointMissing,
                    message: format!(
                        "{d}'s directory gives no usable URL for {}{}: our node refuses those \
                         requests as unsupported by {d}, so rooms with it cannot work; ask \
                         them to list every endpoint under the draft's names",
                        core.join(", "),
                        if why.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", why.join("; "))
                        }
                    ),
                });
            }
            let other = gaps(false);
            if !other.is_empty() {
                r.warnings.push(format!(
                    "{d} does not offer {}: such requests are answered unsupported",
                    other.join(", ")
                ));
            }
        }
        DirectoryFound::Fallback { why, .. } => {
            r.faults.push(Fault {
                kind: FaultKind::NoDirectory,
                message: format!(
                    "{d} serves no directory at /.well-known/mimi-protocol-directory ({why}): \
                     our node falls back to /v1/{{endpoint}}/{{param}}, which works only if \
                     {d} uses those paths; ask them to publish a directory (draft-06 §5.1)"
                ),
            });
            report.fallback = Some(why);
            for e in Endpoint::ALL {
                report.endpoints.insert(
                    e.as_str().to_owned(),
                    format!("/v1/{}/{{param}}", e.as_str()),
                );
            }
        }
        other => r
            .warnings
            .push(format!("unexpected directory state {other:?}")),
    }
    r.directory = Some(report);
    r.sequence = match (c.seq, room) {
        (Some(SeqSupport::Speaks { next_seq }), Some(room)) => Sequence {
            speaks: "yes",
            detail: format!("answered MIMI-Next-Seq {next_seq} for {room}"),
        },
        (Some(SeqSupport::DraftOnly { status }), _) => Sequence {
            speaks: "no",
            detail: format!(
                "answered {status} without MIMI-Next-Seq: its queues run by the draft's rules \
                 (one /notify in flight per room, dedupe by body)"
            ),
        },
        (Some(SeqSupport::Unknown { status: 0, reason }), Some(room)) => Sequence::unknown(
            format!("the probe for {room} failed ({reason}); it shows at the first /notify"),
        ),
        (Some(SeqSupport::Unknown { status, reason }), Some(room)) => Sequence::unknown(format!(
            "the probe for {room} was answered {status} {reason}; it shows at the first /notify"
        )),
        (_, None) => Sequence::unknown(format!(
            "not probed: no room hosted here lists {d} as a follower; it shows at the first \
             /notify"
        )),
        (other, _) => Sequence::unknown(format!("{other:?}")),
    };
}

/// An XMPP peer reached through our XMPP server as a component: only the server is dialled.
async fn check_component(cx: &Cx, p: &PeerConfig, r: &mut PeerReport) {
    let Some(x) = &cx.cfg.xmpp else { return };
    r.address = format!("{} (XMPP server, component mode)", x.server);
    r.sequence = Sequence {
        speaks: "yes",
        detail: "part of mimi-relay's XMPP binding; not probed".to_owned(),
    };
    let started = std::time::Instant::now();
    match tokio::time::timeout(cx.timeout, tokio::net::TcpStream::connect(x.server)).await {
        Ok(Ok(_)) => {
            r.rtt_ms = Some(ms(started.elapsed()));
            r.rtt_of = Some("TCP connect to the XMPP server".to_owned());
            r.warnings.push(format!(
                "{} is reached through the XMPP server: its identity is the server's to check, \
                 not this tool's",
                p.domain
            ));
        }
        Ok(Err(e)) => r.faults.push(Fault {
            kind: FaultKind::PeerDown,
            message: format!(
                "our XMPP server at {} does not accept connections ({e}): start it, or fix \
                 [xmpp] server",
                x.server
            ),
        }),
        Err(_) => r.faults.push(Fault {
            kind: FaultKind::Timeout,
            message: format!("our XMPP server at {} did not answer in time", x.server),
        }),
    }
}

async fn check_quic(cx: &Cx, p: &PeerConfig, r: &mut PeerReport) {
    let d = &p.domain;
    let fault = |kind, message| Fault { kind, message };
    let addr = match tokio::time::timeout(cx.timeout, resolve_quic(&p.address)).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            r.faults.push(fault(
                FaultKind::Unresolvable,
                format!("cannot resolve {} ({e}): check address or DNS", p.address),
            ));
            return;
        }
        Err(_) => {
            r.faults.push(fault(
                FaultKind::Timeout,
                format!("resolving {} timed out", p.address),
            ));
            return;
        }
    };
    let built = recording_client_config(&cx.identity, &cx.trust, vec![relay_quic::ALPN.to_vec()])
        .map_err(anyhow::Error::from)
        .and_then(|(tls, record)| {
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
            let bind: SocketAddr = if addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let endpoint = quinn::Endpoint::client(bind)?;
            Ok((endpoint, quinn::ClientConfig::new(Arc::new(crypto)), record))
        });
    let (endpoint, client, record) = match built {
        Ok(b) => b,
        Err(e) => {
            r.faults.push(fault(
                FaultKind::Handshake,
                format!("cannot dial over QUIC: {e:#}"),
            ));
            return;
        }
    };
    let connecting = match endpoint.connect_with(client, addr, d.as_str()) {
        Ok(c) => c,
        Err(e) => {
            r.faults.push(fault(
                FaultKind::Handshake,
                format!("cannot dial {addr}: {e}"),
            ));
            return;
        }
    };
    let conn = match tokio::time::timeout(cx.timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            r.faults.push(match record.take() {
                Some(f) => trust_fault(p, f),
                None => quic_close_fault(cx, p, addr, &e),
            });
            return;
        }
        Err(_) => {
            r.faults.push(match record.take() {
                Some(f) => trust_fault(p, f),
                None => fault(
                    FaultKind::PeerDown,
                    format!(
                        "no QUIC answer from {addr} within {:?}: is {d}'s node running with \
                         listen.quic there, and is that UDP port open?",
                        cx.timeout
                    ),
                ),
            });
            return;
        }
    };
    // A refusal of our certificate arrives right after the handshake, as the server closes.
    let settle = (cx.timeout / 4).min(Duration::from_secs(1));
    if let Ok(e) = tokio::time::timeout(settle, conn.closed()).await {
        r.faults.push(quic_close_fault(cx, p, addr, &e));
        return;
    }
    let chain: Vec<CertificateDer<'static>> = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default();
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    r.rtt_ms = Some(ms(conn.rtt()));
    r.rtt_of = Some("QUIC estimate".to_owned());
    match cx.trust.verify_server(d, &chain, UnixTime::now()) {
        Ok(mode) => {
            r.identity = Some(identity(d, mode, addr, alpn, &chain));
            expiry_warning(r);
        }
        Err(f) => r.faults.push(trust_fault(p, f)),
    }
    conn.close(0u32.into(), b"check done");
    let _ = tokio::time::timeout(settle, endpoint.wait_idle()).await;
}

async fn resolve_quic(addr: &PeerAddr) -> std::io::Result<SocketAddr> {
    let all = addr.resolve().await?;
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| std::io::ErrorKind::NotFound.into())
}

fn quic_close_fault(
    cx: &Cx,
    p: &PeerConfig,
    addr: SocketAddr,
    e: &quinn::ConnectionError,
) -> Fault {
    let d = &p.domain;
    match e {
        // A TLS alert from the peer: it refused our certificate (or the handshake).
        quinn::ConnectionError::ConnectionClosed(close) => Fault {
            kind: FaultKind::RefusedByPeer,
            message: format!(
                "{d} closed the connection ({close}): it refused our certificate? give them \
                 ours ({}) to pin, or the CA that issued it, and check they list {} as a peer",
                cx.cfg.cert.display(),
                cx.cfg.domain
            ),
        },
        quinn::ConnectionError::TimedOut => Fault {
            kind: FaultKind::PeerDown,
            message: format!(
                "no QUIC answer from {addr}: is {d}'s node running with listen.quic there, and \
                 is that UDP port open?"
            ),
        },
        other => Fault {
            kind: FaultKind::Handshake,
            message: format!("the QUIC handshake with {addr} failed: {other}"),
        },
    }
}
