//! The generator: answers one turn per SQS record. It claims the turn with a lease, streams the
//! model's tokens into DynamoDB in batched chunks (on a time or size threshold), heartbeats the
//! lease, honours cancellation at each chunk write, and commits the reply while it still holds
//! the lease. Duplicate deliveries find nothing to claim and are acknowledged.

pub mod config;
pub mod memory;
pub mod model;
pub mod routing;
pub mod tools;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use chat_core::config::{CommonConfig, ConfigError, Env};
use chat_core::model::EVENT_MARK;
use chat_core::queue::{Job, TurnMessage};
use chat_core::{
    AppendOutcome, ClaimOutcome, Conflict, Lease, LeaseStatus, Outcome, ReplyEvent, Role, State, StopReason,
    Store, StoreError, Turn,
};
use chat_runtime::metrics::{self, Dimension};
use futures::StreamExt;
use memory::{MemoryLimits, TokenCounter};
use model::{Exchange, Model, Output, Prompt, ToolCall};
use routing::Routes;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerationSettings {
    /// Lease length; it is extended when half has passed.
    pub lease: Duration,
    /// Claims per turn before a stalled turn ends in timeout.
    pub max_generation_attempts: u32,
    /// Flush buffered tokens once the oldest has waited this long (`FLUSH_INTERVAL_MS`).
    pub flush_interval: Duration,
    /// Flush once this many tokens are buffered (`FLUSH_MAX_TOKENS`).
    pub flush_max_tokens: usize,
    /// Honour test directives (`DEMO_FAULTS`): `[[crash-after:N]]` aborts the process once N
    /// tokens are stored, on a first claim only, to prove recovery from a crashed generator;
    /// `[[lose-delivery]]` acknowledges every delivery of the turn without claiming it.
    pub faults: bool,
    /// The system prompt (`LLM_SYSTEM_PROMPT`).
    pub system_prompt: Option<String>,
    /// How much history the model sees (`MEMORY_MAX_TOKENS`, `MEMORY_MAX_TURNS`).
    pub memory: MemoryLimits,
    /// A reply stops at this many bytes, whole tokens only, marked `reply_limit`
    /// (`REPLY_MAX_BYTES`): a stored message must fit DynamoDB's 400 KB item limit.
    pub reply_max_bytes: usize,
    /// Tool steps start only this long into a turn (`TOOL_DEADLINE_MS`); after it, the model
    /// must answer with what it has. Well inside the function's timeout.
    pub tool_deadline: Duration,
}

/// The largest `REPLY_MAX_BYTES`: a message item also carries its keys and attributes, and must
/// stay under DynamoDB's 400 KB.
pub const REPLY_MAX_BYTES_CEILING: usize = 380_000;

/// Tool calls and results are written in chunks of at most about this much.
const EVENT_CHUNK_BYTES: usize = 64 * 1024;

/// The most tool calls of one step that are read at all (OpenAI's stream refuses call indexes
/// past 64 too).
const MAX_CALLS_SEEN: usize = 64;

/// The generator function's dependencies, built once per cold start.
pub struct Generator {
    store: Store,
    routes: Routes,
    tools: tools::Tools,
    settings: GenerationSettings,
    counter: TokenCounter,
}

/// Why a record should be delivered again.
#[derive(Debug, thiserror::Error)]
#[error("retry later: {0}")]
struct RetryLater(#[from] StoreError);

/// The prompt for a turn, or why there can be none (the turn then ends in `error`).
enum PromptOutcome {
    /// The prompt, and when the turn's message was accepted (epoch ms).
    Ready {
        prompt: Prompt,
        accepted_at: Option<u64>,
    },
    Unanswerable(String),
}

/// How one model call of a turn ended.
enum Step {
    /// The turn is over (or must stop).
    Ended(Ending),
    /// The model asked for tools, after writing `text` in this step.
    Calls { text: String, calls: Vec<ToolCall> },
}

/// How a generation ended.
enum Ending {
    Complete,
    Stopped,
    /// The reply reached `reply_max_bytes`.
    Capped,
    Failed(Failure, String),
    LeaseLost,
}

impl Ending {
    /// What the user got, for the turn's log line.
    fn outcome(&self) -> &'static str {
        match self {
            Ending::Complete => "committed",
            Ending::Stopped => "stopped",
            Ending::Capped => "reply_limit",
            Ending::Failed(..) => "error",
            Ending::LeaseLost => "lease_lost",
        }
    }
}

/// Why a generation failed, as the failed-turn metric names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The model failed (after its retries, or after the first token).
    Model,
    /// The turn cannot be asked: its message does not fit the prompt budget, or is missing.
    Prompt,
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::Model => "model",
            Failure::Prompt => "prompt",
        }
    }
}

/// Whether this build carries the test directives (`DEMO_FAULTS`): debug builds, which the local
/// stack and the tests run, do; release builds, which are deployed, do not. Every directive
/// check is `FAULTS_BUILT && …`, so a release build compiles them away.
pub const FAULTS_BUILT: bool = cfg!(debug_assertions);

