//! Any OpenAI-compatible `/chat/completions` endpoint with `stream: true`: OpenAI, vLLM, Ollama,
//! llama.cpp server, Gemini's compatible endpoint and the like.

use super::{Exchange, ModelError, ModelProvider, Output, Prompt, TokenStream, ToolCall};
use bytes::Bytes;
use chat_core::Role;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Settings of an OpenAI-compatible provider.
#[derive(Clone)]
pub struct OpenAiSettings {
    /// Base URL up to and including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Sent as a bearer token when set; never logged.
    pub api_key: Option<String>,
    /// The model name, e.g. `gpt-4o-mini`.
    pub model: String,
    /// Sampling temperature; left to the server when unset.
    pub temperature: Option<f32>,
    /// Longest reply, in tokens.
    pub max_tokens: u32,
    /// The request field that carries it: `max_tokens` (most servers), or
    /// `max_completion_tokens` (OpenAI's reasoning and newer models refuse `max_tokens`).
    pub max_tokens_field: &'static str,
    /// Connecting (TCP and TLS) may take this long.
    pub connect_timeout: Duration,
    /// Ask for the call's token usage (`stream_options.include_usage`; `OPENAI_STREAM_USAGE`):
    /// OpenAI reports none on a stream otherwise. Off for servers that refuse the field.
    pub stream_usage: bool,
}

impl std::fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[set]"))
            .field("model", &self.model)
            .field("temperature", &self.temperature)
            .field("max_tokens", &self.max_tokens)
            .field("stream_usage", &self.stream_usage)
            .finish()
    }
}

use chat_core::config::ConfigError;
use chat_runtime::https::TlsSetupError;

type HttpClient = Client<chat_runtime::https::Connector, Full<Bytes>>;

/// Loads the API key again (from its secret), for when the provider rejects the one in use:
/// a rotated key is picked up without waiting for new instances.
pub type KeyLoader = Arc<dyn Fn() -> BoxFuture<'static, Result<String, ConfigError>> + Send + Sync>;

