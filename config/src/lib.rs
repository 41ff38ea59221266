//! Typed configuration for every Portico service.
//!
//! One schema ([`PorticoConfig`]) serves all binaries: the all-in-one `portico up`
//! reads every section, `portico-chat` only `[chat]`, and so on, so a key has
//! one name everywhere (in files and in `PORTICO_*` variables alike).
//!
//! Layers, later wins: built-in defaults ← TOML file ← `PORTICO_*` environment
//! variables (`__` separates sections: `PORTICO_CHAT__LISTEN=127.0.0.1:9101`).
//! [`load`] validates once; the rest of the code receives types that cannot be
//! invalid. Errors name the source, the key and what was wrong, on one line.
//!
//! This crate does not start anything and holds no runtime state.

mod schema;
mod types;

pub use schema::*;
pub use types::{ListenAddr, Secret};

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

/// Exit code of every Portico binary when its configuration is invalid.
pub const EXIT_CONFIG: i32 = 2;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named on the command line does not exist or cannot be read.
    #[error("config file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// A file is not valid TOML.
    #[error("{source_name}: {message}")]
    Syntax { source_name: String, message: String },
    /// A value in a layer does not fit the schema (unknown key, wrong type…).
    #[error("{source_name}: key `{key}`: {message}")]
    Parse {
        source_name: String,
        key: String,
        message: String,
    },
    /// All values parse but do not make sense together.
    #[error("{source_name}: key `{key}`: {message}")]
    Invalid {
        source_name: String,
        key: String,
        message: String,
    },
}

/// Loads the configuration: defaults, then `file` (if any), then `PORTICO_*`
/// variables from the process environment, and validates the result.
pub fn load(file: Option<&Path>) -> Result<PorticoConfig, ConfigError> {
    load_with_env(file, Env::prefixed("PORTICO_"))
}

fn load_with_env(file: Option<&Path>, env: Env) -> Result<PorticoConfig, ConfigError> {
    // `PORTICO_CONFIG` names the file (clap reads it), it is not a key.
    let env = env.ignore(&["config"]).split("__");
    finish(base(file)?.merge(env))
}

fn base(file: Option<&Path>) -> Result<Figment, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(PorticoConfig::default()));
    if let Some(path) = file {
        // figment silently skips a missing file; a named file must exist.
        std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        figment = figment.merge(Toml::file_exact(path));
    }
    Ok(figment)
}

fn finish(figment: Figment) -> Result<PorticoConfig, ConfigError> {
    let config: PorticoConfig = figment.extract().map_err(|e| parse_error(&figment, e))?;
    config.validate().map_err(|(key, message)| {
        let path: Vec<String> = key.split('.').map(str::to_string).collect();
        let source_name = figment
            .find_metadata(&key)
            .map(|md| source_of(md, &path))
            .unwrap_or_else(|| "built-in defaults".to_string());
        ConfigError::Invalid {
            source_name,
            key,
            message,
        }
    })?;
    Ok(config)
}

fn parse_error(figment: &Figment, e: figment::Error) -> ConfigError {
    // Report the first error only: one line, the one to fix first.
    let e = e.into_iter().next().expect("a figment error holds at least one");
    let key = e.path.join(".");
    let source_name = match &e.metadata {
        Some(md) => source_of(md, &e.path),
        None => figment
            .find_metadata(&key)
            .map(|md| source_of(md, &e.path))
            .unwrap_or_else(|| "configuration".to_string()),
    };
    if key.is_empty() {
        return ConfigError::Syntax {
            source_name,
            message: one_line(&e.kind.to_string()),
        };
    }
    ConfigError::Parse {
        source_name,
        key,
        message: one_line(&e.kind.to_string()),
    }
}

/// TOML errors come with a source excerpt over several lines; keep the
/// position and the explanation, drop the excerpt.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('|'))
        .collect::<Vec<_>>()
        .join(": ")
}

/// `["chat", "listen"]` → `PORTICO_CHAT__LISTEN`.
fn env_var_name(path: &[String]) -> String {
    format!("PORTICO_{}", path.join("__").to_ascii_uppercase())
}

/// Where a value came from: the file, or the environment variable by name.
fn source_of(md: &figment::Metadata, path: &[String]) -> String {
    match &md.source {
        Some(figment::Source::File(p)) => p.display().to_string(),
        Some(figment::Source::Code(_)) => "built-in defaults".to_string(),
        Some(other) => other.to_string(),
        // Only the environment layer has no source.
        None if !path.is_empty() => format!("environment variable {}", env_var_name(path)),
        None => md.name.to_string(),
    }
}

#[cfg(test)]
mod tests;
