//! Starting the stack, one named step at a time, and stopping it.

use crate::calls::{relay, Calls};
use crate::calm::{Router, Source};
use crate::moto::{create_queues, create_secrets};
use crate::processes::{free_port, supervised, wait_until, Supervisor};
use crate::shim::{event_source_mapping, invoke, schedule, scheduled_event, ttl_process};
use crate::{
    fail, gateway, LocalAuth, LocalSqs, Output, StackError, StackSettings, LOCAL_AUDIENCE, WATCH_QUEUE_LIMIT,
};
use chat_auth::dev_issuer::DevIssuer;
use chat_core::{Store, StoreOptions};
use chat_testkit::{dynamodb_client, sqs_client, LocalDynamo, TableStream};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running stack. [`Stack::stop`] (or dropping it, or this process exiting) stops everything.
pub struct Stack {
    /// Base URL of the one-origin API, e.g. `http://127.0.0.1:9000`.
    pub api: String,
    /// `cargo lambda watch` itself (function URLs and the Lambda invoke API), behind the gateway.
    pub functions: String,
    /// What the gateway has forwarded and shed.
    pub gateway: Arc<gateway::Counters>,
    /// The local token issuer, with `LocalAuth::Jwt`.
    pub issuer: Option<Arc<DevIssuer>>,
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
    http: reqwest::Client,
    /// What the functions have asked of AWS, with [`StackSettings::record_calls`].
    pub calls: Option<Arc<Calls>>,
    /// With a calm terminal, muted as the stack stops.
    calm: Option<Router>,
    shutdown: watch::Sender<bool>,
    children: Vec<Supervisor>,
    tasks: Vec<JoinHandle<()>>,
}