/// The provider cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `base_url` does not make a URL.
    #[error("is not a valid URL ({0})")]
    InvalidUrl(#[from] http::uri::InvalidUri),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// Reloads at most this often, so a key that is simply wrong does not hammer the secret store.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// The key in use and how to reload it.
struct ApiKey {
    current: std::sync::RwLock<Option<String>>,
    loader: Option<KeyLoader>,
    last_reload: std::sync::Mutex<Option<std::time::Instant>>,
}

/// An OpenAI-compatible streaming chat provider.
#[derive(Clone)]
pub struct OpenAi {
    client: HttpClient,
    url: http::Uri,
    settings: Arc<OpenAiSettings>,
    key: Arc<ApiKey>,
}

impl OpenAi {
    /// A provider for `settings`. HTTP/1.1 over hyper, TLS by rustls with the aws-lc-rs the AWS
    /// SDK already links, trusting the system's root certificates.
    pub fn new(settings: OpenAiSettings) -> Result<OpenAi, SetupError> {
        let url = format!("{}/chat/completions", settings.base_url.trim_end_matches('/'));
        let url: http::Uri = url.parse()?;
        let https =
            chat_runtime::https::connector(settings.connect_timeout, url.scheme_str() == Some("http"))?;
        let client = Client::builder(TokioExecutor::new()).build(https);
        let key = ApiKey {
            current: std::sync::RwLock::new(settings.api_key.clone()),
            loader: None,
            last_reload: std::sync::Mutex::new(None),
        };
        Ok(OpenAi { client, url, settings: Arc::new(settings), key: Arc::new(key) })
    }

    /// Reloads the key with `loader` when the provider rejects it (HTTP 401 or 403).
    pub fn with_key_loader(mut self, loader: KeyLoader) -> OpenAi {
        let current = self.key.current.read().expect("key lock").clone();
        self.key = Arc::new(ApiKey {
            current: std::sync::RwLock::new(current),
            loader: Some(loader),
            last_reload: std::sync::Mutex::new(None),
        });
        self
    }

    fn current_key(&self) -> Option<String> {
        self.key.current.read().expect("key lock").clone()
    }

    /// After a rejected key: loads it again (at most every [`KEY_RELOAD_INTERVAL`]); true when
    /// a different key is now in use, so another attempt may succeed.
    async fn reload_key(&self) -> bool {
        let Some(loader) = &self.key.loader else { return false };
        {
            let mut last = self.key.last_reload.lock().expect("reload lock");
            if last.is_some_and(|at| at.elapsed() < KEY_RELOAD_INTERVAL) {
                return false;
            }
            *last = Some(std::time::Instant::now());
        }
        match loader().await {
            Ok(key) => {
                let mut current = self.key.current.write().expect("key lock");
                let changed = current.as_deref() != Some(key.as_str());
                *current = Some(key);
                if changed {
                    info!("the API key was rejected; a new one was loaded from its secret");
                }
                changed
            }
            Err(err) => {
                warn!(error = %err, "cannot reload the API key");
                false
            }
        }
    }

    /// The request body for `prompt`.
    pub fn request_body(&self, prompt: &Prompt) -> Value {
        let resumed = prompt.resumed_text();
        let mut messages = Vec::new();
        if let Some(system) = &prompt.system {
            messages.push(request::Message::System { content: system });
        }
        for (role, content) in &prompt.messages {
            messages.push(match role {
                Role::User => request::Message::User { content },
                Role::Assistant => request::Message::Assistant { content: Some(content), tool_calls: None },
            });
        }
        for exchange in &prompt.exchanges {
            messages.push(match exchange {
                Exchange::Assistant { text, calls } => request::Message::Assistant {
                    content: Some(text.as_str()).filter(|text| !text.is_empty()),
                    tool_calls: Some(calls.iter().map(request::ToolCall::from).collect()),
                },
                Exchange::ToolResult { call_id, content, .. } => {
                    request::Message::Tool { tool_call_id: call_id, content }
                }
            });
        }
        if let Some(resumed) = &resumed {
            messages.push(request::Message::Assistant { content: Some(resumed), tool_calls: None });
        }
        let settings = &*self.settings;
        let tools =
            (!prompt.tools.is_empty()).then(|| prompt.tools.iter().map(request::Tool::from).collect());
        let max_completion = settings.max_tokens_field == "max_completion_tokens";
        let body = request::ChatRequest {
            model: &settings.model,
            messages,
            stream: true,
            tool_choice: (tools.is_some() && prompt.must_answer).then_some("none"),
            tools,
            max_tokens: (!max_completion).then_some(settings.max_tokens),
            max_completion_tokens: max_completion.then_some(settings.max_tokens),
            stream_options: settings.stream_usage.then_some(request::StreamOptions { include_usage: true }),
            temperature: settings.temperature.map(f64::from),
        };
        serde_json::to_value(body).expect("a request serialises")
    }

    async fn start(self, prompt: Arc<Prompt>) -> Result<TokenStream, ModelError> {
        let body = Bytes::from(self.request_body(&prompt).to_string());
        let mut request = http::Request::post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream");
        if let Some(key) = self.current_key() {
            let mut value = http::HeaderValue::try_from(format!("Bearer {key}"))
                .map_err(|_| ModelError::fatal("the API key is not a valid header value"))?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let request =
            request.body(Full::new(body)).map_err(|e| ModelError::fatal(format!("bad request: {e}")))?;
        let response = self.client.request(request).await.map_err(|e| transport_error(&e))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = read_prefix(response.into_body(), 8 * 1024).await;
            warn!(status = status.as_u16(), detail = %self.upstream_detail(&body), "the model provider refused the request");
            let mut err = status_error(status.as_u16());
            err.retry_after = retry_after;
            if matches!(status.as_u16(), 401 | 403) && self.reload_key().await {
                err.retryable = true; // with the new key
                err.retry_after = Some(Duration::ZERO);
            }
            return Err(err);
        }
        let state = Reading {
            body: BodyDataStream::new(response.into_body()).boxed(),
            decoder: SseDecoder::default(),
            pending: VecDeque::new(),
            calls: Vec::new(),
            finished: false,
            done: false,
            provider: self,
        };
        Ok(stream::unfold(state, Reading::next).boxed())
    }

    /// What an upstream error body says (its `error` object's type, code and message), with the
    /// API key removed and the length bounded: for the logs, never for the client.
    fn upstream_detail(&self, body: &[u8]) -> String {
        let text = match serde_json::from_slice::<Value>(body) {
            Ok(value) => {
                let error = value.get("error").unwrap_or(&value);
                let field = |name: &str| error.get(name).map(|v| v.to_string()).unwrap_or_default();
                format!("type={} code={} message={}", field("type"), field("code"), field("message"))
            }
            Err(_) => String::from_utf8_lossy(body).into_owned(),
        };
        let text = match self.current_key() {
            Some(key) if !key.is_empty() => text.replace(key.as_str(), "[redacted]"),
            _ => text,
        };
        text.chars().take(300).collect()
    }
}

impl ModelProvider for OpenAi {
    fn open(&self, prompt: Arc<Prompt>) -> BoxFuture<'static, Result<TokenStream, ModelError>> {
        Box::pin(self.clone().start(prompt))
    }
}

