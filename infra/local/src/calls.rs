//! What the functions ask of AWS, recorded ([`crate::StackSettings::record_calls`]): the
//! functions reach DynamoDB, SQS, Secrets Manager and, when its endpoint is a local one, Bedrock
//! through a relay on loopback that notes each request's operation, the authorisations IAM would
//! check for it (an action on a resource) and the process that sent it, then passes the request
//! on unchanged and streams the answer back. The end-to-end IAM test holds these against each
//! function's policy in `template.yaml`.
//!
//! The caller is the process at the other end of the connection (its name, `/proc/PID/comm`:
//! `ingest`, `generator`, `stream`, `sweeper`), found once per connection through
//! `/proc/net/tcp` (Linux): every function shares `cargo lambda watch`'s environment, so nothing
//! in a request says which function sent it.

use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, OnceCell};
use tokio::task::JoinHandle;

/// One authorisation a request needed, as IAM would check it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    /// The process that sent it: `ingest`, `generator`, ….
    pub caller: String,
    /// The operation as sent, e.g. `dynamodb:TransactWriteItems`.
    pub operation: String,
    /// The IAM action it needs, e.g. `dynamodb:PutItem` (one of a transaction's items).
    pub action: String,
    /// What it acts on, as the tail of its ARN or as sent: `table/chat`,
    /// `table/chat/index/by_user`, a queue's URL, a secret's id, `foundation-model/anthropic.x`.
    pub resource: String,
}

/// Every call the relays have seen, with how often.
#[derive(Debug, Default)]
pub struct Calls {
    seen: Mutex<BTreeMap<Call, u64>>,
}

impl Calls {
    /// What has been recorded so far.
    pub fn snapshot(&self) -> BTreeMap<Call, u64> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn add(&self, caller: &str, needs: Vec<Need>) {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for need in needs {
            let call = Call {
                caller: caller.to_owned(),
                operation: need.operation,
                action: need.action,
                resource: need.resource,
            };
            *seen.entry(call).or_default() += 1;
        }
    }
}

/// An authorisation a request needs, before the caller is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Need {
    operation: String,
    action: String,
    resource: String,
}

fn need(operation: impl Into<String>, action: impl Into<String>, resource: impl Into<String>) -> Need {
    Need { operation: operation.into(), action: action.into(), resource: resource.into() }
}

/// What IAM would check for a request: its service from `X-Amz-Target` (DynamoDB, SQS and
/// Secrets Manager's JSON protocols), a form body's `Action` (SQS's query protocol) or the path
/// (Bedrock's REST API), then its action and resources. A request none of these explains is
/// one `unknown` need, which no policy grants.
pub(crate) fn needs(headers: &HeaderMap, path: &str, body: &[u8]) -> Vec<Need> {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        let (prefix, op) = target.split_once('.').unwrap_or((target, ""));
        return match prefix {
            "DynamoDB_20120810" => dynamodb(op, &json),
            "AmazonSQS" => sqs(op, json["QueueUrl"].as_str().unwrap_or_default()),
            "secretsmanager" => {
                vec![need(
                    format!("secretsmanager:{op}"),
                    format!("secretsmanager:{op}"),
                    text(&json["SecretId"]),
                )]
            }
            _ => vec![unknown(target)],
        };
    }
    let form = std::str::from_utf8(body).unwrap_or_default();
    if let Some(action) = form_value(form, "Action") {
        if signing_service(headers) == Some("sqs") {
            return sqs(&action, &form_value(form, "QueueUrl").unwrap_or_default());
        }
        return vec![unknown(&action)];
    }
    if let Some(rest) = path.strip_prefix("/model/") {
        if let Some((model, op)) = rest.split_once('/') {
            let model = percent_encoding::percent_decode_str(model).decode_utf8_lossy().into_owned();
            let (operation, action) = match op.split('?').next().unwrap_or_default() {
                "converse-stream" => ("ConverseStream", "InvokeModelWithResponseStream"),
                "converse" => ("Converse", "InvokeModel"),
                "invoke-with-response-stream" => {
                    ("InvokeModelWithResponseStream", "InvokeModelWithResponseStream")
                }
                "invoke" => ("InvokeModel", "InvokeModel"),
                _ => return vec![unknown(path)],
            };
            return vec![need(
                format!("bedrock:{operation}"),
                format!("bedrock:{action}"),
                bedrock_model(&model),
            )];
        }
    }
    vec![unknown(path)]
}

