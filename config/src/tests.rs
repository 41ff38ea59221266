#![allow(clippy::result_large_err)] // figment::Error is large; tests only.

use super::*;
use figment::Jail;

fn err(jail_setup: impl FnOnce(&mut Jail) -> figment::error::Result<Option<&'static str>>) -> String {
    let mut out = String::new();
    Jail::expect_with(|jail| {
        let file = jail_setup(jail)?;
        out = load(file.map(Path::new))
            .expect_err("config must be refused")
            .to_string();
        Ok(())
    });
    out
}

#[test]
fn defaults_are_valid_and_embedded() {
    Jail::expect_with(|_| {
        let c = load(None).expect("defaults load");
        assert_eq!(c.chat.bus, BusKind::Memory);
        assert_eq!(
            c.chat.store,
            StoreKind::Sqlite,
            "history survives a restart by default"
        );
        assert_eq!(c.gateway.https_listen.port(), 8443);
        Ok(())
    });
}

#[test]
fn layers_file_then_env() {
    Jail::expect_with(|jail| {
        jail.create_file("p.toml", "[chat]\nlisten = \"127.0.0.1:7000\"\nshard_id = 3\n")?;
        jail.set_env("PORTICO_CHAT__SHARD_ID", "9");
        let c = load(Some(Path::new("p.toml"))).expect("loads");
        assert_eq!(c.chat.listen.port(), 7000, "file overrides default");
        assert_eq!(c.chat.shard_id, 9, "env overrides file");
        Ok(())
    });
}

