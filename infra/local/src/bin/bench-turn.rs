//! `make bench-turn`: what one turn costs and how fast its tokens reach a client.
//!
//! Runs whole turns (500-token demo replies at 50 tokens/s by default) through the real store,
//! generator and stream code against a fresh DynamoDB emulator, with one SSE client per turn, at
//! several flush intervals (`BENCH_FLUSH_MS`, `100,125,150,175,200`, plus a flush by token count
//! only) and memory sizes, and reports (`BENCH_BURST=5` gives the tokens in bursts of five, as a
//! real provider's arrive several to a network read):
//! - write and read capacity units per turn, from DynamoDB's own consumed-capacity figures;
//! - relay lag per token: the moment the generator receives it from the model (handed to the
//!   chunk writer) to the moment the SSE client reads it, as percentiles;
//! - what a session's idle expiry costs: the sweeper's transitions and the generator's summary
//!   job (measured on the first session of each setting);
//! - the dollars per million turns those units and each function's wall time (GB-seconds at
//!   its memory size) cost at the list prices in `price`, and which setting is cheapest while
//!   the relay lag stays within p50 <= 100 ms and p99 <= 250 ms.
//!
//! The generator and the stream each run on a thread and runtime of their own, as each runs in
//! a process of its own in Lambda. `BENCH_MEMORY_MB` (`256/128,128/128`: generator/stream; one
//! number for both) repeats every setting with each thread held to the CPU share Lambda gives
//! its memory size (a cgroup v1 CFS quota each, which needs root; `none`, the default where
//! quotas cannot be made, runs them unthrottled, priced at the template's sizes), so a smaller size's price comes with the lag it causes. The
//! emulator, ingest and the SSE client run unthrottled; ingest is priced at 256 MB.

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use chat_core::config::Env;
use chat_core::job::TurnMessage;
use chat_core::{NewMessage, Outcome, Read, Role, SendOutcome, StoreOptions, UserId};
use chat_local::cpu::{CpuLimit, GENERATOR_MEMORY_MB, OTHER_MEMORY_MB, STREAM_MEMORY_MB};
use futures::future::BoxFuture;
use futures::stream::StreamExt;
use generator::llm::{DemoModel, Model, ModelError, ModelProvider, Output, Prompt, RetryPolicy, TokenStream};
use lambda_http::RequestExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Wraps a model and notes when each token leaves it for the generator.
struct TimedModel {
    inner: DemoModel,
    handed: Arc<Mutex<Vec<Instant>>>,
    /// Tokens come in bursts of this many, a burst every `pause`, as a real provider's arrive
    /// several to a network read (1: one every token delay, paced by the demo model).
    burst: usize,
    pause: Duration,
}

impl TimedModel {
    fn new(
        reply_tokens: usize,
        token_delay: Duration,
        burst: usize,
        handed: Arc<Mutex<Vec<Instant>>>,
    ) -> Self {
        let burst = burst.max(1);
        // In bursts, the pace is the wrapper's; the demo model then gives its tokens at once.
        let pause = token_delay * burst as u32;
        let token_delay = if burst > 1 { Duration::ZERO } else { token_delay };
        TimedModel { inner: DemoModel { reply_tokens, token_delay, faults: false }, handed, burst, pause }
    }
}

impl ModelProvider for TimedModel {
    fn open(&self, prompt: Arc<Prompt>) -> BoxFuture<'static, Result<TokenStream, ModelError>> {
        let handed = self.handed.clone();
        let opened = self.inner.open(prompt);
        let (burst, pause) = (self.burst, self.pause);
        Box::pin(async move {
            let tokens = opened.await?;
            let mut given = 0usize;
            Ok(tokens
                .then(move |output| {
                    let wait = match &output {
                        Ok(Output::Token(_)) if burst > 1 => {
                            given += 1;
                            (given % burst == 1).then_some(pause)
                        }
                        _ => None,
                    };
                    async move {
                        if let Some(wait) = wait {
                            tokio::time::sleep(wait).await;
                        }
                        output
                    }
                })
                .map(move |output| {
                    // Only text reaches the chunk writer; the closing usage report does not.
                    if let Ok(Output::Token(_)) = &output {
                        handed.lock().unwrap().push(Instant::now());
                    }
                    output
                })
                .boxed())
        })
    }
}

