//! Metrics as CloudWatch Embedded Metric Format (EMF) log lines: each is one JSON object on
//! stdout, which CloudWatch Logs turns into metrics on its own, so a function makes no extra API
//! call for them. Locally the same lines land in the stack's log, where tests read them.
//!
//! Every metric has the dimension `Service` (one value, so an alarm can sum a metric over the
//! whole stack) and may be split by others from a bounded set ([`Dimension`]), each its own
//! dimension set: never a user or a session. The namespace is `METRICS_NAMESPACE` (the template
//! sets one per stack).

use serde_json::{json, Map, Value};
use std::io::Write;
use std::sync::OnceLock;

/// Every metric the functions emit, by name. The template's alarms and dashboard may name only
/// these (a test checks).
pub mod name {
    /// A turn ingest accepted (202 that started a turn).
    pub const TURNS_ACCEPTED: &str = "TurnsAccepted";
    /// A reply committed (complete, stopped or capped).
    pub const TURNS_COMMITTED: &str = "TurnsCommitted";
    /// A turn that ended in `error`, by `Reason`.
    pub const TURNS_FAILED: &str = "TurnsFailed";
    /// A turn the sweeper ended in `timeout`.
    pub const TURNS_TIMED_OUT: &str = "TurnsTimedOut";
    /// A reply stopped by a cancel (also counted as committed).
    pub const TURNS_CANCELLED: &str = "TurnsCancelled";
    /// From the user's message being accepted to its reply's first token being stored (ms).
    pub const TIME_TO_FIRST_TOKEN: &str = "TimeToFirstToken";
    /// From a chunk being stored to the stream sending its tokens (ms).
    pub const RELAY_LAG: &str = "RelayLag";
    /// From the model request to its first token (ms), by `Model`.
    pub const MODEL_FIRST_TOKEN: &str = "ModelFirstTokenLatency";
    /// A model request that failed for good, by `Model`.
    pub const MODEL_ERRORS: &str = "ModelErrors";
    /// A model request retried (stack-wide: the retry loop does not know the model's name).
    pub const MODEL_RETRIES: &str = "ModelRetries";
    /// Fresh prompt tokens (as the provider reports them, else estimated), by `Model` and by
    /// `Route`.
    pub const INPUT_TOKENS: &str = "InputTokens";
    /// Reply tokens, by `Model` and by `Route`.
    pub const OUTPUT_TOKENS: &str = "OutputTokens";
    /// Prompt tokens read from the provider's prompt cache, by `Model` and by `Route`.
    pub const CACHE_READ_TOKENS: &str = "CacheReadTokens";
    /// Prompt tokens written to the provider's prompt cache, by `Model` and by `Route`.
    pub const CACHE_WRITE_TOKENS: &str = "CacheWriteTokens";
    /// A tool the model called, by `Tool`.
    pub const TOOL_CALLS: &str = "ToolCalls";
    /// A request refused with a 4xx, by `Code` (`turn_rate_limited`, `invalid_token`, …).
    pub const REFUSALS: &str = "Refusals";
    /// A request answered with a 5xx, by `Code`.
    pub const SERVER_ERRORS: &str = "ServerErrors";
    /// A turn the sweeper sent to the generator again.
    pub const REDRIVES: &str = "Redrives";
    /// Sessions past their deadline that a sweep found.
    pub const SWEEP_BACKLOG: &str = "SweepBacklog";
    /// Every name above.
    pub const ALL: [&str; 19] = [
        TURNS_ACCEPTED,
        TURNS_COMMITTED,
        TURNS_FAILED,
        TURNS_TIMED_OUT,
        TURNS_CANCELLED,
        TIME_TO_FIRST_TOKEN,
        RELAY_LAG,
        MODEL_FIRST_TOKEN,
        MODEL_ERRORS,
        MODEL_RETRIES,
        INPUT_TOKENS,
        OUTPUT_TOKENS,
        CACHE_READ_TOKENS,
        CACHE_WRITE_TOKENS,
        TOOL_CALLS,
        REFUSALS,
        SERVER_ERRORS,
        REDRIVES,
        SWEEP_BACKLOG,
    ];
}

