//! The ingress against the real Tarantool and S3 server that scripts/test.sh
//! runs.

use mts_config::Config;

/// A Tarantool connection of its own, as the services' user, for calling
/// stored procedures the way a misbehaving client would.
async fn tarantool_client(config: &Config) -> tarant::Client {
    tarant::Client::connect(&format!(
        "tarantool://{}:{}@{}",
        config.tarantool.user, config.tarantool.password, config.tarantool.address
    ))
    .await
    .unwrap()
}

/// Wall clock, nanoseconds since the Unix epoch.
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

mod group_commit;
mod many;
mod publish;
mod stream;
