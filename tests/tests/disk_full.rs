//! A node whose disk fills up, on a real size-limited filesystem (a small tmpfs the test
//! mounts, which needs root: CI runs as root; elsewhere the test says it skipped). It refuses
//! new work with 503 and Retry-After, keeps serving reads and metrics, writes what it held
//! once space is freed, loses nothing, and starts again on a full disk.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mimi_relay_tests::{ROOM, certificates, fanout};
use mimi_wire::proto::SubmitMessageRequest;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_node::NodeConfig;
use relay_node::client::LocalClient;
use relay_tls::{PeerTrust, TlsIdentity};

/// A tmpfs of `size` bytes mounted at `at`, unmounted on drop.
struct SmallFs {
    at: PathBuf,
}

impl SmallFs {
    fn mount(at: &Path, size: usize) -> Option<SmallFs> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("SKIPPED: mounting a small tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        if !out.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(SmallFs { at: at.to_owned() })
    }

    /// Fills what is left with a file, until the filesystem refuses a write.
    fn fill(&self) -> PathBuf {
        let path = self.at.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0xee; 4096];
        while f.write_all(&chunk).and_then(|()| f.sync_data()).is_ok() {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
    }
}

/// a.example hosting [`ROOM`] for b and c over HTTPS, following b's room x, its store on
/// `data`; peers point at the discard port, since the test acts as b itself.
fn config(dir: &Path) -> NodeConfig {
    let text = format!(
        r#"
[node]
domain = "a.example"
data_dir = "data"
admin = "127.0.0.1:0"
follows = ["mimi://b.example/r/x"]
[tls]
cert = "a.example.crt"
key = "a.example.key"
[listen]
https = "127.0.0.1:0"
[[peers]]
domain = "b.example"
transport = "https"
address = "127.0.0.1:9"
cert = "b.example.crt"
[[peers]]
domain = "c.example"
transport = "https"
address = "127.0.0.1:9"
cert = "c.example.crt"
[[rooms]]
id = "{ROOM}"
followers = ["b.example", "c.example"]
[limits]
max_body = 1048576
"#
    );
    NodeConfig::parse(&dir.join("a.toml"), &text).expect("config")
}

/// A local client's submission to [`ROOM`] with `size` bytes of ciphertext `n`.
fn big_submit(n: u8, size: usize) -> Bytes {
    let mls = mimi_wire::mls::private_message(b"g", 1, &vec![n; size]);
    let req = SubmitMessageRequest::mls10(mls, "mimi://a.example/u/alice".to_owned());
    Bytes::from(req.and_then(|r| r.encode()).expect("a valid request"))
}

/// b, talking to a over HTTP/2 with mutual TLS.
struct Peer {
    send: SendRequest<Full<Bytes>>,
}

impl Peer {
    async fn connect(dir: &Path, addr: SocketAddr) -> Peer {
        let me: ProviderDomain = "b.example".parse().expect("domain");
        let id = TlsIdentity::load(me, dir.join("b.example.crt"), dir.join("b.example.key"))
            .expect("identity");
        let mut trust = PeerTrust::new();
        trust
            .load_pem(
                "a.example".parse().expect("domain"),
                dir.join("a.example.crt"),
            )
            .expect("trust");
        let tls = relay_tls::client_config(&id, &trust, vec![b"h2".to_vec()]).expect("tls");
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("a.example").expect("name");
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .expect("tls");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2");
        tokio::spawn(conn);
        Peer { send }
    }

    /// `/notify` of b's room x with event `n` under `seq`: the status and Retry-After.
    async fn notify(&mut self, seq: u64, n: u8) -> (StatusCode, Option<String>) {
        let room = RoomId::parse("mimi://b.example/r/x").expect("room");
        let req = hyper::Request::post(format!(
            "https://a.example/v1/notify/{}",
            room.to_path_segment()
        ))
        .header("from", "mimi@b.example")
        .header("mimi-seq", seq.to_string())
        .body(Full::new(Bytes::from(fanout(1_700_000_000_000, &[n; 32]))))
        .expect("request");
        self.send.ready().await.expect("connection usable");
        let resp = self.send.send_request(req).await.expect("an answer");
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        (status, retry)
    }
}

async fn disk_full_gauge(api: &mut LocalClient) -> u8 {
    let (status, text) = api.get("/metrics").await.expect("metrics");
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&text);
    let line = text
        .lines()
        .find(|l| l.starts_with("mimi_relay_disk_full "))
        .expect("gauge");
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("0 or 1")
}