fn unknown(what: &str) -> Need {
    need(format!("unknown:{what}"), "unknown", "")
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

/// DynamoDB authorises a transaction item by item (a `ConditionCheck` as `ConditionCheckItem`),
/// and a batch by its own name on each table it names.
fn dynamodb(op: &str, body: &Value) -> Vec<Need> {
    let operation = format!("dynamodb:{op}");
    let table = |value: &Value| format!("table/{}", text(&value["TableName"]));
    match op {
        "TransactWriteItems" | "TransactGetItems" => body["TransactItems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item.as_object()?.iter().next())
            .map(|(kind, item)| {
                let action = match kind.as_str() {
                    "ConditionCheck" => "ConditionCheckItem".to_owned(),
                    "Get" | "Put" | "Update" | "Delete" => format!("{kind}Item"),
                    other => format!("unknown:{other}"),
                };
                need(&operation, format!("dynamodb:{action}"), table(item))
            })
            .collect(),
        "BatchGetItem" | "BatchWriteItem" => body["RequestItems"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, _)| need(&operation, &operation, format!("table/{name}")))
            .collect(),
        _ => {
            let resource = match body["IndexName"].as_str() {
                Some(index) => format!("{}/index/{index}", table(body)),
                None => table(body),
            };
            vec![need(&operation, &operation, resource)]
        }
    }
}

/// SQS authorises a batch as its single form.
fn sqs(op: &str, queue_url: &str) -> Vec<Need> {
    let action = op.strip_suffix("Batch").unwrap_or(op);
    vec![need(format!("sqs:{op}"), format!("sqs:{action}"), queue_url)]
}

/// A Bedrock model id as the tail of its ARN: a cross-Region inference profile (`us.…`,
/// `eu.…`, `apac.…`, `global.…`) or a foundation model; an ARN, as it is.
fn bedrock_model(model: &str) -> String {
    if model.starts_with("arn:") {
        return model.to_owned();
    }
    let geography = model.split('.').next().unwrap_or_default();
    if model.contains('.') && ["us", "eu", "apac", "global", "us-gov", "ca", "jp", "au"].contains(&geography)
    {
        format!("inference-profile/{model}")
    } else {
        format!("foundation-model/{model}")
    }
}

/// The service in a SigV4 `Authorization` header's credential scope.
fn signing_service(headers: &HeaderMap) -> Option<&str> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    auth.split("Credential=").nth(1)?.split('/').nth(3)
}

/// A value of an `application/x-www-form-urlencoded` body.
fn form_value(form: &str, key: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned()
        })
    })
}

/// A relay in front of one local service.
pub(crate) struct Relay {
    /// `http://127.0.0.1:PORT`: what the functions are given instead of the service's address.
    pub(crate) url: String,
    pub(crate) task: JoinHandle<()>,
}

struct Upstream {
    url: String,
    http: reqwest::Client,
    calls: Arc<Calls>,
}

/// Starts a relay on a free loopback port that records into `calls` and passes every request
/// on to `upstream`, until `shutdown` turns true.
pub(crate) async fn relay(
    upstream: &str,
    calls: Arc<Calls>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<Relay> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let http = reqwest::Client::builder().no_proxy().build().map_err(std::io::Error::other)?;
    let state = Arc::new(Upstream { url: upstream.trim_end_matches('/').to_owned(), http, calls });
    let app = axum::Router::new().fallback(pass_on).with_state(state);
    let task = tokio::spawn(async move {
        let stopped = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let service = app.into_make_service_with_connect_info::<Peer>();
        if let Err(e) = axum::serve(listener, service).with_graceful_shutdown(stopped).await {
            tracing::error!(error = %e, "a recording relay stopped");
        }
    });
    Ok(Relay { url, task })
}

