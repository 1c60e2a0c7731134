//! `make bench-load`: many conversations at once against the local stack, as people would use it.
//!
//! At each level, N conversations start together. Each one, turn after turn: sends a message,
//! streams the reply to `commit_done`, then sends the next. Every turn is checked as well as
//! timed:
//! - the stream's token ids run from 0 without a gap or a repeat, and it ends with `message_end`
//!   then `commit_done` carrying the session id;
//! - afterwards the stored session has exactly one user message and one reply per turn, and each
//!   reply equals the text that was streamed (laws 2, 3 and 4);
//! - the stack answers `/health` promptly after each level (it is not wedged).
//!
//! A 429 (the stack at capacity) is retried after its `Retry-After`, with the same
//! `client_message_id`, as a well-behaved client would; retries are counted, and a turn that
//! never gets in counts as an error. TTFT is from sending the message to reading its first token.
//!
//! Conversations pause before each message for a random time up to `BENCH_THINK_MS` (1000), as
//! people reading a reply do, and so start spread over that time; `@0` on a level makes them
//! move in lockstep, every message of a round sent at the same instant (the worst case).
//!
//! It starts its own stack (demo model, 20 tokens, one every 50 ms) unless `BENCH_API` names a
//! running one. `BENCH_LEVELS` is a list like `1x10,20x5,20x5@0,200x2` (conversations × turns,
//! `@` think time in ms). It exits non-zero if any turn failed or broke a law.

use chat_core::config::Env;
use chat_local::sse::SseStream;
use chat_local::{Stack, StackSettings};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const REPLY_TOKENS: &str = "20";
const TOKEN_DELAY_MS: u64 = 50;

