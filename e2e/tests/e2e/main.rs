//! End-to-end tests: ingress and egress in-process on ephemeral ports, the
//! real Tarantool and S3 server that scripts/test.sh started, real clients.

mod auth;
mod backup;
mod bad_input;
mod binaries;
mod cloud_credentials;
mod concurrency;
mod drain;
mod grpcurl;
mod large_payloads;
mod malformed;
mod metrics;
mod replicas;
mod restart;
mod system;
mod tiering;
mod tls;
mod tracing_export;
