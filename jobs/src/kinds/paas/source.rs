//! Where an app's code comes from and how it is built: repository and ref
//! validation, `git clone` (the real CLI, arguments only, never a shell),
//! type detection and the generated Dockerfile per type.
//!
//! Not here: the build context tar ([`super::context`]) and Docker itself
//! ([`super::engine`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use portico_config::PaasImages;

use super::PaasError;

/// A validated repository location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repo {
    /// A local repository (canonical path under `paas.local_repos_root`).
    Local(PathBuf),
    /// An `https://` URL without credentials.
    Https(String),
}

impl Repo {
    /// Checks `s` (a path, `file://` or `https://` URL). Local repositories
    /// must lie under `local_root`; URLs may carry no credentials.
    pub fn parse(s: &str, local_root: Option<&Path>) -> Result<Repo, String> {
        if s.is_empty() || s.len() > 2048 {
            return Err("repository must be 1-2048 characters".into());
        }
        if s.bytes().any(|b| b.is_ascii_control() || b == b' ') || s.starts_with('-') {
            return Err("repository contains spaces, control characters or starts with -".into());
        }
        if let Some(rest) = s.strip_prefix("https://") {
            let url = reqwest::Url::parse(s).map_err(|e| format!("repository URL: {e}"))?;
            if !url.username().is_empty()
                || url.password().is_some()
                || rest.split('/').next().is_some_and(|a| a.contains('@'))
            {
                return Err("repository URLs may not carry credentials".into());
            }
            if url.host_str().is_none_or(str::is_empty) {
                return Err("repository URL has no host".into());
            }
            return Ok(Repo::Https(url.to_string()));
        }
        let path = match s.strip_prefix("file://") {
            Some(p) => p,
            None if s.starts_with('/') => s,
            None => return Err("repository must be an absolute path, a file:// or an https:// URL".into()),
        };
        let root = local_root.ok_or("local repositories are disabled: set paas.local_repos_root")?;
        let canonical = Path::new(path)
            .canonicalize()
            .map_err(|e| format!("repository {path}: {e}"))?;
        let root = root
            .canonicalize()
            .map_err(|e| format!("paas.local_repos_root {}: {e}", root.display()))?;
        if !canonical.starts_with(&root) {
            return Err(format!("repository {path} is not under paas.local_repos_root"));
        }
        if !canonical.is_dir() {
            return Err(format!("repository {path} is not a directory"));
        }
        Ok(Repo::Local(canonical))
    }

    /// What `git clone` is given: local repositories as `file://` URLs, so
    /// a shallow clone works and no hard links into them are made.
    fn clone_url(&self) -> String {
        match self {
            Repo::Local(p) => format!("file://{}", p.display()),
            Repo::Https(u) => u.clone(),
        }
    }
}

