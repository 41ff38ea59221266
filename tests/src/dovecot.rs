//! A real Dovecot (Debian's `dovecot-imapd`) on a free loopback port, with
//! passwd-file users and maildirs in a temporary directory; a minimal IMAP
//! appender to build corpora (flags, keywords, internal dates), and
//! `doveadm fetch` to read back what a server holds.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::free_port;
use crate::proc::Proc;

pub struct Dovecot {
    proc: Proc,
    dir: tempfile::TempDir,
    pub port: u16,
}

/// One message as `doveadm fetch` reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    pub mailbox: String,
    pub message_id: String,
    pub flags: String,
    pub received: String,
    pub size: u64,
}

impl Dovecot {
    /// Whether Dovecot is installed (scripts/test installs it).
    pub fn available() -> bool {
        std::path::Path::new("/usr/sbin/dovecot").exists()
    }

    /// A server whose folders use `separator`; `special` lists folders
    /// created with a SPECIAL-USE attribute (e.g. `("Sent", "\\Sent")`).
    pub fn start(separator: &str, special: &[(&str, &str)], users: &[(&str, &str)]) -> Dovecot {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["run", "state", "home"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let port = free_port();
        let name = format!("portico-test-{port}");
        let mut mailboxes = String::new();
        for (m, use_) in special {
            mailboxes.push_str(&format!(
                "  mailbox \"{m}\" {{\n    special_use = {use_}\n    auto = subscribe\n  }}\n"
            ));
        }
        let dp = d.display();
        let conf = format!(
            "base_dir = {dp}/run\nstate_dir = {dp}/state\ninstance_name = {name}\nlog_path = {dp}/dovecot.log\n\
             protocols = imap\nlisten = 127.0.0.1\nssl = no\ndisable_plaintext_auth = no\nauth_mechanisms = plain login\n\
             first_valid_uid = 1\nmail_location = maildir:{dp}/home/%u/Maildir\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {dp}/users\n}}\n\
             userdb {{\n  driver = static\n  args = uid=mail gid=mail home={dp}/home/%u\n}}\n\
             namespace inbox {{\n  inbox = yes\n  separator = {separator}\n{mailboxes}}}\n\
             service imap-login {{\n  chroot =\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n  inet_listener imaps {{\n    port = 0\n  }}\n}}\n\
             service anvil {{\n  chroot =\n}}\nmail_max_userip_connections = 100\n"
        );
        std::fs::write(d.join("dovecot.conf"), conf).unwrap();
        let users: String = users.iter().map(|(u, p)| format!("{u}:{{PLAIN}}{p}\n")).collect();
        std::fs::write(d.join("users"), users).unwrap();
        let st = Command::new("chown")
            .args(["-R", "mail:mail"])
            .arg(d.join("home"))
            .status()
            .unwrap();
        assert!(st.success());
        let mut cmd = Command::new("/usr/sbin/dovecot");
        cmd.arg("-F").arg("-c").arg(d.join("dovecot.conf"));
        let proc = Proc::spawn("dovecot", cmd, &d.join("out.log"));
        let dv = Dovecot { proc, dir, port };
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return dv;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("dovecot did not listen: {}", dv.proc.log());
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("dovecot.conf")
    }

    /// Every message of `user`: mailbox, Message-Id, flags, internal date.
    pub fn held(&self, user: &str) -> Vec<Held> {
        let out = Command::new("doveadm")
            .arg("-c")
            .arg(self.conf())
            .args([
                "-f",
                "tab",
                "fetch",
                "-u",
                user,
                "mailbox hdr.message-id flags date.received size.physical",
                "all",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut v: Vec<Held> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let c: Vec<&str> = l.split('\t').collect();
                let mut flags: Vec<&str> = c
                    .get(2)
                    .unwrap_or(&"")
                    .split_whitespace()
                    .filter(|f| *f != "\\Recent")
                    .collect();
                flags.sort();
                Held {
                    mailbox: c[0].to_string(),
                    message_id: c.get(1).unwrap_or(&"").to_string(),
                    flags: flags.join(" "),
                    received: c.get(3).unwrap_or(&"").to_string(),
                    size: c.get(4).and_then(|s| s.parse().ok()).unwrap_or(0),
                }
            })
            .collect();
        v.sort();
        v
    }

    /// Messages per mailbox of `user`.
    pub fn counts(&self, user: &str) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for h in self.held(user) {
            *m.entry(h.mailbox).or_insert(0) += 1;
        }
        m
    }

    pub fn imap(&self, user: &str, password: &str) -> Imap {
        Imap::login(self.port, user, password)
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(": Info: ") || l.contains("Disconnected"))
                .rev()
                .take(20)
                .collect();
            eprintln!(
                "dovecot on {} (warnings and errors, newest first):\n{}",
                self.port,
                tail.join("\n")
            );
        }
        self.proc.stop("TERM", Duration::from_secs(5));
    }
}

/// Just enough IMAP to build a corpus: LOGIN, CREATE, APPEND (LITERAL+).
pub struct Imap {
    r: BufReader<TcpStream>,
    w: TcpStream,
    tag: u32,
}

impl Imap {
    pub fn login(port: u16, user: &str, password: &str) -> Imap {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut i = Imap {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            tag: 0,
        };
        let mut greeting = String::new();
        i.r.read_line(&mut greeting).unwrap();
        i.cmd(format!("LOGIN \"{user}\" \"{password}\"").as_bytes());
        i
    }

    /// Sends a command; panics unless it ends OK.
    pub fn cmd(&mut self, c: &[u8]) -> String {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        self.w.write_all(format!("{tag} ").as_bytes()).unwrap();
        self.w.write_all(c).unwrap();
        self.w.write_all(b"\r\n").unwrap();
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "connection closed");
            all.push_str(&line);
            if line.starts_with(&format!("{tag} ")) {
                assert!(
                    line.starts_with(&format!("{tag} OK")),
                    "{}: {all}",
                    String::from_utf8_lossy(c)
                );
                return all;
            }
        }
    }

    pub fn create(&mut self, mailbox: &str) {
        self.cmd(format!("CREATE \"{mailbox}\"").as_bytes());
    }

    /// Appends a message with flags (e.g. `\Seen $Work`) and an internal
    /// date (`01-Jan-2015 10:00:00 +0000`).
    pub fn append(&mut self, mailbox: &str, flags: &str, date: &str, body: &[u8]) {
        let mut c = format!(
            "APPEND \"{mailbox}\" ({flags}) \"{date}\" {{{}+}}\r\n",
            body.len()
        )
        .into_bytes();
        c.extend_from_slice(body);
        self.cmd(&c);
    }
}
