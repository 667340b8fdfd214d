//! Process shutdown: the signal, and the drain deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Cancels `token` on the first signal.
pub fn cancel_on_signal(token: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown signal received; draining");
        token.cancel();
    })
}

/// Waits for `drain` up to `grace`; returns false when the grace period ran out first.
pub async fn drain_within(grace: Duration, drain: impl std::future::Future<Output = ()>) -> bool {
    tokio::time::timeout(grace, drain).await.is_ok()
}
