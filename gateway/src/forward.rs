//! Plain requests forwarded upstream by the gateway itself.
//!
//! Pingora's proxy path spent about three times nginx's CPU per proxied
//! request (`bench --scenarios proxy`; loadtest/results/profiles): a copy
//! of the request and a pair of tasks joined by two channels per request,
//! an upstream pool shared by all threads whose sockets stay registered
//! with the reactor of the thread that opened them (a cross-thread wake-up
//! per read, 2.2 `eventfd` writes per request), and an idle-watcher task
//! spawned per released connection. A request whose body, if any, is
//! already read whole — nearly every request — takes this path instead
//! (`proxy::Edge::forward`): its head and body go upstream in one write on
//! a connection from this thread's own pool ([`take`], [`Conn::release`]),
//! the response head is read with `httparse` and kept as it came
//! ([`Head`]: its bytes and where each line lies), and the body is passed
//! on as it arrives, through Pingora's session (whose client side —
//! framing, keep-alive, gzip, timeouts — is Pingora's as before) or by the
//! gateway's own HTTP/1.1 loop (`h1`), which writes the client's head from
//! the upstream's lines.
//!
//! The upstream's answer is held to RFC 9112: interim `1xx` answers are
//! skipped, `HEAD`, `204` and `304` have no body, a body is framed by
//! `Transfer-Encoding: chunked` (decoded here, re-chunked for the client by
//! Pingora), by one `Content-Length`, or by the connection's end (passed on
//! chunked, as Pingora does); both headers at once, another transfer
//! coding, a conflicting length, a head over [`MAX_HEAD`] bytes or
//! [`MAX_HEADERS`] lines, or a malformed chunk are errors (a `502`).
//!
//! The pool is per thread (the gateway's runtimes do not steal work, so a
//! connection is used on the thread whose reactor it is registered with)
//! and per upstream address (routes and shards: configuration, not client
//! input), at most [`IDLE_PER_UPSTREAM`] connections each, none older than
//! [`IDLE_FOR`]. A connection the upstream closed while it was idle is
//! seen before it is used (its readiness, no syscall when it is quiet); one
//! it closes while the request is on its way fails with nothing received,
//! and the caller sends the request again once on a new connection.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName};
use pingora::http::{RequestHeader, ResponseHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::headers::is_one_of;

/// Idle connections kept per upstream on each thread (nginx's `keepalive`).
pub const IDLE_PER_UPSTREAM: usize = 64;
/// An idle connection older than this is closed, not used: upstreams close
/// theirs after their own keep-alive timeout (nginx 75 s, Node 5 s).
pub const IDLE_FOR: Duration = Duration::from_secs(30);
/// How often a thread's pool drops expired and closed connections.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Largest upstream response head.
pub const MAX_HEAD: usize = 16 * 1024;
/// Header lines an upstream response head may have.
pub const MAX_HEADERS: usize = 128;
/// Most bytes asked of the upstream per read of a body.
const READ_SIZE: usize = 16 * 1024;
/// Longest chunk-size line (size and extensions) of a chunked body.
const MAX_CHUNK_LINE: usize = 1024;
/// Most bytes of trailer fields after a chunked body (read, not passed on).
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a forwarded request got no complete answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("writing the request upstream: {0}")]
    Write(io::Error),
    #[error("reading the upstream's response: {0}")]
    Read(io::Error),
    #[error("the upstream closed the connection before answering")]
    Closed,
    #[error("the upstream closed the connection before the end of the body")]
    Truncated,
    #[error("the upstream's response head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the upstream's response head is malformed: {0}")]
    Malformed(String),
    #[error("the upstream's response body is malformed: {0}")]
    BadBody(&'static str),
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
}

impl ForwardError {
    /// Whether the upstream said nothing before failing: on a reused
    /// connection, it closed it while the request was on its way, and the
    /// request may be sent again on a new one.
    fn silent(&self) -> bool {
        match self {
            ForwardError::Write(_) | ForwardError::Closed => true,
            ForwardError::Read(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }

    /// How long the upstream had to answer, if that is what failed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ForwardError::Timeout(_))
    }
}

/// How the rest of a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// This many bytes are still to come.
    Length(u64),
    /// Chunked: the next thing to read.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line.
    Size,
    /// This many bytes of the current chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines (this many bytes seen) up to the empty line.
    Trailers(usize),
}

