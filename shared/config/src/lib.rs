//! Service configuration: defaults in code, then an optional file
//! (`--config PATH`, TOML), then environment variables. The struct is the
//! only list of keys: the defaults are a value of it, and every field's key
//! and environment name are read from it (the key in upper case,
//! `tarantool_address` ← `TARANTOOL_ADDRESS`), which gives exactly the names
//! of the deployment guide.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use config::Source;
use serde::{Deserialize, Serialize};

/// Tarantool keeps whole tuples in memory and caps a tuple at 1 MiB by
/// default; inline payloads must stay well below that.
const MAX_INLINE_THRESHOLD: u64 = 768 * 1024;

/// The largest object one S3 PutObject may create.
const MAX_SINGLE_PUT: u64 = 5 << 30;

/// Longest retention age accepted, in milliseconds: 100 years. Longer ages
/// are refused rather than stored (0 keeps messages forever).
pub const MAX_RETENTION_AGE_MS: u64 = 36_525 * 24 * 3600 * 1000;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Console,
}

/// The configuration of one service process, in typed sections. The file
/// and the environment know only the flat keys of the deployment guide
/// (`tarantool_address`, `MINIO_ENDPOINT`, ...), which each field names.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The gRPC server and its admin port.
    #[serde(flatten)]
    pub server: Server,
    /// Start-up, health probing and shutdown.
    #[serde(flatten)]
    pub lifecycle: Lifecycle,
    /// The Tarantool metadata store.
    #[serde(flatten)]
    pub tarantool: Tarantool,
    /// The S3-compatible object store for large payloads (the `minio_*` keys of the deployment guide).
    #[serde(flatten)]
    pub object_store: ObjectStore,
    /// Logging.
    #[serde(flatten)]
    pub telemetry: Telemetry,
    /// Caller authentication with JWTs.
    #[serde(flatten)]
    pub auth: Auth,
    /// TLS on the gRPC port.
    #[serde(flatten)]
    pub tls: Tls,
    /// Publishing (the ingress).
    #[serde(flatten)]
    pub ingress: Ingress,
    /// Delivery and housekeeping (the egress).
    #[serde(flatten)]
    pub egress: Egress,
    /// The hot tier in Tarantool and the cold tier of segments in the object store.
    #[serde(flatten)]
    pub tiering: Tiering,
}

/// The gRPC server and its admin port.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Server {
    /// Address the gRPC server binds.
    #[serde(rename = "server_host")]
    pub host: String,
    /// gRPC port: 50051 for ingress, 50052 for egress.
    #[serde(rename = "server_port")]
    pub port: u16,
    /// Port of the admin HTTP server (`/metrics`); 0 picks a free one.
    pub metrics_port: u16,
    /// Connections older than this (±10 %, drawn per process) are asked to
    /// go away, so clients rebalance after a scale-out; 0 = never.
    pub max_connection_age_seconds: u64,
    /// How long an aged connection's calls may finish before it is closed.
    pub max_connection_age_grace_seconds: u64,
}

/// Start-up, health probing and shutdown.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Lifecycle {
    /// How long a draining process waits for in-flight calls.
    pub shutdown_grace_seconds: u64,
    /// How often dependencies are probed for the health status.
    pub health_check_interval_ms: u64,
    /// How long start-up waits for Tarantool and S3 before giving up.
    pub startup_timeout_seconds: u64,
}

/// The Tarantool metadata store.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Tarantool {
    /// `host:port` of Tarantool.
    #[serde(rename = "tarantool_address")]
    pub address: String,
    /// Tarantool user; `guest` connects without credentials.
    #[serde(rename = "tarantool_user")]
    pub user: String,
    /// Tarantool password.
    #[serde(rename = "tarantool_password")]
    pub password: String,
    /// Deadline of one Tarantool call, in milliseconds.
    #[serde(rename = "tarantool_timeout_ms")]
    pub timeout_ms: u64,
}

