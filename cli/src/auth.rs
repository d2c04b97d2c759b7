//! Bearer tokens: minting one for local use (`mts token`), and sending one
//! (`--token` / `MTS_TOKEN`) with every call.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mts_proto::pb::egress_service_client::EgressServiceClient;
use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::failure::Failure;

/// Adds `authorization: Bearer <token>` to every call, when a token is set.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, Failure> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Failure::Token("the token is not valid header text".into()))
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An egress client that sends the token.
pub type Egress = EgressServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Serialize)]
struct Claims<'a> {
    client_id: &'a str,
    allowed_subjects: &'a [String],
    permissions: &'a [String],
    iss: &'a str,
    iat: u64,
    exp: u64,
}

/// What a minted token says and how it is signed.
pub struct TokenRequest<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub subjects: &'a [String],
    pub permissions: &'a [String],
    pub ttl_seconds: u64,
    /// HS256 secret, or RS256 private key PEM.
    pub key: Signing,
}

pub enum Signing {
    Secret(Vec<u8>),
    RsaPrivateKey(Vec<u8>),
}

/// Signs a token.
pub fn mint(request: TokenRequest<'_>) -> Result<String, Failure> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = Claims {
        client_id: request.client_id,
        allowed_subjects: request.subjects,
        permissions: request.permissions,
        iss: request.issuer,
        iat: now,
        exp: now + request.ttl_seconds,
    };
    let (header, key) = match request.key {
        Signing::Secret(secret) => (
            Header::new(Algorithm::HS256),
            EncodingKey::from_secret(&secret),
        ),
        Signing::RsaPrivateKey(pem) => (
            Header::new(Algorithm::RS256),
            EncodingKey::from_rsa_pem(&pem)
                .map_err(|e| Failure::Token(format!("not an RSA private key PEM: {e}")))?,
        ),
    };
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| Failure::Token(e.to_string()))
}