fn transport_error(err: &hyper_util::client::legacy::Error) -> ModelError {
    warn!(error = ?err, "cannot reach the model provider");
    ModelError::retryable("could not reach the model provider")
}

/// The client-facing error for an HTTP status.
fn status_error(status: u16) -> ModelError {
    match status {
        429 => ModelError::retryable("the model provider is rate limiting requests (HTTP 429)"),
        408 | 500..=599 => ModelError::retryable(format!("the model provider is unavailable (HTTP {status})")),
        401 | 403 => ModelError::fatal(format!(
            "the model provider rejected the credentials (HTTP {status}); check the API key setting"
        )),
        404 => ModelError::fatal(
            "the model provider does not know this model or endpoint (HTTP 404); check LLM_MODEL and OPENAI_BASE_URL",
        ),
        _ => ModelError::fatal(format!("the model provider rejected the request (HTTP {status})")),
    }
}

async fn read_prefix(mut incoming: hyper::body::Incoming, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match incoming.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    body.extend_from_slice(data);
                }
            }
            _ => break,
        }
    }
    body.truncate(limit);
    body
}

/// Reading one streamed reply.
struct Reading {
    body: BoxStream<'static, Result<Bytes, hyper::Error>>,
    decoder: SseDecoder,
    pending: VecDeque<Result<Output, ModelError>>,
    /// Tool calls being streamed, by their index: id, name and the arguments so far.
    calls: Vec<ToolCall>,
    /// A `finish_reason` or `[DONE]` arrived: the reply is complete.
    finished: bool,
    /// Nothing more will be read.
    done: bool,
    provider: OpenAi,
}

