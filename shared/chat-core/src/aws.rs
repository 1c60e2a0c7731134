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
/// request id, session and turn), human-readable elsewhere. `RUST_LOG` sets the level.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let on_lambda = std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some()
        && std::env::var_os("CARGO_LAMBDA_WATCH").is_none()
        && std::env::var("LOG_FORMAT").map_or(true, |f| f != "text");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    if on_lambda || std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().with_current_span(true).without_time().init();
    } else {
        builder.init();
    }
}
