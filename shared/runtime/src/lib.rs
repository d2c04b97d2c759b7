//! What both MiniToolStream services run on, one module per concern: the
//! gRPC server (health, reflection, metrics, tracing) and its shutdown,
//! TLS with certificates reloaded in place, telemetry, authentication, the
//! validation of names and headers, and the
//! gRPC status of each store failure.

#![forbid(unsafe_code)]

pub mod auth;
pub mod dependencies;
pub mod health;
pub mod metrics;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod validate;
