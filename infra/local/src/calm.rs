//! `make dev`'s calm terminal ([`crate::Output::Calm`]). Everything the stack's processes write
//! goes to its log file, as written; the terminal gets a line per finished turn (session, turn,
//! outcome, time to first token) and every warning and error, but none of the emulator's access
//! log, `cargo lambda watch`'s and cargo's chatter, or the functions' routine logs (the sweeper's
//! sweeps among them).
//!
//! The turn lines come from the functions' own log events: the generator's `turn finished` and
//! the sweeper's `turn ended` carry the session, the turn and the outcome (the generator's, the
//! time to first token too), in `tracing`'s text format or its JSON.

use serde_json::Value;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Which process a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The SQS emulator (moto): its access log, and Python's tracebacks.
    Sqs,
    /// `cargo lambda watch`, the `cargo run` that builds each function, and the functions.
    Functions,
}

/// Copies the children's output to the log, line by line, and to the terminal what
/// [`Filter`] shows of it.
#[derive(Clone)]
pub(crate) struct Router {
    log: Arc<Mutex<std::fs::File>>,
    muted: Arc<AtomicBool>,
}

impl Router {
    pub(crate) fn new(log: std::fs::File) -> Router {
        Router { log: Arc::new(Mutex::new(log)), muted: Arc::new(AtomicBool::new(false)) }
    }

    /// Follows one of a child's pipes until it closes.
    pub(crate) fn follow(&self, pipe: impl AsyncRead + Unpin + Send + 'static, source: Source) {
        let router = self.clone();
        tokio::spawn(async move {
            let mut pipe = BufReader::new(pipe);
            let mut filter = Filter::new(source);
            let mut line = Vec::new();
            loop {
                line.clear();
                match pipe.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                // A full disk loses the log, not the stack.
                let _ = router.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write_all(&line);
                if router.muted.load(Ordering::Relaxed) {
                    continue;
                }
                if let Some(shown) = filter.show(&String::from_utf8_lossy(&line)) {
                    eprintln!("{shown}");
                }
            }
        });
    }

    /// Nothing more reaches the terminal: the stack is stopping, and what its processes say as
    /// they are stopped stays in the log.
    pub(crate) fn mute(&self) {
        self.muted.store(true, Ordering::Relaxed);
    }
}

/// lambda_runtime's warning at the start of a function that serves one invocation at a time
/// (the sweeper): `cargo lambda watch` sets `AWS_LAMBDA_MAX_CONCURRENCY` for every instance. It
/// says nothing about this stack, so it stays in the log.
const SEQUENTIAL_RUNTIME: &str = "but the concurrency-tokio feature is not enabled; running sequentially";

/// What cargo says while it checks and builds a function (`cargo lambda watch` runs each one
/// with `cargo run`).
const CARGO_STATUS: [&str; 12] = [
    "Compiling",
    "Checking",
    "Finished",
    "Running",
    "Blocking",
    "Building",
    "Fresh",
    "Updating",
    "Downloading",
    "Downloaded",
    "Locking",
    "Adding",
];

/// moto's (werkzeug's) start-up lines.
const SQS_START: [&str; 3] = [" * ", "Press CTRL+C to quit", "WARNING: This is a development server."];

/// What the terminal shows of one process's lines.
pub(crate) struct Filter {
    source: Source,
    /// Inside a compiler diagnostic or a panic message: its lines are shown up to a blank line.
    diagnostic: bool,
}

impl Filter {
    pub(crate) fn new(source: Source) -> Filter {
        Filter { source, diagnostic: false }
    }

    /// The terminal's line for `raw`, if it gets one.
    pub(crate) fn show(&mut self, raw: &str) -> Option<String> {
        let plain = strip_ansi(raw);
        let line = plain.trim_end();
        if self.diagnostic {
            if line.is_empty() {
                self.diagnostic = false;
                return None;
            }
            if !is_log_line(line) {
                return Some(line.to_owned());
            }
            self.diagnostic = false;
        }
        match self.source {
            Source::Sqs => sqs_line(line),
            Source::Functions => self.functions_line(line),
        }
    }

