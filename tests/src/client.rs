//! Clients for tests: HTTPS (trusting a given certificate) and a WebSocket
//! client speaking the chat protocol.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// A rustls client config that trusts exactly `ca_pem`.
pub fn tls_config(ca_pem: &[u8], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("PEM certificate")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// An HTTPS client that trusts `ca_pem` and resolves `localhost` to us.
pub fn https_client(ca_pem: &[u8]) -> reqwest::Client {
    https_client_builder(ca_pem).build().expect("https client")
}

/// [`https_client`] connecting from 127.0.0.`last`: another loopback
/// address plays another client (rate limits, caps, stickiness).
pub fn https_client_from(ca_pem: &[u8], last: u8) -> reqwest::Client {
    https_client_builder(ca_pem)
        .local_address(std::net::IpAddr::from([127, 0, 0, last]))
        .build()
        .expect("https client")
}

fn https_client_builder(ca_pem: &[u8]) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).expect("PEM"))
        .https_only(true)
        .timeout(Duration::from_secs(10))
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A chat protocol client.
pub struct Ws {
    inner: WebSocketStream<Pin<Box<dyn Io>>>,
}

/// How a connection attempt ended when it was refused.
#[derive(Debug)]
pub enum Refused {
    Status(u16),
    Other(String),
}

impl Ws {
    /// Connects to `ws://127.0.0.1:port/ws` with `token` as a subprotocol.
    pub async fn connect(port: u16, token: &str) -> Result<Ws, Refused> {
        Ws::connect_with(port, Some(token), None, &[]).await
    }

    /// Connects over TLS to `wss://localhost:port/ws`.
    pub async fn connect_tls(port: u16, token: &str, ca_pem: &[u8]) -> Result<Ws, Refused> {
        Ws::connect_with(port, Some(token), Some(ca_pem), &[]).await
    }

    /// The general form: optional token, optional TLS, extra headers.
    pub async fn connect_with(
        port: u16,
        token: Option<&str>,
        ca_pem: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<Ws, Refused> {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| Refused::Other(e.to_string()))?;
        Ws::handshake(tcp, port, token, ca_pem, headers).await
    }

    /// A client whose socket receive buffer is tiny: with nobody reading
    /// it, the server's queue for it fills fast (slow-consumer tests).
    pub async fn connect_slow(port: u16, token: &str) -> Result<Ws, Refused> {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let tcp = sock
            .connect(([127, 0, 0, 1], port).into())
            .await
            .map_err(|e| Refused::Other(e.to_string()))?;
        Ws::handshake(tcp, port, Some(token), None, &[]).await
    }

    async fn handshake(
        tcp: TcpStream,
        port: u16,
        token: Option<&str>,
        ca_pem: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<Ws, Refused> {
        let scheme = if ca_pem.is_some() { "wss" } else { "ws" };
        let mut req = format!("{scheme}://localhost:{port}/ws")
            .into_client_request()
            .expect("request");
        let protocols = match token {
            Some(t) => format!("portico.v1, bearer.{t}"),
            None => "portico.v1".to_string(),
        };
        req.headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().expect("header"));
        for (k, v) in headers {
            req.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let _ = tcp.set_nodelay(true);
        let stream: Pin<Box<dyn Io>> = match ca_pem {
            None => Box::pin(tcp),
            Some(pem) => {
                let connector = tokio_rustls::TlsConnector::from(tls_config(pem, &[b"http/1.1"]));
                let name = ServerName::try_from("localhost").expect("name");
                Box::pin(
                    connector
                        .connect(name, tcp)
                        .await
                        .map_err(|e| Refused::Other(e.to_string()))?,
                )
            }
        };
        match tokio_tungstenite::client_async(req, stream).await {
            Ok((inner, _)) => Ok(Ws { inner }),
            Err(tungstenite::Error::Http(resp)) => Err(Refused::Status(resp.status().as_u16())),
            Err(e) => Err(Refused::Other(e.to_string())),
        }
    }

    /// Connects as `user`, reads the welcome and subscribes to `conv`
    /// (resuming after `since`); the `subscribed` frame is left unread.
    pub async fn join(port: u16, user: &str, conv: &str, since: Option<u64>) -> Ws {
        let mut ws = Ws::connect(port, &token(user)).await.expect("connect");
        assert_eq!(ws.recv().await["type"], "welcome");
        let mut sub = serde_json::json!({"type": "subscribe", "conv": conv});
        if let Some(s) = since {
            sub["since"] = serde_json::json!(s);
        }
        ws.send(sub).await;
        ws
    }

    /// [`Ws::join`] and wait until subscribed (the `subscribed` frame is read).
    pub async fn joined(port: u16, user: &str, conv: &str) -> Ws {
        let mut ws = Ws::join(port, user, conv, None).await;
        ws.recv_type("subscribed").await;
        ws
    }

    /// Publishes and waits for the `ack` (frames before it are dropped).
    pub async fn publish(&mut self, conv: &str, id: &str, body: &str) -> Value {
        self.send(serde_json::json!({"type": "publish", "conv": conv, "id": id, "body": body}))
            .await;
        self.recv_type("ack").await
    }

    /// The next `count` messages' offsets (other frames skipped).
    pub async fn offsets(&mut self, count: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let f = self.recv().await;
            if f["type"] == "message" {
                out.push(f["offset"].as_u64().expect("offset"));
            }
        }
        out
    }

