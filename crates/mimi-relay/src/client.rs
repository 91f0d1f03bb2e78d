//! `mimi-relay client`: submit a message to, or read the inbox of, a running node.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use mimi_wire::proto::{
    FanoutMessage, IdentifierUri, MlsMessage, Protocol, SubmitMessageRequest,
    SubmitMessageResponse, SubmitStatus,
};
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
            let req = SubmitMessageRequest {
                protocol: Protocol::Mls10,
                app_message: MlsMessage::from_bytes(mls)?,
                sending_uri: IdentifierUri::new(from),
            };
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

/// The ciphertext of a PrivateMessage (RFC 9420 section 6.3.1), shown when it is printable:
/// `mimi-relay client send` puts the text there, since the relay itself never decrypts.
fn payload(mls: &[u8]) -> Option<String> {
    let view = mimi_wire::mls::MlsMessageView::parse(mls).ok()?;
    if view.wire_format != mimi_wire::mls::WireFormat::PrivateMessage {
        return None;
    }
    let mut rest = mls.get(4..)?; // version, wire_format
    let _group = vector(&mut rest)?;
    rest = rest.get(9..)?; // epoch u64, content_type u8
    let _aad = vector(&mut rest)?;
    let _sender_data = vector(&mut rest)?;
    let text = std::str::from_utf8(vector(&mut rest)?).ok()?;
    text.chars()
        .all(|c| !c.is_control())
        .then(|| format!("{text:?}"))
}

/// Takes one MLS variable-length vector (RFC 9420 section 2.1.2) off the front of `b`.
fn vector<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let first = *b.first()?;
    let (len, head): (usize, usize) = match first >> 6 {
        0 => (usize::from(first & 0x3f), 1),
        1 => (
            usize::from(u16::from_be_bytes([first & 0x3f, *b.get(1)?])),
            2,
        ),
        2 => {
            let v = u32::from_be_bytes([first & 0x3f, *b.get(1)?, *b.get(2)?, *b.get(3)?]);
            (usize::try_from(v).ok()?, 4)
        }
        _ => return None,
    };
    let v = b.get(head..head.checked_add(len)?)?;
    *b = &b[head + len..];
    Some(v)
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
