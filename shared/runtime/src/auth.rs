//! Authentication and per-subject authorization. Callers present a JWT as
//! `authorization: Bearer <token>`, signed with RS256 (public key PEM) or
//! HS256 (shared secret); issuer and expiry are checked with a small leeway.
//! The claims name the client, the subjects it may touch and what it may do.
//! A bad or missing token is UNAUTHENTICATED; a good token without the
//! permission or the subject is PERMISSION_DENIED.

use std::collections::HashSet;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;

use mts_config::Config;

/// What a call does, as tokens grant it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Publish and PublishStream.
    Publish,
    /// Subscribe, Consume and the read-only info calls.
    Subscribe,
    /// Fetch, Consume and FetchPayload.
    Fetch,
    /// AckMessage, Ack, Nack (and acks on a Consume stream).
    Ack,
    /// Consumer management and subject limits.
    Admin,
}

impl Permission {
    /// The claim value that grants it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
            Self::Fetch => "fetch",
            Self::Ack => "ack",
            Self::Admin => "admin",
        }
    }
}

/// The claims of a MiniToolStream token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Who the client is.
    pub client_id: String,
    /// Exact subjects, `prefix.*` (one more token), `prefix.>` (any depth) or `*`.
    #[serde(default)]
    pub allowed_subjects: Vec<String>,
    /// `publish`, `subscribe`, `fetch`, `ack`, `admin` or `*`.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Issuer.
    pub iss: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No valid token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token that does not allow this.
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Unauthenticated(why) => tonic::Status::unauthenticated(why),
            Error::PermissionDenied(why) => tonic::Status::permission_denied(why),
        }
    }
}

/// A settings problem found at start-up.
#[derive(Debug, thiserror::Error)]
#[error("auth configuration: {0}")]
pub struct ConfigError(String);

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Auth is off, or optional and no token was sent: everything is allowed.
    Anonymous,
    /// A verified token.
    Client(Claims),
}

impl Caller {
    /// Allows the call if the caller may do `permission` on `subject`.
    pub fn authorize(&self, permission: Permission, subject: &str) -> Result<(), Error> {
        self.permits(permission)?;
        match self {
            Self::Client(claims) if !self.may_use(subject) => Err(Error::PermissionDenied(
                format!("client {} may not use subject {subject}", claims.client_id),
            )),
            _ => Ok(()),
        }
    }

    /// Allows the call if the caller has `permission` (on some subjects):
    /// for calls over many subjects, which then show only those it may use.
    pub fn permits(&self, permission: Permission) -> Result<(), Error> {
        let Self::Client(claims) = self else {
            return Ok(());
        };
        let granted = claims
            .permissions
            .iter()
            .any(|p| p == "*" || p == permission.name());
        if !granted {
            return Err(Error::PermissionDenied(format!(
                "client {} lacks the {} permission",
                claims.client_id,
                permission.name()
            )));
        }
        Ok(())
    }

    /// Whether the caller's token allows `subject`.
    pub fn may_use(&self, subject: &str) -> bool {
        let Self::Client(claims) = self else {
            return true;
        };
        claims
            .allowed_subjects
            .iter()
            .any(|pattern| subject_matches(pattern, subject))
    }
}

/// Whether `subject` matches an allowed-subjects pattern.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix(".>") {
        return subject
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| !rest.is_empty());
    }
    if let Some(prefix) = pattern.strip_suffix(".*") {
        return subject
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('.'));
    }
    pattern == subject
}

enum Mode {
    Off,
    Optional,
    Required,
}

/// Checks tokens against the configured key and issuer.
pub struct Authenticator {
    mode: Mode,
    key: Option<DecodingKey>,
    validation: Validation,
}