/// The other end of a connection, and the process behind it once looked up.
#[derive(Clone)]
struct Peer {
    remote: SocketAddr,
    local: Option<SocketAddr>,
    caller: Arc<OnceCell<Option<String>>>,
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Peer {
        Peer { remote: *stream.remote_addr(), local: stream.io().local_addr().ok(), caller: Arc::default() }
    }
}

impl Peer {
    /// The name of the process that holds the connection's other end, looked up on its first
    /// request, while that process waits for the answer (`None` if it has gone meanwhile).
    async fn caller(&self) -> Option<String> {
        let (remote, local) = (self.remote, self.local?);
        self.caller
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || process_of(remote, local)).await.ok().flatten()
            })
            .await
            .clone()
    }
}

/// The largest request body passed on (DynamoDB's limit is 16 MB).
const MAX_BODY: usize = 32 * 1024 * 1024;

async fn pass_on(
    State(upstream): State<Arc<Upstream>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large for the recording relay")
            .into_response();
    };
    // Every call recorded has its sender: a request whose sender cannot be found (a process
    // that died as it sent it) is refused rather than passed on unrecorded.
    let Some(caller) = peer.caller().await else {
        tracing::warn!(peer = %peer.remote, "a recording relay could not tell which process sent a request");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the recording relay could not tell which process sent this",
        )
            .into_response();
    };
    upstream.calls.add(&caller, needs(&parts.headers, parts.uri.path(), &body));
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = parts.headers;
    for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::CONTENT_LENGTH] {
        headers.remove(name);
    }
    let answer = upstream
        .http
        .request(parts.method, format!("{}{path}", upstream.url))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            return (StatusCode::BAD_GATEWAY, format!("the local service did not answer: {e}"))
                .into_response()
        }
    };
    let mut response = Response::builder().status(answer.status());
    if let Some(headers) = response.headers_mut() {
        headers.extend(answer.headers().iter().map(|(k, v)| (k.clone(), v.clone())));
        headers.remove(header::TRANSFER_ENCODING);
        headers.remove(header::CONNECTION);
    }
    let body = Body::from_stream(answer.bytes_stream().map(|chunk| chunk.map_err(std::io::Error::other)));
    response.body(body).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// The name (`/proc/PID/comm`) of the process that owns the TCP socket at `remote` connected to
