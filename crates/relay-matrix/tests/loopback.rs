//! Two relays exchange MIMI traffic over signed Matrix transactions on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use mimi_wire::endpoint::Endpoint;
use relay_adapter::Transport;
use relay_core::transport::{Status, Transmit, TransmitId, TransportKind};
use std::sync::atomic::Ordering;

fn notify(id: u64, dest: &mimi_wire::uri::ProviderDomain, seq: u64, body: Vec<Bytes>) -> Transmit {
    Transmit {
        id: TransmitId(id),
        dest: dest.clone(),
        transport: TransportKind::Matrix,
        endpoint: Endpoint::Notify,
        target: "mimi://a.example/r/room".into(),
        seq: Some(seq),
        lineage: None,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_in_full_ordered_transactions() {
    let (a, b) = pair().await;
    let n = 1000u64;
    for i in 0..n {
        a.transport.send(notify(
            i,
            &b.domain,
            i,
            vec![Bytes::from(format!("event {i}"))],
        ));
    }
    until("all outcomes", || {
        a.rec.outcomes.lock().unwrap().len() == n as usize
    })
    .await;
    let outcomes = a.rec.outcomes.lock().unwrap().clone();
    for (id, o) in &outcomes {
        let r = o.as_ref().unwrap();
        assert_eq!(r.status, Status::Created);
        assert_eq!(r.next_seq, Some(id.0 + 1));
    }
    let got = b.rec.requests.lock().unwrap().clone();
    assert_eq!(got.len(), n as usize, "each request delivered once");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.seq, Some(i as u64), "transaction order kept");
        assert_eq!(&r.body[..], format!("event {i}").as_bytes());
        assert_eq!(r.from, a.domain);
        assert_eq!(r.transport, TransportKind::Matrix);
    }
    let txns = a.transport.stats().txns_sent.load(Ordering::Relaxed);
    // One in flight at a time: the backlog is packed, at most 100 EDUs each.
    assert!(txns >= n / 100, "{txns} transactions");
    assert!(
        txns < n / 2,
        "{txns} transactions for {n} transmits: not batched"
    );
    assert_eq!(
        b.transport.stats().txns_received.load(Ordering::Relaxed),
        txns
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_travels_as_fragments_and_arrives_exact() {
    let (a, b) = pair().await;
    let segs: Vec<Bytes> = (0..5)
        .map(|i| {
            Bytes::from(
                (0..70_000)
                    .map(|k| ((k * 31 + i) % 251) as u8)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let joined: Vec<u8> = segs.iter().flat_map(|s| s.iter().copied()).collect();
    a.transport.send(notify(1, &b.domain, 0, segs));
    // Over 100 fragments: refused locally as too large for one transaction.
    a.transport.send(notify(
        2,
        &b.domain,
        1,
        vec![Bytes::from(vec![0u8; 46_000 * 100])],
    ));
    until("outcomes", || a.rec.outcomes.lock().unwrap().len() == 2).await;
    let outcomes = a.rec.outcomes.lock().unwrap().clone();
    let by_id = |i| {
        outcomes
            .iter()
            .find(|(id, _)| id.0 == i)
            .unwrap()
            .1
            .clone()
            .unwrap()
    };
    assert_eq!(by_id(1).status, Status::Created);
    assert_eq!(by_id(2).status, Status::TooLarge);
    let got = b.rec.requests.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], &joined[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_edus_and_unknown_destinations() {
    let (a, mut b) = pair().await;
    a.transport.probe(&b.domain);
    until("probe", || !a.rec.probes.lock().unwrap().is_empty()).await;
    assert_eq!(a.rec.probes.lock().unwrap()[0], (b.domain.clone(), true));

    let content = serde_json::value::to_raw_value(&serde_json::json!({"hello": 1})).unwrap();
    let done = a
        .transport
        .send_edu(&b.domain, "m.direct_to_device", content);
    assert_eq!(done.await.unwrap(), Ok(()));
    let edu = b.edus.recv().await.unwrap();
    assert_eq!(edu.edu_type, "m.direct_to_device");
    assert_eq!(edu.origin, "a.example");
    assert_eq!(edu.content.get(), r#"{"hello":1}"#);

    let nowhere = domain("z.example");
    a.transport.send(notify(9, &nowhere, 0, vec![]));
    until("no route", || !a.rec.outcomes.lock().unwrap().is_empty()).await;
    assert!(a.rec.outcomes.lock().unwrap()[0].1.is_err());

    // After shutdown, sends are refused and nothing hangs.
    b.transport.shutdown().await;
    a.transport.send(notify(10, &b.domain, 0, vec![]));
    until("failure", || a.rec.outcomes.lock().unwrap().len() == 2).await;
    assert!(a.rec.outcomes.lock().unwrap()[1].1.is_err());
}
