//! Amazon Bedrock `ConverseStream`, authenticated by the function's IAM role.

use super::{Exchange, ModelError, ModelProvider, Output, Prompt, TokenStream, ToolCall};
use aws_sdk_bedrockruntime::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::primitives::event_stream::EventReceiver;
use aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError;
use aws_sdk_bedrockruntime::types::{
    CachePointBlock, CachePointType, ContentBlock, ContentBlockDelta, ContentBlockStart, ConversationRole,
    ConverseStreamOutput, InferenceConfiguration, Message, SystemContentBlock, Tool, ToolConfiguration,
    ToolInputSchema, ToolResultBlock, ToolResultContentBlock, ToolResultStatus, ToolSpecification,
    ToolUseBlock,
};
use aws_smithy_types::{Document, Number};
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
    /// Whether requests mark their stable prefix for Bedrock's prompt cache
    /// (`BEDROCK_CACHE_POINTS`).
    pub cache_points: CachePoints,
}

/// Whether a request carries `cachePoint` blocks (`BEDROCK_CACHE_POINTS`): after the system
/// prompt and after the history before this turn's message, so the next call (a tool step, or
/// the next turn) reads that prefix from the cache instead of paying for it in full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CachePoints {
    /// On for the models known to support prompt caching ([`CACHING_MODELS`]), off otherwise:
    /// Bedrock refuses a cache point sent to a model without it.
    #[default]
    Auto,
    /// On whatever the model (one missing from the list, or a newer version).
    On,
    /// Never.
    Off,
}

impl std::str::FromStr for CachePoints {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "auto" => Ok(CachePoints::Auto),
            "on" => Ok(CachePoints::On),
            "off" => Ok(CachePoints::Off),
            other => Err(format!("is {other:?}; use \"auto\", \"on\" or \"off\"")),
        }
    }
}

/// The model families Bedrock caches prompts for, matched anywhere in the id (so a
/// cross-region inference profile such as `us.anthropic.claude-3-7-sonnet-…` matches), with
/// the fewest tokens a cache checkpoint's prefix must hold to be cached.
pub const CACHING_MODELS: &[(&str, usize)] = &[
    ("anthropic.claude-3-5-haiku", 2048),
    ("anthropic.claude-3-7-sonnet", 1024),
    ("anthropic.claude-sonnet-4", 1024),
    ("anthropic.claude-opus-4", 1024),
    ("amazon.nova-micro", 1000),
    ("amazon.nova-lite", 1000),
    ("amazon.nova-pro", 1000),
];

/// The prefix a cache point is worth placing after: at least this many tokens.
const DEFAULT_CACHE_MINIMUM: usize = 1024;

impl CachePoints {
    /// For `model`: the fewest tokens a cached prefix must hold, or `None` when requests to it
    /// carry no cache points.
    pub fn minimum_tokens(self, model: &str) -> Option<usize> {
        let known = CACHING_MODELS.iter().find(|(family, _)| model.contains(family)).map(|(_, min)| *min);
        match self {
            CachePoints::Off => None,
            CachePoints::Auto => known,
            CachePoints::On => Some(known.unwrap_or(DEFAULT_CACHE_MINIMUM)),
        }
    }
}

/// Where a request's cache points go: after a prefix that may reach the model's minimum. A
/// token is at least a byte, so a prefix of fewer bytes than the minimum cannot be cached and
/// gets none (it would be harmless, and useless).
#[derive(Debug, Clone, Copy)]
struct CacheRule {
    minimum_tokens: usize,
}

impl CacheRule {
    fn worth(self, prefix_bytes: usize) -> bool {
        prefix_bytes >= self.minimum_tokens
    }
}

fn cache_point() -> Result<CachePointBlock, ModelError> {
    CachePointBlock::builder()
        .r#type(CachePointType::Default)
        .build()
        .map_err(|e| ModelError::fatal(format!("cannot build the Bedrock request: {e}")))
}

/// The Bedrock provider.
#[derive(Clone)]
pub struct Bedrock {
    client: aws_sdk_bedrockruntime::Client,
    settings: Arc<BedrockSettings>,
    cache: Option<CacheRule>,
}

