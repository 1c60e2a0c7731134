//! A user's feed (`GET /users/{user}/events`) through the real handler against the emulator:
//! what happens to the user's sessions arrives as events within a second, in order, once; a
//! client resumes after the last id it has; another user's feed is refused; and an idle feed
//! costs half a read unit a poll.

use chat_core::{
    NewMessage, Outcome, Reply, SendOutcome, SessionId, Store, StoreOptions, TitleBy, Turn, UserId,
};
use chat_testkit::sse_reader::{SseEvent, SseStream};
use chat_testkit::LocalDynamo;
use futures::StreamExt;
use lambda_http::{Body, RequestExt};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const TABLE: &str = "feed";
const POLL: Duration = Duration::from_millis(200);

fn relay(store: &Store) -> stream::Relay {
    let settings = stream::RelaySettings {
        poll_fast: Duration::from_millis(20),
        poll_slow: Duration::from_millis(100),
        keepalive: Duration::from_secs(5),
        max_duration: Duration::from_secs(60),
        retry: Duration::from_secs(1),
        max_open_streams: 2,
    };
    stream::Relay::new(store.clone(), settings, chat_auth::Authenticator::trusted()).with_feed_poll(POLL)
}

fn feed_request(path_user: &str, as_user: &str, last_event_id: Option<&str>) -> lambda_http::Request {
    let mut request = lambda_http::http::Request::builder()
        .uri(format!("/users/{path_user}/events"))
        .header("x-user-id", as_user);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    request.body(Body::Empty).unwrap().with_query_string_parameters(HashMap::<String, Vec<String>>::new())
}

type Feed = SseStream<std::convert::Infallible>;

async fn open(relay: &stream::Relay, request: lambda_http::Request) -> Feed {
    let response = relay.handle(request).await;
    assert_eq!(response.status(), 200);
    SseStream::from_bytes(http_body_util::BodyDataStream::new(response.into_body()).boxed())
}