/// us-east-1 list prices, USD, the same as docs/deploy.md's "What 1M turns cost" states.
mod price {
    /// DynamoDB on-demand, per write request unit.
    pub const WRITE_UNIT: f64 = 0.625 / 1e6;
    /// DynamoDB on-demand, per read request unit.
    pub const READ_UNIT: f64 = 0.125 / 1e6;
    /// Lambda (arm64), per request.
    pub const LAMBDA_REQUEST: f64 = 0.20 / 1e6;
    /// Lambda (arm64), per GB-second.
    pub const LAMBDA_GB_SECOND: f64 = 0.000_013_333_4;
    /// SQS standard queue, per request.
    pub const SQS_REQUEST: f64 = 0.40 / 1e6;
    /// Lambda invocations a turn: ingest's POST, the generator's SQS batch, the stream.
    pub const LAMBDA_REQUESTS_PER_TURN: f64 = 3.0;
    /// SQS requests a turn: ingest's send, the event source's receive and delete.
    pub const SQS_REQUESTS_PER_TURN: f64 = 3.0;
}

/// The memory sizes `template.yaml` gives the generator and the stream by default.
const TEMPLATE_MEMORY_MB: Memory = Memory { generator: GENERATOR_MEMORY_MB, stream: STREAM_MEMORY_MB };

/// Each long-lived function's memory size, MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Memory {
    generator: u32,
    stream: u32,
}

impl Memory {
    /// `256/128` (generator/stream), or one size for both.
    fn parse(text: &str) -> Option<Memory> {
        match text.split_once('/') {
            Some((generator, stream)) => Some(Memory {
                generator: generator.trim().parse().ok()?,
                stream: stream.trim().parse().ok()?,
            }),
            None => text.parse().ok().map(|mb| Memory { generator: mb, stream: mb }),
        }
    }
}

/// The relay lag goals a configuration must meet to be a candidate.
const LAG_P50_GOAL_MS: f64 = 100.0;
const LAG_P99_GOAL_MS: f64 = 250.0;

struct Setting {
    name: String,
    flush_interval: Duration,
    flush_max_tokens: usize,
    poll_fast: Duration,
}

#[derive(Default)]
struct Totals {
    write_units: f64,
    ingest_read_units: f64,
    generator_read_units: f64,
    stream_read_units: f64,
    /// Wall time of each function's work, summed over the turns.
    ingest_seconds: f64,
    generator_seconds: f64,
    stream_seconds: f64,
    lags_ms: Vec<f64>,
    /// The turn handed to the generator -> its first token read by the SSE client, per turn.
    first_token_ms: Vec<f64>,
    /// Quota periods in which the CPU quota held the generator and the stream back while they
    /// answered turns (the summary job excluded), and for how long.
    throttled_periods: [u64; 2],
    throttled_time: [Duration; 2],
    throttled_runs: bool,
    turns: usize,
    chunks: usize,
    /// The idle expiry (sweeper) and the summary job (generator) of one session.
    idle_write_units: f64,
    idle_read_units: f64,
}

/// What one turn of a setting costs, per turn.
struct TurnCost {
    write_units: f64,
    read_units: f64,
    gb_seconds: f64,
    lag_p50: f64,
    lag_p99: f64,
}

impl TurnCost {
    /// With each function at its size in `memory`.
    fn of(totals: &Totals, memory: Memory) -> Self {
        let n = totals.turns as f64;
        let mut lags = totals.lags_ms.clone();
        lags.sort_by(f64::total_cmp);
        let gb = |mb: u32| f64::from(mb) / 1024.0;
        let gb_seconds = totals.ingest_seconds * gb(OTHER_MEMORY_MB)
            + totals.generator_seconds * gb(memory.generator)
            + totals.stream_seconds * gb(memory.stream);
        TurnCost {
            write_units: totals.write_units / n,
            read_units: (totals.ingest_read_units + totals.generator_read_units + totals.stream_read_units)
                / n,
            gb_seconds: gb_seconds / n,
            lag_p50: percentile(&lags, 50.0),
            lag_p99: percentile(&lags, 99.0),
        }
    }

