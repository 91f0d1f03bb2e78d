//! The demo's MLS room: alice at a.example hosts it, adds bob and dave (both of b.example)
//! and carol (c.example) with key material claimed through the hub, all four talk (texts, a
//! reply, a reaction; bob and dave through the relay, though they share a provider), alice
//! removes carol, and every client checks that it decrypts exactly what was sent, in the
//! hub's order, and that the hub fans each sender's own message back to it (§5.5).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mimi_wire::content::{self, Disposition, MessageId, MimiContent, NestedPart};
use mimi_wire::uri::RoomId;

use crate::{Event, MlsClient, MlsClientError, SubmitResult, UpdateResult};

/// What the scenario saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScenarioReport {
    /// Epochs the room went through, in order (0 is the creation).
    pub mls_epochs: Vec<u64>,
    /// Application messages sent and, summed over receivers, decrypted as sent.
    pub messages_sent: u64,
    pub messages_decrypted: u64,
    /// Of those decryptions, the ones by a user of the sender's own provider.
    pub same_provider_decrypted: u64,
    /// Senders that saw their own message fanned back by the hub.
    pub own_echoes: u64,
    /// Handshakes the hub refused by the room's policy, as the clients saw them (the
    /// scenario attempts one on purpose).
    pub policy_rejections: u64,
    /// Key material claims that got a KeyPackage, and claims refused for want of consent
    /// (the scenario attempts one on purpose).
    pub key_claims: u64,
    pub consent_denials: u64,
    /// What each refusal said, for the reader.
    pub refusals: Vec<String>,
    /// The room's final participant list as its creator's group has it: (user, role index).
    pub participants: Vec<(String, u32)>,
    /// Anything a client could not apply or decrypt, or decrypted differently than sent
    /// (must be 0).
    pub decrypt_failures: u64,
    /// Whether the removed member's provider got nothing after the removal.
    pub removed_member_cut_off: bool,
    /// Received messages whose hub Frank verified (protocol-06 §5.4.1.3; the room names its
    /// hub as franking agent), and those whose Frank did not (must be 0).
    pub franks_verified: u64,
    pub franks_failed: u64,
    /// Abuse reports (§5.9) the hub took with their kept franks, and forged ones it refused
    /// (the scenario sends one of each).
    pub abuse_reports_accepted: u64,
    pub abuse_reports_refused: u64,
    pub elapsed_ms: u64,
}

/// Why the scenario stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    #[error("{step}")]
    Client {
        step: &'static str,
        #[source]
        source: MlsClientError,
    },
    #[error("{step}: {detail}")]
    Refused { step: &'static str, detail: String },
    #[error("{step}: {who} saw nothing within {timeout:?}")]
    Timeout {
        step: &'static str,
        who: String,
        timeout: Duration,
    },
}

/// One MIMI content message (draft-ietf-mimi-content-08): a text/markdown part, or a
/// reaction, optionally in reply to an earlier message's ID.
/// The sender and room URIs go in its extensions map, as protocol-06 §5.4.1.1 asks of a
/// franked message; receivers compare them with the credential and the group.
fn content(
    c: &MlsClient,
    room: &RoomId,
    part: NestedPart,
    in_reply_to: Option<MessageId>,
) -> Result<Vec<u8>, ScenarioError> {
    let mut m = MimiContent::new(c.salt().map_err(at("content"))?, part);
    m.in_reply_to = in_reply_to;
    m.extensions.set_sender_uri(c.user.clone());
    m.extensions.set_room_uri(room.as_str());
    m.encode().map_err(|e| ScenarioError::Refused {
        step: "content",
        detail: e.to_string(),
    })
}

fn markdown(text: &str) -> NestedPart {
    NestedPart::single(Disposition::RENDER, content::MARKDOWN, text.as_bytes())
}

const WAIT: Duration = Duration::from_secs(20);

fn at(step: &'static str) -> impl FnOnce(MlsClientError) -> ScenarioError {
    move |source| ScenarioError::Client { step, source }
}

/// Polls `c` until `want` says yes; counts failed events and unwanted messages.
async fn expect(
    step: &'static str,
    c: &mut MlsClient,
    report: &mut ScenarioReport,
    mut want: impl FnMut(&Event) -> bool,
) -> Result<(), ScenarioError> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(e) = c.next_event(200).await.map_err(at(step))? {
            if want(&e) {
                return Ok(());
            }
            match e {
                Event::Failed { .. } | Event::Message { .. } => report.decrypt_failures += 1,
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Err(ScenarioError::Timeout {
                step,
                who: c.user.clone(),
                timeout: WAIT,
            });
        }
    }
}

