//! Connection guard: the limits Pingora's HTTP/1 reader lacks.
//!
//! Pingora applies its read timeout per read, so a client trickling one
//! header byte a second is never cut off, and it accepts up to 1 MiB of
//! headers. [`Guarded`] wraps every accepted (already TLS-decrypted) stream
//! and watches the bytes of each request head as they are read: the head
//! must be complete within `header_timeout_secs` of its first byte (else
//! 408), must fit `max_header_bytes` and `max_headers` lines (else 431), and
//! an idle keep-alive connection is closed after `keepalive_idle_secs`.
//! Once the head is complete the stream is a plain pass-through (bodies,
//! upgraded WebSockets), until the proxy reports the request done
//! ([`request_done`]) and the connection waits, kept alive, for the next.
//!
//! It also gathers a response's small writes (up to [`OUT_BUFFER`]) until
//! Pingora flushes, which it does at the end of each response, after each
//! chunk and after each write of an upgraded body: a response head and a
//! small body go to TLS as one record and leave in one syscall. The buffer
//! is allocated at the first response and freed once the connection is
//! upgraded, so a WebSocket holds none (below TLS the socket is
//! unbuffered). It is kept between requests: freeing it after each
//! response made glibc trim its heap now and then (more syscalls and page
//! faults per 2 KiB file, `perf stat` beside `bench --scenarios static`).
//! [`GuardedApp`] wraps the proxy: it admits connections under a global and
//! a per-IP cap at the accept, then does the TLS handshake itself under
//! `handshake_timeout_secs` (Pingora's TLS listener allows 60 s and counts
//! nothing, so a flood of silent TCP connections would escape the caps).
//! The plain-HTTP listener is wrapped too, without TLS: the same caps and
//! deadlines hold on both ports.
//!
//! When the service stops accepting (a stop or an upgrade), the guard
//! closes the connections that are idle between requests
//! ([`Guard::closing`]). Pingora's own close-on-stop is not used: it also
//! dropped a connection accepted an instant before whose first request had
//! not arrived yet, and that client, which had sent nothing to retry, saw
//! its request fail. Such a connection is served (with `connection: close`,
//! Pingora's doing once it stops) under the header deadline.
//!
//! HTTP/2 connections are not watched byte by byte (frames, not text):
//! Pingora's h2 options carry the header-size, stream and idle limits.
//! Not here: rate limits (`limits`), body size (`proxy`).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use portico_config::ConnectionLimits;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::drain::{Drain, ReadGate, Upgraded};
use crate::limits::ClientKey;
use crate::tls_stream::TlsStream;

const TIMEOUT_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
const TOO_LARGE_431: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
/// How long writing a 408/431 may take before the connection is dropped.
const REJECT_WRITE: Duration = Duration::from_secs(2);
/// Response bytes gathered before they are handed to TLS (see [`Guarded`]).
pub const OUT_BUFFER: usize = 4 * 1024;

/// Shared admission state: open connections, in total and per client.
pub struct Guard {
    cfg: ConnectionLimits,
    /// Started on shutdown or upgrade: upgraded connections close with 1001.
    drain: Arc<Drain>,
    open: AtomicUsize,
    /// Entries exist only while their client has connections open, so the
    /// map is bounded by `max_connections`.
    per_ip: DashMap<ClientKey, usize>,
    trusted: Vec<IpAddr>,
    /// Fired when the listeners stop: connections idle between requests
    /// close (see the module doc).
    closing: CancellationToken,
}

impl Guard {
    pub fn new(cfg: ConnectionLimits, trusted_proxies: Vec<IpAddr>, drain: Arc<Drain>) -> Arc<Guard> {
        Arc::new(Guard {
            cfg,
            drain,
            open: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            trusted: trusted_proxies,
            closing: CancellationToken::new(),
        })
    }

