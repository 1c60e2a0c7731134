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

use crate::model::{Exchange, ToolCall, ToolSpec};
use bytes::Bytes;
use chat_core::config::{ConfigError, Env};
use chat_core::{ReplyEvent, ToolUse};
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
                    Ok(value) => ToolAnswer::ok(format_number(value)),
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

/// A number as the calculator answers it: whole numbers without a fraction.
fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// Evaluates an arithmetic expression.
pub fn calculate(expression: &str) -> Result<f64, String> {
    let mut parser = Parser { chars: expression.chars().collect(), at: 0, depth: 0 };
    let value = parser.sum()?;
    parser.space();
    if parser.at < parser.chars.len() {
        return Err(format!("unexpected {:?} at position {}", parser.chars[parser.at], parser.at + 1));
    }
    if !value.is_finite() {
        return Err("the result is not a finite number (division by zero?)".to_owned());
    }
    Ok(value)
}

/// Recursive descent, with the usual precedence (`-2^2` is -4, `2^3^2` is 512):
/// sum := product (('+'|'-') product)*; product := unary (('*'|'/'|'%') unary)*;
/// unary := '-' unary | power; power := atom ('^' unary)?; atom := number | name | name(sum) | (sum).
struct Parser {
    chars: Vec<char>,
    at: usize,
    depth: u32,
}

impl Parser {
    fn space(&mut self) {
        while self.chars.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.space();
        self.chars.get(self.at).copied()
    }

    fn sum(&mut self) -> Result<f64, String> {
        let mut value = self.product()?;
        while let Some(op @ ('+' | '-')) = self.peek() {
            self.at += 1;
            let rhs = self.product()?;
            value = if op == '+' { value + rhs } else { value - rhs };
        }
        Ok(value)
    }

    fn product(&mut self) -> Result<f64, String> {
        let mut value = self.unary()?;
        while let Some(op @ ('*' | '/' | '%')) = self.peek() {
            self.at += 1;
            let rhs = self.unary()?;
            if rhs == 0.0 && op != '*' {
                return Err("division by zero".to_owned());
            }
            value = match op {
                '*' => value * rhs,
                '/' => value / rhs,
                _ => value % rhs,
            };
        }
        Ok(value)
    }

    fn power(&mut self) -> Result<f64, String> {
        let base = self.atom()?;
        if self.peek() == Some('^') {
            self.at += 1;
            return Ok(base.powf(self.unary()?));
        }
        Ok(base)
    }

    fn unary(&mut self) -> Result<f64, String> {
        self.depth += 1;
        if self.depth > 200 {
            return Err("the expression is nested too deeply".to_owned());
        }
        let value = if self.peek() == Some('-') {
            self.at += 1;
            self.unary().map(|v| -v)
        } else {
            self.power()
        };
        self.depth -= 1;
        value
    }

    fn atom(&mut self) -> Result<f64, String> {
        match self.peek() {
            Some('(') => {
                self.at += 1;
                let value = self.sum()?;
                if self.peek() != Some(')') {
                    return Err(format!("a ')' is missing at position {}", self.at + 1));
                }
                self.at += 1;
                Ok(value)
            }
            Some(c) if c.is_ascii_digit() || c == '.' => {
                let start = self.at;
                while self.chars.get(self.at).is_some_and(|c| c.is_ascii_digit() || *c == '.') {
                    self.at += 1;
                }
                if matches!(self.chars.get(self.at), Some('e' | 'E'))
                    && self
                        .chars
                        .get(self.at + 1)
                        .is_some_and(|c| c.is_ascii_digit() || *c == '-' || *c == '+')
                {
                    self.at += 2;
                    while self.chars.get(self.at).is_some_and(char::is_ascii_digit) {
                        self.at += 1;
                    }
                }
                let text: String = self.chars[start..self.at].iter().collect();
                text.parse().map_err(|_| format!("{text:?} is not a number"))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.at;
                while self.chars.get(self.at).is_some_and(|c| c.is_ascii_alphanumeric()) {
                    self.at += 1;
                }
                let name: String = self.chars[start..self.at].iter().collect::<String>().to_ascii_lowercase();
                match name.as_str() {
                    "pi" => return Ok(std::f64::consts::PI),
                    "e" => return Ok(std::f64::consts::E),
                    _ => {}
                }
                let function: fn(f64) -> f64 = match name.as_str() {
                    "sqrt" => f64::sqrt,
                    "abs" => f64::abs,
                    "ln" => f64::ln,
                    "log10" => f64::log10,
                    "sin" => f64::sin,
                    "cos" => f64::cos,
                    "tan" => f64::tan,
                    "round" => f64::round,
                    "floor" => f64::floor,
                    "ceil" => f64::ceil,
                    _ => return Err(format!("unknown name {name:?}")),
                };
                if self.peek() != Some('(') {
                    return Err(format!("{name} needs its argument in parentheses"));
                }
                let value = self.atom()?;
                Ok(function(value))
            }
            Some(c) => Err(format!("unexpected {c:?} at position {}", self.at + 1)),
            None => Err("the expression ended early".to_owned()),
        }
    }
}

