//! Upgraded connections (WebSockets) as tunnels of the gateway's own.
//!
//! Pingora proxies an upgraded connection inside the HTTP session that
//! carried its `101`: the session's futures, header maps and 64 KiB body
//! buffers stay allocated for the life of the tunnel, ~88 KiB per idle
//! WebSocket (ARCHITECTURE.md, "WebSockets are tunnels of the gateway's
//! own").
//! Here the proxy does the upgrade handshake itself ([`handshake`]), takes
//! the client's stream out of Pingora's session ([`take_client`]) and joins
//! the two connections in one small task ([`run`]); Pingora's session ends
//! there. An idle tunnel holds the two sockets, the TLS state, the
//! connection guard ([`crate::guard`], which also carries the drain's
//! close frames) and no buffers: data is read into a per-thread scratch
//! buffer and written on at once; only what the other side cannot take at
//! once is copied to the heap, and freed when it has gone.
//!
//! A tunnel ends when both directions have ended (each end of stream is
//! passed on as a half-close), on an error on either side, when nothing
//! has moved for its idle limit, or [`HALF_CLOSED`] after one direction
//! ended. The client's side is always shut down through its stream, so a
//! client whose upstream vanished hears the guard's 1012 close frame.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::forward::MAX_HEAD;

/// Largest body of a refused upgrade (a 401 or 503 from the upstream)
/// passed on to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;
/// How long a tunnel with one direction ended waits for the other.
pub const HALF_CLOSED: Duration = Duration::from_secs(10);
/// How long shutting down the client's side may take at the end.
const SHUTDOWN: Duration = Duration::from_secs(2);
/// Reads per direction before the task yields to others on its thread.
const READS_PER_POLL: usize = 16;
/// One TLS record's plaintext: the most one read of the client returns.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    /// Every tunnel on a thread reads into this buffer: an idle tunnel
    /// holds none of its own.
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Why an upgrade could not be handed to the upstream.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the request cannot be written as HTTP/1.1")]
    BadRequest,
    #[error("writing the upgrade request upstream: {0}")]
    Write(io::Error),
    #[error("reading the upstream's response: {0}")]
    Read(io::Error),
    #[error("the upstream closed the connection before answering")]
    Closed,
    #[error("the upstream's response head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the upstream's response head is malformed: {0}")]
    Malformed(String),
    #[error("the upstream's refusal has a body that cannot be passed on: {0}")]
    Body(&'static str),
}

/// The upstream's answer to an upgrade request.
pub struct Answer {
    pub head: ResponseHeader,
    /// Bytes that arrived behind the head: the first frames of a `101`, or
    /// the start of a refusal's body.
    pub rest: Vec<u8>,
}

/// Whether Pingora's session of this request can be given up for a tunnel
/// of ours: an HTTP/1 upgrade request without a body, of which nothing
/// beyond the head has been read (`overread`, from the connection guard).
pub fn can_take(session: &Session, overread: usize) -> bool {
    let req = session.req_header();
    matches!(*session.downstream_session, ServerSession::H1(_))
        && session.is_upgrade_req()
        && overread == 0
        && !req.headers.contains_key(http::header::TRANSFER_ENCODING)
        && req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// Sends the upgrade request `req` upstream and reads the response head.
pub async fn handshake<U>(upstream: &mut U, req: &RequestHeader) -> Result<Answer, HandshakeError>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let wire = pingora::protocols::http::v1::client::http_req_header_to_wire(req)
        .ok_or(HandshakeError::BadRequest)?;
    upstream.write_all(&wire).await.map_err(HandshakeError::Write)?;
    let mut buf = bytes::BytesMut::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD {
            return Err(HandshakeError::HeadTooLarge);
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().min(MAX_HEAD - buf.len()));
        }
        let n = upstream.read_buf(&mut buf).await.map_err(HandshakeError::Read)?;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        if let Some(head) = crate::forward::Head::parse(&mut buf).map_err(HandshakeError::Malformed)? {
            let head = head.to_upgrade_header().map_err(HandshakeError::Malformed)?;
            return Ok(Answer {
                head,
                rest: buf.to_vec(),
            });
        }
    }
}

