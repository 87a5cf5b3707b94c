//! SIGTERM and SIGINT start a graceful shutdown.

use tokio::signal::unix::{SignalKind, signal};

use crate::server::Handle;

pub async fn stop_on_signal(handle: &Handle) {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM can be handled");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT can be handled");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "stop requested");
    handle.shutdown();
}