/// One upstream connection carrying one exchange at a time.
pub struct Conn {
    tcp: TcpStream,
    addr: SocketAddr,
    /// Bytes read and not yet handed on.
    buf: BytesMut,
    body: Body,
    /// Taken from the pool rather than opened for this request.
    reused: bool,
    /// The response lets the connection carry another exchange.
    keep_alive: bool,
}

impl Conn {
    /// A connection just opened to `addr`.
    pub fn new(tcp: TcpStream, addr: SocketAddr) -> Conn {
        Conn {
            tcp,
            addr,
            buf: BytesMut::new(),
            body: Body::Done,
            reused: false,
            keep_alive: false,
        }
    }

    /// Whether this connection came from the pool: a silent failure on it
    /// ([`ForwardError`]) is worth one more try on a new connection.
    pub fn retry_on_new(&self, e: &ForwardError) -> bool {
        self.reused && e.silent()
    }

    /// Sends `wire` (a request head and its whole body) and reads the
    /// response head, skipping interim `1xx` answers. `head_request`: the
    /// request was `HEAD`, so the response has no body whatever it says.
    pub async fn exchange(
        &mut self,
        wire: &[u8],
        head_request: bool,
        timeout: Duration,
    ) -> Result<Head, ForwardError> {
        match tokio::time::timeout(timeout, self.tcp.write_all(wire)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ForwardError::Write(e)),
            Err(_) => return Err(ForwardError::Timeout(timeout)),
        }
        let deadline = Instant::now() + timeout;
        // An interim answer was read: the upstream has the request.
        let mut heard = false;
        loop {
            let head = loop {
                if let Some(head) = Head::parse(&mut self.buf).map_err(ForwardError::Malformed)? {
                    break head;
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(ForwardError::HeadTooLarge);
                }
                let read = self.buf.len();
                let want = (MAX_HEAD - read).min(4096);
                if self.fill(want, deadline, timeout).await? == 0 {
                    return Err(if read == 0 && !heard {
                        ForwardError::Closed
                    } else {
                        ForwardError::Read(io::ErrorKind::UnexpectedEof.into())
                    });
                }
            };
            if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
                return Err(ForwardError::Malformed(
                    "a 101 to a request that asked no upgrade".into(),
                ));
            }
            if head.status.is_informational() {
                heard = true;
                continue;
            }
            self.body = framing(&head, head_request)?;
            self.keep_alive = keeps_alive(&head);
            return Ok(Head {
                // Chunked for the client, whose connection then stays
                // open (Pingora's proxy does the same).
                rechunked: self.body == Body::Close,
                ..head
            });
        }
    }

    /// Whether the whole response has been read.
    pub fn is_done(&self) -> bool {
        self.body == Body::Done
    }

    /// The next piece of the body as it arrives; `None` at its end. Each
    /// read may wait `timeout`.
    pub async fn next_body(&mut self, timeout: Duration) -> Result<Option<Bytes>, ForwardError> {
        loop {
            let deadline = Instant::now() + timeout;
            match self.body {
                Body::Done => return Ok(None),
                Body::Length(left) => {
                    if self.buf.is_empty() && self.fill(clamp(left), deadline, timeout).await? == 0 {
                        return Err(ForwardError::Truncated);
                    }
                    let n = clamp(left).min(self.buf.len());
                    let left = left - n as u64;
                    self.body = if left == 0 { Body::Done } else { Body::Length(left) };
                    return Ok(Some(self.buf.split_to(n).freeze()));
                }
                Body::Close => {
                    if self.buf.is_empty() && self.fill(READ_SIZE, deadline, timeout).await? == 0 {
                        self.body = Body::Done;
                        self.keep_alive = false;
                        return Ok(None);
                    }
                    return Ok(Some(self.buf.split().freeze()));
                }
                Body::Chunked(Chunk::Data(left)) => {
                    if self.buf.is_empty() && self.fill(clamp(left), deadline, timeout).await? == 0 {
                        return Err(ForwardError::Truncated);
                    }
                    let n = clamp(left).min(self.buf.len());
                    let left = left - n as u64;
                    self.body = Body::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Some(self.buf.split_to(n).freeze()));
                }
                Body::Chunked(state) => match chunk_step(&mut self.buf, state)? {
                    Some(next) => self.body = next,
                    None => {
                        if self.fill(READ_SIZE, deadline, timeout).await? == 0 {
                            return Err(ForwardError::Truncated);
                        }
                    }
                },
            }
        }
    }

    /// Reads at most `want` more bytes (at least one buffer's worth of
    /// room) before `deadline`; 0 at the end of the stream.
    async fn fill(
        &mut self,
        want: usize,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<usize, ForwardError> {
        self.buf.reserve(want.max(1024));
        match tokio::time::timeout_at(deadline, self.tcp.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(ForwardError::Read(e)),
            Err(_) => Err(ForwardError::Timeout(timeout)),
        }
    }

    /// Puts the connection back in this thread's pool if the exchange
    /// ended cleanly and the upstream keeps it open; else closes it.
    pub fn release(self) {
        if self.body == Body::Done && self.keep_alive && self.buf.is_empty() {
            put(self.addr, self.tcp);
        }
    }
}

