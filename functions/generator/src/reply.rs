//! A turn's reply: what the model is asked, then the model → tool → model loop that streams the
//! reply into the [`TurnWriter`].

use crate::faults;
use crate::llm::{Exchange, Model, Output, Prompt, Spent, ToolCall};
use crate::memory;
use crate::tools;
use crate::writer::{Halt, LeaseCheck, TurnWriter};
use crate::Generator;
use chat_core::{Lease, Role, StopReason, StoreError};
use chat_runtime::metrics::{self, Dimension};
use futures::StreamExt;
use tokio::time::Instant;
use tracing::{info, warn};

/// The most tool calls of one step that are read at all (OpenAI's stream refuses call indexes
/// past 64 too).
const MAX_CALLS_SEEN: usize = 64;

/// While a tool runs or the model is silent (thinking, retrying, or between slow tokens), how
/// often the turn's lease is looked after (at most a quarter of it): a cancel is seen this soon,
/// so the model's stream closes within a second of it (what the model bills stops there), and
/// the lease is extended before it lapses. Each look is an eventually consistent read of the
/// session (half a read unit): one unit per second of waiting.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(500);

/// The prompt for a turn, or why there can be none (the turn then ends in `error`).
pub(crate) enum PromptOutcome {
    /// The prompt, and when the turn's message was accepted (epoch ms).
    Ready {
        prompt: Prompt,
        accepted_at: Option<u64>,
    },
    Unanswerable(String),
}

/// How a generation ended.
pub(crate) enum Ending {
    Complete,
    Stopped,
    /// The reply reached `reply_max_bytes`.
    Capped,
    Failed(Failure, String),
    LeaseLost,
}

impl Ending {
    /// What the user got, for the turn's log line.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Ending::Complete => "committed",
            Ending::Stopped => "stopped",
            Ending::Capped => "reply_limit",
            Ending::Failed(..) => "error",
            Ending::LeaseLost => "lease_lost",
        }
    }

    /// Why a committed reply was cut short, if it was.
    pub(crate) fn stop_reason(&self) -> Option<StopReason> {
        match self {
            Ending::Stopped => Some(StopReason::Cancelled),
            Ending::Capped => Some(StopReason::ReplyLimit),
            _ => None,
        }
    }
}

impl From<Halt> for Ending {
    fn from(halt: Halt) -> Ending {
        match halt {
            Halt::LeaseLost => Ending::LeaseLost,
            Halt::Cancelled => Ending::Stopped,
            Halt::Capped => Ending::Capped,
        }
    }
}

/// Why a generation failed, as the failed-turn metric names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The model failed (after its retries, or after the first token).
    Model,
    /// The turn cannot be asked: its message does not fit the prompt budget, or is missing.
    Prompt,
}

impl Failure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Failure::Model => "model",
            Failure::Prompt => "prompt",
        }
    }
}

/// How one model call of a turn ended.
enum Step {
    /// The turn is over (or must stop).
    Ended(Ending),
    /// The model asked for tools, after writing `text` in this step.
    Calls { text: String, calls: Vec<ToolCall> },
}

/// A writer's halt ends the step.
fn halted(halt: Option<Halt>) -> Option<Step> {
    halt.map(|halt| Step::Ended(halt.into()))
}

