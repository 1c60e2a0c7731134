//! End to end: HTTP clients against the one-origin API served by `cargo lambda watch` (the real
//! Lambda runtime API), with SQS (moto) and DynamoDB (dynoxide) behind it.

use crate::harness::{self, *};
use serde_json::{json, Value};
use std::time::Duration;

const TURN_TIMEOUT: Duration = Duration::from_secs(30);

fn api() -> &'static str {
    &app(&DEFAULT).api
}

/// The `message_end` event's data.
fn message_end(events: &[Sse]) -> Value {
    let end = events.iter().find(|e| e.event == "message_end").expect("message_end");
    serde_json::from_str(&end.data).unwrap()
}

fn session_id(answer: &Answer) -> String {
    answer.body["session_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no session_id in {}", answer.body))
        .to_owned()
}

async fn stream_turn(id: &str, turn: u64) -> Vec<Sse> {
    let (status, mut reader) =
        SseReader::open(&format!("{}/sessions/{id}/stream?turn={turn}", api()), None).await;
    assert_eq!(status, 200);
    reader.rest().await
}

/// Asserts a finished turn's events: contiguous token ids from 0, then message_end and commit_done.
fn assert_complete(events: &[Sse], id: &str, turn: u64) {
    let indexes = indexes_of(events);
    assert_eq!(indexes, (0..indexes.len() as u64).collect::<Vec<_>>(), "token ids are contiguous from 0");
    assert!(events.iter().filter(|e| e.event == "token").all(|e| e
        .id
        .as_deref()
        .unwrap()
        .starts_with(&format!("{turn}:"))));
    let tail: Vec<&str> = events.iter().rev().take(2).map(|e| e.event.as_str()).collect();
    assert_eq!(tail, vec!["commit_done", "message_end"], "events: {events:?}");
    assert_eq!(events.last().unwrap().data, id, "commit_done carries the bare session id");
}

