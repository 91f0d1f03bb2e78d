//! The demo: three provider nodes as separate processes on loopback, one room hosted by
//! a.example with b.example and c.example as followers, messages submitted from every provider,
//! and a count of what arrived where. The hub fans every message out to every provider in the
//! room, the sender's own included (protocol-06 §5.5), so the `clients` senders of one
//! provider read each other's messages through the relay.
//!
//! Each sender submits its messages one after another (the next once the hub accepted the
//! previous), so the order of one sender's messages at every receiver must be the order they
//! were sent in. Latency is from the first submission attempt to the receiving provider's
//! inbox, as seen by the local reader.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use mimi_wire::uri::RoomId;
use relay_core::TransportKind;
use relay_node::client::LocalClient;
use serde::Serialize;

use crate::fleet;

const MAGIC: &[u8; 4] = b"MDMO";
const PROVIDERS: [&str; 3] = ["a.example", "b.example", "c.example"];
const ROOM: &str = "mimi://a.example/r/clubhouse";
/// The MLS room of the scenario phase.
const MLS_ROOM: &str = "mimi://a.example/r/mls-demo";

/// How the demo starts its nodes (the lab's own launcher).
pub use crate::fleet::Launcher;

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub messages: usize,
    pub transport: String,
    /// `durable` (the default) or `memory`.
    pub store: String,
    pub chaos: bool,
    /// Which provider chaos kills: 0 = a.example (the hub), 1 = b.example, 2 = c.example.
    pub chaos_node: usize,
    /// Senders per provider.
    pub clients: usize,
    pub payload: usize,
    /// Working directory; a fresh temporary one when None.
    pub dir: Option<PathBuf>,
    pub keep: bool,
    /// How long to wait for the last deliveries after the last submission.
    pub settle: Duration,
    pub progress: bool,
    /// Run the MLS scenario (openmls clients, hub validation) before the load phase.
    pub mls: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            messages: 1000,
            transport: "mixed".into(),
            store: "durable".into(),
            chaos: false,
            chaos_node: 1,
            clients: 4,
            payload: 1024,
            dir: None,
            keep: false,
            settle: Duration::from_secs(60),
            progress: false,
            mls: true,
        }
    }
}

/// The demo's figures. `expected` counts every (message, receiving provider) delivery that
/// should happen (three per message: every provider, the sender's included); `delivered` the
/// distinct ones that did.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub transport: String,
    pub store: String,
    pub sent: u64,
    pub expected: u64,
    pub delivered: u64,
    /// Of `delivered`, those to the sender's own provider (its other users read them there).
    pub same_provider: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub msgs_per_s: f64,
    pub chaos_kills: u32,
    pub chaos_victim: String,
    pub submit_retries: u64,
    pub elapsed_ms: u64,
    /// Nodes that did not exit with success within 10 s of SIGTERM at the end.
    pub unclean_shutdowns: u32,
    /// Epochs the MLS room went through (empty when the MLS phase did not run).
    pub mls_epochs: Vec<u64>,
    /// MLS messages sent, and summed over receivers, decrypted exactly as sent.
    pub mls_messages: u64,
    pub mls_decrypted: u64,
    /// Of those, decryptions by a user of the sender's own provider (bob and dave, b.example).
    pub mls_same_provider: u64,
    /// MLS senders that saw their own message fanned back by the hub.
    pub mls_own_echoes: u64,
    /// MLS messages or handshakes a client could not apply or decrypt as sent (must be 0).
    pub decrypt_failures: u64,
    /// Wall time of the MLS phase.
    pub mls_ms: u64,
    /// The MLS room's final participant list (user URI, role index), as its creator sees it.
    pub participants: Vec<(String, u32)>,
    /// Summed over the three nodes' metrics after the MLS phase: handshakes and submissions
    /// the hubs' room policy refused, key claims served, claims refused for want of consent,
    /// and application messages a hub franked.
    pub policy_rejections: u64,
    pub key_claims: u64,
    pub consent_denials: u64,
    pub franks_issued: u64,
    /// Received MLS messages whose hub Frank the receiving client verified (protocol-06
    /// §5.4.1.3); one that does not verify counts in `decrypt_failures`.
    pub franks_verified: u64,
    /// Abuse reports a receiver sent with the frank it kept, which the hub verified and took
    /// (a forged one is refused and listed in `refusals`).
    pub abuse_reports: u64,
    /// What the refusals the scenario provoked on purpose said.
    pub refusals: Vec<String>,
    /// Why the MLS phase stopped, if it did not finish.
    pub mls_error: Option<String>,
}

