//! The HTTP edge: request bodies that parse, and errors mapped to answers in one place (the
//! headers and body are `chat_runtime::http_error`'s).

use chat_core::{ClientMessageId, SessionId, State, StoreError, Turn};
use chat_runtime::http_error::ErrorAnswer;
use lambda_http::http::{header, StatusCode};
use lambda_http::{Body, Response};
use serde_json::{json, Value};

/// A JSON response.
pub fn json(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::Text(body.to_string()))
        .expect("status and header are valid")
}

/// Why a request failed; each variant is one status, chosen in [`ApiError::answer`].
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is malformed; `message` says what to fix.
    BadRequest { code: &'static str, message: String },
    /// 400, 401, 403 or 503: who is calling could not be established, or may not call.
    Auth(chat_auth::AuthError),
    /// 403: the path names another user than the caller's.
    Forbidden { message: String },
    /// 404: no such session or route.
    NotFound { code: &'static str, message: String },
    /// 405: the path exists with other methods.
    MethodNotAllowed { allow: &'static str },
    /// 409: a turn is in flight.
    TurnInFlight { state: State, turn: Turn },
    /// 409: the session is not in a state that allows this.
    Conflict { code: &'static str, message: String, state: State },
    /// 413: the body is over the limit.
    TooLarge,
    /// 413: a session's export would be over what one answer carries.
    ExportTooLarge { message: String },
    /// 413: a fork would copy more turns than a fork may.
    TooManyTurnsToFork { turns: u32, max: u32 },
    /// 413: the message has more tokens than the model's prompt budget leaves for it.
    MessageTooLong { tokens: usize, limit: usize },
    /// 429: a limit; `Retry-After` says when to try again, `details` (an object) what the limit
    /// is.
    TooManyRequests {
        code: &'static str,
        message: String,
        retry_after: std::time::Duration,
        details: Option<Value>,
    },
    /// 415: the body is not declared as JSON (`found`: what it is declared as; empty when it is
    /// not declared at all).
    UnsupportedMediaType { found: String },
    /// 503: a dependency failed; nothing was half-written.
    Unavailable { code: &'static str, message: String },
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest { code, message: message.into() }
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Unavailable { code, message: message.into() }
    }

    pub fn method_not_allowed(allow: &'static str) -> ApiError {
        ApiError::MethodNotAllowed { allow }
    }

    /// The path names a user the caller may not act as.
    pub fn forbidden(user: &chat_core::UserId) -> ApiError {
        ApiError::Forbidden {
            message: format!("you are not signed in as {:?}; use your own user id", user.as_str()),
        }
    }

    pub fn session_not_found() -> ApiError {
        ApiError::NotFound { code: "session_not_found", message: "no such session for this user".to_owned() }
    }

    /// A DynamoDB fault: logged in full, reported without internals.
    pub fn store_unavailable(err: &StoreError) -> ApiError {
        tracing::error!(error = %err, "DynamoDB request failed");
        ApiError::unavailable("store_unavailable", "the session store is unavailable; try again")
    }

    /// The answer: status, code, message, details, and the header the status calls for.
    pub fn answer(self) -> ErrorAnswer {
        match self {
            ApiError::BadRequest { code, message } => {
                ErrorAnswer::new(StatusCode::BAD_REQUEST, code, message)
            }
            ApiError::Auth(err) => err.answer(),
            ApiError::Forbidden { message } => ErrorAnswer::new(StatusCode::FORBIDDEN, "forbidden", message),
            ApiError::NotFound { code, message } => ErrorAnswer::new(StatusCode::NOT_FOUND, code, message),
            ApiError::MethodNotAllowed { allow } => {
                let message = format!("use {allow} on this path");
                ErrorAnswer::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message).allow(allow)
            }
            ApiError::TurnInFlight { state, turn } => ErrorAnswer::new(
                StatusCode::CONFLICT,
                "turn_in_flight",
                format!("turn {turn} is {state}; wait for it to finish or cancel it"),
            )
            .details(json!({"state": state, "turn": turn})),
            ApiError::Conflict { code, message, state } => {
                ErrorAnswer::new(StatusCode::CONFLICT, code, message).details(json!({"state": state}))
            }
            ApiError::TooLarge => ErrorAnswer::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is over {} bytes", crate::MAX_BODY_BYTES),
            ),
            ApiError::ExportTooLarge { message } => {
                ErrorAnswer::new(StatusCode::PAYLOAD_TOO_LARGE, "export_too_large", message)
            }
            ApiError::TooManyTurnsToFork { turns, max } => ErrorAnswer::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "fork_too_long",
                format!("a fork copies at most {max} turns; fork at turn {max} or earlier, not {turns}"),
            )
            .details(json!({"turns": turns, "max": max})),
            ApiError::UnsupportedMediaType { found } => ErrorAnswer::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                match found.as_str() {
                    "" => "the body's type is not declared; send JSON with content-type: application/json"
                        .to_owned(),
                    found => format!(
                        "the body is declared as {found:?}; send JSON with content-type: application/json"
                    ),
                },
            ),
            ApiError::MessageTooLong { tokens, limit } => ErrorAnswer::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_long",
                format!(
                    "the message is {tokens} tokens; the model's budget leaves room for {limit}: shorten it"
                ),
            )
            .details(json!({"tokens": tokens, "limit": limit})),
            ApiError::TooManyRequests { code, message, retry_after, details } => ErrorAnswer {
                details,
                ..ErrorAnswer::new(StatusCode::TOO_MANY_REQUESTS, code, message).retry_after(retry_after)
            },
            ApiError::Unavailable { code, message } => {
                ErrorAnswer::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
            }
        }
    }
}

