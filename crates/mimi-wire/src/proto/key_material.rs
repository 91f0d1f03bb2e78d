//! §5.2 Fetch key material.

use super::{
    Capabilities, Credential, IdentifierUri, KeyPackage, Protocol, RequiredCapabilities, VLBytes,
    code_enum, put_opt, put_vlbytes, read_opt, read_vlbytes,
};
use crate::codec::{Decode, Encode, Reader, Writer, decode_list, encode_list, wire_type};
use crate::error::WireError;

/// `KeyMaterialRequest` (mls10 arm).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMaterialRequest {
    /// `protocol`
    pub protocol: Protocol,
    /// `requestingUser`
    pub requesting_user: IdentifierUri,
    /// `targetUser`
    pub target_user: IdentifierUri,
    /// `roomId` (empty when not in the context of a room)
    pub room_id: IdentifierUri,
    /// `CipherSuite acceptableCiphersuites<V>`
    pub acceptable_ciphersuites: Vec<u16>,
    /// `requiredCapabilities`
    pub required_capabilities: RequiredCapabilities,
    /// `requesterSignatureKey` (SignaturePublicKey contents)
    pub requester_signature_key: VLBytes,
    /// `requesterCredential`
    pub requester_credential: Credential,
    /// `key_material_request_signature`
    pub signature: VLBytes,
}

impl KeyMaterialRequest {
    /// `KeyMaterialRequestTBS`: the request without its signature, which the signature
    /// covers.
    pub fn tbs(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.encode_tbs(&mut out)?;
        Ok(out)
    }

    fn encode_tbs(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.protocol.encode_to(out)?;
        self.requesting_user.encode_to(out)?;
        self.target_user.encode_to(out)?;
        self.room_id.encode_to(out)?;
        out.put_vec_with(|w| {
            self.acceptable_ciphersuites
                .iter()
                .for_each(|c| w.put_u16(*c));
            Ok(())
        })?;
        self.required_capabilities.encode_to(out)?;
        put_vlbytes(out, &self.requester_signature_key)?;
        self.requester_credential.encode_to(out)
    }
}

fn read_suites(r: &mut Reader<'_>) -> Result<Vec<u16>, WireError> {
    let raw = r.vec("acceptableCiphersuites")?;
    if raw.len() % 2 != 0 {
        return Err(WireError::BadValue {
            what: "acceptableCiphersuites",
        });
    }
    Ok(raw
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect())
}

impl<'a> Decode<'a> for KeyMaterialRequest {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(KeyMaterialRequest {
            protocol: Protocol::read(r)?,
            requesting_user: IdentifierUri::decode_from(r)?,
            target_user: IdentifierUri::decode_from(r)?,
            room_id: IdentifierUri::decode_from(r)?,
            acceptable_ciphersuites: read_suites(r)?,
            required_capabilities: RequiredCapabilities::decode_from(r)?,
            requester_signature_key: read_vlbytes(r, "requesterSignatureKey")?,
            requester_credential: Credential::decode_from(r)?,
            signature: read_vlbytes(r, "key_material_request_signature")?,
        })
    }
}

impl Encode for KeyMaterialRequest {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.encode_tbs(out)?;
        put_vlbytes(out, &self.signature)
    }
}
wire_type!(KeyMaterialRequest);

code_enum!(
    /// `KeyMaterialUserCode` (§5.2).
    KeyMaterialUserCode, "key material user code" {
        /// `success(0)`
        Success = 0,
        /// `partialSuccess(1)`
        PartialSuccess = 1,
        /// `incompatibleProtocol(2)`
        IncompatibleProtocol = 2,
        /// `noCompatibleMaterial(3)`
        NoCompatibleMaterial = 3,
        /// `userUnknown(4)`
        UserUnknown = 4,
        /// `noConsent(5)`
        NoConsent = 5,
        /// `noConsentForThisRoom(6)`
        NoConsentForThisRoom = 6,
        /// `userDeleted(7)`
        UserDeleted = 7,
    }
);