impl DemoReport {
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.delivered == self.expected
            && self.unclean_shutdowns == 0
            && self.decrypt_failures == 0
            && self.mls_error.is_none()
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "mimi-relay demo: 3 providers on loopback, room {ROOM} hosted by a.example"
        );
        let _ = writeln!(
            s,
            "  transport      {}{} (store: {})",
            self.transport,
            if self.transport == "mixed" {
                ": a-b over quic, a-c over https, b-c over xmpp"
            } else {
                ""
            },
            self.store
        );
        if !self.mls_epochs.is_empty() || self.mls_error.is_some() {
            let _ = writeln!(
                s,
                "  mls room       {MLS_ROOM}: alice@a adds bob@b, dave@b and carol@c (key material via \
                 the hub), texts, a reply, reactions, carol removed"
            );
            let _ = writeln!(
                s,
                "  mls            epochs {:?}; {} messages, {} decryptions as sent ({} between bob and dave \
                 of one provider), {} own echoes, {} failures; {} ms{}",
                self.mls_epochs,
                self.mls_messages,
                self.mls_decrypted,
                self.mls_same_provider,
                self.mls_own_echoes,
                self.decrypt_failures,
                self.mls_ms,
                self.mls_error
                    .as_deref()
                    .map(|e| format!("; STOPPED: {e}"))
                    .unwrap_or_default()
            );
            let _ = writeln!(
                s,
                "  room state     participants {}; the relays counted {} policy rejections, {} key \
                 claims served, {} consent denials, {} franks issued; receivers verified {} franks and \
                 reported {} message(s) with the frank they kept",
                self.participants
                    .iter()
                    .map(|(u, r)| format!("{u} (role {r})"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.policy_rejections,
                self.key_claims,
                self.consent_denials,
                self.franks_issued,
                self.franks_verified,
                self.abuse_reports
            );
            for r in &self.refusals {
                let _ = writeln!(s, "  refused        {r}");
            }
        }
        let _ = writeln!(
            s,
            "  sent           {} messages (~1 KiB each, opaque payloads) from a, b and c",
            self.sent
        );
        let _ = writeln!(
            s,
            "  delivered      {} of {} expected deliveries ({} to the sender's own provider)",
            self.delivered, self.expected, self.same_provider
        );
        let _ = writeln!(
            s,
            "  lost / dup / out of order   {} / {} / {}",
            self.lost, self.duplicated, self.out_of_order
        );
        let _ = writeln!(
            s,
            "  latency        p50 {} us, p99 {} us (submit -> receiving provider)",
            self.p50_us, self.p99_us
        );
        let _ = writeln!(
            s,
            "  throughput     {:.0} deliveries/s over {} ms",
            self.msgs_per_s, self.elapsed_ms
        );
        if self.chaos_kills > 0 {
            let _ = writeln!(
                s,
                "  chaos          {} killed with SIGKILL {} times and restarted; {} submissions retried",
                self.chaos_victim, self.chaos_kills, self.submit_retries
            );
        }
        if self.unclean_shutdowns > 0 {
            let _ = writeln!(
                s,
                "  shutdown       {} node(s) did not exit cleanly within 10 s of SIGTERM",
                self.unclean_shutdowns
            );
        }
        let _ = writeln!(
            s,
            "  result         {}",
            if self.is_clean() {
                "OK: nothing lost, nothing twice, all in order"
            } else {
                "FAILED"
            }
        );
        s
    }
}

/// The three providers' files: one config per provider and the API addresses.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub configs: Vec<PathBuf>,
    pub admins: Vec<SocketAddr>,
}

/// Free loopback ports, each kept bound until the holder is dropped: a port let go at once
/// may be handed out again by the next bind, and two nodes then get the same one (the second
/// fails to start while the first answers its health checks).
#[derive(Default)]
struct FreePorts {
    tcp: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
}

impl FreePorts {
    fn tcp(&mut self) -> Result<u16> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        self.tcp.push(l);
        Ok(port)
    }

    fn udp(&mut self) -> Result<u16> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        let port = s.local_addr()?.port();
        self.udp.push(s);
        Ok(port)
    }
}

