//! Plain HTTP: every request is redirected to HTTPS with 308 (the method
//! and body are kept). ACME HTTP-01 challenges will be answered here first.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use crate::acme::Challenges;

pub struct Redirect {
    /// The public HTTPS port (omitted from the URL when 443).
    pub https_port: u16,
    /// HTTP-01 answers for orders in flight.
    pub challenges: Arc<Challenges>,
    /// The names this edge serves: a redirect keeps one of these (or an
    /// app's `<app>.<paas_domain>`); any other Host goes to the first, so
    /// the redirect never sends a client to a host an attacker named.
    pub hostnames: Vec<String>,
    pub paas_domain: String,
}

impl Redirect {
    /// The host to redirect to for the request's `Host` name.
    fn target_host(&self, asked: Option<&str>) -> Option<String> {
        let asked = asked.map(str::to_ascii_lowercase);
        if let Some(h) = asked.as_deref() {
            let ours = self.hostnames.iter().any(|n| n.eq_ignore_ascii_case(h))
                || h.strip_suffix(self.paas_domain.as_str())
                    .and_then(|label| label.strip_suffix('.'))
                    .is_some_and(|label| {
                        !label.is_empty() && !label.contains('.') && portico_config::is_hostname(label)
                    });
            if ours {
                return asked;
            }
        }
        self.hostnames.first().cloned()
    }
}

const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

#[async_trait]
impl ProxyHttp for Redirect {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let req = session.req_header();
        if let Some(token) = req.uri.path().strip_prefix(CHALLENGE_PATH) {
            let answer = self.challenges.answer(token);
            let status = if answer.is_some() { 200 } else { 404 };
            let body = answer.unwrap_or_default();
            let mut resp = ResponseHeader::build(status, Some(3))?;
            resp.insert_header("content-type", "text/plain")?;
            resp.insert_header("content-length", body.len().to_string())?;
            session.write_response_header(Box::new(resp), false).await?;
            session
                .write_response_body(Some(bytes::Bytes::from(body)), true)
                .await?;
            return Ok(true);
        }
        let asked = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name));
        let Some(host) = self.target_host(asked) else {
            let mut resp = ResponseHeader::build(400, Some(3))?;
            resp.insert_header("content-length", "0")?;
            resp.insert_header("connection", "close")?;
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(true);
        };
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let port = if self.https_port == 443 {
            String::new()
        } else {
            format!(":{}", self.https_port)
        };
        let mut resp = ResponseHeader::build(308, Some(3))?;
        resp.insert_header("location", format!("https://{host}{port}{path}"))?;
        resp.insert_header("content-length", "0")?;
        resp.insert_header("connection", "close")?;
        session.write_response_header(Box::new(resp), true).await?;
        Ok(true)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, _ctx: &mut ()) {
        // The connection guard waits for the next request from here on.
        if let Some(stream) = session.stream() {
            crate::guard::request_done(stream);
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Err(Error::explain(
            ErrorType::InternalError,
            "redirect has no upstream",
        ))
    }
}