impl Stack {
    /// Starts everything and returns once the API answers; `progress` hears each step.
    pub async fn start(settings: StackSettings, progress: impl Fn(&str)) -> Result<Stack, StackError> {
        let root = preflight(&settings)?;
        let output = Sink::open(&settings.output)?;
        progress("starting DynamoDB (embedded dynoxide)");
        let dynamo = start_dynamodb(&settings).await?;
        progress("starting SQS (moto server)");
        let sqs = start_sqs(&root, &settings, &output).await?;
        let (shutdown, _) = watch::channel(false);
        let aws = aws_endpoints(&settings, &dynamo, &sqs, &shutdown).await?;
        progress("starting the functions (cargo lambda watch; the first start builds them)");
        let front = bind_api(&settings).await?;
        let functions = start_functions(&root, &settings, &output, &front, &aws, &sqs)?;
        let api = start_gateway(front, &functions.url, &settings, shutdown.subscribe())?;
        let mut tasks = vec![api.task];
        tasks.extend(aws.relays);
        let mut stack = Stack {
            api: api.url,
            functions: functions.url,
            gateway: api.counters,
            issuer: api.issuer,
            dynamodb_endpoint: dynamo.endpoint.clone(),
            sqs_endpoint: sqs.server.endpoint.clone(),
            queue_url: sqs.queue_url,
            dlq_url: sqs.dlq_url,
            table: settings.table.clone(),
            dynamodb: dynamodb_client(&dynamo.endpoint),
            sqs: sqs.client,
            http: reqwest::Client::new(),
            calls: aws.calls,
            calm: output.router(),
            shutdown,
            children: vec![sqs.server.supervisor, functions.watcher],
            tasks,
        };
        stack.wait_for_api().await?;
        progress("warming up the generator, stream and sweeper");
        stack.warm_up().await?;
        stack.start_pollers(dynamo, &settings);
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
        if let Some(calm) = &self.calm {
            calm.mute();
        }
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

    /// Waits for the gateway and `cargo lambda watch` behind it to answer `/health`.
    async fn wait_for_api(&self) -> Result<(), StackError> {
        let health = format!("{}/health", self.api);
        wait_until("the API (cargo lambda watch)", Duration::from_secs(900), || {
            let (http, health) = (self.http.clone(), health.clone());
            async move { http.get(&health).send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await
    }

    /// Starts an instance of the generator, the sweeper and the stream, so the first turn does
    /// not wait for one (ingest answered `/health`).
    async fn warm_up(&self) -> Result<(), StackError> {
        for (name, event) in [("generator", json!({"Records": []})), ("sweeper", scheduled_event())] {
            invoke(&self.http, &self.functions, name, &event).await.map_err(|e| {
                fail(format!("the {name} function did not start; its log above says why (warm-up: {e})"))
            })?;
        }
        let probe = format!("{}/sessions/00000000-0000-4000-8000-000000000000/stream", self.api);
        wait_until("the stream function", Duration::from_secs(600), || {
            let (http, probe) = (self.http.clone(), probe.clone());
            // 404 for the unknown session, or 401 when it asks for a token: either way it answered.
            async move { http.get(&probe).send().await.is_ok_and(|r| matches!(r.status().as_u16(), 401 | 404)) }
        })
        .await
    }

    /// What Lambda would run around the functions: the SQS event source, the sweeper's schedule,
    /// and DynamoDB's TTL process with the table stream's event source (which owns the emulator).
    /// The event source and the schedule invoke the functions directly; each keeps its own bound
    /// on invocations in flight (at most `slots()` batches, one sweep).
    fn start_pollers(&mut self, dynamo: Dynamo, settings: &StackSettings) {
        self.tasks.push(tokio::spawn(event_source_mapping(
            self.sqs.clone(),
            self.http.clone(),
            self.functions.clone(),
            self.queue_url.clone(),
            settings.slots(),
            self.shutdown.subscribe(),
        )));
        self.tasks.push(tokio::spawn(schedule(
            self.http.clone(),
            self.functions.clone(),
            settings.sweep_interval,
            self.shutdown.subscribe(),
        )));
        self.tasks.push(tokio::spawn(ttl_process(
            dynamo.emulator,
            dynamo.stream,
            self.http.clone(),
            self.functions.clone(),
            settings.sweep_interval,
            self.shutdown.subscribe(),
        )));
    }
}

/// Checks the settings and the local tools before anything starts; the workspace root.
fn preflight(settings: &StackSettings) -> Result<PathBuf, StackError> {
    let root = settings.root.canonicalize().map_err(|e| fail(format!("{}: {e}", settings.root.display())))?;
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
    let venv_bin = venv_bin(&root);
    if !venv_bin.join("moto_server").exists() || !venv_bin.join("cargo-lambda").exists() {
        return Err(fail("the local tools are missing: run `make tools` first"));
    }
    Ok(root)
}

/// The pinned local tools (`make tools`).
fn venv_bin(root: &Path) -> PathBuf {
    root.join(".tools/venv/bin")
}

/// Where the children's output goes, opened.
enum Sink {
    Inherit,
    File(std::fs::File),
    Calm(Router),
}

impl Sink {
    fn open(output: &Output) -> Result<Sink, StackError> {
        let open = |path: &Path, options: &mut std::fs::OpenOptions| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(fail)?;
            }
            options.open(path).map_err(|e| fail(format!("{}: {e}", path.display())))
        };
        Ok(match output {
            Output::Inherit => Sink::Inherit,
            Output::File(path) => {
                Sink::File(open(path, std::fs::OpenOptions::new().create(true).append(true))?)
            }
            Output::Calm(path) => Sink::Calm(Router::new(open(
                path,
                std::fs::OpenOptions::new().create(true).write(true).truncate(true),
            )?)),
        })
    }

    /// A child's stdout and stderr: piped to [`Sink::follow`] with a calm terminal.
    fn stdio(&self) -> Result<(Stdio, Stdio), StackError> {
        Ok(match self {
            Sink::Inherit => (Stdio::inherit(), Stdio::inherit()),
            Sink::File(file) => {
                (file.try_clone().map_err(fail)?.into(), file.try_clone().map_err(fail)?.into())
            }
            Sink::Calm(_) => (Stdio::piped(), Stdio::piped()),
        })
    }

    /// With a calm terminal, routes what the child started with [`Sink::stdio`] writes.
    fn follow(&self, child: &mut Supervisor, source: Source) {
        if let Sink::Calm(router) = self {
            if let Some(out) = child.0.stdout.take() {
                router.follow(out, source);
            }
            if let Some(err) = child.0.stderr.take() {
                router.follow(err, source);
            }
        }
    }

    /// The calm terminal's router, which the stack mutes as it stops.
    fn router(&self) -> Option<Router> {
        match self {
            Sink::Calm(router) => Some(router.clone()),
            Sink::Inherit | Sink::File(_) => None,
        }
    }
}

/// The DynamoDB emulator, in this process, with the table created and its stream's reader.
struct Dynamo {
    emulator: LocalDynamo,
    stream: TableStream,
    endpoint: String,
}

async fn start_dynamodb(settings: &StackSettings) -> Result<Dynamo, StackError> {
    let emulator = LocalDynamo::start(settings.dynamodb_port, &settings.table).await.map_err(fail)?;
    let stream = emulator.stream(&settings.table).map_err(fail)?;
    let endpoint = emulator.endpoint.clone();
    Ok(Dynamo { emulator, stream, endpoint })
}

/// The SQS emulator (moto, which serves Secrets Manager too) with the queues and secrets made.
struct Sqs {
    server: LocalSqs,
    client: aws_sdk_sqs::Client,
    queue_url: String,
    dlq_url: String,
}

async fn start_sqs(root: &Path, settings: &StackSettings, output: &Sink) -> Result<Sqs, StackError> {
    let (out, err) = output.stdio()?;
    let mut server = LocalSqs::start(root, settings.sqs_port, out, err).await?;
    output.follow(&mut server.supervisor, Source::Sqs);
    let client = sqs_client(&server.endpoint);
    let (queue_url, dlq_url) = create_queues(&client, settings).await?;
    create_secrets(&server.endpoint, &settings.secrets).await?;
    Ok(Sqs { server, client, queue_url, dlq_url })
}

/// Where the functions reach AWS: the emulators, or with [`StackSettings::record_calls`] a
/// recording relay in front of each (and of a local Bedrock endpoint the functions are given).
struct AwsEndpoints {
    dynamodb: String,
    /// SQS and Secrets Manager (moto serves both).
    sqs: String,
    /// `AWS_ENDPOINT_URL_BEDROCK_RUNTIME` for the functions, when it is relayed.
    bedrock: Option<String>,
    calls: Option<Arc<Calls>>,
    relays: Vec<JoinHandle<()>>,
}

async fn aws_endpoints(
    settings: &StackSettings,
    dynamo: &Dynamo,
    sqs: &Sqs,
    shutdown: &watch::Sender<bool>,
) -> Result<AwsEndpoints, StackError> {
    let direct = AwsEndpoints {
        dynamodb: dynamo.endpoint.clone(),
        sqs: sqs.server.endpoint.clone(),
        bedrock: None,
        calls: None,
        relays: Vec::new(),
    };
    if !settings.record_calls {
        return Ok(direct);
    }
    let calls = Arc::new(Calls::default());
    let relayed = |upstream: String| {
        let (calls, shutdown) = (calls.clone(), shutdown.subscribe());
        async move { relay(&upstream, calls, shutdown).await.map_err(|e| fail(format!("a recording relay: {e}"))) }
    };
    let dynamodb = relayed(direct.dynamodb).await?;
    let sqs = relayed(direct.sqs).await?;
    let mut relays = vec![dynamodb.task, sqs.task];
    let bedrock =
        match function_var(settings, "AWS_ENDPOINT_URL_BEDROCK_RUNTIME").filter(|url| is_loopback(url)) {
            Some(upstream) => {
                let bedrock = relayed(upstream).await?;
                relays.push(bedrock.task);
                Some(bedrock.url)
            }
            None => None,
        };
    Ok(AwsEndpoints { dynamodb: dynamodb.url, sqs: sqs.url, bedrock, calls: Some(calls), relays })
}

fn is_loopback(url: &str) -> bool {
    ["http://127.0.0.1:", "http://localhost:"].iter().any(|local| url.starts_with(local))
}

/// The one-origin API's listener, bound before anything is built so that a busy port fails the
/// start at once, with its address and, with `LocalAuth::Jwt`, the token issuer it serves.
struct Front {
    listener: tokio::net::TcpListener,
    url: String,
    issuer: Option<Arc<DevIssuer>>,
}

async fn bind_api(settings: &StackSettings) -> Result<Front, StackError> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", settings.api_port)).await.map_err(|e| {
        fail(format!("port {} on 127.0.0.1 is not free ({e}); set API_PORT", settings.api_port))
    })?;
    let url = format!("http://{}", listener.local_addr().map_err(fail)?);
    let issuer = match settings.auth {
        LocalAuth::Jwt => Some(Arc::new(DevIssuer::new(url.clone(), LOCAL_AUDIENCE))),
        LocalAuth::None => None,
    };
    Ok(Front { listener, url, issuer })
}

