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
mod error;
mod publish;
mod publisher;
mod subjects;
mod token;

pub use client::{Client, ClientBuilder, Retry};
pub use error::Error;
pub use publish::{Message, Published};
pub use publisher::Publisher;
pub use token::Token;