    /// (item, units a turn, USD per million turns), the model excluded.
    fn items(&self) -> [(&'static str, String, f64); 5] {
        let million = 1e6;
        [
            (
                "DynamoDB writes",
                format!("{:.1} WRU", self.write_units),
                self.write_units * price::WRITE_UNIT * million,
            ),
            (
                "DynamoDB reads",
                format!("{:.1} RRU", self.read_units),
                self.read_units * price::READ_UNIT * million,
            ),
            (
                "Lambda duration",
                format!("{:.2} GB-s", self.gb_seconds),
                self.gb_seconds * price::LAMBDA_GB_SECOND * million,
            ),
            (
                "Lambda requests",
                format!("{:.0}", price::LAMBDA_REQUESTS_PER_TURN),
                price::LAMBDA_REQUESTS_PER_TURN * price::LAMBDA_REQUEST * million,
            ),
            (
                "SQS requests",
                format!("{:.0}", price::SQS_REQUESTS_PER_TURN),
                price::SQS_REQUESTS_PER_TURN * price::SQS_REQUEST * million,
            ),
        ]
    }

    fn per_million(&self) -> f64 {
        self.items().iter().map(|(_, _, usd)| usd).sum()
    }

    fn meets_lag_goals(&self) -> bool {
        self.lag_p50 <= LAG_P50_GOAL_MS && self.lag_p99 <= LAG_P99_GOAL_MS
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

fn setting(name: String, flush_ms: u64, flush_max_tokens: usize, poll_fast_ms: u64) -> Setting {
    Setting {
        name,
        flush_interval: Duration::from_millis(flush_ms),
        flush_max_tokens,
        poll_fast: Duration::from_millis(poll_fast_ms),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = Env::process();
    let turns: usize = env.parse_or("BENCH_TURNS", 5)?;
    let reply_tokens: usize = env.parse_or("BENCH_REPLY_TOKENS", 500)?;
    let token_delay = env.millis_or("BENCH_TOKEN_DELAY_MS", Duration::from_millis(20))?;
    let burst: usize = env.parse_or("BENCH_BURST", 1)?;
    // The flush is the lever (FLUSH_INTERVAL_MS / FLUSH_MAX_TOKENS). The relay's fast poll
    // (STREAM_POLL_FAST_MS) stays at its default: while tokens flow a relay polls when a chunk is
    // due, whatever it is. An hour's interval means "by token count only".
    let flushes = env.optional("BENCH_FLUSH_MS").unwrap_or_else(|| "100,125,150,175,200".to_owned());
    let default_ms = generator::DEFAULT_FLUSH_INTERVAL.as_millis() as u64;
    let mut settings = Vec::new();
    for ms in flushes.split(',').map(str::trim).filter(|ms| !ms.is_empty()) {
        let ms: u64 = ms.parse().map_err(|_| format!("BENCH_FLUSH_MS: {ms:?} is not a number of ms"))?;
        let name = if ms == default_ms {
            format!("default: flush {ms} ms / 32 tokens")
        } else {
            format!("flush {ms} ms / 32 tokens")
        };
        settings.push(setting(name, ms, 32, 50));
    }
    settings.push(setting("economy: flush every 32 tokens".to_owned(), 3_600_000, 32, 50));
    println!(
        "bench-turn: {turns} turns per setting, {reply_tokens}-token replies at {:.0} tokens/s{}, one SSE client per turn",
        1.0 / token_delay.as_secs_f64(),
        if burst > 1 { format!(" in bursts of {burst}") } else { String::new() }
    );
    println!(
        "prices (us-east-1 list): DynamoDB on-demand ${:.3}/M WRU, ${:.3}/M RRU; Lambda arm64 ${:.2}/M requests, ${:.10}/GB-s; SQS ${:.2}/M requests\n",
        price::WRITE_UNIT * 1e6,
        price::READ_UNIT * 1e6,
        price::LAMBDA_REQUEST * 1e6,
        price::LAMBDA_GB_SECOND,
        price::SQS_REQUEST * 1e6,
    );
    let sizes_asked = env.optional("BENCH_MEMORY_MB").unwrap_or_else(|| {
        if CpuLimit::available() {
            "256/128,128/128".to_owned()
        } else {
            println!(
                "no CPU quotas here (they need root and a cgroup v1 cpu controller): running unthrottled\n"
            );
            "none".to_owned()
        }
    });
    let mut sizes: Vec<Option<Memory>> = Vec::new();
    for size in sizes_asked.split(',').map(str::trim) {
        sizes.push(match size {
            "none" => None,
            mb => Some(Memory::parse(mb).ok_or_else(|| {
                format!("BENCH_MEMORY_MB: {mb:?} is not generator/stream sizes in MB (256/128), one size, or none")
            })?),
        });
    }
    let mut summary = Vec::new();
    for &size in &sizes {
        for setting in &settings {
            let totals = run(setting, size, turns, reply_tokens, token_delay, burst).await?;
            let mut lags = totals.lags_ms.clone();
            lags.sort_by(f64::total_cmp);
            let n = totals.turns as f64;
            // Unthrottled runs are priced at the template's sizes.
            let memory = size.unwrap_or(TEMPLATE_MEMORY_MB);
            let cost = TurnCost::of(&totals, memory);
            let sizes = format!("generator {} MB, stream {} MB", memory.generator, memory.stream);
            let name = match size {
                Some(_) => format!("{}, {sizes}", setting.name),
                None => format!("{}, unthrottled ({sizes})", setting.name),
            };
            println!("{name}");
            println!("  write units per turn     {:>8.1}   (one write per token would be ~{reply_tokens}: {:.1}x fewer)", totals.write_units / n, reply_tokens as f64 / (totals.write_units / n));
            println!("  chunks per turn          {:>8.1}", totals.chunks as f64 / n);
            println!("  read units per turn      {:>8.1}   ingest", totals.ingest_read_units / n);
            println!("                           {:>8.1}   generator", totals.generator_read_units / n);
            println!("                           {:>8.1}   per SSE client", totals.stream_read_units / n);
            println!(
                "  Lambda seconds per turn  {:>8.3}   ingest, {:.2} generator, {:.2} stream",
                totals.ingest_seconds / n,
                totals.generator_seconds / n,
                totals.stream_seconds / n
            );
            println!(
                "  idle expiry + summary    {:>8.1}   write units, {:.1} read units, once per quiet session",
                totals.idle_write_units, totals.idle_read_units
            );
            let mut first_tokens = totals.first_token_ms.clone();
            first_tokens.sort_by(f64::total_cmp);
            println!(
            "  first token (ms)         p50 {:.0}   max {:.0}   (the turn handed to the generator -> the SSE client)",
            percentile(&first_tokens, 50.0),
            first_tokens.last().copied().unwrap_or(f64::NAN)
        );
            if totals.throttled_runs {
                println!(
                "  CPU quota                generator held back in {} periods ({} ms), stream in {} ({} ms), over {turns} turns",
                totals.throttled_periods[0],
                totals.throttled_time[0].as_millis(),
                totals.throttled_periods[1],
                totals.throttled_time[1].as_millis()
            );
            }
            println!(
                "  relay lag (ms)           p50 {:.0}   p90 {:.0}   p99 {:.0}   max {:.0}   ({} tokens)\n",
                percentile(&lags, 50.0),
                percentile(&lags, 90.0),
                percentile(&lags, 99.0),
                lags.last().copied().unwrap_or(f64::NAN),
                lags.len()
            );
            println!("  | item | per turn | $ per 1M turns |");
            println!("  |---|---|---|");
            for (item, units, usd) in cost.items() {
                println!("  | {item} | {units} | {usd:.2} |");
            }
            println!("  | **total, model excluded** | | **{:.2}** |\n", cost.per_million());
            summary.push((name, cost));
        }
    }
    println!("| configuration | WRU | RRU | GB-s | $ per 1M turns | lag p50 | lag p99 | lag goals |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, cost) in &summary {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} | {:.0} | {} |",
            cost.write_units,
            cost.read_units,
            cost.gb_seconds,
            cost.per_million(),
            cost.lag_p50,
            cost.lag_p99,
            if cost.meets_lag_goals() { "met" } else { "missed" }
        );
    }
    let cheapest = summary
        .iter()
        .filter(|(_, cost)| cost.meets_lag_goals())
        .min_by(|a, b| a.1.per_million().total_cmp(&b.1.per_million()));
    match cheapest {
        Some((name, cost)) => println!(
            "\ncheapest meeting p50 <= {LAG_P50_GOAL_MS:.0} ms and p99 <= {LAG_P99_GOAL_MS:.0} ms: {name}, ${:.2} per 1M turns",
            cost.per_million()
        ),
        None => println!(
            "\nno configuration met p50 <= {LAG_P50_GOAL_MS:.0} ms and p99 <= {LAG_P99_GOAL_MS:.0} ms"
        ),
    }
    Ok(())
}

/// A function's own thread and single-threaded runtime (a Lambda function runs in a process of
/// its own), held to a memory size's CPU share when one is given.
struct FunctionThread {
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Dropped after the thread has ended (a group with threads in it cannot be removed).
    _limit: Option<Arc<CpuLimit>>,
}

impl FunctionThread {
    fn start(name: &str, memory_mb: Option<u32>) -> Result<FunctionThread, String> {
        let limit = memory_mb.map(|mb| CpuLimit::named(mb, name)).transpose()?.map(Arc::new);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let group = limit.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let joined = group.as_ref().map_or(Ok(()), |g| g.join_this_thread());
                let blocking_group = group.clone();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_start(move || {
                        if let Some(group) = &blocking_group {
                            let _ = group.join_this_thread();
                        }
                    })
                    .on_thread_stop(CpuLimit::leave_this_thread)
                    .build()
                    .map_err(|e| e.to_string());
                match (joined, runtime) {
                    (Ok(()), Ok(runtime)) => {
                        let _ = started_tx.send(Ok(runtime.handle().clone()));
                        runtime.block_on(async move {
                            let _ = stopped.await;
                        });
                        runtime.shutdown_timeout(Duration::from_secs(5));
                        CpuLimit::leave_this_thread();
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = started_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        let runtime = started_rx.recv().map_err(|e| e.to_string())??;
        Ok(FunctionThread { runtime, stop: Some(stop), thread: Some(thread), _limit: limit })
    }

    /// How the quota held this function back so far: (periods throttled, time throttled).
    fn throttled(&self) -> (u64, Duration) {
        self._limit.as_ref().map_or((0, Duration::ZERO), |limit| {
            let (_, throttled, time) = limit.throttled();
            (throttled, time)
        })
    }

    /// Runs `work` on this function's runtime.
    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        self.runtime.spawn(work).await
    }
}

impl Drop for FunctionThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("warning: a function thread of the bench panicked");
            }
        }
    }
}

