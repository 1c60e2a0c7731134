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

/// Sets up structured logs: JSON on Lambda (one object per line, with a `timestamp` and span
/// fields such as the request id, session and turn), human-readable elsewhere; `LOG_FORMAT`
/// (`json` or `text`) overrides either. `RUST_LOG` sets the level.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("text") => LogFormat::Text,
        _ if std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some() => LogFormat::Json,
        _ => LogFormat::Text,
    };
    tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stdout))
        .expect("the first and only global subscriber");
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// One JSON object per line. Lambda's JSON `LoggingConfig` keeps such lines as they are, so
    /// the line carries its own `timestamp`.
    Json,
    /// For a person at a terminal.
    Text,
}

fn subscriber<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(writer);
    match format {
        LogFormat::Json => Box::new(builder.json().with_current_span(true).finish()),
        LogFormat::Text => Box::new(builder.finish()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What the subscriber wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Written {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_json_line_carries_a_utc_timestamp_and_its_span_fields() {
        let written = Written::default();
        let writer = written.clone();
        let filter = tracing_subscriber::EnvFilter::new("info");
        let subscriber = subscriber(LogFormat::Json, filter, move || writer.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("turn", session_id = "s-1", turn = 3);
            let _entered = span.enter();
            tracing::info!(tokens = 7, "reply committed");
        });
        let text = String::from_utf8(written.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("one JSON object a line");
        let timestamp = line["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp: {line}"));
        // RFC 3339 in UTC, e.g. 2026-12-01T16:41:07.123456Z.
        let shape: String =
            timestamp.chars().map(|c| if c.is_ascii_digit() { '9' } else { c }).take(20).collect();
        assert_eq!(shape, "9999-99-99T99:99:99.", "{timestamp}");
        assert!(timestamp.ends_with('Z'), "{timestamp}");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["fields"]["message"], "reply committed");
        assert_eq!(line["fields"]["tokens"], 7);
        assert_eq!(line["span"]["session_id"], "s-1");
        assert_eq!(line["span"]["turn"], 3);
    }
}
