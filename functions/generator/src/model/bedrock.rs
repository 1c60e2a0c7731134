//! Amazon Bedrock `ConverseStream`, authenticated by the function's IAM role.

use super::{ModelError, ModelProvider, Prompt, TokenStream};
use aws_sdk_bedrockruntime::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::primitives::event_stream::EventReceiver;
use aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ContentBlockDelta, ConversationRole, ConverseStreamOutput, InferenceConfiguration, Message,
    SystemContentBlock,
};
use chat_core::Role;
use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use std::sync::Arc;
use tracing::{info, warn};

/// Settings of the Bedrock provider.
#[derive(Debug, Clone)]
pub struct BedrockSettings {
    /// A model or inference-profile id, e.g. `anthropic.claude-3-5-haiku-20241022-v1:0`.
    pub model: String,
    /// Sampling temperature; the model's default when unset.
    pub temperature: Option<f32>,
    /// Longest reply, in tokens.
    pub max_tokens: u32,
}

/// The Bedrock provider.
#[derive(Clone)]
pub struct Bedrock {
    client: aws_sdk_bedrockruntime::Client,
    settings: Arc<BedrockSettings>,
}

impl Bedrock {
    /// A provider over `config`. The SDK's own retries are off: [`super::Model`] retries, and
    /// also the throttling Bedrock reports inside an open stream.
    pub fn new(config: &aws_config::SdkConfig, settings: BedrockSettings) -> Bedrock {
        let config = aws_sdk_bedrockruntime::config::Builder::from(config)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .build();
        Bedrock { client: aws_sdk_bedrockruntime::Client::from_conf(config), settings: Arc::new(settings) }
    }

    async fn start(self, prompt: Arc<Prompt>) -> Result<TokenStream, ModelError> {
        let mut inference = InferenceConfiguration::builder().max_tokens(self.settings.max_tokens as i32);
        if let Some(temperature) = self.settings.temperature {
            inference = inference.temperature(temperature);
        }
        let output = self
            .client
            .converse_stream()
            .model_id(&self.settings.model)
            .set_system(prompt.system.clone().map(|s| vec![SystemContentBlock::Text(s)]))
            .set_messages(Some(messages(&prompt)?))
            .inference_config(inference.build())
            .send()
            .await
            .map_err(|e| sdk_error(&e, |service| service.code().map(str::to_owned)))?;
        let reading = Reading { events: output.stream, finished: false };
        Ok(stream::unfold(reading, Reading::next).boxed())
    }
}

impl ModelProvider for Bedrock {
    fn open(&self, prompt: Arc<Prompt>) -> BoxFuture<'static, Result<TokenStream, ModelError>> {
        Box::pin(self.clone().start(prompt))
    }
}

/// Converse wants user and assistant strictly alternating, starting with the user, with no empty
/// text and no trailing whitespace on a final assistant message (a resumed reply). A turn whose
/// reply failed leaves two user messages in a row: they are joined.
fn messages(prompt: &Prompt) -> Result<Vec<Message>, ModelError> {
    let mut merged: Vec<(Role, String)> = Vec::new();
    for (role, text) in prompt.with_resumed_reply() {
        if text.trim().is_empty() || (merged.is_empty() && role == Role::Assistant) {
            continue;
        }
        match merged.last_mut() {
            Some((last, joined)) if *last == role => {
                joined.push_str("\n\n");
                joined.push_str(&text);
            }
            _ => merged.push((role, text)),
        }
    }
    if let Some((Role::Assistant, text)) = merged.last_mut() {
        *text = text.trim_end().to_owned();
    }
    merged
        .into_iter()
        .map(|(role, text)| {
            let role = match role {
                Role::User => ConversationRole::User,
                Role::Assistant => ConversationRole::Assistant,
            };
            Message::builder()
                .role(role)
                .content(ContentBlock::Text(text))
                .build()
                .map_err(|e| ModelError::fatal(format!("cannot build the Bedrock request: {e}")))
        })
        .collect()
}

