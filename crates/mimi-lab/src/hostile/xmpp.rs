//! The XMPP flooder: a raw XML stream over mutual TLS as relay-xmpp's hostile tests write it
//! (stream header, XEP-0198 enable, IQ sets carrying `<mimi/>`), with relay-xmpp's own
//! scanner, parser and request encoder, so that only the abuse is hand-made.

use std::cell::RefCell;
use std::collections::HashMap;

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use minidom::Element;
use relay_core::transport::{Transmit, TransmitId};
use relay_xmpp::binding::{self, Iq};
use relay_xmpp::scanner::{Item, Scanner};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

use super::{DEPTH, FloodTarget, Lane, Mix, RECONNECT_PAUSE, Reply, Shot, Tally, run_lanes};

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

const NS_SM: &str = "urn:xmpp:sm:3";

/// The reading side of an open, enabled stream to the hub.
struct Session {
    rd: ReadHalf<Tls>,
    scan: Scanner,
    /// Stanzas received since `<enabled/>` (XEP-0198's `h`).
    h: u64,
}

/// Opens a stream and enables stream management (which the hub requires).
async fn open(t: &FloodTarget, tally: &Tally) -> Option<(Session, WriteHalf<Tls>)> {
    let Ok(tls) = t.tls(relay_xmpp::ALPN).await else {
        tally.outcome("connect failed");
        return None;
    };
    let (rd, mut wr) = tokio::io::split(tls);
    let hello = format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
         xmlns:stream='http://etherx.jabber.org/streams' from='{}' to='{}' version='1.0'>\
         <enable xmlns='{NS_SM}' resume='true'/>",
        t.me(),
        t.hub
    );
    if wr.write_all(hello.as_bytes()).await.is_err() {
        tally.outcome("connection closed at open");
        return None;
    }
    let mut s = Session {
        rd,
        scan: Scanner::new(4 << 20).with_max_depth(64),
        h: 0,
    };
    let opened = async {
        loop {
            match next_element(&mut s).await {
                Ok(Some(e)) if e.name() == "enabled" => return Ok(()),
                Ok(Some(e)) => {
                    if let Some(cond) = binding::peer_stream_error(&e) {
                        return Err(format!("xmpp {cond} at open"));
                    }
                }
                Ok(None) => return Err("connection closed at open".to_owned()),
                Err(why) => return Err(why),
            }
        }
    };
    match tokio::time::timeout(super::CONNECT_TIMEOUT, opened).await {
        Ok(Ok(())) => {
            tally.connected();
            Some((s, wr))
        }
        Ok(Err(why)) => {
            tally.outcome(&why);
            None
        }
        Err(_) => {
            tally.outcome("no answer at open");
            None
        }
    }
}

/// The next top-level element from the hub (the header is skipped); `None` at the end.
async fn next_element(s: &mut Session) -> Result<Option<Element>, String> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.scan.poll_item() {
            Ok(Some(Item::Element(b))) => {
                return binding::parse(&b)
                    .map(Some)
                    .map_err(|_| "hub sent bad xml".to_owned());
            }
            Ok(Some(Item::End)) => return Ok(None),
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(_) => return Err("hub sent bad xml".to_owned()),
        }
        match s.rd.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => s.scan.push(&buf[..n]),
        }
    }
}

/// One request as relay-xmpp's own encoder writes it, from the flooding provider.
fn request_xml(t: &FloodTarget, id: &str, s: &Shot) -> Vec<u8> {
    let tr = Transmit {
        id: TransmitId(0),
        dest: t.hub.clone(),
        transport: relay_core::TransportKind::Xmpp,
        endpoint: s.endpoint,
        target: s.target.clone(),
        seq: s.seq,
        lineage: None,
        body: vec![s.body.clone()],
    };
    let mut out = Vec::new();
    binding::write_request(&mut out, id, t.me().as_str(), t.hub.as_str(), &tr);
    out
}

/// Where a lane's producer sends its stanzas: each request is registered with whether it is a
/// submission, and holds a permit of the window until answered.
struct Out<'a> {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: &'a RefCell<HashMap<String, Reply>>,
    permits: &'a Semaphore,
    tally: &'a Tally,
    n: u64,
}

impl Out<'_> {
    /// Sends a request once the window has room; `false` once the stream is gone.
    async fn request(&mut self, xml: Vec<u8>, id: String, reply: Reply) -> bool {
        match self.permits.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return false,
        }
        self.pending.borrow_mut().insert(id, reply);
        self.raw(xml)
    }

    /// Sends bytes with no answer expected (a stream error ends the session instead).
    fn raw(&mut self, xml: Vec<u8>) -> bool {
        self.tally.sent(1);
        self.tx.send(xml).is_ok()
    }

    fn next_id(&mut self) -> String {
        self.n += 1;
        format!("f{}", self.n)
    }
}

