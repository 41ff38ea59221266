//! One cancellation token per process, cancelled by SIGTERM or SIGINT.
//!
//! Every long-lived task receives a clone (or a child) of the token and
//! stops accepting work when it fires; see ARCHITECTURE.md, "Shutdown".

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Spawns a task that cancels `token` on the first SIGTERM or SIGINT.
/// Must be called inside a Tokio runtime.
pub fn cancel_on_signal(token: CancellationToken) {
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = token.cancelled() => return,
        };
        tracing::info!(signal = which, "shutting down");
        token.cancel();
    });
}
