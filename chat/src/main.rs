//! `portico-chat`: runs one chat shard (see `portico_chat`).

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Portico chat shard")]
struct Args {
    /// Configuration file (TOML); keys may also come from PORTICO_* variables.
    #[arg(long, env = "PORTICO_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = match portico_common::cli::load_config(args.config.as_deref(), args.check_config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    portico_common::cli::run_async(cfg, |cfg, stop| async move {
        let bound = {
            let engines = portico_chat::Engines::from_config(&cfg.chat, &cfg.data_dir).await?;
            portico_chat::bind(cfg.chat.clone(), &cfg.auth, engines).await?
        };
        bound.serve(stop).await?;
        Ok(())
    })
}
