//! File routes: `[[gateway.routes]]` with a `root` directory instead of an
//! upstream, served by the edge itself (the `/static/` and `/media/` of
//! seed 002's nginx site).
//!
//! What a request may reach: only regular files under the root, by a path
//! whose segments, percent-decoded, are plain names (no `..`, `.`, empty,
//! hidden `.name`, encoded `/` or `\`), and whose real path (symlinks
//! resolved) is still under the root. Everything else is a 404, with no
//! listing. What the answer carries: the type by extension (`nosniff`),
//! `ETag` (size and modification time) and `Last-Modified` with `304`s,
//! one byte range (`206`/`416`, `If-Range`), a precompressed `.br` or
//! `.gz` sibling when the client takes it (not for ranges; otherwise the
//! edge's gzip applies), the route's `Cache-Control`. Large files are
//! streamed in 64 KiB reads ([`read_at`]: from the page cache on the
//! serving thread, else on the blocking pool); small ones are kept in a
//! bounded cache whose entries are checked against the file's size and
//! time on every hit, so a file changed on disk is served fresh.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use lru::LruCache;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::compression::ResponseCompression;
use pingora::prelude::*;
use pingora::proxy::Session;
use portico_config::FileCache;

/// Files at most this large are kept in memory by the cache.
const SMALL: u64 = 64 * 1024;
/// Entries in a route's cache (metadata for any file, bytes for small ones:
/// at most `ENTRIES × SMALL` = 64 MiB per route).
const ENTRIES: usize = 1024;
/// One read of a large file.
const CHUNK: usize = 64 * 1024;

/// One file route's root and policy.
pub struct FileRoute {
    root: PathBuf,
    prefix: String,
    cache_control: HeaderValue,
    /// Shared entries: a hit copies a pointer, not the path and tags.
    /// Keyed by the relative path as a string: hashing a `Path` walks its
    /// components, which cost a 2 KiB file's hit more than its `stat`.
    cache: Mutex<LruCache<String, Cached>>,
}

/// What the cache knows of a path.
#[derive(Clone)]
enum Cached {
    Found(Arc<Entry>),
    /// A precompressed sibling that does not exist (only those: they are
    /// named after files that do, so random paths cannot fill the cache).
    Missing,
}

impl std::fmt::Debug for FileRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRoute").field("root", &self.root).finish()
    }
}

/// A servable file (or a precompressed sibling).
struct Entry {
    path: PathBuf,
    len: u64,
    modified: SystemTime,
    /// `ETag`, `Content-Type` and `Last-Modified`, computed once per
    /// version: a response shares them.
    etag: HeaderValue,
    content_type: HeaderValue,
    last_modified: HeaderValue,
    /// The whole file, when small.
    bytes: Option<Bytes>,
}

