//! The local API's `submitBatch` against a running hub: answers in order, each submission
//! accepted or refused on its own, a retried batch never accepted twice, and a malformed batch
//! refused without hurting the connection.

use bytes::Bytes;
use hyper::StatusCode;
use mimi_relay_tests::{ROOM, start_hub, submit_body};
use mimi_wire::proto::{SubmitMessageResponse, SubmitStatus};
use mimi_wire::uri::RoomId;
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
    let room: RoomId = ROOM.parse().expect("room");
    let mut api = LocalClient::new(node.admin);

    let batch = [
        submit_body("a.example", 1),
        submit_body("a.example", 2),
        Bytes::from_static(&[1, 0xff, 0xff]), // malformed TLS-PL
        submit_body("a.example", 3),
    ];
    let answers = api.submit_batch(&room, &batch).await.expect("batch");
    assert_eq!(answers.len(), 4);
    assert!(accepted(&answers[0]) && accepted(&answers[1]) && accepted(&answers[3]));
    assert_eq!(answers[2].0, StatusCode::BAD_REQUEST);
    // Each accepted one answers what a single /submit would have, with its own timestamp.
    assert_eq!(
        metric(&mut api, "mimi_relay_accepted_total").await,
        "mimi_relay_accepted_total 3"
    );

    // The same batch again (a client that lost the answer): the dedupe window answers.
    let again = api.submit_batch(&room, &batch).await.expect("batch again");
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
    for bad in [&[0u8, 0, 0][..], &[0, 0, 0, 9, 1, 2][..], &[][..]] {
        let path = format!("/v1/client/submitBatch/{}", room.to_path_segment());
        let (s, why) = api
            .post(&path, Bytes::copy_from_slice(bad))
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
        .submit_batch(&room, &[submit_body("a.example", 4)])
        .await
        .expect("a batch after bad ones");
    assert!(accepted(&more[0]));
    assert_eq!(
        metric(&mut api, "mimi_relay_accepted_total").await,
        "mimi_relay_accepted_total 4"
    );
    node.shutdown().await.expect("clean shutdown");
}
