//! Sending generation requests to the queue (SQS).

use aws_sdk_sqs::error::DisplayErrorContext;
use chat_core::job::TurnMessage;

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

    /// Enqueues many generation requests, ten to a `SendMessageBatch` call; the messages SQS
    /// refused, with why (an error of a whole call refuses all of its messages).
    pub async fn send_all(&self, messages: &[TurnMessage]) -> Vec<(TurnMessage, QueueError)> {
        use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
        let mut refused = Vec::new();
        for batch in messages.chunks(10) {
            let entries = batch.iter().enumerate().filter_map(|(n, message)| {
                let body = serde_json::to_string(message).expect("a turn message serialises");
                SendMessageBatchRequestEntry::builder().id(n.to_string()).message_body(body).build().ok()
            });
            let sent = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries.collect()))
                .send()
                .await;
            match sent {
                Ok(out) => {
                    for failed in out.failed {
                        let Some(message) = failed.id.parse::<usize>().ok().and_then(|n| batch.get(n)) else {
                            continue;
                        };
                        let detail = format!(
                            "SQS refused the message: {} ({})",
                            failed.message.unwrap_or_default(),
                            failed.code
                        );
                        let source: Box<dyn std::error::Error + Send + Sync> = detail.clone().into();
                        refused.push((*message, QueueError { detail, source }));
                    }
                }
                Err(e) => {
                    let detail = DisplayErrorContext(&e).to_string();
                    for message in batch {
                        let source: Box<dyn std::error::Error + Send + Sync> = detail.clone().into();
                        refused.push((*message, QueueError { detail: detail.clone(), source }));
                    }
                }
            }
        }
        refused
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
