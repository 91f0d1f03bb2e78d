//! The load drivers: the hub's API as the lab reaches it, the open and closed loops that
//! submit into the rooms, and the inbox readers that record deliveries.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use relay_node::client::{LocalClient, inbox_records};

use crate::lock;
use crate::model::SizeMix;
use crate::netlab::{self, NetLab};
use crate::payload::{ciphertext, find_marker, marker_bytes, room_id, submit_body};
use crate::stats::Rx;

/// Closed loop: waits until message `counter` of `stream` is within `window` messages of the
/// oldest one not yet delivered to all `receivers`, so that the backlog stays bounded and
/// throughput is what the path delivers, not what a queue absorbs.
pub(crate) async fn wait_window(
    rx: &Mutex<Rx>,
    stream: u32,
    counter: u64,
    receivers: u64,
    window: u64,
    stop: &AtomicBool,
) {
    let need = (counter + 1).saturating_sub(window) * receivers;
    let mut spins = 0u32;
    while lock(rx).per_stream.get(&stream).copied().unwrap_or(0) < need {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Yield a few times before sleeping: a timer costs up to a millisecond.
        spins += 1;
        if spins < 64 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// How the lab reaches one node's API, which listens on its own namespace's loopback: with
/// sockets opened in that namespace (they stay there, whichever thread then uses them), so
/// that no proxy in between spends the lab's CPU on copies.
#[derive(Clone)]
pub(crate) struct Admin {
    addr: SocketAddr,
    connector: Option<relay_node::client::Connector>,
}

impl Admin {
    /// Reads a node's API address from its config; in namespace `i` when there is a lab.
    pub(crate) fn of_node(config: &Path, lab: Option<&NetLab>, i: usize) -> Result<Admin> {
        let addr = relay_node::NodeConfig::load(config)?.admin;
        let connector = lab.map(|lab| -> relay_node::client::Connector {
            let path = lab.path(i);
            Arc::new(move |addr| {
                netlab::in_namespace(&path, move || {
                    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                    s.set_nodelay(true)?;
                    Ok(s)
                })
                .map_err(|e| std::io::Error::other(format!("{e:#}")))
            })
        });
        Ok(Admin { addr, connector })
    }

    pub(crate) fn client(&self) -> LocalClient {
        let c = LocalClient::new(self.addr);
        match &self.connector {
            Some(f) => c.with_connector(f.clone()),
            None => c,
        }
    }
}

/// A closed loop's limits for `drive`.
#[derive(Clone)]
pub(crate) struct ClosedLoop {
    pub(crate) rx: Arc<Mutex<Rx>>,
    /// Deliveries that complete one message (one per follower).
    pub(crate) receivers: u64,
    /// Messages per room in flight, at most.
    pub(crate) window: u64,
}

/// What [`drive`] does: owned, so that it can run on a thread of its own.
pub(crate) struct DriveJob {
    pub(crate) hub: Admin,
    pub(crate) rooms: usize,
    /// Open loop at this many messages per second (spread over rooms); `None`: closed loop.
    pub(crate) rate: Option<f64>,
    pub(crate) until: Instant,
    pub(crate) sizes: SizeMix,
    pub(crate) epoch: Instant,
    pub(crate) counters: Arc<Vec<AtomicU64>>,
    pub(crate) accepted: Arc<AtomicU64>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) window: Option<ClosedLoop>,
    pub(crate) batch_max: u64,
    pub(crate) lags_us: Option<Arc<Mutex<LabLags>>>,
}

/// Runs [`drive`] on a thread and a runtime of its own, so that the inbox readers, the
/// progress lines and anything else on the lab's runtime cannot make the load generator
/// late: latency runs from the scheduled send time, so any lag of the driver would count as
/// the relay's.
pub(crate) async fn drive_apart(job: DriveJob) -> Result<u64> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lab-driver".into())
        .spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(drive(&job)));
            let _ = tx.send(r);
        })?;
    rx.await
        .map_err(|_| anyhow::anyhow!("the driver thread ended without an answer"))?
}

