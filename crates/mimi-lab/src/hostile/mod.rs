//! `mimi-relay bench --hostile flood`: one follower's identity floods the hub while the other
//! follower's traffic is measured, and the same row runs without the flood.
//!
//! The flooder runs in the lab's process on a thread of its own (one core at most, its own
//! runtime, so it never delays the driver's tasks), on CPUs apart from the hub's (`cpus.rs`
//! says why), speaks the hub's transport directly with
//! the flooding provider's own certificate and key (`c.example`, from the row's config
//! directory), and keeps several connections busy at once ("lanes"), each with one kind of
//! abuse:
//! - **valid**: well-formed requests that cost the hub work, pipelined: submissions to a room
//!   the flooder follows (accepted, small and large), to the victim's room (it is not a member),
//!   to an unknown room, `/notify` and `/update` for the victim's room, and undecodable bodies;
//! - **oversize**: bodies one byte over `max_body` (or over the transport's frame cap);
//! - **partial**: requests whose body starts and never ends, left open until the hub gives up;
//! - **malformed**: what the transport's own parser must refuse (bad paths and endpoints, bad
//!   XML, bad JSON, unknown frame kinds, garbage after the handshake).
//!
//! One lane more than `max_conns_per_peer` allows is started, so the connection cap is tried
//! too. Every answer is tallied by status (or by how the hub ended the stream).

mod cpus;
mod https;
mod matrix;
mod quic;
mod xmpp;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use mimi_wire::uri::ProviderDomain;
use relay_core::TransportKind;
use relay_tls::{PeerTrust, TlsIdentity};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{lock, netlab};

pub use crate::model::Placement;
pub use crate::model::{CpuShares, FloodCounts, Hostile, HostileLimits};
pub(crate) use crate::model::{LIMITS, P99_TARGET, RATE_TARGET};
pub(crate) use cpus::{allowed, spawn_pinned};

/// Which run of a transport a row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    /// The ordinary lab row.
    Normal,
    /// Hostile layout (victim and flooder followers, the hostile `[limits]`), no flood.
    Quiet,
    /// The same with the flood.
    Flood,
}

impl Variant {
    pub(crate) fn label(self) -> Option<&'static str> {
        match self {
            Variant::Normal => None,
            Variant::Quiet => Some("quiet"),
            Variant::Flood => Some("flood"),
        }
    }
}

/// The hub's `[limits]` in a hostile row, as its config file has them.
pub(crate) fn limits_section(l: &HostileLimits) -> crate::fleet::RawLimits {
    crate::fleet::RawLimits {
        max_body: Some(l.max_body),
        max_peer_bytes: Some(l.max_peer_bytes),
        max_conns_per_peer: Some(l.max_conns_per_peer),
        frame_deadline_ms: Some(l.frame_deadline_ms),
        max_inbox: Some(l.max_inbox),
        ..Default::default()
    }
}

/// Outcome keys that are not HTTP statuses.
pub(crate) const ACCEPTED: &str = "200 accepted";
pub(crate) const NOT_ALLOWED: &str = "200 refused";

/// The flooder's running tally, shared by its lanes.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    sent: AtomicU64,
    connections: AtomicU64,
    outcomes: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    pub(crate) fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn outcome(&self, key: &str) {
        let mut m = lock(&self.outcomes);
        match m.get_mut(key) {
            Some(v) => *v += 1,
            None => {
                m.insert(key.to_owned(), 1);
            }
        }
    }

    /// An HTTP/2 exchange that ended without an answer (HTTPS and Matrix flooders): tallied
    /// by cause; `false` when the connection is gone.
    pub(crate) fn h2_failure(&self, err: Option<&hyper::Error>, conn_closed: bool) -> bool {
        match err {
            Some(e) => {
                self.outcome(if e.is_closed() || e.is_canceled() {
                    "connection closed"
                } else {
                    "stream reset"
                });
                !conn_closed
            }
            None => {
                self.outcome("no answer");
                true
            }
        }
    }

    /// An HTTP-style status; a 200 to a submission or an update is told apart by its body.
    pub(crate) fn status(&self, code: u16, reply: Reply, body: &[u8]) {
        match (code, reply) {
            (200, Some(e)) => self.outcome(mimi_outcome(e, body)),
            _ => self.outcome(&code.to_string()),
        }
    }

    fn counts(&self) -> FloodCounts {
        let by_outcome = lock(&self.outcomes).clone();
        let mut c = FloodCounts {
            sent: self.sent.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            ..FloodCounts::default()
        };
        for (k, v) in &by_outcome {
            match k.as_bytes().first() {
                _ if k == NOT_ALLOWED => c.refused_2xx += v,
                Some(b'2') => c.accepted += v,
                Some(b'4') => c.refused_4xx += v,
                Some(b'5') => c.refused_5xx += v,
                _ => c.reset += v,
            }
        }
        c.by_outcome = by_outcome;
        c
    }
}

