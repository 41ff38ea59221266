//! The client protocol, version 1: JSON text frames (see `chat/PROTOCOL.md`).
//!
//! Parsing is strict: unknown fields and types are errors with a stable
//! [`ErrorCode`], and every identifier is validated before it reaches a
//! registry or a store.

use serde::{Deserialize, Serialize};

/// WebSocket subprotocol a client asks for (with its token as a second
/// protocol `bearer.<jwt>`).
pub const SUBPROTOCOL: &str = "portico.v1";

/// Longest conversation id and client message id.
pub const MAX_ID_LEN: usize = 64;
/// Most messages returned by one `history` request.
pub const MAX_HISTORY_PAGE: u32 = 200;

/// A conversation id: 1–64 of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ConvId(String);

impl ConvId {
    pub fn parse(s: &str) -> Result<Self, ErrorCode> {
        if is_id(s) {
            Ok(ConvId(s.to_string()))
        } else {
            Err(ErrorCode::InvalidConversation)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ConvId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ConvId::parse(&s)
            .map_err(|_| serde::de::Error::custom("conversation id must be 1-64 of A-Z a-z 0-9 _ -"))
    }
}

impl std::fmt::Display for ConvId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A message body: 1 to [`MAX_BODY_BYTES`] bytes, no NUL (which no
/// store keeps as text).
pub fn is_body(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_BODY_BYTES && !s.contains('\0')
}

/// A frame from the client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Receive a conversation's messages; with `since`, first everything after
    /// that offset (resume).
    Subscribe {
        conv: ConvId,
        #[serde(default)]
        since: Option<u64>,
    },
    Unsubscribe {
        conv: ConvId,
    },
    /// Send a message; `id` is the client's idempotency key.
    Publish {
        conv: ConvId,
        id: String,
        body: String,
    },
    /// A page of messages with offsets below `before` (default: the newest).
    History {
        conv: ConvId,
        #[serde(default)]
        before: Option<u64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// "I am typing" (ephemeral; other members get a `typing` event).
    Typing {
        conv: ConvId,
    },
    /// Read receipt: everything up to `offset` has been read.
    Read {
        conv: ConvId,
        offset: u64,
    },
    /// Who is online in a conversation.
    Presence {
        conv: ConvId,
    },
    Ping {},
}

/// Stable error codes, sent in `{"type":"error","code":…}` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON or lacks fields.
    BadFrame,
    /// The `type` is not one this server knows.
    UnknownType,
    /// A conversation id is malformed.
    InvalidConversation,
    /// A client message id is malformed.
    InvalidMessageId,
    /// The message body is empty or too long.
    InvalidBody,
    /// The user is not a member of the conversation (or it does not exist).
    NotMember,
    /// Not subscribed to the conversation.
    NotSubscribed,
    /// Already subscribed to the most conversations one connection may hold.
    TooManySubscriptions,
    /// Publishing faster than allowed; retry after `retry_after_ms`.
    RateLimited,
    /// More was missed than one resume returns; page with `history`.
    ResumeTooFar,
    /// Binary frames are not part of protocol v1.
    BinaryNotSupported,
    /// History storage failed; nothing was stored, retry later.
    Unavailable,
}

impl ErrorCode {
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "frame is not a valid JSON command",
            ErrorCode::UnknownType => "unknown frame type",
            ErrorCode::InvalidConversation => "conversation id must be 1-64 of A-Z a-z 0-9 _ -",
            ErrorCode::InvalidMessageId => "message id must be 1-64 of A-Z a-z 0-9 _ -",
            ErrorCode::InvalidBody => "message body must be 1 to 4096 bytes",
            ErrorCode::NotMember => "not a member of this conversation",
            ErrorCode::NotSubscribed => "not subscribed to this conversation",
            ErrorCode::TooManySubscriptions => "too many subscriptions on this connection",
            ErrorCode::RateLimited => "publishing too fast",
            ErrorCode::ResumeTooFar => "too many missed messages: page them with history",
            ErrorCode::BinaryNotSupported => "binary frames are not supported",
            ErrorCode::Unavailable => "message storage unavailable, not stored: retry",
        }
    }
}

/// Longest message body in bytes.
pub const MAX_BODY_BYTES: usize = 4096;