/// Submits messages into every room until `until`: open loop at `rate` (spread over rooms) or
/// closed loop. Returns the messages accepted. Like a provider's front end, it hands the hub
/// everything it has in `submitBatch` calls (at most `batch_max` messages at a time): in the
/// open loop every message already due, each with its own scheduled time, by the room's
/// lane ([`OPEN_LANES`], one call at a time each), in the closed loop what the rooms' windows
/// have room for, one call at a time. Each room's messages go in order on one connection, so
/// their order at every follower must be that of their counters.
pub(crate) async fn drive(job: &DriveJob) -> Result<u64> {
    let DriveJob {
        ref hub,
        rooms,
        rate,
        until,
        ref sizes,
        epoch,
        ref counters,
        ref accepted,
        ref stop,
        ref window,
        batch_max,
        ref lags_us,
    } = *job;
    let room_ids: Arc<Vec<String>> = Arc::new((0..rooms).map(room_id).collect());
    let mut rngs: Vec<u64> = (0..rooms)
        .map(|r| 0x2545_f491_4f6c_dd1d ^ ((r as u64 + 1) << 20))
        .collect();
    let mut client = hub.client();
    let start = Instant::now();
    let early = start + Duration::from_millis(crate::stages::EARLY_MS);
    let interval = rate.map(|rate| Duration::from_secs_f64(rooms as f64 / rate.max(1e-3)));
    // Open loop: message k of room r is due at `start + offset(r) + k * interval`, the rooms'
    // schedules staggered over one interval.
    let due =
        |r: usize, k: u32| interval.map(|i| start + i.mul_f64(r as f64 / rooms as f64) + i * k);
    let calls = Calls {
        room_ids: room_ids.clone(),
        stop: stop.clone(),
        accepted: accepted.clone(),
        lags_us: lags_us.clone(),
        early,
    };
    // Open loop: the lanes make the calls while this loop keeps the schedule. Closed loop:
    // one call at a time from here, each room's next messages once its window has room.
    let mut lane_tasks = tokio::task::JoinSet::new();
    let lanes = rate.is_some().then(|| {
        (0..OPEN_LANES.min(rooms).max(1))
            .map(|_| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                lane_tasks.spawn(lane(hub.clone(), calls.clone(), rx));
                tx
            })
            .collect::<Vec<_>>()
    });
    let mut next_k = vec![0u32; rooms];
    let mut first_room = 0usize;
    let batch_max = batch_max.max(1) as usize;
    'schedule: loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        // (room, scheduled time) of each message to hand over now; rooms take turns first.
        let mut picks: Vec<(usize, Instant)> = Vec::new();
        let mut wake = None;
        if let Some(c) = &window {
            if now >= until {
                break;
            }
            let t = lock(&c.rx);
            for r in (0..rooms).map(|i| (first_room + i) % rooms) {
                let sent = counters[r].load(Ordering::Relaxed);
                let done = t.per_stream.get(&(r as u32)).copied().unwrap_or(0) / c.receivers;
                let free = (c.window + done).saturating_sub(sent) as usize;
                let n = free.min(batch_max - picks.len());
                picks.extend(std::iter::repeat_n((r, now), n));
            }
            wake = Some(t.progress.clone());
        } else {
            let mut next_due: Option<Instant> = None;
            for r in (0..rooms).map(|i| (first_room + i) % rooms) {
                while let Some(at) = due(r, next_k[r]).filter(|at| *at < until) {
                    if at > now || picks.len() == batch_max {
                        next_due = Some(next_due.map_or(at, |d| d.min(at)));
                        break;
                    }
                    picks.push((r, at));
                    next_k[r] += 1;
                }
            }
            if picks.is_empty() {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => break, // every room's schedule has ended
                }
                continue;
            }
        }
        if picks.is_empty() {
            // Every window is full: wait for the readers to record a delivery.
            if let Some(w) = wake {
                let _ = tokio::time::timeout(Duration::from_millis(5), w.notified()).await;
            }
            continue;
        }
        first_room = (first_room + 1) % rooms;
        let mut batch = Vec::with_capacity(picks.len());
        for (r, sched) in picks {
            let sched_ns = sched.duration_since(epoch).as_nanos() as u64;
            let counter = counters[r].fetch_add(1, Ordering::Relaxed) as u32;
            let size = sizes.pick(&mut rngs[r]);
            let ct = ciphertext(
                marker_bytes(r as u32, counter, sched_ns),
                size,
                &mut rngs[r],
            );
            batch.push(Pending {
                room: r,
                sched,
                body: submit_body("a.example", r as u32, &ct)?,
            });
        }
        if let Some(lanes) = &lanes {
            // Each room always goes by the same lane, so its messages stay in order.
            let mut per_lane: Vec<Vec<Pending>> = (0..lanes.len()).map(|_| Vec::new()).collect();
            for p in batch {
                per_lane[p.room % lanes.len()].push(p);
            }
            for (tx, v) in lanes.iter().zip(per_lane) {
                if !v.is_empty() && tx.send(v).is_err() {
                    break 'schedule; // a lane ended: its result says why
                }
            }
            continue;
        }
        if !calls.send(&mut client, &batch).await? {
            return Ok(accepted.load(Ordering::Relaxed)); // stopped while the hub refused
        }
    }
    if let Some(lanes) = lanes {
        drop(lanes); // the lanes finish what they hold, then end
        while let Some(r) = lane_tasks.join_next().await {
            r.map_err(|e| anyhow::anyhow!("a driver lane: {e}"))??;
        }
    }
    Ok(accepted.load(Ordering::Relaxed))
}