/// `DEMO_FAULTS` as asked, refused in a build without the directives rather than ignored.
pub fn faults_setting(requested: bool, built: bool) -> Result<bool, ConfigError> {
    if requested && !built {
        return Err(ConfigError {
            variable: "DEMO_FAULTS".to_owned(),
            problem: "is for test builds only: this release binary carries no test directives".to_owned(),
        });
    }
    Ok(requested && built)
}

impl Generator {
    /// Reads the configuration and builds the clients.
    pub async fn from_env() -> Result<Generator, ConfigError> {
        let env = Env::process();
        let common = CommonConfig::from_env(&env)?;
        let faults = faults_setting(env.parse_or("DEMO_FAULTS", false)?, FAULTS_BUILT)?;
        let model_config = config::ModelConfig::from_env(&env, faults)?;
        let settings = GenerationSettings {
            lease: common.lease,
            max_generation_attempts: common.max_generation_attempts,
            flush_interval: env.millis_or("FLUSH_INTERVAL_MS", Duration::from_millis(100))?,
            flush_max_tokens: env.parse_or("FLUSH_MAX_TOKENS", 32)?,
            reply_max_bytes: match env.parse_or("REPLY_MAX_BYTES", 300_000)? {
                n if n == 0 || n > REPLY_MAX_BYTES_CEILING => {
                    return Err(ConfigError {
                        variable: "REPLY_MAX_BYTES".to_owned(),
                        problem: format!(
                            "is {n}; use 1 to {REPLY_MAX_BYTES_CEILING} (DynamoDB's item limit)"
                        ),
                    })
                }
                n => n,
            },
            faults,
            system_prompt: model_config.system_prompt.clone(),
            memory: model_config.memory,
            tool_deadline: env.millis_or("TOOL_DEADLINE_MS", Duration::from_secs(120))?,
        };
        let tools = tools::Tools::from_env(&env)?;
        let aws = chat_runtime::aws::load_config().await;
        let routes = model_config.build_routes(&aws).await?;
        info!(model = %model_config.describe(), "model ready");
        let store = Store::new(chat_runtime::aws::dynamodb(&aws), common.table_name, common.store);
        Ok(Generator::new(store, routes, settings).with_tools(tools))
    }

    /// A generator over explicit parts. The tokenizer is decoded only if a turn needs an exact count.
    pub fn new(store: Store, routes: impl Into<Routes>, settings: GenerationSettings) -> Generator {
        Generator {
            store,
            routes: routes.into(),
            tools: tools::Tools::none(),
            settings,
            counter: TokenCounter::o200k(),
        }
    }

    /// The same generator offering `tools` to the model.
    pub fn with_tools(mut self, tools: tools::Tools) -> Generator {
        self.tools = tools;
        self
    }

    /// Handles a batch; records that hit a DynamoDB fault are reported for redelivery.
    pub async fn handle(&self, event: SqsEvent) -> SqsBatchResponse {
        let results = futures::future::join_all(event.records.iter().map(|r| self.process(r))).await;
        let mut response = SqsBatchResponse::default();
        for (record, result) in event.records.iter().zip(results) {
            if let Err(err) = result {
                warn!(error = %err, message_id = ?record.message_id, "record will be redelivered");
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = record.message_id.clone().unwrap_or_default();
                response.batch_item_failures.push(failure);
            }
        }
        response
    }

