//! `DurableStore` on a real filesystem that runs out of space: a small tmpfs mounted for the
//! test, which needs root (CI runs as root; elsewhere the test says it skipped).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_store::{DurableStore, InboxRange, InboxRecord, Store, StoreOp};

/// A tmpfs of `size` bytes mounted in a temporary directory, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: usize) -> Option<SmallFs> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("SKIPPED: mounting a small tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if !out.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(SmallFs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what is left with a file, until the filesystem refuses a write.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0xee; 4096];
        while f.write_all(&chunk).and_then(|()| f.sync_data()).is_ok() {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn record(n: u64) -> InboxRecord {
    InboxRecord {
        room: RoomId::parse("mimi://hub.example/r/lobby").expect("room"),
        from: ProviderDomain::parse("hub.example").expect("domain"),
        accepted_ms: n,
        fanout: Bytes::from(vec![n as u8; 2000]),
    }
}

fn deliver(store: &mut DurableStore, offsets: std::ops::Range<u64>) {
    for offset in offsets {
        store.apply(StoreOp::Inbox {
            offset,
            record: &record(offset),
        });
    }
}

fn offsets(store: &DurableStore) -> Vec<u64> {
    let read = store.read_inbox(InboxRange::after(0)).expect("read");
    read.iter().map(|(o, _)| *o).collect()
}

#[test]
fn a_full_disk_fails_commits_as_storage_full_and_the_same_batch_is_written_once_freed() {
    let Some(fs) = SmallFs::mount(8 << 20) else {
        return;
    };
    let path = fs.path().join("store.redb");
    let mut store = DurableStore::open(&path).expect("open");
    deliver(&mut store, 1..11);
    store.commit().expect("commit with space");
    let filler = fs.fill();

    // A batch that needs new space: its write fails, and says why.
    deliver(&mut store, 11..511);
    let mut write = store.seal().expect("seal").expect("a batch");
    let e = write().expect_err("a write on a full disk");
    assert!(e.is_storage_full(), "not taken for a full disk: {e:?}");
    // Reads go on, and see what was committed before.
    assert_eq!(offsets(&store), (1..11).collect::<Vec<_>>());
    let e = write().expect_err("still full");
    assert!(e.is_storage_full(), "{e:?}");

    // Space is freed: the same batch is written, whole.
    std::fs::remove_file(&filler).expect("free");
    write().expect("written once there is space");
    assert_eq!(offsets(&store), (1..511).collect::<Vec<_>>());

    // A store opens, loads and reads on a full disk, and frees space by trimming.
    let filler = fs.fill();
    drop(write);
    drop(store);
    let mut store = DurableStore::open(&path).expect("open on a full disk");
    let snap = store.load().expect("load on a full disk");
    assert_eq!(snap.inbox.last, 510);
    assert_eq!(offsets(&store).len(), 510);
    store.apply(StoreOp::InboxTrim { upto: 500 });
    match store.commit() {
        Ok(()) => assert_eq!(offsets(&store), (501..511).collect::<Vec<_>>()),
        // A delete needs a few pages of its own: without them it waits for space like any
        // other commit.
        Err(e) => assert!(e.is_storage_full(), "{e:?}"),
    }
    std::fs::remove_file(&filler).expect("free");
    store.commit().expect("commit once freed");
    assert_eq!(offsets(&store), (501..511).collect::<Vec<_>>());
}

const CHILD_ENV: &str = "RELAY_STORE_FULL_DISK_CHILD";

/// The child's body (a no-op in a normal test run): commits, says so, and waits to be killed.
#[test]
fn full_disk_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut store = DurableStore::open(&path).expect("open");
    deliver(&mut store, 1..101);
    store.commit().expect("commit");
    println!("COMMITTED");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn a_store_killed_on_a_full_disk_opens_or_says_it_needs_space() {
    let Some(fs) = SmallFs::mount(8 << 20) else {
        return;
    };
    let path = fs.path().join("store.redb");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "full_disk_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    assert!(lines.any(|l| l.is_ok_and(|l| l.contains("COMMITTED"))));
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    let filler = fs.fill();
    match DurableStore::open(&path) {
        Ok(store) => {
            eprintln!("opened after kill on a full disk");
            assert_eq!(offsets(&store).len(), 100);
        }
        Err(e) => {
            eprintln!("open failed: {e:?} full={}", e.is_storage_full());
            assert!(e.is_storage_full(), "{e:?}");
            std::fs::remove_file(&filler).expect("free");
            let store = DurableStore::open(&path).expect("opens once freed");
            assert_eq!(offsets(&store).len(), 100);
        }
    }
}