/// A session id from the path or body; one that is not a UUID names no session, so 404.
pub fn parse_session(raw: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(raw).map_err(|_| ApiError::NotFound {
        code: "session_not_found",
        message: format!("no session {raw:?}: session ids are UUIDs"),
    })
}

/// A valid `POST /sessions/{user}/messages` body.
#[derive(Debug)]
pub struct SendBody {
    pub message: String,
    pub session_id: Option<SessionId>,
    pub user_id: Option<String>,
    pub client_message_id: Option<ClientMessageId>,
}

impl SendBody {
    pub fn parse(body: &Body) -> Result<SendBody, ApiError> {
        let fields = json_object(body)?;
        Ok(SendBody {
            message: message_field(&fields)?,
            session_id: optional_string(&fields, "session_id")?.map(parse_session).transpose()?,
            user_id: optional_string(&fields, "user_id")?.map(str::to_owned),
            client_message_id: client_message_id(&fields)?,
        })
    }
}

/// The `title` of a `PATCH /sessions/{id}` body: a string of 1 to
/// [`chat_core::record::TITLE_MAX_CHARS`] characters once trimmed, with no control characters.
pub fn title_field(body: &Body) -> Result<String, ApiError> {
    let fields = json_object(body)?;
    let limit = chat_core::record::TITLE_MAX_CHARS;
    let invalid = || {
        ApiError::bad_request(
            "invalid_title",
            format!("\"title\" must be a string of 1 to {limit} characters, on one line"),
        )
    };
    let title = match fields.get("title") {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("missing_title", "the body needs a \"title\" string"))
        }
        Some(Value::String(title)) => title.trim(),
        Some(_) => return Err(invalid()),
    };
    let count = title.chars().count();
    if count == 0 || count > limit || title.chars().any(char::is_control) {
        return Err(invalid());
    }
    Ok(title.to_owned())
}

/// A valid body of `POST /sessions/{id}/regenerate`, `/edit` or `/fork`: the turn meant (for a
/// revision, the last turn as the client saw it; for a fork, the turn to fork at), the new
/// message of an edit, and the idempotency key.
#[derive(Debug)]
pub struct TurnBody {
    pub message: Option<String>,
    pub turn: Option<Turn>,
    pub client_message_id: Option<ClientMessageId>,
}

