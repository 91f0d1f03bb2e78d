//! The frame of an adapter that gives each peer one sending task fed by a bounded queue and
//! reports outcomes from a task of its own (HTTPS, Matrix): routing a transmit or probe to its
//! peer's queue, the outcomes decided without the peer, graceful shutdown, abort on drop. The
//! listener beside it is [`accept_loop`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mimi_wire::uri::ProviderDomain;
use relay_core::transport::{Response, Transmit, TransmitId, TransportError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::{Gate, HandshakePermit, Inbound};

/// What a peer's queue carries: at least transmits and probes.
pub trait PeerJob: Send + 'static {
    fn transmit(transmit: Transmit) -> Self;
    fn probe() -> Self;
}

/// Outcomes decided inside `send`/`probe`, reported from a task so that the node is never
/// called back re-entrantly.
enum Report {
    Outcome(TransmitId, Result<Response, TransportError>),
    Probe(ProviderDomain, bool),
}

#[derive(Default)]
struct Tasks {
    listener: Option<JoinHandle<()>>,
    peers: Vec<JoinHandle<()>>,
}

/// One task per peer behind a bounded queue of `J`, a listener task, and the reporter.
pub struct PeerTasks<J> {
    peers: BTreeMap<ProviderDomain, mpsc::Sender<J>>,
    reports: mpsc::UnboundedSender<Report>,
    closed: AtomicBool,
    stop: watch::Sender<bool>,
    /// Taken by the first `shutdown`.
    tasks: Mutex<Option<Tasks>>,
    /// Outlives `shutdown`: sends after it still get their `Closed` outcome.
    reporter: JoinHandle<()>,
}

impl<J: PeerJob> PeerTasks<J> {
    /// Starts the reporter, which hands outcomes to `inbound`. Must be called inside a tokio
    /// runtime.
    pub fn new<I: Inbound>(inbound: I) -> Self {
        let (reports, mut rx) = mpsc::unbounded_channel();
        let reporter = tokio::spawn(async move {
            while let Some(report) = rx.recv().await {
                match report {
                    Report::Outcome(id, outcome) => inbound.outcome(id, outcome),
                    Report::Probe(peer, alive) => inbound.probe_outcome(peer, alive),
                }
            }
        });
        PeerTasks {
            peers: BTreeMap::new(),
            reports,
            closed: AtomicBool::new(false),
            stop: watch::channel(false).0,
            tasks: Mutex::new(Some(Tasks::default())),
            reporter,
        }
    }

    /// Flips to `true` when `shutdown` starts; every task watches it.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// The listener; `shutdown` waits for it.
    pub fn spawn_listener(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        if let Some(tasks) = self.tasks_mut() {
            tasks.listener = Some(tokio::spawn(task));
        }
    }

    /// `dest`'s task, fed by a queue of `queue` jobs; `shutdown` waits for it.
    pub fn spawn_peer<F, Fut>(&mut self, dest: ProviderDomain, queue: usize, run: F)
    where
        F: FnOnce(mpsc::Receiver<J>, watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(queue);
        let task = tokio::spawn(run(rx, self.stopping()));
        if let Some(tasks) = self.tasks_mut() {
            tasks.peers.push(task);
        }
        self.peers.insert(dest, tx);
    }

    fn tasks_mut(&mut self) -> Option<&mut Tasks> {
        self.tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
    }

    /// The peers that have a task.
    pub fn peers(&self) -> impl Iterator<Item = &ProviderDomain> {
        self.peers.keys()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Queues `job` for `dest`, or gives it back with why not: `Closed` after shutdown,
    /// `NoRoute` for an unknown peer, `Busy` when its queue is full.
    pub fn queue(&self, dest: &ProviderDomain, job: J) -> Result<(), (J, TransportError)> {
        if self.is_closed() {
            return Err((job, TransportError::Closed));
        }
        let Some(queue) = self.peers.get(dest) else {
            return Err((job, TransportError::NoRoute(dest.clone())));
        };
        queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(job) => (job, TransportError::Busy),
            mpsc::error::TrySendError::Closed(job) => (job, TransportError::Closed),
        })
    }

    /// [`crate::Transport::send`]: queued, or its outcome reported at once.
    pub fn send(&self, transmit: Transmit) {
        let (id, dest) = (transmit.id, transmit.dest.clone());
        if let Err((_, error)) = self.queue(&dest, J::transmit(transmit)) {
            self.report(Report::Outcome(id, Err(error)));
        }
    }

    /// [`crate::Transport::probe`]: queued, or reported dead at once.
    pub fn probe(&self, peer: &ProviderDomain) {
        if self.queue(peer, J::probe()).is_err() {
            self.report(Report::Probe(peer.clone(), false));
        }
    }

    fn report(&self, report: Report) {
        // Fails only once the reporter is gone, i.e. the adapter is being dropped.
        let _ = self.reports.send(report);
    }

    /// Refuses new work, tells every task to stop and waits for the listener and the peer
    /// tasks to finish (each bounds its own grace period). `false` if an earlier call did it.
    pub async fn shutdown(&self) -> bool {
        self.closed.store(true, Ordering::Release);
        self.stop.send_replace(true);
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(tasks) = tasks else {
            return false;
        };
        if let Some(listener) = tasks.listener {
            let _ = listener.await;
        }
        for peer in tasks.peers {
            let _ = peer.await;
        }
        true
    }
}

