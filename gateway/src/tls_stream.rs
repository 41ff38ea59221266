//! The server side of a TLS connection, as the guard accepts it: rustls
//! (through tokio-rustls) over the accepted TCP stream, answering
//! Pingora's stream traits so its sessions can read and write it.
//!
//! Pingora's own TLS stream was 4.7 KiB per connection before any buffer:
//! it keeps the handshake futures of both sides (a client connection and
//! a server connection, each with its socket) inline beside the finished
//! stream, for the life of every connection. This one holds the finished
//! server connection and its socket, 1.6 KiB, in one allocation (heaptrack,
//! 9,000 idle WebSockets: the largest of a connection's allocations). The
//! handshake is [`TlsAcceptor::accept`]'s, with the configuration Pingora
//! built (TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`, certificates by SNI).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, TimingDigest,
    UniqueID, UniqueIDType,
};
use rustls::ServerConfig;
use rustls::server::ResolvesServerCert;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::TlsAcceptor;

/// The protocols offered by ALPN, in order of preference, by their wire
/// names (Pingora keeps its own mapping private).
const PROTOCOLS: [(&[u8], ALPN); 2] = [(b"h2", ALPN::H2), (b"http/1.1", ALPN::H1)];

/// The acceptor of the HTTPS listener: TLS 1.2 and 1.3 with ring, no
/// client certificates, `resolver` choosing the certificate by SNI, and
/// ALPN offering HTTP/2 first.
pub fn acceptor(resolver: Arc<dyn ResolvesServerCert>) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = PROTOCOLS.iter().map(|(wire, _)| wire.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// An accepted TLS connection, its handshake done.
pub struct TlsStream {
    tls: tokio_rustls::server::TlsStream<L4Stream>,
    /// What Pingora's sessions read of the connection (cipher, version).
    digest: Arc<SslDigest>,
    timing: TimingDigest,
}

impl TlsStream {
    /// The handshake on `tcp`, with no deadline of its own (the guard
    /// sets one).
    pub async fn accept(acceptor: &TlsAcceptor, tcp: L4Stream) -> io::Result<TlsStream> {
        let started = Instant::now();
        let tls = acceptor.accept(tcp).await?;
        let session = tls.get_ref().1;
        let digest = SslDigest::new(
            session
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or_default(),
            session
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or_default(),
            None,
            None,
            Vec::new(),
        );
        let timing = TimingDigest {
            established_ts: SystemTime::now(),
            establishment_duration: Some(started.elapsed()),
            ..TimingDigest::default()
        };
        Ok(TlsStream {
            tls,
            digest: Arc::new(digest),
            timing,
        })
    }

    fn tcp(&self) -> &L4Stream {
        self.tls.get_ref().0
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

// Pingora's stream traits: the socket's digests, the TLS session's
// protocol, and a `close_notify` at shutdown.

#[async_trait]
impl Shutdown for TlsStream {
    async fn shutdown(&mut self) {
        // The peer may be gone already: nothing to tell anyone.
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.tls).await {
            tracing::debug!(error = %e, "TLS shutdown failed");
        }
    }
}

impl UniqueID for TlsStream {
    fn id(&self) -> UniqueIDType {
        self.tcp().id()
    }
}

impl Ssl for TlsStream {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        Some(self.digest.clone())
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        let chosen = self.tls.get_ref().1.alpn_protocol()?;
        PROTOCOLS
            .iter()
            .find(|(wire, _)| *wire == chosen)
            .map(|(_, alpn)| alpn.clone())
    }
}

impl GetTimingDigest for TlsStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        let mut layers = self.tcp().get_timing_digest();
        layers.push(Some(self.timing.clone()));
        layers
    }

    fn get_read_pending_time(&self) -> Duration {
        self.tcp().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.tcp().get_write_pending_time()
    }
}

impl GetProxyDigest for TlsStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.tcp().get_proxy_digest()
    }
}

impl GetSocketDigest for TlsStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.tcp().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.tls.get_mut().0.set_socket_digest(digest)
    }
}

/// Not supported over TLS (the default): Pingora peeks only for a
/// cleartext HTTP/2 preface.
impl Peek for TlsStream {}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", self.tcp())
            .field("version", &self.digest.version)
            .field("cipher", &self.digest.cipher)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::AsyncReadExt;

    type Client = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    /// A handshake over loopback with a client offering `alpn`.
    async fn connect(alpn: &[&[u8]]) -> (TlsStream, Client, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::tls::CertStore::open(dir.path()).unwrap();
        store.ensure_self_signed(&["localhost".to_string()]).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&store.chain_pem("localhost").unwrap()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let server = TlsStream::accept(&acceptor(store.resolver()).unwrap(), L4Stream::from(tcp))
            .await
            .unwrap();
        (server, client.await.unwrap(), dir)
    }

    /// What Pingora's sessions ask of the stream: the protocol ALPN chose
    /// (HTTP/2 when offered), the TLS version, the bytes both ways, and a
    /// `close_notify` at shutdown (the client sees a clean end, not a
    /// truncation).
    #[tokio::test]
    async fn answers_pingoras_questions_and_ends_with_close_notify() {
        let offers: [(&[&[u8]], Option<ALPN>); 3] = [
            (&[b"h2", b"http/1.1"], Some(ALPN::H2)),
            (&[b"http/1.1"], Some(ALPN::H1)),
            (&[], None),
        ];
        for (offered, chosen) in offers {
            let (mut server, mut client, _dir) = connect(offered).await;
            assert_eq!(server.selected_alpn_proto(), chosen, "offered {offered:?}");
            let digest = server.get_ssl_digest().expect("a TLS digest");
            assert_eq!(digest.version, "TLSv1_3");
            assert!(digest.cipher.starts_with("TLS13_"), "{}", digest.cipher);
            assert_eq!(server.get_timing_digest().len(), 2, "TCP and TLS layers");

            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            server.write_all(b"pong").await.unwrap();
            server.flush().await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");

            Shutdown::shutdown(&mut server).await;
            let mut rest = Vec::new();
            client
                .read_to_end(&mut rest)
                .await
                .expect("a clean end (close_notify), not a truncation");
            assert!(rest.is_empty());
        }
    }
}
