//! `make dev`: the whole stack in the foreground until Ctrl-C. The terminal gets the banner, a
//! line per finished turn and every warning and error; everything else goes to the log
//! (`DEV_LOG`, `target/dev.log`).

use chat_core::config::Env;
use chat_local::{Output, Stack, StackSettings};
use std::path::PathBuf;
use std::time::Duration;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = Env::process();
    let root = std::env::current_dir()?;
    let log = env.optional("DEV_LOG").map_or_else(|| PathBuf::from("target/dev.log"), PathBuf::from);
    let mut settings = StackSettings::new(&root);
    settings.output = Output::Calm(root.join(&log));
    settings.reload_on_change = env.parse_or("RELOAD_ON_CHANGE", true)?;
    settings.api_port = env.parse_or("API_PORT", settings.api_port)?;
    settings.dynamodb_port = env.parse_or("DYNAMODB_PORT", settings.dynamodb_port)?;
    settings.sqs_port = env.parse_or("SQS_PORT", settings.sqs_port)?;
    settings.concurrency = env.parse_or("LAMBDA_CONCURRENCY", settings.concurrency)?;
    settings.invocations_per_instance =
        env.parse_or(chat_runtime::aws::LOCAL_INVOCATIONS_PER_INSTANCE, settings.invocations_per_instance)?;
    settings.max_waiting = env.parse_or("GATEWAY_MAX_WAITING", settings.max_waiting)?;
    settings.max_wait = env.millis_or("GATEWAY_MAX_WAIT_MS", settings.max_wait)?;
    settings.cors_origins = env
        .optional("CORS_ALLOWED_ORIGINS")
        .map(|list| list.split(',').map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).collect())
        .unwrap_or_default();
    settings.auth = match env.optional("AUTH_MODE").as_deref() {
        None | Some("none") => chat_local::LocalAuth::None,
        Some("jwt") => chat_local::LocalAuth::Jwt,
        Some(other) => {
            eprintln!("AUTH_MODE is {other:?}; the local stack runs with none (the default) or jwt");
            std::process::exit(2);
        }
    };
    settings.sweep_interval = env.millis_or("SWEEP_INTERVAL_MS", settings.sweep_interval)?;
    settings.visibility_timeout = env.millis_or("VISIBILITY_TIMEOUT_MS", settings.visibility_timeout)?;
    if env.optional("LOG_FORMAT").is_none() {
        settings.function_env.push(("LOG_FORMAT".to_owned(), "text".to_owned()));
    }
    // The generator reads the same variables; a mistake is reported here, before anything starts.
    let model = match generator::model_config::ModelConfig::from_env(&env, false) {
        Ok(model) => model,
        Err(err) => {
            eprintln!("{err}");
            std::process::exit(2);
        }
    };
    let concurrency = settings.slots();
    let started = std::time::Instant::now();
    eprintln!("==> the emulators' and functions' output goes to {}", log.display());
    let stack = match Stack::start(settings, |step| eprintln!("==> {step}")).await {
        Ok(stack) => stack,
        Err(err) => {
            eprintln!("==> the stack did not start: {err}");
            std::process::exit(1);
        }
    };
    // From here on, this process's own warnings (the gateway, the event source, the schedule)
    // go to the terminal; while the stack starts, the gateway's "did not answer" is expected.
    // The DynamoDB emulator warns of every error it answers, a failed condition (an ordinary
    // outcome here) among them; a function logs the errors that matter to it.
    chat_runtime::aws::subscriber("warn,dynoxide=error", false, std::io::stderr).init();
    let api = &stack.api;
    // With the local issuer: ready tokens, and the flags that send one.
    let (sign_in, token_line, bearer, query_token) = match &stack.issuer {
        None => ("none (AUTH_MODE=none: the path names the user)".to_owned(), String::new(), "", ""),
        Some(issuer) => {
            let ttl = Duration::from_secs(12 * 3600);
            let (alice, bob) = (issuer.token("alice", ttl), issuer.token("bob", ttl));
            (
                format!(
                    "AUTH_MODE=jwt, issuer {api} (keys at /.well-known/jwks.json; POST /dev/token {{\"sub\": \"NAME\"}} mints more)\n\
    Token for alice   {alice}\n\
    Token for bob     {bob}"
                ),
                format!("TOKEN={alice}\n"),
                " -H \"authorization: Bearer $TOKEN\"",
                "?access_token=$TOKEN",
            )
        }
    };
    eprintln!(
        "\n\
==> ready in {:.1?}\n\
    Chat page         {api}/  (open it in a browser)\n\
    API (one origin)  {api}  (at most {} invocations per function at once; 429 past that)\n\
    Functions         {}  (cargo lambda watch, behind the API)\n\
    DynamoDB          {}\n\
    SQS               {}  (queue {})\n\
    Model             {}\n\
    Sign-in           {}\n\
    Log               {}  (the emulators, cargo lambda watch and the functions; here, a line per turn and every warning)\n\n\
Try it:\n\
    {}curl -s -X POST {api}/sessions/alice/messages -H 'content-type: application/json'{} -d '{{\"message\": \"Hello there\"}}'\n\
    curl -N {api}/sessions/SESSION_ID/stream{}\n\
    curl -s {api}/sessions/SESSION_ID{}\n\n\
Ctrl-C stops everything.\n",
        started.elapsed(),
        concurrency,
        stack.functions,
        stack.dynamodb_endpoint,
        stack.sqs_endpoint,
        stack.queue_url,
        model.describe(),
        sign_in,
        log.display(),
        token_line,
        bearer,
        query_token,
        bearer,
    );
    // Ctrl-C, or a TERM from a supervisor (`timeout`, systemd, a CI runner): both stop everything.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted?,
        _ = terminate.recv() => {}
    }
    eprintln!("\n==> stopping");
    tokio::time::timeout(Duration::from_secs(15), stack.stop()).await.ok();
    Ok(())
}