    /// Admits one more connection from `ip`, or says which cap it hits.
    fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Permit, &'static str> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err("total");
        }
        // Counted here, so the drop of a refused permit undoes only this.
        metrics::gauge!("portico_gateway_connections").increment(1.0);
        let mut permit = Permit {
            guard: self.clone(),
            key: None,
        };
        if let Some(ip) = ip.filter(|ip| !self.trusted.contains(ip)) {
            let key = ClientKey::from(ip);
            let mut n = self.per_ip.entry(key).or_insert(0);
            if *n >= self.cfg.max_connections_per_ip {
                return Err("per_ip"); // `permit` drops: total released
            }
            *n += 1;
            permit.key = Some(key);
        }
        Ok(permit)
    }
}

/// One admitted connection; dropping it releases its place.
struct Permit {
    guard: Arc<Guard>,
    key: Option<ClientKey>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.guard.per_ip.remove_if_mut(&key, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
        self.guard.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("portico_gateway_connections").decrement(1.0);
    }
}

/// A Pingora app behind the guard, on a plain TCP listener: the guard
/// admits, then terminates TLS with `tls` if there is one (HTTPS; the
/// plain-HTTP listener has none). An HTTP/1 connection is served by
/// `lean`, if there is one, and each request `lean` hands over by the app,
/// on a session of its own: the connection comes back to `lean` after it
/// if it stays open.
pub struct GuardedApp<A> {
    pub inner: Arc<A>,
    pub guard: Arc<Guard>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub lean: Option<Arc<dyn Lean>>,
}

/// A server of the plain HTTP/1.1 requests of a connection, tried before
/// the Pingora app (the gateway's is [`crate::h1`]).
#[async_trait]
pub trait Lean: Send + Sync {
    /// Serves requests until the connection ends (`None`), or hands it
    /// over (`Some`) at a request it leaves to the app, whose bytes read so
    /// far it has put back ([`Guarded::unread`]).
    async fn serve(&self, conn: Box<Guarded>, shutdown: &ShutdownWatch) -> Option<Box<Guarded>>;
}

impl<A: HttpServerApp + Send + Sync + 'static> GuardedApp<A> {
    /// One HTTP/1 request served by the app, as Pingora's own loop would
    /// serve it; the connection back if it stays open.
    async fn one_request(&self, stream: Box<Guarded>, shutdown: &ShutdownWatch) -> Option<Box<Guarded>> {
        let mut session = ServerSession::new_http1(stream);
        // Pingora's own settings for a new HTTP/1 session.
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let reused = self.inner.process_new_http(session, shutdown).await?;
        // Pipelining is off on the session: no request rides in the
        // settings, which hold nothing else of ours.
        let (stream, _settings) = reused.consume();
        stream.into_any().downcast::<Guarded>().ok()
    }
}

impl<A> GuardedApp<A> {
    /// The TLS handshake under the deadline (none without `tls`); `None`
    /// (counted) if it fails.
    async fn handshake(&self, stream: Stream, ip: Option<IpAddr>) -> Option<Stream> {
        let Ok(l4) = stream.into_any().downcast::<L4Stream>() else {
            tracing::error!("a guarded listener handed over a stream that is not TCP");
            return None;
        };
        let l4 = served_here(l4);
        let Some(tls) = &self.tls else {
            return Some(l4);
        };
        let deadline = Duration::from_secs(self.guard.cfg.handshake_timeout_secs);
        let failed = |reason: &'static str| {
            metrics::counter!("portico_gateway_tls_handshake_failures_total", "reason" => reason)
                .increment(1);
        };
        match tokio::time::timeout(deadline, TlsStream::accept(tls, *l4)).await {
            Ok(Ok(tls)) => Some(Box::new(tls)),
            Ok(Err(e)) => {
                // Scanners and clients that distrust the certificate do this
                // all day: not an error of ours.
                tracing::debug!(client = ?ip, error = %e, "TLS handshake failed");
                failed("error");
                None
            }
            Err(_) => {
                tracing::debug!(client = ?ip, "TLS handshake timed out");
                failed("timeout");
                None
            }
        }
    }
}

