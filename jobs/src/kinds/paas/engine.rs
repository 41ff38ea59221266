//! The Docker engine, through bollard: build images from a context tar,
//! run capped containers on a random loopback port, inspect, log, measure
//! and remove them. Everything Portico creates carries the label
//! `portico.app=<name>` (and `portico.task=<id>`), so what exists can be
//! rebuilt from Docker itself.
//!
//! The connection is made on first use and the API version negotiated
//! (engines older than bollard's default speak an older API).

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, InspectContainerOptions, ListContainersOptions,
    ListImagesOptions, LogsOptions, RemoveContainerOptions, RemoveImageOptions, StatsOptions,
    StopContainerOptions,
};
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use super::PaasError;

/// The label naming the app a container or image belongs to.
pub const APP_LABEL: &str = "portico.app";
/// The label naming the deploy task that made it.
pub const TASK_LABEL: &str = "portico.task";
/// The label naming the Portico installation (`paas.instance`): several
/// may share one engine without touching each other's containers.
pub const INSTANCE_LABEL: &str = "portico.instance";

/// Resource caps of an app container.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub max_restarts: i64,
}

pub struct Engine {
    addr: String,
    instance: String,
    docker: OnceCell<Docker>,
}

impl Engine {
    pub fn new(addr: &str, instance: &str) -> Engine {
        Engine {
            addr: addr.to_string(),
            instance: instance.to_string(),
            docker: OnceCell::new(),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The labels of everything made for `app` by `task`.
    pub fn labels(&self, app: &str, task: i64) -> HashMap<String, String> {
        HashMap::from([
            (INSTANCE_LABEL.to_string(), self.instance.clone()),
            (APP_LABEL.to_string(), app.to_string()),
            (TASK_LABEL.to_string(), task.to_string()),
        ])
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> PaasError {
        PaasError::Unreachable {
            addr: self.addr.clone(),
            reason: e.to_string(),
        }
    }

    /// The client, connected and version-negotiated (retried on every call
    /// until it succeeds once).
    pub async fn docker(&self) -> Result<&Docker, PaasError> {
        self.docker
            .get_or_try_init(|| async {
                let d = if let Some(path) = self.addr.strip_prefix("unix://") {
                    Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)
                } else {
                    Docker::connect_with_http(&self.addr, 120, bollard::API_DEFAULT_VERSION)
                }
                .map_err(|e| self.unreachable(e))?;
                tokio::time::timeout(Duration::from_secs(3), d.negotiate_version())
                    .await
                    .map_err(|_| self.unreachable("no answer within 3 s"))?
                    .map_err(|e| self.unreachable(e))
            })
            .await
    }

    /// Checks that the engine answers now.
    pub async fn ping(&self) -> Result<(), PaasError> {
        let d = self.docker().await?;
        match tokio::time::timeout(Duration::from_secs(3), d.ping()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.unreachable(e)),
            Err(_) => Err(self.unreachable("no answer within 3 s")),
        }
    }

    fn err(&self, e: bollard::errors::Error) -> PaasError {
        use bollard::errors::Error as E;
        match e {
            E::HyperResponseError { .. } | E::IOError { .. } | E::RequestTimeoutError => self.unreachable(e),
            e => PaasError::Docker(e.to_string()),
        }
    }

    /// Builds `tag` from a context tar; `line` receives each line of the
    /// build output. On failure the error carries the last lines.
    pub async fn build(
        &self,
        context: Vec<u8>,
        dockerfile: &str,
        tag: &str,
        labels: HashMap<String, String>,
        mut line: impl FnMut(&str),
    ) -> Result<(), PaasError> {
        let d = self.docker().await?;
        let opts = BuildImageOptions {
            dockerfile: dockerfile.to_string(),
            t: Some(tag.to_string()),
            labels: Some(labels),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        let mut tail: Vec<String> = Vec::new();
        let mut keep = |l: &str, tail: &mut Vec<String>| {
            line(l);
            if tail.len() == 20 {
                tail.remove(0);
            }
            tail.push(l.to_string());
        };
        let mut stream = d.build_image(opts, None, Some(bollard::body_full(context.into())));
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = info.stream.as_deref() {
                        for l in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
                            keep(l, &mut tail);
                        }
                    }
                    if let Some(err) = info.error_detail.and_then(|d| d.message) {
                        keep(&err, &mut tail);
                        return Err(PaasError::Build(tail.join("\n")));
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    keep(&error, &mut tail);
                    return Err(PaasError::Build(tail.join("\n")));
                }
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(())
    }

    /// The one TCP port an image exposes, if exactly one.
    pub async fn exposed_port(&self, image: &str) -> Result<Option<u16>, PaasError> {
        let d = self.docker().await?;
        let i = d.inspect_image(image).await.map_err(|e| self.err(e))?;
        let ports: Vec<u16> = i
            .config
            .and_then(|c| c.exposed_ports)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.strip_suffix("/tcp")?.parse().ok())
            .collect();
        Ok((ports.len() == 1).then(|| ports[0]))
    }

