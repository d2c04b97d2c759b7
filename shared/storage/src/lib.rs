//! MiniToolStream's two stores: Tarantool, which holds sequences, message
//! metadata, small payloads and consumer state (its schema and stored
//! procedures are `lua/minitoolstream.lua`, the only copy), and the
//! S3-compatible object store that holds large payloads. No gRPC here: the
//! services map these errors to status codes.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod object_store;
pub mod segment;
pub mod store;

/// Told about every call the stores make, so that metrics can count and time
/// them without the stores depending on metrics.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// One call to `dependency` (`tarantool` or `s3`): its operation, how
    /// long it took and whether it succeeded.
    fn call(&self, dependency: &'static str, operation: &'static str, seconds: f64, ok: bool);

    /// One group-commit call stored `messages` inline publishes.
    fn group_commit(&self, messages: usize);
}