impl Generator {
    /// What the model is asked: the system prompt and as much recent history as the memory
    /// limits allow, ending with this turn's user message; or why the turn cannot proceed. When
    /// the session has a summary, it stands in for the turns before the one it ends with.
    /// `exchanges` and `resumed` are what an earlier holder of the turn already wrote.
    pub(crate) async fn prompt(
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
        let (system, selected) =
            match memory::select(messages, lease.turn, system.as_deref(), limits, self.counter) {
                Ok(selected) => (system, selected),
                // Ingest admits a message against the system prompt alone: one that leaves the summary
                // no room is answered without it, rather than failing a turn that was accepted.
                Err(_) if lease.summary.is_some() => {
                    let plain = self.settings.system_prompt.clone();
                    let mut messages = self.store.recent_messages(lease.session_id, lease.turn, 1).await?;
                    messages.retain(|m| m.id.turn == lease.turn);
                    match memory::select(messages, lease.turn, plain.as_deref(), limits, self.counter) {
                        Ok(selected) => (plain, selected),
                        Err(err) => return Ok(PromptOutcome::Unanswerable(err.to_string())),
                    }
                }
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
    pub(crate) async fn stream_reply(
        &self,
        writer: &mut TurnWriter<'_>,
        mut prompt: Prompt,
    ) -> Result<Ending, StoreError> {
        let crash_after = faults::crash_after(&prompt, self.settings.faults, writer.first_claim());
        let message = prompt.messages.last().map_or("", |(_, text)| text.as_str());
        let mut steps = tools::steps(&prompt.exchanges);
        let (mut model, routing) = self.routes.pick(message, steps > 0);
        info!(route = %routing.route, model = %routing.model, "routed");
        writer.route(routing);
        let deadline = Instant::now() + self.settings.tool_deadline;
        loop {
            let tools_left = steps < self.tools.max_steps && Instant::now() < deadline;
            // The tools stay described after the last step (a provider must know what the
            // earlier steps called), but the model is told to answer now.
            prompt.tools = self.tools.specs();
            prompt.must_answer = !tools_left;
            let (text, calls) = match self.stream_step(writer, model, &prompt, crash_after).await? {
                Step::Ended(ending) => return Ok(ending),
                // Calls nobody offered (a model past its last step calling anyway) end the turn
                // with what it wrote, rather than looping.
                Step::Calls { .. } if prompt.tools.is_empty() || prompt.must_answer => {
                    warn!("the model called tools that were not offered; ending the turn with its text");
                    return Ok(writer.flush(LeaseCheck::Now).await?.map_or(Ending::Complete, Ending::from));
                }
                Step::Calls { text, calls } => (text, calls),
            };
            steps += 1;
            // A turn that needs tools is the main model's: the small one hands it over here.
            if let Some((main, routing)) = self.routes.escalate(writer.routing()) {
                info!(model = %routing.model, "the small model asked for a tool; the main model goes on");
                model = main;
                writer.route(routing);
            }
            // Which calls run is decided before anything is stored: past the step's cap, or with
            // over-long arguments, a call is answered with an error, unrun, and stored without
            // its arguments; so are calls past the turn's tool bytes or its deadline.
            let planned = self.plan_calls(calls);
            let calls: Vec<ToolCall> = planned.iter().map(|(call, _)| call.clone()).collect();
            for call in &calls {
                if let Some(halt) = writer.push_event(tools::call_event(call)).await? {
                    return Ok(halt.into());
                }
            }
            if let Some(halt) = writer.flush(LeaseCheck::Now).await? {
                return Ok(halt.into());
            }
            prompt.exchanges.push(Exchange::Assistant { text, calls });
            for (call, refusal) in planned {
                let answer = match refusal {
                    Some(refusal) => tools::ToolAnswer { content: refusal, is_error: true },
                    None if prompt.tools.iter().any(|t| t.name == call.name) => {
                        match self.run_tool_holding_the_lease(writer, &call, deadline).await? {
                            Ok(answer) => answer,
                            Err(halt) => return Ok(halt.into()),
                        }
                    }
                    None => tools::ToolAnswer {
                        content: format!("{} is not offered now", call.name),
                        is_error: true,
                    },
                };
                info!(tool = %call.name, is_error = answer.is_error, "tool called");
                let tool = tools::Tools::metric_name(&call.name);
                metrics::count(metrics::name::TOOL_CALLS, 1, &[Dimension::Tool(tool)]);
                writer.record_tool_use(tools::tool_use(&call, &answer));
                let event = tools::result_event(&call, &answer);
                prompt.exchanges.push(Exchange::ToolResult {
                    call_id: call.id,
                    name: call.name,
                    content: answer.content,
                    is_error: answer.is_error,
                });
                if let Some(halt) = writer.push_event(event).await? {
                    return Ok(halt.into());
                }
            }
            if let Some(halt) = writer.flush(LeaseCheck::Now).await? {
                return Ok(halt.into());
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

    /// Runs a call ([`Generator::run_tool`]) while keeping the turn's lease: a tool may take longer
    /// than what is left of it, and a lease that lapsed would let a second generator take the
    /// turn over and run the same calls again. Every [`HEARTBEAT`] (at most a quarter of
    /// the lease) the writer extends the lease once half of it has gone, and reads it back;
    /// a cancel or a lost lease stops the call and the turn.
    async fn run_tool_holding_the_lease(
        &self,
        writer: &mut TurnWriter<'_>,
        call: &ToolCall,
        deadline: Instant,
    ) -> Result<Result<tools::ToolAnswer, Halt>, StoreError> {
        let heartbeat = HEARTBEAT.min(self.settings.lease / 4);
        let running = self.run_tool(writer.tool_bytes(), call, deadline);
        tokio::pin!(running);
        loop {
            tokio::select! {
                answer = &mut running => return Ok(Ok(answer)),
                _ = tokio::time::sleep(heartbeat) => {
                    if let Some(halt) = writer.flush(LeaseCheck::WhenDue).await? {
                        return Ok(Err(halt));
                    }
                }
            }
        }
    }

    /// Runs a call within what is left of the turn's tool bytes (`TOOL_MAX_BYTES_PER_TURN`,
    /// counted over the calls and answers the turn stored, `used` so far, so a takeover keeps
    /// the count) and its tool deadline; a call with neither left is answered with an error,
    /// unrun.
    async fn run_tool(&self, used: usize, call: &ToolCall, deadline: Instant) -> tools::ToolAnswer {
        let refused = |content: String| tools::ToolAnswer { content, is_error: true };
        let budget = self.tools.max_bytes_per_turn;
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

    /// One model call of the turn: its tokens go to the writer; it ends the turn, or asks for
    /// tools. What it consumed goes to the writer's usage (and its cost, by the model's price),
    /// however it ends: as the provider reported it, or estimated when it reported nothing (a
    /// provider that does not, or a call cut short by a cancel).
    async fn stream_step(
        &self,
        writer: &mut TurnWriter<'_>,
        model: &Model,
        prompt: &Prompt,
        crash_after: Option<usize>,
    ) -> Result<Step, StoreError> {
        let mut spent = Spent::default();
        let step = self.stream_step_spending(writer, model, prompt, crash_after, &mut spent).await;
        let usage = spent.usage(prompt, self.counter);
        // Priced by the model that answered this call (an escalated turn uses two).
        let cost = writer.routing().and_then(|r| self.prices.cost(&r.model, &usage));
        writer.spent(usage, cost);
        step
    }

    async fn stream_step_spending(
        &self,
        writer: &mut TurnWriter<'_>,
        model: &Model,
        prompt: &Prompt,
        crash_after: Option<usize>,
        spent: &mut Spent,
    ) -> Result<Step, StoreError> {
        let model_name = writer.routing().map_or("model", |r| r.model.as_str()).to_owned();
        let asked = Instant::now();
        let mut first_token = true;
        let mut tokens = model.stream(prompt.clone());
        let mut text = prompt.resumed.concat();
        let mut calls = Vec::new();
        // While the model is silent (thinking, or retrying), the lease is still checked and
        // extended, and a cancel still lands; on any halt, returning drops `tokens`, which
        // closes the model's connection.
        let heartbeat = HEARTBEAT.min(self.settings.lease / 4);
        let mut checked = Instant::now();
        loop {
            faults::crash_if_due(crash_after, writer.tokens_stored());
            let check_at = writer.flush_due().unwrap_or(checked + heartbeat).min(checked + heartbeat);
            let next = tokio::select! {
                next = tokens.next() => next,
                _ = tokio::time::sleep_until(check_at) => {
                    checked = Instant::now();
                    if let Some(step) = halted(writer.flush(LeaseCheck::WhenDue).await?) {
                        return Ok(step);
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
                    if !writer.fits(token.len()) {
                        warn!(bytes = writer.bytes(), "the reply reached REPLY_MAX_BYTES; stopping it there");
                        let halt = writer.flush(LeaseCheck::Now).await?.unwrap_or(Halt::Capped);
                        return Ok(Step::Ended(halt.into()));
                    }
                    text.push_str(&token);
                    spent.streamed.push_str(&token);
                    writer.push(token);
                    if writer.wants_flush() {
                        checked = Instant::now();
                        if let Some(step) = halted(writer.flush(LeaseCheck::WhenDue).await?) {
                            return Ok(step);
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
                    if let Some(step) = halted(writer.flush(LeaseCheck::Now).await?) {
                        return Ok(step);
                    }
                    return Ok(Step::Ended(Ending::Failed(
                        Failure::Model,
                        format!("the model failed: {err}"),
                    )));
                }
                None if calls.is_empty() => {
                    let halt = writer.flush(LeaseCheck::Now).await?;
                    return Ok(Step::Ended(halt.map_or(Ending::Complete, Ending::from)));
                }
                None => return Ok(Step::Calls { text, calls }),
            }
        }
    }
}