/// The body of a refused upgrade: `Content-Length` bytes (at most
/// [`MAX_REFUSAL_BODY`]), `rest` first.
pub async fn refusal_body<U>(
    upstream: &mut U,
    head: &ResponseHeader,
    mut rest: Vec<u8>,
) -> Result<Bytes, HandshakeError>
where
    U: AsyncRead + Unpin,
{
    if head.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Err(HandshakeError::Body("chunked"));
    }
    let len = match head.headers.get(http::header::CONTENT_LENGTH) {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or(HandshakeError::Body("bad content-length"))?,
    };
    if len > MAX_REFUSAL_BODY {
        return Err(HandshakeError::Body("too large"));
    }
    if rest.len() > len {
        return Err(HandshakeError::Body("more bytes than its content-length"));
    }
    let have = rest.len();
    rest.resize(len, 0);
    upstream
        .read_exact(&mut rest[have..])
        .await
        .map_err(HandshakeError::Read)?;
    Ok(Bytes::from(rest))
}

/// Takes the client's connection out of Pingora's session, after the `101`
/// has been written through it. Pingora is left a closed stand-in, which it
/// finishes without reading or writing (keep-alive off).
pub fn take_client(session: &mut Session) -> Option<Stream> {
    let mut stand_in = ServerSession::new_http1(Box::new(io::Cursor::new(Vec::new())));
    stand_in.set_keepalive(None);
    match std::mem::replace(&mut *session.downstream_session, stand_in) {
        ServerSession::H1(s) => Some(s.into_inner()),
        other => {
            *session.downstream_session = other;
            None
        }
    }
}

/// How a tunnel ended.
#[derive(Debug, Default)]
pub struct Ended {
    /// Bytes from the client to the upstream, and back.
    pub up: u64,
    pub down: u64,
    /// What ended it, when not both sides closing in turn.
    pub error: Option<String>,
}

/// Joins `client` and `upstream` until the tunnel ends; `early`: bytes the
/// upstream sent behind its `101`, written to the client first. `idle`:
/// how long nothing may move.
pub async fn run<C, U>(mut client: C, mut upstream: U, early: Vec<u8>, idle: Duration) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut down = Pump::after_head(early);
    let mut up = Pump::default();
    let mut last_moved = Instant::now();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let outcome = poll_fn(|cx| {
        let moved = up.moved + down.moved;
        let up_done = up.poll(cx, Pin::new(&mut client), Pin::new(&mut upstream));
        let down_done = down.poll(cx, Pin::new(&mut upstream), Pin::new(&mut client));
        match (up_done, down_done) {
            (Poll::Ready(Err(e)), _) => return Poll::Ready(Err(e.blame(Failure::Client, Failure::Upstream))),
            (_, Poll::Ready(Err(e))) => return Poll::Ready(Err(e.blame(Failure::Upstream, Failure::Client))),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(Ok(())),
            _ => {}
        }
        if up.moved + down.moved != moved {
            last_moved = Instant::now();
        }
        // One direction over: the other has a short while to follow.
        let limit = if up.done || down.done {
            idle.min(HALF_CLOSED)
        } else {
            idle
        };
        let deadline = last_moved + limit;
        // Re-armed only when it fires or the limit shrinks, not per read.
        if deadline < timer.deadline() {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(Err(Failure::Idle(limit)));
            }
            timer.as_mut().reset(deadline);
            if timer.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    })
    .await;
    let error = outcome.err();
    // The client hears how it ended (the guard's 1012 when the upstream
    // left without a close frame), unless its side is the one that failed
    // or was already shut down.
    if !down.done && !matches!(error, Some(Failure::Client(_))) {
        let _ = tokio::time::timeout(SHUTDOWN, client.shutdown()).await;
    }
    Ended {
        up: up.moved,
        down: down.moved,
        error: error.map(|e| e.to_string()),
    }
}

/// What ended a tunnel other than both sides closing in turn.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("client: {0}")]
    Client(io::Error),
    #[error("upstream: {0}")]
    Upstream(io::Error),
    #[error("nothing moved for {0:?}")]
    Idle(Duration),
}

/// An error of one direction, on its reading or its writing side.
struct PumpError {
    reading: bool,
    error: io::Error,
}

impl PumpError {
    fn blame(self, reader: fn(io::Error) -> Failure, writer: fn(io::Error) -> Failure) -> Failure {
        if self.reading {
            reader(self.error)
        } else {
            writer(self.error)
        }
    }
}

fn writing(error: io::Error) -> PumpError {
    PumpError {
        reading: false,
        error,
    }
}

/// One direction of a tunnel.
#[derive(Default)]
struct Pump {
    /// Bytes read but not yet written (empty, unallocated, when idle).
    pending: Vec<u8>,
    written: usize,
    /// Written since the last flush.
    unflushed: bool,
    /// The reader ended; the writer is then flushed and shut down.
    eof: bool,
    done: bool,
    moved: u64,
}

