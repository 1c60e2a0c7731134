//! AWS clients, built once per cold start from the standard environment (region, credentials,
//! and `AWS_ENDPOINT_URL*` for local emulators).

/// Loads the shared AWS configuration.
pub async fn load_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await
}

/// A DynamoDB client.
pub fn dynamodb(config: &aws_config::SdkConfig) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(config)
}

/// Sets up structured logs: JSON on Lambda (one object per line, with span fields such as the
/// request id, session and turn), human-readable elsewhere; `LOG_FORMAT` (`json` or `text`)
/// overrides either. `RUST_LOG` sets the level.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    if json {
        builder.json().with_current_span(true).without_time().init();
    } else {
        builder.init();
    }
}

/// A function's start-up: a configuration error is logged in words (the runtime would print only
/// its debug form) and then returned, so the cold start fails with it.
pub fn started<T>(
    result: Result<T, chat_core::config::ConfigError>,
) -> Result<T, chat_core::config::ConfigError> {
    if let Err(err) = &result {
        tracing::error!("{err}");
    }
    result
}

/// The environment variable that sets how many invocations one local instance serves at once.
pub const LOCAL_INVOCATIONS_PER_INSTANCE: &str = "LOCAL_INVOCATIONS_PER_INSTANCE";

/// Local stack only: `cargo lambda watch` starts every instance with
/// `AWS_LAMBDA_MAX_CONCURRENCY=1`, so each would serve one invocation at a time and a crowd would
/// need a process (and a `cargo run`) per conversation. With `LOCAL_INVOCATIONS_PER_INSTANCE` set
/// and the runtime API on loopback, this sets `AWS_LAMBDA_MAX_CONCURRENCY` to it, and
/// `run_concurrent` serves that many invocations at once, as on Lambda Managed Instances. On
/// Lambda (runtime API not on loopback) it does nothing.
///
/// Call it first thing in `main`, before any thread exists: it changes the process environment.
pub fn apply_local_concurrency() {
    let Ok(wanted) = std::env::var(LOCAL_INVOCATIONS_PER_INSTANCE) else { return };
    let local = runtime_api_on_loopback(std::env::var("AWS_LAMBDA_RUNTIME_API").ok().as_deref());
    if local && wanted.parse::<u32>().is_ok_and(|n| n >= 1) {
        std::env::set_var("AWS_LAMBDA_MAX_CONCURRENCY", wanted);
    }
}

/// Whether a Lambda runtime API address (`AWS_LAMBDA_RUNTIME_API`) is on loopback: the local
/// stack's emulator, never Lambda itself.
pub fn runtime_api_on_loopback(api: Option<&str>) -> bool {
    api.is_some_and(|api| {
        let host = api.strip_prefix("http://").unwrap_or(api);
        host.starts_with("127.") || host.starts_with("localhost:") || host.starts_with("[::1]:")
    })
}
