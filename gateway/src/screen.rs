//! What the edge refuses or rewrites before a request is routed, so that
//! routing, per-route policy and the upstream all see one unambiguous
//! request.
//!
//! - The path is normalized ([`normalize_path`]): percent-encoded
//!   unreserved characters decoded (`%2e` is `.`), dot segments removed
//!   (RFC 3986 §5.2.4), repeated slashes merged. Routes match the
//!   normalized path and the upstream receives it, so `/public/../admin`
//!   cannot slip past the `/admin` route's limits. A path that would still
//!   climb after decoding `%2f` (`..%2f`), or holds a backslash, NUL or a
//!   broken escape, is refused.
//! - [`check_head`]: one `Host` on HTTP/1.1, one well-formed
//!   `Content-Length`, no `TRACE`/`TRACK`, HTTP/2 held to the same header
//!   count as HTTP/1 (whose count the connection guard checks).
//! - [`is_spoofable`]: client headers that claim an identity or a rewrite
//!   (`X-Forwarded-*`, `True-Client-IP`, `X-Original-URL`, …) and any
//!   header with `_` in its name (which servers such as Django and PHP read
//!   as `-`) never reach an upstream.

use std::borrow::Cow;

use pingora::http::RequestHeader;

/// Why a request is refused before routing: the status and a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

const fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

/// The checks of the request head (the path is [`normalize_path`]'s).
pub fn check_head(req: &RequestHeader, max_headers: usize) -> Result<(), Refusal> {
    let method = req.method.as_str();
    if method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK") {
        return Err(refuse(405, "method"));
    }
    let hosts = req.headers.get_all(http::header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && req.version == http::Version::HTTP_11) {
        return Err(refuse(400, "host"));
    }
    let mut lengths = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next()
        && (lengths.next().is_some() || content_length(first.as_bytes()).is_none())
    {
        return Err(refuse(400, "content_length"));
    }
    if req.headers.len() > max_headers {
        return Err(refuse(431, "header_count"));
    }
    Ok(())
}

/// The value of a `Content-Length` header if it is one well-formed number:
/// digits only (no sign, space or list), at most 19 of them (fits a u64).
pub fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Client headers never passed upstream (the gateway sets its own
/// `X-Forwarded-For/Proto/Host` and `X-Real-IP` after removing these).
pub fn is_spoofable(name: &[u8]) -> bool {
    const NAMES: &[&str] = &[
        "x-real-ip",
        "forwarded",
        "true-client-ip",
        "x-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-cluster-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-original-forwarded-for",
        "x-original-host",
        "x-host",
        "x-http-method-override",
    ];
    // Any case: the gateway's loop (`h1`) reads names as they came.
    let prefix = b"x-forwarded-";
    name.contains(&b'_')
        || name
            .get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        || NAMES.iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// The normalized form of a request path (no query), or why it is refused.
/// Borrowed when the path is already normal (the common case).
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, Refusal> {
    let bad = refuse(400, "path");
    if !path.starts_with('/') {
        // `*` (OPTIONS) and absolute-form targets are parsed into a path
        // by `http`; anything else has no business here.
        return if path == "*" {
            Ok(Cow::Borrowed(path))
        } else {
            Err(bad)
        };
    }
    let bytes = path.as_bytes();
    if bytes.iter().any(|&b| b == b'\\' || b < 0x20 || b == 0x7f) {
        return Err(bad);
    }
    let normal =
        !path.contains("//") && !path.contains('%') && !path.split('/').any(|s| s == "." || s == "..");
    if normal {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path).ok_or(bad)?;
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            // Merged slashes: an empty segment only at the end (`/a/`).
            "" if i != last => continue,
            s => {
                out.push(s);
                continue;
            }
        }
        // A trailing `.` or `..` names a directory: keep the slash.
        if i == last {
            out.push("");
        }
    }
    let joined = format!("/{}", out.join("/"));
    // Escaped slashes or backslashes around dots would climb in an
    // upstream that decodes them before resolving.
    let lower = joined.to_ascii_lowercase();
    for slash in ["%2f", "%5c"] {
        if lower.contains(&format!("..{slash}")) || lower.contains(&format!("{slash}..")) {
            return Err(bad);
        }
    }
    if lower.contains("%5c") {
        return Err(bad);
    }
    Ok(Cow::Owned(joined))
}

