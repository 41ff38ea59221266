//! The cross-process test suite, one binary: each module is one area,
//! started against real servers by `portico_tests`. One binary instead of
//! one per file: the link step and the disk it takes are paid once (CI ran
//! out of disk with 27 of them).

mod chat_cluster;
mod chat_features;
mod chat_page;
mod chat_protocol;
mod chat_slow;
mod config_errors;
mod console;
mod gateway_acme;
mod gateway_edge;
mod gateway_files;
mod gateway_forward;
mod gateway_hardening;
mod gateway_limits;
mod gateway_reload;
mod gateway_sticky;
mod gateway_systemd;
mod gateway_upgrade;
mod gateway_websocket;
mod harness;
mod jobs_backup;
mod loadtest_instrument;
mod mail;
mod metrics;
mod openapi;
mod paas;
mod postgres_tls;
mod prometheus_live;
mod prometheus_rules;
mod redis_cluster;
mod shutdown;
mod systemd_notify;
mod systemd_units;
mod up;
mod upgrade;
