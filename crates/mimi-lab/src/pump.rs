//! The baselines: the same messages (sizes, rooms, schedule) pumped from the hub's namespace to
//! the first follower's over a bare carrier with no relay logic: quinn with one long-lived
//! stream per room, or TLS 1.3 over one TCP connection with writes coalesced until the send
//! queue drains. Both use the relay's own mutual-TLS configuration (pinned certificates).
//! Frames are a 4-byte big-endian length and the ciphertext.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use mimi_wire::uri::ProviderDomain;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::netlab::NetLab;
use super::{BenchOptions, Profile, Progress, Row, Rx, SizeMix, lock};

#[derive(Clone, Copy, Debug)]
pub(crate) enum Carrier {
    Quinn,
    Tls,
}

const PORT: u16 = 7100;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a row waits for quinn's endpoints to drain, and the next to find the port free.
const ENDPOINT_DRAIN: Duration = Duration::from_secs(5);
const ALPN: &[u8] = b"mimi-relay-bench";

struct Tls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn tls() -> Result<Tls> {
    let a: ProviderDomain = "a.example".parse()?;
    let b: ProviderDomain = "b.example".parse()?;
    let ga = relay_tls::generate(&a)?;
    let gb = relay_tls::generate(&b)?;
    let ida = relay_tls::TlsIdentity::from_pem(a.clone(), &ga.cert_pem, &ga.key_pem)?;
    let idb = relay_tls::TlsIdentity::from_pem(b.clone(), &gb.cert_pem, &gb.key_pem)?;
    let mut trust = relay_tls::PeerTrust::new();
    trust.add_pem(a, &ga.cert_pem)?;
    trust.add_pem(b, &gb.cert_pem)?;
    Ok(Tls {
        server: relay_tls::server_config(&idb, &trust, vec![ALPN.to_vec()])?,
        client: relay_tls::client_config(&ida, &trust, vec![ALPN.to_vec()])?,
    })
}

fn frame(
    stream: u32,
    counter: u32,
    sched: Instant,
    epoch: Instant,
    sizes: &SizeMix,
    rng: &mut u64,
) -> Bytes {
    let size = sizes.pick(rng);
    let sched_ns = sched.duration_since(epoch).as_nanos() as u64;
    let ct = super::ciphertext(super::marker_bytes(stream, counter, sched_ns), size, rng);
    let mut f = Vec::with_capacity(ct.len() + 4);
    f.extend_from_slice(&(ct.len() as u32).to_be_bytes());
    f.extend_from_slice(&ct);
    Bytes::from(f)
}