/// Which MIMI response a 200 answer carries, when its body tells acceptance from refusal.
pub(crate) type Reply = Option<mimi_wire::endpoint::Endpoint>;

/// A 200 answer to a submission or update: accepted, or refused inside the MIMI response.
fn mimi_outcome(endpoint: mimi_wire::endpoint::Endpoint, body: &[u8]) -> &'static str {
    use mimi_wire::endpoint::Endpoint;
    use mimi_wire::proto::{
        SubmitMessageResponse, SubmitStatus, UpdateOutcome, UpdateRoomResponse,
    };
    let accepted = match endpoint {
        Endpoint::SubmitMessage => matches!(
            SubmitMessageResponse::decode(body).map(|r| r.status),
            Ok(SubmitStatus::Accepted { .. })
        ),
        Endpoint::Update => matches!(
            UpdateRoomResponse::decode(body).map(|r| r.outcome),
            Ok(UpdateOutcome::Success { .. })
        ),
        _ => true,
    };
    if accepted { ACCEPTED } else { NOT_ALLOWED }
}

/// Everything the flooder needs to reach the hub as the flooding follower.
#[derive(Clone)]
pub(crate) struct FloodTarget {
    pub kind: TransportKind,
    pub hub: ProviderDomain,
    pub hub_addr: SocketAddr,
    /// Trusts the hub's certificate (pinned, as its peers do).
    pub trust: PeerTrust,
    /// The flooding provider's TLS identity (its key and certificate from the config dir).
    pub identity: TlsIdentity,
    /// A room the flooder follows (its submissions there are accepted).
    pub member_room: String,
    /// A room of the victim's that the flooder is not a member of.
    pub victim_room: String,
    pub limits: HostileLimits,
    /// The namespace the flooder's sockets live in (the flooding follower's), with the lab.
    pub netns: Option<String>,
    /// The attacker's CPUs ([`Placement`]); the flooder's thread pins itself there.
    pub cpus: Option<Vec<usize>>,
}

impl FloodTarget {
    /// The flooding provider's domain.
    pub(crate) fn me(&self) -> &ProviderDomain {
        &self.identity.domain
    }

    /// A TCP connection to the hub's listener, from the flooder's namespace.
    pub(crate) async fn tcp(&self) -> std::io::Result<TcpStream> {
        let addr = self.hub_addr;
        let s = match &self.netns {
            None => TcpStream::connect(addr).await?,
            Some(path) => {
                let path = path.clone();
                let s = tokio::task::spawn_blocking(move || {
                    netlab::in_namespace(&path, move || {
                        let s = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
                        s.set_nonblocking(true)?;
                        Ok(s)
                    })
                })
                .await
                .map_err(std::io::Error::other)?
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
                TcpStream::from_std(s)?
            }
        };
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// A mutual-TLS connection to the hub with `alpn`.
    pub(crate) async fn tls(
        &self,
        alpn: &[u8],
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let cfg = relay_tls::client_config(&self.identity, &self.trust, vec![alpn.to_vec()])?;
        let name = rustls::pki_types::ServerName::try_from(self.hub.as_str().to_owned())?;
        let tcp = self.tcp().await?;
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
        )
        .await
        .map_err(|_| anyhow!("tls handshake timed out"))??;
        Ok(tls)
    }
}

/// How long a connect or handshake may take before the lane tries again.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a lane waits before it reconnects after the hub refused or closed a connection.
pub(crate) const RECONNECT_PAUSE: Duration = Duration::from_millis(20);
/// Requests a pipelining lane keeps in flight.
pub(crate) const DEPTH: usize = 16;
/// Requests the partial lane keeps open at once.
pub(crate) const PARTIAL_OPEN: usize = 8;
/// Size of the "large" valid submissions (under the cap).
pub(crate) const LARGE: usize = 256 << 10;
/// Size of the small valid submissions.
pub(crate) const SMALL: usize = 1024;

/// The kinds of lane; `lanes()` gives the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    Valid,
    Oversize,
    Partial,
    Malformed,
}

