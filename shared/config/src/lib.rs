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

/// The configuration of one service process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server binds.
    pub server_host: String,
    /// gRPC port: 50051 for ingress, 50052 for egress.
    pub server_port: u16,
    /// Port of the admin HTTP server (`/metrics`); 0 picks a free one.
    pub metrics_port: u16,
    /// `host:port` of Tarantool.
    pub tarantool_address: String,
    /// Tarantool user; `guest` connects without credentials.
    pub tarantool_user: String,
    /// Tarantool password.
    pub tarantool_password: String,
    /// Deadline of one Tarantool call, in milliseconds.
    pub tarantool_timeout_ms: u64,
    /// `host:port` (or URL) of the S3-compatible store.
    pub minio_endpoint: String,
    /// S3 access key.
    pub minio_access_key_id: String,
    /// S3 secret key.
    pub minio_secret_access_key: String,
    /// Bucket for offloaded payloads; created if missing.
    pub minio_bucket_name: String,
    /// Use https when the endpoint has no scheme.
    pub minio_use_ssl: bool,
    /// Region the S3 server expects in signatures.
    pub minio_region: String,
    /// Deadline of one S3 call, in milliseconds.
    pub minio_timeout_ms: u64,
    /// Every object this service writes has a key under this prefix (then
    /// the store's id, then the subject), so a bucket can be shared: the
    /// orphan sweep looks only there.
    pub minio_key_prefix: String,
    /// Default log level when `RUST_LOG` is not set.
    pub log_level: String,
    /// `json` or `console`.
    pub log_format: LogFormat,
    /// Payloads up to this size are stored inline in Tarantool.
    pub inline_threshold_bytes: u64,
    /// Largest payload a unary publish accepts.
    pub max_payload_bytes: u64,
    /// How long a draining process waits for in-flight calls.
    pub shutdown_grace_seconds: u64,
    /// How often dependencies are probed for the health status.
    pub health_check_interval_ms: u64,
    /// How long start-up waits for Tarantool and S3 before giving up.
    pub startup_timeout_seconds: u64,
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
    /// For clients that ask for it (`omit_large_payloads`), Fetch and
    /// Consume leave out payloads larger than this; they read them with
    /// FetchPayload.
    pub max_inline_delivery_bytes: u64,
    /// For every other client, the largest payload Fetch and Consume send
    /// inline; a larger one fails the call with RESOURCE_EXHAUSTED.
    pub max_delivered_payload_bytes: u64,
    /// Check JWTs on every call.
    pub auth_enabled: bool,
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
    /// PEM certificate chain for TLS on the gRPC port; empty = plaintext.
    pub tls_cert_file: String,
    /// PEM private key for `tls_cert_file`.
    pub tls_key_file: String,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    pub tls_client_ca_file: String,
    /// Connections older than this (±10 %, drawn per process) are asked to
    /// go away, so clients rebalance after a scale-out; 0 = never.
    pub max_connection_age_seconds: u64,
    /// How long an aged connection's calls may finish before it is closed.
    pub max_connection_age_grace_seconds: u64,
    /// Publishes per second each client (token `client_id`; anonymous
    /// callers share one budget) may sustain; 0 = unlimited.
    pub publish_rate_per_second: u64,
    /// Publishes a client may make at once beyond the rate; 0 = the rate.
    pub publish_burst: u64,
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
    /// A value has the right type but is out of range.
    #[error("configuration key `{key}` (env {env}): {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
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
        let mut builder = config::Config::builder()
            .add_source(config::Config::try_from(&Self::built_in(default_port))?);
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env: HashMap<String, String> = env.into_iter().collect();
        for key in Self::keys() {
            if let Some(value) = env.get(&key.to_uppercase()) {
                builder = builder.set_override(&key, value.as_str())?;
            }
        }
        Ok(builder.build()?.try_deserialize()?)
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
        let invalid = |key: &'static str, reason: String| Error::Invalid {
            key,
            env: key.to_uppercase(),
            reason,
        };
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return Err(invalid(
                "tls_cert_file",
                "set both tls_cert_file and tls_key_file, or neither".into(),
            ));
        }
        if !self.tls_client_ca_file.is_empty() && self.tls_cert_file.is_empty() {
            return Err(invalid(
                "tls_client_ca_file",
                "mTLS needs the server's own tls_cert_file and tls_key_file".into(),
            ));
        }
        if self.multipart_part_bytes < 5 * 1024 * 1024 {
            return Err(invalid(
                "multipart_part_bytes",
                format!(
                    "{} is below the 5 MiB minimum part size of S3",
                    self.multipart_part_bytes
                ),
            ));
        }
        if self.single_put_max_bytes > MAX_SINGLE_PUT {
            return Err(invalid(
                "single_put_max_bytes",
                format!(
                    "{} is above the {MAX_SINGLE_PUT}-byte (5 GiB) limit of one S3 PutObject",
                    self.single_put_max_bytes
                ),
            ));
        }
        if self.inline_threshold_bytes > MAX_INLINE_THRESHOLD {
            return Err(invalid(
                "inline_threshold_bytes",
                format!(
                    "{} is above the {MAX_INLINE_THRESHOLD}-byte limit that keeps a message within one Tarantool tuple",
                    self.inline_threshold_bytes
                ),
            ));
        }
        if self.retention_max_age_seconds > MAX_RETENTION_AGE_MS / 1000 {
            return Err(invalid(
                "retention_max_age_seconds",
                format!(
                    "{} is above the limit of {} (100 years); 0 keeps messages forever",
                    self.retention_max_age_seconds,
                    MAX_RETENTION_AGE_MS / 1000
                ),
            ));
        }
        if self.minio_key_prefix.starts_with('/') {
            return Err(invalid(
                "minio_key_prefix",
                "must not start with '/' (S3 keys have no leading slash)".into(),
            ));
        }
        for (key, value) in [
            ("tarantool_timeout_ms", self.tarantool_timeout_ms),
            ("minio_timeout_ms", self.minio_timeout_ms),
            ("health_check_interval_ms", self.health_check_interval_ms),
            ("max_payload_bytes", self.max_payload_bytes),
            ("long_poll_seconds", self.long_poll_seconds),
            ("maintenance_interval_ms", self.maintenance_interval_ms),
            ("max_concurrent_uploads", self.max_concurrent_uploads),
            ("max_uploads_per_client", self.max_uploads_per_client),
            ("stream_idle_timeout_ms", self.stream_idle_timeout_ms),
            (
                "max_delivered_payload_bytes",
                self.max_delivered_payload_bytes,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        for (key, value) in [
            ("tarantool_address", &self.tarantool_address),
            ("minio_endpoint", &self.minio_endpoint),
            ("minio_bucket_name", &self.minio_bucket_name),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty".into()));
            }
        }
        Ok(())
    }

    /// Deadline of one Tarantool call.
    pub fn tarantool_timeout(&self) -> Duration {
        Duration::from_millis(self.tarantool_timeout_ms)
    }

    /// Deadline of one S3 call.
    pub fn minio_timeout(&self) -> Duration {
        Duration::from_millis(self.minio_timeout_ms)
    }

    /// The S3 endpoint as a URL, honouring `minio_use_ssl` when no scheme is given.
    pub fn minio_url(&self) -> String {
        if self.minio_endpoint.contains("://") {
            self.minio_endpoint.clone()
        } else if self.minio_use_ssl {
            format!("https://{}", self.minio_endpoint)
        } else {
            format!("http://{}", self.minio_endpoint)
        }
    }
}

