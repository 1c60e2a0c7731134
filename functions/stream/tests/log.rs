//! A turn's text log (`GET /sessions/{id}/turns/{turn}/log`) through the real handler against the
//! emulator, by the read side of the Durable Streams protocol: catch-up with offsets that sort as
//! strings and `ETag`/`304`, a long-poll that answers as soon as text is written or `204` at its
//! timeout, `HEAD`, closure once the turn ends, and no writes.

use chat_core::{
    AppendOutcome, ClaimOutcome, Lease, NewMessage, Outcome, Reply, SendOutcome, Store, StoreOptions, UserId,
};
use chat_testkit::LocalDynamo;
use http_body_util::BodyExt;
use lambda_http::http::{Method, StatusCode};
use lambda_http::{Body, RequestExt};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const TABLE: &str = "log";
const WAIT: Duration = Duration::from_millis(1500);

fn relay(store: &Store) -> stream::Relay {
    let settings = stream::RelaySettings {
        poll_fast: Duration::from_millis(20),
        poll_slow: Duration::from_millis(100),
        keepalive: Duration::from_secs(5),
        max_duration: Duration::from_secs(60),
        retry: Duration::from_secs(1),
        max_open_streams: 0,
    };
    stream::Relay::new(store.clone(), settings, chat_auth::Authenticator::trusted()).with_long_poll_wait(WAIT)
}

/// A session of `owner` whose first turn is generating: its lease.
async fn generating(store: &Store, owner: &UserId) -> Lease {
    let message = NewMessage { user: owner, session: None, content: "hi", client_message_id: None, by: "t" };
    let SendOutcome::Accepted(ticket) = store.send_message(message).await.unwrap() else { panic!() };
    let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "t").await.unwrap() else { panic!() };
    let claim = store.claim_generation(ticket.session_id, ticket.turn, "g", Duration::from_secs(60), 3).await;
    let ClaimOutcome::Claimed(lease) = claim.unwrap() else { panic!() };
    lease
}

async fn append(store: &Store, lease: &Lease, seq: u32, start: u64, tokens: &[&str]) {
    let tokens: Vec<String> = tokens.iter().map(|t| (*t).to_owned()).collect();
    let appended = store.append_chunk(lease, seq, start, &tokens).await.unwrap();
    assert!(matches!(appended, AppendOutcome::Appended), "{appended:?}");
}

struct Answer {
    status: StatusCode,
    headers: lambda_http::http::HeaderMap,
    body: String,
}

async fn read(
    relay: &stream::Relay,
    method: Method,
    lease: &Lease,
    query: &[(&str, &str)],
    etag: Option<&str>,
) -> Answer {
    let mut request = lambda_http::http::Request::builder()
        .method(method)
        .uri(format!("/sessions/{}/turns/{}/log", lease.session_id, lease.turn))
        .header("x-user-id", lease.user.as_str());
    if let Some(etag) = etag {
        request = request.header("if-none-match", etag);
    }
    let params: HashMap<String, Vec<String>> =
        query.iter().map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()])).collect();
    let request = request.body(Body::Empty).unwrap().with_query_string_parameters(params);
    let response = relay.handle(request).await;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Answer { status: parts.status, headers: parts.headers, body: String::from_utf8(bytes.to_vec()).unwrap() }
}