    fn functions_line(&mut self, line: &str) -> Option<String> {
        if line.is_empty() || is_cargo_status(line) {
            return None;
        }
        if let Some((time, level, rest)) = text_event(line) {
            return text_line(&time, level, rest);
        }
        if line.starts_with('{') {
            return serde_json::from_str::<Value>(line).ok().and_then(|event| json_line(&event));
        }
        if starts_diagnostic(line) {
            self.diagnostic = true;
            return Some(line.to_owned());
        }
        // Anything else that speaks of trouble (a function's `Error: …` as it exits); the rest
        // is chatter, or two processes' lines run together in the pipe.
        looks_like_trouble(line).then(|| line.to_owned())
    }
}

/// The emulator's access log and start-up lines stay in the log, but for a 5xx; anything else
/// (a traceback) is shown.
fn sqs_line(line: &str) -> Option<String> {
    if let Some(status) = access_status(line) {
        return (status >= 500).then(|| format!("SQS emulator: {line}"));
    }
    if line.is_empty() || SQS_START.iter().any(|start| line.starts_with(start)) {
        return None;
    }
    Some(format!("SQS emulator: {line}"))
}

/// The status of an access log line: `127.0.0.1 - - [01/Dec/2026 18:03:01] "POST / HTTP/1.1" 200 -`.
fn access_status(line: &str) -> Option<u16> {
    if !line.contains(" - - [") {
        return None;
    }
    let (_, after) = line.rsplit_once("\" ")?;
    after.split_whitespace().next()?.parse().ok()
}

fn is_cargo_status(line: &str) -> bool {
    let word = line.split_whitespace().next().unwrap_or_default();
    line.starts_with(' ') && CARGO_STATUS.contains(&word)
}

/// The start of a compiler diagnostic (`error[E0425]: …`, `warning: …`) or of a panic message.
fn starts_diagnostic(line: &str) -> bool {
    ["error:", "error[", "warning:", "warning["].iter().any(|start| line.starts_with(start))
        || line.contains("' panicked at ")
}

fn looks_like_trouble(line: &str) -> bool {
    let line = line.to_ascii_lowercase();
    ["error", "warn", "panic", "fail", "fatal", "abort", "killed"].iter().any(|word| line.contains(word))
}

/// A line that is not part of a diagnostic: a log event or cargo's status.
fn is_log_line(line: &str) -> bool {
    text_event(line).is_some() || line.starts_with('{') || is_cargo_status(line)
}

/// `tracing`'s text format, as the time of day, the level and the rest: the functions'
/// `2026-12-01T18:03:01.123456Z  INFO spans: message fields`, or `cargo lambda watch`'s
/// ` INFO message fields` (no time: it is taken as now).
fn text_event(line: &str) -> Option<(String, &str, &str)> {
    let (time, rest) = match line.split_once(' ') {
        Some((timestamp, rest)) if is_timestamp(timestamp) => (timestamp[11..19].to_owned(), rest),
        _ => (now_utc(), line),
    };
    let rest = rest.trim_start();
    let (level, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level).then_some((time, level, rest))
}

/// `2026-12-01T18:03:01.123456Z`.
fn is_timestamp(word: &str) -> bool {
    let bytes = word.as_bytes();
    bytes.len() >= 20 && bytes[4] == b'-' && bytes[10] == b'T' && word.ends_with('Z')
}

/// The time of day (UTC), as the functions' own lines give theirs.
fn now_utc() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", secs / 3600 % 24, secs / 60 % 60, secs % 60)
}

fn text_line(time: &str, level: &str, rest: &str) -> Option<String> {
    let rest = without_runtime_spans(rest);
    if matches!(level, "WARN" | "ERROR") {
        return (!rest.contains(SEQUENTIAL_RUNTIME)).then(|| format!("{time} {level:<5} {rest}"));
    }
    let message = rest.rsplit_once("}: ").map_or(rest, |(_, message)| message);
    turn_line(time, message, |key| text_field(rest, key))
}