/// The stream event of a tool call: `tool_call` with `{id, name, arguments}`.
pub fn call_event(call: &ToolCall) -> ReplyEvent {
    ReplyEvent {
        event: "tool_call".to_owned(),
        data: json!({"id": call.id, "name": call.name, "arguments": call.arguments}),
    }
}

/// The stream event of a tool's answer: `tool_result` with `{id, name, content, is_error}`.
pub fn result_event(call: &ToolCall, answer: &ToolAnswer) -> ReplyEvent {
    ReplyEvent {
        event: "tool_result".to_owned(),
        data: json!({"id": call.id, "name": call.name, "content": answer.content, "is_error": answer.is_error}),
    }
}

/// A call and its answer, as stored with the reply.
pub fn tool_use(call: &ToolCall, answer: &ToolAnswer) -> ToolUse {
    ToolUse {
        id: call.id.clone(),
        name: call.name.clone(),
        arguments: call.arguments.clone(),
        result: answer.content.clone(),
        is_error: answer.is_error,
    }
}

/// How many tool steps `exchanges` hold (each model turn that called tools is one).
pub fn steps(exchanges: &[Exchange]) -> u32 {
    exchanges.iter().filter(|e| matches!(e, Exchange::Assistant { .. })).count() as u32
}

/// A turn's sequence so far, read back after a takeover.
#[derive(Debug, Default, PartialEq)]
pub struct Replayed {
    /// The tool steps, for the prompt.
    pub exchanges: Vec<Exchange>,
    /// The text tokens after the last step: the reply goes on from them.
    pub text_after: Vec<String>,
    /// The calls and their answers, for the stored reply.
    pub tool_uses: Vec<ToolUse>,
}

