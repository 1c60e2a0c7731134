//! The tools a model may call while it writes a reply: a small registry of built-ins.
//!
//! - `calculator`: arithmetic on decimal numbers (`+ - * / % ^`, parentheses, `sqrt`, `abs`, `ln`,
//!   `log10`, `sin`, `cos`, `tan`, `round`, `floor`, `ceil`, `pi`, `e`);
//! - `current_time`: the date and time now, in UTC or at a given UTC offset;
//! - `http_get`: a GET of an `https` URL whose host is on the allow list (`TOOLS_HTTP_ALLOW`) and
//!   resolves to public addresses only (the connection goes to the address checked, so a name
//!   that rebinds to loopback, a private network or the instance's own services is refused),
//!   answered with its status and the start of its body.
//!
//! `TOOLS` names the enabled ones (default `calculator,current_time`; `none` for none). A tool's
//! failure is its answer (`is_error`), for the model to read, never a failed turn. A step runs
//! at most `TOOL_MAX_CALLS_PER_STEP` calls, and a turn's calls and answers carry at most
//! `TOOL_MAX_BYTES_PER_TURN` bytes (each call's arguments at most [`MAX_ARGUMENT_BYTES`]), so
//! what a turn stores always fits DynamoDB's item limit.

mod calculator;
mod sequence;

pub use calculator::calculate;
pub use sequence::{call_event, replay, result_event, steps, tool_use, Replayed};

use crate::llm::{ToolCall, ToolSpec};
use bytes::Bytes;
use chat_core::config::{ConfigError, Env};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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

type HttpClient = Client<chat_runtime::https::HttpsConnector<HttpConnector<PublicOnly>>, Empty<Bytes>>;

/// The longest arguments a call may have; a longer one is answered with an error, unrun, and
/// stored without them.
pub const MAX_ARGUMENT_BYTES: usize = 4 * 1024;

