//! The ingress against the real Tarantool and S3 server that scripts/test.sh
//! runs.

mod group_commit;
mod many;
mod publish;
mod stream;