impl Reading {
    async fn next(mut self) -> Option<(Result<Output, ModelError>, Reading)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                if item.is_err() {
                    self.pending.clear();
                    self.done = true;
                }
                return Some((item, self));
            }
            if self.done {
                return None;
            }
            match self.body.next().await {
                Some(Ok(bytes)) => match self.decoder.feed(&bytes) {
                    Ok(events) => events.iter().for_each(|data| self.handle(data)),
                    Err(err) => self.pending.push_back(Err(err)),
                },
                Some(Err(err)) => {
                    self.done = true;
                    if !self.finished {
                        warn!(error = %err, "the model's stream broke");
                        return Some((
                            Err(ModelError::retryable(
                                "the connection to the model provider was lost mid-reply",
                            )),
                            self,
                        ));
                    }
                }
                None => {
                    match self.decoder.finish() {
                        Ok(events) => events.iter().for_each(|data| self.handle(data)),
                        Err(err) => self.pending.push_back(Err(err)),
                    }
                    if !self.finished && self.pending.iter().all(Result::is_ok) {
                        self.pending.push_back(Err(ModelError::retryable(
                            "the model's stream ended before the reply was complete",
                        )));
                    }
                    self.done = true;
                }
            }
        }
    }

    /// The streamed tool calls, complete: each goes out once, with an id (some servers omit it).
    fn emit_calls(&mut self) {
        for (index, mut call) in std::mem::take(&mut self.calls).into_iter().enumerate() {
            if call.name.is_empty() {
                continue;
            }
            if call.id.is_empty() {
                call.id = format!("call_{index}");
            }
            self.pending.push_back(Ok(Output::ToolCall(call)));
        }
    }

    /// One event's data: a chunk, an error object, or `[DONE]`.
    fn handle(&mut self, data: &str) {
        if self.done || self.pending.iter().any(Result::is_err) {
            return;
        }
        if data.trim() == "[DONE]" {
            self.finished = true;
            self.done = true;
            self.emit_calls();
            return;
        }
        let chunk: wire::Chunk = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(err) => {
                warn!(error = %err, len = data.len(), "the model provider sent a chunk that does not parse");
                self.pending.push_back(Err(ModelError::fatal("the model provider sent a malformed chunk")));
                return;
            }
        };
        if let Some(error) = chunk.error {
            self.pending.push_back(Err(self.reported_error(&error)));
            return;
        }
        let Some(choices) = chunk.choices else {
            self.pending.push_back(Err(ModelError::fatal("the model provider sent a malformed chunk")));
            return;
        };
        // The call's usage comes in a chunk of its own, without choices (servers that also put
        // running totals on every chunk put the final one there too).
        if let Some(usage) = chunk.usage.filter(|_| choices.is_empty()).as_ref().and_then(usage_of) {
            info!(input = usage.input, output = usage.output, cache_read = usage.cache_read, "model usage");
            self.pending.push_back(Ok(Output::Usage(usage)));
        }
        // Usage-only chunks have no choices; only the first choice is the reply.
        let Some(choice) = choices.into_iter().find(|c| c.index.unwrap_or(0) == 0) else { return };
        let delta = choice.delta.unwrap_or_default();
        if let Some(content) = delta.content.filter(|c| !c.is_empty()) {
            self.pending.push_back(Ok(Output::Token(content)));
        }
        // A tool call arrives in pieces: its id and name first, then its arguments a few
        // characters at a time, keyed by the call's index.
        for piece in delta.tool_calls.into_iter().flatten() {
            let index = piece.index.unwrap_or(0) as usize;
            if index > 64 {
                self.pending
                    .push_back(Err(ModelError::fatal("the model provider sent a malformed tool call")));
                return;
            }
            if self.calls.len() <= index {
                self.calls.resize_with(index + 1, || ToolCall {
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                });
            }
            let call = &mut self.calls[index];
            if let Some(id) = piece.id {
                call.id = id;
            }
            let function = piece.function.unwrap_or_default();
            if let Some(name) = function.name {
                call.name.push_str(&name);
            }
            if let Some(arguments) = function.arguments {
                call.arguments.push_str(&arguments);
            }
        }
        if let Some(reason) = choice.finish_reason {
            self.finished = true;
            self.emit_calls();
            if !matches!(reason.as_str(), "stop" | "tool_calls") {
                info!(finish_reason = reason, "the model stopped early");
            }
        }
    }

    /// The error a server reported mid-stream: retried when it says the server is busy.
    fn reported_error(&self, error: &Value) -> ModelError {
        let detail = self.provider.upstream_detail(error.to_string().as_bytes());
        warn!(%detail, "the model provider reported an error mid-stream");
        let overloaded = ["rate_limit", "server_error", "overloaded", "unavailable"]
            .iter()
            .any(|word| error.to_string().to_lowercase().contains(word));
        let message = "the model provider reported an error while replying";
        if overloaded {
            ModelError::retryable(message)
        } else {
            ModelError::fatal(message)
        }
    }
}

/// A `/chat/completions` request, as serde structs.
mod request {
    use crate::llm::{ToolCall as Call, ToolSpec};
    use serde::Serialize;

    #[derive(Debug, Serialize)]
    pub(super) struct ChatRequest<'a> {
        pub model: &'a str,
        pub messages: Vec<Message<'a>>,
        pub stream: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tools: Option<Vec<Tool<'a>>>,
        /// `none` once the model must answer: the tools stay described for the earlier steps.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub tool_choice: Option<&'static str>,
        /// The longest reply, in the field the server takes (`OPENAI_MAX_TOKENS_FIELD`).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_tokens: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub max_completion_tokens: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub stream_options: Option<StreamOptions>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub temperature: Option<f64>,
    }

    /// One message of the conversation, by role.
    #[derive(Debug, Serialize)]
    #[serde(tag = "role", rename_all = "lowercase")]
    pub(super) enum Message<'a> {
        System {
            content: &'a str,
        },
        User {
            content: &'a str,
        },
        /// Text (`null` for a tool step without any), and the calls of a tool step.
        Assistant {
            content: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            tool_calls: Option<Vec<ToolCall<'a>>>,
        },
        /// A tool's answer to a call.
        Tool {
            tool_call_id: &'a str,
            content: &'a str,
        },
    }

    #[derive(Debug, Serialize)]
    pub(super) struct ToolCall<'a> {
        id: &'a str,
        r#type: &'static str,
        function: Function<'a>,
    }

    #[derive(Debug, Serialize)]
    struct Function<'a> {
        name: &'a str,
        arguments: &'a str,
    }

    impl<'a> From<&'a Call> for ToolCall<'a> {
        fn from(call: &'a Call) -> Self {
            ToolCall {
                id: &call.id,
                r#type: "function",
                function: Function { name: &call.name, arguments: &call.arguments },
            }
        }
    }

    /// A tool offered to the model.
    #[derive(Debug, Serialize)]
    pub(super) struct Tool<'a> {
        r#type: &'static str,
        function: FunctionSpec<'a>,
    }

    #[derive(Debug, Serialize)]
    struct FunctionSpec<'a> {
        name: &'a str,
        description: &'a str,
        parameters: &'a serde_json::Value,
    }

    impl<'a> From<&'a ToolSpec> for Tool<'a> {
        fn from(tool: &'a ToolSpec) -> Self {
            Tool {
                r#type: "function",
                function: FunctionSpec {
                    name: &tool.name,
                    description: &tool.description,
                    parameters: &tool.parameters,
                },
            }
        }
    }

    #[derive(Debug, Serialize)]
    pub(super) struct StreamOptions {
        pub include_usage: bool,
    }
}

