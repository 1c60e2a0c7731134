//! The whole stack on one machine, as plain processes on loopback:
//!
//! - DynamoDB: dynoxide, embedded in this process;
//! - SQS: a moto server (from the project's pinned Python tools);
//! - the functions: `cargo lambda watch`, which serves the functions' URLs and the Lambda invoke
//!   API on an internal port;
//! - the one-origin API in front of it ([`gateway`]): Lambda's concurrency limit as admission
//!   control, which also keeps `cargo lambda watch` from wedging under a crowd;
//! - what `cargo lambda watch` does not provide: the SQS event source mapping (long poll, batch,
//!   invoke the generator, delete what succeeded, leave failures to the visibility timeout, DLQ
//!   by redrive) and the sweeper's schedule.
//!
//! Every child runs under `infra/supervise.sh`, which stops it when this process exits.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

pub mod alarm_math;
pub mod calls;
mod calm;
pub mod cpu;
pub mod gateway;
mod moto;
mod processes;
pub mod runtime_api;
mod shim;
mod stack;

pub use chat_testkit::{dynamodb_client, fake_llm, sqs_client, sse_reader, LocalDynamo};
use moto::create_queues;
use processes::{free_port, supervised, wait_until, Supervisor};
pub use shim::{invoke, InvokeError};
pub use stack::Stack;

/// The functions the stack runs, in build order.
pub const FUNCTIONS: [&str; 4] = ["ingest", "generator", "stream", "sweeper"];

/// How the stack is laid out.
#[derive(Debug, Clone)]
pub struct StackSettings {
    /// The workspace root (where `Cargo.toml` and `.tools/` are).
    pub root: PathBuf,
    /// Port of the one-origin API (`cargo lambda watch`); 0 picks a free one.
    pub api_port: u16,
    /// Port of the DynamoDB emulator; 0 picks a free one.
    pub dynamodb_port: u16,
    /// Port of the SQS emulator; 0 picks a free one.
    pub sqs_port: u16,
    /// Table name.
    pub table: String,
    /// Queue name (its dead-letter queue is `{queue}-dlq`).
    pub queue: String,
    /// Function instances `cargo lambda watch` may run at once, per function.
    pub concurrency: usize,
    /// Invocations one instance of ingest, stream or the generator serves at once
    /// (`run_concurrent`); the gateway and the event source let no more than
    /// `concurrency × invocations_per_instance` invocations of a function reach the watcher.
    pub invocations_per_instance: usize,
    /// Requests that may wait for a function's slot at the gateway; more get 429 at once.
    pub max_waiting: usize,
    /// Longest wait for a slot at the gateway before 429.
    pub max_wait: Duration,
    /// How callers are identified.
    pub auth: LocalAuth,
    /// Origins whose web pages may call the API, besides the API's own.
    pub cors_origins: Vec<String>,
    /// How often the sweeper runs.
    pub sweep_interval: Duration,
    /// SQS visibility timeout: how long a failed or crashed delivery waits before redelivery.
    pub visibility_timeout: Duration,
    /// Receives before a message moves to the dead-letter queue.
    pub max_receive_count: u32,
    /// Extra environment for the functions (model, timing), on top of the caller's environment.
    pub function_env: Vec<(String, String)>,
    /// Secrets (name, value) to create in the local Secrets Manager before the functions start.
    pub secrets: Vec<(String, String)>,
    /// Where the emulators' and functions' output goes.
    pub output: Output,
    /// Rebuild and restart a function when the workspace's files change (`make dev`). Off for
    /// tests and benchmarks: `cargo lambda watch` counts any write under the workspace, a git
    /// worktree's index included, and a restart kills the invocations in flight.
    pub reload_on_change: bool,
    /// Record what the functions ask of DynamoDB, SQS, Secrets Manager and a local Bedrock
    /// ([`Stack::calls`]): each reaches them through a relay that notes the operation and the
    /// function that sent it. On for the tests; off for `make dev` and the benchmarks, where the
    /// relay would only cost a hop.
    pub record_calls: bool,
}

