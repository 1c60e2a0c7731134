//! `make bench-load`: many conversations at once against the local stack, as people would use it,
//! and what each turn costs the machine.
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
//! By default conversations move in lockstep (no think time: each sends its next message as soon
//! as its last turn ended), and the run soaks the stack: after the fresh levels, 5,000 turns, then
//! the 1- and 20-conversation levels again, printed beside their fresh figures. `CxT@MS` in
//! `BENCH_LEVELS` gives a level a think time: a random pause up to MS before each message.
//!
//! Per level it also reports the CPU time per turn of every process of the stack (user + system,
//! from `/proc`; the benchmark's own client runs on threads of its own and is counted apart), and,
//! inside this process, of every DynamoDB operation the emulator served, from the emulator's own
//! events (so write latency there is the emulator's, not the network's).
//!
//! It starts its own stack (demo model, 20 tokens, one every 50 ms) unless `BENCH_API` names a
//! running one (then no CPU figures). `BENCH_LEVELS` is a list like `1x20,20x10,200x3@500`
//! (conversations × turns, `@` think time in ms). It exits non-zero if any turn failed or broke a
//! law.

use chat_core::config::Env;
use chat_local::cpu::{EmulatorProfile, ProcessCpu};
use chat_local::sse_reader::SseStream;
use chat_local::{Stack, StackSettings};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

const REPLY_TOKENS: &str = "20";
const TOKEN_DELAY_MS: u64 = 50;
const DEFAULT_LEVELS: &str = "1x40,20x10,100x3,200x3,100x50,1x40,20x10";

/// The model's first-token delay: the demo model's pause before each token.
fn model_delay_ms() -> u64 {
    std::env::var("DEMO_TOKEN_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(TOKEN_DELAY_MS)
}

/// What went wrong with a turn, by kind.
type ErrorKinds = BTreeMap<String, usize>;

#[derive(Default)]
struct LevelResult {
    level: Option<Level>,
    /// Turns the stack had served before this level started.
    served_before: usize,
    turns: usize,
    ok: usize,
    errors: ErrorKinds,
    throttled_retries: usize,
    ttft_ms: Vec<f64>,
    accept_ms: Vec<f64>,
    elapsed: Duration,
    health_ms: Option<f64>,
    /// CPU time by process over the level (when the benchmark runs the stack).
    cpu: Option<ProcessCpu>,
    /// The emulator's CPU time per operation over the level.
    emulator: BTreeMap<String, Vec<Duration>>,
}

impl LevelResult {
    fn turns_per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn ttft(&self, p: f64) -> Option<f64> {
        let mut ttft = self.ttft_ms.clone();
        ttft.sort_by(f64::total_cmp);
        percentile(&ttft, p)
    }

    /// CPU per turn of the whole stack (the benchmark's client excluded).
    fn stack_cpu_per_turn(&self) -> Option<Duration> {
        let cpu = self.cpu.as_ref()?;
        let stack =
            cpu.total().saturating_sub(cpu.0.get(chat_local::cpu::CLIENT).copied().unwrap_or_default());
        Some(stack / self.ok.max(1) as u32)
    }
}

struct Bench {
    api: String,
    http: reqwest::Client,
    turn_timeout: Duration,
    run: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let profile = EmulatorProfile::default();
    // Warnings of the stack's own tasks; dynoxide reports a refused conditional write as one.
    let warnings = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_default(tracing::Level::WARN)
            .with_target("dynoxide", tracing::level_filters::LevelFilter::OFF),
    );
    let subscriber = tracing_subscriber::registry()
        .with(profile.clone().with_filter(EmulatorProfile::filter()))
        .with(warnings);
    tracing::subscriber::set_global_default(subscriber)?;
    // The stack runs on this runtime; the client on one of its own, whose threads ProcessCpu
    // counts apart.
    let stack_runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(chat_local::cpu::CLIENT_THREADS)
        .enable_all()
        .build()?;
    stack_runtime.block_on(run(profile, client_runtime.handle().clone()))
}