/// The code of an exception inside the stream: these arrive as variants without error metadata.
fn stream_error_code(error: &ConverseStreamOutputError) -> Option<String> {
    let code = match error {
        ConverseStreamOutputError::ThrottlingException(_) => "ThrottlingException",
        ConverseStreamOutputError::ServiceUnavailableException(_) => "ServiceUnavailableException",
        ConverseStreamOutputError::InternalServerException(_) => "InternalServerException",
        ConverseStreamOutputError::ModelStreamErrorException(_) => "ModelStreamErrorException",
        ConverseStreamOutputError::ValidationException(_) => "ValidationException",
        other => return other.code().map(str::to_owned),
    };
    Some(code.to_owned())
}

/// The client-facing error for an SDK failure; the details go to the log.
fn sdk_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    err: &SdkError<E, R>,
    code_of: impl Fn(&E) -> Option<String>,
) -> ModelError {
    match err {
        SdkError::ServiceError(service) => {
            let error = service.err();
            let code = code_of(error).unwrap_or_else(|| "unknown".to_owned());
            let code = code.as_str();
            warn!(code, message = error.message().unwrap_or(""), "Bedrock refused");
            match code {
                "ThrottlingException" | "ServiceQuotaExceededException" => {
                    ModelError::retryable("Bedrock is throttling requests")
                }
                "ServiceUnavailableException"
                | "InternalServerException"
                | "ModelNotReadyException"
                | "ModelTimeoutException"
                | "ModelStreamErrorException" => ModelError::retryable(format!("Bedrock is unavailable ({code})")),
                "AccessDeniedException" => ModelError::fatal(
                    "Bedrock denied access to the model; check the function's IAM role and the model's access",
                ),
                "ResourceNotFoundException" => {
                    ModelError::fatal("Bedrock does not know this model; check LLM_MODEL")
                }
                _ => ModelError::fatal(format!("Bedrock rejected the request ({code})")),
            }
        }
        other => {
            warn!(error = ?other, "cannot reach Bedrock");
            ModelError::retryable("could not reach Bedrock")
        }
    }
}

struct Reading {
    events: EventReceiver<ConverseStreamOutput, ConverseStreamOutputError>,
    finished: bool,
}

impl Reading {
    async fn next(mut self) -> Option<(Result<String, ModelError>, Reading)> {
        loop {
            match self.events.recv().await {
                Ok(Some(ConverseStreamOutput::ContentBlockDelta(event))) => {
                    if let Some(ContentBlockDelta::Text(text)) = event.delta {
                        if !text.is_empty() {
                            return Some((Ok(text), self));
                        }
                    }
                }
                Ok(Some(ConverseStreamOutput::MessageStop(event))) => {
                    self.finished = true;
                    let reason = event.stop_reason.as_str().to_owned();
                    if reason != "end_turn" {
                        info!(stop_reason = %reason, "the model stopped early");
                    }
                }
                Ok(Some(ConverseStreamOutput::Metadata(event))) => {
                    if let Some(usage) = event.usage {
                        info!(
                            input_tokens = usage.input_tokens,
                            output_tokens = usage.output_tokens,
                            "model usage"
                        );
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) if self.finished => return None,
                Ok(None) => {
                    let err = ModelError::retryable("the model's stream ended before the reply was complete");
                    return Some((Err(err), Reading { finished: true, ..self }));
                }
                Err(err) if self.finished => {
                    warn!(error = ?err, "Bedrock's stream broke after the reply was complete");
                    return None;
                }
                Err(err) => {
                    let err = sdk_error(&err, stream_error_code);
                    return Some((Err(err), Reading { finished: true, ..self }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_alternate_and_a_resumed_reply_has_no_trailing_space() {
        let prompt = Prompt {
            system: None,
            messages: vec![
                (Role::Assistant, "orphan".to_owned()),
                (Role::User, "first".to_owned()),
                (Role::User, "again".to_owned()),
                (Role::Assistant, String::new()),
                (Role::User, "now".to_owned()),
            ],
            resumed: vec!["Partial ".to_owned()],
        };
        let built = messages(&prompt).unwrap();
        let shape: Vec<(String, String)> = built
            .iter()
            .map(|m| (m.role.as_str().to_owned(), m.content[0].as_text().unwrap().clone()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("user".to_owned(), "first\n\nagain\n\nnow".to_owned()),
                ("assistant".to_owned(), "Partial".to_owned()),
            ]
        );
    }
}