/// The one dimension every metric has, and its value.
pub const SERVICE: (&str, &str) = ("Service", "chat");

/// The namespace when `METRICS_NAMESPACE` is not set (the local stack).
pub const LOCAL_NAMESPACE: &str = "chat-fsm/local";

/// A metric's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Occurrences.
    Count,
    /// Milliseconds.
    Milliseconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
        }
    }
}

/// The second dimension a metric may have: a closed set of names, each with values the code
/// bounds (reasons and codes are its own constants; models and tools come from configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension<'a> {
    /// Why a turn failed: `model`, `prompt` (the generator), `not_stored`, `not_queued` (ingest,
    /// the sweeper).
    Reason(&'a str),
    /// An HTTP error code.
    Code(&'a str),
    /// A configured model name.
    Model(&'a str),
    /// A response route (`main`, `small`, `escalated`).
    Route(&'a str),
    /// A tool of ours by name, or `unknown` for any other name a model sent
    /// (`generator::tools::Tools::metric_name`).
    Tool(&'a str),
}

impl Dimension<'_> {
    fn pair(&self) -> (&'static str, &str) {
        match *self {
            Dimension::Reason(v) => ("Reason", v),
            Dimension::Code(v) => ("Code", v),
            Dimension::Model(v) => ("Model", v),
            Dimension::Route(v) => ("Route", v),
            Dimension::Tool(v) => ("Tool", v),
        }
    }
}

fn namespace() -> &'static str {
    static NAMESPACE: OnceLock<String> = OnceLock::new();
    NAMESPACE.get_or_init(|| {
        std::env::var("METRICS_NAMESPACE")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| LOCAL_NAMESPACE.to_owned())
    })
}

/// Counts `n` of metric `name`, over the service and also by each of `by`.
pub fn count(name: &'static str, n: u64, by: &[Dimension<'_>]) {
    emit(name, Unit::Count, &[n as f64], by);
}

/// Records values of metric `name` in milliseconds (several at once: a line for each hundred).
pub fn millis(name: &'static str, values: &[f64], by: &[Dimension<'_>]) {
    emit(name, Unit::Milliseconds, values, by);
}

/// Counts an error answer: a 4xx as [`name::REFUSALS`], a 5xx as [`name::SERVER_ERRORS`], by
/// its code (one of the functions' own constants).
pub fn error_answer(status: u16, code: &str) {
    match status {
        400..=499 => count(name::REFUSALS, 1, &[Dimension::Code(code)]),
        500..=599 => count(name::SERVER_ERRORS, 1, &[Dimension::Code(code)]),
        _ => {}
    }
}

fn emit(name: &'static str, unit: Unit, values: &[f64], by: &[Dimension<'_>]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // EMF takes at most 100 values a document.
    for values in values.chunks(100) {
        let mut line = document(namespace(), now, name, unit, values, by).to_string();
        line.push('\n');
        // One write per line: the log lines of `tracing` go to stdout too, a line at a time.
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

/// The EMF document for `values` of `name` at `timestamp_ms`: dimension sets `[Service]` and
/// `[Service, d]` for each `d` of `by`. At most 100 values go in one document (EMF's limit);
/// the rest are dropped, which the callers keep from happening.
pub fn document(
    namespace: &str,
    timestamp_ms: u64,
    name: &str,
    unit: Unit,
    values: &[f64],
    by: &[Dimension<'_>],
) -> Value {
    let mut dimensions = vec![json!([SERVICE.0])];
    let mut root = Map::new();
    root.insert(SERVICE.0.to_owned(), json!(SERVICE.1));
    for by in by {
        let (key, value) = by.pair();
        dimensions.push(json!([SERVICE.0, key]));
        root.insert(key.to_owned(), json!(value));
    }
    let values: Vec<f64> = values.iter().copied().take(100).collect();
    root.insert(name.to_owned(), if values.len() == 1 { json!(values[0]) } else { json!(values) });
    root.insert(
        "_aws".to_owned(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": dimensions,
                "Metrics": [{"Name": name, "Unit": unit.as_str()}],
            }],
        }),
    );
    Value::Object(root)
}

