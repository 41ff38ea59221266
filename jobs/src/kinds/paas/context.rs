//! The build context: a tar of the cloned repository as Docker receives
//! it, without `.git` and without what `.dockerignore` excludes, plus the
//! generated Dockerfile. Bounded by `paas.max_context_bytes`.
//!
//! `.dockerignore` patterns are relative to the context root (Docker's
//! rule), so each is anchored before it goes to the `ignore` crate's
//! gitignore matcher; `!` exceptions and `**` work as in Docker.

use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use super::PaasError;

/// Where a generated Dockerfile goes in the context (a repository's own
/// `Dockerfile` is used as it is).
pub const GENERATED_DOCKERFILE: &str = ".portico.Dockerfile";

/// Tars `dir` for `docker build`; `dockerfile` is added as
/// [`GENERATED_DOCKERFILE`] when given.
pub fn tar(dir: &Path, dockerfile: Option<&str>, max_bytes: u64) -> Result<Vec<u8>, PaasError> {
    let ignore = dockerignore(dir)?;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let mut total = 0u64;
    let too_big = || {
        PaasError::Context(format!(
            "the build context is larger than paas.max_context_bytes ({max_bytes} bytes)"
        ))
    };
    walk(dir, dir, &ignore, &mut |rel, path, meta| {
        total += meta.len();
        if total > max_bytes {
            return Err(too_big());
        }
        b.append_path_with_name(path, rel)
            .map_err(|e| PaasError::Context(format!("{}: {e}", rel.display())))
    })?;
    if let Some(text) = dockerfile {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, GENERATED_DOCKERFILE, text.as_bytes())
            .map_err(|e| PaasError::Context(e.to_string()))?;
    }
    let bytes = b.into_inner().map_err(|e| PaasError::Context(e.to_string()))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_big());
    }
    Ok(bytes)
}

fn dockerignore(dir: &Path) -> Result<Gitignore, PaasError> {
    let mut b = GitignoreBuilder::new(dir);
    if let Ok(text) = std::fs::read_to_string(dir.join(".dockerignore")) {
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (neg, pat) = match line.strip_prefix('!') {
                Some(p) => ("!", p.trim()),
                None => ("", line),
            };
            let pat = pat.trim_start_matches("./").trim_start_matches('/');
            if pat.is_empty() {
                continue;
            }
            b.add_line(None, &format!("{neg}/{pat}"))
                .map_err(|e| PaasError::Context(format!(".dockerignore: `{line}`: {e}")))?;
        }
    }
    b.build()
        .map_err(|e| PaasError::Context(format!(".dockerignore: {e}")))
}

/// Visits every file, directory and symlink below `dir` (sorted, so a
/// context is reproducible) that is neither `.git` nor ignored.
fn walk(
    root: &Path,
    dir: &Path,
    ignore: &Gitignore,
    visit: &mut dyn FnMut(&Path, &Path, &std::fs::Metadata) -> Result<(), PaasError>,
) -> Result<(), PaasError> {
    let io = |e: std::io::Error| PaasError::Context(format!("{}: {e}", dir.display()));
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("walked below the root");
        if rel == Path::new(".git") {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).map_err(io)?;
        let is_dir = meta.is_dir();
        if ignore.matched_path_or_any_parents(rel, is_dir).is_ignore() {
            // Docker still descends where an exception could re-include.
            if !(is_dir && ignore.num_whitelists() > 0) {
                continue;
            }
        } else if !(is_dir || meta.is_file() || meta.file_type().is_symlink()) {
            continue; // sockets, fifos, devices: not build input
        } else {
            visit(rel, &path, &meta)?;
        }
        if is_dir {
            walk(root, &path, ignore, visit)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn dockerignore_and_git_are_left_out() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for f in [
            ".git/HEAD",
            "index.html",
            "node_modules/x/a.js",
            "logs/keep.log",
            "logs/drop.log",
            "src/secret.env",
            "src/main.js",
            "deep/a/b/c.tmp",
        ] {
            std::fs::create_dir_all(p.join(f).parent().unwrap()).unwrap();
            std::fs::write(p.join(f), "x").unwrap();
        }
        std::fs::write(
            p.join(".dockerignore"),
            "# comment\nnode_modules\nlogs\n!logs/keep.log\n**/*.tmp\nsrc/*.env\n",
        )
        .unwrap();
        let t = tar(p, Some("FROM scratch\n"), 1 << 20).unwrap();
        let n = names(&t);
        for want in [
            "index.html",
            "src/main.js",
            "logs/keep.log",
            ".dockerignore",
            GENERATED_DOCKERFILE,
        ] {
            assert!(n.iter().any(|x| x == want), "{want} missing from {n:?}");
        }
        for gone in [
            ".git",
            "node_modules",
            "logs/drop.log",
            "src/secret.env",
            "deep/a/b/c.tmp",
        ] {
            assert!(!n.iter().any(|x| x.starts_with(gone)), "{gone} present in {n:?}");
        }
    }

    #[test]
    fn oversized_contexts_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("big.bin"), vec![0u8; 64 * 1024]).unwrap();
        let e = tar(d.path(), None, 10_000).unwrap_err();
        assert!(e.to_string().contains("max_context_bytes"), "{e}");
    }
}
