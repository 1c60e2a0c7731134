//! The harness: one local stack per [`Config`] (emulators + `cargo lambda watch` on free
//! loopback ports), started on first use and shared by the tests that name it, an HTTP client, and
//! an SSE reader. Tests stay independent by making their own users and sessions.

use chat_local::calls::Calls;
use chat_local::fake_llm::FakeLlm;
use chat_local::{Stack, StackSettings};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How a stack is set up. Tests that name the same configuration share its stack.
pub struct Config {
    /// Keys the stack (one per name) and names its log, `target/e2e-logs/{name}.log`.
    pub name: &'static str,
    /// Changes to [`test_settings`]; `model` is the URL of the stack's fake model server.
    pub configure: fn(settings: &mut StackSettings, model: &str),
}

/// The demo model's price in the default and sign-in stacks, USD per million tokens (input,
/// output), so replies carry a cost.
pub const DEMO_PRICE: (f64, f64) = (2.0, 4.0);
const DEMO_PRICES: &str = r#"{"demo": {"input": 2.0, "output": 4.0}}"#;

/// The functions as the tests run them by default: the demo model (priced at [`DEMO_PRICE`]),
/// with [`test_env`]'s timing.
pub const DEFAULT: Config = Config {
    name: "default",
    configure: |settings, _| settings.function_env.extend(env(&[("MODEL_PRICES", DEMO_PRICES)])),
};

/// Sign-in with the stack's own token issuer (`AUTH_MODE=jwt`), and two turns a minute per user
/// (each user sends at most that, but the browser scenario that shows a 429).
pub const JWT: Config = Config {
    name: "jwt",
    configure: |settings, _| {
        settings.auth = chat_local::LocalAuth::Jwt;
        settings.function_env.extend(env(&[("TURNS_PER_MINUTE", "2"), ("MODEL_PRICES", DEMO_PRICES)]));
    },
};

/// A running stack, as the tests see it.
pub struct App {
    pub api: String,
    pub dynamodb_endpoint: String,
    pub sqs_endpoint: String,
    pub queue_url: String,
    pub table: String,
    /// Where the stack's processes write (EMF metric lines included).
    pub log: PathBuf,
    /// A fake model server; the generator uses it if the configuration points it there.
    pub model: &'static FakeLlm,
    /// The functions' environment on top of the process's ([`StackSettings::function_env`]).
    pub function_env: Vec<(String, String)>,
    /// What the functions have asked of AWS ([`StackSettings::record_calls`]).
    pub calls: Arc<Calls>,
}

impl App {
    /// A variable of the functions' environment, as the stack sets it.
    pub fn function_var(&self, name: &str) -> Option<&str> {
        self.function_env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Timing used by the tests: short leases and deadlines so recovery paths finish quickly.
pub fn test_env() -> Vec<(String, String)> {
    env(&[
        ("DEMO_REPLY_TOKENS", "50"),
        ("DEMO_TOKEN_DELAY_MS", "20"),
        ("DEMO_FAULTS", "true"),
        ("LEASE_MS", "3000"),
        ("PICKUP_TIMEOUT_MS", "4000"),
        ("MAX_ATTEMPTS", "3"),
        ("MAX_REDRIVES", "3"),
        ("STREAM_POLL_FAST_MS", "30"),
        ("STREAM_POLL_SLOW_MS", "200"),
        ("LOG_FORMAT", "text"),
    ])
    .collect()
}

/// Environment variables from string pairs.
pub fn env<'a>(pairs: &'a [(&str, &str)]) -> impl Iterator<Item = (String, String)> + 'a {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The settings every test stack starts from: free ports, two instances per function, quick
/// sweeps and redeliveries, [`test_env`], its output in its log, and the functions' AWS calls
/// recorded.
pub fn test_settings(name: &str) -> StackSettings {
    let mut settings = StackSettings::new(root());
    settings.api_port = 0;
    settings.dynamodb_port = 0;
    settings.sqs_port = 0;
    settings.table = format!("chat-e2e-{}", std::process::id());
    settings.concurrency = 2;
    settings.invocations_per_instance = 16;
    settings.sweep_interval = Duration::from_millis(500);
    settings.visibility_timeout = Duration::from_secs(5);
    settings.function_env = test_env();
    settings.output = chat_local::Output::File(log_of(name));
    settings.record_calls = true;
    settings
}

fn log_of(name: &str) -> PathBuf {
    root().join(format!("target/e2e-logs/{name}.log"))
}

/// The stack of `config`, started on first use on a runtime of its own that lives as long as the
/// process (its children stop when the process exits). Stacks of other configurations start
/// side by side.
pub fn app(config: &Config) -> &'static App {
    let slot = *APPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(config.name)
        .or_insert_with(|| Box::leak(Box::new(OnceLock::new())));
    slot.get_or_init(|| start(config))
}

static APPS: Mutex<BTreeMap<&'static str, &'static OnceLock<App>>> = Mutex::new(BTreeMap::new());

