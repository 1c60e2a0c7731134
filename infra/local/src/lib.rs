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

use aws_sdk_sqs::types::QueueAttributeName;
use chat_core::{Store, StoreOptions};
use serde_json::{json, Value};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

pub mod fake_llm;
pub mod gateway;
pub mod sse;

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

fn free_port(preferred: u16) -> Result<u16, StackError> {
    let listener = StdListener::bind(("127.0.0.1", preferred))
        .map_err(|e| fail(format!("port {preferred} on 127.0.0.1 is not free ({e}); set another port")))?;
    Ok(listener.local_addr().map_err(fail)?.port())
}

fn local_credentials() -> aws_sdk_dynamodb::config::Credentials {
    aws_sdk_dynamodb::config::Credentials::new("local", "local", None, None, "local-stack")
}

/// A DynamoDB client for the local emulator.
pub fn dynamodb_client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(local_credentials())
        .endpoint_url(endpoint)
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// An SQS client for the local emulator.
pub fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(local_credentials())
        .endpoint_url(endpoint)
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut ready: F) -> Result<(), StackError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(fail(format!("{what} did not become ready within {timeout:?}")))
}

/// A DynamoDB emulator (dynoxide) in this process on 127.0.0.1 with the table created. Dropping
/// it stops the server.
pub struct LocalDynamo {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    task: JoinHandle<()>,
}

impl Drop for LocalDynamo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalDynamo {
    /// Starts the emulator on `port` (0 picks a free one) and creates `table`.
    pub async fn start(port: u16, table: &str) -> Result<LocalDynamo, StackError> {
        let port = free_port(port)?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.map_err(fail)?;
        let db = dynoxide::Database::memory().map_err(|e| fail(format!("dynoxide: {e}")))?;
        let task = tokio::spawn(async move {
            if let Err(e) = dynoxide::server::serve_with_shutdown(listener, db, std::future::pending()).await
            {
                tracing::error!(error = %e, "DynamoDB emulator stopped");
            }
        });
        let dynamo = LocalDynamo { endpoint: format!("http://127.0.0.1:{port}"), task };
        chat_core::table::create_table(&dynamodb_client(&dynamo.endpoint), table).await.map_err(|e| {
            fail(format!("creating the table: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e)))
        })?;
        Ok(dynamo)
    }

    /// A store on `table` through this emulator.
    pub fn store(&self, table: &str, options: StoreOptions) -> Store {
        Store::new(dynamodb_client(&self.endpoint), table, options)
    }
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
        let dynamo = LocalDynamo::start(settings.dynamodb_port, &settings.table).await?;
        let dynamodb_endpoint = dynamo.endpoint.clone();
        let dynamodb = dynamodb_client(&dynamodb_endpoint);
        let mut stop = shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            drop(dynamo);
        }));

        progress("starting SQS (moto server)");
        let sqs_port = free_port(settings.sqs_port)?;
        let (out, err) = output()?;
        children.push(Supervisor(
            supervised(&root, venv_bin.join("moto_server").as_os_str())
                .args(["-H", "127.0.0.1", "-p", &sqs_port.to_string()])
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|e| fail(format!("starting moto_server: {e}")))?,
        ));
        let sqs_endpoint = format!("http://127.0.0.1:{sqs_port}");
        let http = reqwest::Client::new();
        let probe = format!("{sqs_endpoint}/moto-api/");
        wait_until("the SQS emulator", Duration::from_secs(60), || {
            let (http, probe) = (http.clone(), probe.clone());
            async move { http.get(&probe).send().await.is_ok() }
        })
        .await?;
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
            .env(
                chat_core::aws::LOCAL_INVOCATIONS_PER_INSTANCE,
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
        origins.extend(settings.cors_origins.iter().map(|o| o.trim_end_matches('/').to_owned()));
        let (front, gateway_task) = gateway::start(
            api_listener,
            functions.clone(),
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
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
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

/// A command run under `infra/supervise.sh`, so it dies with this process.
fn supervised(root: &Path, program: &std::ffi::OsStr) -> Command {
    let mut cmd = Command::new(root.join("infra/supervise.sh"));
    cmd.arg(std::process::id().to_string()).arg(program).current_dir(root).stdin(Stdio::null());
    cmd
}

/// A running `supervise.sh`. Dropping it (say, when a later step of the start fails) asks it to
/// stop its command with SIGTERM, which it traps; SIGKILL (tokio's `kill_on_drop`) would kill
/// only the script and leave the command it started running.
struct Supervisor(Child);

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
    }
}

fn sqs_err<E: std::error::Error + 'static, R: std::fmt::Debug>(
    e: aws_sdk_sqs::error::SdkError<E, R>,
) -> StackError {
    fail(aws_sdk_sqs::error::DisplayErrorContext(e))
}

