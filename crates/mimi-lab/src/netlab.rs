//! Packet-level network conditions without netem: one network namespace per node, each linked
//! to this process by a TUN device, and a userspace forwarder between the devices that applies
//! delay, random or bursty (Gilbert-Elliott) loss, reordering and a bandwidth cap.
//!
//! Namespace `i` holds address 10.77.i.2/16 on its TUN device; the forwarder reads an IPv4
//! packet from device `i`, takes the destination's third octet as the output device, and writes
//! it there when its release time comes. Every address belongs to namespaces created here and
//! deleted on drop. The forwarder knows what it dropped and when (the drop log), which is how
//! the lab attributes losses to messages.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub use crate::model::{BAD_BURST_MS, Profile};

/// How the forwarder applies a profile.
impl Profile {
    fn one_way(&self) -> Duration {
        Duration::from_secs_f64(self.rtt_ms.max(0.0) / 2000.0)
    }

    /// The time bound on a loss burst; none for 0 or less (a hand-made profile).
    fn burst_max(&self) -> Option<Duration> {
        self.burst_ms
            .filter(|ms| *ms > 0.0)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
    }
}

/// Counters of the forwarder; bytes are whole IP packets as offered to the link.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
}

/// A snapshot of [`LinkCounters`], with the kernel's socket drops beside them.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkSnapshot {
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
    /// [`NetLab::socket_drops`], if it could be read.
    pub socket_drops: Option<u64>,
}

impl LinkSnapshot {
    pub fn since(self, earlier: LinkSnapshot) -> LinkSnapshot {
        LinkSnapshot {
            packets: self.packets.saturating_sub(earlier.packets),
            bytes: self.bytes.saturating_sub(earlier.bytes),
            dropped: self.dropped.saturating_sub(earlier.dropped),
            socket_drops: self
                .socket_drops
                .zip(earlier.socket_drops)
                .map(|(now, then)| now.saturating_sub(then)),
        }
    }
}

/// One packet the loss model dropped: when (from the lab's epoch), and on which link.
#[derive(Clone, Copy, Debug)]
pub struct Drop {
    pub at: Duration,
    pub from: usize,
    pub to: usize,
}

struct Shared {
    counters: LinkCounters,
    drops: Mutex<Vec<Drop>>,
    /// While set, every packet is discarded (the link is cut); these are not in the drop log.
    cut: AtomicBool,
    stop: AtomicBool,
    epoch: Instant,
    /// The forwarder thread's id, so that its CPU time can be told apart from the pumps'.
    tid: AtomicU64,
}

/// The namespaces, their TUN devices and the forwarder thread. Dropping it stops the forwarder
/// and deletes the namespaces (the devices go with them).
pub struct NetLab {
    names: Vec<String>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for NetLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetLab")
            .field("namespaces", &self.names)
            .finish_non_exhaustive()
    }
}

const PREFIX: &str = "mlab";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this process can build the namespaces: root, `ip` and `/dev/net/tun` present.
pub fn available() -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user of this process.
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        return Err("not root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("no `ip` command (iproute2)".into()),
    }
}