impl Bedrock {
    /// A provider over `config`. The SDK's own retries are off: [`super::Model`] retries, and
    /// also the throttling Bedrock reports inside an open stream.
    pub fn new(config: &aws_config::SdkConfig, settings: BedrockSettings) -> Bedrock {
        let config = aws_sdk_bedrockruntime::config::Builder::from(config)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .build();
        let cache = settings
            .cache_points
            .minimum_tokens(&settings.model)
            .map(|minimum_tokens| CacheRule { minimum_tokens });
        Bedrock {
            client: aws_sdk_bedrockruntime::Client::from_conf(config),
            settings: Arc::new(settings),
            cache,
        }
    }

    async fn start(self, prompt: Arc<Prompt>) -> Result<TokenStream, ModelError> {
        let mut inference = InferenceConfiguration::builder().max_tokens(self.settings.max_tokens as i32);
        if let Some(temperature) = self.settings.temperature {
            inference = inference.temperature(temperature);
        }
        let tools = tool_config(&prompt)?;
        let output = self
            .client
            .converse_stream()
            .model_id(&self.settings.model)
            .set_system(system(&prompt, self.cache)?)
            .set_messages(Some(messages(&prompt, self.cache)?))
            .set_tool_config(tools)
            .inference_config(inference.build())
            .send()
            .await
            .map_err(|e| sdk_error(&e, |service| service.code().map(str::to_owned)))?;
        let reading = Reading { events: output.stream, finished: false, call: None };
        Ok(stream::unfold(reading, Reading::next).boxed())
    }
}

impl ModelProvider for Bedrock {
    fn open(&self, prompt: Arc<Prompt>) -> BoxFuture<'static, Result<TokenStream, ModelError>> {
        Box::pin(self.clone().start(prompt))
    }
}

/// The offered tools, as Converse's `toolConfig`; `None` when there are none.
fn tool_config(prompt: &Prompt) -> Result<Option<ToolConfiguration>, ModelError> {
    // Converse has no "none" tool choice: a model that must answer gets no tools, and the
    // earlier steps as text (see `messages`).
    if prompt.tools.is_empty() || prompt.must_answer {
        return Ok(None);
    }
    let bad = |e: aws_sdk_bedrockruntime::error::BuildError| {
        ModelError::fatal(format!("cannot build the Bedrock request: {e}"))
    };
    let mut config = ToolConfiguration::builder();
    for tool in &prompt.tools {
        let spec = ToolSpecification::builder()
            .name(&tool.name)
            .description(&tool.description)
            .input_schema(ToolInputSchema::Json(document(&tool.parameters)))
            .build()
            .map_err(bad)?;
        config = config.tools(Tool::ToolSpec(spec));
    }
    config.build().map(Some).map_err(bad)
}

/// The bytes of the offered tools, which come before the system prompt in the cached prefix.
fn tool_bytes(prompt: &Prompt) -> usize {
    if prompt.tools.is_empty() || prompt.must_answer {
        return 0;
    }
    prompt.tools.iter().map(|t| t.name.len() + t.description.len() + t.parameters.to_string().len()).sum()
}

/// The system prompt, with a cache point after it when the tools and it may be long enough.
fn system(prompt: &Prompt, cache: Option<CacheRule>) -> Result<Option<Vec<SystemContentBlock>>, ModelError> {
    let Some(text) = &prompt.system else { return Ok(None) };
    let mut blocks = vec![SystemContentBlock::Text(text.clone())];
    if cache.is_some_and(|rule| rule.worth(tool_bytes(prompt) + text.len())) {
        blocks.push(SystemContentBlock::CachePoint(cache_point()?));
    }
    Ok(Some(blocks))
}

/// A JSON value as the SDK's `Document`.
fn document(value: &serde_json::Value) -> Document {
    use serde_json::Value;
    match value {
        Value::Null => Document::Null,
        Value::Bool(b) => Document::Bool(*b),
        Value::Number(n) => Document::Number(match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Number::PosInt(u),
            (None, Some(i)) => Number::NegInt(i),
            _ => Number::Float(n.as_f64().unwrap_or_default()),
        }),
        Value::String(s) => Document::String(s.clone()),
        Value::Array(items) => Document::Array(items.iter().map(document).collect()),
        Value::Object(map) => Document::Object(map.iter().map(|(k, v)| (k.clone(), document(v))).collect()),
    }
}

