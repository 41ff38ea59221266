//! The gateway's own HTTP/1.1 loop for plain requests.
//!
//! Pingora's HTTP/1 server builds, per request, a session with its own
//! read buffer, module contexts and body reader and writer, and runs each
//! proxy phase as a boxed future; beside nginx that was more than half of
//! the gateway's user CPU per proxied request (loadtest/results/profiles).
//! This loop serves the requests that make up nearly all of an API's and a
//! proxied site's traffic on one buffer per connection: the head is parsed
//! in place with `httparse`, its header values are slices of that buffer,
//! and the answer is written in one piece. The decisions are the proxy's
//! own, shared with Pingora's path: [`Edge::route`], [`Edge::admit`],
//! [`Edge::exchange`], [`failure`], [`log_request`].
//!
//! Served here: HTTP/1.1 requests in origin form whose `Connection` names
//! only `keep-alive` or `close`, with no `Upgrade`, `Expect` or
//! `Transfer-Encoding`, and no body or one of at most
//! [`crate::proxy::BUFFERED_BODY`] bytes declared by one `Content-Length`,
//! routed to an upstream, a chat shard or a file route, whose answer the
//! edge's gzip (Pingora's compression module) would not touch: the client
//! accepts no content coding, the path is an API's, or the file is one it
//! does not compress ([`crate::files::Reply::gzip_ok`]: images, variants,
//! ranges); and the gateway's own answers (refusals, rate limits, pages).
//! Any other request (HTTP/1.0, a WebSocket upgrade, a streamed or large
//! body, an answer to be gzipped, a head `httparse` or `http` refuses) is
//! handed to Pingora with the bytes read so far put back
//! ([`Client::hand_over`], counted by reason); the connection comes back
//! here after it if it stays open (`guard::GuardedApp`).
//!
//! The head's deadline and size limits are the guard's (the stream is a
//! [`Guarded`]); a body must arrive within the same allowance as on
//! Pingora's path, and each write of an answer must be taken within
//! `send_timeout_secs`, as Pingora's session is told to.
//!
//! A proxied request builds no header map on its way out or back: the
//! upstream gets the client's lines as they came (`put_upstream_head`),
//! the client the upstream's ([`forward::Head`](crate::forward::Head),
//! `Edge::put_client_head`), under the rules Pingora's path applies to
//! its maps.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::answer::Canned;
use crate::forward::{Conn, Head as Upstream, is_hop_by_hop_request};
use crate::guard::{Guarded, Lean};
use crate::headers::{DROPPED, is_one_of};
use crate::proxy::{
    BUFFERED_BODY, Ctx, Edge, authority, failure, forwarded, log_request, never_compressed,
    new_sticky_cookie, upstream_heard,
};
use crate::routes::Target;
use crate::screen::is_spoofable;

/// Header lines parsed in place; a head with more goes to Pingora.
const MAX_HEADERS: usize = 100;
/// Room made in the read buffer before each read.
const READ_SIZE: usize = 4096;
/// A response body piece this large is written as it is, not copied
/// behind its head first.
const COPY_UP_TO: usize = 4096;