/// Submission lanes of the open loop: each has a connection to the hub's API and the rooms
/// `r % OPEN_LANES == lane`, and makes one call at a time, while the driver keeps the schedule
/// and hands over what is due. One: four lanes (as a provider's front ends with several
/// connections) gave the hub smaller batches and a higher p99 at 20k msgs/s (7.9, 7.7, 13.3
/// ms against 7.3, 5.9, 5.9 ms, issue 17), once the start-up tail was gone.
pub(crate) const OPEN_LANES: usize = 1;

/// A message ready to submit: its room (index), scheduled time and SubmitMessageRequest.
pub(crate) struct Pending {
    room: usize,
    sched: Instant,
    body: Bytes,
}

/// What making calls needs besides a connection: shared by the lanes and the closed loop.
#[derive(Clone)]
struct Calls {
    room_ids: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    lags_us: Option<Arc<Mutex<LabLags>>>,
    /// Messages scheduled before this count in the `_early` lags too.
    early: Instant,
}

impl Calls {
    /// Submits `batch` in calls of at most [`CALL_BYTES`], one after another; false when
    /// stopped while the hub refused.
    async fn send(&self, client: &mut LocalClient, batch: &[Pending]) -> Result<bool> {
        let mut rest = batch;
        while !rest.is_empty() {
            // Calls of at most CALL_BYTES, under the node's body limit (1 MiB by default).
            let mut bytes = 0;
            let n = rest
                .iter()
                .take_while(|p| {
                    bytes += p.body.len();
                    bytes <= CALL_BYTES
                })
                .count()
                .max(1);
            let (this, next) = rest.split_at(n);
            let early_n = this.iter().filter(|p| p.sched < self.early).count();
            if let Some(lags) = &self.lags_us {
                // How late the call starts for each message it carries: a call waits for
                // the one before on its connection (answered once the hub's batch is durable).
                let now = Instant::now();
                let mut l = lock(lags);
                for p in this {
                    let us = now.saturating_duration_since(p.sched).as_micros() as u64;
                    l.driver.push(us);
                    if p.sched < self.early {
                        l.driver_early.push(us);
                    }
                }
            }
            let items: Vec<(&str, Bytes)> = this
                .iter()
                .map(|p| (self.room_ids[p.room].as_str(), p.body.clone()))
                .collect();
            let call = Instant::now();
            let done = submit_in_order(client, &items, &self.stop).await?;
            if let Some(lags) = &self.lags_us {
                // The call's round trip, once per message it carried: the hub's HTTP API, its
                // core and its commit, as the lab's client sees them.
                let us = call.elapsed().as_micros() as u64;
                let mut l = lock(lags);
                l.api_call.extend(std::iter::repeat_n(us, n));
                l.api_call_early.extend(std::iter::repeat_n(us, early_n));
            }
            self.accepted.fetch_add(done as u64, Ordering::Relaxed);
            if done < n {
                return Ok(false);
            }
            rest = next;
        }
        Ok(true)
    }
}