code_enum!(
    /// `KeyMaterialClientCode` (§5.2).
    KeyMaterialClientCode, "key material client code" {
        /// `success(0)`
        Success = 0,
        /// `keyMaterialExhausted(1)`
        KeyMaterialExhausted = 1,
        /// `nothingCompatible(2)`
        NothingCompatible = 2,
    }
);

/// A client's status and, for mls10, its material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientKeyMaterialStatus {
    /// `success`: the claimed KeyPackage.
    Success {
        /// `keyPackage`
        key_package: KeyPackage,
    },
    /// `keyMaterialExhausted`
    KeyMaterialExhausted,
    /// `nothingCompatible`: capabilities, unless withheld for privacy.
    NothingCompatible {
        /// `optional<Capabilities> clientCapabilities`
        client_capabilities: Option<Capabilities>,
    },
}

/// `ClientKeyMaterial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKeyMaterial {
    /// `clientUri`
    pub client_uri: IdentifierUri,
    /// `clientStatus` and its fields.
    pub status: ClientKeyMaterialStatus,
}

impl ClientKeyMaterial {
    /// The client code.
    pub fn code(&self) -> KeyMaterialClientCode {
        match self.status {
            ClientKeyMaterialStatus::Success { .. } => KeyMaterialClientCode::Success,
            ClientKeyMaterialStatus::KeyMaterialExhausted => {
                KeyMaterialClientCode::KeyMaterialExhausted
            }
            ClientKeyMaterialStatus::NothingCompatible { .. } => {
                KeyMaterialClientCode::NothingCompatible
            }
        }
    }
}

impl<'a> Decode<'a> for ClientKeyMaterial {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let code = KeyMaterialClientCode::decode_from(r)?;
        let client_uri = IdentifierUri::decode_from(r)?;
        let status = match code {
            KeyMaterialClientCode::Success => ClientKeyMaterialStatus::Success {
                key_package: KeyPackage::decode_from(r)?,
            },
            KeyMaterialClientCode::KeyMaterialExhausted => {
                ClientKeyMaterialStatus::KeyMaterialExhausted
            }
            KeyMaterialClientCode::NothingCompatible => {
                ClientKeyMaterialStatus::NothingCompatible {
                    client_capabilities: read_opt(r, "clientCapabilities presence")?,
                }
            }
        };
        Ok(ClientKeyMaterial { client_uri, status })
    }
}

impl Encode for ClientKeyMaterial {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.code().encode_to(out)?;
        self.client_uri.encode_to(out)?;
        match &self.status {
            ClientKeyMaterialStatus::Success { key_package } => key_package.encode_to(out),
            ClientKeyMaterialStatus::KeyMaterialExhausted => Ok(()),
            ClientKeyMaterialStatus::NothingCompatible {
                client_capabilities,
            } => put_opt(out, client_capabilities),
        }
    }
}
wire_type!(ClientKeyMaterial);

/// `KeyMaterialResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMaterialResponse {
    /// `protocol`
    pub protocol: Protocol,
    /// `userStatus`
    pub user_status: KeyMaterialUserCode,
    /// `userUri`
    pub user_uri: IdentifierUri,
    /// `ClientKeyMaterial clients<V>`
    pub clients: Vec<ClientKeyMaterial>,
}

impl<'a> Decode<'a> for KeyMaterialResponse {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(KeyMaterialResponse {
            protocol: Protocol::read(r)?,
            user_status: KeyMaterialUserCode::decode_from(r)?,
            user_uri: IdentifierUri::decode_from(r)?,
            clients: decode_list(r, "clients")?,
        })
    }
}

impl Encode for KeyMaterialResponse {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.protocol.encode_to(out)?;
        self.user_status.encode_to(out)?;
        self.user_uri.encode_to(out)?;
        encode_list(out, &self.clients)
    }
}
wire_type!(KeyMaterialResponse);

impl KeyPackage {
    /// The lifetime of the KeyPackage's leaf node (`None`: the leaf has none, which RFC 9420
    /// forbids for a KeyPackage, so such a KeyPackage is never valid).
    pub fn lifetime(&self) -> Option<crate::mls::Lifetime> {
        crate::mls::key_package_lifetime(self.as_bytes(), &crate::Limits::default())
            .ok()
            .flatten()
    }
}