/// One stream's life: `produce` writes while answers are read and tallied; returns when the
/// hub ends the stream.
async fn session<P>(t: &FloodTarget, tally: &Tally, window: usize, produce: P)
where
    P: AsyncFnOnce(&mut Out<'_>),
{
    let Some((mut s, mut wr)) = open(t, tally).await else {
        tokio::time::sleep(RECONNECT_PAUSE).await;
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let pending = RefCell::new(HashMap::new());
    let permits = Semaphore::new(window);
    let acks = tx.clone();
    let writer = async {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
    };
    let reader = async {
        loop {
            let e = match next_element(&mut s).await {
                Ok(Some(e)) => e,
                Ok(None) => {
                    tally.outcome("connection closed");
                    return;
                }
                Err(why) => {
                    tally.outcome(&why);
                    return;
                }
            };
            if let Some(cond) = binding::peer_stream_error(&e) {
                tally.outcome(&format!("xmpp {cond}"));
                return;
            }
            if e.is("r", NS_SM) {
                let _ = acks.send(format!("<a xmlns='{NS_SM}' h='{}'/>", s.h).into_bytes());
                continue;
            }
            if e.name() != "iq" {
                continue;
            }
            s.h += 1;
            match binding::classify(e, None, t.limits.max_body) {
                Some((id, Iq::Answer(Ok(r)))) => {
                    let reply = pending.borrow_mut().remove(&id).flatten();
                    tally.status(r.status.http_code(), reply, &r.body);
                }
                Some((id, Iq::Failed(cond))) => {
                    pending.borrow_mut().remove(&id);
                    tally.outcome(&format!("xmpp iq {cond}"));
                }
                Some((id, _)) => {
                    pending.borrow_mut().remove(&id);
                    tally.outcome("xmpp other iq");
                }
                None => tally.outcome("xmpp bad iq"),
            }
            permits.add_permits(1);
        }
    };
    let mut out = Out {
        tx,
        pending: &pending,
        permits: &permits,
        tally,
        n: 0,
    };
    let work = async {
        tokio::join!(writer, produce(&mut out));
    };
    tokio::select! {
        () = reader => {}
        () = work => {}
    }
    permits.close();
    tokio::time::sleep(RECONNECT_PAUSE).await;
}

pub(super) async fn flood(t: &FloodTarget, tally: &Tally) {
    run_lanes(t, |lane, i| async move {
        match lane {
            Lane::Valid => {
                let mut mix = Mix::new(0x584d_5050 + i as u64);
                loop {
                    session(t, tally, DEPTH, async |out: &mut Out<'_>| {
                        loop {
                            let s = mix.next(t);
                            let id = out.next_id();
                            let xml = request_xml(t, &id, &s);
                            if !out.request(xml, id, s.reply()).await {
                                return;
                            }
                        }
                    })
                    .await;
                }
            }
            Lane::Oversize => {
                // One byte over max_body: skipped unparsed and answered 413, the stream kept.
                let shot = Shot {
                    endpoint: Endpoint::SubmitMessage,
                    target: t.member_room.clone(),
                    seq: None,
                    body: Bytes::from(vec![0x42u8; t.limits.max_body + 1]),
                };
                loop {
                    session(t, tally, 2, async |out: &mut Out<'_>| {
                        loop {
                            let id = out.next_id();
                            let xml = request_xml(t, &id, &shot);
                            if !out.request(xml, id, None).await {
                                return;
                            }
                        }
                    })
                    .await;
                }
            }
            Lane::Partial => loop {
                // A stanza started and never finished: the hub ends the stream at its
                // frame deadline.
                session(t, tally, 1, async |out: &mut Out<'_>| {
                    let half = format!(
                        "<iq type='set' id='p' from='{}' to='{}'><mimi xmlns='urn:mimi-relay:0' \
                         endpoint='submitMessage' target='{}'>AAAA",
                        t.me(),
                        t.hub,
                        t.victim_room
                    );
                    out.raw(half.into_bytes());
                })
                .await;
            },
            Lane::Malformed => {
                let mut k = 0u64;
                loop {
                    k += 1;
                    session(t, tally, DEPTH, async |out: &mut Out<'_>| {
                        malformed(t, out, k).await;
                    })
                    .await;
                }
            }
        }
    })
    .await;
}

/// Requests the binding refuses with an answer (unknown endpoint, body not base64, a payload
/// that is not ours), then XML that ends the stream: mismatched tags, nesting over the depth
/// bound, a comment.
async fn malformed(t: &FloodTarget, out: &mut Out<'_>, k: u64) {
    let (me, hub, room) = (t.me().as_str(), t.hub.as_str(), t.victim_room.as_str());
    for j in 0..DEPTH {
        let id = out.next_id();
        let xml = match j % 3 {
            0 => format!(
                "<iq type='set' id='{id}' from='{me}' to='{hub}'><mimi xmlns='urn:mimi-relay:0' \
                 endpoint='frobnicate' target='{room}'>eA==</mimi></iq>"
            ),
            1 => format!(
                "<iq type='set' id='{id}' from='{me}' to='{hub}'><mimi xmlns='urn:mimi-relay:0' \
                 endpoint='submitMessage' target='{room}'>!!not base64!!</mimi></iq>"
            ),
            _ => format!(
                "<iq type='set' id='{id}' from='{me}' to='{hub}'><query xmlns='urn:example:nope'/></iq>"
            ),
        };
        if !out.request(xml.into_bytes(), id, None).await {
            return;
        }
    }
    let fatal = match k % 3 {
        0 => format!("<iq type='set' id='m' from='{me}' to='{hub}'><mimi></iq>"),
        1 => format!(
            "<iq type='set' id='d' from='{me}' to='{hub}'>{}{}</iq>",
            "<a>".repeat(64),
            "</a>".repeat(64)
        ),
        _ => "<!-- a comment -->".to_owned(),
    };
    out.raw(fatal.into_bytes());
}
