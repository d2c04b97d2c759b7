//! The shutdown signal: SIGTERM (what Kubernetes sends) or Ctrl-C. The first
//! one starts a graceful drain; a second one ends the process at once.

/// The future `signal` returns.
pub type Signal = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Completes when the process is asked to stop. From then on, another
/// signal exits immediately (status 130) instead of waiting for the drain.
pub fn signal() -> Signal {
    Box::pin(async {
        wait_for_signal().await;
        tokio::spawn(async {
            wait_for_signal().await;
            tracing::warn!("second signal: exiting without waiting for the drain");
            std::process::exit(130);
        });
    })
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
}