impl Authenticator {
    /// From `auth_enabled`, `require_auth` and the `jwt_*` keys.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mode = match (config.auth.enabled, config.auth.require_auth) {
            (false, _) => Mode::Off,
            (true, false) => Mode::Optional,
            (true, true) => Mode::Required,
        };
        let read = |value: &str, file: &str, key: &str| -> Result<Option<Vec<u8>>, ConfigError> {
            match (value.is_empty(), file.is_empty()) {
                (true, true) => Ok(None),
                (false, true) => Ok(Some(value.as_bytes().to_vec())),
                (true, false) => std::fs::read(file)
                    .map(Some)
                    .map_err(|e| ConfigError(format!("{key}_file {file}: {e}"))),
                (false, false) => Err(ConfigError(format!("set {key} or {key}_file, not both"))),
            }
        };
        let secret = read(
            &config.auth.jwt_secret,
            &config.auth.jwt_secret_file,
            "jwt_secret",
        )?;
        let public = read(
            &config.auth.jwt_public_key,
            &config.auth.jwt_public_key_file,
            "jwt_public_key",
        )?;
        let (key, algorithm) = match (secret, public) {
            (Some(secret), None) => (Some(DecodingKey::from_secret(&secret)), Algorithm::HS256),
            (None, Some(pem)) => (
                Some(DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    ConfigError(format!("jwt_public_key: not an RSA public key PEM: {e}"))
                })?),
                Algorithm::RS256,
            ),
            (None, None) => (None, Algorithm::HS256),
            (Some(_), Some(_)) => {
                return Err(ConfigError(
                    "set jwt_secret (HS256) or jwt_public_key (RS256), not both".into(),
                ));
            }
        };
        if !matches!(mode, Mode::Off) {
            if key.is_none() {
                return Err(ConfigError(
                    "auth_enabled needs jwt_secret(_file) for HS256 or jwt_public_key(_file) for RS256".into(),
                ));
            }
            if config.auth.jwt_issuer.is_empty() {
                return Err(ConfigError("auth_enabled needs jwt_issuer".into()));
            }
        }
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[config.auth.jwt_issuer.as_str()]);
        validation.leeway = config.auth.jwt_leeway_seconds;
        validation.set_required_spec_claims(&["exp", "iss"]);
        Ok(Self {
            mode,
            key,
            validation,
        })
    }

    /// Who is calling, from the `authorization` metadata.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Error> {
        if matches!(self.mode, Mode::Off) {
            return Ok(Caller::Anonymous);
        }
        let Some(value) = metadata.get("authorization") else {
            return match self.mode {
                Mode::Optional => Ok(Caller::Anonymous),
                _ => Err(Error::Unauthenticated(
                    "no token: send authorization: Bearer <JWT>".into(),
                )),
            };
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Error::Unauthenticated("the authorization metadata must be Bearer <JWT>".into())
            })?;
        let key = self
            .key
            .as_ref()
            .ok_or_else(|| Error::Unauthenticated("no key configured".into()))?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| Error::Unauthenticated(format!("token refused: {e}")))?
            .claims;
        let unique: HashSet<&str> = claims.permissions.iter().map(String::as_str).collect();
        tracing::debug!(client = %claims.client_id, permissions = ?unique, "authenticated");
        Ok(Caller::Client(claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_patterns() {
        let cases = [
            ("*", "anything.at.all", true),
            ("orders", "orders", true),
            ("orders", "orders.eu", false),
            ("orders.*", "orders.eu", true),
            ("orders.*", "orders.eu.paris", false),
            ("orders.*", "orders", false),
            ("orders.*", "ordersx.eu", false),
            ("orders.>", "orders.eu", true),
            ("orders.>", "orders.eu.paris", true),
            ("orders.>", "orders", false),
            ("orders.>", "orders.", false),
        ];
        for (pattern, subject, expected) in cases {
            assert_eq!(
                subject_matches(pattern, subject),
                expected,
                "{pattern} vs {subject}"
            );
        }
    }

    fn claims(permissions: &[&str], subjects: &[&str]) -> Caller {
        Caller::Client(Claims {
            client_id: "c".into(),
            allowed_subjects: subjects.iter().map(|s| s.to_string()).collect(),
            permissions: permissions.iter().map(|s| s.to_string()).collect(),
            iss: "i".into(),
            exp: 0,
        })
    }

    #[test]
    fn permissions_and_subjects_both_apply() {
        let caller = claims(&["publish"], &["orders.>"]);
        assert_eq!(caller.authorize(Permission::Publish, "orders.eu"), Ok(()));
        assert!(matches!(
            caller.authorize(Permission::Fetch, "orders.eu"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            caller.authorize(Permission::Publish, "billing"),
            Err(Error::PermissionDenied(_))
        ));
        assert_eq!(
            claims(&["*"], &["*"]).authorize(Permission::Admin, "x"),
            Ok(())
        );
        assert_eq!(Caller::Anonymous.authorize(Permission::Admin, "x"), Ok(()));
    }
}
