//! §5.9 Report abuse.

use super::{Frank, IdentifierUri, VLBytes, put_vlbytes, read_vlbytes};
use crate::codec::{Decode, Encode, Reader, Writer, decode_list, encode_list, wire_type};
use crate::error::WireError;

/// `AbusiveMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbusiveMessage {
    /// `message_content<V>` (e.g. a MIMI content message)
    pub message_content: VLBytes,
    /// `frank`
    pub frank: Frank,
    /// `accepted_timestamp`
    pub accepted_timestamp: u64,
}

impl<'a> Decode<'a> for AbusiveMessage {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(AbusiveMessage {
            message_content: read_vlbytes(r, "message_content")?,
            frank: Frank::decode_from(r)?,
            accepted_timestamp: r.u64()?,
        })
    }
}

impl Encode for AbusiveMessage {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        put_vlbytes(out, &self.message_content)?;
        self.frank.encode_to(out)?;
        out.put_u64(self.accepted_timestamp);
        Ok(())
    }
}
wire_type!(AbusiveMessage);

/// `AbuseReport`. `AbuseType` defines only `reserved(0)` so far, so `reason_code` is kept
/// as the raw byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbuseReport {
    /// `reportingUser` (may be empty)
    pub reporting_user: IdentifierUri,
    /// `allegedAbuserUri`
    pub alleged_abuser_uri: IdentifierUri,
    /// `reasonCode`
    pub reason_code: u8,
    /// `note<V>` (UTF-8 by the draft, not checked)
    pub note: VLBytes,
    /// `messages<V>`
    pub messages: Vec<AbusiveMessage>,
    /// `abuse_extensions` (AppDataDictionary contents)
    pub abuse_extensions: VLBytes,
}

impl<'a> Decode<'a> for AbuseReport {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(AbuseReport {
            reporting_user: IdentifierUri::decode_from(r)?,
            alleged_abuser_uri: IdentifierUri::decode_from(r)?,
            reason_code: r.u8()?,
            note: read_vlbytes(r, "note")?,
            messages: decode_list(r, "messages")?,
            abuse_extensions: read_vlbytes(r, "abuse_extensions")?,
        })
    }
}

impl Encode for AbuseReport {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.reporting_user.encode_to(out)?;
        self.alleged_abuser_uri.encode_to(out)?;
        out.put_u8(self.reason_code);
        put_vlbytes(out, &self.note)?;
        encode_list(out, &self.messages)?;
        put_vlbytes(out, &self.abuse_extensions)
    }
}
wire_type!(AbuseReport);