    async fn process(&self, record: &SqsMessage) -> Result<(), RetryLater> {
        let body = record.body.as_deref().unwrap_or_default();
        let Ok(message) = serde_json::from_str::<TurnMessage>(body) else {
            // Redelivering a malformed body would never help; the DLQ is for real failures.
            warn!(body_len = body.len(), "dropping a message that is not a turn");
            return Ok(());
        };
        let owner = format!("gen-{}", uuid::Uuid::new_v4().simple());
        let span =
            tracing::info_span!("turn", session = %message.session_id, turn = %message.turn, lease = %owner);
        async {
            if FAULTS_BUILT && self.settings.faults && self.delivery_lost(&message).await? {
                warn!("dropping the delivery on purpose ([[lose-delivery]] test directive)");
                return Ok(());
            }
            if message.job == Job::Summary {
                return self.summarize(&message).await;
            }
            let claim = self
                .store
                .claim_generation(
                    message.session_id,
                    message.turn,
                    &owner,
                    self.settings.lease,
                    self.settings.max_generation_attempts,
                )
                .await?;
            match claim {
                ClaimOutcome::Claimed(lease) => self.generate(lease).await,
                ClaimOutcome::Skipped { current } => {
                    let state = current.map(|s| s.state.to_string());
                    info!(state = state.as_deref().unwrap_or("deleted"), "nothing to generate");
                    Ok(())
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The `[[lose-delivery]]` test directive (`DEMO_FAULTS` only): the turn's message asks that
    /// every delivery be acknowledged unclaimed, as if the queue had lost them, so the sweeper's
    /// re-drives and its final timeout can be seen end to end.
    async fn delivery_lost(&self, message: &TurnMessage) -> Result<bool, StoreError> {
        let user = self.store.get_message(message.session_id, message.turn, Role::User, true).await?;
        Ok(user.is_some_and(|m| m.content.contains("[[lose-delivery]]")))
    }

    async fn generate(&self, mut lease: Lease) -> Result<(), RetryLater> {
        let mut writer = ChunkWriter::new(&lease);
        // After a takeover: the tool steps an earlier holder took (part of this reply too), and
        // the text it wrote after them.
        let tools::Replayed { exchanges, text_after, tool_uses } = tools::replay(&lease.resumed_tokens);
        lease.tool_uses = tool_uses;
        let ending = if lease.cancel_requested {
            Ending::Stopped
        } else {
            match self.prompt(&lease, exchanges, text_after).await? {
                PromptOutcome::Ready { prompt, accepted_at } => {
                    writer.accepted_at = accepted_at.filter(|_| lease.next_seq == 0);
                    self.stream_reply(&mut lease, &mut writer, prompt).await?
                }
                PromptOutcome::Unanswerable(reason) => Ending::Failed(Failure::Prompt, reason),
            }
        };
        let outcome = match &ending {
            Ending::LeaseLost => {
                info!("lease lost; leaving the turn to its new holder, if the session still exists");
                return self.abandon(&lease).await;
            }
            Ending::Complete | Ending::Stopped | Ending::Capped => {
                let stopped = match ending {
                    Ending::Stopped => Some(StopReason::Cancelled),
                    Ending::Capped => Some(StopReason::ReplyLimit),
                    _ => None,
                };
                self.store.commit_reply(&lease, &writer.text, stopped).await?
            }
            Ending::Failed(_, reason) => {
                let Some(current) = self.store.get_session(lease.session_id, true).await? else {
                    return self.abandon(&lease).await;
                };
                if current.version != lease.version {
                    return self.abandon(&lease).await;
                }
                self.store.fail_generation(&lease, &current, reason).await?
            }
        };
        match outcome {
            Outcome::Applied(_) => {
                let usage = lease.usage;
                info!(
                    outcome = ending.outcome(),
                    ttft_ms = writer.first_token_ms,
                    tokens = writer.next_index,
                    chunks = writer.next_seq,
                    input = usage.input,
                    output = usage.output,
                    cache_read = usage.cache_read,
                    cache_write = usage.cache_write,
                    "turn finished"
                );
                turn_metrics(&ending, &lease);
                self.give_back_turn_slot(&lease).await;
            }
            Outcome::Conflict(Conflict { current: None }) => return self.abandon(&lease).await,
            Outcome::Conflict(conflict) => {
                warn!(?conflict, "the turn moved on before it could be finished");
                return self.abandon(&lease).await;
            }
        }
        Ok(())
    }

    /// This lease's turn ended without its transition (the lease was lost, the session deleted
    /// or moved on): what the model consumed under it is still charged to the user, once for the
    /// lease, since the transition that would have carried the charge will not happen. Then what
    /// a deleted session left behind is cleared.
    async fn abandon(&self, lease: &Lease) -> Result<(), RetryLater> {
        let marker = format!("{}:{}:{}", lease.session_id, lease.turn, lease.owner);
        if let Err(err) = self.store.charge_once(&lease.user, &marker, lease.usage.total()).await {
            warn!(error = %err, "could not charge what an abandoned turn consumed");
        }
        // A turn another generator took over is still in flight and keeps its slot; one whose
        // session is gone does not.
        if self.store.get_session(lease.session_id, true).await?.is_none() {
            self.give_back_turn_slot(lease).await;
        }
        self.clear_if_deleted(lease).await
    }

    /// The turn is over: its slot among its user's turns in flight goes back (one that cannot
    /// lapses on its own).
    async fn give_back_turn_slot(&self, lease: &Lease) {
        if let Err(err) = self.store.close_turn_slot(&lease.user, lease.session_id).await {
            warn!(error = %err, "could not give back the turn's slot; it lapses on its own");
        }
    }

    /// The session was deleted while this turn was being written: a chunk put after the delete
    /// swept the partition would be left behind, so the writer clears what is left.
    async fn clear_if_deleted(&self, lease: &Lease) -> Result<(), RetryLater> {
        let removed = self.store.clear_if_deleted(lease.session_id).await?;
        if removed > 0 {
            info!(removed, "the session was deleted mid-turn; cleared what this turn left behind");
        }
        Ok(())
    }

    /// The summary job of a session that went idle: the conversation since the last summary,
    /// with that summary, condensed by the model and stored on the session. A duplicate or
    /// stale job finds nothing pending and does nothing; a model failure leaves the summary
    /// pending, and the sweeper sends the job again after its deadline.
    async fn summarize(&self, message: &TurnMessage) -> Result<(), RetryLater> {
        let Some(session) = self.store.get_session(message.session_id, true).await? else { return Ok(()) };
        if !(session.state == State::Timeout && session.summary_pending && session.turn == message.turn) {
            info!(state = %session.state, "no summary pending");
            return Ok(());
        }
        let first = session.summary.as_ref().map_or(Turn::FIRST, |s| s.through.next());
        let messages = self.store.messages_between(session.id, first, session.turn).await?;
        if messages.is_empty() {
            self.store.drop_summary(&session).await?;
            return Ok(());
        }
        let prompt = memory::summary_prompt(
            session.summary.as_ref().map(|s| s.text.as_str()),
            &messages,
            self.settings.memory,
            self.counter,
        );
        let mut tokens = self.routes.summarizer().stream(prompt.clone());
        let mut text = String::new();
        let mut spent = Spent::default();
        while let Some(token) = tokens.next().await {
            match token {
                Ok(Output::Token(token)) if text.len() + token.len() > memory::SUMMARY_MAX_BYTES => break,
                Ok(Output::Token(token)) => text.push_str(&token),
                Ok(Output::ToolCall(_)) => {}
                Ok(Output::Usage(usage)) => spent.reported(usage),
                Err(err) => {
                    warn!(error = %err, "the model failed to summarise; the sweeper will ask again");
                    return Ok(());
                }
            }
        }
        spent.streamed.push_str(&text);
        let usage = spent.usage(&prompt, self.counter);
        let text = text.trim();
        match self.store.save_summary(&session, text, session.turn).await? {
            Outcome::Applied(()) => {
                info!(bytes = text.len(), through = %session.turn, "summary stored");
                // Summaries are spent on the user's behalf; counted once per summary.
                let marker = format!("summary#{}#{}", session.id, session.turn);
                if let Err(err) = self.store.charge_once(&session.user_id, &marker, usage.total()).await {
                    warn!(error = %err, "could not count the summary's tokens against the user's day");
                }
            }
            Outcome::Conflict(_) => info!("a newer summary is already stored"),
        }
        Ok(())
    }

    /// What the model is asked: the system prompt and as much recent history as the memory
    /// limits allow, ending with this turn's user message; or why the turn cannot proceed. When
    /// the session has a summary, it stands in for the turns before the one it ends with.
    /// `exchanges` and `resumed` are what an earlier holder of the turn already wrote.
    async fn prompt(
        &self,
        lease: &Lease,
        exchanges: Vec<Exchange>,
        resumed: Vec<String>,
    ) -> Result<PromptOutcome, StoreError> {
        let mut messages =
            self.store.recent_messages(lease.session_id, lease.turn, self.settings.memory.max_turns).await?;
        let system = memory::with_summary(self.settings.system_prompt.as_deref(), lease.summary.as_ref());
        if let Some(summary) = &lease.summary {
            messages.retain(|m| m.id.turn >= summary.through);
        }
        let accepted_at =
            messages.iter().find(|m| m.id.turn == lease.turn && m.id.role == Role::User).map(|m| m.timestamp);
        let limits = self.settings.memory;
        let selected = match memory::select(messages, lease.turn, system.as_deref(), limits, self.counter) {
            Ok(selected) => selected,
            Err(err) => return Ok(PromptOutcome::Unanswerable(err.to_string())),
        };
        if !matches!(selected.last(), Some((Role::User, _))) {
            return Ok(PromptOutcome::Unanswerable("the turn's message is missing".to_owned()));
        }
        let prompt =
            Prompt { system, messages: selected, exchanges, resumed, tools: Vec::new(), must_answer: false };
        Ok(PromptOutcome::Ready { prompt, accepted_at })
    }

    /// The model → tool → model loop: each step streams the model's reply; when it calls tools,
    /// the calls and the tools' answers go into the turn's sequence (so a stream shows them and
    /// a resume replays them) and into the next step's prompt. After `TOOL_MAX_STEPS` steps, or
    /// past the turn's tool deadline, the model is offered no tools and must answer.
    async fn stream_reply(
        &self,
        lease: &mut Lease,
        writer: &mut ChunkWriter,
        mut prompt: Prompt,
    ) -> Result<Ending, RetryLater> {
        let crash_after = model::directive(&prompt, "crash-after")
            .filter(|_| FAULTS_BUILT && self.settings.faults && lease.next_seq == 0);
        let message = prompt.messages.last().map_or("", |(_, text)| text.as_str());
        let mut steps = tools::steps(&prompt.exchanges);
        let (mut model, routing) = self.routes.pick(message, steps > 0);
        info!(route = %routing.route, model = %routing.model, "routed");
        lease.routing = Some(routing);
        let deadline = Instant::now() + self.settings.tool_deadline;
        loop {
            let tools_left = steps < self.tools.max_steps && Instant::now() < deadline;
            // The tools stay described after the last step (a provider must know what the
            // earlier steps called), but the model is told to answer now.
            prompt.tools = self.tools.specs();
            prompt.must_answer = !tools_left;
            let (text, calls) = match self.stream_step(lease, writer, model, &prompt, crash_after).await? {
                Step::Ended(ending) => return Ok(ending),
                // Calls nobody offered (a model past its last step calling anyway) end the turn
                // with what it wrote, rather than looping.
                Step::Calls { .. } if prompt.tools.is_empty() || prompt.must_answer => {
                    warn!("the model called tools that were not offered; ending the turn with its text");
                    return Ok(self.flush(lease, writer, LeaseCheck::Now).await?.unwrap_or(Ending::Complete));
                }
                Step::Calls { text, calls } => (text, calls),
            };
            steps += 1;
            // A turn that needs tools is the main model's: the small one hands it over here.
            if let Some((main, routing)) = self.routes.escalate(lease.routing.as_ref()) {
                info!(model = %routing.model, "the small model asked for a tool; the main model goes on");
                model = main;
                lease.routing = Some(routing);
            }
            // Which calls run is decided before anything is stored: past the step's cap, or with
            // over-long arguments, a call is answered with an error, unrun, and stored without
            // its arguments; so are calls past the turn's tool bytes or its deadline.
            let planned = self.plan_calls(calls);
            let calls: Vec<ToolCall> = planned.iter().map(|(call, _)| call.clone()).collect();
            for call in &calls {
                if let Some(ending) = self.push_event(lease, writer, tools::call_event(call)).await? {
                    return Ok(ending);
                }
            }
            if let Some(ending) = self.flush(lease, writer, LeaseCheck::Now).await? {
                return Ok(ending);
            }
            prompt.exchanges.push(Exchange::Assistant { text, calls });
            for (call, refusal) in planned {
                let answer = match refusal {
                    Some(refusal) => tools::ToolAnswer { content: refusal, is_error: true },
                    None if prompt.tools.iter().any(|t| t.name == call.name) => {
                        self.run_tool(lease, &call, deadline).await
                    }
                    None => tools::ToolAnswer {
                        content: format!("{} is not offered now", call.name),
                        is_error: true,
                    },
                };
                info!(tool = %call.name, is_error = answer.is_error, "tool called");
                metrics::count(metrics::name::TOOL_CALLS, 1, &[Dimension::Tool(&call.name)]);
                lease.tool_uses.push(tools::tool_use(&call, &answer));
                let event = tools::result_event(&call, &answer);
                prompt.exchanges.push(Exchange::ToolResult {
                    call_id: call.id,
                    name: call.name,
                    content: answer.content,
                    is_error: answer.is_error,
                });
                if let Some(ending) = self.push_event(lease, writer, event).await? {
                    return Ok(ending);
                }
            }
            if let Some(ending) = self.flush(lease, writer, LeaseCheck::Now).await? {
                return Ok(ending);
            }
            prompt.resumed.clear();
        }
    }

    /// The calls of a step, each with why it is not run (if it is not): calls past
    /// `TOOL_MAX_CALLS_PER_STEP`, or with arguments over [`tools::MAX_ARGUMENT_BYTES`], are
    /// answered with an error and keep no arguments; past [`MAX_CALLS_SEEN`] they are dropped.
    fn plan_calls(&self, calls: Vec<ToolCall>) -> Vec<(ToolCall, Option<String>)> {
        if calls.len() > MAX_CALLS_SEEN {
            warn!(
                calls = calls.len(),
                "the model called more tools in one step than are read; dropping the rest"
            );
        }
        let most = self.tools.max_calls_per_step;
        calls
            .into_iter()
            .take(MAX_CALLS_SEEN)
            .enumerate()
            .map(|(index, mut call)| {
                let refusal = if index >= most {
                    Some(format!("too many tool calls in one step: at most {most} run; call fewer at once"))
                } else if call.arguments.len() > tools::MAX_ARGUMENT_BYTES {
                    Some(format!(
                        "the arguments are over {} bytes; send shorter ones",
                        tools::MAX_ARGUMENT_BYTES
                    ))
                } else {
                    None
                };
                if refusal.is_some() {
                    call.arguments = "{}".to_owned();
                }
                (call, refusal)
            })
            .collect()
    }

    /// Runs a call within what is left of the turn's tool bytes (`TOOL_MAX_BYTES_PER_TURN`,
    /// counted over the calls and answers the turn stored, so a takeover keeps the count) and
    /// its tool deadline; a call with neither left is answered with an error, unrun.
    async fn run_tool(&self, lease: &Lease, call: &ToolCall, deadline: Instant) -> tools::ToolAnswer {
        let refused = |content: String| tools::ToolAnswer { content, is_error: true };
        let budget = self.tools.max_bytes_per_turn;
        let used: usize = lease.tool_uses.iter().map(|u| u.arguments.len() + u.result.len()).sum();
        let Some(room) = budget.checked_sub(used + call.arguments.len()).filter(|room| *room > 0) else {
            return refused(format!(
                "this turn's tools have used their {budget} bytes; answer with what you have"
            ));
        };
        let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|left| !left.is_zero())
        else {
            return refused("the tool ran out of time".to_owned());
        };
        let mut answer = tokio::time::timeout(left, self.tools.call(call))
            .await
            .unwrap_or_else(|_| refused("the tool ran out of time".to_owned()));
        if answer.content.len() > room {
            const CUT: &str = "\n[cut: the turn's tool budget is spent]";
            let mut end = room.saturating_sub(CUT.len());
            while !answer.content.is_char_boundary(end) {
                end -= 1;
            }
            answer.content.truncate(end);
            answer.content.push_str(CUT);
        }
        answer
    }

    /// Buffers a tool call or result, flushing first when the buffer would grow past
    /// [`EVENT_CHUNK_BYTES`] (a chunk item stays far under DynamoDB's 400 KB), and ending the
    /// reply at `REPLY_MAX_BYTES`, which counts the tool steps too.
    async fn push_event(
        &self,
        lease: &mut Lease,
        writer: &mut ChunkWriter,
        event: ReplyEvent,
    ) -> Result<Option<Ending>, RetryLater> {
        let size = event.encode().len();
        if writer.bytes() + size > self.settings.reply_max_bytes {
            warn!(
                bytes = writer.bytes(),
                "the reply and its tool steps reached REPLY_MAX_BYTES; stopping there"
            );
            return Ok(Some(self.flush(lease, writer, LeaseCheck::Now).await?.unwrap_or(Ending::Capped)));
        }
        if writer.buffered_bytes() + size > EVENT_CHUNK_BYTES {
            if let Some(ending) = self.flush(lease, writer, LeaseCheck::Now).await? {
                return Ok(Some(ending));
            }
        }
        writer.push_event(event);
        Ok(None)
    }

    /// One model call of the turn: its tokens go to the writer; it ends the turn, or asks for
    /// tools. What it consumed goes to the lease's usage, however it ends: as the provider
    /// reported it, or estimated when it reported nothing (a provider that does not, or a call
    /// cut short).
    async fn stream_step(
        &self,
        lease: &mut Lease,
        writer: &mut ChunkWriter,
        model: &Model,
        prompt: &Prompt,
        crash_after: Option<usize>,
    ) -> Result<Step, RetryLater> {
        let mut spent = Spent::default();
        let step = self.stream_step_spending(lease, writer, model, prompt, crash_after, &mut spent).await;
        lease.usage += spent.usage(prompt, self.counter);
        step
    }

    async fn stream_step_spending(
        &self,
        lease: &mut Lease,
        writer: &mut ChunkWriter,
        model: &Model,
        prompt: &Prompt,
        crash_after: Option<usize>,
        spent: &mut Spent,
    ) -> Result<Step, RetryLater> {
        let model_name = lease.routing.as_ref().map_or("model", |r| r.model.as_str()).to_owned();
        let asked = Instant::now();
        let mut first_token = true;
        let mut tokens = model.stream(prompt.clone());
        let mut text = prompt.resumed.concat();
        let mut calls = Vec::new();
        // While the model is silent (thinking, or retrying), the lease is still checked and
        // extended, and a cancel still lands.
        let heartbeat = self.settings.lease / 4;
        let mut checked = Instant::now();
        loop {
            if crash_after.is_some_and(|n| writer.next_index as usize >= n) {
                warn!("crashing on purpose ([[crash-after]] test directive)");
                std::process::abort();
            }
            let flush_at = writer.oldest.map(|t| t + self.settings.flush_interval);
            let check_at = flush_at.unwrap_or(checked + heartbeat).min(checked + heartbeat);
            let next = tokio::select! {
                next = tokens.next() => next,
                _ = tokio::time::sleep_until(check_at) => {
                    checked = Instant::now();
                    if let Some(ending) = self.flush(lease, writer, LeaseCheck::WhenDue).await? {
                        return Ok(Step::Ended(ending));
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(Output::Token(token))) => {
                    if std::mem::take(&mut first_token) {
                        let waited = asked.elapsed().as_secs_f64() * 1e3;
                        metrics::millis(
                            metrics::name::MODEL_FIRST_TOKEN,
                            &[waited],
                            &[Dimension::Model(&model_name)],
                        );
                    }
                    if writer.bytes() + token.len() > self.settings.reply_max_bytes {
                        warn!(bytes = writer.bytes(), "the reply reached REPLY_MAX_BYTES; stopping it there");
                        return Ok(Step::Ended(
                            self.flush(lease, writer, LeaseCheck::Now).await?.unwrap_or(Ending::Capped),
                        ));
                    }
                    text.push_str(&token);
                    spent.streamed.push_str(&token);
                    writer.push(token);
                    // The first token goes out at once: time to first token is what users feel;
                    // later tokens are batched by time and size.
                    if writer.buffer.len() >= self.settings.flush_max_tokens || writer.is_first_chunk() {
                        checked = Instant::now();
                        if let Some(ending) = self.flush(lease, writer, LeaseCheck::WhenDue).await? {
                            return Ok(Step::Ended(ending));
                        }
                    }
                }
                Some(Ok(Output::ToolCall(call))) => {
                    spent.streamed.push_str(&call.arguments);
                    calls.push(call)
                }
                Some(Ok(Output::Usage(usage))) => spent.reported(usage),
                Some(Err(err)) => {
                    warn!(error = %err, "the model failed");
                    metrics::count(metrics::name::MODEL_ERRORS, 1, &[Dimension::Model(&model_name)]);
                    if let Some(ending) = self.flush(lease, writer, LeaseCheck::Now).await? {
                        return Ok(Step::Ended(ending));
                    }
                    return Ok(Step::Ended(Ending::Failed(
                        Failure::Model,
                        format!("the model failed: {err}"),
                    )));
                }
                None if calls.is_empty() => {
                    return Ok(Step::Ended(
                        self.flush(lease, writer, LeaseCheck::Now).await?.unwrap_or(Ending::Complete),
                    ));
                }
                None => return Ok(Step::Calls { text, calls }),
            }
        }
    }

    /// Writes the buffered tokens as one chunk, then checks the lease and the cancel flag (when
    /// `check` asks for it), and extends the lease once half of it has passed. `Some` ends the
    /// generation.
    async fn flush(
        &self,
        lease: &mut Lease,
        writer: &mut ChunkWriter,
        check: LeaseCheck,
    ) -> Result<Option<Ending>, RetryLater> {
        if !writer.buffer.is_empty() {
            // Mid-reply, relays poll for the next chunk when it is due.
            let next_at = (check == LeaseCheck::WhenDue).then(|| {
                let next = writer.next_chunk_in(self.settings.flush_interval, self.settings.flush_max_tokens);
                self.store.now_ms() + next.as_millis() as u64
            });
            let outcome = self
                .store
                .append_chunk_expecting(lease, writer.next_seq, writer.next_index, &writer.buffer, next_at)
                .await?;
            if outcome == AppendOutcome::Fenced {
                return Ok(Some(Ending::LeaseLost));
            }
            if let Some(accepted_at) = writer.accepted_at.take() {
                // The reply's first token is stored: what the user waits for.
                let waited = self.store.now_ms().saturating_sub(accepted_at);
                writer.first_token_ms = Some(waited);
                metrics::millis(metrics::name::TIME_TO_FIRST_TOKEN, &[waited as f64], &[]);
            }
            writer.written();
        }
        let half_gone = self.store.now_ms() + self.settings.lease.as_millis() as u64 / 2 >= lease.expires_at;
        let due = writer.lease_read.is_none_or(|at| at.elapsed() >= LEASE_CHECK_EVERY);
        let status = if half_gone {
            self.store.extend_lease(lease, self.settings.lease).await?
        } else if check == LeaseCheck::Now || due {
            self.store.lease_status(lease, false).await?
        } else {
            return Ok(None);
        };
        writer.lease_read = Some(Instant::now());
        Ok(match status {
            LeaseStatus::Lost => Some(Ending::LeaseLost),
            LeaseStatus::Held { cancel_requested: true } => Some(Ending::Stopped),
            LeaseStatus::Held { cancel_requested: false } => None,
        })
    }
}

/// A finished turn's metrics: how it ended, and the tokens it took, by model and by route.
fn turn_metrics(ending: &Ending, lease: &Lease) {
    use metrics::name;
    match ending {
        Ending::Complete | Ending::Capped => metrics::count(name::TURNS_COMMITTED, 1, &[]),
        Ending::Stopped => {
            metrics::count(name::TURNS_COMMITTED, 1, &[]);
            metrics::count(name::TURNS_CANCELLED, 1, &[]);
        }
        Ending::Failed(failure, _) => {
            metrics::count(name::TURNS_FAILED, 1, &[Dimension::Reason(failure.as_str())])
        }
        Ending::LeaseLost => {}
    }
    if let Some(routing) = &lease.routing {
        let by = [Dimension::Model(&routing.model), Dimension::Route(&routing.route)];
        metrics::count(name::INPUT_TOKENS, lease.usage.input, &by);
        metrics::count(name::OUTPUT_TOKENS, lease.usage.output, &by);
    }
}

/// While tokens flow, a flush reads the lease back at most this often: a cancel or a lost lease
/// is noticed within this and one flush. A stalled generator notices at its first flush after
/// the stall, before it writes a second chunk, and a flush that ends a step or the turn always
/// reads it.
const LEASE_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Whether a flush reads the lease back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseCheck {
    /// Always: the flush ends a model step or the turn.
    Now,
    /// Mid-reply: when [`LEASE_CHECK_EVERY`] has passed since the last read.
    WhenDue,
}

/// What one model call consumed: what its provider reported, and what it streamed (for an
/// estimate when it reported nothing).
#[derive(Debug, Default)]
struct Spent {
    reported: Option<chat_core::Usage>,
    streamed: String,
}

impl Spent {
    fn reported(&mut self, usage: chat_core::Usage) {
        *self.reported.get_or_insert_with(Default::default) += usage;
    }

    /// The reported usage, or an estimate with `o200k_base`: the prompt, and what was streamed.
    fn usage(&self, prompt: &Prompt, counter: TokenCounter) -> chat_core::Usage {
        if let Some(usage) = self.reported {
            return usage;
        }
        let usage = chat_core::Usage {
            input: model::prompt_tokens(prompt, counter),
            output: counter.count(&self.streamed) as u64,
            ..Default::default()
        };
        info!(input = usage.input, output = usage.output, "the model reported no usage; estimated");
        usage
    }
}

/// Buffers tokens and tracks where the next chunk goes.
struct ChunkWriter {
    /// When the turn's message was accepted (epoch ms), until its first chunk is written; only
    /// for a turn's first attempt (a takeover's first chunk is not the reply's).
    accepted_at: Option<u64>,
    /// How long after that the first chunk was written (ms).
    first_token_ms: Option<u64>,
    /// When the lease was last read back or extended.
    lease_read: Option<Instant>,
    /// When the last token arrived, and how long after the one before it.
    last_token: Option<Instant>,
    token_gap: Option<Duration>,
    buffer: Vec<String>,
    /// When the oldest buffered token arrived.
    oldest: Option<Instant>,
    next_seq: u32,
    /// The chunk this attempt started at.
    first_seq: u32,
    next_index: u64,
    /// Everything written so far: the reply if it ends now.
    text: String,
    /// Bytes of the tool calls and results written so far (stored with the reply too).
    event_bytes: usize,
}

impl ChunkWriter {
    fn new(lease: &Lease) -> ChunkWriter {
        ChunkWriter {
            accepted_at: None,
            first_token_ms: None,
            lease_read: None,
            last_token: None,
            token_gap: None,
            buffer: Vec::new(),
            oldest: None,
            next_seq: lease.next_seq,
            first_seq: lease.next_seq,
            next_index: lease.resumed_tokens.len() as u64,
            text: lease.resumed_tokens.iter().filter(|t| ReplyEvent::decode(t).is_none()).cloned().collect(),
            event_bytes: lease
                .resumed_tokens
                .iter()
                .filter(|t| t.starts_with(EVENT_MARK))
                .map(String::len)
                .sum(),
        }
    }

    /// Buffers a token of the reply's text.
    fn push(&mut self, mut token: String) {
        if token.is_empty() {
            return;
        }
        // A text token must never read as an event (see `chat_core::EVENT_MARK`).
        if token.starts_with(EVENT_MARK) {
            token.replace_range(..EVENT_MARK.len_utf8(), "\u{fffd}");
        }
        let now = Instant::now();
        if let Some(previous) = self.last_token {
            self.token_gap = Some(now - previous);
        }
        self.last_token = Some(now);
        self.oldest.get_or_insert(now);
        self.buffer.push(token);
    }

    /// When, counting from now (a chunk just written), the next chunk is due at the earliest: a
    /// flush interval after the next token, or sooner when tokens come fast enough to fill a
    /// chunk first. Unknown before two tokens have been seen: a flush interval.
    fn next_chunk_in(&self, flush_interval: Duration, flush_max_tokens: usize) -> Duration {
        match self.token_gap {
            Some(gap) => (gap + flush_interval).min(gap.saturating_mul(flush_max_tokens.max(1) as u32)),
            None => flush_interval,
        }
    }

    /// Buffers a tool call or result: an entry of the sequence, but not part of the text.
    fn push_event(&mut self, event: ReplyEvent) {
        self.oldest.get_or_insert_with(Instant::now);
        self.buffer.push(event.encode());
    }

    /// Bytes of the reply so far, buffered tokens included (tool events count too: they are
    /// stored with it).
    fn bytes(&self) -> usize {
        self.text.len() + self.event_bytes + self.buffered_bytes()
    }

    /// Bytes waiting to be written.
    fn buffered_bytes(&self) -> usize {
        self.buffer.iter().map(String::len).sum()
    }

    /// Whether nothing has been written yet in this attempt.
    fn is_first_chunk(&self) -> bool {
        self.next_seq == self.first_seq
    }

    fn written(&mut self) {
        self.next_seq += 1;
        self.next_index += self.buffer.len() as u64;
        for token in self.buffer.drain(..) {
            if token.starts_with(EVENT_MARK) {
                self.event_bytes += token.len();
            } else {
                self.text.push_str(&token);
            }
        }
        self.oldest = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_directives_are_refused_by_a_build_without_them_and_off_unless_asked() {
        assert!(faults_setting(true, false).unwrap_err().problem.contains("test builds only"));
        assert_eq!(faults_setting(false, false), Ok(false));
        assert_eq!(faults_setting(false, true), Ok(false));
        assert_eq!(faults_setting(true, true), Ok(true));
    }
}