/// At most one read's worth of `left` bytes.
fn clamp(left: u64) -> usize {
    left.min(READ_SIZE as u64) as usize
}

/// Response headers about this connection, not for the client (Pingora
/// writes the client's own `Connection`; trailers are not passed on).
const HOP_BY_HOP_RESPONSE: [HeaderName; 5] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TRAILER,
    header::UPGRADE,
];

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Request headers about the client's connection, not for the upstream's.
const HOP_BY_HOP_REQUEST: [HeaderName; 10] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Whether a request's `Connection` header names only `keep-alive` or
/// `close`: one that names other headers (to be dropped on the way) is
/// left to Pingora's path, which knows which of them may go.
pub fn plain_connection(req: &RequestHeader) -> bool {
    connection_tokens(req).all(|token| {
        token.is_empty() || token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"close")
    })
}

/// The tokens a request's `Connection` headers name, trimmed (empty list
/// elements included).
pub fn connection_tokens(req: &RequestHeader) -> impl Iterator<Item = &[u8]> {
    req.headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii))
}

/// Whether a request header is about the client's connection (any case).
pub fn is_hop_by_hop_request(name: &[u8]) -> bool {
    is_one_of(name, &HOP_BY_HOP_REQUEST)
}

/// The client's request as the upstream gets it over HTTP/1.1: without the
/// headers about the client's own connection.
pub fn strip_hop_by_hop(req: &mut RequestHeader) {
    req.set_version(http::Version::HTTP_11);
    for name in &HOP_BY_HOP_REQUEST {
        req.remove_header(name);
    }
}

/// An upstream's response head as it was read: its bytes and where each
/// header's name and value lie in them. The client's head is written from
/// it ([`Head::passed`]) or, for Pingora's session, made from it
/// ([`Head::to_response_header`]); no header map is built on the way.
#[derive(Debug)]
pub struct Head {
    raw: Bytes,
    pub status: http::StatusCode,
    http10: bool,
    /// Name and value of each header line, as offsets into `raw`.
    lines: Vec<(Range<usize>, Range<usize>)>,
    /// The body is read to the connection's end and passed on chunked.
    rechunked: bool,
}

