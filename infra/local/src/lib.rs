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

use chat_core::{Store, StoreOptions};
use serde_json::json;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod alarm_math;
pub mod cpu;
pub mod gateway;
mod moto;
mod processes;
pub mod runtime_api;
mod shim;

pub use chat_testkit::{dynamodb_client, fake_llm, sqs_client, sse_reader, LocalDynamo};
use moto::{create_queues, create_secrets};
use processes::{free_port, supervised, wait_until, Supervisor};
use shim::{event_source_mapping, schedule, scheduled_event, ttl_process};
pub use shim::{invoke, InvokeError};

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
    /// Where the emulators' and functions' output goes; `None` passes it through.
    pub log_file: Option<PathBuf>,
    /// Rebuild and restart a function when the workspace's files change (`make dev`). Off for
    /// tests and benchmarks: `cargo lambda watch` counts any write under the workspace, a git
    /// worktree's index included, and a restart kills the invocations in flight.
    pub reload_on_change: bool,
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
            log_file: None,
            reload_on_change: false,
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

/// A running stack. [`Stack::stop`] (or dropping it, or this process exiting) stops everything.
pub struct Stack {
    /// Base URL of the one-origin API, e.g. `http://127.0.0.1:9000`.
    pub api: String,
    /// `cargo lambda watch` itself (function URLs and the Lambda invoke API), behind the gateway.
    pub functions: String,
    /// What the gateway has forwarded and shed.
    pub gateway: Arc<gateway::Counters>,
    /// The local token issuer, with `LocalAuth::Jwt`.
    pub issuer: Option<Arc<chat_auth::dev_issuer::DevIssuer>>,
    /// DynamoDB endpoint.
    pub dynamodb_endpoint: String,
    /// SQS endpoint.
    pub sqs_endpoint: String,
    /// The generation queue.
    pub queue_url: String,
    /// Its dead-letter queue.
    pub dlq_url: String,
    /// The table.
    pub table: String,
    dynamodb: aws_sdk_dynamodb::Client,
    sqs: aws_sdk_sqs::Client,
    shutdown: watch::Sender<bool>,
    children: Vec<Supervisor>,
    tasks: Vec<JoinHandle<()>>,
}

