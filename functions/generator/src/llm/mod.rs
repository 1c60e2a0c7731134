//! The model seam: anything that turns a conversation into a stream of tokens and tool calls,
//! and the one retry policy every provider shares.

pub mod bedrock;
mod demo;
pub mod openai;

pub use bedrock::Bedrock;
pub use demo::{directive, split_tokens, DemoModel};
pub use openai::{OpenAi, SseDecoder};

use chat_core::Role;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt};
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;

/// A model failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ModelError {
    /// What went wrong, safe to show to the client: no secrets, no raw upstream bodies.
    pub message: String,
    /// Whether trying again may help (rate limits, 5xx, lost connections). Only failures before
    /// the first token are retried: after it, the client has seen part of a reply.
    pub retryable: bool,
    /// How long the provider asked us to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl ModelError {
    /// A failure that trying again will not fix.
    pub fn fatal(message: impl Into<String>) -> ModelError {
        ModelError { message: message.into(), retryable: false, retry_after: None }
    }

    /// A failure that may pass.
    pub fn retryable(message: impl Into<String>) -> ModelError {
        ModelError { message: message.into(), retryable: true, retry_after: None }
    }
}

/// What a model streams: reply text, a call of one of the offered tools (emitted whole, once
/// its arguments are complete), and what the call consumed (usually last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A piece of the reply's text.
    Token(String),
    /// The model asks for a tool.
    ToolCall(ToolCall),
    /// The tokens this call consumed, as the provider reports them.
    Usage(chat_core::Usage),
}

/// What a prompt costs as input without counting: its bytes over four (about what a byte-pair
/// encoding makes of English), plus OpenAI's framing. The demo model reports this.
pub fn estimated_prompt_tokens(prompt: &Prompt) -> u64 {
    let mut bytes = prompt.system.as_ref().map_or(0, String::len);
    let mut messages = usize::from(prompt.system.is_some());
    for (_, text) in &prompt.messages {
        bytes += text.len();
        messages += 1;
    }
    for exchange in &prompt.exchanges {
        bytes += match exchange {
            Exchange::Assistant { text, calls } => {
                text.len() + calls.iter().map(|c| c.name.len() + c.arguments.len()).sum::<usize>()
            }
            Exchange::ToolResult { content, .. } => content.len(),
        };
        messages += 1;
    }
    bytes += prompt.resumed.iter().map(String::len).sum::<usize>();
    (bytes.div_ceil(4) + messages * chat_tokens::PER_MESSAGE + chat_tokens::PER_PROMPT) as u64
}

/// What a prompt costs as input, counted with `o200k_base` and OpenAI's framing: the estimate
/// for a provider that reports nothing.
pub fn prompt_tokens(prompt: &Prompt, counter: chat_tokens::TokenCounter) -> u64 {
    let mut tokens = counter.base(prompt.system.as_deref());
    tokens += prompt.messages.iter().map(|(_, text)| counter.message(text)).sum::<usize>();
    for exchange in &prompt.exchanges {
        tokens += match exchange {
            Exchange::Assistant { text, calls } => {
                counter.message(text)
                    + calls
                        .iter()
                        .map(|c| counter.count(&c.name) + counter.count(&c.arguments))
                        .sum::<usize>()
            }
            Exchange::ToolResult { content, .. } => counter.message(content),
        };
    }
    if let Some(resumed) = prompt.resumed_text() {
        tokens += counter.message(&resumed);
    }
    tokens as u64
}

/// What one model call consumed: what its provider reported, and what it streamed (for an
/// estimate when it reported nothing).
#[derive(Debug, Default)]
pub(crate) struct Spent {
    reported: Option<chat_core::Usage>,
    /// The text and tool-call arguments the call streamed.
    pub(crate) streamed: String,
}

impl Spent {
    /// Adds what the provider reported.
    pub(crate) fn reported(&mut self, usage: chat_core::Usage) {
        *self.reported.get_or_insert_with(Default::default) += usage;
    }

    /// The reported usage, or an estimate with `o200k_base`: the prompt, and what was streamed.
    pub(crate) fn usage(&self, prompt: &Prompt, counter: chat_tokens::TokenCounter) -> chat_core::Usage {
        if let Some(usage) = self.reported {
            return usage;
        }
        let usage = chat_core::Usage {
            input: prompt_tokens(prompt, counter),
            output: counter.count(&self.streamed) as u64,
            ..Default::default()
        };
        tracing::info!(input = usage.input, output = usage.output, "the model reported no usage; estimated");
        usage
    }
}

/// A stream of reply text and tool calls.
pub type TokenStream = BoxStream<'static, Result<Output, ModelError>>;

/// A tool the model may call: its name, what it does, and its parameters as JSON Schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSpec {
    /// The name the model calls it by.
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// Its parameters, a JSON Schema object.
    pub parameters: serde_json::Value,
}

/// One call of a tool by the model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    /// The provider's id of the call, which its result answers.
    pub id: String,
    /// The tool.
    pub name: String,
    /// The arguments, as the JSON text the model wrote.
    pub arguments: String,
}

