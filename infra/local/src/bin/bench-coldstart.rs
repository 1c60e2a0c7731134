//! `make bench-coldstart`: what a cold start costs each function, beside a hello world built with
//! the same release profile, measured in one run.
//!
//! Each release binary runs behind a loopback Lambda Runtime API that times it from the outside
//! (`chat_local::runtime_api`): spawn → its first `GET /invocation/next` is its init; then one
//! trivial invocation (ingest and stream `GET /health`, the generator an empty SQS batch, the
//! sweeper a scheduled sweep of nothing), then a real one (ingest a message sent, the generator
//! a turn answered by the demo model, the stream a committed turn relayed), with the process's
//! peak RSS (`VmHWM`) after each. `BENCH_RUNS` (10) runs per binary; medians, and init as a
//! ratio to the hello world's, since absolute times are noisy on a shared machine.
//!
//! For the generator it also times the first token: from spawn, for a turn waiting when the
//! process starts (what a cold start adds to the turn that caused it), against a warm process's
//! next turn, from the moment it is handed over to its first chunk stored.
//!
//! Lambda gives a function CPU in proportion to its memory (one vCPU at 1,769 MB).
//! `BENCH_MEMORY_MB=128,256,512` repeats the whole run with each process held to that share by a
//! CFS quota (a cgroup v1 `cpu` group, so it needs root); `none` in the list, or the variable
//! unset, runs them unthrottled. Init CPU (every thread's, from `schedstat`) says how much of a
//! size's quota an init needs: a quota is given per 100 ms period, so an init that needs more
//! than one period's share waits for the next period.

use chat_core::config::Env;
use chat_core::job::TurnMessage;
use chat_core::{
    ClaimOutcome, NewMessage, Outcome, Read, Reply, SendOutcome, SessionId, Store, StoreOptions, Turn, UserId,
};
use chat_local::cpu::CpuLimit;
use chat_local::runtime_api::RuntimeApi;
use chat_local::LocalDynamo;
use chat_testkit::StubSqs;
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TABLE: &str = "coldstart";
const FUNCTIONS: [&str; 4] = ["ingest", "generator", "stream", "sweeper"];

