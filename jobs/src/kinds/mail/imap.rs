//! An IMAP session to a source or destination server (async-imap on
//! tokio, rustls with the webpki roots for TLS; plain TCP only to loopback
//! or where `jobs.mail.allow_plain_imap` says so), and the few operations a
//! migration needs: folders, message summaries, a message, APPEND with its
//! flags and internal date.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_imap::types::{Flag, NameAttribute};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::folders::Folder;

/// Where a mailbox lives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub host: String,
    pub port: u16,
    /// Implicit TLS (993); false: plain (loopback or explicitly allowed).
    #[serde(default = "yes")]
    pub tls: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("{server}: {message}")]
    Connect { server: String, message: String },
    #[error("{server}: login of {login} refused: {message}")]
    Login {
        server: String,
        login: String,
        message: String,
    },
    #[error("{0}")]
    Protocol(String),
}

impl ImapError {
    /// Worth another attempt (network, server busy), unlike a refused login.
    pub fn retryable(&self) -> bool {
        !matches!(self, ImapError::Login { .. })
    }
}

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "plain",
            Stream::Tls(_) => "tls",
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A logged-in session.
pub struct Session {
    inner: async_imap::Session<Stream>,
    pub delimiter: String,
    /// The personal namespace prefix (e.g. `INBOX.`), "" if none.
    pub prefix: String,
}

/// One message as listed: enough to decide whether it must be copied.
#[derive(Debug, Clone)]
pub struct Summary {
    pub uid: u32,
    /// Message-Id, or a hash of its identifying headers when it has none.
    pub key: String,
    pub flags: Vec<String>,
    pub internal_date: Option<String>,
    pub size: u32,
}

const TIMEOUT: Duration = Duration::from_secs(120);

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ImapError> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| ImapError::Protocol(format!("{what}: {e}"))),
        Err(_) => Err(ImapError::Protocol(format!(
            "{what}: the server did not answer within 120 s"
        ))),
    }
}

