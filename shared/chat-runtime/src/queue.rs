//! Sending generation requests to the queue (SQS).

use aws_sdk_sqs::error::DisplayErrorContext;
use chat_core::queue::TurnMessage;

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

/// An SQS client.
pub fn sqs(config: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(config)
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
