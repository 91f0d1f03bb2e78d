//! The provider-to-provider services outside a room's message flow: the identifier directory
//! (protocol-06 §5.8), explicit consent (§5.7) and abuse reports (§5.9).
//!
//! Privacy: an identifier query is answered with the matching user URIs only (no profile
//! fields), and nothing about who asked is stored, logged with the query, or passed on.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mimi_wire::endpoint::Endpoint;
use mimi_wire::proto::{
    AbuseReport, ConsentEntry, ConsentOperation, IdentifierQueryCode, IdentifierRequest,
    IdentifierResponse, IdentifierUri, KeyMaterialUserCode, SearchIdentifierType, VLBytes,
};
use mimi_wire::uri::{ProviderDomain, RoomId};
use tracing::{info, warn};

use super::refusal::{Forbidden, Malformed, Refusal};
use super::{Relay, ReplyToken, uri_in_domain};
use crate::Now;
use crate::store::{Store, StoreOp};
use crate::transport::{Response, Status};

const REC_DIRECTORY: u8 = 6;
const REC_CONSENT: u8 = 7;
const REC_ABUSE: u8 = 8;

/// Rate limit names (the second half of a [`Services::rate`] key).
pub(super) const RATE_KEY_CLAIMS: &str = "key_claims";
pub(super) const RATE_IDENTIFIER_QUERIES: &str = "identifier_queries";
/// Rate buckets kept before the idle ones are dropped (peers are authenticated, so this is
/// only reached with very many of them).
const MAX_RATE_BUCKETS: usize = 1 << 16;

