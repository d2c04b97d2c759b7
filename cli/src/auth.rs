//! Minting a bearer token for local use and tests (`mts token`).

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::failure::Failure;

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