/// The accepted connection, registered with the reactor of the thread
/// that serves it. Pingora accepts every connection on one thread and
/// hands it to a random one of its runtimes, while the socket stays
/// registered with the accepting thread's reactor: each readiness of a
/// connection served elsewhere was a cross-thread wake-up (an `eventfd`
/// write and a context switch). A duplicate of the socket is registered
/// here; dropping the original deregisters it there before closing it.
/// If that fails the connection is served as it came.
fn served_here(l4: Box<L4Stream>) -> Box<L4Stream> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    let peer = l4.get_socket_digest().and_then(|d| d.peer_addr().cloned());
    // SAFETY: the descriptor belongs to `l4`, which is alive for the whole
    // borrow; `try_clone_to_owned` duplicates it (`F_DUPFD_CLOEXEC`).
    #[allow(unsafe_code)]
    let fd = unsafe { BorrowedFd::borrow_raw(l4.as_raw_fd()) };
    let Ok(owned) = fd.try_clone_to_owned() else {
        return l4;
    };
    // Non-blocking already: the flag belongs to the shared open socket.
    let Ok(tcp) = tokio::net::TcpStream::from_std(std::net::TcpStream::from(owned)) else {
        return l4;
    };
    drop(l4);
    let mut here = L4Stream::from(tcp);
    let digest = pingora::protocols::SocketDigest::from_raw_fd(here.as_raw_fd());
    let _ = digest.peer_addr.set(peer);
    here.set_socket_digest(digest);
    Box::new(here)
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for GuardedApp<A> {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let permit = match self.guard.admit(ip) {
            Ok(p) => p,
            Err(cap) => {
                metrics::counter!("portico_gateway_connections_refused_total", "cap" => cap).increment(1);
                tracing::debug!(client = ?ip, cap, "connection refused: cap reached");
                return None;
            }
        };
        let stream = self.handshake(stream, ip).await?;
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let mut stream = Box::new(Guarded::new(stream, permit, &self.guard, h2));
        let Some(lean) = self.lean.as_ref().filter(|_| !h2) else {
            return self.inner.process_new(stream, shutdown).await;
        };
        loop {
            stream = lean.serve(stream, shutdown).await?;
            stream = self.one_request(stream, shutdown).await?;
        }
    }

    /// Called once the listeners have stopped. Not passed on to the inner
    /// app: Pingora's cleanup drops every connection waiting for a request
    /// head, the first of a new connection included (see the module doc).
    async fn cleanup(&self) {
        self.guard.closing.cancel();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests on a kept-alive connection.
    Idle,
    /// Reading a request head.
    Head,
    /// The head is complete: body, response, upgraded bytes. Not watched.
    Passthrough,
}

/// A client stream with the guard's deadlines and head limits.
pub struct Guarded {
    inner: Stream,
    permit: Permit,
    phase: Phase,
    /// Resolves when the listeners stop ([`Guard::closing`]); made at the
    /// first wait between requests, so a connection that never waits for a
    /// second request (or is upgraded) holds none.
    closing: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// The head's, the keep-alive's or a reject's deadline; dropped once
    /// the connection is upgraded (a WebSocket keeps no timer here).
    deadline: Option<Pin<Box<Sleep>>>,
    header_timeout: Duration,
    keepalive_idle: Duration,
    max_bytes: usize,
    max_lines: usize,
    head_bytes: usize,
    /// Lines of the head so far (request line included).
    lines: usize,
    /// Non-CR bytes since the last LF: 0 at an empty line (the head's end).
    line_len: usize,
    /// Bytes read past the end of the request head, by the read that
    /// completed it (a body or pipelined bytes, held by Pingora).
    overread: usize,
    /// A 408 or 431 being written before the connection fails.
    reject: Option<Reject>,
    /// Set by [`request_done`]: the next bytes start a new request.
    done: AtomicBool,
    /// A request head is complete and no byte of its response has been
    /// written yet: the next write is the response head.
    expect_head: bool,
    /// A response head rewritten by [`own_error_head`], being written in
    /// place of the caller's `consumed` bytes.
    rewritten: Option<(Vec<u8>, usize, usize)>,
    drain: Arc<Drain>,
    /// Set at a `101`: the connection is a WebSocket tunnel from then on.
    upgraded: Option<Box<Upgraded>>,
    /// Response bytes not yet handed to TLS, and how many of them were.
    out: Vec<u8>,
    out_written: usize,
    /// Bytes read by the lean server and given back ([`Guarded::unread`]):
    /// read again before the stream's.
    unread: bytes::BytesMut,
}