#[derive(Default)]
struct Runs {
    init: Vec<Duration>,
    init_cpu: Vec<Duration>,
    first: Vec<Duration>,
    rss_trivial: Vec<u64>,
    rss_real: Vec<u64>,
    /// Generator only: first token of a turn waiting at spawn, from spawn.
    ttft_cold: Vec<Duration>,
    /// Generator only: first token of a warm process's turn, from hand-over.
    ttft_warm: Vec<Duration>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = Env::process();
    let runs: usize = env.parse_or("BENCH_RUNS", 10)?;
    let sizes: Vec<Option<u32>> = match env.optional("BENCH_MEMORY_MB") {
        None => vec![None],
        Some(list) => {
            list.split(',')
                .map(|s| match s.trim() {
                    "none" => Ok(None),
                    size => size.parse().map(Some).map_err(|_| {
                        format!("BENCH_MEMORY_MB: `{size}` is neither a number of MB nor `none`")
                    }),
                })
                .collect::<Result<_, _>>()?
        }
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let release = root.join("target/release");
    for binary in FUNCTIONS.iter().chain(&["hello-lambda"]) {
        if !release.join(binary).exists() {
            return Err(
                format!("target/release/{binary} is missing: `make bench-coldstart` builds it").into()
            );
        }
    }
    let dynamo = LocalDynamo::start(0, TABLE).await?;
    let sqs = StubSqs::start().await?;
    let store = dynamo.store(TABLE, StoreOptions::default());
    let queue_url = format!("{}/000000000000/turns", sqs.endpoint);
    let environment = |name: &str| -> Vec<(String, String)> {
        [
            ("TABLE_NAME", TABLE.to_owned()),
            ("QUEUE_URL", queue_url.clone()),
            ("AWS_ENDPOINT_URL_DYNAMODB", dynamo.endpoint.clone()),
            ("AWS_ENDPOINT_URL_SQS", sqs.endpoint.clone()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", "local".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "local".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
            ("AWS_LAMBDA_FUNCTION_NAME", name.to_owned()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769".to_owned()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
            ("CHAT_LOCAL_STACK", "1".to_owned()),
            ("AUTH_MODE", "none".to_owned()),
            ("LLM_PROVIDER", "demo".to_owned()),
            ("DEMO_REPLY_TOKENS", "20".to_owned()),
            ("DEMO_TOKEN_DELAY_MS", "20".to_owned()),
            ("FLUSH_INTERVAL_MS", generator::DEFAULT_FLUSH_INTERVAL.as_millis().to_string()),
            ("RUST_LOG", "warn".to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };

    for size in sizes {
        let limit = size.map(CpuLimit::new).transpose()?;
        let mut results: Vec<(&str, Runs)> = Vec::new();
        for name in ["hello-lambda"].into_iter().chain(FUNCTIONS) {
            eprintln!(
                "==> {name}: {runs} cold starts{}",
                limit.as_ref().map_or(String::new(), CpuLimit::label)
            );
            let mut measured = Runs::default();
            for _ in 0..runs {
                let one = cold_start(&release, name, &environment(name), &store, limit.as_ref()).await?;
                measured.init.push(one.init);
                measured.init_cpu.push(one.init_cpu);
                measured.first.push(one.first);
                measured.rss_trivial.push(one.rss_trivial);
                measured.rss_real.extend(one.rss_real);
                measured.ttft_cold.extend(one.ttft_cold);
                measured.ttft_warm.extend(one.ttft_warm);
            }
            results.push((name, measured));
        }
        println!();
        match &limit {
            Some(limit) => println!("### {}", limit.label().trim_start_matches(", ")),
            None => println!("### unthrottled"),
        }
        report(&results);
    }
    Ok(())
}

/// What one cold start of one binary measured.
struct One {
    init: Duration,
    init_cpu: Duration,
    first: Duration,
    rss_trivial: u64,
    rss_real: Option<u64>,
    ttft_cold: Option<Duration>,
    ttft_warm: Option<Duration>,
}

async fn cold_start(
    release: &Path,
    name: &str,
    env: &[(String, String)],
    store: &Store,
    limit: Option<&CpuLimit>,
) -> Result<One, String> {
    let api = RuntimeApi::start(name).await.map_err(|e| e.to_string())?;
    // The generator's cold turn waits when the process starts, as a scale-out's does.
    let cold_turn = if name == "generator" { Some(committed_turn(store).await?) } else { None };
    let mut command = tokio::process::Command::new(release.join(name));
    command
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("AWS_LAMBDA_RUNTIME_API", &api.address)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    if let Some(limit) = limit {
        command.env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", limit.memory_mb().to_string());
    }
    // Opened before the fork, so the child joins the group with one write before it execs and
    // its whole init runs under the quota.
    let procs = match limit {
        Some(limit) => {
            Some(std::fs::OpenOptions::new().write(true).open(limit.procs()).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    if let Some(procs) = &procs {
        let fd = std::os::fd::AsRawFd::as_raw_fd(procs);
        // SAFETY: between fork and exec this calls only write(2), which is async-signal-safe,
        // on a descriptor the parent keeps open until the spawn returns.
        unsafe {
            command.as_std_mut().pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| format!("starting {name}: {e}"))?;
    drop(procs);
    let pid = child.id().ok_or("the process exited")?;
    let mut one = One {
        init: Duration::ZERO,
        init_cpu: Duration::ZERO,
        first: Duration::ZERO,
        rss_trivial: 0,
        rss_real: None,
        ttft_cold: None,
        ttft_warm: None,
    };
    // The end of init, and the CPU it took (every thread's), read as soon as the process asks
    // for its first invocation: within a poll (0.2 ms) of it.
    let init_done = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(at) = api.first_ask() {
                return Ok((at, cpu_time(pid)));
            }
            if Instant::now() > deadline {
                return Err(format!("{name} never asked for an invocation"));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    };
    let (first_ask, init_cpu) = match cold_turn {
        Some((session, turn)) => {
            let event = sqs_event(session, turn);
            let watch = first_chunk(store, session, turn);
            let (answered, first, init) = tokio::join!(api.invoke(&event), watch, init_done);
            answered.ok_or("the generator did not answer")?;
            one.ttft_cold = Some(first?.duration_since(started));
            init?
        }
        None => init_done.await?,
    };
    one.init = first_ask.duration_since(started);
    one.init_cpu = init_cpu;
    let (handed, answer) = api.invoke(&trivial_event(name)).await.ok_or(format!("{name} did not answer"))?;
    if answer.error {
        return Err(format!("{name} failed: {}", String::from_utf8_lossy(&answer.body)));
    }
    one.first = answer.at.duration_since(handed);
    one.rss_trivial = peak_rss_kib(pid);
    if let Some(event) = real_event(name, store).await? {
        let (session, turn) = event.1.unwrap_or((SessionId::new(), Turn::FIRST));
        let watch = async {
            match event.1 {
                Some(_) => Some(first_chunk(store, session, turn).await),
                None => None,
            }
        };
        let (answered, first) = tokio::join!(api.invoke(&event.0), watch);
        let (handed, answer) = answered.ok_or(format!("{name} did not answer its real event"))?;
        if answer.error {
            return Err(format!("{name} failed its real event: {}", String::from_utf8_lossy(&answer.body)));
        }
        if let Some(first) = first {
            one.ttft_warm = Some(first?.duration_since(handed));
        }
        one.rss_real = Some(peak_rss_kib(pid));
    }
    let _ = child.kill().await;
    Ok(one)
}

/// A turn sent and committed, waiting for a generator.
async fn committed_turn(store: &Store) -> Result<(SessionId, Turn), String> {
    let user = UserId::parse("coldstart-user").map_err(|e| e.to_string())?;
    let message = NewMessage {
        user: &user,
        session: None,
        content: "How cold is a cold start?",
        client_message_id: None,
        by: "bench",
    };
    let SendOutcome::Accepted(ticket) = store.send_message(message).await.map_err(|e| e.to_string())? else {
        return Err("the send was refused".to_owned());
    };
    let Outcome::Applied(ticket) =
        store.commit_user_message(&ticket, "bench").await.map_err(|e| e.to_string())?
    else {
        return Err("the commit was refused".to_owned());
    };
    Ok((ticket.session_id, ticket.turn))
}

/// When the turn's first chunk is stored (polled every 2 ms).
async fn first_chunk(store: &Store, session: SessionId, turn: Turn) -> Result<Instant, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let chunks =
            store.read_chunks(session, turn, None, Read::Consistent).await.map_err(|e| e.to_string())?;
        if chunks.iter().any(|c| !c.tokens.is_empty()) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err("no first token".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn sqs_event(session: SessionId, turn: Turn) -> Value {
    let body = serde_json::to_string(&TurnMessage::reply(session, turn)).expect("a message");
    json!({"Records": [{"messageId": uuid::Uuid::new_v4().to_string(), "body": body, "eventSource": "aws:sqs"}]})
}

/// A Function URL request, as Lambda delivers it.
fn http_event(method: &str, path: &str, query: &str, body: Option<&str>) -> Value {
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {"host": "127.0.0.1", "content-type": "application/json", "accept": "*/*"},
        "requestContext": {
            "accountId": "000000000000", "apiId": "bench", "domainName": "127.0.0.1", "domainPrefix": "bench",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "bench"},
            "requestId": uuid::Uuid::new_v4().to_string(), "routeKey": "$default", "stage": "$default",
            "time": "01/Dec/2026:00:00:00 +0000", "timeEpoch": 0
        },
        "body": body,
        "isBase64Encoded": false
    })
}

fn trivial_event(name: &str) -> Value {
    match name {
        "ingest" | "stream" => http_event("GET", "/health", "", None),
        "generator" => json!({"Records": []}),
        "sweeper" => {
            json!({"version": "0", "source": "aws.events", "detail-type": "Scheduled Event", "detail": {}})
        }
        _ => json!({"hello": "world"}),
    }
}

/// The real event for `name`, and for the generator the turn it answers.
async fn real_event(name: &str, store: &Store) -> Result<Option<(Value, Option<(SessionId, Turn)>)>, String> {
    Ok(match name {
        "ingest" => {
            let body = json!({"message": "Is this a real turn?"}).to_string();
            Some((http_event("POST", "/sessions/coldstart-user/messages", "", Some(&body)), None))
        }
        "generator" => {
            let (session, turn) = committed_turn(store).await?;
            Some((sqs_event(session, turn), Some((session, turn))))
        }
        "stream" => {
            let (session, turn) = answered_turn(store).await?;
            Some((
                http_event(
                    "GET",
                    &format!("/sessions/{session}/stream"),
                    &format!("turn={}", turn.get()),
                    None,
                ),
                None,
            ))
        }
        _ => None,
    })
}

/// A turn answered and committed, for the stream to relay from the start.
async fn answered_turn(store: &Store) -> Result<(SessionId, Turn), String> {
    let (session, turn) = committed_turn(store).await?;
    let claim = store
        .claim_generation(session, turn, "bench-gen", Duration::from_secs(30), 3)
        .await
        .map_err(|e| e.to_string())?;
    let ClaimOutcome::Claimed(lease) = claim else { return Err("the claim was refused".to_owned()) };
    let tokens: Vec<String> = (0..20).map(|i| format!("word{i} ")).collect();
    for (seq, batch) in tokens.chunks(4).enumerate() {
        store.append_chunk(&lease, seq as u32, (seq * 4) as u64, batch).await.map_err(|e| e.to_string())?;
    }
    match store.commit_reply(&lease, &Reply::new(tokens.concat())).await.map_err(|e| e.to_string())? {
        Outcome::Applied(_) => Ok((session, turn)),
        Outcome::Conflict(c) => Err(format!("the reply was refused: {c:?}")),
    }
}

/// CPU time the process has used so far, every thread's (`/proc/PID/task/*/schedstat`, ns).
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .sum();
    Duration::from_nanos(ns)
}

/// The process's peak resident set (`VmHWM`), KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").trim().to_owned())
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn median<T: Copy + Ord>(values: &[T]) -> Option<T> {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("—".to_owned(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

fn mb(kib: Option<u64>) -> String {
    kib.map_or("—".to_owned(), |k| format!("{:.1} MB", k as f64 * 1024.0 / 1e6))
}

fn report(results: &[(&str, Runs)]) {
    let hello = results.iter().find(|(n, _)| *n == "hello-lambda").and_then(|(_, r)| median(&r.init));
    println!();
    println!(
        "| binary | init | init ÷ hello world | init CPU | first invoke | peak RSS, trivial | peak RSS, real turn |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, runs) in results {
        let init = median(&runs.init);
        let ratio = match (init, hello) {
            (Some(init), Some(hello)) if !hello.is_zero() => {
                format!("{:.1}×", init.as_secs_f64() / hello.as_secs_f64())
            }
            _ => "—".to_owned(),
        };
        println!(
            "| {name} | {} | {ratio} | {} | {} | {} | {} |",
            ms(init),
            ms(median(&runs.init_cpu)),
            ms(median(&runs.first)),
            mb(median(&runs.rss_trivial)),
            mb(median(&runs.rss_real)),
        );
    }
    if let Some((_, generator)) = results.iter().find(|(n, _)| *n == "generator") {
        let (cold, warm) = (median(&generator.ttft_cold), median(&generator.ttft_warm));
        println!();
        println!(
            "generator, first token of a turn (demo model, 20 ms to its first token): cold {} from spawn, warm {} from hand-over",
            ms(cold),
            ms(warm)
        );
        if let (Some(cold), Some(warm)) = (cold, warm) {
            println!(
                "a cold start adds {:.1} ms to its turn's first token (goal ≤ 50 ms)",
                (cold.as_secs_f64() - warm.as_secs_f64()) * 1e3
            );
        }
    }
}
