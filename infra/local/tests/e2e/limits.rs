//! Per-user limits, end to end through the local stack: the turn rate, the session cap, open
//! streams (per user and per turn), the daily token budget, the prompt budget at ingest and the
//! reply size cap. Each over-limit answer is a 429
//! (or 413) with a JSON error and, for 429, `Retry-After`; it changes nothing, and other users
//! are not affected.

use crate::harness::{self, *};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

const TURNS_PER_MINUTE: u64 = 4;
const MAX_SESSIONS: u64 = 3;
const MAX_STREAMS: usize = 2;
/// Tokens a user's turns may use a day: a few short turns fit, a long reply or two do not.
const DAILY_TOKENS: u64 = 1000;

const LIMITS: Config = Config {
    name: "limits",
    configure: |settings, _| {
        let env = [
            ("TURNS_PER_MINUTE", TURNS_PER_MINUTE.to_string()),
            ("MAX_SESSIONS_PER_USER", MAX_SESSIONS.to_string()),
            ("MAX_OPEN_STREAMS", MAX_STREAMS.to_string()),
            ("MAX_STREAMS_PER_TURN", "1".to_owned()),
            ("DAILY_TOKEN_BUDGET", DAILY_TOKENS.to_string()),
            // 300 tokens of prompt, 293 of them for the message with no system prompt.
            ("MEMORY_MAX_TOKENS", "300".to_owned()),
            ("REPLY_MAX_BYTES", "3000".to_owned()),
        ];
        settings.function_env.extend(env.into_iter().map(|(k, v)| (k.to_owned(), v)));
    },
};

fn api() -> &'static str {
    &app(&LIMITS).api
}