impl FileRoute {
    /// `root` must be a directory (its real path is what requests must
    /// stay under); `prefix` is the route's path prefix.
    pub fn new(root: &Path, prefix: &str, cache: &FileCache) -> std::io::Result<FileRoute> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                root.display()
            )));
        }
        Ok(FileRoute {
            root,
            prefix: prefix.trim_end_matches('/').to_string(),
            cache_control: HeaderValue::try_from(cache.header())
                .map_err(|e| std::io::Error::other(format!("cache policy: {e}")))?,
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(ENTRIES).expect("nonzero"))),
        })
    }

    /// The file a request path names, relative to the root (its plain
    /// names joined by `/`), or `None` when the path is not a plain one.
    fn relative(&self, path: &str) -> Option<String> {
        let rest = path.strip_prefix(&self.prefix)?;
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let mut out = String::with_capacity(rest.len() + 16);
        let mut segments = rest.split('/').peekable();
        while let Some(seg) = segments.next() {
            if seg.is_empty() && segments.peek().is_none() {
                // A directory: its index.
                out.push_str("index.html");
                continue;
            }
            let name = match seg.contains('%') {
                true => std::borrow::Cow::Owned(percent_decode(seg)?),
                false => std::borrow::Cow::Borrowed(seg),
            };
            if name.is_empty()
                || name.starts_with('.')
                || name.contains(['/', '\\', '\0'])
                || name.chars().any(char::is_control)
            {
                return None;
            }
            out.push_str(&name);
            if segments.peek().is_some() {
                out.push('/');
            }
        }
        Some(out)
    }

    /// Looks a relative path up (through the cache), refusing anything
    /// whose real path leaves the root or is not a regular file.
    /// `sibling`: `rel` is a precompressed variant's name, whose absence
    /// is remembered too (browsers ask for one with every request).
    async fn lookup(&self, rel: &str, sibling: bool) -> Option<Arc<Entry>> {
        let cached = self.cache.lock().expect("file cache lock").get(rel).cloned();
        // Still the same file, still no file? One stat of a path just
        // resolved: done here, as a thread hand-off would cost more.
        match cached {
            Some(Cached::Found(e)) => {
                let m = std::fs::metadata(&e.path).ok()?;
                if m.is_file() && m.len() == e.len && m.modified().ok()? == e.modified {
                    return Some(e);
                }
            }
            Some(Cached::Missing) if std::fs::symlink_metadata(self.root.join(rel)).is_err() => return None,
            Some(Cached::Missing) | None => {}
        }
        let root = self.root.clone();
        let rel = rel.to_string();
        let found = tokio::task::spawn_blocking(move || {
            let entry = read_entry(&root, &rel).map(Arc::new);
            (rel, entry)
        })
        .await
        .ok()?;
        let (rel, entry) = found;
        let remembered = match &entry {
            Some(e) => Some(Cached::Found(e.clone())),
            None if sibling => Some(Cached::Missing),
            None => None,
        };
        if let Some(c) = remembered {
            self.cache.lock().expect("file cache lock").put(rel, c);
        }
        entry
    }
}

/// Resolves `rel` under `root` and reads what serving it needs: `None`
/// when its real path leaves the root or is not a regular file.
fn read_entry(root: &Path, rel: &str) -> Option<Entry> {
    let real = root.join(rel).canonicalize().ok()?;
    if !real.starts_with(root) {
        return None;
    }
    let m = std::fs::metadata(&real).ok()?;
    if !m.is_file() {
        return None;
    }
    let modified = m.modified().ok()?;
    let nanos = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let bytes = if m.len() <= SMALL {
        Some(Bytes::from(std::fs::read(&real).ok()?))
    } else {
        None
    };
    // Read between the stat and now? Then the size tells.
    if bytes.as_ref().is_some_and(|b| b.len() as u64 != m.len()) {
        return None;
    }
    let e = Entry {
        etag: HeaderValue::try_from(format!("\"{:x}-{:x}\"", m.len(), nanos)).ok()?,
        content_type: HeaderValue::try_from(content_type(&real)).ok()?,
        last_modified: HeaderValue::try_from(httpdate::fmt_http_date(modified)).ok()?,
        path: real,
        len: m.len(),
        modified,
        bytes,
    };
    Some(e)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The type of a file by its extension; text gets a charset.
fn content_type(path: &Path) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let text = mime.type_() == mime_guess::mime::TEXT
        || matches!(
            mime.essence_str(),
            "application/javascript" | "application/json" | "image/svg+xml"
        );
    if text {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.essence_str().to_string()
    }
}

/// Whether `accept` (an `Accept-Encoding` value) takes `coding` (q > 0).
fn accepts(accept: &str, coding: &str) -> bool {
    accept.split(',').any(|part| {
        let mut it = part.split(';');
        let name = it.next().unwrap_or("").trim();
        let q = it
            .find_map(|p| p.trim().strip_prefix("q="))
            .and_then(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        name.eq_ignore_ascii_case(coding) && q > 0.0
    })
}

/// The byte range of a `Range` value over `len` bytes: `Ok(None)` when it
/// is not one we serve as a range (several ranges, another unit: the
/// whole file goes), `Err` when it cannot be satisfied.
fn range(value: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().map_err(|_| ());
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (false, true) => (parse(a)?, len.saturating_sub(1)),
        (false, false) => (parse(a)?, parse(b)?.min(len.saturating_sub(1))),
        (true, false) => {
            let n = parse(b)?;
            if n == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len.saturating_sub(1))
        }
        (true, true) => return Err(()),
    };
    if len == 0 || start >= len || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

