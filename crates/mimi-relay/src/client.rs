//! `mimi-relay client`: submit a message to, or read the inbox of, a running node.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use mimi_wire::proto::{FanoutMessage, SubmitMessageRequest, SubmitMessageResponse, SubmitStatus};
use mimi_wire::uri::RoomId;
use relay_node::client::LocalClient;

#[derive(Debug)]
pub enum Action {
    Send {
        room: String,
        from: String,
        text: String,
    },
    Inbox {
        after: u64,
        wait_ms: u64,
    },
}

pub async fn run(admin: SocketAddr, action: Action) -> Result<()> {
    let mut client = LocalClient::new(admin);
    match action {
        Action::Send { room, from, text } => {
            let room: RoomId = room.parse().with_context(|| format!("--room {room:?}"))?;
            let mls = mimi_wire::mls::private_message(room.as_str().as_bytes(), 1, text.as_bytes());
            let req = SubmitMessageRequest::mls10(mls, from)?;
            let (status, body) = client.submit(&room, Bytes::from(req.encode()?)).await?;
            if !status.is_success() {
                bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
            }
            match SubmitMessageResponse::decode(&body)?.status {
                SubmitStatus::Accepted {
                    accepted_timestamp, ..
                } => {
                    println!("accepted by the hub at {accepted_timestamp} ms");
                }
                other => bail!("the hub answered {other:?}"),
            }
        }
        Action::Inbox { after, wait_ms } => {
            for item in client.inbox(after, 1000, wait_ms).await? {
                let text = FanoutMessage::decode(&item.fanout)
                    .ok()
                    .and_then(|f| payload(f.message.as_bytes()))
                    .unwrap_or_else(|| format!("{} bytes", item.fanout.len()));
                println!(
                    "{:>6}  {}  from {}  room {}  {}",
                    item.offset, item.accepted_ms, item.from, item.room, text
                );
            }
        }
    }
    Ok(())
}

/// The ciphertext of a PrivateMessage, shown when it is printable text: `mimi-relay client
/// send` puts the text there, since the relay itself never decrypts.
fn payload(mls: &[u8]) -> Option<String> {
    let view = mimi_wire::mls::MlsMessageView::parse(mls).ok()?;
    let text = std::str::from_utf8(view.private_ciphertext()?).ok()?;
    text.chars()
        .all(|c| !c.is_control())
        .then(|| format!("{text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_reads_the_ciphertext_of_a_private_message() {
        let mls = mimi_wire::mls::private_message(b"group", 7, b"hello, carol");
        assert_eq!(payload(&mls).as_deref(), Some("\"hello, carol\""));
        let long = "x".repeat(300);
        let mls = mimi_wire::mls::private_message(b"group", 7, long.as_bytes());
        assert_eq!(payload(&mls), Some(format!("{long:?}")));
        assert_eq!(payload(&mls[..mls.len() - 1]), None);
    }
}