/// The next event that is not a comment or a retry hint, within `within`.
async fn next_event(events: &mut Feed, within: Duration) -> SseEvent {
    tokio::time::timeout(within, async {
        loop {
            let event = events.next().await.unwrap().expect("the feed stays open");
            if !event.event.is_empty() && event.event != "message" {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event within {within:?}"))
}

/// Sends `text`, then answers it: the turn starts and ends.
async fn turn(store: &Store, user: &UserId, session: Option<SessionId>, text: &str) -> (SessionId, Turn) {
    let message = NewMessage { user, session, content: text, client_message_id: None, by: "t" };
    let SendOutcome::Accepted(ticket) = store.send_message(message).await.unwrap() else { panic!() };
    let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "t").await.unwrap() else { panic!() };
    let claim = store.claim_generation(ticket.session_id, ticket.turn, "g", Duration::from_secs(60), 3).await;
    let chat_core::ClaimOutcome::Claimed(lease) = claim.unwrap() else { panic!() };
    assert!(matches!(store.commit_reply(&lease, &Reply::new("ok")).await.unwrap(), Outcome::Applied(_)));
    (ticket.session_id, ticket.turn)
}

fn data(event: &SseEvent) -> Value {
    serde_json::from_str(&event.data).unwrap()
}

#[tokio::test]
async fn a_users_other_tabs_hear_of_each_change_within_a_second_and_resume_after_the_last_id() {
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let relay = relay(&store);
    let alice = UserId::parse("alice").unwrap();
    // What happened before the tab connected is what it loaded: not sent again.
    turn(&store, &alice, None, "before").await;
    let mut feed = open(&relay, feed_request("alice", "alice", None)).await;
    tokio::time::sleep(POLL * 2).await;

    let started = Instant::now();
    let (session, _) = turn(&store, &alice, None, "a new chat").await;
    let second = Duration::from_secs(1);
    let created = next_event(&mut feed, second).await;
    assert_eq!(created.event, "session_created");
    assert_eq!(data(&created)["session_id"], session.to_string());
    assert_eq!(data(&created)["title"], "a new chat");
    let ended = next_event(&mut feed, second).await;
    assert_eq!((ended.event.as_str(), data(&ended)["state"].as_str()), ("turn_ended", Some("ai_committed")));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

    turn(&store, &alice, Some(session), "again").await;
    let again = next_event(&mut feed, second).await;
    assert_eq!((again.event.as_str(), data(&again)["turn"].as_u64()), ("turn_started", Some(2)));
    assert_eq!(data(&again)["event"], "user_send");
    let last_seen = next_event(&mut feed, second).await;
    assert_eq!(last_seen.event, "turn_ended");
    drop(feed);

    // Away: a rename and a delete. Back, after the last id it has: exactly those, in order.
    let renamed = store.set_title(session, Some(&alice), "Renamed", TitleBy::User).await.unwrap();
    assert_eq!(renamed, Outcome::Applied(()));
    store.delete_session(session, Some(&alice)).await.unwrap();
    let mut resumed = open(&relay, feed_request("alice", "alice", last_seen.id.as_deref())).await;
    let mut back = [next_event(&mut resumed, second).await, next_event(&mut resumed, second).await];
    // Two writes in one millisecond have no order between them; ids still sort by time.
    back.sort_by(|a, b| a.event.cmp(&b.event));
    let [deleted, rename] = back;
    assert_eq!(
        (rename.event.as_str(), data(&rename)["title"].as_str()),
        ("session_renamed", Some("Renamed"))
    );
    assert_eq!(deleted.event, "session_deleted");
    assert!(
        last_seen.id < rename.id && last_seen.id < deleted.id && rename.id != deleted.id,
        "ids sort by time"
    );
    let nothing = tokio::time::timeout(POLL * 4, next_event(&mut resumed, second)).await;
    assert!(nothing.is_err(), "nothing twice: {nothing:?}");
    // Another user's changes are not in it.
    let bob = UserId::parse("bob").unwrap();
    turn(&store, &bob, None, "bob's").await;
    let quiet = tokio::time::timeout(POLL * 4, next_event(&mut resumed, second)).await;
    assert!(quiet.is_err(), "bob's chat is not alice's news");
}

#[tokio::test]
async fn another_users_feed_is_refused_a_bad_id_is_a_400_and_an_idle_feed_costs_half_a_unit_a_poll() {
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let relay = relay(&store);
    let answer = relay.handle(feed_request("alice", "mallory", None)).await;
    assert_eq!(answer.status(), 403);
    let answer = relay.handle(feed_request("alice", "alice", Some("1:2"))).await;
    assert_eq!(answer.status(), 400);
    let answer = relay.handle(feed_request("not%20a%20user%21", "alice", None)).await;
    assert_eq!(answer.status(), 400);

    // An idle feed: every poll reads nothing, at half a read unit (eventually consistent).
    let reads = store.capacity().read_units;
    let feed = open(&relay, feed_request("alice", "alice", None)).await;
    tokio::time::sleep(POLL * 10 + POLL / 2).await;
    let spent = store.capacity().read_units - reads;
    let polls = spent / 0.5;
    // At most one poll per interval (the bound on an idle feed's cost), and it does poll.
    assert!((5.0..=12.0).contains(&polls), "{spent} read units: {polls} polls of half a unit in 2.1 s");
    assert_eq!((spent * 2.0).fract(), 0.0, "whole half-units only: {spent}");
    // The open-stream limit counts feeds: with this one and another open, a third is refused.
    let _another = open(&relay, feed_request("alice", "alice", None)).await;
    assert_eq!(relay.handle(feed_request("alice", "alice", None)).await.status(), 429);
    drop(feed);
}

#[tokio::test]
async fn feeds_hold_only_their_share_of_a_users_streams() {
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let relay = relay(&store).with_open_feeds(1);
    let _tab = open(&relay, feed_request("carol", "carol", None)).await;
    let refused = relay.handle(feed_request("carol", "carol", None)).await;
    assert_eq!(refused.status(), 429);
    let body = http_body_util::BodyExt::collect(refused.into_body()).await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("feeds open"), "{}", String::from_utf8_lossy(&body));
    // The refused feed gave back the stream slot it did not use: a turn's stream still opens.
    let message = NewMessage {
        user: &UserId::parse("carol").unwrap(),
        session: None,
        content: "hi",
        client_message_id: None,
        by: "t",
    };
    let SendOutcome::Accepted(ticket) = store.send_message(message).await.unwrap() else { panic!() };
    let request = lambda_http::http::Request::builder()
        .uri(format!("/sessions/{}/stream", ticket.session_id))
        .header("x-user-id", "carol")
        .body(Body::Empty)
        .unwrap()
        .with_query_string_parameters(HashMap::<String, Vec<String>>::new());
    assert_eq!(relay.handle(request).await.status(), 200);
}
