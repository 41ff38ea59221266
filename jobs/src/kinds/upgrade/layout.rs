//! A shop's tree on disk, and the steps that change it. Blocking: callers
//! run these on `spawn_blocking`.
//!
//! ```text
//! customers/<domain>/
//!   releases/<version>/{backend,admin,store}   one directory per release
//!   current -> releases/<version>              flipped by rename(2)
//!   shared/uploads                             kept across releases
//!   run/<instance>.json                        how each instance starts
//! ```
//!
//! A shop in the old layout (`backend/`, `admin/`, `store/` at the root) is
//! moved into it on its first upgrade ([`migrate`]). Every step checks what
//! is already done, so a run killed at any point and run again reaches the
//! same end state; each move is one rename, so no upload is lost or copied.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use semver::Version;
use serde::Serialize;

use super::catalog::{Release, SERVICES};

/// Written last into an unpacked release: the task that unpacked it.
pub const MARKER: &str = ".portico-release";
/// Largest `.env` or `.env.example` read.
const MAX_ENV_BYTES: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Conflict(String),
    #[error("archive {archive}: sha256 {actual}, the catalog says {expected}")]
    Checksum {
        archive: String,
        expected: String,
        actual: String,
    },
    #[error("archive {archive}: {reason}")]
    Archive { archive: String, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn releases_dir(root: &Path) -> PathBuf {
    root.join("releases")
}

pub fn release_dir(root: &Path, v: &Version) -> PathBuf {
    releases_dir(root).join(v.to_string())
}

fn is_real_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// The release `current` points to, if it is a `releases/<version>` link.
pub fn current(root: &Path) -> Option<Version> {
    let target = fs::read_link(root.join("current")).ok()?;
    let name = target.file_name()?.to_str()?;
    Version::parse(name).ok()
}

/// Whether the shop still has its services at the root.
pub fn is_old_layout(root: &Path) -> bool {
    !exists(&root.join("current")) && SERVICES.iter().any(|s| is_real_dir(&root.join(s)))
}

/// The version the shop runs: `current`'s, or in the old layout the
/// backend's `package.json` version.
pub fn installed_version(root: &Path) -> Option<Version> {
    if let Some(v) = current(root) {
        return Some(v);
    }
    let text = fs::read_to_string(root.join("backend/package.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    Version::parse(json["version"].as_str()?).ok()
}

/// Where a service of `v` lives: its release directory, or the root in the
/// old layout.
pub fn service_dir(root: &Path, v: &Version, service: &str) -> PathBuf {
    let in_release = release_dir(root, v).join(service);
    if !exists(&in_release) && is_old_layout(root) {
        root.join(service)
    } else {
        in_release
    }
}

/// Points `link` at `target` atomically (a new link renamed over it).
fn relink(link: &Path, target: &Path) -> Result<(), LayoutError> {
    let tmp = link.with_file_name(format!(
        ".{}.tmp-{}",
        link.file_name().and_then(|n| n.to_str()).unwrap_or("link"),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp).map_err(io(&tmp))?;
    fs::rename(&tmp, link).map_err(io(link))
}

/// What [`migrate`] did.
#[derive(Debug, Default, Serialize)]
pub struct Migrated {
    pub moved_services: Vec<String>,
    pub moved_uploads: bool,
    pub linked_current: bool,
}

/// Moves an old-layout shop at version `v` into the release layout (see
/// the module docs). Idempotent; `stop_after` (tests) ends it early, as a
/// crash would.
pub fn migrate(root: &Path, v: &Version, stop_after: Option<usize>) -> Result<Migrated, LayoutError> {
    let mut done = Migrated::default();
    let mut step = 0usize;
    let mut tick = || {
        step += 1;
        stop_after.is_some_and(|n| step > n)
    };
    if current(root).is_some() {
        return Ok(done);
    }
    let release = release_dir(root, v);
    fs::create_dir_all(&release).map_err(io(&release))?;
    fs::create_dir_all(root.join("shared")).map_err(io(root))?;
    for s in SERVICES {
        if tick() {
            return Ok(done);
        }
        let (old, new) = (root.join(s), release.join(s));
        match (is_real_dir(&old), exists(&new)) {
            (true, false) => {
                fs::rename(&old, &new).map_err(io(&old))?;
                done.moved_services.push(s.to_string());
            }
            (true, true) => {
                return Err(LayoutError::Conflict(format!(
                    "both {} and {} exist: move one away by hand",
                    old.display(),
                    new.display()
                )));
            }
            _ => {}
        }
    }
    if tick() {
        return Ok(done);
    }
    let (uploads, shared) = (release.join("backend/uploads"), root.join("shared/uploads"));
    if is_real_dir(&uploads) {
        if exists(&shared) {
            return Err(LayoutError::Conflict(format!(
                "both {} and {} exist: merge them by hand",
                uploads.display(),
                shared.display()
            )));
        }
        fs::rename(&uploads, &shared).map_err(io(&uploads))?;
        done.moved_uploads = true;
    }
    if tick() {
        return Ok(done);
    }
    if is_real_dir(&shared) && !exists(&uploads) && is_real_dir(&release.join("backend")) {
        relink(&uploads, Path::new("../../../shared/uploads"))?;
    }
    if tick() {
        return Ok(done);
    }
    let marker = release.join(MARKER);
    if !marker.exists() {
        fs::write(&marker, "migrated from the old layout\n").map_err(io(&marker))?;
    }
    relink(&root.join("current"), &Path::new("releases").join(v.to_string()))?;
    done.linked_current = true;
    Ok(done)
}

/// Points `current` at release `v` (atomically).
pub fn switch_current(root: &Path, v: &Version) -> Result<(), LayoutError> {
    if current(root).as_ref() == Some(v) {
        return Ok(());
    }
    relink(&root.join("current"), &Path::new("releases").join(v.to_string()))
}

/// Whether release `v` is completely on disk.
pub fn is_complete(root: &Path, v: &Version) -> bool {
    release_dir(root, v).join(MARKER).is_file()
}

/// Checks an archive against the catalog's sha256.
pub fn verify(archive: &Path, expected: &str) -> Result<(), LayoutError> {
    let (actual, _) = crate::archive::sha256_file(archive).map_err(io(archive))?;
    if actual != expected {
        return Err(LayoutError::Checksum {
            archive: archive.display().to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Unpacks `r` into `releases/<version>` for task `task`: checksums first,
/// then every archive into a staging directory (entries checked: plain
/// files and directories only, nothing outside), the marker last, and one
/// rename into place. A complete unpack by the same task is kept; anything
/// else there (a failed earlier upgrade's directory) is replaced.
pub fn unpack(root: &Path, r: &Release, task: i64) -> Result<bool, LayoutError> {
    let dir = release_dir(root, &r.version);
    let stamp = format!("task {task}\n");
    if fs::read_to_string(dir.join(MARKER)).is_ok_and(|m| m == stamp) {
        return Ok(false);
    }
    if current(root).as_ref() == Some(&r.version) {
        return Err(LayoutError::Conflict(format!(
            "release {} is the current one",
            r.version
        )));
    }
    for s in SERVICES {
        let svc = r.service(s);
        verify(&svc.archive, &svc.sha256)?;
    }
    let releases = releases_dir(root);
    fs::create_dir_all(&releases).map_err(io(&releases))?;
    let staging = releases.join(format!(".{}.partial", r.version));
    let _ = fs::remove_dir_all(&staging);
    for s in SERVICES {
        let svc = r.service(s);
        let into = staging.join(s);
        fs::create_dir_all(&into).map_err(io(&into))?;
        crate::archive::unpack_tar_gz(&svc.archive, &into, true).map_err(|e| LayoutError::Archive {
            archive: svc.archive.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    let shared = root.join("shared/uploads");
    fs::create_dir_all(&shared).map_err(io(&shared))?;
    let uploads = staging.join("backend/uploads");
    if is_real_dir(&uploads) {
        fs::remove_dir_all(&uploads).map_err(io(&uploads))?;
    }
    relink(&uploads, Path::new("../../../shared/uploads"))?;
    fs::write(staging.join(MARKER), &stamp).map_err(io(&staging))?;
    if exists(&dir) {
        let _ = fs::remove_dir_all(&dir);
    }
    fs::rename(&staging, &dir).map_err(io(&dir))?;
    Ok(true)
}

/// Keys of a `.env` text, in order (comments and blank lines skipped).
pub fn env_keys(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_string(), v.trim().to_string()))
        })
        .collect()
}

fn read_small(path: &Path) -> Result<Option<String>, LayoutError> {
    match fs::File::open(path) {
        Ok(f) => {
            let mut s = String::new();
            f.take(MAX_ENV_BYTES).read_to_string(&mut s).map_err(io(path))?;
            Ok(Some(s))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// A service's `.env` change: keys only, never values.
#[derive(Debug, Default, Clone, Serialize)]
pub struct EnvDiff {
    /// New in the release's `.env.example`: added with its default.
    pub added: Vec<String>,
    /// In the current `.env` but not in the example: kept, no longer used.
    pub unused: Vec<String>,
    pub kept: usize,
}

impl EnvDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
    }
}

/// The diff between a current `.env` and a release's `.env.example`.
pub fn env_diff(current: &str, example: &str) -> EnvDiff {
    let cur = env_keys(current);
    let ex = env_keys(example);
    let has = |list: &[(String, String)], k: &str| list.iter().any(|(c, _)| c == k);
    EnvDiff {
        added: ex
            .iter()
            .filter(|(k, _)| !has(&cur, k))
            .map(|(k, _)| k.clone())
            .collect(),
        unused: cur
            .iter()
            .filter(|(k, _)| !has(&ex, k))
            .map(|(k, _)| k.clone())
            .collect(),
        kept: cur.iter().filter(|(k, _)| has(&ex, k)).count(),
    }
}

/// Writes `new_dir/.env` (mode 600): the current `.env` as it is, plus the
/// keys new in `new_dir/.env.example` with their defaults. Recomputed from
/// the same inputs on every run, so a re-run writes the same file.
pub fn merge_env(current_dir: Option<&Path>, new_dir: &Path) -> Result<EnvDiff, LayoutError> {
    let current = match current_dir {
        Some(d) => read_small(&d.join(".env"))?.unwrap_or_default(),
        None => String::new(),
    };
    let example = read_small(&new_dir.join(".env.example"))?.unwrap_or_default();
    let diff = env_diff(&current, &example);
    let mut out = current.clone();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let defaults: BTreeMap<String, String> = env_keys(&example).into_iter().collect();
    if !diff.added.is_empty() {
        out.push_str("# added by the upgrade to this release\n");
        for k in &diff.added {
            out.push_str(&format!("{k}={}\n", defaults[k]));
        }
    }
    let path = new_dir.join(".env");
    portico_common::files::write_private(&path, out.as_bytes()).map_err(io(&path))?;
    Ok(diff)
}

/// A file of an archive (e.g. `.env.example`), without unpacking it.
pub fn archive_member(archive: &Path, name: &str) -> Result<Option<String>, LayoutError> {
    let bad = |reason: String| LayoutError::Archive {
        archive: archive.display().to_string(),
        reason,
    };
    let f = fs::File::open(archive).map_err(io(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    for entry in tar.entries().map_err(|e| bad(e.to_string()))? {
        let entry = entry.map_err(|e| bad(e.to_string()))?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let rel: PathBuf = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        if rel == Path::new(name) {
            let mut s = String::new();
            entry
                .take(MAX_ENV_BYTES)
                .read_to_string(&mut s)
                .map_err(|e| bad(e.to_string()))?;
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// Deletes the oldest complete releases beyond `keep`, never `current` nor
/// `previous`; returns the versions deleted.
pub fn retain(root: &Path, keep: usize, previous: Option<&Version>) -> Vec<String> {
    let cur = current(root);
    let mut versions: Vec<Version> = fs::read_dir(releases_dir(root))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Version::parse(e.file_name().to_str()?).ok())
        .filter(|v| Some(v) != cur.as_ref() && Some(v) != previous)
        .collect();
    versions.sort();
    let excess = versions.len().saturating_sub(keep);
    versions
        .into_iter()
        .take(excess)
        .filter(|v| fs::remove_dir_all(release_dir(root, v)).is_ok())
        .map(|v| v.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for e in walk(root) {
            let rel = e.strip_prefix(root).unwrap().display().to_string();
            let m = fs::symlink_metadata(&e).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&e).unwrap().display())
            } else if m.is_file() {
                fs::read_to_string(&e).unwrap()
            } else {
                "dir".into()
            };
            out.insert(rel, what);
        }
        out
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            v.push(path.clone());
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                v.extend(walk(&path));
            }
        }
        v
    }

    fn old_shop(root: &Path) {
        for s in SERVICES {
            fs::create_dir_all(root.join(s)).unwrap();
            fs::write(root.join(s).join("index.html"), s).unwrap();
        }
        fs::write(root.join("backend/package.json"), r#"{"version": "1.2.0"}"#).unwrap();
        fs::create_dir_all(root.join("backend/uploads/2024")).unwrap();
        fs::write(root.join("backend/uploads/a.jpg"), "A").unwrap();
        fs::write(root.join("backend/uploads/2024/b.jpg"), "B").unwrap();
    }

    #[test]
    fn migration_killed_at_any_step_reaches_the_same_end() {
        let v = Version::new(1, 2, 0);
        let whole = tempfile::tempdir().unwrap();
        old_shop(whole.path());
        assert_eq!(installed_version(whole.path()), Some(v.clone()));
        assert!(is_old_layout(whole.path()));
        migrate(whole.path(), &v, None).unwrap();
        let want = tree(whole.path());
        assert_eq!(want["current"], "-> releases/1.2.0");
        assert_eq!(want["shared/uploads/a.jpg"], "A");
        assert_eq!(want["shared/uploads/2024/b.jpg"], "B");
        assert_eq!(
            want["releases/1.2.0/backend/uploads"],
            "-> ../../../shared/uploads"
        );
        assert_eq!(
            fs::read_to_string(whole.path().join("current/backend/uploads/a.jpg")).unwrap(),
            "A"
        );
        assert!(!is_old_layout(whole.path()));
        for k in 0..8 {
            let d = tempfile::tempdir().unwrap();
            old_shop(d.path());
            migrate(d.path(), &v, Some(k)).unwrap();
            // Uploads are in exactly one place at every point.
            let t = tree(d.path());
            let copies = t
                .iter()
                .filter(|(p, c)| p.ends_with("a.jpg") && *c == "A")
                .count();
            assert_eq!(copies, 1, "after {k} steps: {t:?}");
            migrate(d.path(), &v, None).unwrap();
            assert_eq!(tree(d.path()), want, "killed after {k} steps");
            // And once more: nothing changes.
            migrate(d.path(), &v, None).unwrap();
            assert_eq!(tree(d.path()), want);
        }
    }

    #[test]
    fn env_merge_adds_new_keys_and_keeps_values() {
        let d = tempfile::tempdir().unwrap();
        let (cur, new) = (d.path().join("cur"), d.path().join("new"));
        fs::create_dir_all(&cur).unwrap();
        fs::create_dir_all(&new).unwrap();
        fs::write(
            cur.join(".env"),
            "# db\nDATABASE_URL=postgres://secret\nOLD_FLAG=1\n",
        )
        .unwrap();
        fs::write(
            new.join(".env.example"),
            "DATABASE_URL=postgres://example\nCACHE_TTL=60\n",
        )
        .unwrap();
        let diff = merge_env(Some(&cur), &new).unwrap();
        assert_eq!(diff.added, ["CACHE_TTL"]);
        assert_eq!(diff.unused, ["OLD_FLAG"]);
        let text = fs::read_to_string(new.join(".env")).unwrap();
        assert!(text.contains("DATABASE_URL=postgres://secret\n"), "{text}");
        assert!(text.contains("CACHE_TTL=60\n"));
        assert!(!text.contains("postgres://example"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(new.join(".env")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Again: the same file.
        merge_env(Some(&cur), &new).unwrap();
        assert_eq!(fs::read_to_string(new.join(".env")).unwrap(), text);
    }
}