async fn run(
    profile: EmulatorProfile,
    client: tokio::runtime::Handle,
) -> Result<(), Box<dyn std::error::Error>> {
    let env = Env::process();
    let think = env.millis_or("BENCH_THINK_MS", Duration::ZERO)?;
    let levels = parse_levels(&env.optional("BENCH_LEVELS").unwrap_or_else(|| DEFAULT_LEVELS.into()), think)?;
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
            settings.output = chat_local::Output::File(root.join("target/bench-load.log"));
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

    let idle = match &stack {
        Some(_) => {
            // Every function instance started and warm, so no level pays for that.
            eprintln!("==> warming up (4 conversations × 2 turns, not reported)");
            let warm = Level { conversations: 4, turns: 2, think: Duration::ZERO };
            let warmed = client.spawn(run_level(bench.clone(), warm)).await?;
            if !warmed.errors.is_empty() {
                return Err(format!("the warm-up failed: {:?}", warmed.errors).into());
            }
            Some(measure_idle(env.millis_or("BENCH_IDLE_MS", Duration::from_secs(10))?).await)
        }
        None => None,
    };
    let mut results = Vec::new();
    let mut served = 0;
    for level in levels {
        eprintln!(
            "==> {} conversations × {} turns, {} (served so far: {served} turns)",
            level.conversations,
            level.turns,
            think_label(level.think)
        );
        profile.take();
        let cpu_before = stack.as_ref().map(|_| ProcessCpu::sample());
        let mut result = client.spawn(run_level(bench.clone(), level)).await?;
        result.cpu = cpu_before.map(|before| ProcessCpu::sample().since(&before));
        result.emulator = profile.take();
        result.served_before = served;
        served += result.ok;
        results.push(result);
    }
    print_report(&results);
    if let Some((cpu, over)) = idle {
        print_idle(&cpu, over);
    }
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

/// The stack's CPU while nobody uses it: what its timers and pollers cost.
async fn measure_idle(over: Duration) -> (ProcessCpu, Duration) {
    eprintln!("==> measuring the idle stack's CPU for {over:?}");
    let before = ProcessCpu::sample();
    tokio::time::sleep(over).await;
    (ProcessCpu::sample().since(&before), over)
}

fn print_idle(cpu: &ProcessCpu, over: Duration) {
    let per_second = |d: Duration| d.as_secs_f64() * 1e3 / over.as_secs_f64();
    let parts: Vec<String> = cpu
        .0
        .iter()
        .filter(|(_, d)| !d.is_zero())
        .map(|(name, d)| format!("{name} {:.1}", per_second(*d)))
        .collect();
    println!(
        "idle stack (after a warm-up, before the first level): {:.1} ms of CPU per second ({})",
        per_second(cpu.total()),
        parts.join(", ")
    );
}

fn think_label(think: Duration) -> String {
    if think.is_zero() {
        "in lockstep".to_owned()
    } else {
        format!("thinking ≤ {} ms", think.as_millis())
    }
}

/// One level: conversations × turns, each conversation pausing up to `think` (uniformly at
/// random) before its first message and between turns, as a person reading the reply would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

async fn run_level(bench: Arc<Bench>, level: Level) -> LevelResult {
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
    let mut result = LevelResult { level: Some(level), turns: conversations * turns, ..Default::default() };
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
        // The history comes in pages of whole turns, newest first; read them all.
        let mut messages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{}/sessions/{id}?limit=100", self.api);
            if let Some(cursor) = &cursor {
                url.push_str(&format!("&cursor={cursor}"));
            }
            let response = self
                .http
                .get(url)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .map_err(|e| kind_of_transport_error("read back", &e))?;
            if !response.status().is_success() {
                return Err(format!("read back: HTTP {}", response.status().as_u16()));
            }
            let body: Value = response.json().await.map_err(|_| "read back: not JSON".to_owned())?;
            messages.extend(body["session"]["messages"].as_array().cloned().unwrap_or_default());
            match body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
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
    println!("| conversations | think | served before | turns | ok | errors | turns/s | 202 p50 | TTFT p50 | TTFT p90 | TTFT p99 | 429 retries | CPU/turn | /health after |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let Some(level) = r.level else { continue };
        let mut accept = r.accept_ms.clone();
        accept.sort_by(f64::total_cmp);
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            level.conversations,
            if level.think.is_zero() {
                "none".to_owned()
            } else {
                format!("≤ {} ms", level.think.as_millis())
            },
            r.served_before,
            r.turns,
            r.ok,
            r.errors.values().sum::<usize>(),
            r.turns_per_second(),
            ms(percentile(&accept, 50.0)),
            ms(r.ttft(50.0)),
            ms(r.ttft(90.0)),
            ms(r.ttft(99.0)),
            r.throttled_retries,
            r.stack_cpu_per_turn().map_or("—".to_owned(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3)),
            ms(r.health_ms),
        );
    }
    println!();
    for r in results.iter().filter(|r| !r.errors.is_empty()) {
        let conversations = r.level.map_or(0, |l| l.conversations);
        println!("errors at {conversations} conversations:");
        for (kind, n) in &r.errors {
            println!("  {n:>5} × {kind}");
        }
    }
    print_cpu(results);
    print_emulator(results);
    print_goals(results);
}

