//! The reference beside the gateway: Debian's nginx, configured the way a
//! careful operator would for the same job (2 workers, TLS with the
//! gateway's certificate, HTTP/2), started in a private directory and
//! stopped with it. Used by the `proxy`, `idle`, `static` and `edge`
//! scenarios; each skips its nginx half, loudly, when nginx is missing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use portico_tests::free_port;
use portico_tests::proc::Proc;

/// A running nginx; stopped (workers included) when dropped.
pub struct Nginx {
    proc: Proc,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// Whether nginx is installed (`apt-get install nginx-light`).
pub fn available() -> bool {
    Command::new("nginx").arg("-v").output().is_ok()
}

/// nginx's version, e.g. `nginx/1.22.1`.
pub fn version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .replace("nginx version: ", "")
        })
        .unwrap_or_default()
}

impl Nginx {
    /// Starts nginx on a free port: with TLS and HTTP/2 and the certificate
    /// `certs/localhost.{crt,key}`, or plain HTTP without `certs`; `http`
    /// goes into the `http` block (e.g. an `upstream`), `server` into the
    /// one `server` block. Connections are allowed up to the open-file limit
    /// this process passes on.
    pub fn start(certs: Option<&Path>, http: &str, server: &str) -> anyhow::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let conf = dir.path().join("nginx.conf");
        let d = dir.path().display();
        let listen = match certs {
            Some(c) => format!(
                "listen 127.0.0.1:{port} ssl http2;\n    ssl_certificate {c}/localhost.crt;\n    \
                 ssl_certificate_key {c}/localhost.key;",
                c = c.display()
            ),
            None => format!("listen 127.0.0.1:{port};"),
        };
        std::fs::write(
            &conf,
            format!(
                "worker_processes 2;\ndaemon off;\nmaster_process on;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 40000; }}\n\
                 http {{\n  access_log off;\n  client_header_timeout 10s;\n  client_body_timeout 10s;\n\
                 client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
                 uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n{http}\n\
                 server {{\n    {listen}\n{server}  }}\n}}\n"
            ),
        )?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(dir.path());
        let proc = Proc::spawn("nginx", cmd, &dir.path().join("nginx.out"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nginx did not start: {}", proc.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Nginx {
            proc,
            port,
            _dir: dir,
        })
    }

    /// The worker processes (they hold the connections; the master holds
    /// none).
    pub fn workers(&self) -> Vec<u32> {
        crate::sys::children(self.proc.pid())
    }

    /// CPU time of all workers so far.
    pub fn workers_cpu(&self) -> crate::sys::Cpu {
        crate::sys::cpu_of(self.workers())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // A killed master leaves its workers serving: stop them first.
        let workers = self.workers();
        self.proc.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && workers.iter().any(|w| Path::new(&format!("/proc/{w}")).exists()) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
