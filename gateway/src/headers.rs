//! Security headers added to every HTTPS response (seed 002's nginx set,
//! plus HSTS).

use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;

/// Names and values made once, at compile time: a response shares them,
/// and no name is parsed per request.
pub const SECURITY_HEADERS: [(HeaderName, HeaderValue); 5] = [
    (
        http::header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    ),
    (http::header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    (
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
    (
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("strict-origin-when-cross-origin"),
    ),
    (
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self' wss:; frame-ancestors 'none'; base-uri 'self'",
        ),
    ),
];

/// Whether `name` (as it came, in any case) is one of `names`.
pub fn is_one_of(name: &[u8], names: &[HeaderName]) -> bool {
    names
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
}

/// Response headers of an upstream's never passed on (its software).
pub const DROPPED: [HeaderName; 1] = [http::header::SERVER];

/// The security headers a response without them gets: those for which
/// `has` says no.
pub fn missing(has: impl Fn(&HeaderName) -> bool) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    SECURITY_HEADERS.into_iter().filter(move |(name, _)| !has(name))
}

/// Adds the security headers an upstream did not set itself, and drops
/// the [`DROPPED`] ones.
pub fn secure(resp: &mut ResponseHeader) -> pingora::Result<()> {
    for (name, value) in SECURITY_HEADERS {
        if !resp.headers.contains_key(&name) {
            resp.insert_header(name, value)?;
        }
    }
    for name in &DROPPED {
        resp.remove_header(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// flate2's zlib-ng backend is served by third_party/libz-ng-sys
    /// (zlib-rs); gzip must still round-trip through it.
    #[test]
    fn gzip_backend_round_trips() {
        use std::io::{Read, Write};
        let text = "portico ".repeat(10_000);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(text.as_bytes()).unwrap();
        let packed = enc.finish().unwrap();
        assert!(packed.len() < text.len() / 50, "compressed: {}", packed.len());
        let mut out = String::new();
        flate2::read::GzDecoder::new(&packed[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, text);
    }
}
