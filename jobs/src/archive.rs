//! tar.gz archives for backups and restores (the `tar` and `flate2` crates;
//! no shelling out). Blocking code: run it on `spawn_blocking`.
//!
//! Writing walks a tree, skips excluded names and symbolic links (a link
//! could point anywhere; restores refuse them), throttles reads, counts
//! bytes for progress and hashes the archive (SHA-256) as it is written.
//! Files are created 600. Reading is for restores: only regular files and
//! directories, no path that leaves the target (absolute, `..`, or through
//! an existing symbolic link).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

/// Shared between a running backup and its progress reporter.
#[derive(Debug, Default)]
pub struct Meter {
    /// Source bytes read so far.
    pub bytes: AtomicU64,
    pub cancelled: AtomicBool,
    /// Reads per second allowed (0: unlimited).
    pub max_bytes_per_sec: u64,
    started: std::sync::OnceLock<Instant>,
}

impl Meter {
    pub fn new(max_bytes_per_sec: u64) -> Arc<Meter> {
        Arc::new(Meter {
            max_bytes_per_sec,
            ..Meter::default()
        })
    }

    fn add(&self, n: usize) -> io::Result<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            // Not `Interrupted`: `io::copy` retries those forever.
            return Err(io::Error::other("cancelled"));
        }
        let total = self.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if self.max_bytes_per_sec > 0 {
            let started = *self.started.get_or_init(Instant::now);
            let due = Duration::from_secs_f64(total as f64 / self.max_bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

/// Which entries a service archive leaves out.
#[derive(Debug, Clone)]
pub struct Excludes {
    /// Directory names skipped at any depth (node_modules, .next, dist, logs).
    pub names: Vec<&'static str>,
    /// Paths (relative to the archive root) skipped, e.g. `backend/uploads`.
    pub paths: Vec<PathBuf>,
}

impl Excludes {
    fn skips(&self, rel: &Path) -> bool {
        self.paths.iter().any(|p| rel == p)
            || rel
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| self.names.contains(&n))
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub size: u64,
    pub sha256: String,
    pub files: u64,
}

/// Sizes of the files an archive of `dirs` would read (the disk estimate).
pub fn tree_size(base: &Path, dirs: &[PathBuf], ex: &Excludes) -> u64 {
    fn walk(base: &Path, rel: &Path, ex: &Excludes) -> u64 {
        let Ok(meta) = fs::symlink_metadata(base.join(rel)) else {
            return 0;
        };
        if ex.skips(rel) || meta.file_type().is_symlink() {
            0
        } else if meta.is_dir() {
            fs::read_dir(base.join(rel))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| walk(base, &rel.join(e.file_name()), ex))
                .sum()
        } else {
            meta.len()
        }
    }
    dirs.iter().map(|d| walk(base, d, ex)).sum()
}

/// Writes `out` (mode 600) as a tar.gz of `entries` (paths relative to
/// `base`, each a file or a directory walked recursively).
pub fn write_tar_gz(
    base: &Path,
    entries: &[PathBuf],
    ex: &Excludes,
    out: &Path,
    meter: &Meter,
) -> io::Result<Written> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)?;
    let hashing = HashWriter {
        inner: file,
        hasher: Sha256::new(),
        size: 0,
    };
    let mut tar = tar::Builder::new(GzEncoder::new(hashing, Compression::new(6)));
    tar.follow_symlinks(false);
    let mut files = 0;
    for rel in entries {
        if fs::symlink_metadata(base.join(rel)).is_ok() {
            append(&mut tar, base, rel, ex, meter, &mut files)?;
        }
    }
    let hashing = tar.into_inner()?.finish()?;
    hashing.inner.sync_all()?;
    Ok(Written {
        size: hashing.size,
        sha256: hex::encode(hashing.hasher.finalize()),
        files,
    })
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    base: &Path,
    rel: &Path,
    ex: &Excludes,
    meter: &Meter,
    files: &mut u64,
) -> io::Result<()> {
    let path = base.join(rel);
    let meta = fs::symlink_metadata(&path)?;
    if ex.skips(rel) || meta.file_type().is_symlink() {
        return Ok(());
    }
    let mut header = tar::Header::new_gnu();
    header.set_metadata(&meta);
    if meta.is_dir() {
        header.set_size(0);
        tar.append_data(&mut header, rel, io::empty())?;
        let mut children: Vec<_> = fs::read_dir(&path)?.collect::<Result<_, _>>()?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            append(tar, base, &rel.join(child.file_name()), ex, meter, files)?;
        }
    } else if meta.is_file() {
        let reader = Metered {
            inner: File::open(&path)?,
            meter,
        };
        tar.append_data(&mut header, rel, reader)?;
        *files += 1;
    }
    Ok(())
}

struct Metered<'a, R> {
    inner: R,
    meter: &'a Meter,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.meter.add(n)?;
        Ok(n)
    }
}

struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// SHA-256 and size of a file.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