/// A step of the current turn before the reply goes on: what the model said and asked for, or
/// what a tool answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exchange {
    /// The model's text so far in this step and the tools it called.
    Assistant {
        /// Text before the calls (may be empty).
        text: String,
        /// The calls.
        calls: Vec<ToolCall>,
    },
    /// A tool's answer to a call.
    ToolResult {
        /// The call it answers.
        call_id: String,
        /// The tool.
        name: String,
        /// What it returned, or why it failed.
        content: String,
        /// The tool failed (the model is told so).
        is_error: bool,
    },
}

/// What the model is asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prompt {
    /// The system prompt (`LLM_SYSTEM_PROMPT`).
    pub system: Option<String>,
    /// The conversation, oldest first, ending with the user's new message.
    pub messages: Vec<(Role, String)>,
    /// This turn's tool steps so far, after the user's message.
    pub exchanges: Vec<Exchange>,
    /// Reply tokens already streamed after the last exchange (by an earlier holder of the turn,
    /// after a takeover): the reply must continue them. Real providers get them as the start of
    /// the assistant's reply.
    pub resumed: Vec<String>,
    /// The tools the model may call (none: it must answer in text).
    pub tools: Vec<ToolSpec>,
    /// The model may call no more tools: it must answer now (after the last tool step). The
    /// tools stay described, since earlier steps called them.
    pub must_answer: bool,
}

impl Prompt {
    /// The reply already streamed after the last exchange, if any: real providers get it as
    /// the start of the assistant's reply.
    pub fn resumed_text(&self) -> Option<String> {
        Some(self.resumed.concat()).filter(|text| !text.is_empty())
    }
}

/// A source of reply tokens: one attempt, no retries (see [`Model`]).
pub trait ModelProvider: Send + Sync {
    /// Starts a reply to `prompt`. Errors before the stream exists (a refused request) come from
    /// the future; errors after (a broken stream) come from the stream.
    fn open(&self, prompt: Arc<Prompt>) -> BoxFuture<'static, Result<TokenStream, ModelError>>;
}

/// How failures before the first token are retried, and how long a silent provider is waited for.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all (`LLM_MAX_ATTEMPTS`, default 4).
    pub max_attempts: u32,
    /// The first backoff; it doubles each attempt, with full jitter (`LLM_RETRY_BASE_MS`).
    pub base: Duration,
    /// The longest backoff, also the cap on a provider's `Retry-After`.
    pub cap: Duration,
    /// How long to wait for the next token (or the response) before giving up on an attempt
    /// (`LLM_IDLE_TIMEOUT_MS`).
    pub idle_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The pause before attempt `attempt + 1` (after `attempt` failures): full jitter over an
    /// exponential window, or the provider's `Retry-After` when it gave one (capped).
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(self.cap);
        }
        let window = self.base.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(self.cap);
        window.mul_f64(rand::rng().random_range(0.0..=1.0))
    }
}

/// A provider with the retry policy applied.
#[derive(Clone)]
pub struct Model {
    provider: Arc<dyn ModelProvider>,
    policy: RetryPolicy,
}

enum Phase {
    Start { attempt: u32 },
    Streaming { tokens: TokenStream, attempt: u32, yielded: bool },
    Done,
}

impl Model {
    /// `provider`, retried by `policy`.
    pub fn new(provider: Arc<dyn ModelProvider>, policy: RetryPolicy) -> Model {
        Model { provider, policy }
    }

    /// Streams the reply to `prompt`. Failures before the first token are retried with backoff;
    /// a failure after it ends the stream with that error.
    pub fn stream(&self, prompt: Prompt) -> TokenStream {
        let model = self.clone();
        let prompt = Arc::new(prompt);
        stream::unfold(Phase::Start { attempt: 1 }, move |phase| {
            let model = model.clone();
            let prompt = prompt.clone();
            async move { model.step(phase, prompt).await }
        })
        .boxed()
    }

    async fn step(
        &self,
        mut phase: Phase,
        prompt: Arc<Prompt>,
    ) -> Option<(Result<Output, ModelError>, Phase)> {
        let idle = self.policy.idle_timeout;
        loop {
            phase = match phase {
                Phase::Done => return None,
                Phase::Start { attempt } => {
                    let opened = tokio::time::timeout(idle, self.provider.open(prompt.clone()))
                        .await
                        .unwrap_or_else(|_| Err(silent(idle)));
                    match opened {
                        Ok(tokens) => Phase::Streaming { tokens, attempt, yielded: false },
                        Err(err) => match self.retry(err, attempt).await {
                            Ok(next) => next,
                            Err(err) => return Some((Err(err), Phase::Done)),
                        },
                    }
                }
                Phase::Streaming { mut tokens, attempt, yielded } => {
                    let next = tokio::time::timeout(idle, tokens.next())
                        .await
                        .unwrap_or_else(|_| Some(Err(silent(idle))));
                    match next {
                        None => return None,
                        Some(Ok(token)) => {
                            return Some((Ok(token), Phase::Streaming { tokens, attempt, yielded: true }))
                        }
                        Some(Err(err)) if yielded => return Some((Err(err), Phase::Done)),
                        Some(Err(err)) => match self.retry(err, attempt).await {
                            Ok(next) => next,
                            Err(err) => return Some((Err(err), Phase::Done)),
                        },
                    }
                }
            }
        }
    }

