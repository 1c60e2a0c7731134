//! The JSON body of every error answer of the HTTP functions, one shape for ingest and the
//! stream: `{"error": {"code": "...", "message": "...", ...details}}`.

use serde_json::{json, Map, Value};
use std::time::Duration;

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
}