#[test]
fn unknown_key_is_named_with_its_file() {
    let e = err(|j| {
        j.create_file("p.toml", "[chat]\nlisten_addr = \"127.0.0.1:7000\"\n")?;
        Ok(Some("p.toml"))
    });
    assert!(e.contains("p.toml"), "{e}");
    assert!(e.contains("listen_addr"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}

#[test]
fn wrong_type_is_named() {
    let e = err(|j| {
        j.create_file("p.toml", "[chat]\nmax_connections = \"many\"\n")?;
        Ok(Some("p.toml"))
    });
    assert!(e.contains("chat.max_connections"), "{e}");
}

#[test]
fn port_out_of_range_is_named() {
    let e = err(|j| {
        j.create_file("p.toml", "[gateway]\nhttps_listen = \"127.0.0.1:70000\"\n")?;
        Ok(Some("p.toml"))
    });
    assert!(e.contains("gateway.https_listen"), "{e}");
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn env_error_names_the_variable() {
    let e = err(|j| {
        j.set_env("PORTICO_CHAT__LISTEN", "nowhere");
        Ok(None)
    });
    assert!(e.contains("chat.listen"), "{e}");
    assert!(e.contains("PORTICO_CHAT__LISTEN"), "{e}");
}

#[test]
fn missing_file_is_an_error() {
    let e = err(|_| Ok(Some("does-not-exist.toml")));
    assert!(e.contains("does-not-exist.toml"), "{e}");
}

#[test]
fn cross_field_rules_name_the_key() {
    let e = err(|j| {
        j.create_file("p.toml", "[chat]\nbus = \"redis\"\n")?;
        Ok(Some("p.toml"))
    });
    assert!(e.contains("chat.redis_url"), "{e}");
    let e = err(|j| {
        j.set_env("PORTICO_AUTH__JWT_SECRET", "short");
        Ok(None)
    });
    assert!(e.contains("auth.jwt_secret"), "{e}");
    assert!(!e.contains("short"), "a secret is never echoed: {e}");
}

#[test]
fn the_bus_and_its_url_must_agree() {
    // A cluster URL given to the single-server engine, and the reverse.
    for (bus, url, says) in [
        ("redis", "redis-cluster://127.0.0.1:7000", "redis_cluster"),
        ("redis_cluster", "redis://127.0.0.1:6379", "seed nodes"),
        ("redis_cluster", "", "is required"),
    ] {
        let e = err(|j| {
            let url_line = if url.is_empty() {
                String::new()
            } else {
                format!("redis_url = \"{url}\"\n")
            };
            j.create_file("p.toml", &format!("[chat]\nbus = \"{bus}\"\n{url_line}"))?;
            Ok(Some("p.toml"))
        });
        assert!(
            e.contains("chat.redis_url") && e.contains(says),
            "{bus} {url}: {e}"
        );
    }
    Jail::expect_with(|j| {
        j.create_file(
            "p.toml",
            "[chat]\nbus = \"redis_cluster\"\nredis_url = \"redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001\"\n",
        )?;
        let c = load(Some(Path::new("p.toml"))).expect("a cluster URL for the cluster engine loads");
        assert_eq!(c.chat.bus, BusKind::RedisCluster);
        Ok(())
    });
}

#[test]
fn secret_is_not_printed() {
    let s = Secret::new("hunter2-hunter2");
    assert!(!format!("{s:?}").contains("hunter2"));
}

#[test]
fn listen_addr_parsing() {
    assert!("127.0.0.1:1".parse::<ListenAddr>().is_ok());
    assert!("[::1]:80".parse::<ListenAddr>().is_ok());
    assert!(
        "127.0.0.1:0"
            .parse::<ListenAddr>()
            .unwrap_err()
            .contains("out of range")
    );
    assert!("127.0.0.1".parse::<ListenAddr>().is_err());
    assert!("example.com:80".parse::<ListenAddr>().is_err());
}

#[test]
fn a_route_naming_an_undefined_limit_class_is_refused() {
    let e = err(|j| {
        j.create_file(
            "p.toml",
            "[[gateway.routes]]\nname = \"api\"\npath_prefix = \"/api/x\"\nupstream = \"127.0.0.1:7000\"\nlimit_class = \"nope\"\n",
        )?;
        Ok(Some("p.toml"))
    });
    assert!(e.contains("gateway.routes") && e.contains("`nope`"), "{e}");
}

#[test]
fn connection_limits_are_checked() {
    let e = err(|j| {
        j.set_env("PORTICO_GATEWAY__CONNECTIONS__MAX_HEADER_BYTES", "10");
        Ok(None)
    });
    assert!(e.contains("gateway.connections.max_header_bytes"), "{e}");
    let e = err(|j| {
        j.set_env("PORTICO_GATEWAY__CONNECTIONS__HEADER_TIMEOUT_SECS", "0");
        Ok(None)
    });
    assert!(e.contains("gateway.connections.header_timeout_secs"), "{e}");
    refused_naming_keys(&[
        (
            "PORTICO_GATEWAY__CONNECTIONS__HANDSHAKE_TIMEOUT_SECS",
            "0",
            "gateway.connections.handshake_timeout_secs",
        ),
        (
            "PORTICO_GATEWAY__CONNECTIONS__BODY_TIMEOUT_SECS",
            "0",
            "gateway.connections.body_timeout_secs",
        ),
        (
            "PORTICO_GATEWAY__CONNECTIONS__BODY_MIN_BYTES_PER_SEC",
            "0",
            "gateway.connections.body_min_bytes_per_sec",
        ),
        (
            "PORTICO_GATEWAY__CONNECTIONS__SEND_TIMEOUT_SECS",
            "0",
            "gateway.connections.send_timeout_secs",
        ),
    ]);
}

/// Each (variable, value) is refused with an error naming `key`.
fn refused_naming_keys(cases: &[(&str, &str, &str)]) {
    for (var, value, key) in cases {
        let e = err(|j| {
            j.set_env(var, value);
            Ok(None)
        });
        assert!(e.contains(key), "{var}={value}: {e}");
    }
}

#[test]
fn jobs_keys_are_checked() {
    refused_naming_keys(&[
        ("PORTICO_JOBS__LEASE_SECS", "2", "jobs.lease_secs"),
        (
            "PORTICO_JOBS__CUSTOMERS_ROOT",
            "relative/dir",
            "jobs.customers_root",
        ),
        ("PORTICO_JOBS__CHAT_URL", "ftp://x", "jobs.chat_url"),
        ("PORTICO_JOBS__WORKERS", "0", "jobs.workers"),
        (
            "PORTICO_JOBS__UPGRADE__STEP_TIMEOUT_SECS",
            "0",
            "jobs.upgrade.step_timeout_secs",
        ),
        (
            "PORTICO_JOBS__UPGRADE__GATEWAY_URL",
            "http://127.0.0.1:80",
            "jobs.upgrade.gateway_url",
        ),
        (
            "PORTICO_JOBS__UPGRADE__SUPERVISORCTL",
            "[]",
            "jobs.upgrade.supervisorctl",
        ),
        (
            "PORTICO_JOBS__UPGRADE__SYSTEMD_UNIT",
            "shop@.service",
            "jobs.upgrade.systemd_unit",
        ),
        (
            "PORTICO_JOBS__UPGRADE__COMMAND_START",
            "start {instance}",
            "jobs.upgrade.command_start",
        ),
        ("PORTICO_JOBS__UPGRADE__DRAIN", "5", "jobs.upgrade.drain"),
        (
            "PORTICO_JOBS__MAIL__GATE_MIN_RATIO",
            "1.5",
            "jobs.mail.gate_min_ratio",
        ),
        ("PORTICO_JOBS__MAIL__KEYS__K1", "c2hvcnQ=", "jobs.mail.keys.k1"),
        (
            "PORTICO_JOBS__MAIL__MAX_CONCURRENT_MAILBOXES",
            "0",
            "jobs.mail.max_concurrent_mailboxes",
        ),
    ]);
}

#[test]
fn paas_keys_are_checked() {
    refused_naming_keys(&[
        ("PORTICO_PAAS__DOMAIN", "not a domain", "paas.domain"),
        ("PORTICO_PAAS__DOCKER", "tcp://1.2.3.4:2375", "paas.docker"),
        ("PORTICO_PAAS__INSTANCE", "Bad_Name", "paas.instance"),
        (
            "PORTICO_PAAS__LOCAL_REPOS_ROOT",
            "relative",
            "paas.local_repos_root",
        ),
        ("PORTICO_PAAS__IMAGES__STATIC", "with space", "paas.images.static"),
        ("PORTICO_PAAS__MEMORY_MB", "1", "paas.memory_mb"),
        ("PORTICO_PAAS__CPUS", "0", "paas.cpus"),
        ("PORTICO_PAAS__HEALTH__PATH", "health", "paas.health.path"),
        (
            "PORTICO_PAAS__HEALTH__DEADLINE_SECS",
            "0",
            "paas.health.deadline_secs",
        ),
        ("PORTICO_PAAS__ROUTES_POLL_MS", "5", "paas.routes_poll_ms"),
        ("PORTICO_PAAS__MAX_RESTARTS", "1000", "paas.max_restarts"),
    ]);
    let e = err(|j| {
        j.create_file("p.toml", "[paas.images]\nruby = \"ruby:3\"\n")?;
        Ok(Some("p.toml"))
    });
    assert!(e.contains("ruby"), "unknown image kinds are refused: {e}");
}
