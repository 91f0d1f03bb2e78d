//! §5.8 Find internal address.

use super::{IdentifierUri, VLBytes, code_enum, put_vlbytes, read_vlbytes};
use crate::codec::{Decode, Encode, Reader, Writer, decode_list, encode_list, wire_type};
use crate::error::WireError;

code_enum!(
    /// `SearchIdentifierType` (§5.8).
    SearchIdentifierType, "search identifier type" {
        /// `handle(1)`
        Handle = 1,
        /// `nick(2)`
        Nick = 2,
        /// `email(3)`
        Email = 3,
        /// `phone(4)`
        Phone = 4,
        /// `partialName(5)`
        PartialName = 5,
        /// `wholeProfile(6)`
        WholeProfile = 6,
        /// `oidcStdClaim(7)`
        OidcStdClaim = 7,
        /// `vcardField(8)`
        VcardField = 8,
    }
);

impl SearchIdentifierType {
    /// True for the types followed by a claim or property name.
    pub fn has_field_name(self) -> bool {
        matches!(
            self,
            SearchIdentifierType::OidcStdClaim | SearchIdentifierType::VcardField
        )
    }
}

/// `QueryElement`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryElement {
    /// `searchType`
    pub search_type: SearchIdentifierType,
    /// `claimName` / `propertyName`: present exactly for oidcStdClaim and vcardField.
    pub field_name: Option<VLBytes>,
    /// `searchValue` (UTF-8 by the draft, not checked)
    pub search_value: VLBytes,
}

impl<'a> Decode<'a> for QueryElement {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        let search_type = SearchIdentifierType::decode_from(r)?;
        let field_name = if search_type.has_field_name() {
            Some(read_vlbytes(r, "field name")?)
        } else {
            None
        };
        Ok(QueryElement {
            search_type,
            field_name,
            search_value: read_vlbytes(r, "searchValue")?,
        })
    }
}

impl Encode for QueryElement {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.search_type.encode_to(out)?;
        match (&self.field_name, self.search_type.has_field_name()) {
            (Some(name), true) => put_vlbytes(out, name)?,
            (None, false) => {}
            _ => {
                return Err(WireError::BadValue {
                    what: "query element field name",
                });
            }
        }
        put_vlbytes(out, &self.search_value)
    }
}
wire_type!(QueryElement);

/// `IdentifierRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifierRequest {
    /// `query_elements<V>` (all must match)
    pub query_elements: Vec<QueryElement>,
    /// `id_request_extensions` (AppDataDictionary contents)
    pub id_request_extensions: VLBytes,
}

impl<'a> Decode<'a> for IdentifierRequest {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(IdentifierRequest {
            query_elements: decode_list(r, "query_elements")?,
            id_request_extensions: read_vlbytes(r, "id_request_extensions")?,
        })
    }
}

impl Encode for IdentifierRequest {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        encode_list(out, &self.query_elements)?;
        put_vlbytes(out, &self.id_request_extensions)
    }
}
wire_type!(IdentifierRequest);

code_enum!(
    /// `IdentifierQueryCode` (§5.8).
    IdentifierQueryCode, "identifier query code" {
        /// `success(0)`
        Success = 0,
        /// `notFound(1)`
        NotFound = 1,
        /// `ambiguous(2)`
        Ambiguous = 2,
        /// `forbidden(3)`
        Forbidden = 3,
        /// `unsupportedField(4)`
        UnsupportedField = 4,
    }
);

code_enum!(
    /// `FieldSource` (§5.8).
    FieldSource, "field source" {
        /// `oidcStdClaim(7)`
        OidcStdClaim = 7,
        /// `vcardField(8)`
        VcardField = 8,
    }
);

/// `ProfileField`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileField {
    /// `fieldSource`
    pub field_source: FieldSource,
    /// `string fieldName`
    pub field_name: String,
    /// `fieldValue<V>`
    pub field_value: VLBytes,
}

impl<'a> Decode<'a> for ProfileField {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(ProfileField {
            field_source: FieldSource::decode_from(r)?,
            field_name: r.utf8("fieldName")?.to_owned(),
            field_value: read_vlbytes(r, "fieldValue")?,
        })
    }
}

impl Encode for ProfileField {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.field_source.encode_to(out)?;
        out.put_vec(self.field_name.as_bytes())?;
        put_vlbytes(out, &self.field_value)
    }
}
wire_type!(ProfileField);

/// `UserProfile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserProfile {
    /// `stableUri`
    pub stable_uri: IdentifierUri,
    /// `fields<V>`
    pub fields: Vec<ProfileField>,
}

impl<'a> Decode<'a> for UserProfile {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(UserProfile {
            stable_uri: IdentifierUri::decode_from(r)?,
            fields: decode_list(r, "fields")?,
        })
    }
}

impl Encode for UserProfile {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.stable_uri.encode_to(out)?;
        encode_list(out, &self.fields)
    }
}
wire_type!(UserProfile);

/// `IdentifierResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifierResponse {
    /// `responseCode`
    pub response_code: IdentifierQueryCode,
    /// `IdentifierUri uri<V>`
    pub uris: Vec<IdentifierUri>,
    /// `foundProfiles<V>`
    pub found_profiles: Vec<UserProfile>,
    /// `id_response_extensions` (AppDataDictionary contents)
    pub id_response_extensions: VLBytes,
}

impl<'a> Decode<'a> for IdentifierResponse {
    fn decode_from(r: &mut Reader<'a>) -> Result<Self, WireError> {
        Ok(IdentifierResponse {
            response_code: IdentifierQueryCode::decode_from(r)?,
            uris: decode_list(r, "uri")?,
            found_profiles: decode_list(r, "foundProfiles")?,
            id_response_extensions: read_vlbytes(r, "id_response_extensions")?,
        })
    }
}

impl Encode for IdentifierResponse {
    fn encode_to(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.response_code.encode_to(out)?;
        encode_list(out, &self.uris)?;
        encode_list(out, &self.found_profiles)?;
        put_vlbytes(out, &self.id_response_extensions)
    }
}
wire_type!(IdentifierResponse);
