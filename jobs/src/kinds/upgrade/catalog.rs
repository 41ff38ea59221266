//! The release catalog (`releases.json`): every release a shop can be
//! upgraded to, with an archive per service (backend, admin, store) and its
//! sha256, engine requirements, the versions it upgrades from (semver
//! ranges: the compatibility matrix), and per service the commands
//! (install, migrate, build, start) and the paths that must answer 200.
//!
//! Read from disk at every use (operators add releases without a
//! restart) and validated whole: an error names the release and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use semver::{Version, VersionReq};
use serde::{Deserialize, Serialize};

/// The services of a shop, in the order they are prepared and started.
pub const SERVICES: [&str; 3] = ["backend", "admin", "store"];

/// Engines a release may require, and how their version is found.
pub const ENGINES: [&str; 2] = ["node", "postgresql"];

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("release catalog {path}: {message}")]
    Unreadable { path: String, message: String },
    #[error("release catalog {path}: {entry}: {field}: {message}")]
    Invalid {
        path: String,
        entry: String,
        field: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    releases: Vec<RawRelease>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelease {
    version: String,
    #[serde(default)]
    upgradable_from: Vec<String>,
    #[serde(default)]
    engines: BTreeMap<String, String>,
    services: BTreeMap<String, RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    archive: String,
    sha256: String,
    install: Option<String>,
    migrate: Option<String>,
    build: Option<String>,
    start: String,
    health: Vec<String>,
}

/// One release of the shop.
#[derive(Debug, Clone, Serialize)]
pub struct Release {
    pub version: Version,
    #[serde(serialize_with = "reqs")]
    pub upgradable_from: Vec<VersionReq>,
    #[serde(serialize_with = "engine_reqs")]
    pub engines: BTreeMap<String, VersionReq>,
    pub services: BTreeMap<String, Service>,
}

/// A service of a release: where its code is and how it runs.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    #[serde(skip)]
    pub archive: PathBuf,
    pub sha256: String,
    pub install: Option<String>,
    pub migrate: Option<String>,
    pub build: Option<String>,
    /// Run with `sh -c` in the service's directory; it must listen on
    /// 127.0.0.1:`$PORT`.
    pub start: String,
    /// Paths that must answer 200 before traffic is switched.
    pub health: Vec<String>,
}

fn reqs<S: serde::Serializer>(v: &[VersionReq], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|r| r.to_string()))
}

fn engine_reqs<S: serde::Serializer>(v: &BTreeMap<String, VersionReq>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(v.iter().map(|(k, r)| (k, r.to_string())))
}

impl Release {
    /// Whether a shop at `from` may be upgraded to this release.
    pub fn accepts(&self, from: &Version) -> bool {
        self.upgradable_from.iter().any(|r| r.matches(from))
    }