/// `cargo lambda watch` on a free port, running the functions.
struct Functions {
    url: String,
    watcher: Supervisor,
}

fn start_functions(
    root: &Path,
    settings: &StackSettings,
    output: &Sink,
    front: &Front,
    aws: &AwsEndpoints,
    sqs: &Sqs,
) -> Result<Functions, StackError> {
    let port = free_port(0)?;
    let mut watch = supervised(root, venv_bin(root).join("cargo-lambda").as_os_str());
    watch
        .args(["lambda", "watch", "-A", "127.0.0.1", "-P", &port.to_string()])
        .args(["--concurrency", &settings.concurrency.to_string()])
        // CORS is the gateway's, from an origin list; the watcher's own allows any origin.
        .arg("--disable-cors")
        .args((!settings.reload_on_change).then_some("--ignore-changes"))
        // The functions' proof that they run here, not on Lambda (`AUTH_MODE=none`, local
        // concurrency); never in `[metadata.lambda.env]`, which a deploy would carry.
        .env(chat_runtime::aws::LOCAL_STACK, "1")
        .env(chat_runtime::aws::LOCAL_INVOCATIONS_PER_INSTANCE, settings.invocations_per_instance.to_string())
        .env("PATH", format!("{}:{}", venv_bin(root).display(), std::env::var("PATH").unwrap_or_default()))
        .env("TABLE_NAME", &settings.table)
        .env("QUEUE_URL", &sqs.queue_url)
        .env("STREAM_URL_BASE", &front.url)
        .env("AWS_ENDPOINT_URL_DYNAMODB", &aws.dynamodb)
        .env("AWS_ENDPOINT_URL_SQS", &aws.sqs)
        // moto serves Secrets Manager too: a local API key secret works like the deployed one.
        .env("AWS_ENDPOINT_URL_SECRETS_MANAGER", &aws.sqs);
    match &front.issuer {
        Some(issuer) => watch
            .env("AUTH_MODE", "jwt")
            .env("JWT_ISSUER", &issuer.issuer)
            .env("JWT_AUDIENCE", &issuer.audience)
            .env("JWT_JWKS_URL", format!("{}/.well-known/jwks.json", front.url)),
        None => watch.env("AUTH_MODE", "none"),
    };
    // The functions are built as `make functions` built them: not through a test build's clippy
    // (`make test LINT=1`), whose variables a test run passes on.
    watch.env_remove("RUSTC_WORKSPACE_WRAPPER").env_remove("CLIPPY_ARGS");
    aws_credentials(&mut watch, settings);
    let (out, err) = output.stdio()?;
    watch.envs(settings.function_env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).stdout(out).stderr(err);
    if let Some(bedrock) = &aws.bedrock {
        watch.env("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", bedrock);
    }
    let mut watcher =
        Supervisor(watch.spawn().map_err(|e| fail(format!("starting cargo lambda watch: {e}")))?);
    output.follow(&mut watcher, Source::Functions);
    Ok(Functions { url: format!("http://127.0.0.1:{port}"), watcher })
}

