//! Process managers: how an instance of a shop's service is started and
//! stopped, per the customer's `process_manager`: `supervisor`
//! (`supervisorctl` on a program file per instance), `systemd` (a template
//! unit, `<unit>@<instance>.service`), `pm2`, or `command` templates.
//!
//! Whatever the manager, the process it runs is `portico-jobs run-instance
//! <spec>`: the spec (JSON, mode 600, under `<root>/run/`) holds the
//! directory, the environment (the service's `.env`, `PORT`, …) and the
//! start command, so no value from a `.env` ever passes through a shell or
//! a manager's config syntax.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portico_config::UpgradeConfig;
use serde::{Deserialize, Serialize};

use crate::customers::PROCESS_MANAGERS as MANAGERS;

/// How `run-instance` starts a service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub dir: PathBuf,
    pub env: BTreeMap<String, String>,
    /// Run as `sh -c <command>` (the release's `start`).
    pub command: String,
}

impl Spec {
    /// Replaces this process with the service (used by `run-instance`).
    pub fn exec(&self) -> std::io::Error {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("exec {}", self.command))
            .current_dir(&self.dir)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .envs(&self.env)
            .exec()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PmError {
    #[error("{0}")]
    Io(String),
    #[error("`{command}` failed: {output}")]
    Failed { command: String, output: String },
    #[error("process manager `{0}` is not configured: {1}")]
    NotConfigured(String, String),
}

/// One process manager, as configured.
pub struct Manager {
    kind: String,
    cfg: UpgradeConfig,
    /// The program that runs a spec (this binary).
    runner: PathBuf,
}

fn spec_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.json"))
}

impl Manager {
    pub fn new(kind: &str, cfg: &UpgradeConfig) -> Result<Manager, PmError> {
        if !MANAGERS.contains(&kind) {
            return Err(PmError::NotConfigured(
                kind.into(),
                format!("known: {}", MANAGERS.join(", ")),
            ));
        }
        if kind == "command" && cfg.command_start.is_none() {
            return Err(PmError::NotConfigured(
                kind.into(),
                "set jobs.upgrade.command_start and command_stop".into(),
            ));
        }
        let runner = std::env::current_exe().map_err(|e| PmError::Io(format!("this program's path: {e}")))?;
        Ok(Manager {
            kind: kind.into(),
            cfg: cfg.clone(),
            runner,
        })
    }

    /// Writes the spec and starts (or restarts) instance `name`.
    pub async fn start(&self, run_dir: &Path, name: &str, spec: &Spec) -> Result<(), PmError> {
        let path = spec_path(run_dir, name);
        write_private(
            &path,
            &serde_json::to_vec_pretty(spec).map_err(|e| PmError::Io(e.to_string()))?,
        )?;
        let runner = self.runner.display().to_string();
        let spec_arg = path.display().to_string();
        match self.kind.as_str() {
            "supervisor" => {
                let log = run_dir.join(format!("{name}.log"));
                let conf = format!(
                    "; written by portico-jobs: instance {name}\n[program:{name}]\ncommand={runner} run-instance {spec_arg}\n\
                     autostart=true\nautorestart=true\nstartsecs=0\nstopsignal=TERM\nstopwaitsecs=10\n\
                     stopasgroup=true\nkillasgroup=true\nredirect_stderr=true\nstdout_logfile={}\n\
                     stdout_logfile_maxbytes=5MB\nstdout_logfile_backups=2\n",
                    log.display()
                );
                if conf.contains('%') {
                    return Err(PmError::Io(format!(
                        "paths with % cannot go into a supervisor file: {spec_arg}"
                    )));
                }
                let file = self.cfg.supervisor_conf_dir.join(format!("{name}.conf"));
                write_private(&file, conf.as_bytes())?;
                // `update` adds the new program (and starts it); a program
                // already there is restarted so it reads the new spec.
                self.supervisorctl(&["update", name]).await?;
                self.supervisorctl(&["restart", name]).await.map(|_| ())
            }
            "systemd" => {
                let env_spec = spec_path(&self.cfg.systemd_env_dir, name);
                std::fs::create_dir_all(&self.cfg.systemd_env_dir).map_err(|e| PmError::Io(e.to_string()))?;
                std::fs::copy(&path, &env_spec)
                    .map_err(|e| PmError::Io(format!("{}: {e}", env_spec.display())))?;
                run("systemctl", &["restart", &self.unit(name)]).await.map(|_| ())
            }
            "pm2" => {
                let _ = run("pm2", &["delete", name]).await;
                run(
                    "pm2",
                    &["start", &runner, "--name", name, "--", "run-instance", &spec_arg],
                )
                .await
                .map(|_| ())
            }
            _ => {
                let cmd = self.template(self.cfg.command_start.as_deref(), name, &spec_arg);
                run("/bin/sh", &["-c", &cmd]).await.map(|_| ())
            }
        }
    }