/// Why an archive cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{archive}: entry `{entry}` is a link or special file; refused")]
    NotPlain { archive: String, entry: String },
    #[error("{archive}: entry `{entry}` would leave the target directory; refused")]
    Escapes { archive: String, entry: String },
    #[error("{archive}: {source}")]
    Io {
        archive: String,
        #[source]
        source: io::Error,
    },
}

/// What unpacking an entry does (dry runs list these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Create(PathBuf),
    Replace(PathBuf),
}

/// Checks every entry of `archive` against `target`; with `apply`, also
/// writes them. Returns the files created or replaced.
pub fn unpack_tar_gz(archive: &Path, target: &Path, apply: bool) -> Result<Vec<Change>, UnpackError> {
    let name = archive.display().to_string();
    let io_err = |source| UnpackError::Io {
        archive: name.clone(),
        source,
    };
    let mut tar = tar::Archive::new(GzDecoder::new(File::open(archive).map_err(io_err)?));
    let mut changes = Vec::new();
    for entry in tar.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        let rel = entry.path().map_err(io_err)?.into_owned();
        let entry_name = rel.display().to_string();
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(UnpackError::NotPlain {
                archive: name.clone(),
                entry: entry_name,
            });
        }
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(UnpackError::Escapes {
                archive: name.clone(),
                entry: entry_name,
            });
        }
        // No existing symbolic link on the way may redirect the write.
        let mut at = target.to_path_buf();
        for c in rel.components() {
            at.push(c);
            if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(UnpackError::Escapes {
                    archive: name.clone(),
                    entry: entry_name,
                });
            }
        }
        let dest = target.join(&rel);
        if kind.is_dir() {
            if apply {
                fs::create_dir_all(&dest).map_err(io_err)?;
            }
            continue;
        }
        changes.push(if dest.exists() {
            Change::Replace(rel.clone())
        } else {
            Change::Create(rel.clone())
        });
        if apply {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(io_err)?;
            }
            let mode = entry.header().mode().unwrap_or(0o600) & 0o777;
            let mut out = File::create(&dest).map_err(io_err)?;
            io::copy(&mut entry, &mut out).map_err(io_err)?;
            out.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err)?;
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("backend");
        fs::create_dir_all(b.join("node_modules/x")).unwrap();
        fs::create_dir_all(b.join("src")).unwrap();
        fs::write(b.join("src/app.js"), "app").unwrap();
        fs::write(b.join("node_modules/x/i.js"), "dep").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", b.join("src/link")).unwrap();
        d
    }

    #[test]
    fn excludes_and_links_are_left_out_and_the_archive_round_trips() {
        let src = tree();
        let out = tempfile::tempdir().unwrap();
        let ex = Excludes {
            names: vec!["node_modules"],
            paths: vec![],
        };
        let archive = out.path().join("backend.tar.gz");
        let meter = Meter::new(0);
        let w = write_tar_gz(src.path(), &[PathBuf::from("backend")], &ex, &archive, &meter).unwrap();
        assert_eq!(w.files, 1);
        assert_eq!(sha256_file(&archive).unwrap(), (w.sha256.clone(), w.size));
        assert_eq!(
            fs::metadata(&archive).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let dest = tempfile::tempdir().unwrap();
        let changes = unpack_tar_gz(&archive, dest.path(), true).unwrap();
        assert_eq!(changes, vec![Change::Create(PathBuf::from("backend/src/app.js"))]);
        assert_eq!(
            fs::read_to_string(dest.path().join("backend/src/app.js")).unwrap(),
            "app"
        );
        assert!(!dest.path().join("backend/node_modules").exists());
    }

    fn evil(path: &str, kind: tar::EntryType) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut tar = tar::Builder::new(GzEncoder::new(f.reopen().unwrap(), Compression::fast()));
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(3);
        h.set_mode(0o644);
        // Bypass the builder's own path checks: write the raw name.
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        if kind == tar::EntryType::Symlink {
            h.set_size(0);
            h.set_link_name("/etc").unwrap();
            h.set_cksum();
            tar.append(&h, io::empty()).unwrap();
        } else {
            h.set_cksum();
            tar.append(&h, &b"bad"[..]).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        f
    }

    #[test]
    fn traversal_and_links_are_refused() {
        let dest = tempfile::tempdir().unwrap();
        let e = unpack_tar_gz(
            evil("../escape", tar::EntryType::Regular).path(),
            dest.path(),
            true,
        )
        .unwrap_err();
        assert!(matches!(e, UnpackError::Escapes { .. }), "{e}");
        let e = unpack_tar_gz(evil("/abs", tar::EntryType::Regular).path(), dest.path(), true).unwrap_err();
        assert!(matches!(e, UnpackError::Escapes { .. }), "{e}");
        let e = unpack_tar_gz(evil("l", tar::EntryType::Symlink).path(), dest.path(), true).unwrap_err();
        assert!(matches!(e, UnpackError::NotPlain { .. }), "{e}");
        assert!(!dest.path().parent().unwrap().join("escape").exists());
    }
}