/// The enabled tools.
#[derive(Clone)]
pub struct Tools {
    calculator: bool,
    current_time: bool,
    /// The allow-listed GET, when enabled.
    http: Option<HttpTool>,
    /// Most tool steps in one turn (`TOOL_MAX_STEPS`); after them the model must answer.
    pub max_steps: u32,
    /// Most calls run in one step (`TOOL_MAX_CALLS_PER_STEP`); the rest are answered with an
    /// error, unrun.
    pub max_calls_per_step: usize,
    /// Most bytes a turn's tool calls and answers carry (`TOOL_MAX_BYTES_PER_TURN`); once spent,
    /// calls are answered with an error, unrun.
    pub max_bytes_per_turn: usize,
    /// How long every call waits before it runs: zero, but for tests of a slow tool.
    call_delay: std::time::Duration,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            calculator: false,
            current_time: false,
            http: None,
            max_steps: 0,
            max_calls_per_step: 8,
            max_bytes_per_turn: 64 * 1024,
            call_delay: std::time::Duration::ZERO,
        }
    }
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
        Tools { calculator: true, current_time: true, max_steps: 4, ..Tools::default() }
    }

    /// Reads `TOOLS`, `TOOLS_HTTP_ALLOW`, `TOOL_MAX_STEPS`, `TOOL_MAX_CALLS_PER_STEP` and
    /// `TOOL_MAX_BYTES_PER_TURN`.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Tools, ConfigError> {
        let invalid =
            |variable: &str, problem: String| ConfigError { variable: variable.to_owned(), problem };
        let names = env.optional("TOOLS").unwrap_or_else(|| "calculator,current_time".to_owned());
        let defaults = Tools::default();
        let mut tools = Tools {
            max_steps: env.parse_or("TOOL_MAX_STEPS", 4)?,
            max_calls_per_step: env.parse_or("TOOL_MAX_CALLS_PER_STEP", defaults.max_calls_per_step)?,
            max_bytes_per_turn: env.parse_or("TOOL_MAX_BYTES_PER_TURN", defaults.max_bytes_per_turn)?,
            ..defaults
        };
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

    /// The same tools, running at most `calls` calls per step and carrying at most `bytes` of
    /// calls and answers per turn.
    pub fn with_caps(mut self, calls: usize, bytes: usize) -> Tools {
        self.max_calls_per_step = calls;
        self.max_bytes_per_turn = bytes;
        self
    }

    /// The same tools, each call first waiting `delay`, as a slow tool (a far host's
    /// `http_get`) would: for tests of what a turn does while its tools run.
    pub fn with_call_delay(mut self, delay: std::time::Duration) -> Tools {
        self.call_delay = delay;
        self
    }

    /// The name a metric may carry for a call: the tool's own, or `unknown` for a name that is
    /// no tool of ours (a model may send any), so the metric's dimension stays bounded.
    pub fn metric_name(name: &str) -> &'static str {
        match name {
            "calculator" => "calculator",
            "current_time" => "current_time",
            "http_get" => "http_get",
            _ => "unknown",
        }
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
                    "properties": {"url": {"type": "string", "description": "an https:// URL (port 443) on an allowed host"}},
                    "required": ["url"],
                }),
            });
        }
        specs
    }

    /// Runs a call; a failure is an answer the model reads.
    pub async fn call(&self, call: &ToolCall) -> ToolAnswer {
        if !self.call_delay.is_zero() {
            tokio::time::sleep(self.call_delay).await;
        }
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
        // The connector connects to exactly the addresses the resolver checked; IP literals,
        // which skip the resolver, are refused before a request is made.
        let mut http = HttpConnector::new_with_resolver(PublicOnly(GaiResolver::new()));
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = chat_runtime::https::https_only(http).map_err(|e| e.to_string())?;
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
        if uri.scheme_str() != Some("https") {
            return ToolAnswer::error("only https URLs can be fetched (https only)");
        }
        let Some(authority) = uri.authority() else { return ToolAnswer::error("the url has no host") };
        if authority.as_str().contains('@') {
            return ToolAnswer::error("the url may not carry credentials");
        }
        let host = authority.host();
        if uri.port_u16().is_some_and(|port| port != 443) {
            return ToolAnswer::error("only the https port (443) can be fetched");
        }
        if host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok() {
            return ToolAnswer::error("the url must name a host, not an address");
        }
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
            let response = self.client.request(request).await.map_err(|err| match refused_address(&err) {
                Some(refused) => refused.to_string(),
                None => format!("could not reach {host}"),
            })?;
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

/// A name that resolves to an address that is not public (loopback, private, link-local, …).
#[derive(Debug, thiserror::Error)]
#[error("{name} resolves to {address}, not a public address: http_get fetches public hosts only")]
struct NotPublic {
    name: String,
    address: IpAddr,
}

/// The resolver `http_get` connects through: the system's, refusing a name when any of its
/// addresses is not public, so neither a name that points inward nor one that rebinds between
/// lookups can reach the instance's own services or a private network.
#[derive(Clone)]
struct PublicOnly(GaiResolver);

impl tower_service::Service<Name> for PublicOnly {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolving = self.0.call(name.clone());
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = resolving.await?.collect();
            if let Some(inward) = addresses.iter().find(|a| !is_public(a.ip())) {
                let refused = NotPublic { name: name.as_str().to_owned(), address: inward.ip() };
                return Err(std::io::Error::other(refused));
            }
            Ok(addresses.into_iter())
        })
    }
}

/// The refusal of a non-public address somewhere in a request's error chain.
fn refused_address<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<&'e NotPublic> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(refused) = err.downcast_ref::<NotPublic>() {
            return Some(refused);
        }
        // An io::Error shows its inner error's source, not the inner error itself.
        let inner = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if let Some(refused) = inner.and_then(|inner| inner.downcast_ref::<NotPublic>()) {
            return Some(refused);
        }
        current = err.source();
    }
    None
}