/// An EMF document read back from a log line (tests and benchmarks): the metric's name, its
/// values and dimensions. `None` for a line that is not one.
pub fn parse(line: &str) -> Option<Emitted> {
    let value: Value = serde_json::from_str(line.trim()).ok()?;
    let directive = value.get("_aws")?.get("CloudWatchMetrics")?.get(0)?;
    let metric = directive.get("Metrics")?.get(0)?;
    let name = metric.get("Name")?.as_str()?.to_owned();
    let values = match value.get(&name)? {
        Value::Array(items) => items.iter().filter_map(Value::as_f64).collect(),
        other => vec![other.as_f64()?],
    };
    let dimensions = directive
        .get("Dimensions")?
        .as_array()?
        .iter()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(|key| Some((key.to_owned(), value.get(key)?.as_str()?.to_owned())))
        .collect::<std::collections::BTreeMap<_, _>>();
    Some(Emitted {
        namespace: directive.get("Namespace")?.as_str()?.to_owned(),
        timestamp_ms: value["_aws"].get("Timestamp")?.as_u64()?,
        name,
        values,
        dimensions,
    })
}

/// One EMF document, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// Its namespace.
    pub namespace: String,
    /// When, epoch ms.
    pub timestamp_ms: u64,
    /// The metric.
    pub name: String,
    /// Its values.
    pub values: Vec<f64>,
    /// Every dimension it carries, by key.
    pub dimensions: std::collections::BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_by_reason_is_one_emf_document_with_two_dimension_sets() {
        let doc = document(
            "ns",
            1_700_000_000_000,
            name::TURNS_FAILED,
            Unit::Count,
            &[1.0],
            &[Dimension::Reason("model")],
        );
        assert_eq!(
            doc,
            json!({
                "_aws": {
                    "Timestamp": 1_700_000_000_000u64,
                    "CloudWatchMetrics": [{
                        "Namespace": "ns",
                        "Dimensions": [["Service"], ["Service", "Reason"]],
                        "Metrics": [{"Name": "TurnsFailed", "Unit": "Count"}],
                    }],
                },
                "Service": "chat",
                "Reason": "model",
                "TurnsFailed": 1.0,
            })
        );
    }

    #[test]
    fn tokens_by_model_and_by_route_are_two_dimension_sets_of_one_document() {
        let by = [Dimension::Model("gpt-4o-mini"), Dimension::Route("small")];
        let doc = document("ns", 5, name::OUTPUT_TOKENS, Unit::Count, &[42.0], &by);
        assert_eq!(
            doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["Service"], ["Service", "Model"], ["Service", "Route"]])
        );
        assert_eq!((doc["Model"].as_str(), doc["Route"].as_str()), (Some("gpt-4o-mini"), Some("small")));
    }

    #[test]
    fn several_values_share_one_line_and_read_back_as_written() {
        let doc = document("ns", 5, name::RELAY_LAG, Unit::Milliseconds, &[12.0, 30.5], &[]);
        let read = parse(&doc.to_string()).expect("an EMF line");
        assert_eq!(read.name, "RelayLag");
        assert_eq!(read.values, vec![12.0, 30.5]);
        assert_eq!(read.dimensions.get("Service").map(String::as_str), Some("chat"));
        assert_eq!(read.namespace, "ns");
        assert!(parse("{\"level\":\"INFO\",\"message\":\"hello\"}").is_none());
        assert!(parse("plain text").is_none());
    }

    #[test]
    fn one_document_carries_at_most_a_hundred_values() {
        let values: Vec<f64> = (0..150).map(f64::from).collect();
        let doc = document("ns", 5, name::RELAY_LAG, Unit::Milliseconds, &values, &[]);
        assert_eq!(doc["RelayLag"].as_array().map(Vec::len), Some(100));
    }
}
