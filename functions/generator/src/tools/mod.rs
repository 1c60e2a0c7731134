//! The tools a model may call while it writes a reply: a small registry of built-ins.
//!
//! - `calculator`: arithmetic on decimal numbers (`+ - * / % ^`, parentheses, `sqrt`, `abs`, `ln`,
//!   `log10`, `sin`, `cos`, `tan`, `round`, `floor`, `ceil`, `pi`, `e`);
//! - `current_time`: the date and time now, in UTC or at a given UTC offset;
//! - `http_get`: a GET of a URL whose host is on the allow list (`TOOLS_HTTP_ALLOW`), answered with
//!   its status and the start of its body.
//!
//! `TOOLS` names the enabled ones (default `calculator,current_time`; `none` for none). A tool's
//! failure is its answer (`is_error`), for the model to read, never a failed turn.

mod calculator;
mod sequence;

pub use calculator::calculate;
pub use sequence::{call_event, replay, result_event, steps, tool_use, Replayed};

use crate::model::{ToolCall, ToolSpec};
use bytes::Bytes;
use chat_core::config::{ConfigError, Env};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::time::Duration;

/// What a tool answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolAnswer {
    /// The answer, or why the call failed.
    pub content: String,
    /// The call failed.
    pub is_error: bool,
}

impl ToolAnswer {
    fn ok(content: impl Into<String>) -> ToolAnswer {
        ToolAnswer { content: content.into(), is_error: false }
    }

    fn error(content: impl Into<String>) -> ToolAnswer {
        ToolAnswer { content: content.into(), is_error: true }
    }
}

/// The most of an HTTP body a tool answer carries.
const HTTP_MAX_BYTES: usize = 16 * 1024;
/// The longest an HTTP tool call may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

type HttpClient = Client<chat_runtime::https::Connector, Empty<Bytes>>;

/// The enabled tools.
#[derive(Clone, Default)]
pub struct Tools {
    calculator: bool,
    current_time: bool,
    /// The allow-listed GET, when enabled.
    http: Option<HttpTool>,
    /// Most tool steps in one turn (`TOOL_MAX_STEPS`); after them the model must answer.
    pub max_steps: u32,
}

#[derive(Clone)]
struct HttpTool {
    client: HttpClient,
    /// Hosts it may fetch: `example.com` exactly, or `*.example.com` for its subdomains.
    allow: Vec<String>,
}

impl Tools {
    /// No tools at all: every turn is answered in text.
    pub fn none() -> Tools {
        Tools::default()
    }

    /// The calculator and the clock, as by default.
    pub fn builtin() -> Tools {
        Tools { calculator: true, current_time: true, http: None, max_steps: 4 }
    }

