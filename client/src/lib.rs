//! The MiniToolStream client library.
//!
//! A [`Client`] talks to the two services: the ingress (publishing) and the
//! egress (delivery and administration). It is cheap to clone: clones share
//! their connections.
//!
//! ```no_run
//! # async fn example() -> Result<(), mts_client::Error> {
//! use mts_client::{Client, Message};
//!
//! let client = Client::builder("http://127.0.0.1:50051", "http://127.0.0.1:50052")
//!     .token("a bearer token")
//!     .connect()
//!     .await?;
//! let published = client.publish(Message::new("orders.created", "hello")).await?;
//! println!("stored as {}", published.sequence);
//! # Ok(())
//! # }
//! ```
//!
//! Publishing retries what the service could not take for now
//! (`UNAVAILABLE`) under one message id, generated when the message has none,
//! so that a retried message is stored once: the service answers a repeat
//! within its dedup window with the first one's sequence.

#![deny(missing_docs)]

mod client;
mod consumer;
mod consumers;
mod error;
mod payload;
mod publish;
mod publisher;
mod subjects;
mod token;
mod upload;

pub use client::{Client, ClientBuilder, Retry};
pub use consumer::{Consumer, ConsumerBuilder, Delivery, LeaseKeeper};
pub use consumers::Seek;
pub use error::Error;
pub use payload::{Downloaded, PayloadReader};
pub use publish::{Message, Published};
pub use publisher::Publisher;
pub use subjects::Purged;
pub use token::Token;
pub use upload::Progress;

/// The header in which [`Client::publish_file`] records the file's name,
/// for receivers to save it under ([`Delivery::file_name`]).
pub const FILE_NAME_HEADER: &str = "file-name";

/// `name` made safe to use as the name of a file in a folder: its last path
/// component, control characters and characters some file systems refuse
/// replaced by `_`, at most 200 bytes; `None` when nothing usable is left
/// (empty, `.`, `..`).
pub fn safe_file_name(name: &str) -> Option<String> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut safe = String::new();
    for c in last.chars() {
        if safe.len() + c.len_utf8() > 200 {
            break;
        }
        let refused = c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*');
        safe.push(if refused { '_' } else { c });
    }
    let safe = safe.trim().to_owned();
    (!safe.is_empty() && safe != "." && safe != "..").then_some(safe)
}

/// The wire contract's types that the client's calls take and return, as
/// they are on the wire: consumer settings and state, subject state and
/// limits.
pub mod wire {
    pub use mts_proto::pb::{
        ConsumerConfig, ConsumerInfo, DeliverPolicy, SubjectInfo, SubjectLimits,
    };
}

#[cfg(test)]
mod tests {
    use super::safe_file_name;

    #[test]
    fn file_names_cannot_leave_their_folder() {
        assert_eq!(safe_file_name("report.pdf").as_deref(), Some("report.pdf"));
        assert_eq!(
            safe_file_name("../../etc/passwd").as_deref(),
            Some("passwd")
        );
        assert_eq!(safe_file_name("C:\\temp\\x.txt").as_deref(), Some("x.txt"));
        assert_eq!(safe_file_name("a\nb|c").as_deref(), Some("a_b_c"));
        assert_eq!(safe_file_name(".."), None);
        assert_eq!(safe_file_name("dir/"), None);
        assert_eq!(safe_file_name("  "), None);
        let long = "é".repeat(150);
        let cut = safe_file_name(&long).unwrap();
        assert!(cut.len() <= 200 && cut.chars().all(|c| c == 'é'));
    }
}
