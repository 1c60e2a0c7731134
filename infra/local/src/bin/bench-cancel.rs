//! `make bench-cancel`: a stop that stops the bill.
//!
//! Runs turns (50 by default) through the real store, generator (its OpenAI provider) and
//! stream relay against a fresh DynamoDB emulator and a fake OpenAI server that keeps
//! connections alive, chunks its streams (as real APIs do) and records when the client closed
//! each connection. Each turn is cancelled at a random point of one of three phases, in turn:
//! - before the first token: the model thinks for `BENCH_SILENCE_MS` (4 s) first;
//! - mid-reply: `BENCH_REPLY_TOKENS` (200) tokens at `BENCH_TOKEN_DELAY_MS` (50 ms) each;
//! - during a tool step: the model calls the calculator, which takes `BENCH_TOOL_MS` (5 s).
//!
//! The cancel is the write ingest's `POST /sessions/{id}/cancel` makes (`Store::request_cancel`),
//! made here directly; "answered" is when that write returned. It reports, as percentiles:
//! - cancel answered → the model's connection closed by the generator (as the fake server saw
//!   its FIN or reset), for the phases with a stream open;
//! - cancel answered → the stopped reply committed (the generator's run ends), and → its
//!   `message_end` read by an SSE client;
//! - the usage each stopped turn's `message_end` carried, beside the tokens streamed before
//!   the stop; and that a tool step cancelled made no further model call.
//!
//! It exits non-zero if a turn went wrong: not stopped, no usage, a stream left open.

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use chat_core::config::Env;
use chat_core::job::TurnMessage;
use chat_core::{
    CancelOutcome, NewMessage, Outcome, Read, ReplyEvent, SendOutcome, SessionId, StoreOptions, Turn, UserId,
};
use chat_local::fake_llm::{self, Ended, FakeLlm};
use futures::stream::StreamExt;
use generator::llm::openai::OpenAiSettings;
use generator::llm::{Model, OpenAi, RetryPolicy};
use generator::tools::Tools;
use lambda_http::RequestExt;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    BeforeFirstToken,
    MidReply,
    ToolStep,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::BeforeFirstToken, Phase::MidReply, Phase::ToolStep];

    fn name(self) -> &'static str {
        match self {
            Phase::BeforeFirstToken => "before the first token",
            Phase::MidReply => "mid-reply",
            Phase::ToolStep => "during a tool step",
        }
    }
}

struct Config {
    turns: usize,
    reply_tokens: usize,
    token_delay: Duration,
    silence: Duration,
    tool_delay: Duration,
    seed: u64,
}

/// One cancelled turn, its times counted from the cancel's answer.
struct Sample {
    phase: Phase,
    closed: Option<Duration>,
    committed: Duration,
    message_end: Duration,
    streamed_tokens: usize,
    usage: Value,
}

/// A small deterministic generator (xorshift64*), so a run can be repeated with `BENCH_SEED`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        bound.mul_f64((x >> 11) as f64 / (1u64 << 53) as f64)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

fn row(label: &str, durations: impl Iterator<Item = Duration>) {
    let mut ms: Vec<f64> = durations.map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "  {label:<34} {:>4}   p50 {:>5.0}   p90 {:>5.0}   p99 {:>5.0}   max {:>5.0}",
        ms.len(),
        percentile(&ms, 50.0),
        percentile(&ms, 90.0),
        percentile(&ms, 99.0),
        ms.last().copied().unwrap_or(f64::NAN)
    );
}