impl Session {
    pub async fn open(
        server: &Server,
        login: &str,
        password: &str,
        allow_plain: bool,
    ) -> Result<Session, ImapError> {
        let shown = format!("{}:{}", server.host, server.port);
        let cerr = |message: String| ImapError::Connect {
            server: shown.clone(),
            message,
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(15),
            TcpStream::connect((server.host.as_str(), server.port)),
        )
        .await
        .map_err(|_| cerr("connect timed out".into()))?
        .map_err(|e| cerr(e.to_string()))?;
        let stream = if server.tls {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| cerr(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(server.host.clone())
                .map_err(|e| cerr(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| cerr(format!("TLS: {e}")))?;
            Stream::Tls(Box::new(tls))
        } else {
            let loopback = tcp.peer_addr().is_ok_and(|a| a.ip().is_loopback());
            if !loopback && !allow_plain {
                return Err(cerr(
                    "plain IMAP to a remote server is refused (set tls, or jobs.mail.allow_plain_imap)"
                        .into(),
                ));
            }
            Stream::Plain(tcp)
        };
        let mut client = async_imap::Client::new(stream);
        timed("greeting", async { client.read_response().await.map(|_| ()) }).await?;
        let mut inner = match tokio::time::timeout(TIMEOUT, client.login(login, password)).await {
            Ok(Ok(s)) => s,
            Ok(Err((e, _))) => {
                return Err(ImapError::Login {
                    server: shown,
                    login: login.to_string(),
                    message: e.to_string(),
                });
            }
            Err(_) => return Err(cerr("login timed out".into())),
        };
        let (delimiter, prefix) = {
            let names: Vec<_> = timed("LIST", async {
                inner
                    .list(Some(""), Some(""))
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            })
            .await?;
            let delimiter = names
                .first()
                .and_then(|n| n.delimiter())
                .unwrap_or("/")
                .to_string();
            // A server that keeps folders under INBOX (Courier, Cyrus) lists
            // only INBOX-prefixed names besides INBOX.
            let all = timed("LIST", async {
                inner
                    .list(Some(""), Some("*"))
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            })
            .await?;
            let under = format!("INBOX{delimiter}");
            let prefix = if all.len() > 1
                && all
                    .iter()
                    .all(|n| n.name().eq_ignore_ascii_case("INBOX") || n.name().starts_with(&under))
            {
                under
            } else {
                String::new()
            };
            (delimiter, prefix)
        };
        Ok(Session {
            inner,
            delimiter,
            prefix,
        })
    }

    pub async fn folders(&mut self) -> Result<Vec<Folder>, ImapError> {
        let names = timed("LIST", async {
            self.inner
                .list(Some(""), Some("*"))
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await?;
        Ok(names
            .iter()
            .map(|n| Folder {
                raw: n.name().to_string(),
                delimiter: n.delimiter().map(str::to_string),
                role: n.attributes().iter().find_map(|a| match a {
                    NameAttribute::Sent => Some("Sent"),
                    NameAttribute::Drafts => Some("Drafts"),
                    NameAttribute::Trash => Some("Trash"),
                    NameAttribute::Junk => Some("Junk"),
                    NameAttribute::Archive => Some("Archive"),
                    _ => None,
                }),
                selectable: !n
                    .attributes()
                    .iter()
                    .any(|a| matches!(a, NameAttribute::NoSelect)),
            })
            .collect())
    }

    /// Selects `folder` read-only; its UIDVALIDITY and message count.
    pub async fn examine(&mut self, folder: &str) -> Result<(u32, u32), ImapError> {
        let m = timed(&format!("EXAMINE {folder}"), self.inner.examine(folder)).await?;
        Ok((m.uid_validity.unwrap_or(0), m.exists))
    }

    /// Creates `folder` (and subscribes to it); an existing one is fine.
    pub async fn create(&mut self, folder: &str) -> Result<(), ImapError> {
        if let Err(e) = timed(&format!("CREATE {folder}"), self.inner.create(folder)).await {
            // Someone else made it meanwhile: SELECT will tell.
            tracing::debug!(folder, error = %e, "CREATE refused");
        }
        let _ = timed("SUBSCRIBE", self.inner.subscribe(folder)).await;
        Ok(())
    }

    /// Selects `folder` read-write.
    pub async fn select(&mut self, folder: &str) -> Result<u32, ImapError> {
        Ok(timed(&format!("SELECT {folder}"), self.inner.select(folder))
            .await?
            .exists)
    }

    /// Leaves the selected folder without expunging (UNSELECT, RFC 3691):
    /// APPENDs to a selected folder bring untagged EXISTS that a client
    /// must not mistake for the APPEND's continuation.
    pub async fn unselect(&mut self) -> Result<(), ImapError> {
        timed("UNSELECT", self.inner.run_command_and_check_ok("UNSELECT")).await
    }

    /// Summaries of the messages with UID ≥ `from` in the selected folder.
    pub async fn summaries(&mut self, from: u32) -> Result<Vec<Summary>, ImapError> {
        let set = format!("{}:*", from.max(1));
        let fetched = timed(&format!("UID FETCH {set} (headers)"), async {
            self.inner
                .uid_fetch(&set, "(UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER])")
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await?;
        Ok(fetched
            .iter()
            .filter_map(|f| {
                let uid = f.uid?;
                // `n:*` always returns the last message, even below n.
                if uid < from {
                    return None;
                }
                let size = f.size.unwrap_or(0);
                Some(Summary {
                    uid,
                    key: message_key(f.header().unwrap_or_default(), size),
                    flags: f
                        .flags()
                        .filter_map(|fl| match fl {
                            Flag::Seen => Some("\\Seen".to_string()),
                            Flag::Answered => Some("\\Answered".into()),
                            Flag::Flagged => Some("\\Flagged".into()),
                            Flag::Deleted => Some("\\Deleted".into()),
                            Flag::Draft => Some("\\Draft".into()),
                            Flag::Custom(c) if !c.starts_with('\\') => Some(c.to_string()),
                            _ => None,
                        })
                        .collect(),
                    internal_date: f
                        .internal_date()
                        .map(|d| d.format("%d-%b-%Y %H:%M:%S %z").to_string()),
                    size,
                })
            })
            .collect())
    }

    /// The whole message `uid` of the selected folder.
    pub async fn message(&mut self, uid: u32) -> Result<Vec<u8>, ImapError> {
        let fetched = timed(&format!("UID FETCH {uid} BODY[]"), async {
            self.inner
                .uid_fetch(uid.to_string(), "(UID BODY.PEEK[])")
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await?;
        fetched
            .iter()
            .find(|f| f.uid == Some(uid))
            .and_then(|f| f.body().map(<[u8]>::to_vec))
            .ok_or_else(|| ImapError::Protocol(format!("message {uid} vanished")))
    }

    pub async fn append(&mut self, folder: &str, m: &Summary, body: &[u8]) -> Result<(), ImapError> {
        let flags = format!("({})", m.flags.join(" "));
        let date = m.internal_date.as_ref().map(|d| format!("\"{d}\""));
        timed(
            &format!("APPEND to {folder}"),
            self.inner.append(folder, Some(&flags), date.as_deref(), body),
        )
        .await
    }

    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.logout()).await;
    }
}

/// What identifies a message across servers: its Message-Id, else a hash
/// of the headers that do not change in transit, and its size.
pub fn message_key(header: &[u8], size: u32) -> String {
    let text = String::from_utf8_lossy(header);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n").flat_map(|l| l.split('\n')) {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    for f in &mut fields {
        f.1 = f.1.trim().to_string();
    }
    if let Some((_, id)) = fields.iter().find(|(k, v)| k == "message-id" && !v.is_empty()) {
        return id.clone();
    }
    let mut h = Sha256::new();
    for name in ["date", "from", "to", "subject"] {
        for (_, v) in fields.iter().filter(|(k, _)| k == name) {
            h.update(name.as_bytes());
            h.update(v.as_bytes());
        }
    }
    h.update(size.to_be_bytes());
    format!("hash:{}", hex::encode(&h.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_use_the_message_id_else_a_header_hash() {
        let a = super::message_key(b"From: a@x\r\nMessage-ID:\r\n <id-1@x>\r\nSubject: s\r\n\r\n", 10);
        assert_eq!(a, "<id-1@x>");
        let b = super::message_key(b"From: a@x\r\nSubject: s\r\nDate: d\r\n\r\n", 10);
        let c = super::message_key(b"Subject: s\r\nDate: d\r\nFrom: a@x\r\nReceived: x\r\n\r\n", 10);
        assert!(b.starts_with("hash:"));
        assert_eq!(b, c);
        assert_ne!(
            b,
            super::message_key(b"From: a@x\r\nSubject: s\r\nDate: d\r\n\r\n", 11)
        );
    }
}