fn header<'a>(answer: &'a Answer, name: &str) -> Option<&'a str> {
    answer.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_turns_text_reads_by_offset_long_polls_until_written_and_closes_when_the_turn_ends() {
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let relay = relay(&store);
    let lease = generating(&store, &UserId::parse("alice").unwrap()).await;
    append(&store, &lease, 0, 0, &["Hello", ", "]).await;

    // Catch-up from the start: the text so far, up to date, open; the same again is a 304.
    let first = read(&relay, Method::GET, &lease, &[("offset", "-1")], None).await;
    assert_eq!((first.status, first.body.as_str()), (StatusCode::OK, "Hello, "));
    assert_eq!(header(&first, "stream-next-offset"), Some("0000000000000002"));
    assert_eq!(header(&first, "stream-up-to-date"), Some("true"));
    assert_eq!(header(&first, "stream-closed"), None);
    assert_eq!(header(&first, "content-type"), Some("text/plain; charset=utf-8"));
    let etag = header(&first, "etag").unwrap().to_owned();
    let again = read(&relay, Method::GET, &lease, &[("offset", "-1")], Some(&etag)).await;
    assert_eq!((again.status, again.body.as_str()), (StatusCode::NOT_MODIFIED, ""));

    // A long-poll at the tail waits for the next write and answers with it at once.
    let writer = {
        let (store, lease) = (store.clone(), lease.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            append(&store, &lease, 1, 2, &["world"]).await;
        })
    };
    let asked = Instant::now();
    let polled =
        read(&relay, Method::GET, &lease, &[("offset", "0000000000000002"), ("live", "long-poll")], None)
            .await;
    writer.await.unwrap();
    assert_eq!((polled.status, polled.body.as_str()), (StatusCode::OK, "world"));
    assert!(asked.elapsed() < WAIT, "answered when written, not at the timeout: {:?}", asked.elapsed());
    assert!(header(&polled, "stream-cursor").is_some());
    assert_eq!(header(&polled, "stream-next-offset"), Some("0000000000000003"));

    // Nothing more: 204 at the timeout, up to date, with a cursor that moves on.
    let asked = Instant::now();
    let cursor = header(&polled, "stream-cursor").unwrap().to_owned();
    let idle = read(
        &relay,
        Method::GET,
        &lease,
        &[("offset", "0000000000000003"), ("live", "long-poll"), ("cursor", &cursor)],
        None,
    )
    .await;
    assert_eq!(idle.status, StatusCode::NO_CONTENT);
    assert!(asked.elapsed() >= WAIT, "{:?}", asked.elapsed());
    assert_eq!(header(&idle, "stream-up-to-date"), Some("true"));
    assert_eq!(header(&idle, "stream-next-offset"), Some("0000000000000003"));
    assert!(header(&idle, "stream-cursor").unwrap().parse::<u64>().unwrap() > cursor.parse::<u64>().unwrap());

    // The turn ends: the tail says closed at once, HEAD too, and the ETag changed with it.
    assert!(matches!(
        store.commit_reply(&lease, &Reply::new("Hello, world")).await.unwrap(),
        Outcome::Applied(_)
    ));
    let asked = Instant::now();
    let eof =
        read(&relay, Method::GET, &lease, &[("offset", "0000000000000003"), ("live", "long-poll")], None)
            .await;
    assert_eq!((eof.status, header(&eof, "stream-closed")), (StatusCode::NO_CONTENT, Some("true")));
    assert!(asked.elapsed() < WAIT);
    let whole = read(&relay, Method::GET, &lease, &[("offset", "-1")], Some(&etag)).await;
    assert_eq!((whole.status, whole.body.as_str()), (StatusCode::OK, "Hello, world"));
    assert_eq!(header(&whole, "stream-closed"), Some("true"));
    let head = read(&relay, Method::HEAD, &lease, &[], None).await;
    assert_eq!((head.status, head.body.as_str()), (StatusCode::OK, ""));
    assert_eq!(header(&head, "stream-next-offset"), Some("0000000000000003"));
    assert_eq!(header(&head, "stream-closed"), Some("true"));

    // Writes are ours alone; offsets and modes are checked.
    for method in [Method::PUT, Method::POST, Method::DELETE] {
        let refused = read(&relay, method.clone(), &lease, &[], None).await;
        assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(header(&refused, "allow"), Some("GET, HEAD"));
    }
    for (query, code) in [
        (vec![("offset", "12")], "invalid_offset"),
        (vec![("offset", "0000000000000009")], "invalid_offset"),
        (vec![("offset", "-1"), ("live", "websocket")], "invalid_live"),
    ] {
        let refused = read(&relay, Method::GET, &lease, &query, None).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{query:?}");
        assert!(refused.body.contains(code), "{}", refused.body);
    }
    let other = chat_core::Lease { user: UserId::parse("mallory").unwrap(), ..lease.clone() };
    assert_eq!(read(&relay, Method::GET, &other, &[], None).await.status, StatusCode::NOT_FOUND);
}

