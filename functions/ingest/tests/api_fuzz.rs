//! Property tests over ingest's request parsing: arbitrary methods, paths (percent-encoded or
//! broken), queries, headers and bodies go through the real handler, against a real DynamoDB
//! emulator. Whatever arrives, the answer is never a panic and never a 500: a 2xx, or a 4xx/503
//! with a JSON error naming a code. The run is bounded (`PROPTEST_CASES`, default 256) so it fits
//! in `make test`.

use chat_core::SessionId;
use chat_testkit::requests::{build, check_error_body, config, extras, method, segment, Vocabulary, World};
use lambda_http::http::{header, Method};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::OnceLock;

const TABLE: &str = "fuzz";
const OWNER: &str = "fuzz-owner";

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| World::start(TABLE, OWNER))
}

fn app() -> &'static ingest::App {
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

/// An ingest request line: mostly the routes of the contract, with the method they take and
/// arbitrary ids in them; sometimes any method on anything at all.
fn ingest_route(v: &Vocabulary) -> impl Strategy<Value = (Method, Vec<String>)> {
    let user = prop_oneof![
        3 => Just(v.owner.clone()),
        1 => "[a-z0-9._@-]{1,12}",
        1 => segment(v),
    ];
    let session = v.session.clone();
    let id = prop_oneof![2 => Just(session), 1 => Just(SessionId::new().to_string()), 1 => segment(v)];
    let route = |method: Method, parts: Vec<String>| (method, parts);
    let shared = v.session.clone();
    let routes = prop_oneof![
        5 => user.clone().prop_map(move |u| route(Method::POST, vec!["sessions".into(), u, "messages".into()])),
        2 => user.clone().prop_map(move |u| route(Method::GET, vec!["users".into(), u, "sessions".into()])),
        1 => user.prop_map(move |u| route(Method::GET, vec!["sessions".into(), "user".into(), u])),
        2 => id.clone().prop_map(move |i| route(Method::POST, vec!["sessions".into(), i, "cancel".into()])),
        2 => id.clone().prop_map(move |i| route(Method::GET, vec!["sessions".into(), i])),
        // Never the shared session: the other cases need it.
        1 => prop_oneof![Just(SessionId::new().to_string()), segment(v)]
            .prop_filter("not the shared session", move |i| *i != shared)
            .prop_map(move |i| route(Method::DELETE, vec!["sessions".into(), i])),
        1 => Just(route(Method::GET, vec!["health".into()])),
    ];
    prop_oneof![
        6 => routes,
        1 => (method(), prop::collection::vec(segment(v), 0..5)),
        1 => (method(), ingest_any_path(v)),
    ]
}

/// A path of the contract's words and ids in any order.
fn ingest_any_path(v: &Vocabulary) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(segment(v), 1..4).prop_map(|mut parts| {
        parts.insert(0, "sessions".to_owned());
        parts
    })
}

/// A JSON value of a field: the right type, the wrong type, empty, huge.
fn field(v: &Vocabulary) -> impl Strategy<Value = Value> {
    let session = v.session.clone();
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

fn body(v: &Vocabulary) -> impl Strategy<Value = Vec<u8>> {
    let object = prop::collection::vec(
        (
            prop::sample::select(vec!["message", "session_id", "user_id", "client_message_id", "other"]),
            field(v),
        ),
        0..5,
    )
    .prop_map(|fields| {
        let map: serde_json::Map<String, Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        Value::Object(map).to_string().into_bytes()
    });
    let session = v.session.clone();
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

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ingest_answers_any_request_without_panicking_or_500(
        (method, segments) in ingest_route(&world().vocabulary),
        trailing in any::<bool>(),
        body in body(&world().vocabulary),
        extras in extras(&world().vocabulary),
    ) {
        // Deleting the shared session would leave the other cases nothing to find.
        prop_assume!(method != Method::DELETE || !segments.contains(&world().vocabulary.session));
        let Some(request) = build(method, &segments, trailing, body, &extras) else { return Ok(()) };
        let response = world().runtime.block_on(app().handle(request));
        let status = response.status().as_u16();
        let body = response.body().to_vec();
        check_error_body(status, &body)?;
        if status == 429 {
            prop_assert!(response.headers().contains_key(header::RETRY_AFTER));
        }
    }
}