impl Pump {
    /// The client's direction: `early` bytes to write first, and the
    /// `101` head, written before through the same stream, to flush.
    fn after_head(early: Vec<u8>) -> Pump {
        Pump {
            pending: early,
            unflushed: true,
            ..Pump::default()
        }
    }

    /// Moves bytes until both sides wait; `Ready(Ok)` once the reader's end
    /// has been passed on as a shutdown of the writer.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<Result<(), PumpError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..READS_PER_POLL {
            ready!(self.poll_pending(cx, w.as_mut())).map_err(writing)?;
            if self.eof {
                if self.unflushed {
                    ready!(w.as_mut().poll_flush(cx)).map_err(writing)?;
                    self.unflushed = false;
                }
                ready!(w.as_mut().poll_shutdown(cx)).map_err(writing)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let read = SCRATCH_BUF.with_borrow_mut(|scratch| {
                let mut buf = ReadBuf::new(scratch);
                match r.as_mut().poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        if n == 0 {
                            self.eof = true;
                            return Poll::Ready(Ok(()));
                        }
                        self.write_through(cx, w.as_mut(), &scratch[..n]).map_err(writing)
                    }
                    Poll::Ready(Err(error)) => Poll::Ready(Err(PumpError { reading: true, error })),
                    Poll::Pending => Poll::Pending,
                }
            });
            match read {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more to read: what was written leaves now.
                    if self.unflushed && self.pending.is_empty() {
                        ready!(w.as_mut().poll_flush(cx)).map_err(writing)?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
        // Others on this thread get their turn; this one comes back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes freshly read bytes; what the writer does not take now is kept.
    fn write_through<W>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
        mut bytes: &[u8],
    ) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + ?Sized,
    {
        while !bytes.is_empty() {
            match w.as_mut().poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.moved += n as u64;
                    self.unflushed = true;
                    bytes = &bytes[n..];
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.pending.extend_from_slice(bytes);
                    return Poll::Ready(Ok(()));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what was kept; frees it once written.
    fn poll_pending<W>(&mut self, cx: &mut Context<'_>, mut w: Pin<&mut W>) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + ?Sized,
    {
        while self.written < self.pending.len() {
            match ready!(w.as_mut().poll_write(cx, &self.pending[self.written..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => {
                    self.written += n;
                    self.moved += n as u64;
                    self.unflushed = true;
                }
            }
        }
        if !self.pending.is_empty() {
            self.pending = Vec::new();
            self.written = 0;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// A tunnel between two in-memory pipes; returns the far ends.
    fn tunnel(
        early: &[u8],
        idle: Duration,
        pipe: usize,
    ) -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Ended>,
    ) {
        let (client, client_far) = duplex(pipe);
        let (upstream, upstream_far) = duplex(pipe);
        let task = tokio::spawn(run(client, upstream, early.to_vec(), idle));
        (client_far, upstream_far, task)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_early_bytes_first_and_ends_pass_on() {
        // A pipe smaller than what is sent: writes wait, bytes are kept.
        let (mut client, mut upstream, task) = tunnel(b"early", Duration::from_secs(60), 1000);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let to_upstream = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&to_upstream).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big, "client to upstream, whole and in order, then its end");
        upstream.write_all(b"reply").await.unwrap();
        upstream.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"earlyreply");
        let ended = task.await.unwrap();
        assert_eq!((ended.up, ended.down), (300_000, 10));
        assert!(ended.error.is_none(), "{:?}", ended.error);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_where_nothing_moves_ends_after_its_idle_limit() {
        let idle = Duration::from_secs(120);
        let (mut client, mut upstream, task) = tunnel(b"", idle, 64);
        // Traffic keeps it open past the limit.
        for _ in 0..3 {
            tokio::time::sleep(idle / 2).await;
            client.write_all(b"ping").await.unwrap();
            let mut b = [0; 4];
            upstream.read_exact(&mut b).await.unwrap();
        }
        assert!(!task.is_finished());
        let quiet = Instant::now();
        let ended = task.await.unwrap();
        assert!(quiet.elapsed() >= idle && quiet.elapsed() < idle + Duration::from_secs(1));
        assert!(ended.error.unwrap().contains("nothing moved for 120s"));
        // The client's side was shut down: it reads its end.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_tunnel_waits_only_a_short_while() {
        let t0 = Instant::now();
        let (client, _upstream, task) = tunnel(b"", Duration::from_secs(120), 64);
        drop(client); // the client is gone; the upstream never answers
        let ended = task.await.unwrap();
        assert!(ended.error.unwrap().contains("10s"));
        assert!(t0.elapsed() <= HALF_CLOSED + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn an_idle_tunnel_holds_no_buffer() {
        let (client, mut client_far) = duplex(16);
        let (upstream, mut upstream_far) = duplex(1 << 20);
        let mut down = Pump::default();
        let (mut upstream, mut client) = (upstream, client);
        upstream_far.write_all(&[7; 100]).await.unwrap();
        // The client's pipe takes 16 bytes: the rest is kept...
        poll_fn(|cx| {
            let _ = down
                .poll(cx, Pin::new(&mut upstream), Pin::new(&mut client))
                .map_err(|e| e.error);
            Poll::Ready(())
        })
        .await;
        assert_eq!(down.pending.len(), 84);
        // ...until the client reads, and then freed.
        let mut got = vec![0; 100];
        let reader = tokio::spawn(async move {
            client_far.read_exact(&mut got).await.unwrap();
            got
        });
        poll_fn(
            |cx| match down.poll(cx, Pin::new(&mut upstream), Pin::new(&mut client)) {
                Poll::Pending if down.moved == 100 => Poll::Ready(()),
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => panic!("ended: {:?}", r.map_err(|e| e.error)),
            },
        )
        .await;
        assert_eq!(reader.await.unwrap(), vec![7; 100]);
        assert_eq!(down.pending.capacity(), 0, "nothing held once written");
    }

    #[tokio::test]
    async fn the_handshake_reads_the_head_and_keeps_what_follows() {
        let (mut gw, mut up) = duplex(4096);
        let server = tokio::spawn(async move {
            let mut req = vec![0; 4096];
            let n = up.read(&mut req).await.unwrap();
            up.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n")
                .await
                .unwrap();
            up.write_all(b"Connection: upgrade\r\n\r\n\x81\x02hi")
                .await
                .unwrap();
            String::from_utf8(req[..n].to_vec()).unwrap()
        });
        let mut req = RequestHeader::build("GET", b"/ws?x=1", None).unwrap();
        req.insert_header("upgrade", "websocket").unwrap();
        let answer = handshake(&mut gw, &req).await.unwrap();
        assert_eq!(answer.head.status.as_u16(), 101);
        assert_eq!(answer.head.headers["upgrade"], "websocket");
        assert_eq!(answer.rest, b"\x81\x02hi");
        let sent = server.await.unwrap();
        assert!(sent.starts_with("GET /ws?x=1 HTTP/1.1\r\n"), "{sent}");
    }

    #[tokio::test]
    async fn bad_upstream_answers_are_named() {
        for (answer, want) in [
            (&b"HTTP/1.1 1x1 Nope\r\n\r\n"[..], "malformed"),
            (&b""[..], "closed"),
            (&[b'a'; MAX_HEAD + 10][..], "malformed"),
        ] {
            let (mut gw, mut up) = duplex(64 * 1024);
            up.write_all(answer).await.unwrap();
            up.shutdown().await.unwrap(); // an end after the answer
            let req = RequestHeader::build("GET", b"/ws", None).unwrap();
            let err = handshake(&mut gw, &req).await.err().expect("refused");
            assert!(err.to_string().contains(want), "{err} for {want}");
        }
        let (mut gw, mut up) = duplex(64 * 1024);
        let long = format!("HTTP/1.1 101 OK\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        up.write_all(long.as_bytes()).await.unwrap();
        let req = RequestHeader::build("GET", b"/ws", None).unwrap();
        let err = handshake(&mut gw, &req).await.err().expect("refused");
        assert!(matches!(err, HandshakeError::HeadTooLarge), "{err}");
    }

    #[tokio::test]
    async fn a_refusal_s_body_is_read_by_its_length_and_bounded() {
        let mut head = ResponseHeader::build(401, None).unwrap();
        head.insert_header("content-length", "9").unwrap();
        let mut src: &[u8] = b" token";
        let body = refusal_body(&mut src, &head, b"bad".to_vec()).await.unwrap();
        assert_eq!(&body[..], b"bad token");
        head.insert_header("content-length", (MAX_REFUSAL_BODY + 1).to_string())
            .unwrap();
        assert!(refusal_body(&mut src, &head, Vec::new()).await.is_err());
        head.insert_header("content-length", "x").unwrap();
        assert!(refusal_body(&mut src, &head, Vec::new()).await.is_err());
    }
}