/// What a streamed chunk (`chat.completion.chunk`) carries, as serde structs. Servers differ in
/// the details, so every field may be missing or null, and a field of another JSON type than
/// OpenAI's counts as missing (a usage count written `12.0` is not a count; it must not fail a
/// finished reply). A chunk is malformed when it does not parse or has no `choices` array.
mod wire {
    use serde::de::{Deserializer, IgnoredAny};
    use serde::Deserialize;

    /// One `data:` event of the stream.
    #[derive(Debug, Deserialize)]
    pub(super) struct Chunk {
        /// An error the server reports instead of a chunk, kept whole (its shape is the
        /// server's) for the log; present even when `null`.
        #[serde(default, deserialize_with = "present")]
        pub error: Option<serde_json::Value>,
        #[serde(default, deserialize_with = "lenient")]
        pub choices: Option<Vec<Choice>>,
        /// The call's token usage, when asked for (`stream_options.include_usage`).
        #[serde(default, deserialize_with = "lenient")]
        pub usage: Option<Usage>,
    }

    #[derive(Debug, Deserialize)]
    pub(super) struct Choice {
        /// Which of the `n` replies; only the first (0, or no index) is read.
        #[serde(default, deserialize_with = "lenient")]
        pub index: Option<u64>,
        #[serde(default, deserialize_with = "lenient")]
        pub delta: Option<Delta>,
        #[serde(default, deserialize_with = "lenient")]
        pub finish_reason: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    pub(super) struct Delta {
        #[serde(default, deserialize_with = "lenient")]
        pub content: Option<String>,
        #[serde(default, deserialize_with = "lenient")]
        pub tool_calls: Option<Vec<ToolCallDelta>>,
    }

    /// A piece of a tool call, keyed by its `index` in the step's calls.
    #[derive(Debug, Deserialize)]
    pub(super) struct ToolCallDelta {
        #[serde(default, deserialize_with = "lenient")]
        pub index: Option<u64>,
        #[serde(default, deserialize_with = "lenient")]
        pub id: Option<String>,
        #[serde(default, deserialize_with = "lenient")]
        pub function: Option<FunctionDelta>,
    }

    /// The called function's name and a piece of its arguments (JSON text).
    #[derive(Debug, Default, Deserialize)]
    pub(super) struct FunctionDelta {
        #[serde(default, deserialize_with = "lenient")]
        pub name: Option<String>,
        #[serde(default, deserialize_with = "lenient")]
        pub arguments: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    pub(super) struct Usage {
        #[serde(default, deserialize_with = "lenient")]
        pub prompt_tokens: Option<u64>,
        #[serde(default, deserialize_with = "lenient")]
        pub completion_tokens: Option<u64>,
        #[serde(default, deserialize_with = "lenient")]
        pub total_tokens: Option<u64>,
        #[serde(default, deserialize_with = "lenient")]
        pub prompt_tokens_details: Option<PromptTokensDetails>,
    }

    #[derive(Debug, Deserialize)]
    pub(super) struct PromptTokensDetails {
        /// Prompt tokens served from the prompt cache.
        #[serde(default, deserialize_with = "lenient")]
        pub cached_tokens: Option<u64>,
    }

