//! The core's inbox on a `DurableStore`: far more records than its memory bound, all read back
//! in order exactly once, from memory and from disk, also after a restart.

use std::time::Instant;

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::uri::{ProviderDomain, RoomId};
use relay_core::{
    InboxQuery, Now, Output, Relay, RelayConfig, ReplyToken, Request, Status, Store, TransportKind,
};
use relay_store::DurableStore;

const ROOM: &str = "mimi://hub.example/r/lobby";
const BOUND: usize = 64 * 1024;
/// Fanout bytes per record, and records per `/notify`.
const SIZE: usize = 1000;
const BATCH: u64 = 10;

fn hub() -> ProviderDomain {
    "hub.example".parse().expect("domain")
}

fn config() -> RelayConfig {
    let mut cfg = RelayConfig::new("me.example".parse().expect("domain"))
        .with_route(hub(), TransportKind::Quic);
    cfg.follows = vec![RoomId::parse(ROOM).expect("room")];
    cfg.max_inbox_memory = BOUND;
    cfg
}

fn now(base: Instant) -> Now {
    Now {
        mono: base,
        unix_ms: 1_700_000_000_000,
    }
}

/// Event `n`: a FanoutMessage whose ciphertext starts with `EVT!` and `n`.
fn fanout(n: u64) -> Vec<u8> {
    let mut ct = b"EVT!".to_vec();
    ct.extend_from_slice(&n.to_be_bytes());
    ct.resize(SIZE, 0x5a);
    let mut f = Vec::new();
    let mls = mimi_wire::mls::private_message(b"g", 1, &ct);
    mimi_wire::proto::encode_fanout_application(1_700_000_000_000, &mls, &mut f);
    f
}

fn event_of(fanout: &[u8]) -> u64 {
    let at = fanout
        .windows(4)
        .position(|w| w == b"EVT!")
        .expect("marker")
        + 4;
    u64::from_be_bytes(fanout[at..at + 8].try_into().expect("8 bytes"))
}

struct Follower {
    relay: Relay,
    store: DurableStore,
    token: u64,
}

impl Follower {
    fn open(path: &std::path::Path, base: Instant) -> Follower {
        let mut store = DurableStore::open(path).expect("open");
        let snapshot = store.load().expect("load");
        let relay = Relay::new(config(), snapshot, now(base));
        Follower {
            relay,
            store,
            token: 0,
        }
    }

    /// Events `first..first + BATCH` in one `/notify`, committed as the node would.
    fn notify(&mut self, base: Instant, first: u64) {
        let body: Vec<u8> = (first..first + BATCH).flat_map(fanout).collect();
        self.token += 1;
        let req = Request {
            from: hub(),
            transport: TransportKind::Quic,
            endpoint: Endpoint::Notify,
            target: ROOM.to_owned(),
            seq: Some(first + 1),
            lineage: None,
            body: Bytes::from(body),
        };
        self.relay
            .handle_request(now(base), &mut self.store, ReplyToken(self.token), req);
        self.store.commit().expect("commit");
        let next = self.relay.inbox_next();
        self.relay.handle_inbox_durable(next);
        match self.relay.poll_output() {
            Some(Output::Reply { response, .. }) => assert_eq!(response.status, Status::Created),
            other => panic!("expected a reply, got {other:?}"),
        }
        let resident = self.relay.stats().inbox_resident_bytes;
        assert!(resident <= BOUND as u64, "{resident} bytes resident");
    }

    /// Reads up to `n` records as a local client does (pages of 64, each trimming what was
    /// read before), returning their event numbers; trims them all at the end.
    fn read(&mut self, after: &mut u64, n: usize) -> Vec<u64> {
        let mut got = Vec::new();
        while got.len() < n {
            self.relay
                .handle_inbox_read(&mut self.store, *after)
                .expect("trim");
            let q = InboxQuery {
                after: *after,
                max: 64.min(n - got.len()),
                max_bytes: 16 * SIZE,
                durable_only: false,
            };
            let page = self.relay.read_inbox(&self.store, q).expect("read");
            let Some((last, _)) = page.last() else { break };
            *after = *last;
            got.extend(page.iter().map(|(_, r)| event_of(&r.fanout)));
        }
        self.relay
            .handle_inbox_read(&mut self.store, *after)
            .expect("trim");
        self.store.commit().expect("commit");
        got
    }
}

#[test]
fn an_inbox_far_over_its_memory_bound_reads_back_in_order_once_also_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let base = Instant::now();
    let total: u64 = 2_000;
    let mut f = Follower::open(&path, base);
    for first in (0..total / 2).step_by(BATCH as usize) {
        f.notify(base, first);
    }
    // About 1 MiB waiting against a 64 KiB bound: most of it is on disk only.
    assert_eq!(f.relay.stats().inbox_depth, total / 2);
    let mut after = 0;
    let mut got = f.read(&mut after, 300);
    // A restart: nothing of the inbox comes back into memory.
    drop(f);
    let mut f = Follower::open(&path, base);
    let s = f.relay.stats();
    assert_eq!(
        (s.inbox_depth, s.inbox_resident_bytes),
        (total / 2 - 300, 0)
    );
    for first in (total / 2..total).step_by(BATCH as usize) {
        f.notify(base, first);
    }
    got.extend(f.read(&mut after, usize::MAX));
    let wrong = got.iter().zip(0..).find(|(g, i)| **g != *i);
    assert!(
        got.len() as u64 == total && wrong.is_none(),
        "{} records read, first out of place: {wrong:?}",
        got.len()
    );
    assert_eq!(f.relay.stats().inbox_depth, 0);
    // And after another restart nothing is left to read.
    drop(f);
    let mut f = Follower::open(&path, base);
    assert!(f.read(&mut 0, usize::MAX).is_empty());
}