    pub fn service(&self, name: &str) -> &Service {
        &self.services[name]
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Catalog {
    pub releases: Vec<Release>,
}

impl Catalog {
    /// Reads and validates `path`; a missing file is an empty catalog.
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Catalog::default()),
            Err(e) => {
                return Err(CatalogError::Unreadable {
                    path: shown,
                    message: e.to_string(),
                });
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        Catalog::parse(&text, base).map_err(|e| match e {
            CatalogError::Unreadable { message, .. } => CatalogError::Unreadable { path: shown, message },
            CatalogError::Invalid {
                entry,
                field,
                message,
                ..
            } => CatalogError::Invalid {
                path: shown,
                entry,
                field,
                message,
            },
        })
    }

    /// Parses a catalog whose archive paths are relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Catalog, CatalogError> {
        let raw: RawCatalog = serde_json::from_str(text).map_err(|e| CatalogError::Unreadable {
            path: String::new(),
            message: e.to_string(),
        })?;
        let mut releases: Vec<Release> = Vec::with_capacity(raw.releases.len());
        for (i, r) in raw.releases.into_iter().enumerate() {
            let entry = format!("releases[{i}] ({})", r.version);
            let bad = |field: &str, message: String| CatalogError::Invalid {
                path: String::new(),
                entry: entry.clone(),
                field: field.to_string(),
                message,
            };
            let version = Version::parse(&r.version).map_err(|e| {
                bad(
                    "version",
                    format!("`{}` is not a semantic version: {e}", r.version),
                )
            })?;
            if releases.iter().any(|o| o.version == version) {
                return Err(bad("version", format!("{version} is listed twice")));
            }
            let upgradable_from = r
                .upgradable_from
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    VersionReq::parse(s).map_err(|e| {
                        bad(
                            &format!("upgradable_from[{j}]"),
                            format!("`{s}` is not a semver range: {e}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut engines = BTreeMap::new();
            for (name, req) in &r.engines {
                if !ENGINES.contains(&name.as_str()) {
                    return Err(bad(
                        &format!("engines.{name}"),
                        format!("unknown engine (known: {})", ENGINES.join(", ")),
                    ));
                }
                let req = VersionReq::parse(req).map_err(|e| {
                    bad(
                        &format!("engines.{name}"),
                        format!("`{req}` is not a semver range: {e}"),
                    )
                })?;
                engines.insert(name.clone(), req);
            }
            for name in r.services.keys() {
                if !SERVICES.contains(&name.as_str()) {
                    return Err(bad(
                        &format!("services.{name}"),
                        format!("unknown service (a shop has {})", SERVICES.join(", ")),
                    ));
                }
            }
            let mut services = BTreeMap::new();
            for name in SERVICES {
                let field = |f: &str| format!("services.{name}.{f}");
                let s = r
                    .services
                    .get(name)
                    .ok_or_else(|| bad(&format!("services.{name}"), "missing".into()))?;
                let archive = Path::new(&s.archive);
                if s.archive.is_empty()
                    || archive.is_absolute()
                    || archive
                        .components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(bad(
                        &field("archive"),
                        "must be a relative path inside the catalog's directory".into(),
                    ));
                }
                if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(&field("sha256"), "must be 64 hex digits".into()));
                }
                for (f, cmd) in [
                    ("install", s.install.as_deref()),
                    ("migrate", s.migrate.as_deref()),
                    ("build", s.build.as_deref()),
                    ("start", Some(s.start.as_str())),
                ] {
                    if cmd.is_some_and(|c| c.trim().is_empty() || c.len() > 4096) {
                        return Err(bad(&field(f), "must be a command of 1-4096 bytes".into()));
                    }
                }
                if s.health.is_empty() {
                    return Err(bad(
                        &field("health"),
                        "needs at least one path that answers 200".into(),
                    ));
                }
                if let Some(p) = s.health.iter().find(|p| !portico_config::is_http_path(p)) {
                    return Err(bad(&field("health"), format!("`{p}` is not a path")));
                }
                services.insert(
                    name.to_string(),
                    Service {
                        archive: base.join(archive),
                        sha256: s.sha256.to_ascii_lowercase(),
                        install: s.install.clone(),
                        migrate: s.migrate.clone(),
                        build: s.build.clone(),
                        start: s.start.clone(),
                        health: s.health.clone(),
                    },
                );
            }
            releases.push(Release {
                version,
                upgradable_from,
                engines,
                services,
            });
        }
        releases.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(Catalog { releases })
    }

    pub fn get(&self, v: &Version) -> Option<&Release> {
        self.releases.iter().find(|r| &r.version == v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str, patch: impl Fn(&mut serde_json::Value)) -> String {
        let svc = |h: &str| serde_json::json!({ "archive": format!("{version}/x.tar.gz"), "sha256": "a".repeat(64), "start": "run", "health": [h] });
        let mut r = serde_json::json!({
            "version": version,
            "upgradable_from": [">=1.0.0, <2.0.0"],
            "engines": { "postgresql": ">=13" },
            "services": { "backend": svc("/health"), "admin": svc("/"), "store": svc("/") }
        });
        patch(&mut r);
        serde_json::json!({ "releases": [r] }).to_string()
    }

    fn error(text: &str) -> String {
        Catalog::parse(text, Path::new("/c")).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_release_parses_with_archives_under_the_catalog() {
        let c = Catalog::parse(&release("2.0.0", |_| {}), Path::new("/c")).unwrap();
        let r = c.get(&Version::new(2, 0, 0)).unwrap();
        assert!(r.accepts(&Version::new(1, 4, 0)));
        assert!(!r.accepts(&Version::new(0, 9, 0)));
        assert_eq!(r.service("store").archive, Path::new("/c/2.0.0/x.tar.gz"));
    }

    #[test]
    fn errors_name_the_release_and_the_field() {
        let e = error(&release("2.0", |_| {}));
        assert!(e.contains("releases[0] (2.0): version"), "{e}");
        let e = error(&release("2.0.0", |r| {
            r["services"]["admin"]["sha256"] = "xyz".into()
        }));
        assert!(
            e.contains("(2.0.0): services.admin.sha256: must be 64 hex"),
            "{e}"
        );
        let e = error(&release("2.0.0", |r| {
            r["services"]["store"]["archive"] = "../../etc/x".into()
        }));
        assert!(e.contains("services.store.archive"), "{e}");
        let e = error(&release("2.0.0", |r| r["upgradable_from"][0] = "one".into()));
        assert!(e.contains("upgradable_from[0]"), "{e}");
        let e = error(&release("2.0.0", |r| r["engines"]["php"] = ">=8".into()));
        assert!(e.contains("engines.php: unknown engine"), "{e}");
        let e = error(&release("2.0.0", |r| {
            r["services"].as_object_mut().unwrap().remove("backend");
        }));
        assert!(e.contains("services.backend: missing"), "{e}");
        let e = error(&release("2.0.0", |r| {
            r["services"]["backend"]["health"] = serde_json::json!([])
        }));
        assert!(e.contains("services.backend.health"), "{e}");
        let e = error(&release("2.0.0", |r| r["colour"] = "blue".into()));
        assert!(e.contains("unknown field `colour`"), "{e}");
    }
}