/// Converse wants user and assistant strictly alternating, starting with the user, with no empty
/// text and no trailing whitespace on a final assistant message (a resumed reply). A turn whose
/// reply failed leaves two user messages in a row: they are joined. This turn's tool steps
/// follow as content blocks: the model's text and `toolUse`s, then the user's `toolResult`s; or,
/// when the model must answer without tools (Converse refuses those blocks without a
/// `toolConfig`), as text saying what was called and what it answered.
///
/// With a cache rule, the message before the one that holds this turn's message (the history
/// every later call of the conversation repeats) ends with a cache point.
fn messages(prompt: &Prompt, cache: Option<CacheRule>) -> Result<Vec<Message>, ModelError> {
    type Blocks = Vec<(ConversationRole, Vec<ContentBlock>)>;
    fn push(merged: &mut Blocks, role: ConversationRole, block: ContentBlock) {
        match merged.last_mut() {
            Some((last, blocks)) if *last == role => match (blocks.last_mut(), block) {
                (Some(ContentBlock::Text(joined)), ContentBlock::Text(text)) => {
                    joined.push_str("\n\n");
                    joined.push_str(&text);
                }
                (_, block) => blocks.push(block),
            },
            _ => merged.push((role, vec![block])),
        }
    }
    let mut merged: Blocks = Vec::new();
    let mut started = false;
    for (role, text) in &prompt.messages {
        if text.trim().is_empty() || (!started && *role == Role::Assistant) {
            continue;
        }
        started = true;
        let role = match role {
            Role::User => ConversationRole::User,
            Role::Assistant => ConversationRole::Assistant,
        };
        push(&mut merged, role, ContentBlock::Text(text.clone()));
    }
    // This turn's message is the last of `prompt.messages`: it is in the last message so far.
    let current = merged.len().checked_sub(1);
    if let (Some(rule), Some(current @ 1..)) = (cache, current) {
        let text_bytes = |blocks: &[ContentBlock]| {
            blocks.iter().filter_map(|b| b.as_text().ok()).map(String::len).sum::<usize>()
        };
        let history: usize = merged[..current].iter().map(|(_, blocks)| text_bytes(blocks)).sum();
        let prefix = tool_bytes(prompt) + prompt.system.as_ref().map_or(0, String::len) + history;
        if rule.worth(prefix) {
            merged[current - 1].1.push(ContentBlock::CachePoint(cache_point()?));
        }
    }
    let bad = |e: aws_sdk_bedrockruntime::error::BuildError| {
        ModelError::fatal(format!("cannot build the Bedrock request: {e}"))
    };
    for exchange in &prompt.exchanges {
        match exchange {
            Exchange::Assistant { text, calls } => {
                if !text.trim().is_empty() {
                    push(
                        &mut merged,
                        ConversationRole::Assistant,
                        ContentBlock::Text(text.trim_end().to_owned()),
                    );
                }
                for call in calls {
                    if prompt.must_answer {
                        let said = format!("[called {} with {}]", call.name, call.arguments);
                        push(&mut merged, ConversationRole::Assistant, ContentBlock::Text(said));
                        continue;
                    }
                    let input = serde_json::from_str(&call.arguments).unwrap_or(serde_json::Value::Null);
                    let block = ToolUseBlock::builder()
                        .tool_use_id(&call.id)
                        .name(&call.name)
                        .input(document(&input))
                        .build()
                        .map_err(bad)?;
                    push(&mut merged, ConversationRole::Assistant, ContentBlock::ToolUse(block));
                }
            }
            Exchange::ToolResult { name, content, is_error, .. } if prompt.must_answer => {
                let outcome = if *is_error { "failed" } else { "answered" };
                push(
                    &mut merged,
                    ConversationRole::User,
                    ContentBlock::Text(format!("[{name} {outcome}: {content}]")),
                );
            }
            Exchange::ToolResult { call_id, content, is_error, .. } => {
                let status = if *is_error { ToolResultStatus::Error } else { ToolResultStatus::Success };
                let block = ToolResultBlock::builder()
                    .tool_use_id(call_id)
                    .content(ToolResultContentBlock::Text(content.clone()))
                    .status(status)
                    .build()
                    .map_err(bad)?;
                push(&mut merged, ConversationRole::User, ContentBlock::ToolResult(block));
            }
        }
    }
    if let Some(resumed) = prompt.resumed_text() {
        let resumed = resumed.trim_end().to_owned();
        if !resumed.is_empty() {
            push(&mut merged, ConversationRole::Assistant, ContentBlock::Text(resumed));
        }
    }
    merged
        .into_iter()
        .map(|(role, blocks)| Message::builder().role(role).set_content(Some(blocks)).build().map_err(bad))
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
    /// The tool call whose block is streaming: its id, name and input so far.
    call: Option<ToolCall>,
}