/// `local`, both on this machine: the socket's inode from `/proc/net/tcp`, then the process
/// with a descriptor on it.
pub(crate) fn process_of(remote: SocketAddr, local: SocketAddr) -> Option<String> {
    let (SocketAddr::V4(remote), SocketAddr::V4(local)) = (remote, local) else { return None };
    let address = |addr: std::net::SocketAddrV4| {
        format!("{:08X}:{:04X}", u32::from_ne_bytes(addr.ip().octets()), addr.port())
    };
    let (from, to) = (address(remote), address(local));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|row| {
        let fields: Vec<&str> = row.split_whitespace().collect();
        (fields.len() > 9 && fields[1] == from && fields[2] == to).then(|| fields[9].to_owned())
    })?;
    let socket = format!("socket:[{inode}]");
    for process in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = process.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else { continue };
        let owns = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == socket.as_str()));
        if owns {
            let comm = std::fs::read_to_string(process.path().join("comm")).ok()?;
            return Some(comm.trim_end().to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    fn actions(needs: &[Need]) -> Vec<(&str, &str, &str)> {
        needs.iter().map(|n| (n.operation.as_str(), n.action.as_str(), n.resource.as_str())).collect()
    }

    #[test]
    fn a_dynamodb_transaction_needs_each_items_action_and_a_query_its_index() {
        let target = |op: &str| headers(&[("x-amz-target", &format!("DynamoDB_20120810.{op}"))]);
        let body = json!({"TransactItems": [
            {"Put": {"TableName": "chat", "Item": {}}},
            {"Update": {"TableName": "chat", "Key": {}}},
            {"ConditionCheck": {"TableName": "chat", "Key": {}}},
            {"Delete": {"TableName": "other", "Key": {}}},
        ]});
        let op = "dynamodb:TransactWriteItems";
        assert_eq!(
            actions(&needs(&target("TransactWriteItems"), "/", body.to_string().as_bytes())),
            [
                (op, "dynamodb:PutItem", "table/chat"),
                (op, "dynamodb:UpdateItem", "table/chat"),
                (op, "dynamodb:ConditionCheckItem", "table/chat"),
                (op, "dynamodb:DeleteItem", "table/other"),
            ]
        );
        let query = json!({"TableName": "chat", "IndexName": "by_user", "KeyConditionExpression": "x"});
        assert_eq!(
            actions(&needs(&target("Query"), "/", query.to_string().as_bytes())),
            [("dynamodb:Query", "dynamodb:Query", "table/chat/index/by_user")]
        );
        let batch = json!({"RequestItems": {"chat": {"Keys": []}}});
        assert_eq!(
            actions(&needs(&target("BatchGetItem"), "/", batch.to_string().as_bytes())),
            [("dynamodb:BatchGetItem", "dynamodb:BatchGetItem", "table/chat")]
        );
    }

    #[test]
    fn sqs_secrets_manager_and_bedrock_requests_need_their_iam_actions() {
        let queue = "http://127.0.0.1:9324/000000000000/chat-turns";
        let batch = json!({"QueueUrl": queue, "Entries": []}).to_string();
        let sqs = headers(&[("x-amz-target", "AmazonSQS.SendMessageBatch")]);
        assert_eq!(
            actions(&needs(&sqs, "/", batch.as_bytes())),
            [("sqs:SendMessageBatch", "sqs:SendMessage", queue)]
        );
        let form = format!(
            "Action=SendMessage&QueueUrl={}&MessageBody=x",
            queue.replace(':', "%3A").replace('/', "%2F")
        );
        let signed = headers(&[(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=local/20261201/us-east-1/sqs/aws4_request, SignedHeaders=host",
        )]);
        assert_eq!(
            actions(&needs(&signed, "/", form.as_bytes())),
            [("sqs:SendMessage", "sqs:SendMessage", queue)]
        );
        let secret = headers(&[("x-amz-target", "secretsmanager.GetSecretValue")]);
        assert_eq!(
            actions(&needs(&secret, "/", br#"{"SecretId": "key"}"#)),
            [("secretsmanager:GetSecretValue", "secretsmanager:GetSecretValue", "key")]
        );
        assert_eq!(
            actions(&needs(&HeaderMap::new(), "/model/anthropic.fake-v1%3A0/converse-stream", b"{}")),
            [(
                "bedrock:ConverseStream",
                "bedrock:InvokeModelWithResponseStream",
                "foundation-model/anthropic.fake-v1:0"
            )]
        );
        assert_eq!(
            actions(&needs(&HeaderMap::new(), "/model/us.anthropic.m-v1%3A0/converse", b"{}")),
            [("bedrock:Converse", "bedrock:InvokeModel", "inference-profile/us.anthropic.m-v1:0")]
        );
    }

    #[test]
    fn a_request_nothing_explains_is_unknown() {
        let found = needs(&headers(&[("x-amz-target", "Kinesis_20131202.PutRecord")]), "/", b"{}");
        assert_eq!(actions(&found), [("unknown:Kinesis_20131202.PutRecord", "unknown", "")]);
        assert_eq!(actions(&needs(&HeaderMap::new(), "/health", b"")), [("unknown:/health", "unknown", "")]);
    }

    #[test]
    fn the_caller_is_the_process_holding_the_connections_other_end() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, remote) = listener.accept().unwrap();
        assert_eq!(remote, client.local_addr().unwrap());
        let own = std::fs::read_to_string("/proc/self/comm").unwrap().trim_end().to_owned();
        assert_eq!(process_of(remote, listener.local_addr().unwrap()).as_deref(), Some(own.as_str()));
        // The listening side's own socket (the other direction) is no caller.
        let unconnected: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(process_of(unconnected, listener.local_addr().unwrap()), None);
    }
}