/// The lanes of a flood: one more connection than the hub allows a peer. The one over the cap
/// is a valid lane that starts last (after [`SURPLUS_DELAY`]), so that every kind of abuse
/// holds a connection first and the surplus one retries its way in whenever another closes.
pub(crate) fn lanes(limits: &HostileLimits) -> Vec<Lane> {
    let mut v = vec![Lane::Oversize, Lane::Partial, Lane::Malformed];
    while v.len() < limits.max_conns_per_peer {
        v.insert(0, Lane::Valid);
    }
    v.push(Lane::Valid);
    v
}

/// How long the lanes over the connection cap wait before they start.
pub(crate) const SURPLUS_DELAY: Duration = Duration::from_millis(500);

/// One valid-but-expensive request of the mix.
#[derive(Clone, Debug)]
pub(crate) struct Shot {
    pub endpoint: mimi_wire::endpoint::Endpoint,
    pub target: String,
    pub seq: Option<u64>,
    pub body: Bytes,
}

impl Shot {
    /// What its 200 answer carries.
    pub(crate) fn reply(&self) -> Reply {
        use mimi_wire::endpoint::Endpoint;
        matches!(self.endpoint, Endpoint::SubmitMessage | Endpoint::Update).then_some(self.endpoint)
    }
}

/// The valid lane's requests, in turn: each submission distinct, so none is answered from the
/// hub's duplicate window.
pub(crate) struct Mix {
    n: u64,
    rng: u64,
    junk: Bytes,
}

impl Mix {
    pub(crate) fn new(seed: u64) -> Mix {
        let mut rng = seed | 1;
        let junk = Bytes::from(super::ciphertext([0x5a; 20], SMALL, &mut rng));
        Mix { n: 0, rng, junk }
    }

    pub(crate) fn next(&mut self, t: &FloodTarget) -> Shot {
        use mimi_wire::endpoint::Endpoint;
        let k = self.n;
        self.n += 1;
        let unknown = format!("mimi://{}/r/no-such-room", t.hub);
        let (endpoint, target, body, seq) = match k % 8 {
            0 => (
                Endpoint::SubmitMessage,
                &t.member_room,
                self.submit(t, SMALL),
                None,
            ),
            1 => (
                Endpoint::SubmitMessage,
                &t.member_room,
                self.submit(t, LARGE),
                None,
            ),
            2 => (
                Endpoint::SubmitMessage,
                &t.victim_room,
                self.submit(t, SMALL),
                None,
            ),
            3 => (
                Endpoint::SubmitMessage,
                &t.victim_room,
                self.submit(t, LARGE),
                None,
            ),
            4 => (Endpoint::Notify, &t.victim_room, self.junk.clone(), Some(k)),
            5 => (
                Endpoint::SubmitMessage,
                &unknown,
                self.submit(t, SMALL),
                None,
            ),
            6 => (Endpoint::Update, &t.victim_room, self.junk.clone(), None),
            _ => (
                Endpoint::SubmitMessage,
                &t.victim_room,
                self.junk.clone(),
                None,
            ),
        };
        Shot {
            endpoint,
            target: target.clone(),
            seq,
            body,
        }
    }

    /// A valid SubmitMessageRequest of about `size` bytes from one of the flooder's users.
    fn submit(&mut self, t: &FloodTarget, size: usize) -> Bytes {
        let mut marker = [0u8; 20];
        marker[..8].copy_from_slice(b"FLOODMSG");
        marker[8..16].copy_from_slice(&self.n.to_be_bytes());
        let ct = super::ciphertext(marker, size, &mut self.rng);
        let mls = mimi_wire::mls::private_message(b"flood", 1, &ct);
        mimi_wire::proto::SubmitMessageRequest::mls10(mls, format!("mimi://{}/u/flood", t.me()))
            .and_then(|r| r.encode())
            .map(Bytes::from)
            .unwrap_or_else(|_| self.junk.clone())
    }
}

/// A flood in progress.
pub(crate) struct Flood {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<(Option<u64>, Option<String>)>>,
    tally: Arc<Tally>,
}