impl Head {
    /// Splits the response head at the start of `buf` off it; `None` if
    /// more bytes are needed. `Err`: what is wrong with it.
    pub fn parse(buf: &mut BytesMut) -> Result<Option<Head>, String> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        let len = match parsed.parse(buf) {
            Ok(httparse::Status::Partial) => return Ok(None),
            Ok(httparse::Status::Complete(len)) => len,
            Err(e) => return Err(e.to_string()),
        };
        let status =
            http::StatusCode::from_u16(parsed.code.ok_or("no status")?).map_err(|e| e.to_string())?;
        // httparse has checked names (tokens) and values (no control bytes
        // but tab): what `http` would take.
        let base = buf.as_ptr() as usize;
        let at = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let lines = parsed
            .headers
            .iter()
            .map(|h| (at(h.name.as_bytes()), at(h.value)))
            .collect();
        let http10 = parsed.version == Some(0);
        Ok(Some(Head {
            raw: buf.split_to(len).freeze(),
            status,
            http10,
            lines,
            rechunked: false,
        }))
    }

    /// Every header line, as it came.
    fn all(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .iter()
            .map(|(name, value)| (&self.raw[name.clone()], &self.raw[value.clone()]))
    }

    /// The values of the header `name`, in order.
    pub fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> {
        let name = name.as_str().as_bytes();
        self.all()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Whether the head has the header `name`.
    pub fn has(&self, name: &HeaderName) -> bool {
        self.values(name).next().is_some()
    }

    /// The header lines the client gets (all but those about the upstream's
    /// connection), and a `Transfer-Encoding: chunked` of ours when the
    /// body is re-chunked.
    pub fn passed(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let ours = self
            .rechunked
            .then_some((header::TRANSFER_ENCODING.as_str().as_bytes(), &b"chunked"[..]));
        self.all()
            .filter(|(n, _)| !is_one_of(n, &HOP_BY_HOP_RESPONSE))
            .chain(ours)
    }

    /// Whether the body goes to the client chunked.
    pub fn chunked(&self) -> bool {
        self.rechunked || self.has(&header::TRANSFER_ENCODING)
    }

    /// The client's head as Pingora's session takes it.
    pub fn to_response_header(&self) -> Result<ResponseHeader, ForwardError> {
        self.response_header(self.passed())
            .map_err(ForwardError::Malformed)
    }

    /// The head with every line it came with (an upgrade's answer, whose
    /// `Connection` and `Upgrade` the client must get). `Err`: what is
    /// wrong with it.
    pub fn to_upgrade_header(&self) -> Result<ResponseHeader, String> {
        self.response_header(self.all())
    }

    /// A Pingora head of this status and `lines`.
    fn response_header<'a>(
        &self,
        lines: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<ResponseHeader, String> {
        let malformed = |e: &dyn std::fmt::Display| e.to_string();
        // Built as `http` parts, without Pingora's header-case map: a known
        // name costs no allocation and no second parse.
        let (mut head, ()) = http::Response::new(()).into_parts();
        head.status = self.status;
        if self.http10 && !self.rechunked {
            head.version = http::Version::HTTP_10;
        }
        head.headers.reserve(self.lines.len() + 1);
        for (name, value) in lines {
            let name = HeaderName::from_bytes(name).map_err(|e| malformed(&e))?;
            let value = http::HeaderValue::from_bytes(value).map_err(|e| malformed(&e))?;
            head.headers.append(name, value);
        }
        Ok(ResponseHeader::from(head))
    }
}

/// How the body of `head` is delimited (RFC 9112, section 6.3).
fn framing(head: &Head, head_request: bool) -> Result<Body, ForwardError> {
    if head_request || matches!(head.status.as_u16(), 204 | 304) {
        return Ok(Body::Done);
    }
    if head.has(&header::TRANSFER_ENCODING) {
        if head.has(&header::CONTENT_LENGTH) {
            return Err(ForwardError::Malformed(
                "both Transfer-Encoding and Content-Length".into(),
            ));
        }
        let mut codings = head.values(&header::TRANSFER_ENCODING);
        let only_chunked = codings
            .next()
            .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"))
            && codings.next().is_none();
        if !only_chunked {
            return Err(ForwardError::Malformed(
                "a transfer coding other than chunked".into(),
            ));
        }
        return Ok(Body::Chunked(Chunk::Size));
    }
    let mut length = None;
    for value in head.values(&header::CONTENT_LENGTH) {
        for part in value.split(|&b| b == b',') {
            let n = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| ForwardError::Malformed("an invalid Content-Length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(ForwardError::Malformed(
                    "conflicting Content-Length values".into(),
                ));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Body::Done,
        Some(n) => Body::Length(n),
        None => Body::Close,
    })
}

/// Whether the upstream keeps the connection open after this response.
fn keeps_alive(head: &Head) -> bool {
    let says = |token: &[u8]| {
        head.values(&header::CONNECTION).any(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
        })
    };
    match head.http10 {
        false => !says(b"close"),
        true => says(b"keep-alive") && !says(b"close"),
    }
}