impl<J> Drop for PeerTasks<J> {
    /// Without `shutdown`, everything stops at once; outcomes still owed are never reported.
    fn drop(&mut self) {
        let tasks = self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(tasks) = tasks {
            if let Some(listener) = tasks.listener {
                listener.abort();
            }
            for peer in tasks.peers {
                peer.abort();
            }
        }
        self.reporter.abort();
    }
}

impl<J> std::fmt::Debug for PeerTasks<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTasks")
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Accepts TCP connections until `stop` flips, each admitted by `gate` (a source under
/// penalty, or one over the handshake cap, is closed at once, before any TLS work) and served
/// by `serve` on its own task; then lets the open connections finish for up to `grace` and
/// aborts the rest.
pub async fn accept_loop<F, Fut>(
    transport: &'static str,
    listener: TcpListener,
    gate: Arc<Gate>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, HandshakePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    let permit = match gate.admit(remote.ip()) {
                        Ok(permit) => permit,
                        Err(over) => {
                            tracing::debug!(transport, %remote, %over, "connection refused before tls");
                            continue;
                        }
                    };
                    conns.spawn(serve(tcp, remote, permit));
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(transport, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            transport,
            open = conns.len(),
            "connections still busy after the grace period; closing them"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    tracing::info!(transport, "listener stopped");
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use mimi_wire::endpoint::Endpoint;
    use relay_core::transport::{Request, Status, TransportKind};

    use super::*;

    #[derive(Debug)]
    enum Job {
        Transmit(TransmitId),
        Probe,
    }

    impl PeerJob for Job {
        fn transmit(t: Transmit) -> Self {
            Job::Transmit(t.id)
        }
        fn probe() -> Self {
            Job::Probe
        }
    }

    type Log = Arc<StdMutex<Vec<String>>>;

    #[derive(Clone, Default)]
    struct Node(Log);

    impl Inbound for Node {
        async fn request(&self, _: Request) -> Response {
            Response::error(Status::Internal, "unused")
        }
        fn outcome(&self, id: TransmitId, outcome: Result<Response, TransportError>) {
            let line = format!("{} {:?}", id.0, outcome.map(|r| r.status));
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
        fn probe_outcome(&self, peer: ProviderDomain, alive: bool) {
            let line = format!("probe {peer} {alive}");
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }

    fn transmit(id: u64, dest: &str) -> Transmit {
        Transmit {
            id: TransmitId(id),
            dest: dest.parse().expect("domain"),
            transport: TransportKind::Https,
            endpoint: Endpoint::Notify,
            target: "t".into(),
            seq: None,
            lineage: None,
            body: Vec::new(),
        }
    }

    async fn lines(log: &Log, n: usize) -> Vec<String> {
        for _ in 0..1000 {
            let got = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if got.len() >= n {
                return got;
            }
            tokio::task::yield_now().await;
        }
        log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    #[tokio::test]
    async fn jobs_reach_their_peer_and_the_rest_is_reported() {
        let node = Node::default();
        let mut tasks = PeerTasks::<Job>::new(node.clone());
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let (hold_tx, hold) = watch::channel(false);
        tasks.spawn_peer(
            "b.example".parse().expect("d"),
            1,
            move |mut rx, mut stop| async move {
                let mut hold = hold;
                let _ = hold.wait_for(|go| *go).await;
                loop {
                    tokio::select! {
                        Some(job) = rx.recv() => { let _ = seen_tx.send(job); }
                        _ = stop.changed() => return,
                    }
                }
            },
        );
        tasks.send(transmit(1, "b.example"));
        tasks.send(transmit(2, "b.example")); // the queue holds one
        tasks.send(transmit(3, "x.example"));
        tasks.probe(&"x.example".parse().expect("d"));
        let got = lines(&node.0, 3).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], "2 Err(Busy)");
        assert!(got[1].starts_with("3 Err(NoRoute("), "{got:?}");
        assert_eq!(got[2], "probe x.example false");
        let _ = hold_tx.send(true);
        assert!(matches!(
            seen.recv().await,
            Some(Job::Transmit(TransmitId(1)))
        ));
        assert!(tasks.shutdown().await);
        assert!(
            !tasks.shutdown().await,
            "the second call finds nothing to stop"
        );
        tasks.send(transmit(4, "b.example"));
        assert_eq!(
            lines(&node.0, 4).await.last().map(String::as_str),
            Some("4 Err(Closed)")
        );
    }
}
