//! The egress against the real Tarantool and S3 server that scripts/test.sh
//! runs. Messages are published straight through the store, so these tests
//! need only the egress service.

mod consume_stream;
mod consumers;
mod delivery;
mod maintenance;
mod subjects;
mod support;
mod tiering;
