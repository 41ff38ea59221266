//! The systemd notification protocol (`Type=notify`, `WatchdogSec=`),
//! through the `sd-notify` crate: a service says READY once it accepts
//! work, keeps the watchdog fed at half its interval while its runtime is
//! alive, and says STOPPING when it drains. Without `NOTIFY_SOCKET` (not
//! under systemd) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// The service accepts work; starts the watchdog pings when systemd asked
/// for them, until `stop`.
pub fn ready(stop: &CancellationToken) {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = Duration::from_micros(usec / 2);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                    }
                }
            }
        });
    }
}

/// For a process that takes over from another (the gateway's upgrade):
/// tells systemd that this process is now the service's main process
/// (`MAINPID=`, accepted with `NotifyAccess=all`) and ready, so that the
/// old one may exit without systemd taking the service for dead.
pub fn ready_as_main() {
    if let Err(e) = sd_notify::notify(
        false,
        &[NotifyState::MainPid(std::process::id()), NotifyState::Ready],
    ) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The service is draining.
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}