/// The S3-compatible object store for large payloads (the `minio_*` keys of the deployment guide).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ObjectStore {
    /// `host:port` (or URL) of the S3-compatible store.
    #[serde(rename = "minio_endpoint")]
    pub endpoint: String,
    /// S3 access key. Empty (the default), with the secret key empty too:
    /// the standard AWS credential chain (environment, web identity / IRSA,
    /// container and instance credentials).
    #[serde(rename = "minio_access_key_id")]
    pub access_key_id: String,
    /// S3 secret key.
    #[serde(rename = "minio_secret_access_key")]
    pub secret_access_key: String,
    /// Bucket for offloaded payloads; created if missing.
    #[serde(rename = "minio_bucket_name")]
    pub bucket_name: String,
    /// Use https when the endpoint has no scheme.
    #[serde(rename = "minio_use_ssl")]
    pub use_ssl: bool,
    /// Region the S3 server expects in signatures.
    #[serde(rename = "minio_region")]
    pub region: String,
    /// Deadline of one S3 call, in milliseconds.
    #[serde(rename = "minio_timeout_ms")]
    pub timeout_ms: u64,
    /// Every object this service writes has a key under this prefix (then
    /// the store's id, then the subject), so a bucket can be shared: the
    /// orphan sweep looks only there.
    #[serde(rename = "minio_key_prefix")]
    pub key_prefix: String,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Telemetry {
    /// Default log level when `RUST_LOG` is not set.
    pub log_level: String,
    /// `json` or `console`.
    pub log_format: LogFormat,
}

/// Caller authentication with JWTs.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Auth {
    /// Check JWTs on every call.
    #[serde(rename = "auth_enabled")]
    pub enabled: bool,
    /// With auth enabled: refuse calls without a token (false lets anonymous
    /// calls through, but a token that is sent must be valid).
    pub require_auth: bool,
    /// The `iss` tokens must carry.
    pub jwt_issuer: String,
    /// HS256 shared secret.
    pub jwt_secret: String,
    /// File holding the HS256 secret (a mounted Secret).
    pub jwt_secret_file: String,
    /// RS256 public key, PEM.
    pub jwt_public_key: String,
    /// File holding the RS256 public key PEM.
    pub jwt_public_key_file: String,
    /// Clock skew allowed on expiry, in seconds.
    pub jwt_leeway_seconds: u64,
    /// A JSON Web Key Set to verify tokens by their `kid` (an identity
    /// provider's `jwks_uri`, https); alongside or instead of the keys above.
    pub jwt_jwks_url: String,
    /// The `aud` values accepted, comma-separated (identity providers put
    /// the audience in their tokens); empty: tokens that carry `aud` are
    /// refused.
    pub jwt_audience: String,
    /// How often the key files and the key set are read again, so that a
    /// rotated key applies without a restart (a token naming an unknown
    /// `kid` also asks for a look, at most every 10 s).
    pub jwt_keys_refresh_seconds: u64,
}

/// TLS on the gRPC port.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Tls {
    /// PEM certificate chain for TLS on the gRPC port; empty = plaintext.
    #[serde(rename = "tls_cert_file")]
    pub cert_file: String,
    /// PEM private key for `tls_cert_file`.
    #[serde(rename = "tls_key_file")]
    pub key_file: String,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    #[serde(rename = "tls_client_ca_file")]
    pub client_ca_file: String,
    /// How often the three files are read again; a change (cert-manager
    /// renewing in place) applies to new connections without a restart.
    #[serde(rename = "tls_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

/// Publishing (the ingress).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Ingress {
    /// Payloads up to this size are stored inline in Tarantool.
    pub inline_threshold_bytes: u64,
    /// Largest payload a unary publish accepts.
    pub max_payload_bytes: u64,
    /// How long a publish's message id is remembered for deduplication.
    pub dedup_window_ms: u64,
    /// Part size of streamed uploads (S3 needs at least 5 MiB).
    pub multipart_part_bytes: u64,
    /// A streamed upload whose header announces at most this many bytes goes
    /// to the store in one PutObject as it arrives (no part buffers, but a
    /// failure is not retried part by part); 0 = always multipart.
    pub single_put_max_bytes: u64,
    /// Streamed uploads one ingress process runs at once; more are refused
    /// with RESOURCE_EXHAUSTED.
    pub max_concurrent_uploads: u64,
    /// Of those, how many one client (token `client_id`, else its address)
    /// may hold, so that one client's idle streams cannot block everyone's.
    pub max_uploads_per_client: u64,
    /// A PublishStream client that sends nothing for this long is cut off
    /// (DEADLINE_EXCEEDED) and nothing is stored.
    pub stream_idle_timeout_ms: u64,
    /// Publishes per second each client (token `client_id`; anonymous
    /// callers share one budget) may sustain; 0 = unlimited.
    pub publish_rate_per_second: u64,
    /// Publishes a client may make at once beyond the rate; 0 = the rate.
    pub publish_burst: u64,
}

