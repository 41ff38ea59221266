//! A real HTTP/1.1 upstream for gateway tests: it answers every request
//! with the request head it received as the body (so a test sees exactly
//! what the gateway forwarded), plus response headers the test chose, and
//! counts the connections the gateway opened to it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Upstream {
    pub port: u16,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Listens on a free loopback port; every response carries `headers`.
    pub async fn start(headers: &[(&str, &str)]) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let port = listener.local_addr().expect("address").port();
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let extra = Arc::new(extra);
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (connections, heads) = (connections.clone(), heads.clone());
            tokio::spawn(async move {
                while let Ok((sock, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(sock, extra.clone(), heads.clone()));
                }
            })
        };
        Upstream {
            port,
            connections,
            heads,
            task,
        }
    }

    /// Connections the gateway has opened so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The request heads received so far, in order.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("heads").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one keep-alive connection: head, body (by Content-Length), answer.
async fn serve(mut sock: TcpStream, extra: Arc<String>, heads: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    while let Some((head, _body)) = read_request(&mut sock, &mut buf).await {
        heads.lock().expect("heads").push(head.clone());
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{extra}\r\n{head}",
            head.len()
        );
        if sock.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads the next request on `sock` (bytes left over from the previous
/// one in `buf`): its head and its whole body (by Content-Length or
/// chunked, still encoded). `None` when the connection ends first.
pub async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    // The whole body first (a server that answers early would hide what
    // the gateway does with the rest).
    let body_end = loop {
        let have = if chunked {
            chunked_end(&buf[end..]).map(|n| end + n)
        } else {
            (buf.len() >= end + length).then_some(end + length)
        };
        if let Some(e) = have {
            break e;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let body = buf[end..body_end].to_vec();
    buf.drain(..body_end);
    Some((head, body))
}

/// The length of a complete chunked body at the start of `b`, if complete.
fn chunked_end(b: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line = b[at..].windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&b[at..at + line]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        at += line + 2;
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            let end = b[at..].windows(2).position(|w| w == b"\r\n")?;
            return Some(at + end + 2);
        }
        if b.len() < at + size + 2 {
            return None;
        }
        at += size + 2;
    }
}