/// Decodes `%XX` escapes of unreserved characters (RFC 3986 §2.3), which
/// are the same URI either way; other escapes stay, uppercased. `None` on a
/// malformed escape or an escaped NUL.
fn decode_unreserved(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i] as char);
            i += 1;
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        let (hi, lo) = (hex(*b.get(i + 1)?)?, hex(*b.get(i + 2)?)?);
        let c = (hi * 16 + lo) as u8;
        if c == 0 {
            return None;
        }
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
        i += 3;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Refusal> {
        normalize_path(p).map(|c| c.into_owned())
    }

    #[test]
    fn dot_segments_are_removed_as_rfc_3986_says() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/public/../admin/panel", "/admin/panel"),
            ("/public/%2e%2e/admin/panel", "/admin/panel"),
            ("/public/%2E%2e/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("//admin//panel", "/admin/panel"),
            ("/a/", "/a/"),
            ("/%61dmin", "/admin"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("/a%2fb", "/a%2Fb"),
            ("/..", "/"),
            ("/.", "/"),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn paths_that_could_still_climb_are_refused() {
        for raw in [
            "/public/..%2fadmin",
            "/public/%2e%2e%2fadmin",
            "/public%2f..%2fadmin",
            "/a\\..\\admin",
            "/a%5cb",
            "/a%00b",
            "/a%zz",
            "/a%2",
            "/a\u{1}b",
            "relative",
        ] {
            assert_eq!(norm(raw), Err(refuse(400, "path")), "{raw}");
        }
        assert_eq!(norm("*").as_deref(), Ok("*"));
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(
            normalize_path("/api/conversations/x"),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn spoofable_headers() {
        for h in [
            "x-forwarded-for",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "true-client-ip",
            "x-client-ip",
            "cf-connecting-ip",
            "x-original-url",
            "x-rewrite-url",
            "x_forwarded_for",
            "any_underscore",
        ] {
            assert!(is_spoofable(h.as_bytes()), "{h}");
            assert!(is_spoofable(h.to_ascii_uppercase().as_bytes()), "{h}");
        }
        for h in [
            "host",
            "cookie",
            "authorization",
            "x-request-id",
            "content-type",
            "x-forwarded",
        ] {
            assert!(!is_spoofable(h.as_bytes()), "{h}");
        }
    }

    fn head(method: &str, version: http::Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, b"/", None).unwrap();
        r.set_version(version);
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn heads_are_checked() {
        use http::Version;
        let ok = head("GET", Version::HTTP_11, &[("host", "a")]);
        assert_eq!(check_head(&ok, 100), Ok(()));
        let h2 = head("GET", Version::HTTP_2, &[]);
        assert_eq!(check_head(&h2, 100), Ok(()), "HTTP/2 carries :authority");
        let cases = [
            (head("TRACE", Version::HTTP_11, &[("host", "a")]), 405),
            (head("GET", Version::HTTP_11, &[]), 400),
            (
                head("GET", Version::HTTP_11, &[("host", "a"), ("host", "b")]),
                400,
            ),
            (
                head(
                    "POST",
                    Version::HTTP_11,
                    &[("host", "a"), ("content-length", "5, 5")],
                ),
                400,
            ),
            (
                head(
                    "POST",
                    Version::HTTP_11,
                    &[("host", "a"), ("content-length", "5"), ("content-length", "5")],
                ),
                400,
            ),
            (
                head(
                    "POST",
                    Version::HTTP_11,
                    &[("host", "a"), ("content-length", "+5")],
                ),
                400,
            ),
        ];
        for (req, status) in cases {
            assert_eq!(
                check_head(&req, 100).map_err(|r| r.status),
                Err(status),
                "{req:?}"
            );
        }
        let many: Vec<(String, &str)> = (0..5).map(|i| (format!("x-{i}"), "v")).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let req = head("GET", Version::HTTP_2, &many);
        assert_eq!(check_head(&req, 4).map_err(|r| r.status), Err(431));
    }
}