    /// A field that is there, even as `null`.
    fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
        serde_json::Value::deserialize(d).map(Some)
    }

    /// A field of the expected type, or missing when it has another.
    fn lenient<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Or<T> {
            Expected(T),
            Other(IgnoredAny),
        }
        Ok(match Or::deserialize(d)? {
            Or::Expected(value) => Some(value),
            Or::Other(_) => None,
        })
    }
}

/// An OpenAI `usage` object: `prompt_tokens` (of which `prompt_tokens_details.cached_tokens`
/// came from the prompt cache) and `completion_tokens`; a server that gives only `total_tokens`
/// has it counted as input. `None` when it counts nothing.
fn usage_of(usage: &wire::Usage) -> Option<chat_core::Usage> {
    let (prompt, completion) = (usage.prompt_tokens, usage.completion_tokens);
    let prompt = match (prompt, completion) {
        (None, None) => usage.total_tokens.unwrap_or(0),
        (prompt, _) => prompt.unwrap_or(0),
    };
    let cached = usage.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0).min(prompt);
    let usage = chat_core::Usage {
        input: prompt - cached,
        output: completion.unwrap_or(0),
        cache_read: cached,
        cache_write: 0,
    };
    (usage.total() > 0).then_some(usage)
}

/// Splits a `text/event-stream` body into the data of its events.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buffer: Vec<u8>,
    data: Option<String>,
}

