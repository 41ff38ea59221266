//! Security headers added to every HTTPS response (seed 002's nginx set,
//! plus HSTS).

use pingora::http::ResponseHeader;

const SECURITY_HEADERS: &[(&str, &str)] = &[
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
            resp.insert_header(*name, *value)?;
        }
    }
    resp.remove_header("server");
    Ok(())
}
