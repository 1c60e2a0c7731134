//! Arbitrary HTTP requests for the handlers' property tests: the contract's words and ids in
//! any order, percent-encoded or broken; methods, headers, query parameters; and the check every
//! answer must pass (never a 500; every error a JSON code and message).

use crate::LocalDynamo;
use chat_core::{
    ClaimOutcome, NewMessage, Outcome, Reply, SendOutcome, SessionId, Store, StoreOptions, UserId,
};
use lambda_http::http::{HeaderValue, Method};
use lambda_http::{Body, Request, RequestExt};
use proptest::prelude::*;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// The ids worth hitting: a real session and its owner.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    pub session: String,
    pub owner: String,
}

/// What a handler's property test shares between its cases: one emulator holding one session
/// whose first turn is committed (so a stream of it ends at once), and the runtime they live on.
pub struct World {
    pub runtime: tokio::runtime::Runtime,
    pub store: Store,
    pub vocabulary: Vocabulary,
    _dynamo: LocalDynamo,
}

impl World {
    /// Starts the emulator with `table` and a committed session of `owner`.
    pub fn start(table: &str, owner: &str) -> World {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let (dynamo, store, session) = runtime.block_on(async {
            let dynamo = LocalDynamo::start(0, table).await.expect("emulator");
            let store = dynamo.store(table, StoreOptions::default());
            let session = committed_session(&store, &UserId::parse(owner).expect("a user id")).await;
            (dynamo, store, session)
        });
        let vocabulary = Vocabulary { session: session.to_string(), owner: owner.to_owned() };
        World { runtime, store, vocabulary, _dynamo: dynamo }
    }
}

/// A session of `owner` whose first turn is committed, so a stream of it ends at once.
async fn committed_session(store: &Store, owner: &UserId) -> SessionId {
    let message =
        NewMessage { user: owner, session: None, content: "hi", client_message_id: None, by: "fuzz" };
    let SendOutcome::Accepted(ticket) = store.send_message(message).await.unwrap() else {
        panic!("not accepted")
    };
    let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "fuzz").await.unwrap() else {
        panic!()
    };
    let claim = store
        .claim_generation(ticket.session_id, ticket.turn, "fuzz-gen", Duration::from_secs(30), 3)
        .await
        .unwrap();
    let ClaimOutcome::Claimed(lease) = claim else { panic!("{claim:?}") };
    store.append_chunk(&lease, 0, 0, &["Hello".to_owned(), " there".to_owned()]).await.unwrap();
    store.commit_reply(&lease, &Reply::new("Hello there")).await.unwrap();
    ticket.session_id
}

/// A path segment: route words, real and random ids, and arbitrary text, percent-encoded
/// whole, in part, or not at all (raw `%`, bad escapes, invalid UTF-8 once decoded).
pub fn segment(v: &Vocabulary) -> impl Strategy<Value = String> {
    let session = v.session.clone();
    prop_oneof![
        3 => prop::sample::select(vec!["sessions", "users", "user", "messages", "cancel", "stream", "health", ""])
            .prop_map(str::to_owned),
        2 => Just(session),
        1 => Just(v.owner.clone()),
        1 => Just(SessionId::new().to_string()),
        2 => any::<String>().prop_map(|s| percent_encode(&s)),
        1 => prop::sample::select(vec!["%", "%Z", "%ZZ", "%FF%FE", "%C3%28", "%00", "%2F", "..", "a%20b"])
            .prop_map(str::to_owned),
    ]
}

/// Every byte but the unreserved ones as `%XX`.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Any method, the contract's and others.
pub fn method() -> impl Strategy<Value = Method> {
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

/// A header or query value: arbitrary text, event ids good and bad, the session and the owner.
pub fn header_value(v: &Vocabulary) -> impl Strategy<Value = String> {
    let session = v.session.clone();
    prop_oneof![
        2 => any::<String>(),
        1 => prop::sample::select(vec!["1:0", "1:1", "0:0", "1:99999999999", "1:-1", "x:y", "18446744073709551616:0", "1:"])
            .prop_map(str::to_owned),
        1 => Just(session),
        1 => Just(v.owner.clone()),
    ]
}

/// Optional headers and query parameters, by name.
pub fn extras(v: &Vocabulary) -> impl Strategy<Value = Vec<(&'static str, String)>> {
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
                header_value(v),
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
pub fn build(
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
pub fn check_error_body(status: u16, body: &[u8]) -> Result<(), TestCaseError> {
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

/// `PROPTEST_CASES` cases (256 by default), no failure files.
pub fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}