/// CPU per turn by process, one column per level.
fn print_cpu(results: &[LevelResult]) {
    let measured: Vec<&LevelResult> = results.iter().filter(|r| r.cpu.is_some() && r.ok > 0).collect();
    if measured.is_empty() {
        return;
    }
    let mut names: Vec<String> =
        measured.iter().flat_map(|r| r.cpu.iter().flat_map(|c| c.0.keys().cloned())).collect();
    names.sort();
    names.dedup();
    println!("CPU per turn by process, ms (user + system, from /proc):");
    println!();
    print!("| process |");
    for r in &measured {
        print!(" {} |", level_label(r));
    }
    println!();
    println!("|---|{}", "---|".repeat(measured.len()));
    let row = |name: &str, value: &dyn Fn(&LevelResult) -> Duration| {
        print!("| {name} |");
        for r in &measured {
            print!(" {:.1} |", value(r).as_secs_f64() * 1e3 / r.ok as f64);
        }
        println!();
    };
    for name in &names {
        if measured
            .iter()
            .all(|r| r.cpu.as_ref().and_then(|c| c.0.get(name)).is_none_or(|d| d.as_millis() == 0))
        {
            continue;
        }
        row(name, &|r| r.cpu.as_ref().and_then(|c| c.0.get(name)).copied().unwrap_or_default());
    }
    row("of chat-local: the emulator's operations", &|r| r.emulator.values().flatten().sum());
    row("**the stack (client excluded)**", &|r| r.stack_cpu_per_turn().unwrap_or_default() * r.ok as u32);
    println!();
}

/// The emulator's operations per turn and their CPU time, for the first and last level of each
/// kind that repeats (fresh and after the soak), else the first and the last level.
fn print_emulator(results: &[LevelResult]) {
    let measured: Vec<&LevelResult> = results.iter().filter(|r| !r.emulator.is_empty() && r.ok > 0).collect();
    if measured.is_empty() {
        return;
    }
    let mut shown: Vec<&LevelResult> = Vec::new();
    for r in &measured {
        let again = measured.iter().rev().find(|o| o.level == r.level && !std::ptr::eq(**o, *r));
        if let (Some(again), true) = (again, shown.iter().all(|s| s.level != r.level)) {
            shown.push(r);
            shown.push(again);
        }
    }
    if shown.is_empty() {
        shown.push(measured[0]);
        shown.push(measured[measured.len() - 1]);
    }
    println!(
        "The emulator's operations (CPU inside dynoxide's dispatch; calls per turn, µs per call p50 / p99):"
    );
    println!();
    let mut ops: Vec<&String> = shown.iter().flat_map(|r| r.emulator.keys()).collect();
    ops.sort();
    ops.dedup();
    print!("| operation |");
    for r in &shown {
        print!(" {} |", level_label(r));
    }
    println!();
    println!("|---|{}", "---|".repeat(shown.len()));
    for op in ops {
        print!("| {op} |");
        for r in &shown {
            let mut calls: Vec<f64> =
                r.emulator.get(op).into_iter().flatten().map(|d| d.as_secs_f64() * 1e6).collect();
            calls.sort_by(f64::total_cmp);
            if calls.is_empty() {
                print!(" — |");
                continue;
            }
            print!(
                " {:.1} × {:.0} / {:.0} µs |",
                calls.len() as f64 / r.ok as f64,
                percentile(&calls, 50.0).unwrap_or_default(),
                percentile(&calls, 99.0).unwrap_or_default()
            );
        }
        println!();
    }
    println!();
}

