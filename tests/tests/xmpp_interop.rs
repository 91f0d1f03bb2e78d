//! MIMI over real XMPP servers: relay A is a component of Prosody, relay B a component of
//! ejabberd, and the servers federate over s2s. A room hosted by A, followed by B: every
//! message must arrive once and in order on both sides. Then the same stanzas between two raw
//! components, for the servers' own ceiling.
//!
//! Needs the servers `interop/run.sh xmpp` configures and starts; without them (no
//! `MIMI_XMPP_INTEROP` in the environment) it prints why and passes.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use mimi_wire::uri::RoomId;
use relay_node::client::LocalClient;
use relay_node::{Node, NodeConfig};
use relay_xmpp::scanner::{Item, Scanner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAGIC: &[u8; 4] = b"XIOP";
const ROOM: &str = "mimi://a.example/r/interop";
/// Concurrent submitters per provider.
const SENDERS: u32 = 16;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if std::env::var_os("MIMI_XMPP_INTEROP").is_none() {
        println!(
            "test xmpp_interop ... skipped: no XMPP servers (run `interop/run.sh xmpp`, which starts Prosody and ejabberd and sets MIMI_XMPP_INTEROP)"
        );
        return;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    match rt.block_on(run()) {
        Ok(()) => println!("test xmpp_interop ... ok"),
        Err(e) => {
            println!("test xmpp_interop ... FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}

fn message(provider: &str, sender: u32, counter: u32) -> Bytes {
    let mut ct = Vec::with_capacity(100);
    ct.extend_from_slice(MAGIC);
    ct.extend_from_slice(&sender.to_be_bytes());
    ct.extend_from_slice(&counter.to_be_bytes());
    ct.resize(100, 0x5a);
    let mls = mimi_wire::mls::private_message(b"interop-group", 1, &ct);
    let req = mimi_wire::proto::SubmitMessageRequest::mls10(
        mls,
        format!("mimi://{provider}/u/sender{sender}"),
    )
    .unwrap();
    Bytes::from(req.encode().unwrap())
}

fn marker(fanout: &[u8]) -> Option<(u32, u32)> {
    let at = fanout.windows(4).position(|w| w == MAGIC)?;
    let s = u32::from_be_bytes(fanout.get(at + 4..at + 8)?.try_into().ok()?);
    let c = u32::from_be_bytes(fanout.get(at + 8..at + 12)?.try_into().ok()?);
    Some((s, c))
}

fn node_config(dir: &std::path::Path, me: &str, peer: &str, server: &str, secret: &str) -> String {
    let (mine, theirs) = (me.replace(".example", ""), peer.replace(".example", ""));
    let follows = if me == "a.example" {
        String::new()
    } else {
        format!("follows = [\"{ROOM}\"]\n")
    };
    let mut t = format!(
        "[node]\ndomain = \"{me}\"\ndata_dir = \"data/{me}\"\nadmin = \"127.0.0.1:0\"\nstore = \"memory\"\n{follows}\
         [tls]\ncert = \"{me}.crt\"\nkey = \"{me}.key\"\n[listen]\nxmpp = \"127.0.0.1:0\"\n\
         [[peers]]\ndomain = \"{peer}\"\ntransport = \"xmpp\"\naddress = \"127.0.0.1:9\"\ncert = \"{peer}.crt\"\n"
    );
    if me == "a.example" {
        let _ = write!(t, "[[rooms]]\nid = \"{ROOM}\"\nfollowers = [\"{peer}\"]\n");
    }
    let _ = write!(
        t,
        "[xmpp]\nserver = \"{server}\"\ncomponent = \"relay.{mine}.localhost\"\nsecret = \"{secret}\"\n\
         peers = {{ \"{peer}\" = \"relay.{theirs}.localhost\" }}\n"
    );
    let _ = dir;
    t
}

async fn start(dir: &std::path::Path, me: &str, text: &str) -> Result<Node> {
    let file = dir.join(format!("{me}.toml"));
    std::fs::write(&file, text)?;
    let cfg = NodeConfig::parse(&file, text)?;
    Ok(Node::start(cfg).await?)
}

async fn run() -> Result<()> {
    let n: u32 = env("MIMI_XMPP_MESSAGES", "1000").parse()?;
    let prosody = env("PROSODY_COMPONENT", "127.0.0.1:5347");
    let ejabberd = env("EJABBERD_COMPONENT", "127.0.0.2:5347");
    let secret_a = env("PROSODY_SECRET", "secret-a");
    let secret_b = env("EJABBERD_SECRET", "secret-b");
    let dir = tempfile::tempdir()?;
    for d in ["a.example", "b.example"] {
        let g = relay_tls::generate(&d.parse()?)?;
        std::fs::write(dir.path().join(format!("{d}.crt")), g.cert_pem)?;
        std::fs::write(dir.path().join(format!("{d}.key")), g.key_pem)?;
    }
    let a = start(
        dir.path(),
        "a.example",
        &node_config(dir.path(), "a.example", "b.example", &prosody, &secret_a),
    )
    .await
    .context("relay a as a component of prosody")?;
    let b = start(
        dir.path(),
        "b.example",
        &node_config(dir.path(), "b.example", "a.example", &ejabberd, &secret_b),
    )
    .await
    .context("relay b as a component of ejabberd")?;
    let room: RoomId = ROOM.parse()?;

    // Both components must be up and the servers federating: the first submission from b
    // travels b -> ejabberd -> s2s -> prosody -> a; retry until it is accepted.
    let started = Instant::now();
    let mut cb = LocalClient::new(b.admin);
    async fn submit(c: &mut LocalClient, room: &RoomId, body: Bytes) -> Result<u32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut tries = 0;
        loop {
            tries += 1;
            match c.submit(room, body.clone()).await {
                Ok((s, r)) if s == hyper::StatusCode::OK => {
                    if matches!(
                        mimi_wire::proto::SubmitMessageResponse::decode(&r).map(|r| r.status),
                        Ok(mimi_wire::proto::SubmitStatus::Accepted { .. })
                    ) {
                        return Ok(tries);
                    }
                }
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("a submission was not accepted within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    submit(&mut cb, &room, message("b.example", SENDERS + 1, 0))
        .await
        .context("first message from b")?;
    println!(
        "  first submission from b accepted after {:?} (component logins and s2s setup)",
        started.elapsed()
    );

    // Senders 1..=S are clients of a, S+1..=2S clients of b, all submitting at once; each
    // sender's messages must arrive in its order. Every message reaches both providers, the
    // sender's own included (protocol-06 §5.5: the hub fans out to every member).
    let senders = SENDERS;
    let per = n / senders;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for s in 1..=2 * senders {
        let (admin, provider) = if s <= senders {
            (a.admin, "a.example")
        } else {
            (b.admin, "b.example")
        };
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = LocalClient::new(admin);
            let mut retries = 0;
            for i in 0..per {
                if s == senders + 1 && i == 0 {
                    continue; // sent above
                }
                retries += submit(&mut c, &room, message(provider, s, i)).await? - 1;
            }
            Ok::<_, anyhow::Error>(retries)
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await??;
    }

    let mut problems = Vec::new();
    let mut last_delivery = t0;
    let mut delivered = 0u64;
    for (name, node, expect) in [
        ("b", &b, (1..=2 * senders).collect::<Vec<_>>()),
        ("a", &a, (1..=2 * senders).collect::<Vec<_>>()),
    ] {
        let mut c = LocalClient::new(node.admin);
        let mut next: HashMap<u32, u32> = expect.iter().map(|&s| (s, 0)).collect();
        let (mut dup, mut ooo, mut after) = (0u64, 0u64, 0u64);
        let want = u64::from(per) * expect.len() as u64;
        let mut got = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while got < want && Instant::now() < deadline {
            for item in c.inbox(after, 4096, 500).await? {
                after = item.offset;
                let Some((s, k)) = marker(&item.fanout) else {
                    continue;
                };
                let Some(exp) = next.get_mut(&s) else {
                    problems.push(format!("{name}: unexpected sender {s}"));
                    continue;
                };
                if k < *exp {
                    dup += 1;
                } else {
                    if k > *exp {
                        ooo += 1;
                    }
                    *exp = k + 1;
                    got += 1;
                    last_delivery = last_delivery.max(Instant::now());
                }
            }
        }
        delivered += got;
        println!("  {name}: {got}/{want} delivered, {dup} duplicated, {ooo} out of order");
        if got != want || dup != 0 || ooo != 0 {
            problems.push(format!(
                "{name}: {got}/{want} delivered, {dup} duplicated, {ooo} out of order"
            ));
        }
    }
    println!(
        "  relays through prosody -> s2s -> ejabberd, both directions: {delivered} messages by {} senders in {:?}, {:.0} msgs/s (debug builds print lower figures)",
        2 * senders,
        last_delivery - t0,
        delivered as f64 / (last_delivery - t0).as_secs_f64()
    );
    println!("  submissions retried: {retries}");
    a.shutdown().await?;
    b.shutdown().await?;
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }

    // The servers' own ceiling for the same stanzas: a raw component sends the IQs the relay
    // sends (same size) and another answers each with a result, as a relay does.
    if let (Ok(x), Ok(y)) = (
        std::env::var("RAW_COMPONENT_A"),
        std::env::var("RAW_COMPONENT_B"),
    ) {
        let sample = sample_notify();
        for (label, to_server, to_secret, to_jid) in [
            (
                "prosody only",
                prosody.clone(),
                secret_a.clone(),
                format!("{y}.a.localhost"),
            ),
            (
                "prosody -> s2s -> ejabberd",
                ejabberd.clone(),
                secret_b.clone(),
                format!("{x}.b.localhost"),
            ),
        ] {
            let rate = raw_ceiling(
                (&prosody, &secret_a, &format!("{x}.a.localhost")),
                (&to_server, &to_secret, &to_jid),
                n.max(2000),
                &sample,
            )
            .await
            .with_context(|| format!("raw components, {label}"))?;
            println!("  raw components, {label}: {rate:.0} IQ round trips/s");
        }
    }
    Ok(())
}

/// One relay `/notify` IQ body of the size the run above carries (one FanoutMessage).
fn sample_notify() -> String {
    use base64::Engine;
    let body = message("a.example", 1, 0);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&body[..]);
    format!(
        "<mimi xmlns='urn:mimi-relay:0' endpoint='notify' target='{ROOM}' seq='SEQ'>{b64}</mimi>"
    )
}

struct Raw {
    tcp: TcpStream,
    scanner: Scanner,
}

impl Raw {
    async fn login(server: &str, secret: &str, jid: &str) -> Result<Raw> {
        let addr: SocketAddr = server.parse()?;
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(format!("<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='{jid}'>").as_bytes()).await?;
        let mut raw = Raw {
            tcp,
            scanner: Scanner::new(1 << 20),
        };
        let Item::Header(h) = raw.item().await? else {
            bail!("no stream header")
        };
        let h = relay_xmpp::binding::parse(&h)?;
        let id = h.attr("id").context("stream id")?.to_owned();
        let digest = relay_xmpp::handshake_digest(&id, secret);
        raw.tcp
            .write_all(format!("<handshake>{digest}</handshake>").as_bytes())
            .await?;
        match raw.item().await? {
            Item::Element(e) if e.starts_with(b"<handshake") => Ok(raw),
            other => bail!("handshake refused: {other:?}"),
        }
    }

    async fn item(&mut self) -> Result<Item> {
        let mut buf = vec![0u8; 65536];
        loop {
            if let Some(item) = self.scanner.poll_item()? {
                return Ok(item);
            }
            let n = tokio::time::timeout(Duration::from_secs(30), self.tcp.read(&mut buf))
                .await
                .context("read timed out")??;
            if n == 0 {
                bail!("stream closed");
            }
            self.scanner.push(&buf[..n]);
        }
    }
}

/// IQ round trips per second from `from` to `to` through the servers, pipelined.
async fn raw_ceiling(
    from: (&str, &str, &str),
    to: (&str, &str, &str),
    count: u32,
    payload: &str,
) -> Result<f64> {
    let mut x = Raw::login(from.0, from.1, from.2).await?;
    let y = Raw::login(to.0, to.1, to.2).await?;
    let (xj, yj) = (from.2.to_owned(), to.2.to_owned());
    // y answers every IQ set with an empty result, as fast as it can.
    let answer = tokio::spawn(async move {
        let mut y = y;
        let mut out = String::new();
        let mut answered = 0u32;
        while answered < count {
            let Item::Element(e) = y.item().await? else {
                bail!("y: stream ended")
            };
            let e = relay_xmpp::binding::parse(&e)?;
            if e.name() == "iq" && e.attr("type") == Some("set") {
                let _ = write!(
                    out,
                    "<iq type='result' id='{}' from='{yj}' to='{xj}'/>",
                    e.attr("id").unwrap_or_default()
                );
                answered += 1;
            }
            if y.scanner.buffered() == 0 || out.len() > 32 * 1024 {
                y.tcp.write_all(out.as_bytes()).await?;
                out.clear();
            }
        }
        if !out.is_empty() {
            y.tcp.write_all(out.as_bytes()).await?;
        }
        Ok::<_, anyhow::Error>(y)
    });
    let t0 = Instant::now();
    let (mut rd, mut wr) = x.tcp.into_split();
    let mut scanner = std::mem::replace(&mut x.scanner, Scanner::new(1));
    let yj = to.2.to_owned();
    let xj = from.2.to_owned();
    let payload = payload.to_owned();
    // At most this many unanswered at once, like the relay's pipelines.
    let window = 256u32;
    let (credit_tx, mut credit_rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let sender = tokio::spawn(async move {
        let mut sent = 0u32;
        let mut acked = 0u32;
        while sent < count {
            while sent < count && sent - acked < window {
                let iq = format!(
                    "<iq type='set' id='r{sent}' from='{xj}' to='{yj}'>{}</iq>",
                    payload.replace("SEQ", &sent.to_string())
                );
                wr.write_all(iq.as_bytes()).await?;
                sent += 1;
            }
            match credit_rx.recv().await {
                Some(a) => acked = a,
                None => break,
            }
        }
        Ok::<_, anyhow::Error>(wr)
    });
    let mut results = 0u32;
    let mut buf = vec![0u8; 65536];
    while results < count {
        while let Some(item) = scanner.poll_item()? {
            if let Item::Element(e) = item
                && e.starts_with(b"<iq")
            {
                results += 1;
            }
        }
        let _ = credit_tx.send(results);
        if results >= count {
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), rd.read(&mut buf))
            .await
            .context("raw results timed out")??;
        if n == 0 {
            bail!("x: stream closed after {results} results");
        }
        scanner.push(&buf[..n]);
    }
    let elapsed = t0.elapsed();
    drop(credit_tx);
    let _ = sender.await?;
    let _ = answer.await?;
    Ok(f64::from(count) / elapsed.as_secs_f64())
}
