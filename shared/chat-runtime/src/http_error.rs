//! Every error answer of the HTTP functions, one shape for ingest and the stream: a status, the
//! JSON body `{"error": {"code": "...", "message": "...", ...details}}`, and the header the status
//! calls for (`WWW-Authenticate` on a 401, `Allow` on a 405, `Retry-After` on a 429). Each
//! function maps its errors to an [`ErrorAnswer`]; [`ErrorAnswer::response`] is the one place an
//! answer becomes a response, so every route sends the same headers.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde_json::{json, Map, Value};
use std::time::Duration;

/// An error answer, before it is a response.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorAnswer {
    /// The status.
    pub status: StatusCode,
    /// A stable code for programs (`session_not_found`).
    pub code: &'static str,
    /// For people: what went wrong and what to do.
    pub message: String,
    /// More fields of the error object (an object's fields, merged into it).
    pub details: Option<Value>,
    /// `WWW-Authenticate`: how to authenticate (a 401).
    pub challenge: Option<&'static str>,
    /// `Allow`: the methods the path takes (a 405).
    pub allow: Option<&'static str>,
    /// `Retry-After`, and `retry_after` in the body: when to try again (a 429), in whole seconds
    /// rounded up.
    pub retry_after: Option<Duration>,
}

impl ErrorAnswer {
    /// An answer of `status` with `code` and `message`, no details and no header.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ErrorAnswer {
        ErrorAnswer {
            status,
            code,
            message: message.into(),
            details: None,
            challenge: None,
            allow: None,
            retry_after: None,
        }
    }

    /// The same answer with more fields in its error object.
    pub fn details(mut self, details: Value) -> ErrorAnswer {
        self.details = Some(details);
        self
    }

    /// The same answer saying how to authenticate (`WWW-Authenticate`).
    pub fn challenge(mut self, challenge: &'static str) -> ErrorAnswer {
        self.challenge = Some(challenge);
        self
    }

    /// The same answer naming the methods the path takes (`Allow`).
    pub fn allow(mut self, methods: &'static str) -> ErrorAnswer {
        self.allow = Some(methods);
        self
    }

    /// The same answer saying when to try again (`Retry-After`).
    pub fn retry_after(mut self, wait: Duration) -> ErrorAnswer {
        self.retry_after = Some(wait);
        self
    }

    /// The JSON response: the status, `content-type: application/json`, the headers the answer
    /// carries, and the body (a `Retry-After` also goes into the body as `retry_after`).
    pub fn response(self) -> Response<String> {
        let seconds = self.retry_after.map(retry_after_seconds);
        let details = match seconds {
            Some(seconds) => {
                let mut fields = Map::from_iter([("retry_after".to_owned(), json!(seconds))]);
                if let Some(Value::Object(more)) = self.details {
                    fields.extend(more);
                }
                Some(Value::Object(fields))
            }
            None => self.details,
        };
        let mut response = Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body(self.code, &self.message, details).to_string())
            .expect("status and header are valid");
        let headers = response.headers_mut();
        if let Some(challenge) = self.challenge {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        if let Some(methods) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(methods));
        }
        if let Some(seconds) = seconds {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The error body: a stable `code` for programs, a `message` for people that says what to do,
/// and any `details` (an object's fields, merged into `error`).
pub fn body(code: &str, message: &str, details: Option<Value>) -> Value {
    let mut error = Map::new();
    error.insert("code".to_owned(), Value::String(code.to_owned()));
    error.insert("message".to_owned(), Value::String(message.to_owned()));
    if let Some(Value::Object(details)) = details {
        error.extend(details);
    }
    json!({ "error": error })
}

/// Whole seconds for `Retry-After` (and the body's `retry_after`): rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_join_the_code_and_message() {
        let value = body("too_many_streams", "close one", Some(json!({"retry_after": 5})));
        assert_eq!(
            value,
            json!({"error": {"code": "too_many_streams", "message": "close one", "retry_after": 5}})
        );
        assert_eq!(body("x", "y", None), json!({"error": {"code": "x", "message": "y"}}));
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(10_001)), 11);
    }

    #[test]
    fn every_answer_carries_the_header_its_status_calls_for() {
        let parse = |response: &Response<String>| serde_json::from_str::<Value>(response.body()).unwrap();
        let limited = ErrorAnswer::new(StatusCode::TOO_MANY_REQUESTS, "turn_rate_limited", "wait")
            .details(json!({"scope": "user"}))
            .retry_after(Duration::from_millis(1_500))
            .response();
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()[header::RETRY_AFTER], "2");
        assert_eq!(limited.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            parse(&limited),
            json!({"error": {"code": "turn_rate_limited", "message": "wait", "retry_after": 2, "scope": "user"}})
        );
        let unauthorized = ErrorAnswer::new(StatusCode::UNAUTHORIZED, "missing_token", "sign in")
            .challenge("Bearer")
            .response();
        assert_eq!(unauthorized.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let wrong_method = ErrorAnswer::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET")
            .allow("GET")
            .response();
        assert_eq!(wrong_method.headers()[header::ALLOW], "GET");
        let plain =
            ErrorAnswer::new(StatusCode::NOT_FOUND, "session_not_found", "no such session").response();
        assert_eq!(plain.headers().len(), 1, "content-type only");
        assert_eq!(
            parse(&plain),
            json!({"error": {"code": "session_not_found", "message": "no such session"}})
        );
    }
}
