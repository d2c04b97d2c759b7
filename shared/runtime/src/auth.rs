//! Authentication and per-subject authorization. Callers present a JWT as
//! `authorization: Bearer <token>`, signed with RS256 (public key PEM), HS256
//! (shared secret) or any key of a JSON Web Key Set by its `kid`; issuer and
//! expiry are checked with a small leeway. Keys are read again periodically,
//! so a rotated key applies without a restart.
//! The claims name the client, the subjects it may touch and what it may do.
//! A bad or missing token is UNAUTHENTICATED; a good token without the
//! permission or the subject is PERMISSION_DENIED.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

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

/// Most keys taken from a key set: a set is a handful of keys, current and
/// next; more is a misconfigured or hostile URL.
const MAX_JWKS_KEYS: usize = 32;
/// Every algorithm a key may verify: HS256 (`jwt_secret`), RS256
/// (`jwt_public_key`) and what a key set's public keys name.
const VERIFIED_ALGORITHMS: [Algorithm; 10] = [
    Algorithm::HS256,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
/// Failed refreshes in a row after which a downloaded key set is dropped.
const JWKS_MAX_AGE_REFRESHES: u32 = 3;
/// The shortest time between two looks asked for by unknown key ids.
const MIN_UNKNOWN_KID_REFRESH: Duration = Duration::from_secs(10);
/// The longest a key set download may take, and its largest size.
const JWKS_TIMEOUT: Duration = Duration::from_secs(10);
const JWKS_MAX_BYTES: usize = 1024 * 1024;

/// A verification key and the one algorithm it verifies.
#[derive(Clone)]
struct Key {
    key: DecodingKey,
    algorithm: Algorithm,
}

/// The keys tokens are checked against now.
#[derive(Clone, Default)]
struct Keys {
    /// From `jwt_secret` or `jwt_public_key` (a value or a file).
    configured: Option<Key>,
    /// From `jwt_jwks_url`, by key id.
    jwks: HashMap<String, Key>,
    /// When the key set was last downloaded.
    jwks_fetched: Option<tokio::time::Instant>,
}

/// Where the configured key comes from.
#[derive(Clone)]
enum Source {
    Value(Vec<u8>),
    File(String),
}

impl Source {
    fn from(value: &str, file: &str, name: &str) -> Result<Option<Self>, ConfigError> {
        match (value.is_empty(), file.is_empty()) {
            (true, true) => Ok(None),
            (false, true) => Ok(Some(Self::Value(value.as_bytes().to_vec()))),
            (true, false) => Ok(Some(Self::File(file.to_owned()))),
            (false, false) => Err(ConfigError(format!("set {name} or {name}_file, not both"))),
        }
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, ConfigError> {
        match self {
            Self::Value(value) => Ok(value.clone()),
            Self::File(file) => {
                std::fs::read(file).map_err(|e| ConfigError(format!("{name}_file {file}: {e}")))
            }
        }
    }
}

/// Where every key comes from, to read them again.
struct Sources {
    secret: Option<Source>,
    public: Option<Source>,
    jwks_url: Option<hyper::Uri>,
    /// Downloads the key set; made once, with the system's CA roots.
    jwks_client: Option<JwksClient>,
}

type JwksClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// The HTTP client that downloads key sets.
fn jwks_client() -> Result<JwksClient, ConfigError> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| ConfigError(format!("jwt_jwks_url: no CA roots: {e}")))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

impl Sources {
    /// The configured key, read now.
    fn configured(&self) -> Result<Option<Key>, ConfigError> {
        if let Some(secret) = &self.secret {
            let secret = secret.read("jwt_secret")?;
            if secret.iter().all(u8::is_ascii_whitespace) {
                // An empty HMAC key would verify tokens anyone can sign (a
                // file caught between truncation and rewrite reads so).
                return Err(ConfigError("jwt_secret is empty".into()));
            }
            return Ok(Some(Key {
                key: DecodingKey::from_secret(&secret),
                algorithm: Algorithm::HS256,
            }));
        }
        if let Some(public) = &self.public {
            let pem = public.read("jwt_public_key")?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                ConfigError(format!("jwt_public_key: not an RSA public key PEM: {e}"))
            })?;
            return Ok(Some(Key {
                key,
                algorithm: Algorithm::RS256,
            }));
        }
        Ok(None)
    }
}

/// Checks tokens against the configured keys and issuer; the keys are read
/// again as `jwt_keys_refresh_seconds` says ([`Authenticator::keep_fresh`]).
pub struct Authenticator {
    mode: Mode,
    sources: Sources,
    keys: RwLock<Arc<Keys>>,
    /// The checks of every token (issuer, audience, expiry with leeway),
    /// one per algorithm a key may verify: made once, not on every call.
    validations: Vec<(Algorithm, Validation)>,
    refresh_every: Duration,
    /// A token named a key id no key has: look again soon.
    unknown_kid: tokio::sync::Notify,
}

