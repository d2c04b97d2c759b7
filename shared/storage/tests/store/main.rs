//! The Tarantool store and its stored procedures against a real Tarantool
//! (the one scripts/test.sh started, or one a test owns); no S3 server.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use mts_config::Config;
use mts_storage::store::InlineMessage;

mod admin;
mod blocks;
mod consumers;
mod identity;
mod keys;
mod limits;
mod publishing;
mod replicas;
mod settle;
mod tiering;
mod watching;

/// A Tarantool connection of its own, as the services' user, for calling
/// stored procedures directly.
async fn raw_client(config: &Config) -> tarant::Client {
    tarant::Client::connect(&format!(
        "tarantool://{}:{}@{}",
        config.tarantool.user, config.tarantool.password, config.tarantool.address
    ))
    .await
    .unwrap()
}

/// An inline message of `data` to `subject`.
fn inline(subject: &str, data: &'static [u8]) -> InlineMessage {
    InlineMessage {
        subject: subject.into(),
        headers: HashMap::new(),
        data: Bytes::from_static(data),
        sha256: "0".repeat(64),
        message_id: None,
        dedup_window: Duration::from_secs(60),
    }
}
