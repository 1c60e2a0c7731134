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

/// An SQS client.
pub fn sqs(config: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(config)
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
pub fn started<T>(result: Result<T, crate::config::ConfigError>) -> Result<T, crate::config::ConfigError> {
    if let Err(err) = &result {
        tracing::error!("{err}");
    }
    result
}
