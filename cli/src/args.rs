//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

/// Publish and receive messages and files of any size through
/// MiniToolStream, and administer its consumers and subjects.
///
/// Exit codes: 0 success; 1 other failure; 2 usage (bad arguments, an
/// endpoint without http:// or https://, an unreadable certificate, key or
/// token file); 3 not found; 4 refused (invalid argument, failed
/// precondition, out of range); 5 try again later (unavailable, busy,
/// deadline, cannot connect); 6 a payload's SHA-256 does not match (nothing
/// was saved or acknowledged); 7 not authorized (no or bad token, or one
/// that does not allow it).
#[derive(Debug, Parser)]
#[command(name = "mts", version)]
pub struct Args {
    #[command(flatten)]
    pub connection: Connection,
    /// Print what read verbs return as JSON (one object per line for
    /// messages).
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars (they are shown only on a terminal anyway).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the services are and how to reach them.
#[derive(Debug, ClapArgs)]
pub struct Connection {
    /// Ingress endpoint: http://host:port, or https://host:port for TLS.
    #[arg(
        long,
        env = "MTS_INGRESS",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub ingress: String,
    /// Egress endpoint: http://host:port, or https://host:port for TLS.
    #[arg(
        long,
        env = "MTS_EGRESS",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    pub egress: String,
    /// JWT sent as `authorization: Bearer <token>` (see `mts token`).
    #[arg(long, env = "MTS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the JWT, read again before every call (a projected
    /// service-account token that rotates, say).
    #[arg(long, env = "MTS_TOKEN_FILE", global = true, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for https:// endpoints instead of the
    /// system's roots.
    #[arg(long, env = "MTS_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --key.
    #[arg(long, env = "MTS_CERT_FILE", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS; needs --cert.
    #[arg(long, env = "MTS_KEY_FILE", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Longest a call may take.
    #[arg(long, default_value = "30s", value_parser = duration, global = true)]
    pub timeout: Duration,
    /// Tries of a call the service cannot take for now, the first included.
    #[arg(long, default_value_t = 5, global = true)]
    pub tries: u32,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish a message: FILE (streamed, any size), standard input (-), or
    /// --data.
    #[command(alias = "publish")]
    Pub {
        subject: String,
        /// The file, or - for standard input; omit with --data.
        #[arg(required_unless_present = "data", conflicts_with = "data")]
        file: Option<PathBuf>,
        /// The payload, given here.
        #[arg(long)]
        data: Option<String>,
        /// A header, as name=value; repeatable.
        #[arg(long = "header", short = 'H', value_parser = header)]
        headers: Vec<(String, String)>,
        /// The message id: a second publish with the same id within the
        /// service's dedup window is not stored again. Generated when not
        /// given, so that retries store it once.
        #[arg(long)]
        message_id: Option<String>,
        /// Durable consumers get a key's messages in order, one at a time.
        #[arg(long)]
        ordering_key: Option<String>,
        /// The file name receivers save it under (header file-name); FILE's
        /// own name by default.
        #[arg(long)]
        name: Option<String>,
    },
    /// Follow a subject with a durable consumer. With --out, each payload is
    /// downloaded, verified, saved, and then acknowledged; without it,
    /// messages are printed and only those printed whole are acknowledged.
    /// Reconnects by itself; Ctrl-C stops it.
    #[command(alias = "subscribe")]
    Sub {
        subject: String,
        durable: String,
        #[command(flatten)]
        save: Save,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Messages received and not yet acknowledged at once.
        #[arg(long, default_value_t = 16)]
        max_in_flight: u32,
    },
    /// Receive one batch with a durable consumer, save or print it, and
    /// acknowledge what was saved (or printed whole).
    Fetch {
        subject: String,
        durable: String,
        /// Most messages in the batch.
        #[arg(long, default_value_t = 10)]
        batch: u32,
        #[command(flatten)]
        save: Save,
        /// Acknowledge nothing: the batch is delivered again after ack_wait.
        #[arg(long)]
        no_ack: bool,
    },
    /// Print a subject's last sequence.
    Last { subject: String },
    /// Durable consumers.
    #[command(subcommand)]
    Consumer(ConsumerCommand),
    /// Subjects.
    #[command(subcommand)]
    Subject(SubjectCommand),
    /// Stored payloads.
    #[command(subcommand)]
    Payload(PayloadCommand),
    /// Mint a token for a server with auth enabled (for local use and tests).
    Token {
        /// The server's jwt_issuer.
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        client_id: String,
        /// An allowed subject: exact, prefix.* (one token), prefix.> (any
        /// depth) or *; repeatable.
        #[arg(long = "subject", required = true)]
        subjects: Vec<String>,
        /// publish, subscribe, fetch, ack, admin or *; repeatable.
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
        /// HS256 shared secret.
        #[arg(long, group = "signing")]
        secret: Option<String>,
        /// File holding the HS256 secret.
        #[arg(long, group = "signing")]
        secret_file: Option<PathBuf>,
        /// RS256 private key PEM file (the server holds the public key).
        #[arg(long, group = "signing")]
        private_key_file: Option<PathBuf>,
    },
}

/// Where received payloads go.
#[derive(Debug, ClapArgs)]
pub struct Save {
    /// Save payloads in this folder (made when missing), under the name
    /// their publisher gave or else their sequence; without it, print them.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ConsumerCommand {
    /// List consumers, of one subject or of all.
    Ls { subject: Option<String> },
    /// A consumer's settings and state (its lag among them).
    Info { subject: String, durable: String },
    /// Create a consumer, or update the settings of one.
    Add {
        subject: String,
        durable: String,
        /// How long a delivered message stays leased (e.g. 30s, 5m).
        #[arg(long, value_parser = duration)]
        ack_wait: Option<Duration>,
        /// Deliveries before a message is dead-lettered; 0 = unlimited.
        #[arg(long)]
        max_deliver: Option<u32>,
        /// Most messages leased and unacknowledged at once; 0 = unlimited.
        #[arg(long)]
        max_ack_pending: Option<u32>,
        /// Where a new consumer starts: all, new, a sequence, or a time
        /// (RFC 3339, e.g. 2026-11-30T08:00:00Z).
        #[arg(long, default_value = "all", value_parser = deliver)]
        deliver: Deliver,
        /// Dead-letter subject (default <subject>.dlq).
        #[arg(long, conflicts_with = "no_dead_letter")]
        dead_letter: Option<String>,
        /// Drop what is given up instead of dead-lettering it.
        #[arg(long)]
        no_dead_letter: bool,
        /// Remove the consumer once unused this long (at least 1m).
        #[arg(long, value_parser = duration)]
        inactive_threshold: Option<Duration>,
    },
    /// Delete a consumer.
    Rm { subject: String, durable: String },
    /// Move a consumer to a sequence or a time: later messages are delivered
    /// anew, earlier ones never again.
    Seek {
        subject: String,
        durable: String,
        /// A sequence, or a time (RFC 3339).
        #[arg(value_parser = deliver)]
        to: Deliver,
    },
}

#[derive(Debug, Subcommand)]
pub enum SubjectCommand {
    /// List subjects (those starting with PREFIX).
    Ls { prefix: Option<String> },
    /// What a subject stores, and its limits.
    Info { subject: String },
    /// Set a subject's retention limits; those not given stay as they are.
    Limits {
        subject: String,
        /// Longest a message is kept (e.g. 7d); 0 = forever.
        #[arg(long, value_parser = duration)]
        max_age: Option<Duration>,
        /// Most messages kept; 0 = unlimited.
        #[arg(long)]
        max_messages: Option<u64>,
        /// Most payload bytes kept; 0 = unlimited.
        #[arg(long)]
        max_bytes: Option<u64>,
        /// While the hot tier is full: refuse new messages (new) or evict
        /// the subject's oldest (old).
        #[arg(long, value_parser = ["new", "old"])]
        discard: Option<String>,
    },
    /// Remove a subject's messages (up to --through, or all).
    Purge {
        subject: String,
        #[arg(long)]
        through: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PayloadCommand {
    /// Download one message's payload, verified; an interrupted download
    /// resumes where it stopped when run again.
    Get {
        subject: String,
        sequence: u64,
        /// The file or folder to save it in (- for standard output); the
        /// current folder by default, under its sequence.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Where a consumer starts or is moved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deliver {
    All,
    New,
    Sequence(u64),
    Time(std::time::SystemTime),
}

fn header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected name=value, got {text:?}")),
    }
}

/// `500ms`, `30s`, `5m`, `2h`, `7d`, or a number of seconds.
pub fn duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected a duration such as 30s, 5m, 2h or 7d, got {text:?}"))?;
    let unit_ms = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}: use ms, s, m, h or d"
            ));
        }
    };
    number
        .checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

