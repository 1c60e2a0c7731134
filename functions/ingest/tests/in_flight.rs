//! One user's turns in flight are capped (`MAX_TURNS_IN_FLIGHT`), through the real handler
//! against the emulator, with a queue that takes every message and no generator, so every turn
//! sent stays in flight: past the cap a send is `429 turn_rate_limited` (`scope: in_flight`) that
//! changes nothing, other users are not held back, and a turn that ends gives its place back.

use chat_core::{Event, Outcome, Read, StoreOptions, UserLimits};
use chat_testkit::{LocalDynamo, StubSqs};
use lambda_http::http::Method;
use lambda_http::{Body, Request};
use serde_json::{json, Value};

const TABLE: &str = "in-flight";
const CAP: u32 = 2;

fn app(store: chat_core::Store, sqs: &StubSqs) -> ingest::App {
    let client = chat_testkit::sqs_client(&sqs.endpoint);
    let queue = chat_runtime::queue::Queue::new(client, format!("{}/000000000000/turns", sqs.endpoint));
    let limits = UserLimits { turns_in_flight: CAP, ..UserLimits::OFF };
    let budget = ingest::Budget { tokens: 500, system_prompt: None };
    ingest::App::new(store, chat_auth::Authenticator::trusted(), queue, limits, budget).unwrap()
}

fn send(user: &str, body: Value) -> Request {
    lambda_http::http::Request::builder()
        .method(Method::POST)
        .uri(format!("/sessions/{user}/messages"))
        .header("content-type", "application/json")
        .body(Body::Text(body.to_string()))
        .unwrap()
}

async fn answer(app: &ingest::App, request: Request) -> (u16, Value, Option<String>) {
    let response = app.handle(request).await;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, serde_json::from_slice(response.body()).unwrap_or(Value::Null), retry_after)
}

#[tokio::test]
async fn a_users_turns_past_the_cap_in_flight_wait_and_a_turn_that_ends_frees_its_place() {
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let sqs = StubSqs::start().await.unwrap();
    let app = app(store.clone(), &sqs);

    let mut sessions = Vec::new();
    for i in 0..CAP {
        let (status, body, _) = answer(&app, send("carol", json!({"message": format!("turn {i}")}))).await;
        assert_eq!(status, 202, "{body}");
        sessions.push(body["session_id"].as_str().unwrap().to_owned());
    }
    // A third turn, in a new session or another of hers, waits: nothing is written.
    let (status, body, retry_after) = answer(&app, send("carol", json!({"message": "one more"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("turn_rate_limited")), "{body}");
    assert_eq!(body["error"]["scope"], "in_flight");
    assert!(retry_after.is_some(), "Retry-After is set");
    let carol = chat_core::UserId::parse("carol").unwrap();
    assert_eq!(store.list_user_sessions(&carol, 10, None).await.unwrap().sessions.len(), CAP as usize);
    // Sending to a session whose turn is in flight is still a 409, not a second place.
    let again = json!({"message": "and?", "session_id": sessions[0]});
    let (status, body, _) = answer(&app, send("carol", again)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("turn_in_flight")), "{body}");
    // Another user is not held back.
    let (status, body, _) = answer(&app, send("dave", json!({"message": "hi"}))).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(sqs.messages.load(std::sync::atomic::Ordering::SeqCst), u64::from(CAP) + 1);

    // One of her turns ends (the sweeper times it out): its place is free again.
    let id = chat_core::SessionId::parse(&sessions[1]).unwrap();
    let session = store.get_session(id, Read::Consistent).await.unwrap().unwrap();
    let ended = store.end_turn(&session, Event::PickupExpired, "test", "test").await.unwrap();
    assert!(matches!(ended, Outcome::Applied(_)));
    store.close_turn_slot(&carol, id).await.unwrap();
    let (status, body, _) = answer(&app, send("carol", json!({"message": "now"}))).await;
    assert_eq!(status, 202, "{body}");
}