/// The spans every invocation's events carry (`worker{task_id=…}:`, `Lambda runtime
/// invoke{requestId=… xrayTraceId=…}:`), which say nothing to a reader of the terminal.
fn without_runtime_spans(mut rest: &str) -> &str {
    while rest.starts_with("worker{") || rest.starts_with("Lambda runtime invoke{") {
        match rest.split_once("}:") {
            Some((_, after)) => rest = after.trim_start(),
            None => break,
        }
    }
    rest
}

/// The value of `key=value` in a text event (a span's field or the event's), unquoted.
fn text_field(rest: &str, key: &str) -> Option<String> {
    let pattern = format!("{key}=");
    let mut from = 0;
    while let Some(at) = rest[from..].find(&pattern) {
        let start = from + at;
        let bounded = start == 0 || matches!(rest.as_bytes()[start - 1], b' ' | b'{');
        if bounded {
            let value = &rest[start + pattern.len()..];
            let end = value.find([' ', '}']).unwrap_or(value.len());
            return Some(value[..end].trim_matches('"').to_owned());
        }
        from = start + pattern.len();
    }
    None
}

/// An event of `tracing`'s JSON format (`LOG_FORMAT=json`); the functions' EMF metric lines are
/// JSON too, but have no level.
fn json_line(event: &Value) -> Option<String> {
    let level = event["level"].as_str()?;
    let time = event["timestamp"].as_str().and_then(|t| t.get(11..19)).unwrap_or_default();
    let message = event["fields"]["message"].as_str().unwrap_or_default();
    let field = |key: &str| {
        let spans = event["spans"].as_array().into_iter().flatten().rev();
        [&event["fields"], &event["span"]]
            .into_iter()
            .chain(spans)
            .map(|place| &place[key])
            .find(|value| !value.is_null())
            .map(|value| value.as_str().map_or_else(|| value.to_string(), str::to_owned))
    };
    if matches!(level, "WARN" | "ERROR") {
        if message.contains(SEQUENTIAL_RUNTIME) {
            return None;
        }
        let mut shown = format!("{time} {level:<5} {message}");
        let fields = event["fields"].as_object().into_iter().flatten().filter(|(k, _)| *k != "message");
        for (key, value) in fields.chain(event["span"].as_object().into_iter().flatten()) {
            if key != "name" {
                shown.push_str(&format!(
                    " {key}={}",
                    value.as_str().map_or_else(|| value.to_string(), str::to_owned)
                ));
            }
        }
        return Some(shown);
    }
    turn_line(time, message, field)
}

/// A finished turn's line, from the generator's `turn finished` or the sweeper's `turn ended`.
fn turn_line(time: &str, message: &str, field: impl Fn(&str) -> Option<String>) -> Option<String> {
    if !(message.starts_with("turn finished") || message.starts_with("turn ended")) {
        return None;
    }
    let (session, turn, outcome) = (field("session")?, field("turn")?, field("outcome")?);
    let ttft = field("ttft_ms").map(|ms| format!(", TTFT {ms} ms")).unwrap_or_default();
    Some(format!("{time} turn {turn} of {session}: {outcome}{ttft}"))
}