/// The model's first-token delay: the demo model's pause before each token.
fn model_delay_ms() -> u64 {
    std::env::var("DEMO_TOKEN_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(TOKEN_DELAY_MS)
}

/// What went wrong with a turn, by kind.
type ErrorKinds = BTreeMap<String, usize>;

#[derive(Default)]
struct LevelResult {
    conversations: usize,
    think: Duration,
    turns: usize,
    ok: usize,
    errors: ErrorKinds,
    throttled_retries: usize,
    ttft_ms: Vec<f64>,
    accept_ms: Vec<f64>,
    elapsed: Duration,
    health_ms: Option<f64>,
}

struct Bench {
    api: String,
    http: reqwest::Client,
    turn_timeout: Duration,
    run: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = Env::process();
    let think = env.millis_or("BENCH_THINK_MS", Duration::from_secs(1))?;
    let levels = parse_levels(
        &env.optional("BENCH_LEVELS").unwrap_or_else(|| "1x10,20x5,20x5@0,50x2,100x2,200x2".into()),
        think,
    )?;
    let turn_timeout = env.millis_or("BENCH_TURN_TIMEOUT_MS", Duration::from_secs(90))?;
    let mut stack = None;
    let api = match env.optional("BENCH_API") {
        Some(api) => api.trim_end_matches('/').to_owned(),
        None => {
            let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
            let mut settings = StackSettings::new(root.clone());
            settings.api_port = 0;
            settings.dynamodb_port = 0;
            settings.sqs_port = 0;
            settings.concurrency = env.parse_or("LAMBDA_CONCURRENCY", settings.concurrency)?;
            settings.invocations_per_instance = env.parse_or(
                chat_runtime::aws::LOCAL_INVOCATIONS_PER_INSTANCE,
                settings.invocations_per_instance,
            )?;
            settings.log_file = Some(root.join("target/bench-load.log"));
            settings.function_env = vec![
                ("DEMO_REPLY_TOKENS".into(), REPLY_TOKENS.into()),
                ("DEMO_TOKEN_DELAY_MS".into(), model_delay_ms().to_string()),
                ("LLM_PROVIDER".into(), "demo".into()),
                ("LOG_FORMAT".into(), "text".into()),
            ];
            eprintln!("==> starting a local stack (log: target/bench-load.log)");
            let started = Stack::start(settings, |step| eprintln!("==> {step}")).await?;
            let api = started.api.clone();
            stack = Some(started);
            api
        }
    };
    eprintln!("==> API {api}; demo model: {REPLY_TOKENS} tokens, one every {} ms", model_delay_ms());
    let bench = Arc::new(Bench {
        api,
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(512)
            .build()?,
        turn_timeout,
        run: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
    });

    let mut results = Vec::new();
    for level in levels {
        eprintln!(
            "==> {} conversations × {} turns, thinking up to {:?}",
            level.conversations, level.turns, level.think
        );
        let result = run_level(&bench, level).await;
        results.push(result);
    }
    print_report(&results);
    if let Some(stack) = &stack {
        use std::sync::atomic::Ordering::Relaxed;
        println!(
            "gateway: {} requests forwarded, {} shed with 429",
            stack.gateway.forwarded.load(Relaxed),
            stack.gateway.shed.load(Relaxed)
        );
    }
    if let Some(stack) = stack {
        stack.stop().await;
    }
    let failed: usize = results.iter().map(|r| r.errors.values().sum::<usize>()).sum();
    if failed > 0 {
        eprintln!("bench-load: {failed} turns failed or broke a law");
        std::process::exit(1);
    }
    Ok(())
}

/// One level: conversations × turns, each conversation pausing up to `think` (uniformly at
/// random) before its first message and between turns, as a person reading the reply would.
#[derive(Debug, Clone, Copy)]
struct Level {
    conversations: usize,
    turns: usize,
    think: Duration,
}

/// `CxT` or `CxT@MS` (think time), comma-separated; `default_think` where `@` is absent.
fn parse_levels(raw: &str, default_think: Duration) -> Result<Vec<Level>, String> {
    raw.split(',')
        .map(|level| {
            let level = level.trim();
            let (counts, think) = match level.split_once('@') {
                Some((counts, ms)) => {
                    let ms =
                        ms.parse::<u64>().map_err(|_| format!("BENCH_LEVELS: {ms:?} is not milliseconds"))?;
                    (counts, Duration::from_millis(ms))
                }
                None => (level, default_think),
            };
            let (c, t) =
                counts.split_once('x').ok_or(format!("BENCH_LEVELS: {level:?} is not CxT or CxT@MS"))?;
            let parse = |v: &str| v.parse::<usize>().ok().filter(|n| *n > 0);
            Ok(Level {
                conversations: parse(c).ok_or(format!("BENCH_LEVELS: {c:?} is not a count"))?,
                turns: parse(t).ok_or(format!("BENCH_LEVELS: {t:?} is not a count"))?,
                think,
            })
        })
        .collect()
}

async fn run_level(bench: &Arc<Bench>, level: Level) -> LevelResult {
    let Level { conversations, turns, think } = level;
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Barrier::new(conversations));
    let tasks: Vec<_> = (0..conversations)
        .map(|c| {
            let (bench, gate) = (bench.clone(), gate.clone());
            tokio::spawn(async move {
                gate.wait().await;
                let user = format!("load-{}-{conversations}-{}-{c}", bench.run, think.as_millis());
                bench.conversation(&user, turns, think).await
            })
        })
        .collect();
    let mut result = LevelResult { conversations, turns: conversations * turns, think, ..Default::default() };
    for task in tasks {
        let outcome = task.await.expect("a conversation task does not panic");
        result.ok += outcome.ok;
        result.throttled_retries += outcome.throttled_retries;
        result.ttft_ms.extend(outcome.ttft_ms);
        result.accept_ms.extend(outcome.accept_ms);
        for (kind, n) in outcome.errors {
            *result.errors.entry(kind).or_default() += n;
        }
    }
    result.elapsed = started.elapsed();
    let probe = Instant::now();
    let healthy = bench
        .http
        .get(format!("{}/health", bench.api))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    if healthy {
        result.health_ms = Some(probe.elapsed().as_secs_f64() * 1e3);
    } else {
        *result.errors.entry("stack unhealthy after the level".into()).or_default() += 1;
    }
    result
}

#[derive(Default)]
struct ConversationOutcome {
    ok: usize,
    errors: ErrorKinds,
    throttled_retries: usize,
    ttft_ms: Vec<f64>,
    accept_ms: Vec<f64>,
}

/// One turn as the client saw it.
struct Streamed {
    turn: u64,
    text: String,
    ttft: Option<Duration>,
    /// From sending the message to its 202.
    accepted_after: Duration,
}

impl Bench {
    async fn conversation(&self, user: &str, turns: usize, think: Duration) -> ConversationOutcome {
        let mut outcome = ConversationOutcome::default();
        let mut session: Option<String> = None;
        let mut streamed = Vec::new();
        for n in 1..=turns {
            tokio::time::sleep(Duration::from_millis(rand_ms(think.as_millis() as u64))).await;
            let message = format!("turn {n} of {user}: how are you?");
            match self.turn(user, session.as_deref(), &message, &mut outcome.throttled_retries).await {
                Ok((id, turn)) => {
                    session = Some(id);
                    outcome.ttft_ms.extend(turn.ttft.map(|t| t.as_secs_f64() * 1e3));
                    outcome.accept_ms.push(turn.accepted_after.as_secs_f64() * 1e3);
                    streamed.push(turn);
                }
                Err(kind) => {
                    *outcome.errors.entry(kind).or_default() += 1;
                    break;
                }
            }
        }
        if let Some(id) = session {
            match self.check_stored(&id, &streamed).await {
                Ok(()) => outcome.ok += streamed.len(),
                Err(kind) => *outcome.errors.entry(kind).or_default() += streamed.len(),
            }
        }
        outcome
    }

