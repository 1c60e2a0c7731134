//! AWS clients, built once per cold start from the standard environment (region, credentials,
//! and `AWS_ENDPOINT_URL*` for local emulators).

use chat_core::config::Env;

/// Loads the shared AWS configuration.
pub async fn load_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await
}

/// A DynamoDB client.
pub fn dynamodb(config: &aws_config::SdkConfig) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(config)
}

/// Sets up structured logs: JSON on Lambda (one object per line, with a `timestamp` and span
/// fields such as the request id, session and turn: Lambda's JSON `LoggingConfig` keeps such
/// lines as they are), human-readable elsewhere; `LOG_FORMAT` (`json` or `text`)
/// overrides either. `RUST_LOG` sets the level, except for what [`NEVER_LOGGED`] names.
pub fn init_tracing() {
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let json = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some(),
    };
    subscriber(&filter, json, std::io::stdout).init();
}

/// Log events that no `RUST_LOG` turns on (their targets, at TRACE): lambda_runtime logs every
/// raw invocation event there, which carries `Authorization`, `?access_token=` and the caller's
/// IAM context; the AWS SDK logs every request it sends with its body (messages, prompts).
pub const NEVER_LOGGED: [&str; 2] =
    ["lambda_runtime::layers::api_response", "aws_smithy_runtime::client::orchestrator"];

/// The subscriber [`init_tracing`] installs, writing to `writer`: `filter` as `RUST_LOG` reads,
/// and [`NEVER_LOGGED`] refused whatever `filter` says (span-scoped directives included).
pub fn subscriber<W>(filter: &str, json: bool, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{fmt, EnvFilter, Layer};
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let never = tracing_subscriber::filter::filter_fn(|metadata| {
        let secret = *metadata.level() == tracing::Level::TRACE
            && NEVER_LOGGED.iter().any(|target| metadata.target().starts_with(target));
        !secret
    });
    let output = fmt::layer().with_target(false).with_writer(writer);
    let output = if json { output.json().with_current_span(true).boxed() } else { output.boxed() };
    tracing_subscriber::registry().with(filter).with(never).with(output)
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

/// The positive signal that a function runs in the local stack: chat-local sets it to `1` on
/// `cargo lambda watch`, whose children inherit it. Never set it anywhere else.
pub const LOCAL_STACK: &str = "CHAT_LOCAL_STACK";

/// Variables Lambda itself sets (reserved: a function's configuration can neither set nor
/// remove them) and `cargo lambda watch` 1.9.2 does not. Any of them means "this is Lambda",
/// whatever else the environment says.
pub const LAMBDA_ONLY: [&str; 7] = [
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "_HANDLER",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_EXECUTION_ENV",
];

/// Why a process is not the local stack; each names the variable that decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotLocal {
    /// The local stack's own signal is missing.
    #[error("{LOCAL_STACK} is not 1: only the local stack sets it")]
    NoSignal,
    /// A variable only Lambda sets is present.
    #[error("{0} is set, which only Lambda does")]
    LambdaVariable(&'static str),
    /// The runtime API is not the local emulator's (`http://127.0.0.1:PORT/.rt/{function}`);
    /// Lambda's is a bare `127.0.0.1:9001`.
    #[error("AWS_LAMBDA_RUNTIME_API is {0:?}, not the local emulator's http://127.0.0.1:PORT/.rt/…")]
    RuntimeApi(String),
}

impl NotLocal {
    /// The environment variable that decided.
    pub fn variable(&self) -> &'static str {
        match self {
            NotLocal::NoSignal => LOCAL_STACK,
            NotLocal::LambdaVariable(name) => name,
            NotLocal::RuntimeApi(_) => "AWS_LAMBDA_RUNTIME_API",
        }
    }
}