/// Whether `ip` is an address of the public internet: not loopback, unspecified, private,
/// shared (CGNAT), link-local, multicast, broadcast, documentation, benchmarking or reserved, and
/// for IPv6 also not unique-local, and not an IPv4 address in disguise (mapped, NAT64, 6to4) that
/// is not public itself.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let inward = a == 0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b))
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && (c == 0 || c == 2))
        || (a == 192 && b == 88 && c == 99)
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || a >= 224;
    !inward
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    let embedded = |high: u16, low: u16| Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
    match segments {
        // Unspecified, loopback, and the deprecated IPv4-compatible form.
        [0, 0, 0, 0, 0, 0, _, _] => false,
        // IPv4-mapped, and NAT64's well-known prefix: as public as the IPv4 address they carry.
        [0, 0, 0, 0, 0, 0xffff, high, low] | [0x64, 0xff9b, 0, 0, 0, 0, high, low] => {
            is_public_v4(embedded(high, low))
        }
        // 6to4 carries an IPv4 address in its second and third segments.
        [0x2002, high, low, ..] => is_public_v4(embedded(high, low)),
        // Discard-only, Teredo, benchmarking, documentation.
        [0x100, 0, 0, 0, ..] | [0x2001, 0, ..] | [0x2001, 0x2, 0, ..] | [0x2001, 0xdb8, ..] => false,
        // Unique local (fc00::/7), link-local (fe80::/10), site-local (fec0::/10), multicast.
        [first, ..] => {
            (first & 0xfe00) != 0xfc00
                && (first & 0xffc0) != 0xfe80
                && (first & 0xffc0) != 0xfec0
                && (first & 0xff00) != 0xff00
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
    fn a_metric_names_only_our_tools_whatever_the_model_sent() {
        for name in ["calculator", "current_time", "http_get"] {
            assert_eq!(Tools::metric_name(name), name);
        }
        for sent in ["Calculator", "rm -rf /", "", &"x".repeat(10_000)] {
            assert_eq!(Tools::metric_name(sent), "unknown");
        }
        // Every tool a turn may be offered has a name of its own in the metric.
        let everything = Tools::builtin().with_http(&["example.com"]);
        for spec in everything.specs() {
            assert_eq!(Tools::metric_name(&spec.name), spec.name);
        }
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

    #[tokio::test]
    async fn the_http_tool_fetches_only_https_on_443_from_public_addresses() {
        // An allowed name that resolves to loopback (as a rebinding name would): refused at the
        // resolver, before any connection, whatever the port.
        let tools = Tools::none().with_http(&["localhost", "api.test"]);
        let call = |url: &str| ToolCall {
            id: "c".to_owned(),
            name: "http_get".to_owned(),
            arguments: json!({ "url": url }).to_string(),
        };
        let inward = tools.call(&call("https://localhost/")).await;
        assert!(inward.is_error && inward.content.contains("not a public address"), "{inward:?}");
        let port = tools.call(&call("https://localhost:9001/2018-06-01/runtime/invocation/next")).await;
        assert!(port.is_error && port.content.contains("443"), "{port:?}");
        let plain = tools.call(&call("http://api.test/")).await;
        assert!(plain.is_error && plain.content.contains("https only"), "{plain:?}");
        let other_port = tools.call(&call("https://api.test:8443/")).await;
        assert!(other_port.is_error && other_port.content.contains("443"), "{other_port:?}");
        for literal in ["https://127.0.0.1/", "https://[::1]/", "https://169.254.169.254/latest/meta-data/"] {
            let answer = tools.call(&call(literal)).await;
            assert!(answer.is_error && answer.content.contains("not an address"), "{literal}: {answer:?}");
        }
        let creds = tools.call(&call("https://user:pw@api.test/")).await;
        assert!(creds.is_error && creds.content.contains("credentials"), "{creds:?}");
    }

    #[test]
    fn public_addresses_are_told_from_inward_ones() {
        let public =
            ["1.1.1.1", "8.8.8.8", "100.63.255.255", "172.32.0.1", "2606:4700::1111", "2a00:1450::1"];
        for ip in public {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
        let inward = [
            "0.0.0.0",
            "127.0.0.1",
            "10.1.2.3",
            "100.64.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "100::1",
        ];
        for ip in inward {
            assert!(!is_public(ip.parse().unwrap()), "{ip} is not public");
        }
        assert!(is_public("::ffff:8.8.8.8".parse().unwrap()), "a mapped public address is public");
    }
}