async fn run(
    setting: &Setting,
    memory: Option<Memory>,
    turns: usize,
    reply_tokens: usize,
    token_delay: Duration,
    burst: usize,
) -> Result<Totals, Box<dyn std::error::Error>> {
    let table = "bench";
    let dynamo = chat_local::LocalDynamo::start(0, table).await?;
    let store = || dynamo.store(table, StoreOptions::default());
    let (ingest_store, generator_store, stream_store) = (store(), store(), store());
    let handed = Arc::new(Mutex::new(Vec::new()));
    let model = TimedModel::new(reply_tokens, token_delay, burst, handed.clone());
    let generator_thread = FunctionThread::start("generator", memory.map(|m| m.generator))?;
    let stream_thread = FunctionThread::start("stream", memory.map(|m| m.stream))?;
    let generator = Arc::new(generator::Generator::new(
        generator_store.clone(),
        Model::new(Arc::new(model), RetryPolicy::default()),
        generator::GenerationSettings {
            flush_interval: setting.flush_interval,
            flush_max_tokens: setting.flush_max_tokens,
            ..Default::default()
        },
    ));
    let relay = stream::Relay::new(
        stream_store.clone(),
        stream::RelaySettings { poll_fast: setting.poll_fast, max_open_streams: 0, ..Default::default() },
        chat_auth::Authenticator::trusted(),
    );
    let mut totals = Totals::default();
    for turn in 0..turns {
        handed.lock().unwrap().clear();
        let before = (ingest_store.capacity(), generator_store.capacity(), stream_store.capacity());
        let user = UserId::parse(&format!("bench-{turn}"))?;
        let ingest_started = Instant::now();
        let SendOutcome::Accepted(ticket) = ingest_store
            .send_message(NewMessage {
                user: &user,
                session: None,
                content: "How fast is this?",
                client_message_id: None,
                by: "bench",
            })
            .await?
        else {
            return Err("send was not accepted".into());
        };
        let Outcome::Applied(ticket) = ingest_store.commit_user_message(&ticket, "bench").await? else {
            return Err("commit was refused".into());
        };
        totals.ingest_seconds += ingest_started.elapsed().as_secs_f64();
        let ingest_reads = ingest_store.capacity().read_units;
        // The SSE client connects first, as a browser would right after the 202.
        let request = lambda_http::http::Request::builder()
            .uri(format!("/sessions/{}/stream", ticket.session_id))
            .body(lambda_http::Body::Empty)?
            .with_query_string_parameters(HashMap::from([("turn".to_owned(), "1".to_owned())]));
        let throttled_before = [generator_thread.throttled(), stream_thread.throttled()];
        let stream_started = Instant::now();
        let relay = relay.clone();
        // The relay's task, which feeds the response body, runs where `handle` runs.
        let response = stream_thread.run(async move { relay.handle(request).await }).await?;
        let reader = tokio::spawn(async move {
            let body = http_body_util::BodyDataStream::new(response.into_body()).boxed();
            let mut events = chat_local::sse_reader::SseStream::from_bytes(body);
            let mut received = Vec::new();
            while let Ok(Some(event)) = events.next().await {
                if event.event == "token" {
                    let id = event.id.unwrap_or_default();
                    let index: usize =
                        id.split_once(':').and_then(|(_, i)| i.parse().ok()).unwrap_or(usize::MAX);
                    received.push((index, Instant::now()));
                }
            }
            (received, stream_started.elapsed())
        });
        let mut message = SqsMessage::default();
        message.message_id = Some(format!("bench-{turn}"));
        message.body = Some(serde_json::to_string(&TurnMessage::reply(ticket.session_id, ticket.turn))?);
        let mut event = SqsEvent::default();
        event.records = vec![message];
        let generator_started = Instant::now();
        let handler = generator.clone();
        let response = generator_thread.run(async move { handler.handle(event).await }).await?;
        totals.generator_seconds += generator_started.elapsed().as_secs_f64();
        if !response.batch_item_failures.is_empty() {
            return Err("the generator reported a failure".into());
        }
        let (received, stream_time) = reader.await?;
        for (i, thread) in [&generator_thread, &stream_thread].into_iter().enumerate() {
            let (periods, time) = thread.throttled();
            totals.throttled_periods[i] += periods - throttled_before[i].0;
            totals.throttled_time[i] += time - throttled_before[i].1;
        }
        totals.stream_seconds += stream_time.as_secs_f64();
        let handed = handed.lock().unwrap().clone();
        if received.len() != handed.len() || handed.len() != reply_tokens {
            return Err(format!("{} tokens handed over, {} received", handed.len(), received.len()).into());
        }
        if let Some((_, first)) = received.iter().find(|(index, _)| *index == 0) {
            totals.first_token_ms.push(first.duration_since(generator_started).as_secs_f64() * 1000.0);
        }
        for (index, at) in received {
            totals.lags_ms.push(at.duration_since(handed[index]).as_secs_f64() * 1000.0);
        }
        let (_, messages) =
            ingest_store.get_conversation(ticket.session_id).await?.ok_or("session vanished")?;
        if !messages.iter().any(|m| m.id.role == Role::Assistant) {
            return Err("no reply was committed".into());
        }
        totals.chunks +=
            ingest_store.read_chunks(ticket.session_id, ticket.turn, None, Read::Consistent).await?.len();
        let after = (ingest_store.capacity(), generator_store.capacity(), stream_store.capacity());
        totals.write_units +=
            (after.0.write_units - before.0.write_units) + (after.1.write_units - before.1.write_units);
        totals.ingest_read_units += ingest_reads - before.0.read_units;
        totals.generator_read_units += after.1.read_units - before.1.read_units;
        totals.stream_read_units += after.2.read_units - before.2.read_units;
        totals.turns += 1;
        if turn == 0 {
            // The session goes quiet: the sweeper expires it, the generator writes its summary.
            let before = (ingest_store.capacity(), generator_store.capacity());
            let session = ingest_store
                .get_session(ticket.session_id, Read::Consistent)
                .await?
                .ok_or("session vanished")?;
            let Outcome::Applied(_) = ingest_store.expire_idle(&session, "bench").await? else {
                return Err("the idle expiry was refused".into());
            };
            let mut message = SqsMessage::default();
            message.message_id = Some("bench-summary".to_owned());
            message.body =
                Some(serde_json::to_string(&TurnMessage::summary(ticket.session_id, ticket.turn))?);
            let mut event = SqsEvent::default();
            event.records = vec![message];
            let handler = generator.clone();
            if !generator_thread
                .run(async move { handler.handle(event).await })
                .await?
                .batch_item_failures
                .is_empty()
            {
                return Err("the summary job failed".into());
            }
            let summarised = ingest_store
                .get_session(ticket.session_id, Read::Consistent)
                .await?
                .ok_or("session vanished")?;
            if summarised.summary.is_none() {
                return Err("no summary was stored".into());
            }
            let after = (ingest_store.capacity(), generator_store.capacity());
            totals.idle_write_units =
                (after.0.write_units - before.0.write_units) + (after.1.write_units - before.1.write_units);
            totals.idle_read_units =
                (after.0.read_units - before.0.read_units) + (after.1.read_units - before.1.read_units);
        }
    }
    totals.throttled_runs = memory.is_some();
    Ok(totals)
}