/// Directory, consent and abuse-report state of a [`Relay`].
#[derive(Debug, Default)]
pub(super) struct Services {
    /// (search type, exact value) -> user URI.
    pub directory: BTreeMap<(u8, String), String>,
    /// (requester, target, room or "") -> the last operation and its order stamp (so a
    /// room-scoped decision and a global one can be told apart by which came later).
    pub consent: BTreeMap<(String, String, String), (ConsentOperation, u64)>,
    /// The last order stamp given to a consent operation.
    pub consent_stamp: u64,
    /// Per (peer, limit): the GCRA theoretical arrival time of its next request.
    pub rate: BTreeMap<(ProviderDomain, &'static str), Instant>,
    pub abuse_reports: u64,
    /// Per reporting provider: abuse reports kept and their bytes.
    pub abuse_by_peer: BTreeMap<String, (usize, usize)>,
    /// Per provider on the other side of a scope: consent scopes kept.
    pub consent_by_peer: BTreeMap<String, usize>,
    /// Providers already warned about being over a budget (one line each, not one a request).
    pub warned: BTreeSet<(String, &'static str)>,
}

fn created() -> Response {
    Response::new(Status::Created, Bytes::new())
}

fn user_domain(user: &str) -> Option<&str> {
    user.strip_prefix("mimi://")?.split('/').next()
}

/// The provider a consent scope is charged to: the side that is not us (either, when a
/// local client asks about a local user).
fn consent_peer<'a>(local: &str, requester: &'a str, target: &'a str) -> &'a str {
    match user_domain(requester) {
        Some(d) if d != local => d,
        _ => user_domain(target).unwrap_or(""),
    }
}

impl Relay {
    /// Restores the directory, consent and the abuse report count. Called from `Relay::new`.
    pub(super) fn restore_services(&mut self, records: &BTreeMap<Vec<u8>, Bytes>) {
        for (k, v) in records {
            match k.split_first() {
                Some((&REC_DIRECTORY, rest)) => {
                    if let (Some((&t, value)), Ok(user)) =
                        (rest.split_first(), std::str::from_utf8(v))
                        && let Ok(value) = std::str::from_utf8(value)
                    {
                        self.services
                            .directory
                            .insert((t, value.to_owned()), user.to_owned());
                    }
                }
                Some((&REC_CONSENT, rest)) => {
                    let parts: Vec<&[u8]> = rest.split(|b| *b == 0).collect();
                    if let ([r, t, room], Some(op)) = (
                        parts.as_slice(),
                        v.first().and_then(|o| ConsentOperation::from_u8(*o).ok()),
                    ) {
                        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                        let (r, t) = (s(r), s(t));
                        let peer = consent_peer(self.cfg.local.as_str(), &r, &t).to_owned();
                        *self.services.consent_by_peer.entry(peer).or_default() += 1;
                        // Records from before the stamp was kept order as the oldest.
                        let stamp = v
                            .get(1..9)
                            .and_then(|b| <[u8; 8]>::try_from(b).ok())
                            .map_or(0, u64::from_be_bytes);
                        self.services.consent_stamp = self.services.consent_stamp.max(stamp);
                        self.services.consent.insert((r, t, s(room)), (op, stamp));
                    }
                }
                Some((&REC_ABUSE, rest)) => {
                    self.services.abuse_reports += 1;
                    // counter (8 bytes), reporting provider, NUL, room. Records from before
                    // the reporter was kept have no NUL and are charged to no one.
                    let rest = rest.get(8..).unwrap_or_default();
                    if let Some(end) = rest.iter().position(|b| *b == 0) {
                        let peer = String::from_utf8_lossy(&rest[..end]).into_owned();
                        let e = self.services.abuse_by_peer.entry(peer).or_default();
                        e.0 += 1;
                        e.1 += v.len();
                    }
                }
                _ => {}
            }
        }
    }

    /// Abuse reports kept for the operator.
    pub fn abuse_reports(&self) -> u64 {
        self.services.abuse_reports
    }

    /// A provider over one of its service budgets: 503, retry much later (the operator has to
    /// act, or the peer's records must be revoked), logged once per provider and budget.
    fn over_budget(&mut self, peer: &str, budget: &'static str, limit: usize) -> Response {
        if self.services.warned.insert((peer.to_owned(), budget)) {
            warn!(
                peer,
                budget, limit, "provider over its budget; its requests are refused"
            );
        }
        self.refuse(Refusal::PeerBudget)
    }

    /// The last consent operation for this scope, if any.
    pub fn consent(
        &self,
        requester: &str,
        target: &str,
        room: Option<&str>,
    ) -> Option<ConsentOperation> {
        self.services
            .consent
            .get(&(
                requester.to_owned(),
                target.to_owned(),
                room.unwrap_or("").to_owned(),
            ))
            .map(|(op, _)| *op)
    }

    /// Whether `target` (a local user) consents to `requester` fetching its KeyPackages for
    /// `room` ("" outside a room): the later of the room-scoped and the global decision (a
    /// grant or a revoke) wins; with neither there is no consent. `Err` is the
    /// KeyMaterialUserCode to answer: noConsentForThisRoom when the decision against was
    /// for this room, or another room's grant still holds; noConsent otherwise.
    pub(super) fn claim_consent(
        &self,
        requester: &str,
        target: &str,
        room: &str,
    ) -> Result<(), KeyMaterialUserCode> {
        let decision = |room: &str| {
            self.services
                .consent
                .get(&(requester.to_owned(), target.to_owned(), room.to_owned()))
                .filter(|(op, _)| matches!(op, ConsentOperation::Grant | ConsentOperation::Revoke))
                .copied()
        };
        let scoped = (!room.is_empty()).then(|| decision(room)).flatten();
        let global = decision("");
        let (op, by_room) = match (scoped, global) {
            (Some(s), Some(g)) if g.1 > s.1 => (Some(g.0), false),
            (Some(s), _) => (Some(s.0), true),
            (None, g) => (g.map(|g| g.0), false),
        };
        if op == Some(ConsentOperation::Grant) {
            return Ok(());
        }
        if room.is_empty() {
            return Err(KeyMaterialUserCode::NoConsent);
        }
        // Refused for this room: say so when the decision was for this room, or the target
        // does let the requester into another room (a grant later than any global revoke).
        let since = global.map_or(0, |g| g.1);
        let from = (requester.to_owned(), target.to_owned(), String::new());
        let other_room = self
            .services
            .consent
            .range(from..)
            .take_while(|((r, t, _), _)| r == requester && t == target)
            .any(|((_, _, rm), (op, stamp))| {
                !rm.is_empty() && *op == ConsentOperation::Grant && *stamp > since
            });
        Err(if by_room || other_room {
            KeyMaterialUserCode::NoConsentForThisRoom
        } else {
            KeyMaterialUserCode::NoConsent
        })
    }

    /// A peer's per-minute rate for `limit` (GCRA: `per_minute` requests a minute, a minute's
    /// worth at once). `Some`: the 429 to answer. Local clients are not limited here.
    pub(super) fn over_rate(
        &mut self,
        now: Now,
        peer: &ProviderDomain,
        limit: &'static str,
        per_minute: u32,
    ) -> Option<Response> {
        if *peer == self.cfg.local {
            return None;
        }
        let minute = Duration::from_secs(60);
        let interval = minute / per_minute.max(1);
        let tolerance = minute.saturating_sub(interval);
        let rate = &mut self.services.rate;
        if rate.len() >= MAX_RATE_BUCKETS {
            rate.retain(|_, tat| *tat > now.mono);
        }
        let key = (peer.clone(), limit);
        let tat = rate.get(&key).map_or(now.mono, |t| (*t).max(now.mono));
        let ahead = tat - now.mono;
        if ahead > tolerance {
            if self
                .services
                .warned
                .insert((peer.as_str().to_owned(), limit))
            {
                warn!(
                    peer = peer.as_str(),
                    limit, per_minute, "provider over its request rate"
                );
            }
            return Some(self.refuse(Refusal::RateLimited {
                retry_after: (ahead - tolerance).max(Duration::from_millis(1)),
            }));
        }
        rate.insert(key, tat + interval);
        None
    }

    /// Lists a local user in the directory under an exact identifier (handle, nick, email or
    /// phone number).
    pub fn handle_directory_entry<S: Store>(
        &mut self,
        store: &mut S,
        search_type: SearchIdentifierType,
        value: &str,
        user: &str,
    ) -> Result<(), &'static str> {
        if user_domain(user) != Some(self.cfg.local.as_str()) {
            return Err("user is not of this provider");
        }
        if !matches!(
            search_type,
            SearchIdentifierType::Handle
                | SearchIdentifierType::Nick
                | SearchIdentifierType::Email
                | SearchIdentifierType::Phone
        ) {
            return Err("only exact identifiers are listed");
        }
        let mut k = vec![REC_DIRECTORY, search_type.as_u8()];
        k.extend_from_slice(value.as_bytes());
        store.apply(StoreOp::Record {
            key: &k,
            value: Some(user.as_bytes()),
        });
        self.services
            .directory
            .insert((search_type.as_u8(), value.to_owned()), user.to_owned());
        Ok(())
    }

    /// §5.8: every query element must match one listed user exactly. Each peer has its own
    /// rate (`identifier_queries_per_minute`), so one cannot walk the directory at the
    /// others' expense.
    fn identifier_query(&mut self, now: Now, from: &ProviderDomain, body: &Bytes) -> Response {
        let per_minute = self.cfg.identifier_queries_per_minute;
        if let Some(r) = self.over_rate(now, from, RATE_IDENTIFIER_QUERIES, per_minute) {
            return r;
        }
        let Ok(req) = IdentifierRequest::decode(body) else {
            return self.refuse(Refusal::Malformed(Malformed::IdentifierRequest));
        };
        let mut code = IdentifierQueryCode::Success;
        let mut found: Option<&String> = None;
        for q in &req.query_elements {
            if !matches!(
                q.search_type,
                SearchIdentifierType::Handle
                    | SearchIdentifierType::Nick
                    | SearchIdentifierType::Email
                    | SearchIdentifierType::Phone
            ) {
                code = IdentifierQueryCode::UnsupportedField;
                break;
            }
            let value = String::from_utf8_lossy(q.search_value.as_slice()).into_owned();
            match self.services.directory.get(&(q.search_type.as_u8(), value)) {
                Some(u) if found.is_none_or(|f| f == u) => found = Some(u),
                _ => {
                    code = IdentifierQueryCode::NotFound;
                    break;
                }
            }
        }
        if req.query_elements.is_empty() {
            code = IdentifierQueryCode::Ambiguous;
        }
        let uris = match (code, found) {
            (IdentifierQueryCode::Success, Some(u)) => vec![IdentifierUri::new(u.clone())],
            _ => Vec::new(),
        };
        let resp = IdentifierResponse {
            response_code: if uris.is_empty() && code == IdentifierQueryCode::Success {
                IdentifierQueryCode::NotFound
            } else {
                code
            },
            uris,
            found_profiles: Vec::new(),
            id_response_extensions: VLBytes::new(Vec::new()),
        };
        match resp.encode() {
            Ok(v) => Response::new(Status::Ok, v),
            Err(_) => Response::error(Status::Internal, "cannot encode IdentifierResponse"),
        }
    }

    /// §5.7: `requestConsent` (we host the target) or `updateConsent` (we host the
    /// requester), from `from`, which must host the other side.
    fn consent_entry<S: Store>(
        &mut self,
        store: &mut S,
        from: &ProviderDomain,
        endpoint: Endpoint,
        body: &Bytes,
    ) -> Response {
        let Ok(entry) = ConsentEntry::decode(body) else {
            return self.refuse(Refusal::Malformed(Malformed::ConsentEntry));
        };
        let (ours, theirs, ops): (&str, &str, &[ConsentOperation]) = match endpoint {
            Endpoint::RequestConsent => (
                entry.target_uri.as_str(),
                entry.requester_uri.as_str(),
                &[ConsentOperation::Request, ConsentOperation::Cancel],
            ),
            _ => (
                entry.requester_uri.as_str(),
                entry.target_uri.as_str(),
                &[ConsentOperation::Grant, ConsentOperation::Revoke],
            ),
        };
        if !ops.contains(&entry.operation) {
            return self.refuse(Refusal::Malformed(Malformed::ConsentOperation));
        }
        if !uri_in_domain(ours, self.cfg.local.as_str()) || !uri_in_domain(theirs, from.as_str()) {
            return self.refuse(Refusal::Forbidden(Forbidden::ConsentUsers));
        }
        let room = entry.room_id.as_ref().map_or("", |r| r.as_str()).to_owned();
        let (r, t) = (entry.requester_uri.as_str(), entry.target_uri.as_str());
        if r.contains('\0') || t.contains('\0') || room.contains('\0') {
            return self.refuse(Refusal::Malformed(Malformed::NulInUri));
        }
        let scope = (r.to_owned(), t.to_owned(), room);
        match self.record_consent(store, scope, entry.operation) {
            Some(refused) => refused,
            None => created(),
        }
    }

    /// Keeps the last consent operation of `scope` (charged to the provider on the other
    /// side of it). `Some`: the refusal to answer.
    fn record_consent<S: Store>(
        &mut self,
        store: &mut S,
        scope: (String, String, String),
        operation: ConsentOperation,
    ) -> Option<Response> {
        let last = self.services.consent.get(&scope).map(|(op, _)| *op);
        // A cancel with no matching request is accepted and does nothing (§5.7); a request
        // or cancel does not undo the target's decision (grant or revoke) on the scope.
        let decided = matches!(
            last,
            Some(ConsentOperation::Grant | ConsentOperation::Revoke)
        );
        let asks = matches!(
            operation,
            ConsentOperation::Request | ConsentOperation::Cancel
        );
        if (operation == ConsentOperation::Cancel && last != Some(ConsentOperation::Request))
            || (asks && decided)
        {
            return None;
        }
        let (r, t) = (scope.0.as_str(), scope.1.as_str());
        let peer = consent_peer(self.cfg.local.as_str(), r, t).to_owned();
        let is_new = last.is_none();
        if is_new {
            let held = self
                .services
                .consent_by_peer
                .get(&peer)
                .copied()
                .unwrap_or(0);
            if held >= self.cfg.max_consent_per_peer {
                let limit = self.cfg.max_consent_per_peer;
                return Some(self.over_budget(&peer, "consent", limit));
            }
            *self.services.consent_by_peer.entry(peer).or_default() += 1;
        }
        let mut k = vec![REC_CONSENT];
        k.extend_from_slice(scope.0.as_bytes());
        k.push(0);
        k.extend_from_slice(scope.1.as_bytes());
        k.push(0);
        k.extend_from_slice(scope.2.as_bytes());
        self.services.consent_stamp += 1;
        let stamp = self.services.consent_stamp;
        let mut value = vec![operation.as_u8()];
        value.extend_from_slice(&stamp.to_be_bytes());
        store.apply(StoreOp::Record {
            key: &k,
            value: Some(&value),
        });
        self.services.consent.insert(scope, (operation, stamp));
        None
    }

    /// §5.9: abuse reports go to the hub of the room, which keeps them for its operator.
    fn report_abuse<S: Store>(
        &mut self,
        store: &mut S,
        from: &ProviderDomain,
        room: &str,
        body: &Bytes,
    ) -> Response {
        if !self.hub.room_by_id.contains_key(room) {
            return self.refuse(Refusal::UnknownRoom);
        }
        let Ok(report) = AbuseReport::decode(body) else {
            return self.refuse(Refusal::Malformed(Malformed::AbuseReport));
        };
        if let Some(refused) = self.check_report_franks(room, &report) {
            return refused;
        }
        let peer = from.as_str();
        let (count, bytes) = self
            .services
            .abuse_by_peer
            .get(peer)
            .copied()
            .unwrap_or_default();
        if count >= self.cfg.max_abuse_reports_per_peer {
            let limit = self.cfg.max_abuse_reports_per_peer;
            return self.over_budget(peer, "abuse_reports", limit);
        }
        if bytes + body.len() > self.cfg.max_abuse_bytes_per_peer {
            let limit = self.cfg.max_abuse_bytes_per_peer;
            return self.over_budget(peer, "abuse_bytes", limit);
        }
        let e = self
            .services
            .abuse_by_peer
            .entry(peer.to_owned())
            .or_default();
        e.0 += 1;
        e.1 += body.len();
        self.services.abuse_reports += 1;
        let mut k = vec![REC_ABUSE];
        k.extend_from_slice(&self.services.abuse_reports.to_be_bytes());
        k.extend_from_slice(peer.as_bytes());
        k.push(0);
        k.extend_from_slice(room.as_bytes());
        store.apply(StoreOp::Record {
            key: &k,
            value: Some(body),
        });
        info!(
            room,
            reports = self.services.abuse_reports,
            "abuse report kept for the operator"
        );
        created()
    }

    /// A local user's grant or revoke (an updateConsent from a local client), kept where its
    /// KeyPackages are claimed. `Some`: the refusal to answer.
    fn local_consent_decision<S: Store>(
        &mut self,
        store: &mut S,
        entry: &ConsentEntry,
    ) -> Option<Response> {
        if !matches!(
            entry.operation,
            ConsentOperation::Grant | ConsentOperation::Revoke
        ) {
            return Some(self.refuse(Refusal::Malformed(Malformed::ConsentOperation)));
        }
        let (r, t) = (entry.requester_uri.as_str(), entry.target_uri.as_str());
        if !uri_in_domain(t, self.cfg.local.as_str()) || user_domain(r).is_none() {
            return Some(self.refuse(Refusal::Forbidden(Forbidden::ConsentLocalOnly)));
        }
        let room = entry.room_id.as_ref().map_or("", |r| r.as_str());
        if r.contains('\0') || t.contains('\0') || room.contains('\0') {
            return Some(self.refuse(Refusal::Malformed(Malformed::NulInUri)));
        }
        let scope = (r.to_owned(), t.to_owned(), room.to_owned());
        self.record_consent(store, scope, entry.operation)
    }

    /// Checks each reported message's frank as this hub's own (protocol-06 §5.4.1: the
    /// server frank under the hub's franking key, over the alleged abuser, the room and the
    /// accepted timestamp). A frank that is not ours refuses the report (422); with no
    /// franking key here the report is kept unchecked.
    fn check_report_franks(&mut self, room: &str, report: &AbuseReport) -> Option<Response> {
        let v = self.mls.validator.as_ref()?;
        let mut verified = 0;
        for m in &report.messages {
            match v.check_reported_frank(
                m.message_content.as_slice(),
                report.alleged_abuser_uri.as_str(),
                room,
                m.accepted_timestamp,
                &m.frank,
            ) {
                Some(true) => verified += 1,
                Some(false) => {
                    self.stats.franks_refused += 1;
                    return Some(self.refuse(Refusal::BadFrank));
                }
                None => {}
            }
        }
        self.stats.franks_verified += verified;
        None
    }

    /// Requests from peers for the services here. `None`: not one of them.
    pub(super) fn service_request<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        from: &ProviderDomain,
        endpoint: Endpoint,
        target: &str,
        body: &Bytes,
    ) -> Option<Response> {
        Some(match endpoint {
            Endpoint::IdentifierQuery if target == self.cfg.local.as_str() => {
                self.identifier_query(now, from, body)
            }
            Endpoint::IdentifierQuery => self.refuse(Refusal::NotThisProvider),
            Endpoint::RequestConsent | Endpoint::UpdateConsent => {
                self.consent_entry(store, from, endpoint, body)
            }
            Endpoint::ReportAbuse => self.report_abuse(store, from, target, body),
            Endpoint::GroupInfo => self.group_info(from, target, body),
            _ => return None,
        })
    }