/// The transport each pair of providers uses: one kind everywhere, or the mixed room.
fn pair_transport(transport: &str, i: usize, j: usize) -> Result<TransportKind> {
    Ok(match transport {
        // Every pair on its own transport: a-b over QUIC, a-c over the draft's HTTPS, b-c over
        // direct XMPP (the rooms are hosted at a, so b-c carries what b and c say to each
        // other directly, such as consent).
        "mixed" if i.min(j) == 0 && i.max(j) == 2 => TransportKind::Https,
        "mixed" if i.min(j) == 1 => TransportKind::Xmpp,
        "mixed" => TransportKind::Quic,
        t => t.parse()?,
    })
}

/// A line for the terminal when the kernel keeps UDP socket buffers under what the QUIC
/// endpoint asks for: the nodes log it only to their own files. A socket of this process gets
/// what theirs will, since they run as the same user.
pub fn udp_buffer_note() -> Option<String> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    let got = relay_quic::socket::enlarge_buffers(&socket).ok()?;
    got.shortfall().map(|advice| format!("note: {advice}"))
}

/// Writes certificates and the three node configs; with `static_room`, a.example hosts the
/// opaque-payload room (the load mode) from its config.
pub fn prepare(dir: &Path, transport: &str, store: &str, static_room: bool) -> Result<Layout> {
    fleet::write_certs(dir, PROVIDERS)?;
    // Every node listens on each transport the room uses; each pair uses the one chosen for it.
    let mut kinds = BTreeSet::new();
    for i in 0..PROVIDERS.len() {
        for j in 0..PROVIDERS.len() {
            if i != j {
                kinds.insert(pair_transport(transport, i, j)?);
            }
        }
    }
    let mut admins_ports = Vec::new();
    let mut ports: Vec<BTreeMap<TransportKind, u16>> = Vec::new();
    let mut free = FreePorts::default();
    for _ in PROVIDERS {
        admins_ports.push(free.tcp()?);
        let mut m = BTreeMap::new();
        for &k in &kinds {
            let port = if k == TransportKind::Quic {
                free.udp()?
            } else {
                free.tcp()?
            };
            m.insert(k, port);
        }
        ports.push(m);
    }
    // Let go before the nodes start and bind them.
    drop(free);
    let mut configs = Vec::new();
    let mut admins = Vec::new();
    for (i, p) in PROVIDERS.iter().enumerate() {
        let admin = admins_ports[i];
        let mut f = fleet::node_file(p, admin, store);
        // The followers' users take part in the load room from the start.
        if i != 0 && static_room {
            f.node.follows = vec![ROOM.to_owned()];
        }
        for (k, port) in &ports[i] {
            fleet::listen(&mut f, *k, SocketAddr::from(([127, 0, 0, 1], *port)))?;
        }
        for (j, q) in PROVIDERS.iter().enumerate() {
            if i != j {
                let via = pair_transport(transport, i, j)?;
                let port = ports[j][&via];
                f.peers.push(fleet::peer(
                    q,
                    via,
                    SocketAddr::from(([127, 0, 0, 1], port)),
                ));
            }
        }
        if i == 0 && static_room {
            f.rooms.push(fleet::room(
                ROOM,
                ["b.example".to_owned(), "c.example".to_owned()],
            ));
        }
        let path = dir.join(format!("{p}.toml"));
        fleet::write_config(&path, &f)?;
        configs.push(path);
        admins.push(SocketAddr::from(([127, 0, 0, 1], admin)));
    }
    Ok(Layout {
        dir: dir.to_path_buf(),
        configs,
        admins,
    })
}

struct Nodes {
    launcher: Launcher,
    layout: Layout,
    children: Vec<Option<Child>>,
}