/// A branch or tag name: letters, digits and `._/-`, no `..`, not
/// starting with `-` or `/`.
pub fn is_git_ref(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with(['-', '/', '.'])
        && !s.contains("..")
        && !s.ends_with(['/', '.'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
}

/// Clones `repo` at `git_ref` (default branch if none) into `dest` (which
/// must not exist), shallowly and without submodules; returns the commit.
pub async fn clone(
    repo: &Repo,
    git_ref: Option<&str>,
    dest: &Path,
    timeout: Duration,
) -> Result<String, PaasError> {
    let mut cmd = git();
    cmd.args(["clone", "--quiet", "--depth", "1", "--single-branch", "--no-tags"]);
    if let Some(r) = git_ref {
        cmd.args(["--branch", r]);
    }
    cmd.arg("--").arg(repo.clone_url()).arg(dest);
    run_git(cmd, timeout, "git clone").await?;
    let mut rev = git();
    rev.arg("-C").arg(dest).args(["rev-parse", "HEAD"]);
    Ok(run_git(rev, timeout, "git rev-parse").await?.trim().to_string())
}

/// A `git` with no prompts, no system or user configuration, and only the
/// file and https transports (for the clone and anything it pulls in).
fn git() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("git");
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_ALLOW_PROTOCOL", "file:https")
        .env("GIT_ASKPASS", "/bin/false")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn run_git(
    mut cmd: tokio::process::Command,
    timeout: Duration,
    what: &str,
) -> Result<String, PaasError> {
    let child = cmd
        .spawn()
        .map_err(|e| PaasError::Clone(format!("{what}: cannot run git: {e}")))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| PaasError::Clone(format!("{what}: timed out after {}s", timeout.as_secs())))?
        .map_err(|e| PaasError::Clone(format!("{what}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(PaasError::Clone(format!(
            "{what} failed: {}",
            last_lines(&err, 5)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` non-empty lines of `text`, joined with ` | `.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// What kind of app a repository holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The repository brings its own `Dockerfile`.
    Dockerfile,
    Nextjs,
    Python,
    /// Static files; the site root relative to the repository (`.` or `public`).
    Static(&'static str),
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Dockerfile => "dockerfile",
            Kind::Nextjs => "nextjs",
            Kind::Python => "python",
            Kind::Static(_) => "static",
        }
    }
}

/// Detects the app type, in this order: a `Dockerfile`; a `package.json`
/// that depends on `next`; `requirements.txt` or `pyproject.toml`;
/// `index.html` at the root or in `public/`.
pub fn detect(dir: &Path) -> Result<Kind, PaasError> {
    let file = |p: &str| dir.join(p).is_file();
    if file("Dockerfile") {
        return Ok(Kind::Dockerfile);
    }
    if file("package.json") {
        let text = std::fs::read_to_string(dir.join("package.json"))
            .map_err(|e| PaasError::Detect(format!("package.json: {e}")))?;
        let pkg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| PaasError::Detect(format!("package.json is not valid JSON: {e}")))?;
        if ["dependencies", "devDependencies"]
            .iter()
            .any(|k| pkg[k].get("next").is_some())
        {
            return Ok(Kind::Nextjs);
        }
    }
    if file("requirements.txt") || file("pyproject.toml") {
        return Ok(Kind::Python);
    }
    if file("index.html") {
        return Ok(Kind::Static("."));
    }
    if file("public/index.html") {
        return Ok(Kind::Static("public"));
    }
    Err(PaasError::Detect(
        "cannot tell how to run this repository: add a Dockerfile, or a package.json with next, \
         a requirements.txt or pyproject.toml, or an index.html (at the root or in public/)"
            .into(),
    ))
}

/// The port generated images listen on, per kind.
pub fn generated_port(kind: &Kind) -> Option<u16> {
    match kind {
        Kind::Dockerfile => None,
        Kind::Nextjs => Some(3000),
        Kind::Python => Some(8000),
        Kind::Static(_) => Some(8080),
    }
}

/// The Dockerfile for a kind without its own, on the configured base image.
pub fn dockerfile(kind: &Kind, images: &PaasImages) -> Option<String> {
    let text = match kind {
        Kind::Dockerfile => return None,
        Kind::Static(root) => format!(
            "FROM {}\nCOPY {root}/ /srv/www/\nEXPOSE 8080\nCMD [\"httpd\", \"-f\", \"-vv\", \"-p\", \"8080\", \"-h\", \"/srv/www\"]\n",
            images.static_site
        ),
        Kind::Nextjs => format!(
            "FROM {}\nWORKDIR /app\nCOPY . .\n\
             RUN if [ -f package-lock.json ]; then npm ci; else npm install; fi && npm run build\n\
             ENV NODE_ENV=production PORT=3000 HOSTNAME=0.0.0.0\nEXPOSE 3000\nCMD [\"npm\", \"start\"]\n",
            images.nextjs
        ),
        Kind::Python => format!(
            "FROM {}\nWORKDIR /app\nCOPY . .\n\
             RUN if [ -f requirements.txt ]; then pip install --no-cache-dir -r requirements.txt; \
             else pip install --no-cache-dir .; fi\n\
             EXPOSE 8000\nCMD [\"uvicorn\", \"main:app\", \"--host\", \"0.0.0.0\", \"--port\", \"8000\"]\n",
            images.python
        ),
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_are_validated() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("site");
        std::fs::create_dir(&repo).unwrap();
        let r = Some(root.path());
        assert!(matches!(
            Repo::parse(repo.to_str().unwrap(), r),
            Ok(Repo::Local(_))
        ));
        assert!(matches!(
            Repo::parse(&format!("file://{}", repo.display()), r),
            Ok(Repo::Local(_))
        ));
        assert_eq!(
            Repo::parse("https://git.example.com/a/b.git", None),
            Ok(Repo::Https("https://git.example.com/a/b.git".into()))
        );
        for (bad, why) in [
            ("https://user:pw@git.example.com/a.git", "credentials"),
            ("ssh://git.example.com/a.git", "absolute path"),
            ("ext::sh -c touch% /tmp/x", "spaces"),
            ("--upload-pack=touch", "starts with -"),
            ("relative/path", "absolute path"),
            ("/etc", "not under"),
            ("", "1-2048"),
        ] {
            let e = Repo::parse(bad, r).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let traversal = format!("{}/../..", repo.display());
        assert!(Repo::parse(&traversal, r).unwrap_err().contains("not under"));
        assert!(
            Repo::parse(repo.to_str().unwrap(), None)
                .unwrap_err()
                .contains("local_repos_root")
        );
    }

    #[test]
    fn refs_are_validated() {
        for good in ["main", "v1.2.3", "feature/x-y_z"] {
            assert!(is_git_ref(good), "{good}");
        }
        for bad in ["", "-x", "/abs", "a..b", "a b", "a;b", "x/", ".hidden", "$(id)"] {
            assert!(!is_git_ref(bad), "{bad}");
        }
    }

    #[test]
    fn detection_follows_the_documented_order() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        assert!(detect(p).is_err());
        std::fs::create_dir(p.join("public")).unwrap();
        std::fs::write(p.join("public/index.html"), "x").unwrap();
        assert_eq!(detect(p).unwrap(), Kind::Static("public"));
        std::fs::write(p.join("index.html"), "x").unwrap();
        assert_eq!(detect(p).unwrap(), Kind::Static("."));
        std::fs::write(p.join("package.json"), r#"{"dependencies": {"express": "4"}}"#).unwrap();
        assert_eq!(detect(p).unwrap(), Kind::Static("."), "package.json without next");
        std::fs::write(p.join("requirements.txt"), "fastapi").unwrap();
        assert_eq!(detect(p).unwrap(), Kind::Python);
        std::fs::write(p.join("package.json"), r#"{"dependencies": {"next": "14"}}"#).unwrap();
        assert_eq!(detect(p).unwrap(), Kind::Nextjs);
        std::fs::write(p.join("Dockerfile"), "FROM scratch").unwrap();
        assert_eq!(detect(p).unwrap(), Kind::Dockerfile);
    }

    #[test]
    fn generated_dockerfiles_use_the_configured_images() {
        let images = PaasImages {
            static_site: "local/busybox:1".into(),
            ..PaasImages::default()
        };
        let s = dockerfile(&Kind::Static("public"), &images).unwrap();
        assert!(
            s.starts_with("FROM local/busybox:1\nCOPY public/ /srv/www/"),
            "{s}"
        );
        assert!(dockerfile(&Kind::Python, &images).unwrap().contains("uvicorn"));
        assert!(
            dockerfile(&Kind::Nextjs, &images)
                .unwrap()
                .starts_with("FROM node:20-alpine")
        );
        assert!(dockerfile(&Kind::Dockerfile, &images).is_none());
    }
}
