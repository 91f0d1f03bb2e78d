//! Component mode: the relay is an XEP-0114 component of its provider's XMPP server, and the
//! servers carry the stanzas between providers over s2s.
//!
//! One plain TCP stream to the server (XEP-0114 has no TLS; the server is on the same host or
//! network) carries our requests and the peers' requests both ways. Servers offer no stream
//! management to components, so a broken stream fails what we await with `ConnectionLost`
//! and the core retries; the per-queue sequence numbers make those retries harmless.

use std::io::Write;

use std::net::SocketAddr;
use std::time::Duration;
use xmpp_parsers::component::Handshake;

use relay_adapter::Inbound;
use relay_core::transport::TransportError;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::binding::{self, NS_COMPONENT, NS_STREAM};
use crate::link::{Command, Ended, HandshakeError, Link, Reader, Writer, send_now, spawn_writer};
use crate::scanner::Item;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub(crate) struct Component<I> {
    pub(crate) link: Link<I>,
    pub(crate) server: SocketAddr,
    pub(crate) secret: String,
    pub(crate) max_stanza: usize,
}

/// hex(SHA-1(stream id || secret)), XEP-0114 section 3: the text of the `<handshake/>`
/// xmpp-parsers builds.
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    Handshake::from_stream_id_and_password(stream_id.to_owned(), secret)
        .data
        .map(hex::encode)
        .unwrap_or_default()
}

impl<I: Inbound> Component<I> {
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let (mut reader, writer, wtask) = match self.connect().await {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(server = %self.server, %error, "xmpp component cannot connect");
                    // Nothing can be sent meanwhile: fail what is queued at once.
                    while let Ok(c) = rx.try_recv() {
                        self.link.backlog.push_back(c);
                    }
                    self.link
                        .fail_all(&TransportError::Unreachable(error.to_string()));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            tracing::info!(server = %self.server, jid = %self.link.addr.local, "xmpp component connected");
            let ended = self
                .link
                .drive(&mut reader, &writer, Some(&mut rx), &mut stop)
                .await;
            drop(writer);
            self.link.reset_connection();
            self.link.fail_awaiting(&TransportError::ConnectionLost);
            // Requests being answered are dropped: their senders time out and retry.
            self.link.serving = Default::default();
            if ended == Ended::Stopped {
                let _ = tokio::time::timeout(Duration::from_secs(1), wtask).await;
                return;
            }
            tracing::warn!(server = %self.server, ?ended, "xmpp component stream ended");
            wtask.abort();
        }
    }

    #[allow(clippy::type_complexity)]
    async fn connect(
        &mut self,
    ) -> Result<
        (
            Reader<tokio::net::tcp::OwnedReadHalf>,
            Writer,
            tokio::task::JoinHandle<()>,
        ),
        HandshakeError,
    > {
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(self.server))
            .await
            .map_err(|_| HandshakeError::Timeout)??;
        let _ = tcp.set_nodelay(true);
        let (r, w) = tcp.into_split();
        let mut reader = Reader::new(r, self.max_stanza, self.link.limits().max_xml_depth);
        let (writer, wtask) = spawn_writer(w);
        let mut hello = Vec::new();
        let _ = write!(
            hello,
            "<?xml version='1.0'?><stream:stream xmlns='{NS_COMPONENT}' xmlns:stream='{NS_STREAM}' to='{}'>",
            binding::escape(&self.link.addr.local)
        );
        send_now(&writer, hello.into())?;
        let secret = self.secret.clone();
        let handshake = async {
            let id = match reader.item().await? {
                Item::Header(h) => binding::parse(&h)
                    .ok()
                    .and_then(|h| h.attr("id").map(str::to_owned))
                    .ok_or(HandshakeError::Protocol("header without an id"))?,
                _ => return Err(HandshakeError::Protocol("element before the header")),
            };
            let mut out = Vec::new();
            binding::write(
                &mut out,
                Handshake::from_stream_id_and_password(id, &secret),
            );
            send_now(&writer, out.into())?;
            // The server accepts with an empty `<handshake/>`.
            if Handshake::try_from(reader.element().await?).is_err() {
                return Err(HandshakeError::Protocol("answer to the handshake"));
            }
            Ok(())
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(())) => Ok((reader, writer, wtask)),
            Ok(Err(e)) => {
                wtask.abort();
                Err(e)
            }
            Err(_) => {
                wtask.abort();
                Err(HandshakeError::Timeout)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn handshake_digest_is_hex_sha1_of_id_then_secret() {
        // hex(sha1("3BF96D32" || "secret")), computed independently with Python's hashlib.
        assert_eq!(
            super::handshake_digest("3BF96D32", "secret"),
            "b09ea9b3b7f586be8a08d0a3dd7466f110aeb136"
        );
    }
}