impl SseDecoder {
    /// Takes the next bytes; returns the data of each event they complete. Lines are decoded
    /// whole, so a character split across reads is never broken.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>, ModelError> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            self.line(&line[..end], &mut events)?;
        }
        Ok(events)
    }

    /// The body ended: whatever event is still open counts.
    pub fn finish(&mut self) -> Result<Vec<String>, ModelError> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.buffer);
        if !rest.is_empty() {
            self.line(&rest, &mut events)?;
        }
        events.extend(self.data.take());
        Ok(events)
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<String>) -> Result<(), ModelError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = std::str::from_utf8(line)
            .map_err(|_| ModelError::fatal("the model provider sent a malformed chunk (not UTF-8)"))?;
        if line.is_empty() {
            events.extend(self.data.take());
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(()); // a comment, e.g. a keep-alive
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field == "data" {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_split_anywhere_decode_the_same() {
        let body =
            "data: {\"a\":\"é🦀\"}\r\n\r\n: keep-alive\n\ndata: one\ndata: two\n\nevent: x\ndata: [DONE]\n\n";
        let whole = SseDecoder::default().feed(body.as_bytes()).unwrap();
        assert_eq!(whole, vec!["{\"a\":\"é🦀\"}", "one\ntwo", "[DONE]"]);
        for size in 1..8 {
            let mut decoder = SseDecoder::default();
            let mut events = Vec::new();
            for piece in body.as_bytes().chunks(size) {
                events.extend(decoder.feed(piece).unwrap());
            }
            events.extend(decoder.finish().unwrap());
            assert_eq!(events, whole, "pieces of {size} bytes");
        }
    }

    #[test]
    fn a_last_event_without_a_blank_line_still_counts() {
        let mut decoder = SseDecoder::default();
        assert!(decoder.feed(b"data: [DONE]").unwrap().is_empty());
        assert_eq!(decoder.finish().unwrap(), vec!["[DONE]"]);
    }

    #[test]
    fn usage_is_read_by_kind_with_cached_prompt_tokens_apart() {
        let usage_of = |value: Value| usage_of(&serde_json::from_value(value).unwrap());
        let usage = usage_of(json!({"prompt_tokens": 120, "completion_tokens": 30,
            "prompt_tokens_details": {"cached_tokens": 100}, "total_tokens": 150}));
        assert_eq!(usage, Some(chat_core::Usage { input: 20, output: 30, cache_read: 100, cache_write: 0 }));
        assert_eq!(usage_of(json!({"total_tokens": 9})).map(|u| u.total()), Some(9));
        assert_eq!(usage_of(json!({"prompt_tokens": 0, "completion_tokens": 0})), None);
        assert_eq!(usage_of(json!({})), None);
        // A count of another type is no count, as if missing.
        assert_eq!(
            usage_of(json!({"prompt_tokens": 12.0, "completion_tokens": 3})).map(|u| u.input),
            Some(0)
        );
    }

    #[test]
    fn chunks_parse_with_null_missing_and_odd_fields_and_only_choices_make_a_chunk() {
        let chunk: wire::Chunk = serde_json::from_str(
            r#"{"id": "c", "object": "chat.completion.chunk", "usage": null, "choices": [{"index": 0,
                "delta": {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "calculator", "arguments": null}}]},
                "finish_reason": null, "logprobs": null}]}"#,
        )
        .unwrap();
        assert!(chunk.error.is_none() && chunk.usage.is_none());
        let choice = &chunk.choices.as_ref().unwrap()[0];
        let delta = choice.delta.as_ref().unwrap();
        assert_eq!(
            (choice.index, choice.finish_reason.as_deref(), delta.content.as_deref()),
            (Some(0), None, None)
        );
        let call = &delta.tool_calls.as_ref().unwrap()[0];
        assert_eq!(
            (call.index, call.id.as_deref()),
            (None, Some("call_1")),
            "a missing index is the first call"
        );
        assert_eq!(call.function.as_ref().unwrap().name.as_deref(), Some("calculator"));
        // A field of another type is missing; `choices` that are not a list make no chunk.
        let odd: wire::Chunk = serde_json::from_str(r#"{"choices": [{"index": "0", "delta": 5}]}"#).unwrap();
        assert!(odd.choices.as_ref().unwrap()[0].index.is_none() && odd.choices.unwrap()[0].delta.is_none());
        let unlisted: wire::Chunk = serde_json::from_str(r#"{"choices": {"index": 0}}"#).unwrap();
        assert!(unlisted.choices.is_none());
        let error: wire::Chunk = serde_json::from_str(r#"{"error": null}"#).unwrap();
        assert_eq!(error.error, Some(Value::Null), "an error field counts even when null");
        assert!(serde_json::from_str::<wire::Chunk>("{\"choices\": [ not json").is_err());
    }

    #[test]
    fn statuses_map_to_clear_errors() {
        assert!(status_error(429).retryable);
        assert!(status_error(503).retryable);
        assert!(!status_error(401).retryable);
        assert!(status_error(401).message.contains("credentials"));
        assert!(!status_error(400).retryable);
    }

    #[test]
    fn the_request_carries_the_system_prompt_history_and_a_resumed_reply() {
        let provider = OpenAi::new(OpenAiSettings {
            base_url: "http://127.0.0.1:1/v1/".to_owned(),
            api_key: Some("sk-secret".to_owned()),
            model: "m".to_owned(),
            temperature: Some(0.5),
            max_tokens: 64,
            max_tokens_field: "max_tokens",
            connect_timeout: Duration::from_secs(1),
            stream_usage: true,
        })
        .unwrap();
        assert_eq!(provider.url.to_string(), "http://127.0.0.1:1/v1/chat/completions");
        let prompt = Prompt {
            system: Some("be brief".to_owned()),
            messages: vec![(Role::User, "hi".to_owned())],
            resumed: vec!["Hel".to_owned(), "lo".to_owned()],
            ..Prompt::default()
        };
        let body = provider.request_body(&prompt);
        assert_eq!(
            body["messages"],
            json!([
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello"},
            ])
        );
        assert_eq!(body["stream"], json!(true));
        assert_eq!(
            body["stream_options"],
            json!({"include_usage": true}),
            "OpenAI reports usage only when asked"
        );
        assert_eq!(body["max_tokens"], json!(64));
        assert_eq!(body["temperature"], json!(0.5));
        let mut reasoning = provider.clone();
        reasoning.settings = Arc::new(OpenAiSettings {
            max_tokens_field: "max_completion_tokens",
            ..(*provider.settings).clone()
        });
        let body = reasoning.request_body(&prompt);
        assert_eq!((body.get("max_tokens"), &body["max_completion_tokens"]), (None, &json!(64)));
        assert!(!format!("{:?}", provider.settings).contains("sk-secret"));
        let quiet = OpenAi {
            settings: Arc::new(OpenAiSettings { stream_usage: false, ..(*provider.settings).clone() }),
            ..provider.clone()
        };
        assert_eq!(quiet.request_body(&prompt).get("stream_options"), None, "OPENAI_STREAM_USAGE=false");
        let detail = provider.upstream_detail(b"{\"error\":{\"message\":\"bad key sk-secret\"}}");
        assert!(detail.contains("bad key [redacted]"), "{detail}");
    }
}