impl Config {
    /// The built-in defaults for a service listening on `port`.
    fn built_in(port: u16) -> Self {
        Self {
            server_host: "0.0.0.0".into(),
            server_port: port,
            metrics_port: 9090,
            tarantool_address: "127.0.0.1:3301".into(),
            tarantool_user: "guest".into(),
            tarantool_password: "".into(),
            tarantool_timeout_ms: 5000,
            minio_endpoint: "127.0.0.1:9000".into(),
            minio_access_key_id: "minioadmin".into(),
            minio_secret_access_key: "minioadmin".into(),
            minio_bucket_name: "minitoolstream".into(),
            minio_use_ssl: false,
            minio_region: "us-east-1".into(),
            minio_timeout_ms: 30_000,
            minio_key_prefix: "minitoolstream/".into(),
            log_level: "info".into(),
            log_format: LogFormat::Json,
            inline_threshold_bytes: 256 * 1024,
            max_payload_bytes: 64 * 1024 * 1024,
            shutdown_grace_seconds: 20,
            health_check_interval_ms: 1000,
            startup_timeout_seconds: 60,
            long_poll_seconds: 30,
            retention_max_age_seconds: 7 * 24 * 3600,
            retention_max_messages: 0,
            retention_max_bytes: 0,
            maintenance_interval_ms: 1000,
            orphan_grace_seconds: 3600,
            orphan_sweep_interval_seconds: 600,
            dedup_window_ms: 120_000,
            multipart_part_bytes: 8 * 1024 * 1024,
            single_put_max_bytes: 64 * 1024 * 1024,
            max_concurrent_uploads: 16,
            max_uploads_per_client: 4,
            stream_idle_timeout_ms: 60_000,
            max_inline_delivery_bytes: 1024 * 1024,
            max_delivered_payload_bytes: 64 * 1024 * 1024,
            auth_enabled: false,
            require_auth: true,
            jwt_issuer: "".into(),
            jwt_secret: "".into(),
            jwt_secret_file: "".into(),
            jwt_public_key: "".into(),
            jwt_public_key_file: "".into(),
            jwt_leeway_seconds: 30,
            tls_cert_file: "".into(),
            tls_key_file: "".into(),
            tls_client_ca_file: "".into(),
            max_connection_age_seconds: 0,
            max_connection_age_grace_seconds: 30,
            publish_rate_per_second: 0,
            publish_burst: 0,
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
    fn defaults_match_the_deployment_guide() {
        let c = Config::defaults(50051);
        assert_eq!(c.server_port, 50051);
        assert_eq!(c.tarantool_address, "127.0.0.1:3301");
        assert_eq!(c.minio_bucket_name, "minitoolstream");
        assert_eq!(c.inline_threshold_bytes, 256 * 1024);
        assert_eq!(c.max_payload_bytes, 64 * 1024 * 1024);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.minio_url(), "http://127.0.0.1:9000");
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
        assert_eq!(c.server_port, 6000);
        assert_eq!(c.tarantool_address, "tt:3302");
        assert_eq!(c.tarantool_user, "minitoolstream_connector");
        assert_eq!(c.tarantool_password, "pw");
        assert_eq!(c.minio_access_key_id, "ak");
        assert_eq!(c.minio_secret_access_key, "sk");
        assert_eq!(c.minio_bucket_name, "b");
        assert_eq!(c.minio_url(), "https://minio:9000");
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.log_format, LogFormat::Console);
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
        assert_eq!(c.server_port, 7000);
        assert_eq!(c.minio_bucket_name, "from-env");
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
