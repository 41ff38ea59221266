//! The TCP socket under a WebSocket, shared with the connection's writer.
//!
//! A slow consumer is evicted when its outbound queue is full, and by then
//! the socket's send buffer is usually full too: a close frame written after
//! it would wait behind data the client is not reading, and the client
//! would never learn why it was cut off. So each connection's send buffer
//! is set to [`SEND_BUFFER`] at accept (which also bounds the kernel memory
//! a stalled client can hold), and the writer, when it evicts, drops what is
//! still queued and enlarges the buffer ([`Socket::make_room`]) so that the
//! 4008 close frame fits behind what the kernel already holds: the client
//! reads it as soon as it reads at all.
//!
//! [`Accepting`] is the shard's listener: every connection it accepts is a
//! [`SharedTcp`], I/O over an `Arc<TcpStream>` (through readiness and
//! `try_read`/`try_write`, which need only `&TcpStream`), and its
//! [`Socket`] handle reaches the WebSocket handshake as connect info
//! ([`ConnSocket`]), so the writer can act on the same socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The send buffer of every connection (the kernel doubles it).
pub const SEND_BUFFER: usize = 64 * 1024;
/// What an eviction asks for: room for the close frame behind a full
/// [`SEND_BUFFER`] (capped by `net.core.wmem_max`, 208 KiB by default,
/// which still leaves room).
const EVICTION_BUFFER: usize = 4 * SEND_BUFFER;

/// The shard's listener: accepted connections get `TCP_NODELAY` (small
/// frames must leave at once: Nagle plus delayed ACKs made a 40 ms p95) and
/// a [`SEND_BUFFER`], and are served as [`SharedTcp`].
pub struct Accepting(pub tokio::net::TcpListener);

impl axum::serve::Listener for Accepting {
    type Io = SharedTcp;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (SharedTcp, std::net::SocketAddr) {
        // axum's own accept loop (it rides out EMFILE and resets).
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.0).await;
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(&tcp, SEND_BUFFER) {
            tracing::debug!(error = %e, "SO_SNDBUF not set");
        }
        (SharedTcp(Arc::new(tcp)), addr)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
}

/// The connection's [`Socket`], as axum connect info (request extension).
#[derive(Debug, Clone)]
pub struct ConnSocket(pub Socket);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Accepting>> for ConnSocket {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Accepting>) -> Self {
        ConnSocket(Socket(stream.io().0.clone()))
    }
}

/// A handle on the socket for the connection's writer.
#[derive(Debug, Clone)]
pub struct Socket(Arc<TcpStream>);

impl Socket {
    /// Sends FIN after what is queued (the peer reads to the end, then EOF),
    /// whoever else still holds the socket.
    pub fn shutdown_write(&self) {
        let _ = rustix::net::shutdown(&*self.0, rustix::net::Shutdown::Write);
    }

    /// Enlarges the send buffer so that one more small frame fits.
    pub fn make_room(&self) {
        if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(&*self.0, EVICTION_BUFFER) {
            tracing::debug!(error = %e, "SO_SNDBUF not raised");
        }
    }
}

/// A `TcpStream` as WebSocket I/O, shareable with a [`Socket`].
#[derive(Debug)]
pub struct SharedTcp(Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale: poll again, which re-registers.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// FIN after what is queued; reading goes on (the peer's close).
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(rustix::net::shutdown(&*self.0, rustix::net::Shutdown::Write).map_err(io::Error::from))
    }
}
