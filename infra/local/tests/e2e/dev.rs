//! `make dev`'s terminal: the `chat-local` binary as `make dev` runs it (on free ports, without
//! reloading on changes), its stderr read as a developer would read it. The banner names the
//! log; a finished turn is one line with its session, turn, outcome and time to first token; a
//! function's warning is shown; the emulator's access log, cargo's chatter and the functions'
//! routine logs are in the log and not on the terminal.

use crate::harness::*;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// `chat-local`, running; stopped with SIGTERM (as `timeout` or a CI runner stops it) when dropped.
struct Dev {
    child: tokio::process::Child,
    terminal: Arc<Mutex<Vec<String>>>,
    /// Reads the terminal until chat-local (its only writer) closes it.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Dev {
    fn start(log: &Path) -> Dev {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-local"))
            .current_dir(root())
            .envs([("API_PORT", "0"), ("DYNAMODB_PORT", "0"), ("SQS_PORT", "0")])
            .envs([("RELOAD_ON_CHANGE", "false"), ("LAMBDA_CONCURRENCY", "1"), ("DEMO_FAULTS", "true")])
            .env("SWEEP_INTERVAL_MS", "500")
            .env("DEV_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chat-local starts");
        let terminal = Arc::new(Mutex::new(Vec::new()));
        let (stderr, lines) = (child.stderr.take().expect("piped stderr"), terminal.clone());
        let reader = tokio::spawn(async move {
            let mut stderr = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                lines.lock().unwrap().push(line);
            }
        });
        Dev { child, terminal, reader: Some(reader) }
    }

    fn terminal(&self) -> Vec<String> {
        self.terminal.lock().unwrap().clone()
    }

    /// The terminal's first line that `wanted` picks, once it is there.
    async fn line(&self, what: &str, timeout: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.terminal().into_iter().find(|l| wanted(l)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} after {timeout:?}; the terminal:\n{}",
                self.terminal().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
    }
}

#[tokio::test]
async fn make_devs_terminal_shows_the_banner_a_line_per_turn_and_warnings_but_no_access_log() {
    let log = root().join("target/e2e-logs/dev.log");
    let mut dev = Dev::start(&log);
    dev.line("banner", Duration::from_secs(600), |l| l.starts_with("==> ready in")).await;
    let page =
        dev.line("chat page", Duration::from_secs(1), |l| l.trim_start().starts_with("Chat page")).await;
    let api = page.split_whitespace().nth(2).expect("the page's URL").trim_end_matches('/').to_owned();
    let named = dev.line("log", Duration::from_secs(1), |l| l.trim_start().starts_with("Log ")).await;
    assert!(named.contains(&log.display().to_string()), "the banner names the log: {named}");

    let answered = send_text(&api, &user(), "Hello from the terminal test", None).await;
    assert_eq!(answered.status, 202, "{}", answered.body);
    let failed = send_text(&api, &user(), "break [[fail-after:3]]", None).await;
    assert_eq!(failed.status, 202, "{}", failed.body);
    let turn = Duration::from_secs(60);
    let mut turn_lines = Vec::new();
    for (answer, outcome) in [(&answered, "committed, TTFT "), (&failed, "error")] {
        let id = answer.body["session_id"].as_str().unwrap().to_owned();
        let wanted = format!("turn 1 of {id}: {outcome}");
        dev.line(&wanted, turn, |l| l.contains(&wanted)).await;
        turn_lines.push(format!("turn 1 of {id}:"));
    }
    dev.line("the model's failure", turn, |l| l.contains("WARN") && l.contains("the model failed")).await;

    // The log has what the terminal leaves out: the emulator's access log, the functions'
    // routine lines, and the sweeps (a sweep's metric line, every half second here).
    let deadline = Instant::now() + Duration::from_secs(30);
    let routine_logged =
        ["\"POST / HTTP/1.1\" 200", "starting lambda function instance", "turn finished", "SweepBacklog"];
    loop {
        let logged = std::fs::read_to_string(&log).expect("the log");
        let missing: Vec<&&str> = routine_logged.iter().filter(|r| !logged.contains(**r)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the log has no {missing:?} after 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Stopped as `make dev` is: what the processes say as they stop stays in the log.
    let pid = dev.child.id().expect("running").to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), dev.child.wait()).await;
    assert!(status.is_ok_and(|s| s.is_ok_and(|s| s.success())), "chat-local stops on TERM");
    let reader = dev.reader.take().expect("reading");
    tokio::time::timeout(Duration::from_secs(10), reader).await.expect("the terminal closes").unwrap();

    let terminal = dev.terminal();
    for wanted in &turn_lines {
        let shown: Vec<&String> = terminal.iter().filter(|l| l.contains(wanted.as_str())).collect();
        assert_eq!(shown.len(), 1, "one line for {wanted}, not {shown:?}");
    }
    let routine = [
        " - - [",
        "HTTP/1.1\"",
        " INFO ",
        "Compiling",
        "Running `",
        "starting lambda function instance",
        "error response operation=",
        "SweepBacklog",
        "sweep done",
        "TurnsCommitted",
    ];
    for line in &terminal {
        assert!(!routine.iter().any(|r| line.contains(r)), "a routine line on the terminal: {line}");
    }
    let after: Vec<&String> = terminal.iter().skip_while(|l| !l.contains("==> stopping")).skip(1).collect();
    assert_eq!(after, Vec::<&String>::new(), "nothing after ==> stopping");
}