    /// Stops and removes instance `name` (its spec stays, for inspection
    /// and for a restart). Stopping an unknown instance is not an error.
    pub async fn stop(&self, run_dir: &Path, name: &str) -> Result<(), PmError> {
        let spec_arg = spec_path(run_dir, name).display().to_string();
        match self.kind.as_str() {
            "supervisor" => {
                let file = self.cfg.supervisor_conf_dir.join(format!("{name}.conf"));
                match std::fs::remove_file(&file) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(PmError::Io(format!("{}: {e}", file.display()))),
                }
                self.supervisorctl(&["update", name]).await.map(|_| ())
            }
            "systemd" => {
                run("systemctl", &["stop", &self.unit(name)]).await?;
                let _ = std::fs::remove_file(spec_path(&self.cfg.systemd_env_dir, name));
                Ok(())
            }
            "pm2" => match run("pm2", &["delete", name]).await {
                Err(PmError::Failed { output, .. }) if output.contains("not found") => Ok(()),
                r => r.map(|_| ()),
            },
            _ => {
                let cmd = self.template(self.cfg.command_stop.as_deref(), name, &spec_arg);
                run("/bin/sh", &["-c", &cmd]).await.map(|_| ())
            }
        }
    }

    fn unit(&self, name: &str) -> String {
        format!("{}@{name}.service", self.cfg.systemd_unit)
    }

    fn template(&self, t: Option<&str>, name: &str, spec: &str) -> String {
        t.unwrap_or_default()
            .replace("{instance}", name)
            .replace("{spec}", spec)
            .replace("{runner}", &self.runner.display().to_string())
    }

    async fn supervisorctl(&self, args: &[&str]) -> Result<String, PmError> {
        let (prog, base) = self.cfg.supervisorctl.split_first().expect("validated non-empty");
        let mut all: Vec<&str> = base.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        let out = run(prog, &all).await?;
        // supervisorctl exits 0 on some errors; its words say what happened.
        if out.contains("ERROR") && !out.contains("no such process") && !out.contains("not running") {
            return Err(PmError::Failed {
                command: format!("{prog} {}", all.join(" ")),
                output: out,
            });
        }
        Ok(out)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PmError> {
    let err = |e: std::io::Error| PmError::Io(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    portico_common::files::write_private(path, bytes).map_err(err)
}

/// Runs a manager's command (60 s at most); its output, or why it failed.
async fn run(prog: &str, args: &[&str]) -> Result<String, PmError> {
    let shown = format!("{prog} {}", args.join(" "));
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .map_err(|_| PmError::Failed {
            command: shown.clone(),
            output: "timed out after 60 s".into(),
        })?
        .map_err(|e| PmError::Failed {
            command: shown.clone(),
            output: e.to_string(),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(PmError::Failed {
            command: shown,
            output: text.trim().chars().take(2000).collect(),
        })
    }
}