/// Reads back a turn's token sequence (text tokens, `tool_call` and `tool_result` entries): the
/// steps it took, and the text written since the last one.
pub fn replay(tokens: &[String]) -> Replayed {
    let mut replayed = Replayed::default();
    let mut text = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    let field =
        |data: &Value, name: &str| data.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
    for token in tokens {
        let Some(event) = ReplyEvent::decode(token) else {
            if !calls.is_empty() {
                // Text after calls whose results are missing cannot happen; keep it as text.
                replayed.exchanges.push(Exchange::Assistant {
                    text: std::mem::take(&mut text),
                    calls: std::mem::take(&mut calls),
                });
            }
            text.push_str(token);
            replayed.text_after.push(token.clone());
            continue;
        };
        match event.event.as_str() {
            "tool_call" => {
                calls.push(ToolCall {
                    id: field(&event.data, "id"),
                    name: field(&event.data, "name"),
                    arguments: field(&event.data, "arguments"),
                });
                replayed.text_after.clear();
            }
            "tool_result" => {
                if !calls.is_empty() {
                    replayed.exchanges.push(Exchange::Assistant {
                        text: std::mem::take(&mut text),
                        calls: std::mem::take(&mut calls),
                    });
                }
                let answer = ToolAnswer {
                    content: field(&event.data, "content"),
                    is_error: event.data.get("is_error").and_then(Value::as_bool).unwrap_or(false),
                };
                let call = ToolCall {
                    id: field(&event.data, "id"),
                    name: field(&event.data, "name"),
                    arguments: String::new(),
                };
                let arguments = replayed
                    .exchanges
                    .iter()
                    .rev()
                    .find_map(|e| match e {
                        Exchange::Assistant { calls, .. } => calls.iter().find(|c| c.id == call.id),
                        Exchange::ToolResult { .. } => None,
                    })
                    .map(|c| c.arguments.clone())
                    .unwrap_or_default();
                replayed.tool_uses.push(tool_use(&ToolCall { arguments, ..call.clone() }, &answer));
                replayed.exchanges.push(Exchange::ToolResult {
                    call_id: call.id,
                    name: call.name,
                    content: answer.content,
                    is_error: answer.is_error,
                });
                text.clear();
                replayed.text_after.clear();
            }
            _ => {}
        }
    }
    replayed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calculator_follows_precedence_and_explains_its_errors() {
        assert_eq!(calculate("2 + 3 * 4").unwrap(), 14.0);
        assert_eq!(calculate("(2 + 3) * 4").unwrap(), 20.0);
        assert_eq!(calculate("2 ^ 3 ^ 2").unwrap(), 512.0, "right associative");
        assert_eq!(calculate("-2 ^ 2").unwrap(), -4.0);
        assert_eq!(calculate("2 ^ -1").unwrap(), 0.5);
        assert_eq!(calculate("10 % 4 - 1.5e1").unwrap(), -13.0);
        assert_eq!(calculate("sqrt(16) + abs(-2) + round(2.5)").unwrap(), 9.0);
        assert!((calculate("2 * pi").unwrap() - std::f64::consts::TAU).abs() < 1e-12);
        assert_eq!(format_number(calculate("1234567 * 89").unwrap()), "109876463");
        assert_eq!(format_number(calculate("1 / 4").unwrap()), "0.25");
        assert_eq!(calculate("1 / 0").unwrap_err(), "division by zero");
        assert!(calculate("2 +").unwrap_err().contains("ended early"));
        assert!(calculate("(1 + 2").unwrap_err().contains("')' is missing"));
        assert!(calculate("2 $ 3").unwrap_err().contains("position 3"));
        assert!(calculate("foo(1)").unwrap_err().contains("unknown name"));
        assert!(calculate(&"(".repeat(10_000)).is_err(), "deep nesting is refused, not a stack overflow");
    }

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

    #[test]
    fn a_sequence_replays_into_its_steps_the_text_after_them_and_the_stored_uses() {
        let call =
            ToolCall { id: "c1".to_owned(), name: "calculator".to_owned(), arguments: "{}".to_owned() };
        let answer = ToolAnswer::ok("42");
        let tokens: Vec<String> = vec![
            "Let ".to_owned(),
            "me.".to_owned(),
            call_event(&call).encode(),
            result_event(&call, &answer).encode(),
            "It ".to_owned(),
            "is".to_owned(),
        ];
        let replayed = replay(&tokens);
        assert_eq!(
            replayed.exchanges,
            vec![
                Exchange::Assistant { text: "Let me.".to_owned(), calls: vec![call.clone()] },
                Exchange::ToolResult {
                    call_id: "c1".to_owned(),
                    name: "calculator".to_owned(),
                    content: "42".to_owned(),
                    is_error: false
                },
            ]
        );
        assert_eq!(replayed.text_after, ["It ", "is"]);
        assert_eq!(replayed.tool_uses, vec![tool_use(&call, &answer)]);
        assert_eq!(steps(&replayed.exchanges), 1);
        // No tools at all: everything is text after no steps.
        let plain = replay(&["a".to_owned(), "b".to_owned()]);
        assert_eq!((plain.exchanges.len(), plain.text_after.len()), (0, 2));
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