    /// Reads `TOOLS`, `TOOLS_HTTP_ALLOW` and `TOOL_MAX_STEPS`.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Tools, ConfigError> {
        let invalid =
            |variable: &str, problem: String| ConfigError { variable: variable.to_owned(), problem };
        let names = env.optional("TOOLS").unwrap_or_else(|| "calculator,current_time".to_owned());
        let mut tools = Tools { max_steps: env.parse_or("TOOL_MAX_STEPS", 4)?, ..Tools::default() };
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty() && *n != "none") {
            match name {
                "calculator" => tools.calculator = true,
                "current_time" => tools.current_time = true,
                "http_get" => {
                    let allow: Vec<String> = env
                        .optional("TOOLS_HTTP_ALLOW")
                        .unwrap_or_default()
                        .split(',')
                        .map(|h| h.trim().to_ascii_lowercase())
                        .filter(|h| !h.is_empty())
                        .collect();
                    if allow.is_empty() {
                        return Err(invalid(
                            "TOOLS_HTTP_ALLOW",
                            "must name the hosts http_get may fetch (comma-separated; *.example.com for subdomains)"
                                .to_owned(),
                        ));
                    }
                    tools.http = Some(HttpTool::new(allow).map_err(|e| invalid("TOOLS", e))?);
                }
                other => {
                    return Err(invalid(
                        "TOOLS",
                        format!("names {other:?}; use calculator, current_time, http_get or none"),
                    ))
                }
            }
        }
        Ok(tools)
    }

    /// With the HTTP tool allowed to fetch `hosts` (for tests and the local stack).
    pub fn with_http(mut self, hosts: &[&str]) -> Tools {
        let allow = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        self.http = Some(HttpTool::new(allow).expect("the HTTP client builds"));
        self
    }

    /// The same tools, with at most `steps` tool steps per turn.
    pub fn with_max_steps(mut self, steps: u32) -> Tools {
        self.max_steps = steps;
        self
    }

    /// Whether any tool is enabled.
    pub fn any(&self) -> bool {
        !self.specs().is_empty()
    }

    /// What the model is told about the enabled tools.
    pub fn specs(&self) -> Vec<ToolSpec> {
        let mut specs = Vec::new();
        if self.calculator {
            specs.push(ToolSpec {
                name: "calculator".to_owned(),
                description: "Evaluates an arithmetic expression exactly as written: + - * / % ^, \
                    parentheses, sqrt, abs, ln, log10, sin, cos, tan, round, floor, ceil, pi, e."
                    .to_owned(),
                parameters: json!({
                    "type": "object",
                    "properties": {"expression": {"type": "string", "description": "e.g. (2 + 3) * 4.5"}},
                    "required": ["expression"],
                }),
            });
        }
        if self.current_time {
            specs.push(ToolSpec {
                name: "current_time".to_owned(),
                description: "The current date and time, in UTC or at a UTC offset.".to_owned(),
                parameters: json!({
                    "type": "object",
                    "properties": {"utc_offset": {"type": "string", "description": "e.g. +02:00 or -05:30; UTC when absent"}},
                }),
            });
        }
        if let Some(http) = &self.http {
            specs.push(ToolSpec {
                name: "http_get".to_owned(),
                description: format!(
                    "Fetches a web page or API over HTTP GET and returns its status and the start of its body. \
                     Only these hosts may be fetched: {}.",
                    http.allow.join(", ")
                ),
                parameters: json!({
                    "type": "object",
                    "properties": {"url": {"type": "string", "description": "an https:// URL on an allowed host"}},
                    "required": ["url"],
                }),
            });
        }
        specs
    }

    /// Runs a call; a failure is an answer the model reads.
    pub async fn call(&self, call: &ToolCall) -> ToolAnswer {
        let args: Value =
            match serde_json::from_str(if call.arguments.trim().is_empty() { "{}" } else { &call.arguments })
            {
                Ok(args) => args,
                Err(_) => return ToolAnswer::error("the arguments are not valid JSON"),
            };
        let text = |name: &str| args.get(name).and_then(Value::as_str);
        match call.name.as_str() {
            "calculator" if self.calculator => match text("expression") {
                Some(expression) => match calculate(expression) {
                    Ok(value) => ToolAnswer::ok(calculator::format_number(value)),
                    Err(err) => ToolAnswer::error(err),
                },
                None => ToolAnswer::error("expression (a string) is required"),
            },
            "current_time" if self.current_time => match now_at(text("utc_offset")) {
                Ok(now) => ToolAnswer::ok(now),
                Err(err) => ToolAnswer::error(err),
            },
            "http_get" => match (&self.http, text("url")) {
                (Some(http), Some(url)) => http.get(url).await,
                (Some(_), None) => ToolAnswer::error("url (a string) is required"),
                (None, _) => ToolAnswer::error(format!("there is no tool named {:?}", call.name)),
            },
            other => ToolAnswer::error(format!("there is no tool named {other:?}")),
        }
    }
}

impl HttpTool {
    fn new(allow: Vec<String>) -> Result<HttpTool, String> {
        let https =
            chat_runtime::https::connector(Duration::from_secs(5), true).map_err(|e| e.to_string())?;
        Ok(HttpTool { client: Client::builder(TokioExecutor::new()).build(https), allow })
    }