impl Stack {
    /// Starts everything and returns once the API answers; `progress` hears each step.
    pub async fn start(settings: StackSettings, progress: impl Fn(&str)) -> Result<Stack, StackError> {
        let root =
            settings.root.canonicalize().map_err(|e| fail(format!("{}: {e}", settings.root.display())))?;
        if settings.concurrency == 0 || settings.invocations_per_instance == 0 {
            return Err(fail("LAMBDA_CONCURRENCY and LOCAL_INVOCATIONS_PER_INSTANCE must be at least 1"));
        }
        if settings.slots() >= WATCH_QUEUE_LIMIT {
            return Err(fail(format!(
                "LAMBDA_CONCURRENCY × LOCAL_INVOCATIONS_PER_INSTANCE is {}; keep it under {WATCH_QUEUE_LIMIT}, \
                 the most invocations cargo lambda watch can queue for a function without wedging",
                settings.slots()
            )));
        }
        let venv_bin = root.join(".tools/venv/bin");
        if !venv_bin.join("moto_server").exists() || !venv_bin.join("cargo-lambda").exists() {
            return Err(fail("the local tools are missing: run `make tools` first"));
        }
        let log = match &settings.log_file {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(fail)?;
                }
                Some(std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(fail)?)
            }
            None => None,
        };
        let output = || -> Result<(Stdio, Stdio), StackError> {
            Ok(match &log {
                Some(file) => {
                    (file.try_clone().map_err(fail)?.into(), file.try_clone().map_err(fail)?.into())
                }
                None => (Stdio::inherit(), Stdio::inherit()),
            })
        };
        let (shutdown, _) = watch::channel(false);
        let mut children = Vec::new();
        let mut tasks = Vec::new();

        progress("starting DynamoDB (embedded dynoxide)");
        let dynamo = LocalDynamo::start(settings.dynamodb_port, &settings.table).await.map_err(fail)?;
        let table_stream = dynamo.stream(&settings.table).map_err(fail)?;
        let dynamodb_endpoint = dynamo.endpoint.clone();
        let dynamodb = dynamodb_client(&dynamodb_endpoint);

        progress("starting SQS (moto server)");
        let (out, err) = output()?;
        let sqs_server = LocalSqs::start(&root, settings.sqs_port, out, err).await?;
        let sqs_endpoint = sqs_server.endpoint.clone();
        children.push(sqs_server.supervisor);
        let http = reqwest::Client::new();
        let sqs = sqs_client(&sqs_endpoint);
        let (queue_url, dlq_url) = create_queues(&sqs, &settings).await?;
        create_secrets(&sqs_endpoint, &settings.secrets).await?;

        progress("starting the functions (cargo lambda watch; the first start builds them)");
        // The API port is bound now, so a busy port fails the start before anything is built.
        let api_listener =
            tokio::net::TcpListener::bind(("127.0.0.1", settings.api_port)).await.map_err(|e| {
                fail(format!("port {} on 127.0.0.1 is not free ({e}); set API_PORT", settings.api_port))
            })?;
        let api = format!("http://{}", api_listener.local_addr().map_err(fail)?);
        let issuer = match settings.auth {
            LocalAuth::Jwt => {
                Some(Arc::new(chat_auth::dev_issuer::DevIssuer::new(api.clone(), LOCAL_AUDIENCE)))
            }
            LocalAuth::None => None,
        };
        let functions_port = free_port(0)?;
        let functions = format!("http://127.0.0.1:{functions_port}");
        let (out, err) = output()?;
        let mut watch_cmd = supervised(&root, venv_bin.join("cargo-lambda").as_os_str());
        watch_cmd
            .args(["lambda", "watch", "-A", "127.0.0.1", "-P", &functions_port.to_string()])
            .args(["--concurrency", &settings.concurrency.to_string()])
            // CORS is the gateway's, from an origin list; the watcher's own allows any origin.
            .arg("--disable-cors")
            .args((!settings.reload_on_change).then_some("--ignore-changes"))
            // The functions' proof that they run here, not on Lambda (`AUTH_MODE=none`, local
            // concurrency); never in `[metadata.lambda.env]`, which a deploy would carry.
            .env(chat_runtime::aws::LOCAL_STACK, "1")
            .env(
                chat_runtime::aws::LOCAL_INVOCATIONS_PER_INSTANCE,
                settings.invocations_per_instance.to_string(),
            )
            .env("PATH", format!("{}:{}", venv_bin.display(), std::env::var("PATH").unwrap_or_default()))
            .env("TABLE_NAME", &settings.table)
            .env("QUEUE_URL", &queue_url)
            .env("STREAM_URL_BASE", &api)
            .env("AWS_ENDPOINT_URL_DYNAMODB", &dynamodb_endpoint)
            .env("AWS_ENDPOINT_URL_SQS", &sqs_endpoint)
            // moto serves Secrets Manager too: a local API key secret works like the deployed one.
            .env("AWS_ENDPOINT_URL_SECRETS_MANAGER", &sqs_endpoint);
        match &issuer {
            Some(issuer) => watch_cmd
                .env("AUTH_MODE", "jwt")
                .env("JWT_ISSUER", &issuer.issuer)
                .env("JWT_AUDIENCE", &issuer.audience)
                .env("JWT_JWKS_URL", format!("{api}/.well-known/jwks.json")),
            None => watch_cmd.env("AUTH_MODE", "none"),
        };
        let provider = settings
            .function_env
            .iter()
            .rev()
            .find(|(k, _)| k == "LLM_PROVIDER")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("LLM_PROVIDER").ok());
        if provider.as_deref() == Some("bedrock") {
            // Bedrock is the real service: keep the caller's AWS credentials and region (the
            // emulators accept any).
            if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
                watch_cmd.env("AWS_REGION", "us-east-1");
            }
        } else {
            watch_cmd
                .env("AWS_REGION", "us-east-1")
                .env("AWS_ACCESS_KEY_ID", "local")
                .env("AWS_SECRET_ACCESS_KEY", "local")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env_remove("AWS_PROFILE")
                .env_remove("AWS_SESSION_TOKEN");
        }
        watch_cmd
            .envs(settings.function_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(out)
            .stderr(err);
        children.push(Supervisor(
            watch_cmd.spawn().map_err(|e| fail(format!("starting cargo lambda watch: {e}")))?,
        ));

        let limits = gateway::Limits {
            concurrency: settings.slots(),
            max_waiting: settings.max_waiting,
            max_wait: settings.max_wait,
        };
        let mut origins = vec![api.clone(), api.replace("127.0.0.1", "localhost")];
        let hosts: Vec<String> =
            origins.iter().map(|origin| origin.trim_start_matches("http://").to_owned()).collect();
        origins.extend(settings.cors_origins.iter().map(|o| o.trim_end_matches('/').to_owned()));
        let (front, gateway_task) = gateway::start(
            api_listener,
            functions.clone(),
            hosts,
            limits,
            issuer.clone(),
            origins,
            shutdown.subscribe(),
        )
        .map_err(fail)?;
        tasks.push(gateway_task);

        let mut stack = Stack {
            api: api.clone(),
            functions: functions.clone(),
            gateway: front.counters,
            issuer,
            dynamodb_endpoint,
            sqs_endpoint,
            queue_url,
            dlq_url,
            table: settings.table.clone(),
            dynamodb,
            sqs,
            shutdown,
            children,
            tasks,
        };
        let health = format!("{api}/health");
        wait_until("the API (cargo lambda watch)", Duration::from_secs(900), || {
            let (http, health) = (http.clone(), health.clone());
            async move { http.get(&health).send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await?;
        progress("warming up the generator, stream and sweeper");
        for (name, event) in [("generator", json!({"Records": []})), ("sweeper", scheduled_event())] {
            invoke(&http, &functions, name, &event).await.map_err(|e| {
                fail(format!("the {name} function did not start; its log above says why (warm-up: {e})"))
            })?;
        }
        let probe = format!("{api}/sessions/00000000-0000-4000-8000-000000000000/stream");
        wait_until("the stream function", Duration::from_secs(600), || {
            let (http, probe) = (http.clone(), probe.clone());
            // 404 for the unknown session, or 401 when it asks for a token: either way it answered.
            async move { http.get(&probe).send().await.is_ok_and(|r| matches!(r.status().as_u16(), 401 | 404)) }
        })
        .await?;

        // The event source and the schedule invoke the functions directly; each keeps its own
        // bound on invocations in flight (at most `slots()` batches, one sweep).
        stack.tasks.push(tokio::spawn(event_source_mapping(
            stack.sqs.clone(),
            http.clone(),
            functions.clone(),
            stack.queue_url.clone(),
            settings.slots(),
            stack.shutdown.subscribe(),
        )));
        stack.tasks.push(tokio::spawn(schedule(
            http.clone(),
            functions.clone(),
            settings.sweep_interval,
            stack.shutdown.subscribe(),
        )));
        stack.tasks.push(tokio::spawn(ttl_process(
            dynamo,
            table_stream,
            http,
            functions,
            settings.sweep_interval,
            stack.shutdown.subscribe(),
        )));
        Ok(stack)
    }

    /// A store on the stack's table, for inspection.
    pub fn store(&self) -> Store {
        Store::new(self.dynamodb.clone(), self.table.as_str(), StoreOptions::default())
    }

    /// An SQS client on the stack's emulator.
    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        self.sqs.clone()
    }

    /// Stops the pollers, the functions and the emulators.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for child in &mut self.children {
            if let Some(pid) = child.0.id() {
                let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
        }
        for child in &mut self.children {
            let _ = tokio::time::timeout(Duration::from_secs(5), child.0.wait()).await;
        }
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}
