//! The generator: answers one turn per SQS record. It claims the turn with a lease, has the
//! model write the reply (calling tools on the way) into DynamoDB as batched chunks, and commits
//! the reply while it still holds the lease; a duplicate delivery finds nothing to claim and is
//! acknowledged. This file is the orchestration; the steps live beside it:
//!
//! - `reply.rs`: the prompt, and the model → tool → model loop of one turn;
//! - `writer.rs`: the `TurnWriter`: the reply's chunks, their flushes, the lease checks, and the
//!   reply as it grows;
//! - `summary.rs`: the summary job of a session that went idle;
//! - `faults.rs`: the test directives (`DEMO_FAULTS`);
//! - `llm/`, `tools/`, `routing.rs`, `memory.rs`: the providers, the tools, which model answers,
//!   and which history it sees;
//! - `model_config.rs`: the model variables, read at cold start;
//! - `pricing.rs`: what a reply costs, by the configured prices (`MODEL_PRICES`).

mod faults;
pub mod llm;
pub mod memory;
pub mod model_config;
pub mod pricing;
mod reply;
pub mod routing;
mod summary;
mod title;
pub mod tools;
mod writer;

pub use faults::{faults_setting, FAULTS_BUILT};

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use chat_core::config::{CommonConfig, ConfigError, Env};
use chat_core::job::{Job, TurnMessage};
use chat_core::{ClaimOutcome, Conflict, Lease, Outcome, Read, Store, StoreError, Usage};
use chat_runtime::metrics::{self, Dimension};
use memory::{MemoryLimits, TokenCounter};
use reply::{Ending, PromptOutcome};
use routing::Routes;
use std::time::Duration;
use tracing::{info, warn, Instrument};
use writer::TurnWriter;

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

impl Default for GenerationSettings {
    /// What the function runs with when nothing is set: `LEASE_MS` 30 s, 3 attempts, a flush
    /// every 150 ms or 32 tokens, replies up to 300,000 bytes, tool steps for 120 s.
    fn default() -> Self {
        GenerationSettings {
            lease: Duration::from_secs(30),
            max_generation_attempts: 3,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            flush_max_tokens: 32,
            faults: false,
            system_prompt: None,
            memory: MemoryLimits::default(),
            reply_max_bytes: 300_000,
            tool_deadline: Duration::from_secs(120),
        }
    }
}

/// The largest `REPLY_MAX_BYTES`: a message item also carries its keys and attributes, and must
/// stay under DynamoDB's 400 KB.
pub const REPLY_MAX_BYTES_CEILING: usize = 380_000;

/// `FLUSH_INTERVAL_MS` unless set: with relays polling when a chunk is due, the median token
/// reaches a reader ~90 ms after the model gave it, p99 ~160 ms, at ~64 chunk writes for a
/// 10-second reply (`make bench-turn`; goals p50 <= 100, p99 <= 250).
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(150);

/// The generator function's dependencies, built once per cold start.
pub struct Generator {
    store: Store,
    routes: Routes,
    tools: tools::Tools,
    settings: GenerationSettings,
    counter: TokenCounter,
    prices: pricing::Prices,
    /// Title a session from its first exchange with the small model (`SESSION_TITLES=model`).
    model_titles: bool,
}