    fn allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allow.iter().any(|rule| match rule.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")),
            None => host == *rule,
        })
    }

    async fn get(&self, url: &str) -> ToolAnswer {
        let Ok(uri) = url.parse::<http::Uri>() else { return ToolAnswer::error("the url is not valid") };
        if !matches!(uri.scheme_str(), Some("https" | "http")) {
            return ToolAnswer::error("only http and https URLs can be fetched");
        }
        let Some(host) = uri.host() else { return ToolAnswer::error("the url has no host") };
        if !self.allowed(host) {
            return ToolAnswer::error(format!("{host} is not on the allow list ({})", self.allow.join(", ")));
        }
        let request = match http::Request::get(uri.clone())
            .header(http::header::USER_AGENT, "chat-fsm-tool/1")
            .body(Empty::new())
        {
            Ok(request) => request,
            Err(_) => return ToolAnswer::error("the url cannot be requested"),
        };
        let fetch = async {
            let response =
                self.client.request(request).await.map_err(|_| format!("could not reach {host}"))?;
            let status = response.status();
            let mut body = Vec::new();
            let mut incoming = response.into_body();
            while body.len() < HTTP_MAX_BYTES {
                match incoming.frame().await {
                    Some(Ok(frame)) => body.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
                    Some(Err(_)) => return Err(format!("the connection to {host} broke")),
                    None => break,
                }
            }
            let cut = body.len() > HTTP_MAX_BYTES;
            body.truncate(HTTP_MAX_BYTES);
            let text = String::from_utf8_lossy(&body);
            let tail = if cut { "\n[cut at 16 KiB]" } else { "" };
            Ok((status, format!("HTTP {}\n\n{text}{tail}", status.as_u16())))
        };
        match tokio::time::timeout(HTTP_TIMEOUT, fetch).await {
            Ok(Ok((status, text))) if status.is_success() => ToolAnswer::ok(text),
            Ok(Ok((_, text))) => ToolAnswer::error(text),
            Ok(Err(err)) => ToolAnswer::error(err),
            Err(_) => ToolAnswer::error(format!("{host} did not answer in {} s", HTTP_TIMEOUT.as_secs())),
        }
    }
}

/// Now, as RFC 3339, in UTC or at `offset` (`+HH:MM` / `-HH:MM`).
fn now_at(offset: Option<&str>) -> Result<String, String> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let Some(offset) = offset.map(str::trim).filter(|o| !o.is_empty() && *o != "Z") else {
        return Ok(chat_core::time::rfc3339_ms(now_ms as u64));
    };
    let bad = || format!("utc_offset {offset:?} is not like +02:00 or -05:30");
    let (sign, rest) = match offset.as_bytes().first() {
        Some(b'+') => (1, &offset[1..]),
        Some(b'-') => (-1, &offset[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 14 || m > 59 {
        return Err(bad());
    }
    let shifted = now_ms + sign * (h * 3600 + m * 60) * 1000;
    let local = chat_core::time::rfc3339_ms(shifted.max(0) as u64);
    Ok(format!("{}{}{:02}:{:02}", local.trim_end_matches('Z'), if sign < 0 { '-' } else { '+' }, h, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_answers_in_utc_or_at_an_offset() {
        assert!(now_at(None).unwrap().ends_with('Z'));
        assert!(now_at(Some("+02:00")).unwrap().ends_with("+02:00"));
        assert!(now_at(Some("-05:30")).unwrap().ends_with("-05:30"));
        assert!(now_at(Some("tomorrow")).is_err());
    }

    #[tokio::test]
    async fn calls_of_unknown_or_disabled_tools_and_bad_arguments_are_answers_not_failures() {
        let tools = Tools::builtin();
        let call = |name: &str, arguments: &str| ToolCall {
            id: "c".to_owned(),
            name: name.to_owned(),
            arguments: arguments.to_owned(),
        };
        assert_eq!(tools.call(&call("calculator", r#"{"expression": "6*7"}"#)).await, ToolAnswer::ok("42"));
        assert!(tools.call(&call("calculator", "{")).await.is_error);
        assert!(tools.call(&call("calculator", "{}")).await.is_error);
        assert!(tools.call(&call("http_get", r#"{"url": "https://example.com"}"#)).await.is_error);
        assert!(tools.call(&call("rm_rf", "{}")).await.is_error);
        let names: Vec<String> = tools.specs().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["calculator", "current_time"]);
    }

    #[tokio::test]
    async fn the_http_tool_fetches_only_allowed_hosts() {
        let tools = Tools::none().with_http(&["*.example.com", "api.test"]);
        let http = tools.http.as_ref().unwrap();
        assert!(http.allowed("docs.example.com") && http.allowed("API.TEST"));
        assert!(
            !http.allowed("example.com.evil.net")
                && !http.allowed("evil.net")
                && !http.allowed("example.com")
        );
        let call = |url: &str| ToolCall {
            id: "c".to_owned(),
            name: "http_get".to_owned(),
            arguments: json!({ "url": url }).to_string(),
        };
        let refused = tools.call(&call("https://evil.net/x")).await;
        assert!(refused.is_error && refused.content.contains("not on the allow list"), "{refused:?}");
        assert!(tools.call(&call("file:///etc/passwd")).await.is_error);
    }
}