fn deliver(text: &str) -> Result<Deliver, String> {
    match text {
        "all" => return Ok(Deliver::All),
        "new" => return Ok(Deliver::New),
        _ => {}
    }
    if let Ok(sequence) = text.parse() {
        return Ok(Deliver::Sequence(sequence));
    }
    crate::time::parse_rfc3339(text)
        .map(Deliver::Time)
        .ok_or_else(|| format!("expected all, new, a sequence or an RFC 3339 time, got {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_name_value_pairs() {
        assert_eq!(header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(header("empty="), Ok(("empty".into(), String::new())));
        assert!(header("novalue").is_err());
        assert!(header("=x").is_err());
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(duration("5 m").is_err());
        assert!(duration("m").is_err());
        assert!(duration("99999999999999999999d").is_err());
    }

    #[test]
    fn starts_are_all_new_a_sequence_or_a_time() {
        assert_eq!(deliver("all"), Ok(Deliver::All));
        assert_eq!(deliver("42"), Ok(Deliver::Sequence(42)));
        assert!(matches!(
            deliver("2026-11-30T08:00:00Z"),
            Ok(Deliver::Time(_))
        ));
        assert!(deliver("yesterday").is_err());
    }

    #[test]
    fn the_command_line_parses() {
        let args = Args::try_parse_from([
            "mts",
            "pub",
            "s",
            "-H",
            "k=v",
            "--message-id",
            "m",
            "file.bin",
        ])
        .unwrap();
        match args.command {
            Command::Pub {
                subject,
                headers,
                message_id,
                file,
                ..
            } => {
                assert_eq!((subject.as_str(), message_id.as_deref()), ("s", Some("m")));
                assert_eq!(headers, vec![("k".to_string(), "v".to_string())]);
                assert_eq!(file, Some(PathBuf::from("file.bin")));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Args::try_parse_from(["mts", "pub", "s"]).is_err(),
            "a file or --data is required"
        );
        assert!(Args::try_parse_from(["mts", "pub", "s", "f", "--data", "x"]).is_err());
        assert!(
            Args::try_parse_from(["mts", "--cert", "c", "last", "s"]).is_err(),
            "a certificate needs its key"
        );
    }
}