    /// Sends one message and streams its reply; the session id and what was streamed, or the
    /// kind of failure.
    async fn turn(
        &self,
        user: &str,
        session: Option<&str>,
        message: &str,
        throttled: &mut usize,
    ) -> Result<(String, Streamed), String> {
        let deadline = Instant::now() + self.turn_timeout;
        let mut body = json!({"message": message, "client_message_id": uuid::Uuid::new_v4().to_string()});
        if let Some(id) = session {
            body["session_id"] = json!(id);
        }
        let sent = Instant::now();
        let accepted = loop {
            let response = self
                .http
                .post(format!("{}/sessions/{user}/messages", self.api))
                .header("content-type", "application/json")
                .body(body.to_string())
                .timeout(deadline.saturating_duration_since(Instant::now()))
                .send()
                .await
                .map_err(|e| kind_of_transport_error("send", &e))?;
            let status = response.status().as_u16();
            if status == 429 && Instant::now() < deadline {
                *throttled += 1;
                tokio::time::sleep(retry_after(&response)).await;
                continue;
            }
            let answer: Value =
                response.json().await.map_err(|_| format!("send: HTTP {status}, not JSON"))?;
            if status != 202 {
                return Err(format!(
                    "send: HTTP {status} {}",
                    answer["error"]["code"].as_str().unwrap_or("")
                ));
            }
            break answer;
        };
        let accepted_after = sent.elapsed();
        let id = accepted["session_id"].as_str().ok_or("send: no session_id")?.to_owned();
        let turn = accepted["turn"].as_u64().ok_or("send: no turn")?;
        let stream_url = accepted["stream_url"].as_str().ok_or("send: no stream_url")?.to_owned();
        let mut streamed = self.stream(&id, turn, &stream_url, sent, deadline, throttled).await?;
        streamed.accepted_after = accepted_after;
        Ok((id, streamed))
    }

    /// Streams one turn to its end, resuming with `Last-Event-ID` if the stream closes early.
    async fn stream(
        &self,
        id: &str,
        turn: u64,
        url: &str,
        sent: Instant,
        deadline: Instant,
        throttled: &mut usize,
    ) -> Result<Streamed, String> {
        let mut text = String::new();
        let mut next_index = 0u64;
        let mut ttft = None;
        let mut ended_with: Vec<String> = Vec::new();
        loop {
            let mut request = self
                .http
                .get(url)
                .header("accept", "text/event-stream")
                .timeout(deadline.saturating_duration_since(Instant::now()));
            if next_index > 0 {
                request = request.header("last-event-id", format!("{turn}:{}", next_index - 1));
            }
            let response = request.send().await.map_err(|e| kind_of_transport_error("stream", &e))?;
            let status = response.status().as_u16();
            if status == 429 && Instant::now() < deadline {
                *throttled += 1;
                tokio::time::sleep(retry_after(&response)).await;
                continue;
            }
            if status != 200 {
                return Err(format!("stream: HTTP {status}"));
            }
            let mut events = SseStream::new(response);
            loop {
                let event = events.next().await.map_err(|e| kind_of_transport_error("stream", &e))?;
                let Some(event) = event else { break };
                match event.event.as_str() {
                    "token" => {
                        let expected = format!("{turn}:{next_index}");
                        if event.id.as_deref() != Some(expected.as_str()) {
                            return Err("law 5: token ids with a gap or a repeat".into());
                        }
                        ttft.get_or_insert_with(|| sent.elapsed());
                        text.push_str(&event.data);
                        next_index += 1;
                    }
                    "message_end" => ended_with.push(event.event),
                    "commit_done" => {
                        if ended_with != ["message_end"] || event.data != id {
                            return Err("commit_done out of order or not the session id".into());
                        }
                        return Ok(Streamed { turn, text, ttft, accepted_after: Duration::ZERO });
                    }
                    "error" => {
                        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                        return Err(format!("stream: error event {}", data["code"].as_str().unwrap_or("?")));
                    }
                    other => return Err(format!("stream: unexpected event {other:?}")),
                }
            }
            if Instant::now() >= deadline {
                return Err("timeout".into());
            }
            // Closed before the turn ended (the stream's time limit): resume where it stopped.
        }
    }

