//! Handing WebSocket clients over when this gateway stops or is upgraded.
//!
//! Pingora keeps upgraded connections open through the grace period and
//! then drops them: clients see an abnormal end (1006) and all reconnect at
//! the same instant. Instead, when the drain starts ([`Drain::start`], on
//! SIGQUIT, SIGTERM or SIGINT), each upgraded connection picks a moment
//! within the first four fifths of `grace_period_secs` (uniformly, so
//! clients come back spread out), waits until the frame being written to
//! its client is complete, and writes a close frame of its own: 1001 "going
//! away", which the chat protocol defines as "reconnect and resume". After
//! it, nothing more is written to the client; what the client still sends
//! (its close echo) goes on to the upstream, which then ends the tunnel, or
//! the gateway ends it after [`CLOSE_WAIT`].
//!
//! Nothing is lost by cutting in: an `ack` the client never saw makes it
//! re-send with the same id (the store answers `duplicate`), and messages
//! written after the close reach it on resume from its last offset.
//!
//! When the upstream ends a tunnel without a close frame (a chat shard was
//! killed), the client would see an abnormal end too: as the connection is
//! shut down, the guard ([`Upgraded::farewell`]) first writes a close frame
//! of the gateway's, 1012 ("service restart": reconnect), if it can
//! without waiting.
//!
//! [`Upgraded`] is the per-connection part, driven by the connection guard
//! (`guard::Guarded`) from its reads and writes; [`FrameCursor`] follows
//! the WebSocket frame boundaries of what is written to the client.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pingora::protocols::Stream;
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How long a closed connection waits for the client's close echo.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The close frame: FIN + close opcode, unmasked (server to client), code
/// 1001 and a reason for people reading captures.
const CLOSE_FRAME: &[u8] = b"\x88\x1c\x03\xe9gateway restarting, resume";
/// The close frame for an upstream that ended without one: 1012.
const UPSTREAM_GONE: &[u8] = b"\x88\x1c\x03\xf4upstream restarted, resume";

/// The drain of one gateway process, shared by its connections.
pub struct Drain {
    token: CancellationToken,
    started: OnceLock<Instant>,
    /// Closes are spread over this much time after the start.
    spread: Duration,
}

impl Drain {
    /// A drain whose closes spread over four fifths of `grace`: the rest
    /// of the grace period is for the close handshakes.
    pub fn new(grace: Duration) -> Arc<Drain> {
        Arc::new(Drain {
            token: CancellationToken::new(),
            started: OnceLock::new(),
            spread: grace.mul_f64(0.8),
        })
    }

    /// Starts the drain (idempotent).
    pub fn start(&self) {
        self.started.get_or_init(Instant::now);
        self.token.cancel();
    }

    /// When one connection should close: a uniform pick within the spread
    /// after the start (at once, for connections accepted later than that).
    fn close_at(&self) -> Instant {
        let started = *self.started.get_or_init(Instant::now);
        (started + self.spread.mul_f64(rand::random::<f64>())).max(Instant::now())
    }
}

/// Follows the frames written to a client: header bytes parsed as they
/// pass, then the payload length skipped. At a boundary when neither a
/// header nor a payload is under way.
#[derive(Debug, Clone, Default)]
pub struct FrameCursor {
    head: [u8; 14],
    have: usize,
    left: u64,
    /// A close frame went by.
    saw_close: bool,
}

impl FrameCursor {
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// Consumes `bytes` up to the next frame boundary (or all of them);
    /// returns how many it consumed.
    fn step(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.left > 0 {
                let n = self.left.min((bytes.len() - i) as u64);
                self.left -= n;
                i += n as usize;
                return i;
            }
            self.head[self.have] = bytes[i];
            self.have += 1;
            i += 1;
            if let Some((len, payload)) = parse_head(&self.head[..self.have])
                && self.have == len
            {
                self.saw_close |= self.head[0] & 0x0f == 0x8;
                self.have = 0;
                self.left = payload;
                if payload == 0 {
                    return i;
                }
            }
        }
        i
    }

    /// Consumes all of `bytes`.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = self.step(bytes);
            bytes = &bytes[n..];
        }
    }

    /// How many of `bytes` complete the frame under way (0 at a boundary),
    /// or `None` if they do not.
    pub fn to_boundary(&self, bytes: &[u8]) -> Option<usize> {
        if self.at_boundary() {
            return Some(0);
        }
        let mut probe = self.clone();
        let n = probe.step(bytes);
        probe.at_boundary().then_some(n)
    }
}