async fn send_and_check(
    step: &'static str,
    room: &RoomId,
    clients: &mut [MlsClient],
    from: usize,
    to: &[usize],
    body: Vec<u8>,
    report: &mut ScenarioReport,
) -> Result<(), ScenarioError> {
    match clients[from].send(room, &body).await.map_err(at(step))? {
        SubmitResult::Accepted => {}
        other => {
            return Err(ScenarioError::Refused {
                step,
                detail: format!("{other:?}"),
            });
        }
    }
    report.messages_sent += 1;
    let sender = clients[from].user.clone();
    let provider = |u: &str| u.split('/').nth(2).map(str::to_owned);
    for &i in to {
        let same_provider = provider(&clients[i].user) == provider(&sender);
        let mut ok = false;
        expect(step, &mut clients[i], report, |e| match e {
            Event::Message { sender: s, payload } => {
                ok = *s == sender && *payload == body;
                true
            }
            _ => false,
        })
        .await?;
        if ok {
            report.messages_decrypted += 1;
            report.same_provider_decrypted += u64::from(same_provider);
        } else {
            report.decrypt_failures += 1;
        }
    }
    // The sender gets its own message back, in the hub's order.
    let mut ok = false;
    expect(step, &mut clients[from], report, |e| match e {
        Event::OwnMessage { payload } => {
            ok = *payload == body;
            true
        }
        _ => false,
    })
    .await?;
    if ok {
        report.own_echoes += 1;
    } else {
        report.decrypt_failures += 1;
    }
    Ok(())
}