impl TurnBody {
    /// Parses the body; `message` is required when `needs_message` (an edit) and ignored
    /// otherwise. An empty body is `{}`.
    pub fn parse(body: &Body, needs_message: bool) -> Result<TurnBody, ApiError> {
        let fields = if body_bytes(body).iter().all(u8::is_ascii_whitespace) && !needs_message {
            serde_json::Map::new()
        } else {
            json_object(body)?
        };
        let turn = match fields.get("turn") {
            None | Some(Value::Null) => None,
            Some(value) => Some(value.as_u64().and_then(|n| Turn::new(n).ok()).ok_or_else(|| {
                ApiError::bad_request("invalid_turn", "\"turn\" must be a turn number: a whole number from 1")
            })?),
        };
        Ok(TurnBody {
            message: if needs_message { Some(message_field(&fields)?) } else { None },
            turn,
            client_message_id: client_message_id(&fields)?,
        })
    }
}

fn body_bytes(body: &Body) -> &[u8] {
    match body {
        Body::Empty => b"",
        Body::Text(text) => text.as_bytes(),
        Body::Binary(bytes) => bytes,
        _ => b"",
    }
}

/// The body as a JSON object, within [`crate::MAX_BODY_BYTES`].
fn json_object(body: &Body) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes = body_bytes(body);
    if bytes.len() > crate::MAX_BODY_BYTES {
        return Err(ApiError::TooLarge);
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "missing_body",
            r#"send a JSON object such as {"message": "hello"}"#,
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}")))?;
    match value {
        Value::Object(fields) => Ok(fields),
        _ => Err(ApiError::bad_request("malformed_json", "the body must be a JSON object")),
    }
}

/// The `message` field: a string with something in it.
fn message_field(fields: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    match fields.get("message") {
        None | Some(Value::Null) => {
            Err(ApiError::bad_request("missing_message", "the body needs a \"message\" string"))
        }
        Some(Value::String(text)) if text.trim().is_empty() => {
            Err(ApiError::bad_request("empty_message", "\"message\" must not be empty or blank"))
        }
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(ApiError::bad_request("invalid_message", "\"message\" must be a string")),
    }
}

fn optional_string<'a>(
    fields: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(ApiError::bad_request("invalid_field", format!("\"{name}\" must be a string"))),
    }
}

fn client_message_id(fields: &serde_json::Map<String, Value>) -> Result<Option<ClientMessageId>, ApiError> {
    optional_string(fields, "client_message_id")?
        .map(|raw| {
            ClientMessageId::parse(raw)
                .map_err(|e| ApiError::bad_request("invalid_client_message_id", e.to_string()))
        })
        .transpose()
}

impl From<chat_auth::AuthError> for ApiError {
    fn from(err: chat_auth::AuthError) -> ApiError {
        ApiError::Auth(err)
    }
}

/// A body must be declared as JSON: a `text/plain` or form POST, or a `fetch` of a Blob without a
/// type (no `content-type` at all), is what another web page can send without a CORS preflight.
pub fn require_json(headers: &lambda_http::http::HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::UnsupportedMediaType { found: String::new() });
    };
    let declared = value.to_str().unwrap_or("").to_ascii_lowercase();
    let media = declared.split(';').next().unwrap_or("").trim();
    let json = media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType { found: media.to_owned() })
    }
}

/// A page's `limit` query parameter: 20 when absent, else a whole number of `what` from 1 to 100.
pub fn page_limit(raw: Option<&str>, what: &str) -> Result<u32, ApiError> {
    let Some(raw) = raw else { return Ok(20) };
    raw.parse::<u32>().ok().filter(|n| (1..=100).contains(n)).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_limit",
            format!("limit {raw:?} must be a whole number of {what} from 1 to 100"),
        )
    })
}