/// Reads length-prefixed frames until the end of the stream, recording each.
async fn read_frames<R: tokio::io::AsyncRead + Unpin>(mut r: R, rx: Arc<Mutex<Rx>>) {
    let mut len = [0u8; 4];
    let mut buf = Vec::new();
    loop {
        if r.read_exact(&mut len).await.is_err() {
            return;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > 1 << 20 {
            return;
        }
        buf.resize(n, 0);
        if r.read_exact(&mut buf).await.is_err() {
            return;
        }
        let now = Instant::now();
        if let Some((s, c, t)) = super::find_marker(&buf) {
            lock(&rx).record(0, s, c, t, now);
        }
    }
}

/// The per-room schedule of the senders: open loop at `rate` over all rooms, or closed loop.
struct Schedule {
    start: Instant,
    interval: Option<Duration>,
    offset: Duration,
    until: Instant,
    k: u32,
}

impl Schedule {
    fn new(opts: &BenchOptions, room: usize, start: Instant, until: Instant) -> Schedule {
        let interval = opts
            .rate
            .map(|rate| Duration::from_secs_f64(opts.rooms as f64 / rate.max(1e-3)));
        Schedule {
            start,
            interval,
            offset: interval
                .map(|i| i.mul_f64(room as f64 / opts.rooms as f64))
                .unwrap_or_default(),
            until,
            k: 0,
        }
    }

    /// The next send time, after sleeping until it; None when the phase is over.
    async fn next(&mut self) -> Option<Instant> {
        let sched = match self.interval {
            Some(i) => self.start + self.offset + i * self.k,
            None => Instant::now(),
        };
        if sched >= self.until {
            return None;
        }
        if self.interval.is_some() {
            tokio::time::sleep_until(sched.into()).await;
        } else {
            // Closed loop: no timer (tokio's rounds up to the next millisecond).
            tokio::task::yield_now().await;
        }
        self.k += 1;
        Some(sched)
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    carrier: Carrier,
    opts: &BenchOptions,
    profile: &Profile,
    lab: Option<&NetLab>,
    epoch: Instant,
    row: &mut Row,
    progress: &Progress,
    label: &str,
) -> Result<()> {
    let tls = tls()?;
    let rx = Arc::new(Mutex::new(Rx::new(epoch, 1)?));
    row.followers = 1;
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu = || {
        let all = super::cpu_us(std::process::id()).unwrap_or(0);
        all.saturating_sub(lab.and_then(NetLab::forwarder_cpu_us).unwrap_or(0))
    };
    progress.line(&format!("{label} connecting"));
    let t0 = Instant::now();
    let mut rng = 7u64;
    let probe = frame(super::PROBE_STREAM, 0, t0, epoch, &opts.sizes, &mut rng);
    // Sender side: one send function per room.
    let mut room_tx: Vec<tokio::sync::mpsc::Sender<Bytes>> = Vec::new();
    // A JoinSet: if the row is abandoned (its time is up), its tasks stop with it.
    let mut tasks = tokio::task::JoinSet::new();
    // Quinn's endpoints, closed at the end so that the next row can bind the same port.
    let mut endpoints: Option<(quinn::Endpoint, quinn::Endpoint)> = None;
    match carrier {
        Carrier::Quinn => {
            let mut sc = quinn::ServerConfig::with_crypto(Arc::new(
                QuicServerConfig::try_from(tls.server).map_err(|e| anyhow!("quic tls: {e}"))?,
            ));
            let mut tc = quinn::TransportConfig::default();
            opts.quic_cc.apply(&mut tc);
            tc.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096));
            sc.transport_config(Arc::new(tc));
            let (ssock, csock) = sockets_udp(lab)?;
            let server_addr = ssock.local_addr()?;
            let server = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(sc),
                ssock,
                Arc::new(quinn::TokioRuntime),
            )?;
            let mut client = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                csock,
                Arc::new(quinn::TokioRuntime),
            )?;
            let mut cc = quinn::ClientConfig::new(Arc::new(
                QuicClientConfig::try_from(tls.client).map_err(|e| anyhow!("quic tls: {e}"))?,
            ));
            // The sender is the client: its controller is the one that matters.
            let mut ct = quinn::TransportConfig::default();
            opts.quic_cc.apply(&mut ct);
            cc.transport_config(Arc::new(ct));
            client.set_default_client_config(cc);
            let rx2 = rx.clone();
            let srv = server.clone();
            tasks.spawn(async move {
                while let Some(inc) = srv.accept().await {
                    let rx = rx2.clone();
                    tokio::spawn(async move {
                        let Ok(conn) = inc.await else { return };
                        while let Ok((_, recv)) = conn.accept_bi().await {
                            tokio::spawn(read_frames(recv, rx.clone()));
                        }
                    });
                }
            });
            let conn =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, client.connect(server_addr, "b.example")?)
                    .await
                    .map_err(|_| {
                        anyhow!(
                            "bare quinn handshake: no answer within {HANDSHAKE_TIMEOUT:?}{}",
                            super::netlab::link_note(lab)
                        )
                    })?
                    .context("bare quinn handshake")?;
            let (mut s, _r) = conn.open_bi().await?;
            s.write_all(&probe).await?;
            s.finish()?;
            for _ in 0..opts.rooms {
                let (mut send, _recv) = conn.open_bi().await?;
                let (tx, mut rxq) = tokio::sync::mpsc::channel::<Bytes>(64);
                room_tx.push(tx);
                tasks.spawn(async move {
                    let _recv = _recv;
                    while let Some(f) = rxq.recv().await {
                        if send.write_all(&f).await.is_err() {
                            return;
                        }
                    }
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
            setup(&rx, t0, row, lab).await?;
            // Keep the connection alive until the end of this function.
            tasks.spawn(async move {
                let _keep = conn;
                futures::future::pending::<()>().await;
            });
            endpoints = Some((client, server));
        }
        Carrier::Tls => {
            let (listener, server_addr) = match lab {
                Some(lab) => {
                    let l = lab.in_ns(1, || {
                        let l = std::net::TcpListener::bind((NetLab::addr(1), PORT))?;
                        l.set_nonblocking(true)?;
                        Ok(l)
                    })?;
                    let a = l.local_addr()?;
                    (l, a)
                }
                None => {
                    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
                    l.set_nonblocking(true)?;
                    let a = l.local_addr()?;
                    (l, a)
                }
            };
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server);
            let rx2 = rx.clone();
            tasks.spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    let _ = s.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let rx = rx2.clone();
                    tokio::spawn(async move {
                        if let Ok(t) = acceptor.accept(s).await {
                            read_frames(tokio::io::BufReader::with_capacity(65536, t), rx).await;
                        }
                    });
                }
            });
            let stream = match lab {
                Some(lab) => lab.in_ns(0, move || {
                    // Bounded: this blocks a runtime thread, which no timer can interrupt.
                    let s = std::net::TcpStream::connect_timeout(&server_addr, CONNECT_TIMEOUT)?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })?,
                None => {
                    let s = std::net::TcpStream::connect(server_addr)?;
                    s.set_nonblocking(true)?;
                    s
                }
            };
            let stream = tokio::net::TcpStream::from_std(stream)?;
            stream.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("b.example")
                .map_err(|e| anyhow!("server name: {e}"))?;
            let t = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsConnector::from(tls.client).connect(name, stream),
            )
            .await
            .map_err(|_| {
                anyhow!(
                    "bare tls handshake: no answer within {HANDSHAKE_TIMEOUT:?}{}",
                    super::netlab::link_note(lab)
                )
            })?
            .context("bare tls handshake")?;
            let (tx, mut rxq) = tokio::sync::mpsc::channel::<Bytes>(4096);
            tx.send(probe)
                .await
                .map_err(|_| anyhow!("tls writer gone"))?;
            tasks.spawn(async move {
                // Coalesce: write what is queued, flush when the queue is empty.
                let mut w = tokio::io::BufWriter::with_capacity(65536, t);
                while let Some(f) = rxq.recv().await {
                    if w.write_all(&f).await.is_err() {
                        return;
                    }
                    while let Ok(f) = rxq.try_recv() {
                        if w.write_all(&f).await.is_err() {
                            return;
                        }
                    }
                    if w.flush().await.is_err() {
                        return;
                    }
                }
                let _ = w.shutdown().await;
                // Read until the receiver closes: closing a socket with unread input (the
                // server's session tickets) would reset it and drop what is still unsent.
                let mut t = w.into_inner();
                let mut sink = Vec::new();
                let _ = t.read_to_end(&mut sink).await;
            });
            for _ in 0..opts.rooms {
                room_tx.push(tx.clone());
            }
            drop(tx);
            setup(&rx, t0, row, lab).await?;
        }
    }
    lock(&rx).new_phase();

    let cpu0 = cpu();
    let link0 = lab.map(NetLab::snapshot).unwrap_or_default();
    if let Some(lab) = lab {
        lab.take_drops();
    }
    let start = Instant::now();
    let until = start + opts.duration;
    let mut senders = Vec::new();
    for (r, tx) in room_tx.into_iter().enumerate() {
        let mut sch = Schedule::new(opts, r, start, until);
        let sizes = opts.sizes.clone();
        let sent = sent.clone();
        let stop = stop.clone();
        let window = opts.rate.is_none().then(|| (rx.clone(), opts.window));
        senders.push(tokio::spawn(async move {
            let mut rng = 0x2545_f491_4f6c_dd1d ^ ((r as u64 + 1) << 20);
            let mut counter = 0u32;
            while let Some(mut sched) = sch.next().await {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Some((rx, w)) = &window {
                    super::wait_window(rx, r as u32, u64::from(counter), 1, *w, &stop).await;
                    sched = Instant::now();
                }
                let f = frame(r as u32, counter, sched, epoch, &sizes, &mut rng);
                counter += 1;
                if tx.send(f).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    loop {
        if senders.iter().all(|s| s.is_finished()) {
            break;
        }
        progress.line(&format!(
            "{label} {:.1}/{:.0} s  sent {}  delivered {}",
            start
                .elapsed()
                .as_secs_f64()
                .min(opts.duration.as_secs_f64()),
            opts.duration.as_secs_f64(),
            sent.load(Ordering::Relaxed),
            lock(&rx).delivered
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for s in senders {
        let _ = s.await;
    }
    let sent = sent.load(Ordering::Relaxed);
    progress.line(&format!("{label} waiting for the last deliveries"));
    super::settle(&rx, sent, opts.settle).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu1 = cpu();
    let link = lab.map(NetLab::snapshot).unwrap_or_default().since(link0);
    let drops = lab.map(NetLab::take_drops).unwrap_or_default();
    stop.store(true, Ordering::Relaxed);
    tasks.abort_all();
    if let Some((client, server)) = endpoints {
        // A closed connection drains for three PTOs (hundreds of milliseconds with an RTT)
        // before its endpoint lets go of the socket; the next run of this row binds that port.
        client.close(0u32.into(), b"row over");
        server.close(0u32.into(), b"row over");
        let idle = async { tokio::join!(client.wait_idle(), server.wait_idle()) };
        if tokio::time::timeout(ENDPOINT_DRAIN, idle).await.is_err() {
            progress.done(&format!(
                "{label} note: quinn's endpoints still draining after {ENDPOINT_DRAIN:?}"
            ));
        }
    }
    let t = lock(&rx);
    row.sent = sent;
    row.delivered = t.delivered;
    super::fill_latency(row, &t, &drops, profile, epoch);
    if t.delivered > 0 {
        row.cpu_us_per_msg = Some(cpu1.saturating_sub(cpu0) as f64 / t.delivered as f64);
        if lab.is_some() {
            row.wire_bytes_per_msg = Some(link.bytes as f64 / t.delivered as f64);
        }
    }
    row.link_drops = lab.map(|_| link.dropped);
    row.socket_drops = link.socket_drops;
    row.lost = Some(sent.saturating_sub(t.delivered));
    row.duplicated = Some(t.duplicated);
    row.out_of_order = Some(t.out_of_order);
    row.note = "baseline: no relay, one hop, same messages and schedule".into();
    Ok(())
}

/// The pump's two UDP sockets, with the kernel buffers the relay's QUIC endpoint asks for, so
/// that the baseline and the relay meet the same socket.
fn sockets_udp(lab: Option<&NetLab>) -> Result<(std::net::UdpSocket, std::net::UdpSocket)> {
    let (server, client) = match lab {
        Some(lab) => (
            lab.in_ns(1, bind_server)?,
            lab.in_ns(0, || {
                std::net::UdpSocket::bind(SocketAddr::from((NetLab::addr(0), 0)))
            })?,
        ),
        None => (
            std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?,
            std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?,
        ),
    };
    for s in [&server, &client] {
        relay_quic::socket::enlarge_buffers(s)?;
    }
    Ok((server, client))
}

/// The pump's server socket in the follower's namespace, on the fixed port. The previous
/// row's endpoint may still hold it while it drains (see [`ENDPOINT_DRAIN`]): retry until then.
fn bind_server() -> std::io::Result<std::net::UdpSocket> {
    let until = Instant::now() + ENDPOINT_DRAIN;
    loop {
        match std::net::UdpSocket::bind((NetLab::addr(1), PORT)) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Waits for the probe frame; the setup time is from before the handshake to its delivery.
async fn setup(
    rx: &Arc<Mutex<Rx>>,
    t0: Instant,
    row: &mut Row,
    lab: Option<&NetLab>,
) -> Result<()> {
    if !super::settle(rx, 1, Duration::from_secs(30)).await {
        bail!(
            "the first message did not arrive within 30 s{}",
            super::netlab::link_note(lab)
        );
    }
    let last = lock(rx).last_delivery.unwrap_or(t0);
    row.setup_ms = Some(last.duration_since(t0).as_secs_f64() * 1e3);
    Ok(())
}