impl Authenticator {
    /// From `auth_enabled`, `require_auth` and the `jwt_*` keys. A key file
    /// is read here; the key set is downloaded by [`Authenticator::refresh`].
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let mode = match (config.auth.enabled, config.auth.require_auth) {
            (false, _) => Mode::Off,
            (true, false) => Mode::Optional,
            (true, true) => Mode::Required,
        };
        let jwks_url = match config.auth.jwt_jwks_url.as_str() {
            "" => None,
            url => Some(jwks_url(url)?),
        };
        let sources = Sources {
            secret: Source::from(
                &config.auth.jwt_secret,
                &config.auth.jwt_secret_file,
                "jwt_secret",
            )?,
            public: Source::from(
                &config.auth.jwt_public_key,
                &config.auth.jwt_public_key_file,
                "jwt_public_key",
            )?,
            jwks_client: jwks_url.as_ref().map(|_| jwks_client()).transpose()?,
            jwks_url,
        };
        if sources.secret.is_some() && sources.public.is_some() {
            return Err(ConfigError(
                "set jwt_secret (HS256) or jwt_public_key (RS256), not both".into(),
            ));
        }
        let configured = sources.configured()?;
        if !matches!(mode, Mode::Off) {
            if configured.is_none() && sources.jwks_url.is_none() {
                return Err(ConfigError(
                    "auth_enabled needs jwt_secret(_file) for HS256, jwt_public_key(_file) for RS256, or jwt_jwks_url".into(),
                ));
            }
            if config.auth.jwt_issuer.is_empty() {
                return Err(ConfigError("auth_enabled needs jwt_issuer".into()));
            }
        }
        let audience: Vec<String> = config
            .auth
            .jwt_audience
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect();
        let validations = VERIFIED_ALGORITHMS
            .iter()
            .map(|&algorithm| {
                let mut validation = Validation::new(algorithm);
                validation.set_issuer(&[config.auth.jwt_issuer.as_str()]);
                // Without an audience configured, a token carrying one is refused.
                if !audience.is_empty() {
                    validation.set_audience(&audience);
                }
                validation.leeway = config.auth.jwt_leeway_seconds;
                validation.set_required_spec_claims(&["exp", "iss"]);
                (algorithm, validation)
            })
            .collect();
        Ok(Self {
            mode,
            sources,
            validations,
            keys: RwLock::new(Arc::new(Keys {
                configured,
                jwks: HashMap::new(),
                jwks_fetched: None,
            })),
            refresh_every: Duration::from_secs(config.auth.jwt_keys_refresh_seconds.max(1)),
            unknown_kid: tokio::sync::Notify::new(),
        })
    }

    /// Whether checking tokens is on.
    pub fn enabled(&self) -> bool {
        !matches!(self.mode, Mode::Off)
    }

    fn keys(&self) -> Arc<Keys> {
        match self.keys.read() {
            Ok(keys) => Arc::clone(&keys),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Reads the key file and downloads the key set again. What cannot be
    /// read keeps its previous keys (a failed download does not lock
    /// everyone out); the error says what failed.
    pub async fn refresh(&self) -> Result<(), ConfigError> {
        let mut keys = Keys::clone(&self.keys());
        let mut failed = Vec::new();
        match self.sources.configured() {
            Ok(configured) => keys.configured = configured,
            Err(err) => failed.push(err.0),
        }
        if let (Some(url), Some(client)) = (&self.sources.jwks_url, &self.sources.jwks_client) {
            match download_jwks(client, url).await {
                Ok(jwks) => {
                    keys.jwks = jwks;
                    keys.jwks_fetched = Some(tokio::time::Instant::now());
                }
                Err(err) => {
                    failed.push(format!("jwt_jwks_url {url}: {err}"));
                    // Keys the provider may have withdrawn are not trusted
                    // for ever because it cannot be reached.
                    let stale = keys.jwks_fetched.is_some_and(|at| {
                        at.elapsed() > self.refresh_every * JWKS_MAX_AGE_REFRESHES
                    });
                    if stale && !keys.jwks.is_empty() {
                        tracing::error!(
                            refreshes = JWKS_MAX_AGE_REFRESHES,
                            "the key set could not be downloaded for this many refreshes: its keys are dropped"
                        );
                        keys.jwks.clear();
                    }
                }
            }
        }
        if let Ok(mut current) = self.keys.write() {
            *current = Arc::new(keys);
        }
        match failed.is_empty() {
            true => Ok(()),
            false => Err(ConfigError(failed.join("; "))),
        }
    }

    /// Refreshes the keys every `jwt_keys_refresh_seconds`, and soon after a
    /// token names an unknown key id (at most every 10 s), for as long as
    /// the process runs.
    pub async fn keep_fresh(self: Arc<Self>) {
        if !self.enabled() {
            return;
        }
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(last + self.refresh_every) => {}
                () = self.unknown_kid.notified() => {
                    tokio::time::sleep_until(last + MIN_UNKNOWN_KID_REFRESH).await;
                }
            }
            last = tokio::time::Instant::now();
            match self.refresh().await {
                Ok(()) => tracing::debug!("verification keys refreshed"),
                Err(err) => {
                    tracing::warn!(%err, "verification keys not refreshed; keeping the previous ones")
                }
            }
        }
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
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Error::Unauthenticated(format!("token refused: {e}")))?;
        let keys = self.keys();
        let jwks_on = self.sources.jwks_url.is_some();
        let key = match header.kid.as_deref() {
            Some(kid) => match (keys.jwks.get(kid), &keys.configured) {
                // Many issuers name a kid for their only key: the configured
                // key answers; a failure to verify asks for a look below.
                (Some(key), _) | (None, Some(key)) => key,
                (None, None) => {
                    self.unknown_kid.notify_one();
                    return Err(Error::Unauthenticated(format!(
                        "token refused: no verification key has id {kid:?} (keys are looked up again within seconds; a retry may pass)"
                    )));
                }
            },
            None => match (&keys.configured, keys.jwks.values().next(), keys.jwks.len()) {
                (Some(key), _, _) | (None, Some(key), 1) => key,
                _ => {
                    if jwks_on && keys.jwks.is_empty() {
                        self.unknown_kid.notify_one();
                    }
                    return Err(Error::Unauthenticated(
                        "token refused: it names no key id (kid), and the key set has none or several keys"
                            .into(),
                    ));
                }
            },
        };
        if header.alg != key.algorithm {
            return Err(Error::Unauthenticated(format!(
                "token refused: signed with {:?}, the key verifies {:?}",
                header.alg, key.algorithm
            )));
        }
        let validation = self
            .validations
            .iter()
            .find_map(|(algorithm, validation)| (*algorithm == key.algorithm).then_some(validation))
            .ok_or_else(|| {
                Error::Unauthenticated(format!(
                    "token refused: {:?} is not verified",
                    key.algorithm
                ))
            })?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, validation)
            .map_err(|e| {
                let unknown_kid = header
                    .kid
                    .as_deref()
                    .is_some_and(|kid| !keys.jwks.contains_key(kid));
                if jwks_on && unknown_kid {
                    // Signed by a key the set may have gained since the last look.
                    self.unknown_kid.notify_one();
                }
                Error::Unauthenticated(format!("token refused: {e}"))
            })?
            .claims;
        let unique: HashSet<&str> = claims.permissions.iter().map(String::as_str).collect();
        tracing::debug!(client = %claims.client_id, permissions = ?unique, "authenticated");
        Ok(Caller::Client(claims))
    }
}

