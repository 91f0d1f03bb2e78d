//! The local API's `submitBatch` against a running hub: answers in order, each submission
//! (of any room) accepted or refused on its own, a retried batch never accepted twice, and a malformed batch
//! refused without hurting the connection.

use bytes::Bytes;
use hyper::StatusCode;
use mimi_relay_tests::{ROOM, start_hub, submit_body};
use mimi_wire::proto::{SubmitMessageResponse, SubmitStatus};
use relay_node::client::LocalClient;

fn accepted(answer: &(StatusCode, Bytes)) -> bool {
    answer.0 == StatusCode::OK
        && matches!(
            SubmitMessageResponse::decode(&answer.1).map(|r| r.status),
            Ok(SubmitStatus::Accepted { .. })
        )
}

async fn metric(api: &mut LocalClient, name: &str) -> String {
    let (_, page) = api.get("/metrics").await.expect("metrics");
    let page = String::from_utf8_lossy(&page).into_owned();
    page.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_answered_in_order_and_never_accepted_twice() {
    let (_dir, node) = start_hub("https").await;
    let mut api = LocalClient::new(node.admin);

    let batch = [
        (ROOM, submit_body("a.example", 1)),
        (ROOM, submit_body("a.example", 2)),
        (ROOM, Bytes::from_static(&[1, 0xff, 0xff])), // malformed TLS-PL
        ("mimi://a.example/r/nowhere", submit_body("a.example", 5)),
        (ROOM, submit_body("a.example", 3)),
    ];
    let answers = api.submit_batch(&batch).await.expect("batch");
    assert_eq!(answers.len(), 5);
    assert!(accepted(&answers[0]) && accepted(&answers[1]) && accepted(&answers[4]));
    assert_eq!(answers[2].0, StatusCode::BAD_REQUEST);
    assert_eq!(answers[3].0, StatusCode::NOT_FOUND);
    // Each accepted one answers what a single /submit would have, with its own timestamp.
    assert_eq!(
        metric(&mut api, "mimi_relay_accepted_total").await,
        "mimi_relay_accepted_total 3"
    );

    // The same batch again (a client that lost the answer): the dedupe window answers.
    let again = api.submit_batch(&batch).await.expect("batch again");
    assert_eq!(
        again.iter().map(|a| a.0).collect::<Vec<_>>(),
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert_eq!(
        again[0].1, answers[0].1,
        "the first answer, not a new acceptance"
    );
    assert_eq!(
        metric(&mut api, "mimi_relay_accepted_total").await,
        "mimi_relay_accepted_total 3"
    );
    assert_eq!(
        metric(&mut api, "mimi_relay_dedupe_hits_total").await,
        "mimi_relay_dedupe_hits_total 3"
    );

    // Malformed framing is refused as a whole; the connection keeps working.
    // A cut room length, a request shorter than its length, a room that is not UTF-8, nothing.
    let bad: [&[u8]; 4] = [
        &[0],
        &[0, 1, b'r', 0, 0, 0, 9, 1, 2],
        &[0, 1, 0xff, 0, 0, 0, 0],
        &[],
    ];
    for bad in bad {
        let (s, why) = api
            .post("/v1/client/submitBatch", Bytes::copy_from_slice(bad))
            .await
            .expect("answer");
        assert_eq!(
            s,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&why)
        );
    }
    let more = api
        .submit_batch(&[(ROOM, submit_body("a.example", 4))])
        .await
        .expect("a batch after bad ones");
    assert!(accepted(&more[0]));
    assert_eq!(
        metric(&mut api, "mimi_relay_accepted_total").await,
        "mimi_relay_accepted_total 4"
    );
    node.shutdown().await.expect("clean shutdown");
}

/// A client given a connector opens its connection only through it (the lab opens its sockets
/// in the node's network namespace this way), once per connection, and a connector that fails
/// gives a typed `Connect` error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_opens_the_connection_and_its_failure_is_typed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let (_dir, node) = start_hub("https").await;
    let opened = Arc::new(AtomicUsize::new(0));
    let count = opened.clone();
    let mut api = LocalClient::new(node.admin).with_connector(Arc::new(move |addr| {
        count.fetch_add(1, Ordering::SeqCst);
        std::net::TcpStream::connect(addr)
    }));
    let batch = [(ROOM, submit_body("a.example", 1))];
    assert!(accepted(&api.submit_batch(&batch).await.expect("batch")[0]));
    assert!(accepted(&api.submit_batch(&batch).await.expect("again")[0]));
    assert_eq!(
        opened.load(Ordering::SeqCst),
        1,
        "one keep-alive connection"
    );

    let mut refused = LocalClient::new(node.admin).with_connector(Arc::new(|_| {
        Err(std::io::Error::other("no route into that namespace"))
    }));
    match refused.submit_batch(&batch).await {
        Err(relay_node::client::ClientError::Connect { addr, source }) => {
            assert_eq!(addr, node.admin);
            assert!(source.to_string().contains("no route"), "{source}");
        }
        other => panic!("expected a Connect error, got {other:?}"),
    }
    node.shutdown().await.expect("shutdown");
}