/// Delivery and housekeeping (the egress).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Egress {
    /// How long one wait for new commits blocks in Tarantool before it is
    /// renewed. Commits wake it at once; this only bounds an idle wait.
    pub long_poll_seconds: u64,
    /// Default longest a message is kept; 0 = forever. Subjects may override.
    pub retention_max_age_seconds: u64,
    /// Default most messages kept per subject; 0 = unlimited.
    pub retention_max_messages: u64,
    /// Default most payload bytes kept per subject; 0 = unlimited.
    pub retention_max_bytes: u64,
    /// How often the egress replica holding the maintenance lease enforces
    /// retention and deletes released objects.
    pub maintenance_interval_ms: u64,
    /// Objects without metadata younger than this are left alone by the
    /// orphan sweep (an upload may still be about to commit).
    pub orphan_grace_seconds: u64,
    /// How often the orphan sweep lists the bucket; 0 = never.
    pub orphan_sweep_interval_seconds: u64,
    /// For clients that ask for it (`omit_large_payloads`), Fetch and
    /// Consume leave out payloads larger than this; they read them with
    /// FetchPayload.
    pub max_inline_delivery_bytes: u64,
    /// For every other client, the largest payload Fetch and Consume send
    /// inline; a larger one fails the call with RESOURCE_EXHAUSTED.
    pub max_delivered_payload_bytes: u64,
    /// Busy Consume streams of one process whose lease calls may wait in
    /// Tarantool for the next commit; the rest are woken by the subject's
    /// watcher. Each waiting call holds one of Tarantool's request slots
    /// (`net_msg_max`), shared by every replica.
    pub max_hot_streams: u64,
    /// Consumers whose lag is exported with their own labels: those with
    /// the most messages waiting; the totals count every consumer. 0 = all.
    pub consumer_lag_top: u64,
}

