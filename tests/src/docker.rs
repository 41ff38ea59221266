//! The Docker engine for PaaS tests, through the `docker` CLI (so what the
//! tests read back does not come from the code under test).
//!
//! There is no image registry here: [`test_image`] builds a tiny image
//! `FROM scratch` with Debian's static busybox (`sh`, `httpd`, `sleep`).
//! Tests call [`available`] first and skip, loudly, only when no engine
//! answers.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The image every PaaS test app builds on.
pub const TEST_IMAGE: &str = "portico-test/busybox:1";

/// Whether a Docker engine answers; prints why not when it does not.
pub fn available() -> bool {
    match Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
    {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "\n*** SKIPPED: no Docker engine answers (docker version: {}) ***\n",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("\n*** SKIPPED: the docker CLI cannot run: {e} ***\n");
            false
        }
    }
}

/// Runs `docker args…`, returning stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds [`TEST_IMAGE`] unless it exists (tests in parallel may both
/// build it; the result is the same).
pub fn test_image() -> &'static str {
    let exists = Command::new("docker")
        .args(["image", "inspect", TEST_IMAGE])
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.is_file(),
            "/bin/busybox is missing: install Debian's busybox-static (scripts/test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(busybox, dir.path().join("busybox")).unwrap();
        std::fs::write(
            dir.path().join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
             ENV PATH=/bin\nCMD [\"sh\"]\n",
        )
        .unwrap();
        docker(&["build", "-q", "-t", TEST_IMAGE, dir.path().to_str().unwrap()]);
    }
    TEST_IMAGE
}

/// `docker inspect` of one object, as JSON.
pub fn inspect(id: &str) -> Value {
    let text = docker(&["inspect", id]);
    let v: Value = serde_json::from_str(&text).expect("inspect JSON");
    v[0].clone()
}

/// Ids of the containers (all states) labelled for `app`.
pub fn containers_of(app: &str) -> Vec<String> {
    labelled(&["ps", "-aq"], app)
}

/// Ids of the images labelled for `app`.
pub fn images_of(app: &str) -> Vec<String> {
    labelled(&["images", "-q"], app)
}

fn labelled(list: &[&str], app: &str) -> Vec<String> {
    let filter = format!("label=portico.app={app}");
    let mut args = list.to_vec();
    args.extend(["--no-trunc", "--filter", &filter]);
    docker(&args).lines().map(str::to_string).collect()
}

/// Removes everything labelled for `app` (test cleanup).
pub fn purge(app: &str) {
    for c in containers_of(app) {
        let _ = Command::new("docker").args(["rm", "-f", &c]).output();
    }
    for i in images_of(app) {
        let _ = Command::new("docker").args(["rmi", "-f", &i]).output();
    }
}

/// A git repository in `dir` whose files are `files`, committed.
pub fn git_repo(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    if !dir.join(".git").exists() {
        git(dir, &["init", "-q", "-b", "main"]);
    }
    commit(dir, files, "initial");
}

/// Writes `files` into the repository in `dir` and commits them.
pub fn commit(dir: &Path, files: &[(&str, &str)], message: &str) {
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    git(dir, &["add", "-A"]);
    git(
        dir,
        &[
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.com",
            "commit",
            "-q",
            "-m",
            message,
        ],
    );
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