    pub async fn send(&mut self, frame: Value) {
        self.inner
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send frame");
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.inner.send(msg).await.expect("send raw frame");
    }

    /// The next JSON frame (pings skipped); panics after [`RECV_TIMEOUT`].
    pub async fn recv(&mut self) -> Value {
        match self.next_frame(RECV_TIMEOUT).await {
            Some(Ok(v)) => v,
            Some(Err(close)) => panic!("connection closed with {close:?} while waiting for a frame"),
            None => panic!("no frame within {RECV_TIMEOUT:?}"),
        }
    }

    /// Connects through the gateway (TLS) and reads the `welcome` frame.
    /// No retry: an upgrade that ends before its first frame is a defect
    /// (cloudflare/pingora#946, patched in third_party/pingora-proxy).
    pub async fn via_gateway(port: u16, token: &str, ca_pem: &[u8], headers: &[(&str, &str)]) -> (Ws, Value) {
        let mut ws = Ws::connect_with(port, Some(token), Some(ca_pem), headers)
            .await
            .expect("connect through the gateway");
        match ws.recv_or_close().await {
            Ok(welcome) => (ws, welcome),
            Err(code) => panic!("the gateway ended the upgrade before the welcome (close {code})"),
        }
    }

    /// The next JSON frame, or the close code if the connection ends first.
    pub async fn recv_or_close(&mut self) -> Result<Value, u16> {
        self.next_frame(RECV_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no frame within {RECV_TIMEOUT:?}"))
    }

    /// Frames until one of type `kind` (others are returned alongside).
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let f = self.recv().await;
            if f["type"] == kind {
                return f;
            }
        }
    }

    /// `None` if nothing arrives within `wait` (to show absence).
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        match self.next_frame(wait).await {
            Some(Ok(v)) => Some(v),
            Some(Err(close)) => panic!("connection closed with {close:?}"),
            None => None,
        }
    }

    /// Whether no `message` frame arrives within `wait` (other frames, such
    /// as presence events, are skipped).
    pub async fn no_message_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_recv(left).await {
                None => return true,
                Some(f) if f["type"] == "message" => return false,
                Some(_) => {}
            }
        }
    }

    /// Waits for the server's close frame and returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        self.expect_close_within(RECV_TIMEOUT).await
    }

    /// [`Ws::expect_close`] allowing `wait` between frames: a client that
    /// stalled with a tiny receive window resumes at the sender's next
    /// zero-window probe, which TCP backs off to seconds.
    pub async fn expect_close_within(&mut self, wait: Duration) -> u16 {
        loop {
            match self.next_frame(wait).await {
                Some(Ok(_)) => continue,
                Some(Err(code)) => return code,
                None => panic!("no close within {wait:?}"),
            }
        }
    }

    /// `Ok(json)`, `Err(close code)` (0 when the stream just ended) or
    /// `None` on timeout.
    async fn next_frame(&mut self, wait: Duration) -> Option<Result<Value, u16>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => return Some(Err(0)),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => return Some(Ok(serde_json::from_str(&t).expect("server sends JSON"))),
                Message::Close(frame) => return Some(Err(frame.map_or(1005, |f| u16::from(f.code)))),
                _ => continue,
            }
        }
    }
}

