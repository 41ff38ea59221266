//! The systemd units stay hardened: `systemd-analyze security` exposure
//! stays at most 2.0 for each (a fully hardened network daemon scores ~1.6).

use std::process::Command;

#[test]
fn units_are_hardened() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("SKIPPED LOUDLY: systemd-analyze is not installed; unit hardening not checked");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd");
    for (file, instance) in [
        ("portico-gateway.service", "portico-gateway.service"),
        ("portico-chat@.service", "portico-chat@1.service"),
        ("portico-jobs.service", "portico-jobs.service"),
        (
            "portico-shop@.service",
            "portico-shop@shop-a-1_0_0-t1-store.service",
        ),
    ] {
        let unit = dir.path().join(instance);
        std::fs::copy(format!("{src}/{file}"), &unit).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=20"])
            .arg(&unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{instance} exposure above 2.0:\n{text}");
    }
}

/// A chat instance's port comes from its own environment file, never from
/// pasting the instance number into a port (`910%i` is 91010 for @10).
#[test]
fn chat_instances_take_their_port_from_their_own_environment_file() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/systemd/portico-chat@.service"
    ))
    .unwrap();
    let keys: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(
        keys.contains(&"EnvironmentFile=/etc/portico/chat-%i.env"),
        "{unit}"
    );
    assert!(
        !keys.iter().any(|l| l.contains("LISTEN") && l.contains("%i")),
        "{unit}"
    );
}

/// `systemd-analyze verify` finds nothing to say about any unit (unknown
/// keys, bad values, a missing executable), with `ExecStart` pointed at
/// the binaries just built.
#[test]
fn units_verify_clean() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("SKIPPED LOUDLY: systemd-analyze is not installed; units not verified");
        return;
    }
    let bin_dir = portico_tests::bins::jobs()
        .parent()
        .unwrap()
        .display()
        .to_string();
    portico_tests::bins::gateway();
    portico_tests::bins::chat();
    let dir = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd");
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().replace("@.", "@1.");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin", &bin_dir);
        std::fs::write(dir.path().join(&name), text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(&name))
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && said.trim().is_empty(), "{name}:\n{said}");
    }
}