#[tokio::main]
async fn main() -> BenchResult<()> {
    let env = Env::process();
    let config = Config {
        turns: env.parse_or("BENCH_TURNS", 50)?,
        reply_tokens: env.parse_or("BENCH_REPLY_TOKENS", 200)?,
        token_delay: env.millis_or("BENCH_TOKEN_DELAY_MS", Duration::from_millis(50))?,
        silence: env.millis_or("BENCH_SILENCE_MS", Duration::from_secs(4))?,
        tool_delay: env.millis_or("BENCH_TOOL_MS", Duration::from_secs(5))?,
        seed: env.parse_or("BENCH_SEED", 21)?,
    };
    println!(
        "bench-cancel: {} turns, cancelled {} in turn; {}-token replies at {:.0} tokens/s, {:?} of silence, a {:?} tool; seed {}\n",
        config.turns,
        Phase::ALL.map(Phase::name).join(", "),
        config.reply_tokens,
        1.0 / config.token_delay.as_secs_f64(),
        config.silence,
        config.tool_delay,
        config.seed
    );
    let samples = run(&config).await?;

    println!("{:<37}{:>4}", "times from the cancel answered (ms)", "n");
    println!("model connection closed by the generator");
    for phase in [Phase::BeforeFirstToken, Phase::MidReply] {
        row(phase.name(), samples.iter().filter(|s| s.phase == phase).filter_map(|s| s.closed));
    }
    row("all", samples.iter().filter_map(|s| s.closed));
    println!("stopped reply committed");
    for phase in Phase::ALL {
        row(phase.name(), samples.iter().filter(|s| s.phase == phase).map(|s| s.committed));
    }
    row("all", samples.iter().map(|s| s.committed));
    println!("message_end read by an SSE client");
    row("all", samples.iter().map(|s| s.message_end));

    println!("\nusage in message_end of the stopped turns (mean per turn)");
    for phase in Phase::ALL {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.phase == phase).collect();
        let mean = |f: &dyn Fn(&Sample) -> f64| of.iter().map(|s| f(s)).sum::<f64>() / of.len().max(1) as f64;
        let field = |s: &Sample, name: &str| s.usage[name].as_u64().unwrap_or(0) as f64;
        println!(
            "  {:<34} input {:>5.1}   output {:>5.1}   tokens streamed before the stop {:>5.1}",
            phase.name(),
            mean(&|s| field(s, "input_tokens")),
            mean(&|s| field(s, "output_tokens")),
            mean(&|s| s.streamed_tokens as f64),
        );
    }
    println!("  every stopped turn's message_end carried its usage; no tool step called the model again");
    Ok(())
}