/// Deletes namespaces left by a lab process that no longer runs (after a SIGKILL).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('x').next() else {
            continue;
        };
        if !pid.is_empty()
            && pid.chars().all(|c| c.is_ascii_digit())
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl NetLab {
    /// Address of node `i` inside its namespace.
    pub fn addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, i as u8, 2)
    }

    /// Creates `n` namespaces linked through the forwarder with `profile`.
    pub fn create(n: usize, profile: &Profile, epoch: Instant) -> Result<NetLab> {
        if n == 0 || n > 200 {
            bail!("the lab links 1 to 200 namespaces, not {n}");
        }
        remove_stale();
        let pid = std::process::id();
        let shared = Arc::new(Shared {
            counters: LinkCounters::default(),
            drops: Mutex::new(Vec::new()),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            epoch,
            tid: AtomicU64::new(0),
        });
        let mut lab = NetLab {
            names: Vec::new(),
            shared: shared.clone(),
            thread: None,
        };
        let (tx, rx) = std::sync::mpsc::channel::<Result<Vec<String>, String>>();
        let profile2 = profile.clone();
        lab.thread = Some(
            std::thread::Builder::new()
                .name("lab-forwarder".into())
                .spawn(move || forwarder_thread(n, pid, profile2, shared, tx))?,
        );
        let devs = rx
            .recv_timeout(Duration::from_secs(30))
            .context("the forwarder thread did not start")?
            .map_err(|e| anyhow!("creating TUN devices: {e}"))?;
        for (i, dev) in devs.iter().enumerate() {
            let ns = format!("{PREFIX}{pid}x{i}");
            ip(&["netns", "add", &ns])?;
            lab.names.push(ns.clone());
            ip(&["link", "set", dev, "netns", &ns])?;
            let addr = format!("{}/16", Self::addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", &ns, "link", "set", dev, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    pub fn namespace(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Runs `f` on a thread that joined namespace `i`: sockets it creates live there.
    pub fn in_ns<T, F>(&self, i: usize, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.names[i]);
        in_namespace(&path, f)
    }

    pub fn path(&self, i: usize) -> String {
        format!("/var/run/netns/{}", self.names[i])
    }

    pub fn set_cut(&self, cut: bool) {
        self.shared.cut.store(cut, Ordering::SeqCst);
    }

    pub fn snapshot(&self) -> LinkSnapshot {
        let c = &self.shared.counters;
        LinkSnapshot {
            packets: c.packets.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            socket_drops: self.socket_drops().ok(),
        }
    }

    /// CPU time of the forwarder thread in microseconds (it runs inside this process).
    pub fn forwarder_cpu_us(&self) -> Option<u64> {
        let tid = self.shared.tid.load(Ordering::Relaxed);
        super::cpu_us_at(&format!("/proc/self/task/{tid}/stat"))
    }

    /// UDP datagrams the kernel discarded because a socket's receive buffer was full, summed
    /// over the lab's namespaces. These are losses the link did not cause and its drop log
    /// does not hold: a receiver that fell behind (TCP's window prevents them for TCP).
    pub fn socket_drops(&self) -> Result<u64> {
        let mut total = 0;
        for i in 0..self.names.len() {
            // A thread's own view of /proc/net follows the namespace it joined.
            let snmp = self.in_ns(i, || std::fs::read_to_string("/proc/thread-self/net/snmp"))?;
            total += udp_rcvbuf_errors(&snmp)
                .ok_or_else(|| anyhow!("no Udp RcvbufErrors counter in /proc/net/snmp"))?;
        }
        Ok(total)
    }

    /// The loss model's drops so far, and forgets them.
    pub fn take_drops(&self) -> Vec<Drop> {
        std::mem::take(&mut *self.shared.drops.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The `RcvbufErrors` counter of the `Udp:` table in /proc/net/snmp (a header line of names,
/// then a line of values).
pub(crate) fn udp_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?;
    let values = udp.next()?;
    let i = names.split_whitespace().position(|f| f == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// What the lab's link carried so far, for errors: none at all means a dead link.
pub(crate) fn link_note(lab: Option<&NetLab>) -> String {
    lab.map_or_else(String::new, |l| {
        let s = l.snapshot();
        format!(
            " (the lab link forwarded {} packets, dropped {})",
            s.packets, s.dropped
        )
    })
}

/// Runs `f` on a fresh thread inside the network namespace at `path`.
pub fn in_namespace<T, F>(path: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    let h = std::thread::spawn(move || -> std::io::Result<T> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        f()
    });
    h.join()
        .map_err(|_| anyhow::anyhow!("a namespace thread panicked"))?
        .with_context(|| format!("in namespace {path}"))
}

impl std::ops::Drop for NetLab {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for ns in &self.names {
            let _ = ip(&["netns", "del", ns]);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per-direction state of the impairment.
struct LinkState {
    rng: u64,
    /// Gilbert-Elliott: in the bad state every packet is lost.
    bad: bool,
    /// When the current burst began.
    bad_since: Instant,
    /// When the serializer of a rate-capped link is free again.
    next_free: Instant,
}

impl LinkState {
    fn rand(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether the loss model drops a packet offered at `now`. With mean burst length b and
    /// loss share l, the good-to-bad probability is p = l/(b(1-l)) and bad-to-good r = 1/b
    /// (stationary loss p/(p+r) = l, mean sojourn in bad 1/r = b). A burst older than
    /// `burst_max` is over before the packet is drawn for.
    fn lose(&mut self, loss: f64, burst: f64, burst_max: Option<Duration>, now: Instant) -> bool {
        if loss <= 0.0 {
            return false;
        }
        if burst <= 1.0 {
            return self.rand() < loss;
        }
        if self.bad && burst_max.is_some_and(|m| now.saturating_duration_since(self.bad_since) > m)
        {
            self.bad = false;
        }
        let r = 1.0 / burst;
        let p = (loss * r / (1.0 - loss)).min(1.0);
        let u = self.rand();
        let was_bad = self.bad;
        self.bad = if was_bad { u >= r } else { u < p };
        if self.bad && !was_bad {
            self.bad_since = now;
        }
        self.bad
    }
}

type Queue = Arc<(
    Mutex<BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>>,
    tokio::sync::Notify,
)>;

fn forwarder_thread(
    n: usize,
    pid: u32,
    profile: Profile,
    shared: Arc<Shared>,
    ready: std::sync::mpsc::Sender<Result<Vec<String>, String>>,
) {
    if let Ok(link) = std::fs::read_link("/proc/thread-self")
        && let Some(tid) = link.file_name().and_then(|t| t.to_str()?.parse().ok())
    {
        shared.tid.store(tid, Ordering::Relaxed);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    rt.block_on(async move {
        let mut tuns = Vec::new();
        for i in 0..n {
            // IFNAMSIZ is 16: "mlt" + pid + "x" + index fits.
            let name = format!("mlt{}x{i}", pid % 1_000_000);
            match tokio_tun::Tun::builder().name(&name).build() {
                Ok(mut v) if !v.is_empty() => tuns.push(Arc::new(v.remove(0))),
                Ok(_) => {
                    let _ = ready.send(Err("no device".into()));
                    return;
                }
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
            }
        }
        let names = tuns.iter().map(|t| t.name().to_owned()).collect();
        let _ = ready.send(Ok(names));
        let queues: Vec<Queue> = (0..n)
            .map(|_| Arc::new((Mutex::new(BinaryHeap::new()), tokio::sync::Notify::new())))
            .collect();
        let mut tasks = Vec::new();
        for (j, q) in queues.iter().enumerate() {
            tasks.push(tokio::spawn(writer(tuns[j].clone(), q.clone())));
        }
        for (i, tun) in tuns.iter().enumerate() {
            tasks.push(tokio::spawn(reader(
                i,
                tun.clone(),
                tuns.clone(),
                queues.clone(),
                profile.clone(),
                shared.clone(),
            )));
        }
        while !shared.stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in tasks {
            t.abort();
        }
    });
}

async fn reader(
    from: usize,
    tun: Arc<tokio_tun::Tun>,
    outs: Vec<Arc<tokio_tun::Tun>>,
    queues: Vec<Queue>,
    profile: Profile,
    shared: Arc<Shared>,
) {
    let n = queues.len();
    let mut links: Vec<LinkState> = (0..n)
        .map(|to| LinkState {
            rng: 0x9e37_79b9_7f4a_7c15 ^ ((from as u64) << 32 | to as u64).wrapping_add(1),
            bad: false,
            bad_since: Instant::now(),
            next_free: Instant::now(),
        })
        .collect();
    let delay = profile.one_way();
    let burst_max = profile.burst_max();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let len = match tun.recv(&mut buf).await {
            Ok(len) => len,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let pkt = &buf[..len];
        // IPv4 only (the nodes use IPv4 addresses); anything else (IPv6 router solicitations
        // of a fresh device) goes nowhere.
        if len < 20 || pkt[0] >> 4 != 4 || pkt[16] != 10 || pkt[17] != 77 {
            continue;
        }
        let to = pkt[18] as usize;
        if to >= n || to == from {
            continue;
        }
        if shared.cut.load(Ordering::Relaxed) {
            continue;
        }
        let now = Instant::now();
        shared.counters.packets.fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let link = &mut links[to];
        let mut drop = link.lose(profile.loss, profile.burst, burst_max, now);
        let mut depart = now;
        if let Some(mbit) = profile.rate_mbit.filter(|m| *m > 0.0) {
            let tx = Duration::from_secs_f64(len as f64 * 8.0 / (mbit * 1e6));
            depart = link.next_free.max(now) + tx;
            // Drop-tail once the queue holds more than 100 ms.
            if depart.duration_since(now) > Duration::from_millis(100) {
                drop = true;
            } else if !drop {
                link.next_free = depart;
            }
        }
        if drop {
            shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            shared
                .drops
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Drop {
                    at: now.duration_since(shared.epoch),
                    from,
                    to,
                });
            continue;
        }
        let release = if profile.reorder > 0.0 && link.rand() < profile.reorder {
            depart
        } else {
            depart + delay
        };
        let (heap, notify) = &*queues[to];
        // Fast path (no delay due, nothing queued): straight to the device, in order.
        if release <= now
            && heap.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
            && outs[to].try_send(pkt).is_ok()
        {
            continue;
        }
        seq += 1;
        heap.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Reverse((release, seq, pkt.to_vec())));
        notify.notify_one();
    }
}

async fn writer(tun: Arc<tokio_tun::Tun>, q: Queue) {
    let (heap, notify) = &*q;
    loop {
        let next = heap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peek()
            .map(|Reverse((at, _, _))| *at);
        match next {
            None => notify.notified().await,
            Some(at) if at > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = notify.notified() => {}
                }
            }
            Some(_) => {
                let pkt = heap.lock().unwrap_or_else(|e| e.into_inner()).pop();
                if let Some(Reverse((_, _, pkt))) = pkt {
                    // A full device queue drops the packet, as a full router queue would.
                    let _ = tun.send(&pkt).await;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn link() -> LinkState {
        LinkState {
            rng: 12345,
            bad: false,
            bad_since: Instant::now(),
            next_free: Instant::now(),
        }
    }

    #[test]
    fn gilbert_elliott_matches_loss_and_burst() {
        let mut l = link();
        let now = Instant::now();
        let n = 200_000;
        let (mut lost, mut bursts, mut prev) = (0u32, 0u32, false);
        for _ in 0..n {
            // Back to back (no time passes), so a time bound on bursts never applies.
            let d = l.lose(0.05, 3.0, Some(Duration::from_millis(50)), now);
            if d {
                lost += 1;
                if !prev {
                    bursts += 1;
                }
            }
            prev = d;
        }
        let share = f64::from(lost) / f64::from(n);
        let mean_burst = f64::from(lost) / f64::from(bursts);
        assert!((share - 0.05).abs() < 0.01, "loss share {share}");
        assert!((mean_burst - 3.0).abs() < 0.5, "mean burst {mean_burst}");
    }

    #[test]
    fn a_burst_is_over_once_its_time_is_up() {
        // A link in a burst loses the next packet with probability 1 - 1/3; once the burst is
        // older than its bound, only a new burst (p = 0.05/(3*0.95), under 2%) can take it.
        let share = |age: Duration, bound: Option<Duration>| {
            let mut l = link();
            let start = Instant::now();
            let n = 20_000;
            let lost = (0..n)
                .filter(|_| {
                    l.bad = true;
                    l.bad_since = start;
                    l.lose(0.05, 3.0, bound, start + age)
                })
                .count();
            lost as f64 / f64::from(n)
        };
        let bound = Some(Duration::from_millis(50));
        let young = share(Duration::from_millis(10), bound);
        let old = share(Duration::from_millis(200), bound);
        let unbounded = share(Duration::from_millis(200), None);
        assert!((young - 2.0 / 3.0).abs() < 0.03, "young burst {young}");
        assert!(old < 0.03, "expired burst {old}");
        assert!(
            (unbounded - 2.0 / 3.0).abs() < 0.03,
            "packet-only burst {unbounded}"
        );
    }

    #[test]
    fn udp_receive_buffer_drops_are_read_from_the_udp_table() {
        // The layout of /proc/net/snmp (Linux 6.x), UdpLite after Udp.
        let snmp = "Tcp: RtoAlgorithm RtoMin\nTcp: 1 200\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
            Udp: 87219 0 151 62826 151 0 0 0 0\n\
            UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
            UdpLite: 0 0 7 0 7 0 0 0 0\n";
        assert_eq!(udp_rcvbuf_errors(snmp), Some(151));
        assert_eq!(udp_rcvbuf_errors("Udp: InDatagrams\nUdp: 5\n"), None);
        assert_eq!(udp_rcvbuf_errors(""), None);
    }

    #[test]
    fn named_profiles() {
        let bad = Profile::named("bad").unwrap();
        assert_eq!(bad.rtt_ms, 100.0);
        assert!(bad.is_impaired());
        assert!(!Profile::named("lan").unwrap().is_impaired());
        assert!(Profile::named("moon").is_none());
    }
}
