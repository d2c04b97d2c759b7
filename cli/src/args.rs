//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Publish and receive messages and files through MiniToolStream.
///
/// Exit codes: 0 success, 1 other failure, 2 usage error, 3 not found,
/// 4 request refused (invalid argument, failed precondition), 5 try again
/// later (unavailable, busy, deadline), 6 payload digest mismatch, 7 not
/// authorized (no or bad token, or a token that does not allow it).
#[derive(Debug, Parser)]
#[command(name = "mts", version)]
pub struct Args {
    /// Ingress endpoint.
    #[arg(
        long,
        env = "MTS_INGRESS",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub ingress: String,
    /// Egress endpoint.
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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish FILE (or standard input with -) as one message, streamed.
    Publish {
        #[arg(long)]
        subject: String,
        /// A header, as name=value; repeatable.
        #[arg(long = "header", value_parser = header)]
        headers: Vec<(String, String)>,
        /// Deduplicate: publishing the same id twice within the window stores it once.
        #[arg(long)]
        message_id: Option<String>,
        /// The file, or - for standard input.
        file: PathBuf,
    },
    /// Follow a subject with a durable consumer: download each message,
    /// verify its SHA-256, save it, then acknowledge it.
    Subscribe {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        durable: String,
        /// Save payloads here as <sequence>; without it, print them.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Messages received and not yet acknowledged at once.
        #[arg(long, default_value_t = 16)]
        max_in_flight: u32,
    },
    /// Receive one batch, save or print it, and acknowledge it.
    Fetch {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        durable: String,
        #[arg(long, default_value_t = 10)]
        batch: i32,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Leave the batch unacknowledged (it is delivered again after ack_wait).
        #[arg(long)]
        no_ack: bool,
    },
    /// Print the subject's last sequence.
    Last {
        #[arg(long)]
        subject: String,
    },
    /// Mint a token for a server with auth enabled (for local use and tests).
    Token {
        /// The server's jwt_issuer.
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        client_id: String,
        /// An allowed subject: exact, prefix.* (one token), prefix.> (any depth) or *; repeatable.
        #[arg(long = "subject", required = true)]
        subjects: Vec<String>,
        /// publish, subscribe, fetch, ack, admin or *; repeatable.
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
        /// HS256 shared secret.
        #[arg(long, group = "key")]
        secret: Option<String>,
        /// File holding the HS256 secret.
        #[arg(long, group = "key")]
        secret_file: Option<std::path::PathBuf>,
        /// RS256 private key PEM file (the server holds the public key).
        #[arg(long, group = "key")]
        private_key_file: Option<std::path::PathBuf>,
    },
}

fn header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected name=value, got {text:?}")),
    }
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
    fn the_command_line_parses() {
        let args = Args::try_parse_from([
            "mts",
            "publish",
            "--subject",
            "s",
            "--header",
            "k=v",
            "--message-id",
            "m",
            "file.bin",
        ])
        .unwrap();
        match args.command {
            Command::Publish {
                subject,
                headers,
                message_id,
                file,
            } => {
                assert_eq!((subject.as_str(), message_id.as_deref()), ("s", Some("m")));
                assert_eq!(headers, vec![("k".to_string(), "v".to_string())]);
                assert_eq!(file, PathBuf::from("file.bin"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Args::try_parse_from(["mts", "publish", "file"]).is_err(),
            "subject is required"
        );
    }
}
