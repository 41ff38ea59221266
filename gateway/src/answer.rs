//! The answers the edge writes itself (refusals, rate limits, the pages
//! of unknown or stopped apps, redirects to an app's own origin), on
//! Pingora's session or on the gateway's own HTTP/1 loop (`h1`): one head
//! and body for both.

use std::time::Duration;

use pingora::http::ResponseHeader;
use pingora::prelude::*;

/// An answer the gateway writes itself.
pub enum Canned {
    /// An empty response. An error closes the connection: the rest of the
    /// request may still be on the wire.
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// A small HTML page (unknown or stopped apps): never a connection
    /// error, never cached.
    Page {
        status: u16,
        title: &'static str,
        text: String,
    },
    /// A permanent redirect (`308`) to `location`.
    Moved { location: String },
}

impl Canned {
    pub fn status(status: u16) -> Canned {
        Canned::Status {
            status,
            retry_after: None,
        }
    }

    pub(crate) fn page(status: u16, title: &'static str, text: impl Into<String>) -> Canned {
        Canned::Page {
            status,
            title,
            text: text.into(),
        }
    }

    /// Whether the connection closes after this answer.
    pub fn closes(&self) -> bool {
        matches!(self, Canned::Status { status, .. } if *status >= 400)
    }

    /// The response head, with the security headers, and its body.
    pub fn response(&self) -> Result<(ResponseHeader, Option<bytes::Bytes>)> {
        let (status, body) = match self {
            Canned::Status { status, .. } => (*status, None),
            Canned::Page { status, title, text } => (
                *status,
                Some(bytes::Bytes::from(format!(
                    "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><title>{title}</title>\
                     <body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\"><h1>{title}</h1><p>{text}</p></body></html>\n"
                ))),
            ),
            Canned::Moved { .. } => (308, None),
        };
        let mut resp = ResponseHeader::build(status, Some(5))?;
        match self {
            Canned::Status {
                retry_after: Some(wait),
                ..
            } => {
                // Whole seconds, rounded up: 0 would invite an immediate retry.
                resp.insert_header("retry-after", wait.as_secs() + u64::from(wait.subsec_nanos() > 0))?;
            }
            Canned::Page { .. } => {
                resp.insert_header("content-type", "text/html; charset=utf-8")?;
                resp.insert_header("cache-control", "no-store")?;
            }
            Canned::Moved { location } => resp.insert_header("location", location.as_str())?,
            Canned::Status { .. } => {}
        }
        resp.insert_header("content-length", body.as_ref().map_or(0, |b| b.len()))?;
        crate::headers::secure(&mut resp)?;
        Ok((resp, body))
    }

    /// Writes the answer on Pingora's session.
    pub(crate) async fn write(&self, session: &mut Session) -> Result<bool> {
        if self.closes() {
            session.set_keepalive(None);
        }
        let (resp, body) = self.response()?;
        session
            .write_response_header(Box::new(resp), body.is_none())
            .await?;
        if body.is_some() {
            session.write_response_body(body, true).await?;
        }
        Ok(true)
    }
}

/// The 503 page of a hosted app that does not answer (down, or failing
/// the request).
pub(crate) fn app_unavailable(name: &str) -> Canned {
    Canned::page(
        503,
        "App unavailable",
        format!("The app {name} is not answering right now. Try again in a moment."),
    )
}

/// The 404 page of an address with nothing behind it.
pub(crate) fn not_found() -> Canned {
    Canned::page(404, "Not found", "There is nothing at this address.")
}