/// A request's status, `Retry-After` and JSON body.
async fn call(method: Method, url: String, body: Option<Value>) -> (u16, Option<u64>, Value) {
    let mut req = http().request(method, url).header("content-type", "application/json");
    if let Some(body) = body {
        req = req.body(body.to_string());
    }
    let response = req.send().await.expect("request");
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
    let text = response.text().await.unwrap();
    (status, retry_after, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn post(user: &str, body: Value) -> (u16, Option<u64>, Value) {
    call(Method::POST, format!("{}/sessions/{user}/messages", api()), Some(body)).await
}

async fn sessions_of(user: &str) -> Vec<Value> {
    let list = request(Method::GET, format!("{}/users/{user}/sessions", api()), None).await;
    assert_eq!(list.status, 200, "{}", list.body);
    list.body["sessions"].as_array().unwrap().clone()
}

async fn wait_idle(id: &str) -> Value {
    wait_for_state(api(), id, Duration::from_secs(30), |s| s == "ai_committed" || s == "idle").await
}

#[tokio::test]
async fn turns_beyond_the_rate_and_sessions_beyond_the_cap_get_429_and_change_nothing() {
    let user = user();
    let mut ids = Vec::new();
    for i in 0..MAX_SESSIONS {
        let (status, _, body) = post(&user, json!({"message": format!("session {i}")})).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["session_id"].as_str().unwrap().to_owned());
    }
    // One session too many: refused, and the turn it did not start is not counted.
    let (status, retry_after, body) = post(&user, json!({"message": "one more session"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("session_limit")), "{body}");
    assert!(retry_after.is_some_and(|s| s >= 1), "Retry-After is set");
    assert_eq!(sessions_of(&user).await.len() as u64, MAX_SESSIONS);

    // A new turn in an existing session is allowed: it is the 4th turn of the minute.
    wait_idle(&ids[0]).await;
    let (status, _, body) = post(&user, json!({"message": "again", "session_id": ids[0]})).await;
    assert_eq!(status, 202, "{body}");
    // The 5th is over the rate: a bucket of 4 refills one turn every 15 s.
    wait_idle(&ids[1]).await;
    let (status, retry_after, body) = post(&user, json!({"message": "too soon", "session_id": ids[1]})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("turn_rate_limited")), "{body}");
    let wait = retry_after.expect("Retry-After");
    assert!((1..=15).contains(&wait), "Retry-After {wait}");
    assert_eq!(body["error"]["retry_after"], json!(wait));
    let session = get_session(api(), &ids[1]).await.body["session"].clone();
    assert_eq!(session["turn"], 1, "the refused send started no turn: {session}");

    // Deleting a session frees a place for a new one (once the rate allows it).
    let (status, _, body) = call(Method::DELETE, format!("{}/sessions/{}", api(), ids[2]), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sessions_of(&user).await.len() as u64, MAX_SESSIONS - 1);

    // Another user is unaffected by all of this.
    let (status, _, body) = post(&harness::user(), json!({"message": "hello"})).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn a_message_over_the_prompt_budget_is_413_before_anything_is_stored() {
    let user = user();
    let (status, retry_after, body) = post(&user, json!({"message": "word ".repeat(400)})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("message_too_long")), "{body}");
    assert_eq!(body["error"]["limit"], 293);
    assert!(body["error"]["tokens"].as_u64().unwrap() > 293);
    assert!(retry_after.is_none());
    assert!(sessions_of(&user).await.is_empty(), "nothing was stored");
    // A message that fits is accepted and answered.
    let (status, _, body) = post(&user, json!({"message": "word ".repeat(250)})).await;
    assert_eq!(status, 202, "{body}");
    let session = wait_idle(body["session_id"].as_str().unwrap()).await;
    assert!(reply_of(&session, 1).is_some());
}

#[tokio::test]
async fn streams_beyond_the_turns_or_the_users_limit_get_429_until_one_closes() {
    let user = user();
    // Three turns of 150 tokens at 20 ms, in three sessions: about 3 s of streaming each.
    let mut urls = Vec::new();
    for i in 0..3 {
        let (status, _, body) =
            post(&user, json!({"message": format!("[[reply-tokens:150]] talk a while {i}")})).await;
        assert_eq!(status, 202, "{body}");
        urls.push(format!("{}/sessions/{}/stream", api(), body["session_id"].as_str().unwrap()));
    }
    let (status, first) = SseReader::open(&urls[0], None).await;
    assert_eq!(status, 200);
    // One stream per turn here (MAX_STREAMS_PER_TURN=1): a second on the same turn is refused,
    // so one turn cannot hold all of its user's streams.
    let (status, retry_after, body) = call(Method::GET, urls[0].clone(), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("too_many_streams")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("this turn"), "{body}");
    assert!(retry_after.is_some_and(|s| s >= 1));
    let (status, second) = SseReader::open(&urls[1], None).await;
    assert_eq!(status, 200, "another turn has its own slot");
    let open = vec![first, second];
    assert_eq!(open.len(), MAX_STREAMS);
    // The user's limit: a third stream, on a third turn, is refused.
    let (status, retry_after, body) = call(Method::GET, urls[2].clone(), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("too_many_streams")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("you have 2 streams open"), "{body}");
    assert!(retry_after.is_some_and(|s| s >= 1));
    // Another user's streams are their own.
    let (other_status, _, other) = post(&harness::user(), json!({"message": "hi"})).await;
    assert_eq!(other_status, 202, "{other}");
    let other_url = format!("{}/sessions/{}/stream", api(), other["session_id"].as_str().unwrap());
    let (status, mut other_reader) = SseReader::open(&other_url, None).await;
    assert_eq!(status, 200);
    other_reader.rest().await;
    // The open streams run to the end of the turn; then their slots are free again.
    for mut reader in open {
        let events = reader.rest().await;
        assert_eq!(events.last().map(|e| e.event.as_str()), Some("commit_done"));
    }
    let (status, mut reader) = SseReader::open(&urls[0], None).await;
    assert_eq!(status, 200, "a slot is free once a stream has ended");
    let events = reader.rest().await;
    assert_eq!(indexes_of(&events), (0..150).collect::<Vec<u64>>(), "a full replay");
}

#[tokio::test]
async fn a_user_past_the_daily_token_budget_gets_429_until_midnight_utc_and_nothing_changes() {
    let user = user();
    // Long replies (to the 3000-byte cap: several hundred tokens each) use the budget up.
    let (status, _, body) = post(&user, json!({"message": "[[reply-tokens:2000]] spend"})).await;
    assert_eq!(status, 202, "{body}");
    let id = body["session_id"].as_str().unwrap().to_owned();
    let mut refused = None;
    for turn in 2..=3 {
        wait_idle(&id).await;
        let (status, retry_after, body) =
            post(&user, json!({"message": "[[reply-tokens:2000]] more", "session_id": id})).await;
        if status == 429 {
            refused = Some((turn, retry_after, body));
            break;
        }
        assert_eq!(status, 202, "{body}");
    }
    let (turn, retry_after, body) = refused.expect("the budget ran out within three long turns");
    assert_eq!(body["error"]["code"], "daily_budget_exhausted", "{body}");
    assert_eq!(body["error"]["limit"], DAILY_TOKENS);
    assert!(body["error"]["used"].as_u64().unwrap() >= DAILY_TOKENS, "{body}");
    let resets_at = body["error"]["resets_at"].as_str().unwrap();
    assert!(resets_at.ends_with("T00:00:00.000Z"), "midnight UTC: {resets_at}");
    let wait = retry_after.expect("Retry-After");
    assert!((1..=86_400).contains(&wait), "Retry-After {wait}");
    assert_eq!(body["error"]["retry_after"], json!(wait));
    let session = wait_idle(&id).await;
    assert_eq!(session["turn"], turn - 1, "the refused send started no turn: {session}");
    // A new session is refused too; another user is not.
    let (status, _, body) = post(&user, json!({"message": "elsewhere"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("daily_budget_exhausted")), "{body}");
    assert_eq!(sessions_of(&user).await.len(), 1);
    let (status, _, body) = post(&harness::user(), json!({"message": "hello"})).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn a_reply_over_the_size_cap_ends_at_it_marked_reply_limit() {
    let user = user();
    let (status, _, body) = post(&user, json!({"message": "[[reply-tokens:2000]] a very long answer"})).await;
    assert_eq!(status, 202, "{body}");
    let id = body["session_id"].as_str().unwrap().to_owned();
    let (status, mut reader) = SseReader::open(&format!("{}/sessions/{id}/stream", api()), None).await;
    assert_eq!(status, 200);
    let events = reader.rest().await;
    let end = events.iter().find(|e| e.event == "message_end").expect("message_end");
    let mut end: Value = serde_json::from_str(&end.data).unwrap();
    // The call was cut at the cap, before the model reported its count: the counts known then.
    let usage = end.as_object_mut().unwrap().remove("usage").expect("usage");
    assert!(usage["output_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(end, json!({"turn": 1, "stopped": true, "reason": "reply_limit"}), "no price: no cost_usd");
    let session = wait_idle(&id).await;
    let reply = reply_of(&session, 1).expect("a committed reply");
    assert_eq!(reply["stop_reason"], "reply_limit");
    assert_eq!(reply["stopped"], true);
    let content = reply["content"].as_str().unwrap();
    assert!(content.len() <= 3000 && content.len() > 2900, "{} bytes", content.len());
    assert_eq!(text_of(&events), content, "what was streamed is what was saved");
}