/// The events of an SSE read of the log, until it ends or `within` passes.
async fn sse_events(
    relay: &stream::Relay,
    lease: &Lease,
    from: &str,
    within: Duration,
) -> Vec<(String, String)> {
    use futures::StreamExt;
    let params = HashMap::from([
        ("offset".to_owned(), vec![from.to_owned()]),
        ("live".to_owned(), vec!["sse".to_owned()]),
    ]);
    let request = lambda_http::http::Request::builder()
        .uri(format!("/sessions/{}/turns/{}/log", lease.session_id, lease.turn))
        .header("x-user-id", lease.user.as_str())
        .body(Body::Empty)
        .unwrap()
        .with_query_string_parameters(params);
    let response = relay.handle(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut events: chat_testkit::sse_reader::SseStream<std::convert::Infallible> =
        chat_testkit::sse_reader::SseStream::from_bytes(
            http_body_util::BodyDataStream::new(response.into_body()).boxed(),
        );
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(within, async {
        while let Some(event) = events.next().await.unwrap() {
            seen.push((event.event, event.data));
        }
    })
    .await;
    seen
}

#[tokio::test]
async fn an_sse_reader_is_told_the_log_closed_even_when_no_text_follows_and_a_log_without_its_tokens_is_gone()
{
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let relay = relay(&store);
    let lease = generating(&store, &UserId::parse("bob").unwrap()).await;
    append(&store, &lease, 0, 0, &["All ", "of it."]).await;
    // The reader has all the text; the turn is then committed with nothing more written.
    let committer = {
        let (store, lease) = (store.clone(), lease.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let reply = Reply::new("All of it.");
            assert!(matches!(store.commit_reply(&lease, &reply).await.unwrap(), Outcome::Applied(_)));
        })
    };
    let started = Instant::now();
    let events = sse_events(&relay, &lease, "-1", Duration::from_secs(5)).await;
    committer.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed when the turn ended: {:?}",
        started.elapsed()
    );
    let (data, controls): (Vec<_>, Vec<_>) = events.iter().partition(|(name, _)| name == "data");
    assert_eq!(data.iter().map(|(_, d)| d.as_str()).collect::<String>(), "All of it.");
    let last: serde_json::Value = serde_json::from_str(&controls.last().unwrap().1).unwrap();
    assert_eq!(last["streamClosed"], true, "{events:?}");
    assert_eq!(last["streamNextOffset"], "0000000000000002");

    // A reply whose tokens are not all kept (a fork's copy; chunks past their days) is not
    // served as if whole.
    let other = generating(&store, &UserId::parse("bob").unwrap()).await;
    append(&store, &other, 0, 0, &["Only the start"]).await;
    assert!(matches!(
        store.commit_reply(&other, &Reply::new("Only the start, and more")).await.unwrap(),
        Outcome::Applied(_)
    ));
    let gone = read(&relay, Method::GET, &other, &[("offset", "-1")], None).await;
    assert_eq!(gone.status, StatusCode::GONE, "{}", gone.body);
    assert!(gone.body.contains("log_gone"));
}

#[tokio::test]
async fn a_long_poll_that_waits_past_a_second_holds_one_of_the_users_stream_slots() {
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let settings = stream::RelaySettings {
        poll_fast: Duration::from_millis(20),
        poll_slow: Duration::from_millis(100),
        keepalive: Duration::from_secs(5),
        max_duration: Duration::from_secs(60),
        retry: Duration::from_secs(1),
        max_open_streams: 1,
    };
    let relay = stream::Relay::new(store.clone(), settings, chat_auth::Authenticator::trusted())
        .with_long_poll_wait(Duration::from_secs(3));
    let lease = generating(&store, &UserId::parse("carol").unwrap()).await;
    let query = [("offset", "0000000000000000"), ("live", "long-poll")];
    // Two idle long-polls at once with one slot: the first waits it out, the second is refused
    // once its free second is over.
    let (first, second) = tokio::join!(read(&relay, Method::GET, &lease, &query, None), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        read(&relay, Method::GET, &lease, &query, None).await
    });
    let mut statuses = [first.status, second.status];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::NO_CONTENT, StatusCode::TOO_MANY_REQUESTS]);
    // The slot is given back: the next long-poll waits again.
    assert_eq!(read(&relay, Method::GET, &lease, &query, None).await.status, StatusCode::NO_CONTENT);
}