/// `raw` without its terminal colour codes (`ESC [ … m`).
fn strip_ansi(raw: &str) -> String {
    let mut plain = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as the local stack writes them (the functions' in colour, as `tracing` writes text).
    const TURN_FINISHED: &str = "\u{1b}[2m2026-12-01T18:16:02.997913Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[1mworker\u{1b}[0m\u{1b}[1m{\u{1b}[0m\u{1b}[3mtask_id\u{1b}[0m\u{1b}[2m=\u{1b}[0m7\u{1b}[1m}\u{1b}[0m\u{1b}[2m:\u{1b}[0m\u{1b}[1mLambda runtime invoke\u{1b}[0m\u{1b}[1m{\u{1b}[0m\u{1b}[3mrequestId\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"904068d2-5200-4f91-8e81-84478dfbd25b\" \u{1b}[3mxrayTraceId\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"Root=1-6b0f0ee1-a1da6099c02b3561bb4246d1;Parent=ef94b28f81a9f1ee;Sampled=1\"\u{1b}[1m}\u{1b}[0m\u{1b}[2m:\u{1b}[0m\u{1b}[1mturn\u{1b}[0m\u{1b}[1m{\u{1b}[0m\u{1b}[3msession\u{1b}[0m\u{1b}[2m=\u{1b}[0m6ca933ee-242a-44f6-aa25-6a4079aebdfc \u{1b}[3mturn\u{1b}[0m\u{1b}[2m=\u{1b}[0m1 \u{1b}[3mlease\u{1b}[0m\u{1b}[2m=\u{1b}[0mgen-fe56286b\u{1b}[1m}\u{1b}[0m\u{1b}[2m:\u{1b}[0m turn finished \u{1b}[3moutcome\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"committed\" \u{1b}[3mttft_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m112 \u{1b}[3mtokens\u{1b}[0m\u{1b}[2m=\u{1b}[0m50\n";
    const TURN_ENDED: &str = "2026-12-01T18:16:22.290737Z  INFO Lambda runtime invoke{requestId=\"ce25\" xrayTraceId=\"Root=1-6b\"}: turn ended session=70cfa3e7-f2d2-4264-97c9-d5d8bd93e659 turn=2 event=pickup_expired outcome=timeout\n";
    const MODEL_FAILED: &str = "2026-12-01T18:16:05.100000Z  WARN worker{task_id=3}:Lambda runtime invoke{requestId=\"r\" xrayTraceId=\"x\"}:turn{session=6ca933ee turn=1 lease=gen-1}: the model failed error=the demo model was told to fail\n";
    const ACCESS: &str = "127.0.0.1 - - [01/Dec/2026 18:03:01] \"POST / HTTP/1.1\" 200 -\n";

    fn shown(source: Source, lines: &[&str]) -> Vec<String> {
        let mut filter = Filter::new(source);
        lines.iter().filter_map(|line| filter.show(line)).collect()
    }

    #[test]
    fn a_finished_turn_is_one_line_with_its_session_turn_outcome_and_time_to_first_token() {
        assert_eq!(
            shown(Source::Functions, &[TURN_FINISHED, TURN_ENDED]),
            [
                "18:16:02 turn 1 of 6ca933ee-242a-44f6-aa25-6a4079aebdfc: committed, TTFT 112 ms",
                "18:16:22 turn 2 of 70cfa3e7-f2d2-4264-97c9-d5d8bd93e659: timeout",
            ]
        );
    }

    #[test]
    fn the_same_turn_line_comes_from_the_json_log_format() {
        let line = r#"{"timestamp":"2026-12-01T18:16:02.997913Z","level":"INFO","fields":{"message":"turn finished","outcome":"committed","ttft_ms":112,"tokens":50},"span":{"lease":"gen-1","session":"6ca933ee","turn":"1","name":"turn"},"spans":[{"task_id":7,"name":"worker"},{"lease":"gen-1","session":"6ca933ee","turn":"1","name":"turn"}]}"#;
        assert_eq!(
            shown(Source::Functions, &[line]),
            ["18:16:02 turn 1 of 6ca933ee: committed, TTFT 112 ms"]
        );
        let warning = r#"{"timestamp":"2026-12-01T18:16:05.1Z","level":"WARN","fields":{"message":"the model failed","error":"down"},"span":{"session":"6ca933ee","turn":"1","name":"turn"}}"#;
        assert_eq!(
            shown(Source::Functions, &[warning]),
            ["18:16:05 WARN  the model failed error=down session=6ca933ee turn=1"]
        );
        let metric =
            r#"{"Service":"chat","TurnsCommitted":1.0,"_aws":{"Timestamp":1,"CloudWatchMetrics":[]}}"#;
        assert!(shown(Source::Functions, &[metric]).is_empty());
    }

    #[test]
    fn warnings_and_errors_are_shown_without_the_runtimes_spans() {
        let error = "2026-12-01T18:16:06.000000Z ERROR Lambda runtime invoke{requestId=\"r\"}: enqueueing the turn failed error=dispatch failure";
        assert_eq!(
            shown(Source::Functions, &[MODEL_FAILED, error]),
            [
                "18:16:05 WARN  turn{session=6ca933ee turn=1 lease=gen-1}: the model failed error=the demo model was told to fail",
                "18:16:06 ERROR enqueueing the turn failed error=dispatch failure",
            ]
        );
        let watcher = shown(Source::Functions, &[" ERROR internal error watching your project"]);
        assert!(
            watcher.len() == 1 && watcher[0].ends_with(" ERROR internal error watching your project"),
            "{watcher:?}"
        );
    }

    #[test]
    fn routine_lines_stay_in_the_log() {
        let routine = [
            "2026-12-01T18:16:09.959502Z  INFO Lambda runtime invoke{requestId=\"b4\"}: sweep done report=SweepReport { checked: 1, redriven: 1 }",
            " INFO starting lambda function instance function=\"ingest\" instance_id=a1",
            " INFO starting Runtime server runtime_addr=127.0.0.1:38161",
            "2026-12-01T18:03:01.000000Z  INFO request{request_id=1 method=GET path=/health}: answered status=200",
            "2026-12-01T18:02:59.454564Z  WARN AWS_LAMBDA_MAX_CONCURRENCY is set to '1', but the concurrency-tokio feature is not enabled; running sequentially",
            "    Blocking waiting for file lock on package cache",
            "   Compiling generator v0.1.0 (/work/functions/generator)",
            "    Finished `dev` profile [unoptimized + debuginfo] target(s) in 0.32s",
            "     Running `target/debug/generator`",
            // Two `cargo run`s writing to the same pipe at once.
            " waiting for file lock on package cache",
            "",
        ];
        assert_eq!(shown(Source::Functions, &routine), Vec::<String>::new());
    }

    #[test]
    fn a_compiler_error_or_a_panic_is_shown_whole() {
        let lines = [
            "   Compiling ingest v0.1.0 (/work/functions/ingest)",
            "error[E0425]: cannot find value `x` in this scope",
            "  --> functions/ingest/src/lib.rs:10:5",
            "   |",
            "10 |     x",
            "   |     ^ not found in this scope",
            "",
            "error: could not compile `ingest` (bin \"ingest\") due to 1 previous error",
            "thread 'main' panicked at functions/ingest/src/main.rs:3:5:",
            "boom",
            "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
            "2026-12-01T18:16:02.000000Z  INFO model ready model=demo",
            "Error: Config(Invalid { name: \"LLM_MODEL\" })",
        ];
        assert_eq!(
            shown(Source::Functions, &lines),
            [
                "error[E0425]: cannot find value `x` in this scope",
                "  --> functions/ingest/src/lib.rs:10:5",
                "   |",
                "10 |     x",
                "   |     ^ not found in this scope",
                "error: could not compile `ingest` (bin \"ingest\") due to 1 previous error",
                "thread 'main' panicked at functions/ingest/src/main.rs:3:5:",
                "boom",
                "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
                "Error: Config(Invalid { name: \"LLM_MODEL\" })",
            ]
        );
    }

    #[test]
    fn the_emulators_access_log_stays_in_the_log_but_for_its_server_errors() {
        let lines = [
            ACCESS,
            "127.0.0.1 - - [01/Dec/2026 18:03:02] \"POST / HTTP/1.1\" 400 -",
            " * Running on http://127.0.0.1:9324",
            "Press CTRL+C to quit",
            "\u{1b}[31m\u{1b}[1mWARNING: This is a development server. Do not use it in a production deployment. Use a production WSGI server instead.\u{1b}[0m",
            "127.0.0.1 - - [01/Dec/2026 18:03:03] \"POST / HTTP/1.1\" 500 -",
            "Traceback (most recent call last):",
        ];
        assert_eq!(
            shown(Source::Sqs, &lines),
            [
                "SQS emulator: 127.0.0.1 - - [01/Dec/2026 18:03:03] \"POST / HTTP/1.1\" 500 -",
                "SQS emulator: Traceback (most recent call last):",
            ]
        );
    }
}