/// Why a record should be delivered again.
#[derive(Debug, thiserror::Error)]
#[error("retry later: {0}")]
struct RetryLater(#[from] StoreError);

impl Generator {
    /// Reads the configuration and builds the clients.
    pub async fn from_env() -> Result<Generator, ConfigError> {
        let env = Env::process();
        let common = CommonConfig::from_env(&env)?;
        let faults = faults_setting(env.parse_or("DEMO_FAULTS", false)?, FAULTS_BUILT)?;
        let model_config = model_config::ModelConfig::from_env(&env, faults)?;
        let defaults = GenerationSettings::default();
        let settings = GenerationSettings {
            lease: common.lease,
            max_generation_attempts: common.max_generation_attempts,
            flush_interval: env.millis_or("FLUSH_INTERVAL_MS", defaults.flush_interval)?,
            flush_max_tokens: env.parse_or("FLUSH_MAX_TOKENS", defaults.flush_max_tokens)?,
            reply_max_bytes: match env.parse_or("REPLY_MAX_BYTES", defaults.reply_max_bytes)? {
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
            tool_deadline: env.millis_or("TOOL_DEADLINE_MS", defaults.tool_deadline)?,
        };
        let tools = tools::Tools::from_env(&env)?;
        let prices = pricing::Prices::parse(&env.optional("MODEL_PRICES").unwrap_or_default())?;
        let aws = chat_runtime::aws::load_config().await;
        let routes = model_config.build_routes(&aws).await?;
        info!(model = %model_config.describe(), "model ready");
        let store = Store::new(chat_runtime::aws::dynamodb(&aws), common.table_name, common.store);
        let model_titles = match env.optional("SESSION_TITLES").as_deref() {
            None | Some("model") => true,
            Some("words") => false,
            Some(other) => {
                return Err(ConfigError {
                    variable: "SESSION_TITLES".to_owned(),
                    problem: format!(
                        "is {other:?}; use model (the small model, when routing has one) or words"
                    ),
                })
            }
        };
        Ok(Generator::new(store, routes, settings)
            .with_tools(tools)
            .with_prices(prices)
            .with_model_titles(model_titles))
    }

    /// A generator over explicit parts. The tokenizer is decoded only if a turn needs an exact count.
    pub fn new(store: Store, routes: impl Into<Routes>, settings: GenerationSettings) -> Generator {
        Generator {
            store,
            routes: routes.into(),
            tools: tools::Tools::none(),
            settings,
            counter: TokenCounter::o200k(),
            prices: pricing::Prices::default(),
            model_titles: false,
        }
    }

    /// The same generator titling sessions from their first exchange with the small model, when
    /// routing has one.
    pub fn with_model_titles(mut self, on: bool) -> Generator {
        self.model_titles = on;
        self
    }

    /// The same generator pricing its replies by `prices` (with none, replies have no cost).
    pub fn with_prices(mut self, prices: pricing::Prices) -> Generator {
        self.prices = prices;
        self
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
            if faults::delivery_lost(&self.store, self.settings.faults, &message).await? {
                warn!("dropping the delivery on purpose ([[lose-delivery]] test directive)");
                return Ok(());
            }
            if message.job == Job::Summary {
                return Ok(self.summarize(&message).await?);
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
                ClaimOutcome::Ended { current } => {
                    // The turn's last holder stalled past its last attempt: this delivery ended
                    // it, as the sweeper would have, so it counts and gives back as the sweeper does.
                    info!(outcome = "timeout", "turn ended");
                    metrics::count(metrics::name::TURNS_TIMED_OUT, 1, &[]);
                    if let Some(session) = current {
                        if let Err(err) = self.store.close_turn_slot(&session.user_id, session.id).await {
                            warn!(error = %err, "could not give back the turn's slot; it lapses on its own");
                        }
                    }
                    Ok(())
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Writes the claimed turn's reply, then ends the turn: commits the reply, or fails the turn,
    /// or leaves it to the holder that took it over.
    async fn generate(&self, lease: Lease) -> Result<(), RetryLater> {
        // After a takeover: the tool steps an earlier holder took (part of this reply too), and
        // the text it wrote after them.
        let tools::Replayed { exchanges, text_after, tool_uses } = tools::replay(&lease.resumed_tokens);
        let mut writer = TurnWriter::new(&self.store, &self.settings, lease, tool_uses);
        let ending = if writer.lease().cancel_requested {
            Ending::Stopped
        } else {
            match self.prompt(writer.lease(), exchanges, text_after).await? {
                PromptOutcome::Ready { prompt, accepted_at } => {
                    writer.time_first_token_from(accepted_at);
                    self.stream_reply(&mut writer, prompt).await?
                }
                PromptOutcome::Unanswerable(reason) => Ending::Failed(reply::Failure::Prompt, reason),
            }
        };
        self.finish(&writer, ending).await
    }

    /// Ends the turn as `ending` says, in one transition that also charges what the model
    /// consumed; a turn that moved on meanwhile is abandoned.
    async fn finish(&self, writer: &TurnWriter<'_>, ending: Ending) -> Result<(), RetryLater> {
        let lease = writer.lease();
        let outcome = match &ending {
            Ending::LeaseLost => {
                info!("lease lost; leaving the turn to its new holder, if the session still exists");
                return self.abandon(lease, writer.usage()).await;
            }
            Ending::Complete | Ending::Stopped | Ending::Capped => {
                self.store.commit_reply(lease, &writer.reply(ending.stop_reason())).await?
            }
            Ending::Failed(_, reason) => {
                let Some(current) = self.store.get_session(lease.session_id, Read::Consistent).await? else {
                    return self.abandon(lease, writer.usage()).await;
                };
                if current.version != lease.version {
                    return self.abandon(lease, writer.usage()).await;
                }
                self.store.fail_generation(lease, &current, reason, writer.usage()).await?
            }
        };
        match outcome {
            Outcome::Applied(_) => {
                let usage = writer.usage();
                info!(
                    outcome = ending.outcome(),
                    ttft_ms = writer.first_token_ms(),
                    tokens = writer.tokens_stored(),
                    chunks = writer.chunks_stored(),
                    input = usage.input,
                    output = usage.output,
                    cache_read = usage.cache_read,
                    cache_write = usage.cache_write,
                    cost_usd = writer.cost_usd(),
                    "turn finished"
                );
                turn_metrics(&ending, writer);
                self.give_back_turn_slot(lease).await;
                if matches!(ending, Ending::Complete) {
                    self.write_title(lease, &writer.reply(None).text).await;
                }
            }
            Outcome::Conflict(Conflict { current: None }) => {
                return self.abandon(lease, writer.usage()).await
            }
            Outcome::Conflict(conflict) => {
                warn!(?conflict, "the turn moved on before it could be finished");
                return self.abandon(lease, writer.usage()).await;
            }
        }
        Ok(())
    }

    /// This lease's turn ended without its transition (the lease was lost, the session deleted
    /// or moved on): what the model consumed under it is still charged to the user, once for the
    /// lease, since the transition that would have carried the charge will not happen. Then what
    /// a deleted session left behind is cleared.
    async fn abandon(&self, lease: &Lease, spent: Usage) -> Result<(), RetryLater> {
        let marker = format!("{}:{}:{}", lease.session_id, lease.turn, lease.owner);
        if let Err(err) = self.store.charge_once(&lease.user, &marker, spent.total()).await {
            warn!(error = %err, "could not charge what an abandoned turn consumed");
        }
        // A turn another generator took over is still in flight and keeps its slot; one whose
        // session is gone does not.
        if self.store.get_session(lease.session_id, Read::Consistent).await?.is_none() {
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
}

/// A finished turn's metrics: how it ended, and the tokens it took, by model and by route.
fn turn_metrics(ending: &Ending, writer: &TurnWriter<'_>) {
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
    if let Some(routing) = writer.routing() {
        let usage = writer.usage();
        let by = [Dimension::Model(&routing.model), Dimension::Route(&routing.route)];
        metrics::count(name::INPUT_TOKENS, usage.input, &by);
        metrics::count(name::OUTPUT_TOKENS, usage.output, &by);
        metrics::count(name::CACHE_READ_TOKENS, usage.cache_read, &by);
        metrics::count(name::CACHE_WRITE_TOKENS, usage.cache_write, &by);
    }
}
