//! The MIMI endpoints (protocol-06 §5) and the directory document (§5.1).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Path of the well-known directory document.
pub const DIRECTORY_PATH: &str = "/.well-known/mimi-protocol-directory";

/// One MIMI endpoint. The `u8` codes are this project's stable numbering for binary
/// framings (not from the draft).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// `POST /keyMaterial/{targetUser}` (§5.2)
    KeyMaterial,
    /// `POST /update/{roomId}` (§5.3)
    Update,
    /// `POST /notify/{roomId}` (§5.5)
    Notify,
    /// `POST /submitMessage/{roomId}` (§5.4)
    SubmitMessage,
    /// `POST /groupInfo/{roomId}` (§5.6)
    GroupInfo,
    /// `POST /requestConsent/{targetUser}` (§5.7; the prose says `{targetDomain}`)
    RequestConsent,
    /// `POST /updateConsent/{requesterUser}` (§5.7; the prose says `{requesterDomain}`)
    UpdateConsent,
    /// `POST /identifierQuery/{domain}` (§5.8)
    IdentifierQuery,
    /// `POST /reportAbuse/{roomId}` (§5.9)
    ReportAbuse,
    /// `GET /proxyDownload/{downloadUrl}` (§5.10.2)
    ProxyDownload,
}

/// What an endpoint's single path parameter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathParam {
    /// A room URI.
    Room,
    /// A user URI.
    User,
    /// A provider domain.
    Domain,
    /// A download URL.
    Url,
}

impl PathParam {
    /// The template variable name used in the directory, e.g. `roomId`.
    pub fn template_name(self, endpoint: Endpoint) -> &'static str {
        match (self, endpoint) {
            (PathParam::Room, _) => "roomId",
            (PathParam::User, Endpoint::UpdateConsent) => "requesterUser",
            (PathParam::User, _) => "targetUser",
            (PathParam::Domain, _) => "domain",
            (PathParam::Url, _) => "downloadUrl",
        }
    }
}

/// Error for an unknown endpoint name or code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mimi endpoint")]
pub struct UnknownEndpoint;

impl Endpoint {
    /// Every endpoint, in code order.
    pub const ALL: [Endpoint; 10] = [
        Endpoint::KeyMaterial,
        Endpoint::Update,
        Endpoint::Notify,
        Endpoint::SubmitMessage,
        Endpoint::GroupInfo,
        Endpoint::RequestConsent,
        Endpoint::UpdateConsent,
        Endpoint::IdentifierQuery,
        Endpoint::ReportAbuse,
        Endpoint::ProxyDownload,
    ];

    /// The name used in paths and in the directory.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::KeyMaterial => "keyMaterial",
            Endpoint::Update => "update",
            Endpoint::Notify => "notify",
            Endpoint::SubmitMessage => "submitMessage",
            Endpoint::GroupInfo => "groupInfo",
            Endpoint::RequestConsent => "requestConsent",
            Endpoint::UpdateConsent => "updateConsent",
            Endpoint::IdentifierQuery => "identifierQuery",
            Endpoint::ReportAbuse => "reportAbuse",
            Endpoint::ProxyDownload => "proxyDownload",
        }
    }

    /// Stable code, 1..=10.
    pub fn code(self) -> u8 {
        match self {
            Endpoint::KeyMaterial => 1,
            Endpoint::Update => 2,
            Endpoint::Notify => 3,
            Endpoint::SubmitMessage => 4,
            Endpoint::GroupInfo => 5,
            Endpoint::RequestConsent => 6,
            Endpoint::UpdateConsent => 7,
            Endpoint::IdentifierQuery => 8,
            Endpoint::ReportAbuse => 9,
            Endpoint::ProxyDownload => 10,
        }
    }

    /// Inverse of [`Endpoint::code`].
    pub fn from_code(code: u8) -> Result<Self, UnknownEndpoint> {
        Endpoint::ALL
            .get(usize::from(code).wrapping_sub(1))
            .copied()
            .ok_or(UnknownEndpoint)
    }

    /// What the path parameter is.
    pub fn path_param(self) -> PathParam {
        match self {
            Endpoint::Update
            | Endpoint::Notify
            | Endpoint::SubmitMessage
            | Endpoint::GroupInfo
            | Endpoint::ReportAbuse => PathParam::Room,
            Endpoint::KeyMaterial | Endpoint::RequestConsent | Endpoint::UpdateConsent => {
                PathParam::User
            }
            Endpoint::IdentifierQuery => PathParam::Domain,
            Endpoint::ProxyDownload => PathParam::Url,
        }
    }

    /// `GET` for proxyDownload, `POST` for the rest.
    pub fn method(self) -> &'static str {
        if self == Endpoint::ProxyDownload {
            "GET"
        } else {
            "POST"
        }
    }

    /// True where the request goes to the room's hub.
    pub fn is_sent_to_hub(self) -> bool {
        matches!(
            self,
            Endpoint::Update
                | Endpoint::SubmitMessage
                | Endpoint::GroupInfo
                | Endpoint::ReportAbuse
                | Endpoint::ProxyDownload
        )
    }
}