fn header(req: &RequestHeader, name: header::HeaderName) -> Option<&str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

fn etag_matches(list: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    list.trim() == "*" || list.split(',').any(|t| bare(t) == bare(etag))
}

/// A reply's head: its status and header lines in order, all known to be
/// distinct names. No header map: the gateway's loop writes the lines as
/// they are, and Pingora's session gets a map made of them
/// ([`Head::to_response_header`]).
pub struct Head {
    pub status: StatusCode,
    pub lines: Vec<(header::HeaderName, HeaderValue)>,
}

impl Head {
    fn new(status: StatusCode) -> Head {
        Head {
            status,
            lines: Vec::with_capacity(16),
        }
    }

    fn push(&mut self, name: header::HeaderName, value: HeaderValue) {
        self.lines.push((name, value));
    }

    /// Adds the security headers (a file route has no upstream to set its
    /// own).
    fn secure(&mut self) {
        self.lines.extend(crate::headers::SECURITY_HEADERS);
    }

    /// The head as Pingora's session takes it.
    pub fn to_response_header(&self) -> Result<ResponseHeader> {
        let mut resp = ResponseHeader::build_no_case(self.status, Some(self.lines.len()))?;
        for (name, value) in &self.lines {
            resp.append_header(name.clone(), value.clone())?;
        }
        Ok(resp)
    }
}

impl From<&ResponseHeader> for Head {
    fn from(resp: &ResponseHeader) -> Head {
        Head {
            status: resp.status,
            lines: resp.headers.iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
        }
    }
}

/// A file route's answer to one request, written by either HTTP/1 path
/// (Pingora's session, [`serve`]; the gateway's own loop, `h1`).
pub struct Reply {
    /// The head, with the security headers.
    pub head: Head,
    pub body: Body,
    /// Whether the edge's gzip would compress it (for a client that takes
    /// gzip): never a precompressed variant, a range or a `304`, and only
    /// the types and sizes of [`gzippable`].
    pub gzip_ok: bool,
}

/// Where a reply's body comes from.
pub enum Body {
    /// None (`HEAD`, `304`, `416`, `405`, an empty file).
    Empty,
    /// The bytes, from the cache or a page of our own.
    Bytes(Bytes),
    /// `len` bytes of a large file from `start`, read as they are sent.
    File { path: PathBuf, start: u64, len: u64 },
}

/// The reading of a large file's body, one [`CHUNK`] at a time.
pub struct FileBody {
    f: Arc<std::fs::File>,
    at: u64,
    end: u64,
}

impl FileBody {
    /// Opened here, like the stat in `lookup`: a path just resolved.
    pub fn open(path: &Path, start: u64, len: u64) -> Result<FileBody> {
        let f = std::fs::File::open(path)
            .map(Arc::new)
            .map_err(|e| Error::because(ErrorType::InternalError, "open a served file", e))?;
        Ok(FileBody {
            f,
            at: start,
            end: start + len,
        })
    }

    /// The next piece; `None` once the promised length has been read.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        if self.at >= self.end {
            return Ok(None);
        }
        let want = ((self.end - self.at) as usize).min(CHUNK);
        let chunk = read_at(&self.f, self.at, want)
            .await
            .map_err(|e| Error::because(ErrorType::InternalError, "read a served file", e))?;
        if chunk.is_empty() {
            // Shortened under us: the length promised cannot be kept.
            return Error::e_explain(ErrorType::InternalError, "a served file got shorter");
        }
        self.at += chunk.len() as u64;
        Ok(Some(chunk))
    }

    /// Whether the last piece has been read.
    pub fn is_done(&self) -> bool {
        self.at >= self.end
    }
}