/// `url` as the key set's address: https, or http to this machine only (a
/// key set read in the clear from elsewhere could be anyone's).
fn jwks_url(url: &str) -> Result<hyper::Uri, ConfigError> {
    let uri = url
        .parse::<hyper::Uri>()
        .map_err(|e| ConfigError(format!("jwt_jwks_url {url:?}: {e}")))?;
    let loopback = matches!(
        uri.host(),
        Some("localhost" | "127.0.0.1" | "[::1]" | "::1")
    );
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if loopback => Ok(uri),
        _ => Err(ConfigError(format!(
            "jwt_jwks_url {url:?} must be an https:// URL (http:// only to this machine)"
        ))),
    }
}

/// Downloads a JSON Web Key Set: its keys with an id, at most
/// `MAX_JWKS_KEYS`, each with the algorithm it names or its type implies.
async fn download_jwks(
    client: &JwksClient,
    url: &hyper::Uri,
) -> Result<HashMap<String, Key>, String> {
    use http_body_util::BodyExt;
    let fetched = async {
        let response = client.get(url.clone()).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), JWKS_MAX_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the key set: {e}"))?;
        Ok(body.to_bytes())
    };
    let body = tokio::time::timeout(JWKS_TIMEOUT, fetched)
        .await
        .map_err(|_| format!("no answer within {JWKS_TIMEOUT:?}"))??;
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_slice(&body).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in set.keys.iter().take(MAX_JWKS_KEYS) {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        // Only public signature keys: a shared secret published in a key
        // set is no secret, and an encryption key verifies nothing.
        let public = matches!(
            jwk.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_)
                | jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_)
                | jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_)
        );
        let encryption = matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        );
        if !public || encryption {
            continue;
        }
        let algorithm = match jwk.common.key_algorithm {
            Some(named) => match named.to_string().parse::<Algorithm>() {
                Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) | Err(_) => continue,
                Ok(algorithm) => algorithm,
            },
            None => match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    jsonwebtoken::jwk::EllipticCurve::P384 => Algorithm::ES384,
                    _ => Algorithm::ES256,
                },
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                // A shared secret does not belong in a published key set,
                // and kinds this version does not know are not guessed at.
                _ => continue,
            },
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => {
                keys.insert(kid, Key { key, algorithm });
            }
            Err(err) => tracing::warn!(%err, %kid, "a key of the key set is unusable"),
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sets_come_over_https_or_from_this_machine() {
        assert!(jwks_url("https://idp.example/.well-known/jwks.json").is_ok());
        assert!(jwks_url("http://127.0.0.1:8080/jwks.json").is_ok());
        assert!(jwks_url("http://localhost/jwks.json").is_ok());
        assert!(jwks_url("http://idp.example/jwks.json").is_err());
        assert!(jwks_url("idp.example/jwks.json").is_err());
    }

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