/// Runs the scenario against the loopback APIs of a.example, b.example and c.example (bob
/// and dave both at b.example).
pub async fn run(admins: [SocketAddr; 3], room: &RoomId) -> Result<ScenarioReport, ScenarioError> {
    let started = Instant::now();
    let mut report = ScenarioReport::default();
    let users = [
        "mimi://a.example/u/alice",
        "mimi://b.example/u/bob",
        "mimi://c.example/u/carol",
        "mimi://b.example/u/dave",
    ];
    let admins = [admins[0], admins[1], admins[2], admins[1]];
    let mut clients = Vec::new();
    for (u, a) in users.iter().zip(admins) {
        clients.push(MlsClient::new(u, a).map_err(at("client setup"))?);
    }
    let creator = users[0].to_string();
    for c in clients.iter_mut().skip(1) {
        c.publish_key_packages(2)
            .await
            .map_err(at("publishing key packages"))?;
        // Each invitee consents to the creator adding it to this room (§5.7): no claim of
        // its KeyPackages succeeds without.
        c.set_consent(&creator, Some(room), true)
            .await
            .map_err(at("granting consent"))?;
    }
    // alice, of the hub's provider, names the hub as the room's franking agent.
    clients[0]
        .fetch_hub_key()
        .await
        .map_err(at("fetching the hub key"))?;
    clients[0]
        .create_room(room)
        .await
        .map_err(at("creating the room"))?;
    report.mls_epochs.push(clients[0].epoch().unwrap_or(0));

    let mut kps = Vec::new();
    for u in &users[1..] {
        match clients[0]
            .claim(u, room)
            .await
            .map_err(at("claiming key material"))?
        {
            Ok(kp) => kps.push(kp),
            Err(status) => {
                return Err(ScenarioError::Refused {
                    step: "claiming key material",
                    detail: format!("{u}: {status}"),
                });
            }
        }
    }
    report.key_claims = kps.len() as u64;
    // frank of c.example published KeyPackages but never consented to alice: her claim is
    // refused by his provider (protocol-06 §5.2, noConsent) and costs him nothing.
    let mut frank =
        MlsClient::new("mimi://c.example/u/frank", admins[2]).map_err(at("client setup"))?;
    frank
        .publish_key_packages(1)
        .await
        .map_err(at("publishing key packages"))?;
    match clients[0]
        .claim(frank.user.as_str(), room)
        .await
        .map_err(at("a claim without consent"))?
    {
        Err(code) => {
            report.consent_denials += 1;
            report
                .refusals
                .push(format!("alice claiming frank's KeyPackage: {code}"));
        }
        Ok(_) => {
            return Err(ScenarioError::Refused {
                step: "a claim without consent",
                detail: "the claim was served".into(),
            });
        }
    }
    match clients[0]
        .add(room, &kps)
        .await
        .map_err(at("adding bob, carol and dave"))?
    {
        UpdateResult::Accepted => {}
        other => {
            return Err(ScenarioError::Refused {
                step: "adding bob, carol and dave",
                detail: format!("{other:?}"),
            });
        }
    }
    let epoch = clients[0].epoch().unwrap_or(0);
    report.mls_epochs.push(epoch);
    for c in clients.iter_mut().skip(1) {
        expect(
            "joining by Welcome",
            c,
            &mut report,
            |e| matches!(e, Event::Joined { epoch: e } if *e == epoch),
        )
        .await?;
    }

    // Each message's ID as every receiver computes it from the bytes it decrypted.
    let mut ids: Vec<MessageId> = Vec::new();
    let plan: [(usize, Option<usize>, bool, &str); 7] = [
        (0, None, false, "Hello **bob**, *carol* and dave"),
        (1, None, false, "Hi alice"),
        (2, None, false, "Hello from `c.example`"),
        (1, Some(0), false, "> welcome\n\nThanks, alice!"),
        (2, Some(1), true, "\u{1F44D}"),
        // bob and dave share b.example: the hub fans back to their own provider too.
        (3, Some(1), false, "Hi bob, dave here, also at b.example"),
        (1, Some(5), true, "\u{1F44B}"),
    ];
    for (from, reply_to, reaction, text) in plan {
        let part = if reaction {
            NestedPart::single(Disposition::REACTION, content::PLAIN_TEXT, text.as_bytes())
        } else {
            markdown(text)
        };
        let body = content(
            &clients[from],
            room,
            part,
            reply_to.and_then(|i| ids.get(i).copied()),
        )?;
        let to: Vec<usize> = (0..clients.len()).filter(|i| *i != from).collect();
        send_and_check(
            "messages",
            room,
            &mut clients,
            from,
            &to,
            body.clone(),
            &mut report,
        )
        .await?;
        // Receivers decode what they got; a reply or reaction must name an earlier message.
        match MimiContent::decode(&body) {
            Ok(m) if m.in_reply_to.is_none_or(|r| ids.contains(&r)) => {}
            _ => report.decrypt_failures += 1,
        }
        let id = content::message_id(&clients[from].user, room.as_str(), &body).map_err(|e| {
            ScenarioError::Refused {
                step: "message id",
                detail: e.to_string(),
            }
        })?;
        ids.push(id);
    }

    // bob reports carol's message (§5.9) with the frank he kept; the hub finds the frank
    // its own. The same report with one bit of the frank changed is refused.
    let carols = [ids[2]];
    let st = clients[1]
        .report_abuse(room, &carols, "demo report")
        .await
        .map_err(at("reporting abuse"))?;
    if !st.is_success() {
        return Err(ScenarioError::Refused {
            step: "reporting abuse",
            detail: format!("the hub answered {st}"),
        });
    }
    report.abuse_reports_accepted += 1;
    let mut forged = clients[1]
        .kept_franks()
        .report(&clients[1].user, &carols, "forged")
        .ok_or(ScenarioError::Refused {
            step: "a forged report",
            detail: "carol's message is not kept".into(),
        })?;
    forged.messages[0].frank.server_frank[0] ^= 1;
    let st = clients[1]
        .send_report(room, &forged)
        .await
        .map_err(at("a forged report"))?;
    if st.as_u16() != 422 {
        return Err(ScenarioError::Refused {
            step: "a forged report",
            detail: format!("not refused: {st}"),
        });
    }
    report.abuse_reports_refused += 1;
    report
        .refusals
        .push(format!("bob's abuse report with a forged frank: {st}"));

    // The room's policy at work (draft-ietf-mimi-room-policy §8.1.2): bob, an ordinary
    // participant, may not remove carol; the hub refuses his commit and nothing changes.
    match clients[1]
        .remove(room, users[2])
        .await
        .map_err(at("a commit the policy forbids"))?
    {
        UpdateResult::Refused(why) => {
            report.policy_rejections += 1;
            report.refusals.push(format!("bob removing carol: {why}"));
        }
        other => {
            return Err(ScenarioError::Refused {
                step: "a commit the policy forbids",
                detail: format!("not refused: {other:?}"),
            });
        }
    }
    match clients[0]
        .remove(room, users[2])
        .await
        .map_err(at("removing carol"))?
    {
        UpdateResult::Accepted => {}
        other => {
            return Err(ScenarioError::Refused {
                step: "removing carol",
                detail: format!("{other:?}"),
            });
        }
    }
    let epoch = clients[0].epoch().unwrap_or(0);
    report.mls_epochs.push(epoch);
    for (step, i) in [("bob sees the removal", 1), ("dave sees the removal", 3)] {
        expect(
            step,
            &mut clients[i],
            &mut report,
            |e| matches!(e, Event::Commit { epoch: e, removed_me: false } if *e == epoch),
        )
        .await?;
    }
    expect(
        "carol sees her removal",
        &mut clients[2],
        &mut report,
        |e| {
            matches!(
                e,
                Event::Commit {
                    removed_me: true,
                    ..
                }
            )
        },
    )
    .await?;

    let last = content(&clients[0], room, markdown("Just the two of us now"), None)?;
    send_and_check(
        "after the removal",
        room,
        &mut clients,
        0,
        &[1, 3],
        last,
        &mut report,
    )
    .await?;
    // carol's provider no longer follows the room: nothing more arrives there.
    let late = clients[2]
        .next_event(300)
        .await
        .map_err(at("after the removal"))?;
    report.removed_member_cut_off = late.is_none();
    report.participants = clients[0].participants();
    report.franks_verified = clients.iter().map(|c| c.franks_verified).sum();
    report.franks_failed = clients.iter().map(|c| c.franks_failed).sum();
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}
