//! Logging: `tracing-subscriber` with an env filter (`RUST_LOG`, else the
//! configured level, noisy dependencies quieted) writing JSON or console lines.

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber. Call once, from `main`.
pub fn init(config: &Config) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},h2=warn,hyper=warn,tower=warn,aws_smithy_runtime=warn,aws_sdk_s3=warn,aws_config=warn,tarant=warn",
            config.log_level
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match config.log_format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Console => builder.init(),
    }
}
