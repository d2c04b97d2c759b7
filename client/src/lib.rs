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
pub use consumer::{Consumer, ConsumerBuilder, Delivery};
pub use consumers::Seek;
pub use error::Error;
pub use payload::{Downloaded, PayloadReader};
pub use publish::{Message, Published};
pub use publisher::Publisher;
pub use subjects::Purged;
pub use token::Token;
pub use upload::Progress;

/// The wire contract's types that the client's calls take and return, as
/// they are on the wire: consumer settings and state, subject state and
/// limits.
pub mod wire {
    pub use mts_proto::pb::{
        ConsumerConfig, ConsumerInfo, DeliverPolicy, SubjectInfo, SubjectLimits,
    };
}