/// A request head read from the buffer.
enum Head {
    /// Served here: the head, its bytes (split off the buffer; the header
    /// values are slices of them) and its body's length.
    Ours(Box<RequestHeader>, Bytes, u64),
    /// More bytes are needed.
    Partial,
    /// Left to Pingora, and why (the `reason` of the hand-over counter).
    Theirs(&'static str),
}

/// How a request ended for the connection.
enum Next {
    /// Ready for the next request.
    KeepAlive,
    /// Closed (or to be closed) after this answer.
    Close,
    /// Left to Pingora, and why; nothing of it was answered or counted.
    Theirs(&'static str),
}

/// One client connection on the loop: the stream, the bytes read and not
/// yet used, the answer being gathered, and the header offsets of `parse`.
struct Client {
    conn: Box<Guarded>,
    /// How long each write to the client may take (`send_timeout_secs`).
    send_timeout: Duration,
    /// A write to the client failed or timed out: the connection closes.
    broken: bool,
    buf: BytesMut,
    out: BytesMut,
    spans: Spans,
}

/// Where each header line's name and value lie in a head's bytes.
type Spans = Vec<(Range<usize>, Range<usize>)>;

#[async_trait]
impl Lean for Edge {
    async fn serve(&self, conn: Box<Guarded>, shutdown: &ShutdownWatch) -> Option<Box<Guarded>> {
        let peer = conn.peer_ip();
        let mut c = Client {
            conn,
            send_timeout: self.send_timeout,
            broken: false,
            buf: BytesMut::with_capacity(READ_SIZE),
            out: BytesMut::new(),
            spans: Vec::with_capacity(32),
        };
        loop {
            let (req, head, body_len) = loop {
                if !c.buf.is_empty() {
                    match parse(&mut c.buf, &mut c.spans) {
                        Head::Ours(req, head, body_len) => break (req, head, body_len),
                        Head::Partial => {}
                        Head::Theirs(why) => return Some(c.hand_over(why)),
                    }
                }
                c.buf.reserve(READ_SIZE);
                // The guard answers a head too slow or too large itself
                // (408, 431) and fails the read; a departure is an end.
                match c.conn.read_buf(&mut c.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            };
            match self.answer(&mut c, req, &head, body_len, peer, shutdown).await {
                Next::KeepAlive => {}
                Next::Close => {
                    // A client that stopped reading gets no farewell: it
                    // would wait for the room it does not make.
                    if !c.broken {
                        let _ = tokio::time::timeout(c.send_timeout, c.conn.shutdown()).await;
                    }
                    return None;
                }
                Next::Theirs(why) => {
                    c.buf = rejoin(&head, &c.buf);
                    return Some(c.hand_over(why));
                }
            }
        }
    }
}

impl Edge {
    /// Answers one request whose head (`req`, read from the bytes `head`
    /// whose lines `c.spans` locates) was just read; its body, if any, is
    /// at the start of `c.buf`, whole or in part.
    async fn answer(
        &self,
        c: &mut Client,
        mut req: Box<RequestHeader>,
        head: &[u8],
        body_len: u64,
        peer: Option<std::net::IpAddr>,
        shutdown: &ShutdownWatch,
    ) -> Next {
        let mut ctx = pingora::proxy::ProxyHttp::new_ctx(self);
        ctx.client_ip = self.client_ip(peer, &req);
        let mut answer = self.route(&mut req, &mut ctx);
        // Until `admit`, nothing is counted: Pingora's path may still take
        // the request and decide again.
        let mut file = None;
        if answer.is_none() && ctx.route.target == Target::Files {
            if let Some(files) = ctx.route.files.clone() {
                match crate::files::reply(&req, &files).await {
                    Ok(reply) if reply.gzip_ok && compressible(&req) => return Next::Theirs("compressible"),
                    Ok(reply) => file = Some(reply),
                    Err(_) => return Next::Theirs("files"),
                }
            }
        } else if answer.is_none() && compressible(&req) {
            return Next::Theirs("compressible");
        }
        let mut close = *shutdown.borrow() || closes(&req);
        answer = answer.or_else(|| self.admit(&req, false, &mut ctx));
        if ctx.route.target != Target::Files {
            answer = answer.or_else(|| Edge::body_limit(Some(body_len), &ctx));
        }
        let body_len = body_len as usize;
        if answer.is_none() && c.buf.len() < body_len {
            // Small bodies arrive whole before an upstream connection is
            // taken, as on Pingora's path.
            let allowed = self.body_timeout + Duration::from_secs(body_len as u64 / self.body_min_rate);
            match tokio::time::timeout(allowed, c.read_body(body_len)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Next::Close,
                Err(_) => answer = Some(Edge::body_too_slow()),
            }
        }
        // An answer given before the body is read closes the connection
        // unless the whole body is here to be skipped.
        close |= answer.is_some() && c.buf.len() < body_len;
        let head_request = req.method == http::Method::HEAD;
        let (status, error) = match (answer, file) {
            (Some(answer), _) => {
                close |= answer.closes();
                (c.write_canned(&answer, head_request, close).await, None)
            }
            (None, Some(reply)) => match c.write_file(reply, head_request, close).await {
                Ok(status) => (status, None),
                Err((status, e)) => {
                    close = true;
                    (status, e)
                }
            },
            (None, None) if ctx.route.target == Target::Files => (
                c.write_canned(&crate::answer::not_found(), head_request, close)
                    .await,
                None,
            ),
            (None, None) => {
                c.out.clear();
                put_upstream_head(&mut c.out, &req, head, &c.spans, &ctx);
                c.out.extend_from_slice(&c.buf[..body_len]);
                let sent = self.send(&c.out, head_request, &mut ctx).await;
                let exchanged = sent.and_then(|(head, up)| {
                    c.out.clear();
                    self.put_client_head(&mut c.out, &head, &mut ctx, close)?;
                    Ok((head.status.as_u16(), head.chunked(), up))
                });
                match exchanged {
                    Ok((status, chunked, up)) => match c
                        .relay(status, chunked, up, head_request, ctx.route.timeout)
                        .await
                    {
                        Ok(status) => (status, None),
                        Err((status, e)) => {
                            close = true;
                            let e = e.map(|e| {
                                let e = crate::proxy::upstream_failure(e);
                                let _ = failure(&e, &ctx);
                                e
                            });
                            (status, e)
                        }
                    },
                    Err(e) => {
                        let (code, answer) = failure(&e, &ctx);
                        close = true;
                        let status = match answer {
                            Some(answer) => c.write_canned(&answer, head_request, close).await,
                            None => code,
                        };
                        (status, Some(e))
                    }
                }
            }
        };
        log_request(&req, status, &ctx, error.as_deref());
        c.conn.request_done();
        if close || c.broken {
            return Next::Close;
        }
        c.buf.advance(body_len.min(c.buf.len()));
        Next::KeepAlive
    }