fn level_label(r: &LevelResult) -> String {
    let Some(level) = r.level else { return String::new() };
    let think = if level.think.is_zero() { String::new() } else { format!("@{}", level.think.as_millis()) };
    if r.served_before == 0 {
        format!("{}×{}{think} fresh", level.conversations, level.turns)
    } else {
        format!("{}×{}{think} after {}", level.conversations, level.turns, r.served_before)
    }
}

/// Each goal of the local stack's performance, as measured in this run.
fn print_goals(results: &[LevelResult]) {
    let first = |conversations: usize| {
        results
            .iter()
            .find(|r| r.level.is_some_and(|l| l.conversations == conversations && l.think.is_zero()))
    };
    let last = |conversations: usize| {
        results
            .iter()
            .rev()
            .find(|r| r.level.is_some_and(|l| l.conversations == conversations && l.think.is_zero()))
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    if let (Some(single), Some(twenty)) = (first(1), first(20)) {
        if let (Some(one), Some(many)) = (single.ttft(50.0), twenty.ttft(50.0)) {
            let ratio = many / one;
            println!(
                "TTFT p50, 20 conversations in lockstep ÷ 1 conversation: {ratio:.2} (goal ≤ 2.5: {})",
                verdict(ratio <= 2.5)
            );
            println!(
                "single-conversation TTFT over the model's first-token delay ({} ms): p50 {:.0} ms",
                model_delay_ms(),
                one - model_delay_ms() as f64
            );
        }
        if let Some(crowd) = first(200) {
            let ratio = crowd.turns_per_second() / twenty.turns_per_second();
            println!(
                "goodput, 200 conversations ÷ 20: {ratio:.2} ({:.1} ÷ {:.1} turns/s; goal ≥ 0.9: {})",
                crowd.turns_per_second(),
                twenty.turns_per_second(),
                verdict(ratio >= 0.9)
            );
        }
    }
    for (conversations, figure) in [(1, "TTFT p50"), (20, "turns/s")] {
        let (Some(fresh), Some(aged)) = (first(conversations), last(conversations)) else { continue };
        if aged.served_before <= fresh.served_before {
            continue;
        }
        let ratio = match figure {
            "TTFT p50" => aged.ttft(50.0).zip(fresh.ttft(50.0)).map(|(a, f)| a / f),
            _ => Some(fresh.turns_per_second() / aged.turns_per_second()),
        };
        if let Some(ratio) = ratio {
            println!(
                "{conversations} conversation(s), {figure} after {} turns against fresh: {ratio:.2}× slower (goal ≤ 1.2: {})",
                aged.served_before,
                verdict(ratio <= 1.2)
            );
        }
    }
    let cpu: Vec<Duration> = results.iter().filter_map(LevelResult::stack_cpu_per_turn).collect();
    if let Some(worst) = cpu.iter().max() {
        let all: Duration =
            results.iter().filter_map(|r| r.stack_cpu_per_turn().map(|d| d * r.ok as u32)).sum();
        let turns: usize = results.iter().filter(|r| r.cpu.is_some()).map(|r| r.ok).sum();
        println!(
            "CPU per turn across the whole stack: {:.1} ms over the run, {:.1} ms at the costliest level",
            all.as_secs_f64() * 1e3 / turns.max(1) as f64,
            worst.as_secs_f64() * 1e3
        );
    }
}
