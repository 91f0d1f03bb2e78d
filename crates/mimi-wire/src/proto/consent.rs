//! §5.7 Convey explicit consent. `RoomId` in these structs is read as an
//! [`IdentifierUri`]; `AppDataDictionary` as the contents of its component vector.

use super::{
    IdentifierUri, KeyPackage, VLBytes, code_enum, put_opt, put_vlbytes, read_opt, read_vlbytes,
};
use crate::codec::{Decode, Encode, Reader, decode_list, encode_list, wire_type};
use crate::error::WireError;

code_enum!(
    /// `ConsentOperation` (§5.7).
    ConsentOperation, "consent operation" {
        /// `cancel(0)`
        Cancel = 0,
        /// `request(1)`
        Request = 1,
        /// `grant(2)`
        Grant = 2,
        /// `revoke(3)`
        Revoke = 3,
    }
);

/// `ConsentEntry`, the body of requestConsent and updateConsent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentEntry {
    /// `consentOperation`
    pub operation: ConsentOperation,
    /// `requesterUri`
    pub requester_uri: IdentifierUri,
    /// `targetUri`
    pub target_uri: IdentifierUri,
    /// `optional<RoomId> roomId`
    pub room_id: Option<IdentifierUri>,
    /// `KeyPackage clientKeyPackages<V>`; on the wire only for `grant`, so it must be
    /// empty for the other operations.
    pub client_key_packages: Vec<KeyPackage>,
    /// `consent_extensions` (AppDataDictionary contents)
    pub consent_extensions: VLBytes,
}

impl ConsentEntry {
    /// The scope this entry applies to.
    pub fn scope(&self) -> ConsentScope {
        ConsentScope {
            requester_uri: self.requester_uri.clone(),
            target_uri: self.target_uri.clone(),
            room_id: self.room_id.clone(),
        }
    }
}

impl<'a> Decode<'a> for ConsentEntry {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let operation = ConsentOperation::decode_from(r)?;
        let requester_uri = IdentifierUri::decode_from(r)?;
        let target_uri = IdentifierUri::decode_from(r)?;
        let room_id = read_opt(r, "roomId presence")?;
        let client_key_packages = if operation == ConsentOperation::Grant {
            decode_list(r, "clientKeyPackages")?
        } else {
            Vec::new()
        };
        Ok(ConsentEntry {
            operation,
            requester_uri,
            target_uri,
            room_id,
            client_key_packages,
            consent_extensions: read_vlbytes(r, "consent_extensions")?,
        })
    }
}

impl Encode for ConsentEntry {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.operation.encode_to(out)?;
        self.requester_uri.encode_to(out)?;
        self.target_uri.encode_to(out)?;
        put_opt(out, &self.room_id)?;
        if self.operation == ConsentOperation::Grant {
            encode_list(out, &self.client_key_packages)?;
        } else if !self.client_key_packages.is_empty() {
            return Err(WireError::BadValue {
                what: "clientKeyPackages outside grant",
            });
        }
        put_vlbytes(out, &self.consent_extensions)
    }
}
wire_type!(ConsentEntry);

/// `ConsentScope`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConsentScope {
    /// `requesterUri`
    pub requester_uri: IdentifierUri,
    /// `targetUri`
    pub target_uri: IdentifierUri,
    /// `optional<RoomId> roomId`
    pub room_id: Option<IdentifierUri>,
}

impl<'a> Decode<'a> for ConsentScope {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(ConsentScope {
            requester_uri: IdentifierUri::decode_from(r)?,
            target_uri: IdentifierUri::decode_from(r)?,
            room_id: read_opt(r, "roomId presence")?,
        })
    }
}

impl Encode for ConsentScope {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.requester_uri.encode_to(out)?;
        self.target_uri.encode_to(out)?;
        put_opt(out, &self.room_id)
    }
}
wire_type!(ConsentScope);