/// One step of a chunked body that is not chunk data: the next state, or
/// `None` if `buf` does not hold the whole of what comes next.
fn chunk_step(buf: &mut BytesMut, state: Chunk) -> Result<Option<Body>, ForwardError> {
    let line_end = |buf: &BytesMut, max: usize| -> Result<Option<usize>, ForwardError> {
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i + 1)),
            Some(_) => Err(ForwardError::BadBody("a line not ended by CRLF")),
            None if buf.len() > max => Err(ForwardError::BadBody("a chunk line too long")),
            None => Ok(None),
        }
    };
    Ok(Some(match state {
        Chunk::Size => {
            let Some(end) = line_end(buf, MAX_CHUNK_LINE)? else {
                return Ok(None);
            };
            let line = &buf[..end - 2];
            let digits = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
            if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
                return Err(ForwardError::BadBody("an invalid chunk size"));
            }
            let size = digits.iter().fold(0u64, |n, &d| {
                n * 16 + (d as char).to_digit(16).unwrap_or(0) as u64
            });
            buf.advance(end);
            Body::Chunked(if size == 0 {
                Chunk::Trailers(0)
            } else {
                Chunk::Data(size)
            })
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(None);
            }
            if &buf[..2] != b"\r\n" {
                return Err(ForwardError::BadBody("chunk data longer than its size"));
            }
            buf.advance(2);
            Body::Chunked(Chunk::Size)
        }
        Chunk::Trailers(seen) => {
            let Some(end) = line_end(buf, MAX_TRAILERS - seen)? else {
                return Ok(None);
            };
            buf.advance(end);
            if end == 2 {
                Body::Done
            } else if seen + end > MAX_TRAILERS {
                return Err(ForwardError::BadBody("trailers too large"));
            } else {
                Body::Chunked(Chunk::Trailers(seen + end))
            }
        }
        Chunk::Data(_) => unreachable!("chunk data is read by next_body"),
    }))
}

/// Idle connections of one thread, by upstream address.
#[derive(Default)]
struct Pool {
    idle: HashMap<SocketAddr, Vec<(TcpStream, Instant)>>,
    /// A sweeper task runs on this thread.
    sweeping: bool,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// An open idle connection to `addr` from this thread's pool, newest first.
pub fn take(addr: SocketAddr) -> Option<Conn> {
    POOL.with_borrow_mut(|pool| {
        let list = pool.idle.get_mut(&addr)?;
        while let Some((tcp, since)) = list.pop() {
            if since.elapsed() >= IDLE_FOR {
                // The rest are older still.
                list.clear();
                break;
            }
            if open(&tcp) {
                let mut conn = Conn::new(tcp, addr);
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    })
}

fn put(addr: SocketAddr, tcp: TcpStream) {
    let start_sweeper = POOL.with_borrow_mut(|pool| {
        let list = pool.idle.entry(addr).or_default();
        if list.len() >= IDLE_PER_UPSTREAM {
            list.remove(0);
        }
        list.push((tcp, Instant::now()));
        !std::mem::replace(&mut pool.sweeping, true)
    });
    if start_sweeper {
        // The gateway's runtimes are one per thread: this task sweeps the
        // pool of the thread that started it.
        tokio::spawn(async {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let empty = POOL.with_borrow_mut(|pool| {
                    pool.idle.retain(|_, list| {
                        list.retain(|(tcp, since)| since.elapsed() < IDLE_FOR && open(tcp));
                        !list.is_empty()
                    });
                    pool.sweeping = !pool.idle.is_empty();
                    !pool.sweeping
                });
                if empty {
                    break;
                }
            }
        });
    }
}

/// Whether an idle connection is still open: nothing has arrived on it
/// (no end of stream, no stray bytes). Asks the socket only when the
/// reactor has seen it become readable.
fn open(tcp: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match tcp.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

/// Idle connections in this thread's pool.
#[cfg(test)]
fn idle_count(addr: SocketAddr) -> usize {
    POOL.with_borrow(|pool| pool.idle.get(&addr).map_or(0, Vec::len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(5);

    /// An upstream that answers each connection's first request with
    /// `answer`, written in `pieces`-byte writes.
    async fn upstream(answer: &'static [u8], pieces: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut req = [0u8; 4096];
                    let _ = tcp.read(&mut req).await;
                    for part in answer.chunks(pieces) {
                        tcp.write_all(part).await.unwrap();
                        tcp.flush().await.unwrap();
                        tokio::task::yield_now().await;
                    }
                    // Then the end of the stream, which ends a body
                    // delimited by it.
                });
            }
        });
        addr
    }

    async fn fetch(
        addr: SocketAddr,
        head_request: bool,
    ) -> Result<(ResponseHeader, Vec<u8>, Conn), ForwardError> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut conn = Conn::new(tcp, addr);
        let head = conn
            .exchange(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", head_request, T)
            .await?
            .to_response_header()?;
        let mut body = Vec::new();
        while let Some(piece) = conn.next_body(T).await? {
            body.extend_from_slice(&piece);
        }
        Ok((head, body, conn))
    }

