//! Certificates from a real ACME CA (Pebble): the gateway answers HTTP-01
//! on its plain-HTTP listener, serves the issued certificate by SNI, and
//! renews it before it expires without a restart.

use std::net::SocketAddr;
use std::time::Duration;

use portico_tests::eventually;
use portico_tests::servers::{EdgePorts, Pebble, Service};
use rustls::pki_types::ServerName;

const HOST: &str = "portico.test";

/// The certificate the gateway presents for `HOST`, as DER.
async fn served_certificate(https: u16) -> Vec<u8> {
    #[derive(Debug)]
    struct AcceptAny;
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAny))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], https)))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn issuer_is_pebble(der: &[u8]) -> bool {
    // Pebble's intermediates are named "Pebble Intermediate CA …".
    der.windows(6).any(|w| w == b"Pebble")
}

#[tokio::test(flavor = "multi_thread")]
async fn obtains_serves_and_renews_a_certificate() {
    let edge = EdgePorts::free();
    let pebble = Pebble::start(edge.http, 30);
    let mut env = edge.env();
    env.push(("PORTICO_GATEWAY__HOSTNAMES", format!("[\"{HOST}\"]")));
    env.push(("PORTICO_GATEWAY__ACME__DIRECTORY_URL", pebble.directory()));
    env.push((
        "PORTICO_GATEWAY__ACME__CA_ROOT",
        pebble.tls_root.display().to_string(),
    ));
    env.push(("PORTICO_GATEWAY__ACME__CHECK_SECS", "1".into()));
    let gw = Service::gateway(&[], &env, &edge);

    // Until issuance the gateway serves its self-signed placeholder.
    let first = eventually(Duration::from_secs(60), "an ACME certificate", || async {
        let der = served_certificate(edge.https).await;
        issuer_is_pebble(&der).then_some(der)
    })
    .await;
    let mode = std::fs::metadata(gw.dir.path().join("acme/account.json")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // 30 s certificates are renewed at ~20 s, live, by the same process.
    let renewed = eventually(Duration::from_secs(60), "a renewed certificate", || {
        let first = first.clone();
        async move {
            let der = served_certificate(edge.https).await;
            (der != first && issuer_is_pebble(&der)).then_some(der)
        }
    })
    .await;
    assert_ne!(renewed, first);
    assert!(gw.proc.log().contains("certificate issued"), "{}", pebble.log());
    let metrics = portico_tests::client::metrics(edge.admin).await;
    assert!(
        metrics.contains("portico_gateway_certificate_expiry_seconds{host=\"portico.test\"}"),
        "{metrics}"
    );
}