/// The two storage tiers: recent messages in Tarantool (hot), older ones
/// packed into segment objects in the object store (cold).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Tiering {
    /// Most bytes of hot message rows in Tarantool; 0 = half of its
    /// memtx_memory.
    pub hot_tier_max_bytes: u64,
    /// Most hot message rows in Tarantool; 0 = one per KiB of its memtx_memory.
    pub hot_tier_max_messages: u64,
    /// What a publish meets when the hot tier is full, for subjects without
    /// a policy of their own: `new` refuses it (RESOURCE_EXHAUSTED), `old`
    /// evicts the subject's oldest hot message.
    pub hot_tier_discard: String,
    /// A subject's hot messages are sealed into a segment once they hold this
    /// many payload bytes...
    pub segment_max_bytes: u64,
    /// ...or this many messages...
    pub segment_max_messages: u64,
    /// ...or once its oldest hot message is this old (and at once, whatever
    /// their size, while the hot tier is over half its budget).
    pub segment_seal_age_ms: u64,
    /// Bytes of segment blocks each egress keeps in memory for readers.
    pub segment_cache_bytes: u64,
    /// Whether this egress may move messages to the cold tier (one replica
    /// at a time does, holding the `tiering` lease).
    pub tiering_enabled: bool,
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file or a value could not be read or has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// The command line is not `[--config PATH]`.
    #[error("usage: [--config PATH] ({0})")]
    Usage(String),
    /// A key no section has (in the file: a typo, or a key of another version).
    #[error("configuration: unknown key `{0}`")]
    Unknown(String),
    /// A value of the wrong type or out of range.
    #[error("configuration key `{key}` (env {env}): {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// Its environment variable.
        env: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Config {
    /// Loads defaults for a service listening on `default_port`, then the
    /// optional `file`, then the known keys found in `env`.
    pub fn load(
        default_port: u16,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let config = Self::load_unchecked(default_port, file, env)?;
        config.check()?;
        Ok(config)
    }

    /// `load` without the checks of values against each other.
    fn load_unchecked(
        default_port: u16,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let built_in = config::Config::try_from(&Self::built_in(default_port))?;
        let defaults = built_in.collect()?;
        let mut builder = config::Config::builder().add_source(built_in);
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env: HashMap<String, String> = env.into_iter().collect();
        for key in defaults.keys() {
            if let Some(value) = env.get(&key.to_uppercase()) {
                builder = builder.set_override(key, value.as_str())?;
            }
        }
        let built = builder.build()?;
        // The sections are flattened, so serde cannot refuse unknown keys itself.
        if let Some(unknown) = built.collect()?.keys().find(|k| !defaults.contains_key(*k)) {
            return Err(Error::Unknown(unknown.clone()));
        }
        // Each section reads its own keys, so a bad value's error names its key.
        Ok(Self {
            server: built.clone().try_deserialize()?,
            lifecycle: built.clone().try_deserialize()?,
            tarantool: built.clone().try_deserialize()?,
            object_store: built.clone().try_deserialize()?,
            telemetry: built.clone().try_deserialize()?,
            auth: built.clone().try_deserialize()?,
            tls: built.clone().try_deserialize()?,
            ingress: built.clone().try_deserialize()?,
            egress: built.clone().try_deserialize()?,
            tiering: built.try_deserialize()?,
        })
    }

    /// Every configuration key, read from the struct itself; a key's
    /// environment name is the key in upper case.
    pub fn keys() -> Vec<String> {
        let mut keys: Vec<String> = config::Config::try_from(&Self::built_in(0))
            .and_then(|built_in| built_in.collect())
            .map(|map| map.into_keys().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// Defaults for a service listening on `port`, as `load` would give them
    /// without file or environment. Tests start from this.
    pub fn defaults(port: u16) -> Self {
        Self::load(port, None, std::iter::empty()).expect("built-in defaults are valid")
    }

    fn check(&self) -> Result<(), Error> {
        let invalid = |key: &str, reason: String| Error::Invalid {
            key: key.to_owned(),
            env: key.to_uppercase(),
            reason,
        };
        if self.object_store.access_key_id.is_empty()
            != self.object_store.secret_access_key.is_empty()
        {
            return Err(invalid(
                "minio_access_key_id",
                "set both minio_access_key_id and minio_secret_access_key (static keys), or \
                 neither (the AWS credential chain: web identity, container or instance \
                 credentials)"
                    .into(),
            ));
        }
        if self.tls.cert_file.is_empty() != self.tls.key_file.is_empty() {
            return Err(invalid(
                "tls_cert_file",
                "set both tls_cert_file and tls_key_file, or neither".into(),
            ));
        }
        if !self.tls.client_ca_file.is_empty() && self.tls.cert_file.is_empty() {
            return Err(invalid(
                "tls_client_ca_file",
                "mTLS needs the server's own tls_cert_file and tls_key_file".into(),
            ));
        }
        if self.ingress.multipart_part_bytes < 5 * 1024 * 1024 {
            return Err(invalid(
                "multipart_part_bytes",
                format!(
                    "{} is below the 5 MiB minimum part size of S3",
                    self.ingress.multipart_part_bytes
                ),
            ));
        }
        if self.ingress.single_put_max_bytes > MAX_SINGLE_PUT {
            return Err(invalid(
                "single_put_max_bytes",
                format!(
                    "{} is above the {MAX_SINGLE_PUT}-byte (5 GiB) limit of one S3 PutObject",
                    self.ingress.single_put_max_bytes
                ),
            ));
        }
        if self.ingress.inline_threshold_bytes > MAX_INLINE_THRESHOLD {
            return Err(invalid(
                "inline_threshold_bytes",
                format!(
                    "{} is above the {MAX_INLINE_THRESHOLD}-byte limit that keeps a message within one Tarantool tuple",
                    self.ingress.inline_threshold_bytes
                ),
            ));
        }
        if self.egress.retention_max_age_seconds > MAX_RETENTION_AGE_MS / 1000 {
            return Err(invalid(
                "retention_max_age_seconds",
                format!(
                    "{} is above the limit of {} (100 years); 0 keeps messages forever",
                    self.egress.retention_max_age_seconds,
                    MAX_RETENTION_AGE_MS / 1000
                ),
            ));
        }
        if !matches!(self.tiering.hot_tier_discard.as_str(), "new" | "old") {
            return Err(invalid(
                "hot_tier_discard",
                format!(
                    "{:?} is not a discard policy: use new (refuse publishes while the hot tier is full) or old (evict the oldest)",
                    self.tiering.hot_tier_discard
                ),
            ));
        }
        if self.tiering.segment_max_bytes == 0 || self.tiering.segment_max_messages == 0 {
            return Err(invalid(
                "segment_max_bytes",
                "segment_max_bytes and segment_max_messages must be above 0".into(),
            ));
        }
        if self.object_store.key_prefix.starts_with('/') {
            return Err(invalid(
                "minio_key_prefix",
                "must not start with '/' (S3 keys have no leading slash)".into(),
            ));
        }
        for (key, value) in [
            ("tarantool_timeout_ms", self.tarantool.timeout_ms),
            ("minio_timeout_ms", self.object_store.timeout_ms),
            (
                "health_check_interval_ms",
                self.lifecycle.health_check_interval_ms,
            ),
            ("max_payload_bytes", self.ingress.max_payload_bytes),
            ("long_poll_seconds", self.egress.long_poll_seconds),
            (
                "maintenance_interval_ms",
                self.egress.maintenance_interval_ms,
            ),
            (
                "max_concurrent_uploads",
                self.ingress.max_concurrent_uploads,
            ),
            (
                "max_uploads_per_client",
                self.ingress.max_uploads_per_client,
            ),
            (
                "stream_idle_timeout_ms",
                self.ingress.stream_idle_timeout_ms,
            ),
            (
                "max_delivered_payload_bytes",
                self.egress.max_delivered_payload_bytes,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        for (key, value) in [
            ("tarantool_address", &self.tarantool.address),
            ("minio_endpoint", &self.object_store.endpoint),
            ("minio_bucket_name", &self.object_store.bucket_name),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty".into()));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The built-in defaults for a service listening on `port`.
    fn built_in(port: u16) -> Self {
        Self {
            server: Server {
                host: "0.0.0.0".into(),
                port,
                metrics_port: 9090,
                max_connection_age_seconds: 0,
                max_connection_age_grace_seconds: 30,
            },
            lifecycle: Lifecycle {
                shutdown_grace_seconds: 20,
                health_check_interval_ms: 1000,
                startup_timeout_seconds: 60,
            },
            tarantool: Tarantool {
                address: "127.0.0.1:3301".into(),
                user: "guest".into(),
                password: "".into(),
                timeout_ms: 5000,
            },
            object_store: ObjectStore {
                endpoint: "127.0.0.1:9000".into(),
                access_key_id: "".into(),
                secret_access_key: "".into(),
                bucket_name: "minitoolstream".into(),
                use_ssl: false,
                region: "us-east-1".into(),
                timeout_ms: 30_000,
                key_prefix: "minitoolstream/".into(),
            },
            telemetry: Telemetry {
                log_level: "info".into(),
                log_format: LogFormat::Json,
            },
            auth: Auth {
                enabled: false,
                require_auth: true,
                jwt_issuer: "".into(),
                jwt_secret: "".into(),
                jwt_secret_file: "".into(),
                jwt_public_key: "".into(),
                jwt_public_key_file: "".into(),
                jwt_leeway_seconds: 30,
                jwt_jwks_url: "".into(),
                jwt_audience: "".into(),
                jwt_keys_refresh_seconds: 300,
            },
            tls: Tls {
                cert_file: "".into(),
                key_file: "".into(),
                client_ca_file: "".into(),
                reload_interval_ms: 10_000,
            },
            ingress: Ingress {
                inline_threshold_bytes: 256 * 1024,
                max_payload_bytes: 64 * 1024 * 1024,
                dedup_window_ms: 120_000,
                multipart_part_bytes: 8 * 1024 * 1024,
                single_put_max_bytes: 64 * 1024 * 1024,
                max_concurrent_uploads: 16,
                max_uploads_per_client: 4,
                stream_idle_timeout_ms: 60_000,
                publish_rate_per_second: 0,
                publish_burst: 0,
            },
            egress: Egress {
                long_poll_seconds: 30,
                retention_max_age_seconds: 7 * 24 * 3600,
                retention_max_messages: 0,
                retention_max_bytes: 0,
                maintenance_interval_ms: 1000,
                orphan_grace_seconds: 3600,
                orphan_sweep_interval_seconds: 600,
                max_inline_delivery_bytes: 1024 * 1024,
                max_delivered_payload_bytes: 64 * 1024 * 1024,
                max_hot_streams: 64,
                consumer_lag_top: 1000,
            },
            tiering: Tiering {
                hot_tier_max_bytes: 0,
                hot_tier_max_messages: 0,
                hot_tier_discard: "new".into(),
                segment_max_bytes: 8 * 1024 * 1024,
                segment_max_messages: 100_000,
                segment_seal_age_ms: 60_000,
                segment_cache_bytes: 64 * 1024 * 1024,
                tiering_enabled: true,
            },
        }
    }
}

impl Tarantool {
    /// Deadline of one Tarantool call.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl ObjectStore {
    /// Deadline of one S3 call.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The endpoint as a URL, honouring `minio_use_ssl` when no scheme is given.
    pub fn url(&self) -> String {
        if self.endpoint.contains("://") {
            self.endpoint.clone()
        } else if self.use_ssl {
            format!("https://{}", self.endpoint)
        } else {
            format!("http://{}", self.endpoint)
        }
    }
}

/// Loads the configuration of this process: `--config PATH` from the command
/// line, then the process environment.
pub fn from_process(default_port: u16) -> Result<Config, Error> {
    let mut args = std::env::args().skip(1);
    let mut file = None;
    while let Some(arg) = args.next() {
        if let Some(path) = arg.strip_prefix("--config=") {
            file = Some(std::path::PathBuf::from(path));
        } else if arg == "--config" {
            file = args.next().map(std::path::PathBuf::from);
        } else {
            return Err(Error::Usage(format!("unknown argument {arg:?}")));
        }
    }
    Config::load(default_port, file.as_deref(), std::env::vars())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn s3_keys_come_both_or_not_at_all() {
        let c = Config::defaults(50051);
        assert!(
            c.object_store.access_key_id.is_empty() && c.object_store.secret_access_key.is_empty(),
            "no keys by default: the AWS credential chain"
        );
        let half = Config::load(50051, None, env(&[("MINIO_ACCESS_KEY_ID", "ak")]));
        let err = half
            .expect_err("an access key without its secret")
            .to_string();
        assert!(err.contains("minio_secret_access_key"), "{err}");
    }

    #[test]
    fn defaults_match_the_deployment_guide() {
        let c = Config::defaults(50051);
        assert_eq!(c.server.port, 50051);
        assert_eq!(c.tarantool.address, "127.0.0.1:3301");
        assert_eq!(c.object_store.bucket_name, "minitoolstream");
        assert_eq!(c.ingress.inline_threshold_bytes, 256 * 1024);
        assert_eq!(c.ingress.max_payload_bytes, 64 * 1024 * 1024);
        assert_eq!(c.telemetry.log_format, LogFormat::Json);
        assert_eq!(c.object_store.url(), "http://127.0.0.1:9000");
    }

    #[test]
    fn guide_env_names_override_defaults() {
        let c = Config::load(
            50052,
            None,
            env(&[
                ("SERVER_PORT", "6000"),
                ("TARANTOOL_ADDRESS", "tt:3302"),
                ("TARANTOOL_USER", "minitoolstream_connector"),
                ("TARANTOOL_PASSWORD", "pw"),
                ("MINIO_ENDPOINT", "minio:9000"),
                ("MINIO_ACCESS_KEY_ID", "ak"),
                ("MINIO_SECRET_ACCESS_KEY", "sk"),
                ("MINIO_BUCKET_NAME", "b"),
                ("MINIO_USE_SSL", "true"),
                ("LOG_LEVEL", "debug"),
                ("LOG_FORMAT", "console"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.port, 6000);
        assert_eq!(c.tarantool.address, "tt:3302");
        assert_eq!(c.tarantool.user, "minitoolstream_connector");
        assert_eq!(c.tarantool.password, "pw");
        assert_eq!(c.object_store.access_key_id, "ak");
        assert_eq!(c.object_store.secret_access_key, "sk");
        assert_eq!(c.object_store.bucket_name, "b");
        assert_eq!(c.object_store.url(), "https://minio:9000");
        assert_eq!(c.telemetry.log_level, "debug");
        assert_eq!(c.telemetry.log_format, LogFormat::Console);
    }

    #[test]
    fn file_sits_between_defaults_and_env() {
        let dir = std::env::temp_dir().join(format!("mts-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "server_port = 7000\nminio_bucket_name = \"from-file\"\n",
        )
        .unwrap();
        let c = Config::load(
            50051,
            Some(&path),
            env(&[("MINIO_BUCKET_NAME", "from-env")]),
        )
        .unwrap();
        assert_eq!(c.server.port, 7000);
        assert_eq!(c.object_store.bucket_name, "from-env");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::load(1, None, env(&[("SERVER_PORT", "many")])).unwrap_err();
        assert!(err.to_string().contains("server_port"), "{err}");
        let err = Config::load(1, None, env(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().contains("log_format"), "{err}");
        let err = Config::load(1, None, env(&[("INLINE_THRESHOLD_BYTES", "2000000")])).unwrap_err();
        assert!(err.to_string().contains("INLINE_THRESHOLD_BYTES"), "{err}");
        let err = Config::load(1, None, env(&[("TARANTOOL_TIMEOUT_MS", "0")])).unwrap_err();
        assert!(err.to_string().contains("tarantool_timeout_ms"), "{err}");
        let err =
            Config::load(1, None, env(&[("SINGLE_PUT_MAX_BYTES", "6000000000")])).unwrap_err();
        assert!(err.to_string().contains("SINGLE_PUT_MAX_BYTES"), "{err}");
        // 1,000 years: refused, where it once overflowed and emptied every subject.
        let err = Config::load(
            1,
            None,
            env(&[("RETENTION_MAX_AGE_SECONDS", "31536000000")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("RETENTION_MAX_AGE_SECONDS"),
            "{err}"
        );
        assert!(
            err.to_string().contains("0 keeps messages forever"),
            "{err}"
        );
        let hundred_years = (MAX_RETENTION_AGE_MS / 1000).to_string();
        let ok = Config::load(
            1,
            None,
            env(&[("RETENTION_MAX_AGE_SECONDS", &hundred_years)]),
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn every_field_is_read_from_its_environment_variable() {
        let keys = Config::keys();
        let built_in = config::Config::try_from(&Config::built_in(1))
            .unwrap()
            .collect()
            .unwrap();
        assert_eq!(keys.len(), built_in.len());
        for key in &keys {
            // A value of the field's type that differs from its default.
            let value = match built_in[key].clone().kind {
                config::ValueKind::Boolean(b) => (!b).to_string(),
                config::ValueKind::I64(n) => (n + 1).to_string(),
                config::ValueKind::U64(n) => (n + 1).to_string(),
                _ if key == "log_format" => "console".to_owned(),
                _ => format!("from-env-{key}"),
            };
            let loaded =
                Config::load_unchecked(1, None, env(&[(&key.to_uppercase(), &value)])).unwrap();
            let read = config::Config::try_from(&loaded)
                .unwrap()
                .collect()
                .unwrap();
            assert_eq!(
                read[key].to_string(),
                value,
                "{} sets {key}",
                key.to_uppercase()
            );
        }
        for name in [
            "TARANTOOL_ADDRESS",
            "MINIO_ENDPOINT",
            "MINIO_BUCKET_NAME",
            "LOG_FORMAT",
        ] {
            assert!(keys.contains(&name.to_lowercase()), "{name}");
        }
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("mts-config-unknown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "sever_port = 1\n").unwrap();
        let err = Config::load(1, Some(&path), std::iter::empty()).unwrap_err();
        assert!(err.to_string().contains("sever_port"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