    #[tokio::test]
    async fn bodies_are_read_by_their_framing_whatever_the_reads() {
        let cases: &[(&[u8], &[u8], bool)] = &[
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", b"hello", true),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
                b"hello world",
                true,
            ),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n", b"", true),
            (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", b"until the end", false),
            (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", b"ok", false),
        ];
        for (answer, body, reusable) in cases {
            for pieces in [1, 3, 1000] {
                let addr = upstream(answer, pieces).await;
                let (head, got, conn) = fetch(addr, false).await.unwrap();
                assert_eq!(
                    got,
                    *body,
                    "{} in {pieces}-byte pieces",
                    String::from_utf8_lossy(answer)
                );
                assert_eq!(conn.keep_alive && conn.is_done(), *reusable);
                assert!(
                    head.headers.get("connection").is_none(),
                    "hop-by-hop header passed on"
                );
                if head.headers.get("content-length").is_none() && head.status != 204 {
                    assert_eq!(head.headers["transfer-encoding"], "chunked");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_head_answer_has_no_body_whatever_it_declares() {
        let addr = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", 1000).await;
        let (head, body, conn) = fetch(addr, true).await.unwrap();
        assert_eq!(head.headers["content-length"], "100");
        assert!(body.is_empty() && conn.is_done());
    }

    #[tokio::test]
    async fn bad_answers_are_named() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
                "both",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                "other than chunked",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
                "conflicting",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "invalid chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhello\r\n",
                "longer than its size",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                "before the end of the body",
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "no upgrade"),
            (b"NOT HTTP\r\n\r\n", "malformed"),
            (b"", "before answering"),
        ];
        for (answer, says) in cases {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut req = [0u8; 4096];
                let _ = tcp.read(&mut req).await;
                tcp.write_all(answer).await.unwrap();
                // Then the end of the stream.
            });
            let Err(e) = fetch(addr, false).await else {
                panic!("{} was taken", String::from_utf8_lossy(answer));
            };
            assert!(e.to_string().contains(says), "{e} (expected {says:?})");
        }
    }

    #[tokio::test]
    async fn a_head_too_large_is_refused() {
        let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
        while answer.len() <= MAX_HEAD {
            answer.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
        let addr = upstream(answer, 4096).await;
        let e = fetch(addr, false).await.err().expect("refused");
        assert!(
            matches!(e, ForwardError::HeadTooLarge | ForwardError::Malformed(_)),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let _held = listener.accept().await.unwrap();
        let mut conn = Conn::new(tcp, addr);
        let e = conn
            .exchange(b"GET / HTTP/1.1\r\n\r\n", false, Duration::from_millis(50))
            .await
            .expect_err("timed out");
        assert!(e.is_timeout(), "{e}");
    }

    #[tokio::test]
    async fn the_pool_keeps_open_connections_and_drops_closed_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = (
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        );
        let (server_a, _) = listener.accept().await.unwrap();
        let (_server_b, _) = listener.accept().await.unwrap();
        let mut conn_a = Conn::new(a, addr);
        conn_a.keep_alive = true;
        let mut conn_b = Conn::new(b, addr);
        conn_b.keep_alive = true;
        conn_a.release();
        conn_b.release();
        assert_eq!(idle_count(addr), 2);
        // The upstream closes `a` while it is idle: the reactor sees it.
        drop(server_a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let first = take(addr).expect("b is open");
        assert!(first.reused);
        assert!(
            take(addr).is_none(),
            "a was closed by the upstream and must not be used"
        );
        assert_eq!(idle_count(addr), 0);
        // An exchange that did not end cleanly is not pooled.
        let mut unfinished = first;
        unfinished.body = Body::Length(3);
        unfinished.release();
        assert_eq!(idle_count(addr), 0);
    }

    #[test]
    fn only_plain_connection_headers_take_this_path() {
        let req = |v: &str| {
            let mut r = RequestHeader::build("GET", b"/", None).unwrap();
            r.insert_header("connection", v).unwrap();
            r
        };
        assert!(plain_connection(&req("keep-alive")));
        assert!(plain_connection(&req("Close, keep-alive")));
        assert!(!plain_connection(&req("keep-alive, x-secret")));
        let mut r = req("close");
        r.insert_header("te", "trailers").unwrap();
        r.insert_header("x-kept", "1").unwrap();
        strip_hop_by_hop(&mut r);
        assert!(r.headers.get("connection").is_none() && r.headers.get("te").is_none());
        assert_eq!(r.headers["x-kept"], "1");
    }
}