impl Nodes {
    fn spawn(&mut self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.layout.dir.join(format!("{}.log", PROVIDERS[i])))?;
        let mut cmd = self
            .launcher
            .command(&self.layout.configs[i], log, None, "info")?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.launcher.program.display()))?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn kill9(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.children[i].take() {
            c.kill()?; // SIGKILL on Unix
            c.wait()?;
        }
        Ok(())
    }

    async fn wait_healthy(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut client = LocalClient::new(self.layout.admins[i]);
        loop {
            let answered = matches!(client.get("/healthz").await, Ok((s, _)) if s.is_success());
            // An answer while the node has exited came from something else on its port.
            let exited = match self.children[i].as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if answered && exited.is_none() {
                return Ok(());
            }
            if let Some(status) = exited {
                let log = self.layout.dir.join(format!("{}.log", PROVIDERS[i]));
                bail!(
                    "{} exited with {status} at start; its log ends:\n{}",
                    PROVIDERS[i],
                    fleet::log_tail(&log, 10)
                );
            }
            if Instant::now() > deadline {
                bail!("{} did not become healthy within {timeout:?}", PROVIDERS[i]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM to every node (graceful shutdown), then SIGKILL whatever is still running
    /// after 10 s. Returns how many nodes did not exit cleanly on SIGTERM.
    fn stop_all(&mut self) -> usize {
        let unclean = fleet::stop(self.children.iter_mut().flatten(), Duration::from_secs(10));
        self.children.iter_mut().for_each(|slot| *slot = None);
        unclean
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = self.stop_all();
    }
}

/// A SubmitMessageRequest whose ciphertext carries (sender id, counter).
fn message(provider: &str, sender: u32, counter: u32, size: usize, rng: &mut u64) -> Bytes {
    let mut ct = Vec::with_capacity(size.max(12));
    ct.extend_from_slice(MAGIC);
    ct.extend_from_slice(&sender.to_be_bytes());
    ct.extend_from_slice(&counter.to_be_bytes());
    while ct.len() < size {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        ct.extend_from_slice(&rng.to_le_bytes());
    }
    ct.truncate(size.max(12));
    let mls = mimi_wire::mls::private_message(b"clubhouse-group", 1, &ct);
    let req = mimi_wire::proto::SubmitMessageRequest::mls10(
        mls,
        format!("mimi://{provider}/u/sender{sender}"),
    )
    .expect("a private application message we just built");
    Bytes::from(req.encode().expect("encoding a request we just built"))
}

fn marker(fanout: &[u8]) -> Option<(u32, u32)> {
    let at = fanout.windows(4).position(|w| w == MAGIC)?;
    let s = u32::from_be_bytes(fanout.get(at + 4..at + 8)?.try_into().ok()?);
    let c = u32::from_be_bytes(fanout.get(at + 8..at + 12)?.try_into().ok()?);
    Some((s, c))
}

#[derive(Default)]
struct Tally {
    /// (sender, counter) -> first submission time.
    sent_at: HashMap<(u32, u32), Instant>,
    accepted: u64,
    retries: u64,
    /// Per receiver: distinct (sender, counter) seen.
    seen: Vec<HashSet<(u32, u32)>>,
    last: Vec<HashMap<u32, u32>>,
    duplicated: u64,
    out_of_order: u64,
    latencies_us: Vec<u64>,
    last_delivery: Option<Instant>,
}

fn submit_accepted(status: hyper::StatusCode, body: &[u8]) -> bool {
    status == hyper::StatusCode::OK
        && matches!(
            mimi_wire::proto::SubmitMessageResponse::decode(body).map(|r| r.status),
            Ok(mimi_wire::proto::SubmitStatus::Accepted { .. })
        )
}

#[derive(Default)]
struct MlsPhase {
    participants: Vec<(String, u32)>,
    refusals: Vec<String>,
    counters: [u64; 4],
    epochs: Vec<u64>,
    messages: u64,
    decrypted: u64,
    same_provider: u64,
    own_echoes: u64,
    franks_verified: u64,
    abuse_reports: u64,
    failures: u64,
    ms: u64,
    error: Option<String>,
}

/// The sum of a counter's samples (all label sets) in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .map(|v| v as u64)
        .sum()
}

/// Runs the demo and returns its figures.
pub async fn run(opts: DemoOptions, launcher: Launcher) -> Result<DemoReport> {
    if opts.transport != "mixed" && opts.transport.parse::<TransportKind>().is_err() {
        bail!(
            "--transport {}: expected one of {} or mixed",
            opts.transport,
            TransportKind::ALL.map(TransportKind::as_str).join(", ")
        );
    }
    let (dir, temp) = match &opts.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("mimi-relay-demo-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    if !["durable", "memory"].contains(&opts.store.as_str()) {
        bail!("--store {}: expected durable or memory", opts.store);
    }
    if opts.chaos && opts.store == "memory" {
        bail!("--chaos kills nodes: it needs --store durable");
    }
    let layout = prepare(&dir, &opts.transport, &opts.store, true)?;
    let mut nodes = Nodes {
        launcher,
        children: vec![None, None, None],
        layout,
    };
    for i in 0..3 {
        nodes.spawn(i)?;
    }
    for i in 0..3 {
        nodes.wait_healthy(i, Duration::from_secs(20)).await?;
    }
    let admins = nodes.layout.admins.clone();

    // The MLS phase: real openmls clients, the hub validating every commit.
    let mut mls = MlsPhase::default();
    if opts.mls {
        let room: RoomId = MLS_ROOM.parse()?;
        let t = Instant::now();
        match mimi_client::scenario::run([admins[0], admins[1], admins[2]], &room).await {
            Ok(r) => {
                mls.epochs = r.mls_epochs;
                mls.messages = r.messages_sent;
                mls.decrypted = r.messages_decrypted;
                mls.same_provider = r.same_provider_decrypted;
                mls.own_echoes = r.own_echoes;
                mls.participants = r.participants;
                mls.refusals = r.refusals;
                mls.franks_verified = r.franks_verified;
                mls.abuse_reports = r.abuse_reports_accepted;
                // A Frank that does not verify is a failure like a bad decryption.
                mls.failures = r.decrypt_failures + r.franks_failed;
            }
            Err(e) => mls.error = Some(format!("{:#}", anyhow::Error::from(e))),
        }
        mls.ms = t.elapsed().as_millis() as u64;
        // What the relays themselves counted, not what the clients think they saw.
        for admin in &admins {
            if let Ok((_, body)) = LocalClient::new(*admin).get("/metrics").await {
                let text = String::from_utf8_lossy(&body);
                for (i, name) in [
                    "mimi_relay_policy_rejections_total",
                    "mimi_relay_key_claims_total",
                    "mimi_relay_consent_denials_total",
                    "mimi_relay_franks_issued_total",
                ]
                .iter()
                .enumerate()
                {
                    mls.counters[i] += metric_sum(&text, name);
                }
            }
        }
    }
    let nodes = Arc::new(tokio::sync::Mutex::new(nodes));
    let room: RoomId = ROOM.parse()?;

    let senders_total = 3 * opts.clients;
    let tally = Arc::new(Mutex::new(Tally {
        seen: vec![HashSet::new(); 3],
        last: vec![HashMap::new(); 3],
        ..Tally::default()
    }));
    let started = Instant::now();
    let stop_readers = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // One inbox reader per provider.
    let mut readers = Vec::new();
    for (p, admin) in admins.iter().copied().enumerate() {
        let tally = tally.clone();
        let stop = stop_readers.clone();
        readers.push(tokio::spawn(async move {
            let mut client = LocalClient::new(admin);
            let mut after = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.inbox(after, 4096, 200).await {
                    Ok(items) => {
                        let now = Instant::now();
                        let mut t = tally.lock().expect("tally lock");
                        for item in items {
                            after = after.max(item.offset);
                            let Some((s, c)) = marker(&item.fanout) else {
                                continue;
                            };
                            if !t.seen[p].insert((s, c)) {
                                t.duplicated += 1;
                                continue;
                            }
                            let prev = t.last[p].get(&s).copied();
                            match prev {
                                Some(prev) if c < prev => t.out_of_order += 1,
                                _ => {
                                    t.last[p].insert(s, c);
                                }
                            }
                            if let Some(at) = t.sent_at.get(&(s, c)) {
                                let us = now.duration_since(*at).as_micros() as u64;
                                t.latencies_us.push(us);
                            }
                            t.last_delivery = Some(now);
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }

    // Senders: messages spread over providers and their clients.
    let mut senders = Vec::new();
    for s in 0..senders_total {
        let provider = s % 3;
        let count = opts.messages / senders_total + usize::from(s < opts.messages % senders_total);
        let admin = admins[provider];
        let tally = tally.clone();
        let room = room.clone();
        let size = opts.payload;
        senders.push(tokio::spawn(async move {
            let mut client = LocalClient::new(admin);
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (s as u64 + 1);
            for counter in 0..count as u32 {
                let body = message(PROVIDERS[provider], s as u32, counter, size, &mut rng);
                tally
                    .lock()
                    .expect("tally lock")
                    .sent_at
                    .insert((s as u32, counter), Instant::now());
                let mut attempts = 0u64;
                loop {
                    match client.submit(&room, body.clone()).await {
                        Ok((status, b)) if submit_accepted(status, &b) => break,
                        _ => {
                            attempts += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                let mut t = tally.lock().expect("tally lock");
                t.accepted += 1;
                t.retries += attempts;
            }
        }));
    }

    // Chaos: kill one provider with SIGKILL at about a quarter and about 60% of the run.
    let mut kills = 0;
    if opts.chaos {
        for share in [0.25, 0.6] {
            let target = (opts.messages as f64 * share) as u64;
            loop {
                if tally.lock().expect("tally lock").accepted >= target {
                    break;
                }
                if senders.iter().all(|h| h.is_finished()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let victim = opts.chaos_node.min(2);
            let mut n = nodes.lock().await;
            n.kill9(victim)?;
            kills += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            n.spawn(victim)?;
            n.wait_healthy(victim, Duration::from_secs(20)).await?;
        }
    }

    for s in senders {
        s.await.map_err(|e| anyhow!("a sender task failed: {e}"))?;
    }
    let sent_done = Instant::now();
    // Every provider gets every message, the sender's own included.
    let expected = (opts.messages as u64) * 3;
    loop {
        let delivered: u64 = tally
            .lock()
            .expect("tally lock")
            .seen
            .iter()
            .map(|s| s.len() as u64)
            .sum();
        if delivered >= expected || sent_done.elapsed() > opts.settle {
            break;
        }
        if opts.progress {
            eprint!("\r  waiting for deliveries: {delivered}/{expected}   ");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A moment more, so duplicates arriving late would be seen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_readers.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }

    let mut report = {
        let t = tally.lock().expect("tally lock");
        let delivered: u64 = t.seen.iter().map(|s| s.len() as u64).sum();
        // Sender s submits at provider s % 3.
        let same_provider: u64 = t
            .seen
            .iter()
            .enumerate()
            .map(|(p, seen)| seen.iter().filter(|(s, _)| *s as usize % 3 == p).count() as u64)
            .sum();
        let mut lat = t.latencies_us.clone();
        lat.sort_unstable();
        let pct = |p: f64| -> u64 {
            if lat.is_empty() {
                0
            } else {
                lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1]
            }
        };
        let end = t.last_delivery.unwrap_or(started);
        let elapsed = end.duration_since(started);
        DemoReport {
            transport: opts.transport.clone(),
            store: opts.store.clone(),
            sent: t.accepted,
            expected,
            delivered,
            same_provider,
            lost: expected.saturating_sub(delivered),
            duplicated: t.duplicated,
            out_of_order: t.out_of_order,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            msgs_per_s: delivered as f64 / elapsed.as_secs_f64().max(1e-9),
            chaos_kills: kills,
            chaos_victim: if opts.chaos {
                PROVIDERS[opts.chaos_node.min(2)].to_owned()
            } else {
                String::new()
            },
            submit_retries: t.retries,
            elapsed_ms: elapsed.as_millis() as u64,
            unclean_shutdowns: 0,
            mls_epochs: mls.epochs,
            mls_messages: mls.messages,
            mls_decrypted: mls.decrypted,
            mls_same_provider: mls.same_provider,
            mls_own_echoes: mls.own_echoes,
            decrypt_failures: mls.failures,
            mls_ms: mls.ms,
            mls_error: mls.error,
            participants: mls.participants,
            policy_rejections: mls.counters[0],
            key_claims: mls.counters[1],
            consent_denials: mls.counters[2],
            franks_issued: mls.counters[3],
            franks_verified: mls.franks_verified,
            abuse_reports: mls.abuse_reports,
            refusals: mls.refusals,
        }
    };
    if opts.keep {
        // Keep each node's final metrics beside its log.
        for (i, admin) in admins.iter().enumerate() {
            if let Ok((_, body)) = LocalClient::new(*admin).get("/metrics").await {
                let _ = std::fs::write(dir.join(format!("{}.metrics", PROVIDERS[i])), &body);
            }
        }
    }
    report.unclean_shutdowns = nodes.lock().await.stop_all() as u32;
    if (opts.keep || !report.is_clean())
        && let Some(t) = temp
    {
        let kept = t.keep();
        eprintln!("demo files kept in {}", kept.display());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_ports_are_distinct_while_held() {
        let mut free = super::FreePorts::default();
        let tcp: std::collections::HashSet<u16> =
            (0..200).map(|_| free.tcp().expect("a tcp port")).collect();
        let udp: std::collections::HashSet<u16> =
            (0..200).map(|_| free.udp().expect("a udp port")).collect();
        assert_eq!((tcp.len(), udp.len()), (200, 200));
    }

    #[test]
    fn metric_sum_adds_every_label_set_of_one_name_only() {
        let text = "# TYPE mimi_relay_x_total counter\n\
                    mimi_relay_x_total 3\n\
                    mimi_relay_x_total{peer=\"b\"} 4\n\
                    mimi_relay_x_totally 100\n\
                    mimi_relay_y_total 9\n";
        assert_eq!(super::metric_sum(text, "mimi_relay_x_total"), 7);
        assert_eq!(super::metric_sum(text, "mimi_relay_z_total"), 0);
    }
}