async fn run(config: &Config) -> BenchResult<Vec<Sample>> {
    let table = "bench";
    let dynamo = chat_local::LocalDynamo::start(0, table).await?;
    let store = dynamo.store(table, StoreOptions::default());
    let server = FakeLlm::start_keep_alive(vec![fake_llm::openai_reply(&["unused"], Duration::ZERO)]).await?;
    let provider = OpenAi::new(OpenAiSettings {
        base_url: format!("{}/v1", server.url),
        api_key: Some("sk-bench".to_owned()),
        model: "fake".to_owned(),
        temperature: None,
        max_tokens: 1024,
        max_tokens_field: "max_tokens",
        connect_timeout: Duration::from_secs(2),
        stream_usage: true,
    })?;
    let policy = RetryPolicy { idle_timeout: Duration::from_secs(60), ..RetryPolicy::default() };
    // The deployed defaults (lease, flush), a shorter tool deadline.
    let generator = Arc::new(
        generator::Generator::new(
            store.clone(),
            Model::new(Arc::new(provider), policy),
            generator::GenerationSettings { tool_deadline: Duration::from_secs(60), ..Default::default() },
        )
        .with_tools(Tools::builtin().with_call_delay(config.tool_delay)),
    );
    let relay = stream::Relay::new(
        store.clone(),
        stream::RelaySettings { max_open_streams: 0, ..Default::default() },
        chat_auth::Authenticator::trusted(),
    );
    let tokens = vec!["word "; config.reply_tokens];
    let mut rng = Rng(config.seed.max(1));
    let mut samples = Vec::new();
    for n in 0..config.turns {
        let phase = Phase::ALL[n % Phase::ALL.len()];
        let (script, window) = match phase {
            Phase::BeforeFirstToken => (
                vec![fake_llm::openai_reply_after(config.silence, &tokens, config.token_delay)],
                config.silence.mul_f64(0.8),
            ),
            Phase::MidReply => (
                vec![fake_llm::openai_reply(&tokens, config.token_delay)],
                (config.token_delay * config.reply_tokens as u32).mul_f64(0.8),
            ),
            Phase::ToolStep => (
                vec![
                    fake_llm::openai_tool_calls(
                        "Let me check. ",
                        &[("c1", "calculator", r#"{"expression":"6*7"}"#)],
                    ),
                    fake_llm::openai_reply(&["It is 42."], Duration::ZERO),
                ],
                config.tool_delay.mul_f64(0.8),
            ),
        };
        server.script(script);
        let asked_before = server.requests().len();
        let (session, turn) = send(&store, n).await?;

        // The SSE client connects first, as a browser would right after the 202.
        let request = lambda_http::http::Request::builder()
            .uri(format!("/sessions/{session}/stream"))
            .body(lambda_http::Body::Empty)?
            .with_query_string_parameters(HashMap::from([("turn".to_owned(), turn.to_string())]));
        let response = relay.handle(request).await;
        let reader = tokio::spawn(async move {
            let body = http_body_util::BodyDataStream::new(response.into_body()).boxed();
            let mut events = chat_local::sse_reader::SseStream::from_bytes(body);
            let mut streamed = 0;
            while let Ok(Some(event)) = events.next().await {
                match event.event.as_str() {
                    "token" => streamed += 1,
                    "message_end" => return Some((Instant::now(), streamed, event.data)),
                    _ => {}
                }
            }
            None
        });
        let running = generator.clone();
        let run = tokio::spawn(async move {
            let failures = running.handle(job(session, turn)).await.batch_item_failures;
            (Instant::now(), failures.is_empty())
        });

        // The phase begins; the cancel lands at a random point of it.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let begun = match phase {
                Phase::BeforeFirstToken => server.requests().len() > asked_before,
                Phase::MidReply => !entries(&store, session, turn).await?.is_empty(),
                Phase::ToolStep => entries(&store, session, turn)
                    .await?
                    .iter()
                    .any(|e| ReplyEvent::decode(e).is_some_and(|e| e.event == "tool_call")),
            };
            if begun {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("turn {n}: {} never began", phase.name()).into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(rng.below(window)).await;
        let outcome = store.request_cancel(session, None).await?;
        let answered = Instant::now();
        if !matches!(outcome, CancelOutcome::Requested { .. }) {
            return Err(format!("turn {n}: the cancel was refused: {outcome:?}").into());
        }

        let streaming = server.requests().len() - 1;
        let closed = match phase {
            Phase::ToolStep => None,
            _ => match server.ended_by(streaming, answered + Duration::from_secs(30)).await {
                Some(Ended::ByClient(at)) => Some(at.saturating_duration_since(answered)),
                other => {
                    return Err(format!(
                        "turn {n}: the model's stream was not closed by the generator: {other:?}"
                    )
                    .into())
                }
            },
        };
        let (committed_at, ok) = run.await?;
        if !ok {
            return Err(format!("turn {n}: the generator reported a failure").into());
        }
        if phase == Phase::ToolStep && server.requests().len() != asked_before + 1 {
            return Err(format!("turn {n}: the model was called again after the cancel").into());
        }
        let Some((ended_at, streamed_tokens, data)) = reader.await? else {
            return Err(format!("turn {n}: no message_end").into());
        };
        let data: Value = serde_json::from_str(&data)?;
        if data["stopped"] != true || data["reason"] != "cancelled" {
            return Err(format!("turn {n}: not stopped by the cancel: {data}").into());
        }
        let usage = data["usage"].clone();
        if !usage.is_object() || usage["input_tokens"].as_u64().unwrap_or(0) == 0 {
            return Err(format!("turn {n}: message_end without the usage: {data}").into());
        }
        samples.push(Sample {
            phase,
            closed,
            committed: committed_at.saturating_duration_since(answered),
            message_end: ended_at.saturating_duration_since(answered),
            streamed_tokens,
            usage,
        });
    }
    Ok(samples)
}

/// Sends and commits a message opening session `n`.
async fn send(store: &chat_core::Store, n: usize) -> BenchResult<(SessionId, Turn)> {
    let user = UserId::parse(&format!("bench-{n}"))?;
    let message = NewMessage {
        user: &user,
        session: None,
        content: "What is six times seven?",
        client_message_id: None,
        by: "bench",
    };
    let SendOutcome::Accepted(ticket) = store.send_message(message).await? else {
        return Err("send was not accepted".into());
    };
    let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "bench").await? else {
        return Err("commit was refused".into());
    };
    Ok((ticket.session_id, ticket.turn))
}

/// The SQS event of a reply job for the turn.
fn job(session: SessionId, turn: Turn) -> SqsEvent {
    let mut message = SqsMessage::default();
    message.message_id = Some(format!("bench-{session}"));
    message.body = Some(serde_json::to_string(&TurnMessage::reply(session, turn)).expect("a job serialises"));
    let mut event = SqsEvent::default();
    event.records = vec![message];
    event
}

/// The stored entries of the turn's reply so far.
async fn entries(store: &chat_core::Store, session: SessionId, turn: Turn) -> BenchResult<Vec<String>> {
    let chunks = store.read_chunks(session, turn, None, Read::Consistent).await?;
    Ok(chunks.into_iter().flat_map(|c| c.tokens).collect())
}