/// The functions' AWS credentials and region: the emulators accept any, and get made-up ones;
/// Bedrock is the real service, and keeps the caller's.
fn aws_credentials(watch: &mut tokio::process::Command, settings: &StackSettings) {
    if provider(settings).as_deref() == Some("bedrock") {
        if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
            watch.env("AWS_REGION", "us-east-1");
        }
    } else {
        watch
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "local")
            .env("AWS_SECRET_ACCESS_KEY", "local")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN");
    }
}

/// The model provider the functions will use: the settings' `LLM_PROVIDER`, else the caller's.
fn provider(settings: &StackSettings) -> Option<String> {
    function_var(settings, "LLM_PROVIDER")
}

/// A variable as the functions will see it: the settings' `function_env`, else the caller's.
fn function_var(settings: &StackSettings, name: &str) -> Option<String> {
    settings
        .function_env
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var(name).ok())
}

/// The one-origin API, served: the gateway's counters and task.
struct Api {
    url: String,
    issuer: Option<Arc<DevIssuer>>,
    counters: Arc<gateway::Counters>,
    task: JoinHandle<()>,
}

/// The gateway on the API's listener, in front of `cargo lambda watch`.
fn start_gateway(
    front: Front,
    functions: &str,
    settings: &StackSettings,
    shutdown: watch::Receiver<bool>,
) -> Result<Api, StackError> {
    let limits = gateway::Limits {
        concurrency: settings.slots(),
        max_waiting: settings.max_waiting,
        max_wait: settings.max_wait,
    };
    let mut origins = vec![front.url.clone(), front.url.replace("127.0.0.1", "localhost")];
    let hosts: Vec<String> =
        origins.iter().map(|origin| origin.trim_start_matches("http://").to_owned()).collect();
    origins.extend(settings.cors_origins.iter().map(|o| o.trim_end_matches('/').to_owned()));
    let (running, task) = gateway::start(
        front.listener,
        functions.to_owned(),
        hosts,
        limits,
        front.issuer.clone(),
        origins,
        shutdown,
    )
    .map_err(fail)?;
    Ok(Api { url: front.url, issuer: front.issuer, counters: running.counters, task })
}
