//! §5.4 Submit a message.

use super::{Frank, IdentifierUri, MlsMessage, Protocol, code_enum, put_opt, read_opt};
use crate::codec::{Decode, Encode, Reader, Writer, wire_type};
use crate::error::{Limits, WireError};
use crate::mls::MlsMessageView;

/// `SubmitMessageRequest`. Decoding requires the message to be a PrivateMessage with
/// content type application, as §5.4 says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitMessageRequest {
    /// `protocol`
    pub protocol: Protocol,
    /// `appMessage`
    pub app_message: MlsMessage,
    /// `sendingUri`
    pub sending_uri: IdentifierUri,
}

impl SubmitMessageRequest {
    /// An MLS 1.0 request: `mls` must be one PrivateMessage of content type application.
    pub fn mls10(mls: Vec<u8>, sending_uri: impl Into<String>) -> Result<Self, WireError> {
        let app_message = MlsMessage::from_bytes(mls)?;
        check_app_message(&app_message.view())?;
        Ok(SubmitMessageRequest {
            protocol: Protocol::Mls10,
            app_message,
            sending_uri: IdentifierUri::new(sending_uri),
        })
    }
}

fn check_app_message(m: &MlsMessageView<'_>) -> Result<(), WireError> {
    if m.is_private_application() {
        Ok(())
    } else {
        Err(WireError::BadValue {
            what: "appMessage wire format or content type",
        })
    }
}

impl<'a> Decode<'a> for SubmitMessageRequest {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let protocol = Protocol::read(r)?;
        let app_message = MlsMessage::decode_from(r)?;
        check_app_message(&app_message.view())?;
        Ok(SubmitMessageRequest {
            protocol,
            app_message,
            sending_uri: IdentifierUri::decode_from(r)?,
        })
    }
}

impl Encode for SubmitMessageRequest {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.protocol.encode_to(out)?;
        self.app_message.encode_to(out)?;
        self.sending_uri.encode_to(out)
    }
}
wire_type!(SubmitMessageRequest);

/// A borrowed, validated `SubmitMessageRequest`; `app_message.bytes` is what the hub fans
/// out, untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitMessageView<'a> {
    /// `protocol`
    pub protocol: Protocol,
    /// `appMessage`, a PrivateMessage with content type application.
    pub app_message: MlsMessageView<'a>,
    /// `sendingUri` (UTF-8 checked, URI syntax not).
    pub sending_uri: &'a str,
}

impl<'a> SubmitMessageView<'a> {
    /// Parse a whole request body under the default [`Limits`].
    pub fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        Self::parse_with_limits(body, &Limits::default())
    }

    /// Parse a whole request body under `limits`.
    pub fn parse_with_limits(body: &'a [u8], limits: &Limits) -> Result<Self, WireError> {
        if body.len() > limits.max_body {
            return Err(WireError::TooLarge {
                what: "body",
                len: body.len(),
                max: limits.max_body,
            });
        }
        let mut r = Reader::new(body, *limits);
        let protocol = Protocol::read(&mut r)?;
        let app_message = MlsMessageView::read(&mut r)?;
        check_app_message(&app_message)?;
        let sending_uri = r.utf8("sendingUri")?;
        r.finish()?;
        Ok(SubmitMessageView {
            protocol,
            app_message,
            sending_uri,
        })
    }
}

code_enum!(
    /// `SubmitResponseCode` (§5.4).
    SubmitResponseCode, "submit response code" {
        /// `accepted(0)`
        Accepted = 0,
        /// `notAllowed(1)`
        NotAllowed = 1,
        /// `epochTooOld(2)`
        EpochTooOld = 2,
    }
);

/// The code-specific part of a [`SubmitMessageResponse`]. The draft's select says
/// `case success`, which we read as `accepted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitStatus {
    /// Accepted at `accepted_timestamp` (ms since the UNIX epoch).
    Accepted {
        /// `accepted_timestamp`
        accepted_timestamp: u64,
        /// `optional Frank frank`
        frank: Option<Frank>,
    },
    /// `notAllowed`
    NotAllowed,
    /// `epochTooOld`: the hub's current epoch.
    EpochTooOld {
        /// `currentEpoch`
        current_epoch: u64,
    },
}

/// `SubmitMessageResponse` (§5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitMessageResponse {
    /// `protocol`
    pub protocol: Protocol,
    /// Status code and its fields.
    pub status: SubmitStatus,
}

impl SubmitMessageResponse {
    /// Accepted at `ts_ms`, no frank.
    pub fn accepted(ts_ms: u64) -> Self {
        SubmitMessageResponse {
            protocol: Protocol::Mls10,
            status: SubmitStatus::Accepted {
                accepted_timestamp: ts_ms,
                frank: None,
            },
        }
    }

    /// Accepted at `ts_ms`, with the hub's frank if it franked the message.
    pub fn accepted_franked(ts_ms: u64, frank: Option<Frank>) -> Self {
        SubmitMessageResponse {
            protocol: Protocol::Mls10,
            status: SubmitStatus::Accepted {
                accepted_timestamp: ts_ms,
                frank,
            },
        }
    }

    /// Rejected by policy.
    pub fn not_allowed() -> Self {
        SubmitMessageResponse {
            protocol: Protocol::Mls10,
            status: SubmitStatus::NotAllowed,
        }
    }

    /// Rejected: the hub is at `epoch`.
    pub fn epoch_too_old(epoch: u64) -> Self {
        SubmitMessageResponse {
            protocol: Protocol::Mls10,
            status: SubmitStatus::EpochTooOld {
                current_epoch: epoch,
            },
        }
    }

    /// The status code.
    pub fn code(&self) -> SubmitResponseCode {
        match self.status {
            SubmitStatus::Accepted { .. } => SubmitResponseCode::Accepted,
            SubmitStatus::NotAllowed => SubmitResponseCode::NotAllowed,
            SubmitStatus::EpochTooOld { .. } => SubmitResponseCode::EpochTooOld,
        }
    }
}

impl<'a> Decode<'a> for SubmitMessageResponse {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let protocol = Protocol::read(r)?;
        let status = match SubmitResponseCode::decode_from(r)? {
            SubmitResponseCode::Accepted => SubmitStatus::Accepted {
                accepted_timestamp: r.u64()?,
                frank: read_opt(r, "frank presence")?,
            },
            SubmitResponseCode::NotAllowed => SubmitStatus::NotAllowed,
            SubmitResponseCode::EpochTooOld => SubmitStatus::EpochTooOld {
                current_epoch: r.u64()?,
            },
        };
        Ok(SubmitMessageResponse { protocol, status })
    }
}

impl Encode for SubmitMessageResponse {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.protocol.encode_to(out)?;
        self.code().encode_to(out)?;
        match &self.status {
            SubmitStatus::Accepted {
                accepted_timestamp,
                frank,
            } => {
                out.put_u64(*accepted_timestamp);
                put_opt(out, frank)
            }
            SubmitStatus::NotAllowed => Ok(()),
            SubmitStatus::EpochTooOld { current_epoch } => {
                out.put_u64(*current_epoch);
                Ok(())
            }
        }
    }
}
wire_type!(SubmitMessageResponse);
