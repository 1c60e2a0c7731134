//! Property tests over request parsing: arbitrary methods, paths (percent-encoded or broken),
//! queries, headers and bodies go through the real ingest and stream handlers, against a real
//! DynamoDB emulator. Whatever arrives, the answer is never a panic and never a 500: a 2xx, or a
//! 4xx/503 with a JSON error naming a code. The run is bounded (`PROPTEST_CASES`, default 256
//! per handler) so it fits in `make test`.

use chat_core::{ClaimOutcome, NewMessage, Outcome, SendOutcome, SessionId, Store, StoreOptions, UserId};
use chat_local::LocalDynamo;
use http_body_util::BodyExt;
use lambda_http::http::{header, HeaderValue, Method};
use lambda_http::{Body, Request, RequestExt};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

const TABLE: &str = "fuzz";
const OWNER: &str = "fuzz-owner";

/// One emulator, one finished session and the runtime they live on, shared by every case.
struct World {
    runtime: tokio::runtime::Runtime,
    store: Store,
    /// A session of [`OWNER`] whose first turn is committed (so a stream of it ends at once).
    session: SessionId,
    _dynamo: LocalDynamo,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let (dynamo, store, session) = runtime.block_on(async {
            let dynamo = LocalDynamo::start(0, TABLE).await.expect("emulator");
            let store = dynamo.store(TABLE, StoreOptions::default());
            let user = UserId::parse(OWNER).unwrap();
            let sent = store
                .send_message(NewMessage {
                    user: &user,
                    session: None,
                    content: "hi",
                    client_message_id: None,
                    by: "fuzz",
                })
                .await
                .unwrap();
            let SendOutcome::Accepted(ticket) = sent else { panic!("{sent:?}") };
            let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "fuzz").await.unwrap() else {
                panic!()
            };
            let claim = store
                .claim_generation(ticket.session_id, ticket.turn, "fuzz-gen", Duration::from_secs(30), 3)
                .await
                .unwrap();
            let ClaimOutcome::Claimed(lease) = claim else { panic!("{claim:?}") };
            store.append_chunk(&lease, 0, 0, &["Hello".to_owned(), " there".to_owned()]).await.unwrap();
            store.commit_reply(&lease, "Hello there", None).await.unwrap();
            (dynamo, store, ticket.session_id)
        });
        World { runtime, store, session, _dynamo: dynamo }
    })
}

fn ingest_app() -> &'static ingest::App {
    static APP: OnceLock<ingest::App> = OnceLock::new();
    APP.get_or_init(|| {
        // Nothing listens on port 9: every enqueue fails at once, so a valid send ends in 503
        // (its turn ended, its key released), exercising the failure path too.
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::Config::builder()
                .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
                .region(aws_sdk_sqs::config::Region::new("us-east-1"))
                .credentials_provider(aws_sdk_sqs::config::Credentials::new("t", "t", None, None, "t"))
                .endpoint_url("http://127.0.0.1:9")
                .retry_config(aws_sdk_sqs::config::retry::RetryConfig::disabled())
                .build(),
        );
        let queue = chat_runtime::queue::Queue::new(sqs, "http://127.0.0.1:9/queue/none");
        let budget = ingest::Budget { tokens: 500, system_prompt: None };
        ingest::App::new(
            world().store.clone(),
            chat_auth::Authenticator::trusted(),
            queue,
            chat_core::UserLimits::default(),
            budget,
        )
        .expect("app")
    })
}

fn relay() -> &'static stream::Relay {
    static RELAY: OnceLock<stream::Relay> = OnceLock::new();
    RELAY.get_or_init(|| {
        let settings = stream::RelaySettings {
            poll_fast: Duration::from_millis(10),
            poll_slow: Duration::from_millis(50),
            keepalive: Duration::from_secs(1),
            max_duration: Duration::from_secs(2),
            retry: Duration::from_secs(1),
            max_open_streams: 3,
        };
        stream::Relay::new(world().store.clone(), settings, chat_auth::Authenticator::trusted())
    })
}

/// A path segment: route words, real and random ids, and arbitrary text, percent-encoded
/// whole, in part, or not at all (raw `%`, bad escapes, invalid UTF-8 once decoded).
fn segment() -> impl Strategy<Value = String> {
    let session = world().session.to_string();
    prop_oneof![
        3 => prop::sample::select(vec!["sessions", "users", "user", "messages", "cancel", "stream", "health", ""])
            .prop_map(str::to_owned),
        2 => Just(session),
        1 => Just(OWNER.to_owned()),
        1 => Just(SessionId::new().to_string()),
        2 => any::<String>().prop_map(|s| percent_encode(&s)),
        1 => prop::sample::select(vec!["%", "%Z", "%ZZ", "%FF%FE", "%C3%28", "%00", "%2F", "..", "a%20b"])
            .prop_map(str::to_owned),
    ]
}

