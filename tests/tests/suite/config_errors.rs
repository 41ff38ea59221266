//! A bad configuration stops every binary with exit code 2 and one line
//! that names the key (issue: foundation).

use std::process::Command;

use portico_tests::bins;

fn check(bin: &std::path::Path, file_body: Option<&str>, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin);
    match file_body {
        Some(body) => {
            let path = dir.path().join("portico.toml");
            std::fs::write(&path, body).unwrap();
            cmd.arg("--config").arg(&path);
        }
        None => {
            cmd.arg("--config").arg(dir.path().join("missing.toml"));
        }
    }
    if bin.ends_with("portico") {
        cmd.arg("check-config");
    } else {
        cmd.arg("--check-config");
    }
    cmd.env_remove("PORTICO_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_refused(bin: &std::path::Path, body: Option<&str>, env: &[(&str, &str)], must_name: &[&str]) {
    let (code, err) = check(bin, body, env);
    assert_eq!(code, 2, "exit code for {body:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for s in must_name {
        assert!(err.contains(s), "error {err:?} should name {s:?}");
    }
}

#[test]
fn every_binary_refuses_bad_config_with_exit_2() {
    for bin in [bins::portico(), bins::chat(), bins::jobs(), bins::gateway()] {
        assert_refused(
            &bin,
            Some("[chat]\nlisten_adress = \"127.0.0.1:1\"\n"),
            &[],
            &["chat", "listen_adress"],
        );
        assert_refused(
            &bin,
            Some("[chat]\nmax_connections = \"lots\"\n"),
            &[],
            &["chat.max_connections"],
        );
        assert_refused(
            &bin,
            Some("[jobs]\nlisten = \"127.0.0.1:99999\"\n"),
            &[],
            &["jobs.listen", "out of range"],
        );
        assert_refused(&bin, None, &[], &["missing.toml"]);
        assert_refused(
            &bin,
            Some(""),
            &[("PORTICO_GATEWAY__THREADS", "0")],
            &["gateway.threads"],
        );
        assert_refused(&bin, Some("[chat\n"), &[], &["portico.toml"]);
    }
}

#[test]
fn a_good_config_passes_the_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/portico.toml");
    for bin in [bins::portico(), bins::chat(), bins::jobs(), bins::gateway()] {
        let mut cmd = Command::new(&bin);
        cmd.arg("--config").arg(example).env_remove("PORTICO_CONFIG");
        if bin.ends_with("portico") {
            cmd.arg("check-config");
        } else {
            cmd.arg("--check-config");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