/// One open-loop lane: submits what it is handed, in order; what arrived while a call was
/// out goes in the next call.
async fn lane(
    hub: Admin,
    calls: Calls,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Pending>>,
) -> Result<()> {
    let mut client = hub.client();
    while let Some(mut batch) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
        }
        if !calls.send(&mut client, &batch).await? {
            return Ok(()); // stopped while the hub refused
        }
    }
    Ok(())
}

/// Per-message values the driver records for the lab's own stages (µs); `_early` ones only
/// for the messages scheduled in the phase's first [`crate::stages::EARLY_MS`].
#[derive(Default)]
pub(crate) struct LabLags {
    pub driver: Vec<u64>,
    pub api_call: Vec<u64>,
    pub driver_early: Vec<u64>,
    pub api_call_early: Vec<u64>,
}

/// Submits `batch` of (room, SubmitMessageRequest), retrying refusals for a bounded time. A
/// retry starts at the first refused message: those after it that were accepted are answered
/// from the hub's dedupe window, never fanned out twice. Returns how many were accepted: all
/// of them, unless `stop` came first.
pub(crate) async fn submit_in_order(
    client: &mut LocalClient,
    batch: &[(&str, Bytes)],
    stop: &AtomicBool,
) -> Result<usize> {
    let refused_since = Instant::now();
    let mut rest = batch;
    loop {
        let why = match client.submit_batch(rest).await {
            Ok(answers) => match answers.iter().position(|(s, b)| !accepted_response(*s, b)) {
                None => return Ok(batch.len()),
                Some(i) => {
                    rest = &rest[i..];
                    let (s, b) = &answers[i];
                    format!("{s}: {}", String::from_utf8_lossy(b))
                }
            },
            Err(e) => format!("{e:#}"),
        };
        if stop.load(Ordering::Relaxed) {
            return Ok(batch.len() - rest.len());
        }
        if refused_since.elapsed() > SUBMIT_PATIENCE {
            bail!(
                "the hub refused a message of {} for {SUBMIT_PATIENCE:?}: {why}",
                rest[0].0
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) fn accepted_response(status: hyper::StatusCode, body: &[u8]) -> bool {
    status == hyper::StatusCode::OK
        && matches!(
            mimi_wire::proto::SubmitMessageResponse::decode(body).map(|r| r.status),
            Ok(mimi_wire::proto::SubmitStatus::Accepted { .. })
        )
}

/// Inbox readers: one per measured follower (receiver index = follower - 1), plus ones that
/// drain the hub's own inbox and any unmeasured follower's, so that none fills.
pub(crate) fn start_readers(
    admins: &[Admin],
    measured: usize,
    rx: &Arc<Mutex<Rx>>,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinSet<()> {
    let mut v = tokio::task::JoinSet::new();
    for (i, admin) in admins.iter().cloned().enumerate() {
        let rx = rx.clone();
        let stop = stop.clone();
        v.spawn(async move {
            let mut client = admin.client();
            let mut after = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // The answer is walked in place: nothing is allocated per record, since the
                // readers share the CPUs with the nodes and the driver.
                match client.inbox_raw(after, 4096, 100).await {
                    Ok(body) => {
                        let now = Instant::now();
                        let records = inbox_records(&body).map_while(Result::ok);
                        if i == 0 || i > measured {
                            if let Some(last) = records.last() {
                                after = after.max(last.offset);
                            }
                            continue;
                        }
                        let mut t = lock(&rx);
                        for item in records {
                            after = after.max(item.offset);
                            if let Some((s, c, sched)) = find_marker(item.fanout) {
                                t.record(i - 1, s, c, sched, now);
                            }
                        }
                        t.progress.notify_one();
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
    }
    v
}

/// Request bytes per submitBatch call, at most (one larger request still goes alone).
pub(crate) const CALL_BYTES: usize = 256 * 1024;

/// How long a sender retries a refused message before the row fails.
pub(crate) const SUBMIT_PATIENCE: Duration = Duration::from_secs(30);

/// Waits until `expected` deliveries or the settle time; returns whether all arrived.
pub(crate) async fn settle(rx: &Arc<Mutex<Rx>>, expected: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if lock(rx).delivered >= expected {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