/// Answers a request on a file route. Always answers (404 for anything
/// that is not a servable file).
pub async fn reply(req: &RequestHeader, files: &FileRoute) -> Result<Reply> {
    let head = req.method == http::Method::HEAD;
    if req.method != http::Method::GET && !head {
        let mut resp = Head::new(StatusCode::METHOD_NOT_ALLOWED);
        resp.push(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        resp.push(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        resp.secure();
        return Ok(Reply {
            head: resp,
            body: Body::Empty,
            gzip_ok: false,
        });
    }
    let not_found = || -> Result<Reply> {
        let (head, body) = crate::answer::not_found().response()?;
        Ok(Reply {
            head: Head::from(&head),
            body: body.map_or(Body::Empty, Body::Bytes),
            gzip_ok: true,
        })
    };
    let Some(rel) = files.relative(req.uri.path()) else {
        return not_found();
    };
    let Some(entry) = files.lookup(&rel, false).await else {
        return not_found();
    };
    let ranged = header(req, header::RANGE);
    // A precompressed sibling, not older than the file, when the client
    // takes it (ranges are served from the file itself).
    let mut variant = None;
    if ranged.is_none() {
        let accept = header(req, header::ACCEPT_ENCODING).unwrap_or("");
        for (coding, ext) in [("br", "br"), ("gzip", "gz")] {
            if !accepts(accept, coding) {
                continue;
            }
            let name = format!("{rel}.{ext}");
            if let Some(v) = files.lookup(&name, true).await
                && v.modified >= entry.modified
            {
                variant = Some((coding, v));
                break;
            }
        }
    }
    let (body, etag) = match &variant {
        Some((coding, v)) => {
            let base = entry.etag.to_str().unwrap_or_default().trim_end_matches('"');
            let tag = HeaderValue::try_from(format!("{base}-{coding}\""))
                .or_err(ErrorType::InternalError, "a variant's ETag")?;
            (v.clone(), tag)
        }
        None => (entry.clone(), entry.etag.clone()),
    };
    let last_modified = entry.last_modified.clone();
    let common = |resp: &mut Head| {
        resp.push(header::ETAG, etag.clone());
        resp.push(header::LAST_MODIFIED, last_modified.clone());
        resp.push(header::CACHE_CONTROL, files.cache_control.clone());
        resp.push(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        resp.push(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        resp.secure();
    };
    let etag = etag.to_str().unwrap_or_default();

    let not_modified = match (
        header(req, header::IF_NONE_MATCH),
        header(req, header::IF_MODIFIED_SINCE),
    ) {
        (Some(list), _) => etag_matches(list, etag),
        (None, Some(since)) => httpdate::parse_http_date(since).is_ok_and(|t| {
            let secs = |t: SystemTime| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            };
            secs(entry.modified) <= secs(t)
        }),
        (None, None) => false,
    };
    // Our own encodings (or none, for ranges and 304s): the edge's gzip
    // must not touch them.
    if not_modified {
        let mut resp = Head::new(StatusCode::NOT_MODIFIED);
        common(&mut resp);
        return Ok(Reply {
            head: resp,
            body: Body::Empty,
            gzip_ok: false,
        });
    }

    let mut span = None;
    if let Some(r) = ranged {
        // If-Range: the range holds only for the current version.
        let current = header(req, header::IF_RANGE).is_none_or(|v| {
            v.trim() == etag || httpdate::parse_http_date(v).is_ok_and(|t| t >= entry.modified)
        });
        if current {
            match range(r, body.len) {
                Ok(s) => span = s,
                Err(()) => {
                    let mut resp = Head::new(StatusCode::RANGE_NOT_SATISFIABLE);
                    let range = HeaderValue::try_from(format!("bytes */{}", body.len))
                        .or_err(ErrorType::InternalError, "a Content-Range")?;
                    resp.push(header::CONTENT_RANGE, range);
                    resp.push(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                    common(&mut resp);
                    return Ok(Reply {
                        head: resp,
                        body: Body::Empty,
                        gzip_ok: false,
                    });
                }
            }
        }
    }
    let (status, start, len) = match span {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, body.len),
    };
    let mut resp = Head::new(status);
    resp.push(header::CONTENT_TYPE, entry.content_type.clone());
    resp.push(header::CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::PARTIAL_CONTENT {
        let range = HeaderValue::try_from(format!("bytes {start}-{}/{}", start + len - 1, body.len))
            .or_err(ErrorType::InternalError, "a Content-Range")?;
        resp.push(header::CONTENT_RANGE, range);
    }
    if let Some((coding, _)) = &variant {
        resp.push(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
    }
    common(&mut resp);
    let body = match &body.bytes {
        _ if head || len == 0 => Body::Empty,
        Some(bytes) => Body::Bytes(bytes.slice(start as usize..(start + len) as usize)),
        None => Body::File {
            path: body.path.clone(),
            start,
            len,
        },
    };
    Ok(Reply {
        head: resp,
        body,
        gzip_ok: variant.is_none()
            && status == StatusCode::OK
            && gzippable(entry.content_type.as_bytes(), len),
    })
}

/// Whether Pingora's compression module, the edge's gzip, compresses an
/// answer of this type and length: `text/`, `application/`, `font/`,
/// three image types and `binary/octet-stream`, of 20 bytes or more (its
/// rule, in pingora-core's `compression` module).
fn gzippable(content_type: &[u8], len: u64) -> bool {
    const TYPES: &[&[u8]] = &[
        b"text/",
        b"application/",
        b"font/",
        b"image/x-icon",
        b"image/svg+xml",
        b"image/nd.microsoft.icon",
        b"binary/octet-stream",
    ];
    len >= 20 && TYPES.iter().any(|t| content_type.starts_with(t))
}

/// Answers a request on a file route through Pingora's session.
pub async fn serve(session: &mut Session, files: &FileRoute) -> Result<bool> {
    let Reply { head, body, gzip_ok } = reply(session.req_header(), files).await?;
    let head = head.to_response_header()?;
    if !gzip_ok && let Some(c) = session.downstream_modules_ctx.get_mut::<ResponseCompression>() {
        c.adjust_level(0);
    }
    let empty = matches!(body, Body::Empty);
    session.write_response_header(Box::new(head), empty).await?;
    match body {
        Body::Empty => {}
        Body::Bytes(bytes) => session.write_response_body(Some(bytes), true).await?,
        Body::File { path, start, len } => {
            let mut file = FileBody::open(&path, start, len)?;
            while let Some(chunk) = file.next().await? {
                session.write_response_body(Some(chunk), file.is_done()).await?;
            }
        }
    }
    Ok(true)
}

/// Up to `want` bytes of `f` at `offset`, read straight into the buffer
/// that is sent; empty at the end of the file.
///
/// Bytes already in the page cache (the usual case for a served file) are
/// read on this thread (`preadv2` with `RWF_NOWAIT`, which never waits for
/// the disk); the rest on the blocking pool. `tokio::fs` sent every read
/// to the blocking pool and copied it once more: a quarter of the CPU of a
/// 1 MiB response went to those hand-offs (`bench --scenarios static`).
async fn read_at(f: &Arc<std::fs::File>, offset: u64, want: usize) -> std::io::Result<Bytes> {
    use rustix::io::{Errno, ReadWriteFlags, preadv2};
    use std::io::IoSliceMut;
    use std::os::unix::fs::FileExt;

    let mut buf = bytes::BytesMut::zeroed(want);
    match preadv2(
        f,
        &mut [IoSliceMut::new(&mut buf)],
        offset,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(n) if n > 0 => {
            buf.truncate(n);
            return Ok(buf.freeze());
        }
        // Not cached (or no `RWF_NOWAIT` here): wait for the disk elsewhere.
        // Zero bytes is the end of the file or nothing cached; the blocking
        // read tells which.
        Ok(_) | Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let f = f.clone();
    tokio::task::spawn_blocking(move || {
        let n = f.read_at(&mut buf, offset)?;
        buf.truncate(n);
        Ok(buf.freeze())
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dir: &Path) -> FileRoute {
        FileRoute::new(dir, "/static", &FileCache::Immutable).unwrap()
    }

    /// Both ways of `read_at`: pages in the cache, and pages dropped from
    /// it (written, synced, `DONTNEED`), which `RWF_NOWAIT` refuses and the
    /// blocking pool reads; at offsets, short at the end, empty past it.
    #[tokio::test(flavor = "current_thread")]
    async fn reads_cached_and_uncached_pages_alike() {
        use rustix::fs::{Advice, fadvise};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("big.bin");
        let data: Vec<u8> = (0..3 * CHUNK as u32 + 7).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = Arc::new(std::fs::File::open(&path).unwrap());
        for cached in [true, false] {
            if !cached {
                f.sync_all().unwrap();
                fadvise(&*f, 0, None, Advice::DontNeed).unwrap();
            }
            let mut got = Vec::new();
            let mut at = 0;
            while at < data.len() {
                let chunk = read_at(&f, at as u64, CHUNK).await.unwrap();
                assert!(!chunk.is_empty(), "cached {cached}: nothing at {at}");
                got.extend_from_slice(&chunk);
                at += chunk.len();
            }
            assert!(got == data, "cached {cached}: the bytes differ");
            let tail = read_at(&f, data.len() as u64 - 7, CHUNK).await.unwrap();
            assert_eq!(&tail[..], &data[data.len() - 7..]);
            assert!(read_at(&f, data.len() as u64, CHUNK).await.unwrap().is_empty());
        }
    }

    /// A missing precompressed sibling is remembered (browsers ask for
    /// one with every request) until one appears; a missing plain path is
    /// not (random paths must not push real files out of the cache).
    #[tokio::test(flavor = "current_thread")]
    async fn missing_siblings_are_remembered_until_they_appear() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("app.js"), "let a = 1;").unwrap();
        let r = route(d.path());
        let cached = |p: &str| match r.cache.lock().unwrap().peek(p) {
            Some(Cached::Found(_)) => "found",
            Some(Cached::Missing) => "missing",
            None => "unknown",
        };
        assert!(r.lookup("app.js", false).await.is_some());
        assert!(r.lookup("app.js.br", true).await.is_none());
        assert!(r.lookup("nothing.js", false).await.is_none());
        assert_eq!(
            (cached("app.js"), cached("app.js.br"), cached("nothing.js")),
            ("found", "missing", "unknown")
        );
        assert!(r.lookup("app.js.br", true).await.is_none());
        std::fs::write(d.path().join("app.js.br"), "compressed").unwrap();
        let sibling = r.lookup("app.js.br", true).await.expect("the new sibling");
        assert_eq!(sibling.len, 10);
        assert_eq!(cached("app.js.br"), "found");
    }

    #[test]
    fn only_plain_paths_name_a_file() {
        let d = tempfile::tempdir().unwrap();
        let r = route(d.path());
        assert_eq!(r.relative("/static/a/b.css"), Some("a/b.css".to_string()));
        assert_eq!(r.relative("/static/"), Some("index.html".to_string()));
        assert_eq!(r.relative("/static/caf%C3%A9.txt"), Some("café.txt".to_string()));
        for bad in [
            "/static/../etc/passwd",
            "/static/%2e%2e/x",
            "/static/a%2fb",
            "/static/a%5cb",
            "/static/.env",
            "/static/a//b",
            "/static/%00",
            "/static/%zz",
            "/other/x",
        ] {
            assert_eq!(r.relative(bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=95-200", 100), Ok(Some((95, 99))));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(range("items=0-1", 100), Ok(None));
        assert_eq!(range("bytes=100-", 100), Err(()));
        assert_eq!(range("bytes=5-1", 100), Err(()));
        assert_eq!(range("bytes=-0", 100), Err(()));
        assert_eq!(range("bytes=x-1", 100), Err(()));
    }

    #[test]
    fn encodings_and_types() {
        assert!(accepts("gzip, deflate, br", "br"));
        assert!(!accepts("gzip;q=0, br", "gzip"));
        assert!(!accepts("identity", "gzip"));
        assert_eq!(content_type(Path::new("a.css")), "text/css; charset=utf-8");
        assert_eq!(content_type(Path::new("a.js")), "text/javascript; charset=utf-8");
        assert_eq!(content_type(Path::new("a.png")), "image/png");
        assert_eq!(
            content_type(Path::new("a.unknownext")),
            "application/octet-stream"
        );
        assert!(etag_matches("W/\"a\", \"b\"", "\"a\""));
        assert!(!etag_matches("\"c\"", "\"a\""));
    }
}