/// Where the stack's processes (the SQS emulator, `cargo lambda watch`, the functions) write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// To this process's stdout and stderr, as they come.
    Inherit,
    /// All of it to a file (appended to).
    File(PathBuf),
    /// All of it to a file (a new one each start), and to this process's stderr only a line per
    /// finished turn (session, turn, outcome, time to first token) and every warning and error:
    /// `make dev`'s calm terminal.
    Calm(PathBuf),
}

/// How the local functions identify callers (`AUTH_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAuth {
    /// Trusted callers on loopback; the path names the user (seed-compatible).
    None,
    /// Bearer tokens from the stack's own issuer: `POST /dev/token {"sub": "alice"}` mints one,
    /// and its keys are published at `/.well-known/jwks.json`.
    Jwt,
}

/// The audience of the local issuer's tokens.
pub const LOCAL_AUDIENCE: &str = "chat-local";

/// `cargo lambda watch` 1.9.2 wedges once more than 100 invocations wait for one function.
const WATCH_QUEUE_LIMIT: usize = 100;

impl StackSettings {
    /// Invocations of one function the stack lets reach `cargo lambda watch` at once.
    pub fn slots(&self) -> usize {
        self.concurrency * self.invocations_per_instance
    }

    /// Defaults for `make dev`, rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> StackSettings {
        StackSettings {
            root: root.into(),
            api_port: 9000,
            dynamodb_port: 8000,
            sqs_port: 9324,
            table: "chat".to_owned(),
            queue: "chat-turns".to_owned(),
            concurrency: 4,
            invocations_per_instance: 16,
            max_waiting: 1000,
            max_wait: Duration::from_secs(10),
            auth: LocalAuth::None,
            cors_origins: Vec::new(),
            sweep_interval: Duration::from_secs(5),
            visibility_timeout: Duration::from_secs(60),
            max_receive_count: 5,
            function_env: Vec::new(),
            secrets: Vec::new(),
            output: Output::Inherit,
            reload_on_change: false,
            record_calls: false,
        }
    }
}

/// Starting the stack failed; the message says what to do.
#[derive(Debug)]
pub struct StackError(pub String);

impl std::fmt::Display for StackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StackError {}

fn fail(what: impl std::fmt::Display) -> StackError {
    StackError(what.to_string())
}

/// SQS (and Secrets Manager): a moto server on 127.0.0.1, from the pinned local tools. It stops
/// when dropped, or when this process exits.
pub struct LocalSqs {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    supervisor: Supervisor,
}

impl LocalSqs {
    /// Starts moto on `port` (0 picks a free one), its output to `out` and `err`, and returns
    /// once it answers.
    pub async fn start(
        root: &std::path::Path,
        port: u16,
        out: Stdio,
        err: Stdio,
    ) -> Result<LocalSqs, StackError> {
        let moto = root.join(".tools/venv/bin/moto_server");
        if !moto.exists() {
            return Err(fail("the local tools are missing: run `make tools` first"));
        }
        let port = free_port(port)?;
        let supervisor = Supervisor(
            supervised(root, moto.as_os_str())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|e| fail(format!("starting moto_server: {e}")))?,
        );
        let endpoint = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let probe = format!("{endpoint}/moto-api/");
        wait_until("the SQS emulator", Duration::from_secs(60), || {
            let (http, probe) = (http.clone(), probe.clone());
            async move { http.get(&probe).send().await.is_ok() }
        })
        .await?;
        Ok(LocalSqs { endpoint, supervisor })
    }

    /// Creates the generation queue and its dead-letter queue as the stack does; their URLs.
    pub async fn create_queues(&self, settings: &StackSettings) -> Result<(String, String), StackError> {
        create_queues(&sqs_client(&self.endpoint), settings).await
    }
}