#[tokio::test]
async fn a_full_turn_streams_tokens_and_commits_exactly_what_was_streamed() {
    let user = user();
    let answer = send_text(api(), &user, "Hello, world!\nSecond line ✓", None).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.body["status"], "ok");
    assert_eq!(answer.body["turn"], 1);
    assert_eq!(answer.body["message"], "Hello, world!\nSecond line ✓");
    let id = session_id(&answer);
    assert!(answer.body["stream_url"].as_str().unwrap().ends_with(&format!("/sessions/{id}/stream?turn=1")));

    let events = stream_turn(&id, 1).await;
    assert_complete(&events, &id, 1);
    let streamed = text_of(&events);
    assert!(
        streamed.contains("Hello, world!\nSecond line ✓"),
        "the demo reply quotes the message: {streamed}"
    );

    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    assert_eq!(session["user_id"], user);
    assert_eq!(session["turn"], 1);
    let messages = session["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(
        reply_of(&session, 1).unwrap()["content"],
        streamed,
        "law 4: what is streamed is what is saved"
    );

    // The demo model's own counts: its prompt, and a token per token event; priced by
    // MODEL_PRICES. The stored reply says the same as message_end, and the page totals it.
    let end = message_end(&events);
    let usage = &end["usage"];
    assert_eq!(usage["output_tokens"], indexes_of(&events).len() as u64, "{end}");
    assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{end}");
    assert_eq!((&usage["cache_read_tokens"], &usage["cache_write_tokens"]), (&json!(0), &json!(0)));
    let cost = (usage["input_tokens"].as_f64().unwrap() * DEMO_PRICE.0
        + usage["output_tokens"].as_f64().unwrap() * DEMO_PRICE.1)
        / 1e6;
    assert!((end["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12, "{end}");
    let reply = reply_of(&session, 1).unwrap();
    assert_eq!((&reply["usage"], &reply["cost_usd"]), (usage, &end["cost_usd"]));
    assert!(messages[0].get("usage").is_none(), "a user message has no usage");
    let page = request(reqwest::Method::GET, format!("{}/sessions/{id}", api()), None).await;
    let mut total = usage.clone();
    total["cost_usd"] = end["cost_usd"].clone();
    assert_eq!(page.body["page_usage"], total, "one reply: the page's total is its usage");
}

#[tokio::test]
async fn a_follow_up_turn_continues_the_session() {
    let user = user();
    let first = send_text(api(), &user, "first", None).await;
    let id = session_id(&first);
    stream_turn(&id, 1).await;
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let second = send_text(api(), &user, "second", Some(&id)).await;
    assert_eq!(second.status, 202, "{}", second.body);
    assert_eq!(second.body["turn"], 2);
    // Without ?turn the stream follows the latest turn.
    let (_, mut reader) = SseReader::open(&format!("{}/sessions/{id}/stream", api()), None).await;
    let events = reader.rest().await;
    assert_complete(&events, &id, 2);
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let roles: Vec<&str> =
        session["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(reply_of(&session, 2).unwrap()["content"], text_of(&events));
    // The user's session list has it, newest first, through both paths.
    for path in [format!("/users/{user}/sessions"), format!("/sessions/user/{user}")] {
        let list = request(reqwest::Method::GET, format!("{}{path}", api()), None).await;
        assert_eq!(list.status, 200);
        assert_eq!(list.body["sessions"][0]["id"], id.as_str());
    }
}

#[tokio::test]
async fn twelve_concurrent_sends_to_an_idle_session_get_one_202_and_eleven_409s() {
    let user = user();
    let id = session_id(&send_text(api(), &user, "warm up", None).await);
    stream_turn(&id, 1).await;
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let sends = (0..12).map(|i| {
        let (user, id) = (user.clone(), id.clone());
        async move { send_text(api(), &user, &format!("racer {i}"), Some(&id)).await }
    });
    let answers = futures::future::join_all(sends).await;
    let accepted = answers.iter().filter(|a| a.status == 202).count();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 409).collect();
    assert_eq!(
        (accepted, refused.len()),
        (1, 11),
        "{:?}",
        answers.iter().map(|a| &a.body).collect::<Vec<_>>()
    );
    for answer in refused {
        assert_eq!(answer.body["error"]["code"], "turn_in_flight");
        assert!(answer.body["error"]["state"].is_string());
    }
    stream_turn(&id, 2).await;
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    assert_eq!(session["messages"].as_array().unwrap().len(), 4, "one turn, one reply");
}

#[tokio::test]
async fn a_send_while_generating_gets_409_naming_the_state() {
    let user = user();
    let id = session_id(&send_text(api(), &user, "long one [[reply-tokens:400]]", None).await);
    let again = send_text(api(), &user, "too soon", Some(&id)).await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(again.body["error"]["code"], "turn_in_flight");
    let state = again.body["error"]["state"].as_str().unwrap();
    assert!(["user_writing", "user_committed", "ai_generating"].contains(&state), "{state}");
    stream_turn(&id, 1).await;
}

#[tokio::test]
async fn a_client_that_drops_after_three_tokens_resumes_with_no_gap_and_no_duplicate() {
    let user = user();
    let id = session_id(&send_text(api(), &user, "resume me", None).await);
    let url = format!("{}/sessions/{id}/stream?turn=1", api());
    let (_, mut first) = SseReader::open(&url, None).await;
    let mut before = Vec::new();
    while before.len() < 3 {
        let event = first.next().await.expect("tokens before the drop");
        if event.event == "token" {
            before.push(event);
        }
    }
    assert_eq!(first.retry_hint(), Some(1000), "the stream tells clients how soon to reconnect");
    drop(first);
    let last_id = before.last().unwrap().id.clone().unwrap();
    assert_eq!(last_id, "1:2");
    let (status, mut second) = SseReader::open(&url, Some(&last_id)).await;
    assert_eq!(status, 200);
    let after = second.rest().await;
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_complete(&all, &id, 1);
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    assert_eq!(reply_of(&session, 1).unwrap()["content"], text_of(&all));

    // Resuming by query parameter, after the commit, from the middle.
    let (_, mut third) = SseReader::open(&format!("{url}&last_event_id=1:20"), None).await;
    let tail = third.rest().await;
    assert_eq!(indexes_of(&tail).first(), Some(&21));
    assert!(text_of(&all).ends_with(&text_of(&tail)));
}

#[tokio::test]
async fn a_late_join_after_the_commit_replays_the_turn_and_closes() {
    let user = user();
    let id = session_id(&send_text(api(), &user, "late", None).await);
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let events = stream_turn(&id, 1).await;
    assert_complete(&events, &id, 1);
    assert_eq!(reply_of(&session, 1).unwrap()["content"], text_of(&events));
}

#[tokio::test]
async fn cancel_stops_generation_and_commits_the_partial_reply_as_streamed() {
    let user = user();
    let id = session_id(&send_text(api(), &user, "please stop me [[reply-tokens:400]]", None).await);
    let (_, mut reader) = SseReader::open(&format!("{}/sessions/{id}/stream?turn=1", api()), None).await;
    let mut events = Vec::new();
    while events.iter().filter(|e: &&Sse| e.event == "token").count() < 3 {
        events.push(reader.next().await.expect("tokens"));
    }
    let cancel = request(reqwest::Method::POST, format!("{}/sessions/{id}/cancel", api()), None).await;
    assert_eq!(cancel.status, 202, "{}", cancel.body);
    events.extend(reader.rest().await);
    let end = message_end(&events);
    assert_eq!(end["stopped"], true);
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let reply = reply_of(&session, 1).unwrap();
    assert_eq!(reply["stopped"], true);
    // Cut before the demo model reported its count: the counts known at the stop (the prompt
    // and what was streamed, by o200k_base), in message_end and stored alike.
    assert!(end["usage"]["output_tokens"].as_u64().unwrap() > 0, "{end}");
    assert!(end["usage"]["input_tokens"].as_u64().unwrap() > 0, "{end}");
    assert_eq!((&reply["usage"], &reply["cost_usd"]), (&end["usage"], &end["cost_usd"]));
    assert_eq!(reply["content"], text_of(&events), "the partial reply is what was streamed");
    assert!(indexes_of(&events).len() < 400, "generation stopped early");
    // Cancelling again: nothing in flight.
    let again = request(reqwest::Method::POST, format!("{}/sessions/{id}/cancel", api()), None).await;
    assert_eq!(again.status, 409);
    let next = send_text(api(), &user, "next", Some(&id)).await;
    assert_eq!(next.status, 202, "the next send is accepted: {}", next.body);
    stream_turn(&id, 2).await;
}

#[tokio::test]
async fn a_duplicate_sqs_delivery_after_the_commit_changes_nothing() {
    let info = app(&DEFAULT);
    let user = user();
    let id = session_id(&send_text(api(), &user, "once", None).await);
    let before = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let sqs = chat_local::sqs_client(&info.sqs_endpoint);
    for _ in 0..3 {
        sqs.send_message()
            .queue_url(&info.queue_url)
            .message_body(json!({"session_id": id, "turn": 1}).to_string())
            .send()
            .await
            .unwrap();
    }
    // Wait until the event source mapping has delivered and deleted them.
    let deadline = std::time::Instant::now() + TURN_TIMEOUT;
    loop {
        let attrs = sqs
            .get_queue_attributes()
            .queue_url(&info.queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
            .send()
            .await
            .unwrap();
        let count = |name| {
            attrs.attributes().and_then(|a| a.get(&name)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(1)
        };
        if count(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages) == 0
            && count(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible) == 0
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the queue did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = get_session(api(), &id).await.body["session"].clone();
    assert_eq!(after["messages"], before["messages"], "still one reply");
    assert_eq!(after["updated_at"], before["updated_at"], "no transition happened");
}

#[tokio::test]
async fn repeating_a_first_message_with_its_client_message_id_returns_the_original_session() {
    let user = user();
    let body = json!({"message": "exactly once", "client_message_id": "retry-1"});
    let first = send(api(), &user, body.clone()).await;
    let again = send(api(), &user, body.clone()).await;
    assert_eq!((first.status, again.status), (202, 202));
    assert_eq!(first.body, again.body, "the original answer");
    let id = session_id(&first);
    stream_turn(&id, 1).await;
    let later = send(api(), &user, body).await;
    assert_eq!(later.body, first.body);
    // The same key for another message, or another session, is refused, not answered.
    for reused in [
        json!({"message": "something else", "client_message_id": "retry-1"}),
        json!({"message": "exactly once", "client_message_id": "retry-1", "session_id": uuid::Uuid::new_v4().to_string()}),
    ] {
        let answer = send(api(), &user, reused).await;
        assert_eq!(
            (answer.status, answer.body["error"]["code"].as_str()),
            (409, Some("idempotency_key_mismatch")),
            "{}",
            answer.body
        );
    }
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    assert_eq!(session["messages"].as_array().unwrap().len(), 2);
    let list = request(reqwest::Method::GET, format!("{}/users/{user}/sessions", api()), None).await;
    assert_eq!(list.body["sessions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_turn_whose_model_fails_ends_in_error_and_the_stream_says_so() {
    let user = user();
    let id = session_id(&send_text(api(), &user, "break [[fail-after:5]]", None).await);
    let events = stream_turn(&id, 1).await;
    let last = events.last().expect("events");
    assert_eq!(last.event, "error", "{events:?}");
    let data: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(data["code"], "error");
    assert_eq!(data["state"], "error");
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "error").await;
    assert!(reply_of(&session, 1).is_none(), "a failed turn presents no reply as complete");
    assert_eq!(send_text(api(), &user, "try again", Some(&id)).await.status, 202);
    stream_turn(&id, 2).await;
}

#[tokio::test]
async fn a_turn_no_generator_picks_up_is_redriven_then_ends_in_timeout() {
    // Every delivery of this turn is acknowledged unclaimed (a test directive), as if lost.
    let user = user();
    let id = session_id(&send_text(api(), &user, "lost [[lose-delivery]]", None).await);
    let (_, mut reader) = SseReader::open(&format!("{}/sessions/{id}/stream?turn=1", api()), None).await;
    // PICKUP_TIMEOUT_MS=4000 and MAX_REDRIVES=3 in the test stack: about 16 s in all.
    let session = wait_for_state(api(), &id, Duration::from_secs(45), |s| s == "timeout").await;
    assert!(reply_of(&session, 1).is_none());

    // The open stream is told, with the reason.
    let events = reader.rest().await;
    let last = events.last().expect("events");
    assert_eq!(last.event, "error", "{events:?}");
    let data: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(data["code"], "timeout");
    assert_eq!(data["message"], "no generator picked the turn up in time");

    // Exactly MAX_REDRIVES re-drives, then the timeout, in the audit trail.
    let info = app(&DEFAULT);
    let store = chat_core::Store::new(
        chat_local::dynamodb_client(&info.dynamodb_endpoint),
        info.table.as_str(),
        Default::default(),
    );
    let stored = store
        .get_session(chat_core::SessionId::parse(&id).unwrap(), chat_core::Read::Consistent)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.redrives, 3);
    let transitions = store.transitions(stored.id).await.unwrap();
    let last = transitions.last().unwrap();
    assert_eq!((last.event, last.to), (chat_core::Event::PickupExpired, chat_core::State::Timeout));
    assert_eq!(last.by, "sweeper");

    // The session takes a new message.
    assert_eq!(send_text(api(), &user, "again, normally", Some(&id)).await.status, 202);
    assert_complete(&stream_turn(&id, 2).await, &id, 2);
}

#[tokio::test]
async fn delete_removes_the_session() {
    let user = user();
    let id = session_id(&send_text(api(), &user, "forget me", None).await);
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let deleted = request(reqwest::Method::DELETE, format!("{}/sessions/{id}", api()), None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(get_session(api(), &id).await.status, 404);
    let gone = request(reqwest::Method::DELETE, format!("{}/sessions/{id}", api()), None).await;
    assert_eq!(gone.status, 404);
    let (status, _) = SseReader::open(&format!("{}/sessions/{id}/stream", api()), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let user = user();
    let id = session_id(&send_text(api(), &user, "baseline", None).await);
    let settled = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let post = |body: String| {
        let user = user.clone();
        async move {
            request(reqwest::Method::POST, format!("{}/sessions/{user}/messages", api()), Some(body)).await
        }
    };
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".to_owned(), 400, "malformed_json"),
        ("[1, 2]".to_owned(), 400, "malformed_json"),
        ("".to_owned(), 400, "missing_body"),
        (json!({"session_id": id}).to_string(), 400, "missing_message"),
        (json!({"message": "", "session_id": id}).to_string(), 400, "empty_message"),
        (json!({"message": "  \n\t", "session_id": id}).to_string(), 400, "empty_message"),
        (json!({"message": 42, "session_id": id}).to_string(), 400, "invalid_message"),
        (
            json!({"message": "hi", "session_id": id, "user_id": "someone-else"}).to_string(),
            400,
            "user_mismatch",
        ),
        (
            json!({"message": "hi", "session_id": uuid::Uuid::new_v4().to_string()}).to_string(),
            404,
            "session_not_found",
        ),
        (json!({"message": "hi", "session_id": "not-a-uuid"}).to_string(), 404, "session_not_found"),
        (json!({"message": "x".repeat(70 * 1024), "session_id": id}).to_string(), 413, "body_too_large"),
        (
            json!({"message": "hi", "session_id": id, "client_message_id": "bad key!"}).to_string(),
            400,
            "invalid_client_message_id",
        ),
    ];
    for (body, status, code) in cases {
        let answer = post(body).await;
        assert_eq!(
            (answer.status, answer.body["error"]["code"].as_str()),
            (status, Some(code)),
            "{}",
            answer.body
        );
        assert!(answer.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Another user's session is not found.
    let other = send_text(api(), &harness::user(), "hi", Some(&id)).await;
    assert_eq!((other.status, other.body["error"]["code"].as_str()), (404, Some("session_not_found")));
    // Routes and methods.
    let unknown = request(reqwest::Method::GET, format!("{}/nowhere", api()), None).await;
    assert_eq!((unknown.status, unknown.body["error"]["code"].as_str()), (404, Some("route_not_found")));
    let wrong = request(reqwest::Method::PUT, format!("{}/sessions/{id}", api()), None).await;
    assert_eq!(wrong.status, 405);
    let wrong = request(reqwest::Method::GET, format!("{}/sessions/{user}/messages", api()), None).await;
    assert_eq!(wrong.status, 405);
    let missing = get_session(api(), &uuid::Uuid::new_v4().to_string()).await;
    assert_eq!(missing.status, 404);
    let bad_limit =
        request(reqwest::Method::GET, format!("{}/users/{user}/sessions?limit=0", api()), None).await;
    assert_eq!(bad_limit.status, 400);
    let bad_cursor =
        request(reqwest::Method::GET, format!("{}/users/{user}/sessions?cursor=zzz", api()), None).await;
    assert_eq!(bad_cursor.status, 400);
    let (status, _) = SseReader::open(&format!("{}/sessions/{id}/stream", api()), Some("garbage")).await;
    assert_eq!(status, 400);
    let (status, _) = SseReader::open(&format!("{}/sessions/{id}/stream?turn=9", api()), None).await;
    assert_eq!(status, 404);
    let health = request(reqwest::Method::GET, format!("{}/health", api()), None).await;
    assert_eq!(health.status, 200);
    // Each function is also reachable on its own Function URL path.
    let direct =
        request(reqwest::Method::GET, format!("{}/lambda-url/ingest/sessions/{id}", api()), None).await;
    assert_eq!(direct.status, 200);
    // None of it changed the session.
    let after = get_session(api(), &id).await.body["session"].clone();
    assert_eq!(after, settled);
}

#[tokio::test]
async fn a_percent_encoded_user_in_the_path_is_decoded() {
    let user = format!("{}@example.com", user());
    let encoded = user.replace('@', "%40");
    let answer = send(api(), &encoded, json!({"message": "hello"})).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = session_id(&answer);
    let session = get_session(api(), &id).await;
    assert_eq!(session.body["session"]["user_id"], json!(user));
    let listed = request(reqwest::Method::GET, format!("{}/users/{encoded}/sessions", api()), None).await;
    assert_eq!(listed.body["sessions"][0]["id"], json!(id), "{}", listed.body);
    let slash = send(api(), "a%2Fb", json!({"message": "hello"})).await;
    assert_eq!((slash.status, slash.body["error"]["code"].as_str()), (400, Some("invalid_user_id")));
}

#[tokio::test]
async fn a_last_event_id_of_turn_zero_or_past_any_reply_is_a_400_not_a_replay() {
    let id = session_id(&send_text(api(), &user(), "resume me", None).await);
    for bad in ["0:3", "1:18446744073709551615", "1:99999999999"] {
        let (status, _) = SseReader::open(&format!("{}/sessions/{id}/stream", api()), Some(bad)).await;
        assert_eq!(status, 400, "Last-Event-ID {bad}");
        let query = format!("{}/sessions/{id}/stream?last_event_id={bad}", api());
        let answer = request(reqwest::Method::GET, query, None).await;
        assert_eq!(
            (answer.status, answer.body["error"]["code"].as_str()),
            (400, Some("invalid_last_event_id"))
        );
    }
    stream_turn(&id, 1).await;
}

#[tokio::test]
async fn a_request_for_another_host_name_is_a_421_before_anything_runs() {
    let port = api().rsplit(':').next().unwrap().to_owned();
    // A page on a name that resolves to loopback (DNS rebinding) is same-origin with the API.
    for host in [format!("evil.test:{port}"), "127.0.0.1".to_owned(), format!("127.0.0.1.evil.test:{port}")] {
        let response = http().get(format!("{}/health", api())).header("host", &host).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 421, "Host: {host}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "misdirected_request");
    }
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("LOCALHOST:{port}")] {
        let response = http().get(format!("{}/health", api())).header("host", &host).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "Host: {host}");
    }
}

#[tokio::test]
async fn a_body_not_declared_as_json_is_a_415() {
    let url = format!("{}/sessions/{}/messages", api(), user());
    for declared in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let response = http()
            .post(&url)
            .header("content-type", declared)
            .body(r#"{"message": "hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 415, "{declared}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unsupported_media_type");
    }
    // No type at all (a fetch with a Blob body needs no preflight either): 415, nothing stored.
    let user = user();
    let response = http()
        .post(format!("{}/sessions/{user}/messages", api()))
        .body(r#"{"message": "hi"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 415, "no content-type");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_media_type");
    assert!(body["error"]["message"].as_str().unwrap().contains("application/json"), "{body}");
    let listed = request(reqwest::Method::GET, format!("{}/users/{user}/sessions", api()), None).await;
    assert_eq!(listed.body["sessions"], json!([]), "nothing was stored");
    let response = http()
        .post(&url)
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"message": "hi"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
}

#[tokio::test]
async fn a_long_history_is_read_a_page_of_turns_at_a_time_newest_first() {
    let user = user();
    let id = session_id(&send_text(api(), &user, "one [[reply-tokens:6]]", None).await);
    stream_turn(&id, 1).await;
    for (turn, text) in [(2, "two [[reply-tokens:6]]"), (3, "three [[reply-tokens:6]]")] {
        assert_eq!(send_text(api(), &user, text, Some(&id)).await.status, 202);
        stream_turn(&id, turn).await;
    }
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let page = |query: String| request(reqwest::Method::GET, format!("{}/sessions/{id}{query}", api()), None);
    let whole = page(String::new()).await;
    assert_eq!(whole.body["session"]["messages"].as_array().unwrap().len(), 6);
    assert_eq!(whole.body["next_cursor"], Value::Null);
    let mut cursor: Option<String> = None;
    let mut seen = Vec::new();
    loop {
        let query = match &cursor {
            None => "?limit=1".to_owned(),
            Some(c) => format!("?limit=1&cursor={c}"),
        };
        let answer = page(query).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let messages = answer.body["session"]["messages"].as_array().unwrap().clone();
        assert_eq!(messages.len(), 2, "one whole turn per page: {}", answer.body);
        seen.extend(messages.iter().map(|m| m["content"].as_str().unwrap().to_owned()));
        match answer.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6, "three pages, newest first");
    assert!(
        seen[0].starts_with("three") && seen[2].starts_with("two") && seen[4].starts_with("one"),
        "{seen:?}"
    );
    for bad in ["?limit=0", "?limit=101", "?limit=x", "?cursor=0", "?cursor=abc"] {
        let answer = page(bad.to_owned()).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
    }
}

#[tokio::test]
async fn only_pages_from_allowed_origins_may_call_the_api() {
    let own = api().to_owned();
    let url = format!("{own}/sessions/{}/messages", user());
    let preflight = |origin: &str| {
        http()
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type, authorization")
            .send()
    };
    let allowed = preflight(&own).await.unwrap();
    assert_eq!(allowed.status().as_u16(), 204);
    assert_eq!(allowed.headers()["access-control-allow-origin"], own.as_str(), "the origin, never *");
    assert!(allowed.headers()["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    let refused = preflight("https://evil.example").await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    assert!(refused.headers().get("access-control-allow-origin").is_none());
    // Without a preflight (a form post) the request is refused before any function runs.
    let form = http()
        .post(&url)
        .header("origin", "https://evil.example")
        .header("content-type", "text/plain")
        .body(r#"{"message": "csrf"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 403);
    let body: Value = form.json().await.unwrap();
    assert_eq!(body["error"]["code"], "origin_not_allowed");
    let ok = http()
        .post(&url)
        .header("origin", &own)
        .header("content-type", "application/json")
        .body(r#"{"message": "from the page"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    assert_eq!(ok.headers()["access-control-allow-origin"], own.as_str());
}

#[tokio::test]
async fn a_tool_step_streams_as_tool_call_and_tool_result_events_and_resumes_after_them() {
    let user = user();
    // The demo model's test directive: it asks the calculator, then replies with the answer.
    let answer = send_text(api(), &user, "What is [[calc:6*7]]?", None).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = session_id(&answer);
    let events = stream_turn(&id, 1).await;
    let entries: Vec<&Sse> = events.iter().filter(|e| e.id.is_some()).collect();
    let kinds: Vec<&str> = entries.iter().map(|e| e.event.as_str()).take(3).collect();
    assert_eq!(kinds, ["token", "tool_call", "tool_result"], "{events:?}");
    // One index space for tokens and tool events: contiguous from 0.
    let indexes: Vec<u64> = entries
        .iter()
        .map(|e| e.id.as_deref().unwrap().split_once(':').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(indexes, (0..entries.len() as u64).collect::<Vec<_>>());
    let call: Value = serde_json::from_str(&entries[1].data).unwrap();
    assert_eq!(
        (call["name"].as_str(), call["arguments"].as_str()),
        (Some("calculator"), Some(r#"{"expression":"6*7"}"#))
    );
    let result: Value = serde_json::from_str(&entries[2].data).unwrap();
    assert_eq!(
        (&result["id"], &result["content"], &result["is_error"]),
        (&call["id"], &json!("42"), &json!(false))
    );
    assert!(text_of(&events).contains("The calculator says: 42."), "{}", text_of(&events));
    let tail: Vec<&str> = events.iter().rev().take(2).map(|e| e.event.as_str()).collect();
    assert_eq!(tail, ["commit_done", "message_end"]);

    // Resuming right after the call replays the result, then the rest, nothing twice.
    let (status, mut reader) =
        SseReader::open(&format!("{}/sessions/{id}/stream?turn=1", api()), entries[1].id.as_deref()).await;
    assert_eq!(status, 200);
    let resumed = reader.rest().await;
    let resumed_entries: Vec<&Sse> = resumed.iter().filter(|e| e.id.is_some()).collect();
    assert_eq!(resumed_entries[0].event, "tool_result");
    assert_eq!(resumed_entries.len(), entries.len() - 2);

    // The reply is the text the token events carried, with the tool use beside it.
    let session = get_session(api(), &id).await.body["session"].clone();
    let reply = reply_of(&session, 1).expect("a reply");
    assert_eq!(reply["content"].as_str().unwrap(), text_of(&events));
    assert_eq!(reply["tool_calls"][0]["name"], "calculator");
    assert_eq!(reply["tool_calls"][0]["result"], "42");

    // Two model calls, summed: the demo model counts a token per piece it sends, so the tool
    // step is its text token and its call, and the answer its token events.
    let end = message_end(&events);
    let tokens = events.iter().filter(|e| e.event == "token").count() as u64;
    assert_eq!(end["usage"]["output_tokens"], tokens + 1, "{end}");
    assert_eq!((&reply["usage"], &reply["cost_usd"]), (&end["usage"], &end["cost_usd"]));
}
