//! A stream lasts no longer than the token it was opened with: once the token's `exp` passes,
//! the relay ends the stream with an `error` event `token_expired`, rather than relaying to a
//! caller who is no longer signed in until the stream's own time limit.

use chat_auth::dev_issuer::DevIssuer;
use chat_auth::{AuthConfig, Authenticator, JwtSettings, Mode};
use chat_core::{ClaimOutcome, NewMessage, Outcome, SendOutcome, SessionId, StoreOptions, UserId};
use chat_testkit::sse_reader::{SseEvent, SseStream};
use chat_testkit::LocalDynamo;
use futures::StreamExt;
use lambda_http::{Body, RequestExt};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const TABLE: &str = "expiry";
const AUDIENCE: &str = "chat-app";

/// A JWKS endpoint on loopback publishing `issuer`'s key.
async fn jwks_server(issuer: &DevIssuer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().unwrap());
    let jwks = issuer.jwks();
    let app = axum::Router::new()
        .route("/.well-known/jwks.json", axum::routing::get(move || async move { axum::Json(jwks) }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A session of `owner` whose first turn is generating and has written nothing yet.
async fn generating_session(store: &chat_core::Store, owner: &UserId) -> SessionId {
    let message = NewMessage { user: owner, session: None, content: "hi", client_message_id: None, by: "t" };
    let SendOutcome::Accepted(ticket) = store.send_message(message).await.unwrap() else { panic!() };
    let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "t").await.unwrap() else { panic!() };
    let claim = store
        .claim_generation(ticket.session_id, ticket.turn, "gen", Duration::from_secs(60), 3)
        .await
        .unwrap();
    assert!(matches!(claim, ClaimOutcome::Claimed(_)), "{claim:?}");
    ticket.session_id
}

#[tokio::test]
async fn a_stream_ends_with_token_expired_when_its_token_does() {
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let issuer = DevIssuer::new("https://issuer.test", AUDIENCE);
    let auth = Authenticator::new(AuthConfig {
        mode: Mode::Jwt,
        jwt: Some(JwtSettings {
            issuer: "https://issuer.test".to_owned(),
            audiences: vec![AUDIENCE.to_owned()],
            jwks_url: jwks_server(&issuer).await,
            leeway: Duration::ZERO,
            min_refresh: Duration::from_secs(30),
            max_age: Duration::from_secs(3600),
        }),
        iam_allowed_callers: Vec::new(),
    })
    .unwrap();
    let settings = stream::RelaySettings {
        poll_fast: Duration::from_millis(20),
        poll_slow: Duration::from_millis(100),
        keepalive: Duration::from_millis(500),
        max_duration: Duration::from_secs(60),
        retry: Duration::from_secs(1),
        max_open_streams: 0,
    };
    let relay = stream::Relay::new(store.clone(), settings, auth);
    let alice = UserId::parse("alice").unwrap();
    let session = generating_session(&store, &alice).await;

    // A token that lapses in two seconds, on a turn that will not end by then.
    let token = issuer.token("alice", Duration::from_secs(2));
    let request = lambda_http::http::Request::builder()
        .uri(format!("/sessions/{session}/stream"))
        .body(Body::Empty)
        .unwrap()
        .with_query_string_parameters(HashMap::from([("access_token".to_owned(), vec![token])]));
    let opened = Instant::now();
    let response = relay.handle(request).await;
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyDataStream::new(response.into_body()).boxed();
    let mut events = SseStream::from_bytes(body);
    let mut seen: Vec<SseEvent> = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.next().await.unwrap() {
            seen.push(event);
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its token by 8 s: {seen:?}");
    let elapsed = opened.elapsed();
    let last = seen.last().expect("an event");
    assert_eq!(last.event, "error", "{seen:?}");
    let data: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(data["code"], "token_expired", "{data}");
    assert_eq!((data["state"].as_str(), data["turn"].as_u64()), (Some("ai_generating"), Some(1)), "{data}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "ended after {elapsed:?}"
    );
}