/// A bare WebSocket through the gateway on `port` (TLS, `ca_pem`) with the
/// chat subprotocol and `token`, its `welcome` frame read: for tests that
/// drive the protocol themselves (concurrent reads and writes).
pub async fn ws_stream(
    port: u16,
    token: &str,
    ca_pem: &[u8],
) -> Result<WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca_pem, &[b"http/1.1"]));
    let tls = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!("wss://localhost:{port}/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("portico.v1, bearer.{token}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .map_err(|e| e.to_string())?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.contains("\"welcome\"") => Ok(ws),
        other => Err(format!("no welcome: {other:?}")),
    }
}

/// A bare WebSocket straight to a shard on 127.0.0.1:`port` with `token`,
/// its `welcome` frame read.
pub async fn ws_direct(port: u16, token: &str) -> WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let mut req = format!("ws://127.0.0.1:{port}/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("portico.v1, bearer.{token}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("handshake");
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.contains("\"welcome\"") => ws,
        other => panic!("no welcome: {other:?}"),
    }
}

/// Creates a conversation over a shard's REST API as `owner`.
pub async fn create_conversation(port: u16, owner: &str, id: &str, members: &[&str]) {
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/conversations"))
        .bearer_auth(token(owner))
        .json(&serde_json::json!({ "id": id, "members": members }))
        .send()
        .await
        .expect("create conversation");
    let status = r.status();
    assert_eq!(status, 201, "{}", r.text().await.unwrap_or_default());
}

/// The Prometheus text a service exposes on `port` (empty if unreachable).
pub async fn metrics(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of the unlabelled `series` (or of one with its labels
/// written out) in a metrics page from [`metrics`], if it is there.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `GET url` as `user` (bearer token), parsed as JSON.
pub async fn get_json(url: &str, user: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token(user))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON body")
}

/// A token for `user` signed with the test secret (as an app backend would).
pub fn token(user: &str) -> String {
    token_with_exp(user, unix_now() + 3600)
}

/// A token with a given expiry (seconds since the epoch).
pub fn token_with_exp(user: &str, exp: u64) -> String {
    sign(crate::TEST_SECRET, user, exp)
}

/// An HS256 JWT, hand-assembled so tests do not share the code under test.
pub fn sign(secret: &str, user: &str, exp: u64) -> String {
    sign_with_roles(secret, user, exp, &[])
}

/// A JSON call to a service's REST API on 127.0.0.1:`port` as user
/// `ops-person` with `roles` (none: no token); the status and the JSON
/// body (`null` when there is none).
pub async fn api_call(
    port: u16,
    method: &str,
    path: &str,
    roles: &[&str],
    body: Option<Value>,
) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut req = http.request(method.parse().unwrap(), format!("http://127.0.0.1:{port}{path}"));
    if !roles.is_empty() {
        req = req.bearer_auth(token_with_roles("ops-person", roles));
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A token for a user or service with `roles` (e.g. `service`).
pub fn token_with_roles(user: &str, roles: &[&str]) -> String {
    sign_with_roles(crate::TEST_SECRET, user, unix_now() + 3600, roles)
}

fn sign_with_roles(secret: &str, user: &str, exp: u64, roles: &[&str]) -> String {
    use base64::Engine;
    let b64 = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
    let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64(serde_json::json!({ "sub": user, "exp": exp, "roles": roles })
        .to_string()
        .as_bytes());
    let input = format!("{header}.{claims}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(sig.as_ref()))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A raw TLS connection (HTTP/1.1 by ALPN) to the gateway on `port`, from
/// `local` (another loopback address plays another client).
pub async fn tls_connect(
    port: u16,
    ca_pem: &[u8],
    local: std::net::IpAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((local, 0).into())?;
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await?;
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca_pem, &[b"http/1.1"]));
    connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
}

/// Fails unless `text` is valid Prometheus exposition that follows the
/// naming rules (`promtool check metrics`, from Debian's `prometheus`).
pub fn promtool_check(name: &str, text: &str) {
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("promtool not runnable ({e}); ./scripts/test installs the `prometheus` package"),
    };
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, text.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{name} /metrics fails promtool:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
