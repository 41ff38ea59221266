//! Security headers added to every HTTPS response (seed 002's nginx set,
//! plus HSTS).

use pingora::http::ResponseHeader;

pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("strict-transport-security", "max-age=31536000"),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
    (
        "content-security-policy",
        "default-src 'self'; connect-src 'self' wss:; frame-ancestors 'none'; base-uri 'self'",
    ),
];

/// Adds the security headers an upstream did not set itself.
pub fn secure(resp: &mut ResponseHeader) -> pingora::Result<()> {
    for (name, value) in SECURITY_HEADERS {
        if !resp.headers.contains_key(*name) {
            // Static values: every response shares them, none is copied.
            resp.insert_header(*name, http::HeaderValue::from_static(value))?;
        }
    }
    resp.remove_header(&http::header::SERVER);
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