/// The length of a `101 Switching Protocols` head at the start of `buf`.
fn switching_head(buf: &[u8]) -> Option<usize> {
    if !buf.starts_with(b"HTTP/1.1 101 ") {
        return None;
    }
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Pingora answers a request it cannot parse (400) or a CONNECT (405) on
/// its own, with `Server: Pingora` and none of our headers. Rewritten here,
/// the one place its bytes pass: the `Server` line is dropped and the
/// security headers added. `None` for any other response head.
fn own_error_head(buf: &[u8]) -> Option<Vec<u8>> {
    const SERVER: &[u8] = b"\r\nserver: pingora\r\n";
    if !buf.starts_with(b"HTTP/1.1 4") && !buf.starts_with(b"HTTP/1.1 5") {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 2;
    let at = buf[..end + 2]
        .windows(SERVER.len())
        .position(|w| w.eq_ignore_ascii_case(SERVER))?;
    let mut out = Vec::with_capacity(buf.len() + 256);
    out.extend_from_slice(&buf[..at + 2]);
    out.extend_from_slice(&buf[at + SERVER.len()..end]);
    for (name, value) in crate::headers::SECURITY_HEADERS {
        for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            out.extend_from_slice(part);
        }
    }
    out.extend_from_slice(&buf[end..]);
    Some(out)
}

/// Names an ordinary disconnect for the metric: `reset`, `no_close_notify`
/// (the client closed TCP without ending TLS, as browsers often do) or
/// `closed`.
pub fn disconnect_cause(e: &(dyn std::error::Error + Send + Sync + 'static)) -> &'static str {
    match e.downcast_ref::<io::Error>().map(io::Error::kind) {
        Some(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => "reset",
        Some(io::ErrorKind::UnexpectedEof) => "no_close_notify",
        _ => "closed",
    }
}

/// Tells the guard of `stream` (if it has one) that its request is over, so
/// the next read waits for a new request under the keep-alive and header
/// deadlines. Called by the proxy at the end of every request.
pub fn request_done(stream: &Stream) {
    // `**stream`: ask the boxed connection, not the box.
    if let Some(g) = (**stream).as_any().downcast_ref::<Guarded>() {
        g.request_done();
    }
}

/// How many bytes past the current request's head were read with it, if
/// `stream` is guarded (else unknown). See [`crate::tunnel::can_take`].
pub fn overread(stream: &Stream) -> Option<usize> {
    (**stream).as_any().downcast_ref::<Guarded>().map(|g| g.overread)
}

struct Reject {
    response: &'static [u8],
    written: usize,
    error: io::ErrorKind,
    why: &'static str,
}

impl Guarded {
    fn new(inner: Stream, permit: Permit, guard: &Guard, h2: bool) -> Guarded {
        let cfg = &guard.cfg;
        let header_timeout = Duration::from_secs(cfg.header_timeout_secs);
        Guarded {
            inner,
            permit,
            closing: None,
            // HTTP/2 is framed: its limits live in the h2 options.
            phase: if h2 { Phase::Passthrough } else { Phase::Head },
            // The first request's head counts from the accept: a client that
            // connects and sends nothing is cut off too.
            deadline: Some(Box::pin(tokio::time::sleep(header_timeout))),
            header_timeout,
            keepalive_idle: Duration::from_secs(cfg.keepalive_idle_secs),
            max_bytes: cfg.max_header_bytes,
            max_lines: cfg.max_headers + 1,
            head_bytes: 0,
            lines: 0,
            line_len: 0,
            overread: 0,
            reject: None,
            done: AtomicBool::new(false),
            expect_head: false,
            rewritten: None,
            drain: guard.drain.clone(),
            upgraded: None,
            out: Vec::new(),
            out_written: 0,
            unread: bytes::BytesMut::new(),
        }
    }

    /// Puts bytes already read (and watched) back in front of the stream.
    pub fn unread(&mut self, bytes: bytes::BytesMut) {
        self.unread = bytes;
    }

    /// The stream below the guard, for answers the lean server gathers
    /// whole: written as they are, not copied into [`Guarded::out`] (which
    /// holds nothing between Pingora's responses) nor checked as Pingora's
    /// heads are.
    pub fn unbuffered(&mut self) -> &mut Stream {
        debug_assert!(
            self.out.is_empty(),
            "bytes of Pingora's left in the response buffer"
        );
        &mut self.inner
    }

    /// The request is over: the next read waits for a new one under the
    /// keep-alive and header deadlines.
    pub fn request_done(&self) {
        self.done.store(true, Ordering::Release);
    }

    /// The client's address, as the socket has it.
    pub fn peer_ip(&self) -> Option<IpAddr> {
        self.get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
    }

    fn await_next_request(&mut self) {
        self.phase = Phase::Idle;
        if self.closing.is_none() {
            let token = self.permit.guard.closing.clone();
            self.closing = Some(Box::pin(token.cancelled_owned()));
        }
        self.head_bytes = 0;
        self.lines = 0;
        self.line_len = 0;
        self.overread = 0;
        self.reset_deadline(self.keepalive_idle);
    }

    /// Sets the deadline `after` from now.
    fn reset_deadline(&mut self, after: Duration) {
        let at = Instant::now() + after;
        match self.deadline.as_mut() {
            Some(d) => d.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Whether the deadline has passed (registering the wake-up if not).
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }

    /// Follows the head through `bytes`; `Err` when it breaks a limit.
    fn scan(&mut self, bytes: &[u8]) -> Result<(), ()> {
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' if self.line_len == 0 && self.lines > 0 => {
                    self.phase = Phase::Passthrough;
                    self.expect_head = true;
                    self.head_bytes += i + 1;
                    self.overread = bytes.len() - (i + 1);
                    return self.within_limits();
                }
                // Blank lines before the request line are tolerated (RFC 9112).
                b'\n' if self.line_len == 0 => {}
                b'\n' => {
                    self.lines += 1;
                    self.line_len = 0;
                }
                b'\r' => {}
                _ => self.line_len += 1,
            }
        }
        self.head_bytes += bytes.len();
        self.within_limits()
    }

    fn within_limits(&self) -> Result<(), ()> {
        if self.head_bytes > self.max_bytes || self.lines > self.max_lines {
            Err(())
        } else {
            Ok(())
        }
    }

    fn start_reject(&mut self, response: &'static [u8], error: io::ErrorKind, why: &'static str) {
        metrics::counter!("portico_gateway_requests_rejected_total", "reason" => why).increment(1);
        self.reset_deadline(REJECT_WRITE);
        self.reject = Some(Reject {
            response,
            written: 0,
            error,
            why,
        });
    }

    /// Hands what [`Guarded::out`] holds to TLS.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(poll_write_rest(
            &mut self.inner,
            cx,
            &self.out,
            &mut self.out_written
        ))?;
        self.out.clear();
        self.out_written = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `bufs` into [`Guarded::out`], or straight to TLS if large.
    fn poll_buffered(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.out.len() + len > OUT_BUFFER {
            ready!(self.poll_out(cx))?;
        }
        if len >= OUT_BUFFER {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        if self.out.capacity() == 0 {
            self.out.reserve_exact(OUT_BUFFER);
        }
        for b in bufs {
            self.out.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    /// Writes the pending 408/431, then fails the read so Pingora closes.
    fn poll_reject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let passed = self.deadline_passed(cx);
        let r = self.reject.as_mut().expect("called with a reject pending");
        let fail = |r: &Reject| Poll::Ready(Err(io::Error::new(r.error, r.why)));
        if passed {
            return fail(r);
        }
        while r.written < r.response.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &r.response[r.written..])) {
                Ok(0) | Err(_) => return fail(r),
                Ok(n) => r.written += n,
            }
        }
        let _ = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        fail(r)
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            bytes::Buf::advance(&mut this.unread, n);
            if this.unread.is_empty() {
                // Its allocation goes with it (a WebSocket would hold it
                // for its whole life otherwise).
                this.unread = bytes::BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        if this.reject.is_some() {
            return this.poll_reject(cx);
        }
        if let Some(up) = this.upgraded.as_mut() {
            return match ready!(up.poll_read_gate(&mut this.inner, cx))? {
                ReadGate::Pass => Pin::new(&mut this.inner).poll_read(cx, buf),
                ReadGate::Eof => Poll::Ready(Ok(())),
            };
        }
        if this.done.swap(false, Ordering::AcqRel) && this.phase == Phase::Passthrough {
            this.await_next_request();
        }
        if this.phase == Phase::Passthrough {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            // Between requests (or before the first byte), a client that
            // resets or drops TLS without close_notify has simply left:
            // an end of stream, counted, not an error for Pingora to log.
            Poll::Ready(Err(e)) if this.head_bytes == 0 && is_departure(&e) => {
                let cause = disconnect_cause(&e);
                metrics::counter!("portico_gateway_client_disconnects_total", "cause" => cause).increment(1);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => {
                let new = buf.filled().len() - before;
                if new == 0 {
                    return Poll::Ready(Ok(())); // EOF
                }
                if this.phase == Phase::Idle {
                    this.phase = Phase::Head;
                    this.reset_deadline(this.header_timeout);
                }
                if this.scan(&buf.filled()[before..]).is_err() {
                    // Pingora never sees this head.
                    buf.set_filled(before);
                    this.start_reject(TOO_LARGE_431, io::ErrorKind::InvalidData, "header_too_large");
                    return this.poll_reject(cx);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.phase == Phase::Idle
                    && this
                        .closing
                        .as_mut()
                        .is_some_and(|c| c.as_mut().poll(cx).is_ready())
                {
                    // The service stopped: an idle connection ends (EOF).
                    return Poll::Ready(Ok(()));
                }
                if !this.deadline_passed(cx) {
                    return Poll::Pending;
                }
                if this.phase == Phase::Idle {
                    // An idle keep-alive connection ends quietly: EOF.
                    return Poll::Ready(Ok(()));
                }
                this.start_reject(TIMEOUT_408, io::ErrorKind::TimedOut, "header_timeout");
                this.poll_reject(cx)
            }
            ready => ready,
        }
    }
}

/// Writes `bytes[*written..]` to `inner`, counting in `written`.
fn poll_write_rest(
    inner: &mut Stream,
    cx: &mut Context<'_>,
    bytes: &[u8],
    written: &mut usize,
) -> Poll<io::Result<()>> {
    while *written < bytes.len() {
        match ready!(Pin::new(&mut *inner).poll_write(cx, &bytes[*written..]))? {
            0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            n => *written += n,
        }
    }
    Poll::Ready(Ok(()))
}

/// A client leaving: a reset or a TLS stream ended without close_notify.
fn is_departure(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe
    )
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.upgraded.is_some() || this.expect_head || this.rewritten.is_some() {
            // What is gathered goes first (normally nothing: a response
            // ends with a flush).
            ready!(this.poll_out(cx))?;
        }
        if let Some(up) = this.upgraded.as_mut() {
            return up.poll_write(&mut this.inner, cx, buf);
        }
        if std::mem::take(&mut this.expect_head) {
            if let Some(head) = own_error_head(buf) {
                this.rewritten = Some((head, 0, buf.len()));
            } else if let Some(len) = switching_head(buf) {
                // A tunnel from now on: frames leave as they come, and no
                // deadline of the guard's applies.
                this.out = Vec::new();
                this.deadline = None;
                let mut up = Box::new(Upgraded::new(this.drain.clone(), len));
                let polled = up.poll_write(&mut this.inner, cx, buf);
                this.upgraded = Some(up);
                return polled;
            }
        }
        if let Some((head, written, consumed)) = this.rewritten.as_mut() {
            ready!(poll_write_rest(&mut this.inner, cx, head, written))?;
            let consumed = *consumed;
            this.rewritten = None;
            return Poll::Ready(Ok(consumed));
        }
        this.poll_buffered(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        if let Some(up) = this.upgraded.as_mut() {
            up.farewell(&mut this.inner, cx);
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expect_head || this.rewritten.is_some() || this.upgraded.is_some() {
            // A response head: through `poll_write`, which may rewrite it.
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            return Pin::new(this).poll_write(cx, first);
        }
        this.poll_buffered(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

// Pingora's stream traits: all answered by the wrapped stream.

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        let _ = std::future::poll_fn(|cx| self.poll_out(cx)).await;
        if let Some(up) = self.upgraded.as_mut() {
            let inner = &mut self.inner;
            std::future::poll_fn(|cx| {
                up.farewell(inner, cx);
                Poll::Ready(())
            })
            .await;
        }
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .field("upgraded", &self.upgraded.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client connection that records every write it is given, and reads
    /// `input` once.
    #[derive(Debug)]
    struct Recorder {
        input: io::Cursor<Vec<u8>>,
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.input).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.writes.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[async_trait]
    impl Shutdown for Recorder {
        async fn shutdown(&mut self) {}
    }
    impl UniqueID for Recorder {
        fn id(&self) -> UniqueIDType {
            0
        }
    }
    impl Ssl for Recorder {}
    impl GetTimingDigest for Recorder {
        fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
            Vec::new()
        }
    }
    impl GetProxyDigest for Recorder {
        fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
            None
        }
    }
    impl GetSocketDigest for Recorder {
        fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
            None
        }
    }
    impl Peek for Recorder {}

    /// A guarded connection whose client sent `input`, and its writes.
    fn guarded(input: &[u8]) -> (Guarded, Arc<Mutex<Vec<Vec<u8>>>>) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let inner = Recorder {
            input: io::Cursor::new(input.to_vec()),
            writes: writes.clone(),
        };
        let guard = Guard::new(
            ConnectionLimits::default(),
            Vec::new(),
            Drain::new(Duration::from_secs(1)),
        );
        let permit = guard.admit(None).unwrap();
        (Guarded::new(Box::new(inner), permit, &guard, false), writes)
    }

    #[tokio::test]
    async fn a_response_reaches_tls_in_one_write_and_large_writes_go_straight_through() {
        let (mut g, writes) = guarded(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
        let mut head = [0; 64];
        let n = g.read(&mut head).await.unwrap();
        assert_eq!(n, 27);
        g.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
            .await
            .unwrap();
        g.write_all(b"hello").await.unwrap();
        assert!(writes.lock().unwrap().is_empty(), "gathered until the flush");
        g.flush().await.unwrap();
        assert_eq!(
            *writes.lock().unwrap(),
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec()]
        );
        // A large body goes straight through, after what was gathered.
        g.write_all(b"x").await.unwrap();
        g.write_all(&[b'y'; OUT_BUFFER]).await.unwrap();
        assert_eq!(
            writes.lock().unwrap().len(),
            3,
            "the gathered byte, then the large write"
        );
        g.flush().await.unwrap();
    }

    #[tokio::test]
    async fn after_a_101_frames_leave_as_they_are_written() {
        let (mut g, writes) = guarded(b"GET /ws HTTP/1.1\r\nupgrade: websocket\r\n\r\n");
        let _ = g.read(&mut [0; 64]).await.unwrap();
        g.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        g.write_all(b"\x81\x02hi").await.unwrap();
        assert_eq!(writes.lock().unwrap().len(), 2, "head and frame, each at once");
        assert_eq!(g.out.capacity(), 0, "a tunnel holds no write buffer");
    }
}