    /// Laws 2, 3 and 4 on what was stored: one user message and one reply per turn, and each
    /// reply equal to what was streamed.
    async fn check_stored(&self, id: &str, streamed: &[Streamed]) -> Result<(), String> {
        let response = self
            .http
            .get(format!("{}/sessions/{id}", self.api))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| kind_of_transport_error("read back", &e))?;
        if !response.status().is_success() {
            return Err(format!("read back: HTTP {}", response.status().as_u16()));
        }
        let body: Value = response.json().await.map_err(|_| "read back: not JSON".to_owned())?;
        let messages = body["session"]["messages"].as_array().cloned().unwrap_or_default();
        for turn in streamed {
            let of_turn = |role: &str| -> Vec<&Value> {
                let suffix = format!(":{}:{role}", turn.turn);
                messages.iter().filter(|m| m["id"].as_str().is_some_and(|m| m.ends_with(&suffix))).collect()
            };
            let (users, replies) = (of_turn("user"), of_turn("assistant"));
            if users.len() != 1 || replies.len() != 1 {
                return Err(format!(
                    "law 3: turn stored with {} user messages and {} replies",
                    users.len(),
                    replies.len()
                ));
            }
            if replies[0]["content"].as_str() != Some(turn.text.as_str()) {
                return Err("law 4: the stored reply differs from what was streamed".into());
            }
        }
        Ok(())
    }
}

fn retry_after(response: &reqwest::Response) -> Duration {
    let seconds = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1);
    // Spread the retries over the next second or so, as clients with jitter would.
    Duration::from_millis(seconds * 1000 / 2 + rand_ms(seconds * 1000))
}

fn rand_ms(below: u64) -> u64 {
    (uuid::Uuid::new_v4().as_u128() % u128::from(below.max(1))) as u64
}

fn kind_of_transport_error(step: &str, e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("{step}: timeout")
    } else if e.is_connect() {
        format!("{step}: connection refused")
    } else {
        format!("{step}: connection error")
    }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[rank])
}

fn ms(v: Option<f64>) -> String {
    v.map_or("—".to_owned(), |v| format!("{v:.0} ms"))
}

fn print_report(results: &[LevelResult]) {
    println!();
    println!("| conversations | think | turns | ok | errors | turns/s | 202 p50 | TTFT p50 | TTFT p90 | TTFT p99 | 429 retries | /health after |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut p50s = BTreeMap::new();
    for r in results {
        let mut ttft = r.ttft_ms.clone();
        ttft.sort_by(f64::total_cmp);
        p50s.entry((r.conversations, r.think)).or_insert(percentile(&ttft, 50.0));
        let errors: usize = r.errors.values().sum();
        let mut accept = r.accept_ms.clone();
        accept.sort_by(f64::total_cmp);
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            r.conversations,
            if r.think.is_zero() { "none".to_owned() } else { format!("≤ {} ms", r.think.as_millis()) },
            r.turns,
            r.ok,
            errors,
            r.ok as f64 / r.elapsed.as_secs_f64(),
            ms(percentile(&accept, 50.0)),
            ms(percentile(&ttft, 50.0)),
            ms(percentile(&ttft, 90.0)),
            ms(percentile(&ttft, 99.0)),
            r.throttled_retries,
            ms(r.health_ms),
        );
    }
    println!();
    for r in results.iter().filter(|r| !r.errors.is_empty()) {
        println!("errors at {} conversations:", r.conversations);
        for (kind, n) in &r.errors {
            println!("  {n:>5} × {kind}");
        }
    }
    let single = p50s.iter().find(|((c, _), _)| *c == 1).and_then(|(_, p)| *p);
    if let Some(single) = single {
        println!(
            "single-conversation TTFT overhead over the model's first-token delay ({} ms): p50 {:.0} ms (goal ≤ 100 ms)",
            model_delay_ms(),
            single - model_delay_ms() as f64
        );
        for ((conversations, think), p50) in &p50s {
            if let (20, Some(p50)) = (conversations, p50) {
                let think = if think.is_zero() {
                    "in lockstep".to_owned()
                } else {
                    format!("thinking ≤ {} ms", think.as_millis())
                };
                println!("TTFT p50 at 20 conversations {think} ÷ at 1: {:.2} (goal ≤ 1.5)", p50 / single);
            }
        }
    }
}
