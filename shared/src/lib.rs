//! What both MiniToolStream services need, one module per concern: loading
//! configuration, logging, the shutdown signal, the gRPC server builder
//! (health + reflection + tracing), the Tarantool metadata store, the S3 blob
//! store and the validation of names and headers.

#![forbid(unsafe_code)]

pub mod auth;
pub mod backoff;
pub mod blob;
pub mod config;
pub mod dependencies;
pub mod health;
pub mod metrics;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod validate;