/// An ingest request line: mostly the routes of the contract, with the method they take and
/// arbitrary ids in them; sometimes any method on anything at all.
fn ingest_route() -> impl Strategy<Value = (Method, Vec<String>)> {
    let user = prop_oneof![
        3 => Just(OWNER.to_owned()),
        1 => "[a-z0-9._@-]{1,12}",
        1 => segment(),
    ];
    let session = world().session.to_string();
    let id = prop_oneof![2 => Just(session), 1 => Just(SessionId::new().to_string()), 1 => segment()];
    let route = |method: Method, parts: Vec<String>| (method, parts);
    let routes = prop_oneof![
        5 => user.clone().prop_map(move |u| route(Method::POST, vec!["sessions".into(), u, "messages".into()])),
        2 => user.clone().prop_map(move |u| route(Method::GET, vec!["users".into(), u, "sessions".into()])),
        1 => user.prop_map(move |u| route(Method::GET, vec!["sessions".into(), "user".into(), u])),
        2 => id.clone().prop_map(move |i| route(Method::POST, vec!["sessions".into(), i, "cancel".into()])),
        2 => id.clone().prop_map(move |i| route(Method::GET, vec!["sessions".into(), i])),
        // Never the shared session: the other cases need it.
        1 => prop_oneof![Just(SessionId::new().to_string()), segment()]
            .prop_filter("not the shared session", |i| *i != world().session.to_string())
            .prop_map(move |i| route(Method::DELETE, vec!["sessions".into(), i])),
        1 => Just(route(Method::GET, vec!["health".into()])),
    ];
    prop_oneof![
        6 => routes,
        1 => (method(), prop::collection::vec(segment(), 0..5)),
        1 => (method(), ingest_any_path()),
    ]
}

/// A path of the contract's words and ids in any order.
fn ingest_any_path() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(segment(), 1..4).prop_map(|mut parts| {
        parts.insert(0, "sessions".to_owned());
        parts
    })
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn method() -> impl Strategy<Value = Method> {
    prop::sample::select(vec![
        Method::GET,
        Method::POST,
        Method::DELETE,
        Method::PUT,
        Method::PATCH,
        Method::OPTIONS,
        Method::HEAD,
    ])
}

