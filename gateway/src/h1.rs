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
//! routed to an upstream or a chat shard, whose answer is not to be
//! compressed (the client accepts no content coding, or the path is an
//! API's), and the gateway's own answers (refusals, rate limits, pages).
//! At any other request (HTTP/1.0, WebSocket upgrades, streamed or large
//! bodies, file routes, compressible answers, a head `httparse` or `http`
//! refuses) the connection goes to Pingora, with the bytes read so far put
//! back, and stays there.
//!
//! The head's deadline and size limits are the guard's (the stream is a
//! [`Guarded`]); a body must arrive within the same allowance as on
//! Pingora's path.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::forward::Conn;
use crate::guard::{Guarded, Lean};
use crate::proxy::{BUFFERED_BODY, Canned, Edge, failure, log_request, never_compressed};
use crate::routes::Target;

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

#[async_trait]
impl Lean for Edge {
    async fn serve(&self, mut conn: Box<Guarded>, shutdown: &ShutdownWatch) -> Option<Box<Guarded>> {
        let peer = conn.peer_ip();
        let mut buf = BytesMut::with_capacity(READ_SIZE);
        let mut out = BytesMut::new();
        let mut spans = Vec::with_capacity(32);
        loop {
            let (mut req, head, body_len) = loop {
                if !buf.is_empty() {
                    match parse(&mut buf, &mut spans) {
                        Head::Ours(req, head, body_len) => break (req, head, body_len),
                        Head::Partial => {}
                        Head::Theirs(why) => return Some(hand_over(conn, buf, why)),
                    }
                }
                buf.reserve(READ_SIZE);
                // The guard answers a head too slow or too large itself
                // (408, 431) and fails the read; a departure is an end.
                match conn.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            };
            let mut ctx = pingora::proxy::ProxyHttp::new_ctx(self);
            ctx.client_ip = self.client_ip(peer, &req);
            let routed = self.route(&mut req, &mut ctx);
            let theirs = match () {
                _ if routed.is_some() => None,
                _ if ctx.route.target == Target::Files => Some("files"),
                _ if compressible(&req) => Some("compressible"),
                _ => None,
            };
            if let Some(why) = theirs {
                // `route` counted nothing: Pingora's path decides again.
                return Some(hand_over(conn, rejoin(&head, &buf), why));
            }
            let mut close = *shutdown.borrow() || closes(&req);
            let mut answer = routed
                .or_else(|| self.admit(&req, false, &mut ctx))
                .or_else(|| Edge::body_limit(Some(body_len).filter(|n| *n > 0), &ctx));
            let body_len = body_len as usize;
            if answer.is_none() && buf.len() < body_len {
                // Small bodies arrive whole before an upstream connection is
                // taken, as on Pingora's path.
                let allowed = self.body_timeout + Duration::from_secs(body_len as u64 / self.body_min_rate);
                let read = async {
                    while buf.len() < body_len {
                        buf.reserve(body_len - buf.len());
                        if conn.read_buf(&mut buf).await? == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                    Ok::<_, std::io::Error>(())
                };
                match tokio::time::timeout(allowed, read).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return None,
                    Err(_) => answer = Some(Edge::body_too_slow()),
                }
            }
            // An answer given before the body is read closes the connection
            // unless the whole body is here to be skipped.
            close |= answer.is_some() && buf.len() < body_len;
            let (status, error) = match answer {
                Some(answer) => {
                    close |= answer.closes();
                    let status = write_canned(&mut conn, &mut out, &answer, &req, close).await;
                    (status, None)
                }
                None => {
                    let body = (body_len > 0).then(|| &buf[..body_len]);
                    match self.exchange(&mut req, body, &mut ctx).await {
                        Ok((head, up)) => {
                            let timeout = ctx.route.timeout;
                            let head_request = req.method == http::Method::HEAD;
                            match relay(&mut conn, &mut out, head, up, head_request, close, timeout).await {
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
                            }
                        }
                        Err(e) => {
                            let (code, answer) = failure(&e, &ctx);
                            close = true;
                            let status = match answer {
                                Some(answer) => write_canned(&mut conn, &mut out, &answer, &req, close).await,
                                None => code,
                            };
                            (status, Some(e))
                        }
                    }
                }
            };
            log_request(&req, status, &ctx, error.as_deref());
            conn.request_done();
            if close {
                let _ = conn.shutdown().await;
                return None;
            }
            buf.advance(body_len.min(buf.len()));
        }
    }
}