    /// Creates and starts a container of `image` publishing `port` on
    /// 127.0.0.1 at a port Docker picks; returns its id.
    pub async fn run(
        &self,
        name: &str,
        image: &str,
        port: u16,
        labels: HashMap<String, String>,
        limits: Limits,
    ) -> Result<String, PaasError> {
        let d = self.docker().await?;
        let key = format!("{port}/tcp");
        let host = HostConfig {
            memory: Some(limits.memory_bytes),
            memory_swap: Some(limits.memory_bytes),
            nano_cpus: Some(limits.nano_cpus),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::ON_FAILURE),
                maximum_retry_count: Some(limits.max_restarts),
            }),
            port_bindings: Some(HashMap::from([(
                key.clone(),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(String::new()),
                }]),
            )])),
            // Hosted code gets no new privileges from setuid binaries.
            security_opt: Some(vec!["no-new-privileges".into()]),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            labels: Some(labels),
            exposed_ports: Some(vec![key]),
            host_config: Some(host),
            ..Default::default()
        };
        let created = d
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_string()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| self.err(e))?;
        d.start_container(&created.id, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(created.id)
    }

    /// What inspect says about a container.
    pub async fn inspect(&self, id: &str) -> Result<Option<Inspected>, PaasError> {
        let d = self.docker().await?;
        let i = match d.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                return Ok(None);
            }
            Err(e) => return Err(self.err(e)),
        };
        let state = i.state.unwrap_or_default();
        let host = i.host_config.unwrap_or_default();
        let host_port = i
            .network_settings
            .and_then(|n| n.ports)
            .unwrap_or_default()
            .into_values()
            .flatten()
            .flatten()
            .find_map(|b| b.host_port?.parse().ok());
        Ok(Some(Inspected {
            status: state.status.map(|s| s.to_string()).unwrap_or_default(),
            running: state.running.unwrap_or(false),
            restarting: state.restarting.unwrap_or(false),
            exit_code: state.exit_code.unwrap_or(0),
            oom_killed: state.oom_killed.unwrap_or(false),
            restart_count: i.restart_count.unwrap_or(0),
            host_port,
            memory: host.memory.unwrap_or(0),
            memory_swap: host.memory_swap.unwrap_or(0),
            nano_cpus: host.nano_cpus.unwrap_or(0),
            restart_policy: host
                .restart_policy
                .map(|p| {
                    (
                        p.name.map(|n| n.to_string()).unwrap_or_default(),
                        p.maximum_retry_count.unwrap_or(0),
                    )
                })
                .unwrap_or_default(),
        }))
    }

    /// The last `n` lines of a container's output (stdout and stderr).
    pub async fn log_tail(&self, id: &str, n: usize) -> String {
        let Ok(d) = self.docker().await else {
            return String::new();
        };
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            tail: n.to_string(),
            ..Default::default()
        };
        let mut out = String::new();
        let mut s = d.logs(id, Some(opts));
        while let Some(Ok(chunk)) = s.next().await {
            out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            if out.len() > 64 * 1024 {
                break;
            }
        }
        out
    }

    /// A container's log stream (for the API's tail and follow).
    pub async fn logs(
        &self,
        id: &str,
        tail: usize,
        follow: bool,
    ) -> Result<
        impl futures_util::Stream<Item = Result<bytes::Bytes, bollard::errors::Error>> + use<>,
        PaasError,
    > {
        let d = self.docker().await?.clone();
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            follow,
            tail: tail.to_string(),
            ..Default::default()
        };
        Ok(d.logs(id, Some(opts)).map(|r| r.map(|c| c.into_bytes())))
    }

    /// Memory in use, its limit, and CPU use (percent of one CPU) now.
    pub async fn stats(&self, id: &str) -> Result<Option<Stats>, PaasError> {
        let d = self.docker().await?;
        let opts = StatsOptions {
            stream: false,
            one_shot: false,
        };
        let Some(s) = d.stats(id, Some(opts)).next().await else {
            return Ok(None);
        };
        let s = s.map_err(|e| self.err(e))?;
        let mem = s.memory_stats.unwrap_or_default();
        let (cpu, pre) = (
            s.cpu_stats.unwrap_or_default(),
            s.precpu_stats.unwrap_or_default(),
        );
        let total = |c: &bollard::models::ContainerCpuStats| {
            c.cpu_usage.as_ref().and_then(|u| u.total_usage).unwrap_or(0)
        };
        let cpu_delta = total(&cpu).saturating_sub(total(&pre)) as f64;
        let sys_delta = cpu
            .system_cpu_usage
            .unwrap_or(0)
            .saturating_sub(pre.system_cpu_usage.unwrap_or(0)) as f64;
        let cpus = cpu.online_cpus.unwrap_or(1) as f64;
        Ok(Some(Stats {
            memory_bytes: mem.usage.unwrap_or(0),
            memory_limit_bytes: mem.limit.unwrap_or(0),
            cpu_percent: if sys_delta > 0.0 {
                (cpu_delta / sys_delta * cpus * 100.0 * 100.0).round() / 100.0
            } else {
                0.0
            },
        }))
    }

    pub async fn stop(&self, id: &str) -> Result<(), PaasError> {
        let d = self.docker().await?;
        match d
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(5),
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    pub async fn start(&self, id: &str) -> Result<(), PaasError> {
        let d = self.docker().await?;
        match d.start_container(id, None).await {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => {
                Ok(())
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Removes a container (stopping it); a missing one is fine.
    pub async fn remove_container(&self, id: &str) -> Result<(), PaasError> {
        let d = self.docker().await?;
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match d.remove_container(id, Some(opts)).await {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                Ok(())
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Removes an image; a missing one is fine.
    pub async fn remove_image(&self, image: &str) -> Result<(), PaasError> {
        let d = self.docker().await?;
        let opts = RemoveImageOptions {
            force: true,
            ..Default::default()
        };
        match d.remove_image(image, Some(opts), None).await {
            Ok(_) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// This installation's objects, of one app or of all.
    fn label_filter(&self, app: Option<&str>) -> HashMap<String, Vec<String>> {
        let mut labels = vec![format!("{INSTANCE_LABEL}={}", self.instance)];
        labels.push(match app {
            Some(a) => format!("{APP_LABEL}={a}"),
            None => APP_LABEL.to_string(),
        });
        HashMap::from([("label".to_string(), labels)])
    }

    /// Every Portico container (of `app`, or of all apps), running or not.
    pub async fn containers(&self, app: Option<&str>) -> Result<Vec<ContainerSummary>, PaasError> {
        let d = self.docker().await?;
        let opts = ListContainersOptions {
            all: true,
            filters: Some(self.label_filter(app)),
            ..Default::default()
        };
        d.list_containers(Some(opts)).await.map_err(|e| self.err(e))
    }

    /// Every Portico image (of `app`, or of all apps): (id, tags, labels).
    pub async fn images(
        &self,
        app: Option<&str>,
    ) -> Result<Vec<(String, Vec<String>, HashMap<String, String>)>, PaasError> {
        let d = self.docker().await?;
        let opts = ListImagesOptions {
            filters: Some(self.label_filter(app)),
            ..Default::default()
        };
        let list = d.list_images(Some(opts)).await.map_err(|e| self.err(e))?;
        Ok(list.into_iter().map(|i| (i.id, i.repo_tags, i.labels)).collect())
    }
}

/// What a deploy and the status API need from `inspect`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspected {
    pub status: String,
    pub running: bool,
    pub restarting: bool,
    pub exit_code: i64,
    pub oom_killed: bool,
    pub restart_count: i64,
    pub host_port: Option<u16>,
    pub memory: i64,
    pub memory_swap: i64,
    pub nano_cpus: i64,
    pub restart_policy: (String, i64),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub cpu_percent: f64,
}