/// A JSON value of a field: the right type, the wrong type, empty, huge.
fn field() -> impl Strategy<Value = Value> {
    let session = world().session.to_string();
    prop_oneof![
        3 => any::<String>().prop_map(Value::String),
        1 => Just(Value::String(session)),
        1 => Just(Value::String(OWNER.to_owned())),
        1 => Just(Value::String(String::new())),
        1 => Just(Value::String("word ".repeat(700))),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => Just(Value::Null),
        1 => Just(json!([1, "two"])),
        1 => Just(json!({"nested": true})),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let object = prop::collection::vec(
        (
            prop::sample::select(vec!["message", "session_id", "user_id", "client_message_id", "other"]),
            field(),
        ),
        0..5,
    )
    .prop_map(|fields| {
        let map: serde_json::Map<String, Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        Value::Object(map).to_string().into_bytes()
    });
    let session = world().session.to_string();
    let send = (
        prop_oneof![3 => "[a-zA-Z ]{1,40}", 1 => any::<String>()],
        prop::option::of(prop_oneof![Just(session), Just(SessionId::new().to_string()), any::<String>()]),
        prop::option::of("[a-z0-9-]{1,8}"),
    )
        .prop_map(|(message, session_id, key)| {
            let mut body = json!({ "message": message });
            if let Some(session_id) = session_id {
                body["session_id"] = json!(session_id);
            }
            if let Some(key) = key {
                body["client_message_id"] = json!(key);
            }
            body.to_string().into_bytes()
        });
    prop_oneof![
        4 => send,
        3 => object,
        1 => Just(Vec::new()),
        1 => prop::collection::vec(any::<u8>(), 0..300),
        1 => Just(b"{\"message\": \"unterminated".to_vec()),
        1 => Just(vec![b'x'; 70 * 1024]),
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    let session = world().session.to_string();
    prop_oneof![
        2 => any::<String>(),
        1 => prop::sample::select(vec!["1:0", "1:1", "0:0", "1:99999999999", "1:-1", "x:y", "18446744073709551616:0", "1:"])
            .prop_map(str::to_owned),
        1 => Just(session),
        1 => Just(OWNER.to_owned()),
    ]
}

/// Optional headers and query parameters, by name.
fn extras() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    prop::collection::vec(
        (
            prop::sample::select(vec![
                "content-type",
                "last-event-id",
                "x-user-id",
                "authorization",
                "?limit",
                "?cursor",
                "?turn",
                "?last_event_id",
                "?access_token",
            ]),
            prop_oneof![
                header_value(),
                prop::sample::select(vec![
                    "application/json",
                    "text/plain",
                    "application/json; charset=utf-8",
                    "0",
                    "-1",
                    "100",
                    "101"
                ])
                .prop_map(str::to_owned),
            ],
        ),
        0..5,
    )
}

/// The request, or `None` when the generated parts do not make an HTTP request at all (a path
/// or header value `http` itself refuses), which no handler could ever receive.
fn build(
    method: Method,
    segments: &[String],
    trailing: bool,
    body: Vec<u8>,
    extras: &[(&'static str, String)],
) -> Option<Request> {
    let mut path = format!("/{}", segments.join("/"));
    if trailing {
        path.push('/');
    }
    let mut request =
        lambda_http::http::Request::builder().method(method).uri(path).body(Body::from(body)).ok()?;
    let mut query: HashMap<String, Vec<String>> = HashMap::new();
    for (name, value) in extras {
        match name.strip_prefix('?') {
            Some(param) => query.entry(param.to_owned()).or_default().push(value.clone()),
            None => {
                let value = HeaderValue::from_str(value).ok()?;
                request.headers_mut().append(*name, value);
            }
        }
    }
    Some(request.with_query_string_parameters(query))
}

/// Every answer either succeeds or is a JSON error with a code and a message; never a 500.
fn check_error_body(status: u16, body: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(status != 500 && status < 600, "status {}", status);
    if status >= 400 {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            TestCaseError::fail(format!(
                "{status} with a non-JSON body ({e}): {:?}",
                String::from_utf8_lossy(body)
            ))
        })?;
        prop_assert!(value["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "{}", value);
        prop_assert!(value["error"]["message"].as_str().is_some(), "{}", value);
    }
    Ok(())
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ingest_answers_any_request_without_panicking_or_500(
        (method, segments) in ingest_route(),
        trailing in any::<bool>(),
        body in body(),
        extras in extras(),
    ) {
        // Deleting the shared session would leave the other cases nothing to find.
        prop_assume!(method != Method::DELETE || !segments.contains(&world().session.to_string()));
        let Some(request) = build(method, &segments, trailing, body, &extras) else { return Ok(()) };
        let response = world().runtime.block_on(ingest_app().handle(request));
        let status = response.status().as_u16();
        let body = response.body().to_vec();
        check_error_body(status, &body)?;
        if status == 429 {
            prop_assert!(response.headers().contains_key(header::RETRY_AFTER));
        }
    }

    #[test]
    fn stream_answers_any_request_without_panicking_or_500(
        method in prop_oneof![4 => Just(Method::GET), 1 => method()],
        id in prop_oneof![3 => Just(world().session.to_string()), 1 => segment()],
        prefix in prop_oneof![4 => Just(vec!["sessions".to_owned()]), 1 => prop::collection::vec(segment(), 0..3)],
        suffix in prop_oneof![4 => Just(vec!["stream".to_owned()]), 1 => prop::collection::vec(segment(), 0..3)],
        trailing in any::<bool>(),
        extras in extras(),
    ) {
        let segments: Vec<String> = prefix.into_iter().chain([id]).chain(suffix).collect();
        let Some(request) = build(method, &segments, trailing, Vec::new(), &extras) else { return Ok(()) };
        let (status, content_type, body) = world().runtime.block_on(async {
            let response = relay().handle(request).await;
            let status = response.status().as_u16();
            let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
            // A stream of the finished turn ends on its own; the bound only catches a hang.
            let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
                .await
                .expect("the stream ends")
                .expect("infallible")
                .to_bytes();
            (status, content_type, body)
        });
        check_error_body(status, &body)?;
        if status == 200 {
            prop_assert_eq!(content_type.as_ref().and_then(|v| v.to_str().ok()), Some("text/event-stream"));
            let text = String::from_utf8(body.to_vec()).expect("SSE is UTF-8");
            prop_assert!(
                text.contains("event: commit_done") || text.contains("event: error") || text.contains("reconnect"),
                "the stream ended without saying how: {}", text
            );
        }
    }
}