/// Gives the connection to Pingora with `buf` to be read again, counted
/// by `why`.
fn hand_over(mut conn: Box<Guarded>, buf: BytesMut, why: &'static str) -> Box<Guarded> {
    metrics::counter!("portico_gateway_handovers_total", "reason" => why).increment(1);
    conn.unread(buf);
    conn
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
fn parse(buf: &mut BytesMut, spans: &mut Vec<(Range<usize>, Range<usize>)>) -> Head {
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
        Some(v) => {
            let digits = v.as_bytes();
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err("body");
            }
            digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'))
        }
    };
    if n > BUFFERED_BODY {
        return Err("body");
    }
    Ok(n)
}

/// Whether the client asked to close the connection after this request.
fn closes(req: &RequestHeader) -> bool {
    req.headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
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
    let _ = head.insert_header(header::DATE, pingora::protocols::http::date::get_cached_date());
    let connection = if close { "close" } else { "keep-alive" };
    let _ = head.insert_header(header::CONNECTION, connection);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(head.status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(head.get_reason_phrase().unwrap_or_default().as_bytes());
    out.put_slice(b"\r\n");
    head.header_to_h1_wire(out);
    out.put_slice(b"\r\n");
}

/// Writes one of the gateway's own answers (its head alone to a `HEAD`);
/// its status.
async fn write_canned(
    conn: &mut Guarded,
    out: &mut BytesMut,
    answer: &Canned,
    req: &RequestHeader,
    close: bool,
) -> u16 {
    let Ok((mut head, body)) = answer.response() else {
        return 500;
    };
    out.clear();
    put_head(out, &mut head, close);
    if let Some(body) = body.filter(|_| req.method != http::Method::HEAD) {
        out.put_slice(&body);
    }
    let _ = write_out(conn, out).await;
    head.status.as_u16()
}

/// Writes what `out` holds and flushes it to the client.
async fn write_out(conn: &mut Guarded, out: &mut BytesMut) -> std::io::Result<()> {
    conn.write_all(out).await?;
    out.clear();
    conn.flush().await
}

/// Passes the upstream's answer on: its status, or the status and the
/// upstream's failure (`None`: the client's) once the head has left.
async fn relay(
    conn: &mut Guarded,
    out: &mut BytesMut,
    mut head: ResponseHeader,
    mut up: Conn,
    head_request: bool,
    close: bool,
    timeout: Duration,
) -> Result<u16, (u16, Option<crate::forward::ForwardError>)> {
    let status = head.status.as_u16();
    let no_body = head_request || matches!(status, 204 | 304);
    let chunked = !no_body
        && head
            .headers
            .get(header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    out.clear();
    put_head(out, &mut head, close);
    let client = |_: std::io::Error| (status, None);
    loop {
        let piece = if up.is_done() {
            None
        } else {
            match up.next_body(timeout).await {
                Ok(piece) => piece,
                Err(e) => return Err((status, Some(e))),
            }
        };
        let Some(piece) = piece.filter(|p| !p.is_empty() && !no_body) else {
            if up.is_done() {
                // Back to the pool before the last write (see `forward`).
                up.release();
                if chunked {
                    out.put_slice(b"0\r\n\r\n");
                }
                write_out(conn, out).await.map_err(client)?;
                return Ok(status);
            }
            continue;
        };
        if chunked {
            out.put_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        }
        if piece.len() > COPY_UP_TO {
            conn.write_all(out).await.map_err(client)?;
            out.clear();
            conn.write_all(&piece).await.map_err(client)?;
        } else {
            out.put_slice(&piece);
        }
        if chunked {
            out.put_slice(b"\r\n");
        }
    }
}