/// Close codes; 4xxx are Portico's own. "Reconnect" means the client should
/// reconnect (with backoff) and resume with `since`.
pub mod close {
    /// Normal close.
    pub const NORMAL: u16 = 1000;
    /// Server shutting down or draining: reconnect.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol violation at the WebSocket level: do not reconnect unchanged.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A message over the size limit: do not reconnect unchanged.
    pub const TOO_BIG: u16 = 1009;
    /// No frame (not even a pong) within the idle timeout: reconnect.
    pub const IDLE_TIMEOUT: u16 = 4000;
    /// The token expired while connected: get a new token, then reconnect.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client did not read fast enough: reconnect and resume.
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Parses one text frame; the error says which code to answer with.
pub fn parse(text: &str) -> Result<ClientFrame, ErrorCode> {
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(f) => {
            if let ClientFrame::Publish { id, body, .. } = &f {
                if !is_id(id) {
                    return Err(ErrorCode::InvalidMessageId);
                }
                if !is_body(body) {
                    return Err(ErrorCode::InvalidBody);
                }
            }
            Ok(f)
        }
        Err(e) => Err(classify(text, &e)),
    }
}

fn classify(text: &str, e: &serde_json::Error) -> ErrorCode {
    #[derive(Deserialize)]
    struct Tagged<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let known = [
        "subscribe",
        "unsubscribe",
        "publish",
        "history",
        "typing",
        "read",
        "presence",
        "ping",
    ];
    match serde_json::from_str::<Tagged>(text) {
        Ok(Tagged { kind: Some(k) }) if !known.contains(&k.as_ref()) => ErrorCode::UnknownType,
        _ if e.to_string().contains("conversation id") => ErrorCode::InvalidConversation,
        _ => ErrorCode::BadFrame,
    }
}

/// A stored message as clients and shards see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Message {
    #[schema(value_type = String)]
    pub conv: ConvId,
    /// Position in the conversation: 1, 2, 3… without gaps.
    pub offset: u64,
    /// The sender's idempotency key.
    pub id: String,
    pub from: String,
    /// Server time, milliseconds since the epoch.
    pub ts: u64,
    pub body: String,
}

/// Ephemeral events: not stored, no offset, best effort (a client that
/// misses one asks again: `presence`, `history`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub conv: ConvId,
    pub user: String,
    pub event: EventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    Typing,
    /// The user's first connection subscribed to the conversation.
    Joined,
    /// The user's last connection left it.
    Left,
    /// The user's read receipt moved to `offset`.
    Read {
        offset: u64,
    },
    /// The user was removed from the conversation.
    Removed,
}

/// Frames the server sends. Serialized once per message, shared by every
/// recipient on a shard.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        user: &'a str,
        shard: u16,
        protocol: &'static str,
    },
    Subscribed {
        conv: &'a ConvId,
        offset: u64,
    },
    Unsubscribed {
        conv: &'a ConvId,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
    },
    Event(&'a Event),
    Presence {
        conv: &'a ConvId,
        users: &'a [String],
    },
    Message(&'a Message),
    Ack {
        conv: &'a ConvId,
        id: &'a str,
        offset: u64,
        duplicate: bool,
    },
    History {
        conv: &'a ConvId,
        messages: &'a [Message],
    },
    Pong,
    Error {
        code: ErrorCode,
        message: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        conv: Option<&'a ConvId>,
        /// The publish this answers (its client id), so a client knows
        /// which one to retry.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }

    pub fn error(code: ErrorCode, conv: Option<&ConvId>) -> ServerFrame<'_> {
        ServerFrame::Error {
            code,
            message: code.message(),
            conv,
            id: None,
            retry_after_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse(r#"{"type":"subscribe","conv":"c1","since":4}"#),
            Ok(ClientFrame::Subscribe {
                conv: ConvId::parse("c1").unwrap(),
                since: Some(4)
            })
        );
        assert_eq!(parse(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping {}));
    }

    #[test]
    fn classifies_errors() {
        assert_eq!(parse("{nope"), Err(ErrorCode::BadFrame));
        assert_eq!(parse(r#"{"type":"dance"}"#), Err(ErrorCode::UnknownType));
        assert_eq!(parse(r#"{"type":"subscribe"}"#), Err(ErrorCode::BadFrame));
        assert_eq!(
            parse(r#"{"type":"subscribe","conv":"a/b"}"#),
            Err(ErrorCode::InvalidConversation)
        );
        assert_eq!(parse(r#"{"type":"ping","extra":1}"#), Err(ErrorCode::BadFrame));
        assert_eq!(
            parse(r#"{"type":"publish","conv":"c","id":"","body":"x"}"#),
            Err(ErrorCode::InvalidMessageId)
        );
        assert_eq!(
            parse(r#"{"type":"publish","conv":"c","id":"m1","body":"a\u0000b"}"#),
            Err(ErrorCode::InvalidBody),
            "no store keeps a NUL as text"
        );
        let long = "x".repeat(MAX_BODY_BYTES + 1);
        assert_eq!(
            parse(&format!(
                r#"{{"type":"publish","conv":"c","id":"m1","body":"{long}"}}"#
            )),
            Err(ErrorCode::InvalidBody)
        );
    }
}