/// The stacks started so far in this process (by any test), by configuration name.
pub fn started() -> Vec<(&'static str, &'static App)> {
    let apps = APPS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    apps.iter().filter_map(|(name, slot)| Some((*name, slot.get()?))).collect()
}

fn start(config: &Config) -> App {
    let (name, configure) = (config.name, config.configure);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let model: &'static FakeLlm =
                Box::leak(Box::new(FakeLlm::start(Vec::new()).await.expect("fake model server starts")));
            let mut settings = test_settings(name);
            configure(&mut settings, &model.url);
            let function_env = settings.function_env.clone();
            match Stack::start(settings, |step| eprintln!("[e2e {name}] {step}")).await {
                Ok(stack) => {
                    let app = App {
                        api: stack.api.clone(),
                        dynamodb_endpoint: stack.dynamodb_endpoint.clone(),
                        sqs_endpoint: stack.sqs_endpoint.clone(),
                        queue_url: stack.queue_url.clone(),
                        table: stack.table.clone(),
                        log: log_of(name),
                        model,
                        function_env,
                        calls: stack.calls.clone().expect("the test stacks record the functions' calls"),
                    };
                    tx.send(Ok(app)).expect("test thread waits");
                    std::future::pending::<()>().await;
                }
                Err(e) => tx.send(Err(e.to_string())).expect("test thread waits"),
            }
        });
    });
    match rx.recv().expect("stack thread answers") {
        Ok(app) => app,
        Err(e) => panic!("the {name} stack did not start: {e} (see target/e2e-logs/{name}.log)"),
    }
}

pub fn user() -> String {
    format!("u-{}", uuid::Uuid::new_v4().simple())
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// A JSON answer: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

pub async fn request(method: reqwest::Method, url: String, body: Option<String>) -> Answer {
    let mut req = http().request(method, url).header("content-type", "application/json");
    if let Some(body) = body {
        req = req.body(body);
    }
    let response = req.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    Answer { status, body }
}

pub async fn send(api: &str, user: &str, body: Value) -> Answer {
    request(reqwest::Method::POST, format!("{api}/sessions/{user}/messages"), Some(body.to_string())).await
}

pub async fn send_text(api: &str, user: &str, message: &str, session: Option<&str>) -> Answer {
    let mut body = json!({ "message": message });
    if let Some(session) = session {
        body["session_id"] = json!(session);
    }
    send(api, user, body).await
}

pub async fn get_session(api: &str, id: &str) -> Answer {
    request(reqwest::Method::GET, format!("{api}/sessions/{id}"), None).await
}

/// Polls the session until `done(state)`; panics after `timeout`.
pub async fn wait_for_state(api: &str, id: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = get_session(api, id).await;
        let state = answer.body["session"]["state"].as_str().unwrap_or_default().to_owned();
        if done(&state) {
            return answer.body["session"].clone();
        }
        assert!(Instant::now() < deadline, "session {id} still {state} after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The committed assistant message of `turn`, if any.
pub fn reply_of(session: &Value, turn: u64) -> Option<Value> {
    session["messages"]
        .as_array()?
        .iter()
        .find(|m| {
            m["role"] == "assistant"
                && m["id"].as_str().is_some_and(|id| id.ends_with(&format!(":{turn}:assistant")))
        })
        .cloned()
}

/// One event of a stream (the one SSE parser, `chat_local::sse_reader`).
pub type Sse = chat_local::sse_reader::SseEvent;

/// Reads SSE events from a response as they arrive.
pub struct SseReader {
    stream: chat_local::sse_reader::SseStream,
}

impl SseReader {
    pub async fn open(url: &str, last_event_id: Option<&str>) -> (u16, SseReader) {
        let mut req = reqwest::Client::new().get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let response = req.send().await.expect("stream request");
        (response.status().as_u16(), SseReader { stream: chat_local::sse_reader::SseStream::new(response) })
    }

    /// The `retry:` hint the server sent, if any.
    pub fn retry_hint(&self) -> Option<u64> {
        self.stream.parser.retry
    }

    /// The next event, or `None` when the server closed the stream.
    pub async fn next(&mut self) -> Option<Sse> {
        match tokio::time::timeout(Duration::from_secs(60), self.stream.next()).await {
            Ok(Ok(event)) => event,
            Ok(Err(_)) => None,
            Err(_) => panic!("no SSE event for 60 s"),
        }
    }

    /// Every event until the server closes the stream.
    pub async fn rest(&mut self) -> Vec<Sse> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// The token events' text, concatenated.
pub fn text_of(events: &[Sse]) -> String {
    events.iter().filter(|e| e.event == "token").map(|e| e.data.as_str()).collect()
}

/// Token indexes of the events, in order.
pub fn indexes_of(events: &[Sse]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.event == "token")
        .map(|e| e.id.as_deref().unwrap().split_once(':').unwrap().1.parse().unwrap())
        .collect()
}
