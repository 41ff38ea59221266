//! The shared start-up path of every binary: load and validate the
//! configuration (exit 2 with a one-line error when it is bad), set up
//! logging, run on Tokio until SIGTERM/SIGINT, exit 0 after a clean drain.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use portico_config::{EXIT_CONFIG, PorticoConfig};
use tokio_util::sync::CancellationToken;

/// Loads the configuration. With `check_only`, reports and exits either way.
/// On error prints `config error: …` on stderr and gives exit code 2.
pub fn load_config(file: Option<&Path>, check_only: bool) -> Result<PorticoConfig, ExitCode> {
    match portico_config::load(file) {
        Ok(cfg) if check_only => {
            println!("config ok");
            drop(cfg);
            Err(ExitCode::SUCCESS)
        }
        Ok(cfg) => Ok(cfg),
        Err(e) => {
            eprintln!("config error: {e}");
            Err(ExitCode::from(EXIT_CONFIG as u8))
        }
    }
}

/// Runs `service` on a multi-threaded runtime with logging set up; `stop`
/// fires on SIGTERM/SIGINT. A service error is logged and exits 1.
pub fn run_async<F, Fut>(cfg: PorticoConfig, service: F) -> ExitCode
where
    F: FnOnce(PorticoConfig, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::telemetry::init_tracing(&cfg.log);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the Tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        let _ = crate::telemetry::metrics();
        let stop = CancellationToken::new();
        crate::shutdown::cancel_on_signal(stop.clone());
        match service(cfg, stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "stopped on error");
                ExitCode::FAILURE
            }
        }
    });
    // Do not wait for stray blocking tasks: the drain already ran.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