/// Whether this process is a function of the local stack, and only then `Ok`: the local
/// stack's signal ([`LOCAL_STACK`]) is `1`, none of the variables only Lambda sets
/// ([`LAMBDA_ONLY`]) is present, and the runtime API has `cargo lambda watch`'s form (a scheme,
/// a loopback host and a `/.rt/` path). Lambda always sets `AWS_LAMBDA_INITIALIZATION_TYPE`,
/// `_HANDLER` and `LAMBDA_TASK_ROOT`, so a signal copied into a deployed function's
/// configuration changes nothing.
pub fn local_stack<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<(), NotLocal> {
    if let Some(name) = LAMBDA_ONLY.into_iter().find(|name| env.optional(name).is_some()) {
        return Err(NotLocal::LambdaVariable(name));
    }
    if env.optional(LOCAL_STACK).as_deref() != Some("1") {
        return Err(NotLocal::NoSignal);
    }
    let api = env.optional("AWS_LAMBDA_RUNTIME_API").unwrap_or_default();
    if !local_runtime_api(&api) {
        return Err(NotLocal::RuntimeApi(api));
    }
    Ok(())
}

/// `cargo lambda watch`'s runtime API: `http://{loopback}:{port}/.rt/{function}`.
fn local_runtime_api(api: &str) -> bool {
    let Some(rest) = api.strip_prefix("http://") else { return false };
    let Some((authority, path)) = rest.split_once('/') else { return false };
    if !path.starts_with(".rt/") {
        return false;
    }
    let Some((host, port)) = authority.rsplit_once(':') else { return false };
    let loopback = host == "localhost"
        || host == "[::1]"
        || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
    loopback && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
}

/// Local stack only: `cargo lambda watch` starts every instance with
/// `AWS_LAMBDA_MAX_CONCURRENCY=1`, so each would serve one invocation at a time and a crowd would
/// need a process (and a `cargo run`) per conversation. The value `AWS_LAMBDA_MAX_CONCURRENCY`
/// should take instead: `LOCAL_INVOCATIONS_PER_INSTANCE`, when it is a whole number from 1 and
/// this is the local stack ([`local_stack`]); on Lambda, `None`.
pub fn local_concurrency<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Option<String> {
    let wanted = env.optional(LOCAL_INVOCATIONS_PER_INSTANCE)?;
    let valid = wanted.parse::<u32>().is_ok_and(|n| n >= 1);
    (valid && local_stack(env).is_ok()).then_some(wanted)
}

