//! The shipped Prometheus configuration and rules (deploy/prometheus/)
//! are valid, and every alert fires on its case and stays silent on the
//! other (`promtool test rules`, Debian's `prometheus` package).

use std::process::Command;

fn promtool(args: &[&str]) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (scripts/test installs prometheus)");
    assert!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_scrape_config_is_valid() {
    promtool(&["check", "config", "prometheus.yml"]);
}

#[test]
fn the_rules_are_valid_and_every_alert_is_tested() {
    promtool(&["check", "rules", "rules/portico.rules.yml"]);
    promtool(&["test", "rules", "tests/portico.test.yml"]);
    // Every alert of the rules has a case in the tests.
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/rules/portico.rules.yml"
    ))
    .unwrap();
    let tests = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/tests/portico.test.yml"
    ))
    .unwrap();
    for line in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        let fired = tests.matches(&format!("alertname: {line}")).count();
        assert!(
            fired >= 2 || (fired >= 1 && tests.contains(&format!("{line}\n        exp_alerts: []"))),
            "alert {line} needs a firing and a silent case"
        );
    }
}
