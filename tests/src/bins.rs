//! Paths of the project's binaries, built on demand with the profile the
//! tests were built with.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The profile directory (`…/target/debug` or `…/target/release`) of the
/// running binary: a test in `target/<profile>/deps/`, or a tool such as
/// `portico-loadtest` in `target/<profile>/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("an executable lives in a directory");
    if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of binary `name` of package `package`, building it if missing.
pub fn bin(package: &str, name: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let path = profile_dir().join(name);
    if !path.exists() {
        let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        if !path.exists() {
            let release = profile_dir().ends_with("release");
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "-p", package, "--bin", name]);
            if release {
                cmd.arg("--release");
            }
            let ok = cmd.status().is_ok_and(|s| s.success());
            assert!(ok, "building {name} failed");
        }
    }
    path
}

pub fn portico() -> PathBuf {
    bin("portico", "portico")
}
pub fn chat() -> PathBuf {
    bin("portico-chat", "portico-chat")
}
pub fn jobs() -> PathBuf {
    bin("portico-jobs", "portico-jobs")
}
pub fn gateway() -> PathBuf {
    bin("portico-gateway", "portico-gateway")
}