/// Applies [`local_concurrency`] to this process, so `run_concurrent` serves that many
/// invocations at once, as on Lambda Managed Instances. On Lambda it does nothing.
///
/// Call it first thing in `main`, before any thread exists: it changes the process environment.
pub fn apply_local_concurrency() {
    if let Some(wanted) = local_concurrency(&Env::process()) {
        std::env::set_var("AWS_LAMBDA_MAX_CONCURRENCY", wanted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log sink the test can read.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    fn logged(filter: &str, json: bool, emit: impl FnOnce()) -> String {
        let sink = Captured::default();
        tracing::subscriber::with_default(subscriber(filter, json, sink.clone()), emit);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn no_log_level_prints_the_raw_event_or_its_credentials() {
        let filters = [
            "trace",
            "lambda_runtime=trace",
            "lambda_runtime::layers::api_response=trace",
            "[{requestId}]=trace",
        ];
        for filter in filters {
            assert!(tracing_subscriber::EnvFilter::try_new(filter).is_ok(), "{filter} is a directive");
            for json in [false, true] {
                let text = logged(filter, json, || {
                    let span = tracing::info_span!("Lambda runtime invoke", requestId = "r1");
                    let _inside = span.enter();
                    tracing::trace!(
                        target: "lambda_runtime::layers::api_response",
                        body = r#"{"headers":{"authorization":"Bearer SECRET-TOKEN"}}"#,
                        "raw JSON event received from Lambda"
                    );
                    tracing::trace!(target: "aws_smithy_runtime::client::orchestrator", body = "SECRET-ITEM", "transmitting request");
                    tracing::trace!(target: "chat::other", "still traced");
                });
                assert!(!text.contains("SECRET"), "{filter} (json {json}): {text}");
                if filter == "trace" {
                    assert!(text.contains("still traced"), "other TRACE events are kept: {text}");
                }
            }
        }
        let text = logged(
            "debug",
            false,
            || tracing::debug!(target: "lambda_runtime::layers::api_response", "kept"),
        );
        assert!(text.contains("kept"), "only TRACE is refused there: {text}");
    }

    fn env(vars: &[(&str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::from_fn(move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    /// What `cargo lambda watch` 1.9.2 gives a function of the local stack.
    const WATCH: [(&str, &str); 5] = [
        ("CHAT_LOCAL_STACK", "1"),
        ("AWS_LAMBDA_RUNTIME_API", "http://127.0.0.1:9000/.rt/ingest"),
        ("AWS_LAMBDA_FUNCTION_NAME", "ingest"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "1"),
        ("AWS_LAMBDA_MAX_CONCURRENCY", "1"),
    ];

    /// What Lambda gives a deployed function (`provided.al2023`), reserved variables included.
    const LAMBDA: [(&str, &str); 9] = [
        ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand"),
        ("_HANDLER", "bootstrap"),
        ("LAMBDA_TASK_ROOT", "/var/task"),
        ("LAMBDA_RUNTIME_DIR", "/var/runtime"),
        ("AWS_LAMBDA_FUNCTION_NAME", "chat-IngestFunction-x"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/chat-IngestFunction-x"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "2026/12/01/[$LATEST]abc"),
        ("AWS_REGION", "us-east-1"),
    ];

    #[test]
    fn the_local_stack_is_recognised_by_its_signal_and_its_runtime_api() {
        assert_eq!(local_stack(&env(&WATCH)), Ok(()));
        for api in ["http://localhost:9000/.rt/stream", "http://[::1]:9000/.rt/x", "http://127.0.0.2:1/.rt/x"]
        {
            let mut vars = WATCH.to_vec();
            vars[1].1 = api;
            assert_eq!(local_stack(&env(&vars)), Ok(()), "{api}");
        }
        let without_signal: Vec<_> = WATCH.into_iter().filter(|(k, _)| *k != LOCAL_STACK).collect();
        assert_eq!(local_stack(&env(&without_signal)), Err(NotLocal::NoSignal));
        let mut other = WATCH.to_vec();
        other[0].1 = "true";
        assert_eq!(local_stack(&env(&other)), Err(NotLocal::NoSignal));
    }

    #[test]
    fn real_lambda_is_never_the_local_stack_even_with_the_signal_copied_into_it() {
        assert_eq!(
            local_stack(&env(&LAMBDA)),
            Err(NotLocal::LambdaVariable("AWS_LAMBDA_INITIALIZATION_TYPE"))
        );
        let mut copied = LAMBDA.to_vec();
        copied.push((LOCAL_STACK, "1"));
        assert!(local_stack(&env(&copied)).is_err());
        // Lambda's bare runtime API alone is not the emulator's.
        let mut bare = WATCH.to_vec();
        bare[1].1 = "127.0.0.1:9001";
        assert_eq!(local_stack(&env(&bare)), Err(NotLocal::RuntimeApi("127.0.0.1:9001".into())));
        for api in
            ["http://10.0.0.1:9001/.rt/ingest", "http://127.0.0.1:9001/", "https://127.0.0.1:9/.rt/x", ""]
        {
            let mut vars = WATCH.to_vec();
            vars[1].1 = api;
            assert_eq!(local_stack(&env(&vars)).unwrap_err().variable(), "AWS_LAMBDA_RUNTIME_API", "{api}");
        }
    }

    #[test]
    fn each_variable_only_lambda_sets_is_refused_on_its_own() {
        for name in LAMBDA_ONLY {
            let mut vars = WATCH.to_vec();
            vars.push((name, "x"));
            let err = local_stack(&env(&vars)).unwrap_err();
            assert_eq!((err.clone(), err.variable()), (NotLocal::LambdaVariable(name), name));
        }
    }

    #[test]
    fn local_concurrency_applies_only_to_the_local_stack() {
        let with = |base: &[(&'static str, &'static str)], n: &'static str| {
            let mut vars = base.to_vec();
            vars.push((LOCAL_INVOCATIONS_PER_INSTANCE, n));
            local_concurrency(&env(&vars))
        };
        assert_eq!(with(&WATCH, "16"), Some("16".to_owned()));
        assert_eq!(with(&WATCH, "0"), None);
        assert_eq!(with(&WATCH, "many"), None);
        assert_eq!(local_concurrency(&env(&WATCH)), None);
        assert_eq!(with(&LAMBDA, "16"), None, "a copied setting does nothing on Lambda");
        let mut copied = LAMBDA.to_vec();
        copied.push((LOCAL_STACK, "1"));
        assert_eq!(with(&copied, "16"), None);
    }
}

#[cfg(test)]
mod log_lines {
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
        let subscriber = subscriber("info", true, move || writer.clone());
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