/// Creates the secrets in moto's Secrets Manager (the same server as SQS).
async fn create_secrets(endpoint: &str, secrets: &[(String, String)]) -> Result<(), StackError> {
    if secrets.is_empty() {
        return Ok(());
    }
    let config = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
        .region(aws_sdk_secretsmanager::config::Region::new("us-east-1"))
        .credentials_provider(local_credentials())
        .endpoint_url(endpoint)
        .build();
    let client = aws_sdk_secretsmanager::Client::from_conf(config);
    for (name, value) in secrets {
        client.create_secret().name(name).secret_string(value).send().await.map_err(|e| {
            fail(format!(
                "creating secret {name}: {}",
                aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
            ))
        })?;
    }
    Ok(())
}

async fn create_queues(
    sqs: &aws_sdk_sqs::Client,
    settings: &StackSettings,
) -> Result<(String, String), StackError> {
    let dlq_url = sqs
        .create_queue()
        .queue_name(format!("{}-dlq", settings.queue))
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .send()
        .await
        .map_err(sqs_err)?
        .queue_url
        .unwrap_or_default();
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(sqs_err)?;
    let dlq_arn = attributes
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| fail("the dead-letter queue has no ARN"))?;
    let redrive = json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": settings.max_receive_count});
    let queue_url = sqs
        .create_queue()
        .queue_name(&settings.queue)
        .attributes(QueueAttributeName::VisibilityTimeout, settings.visibility_timeout.as_secs().to_string())
        .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
        .send()
        .await
        .map_err(sqs_err)?
        .queue_url
        .unwrap_or_default();
    Ok((queue_url, dlq_url))
}

/// Invokes a function through `cargo lambda watch`'s Lambda invoke API.
pub async fn invoke(
    http: &reqwest::Client,
    api: &str,
    function: &str,
    event: &Value,
) -> Result<Value, String> {
    let url = format!("{api}/2015-03-31/functions/{function}/invocations");
    // Like Lambda's own timeout: an instance that died mid-invocation never answers.
    let response = http
        .post(&url)
        .json(event)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let function_error = response.headers().contains_key("x-amz-function-error");
    let body = response.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() || function_error {
        return Err(format!("{function} answered {status}: {body}"));
    }
    serde_json::from_str(&body).or(Ok(Value::Null))
}

fn scheduled_event() -> Value {
    json!({"version": "0", "source": "aws.events", "detail-type": "Scheduled Event", "detail": {}})
}

/// Stand-in for the SQS event source mapping: long-polls the queue, invokes the generator with
/// each batch, deletes the records it did not report as failed, and leaves failures to the
/// visibility timeout (and, past `maxReceiveCount`, the dead-letter queue).
async fn event_source_mapping(
    sqs: aws_sdk_sqs::Client,
    http: reqwest::Client,
    api: String,
    queue_url: String,
    concurrency: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore stays open"),
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let received = tokio::select! {
            r = sqs.receive_message().queue_url(&queue_url).max_number_of_messages(10).wait_time_seconds(1)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All).send() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let messages = match received {
            Ok(out) => out.messages.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "receiving from SQS failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let (sqs, http, api, queue_url) = (sqs.clone(), http.clone(), api.clone(), queue_url.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let records: Vec<Value> = messages
                .iter()
                .map(|m| {
                    let attributes: serde_json::Map<String, Value> = m
                        .attributes()
                        .map(|a| {
                            a.iter().map(|(k, v)| (k.as_str().to_owned(), Value::String(v.clone()))).collect()
                        })
                        .unwrap_or_default();
                    json!({
                        "messageId": m.message_id(),
                        "receiptHandle": m.receipt_handle(),
                        "body": m.body(),
                        "md5OfBody": m.md5_of_body(),
                        "attributes": attributes,
                        "messageAttributes": {},
                        "eventSource": "aws:sqs",
                        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:local",
                        "awsRegion": "us-east-1",
                    })
                })
                .collect();
            let failed: Vec<String> = match invoke(&http, &api, "generator", &json!({ "Records": records }))
                .await
            {
                Ok(response) => response["batchItemFailures"]
                    .as_array()
                    .map(|f| {
                        f.iter().filter_map(|i| i["itemIdentifier"].as_str().map(str::to_owned)).collect()
                    })
                    .unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "the generator invocation failed; the batch will be redelivered");
                    return;
                }
            };
            for message in &messages {
                if failed.iter().any(|f| Some(f.as_str()) == message.message_id()) {
                    continue;
                }
                let deleted = sqs
                    .delete_message()
                    .queue_url(&queue_url)
                    .set_receipt_handle(message.receipt_handle.clone())
                    .send()
                    .await;
                if let Err(e) = deleted {
                    tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "deleting a message failed");
                }
            }
        });
    }
}

/// Stand-in for the sweeper's EventBridge schedule.
async fn schedule(http: reqwest::Client, api: String, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if let Err(e) = invoke(&http, &api, "sweeper", &scheduled_event()).await {
            tracing::warn!(error = %e, "the sweeper failed");
        }
    }
}
