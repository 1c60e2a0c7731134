//! The generation queue: its message and how it is sent.

use crate::ids::{SessionId, Turn};
use aws_sdk_sqs::error::DisplayErrorContext;
use serde::{Deserialize, Serialize};

/// The body of a generation request: which turn of which session to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnMessage {
    /// The session.
    pub session_id: SessionId,
    /// The turn to answer.
    pub turn: Turn,
}

/// Sending to the queue failed (after the SDK's retries).
#[derive(Debug, thiserror::Error)]
#[error("SQS SendMessage failed: {detail}")]
pub struct QueueError {
    /// The error with its source chain, safe to log.
    pub detail: String,
    /// The SDK error itself.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Sends generation requests to one queue.
#[derive(Debug, Clone)]
pub struct Queue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl Queue {
    /// A sender for the queue at `url`.
    pub fn new(client: aws_sdk_sqs::Client, url: impl Into<String>) -> Self {
        Queue { client, url: url.into() }
    }

    /// Enqueues a generation request.
    pub async fn send(&self, message: TurnMessage) -> Result<(), QueueError> {
        let body = serde_json::to_string(&message).expect("a turn message serialises");
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| QueueError { detail: DisplayErrorContext(&e).to_string(), source: Box::new(e) })
    }
}