impl Flood {
    /// Starts flooding `t` on a thread of its own.
    pub(crate) fn start(t: FloodTarget) -> Result<Flood> {
        let (stop, stopped) = watch::channel(false);
        let tally = Arc::new(Tally::default());
        let tl = tally.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("flooder runtime")?;
        let thread = std::thread::Builder::new()
            .name("flooder".into())
            .spawn(move || {
                // Before anything starts: the runtime's blocking threads inherit the mask.
                if let Some(cpus) = &t.cpus
                    && let Err(e) = cpus::pin_this_thread(cpus)
                {
                    eprintln!("warning: the flooder could not take its own CPUs: {e}");
                }
                let mask = allowed("/proc/thread-self/status");
                let cpu0 = super::cpu_us_at("/proc/thread-self/stat");
                rt.block_on(async move {
                    let mut stopped = stopped;
                    let flood = async {
                        match t.kind {
                            TransportKind::Https => https::flood(&t, &tl).await,
                            TransportKind::Quic => quic::flood(&t, &tl).await,
                            TransportKind::Xmpp => xmpp::flood(&t, &tl).await,
                            TransportKind::Matrix => matrix::flood(&t, &tl).await,
                            _ => {}
                        }
                    };
                    tokio::select! {
                        () = flood => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
                let cpu1 = super::cpu_us_at("/proc/thread-self/stat");
                // Dropping the runtime drops every lane and closes its connections.
                drop(rt);
                (cpu1.zip(cpu0).map(|(b, a)| b.saturating_sub(a)), mask)
            })
            .context("starting the flooder thread")?;
        Ok(Flood {
            stop,
            thread: Some(thread),
            tally,
        })
    }

    /// Stops the flood and returns its counts.
    pub(crate) async fn stop(mut self) -> FloodCounts {
        let _ = self.stop.send(true);
        let (cpu, mask) = match self.thread.take() {
            Some(h) => tokio::task::spawn_blocking(move || h.join().unwrap_or((None, None)))
                .await
                .unwrap_or((None, None)),
            None => (None, None),
        };
        let mut c = self.tally.counts();
        c.flooder_cpu_ms = cpu.map(|us| us / 1000);
        c.flooder_cpus = mask;
        c
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Runs `f` for each lane until the flood is stopped (the lanes loop forever).
pub(crate) async fn run_lanes<F, Fut>(t: &FloodTarget, f: F)
where
    F: Fn(Lane, usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let lanes = lanes(&t.limits);
    let cap = t.limits.max_conns_per_peer;
    let f = &f;
    futures::future::join_all(lanes.into_iter().enumerate().map(|(i, l)| async move {
        if i >= cap {
            tokio::time::sleep(SURPLUS_DELAY).await;
        }
        f(l, i).await;
    }))
    .await;
}

/// CPU counters at one moment: the machine's (from /proc/stat, in USER_HZ ticks) and those of
/// the row's processes.
#[derive(Clone, Debug)]
pub(crate) struct MachineCpu {
    busy_ticks: u64,
    total_ticks: u64,
    hub_us: u64,
    nodes_us: u64,
    lab_us: u64,
}

impl MachineCpu {
    /// `pids[0]` is the hub.
    pub(crate) fn now(pids: &[u32]) -> Option<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0);
        let total: u64 = ticks.iter().take(8).sum();
        Some(MachineCpu {
            busy_ticks: total.saturating_sub(idle),
            total_ticks: total,
            hub_us: super::cpu_us(*pids.first()?)?,
            nodes_us: pids.iter().filter_map(|p| super::cpu_us(*p)).sum(),
            lab_us: super::cpu_us_at("/proc/self/stat")?,
        })
    }

    pub(crate) fn since(&self, a: &MachineCpu) -> CpuShares {
        // All cores' time over the interval, in µs (a tick is 10 ms).
        let total_us = (self.total_ticks.saturating_sub(a.total_ticks) * 10_000).max(1) as f64;
        let share = |x: u64, y: u64| x.saturating_sub(y) as f64 / total_us;
        let busy = share(self.busy_ticks * 10_000, a.busy_ticks * 10_000);
        let nodes = share(self.nodes_us, a.nodes_us);
        let lab = share(self.lab_us, a.lab_us);
        CpuShares {
            machine_busy: busy,
            hub: share(self.hub_us, a.hub_us),
            nodes,
            lab,
            others: (busy - nodes - lab).max(0.0),
        }
    }
}

/// The peak resident set (VmHWM) of process `pid`, in bytes.
pub(crate) fn peak_rss(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:").map(|kb| kb * 1024)
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The refusal counters of a node's `/metrics` that are not zero: adapter budgets, ingress
/// shares, core rejects and failed handshakes, by their label sets.
pub(crate) fn refusal_metrics(text: &str) -> BTreeMap<String, u64> {
    const NAMES: [&str; 4] = [
        "mimi_relay_budget_refusals_total",
        "mimi_relay_ingress_refusals_total",
        "mimi_relay_rejects_total",
        "mimi_relay_failed_handshakes_total",
    ];
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || !NAMES.iter().any(|n| line.starts_with(n)) {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let v = value.parse::<f64>().unwrap_or(0.0);
        if v > 0.0 {
            let short = name.strip_prefix("mimi_relay_").unwrap_or(name);
            out.insert(short.to_owned(), v as u64);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use mimi_wire::endpoint::Endpoint;
    use mimi_wire::proto::UpdateRoomResponse;

    #[test]
    fn tally_sorts_answers_into_classes() {
        let t = Tally::default();
        t.sent(7);
        let accepted = mimi_wire::proto::SubmitMessageResponse::accepted(5)
            .encode()
            .unwrap();
        let refused = mimi_wire::proto::SubmitMessageResponse::not_allowed()
            .encode()
            .unwrap();
        let (submit, update) = (Some(Endpoint::SubmitMessage), Some(Endpoint::Update));
        t.status(200, submit, &accepted);
        t.status(200, submit, &refused);
        t.status(
            200,
            update,
            &UpdateRoomResponse::not_allowed("no").encode().unwrap(),
        );
        t.status(201, None, b"");
        t.status(413, None, b"");
        t.status(429, None, b"");
        t.status(503, None, b"");
        t.outcome("xmpp policy-violation");
        let c = t.counts();
        assert_eq!(c.sent, 7);
        assert_eq!((c.accepted, c.refused_2xx), (2, 2));
        assert_eq!((c.refused_4xx, c.refused_5xx, c.reset), (2, 1, 1));
        assert_eq!(c.refused(), 6);
        assert_eq!(c.by_outcome[ACCEPTED], 1);
        assert_eq!(c.by_outcome[NOT_ALLOWED], 2);
    }

    #[test]
    fn refusal_metrics_keep_the_nonzero_counters_with_their_labels() {
        let text = "# HELP mimi_relay_budget_refusals_total x\n\
            mimi_relay_budget_refusals_total{transport=\"https\",budget=\"peer_bytes\"} 12\n\
            mimi_relay_budget_refusals_total{transport=\"https\",budget=\"streams\"} 0\n\
            mimi_relay_ingress_refusals_total{cause=\"peer_share\"} 3\n\
            mimi_relay_accepted_total 99\n";
        let m = refusal_metrics(text);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(
            m["budget_refusals_total{transport=\"https\",budget=\"peer_bytes\"}"],
            12
        );
        assert_eq!(m["ingress_refusals_total{cause=\"peer_share\"}"], 3);
    }

    #[test]
    fn lanes_try_one_connection_over_the_cap() {
        let l = lanes(&LIMITS);
        assert_eq!(l.len(), LIMITS.max_conns_per_peer + 1);
        assert_eq!(
            l.last(),
            Some(&Lane::Valid),
            "the surplus lane floods when it gets in"
        );
        for k in [Lane::Valid, Lane::Oversize, Lane::Partial, Lane::Malformed] {
            assert!(l.contains(&k), "{k:?} in {l:?}");
        }
    }

    #[test]
    fn the_budget_counts_every_configured_bound() {
        let l = LIMITS;
        let https = l.allowance(TransportKind::Https, 2);
        assert_eq!(
            https,
            2 * (8 << 20) + 2 * 4 * (16 << 20) + 64 * (1 << 20),
            "peers x max_peer_bytes + peers x conns x window + max_inbox x max_body"
        );
        assert!(l.allowance(TransportKind::Xmpp, 2) < https);
    }

    #[test]
    fn cpu_shares_split_the_machine_between_the_lab_and_others() {
        let at = |busy, total, hub, nodes, lab| MachineCpu {
            busy_ticks: busy,
            total_ticks: total,
            hub_us: hub,
            nodes_us: nodes,
            lab_us: lab,
        };
        let a = at(100, 1000, 7, 9, 11);
        // 4 s of core time (two cores, 2 s), 3 s of it busy: 1.5 s the nodes' (1 s the
        // hub's), 0.5 s the lab's, so 1 s someone else's.
        let b = at(400, 1400, 7 + 1_000_000, 9 + 1_500_000, 11 + 500_000);
        let c = b.since(&a);
        let near = |x: f64, y: f64| (x - y).abs() < 1e-9;
        assert!(near(c.machine_busy, 0.75), "{c:?}");
        assert!(
            near(c.hub, 0.25) && near(c.nodes, 0.375) && near(c.lab, 0.125),
            "{c:?}"
        );
        assert!(near(c.others, 0.25), "{c:?}");
        assert!(MachineCpu::now(&[std::process::id()]).is_some());
    }

    #[test]
    fn peak_rss_of_this_process_is_known() {
        let rss = peak_rss(std::process::id()).unwrap();
        assert!(rss > 1 << 20, "{rss}");
    }
}