impl Reading {
    async fn next(mut self) -> Option<(Result<Output, ModelError>, Reading)> {
        loop {
            match self.events.recv().await {
                Ok(Some(ConverseStreamOutput::ContentBlockStart(event))) => {
                    if let Some(ContentBlockStart::ToolUse(start)) = event.start {
                        self.call = Some(ToolCall {
                            id: start.tool_use_id,
                            name: start.name,
                            arguments: String::new(),
                        });
                    }
                }
                Ok(Some(ConverseStreamOutput::ContentBlockDelta(event))) => match event.delta {
                    Some(ContentBlockDelta::Text(text)) if !text.is_empty() => {
                        return Some((Ok(Output::Token(text)), self));
                    }
                    Some(ContentBlockDelta::ToolUse(delta)) => {
                        if let Some(call) = &mut self.call {
                            call.arguments.push_str(&delta.input);
                        }
                    }
                    _ => {}
                },
                Ok(Some(ConverseStreamOutput::ContentBlockStop(_))) => {
                    if let Some(mut call) = self.call.take() {
                        if call.arguments.trim().is_empty() {
                            call.arguments = "{}".to_owned();
                        }
                        return Some((Ok(Output::ToolCall(call)), self));
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
                        let count = |n: i32| u64::try_from(n).unwrap_or(0);
                        let usage = chat_core::Usage {
                            input: count(usage.input_tokens),
                            output: count(usage.output_tokens),
                            cache_read: usage.cache_read_input_tokens.map_or(0, count),
                            cache_write: usage.cache_write_input_tokens.map_or(0, count),
                        };
                        info!(
                            input = usage.input,
                            output = usage.output,
                            cache_read = usage.cache_read,
                            "model usage"
                        );
                        return Some((Ok(Output::Usage(usage)), self));
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) if self.finished => return None,
                Ok(None) => {
                    let err = ModelError::retryable("the model's stream ended before the reply was complete");
                    return Some((Err(err), Reading { finished: true, call: None, ..self }));
                }
                Err(err) if self.finished => {
                    warn!(error = ?err, "Bedrock's stream broke after the reply was complete");
                    return None;
                }
                Err(err) => {
                    let err = sdk_error(&err, stream_error_code);
                    return Some((Err(err), Reading { finished: true, call: None, ..self }));
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
            ..Prompt::default()
        };
        let built = messages(&prompt, None).unwrap();
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

#[cfg(test)]
mod tool_tests {
    use super::*;
    use crate::llm::ToolSpec;

    #[test]
    fn a_model_that_must_answer_gets_no_tools_and_the_steps_as_text() {
        let call =
            ToolCall { id: "t1".to_owned(), name: "calculator".to_owned(), arguments: "{}".to_owned() };
        let prompt = Prompt {
            messages: vec![(Role::User, "6*7?".to_owned())],
            exchanges: vec![
                Exchange::Assistant { text: "Checking.".to_owned(), calls: vec![call] },
                Exchange::ToolResult {
                    call_id: "t1".to_owned(),
                    name: "calculator".to_owned(),
                    content: "42".to_owned(),
                    is_error: false,
                },
            ],
            tools: vec![ToolSpec {
                name: "calculator".to_owned(),
                description: "d".to_owned(),
                parameters: serde_json::json!({"type": "object"}),
            }],
            must_answer: true,
            ..Prompt::default()
        };
        assert!(tool_config(&prompt).unwrap().is_none());
        let built = messages(&prompt, None).unwrap();
        let texts: Vec<(String, Vec<String>)> = built
            .iter()
            .map(|m| {
                let texts = m.content.iter().map(|b| b.as_text().expect("text only").clone()).collect();
                (m.role.as_str().to_owned(), texts)
            })
            .collect();
        assert_eq!(
            texts,
            vec![
                ("user".to_owned(), vec!["6*7?".to_owned()]),
                ("assistant".to_owned(), vec!["Checking.\n\n[called calculator with {}]".to_owned()]),
                ("user".to_owned(), vec!["[calculator answered: 42]".to_owned()]),
            ]
        );
        let offered = Prompt { must_answer: false, ..prompt };
        assert!(tool_config(&offered).unwrap().is_some());
    }
}