/// Submits big messages, each from its own connection (their answers are held while the disk
/// is full), until the node says its disk is full; returns the pending submissions.
async fn fill_until_refused(
    admin: SocketAddr,
    api: &mut LocalClient,
    first: u8,
) -> Vec<tokio::task::JoinHandle<StatusCode>> {
    let room = RoomId::parse(ROOM).expect("room");
    let mut pending = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in first.. {
        assert!(Instant::now() < deadline, "the disk never filled");
        let body = big_submit(n, 256 << 10);
        let room = room.clone();
        pending.push(tokio::spawn(async move {
            let mut c = LocalClient::new(admin).with_timeout(Duration::from_secs(120));
            c.submit(&room, body).await.expect("an answer").0
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        if disk_full_gauge(api).await == 1 {
            return pending;
        }
    }
    unreachable!("u8 submissions ran out")
}

/// Every record of the node's inbox, read page by page (an answer carries at most 256 KiB,
/// so the 256 KiB submissions of `fill_until_refused` come back one per answer); each read
/// after an offset lets the node forget the records up to it.
async fn whole_inbox(api: &mut LocalClient) -> Vec<relay_node::client::InboxItem> {
    let mut items: Vec<relay_node::client::InboxItem> = Vec::new();
    loop {
        let after = items.last().map_or(0, |i| i.offset);
        let page = api.inbox(after, 100, 0).await.expect("inbox read");
        if page.is_empty() {
            return items;
        }
        items.extend(page);
    }
}

/// The events of b's room among `items`, each named by the byte `b.notify` repeats 32 times
/// in it (0 if none). The hub delivers its own clients' accepted submissions to its inbox
/// too (§5.5): those are skipped.
fn from_b(items: &[relay_node::client::InboxItem]) -> Vec<u8> {
    items
        .iter()
        .filter(|i| i.room == "mimi://b.example/r/x")
        .map(|i| {
            (1..=u8::MAX)
                .find(|&n| i.fanout.windows(32).any(|w| w == [n; 32]))
                .unwrap_or(0)
        })
        .collect()
}

/// Every submission made while the disk filled is answered once there is space: accepted
/// (held until written, or written before the disk filled), or refused if it came after.
async fn settle(pending: Vec<tokio::task::JoinHandle<StatusCode>>) {
    let mut accepted = 0;
    for h in pending {
        match h.await.expect("task") {
            StatusCode::OK => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("a submission answered {other}"),
        }
    }
    assert!(accepted > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_work_keeps_reads_recovers_and_restarts() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(fs) = SmallFs::mount(&dir.path().join("data"), 24 << 20) else {
        return;
    };
    certificates(dir.path());
    let node = relay_node::Node::start(config(dir.path()))
        .await
        .expect("node starts");
    let mut api = LocalClient::new(node.admin);
    let https = node.listening[&relay_core::TransportKind::Https];
    let mut b = Peer::connect(dir.path(), https).await;
    assert_eq!(b.notify(1, 1).await.0, StatusCode::CREATED);
    assert_eq!(disk_full_gauge(&mut api).await, 0);

    let filler = fs.fill();
    let held = fill_until_refused(node.admin, &mut api, 0).await;
    // New work is refused, over the transport and the local API, with a time to retry.
    let (status, retry) = b.notify(2, 2).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry.is_some(), "503 without Retry-After");
    let room = RoomId::parse(ROOM).expect("room");
    let (status, _) = api
        .submit(&room, big_submit(250, 10))
        .await
        .expect("answer");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Reads go on (and, reading after each record, consume what they read).
    let items = whole_inbox(&mut api).await;
    assert_eq!(from_b(&items), vec![1], "b's first event");

    // Space again: what was held is written and answered, and new work is taken.
    std::fs::remove_file(&filler).expect("free");
    settle(held).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while disk_full_gauge(&mut api).await == 1 {
        assert!(Instant::now() < deadline, "never left the disk-full state");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.notify(2, 2).await.0, StatusCode::CREATED);

    // Full again, and the node stopped and started on the full disk.
    let filler = fs.fill();
    let held = fill_until_refused(node.admin, &mut api, 100).await;
    tokio::time::timeout(Duration::from_secs(30), node.shutdown())
        .await
        .expect("a node on a full disk stops")
        .expect("stops cleanly");
    for h in held {
        // Dropped unanswered or refused: never acknowledged.
        assert_ne!(h.await.ok(), Some(StatusCode::OK));
    }
    let node = relay_node::Node::start(config(dir.path()))
        .await
        .expect("a node starts on a full disk");
    let mut api = LocalClient::new(node.admin);
    // The first was read before the stop, the second accepted after it and not yet read:
    // each once over both reads.
    let items = whole_inbox(&mut api).await;
    assert_eq!(
        from_b(&items),
        vec![2],
        "b's second event, and not its first again"
    );
    let held = fill_until_refused(node.admin, &mut api, 200).await;
    std::fs::remove_file(&filler).expect("free");
    settle(held).await;
    node.shutdown().await.expect("stops");
}