    /// Writes an upstream's head as the client gets it: the rules of the
    /// proxy's response filter (`Edge::filter_response`) applied to the
    /// lines as they came, with no header map built; a hosted app's head,
    /// which `paas` confines, goes through the filter itself.
    fn put_client_head(
        &self,
        out: &mut BytesMut,
        head: &Upstream,
        ctx: &mut Ctx,
        close: bool,
    ) -> pingora::Result<()> {
        if ctx.app.is_some() {
            let mut resp = self.client_head(head, ctx)?;
            put_head(out, &mut resp, close);
            return Ok(());
        }
        upstream_heard(ctx);
        put_status(out, head.status);
        // `Date` is ours (`end_head`).
        let ours = |name: &[u8]| name.eq_ignore_ascii_case(header::DATE.as_str().as_bytes());
        for (name, value) in head
            .passed()
            .filter(|(name, _)| !ours(name) && !is_one_of(name, &DROPPED))
        {
            put_line(out, name, value);
        }
        for (name, value) in crate::headers::missing(|name| head.has(name)) {
            put_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(cookie) = new_sticky_cookie(ctx) {
            put_line(out, header::SET_COOKIE.as_str().as_bytes(), cookie.as_bytes());
        }
        end_head(out, close);
        Ok(())
    }
}

impl Client {
    /// Reads until the buffer holds `len` bytes (a request's body).
    async fn read_body(&mut self, len: usize) -> std::io::Result<()> {
        while self.buf.len() < len {
            self.buf.reserve(len - self.buf.len());
            if self.conn.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Gives the connection to Pingora with the buffer to be read again,
    /// counted by `why`.
    fn hand_over(mut self, why: &'static str) -> Box<Guarded> {
        metrics::counter!("portico_gateway_handovers_total", "reason" => why).increment(1);
        self.conn.unread(self.buf);
        self.conn
    }

    /// Writes one of the gateway's own answers (its head alone to a
    /// `HEAD`); its status.
    async fn write_canned(&mut self, answer: &Canned, head_request: bool, close: bool) -> u16 {
        let Ok((mut head, body)) = answer.response() else {
            return 500;
        };
        self.out.clear();
        put_head(&mut self.out, &mut head, close);
        if let Some(body) = body.filter(|_| !head_request) {
            self.out.put_slice(&body);
        }
        let _ = self.write_out().await;
        head.status.as_u16()
    }

    /// Writes a file route's reply; its status, or the status and the
    /// failure once the head has left.
    async fn write_file(
        &mut self,
        reply: crate::files::Reply,
        head_request: bool,
        close: bool,
    ) -> Result<u16, (u16, Option<Box<pingora::Error>>)> {
        let crate::files::Reply { head, body, .. } = reply;
        let status = head.status.as_u16();
        let client = |_: std::io::Error| (status, None);
        self.out.clear();
        put_status(&mut self.out, head.status);
        for (name, value) in &head.lines {
            put_line(&mut self.out, name.as_str().as_bytes(), value.as_bytes());
        }
        end_head(&mut self.out, close);
        match body {
            _ if head_request => {}
            crate::files::Body::Empty => {}
            crate::files::Body::Bytes(bytes) => self.put_piece(&bytes, false).await.map_err(client)?,
            crate::files::Body::File { path, start, len } => {
                let mut file =
                    crate::files::FileBody::open(&path, start, len).map_err(|e| (status, Some(e)))?;
                while let Some(piece) = file.next().await.map_err(|e| (status, Some(e)))? {
                    self.put_piece(&piece, false).await.map_err(client)?;
                }
            }
        }
        self.write_out().await.map_err(client)?;
        Ok(status)
    }

    /// Adds a piece of a body (as a chunk if `chunked`) behind what `out`
    /// holds; a large piece is written as it is, after `out`.
    async fn put_piece(&mut self, piece: &[u8], chunked: bool) -> std::io::Result<()> {
        if chunked {
            self.out.put_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        }
        if piece.len() > COPY_UP_TO {
            let limit = self.send_timeout;
            let stream = self.conn.unbuffered();
            let written = within(limit, async {
                stream.write_all(&self.out).await?;
                stream.write_all(piece).await
            })
            .await;
            self.broken |= written.is_err();
            written?;
            self.out.clear();
        } else {
            self.out.put_slice(piece);
        }
        if chunked {
            self.out.put_slice(b"\r\n");
        }
        Ok(())
    }

    /// Writes what `out` holds and flushes it to the client.
    async fn write_out(&mut self) -> std::io::Result<()> {
        let limit = self.send_timeout;
        let stream = self.conn.unbuffered();
        let written = within(limit, async {
            stream.write_all(&self.out).await?;
            stream.flush().await
        })
        .await;
        self.broken |= written.is_err();
        self.out.clear();
        written
    }

    /// Passes the upstream's answer on: its status, or the status and the
    /// upstream's failure (`None`: the client's) once the head has left.
    /// Its head (`status`, body `chunked` or not) is in `out`.
    async fn relay(
        &mut self,
        status: u16,
        chunked: bool,
        mut up: Conn,
        head_request: bool,
        timeout: Duration,
    ) -> Result<u16, (u16, Option<crate::forward::ForwardError>)> {
        let no_body = head_request || matches!(status, 204 | 304);
        let chunked = chunked && !no_body;
        let client = |_: std::io::Error| (status, None);
        while !up.is_done() {
            match up.next_body(timeout).await {
                Ok(Some(piece)) if !piece.is_empty() && !no_body => {
                    self.put_piece(&piece, chunked).await.map_err(client)?;
                }
                Ok(_) => {}
                Err(e) => return Err((status, Some(e))),
            }
        }
        // Back to the pool before the last write (see `proxy::Edge::forward`).
        up.release();
        if chunked {
            self.out.put_slice(b"0\r\n\r\n");
        }
        self.write_out().await.map_err(client)?;
        Ok(status)
    }
}

/// A write to the client that must be done within `limit`: one that
/// stops reading is let go (the caller closes the connection).
async fn within(limit: Duration, write: impl Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
    tokio::time::timeout(limit, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// A head split off the buffer, put back in front of the rest.
fn rejoin(head: &[u8], rest: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(head.len() + rest.len());
    buf.put_slice(head);
    buf.put_slice(rest);
    buf
}

/// Parses the request head at the start of `buf`; a head served here is
/// split off `buf` (which keeps the body and what follows).
fn parse(buf: &mut BytesMut, spans: &mut Spans) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Theirs("malformed"),
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Head::Theirs("version");
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Head::Theirs("target");
    }
    let Ok(mut req) = RequestHeader::build_no_case(method, path.as_bytes(), Some(parsed.headers.len()))
    else {
        return Head::Theirs("malformed");
    };
    let base = buf.as_ptr() as usize;
    spans.clear();
    for h in parsed.headers.iter() {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        spans.push((name..name + h.name.len(), value..value + h.value.len()));
    }
    let head = buf.split_to(head_len).freeze();
    for (name, value) in spans.iter() {
        let Ok(name) = HeaderName::from_bytes(&head[name.clone()]) else {
            return theirs(buf, head, "malformed");
        };
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice(value.clone())) else {
            return theirs(buf, head, "malformed");
        };
        if req.append_header(name, value).is_err() {
            return theirs(buf, head, "malformed");
        }
    }
    match plain(&req) {
        Ok(body_len) => Head::Ours(Box::new(req), head, body_len),
        Err(why) => theirs(buf, head, why),
    }
}

/// Puts a head split off by `parse` back in front of `buf`.
fn theirs(buf: &mut BytesMut, head: Bytes, why: &'static str) -> Head {
    *buf = rejoin(&head, buf);
    Head::Theirs(why)
}

/// The body's length if the request is one served here (module doc),
/// else why not.
fn plain(req: &RequestHeader) -> Result<u64, &'static str> {
    let h = &req.headers;
    if h.contains_key(header::UPGRADE) {
        return Err("upgrade");
    }
    if !crate::forward::plain_connection(req) {
        return Err("connection");
    }
    if h.contains_key(header::TRANSFER_ENCODING)
        || h.contains_key(header::EXPECT)
        || h.get_all(header::CONTENT_LENGTH).iter().count() > 1
    {
        return Err("body");
    }
    let n = match h.get(header::CONTENT_LENGTH) {
        None => 0,
        Some(v) => crate::screen::content_length(v.as_bytes()).ok_or("body")?,
    };
    if n > BUFFERED_BODY {
        return Err("body");
    }
    Ok(n)
}

/// Whether the client asked to close the connection after this request.
fn closes(req: &RequestHeader) -> bool {
    crate::forward::connection_tokens(req).any(|t| t.eq_ignore_ascii_case(b"close"))
}

/// Whether the answer may be compressed (Pingora's compression module does
/// that): the client accepts a content coding and the path is not an API's.
fn compressible(req: &RequestHeader) -> bool {
    !never_compressed(req.uri.path())
        && req.headers.get_all(header::ACCEPT_ENCODING).iter().any(|v| {
            v.as_bytes().split(|&b| b == b',').any(|t| {
                let coding = t.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity")
            })
        })
}

/// Appends `head` as an HTTP/1.1 response head, with `Date` and
/// `Connection` set as Pingora's server sets them.
fn put_head(out: &mut BytesMut, head: &mut ResponseHeader, close: bool) {
    head.remove_header(&header::DATE);
    head.remove_header(&header::CONNECTION);
    put_status(out, head.status);
    head.header_to_h1_wire(out);
    end_head(out, close);
}

/// The `Date` and `Connection` lines Pingora's server would write, and the
/// end of the head.
fn end_head(out: &mut BytesMut, close: bool) {
    put_line(
        out,
        header::DATE.as_str().as_bytes(),
        pingora::protocols::http::date::get_cached_date().as_bytes(),
    );
    put_connection(out, close);
    out.put_slice(b"\r\n");
}

/// The request head as the upstream gets it (the rules of
/// `Edge::exchange`), written from the client's lines as they came: the
/// request line with the screened target, every line but those about the
/// client's connection and its claims about itself, then what the gateway
/// says ([`forwarded`]).
fn put_upstream_head(out: &mut BytesMut, req: &RequestHeader, head: &[u8], spans: &Spans, ctx: &Ctx) {
    out.put_slice(req.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(req.raw_path());
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in spans {
        let name = &head[name.clone()];
        if !is_hop_by_hop_request(name) && !is_spoofable(name) {
            put_line(out, name, &head[value.clone()]);
        }
    }
    forwarded(ctx, authority(req), |name, value| {
        put_line(out, name.as_str().as_bytes(), value)
    });
    out.put_slice(b"\r\n");
}

/// An HTTP/1.1 status line.
fn put_status(out: &mut BytesMut, status: http::StatusCode) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or_default().as_bytes());
    out.put_slice(b"\r\n");
}

/// One header line.
fn put_line(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// The `Connection` line, as Pingora's server writes it.
fn put_connection(out: &mut BytesMut, close: bool) {
    out.put_slice(if close {
        b"connection: close\r\n"
    } else {
        b"connection: keep-alive\r\n"
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let mut spans = Vec::new();
        let head = parse(&mut buf, &mut spans);
        (head, buf)
    }

    /// A head served here is split off the buffer, which keeps its body
    /// and what follows; header values are the head's own bytes.
    #[test]
    fn a_plain_head_is_split_off_with_its_body_left_behind() {
        let (head, rest) =
            parsed(b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-Y: z\r\n\r\nabcGET");
        let Head::Ours(req, bytes, body) = head else {
            panic!("not served here");
        };
        assert_eq!(
            (req.method.as_str(), req.uri.path(), req.uri.query()),
            ("POST", "/a", Some("b=1"))
        );
        assert_eq!(req.headers["x-y"], "z");
        assert_eq!(body, 3);
        assert!(bytes.ends_with(b"\r\n\r\n"));
        assert_eq!(&rest[..], b"abcGET");
    }

    /// Whatever is left to Pingora leaves the buffer exactly as it was, so
    /// Pingora reads the request whole; each says why.
    #[test]
    fn heads_left_to_pingora_are_put_back_untouched() {
        let big = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            BUFFERED_BODY + 1
        );
        let cases: &[(&[u8], &str)] = &[
            (b"GET / HTTP/1.0\r\n\r\n", "version"),
            (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", "target"),
            (b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n", "target"),
            (
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                "upgrade",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: x-secret\r\n\r\n",
                "connection",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "body",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab",
                "body",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\na",
                "body",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
                "body",
            ),
            (big.as_bytes(), "body"),
            (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", "malformed"),
        ];
        for (bytes, why) in cases {
            let (head, rest) = parsed(bytes);
            match head {
                Head::Theirs(got) => assert_eq!(got, *why, "{}", String::from_utf8_lossy(bytes)),
                _ => panic!("served here: {}", String::from_utf8_lossy(bytes)),
            }
            assert_eq!(&rest[..], *bytes, "bytes changed");
        }
    }

    #[test]
    fn a_head_cut_short_waits_for_more() {
        let (head, rest) = parsed(b"GET / HTTP/1.1\r\nHost: x\r\n");
        assert!(matches!(head, Head::Partial));
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\nHost: x\r\n");
    }

    #[test]
    fn compression_and_close_are_read_from_the_head() {
        let head = |extra: &str, path: &str| {
            let (Head::Ours(req, ..), _) =
                parsed(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes())
            else {
                panic!("not served here");
            };
            req
        };
        assert!(compressible(&head("Accept-Encoding: gzip, br\r\n", "/page")));
        assert!(!compressible(&head("Accept-Encoding: identity\r\n", "/page")));
        assert!(!compressible(&head("", "/page")));
        assert!(!compressible(&head(
            "Accept-Encoding: gzip\r\n",
            "/api/conversations"
        )));
        assert!(closes(&head("Connection: keep-alive, close\r\n", "/")));
        assert!(!closes(&head("Connection: keep-alive\r\n", "/")));
    }
}