    /// A local client's request for a service: answered here or sent to the provider that
    /// answers it (the target's for identifier queries and consent; the hub for abuse).
    pub(super) fn client_service<S: Store>(
        &mut self,
        now: Now,
        store: &mut S,
        token: ReplyToken,
        endpoint: Endpoint,
        target: &str,
        body: Bytes,
    ) -> Option<Response> {
        let mut fwd_target = target.to_owned();
        let dest = match endpoint {
            Endpoint::IdentifierQuery => target.parse::<ProviderDomain>().ok(),
            Endpoint::RequestConsent | Endpoint::UpdateConsent => {
                let Ok(entry) = ConsentEntry::decode(&body) else {
                    return Some(self.refuse(Refusal::Malformed(Malformed::ConsentEntry)));
                };
                if endpoint == Endpoint::UpdateConsent {
                    // The target's own decision: kept here first, since this provider
                    // answers the claims for its KeyPackages (§5.2), then sent on as notice
                    // to the requester's provider.
                    if let Some(r) = self.local_consent_decision(store, &entry) {
                        return Some(r);
                    }
                }
                let other = if endpoint == Endpoint::RequestConsent {
                    entry.target_uri
                } else {
                    entry.requester_uri
                };
                fwd_target = other.as_str().to_owned();
                user_domain(other.as_str()).and_then(|d| d.parse().ok())
            }
            Endpoint::ReportAbuse | Endpoint::GroupInfo => target
                .parse::<RoomId>()
                .ok()
                .and_then(|r| r.domain().parse().ok()),
            _ => {
                return Some(self.refuse(Refusal::EndpointNotServedToClients));
            }
        };
        let Some(dest) = dest else {
            return Some(self.refuse(Refusal::Malformed(Malformed::NoProvider)));
        };
        if dest == self.cfg.local {
            if endpoint == Endpoint::UpdateConsent {
                return Some(created());
            }
            let local = self.cfg.local.clone();
            return self.service_request(now, store, &local, endpoint, &fwd_target, &body);
        }
        self.forward(now, token, dest, endpoint, &fwd_target, body, None)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use mimi_wire::proto::KeyPackage;

    use super::*;
    use crate::store::MemStore;
    use crate::transport::{Request, TransportKind};
    use crate::{Output, RelayConfig};

    fn d(s: &str) -> ProviderDomain {
        s.parse().expect("test domain")
    }

    fn now() -> Now {
        Now {
            mono: Instant::now(),
            unix_ms: 1_700_000_000_000,
        }
    }

    fn hub(store: &MemStore) -> Relay {
        let mut cfg = RelayConfig::new(d("a.example"))
            .with_route(d("b.example"), TransportKind::Https)
            .with_route(d("c.example"), TransportKind::Https);
        cfg.max_abuse_reports_per_peer = 3;
        cfg.max_abuse_bytes_per_peer = 1 << 20;
        cfg.max_consent_per_peer = 2;
        Relay::new(cfg, store.committed().clone(), now())
    }

    fn ask(relay: &mut Relay, store: &mut MemStore, req: Request) -> Response {
        relay.handle_request(now(), store, ReplyToken(7), req);
        store.commit().expect("memory commit");
        loop {
            match relay.poll_output().expect("an answer") {
                Output::Reply { response, .. } => return response,
                _ => continue,
            }
        }
    }

    fn req(from: &str, endpoint: Endpoint, target: &str, body: Vec<u8>) -> Request {
        Request {
            from: d(from),
            transport: TransportKind::Https,
            endpoint,
            target: target.to_owned(),
            seq: None,
            lineage: None,
            body: Bytes::from(body),
        }
    }

    fn report(note: &[u8]) -> Vec<u8> {
        AbuseReport {
            reporting_user: IdentifierUri::new("mimi://b.example/u/bob"),
            alleged_abuser_uri: IdentifierUri::new("mimi://a.example/u/alice"),
            reason_code: 0,
            note: VLBytes::new(note.to_vec()),
            messages: Vec::new(),
            abuse_extensions: VLBytes::new(Vec::new()),
        }
        .encode()
        .expect("encodes")
    }

    fn consent(requester: &str, target: &str) -> Vec<u8> {
        ConsentEntry {
            operation: ConsentOperation::Request,
            requester_uri: IdentifierUri::new(requester),
            target_uri: IdentifierUri::new(target),
            room_id: None,
            client_key_packages: Vec::<KeyPackage>::new(),
            consent_extensions: VLBytes::new(Vec::new()),
        }
        .encode()
        .expect("encodes")
    }

    #[test]
    fn abuse_reports_are_capped_per_reporting_provider_across_restarts() {
        let mut store = MemStore::new();
        let mut relay = hub(&store);
        let room = "mimi://a.example/r/abuse";
        relay
            .handle_create_room(
                &mut store,
                room.parse().expect("room id"),
                vec![d("b.example"), d("c.example")],
            )
            .expect("room created");
        for i in 0..3u8 {
            let r = req("b.example", Endpoint::ReportAbuse, room, report(&[i]));
            assert_eq!(ask(&mut relay, &mut store, r).status, Status::Created);
        }
        let r = req("b.example", Endpoint::ReportAbuse, room, report(b"4th"));
        let refused = ask(&mut relay, &mut store, r);
        assert_eq!(refused.status, Status::Unavailable);
        assert!(refused.retry_after.is_some());
        // Another provider's share is untouched.
        let r = req("c.example", Endpoint::ReportAbuse, room, report(b"c"));
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Created);
        assert_eq!(relay.abuse_reports(), 4);
        // The count is rebuilt from the store: b is still at its cap after a restart.
        let mut relay = hub(&store);
        let r = req("b.example", Endpoint::ReportAbuse, room, report(b"5th"));
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Unavailable);
        let r = req("c.example", Endpoint::ReportAbuse, room, report(b"c2"));
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Created);
        assert_eq!(
            relay.stats().rejects[crate::stats::RejectReason::PeerBudget as usize],
            1
        );
    }

    #[test]
    fn abuse_report_bytes_are_capped_per_provider() {
        let mut store = MemStore::new();
        let mut relay = hub(&store);
        let room = "mimi://a.example/r/abuse";
        relay
            .handle_create_room(
                &mut store,
                room.parse().expect("room id"),
                vec![d("b.example")],
            )
            .expect("room created");
        let big = vec![b'x'; 700 << 10];
        let r = req("b.example", Endpoint::ReportAbuse, room, report(&big));
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Created);
        let r = req("b.example", Endpoint::ReportAbuse, room, report(&big));
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Unavailable);
        let r = req("b.example", Endpoint::ReportAbuse, room, report(b"small"));
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Created);
    }

    #[test]
    fn consent_scopes_are_capped_per_provider_and_updates_of_a_kept_scope_pass() {
        let mut store = MemStore::new();
        let mut relay = hub(&store);
        let target = "mimi://a.example/u/alice";
        for n in 0..2 {
            let body = consent(&format!("mimi://b.example/u/{n}"), target);
            let r = req("b.example", Endpoint::RequestConsent, target, body);
            assert_eq!(ask(&mut relay, &mut store, r).status, Status::Created);
        }
        let body = consent("mimi://b.example/u/new", target);
        let r = req("b.example", Endpoint::RequestConsent, target, body);
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Unavailable);
        // A scope already kept is not a new record.
        let body = consent("mimi://b.example/u/0", target);
        let r = req("b.example", Endpoint::RequestConsent, target, body);
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Created);
        let body = consent("mimi://c.example/u/carol", target);
        let r = req("c.example", Endpoint::RequestConsent, target, body);
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Created);
        let mut relay = hub(&store);
        let body = consent("mimi://b.example/u/new", target);
        let r = req("b.example", Endpoint::RequestConsent, target, body);
        assert_eq!(ask(&mut relay, &mut store, r).status, Status::Unavailable);
    }
}