/// A frame header's length and payload length, once enough of it is known.
fn parse_head(h: &[u8]) -> Option<(usize, u64)> {
    let b1 = *h.get(1)?;
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (ext, short) = match b1 & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let len = 2 + ext + mask;
    let payload = match short {
        Some(n) => n,
        None => {
            let e = h.get(2..2 + ext)?;
            e.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    };
    Some((len, payload))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// The drain started: close at the timer.
    Waiting,
    /// Writing our close frame (bytes written so far), at the next boundary.
    Closing(usize),
    /// Our close frame is out: nothing more to the client.
    Closed,
}

/// What a read of an upgraded connection should do.
pub enum ReadGate {
    /// Read from the client as usual.
    Pass,
    /// End the connection: report EOF.
    Eof,
}

/// One upgraded connection's part in the drain.
pub struct Upgraded {
    out: FrameCursor,
    /// Bytes of the 101 response head still to be written (not frames).
    head_left: usize,
    drain: Arc<Drain>,
    started: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    timer: Option<Pin<Box<Sleep>>>,
    phase: Phase,
}

impl Upgraded {
    /// After the 101 response head (`head_len` bytes, about to be written).
    pub fn new(drain: Arc<Drain>, head_len: usize) -> Upgraded {
        Upgraded {
            out: FrameCursor::default(),
            head_left: head_len,
            started: Some(Box::pin(drain.token.clone().cancelled_owned())),
            drain,
            timer: None,
            phase: Phase::Open,
        }
    }

    fn written(&mut self, mut bytes: &[u8]) {
        let head = self.head_left.min(bytes.len());
        self.head_left -= head;
        bytes = &bytes[head..];
        self.out.advance(bytes);
    }

    fn at_boundary(&self) -> bool {
        self.head_left == 0 && self.out.at_boundary()
    }

    /// Moves through the phases that only need time to pass.
    fn poll_drain(&mut self, cx: &mut Context<'_>) {
        if self.phase == Phase::Open
            && let Some(started) = self.started.as_mut()
            && started.as_mut().poll(cx).is_ready()
        {
            self.started = None;
            self.timer = Some(Box::pin(tokio::time::sleep_until(self.drain.close_at())));
            self.phase = Phase::Waiting;
        }
        if self.phase == Phase::Waiting
            && let Some(timer) = self.timer.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            self.phase = Phase::Closing(0);
        }
    }

    /// Writes (the rest of) our close frame; then `Closed`.
    fn poll_close(&mut self, inner: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Phase::Closing(done) = self.phase {
            if done == CLOSE_FRAME.len() {
                ready!(Pin::new(&mut *inner).poll_flush(cx))?;
                self.phase = Phase::Closed;
                self.timer = Some(Box::pin(tokio::time::sleep(CLOSE_WAIT)));
                metrics::counter!("portico_gateway_websockets_drained_total").increment(1);
                break;
            }
            match ready!(Pin::new(&mut *inner).poll_write(cx, &CLOSE_FRAME[done..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.phase = Phase::Closing(done + n),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Before each read of the client: close when it is time.
    pub fn poll_read_gate(&mut self, inner: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<ReadGate>> {
        self.poll_drain(cx);
        if matches!(self.phase, Phase::Closing(_)) && self.at_boundary() {
            ready!(self.poll_close(inner, cx))?;
        }
        if self.phase == Phase::Closed
            && let Some(timer) = self.timer.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(ReadGate::Eof));
        }
        Poll::Ready(Ok(ReadGate::Pass))
    }

    /// Before the connection is shut down: if the tunnel ended without a
    /// close frame either way (the upstream died, or went silent past the
    /// idle timeout) and not by our drain, tell the client to come back
    /// with 1012. One attempt, without waiting (the connection is going).
    pub fn farewell(&mut self, inner: &mut Stream, cx: &mut Context<'_>) {
        if self.phase != Phase::Open || self.out.saw_close || !self.at_boundary() {
            return;
        }
        self.phase = Phase::Closed;
        if let Poll::Ready(Ok(n)) = Pin::new(&mut *inner).poll_write(cx, UPSTREAM_GONE) {
            // Counted before the flush: once the client has the frame, the
            // count must already say so.
            if n == UPSTREAM_GONE.len() {
                metrics::counter!("portico_gateway_websockets_upstream_lost_total").increment(1);
            }
            let _ = Pin::new(&mut *inner).poll_flush(cx);
        }
    }

    /// A write to the client: whole frames until the close, nothing after.
    pub fn poll_write(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_drain(cx);
        let mut limit = buf.len();
        match self.phase {
            // The client has our close: more frames would break the protocol.
            Phase::Closed => return Poll::Ready(Ok(buf.len())),
            Phase::Closing(_) if self.at_boundary() => {
                ready!(self.poll_close(inner, cx))?;
                return Poll::Ready(Ok(buf.len()));
            }
            // Finish the frame under way, then close.
            Phase::Closing(_) if self.head_left == 0 => {
                limit = self.out.to_boundary(buf).unwrap_or(buf.len());
            }
            _ => {}
        }
        let n = ready!(Pin::new(&mut *inner).poll_write(cx, &buf[..limit]))?;
        self.written(&buf[..n]);
        if matches!(self.phase, Phase::Closing(_)) && self.at_boundary() {
            // The frame is done: close now, not at the next read or write
            // (there may be none). A pending write resumes from the read
            // side, which the same task polls.
            if let Poll::Ready(Err(e)) = self.poll_close(inner, cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x81];
        let m = if masked { 0x80 } else { 0 };
        match payload {
            0..=125 => f.push(m | payload as u8),
            126..=65535 => {
                f.push(m | 126);
                f.extend((payload as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 127);
                f.extend((payload as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend([1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(b'x', payload));
        f
    }

    #[test]
    fn boundaries_are_found_across_any_split() {
        let stream: Vec<u8> = [
            frame(0, false),
            frame(5, false),
            frame(300, false),
            frame(70_000, false),
            frame(3, true),
        ]
        .concat();
        // Where each frame ends: header + payload, accumulated.
        let ends: Vec<usize> = [2, 7, 304, 70_010, 9]
            .iter()
            .scan(0, |acc, len| {
                *acc += len;
                Some(*acc)
            })
            .collect();
        for chunk in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut c = FrameCursor::default();
            let mut pos = 0;
            for piece in stream.chunks(chunk) {
                c.advance(piece);
                pos += piece.len();
                assert_eq!(c.at_boundary(), ends.contains(&pos), "chunk {chunk}, at {pos}");
            }
        }
    }

    #[test]
    fn to_boundary_tells_where_the_current_frame_ends() {
        let mut c = FrameCursor::default();
        assert_eq!(c.to_boundary(b"anything"), Some(0));
        let f = frame(10, false);
        c.advance(&f[..4]);
        let rest = [&f[4..], &frame(1, false)[..]].concat();
        assert_eq!(c.to_boundary(&rest), Some(f.len() - 4));
        assert_eq!(c.to_boundary(&f[4..6]), None);
    }

    #[test]
    fn the_close_frame_is_one_well_formed_frame() {
        let mut c = FrameCursor::default();
        c.advance(CLOSE_FRAME);
        assert!(c.at_boundary());
        assert_eq!(CLOSE_FRAME[1] as usize, CLOSE_FRAME.len() - 2);
        assert_eq!(u16::from_be_bytes([CLOSE_FRAME[2], CLOSE_FRAME[3]]), 1001);
        assert_eq!(UPSTREAM_GONE[1] as usize, UPSTREAM_GONE.len() - 2);
        assert_eq!(u16::from_be_bytes([UPSTREAM_GONE[2], UPSTREAM_GONE[3]]), 1012);
        let mut c = FrameCursor::default();
        c.advance(UPSTREAM_GONE);
        assert!(c.at_boundary() && c.saw_close);
    }
}