    /// Waits and starts the next attempt, or gives the error back when retrying cannot help.
    async fn retry(&self, err: ModelError, attempt: u32) -> Result<Phase, ModelError> {
        if !err.retryable {
            return Err(err);
        }
        if attempt >= self.policy.max_attempts {
            if attempt == 1 {
                return Err(err);
            }
            let message = format!("{} (gave up after {attempt} attempts)", err.message);
            return Err(ModelError { message, ..err });
        }
        let wait = self.policy.backoff(attempt, err.retry_after);
        chat_runtime::metrics::count(chat_runtime::metrics::name::MODEL_RETRIES, 1, &[]);
        tracing::warn!(error = %err, attempt, wait_ms = wait.as_millis() as u64, "model attempt failed; retrying");
        tokio::time::sleep(wait).await;
        Ok(Phase::Start { attempt: attempt + 1 })
    }
}

fn silent(idle: Duration) -> ModelError {
    ModelError::retryable(format!("the model provider sent nothing for {} s", idle.as_secs_f32()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    /// One attempt: refused (`Err`), or the items its stream yields.
    type Script = Result<Vec<Result<Output, ModelError>>, ModelError>;

    /// Each `open` takes the next script: `Err` refuses, `Ok` streams its items.
    struct Scripted {
        scripts: Mutex<Vec<Script>>,
        opens: AtomicU32,
    }

    impl ModelProvider for Scripted {
        fn open(&self, _prompt: Arc<Prompt>) -> BoxFuture<'static, Result<TokenStream, ModelError>> {
            self.opens.fetch_add(1, Ordering::SeqCst);
            let script = self.scripts.lock().unwrap().remove(0);
            Box::pin(async move { script.map(|items| stream::iter(items).boxed()) })
        }
    }

    fn scripted(scripts: Vec<Script>) -> (Model, Arc<Scripted>) {
        let provider = Arc::new(Scripted { scripts: Mutex::new(scripts), opens: AtomicU32::new(0) });
        let policy = RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(5),
            idle_timeout: Duration::from_secs(5),
        };
        (Model::new(provider.clone(), policy), provider)
    }

    fn ok(t: &str) -> Result<Output, ModelError> {
        Ok(Output::Token(t.to_owned()))
    }

    #[tokio::test]
    async fn failures_before_the_first_token_are_retried() {
        let (model, provider) = scripted(vec![
            Err(ModelError::retryable("429")),
            Ok(vec![Err(ModelError::retryable("dropped before any token"))]),
            Ok(vec![ok("a"), ok("b")]),
        ]);
        let out: Vec<_> = model.stream(Prompt::default()).collect().await;
        assert_eq!(out, vec![ok("a"), ok("b")]);
        assert_eq!(provider.opens.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failure_after_a_token_ends_the_stream_without_a_retry() {
        let (model, provider) =
            scripted(vec![Ok(vec![ok("a"), Err(ModelError::retryable("cut"))]), Ok(vec![ok("never")])]);
        let out: Vec<_> = model.stream(Prompt::default()).collect().await;
        assert_eq!(out, vec![ok("a"), Err(ModelError::retryable("cut"))]);
        assert_eq!(provider.opens.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn fatal_errors_and_exhausted_attempts_are_not_retried() {
        let (model, provider) = scripted(vec![Err(ModelError::fatal("401")), Ok(vec![ok("never")])]);
        let out: Vec<_> = model.stream(Prompt::default()).collect().await;
        assert_eq!(out, vec![Err(ModelError::fatal("401"))]);
        assert_eq!(provider.opens.load(Ordering::SeqCst), 1);

        let busy = || Err(ModelError::retryable("503"));
        let (model, provider) = scripted(vec![busy(), busy(), busy(), Ok(vec![ok("never")])]);
        let out: Vec<_> = model.stream(Prompt::default()).collect().await;
        assert_eq!(out, vec![Err(ModelError::retryable("503 (gave up after 3 attempts)"))]);
        assert_eq!(provider.opens.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn backoff_grows_within_its_cap_and_honours_retry_after() {
        let policy = RetryPolicy::default();
        for attempt in 1..10 {
            let window = policy.base.saturating_mul(1 << (attempt - 1)).min(policy.cap);
            assert!(policy.backoff(attempt, None) <= window);
        }
        assert_eq!(policy.backoff(1, Some(Duration::from_secs(2))), Duration::from_secs(2));
        assert_eq!(policy.backoff(1, Some(Duration::from_secs(600))), policy.cap);
    }
}