impl FromStr for Endpoint {
    type Err = UnknownEndpoint;
    fn from_str(s: &str) -> Result<Self, UnknownEndpoint> {
        Endpoint::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or(UnknownEndpoint)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `/.well-known/mimi-protocol-directory` document: a URL template per endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Directory {
    /// `.../keyMaterial/{targetUser}`
    pub key_material: String,
    /// `.../update/{roomId}`
    pub update: String,
    /// `.../notify/{roomId}`
    pub notify: String,
    /// `.../submitMessage/{roomId}`
    pub submit_message: String,
    /// `.../groupInfo/{roomId}`
    pub group_info: String,
    /// `.../requestConsent/{targetUser}`
    pub request_consent: String,
    /// `.../updateConsent/{requesterUser}`
    pub update_consent: String,
    /// `.../identifierQuery/{domain}`
    pub identifier_query: String,
    /// `.../reportAbuse/{roomId}`
    pub report_abuse: String,
    /// `.../proxyDownload/{downloadUrl}`
    pub proxy_download: String,
}

impl Directory {
    /// The draft's layout under `base_url` (e.g. `https://mimi.example.com/v1`):
    /// `{base}/{endpoint}/{param}`. The draft's example writes `update{roomId}` without the
    /// slash; we read that as a typo and use `/update/{roomId}` like every other entry.
    pub fn for_base(base_url: &str) -> Directory {
        let base = base_url.trim_end_matches('/');
        let t = |e: Endpoint| {
            format!(
                "{base}/{}/{{{}}}",
                e.as_str(),
                e.path_param().template_name(e)
            )
        };
        Directory {
            key_material: t(Endpoint::KeyMaterial),
            update: t(Endpoint::Update),
            notify: t(Endpoint::Notify),
            submit_message: t(Endpoint::SubmitMessage),
            group_info: t(Endpoint::GroupInfo),
            request_consent: t(Endpoint::RequestConsent),
            update_consent: t(Endpoint::UpdateConsent),
            identifier_query: t(Endpoint::IdentifierQuery),
            report_abuse: t(Endpoint::ReportAbuse),
            proxy_download: t(Endpoint::ProxyDownload),
        }
    }

    /// The template for one endpoint.
    pub fn template(&self, endpoint: Endpoint) -> &str {
        match endpoint {
            Endpoint::KeyMaterial => &self.key_material,
            Endpoint::Update => &self.update,
            Endpoint::Notify => &self.notify,
            Endpoint::SubmitMessage => &self.submit_message,
            Endpoint::GroupInfo => &self.group_info,
            Endpoint::RequestConsent => &self.request_consent,
            Endpoint::UpdateConsent => &self.update_consent,
            Endpoint::IdentifierQuery => &self.identifier_query,
            Endpoint::ReportAbuse => &self.report_abuse,
            Endpoint::ProxyDownload => &self.proxy_download,
        }
    }

    /// The URL for `endpoint` with its template variable replaced by `segment`, which the
    /// caller has already percent-encoded (e.g. [`crate::uri::RoomId::to_path_segment`]).
    pub fn url(&self, endpoint: Endpoint, segment: &str) -> String {
        let var = format!("{{{}}}", endpoint.path_param().template_name(endpoint));
        self.template(endpoint).replace(&var, segment)
    }

    /// Parse the JSON document.
    pub fn from_json(s: &str) -> Result<Directory, serde_json::Error> {
        serde_json::from_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The §5.1 example with its two typos fixed: the missing ':' after "proxyDownload"
    /// and the missing '/' in "update{roomId}".
    const DRAFT_EXAMPLE: &str = r#"{
      "keyMaterial":
         "https://mimi.example.com/v1/keyMaterial/{targetUser}",
      "update": "https://mimi.example.com/v1/update/{roomId}",
      "notify": "https://mimi.example.com/v1/notify/{roomId}",
      "submitMessage":
         "https://mimi.example.com/v1/submitMessage/{roomId}",
      "groupInfo":
         "https://mimi.example.com/v1/groupInfo/{roomId}",
      "requestConsent":
         "https://mimi.example.com/v1/requestConsent/{targetUser}",
      "updateConsent":
         "https://mimi.example.com/v1/updateConsent/{requesterUser}",
      "identifierQuery":
         "https://mimi.example.com/v1/identifierQuery/{domain}",
      "reportAbuse":
         "https://mimi.example.com/v1/reportAbuse/{roomId}",
      "proxyDownload":
         "https://mimi.example.com/v1/proxyDownload/{downloadUrl}"
    }"#;

    #[test]
    fn directory_matches_draft_example() {
        let parsed = Directory::from_json(DRAFT_EXAMPLE).unwrap();
        let built = Directory::for_base("https://mimi.example.com/v1/");
        assert_eq!(parsed, built);
        let json = serde_json::to_string(&built).unwrap();
        assert_eq!(Directory::from_json(&json).unwrap(), built);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for e in Endpoint::ALL {
            assert!(v.get(e.as_str()).is_some(), "{e}");
        }
    }

    #[test]
    fn directory_url() {
        let d = Directory::for_base("https://hub.example");
        assert_eq!(
            d.url(Endpoint::Notify, "mimi%3A%2F%2Fa%2Fr%2Fx"),
            "https://hub.example/notify/mimi%3A%2F%2Fa%2Fr%2Fx"
        );
        assert_eq!(
            d.url(Endpoint::IdentifierQuery, "b.example"),
            "https://hub.example/identifierQuery/b.example"
        );
    }

    #[test]
    fn names_codes_and_params() {
        let names = [
            "keyMaterial",
            "update",
            "notify",
            "submitMessage",
            "groupInfo",
            "requestConsent",
            "updateConsent",
            "identifierQuery",
            "reportAbuse",
            "proxyDownload",
        ];
        for (i, e) in Endpoint::ALL.into_iter().enumerate() {
            assert_eq!(e.as_str(), names[i]);
            assert_eq!(e.code(), i as u8 + 1);
            assert_eq!(Endpoint::from_code(e.code()), Ok(e));
            assert_eq!(names[i].parse::<Endpoint>(), Ok(e));
        }
        assert_eq!(Endpoint::from_code(0), Err(UnknownEndpoint));
        assert_eq!(Endpoint::from_code(11), Err(UnknownEndpoint));
        assert!("Notify".parse::<Endpoint>().is_err());
        assert_eq!(Endpoint::Notify.path_param(), PathParam::Room);
        assert_eq!(Endpoint::KeyMaterial.path_param(), PathParam::User);
        assert_eq!(Endpoint::IdentifierQuery.path_param(), PathParam::Domain);
        assert_eq!(Endpoint::ProxyDownload.path_param(), PathParam::Url);
        assert_eq!(Endpoint::ProxyDownload.method(), "GET");
        assert_eq!(Endpoint::Update.method(), "POST");
    }
}
