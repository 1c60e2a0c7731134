//! Regenerate, edit and fork over HTTP, through the whole stack: each starts like a send (202
//! and a stream, or 201 and a session), one at a time, and a redone turn stays in the history as
//! an earlier version.

use crate::harness::{self, *};
use serde_json::{json, Value};
use std::time::Duration;

const TURN_TIMEOUT: Duration = Duration::from_secs(30);

fn api() -> &'static str {
    &app(&DEFAULT).api
}

async fn post(path: String, body: Value) -> Answer {
    request(reqwest::Method::POST, format!("{}{path}", api()), Some(body.to_string())).await
}

async fn stream_turn(id: &str, turn: u64) -> Vec<Sse> {
    let (status, mut reader) =
        SseReader::open(&format!("{}/sessions/{id}/stream?turn={turn}", api()), None).await;
    assert_eq!(status, 200);
    reader.rest().await
}

fn message_of<'a>(session: &'a Value, turn: u64, role: &str) -> &'a Value {
    session["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"].as_str().is_some_and(|id| id.ends_with(&format!(":{turn}:{role}"))))
        .unwrap_or_else(|| panic!("no {role} message of turn {turn} in {session}"))
}

#[tokio::test]
async fn a_regenerate_streams_a_new_reply_resumably_and_keeps_the_earlier_one_as_a_version() {
    let user = user();
    let first = send_text(api(), &user, "tell me about the sea", None).await;
    let id = first.body["session_id"].as_str().unwrap().to_owned();
    let earlier = text_of(&stream_turn(&id, 1).await);
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;

    // Six tabs press regenerate at once: one new turn, the rest are told a turn is in flight.
    let presses = (0..6).map(|_| post(format!("/sessions/{id}/regenerate"), json!({"turn": 1})));
    let answers = futures::future::join_all(presses).await;
    let won: Vec<&Answer> = answers.iter().filter(|a| a.status == 202).collect();
    assert_eq!(won.len(), 1, "{:?}", answers.iter().map(|a| (a.status, &a.body)).collect::<Vec<_>>());
    assert!(answers
        .iter()
        .filter(|a| a.status != 202)
        .all(|a| a.status == 409 && a.body["error"]["code"] == "turn_in_flight"));
    let answer = &won[0].body;
    assert_eq!((answer["turn"].as_u64(), answer["revises"].as_u64()), (Some(2), Some(1)));
    assert_eq!(answer["message"], "tell me about the sea");
    assert!(answer["stream_url"].as_str().unwrap().ends_with(&format!("/sessions/{id}/stream?turn=2")));

    // The new reply streams, and a client that drops resumes it with no gap and no duplicate.
    let url = format!("{}/sessions/{id}/stream?turn=2", api());
    let (_, mut reader) = SseReader::open(&url, None).await;
    let mut before = Vec::new();
    while before.len() < 3 {
        let event = reader.next().await.expect("tokens before the drop");
        if event.event == "token" {
            before.push(event);
        }
    }
    drop(reader);
    let (status, mut resumed) = SseReader::open(&url, before.last().unwrap().id.as_deref()).await;
    assert_eq!(status, 200);
    let mut all = before;
    all.extend(resumed.rest().await);
    assert_eq!(indexes_of(&all), (0..indexes_of(&all).len() as u64).collect::<Vec<_>>());
    assert_eq!(all.last().unwrap().event, "commit_done");

    // Both versions are kept: turn 1 superseded by turn 2, which revises it; each streams as it was.
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    assert_eq!(message_of(&session, 2, "assistant")["content"], text_of(&all));
    assert_eq!(message_of(&session, 1, "assistant")["content"], earlier.as_str());
    for role in ["user", "assistant"] {
        assert_eq!(message_of(&session, 1, role)["superseded_by"], 2, "{role}");
        assert!(message_of(&session, 2, role).get("superseded_by").is_none());
    }
    assert_eq!(message_of(&session, 2, "user")["revises"], 1);
    assert_eq!(text_of(&stream_turn(&id, 1).await), earlier);

    // A client that still sees turn 1 as the last is told to reload; a repeat of a key is the
    // same turn.
    let stale = post(format!("/sessions/{id}/regenerate"), json!({"turn": 1})).await;
    assert_eq!((stale.status, stale.body["error"]["code"].as_str()), (409, Some("not_last_turn")));
    let keyed = json!({"client_message_id": format!("regen-{id}")});
    let once = post(format!("/sessions/{id}/regenerate"), keyed.clone()).await;
    let twice = post(format!("/sessions/{id}/regenerate"), keyed).await;
    assert_eq!((once.status, twice.status), (202, 202), "{} {}", once.body, twice.body);
    assert_eq!(once.body, twice.body);
    assert_eq!(once.body["turn"], 3);
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
}

#[tokio::test]
async fn an_edit_answers_the_new_message_and_a_fork_starts_a_session_from_a_turn() {
    let user = user();
    let first = send_text(api(), &user, "the colour of the sky", None).await;
    let id = first.body["session_id"].as_str().unwrap().to_owned();
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;

    // A fork needs no turn in flight; an edit's message is checked like a send's.
    let edit = post(format!("/sessions/{id}/edit"), json!({"message": "the colour of the sea"})).await;
    assert_eq!((edit.status, edit.body["revises"].as_u64()), (202, Some(1)), "{}", edit.body);
    let busy = post(format!("/sessions/{id}/fork"), json!({})).await;
    assert_eq!((busy.status, busy.body["error"]["code"].as_str()), (409, Some("turn_in_flight")));
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    // The demo model quotes the message it answers: the edited one.
    let reply = message_of(&session, 2, "assistant")["content"].as_str().unwrap().to_owned();
    assert!(reply.contains("the colour of the sea"), "{reply}");
    let blank = post(format!("/sessions/{id}/edit"), json!({"message": "  "})).await;
    assert_eq!((blank.status, blank.body["error"]["code"].as_str()), (400, Some("empty_message")));
    let bad_turn = post(format!("/sessions/{id}/regenerate"), json!({"turn": 0})).await;
    assert_eq!((bad_turn.status, bad_turn.body["error"]["code"].as_str()), (400, Some("invalid_turn")));
    let get = harness::http().get(format!("{}/sessions/{id}/fork", api())).send().await.unwrap();
    assert_eq!(get.status(), 405);

    // Fork at turn 1: a new session with turn 1's exchange, idle, that goes on by itself.
    let past = post(format!("/sessions/{id}/fork"), json!({"turn": 9})).await;
    assert_eq!((past.status, past.body["error"]["code"].as_str()), (404, Some("turn_not_found")));
    let fork = post(format!("/sessions/{id}/fork"), json!({"turn": 1})).await;
    assert_eq!(fork.status, 201, "{}", fork.body);
    assert_eq!(fork.body["forked_from"], json!({"session_id": id, "turn": 1}));
    let fork_id = fork.body["session_id"].as_str().unwrap().to_owned();
    assert_ne!(fork_id, id);
    let forked = get_session(api(), &fork_id).await.body["session"].clone();
    assert_eq!((forked["state"].as_str(), forked["turn"].as_u64()), (Some("idle"), Some(1)));
    assert_eq!(forked["forked_from"], json!({"session_id": id, "turn": 1}));
    let texts = |s: &Value| -> Vec<Value> {
        s["messages"].as_array().unwrap().iter().map(|m| m["content"].clone()).collect()
    };
    let source = get_session(api(), &id).await.body["session"].clone();
    assert_eq!(texts(&forked), texts(&source)[..2].to_vec());
    let next = send_text(api(), &user, "and at night?", Some(&fork_id)).await;
    assert_eq!((next.status, next.body["turn"].as_u64()), (202, Some(2)));
    wait_for_state(api(), &fork_id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    // The source did not move.
    assert_eq!(get_session(api(), &id).await.body["session"]["turn"], 2);
}

#[tokio::test]
async fn a_session_is_titled_by_its_first_words_renamed_by_its_user_and_exported_whole() {
    let user = user();
    let first =
        send_text(api(), &user, "## Planning a   trip to the mountains in winter, with dogs", None).await;
    let id = first.body["session_id"].as_str().unwrap().to_owned();
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let listed =
        harness::request(reqwest::Method::GET, format!("{}/users/{user}/sessions", api()), None).await;
    assert_eq!(listed.body["sessions"][0]["title"], "Planning a trip to the mountains in winter,…");

    // A rename is checked, then stands.
    let patch = |body: Value| {
        harness::request(reqwest::Method::PATCH, format!("{}/sessions/{id}", api()), Some(body.to_string()))
    };
    for (body, code) in [
        (json!({}), "missing_title"),
        (json!({"title": "   "}), "invalid_title"),
        (json!({"title": "a\nb"}), "invalid_title"),
        (json!({"title": "x".repeat(121)}), "invalid_title"),
        (json!({"title": 7}), "invalid_title"),
    ] {
        let answer = patch(body.clone()).await;
        assert_eq!((answer.status, answer.body["error"]["code"].as_str()), (400, Some(code)), "{body}");
    }
    let renamed = patch(json!({"title": "  Winter trip  "})).await;
    assert_eq!((renamed.status, renamed.body["title"].as_str()), (200, Some("Winter trip")));
    assert_eq!(get_session(api(), &id).await.body["session"]["title"], "Winter trip");

    // A second turn, redone once, then the whole session as JSON and as Markdown.
    send_text(api(), &user, "and the cats?", Some(&id)).await;
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    post(format!("/sessions/{id}/regenerate"), json!({})).await;
    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let export =
        |format: &str| harness::http().get(format!("{}/sessions/{id}/export?format={format}", api())).send();
    let as_json = export("json").await.unwrap();
    assert_eq!(as_json.status(), 200);
    assert_eq!(as_json.headers()["content-type"], "application/json");
    let disposition = as_json.headers()["content-disposition"].to_str().unwrap().to_owned();
    assert_eq!(disposition, format!("attachment; filename=\"chat-{id}.json\""));
    let exported: Value = as_json.json().await.unwrap();
    assert_eq!(exported["session"]["title"], "Winter trip");
    assert_eq!(exported["session"]["messages"], session["messages"], "the same messages as the history");
    assert_eq!(exported["session"]["messages"].as_array().unwrap().len(), 6);
    let markdown = export("markdown").await.unwrap();
    assert_eq!(markdown.headers()["content-type"], "text/markdown; charset=utf-8");
    let text = markdown.text().await.unwrap();
    assert!(text.starts_with("# Winter trip\n"), "{text}");
    assert!(text.contains("## You · turn 2 (earlier version, redone in turn 3)"), "{text}");
    assert!(text.contains("## Assistant · turn 3\n"), "{text}");
    let bad = export("xml").await.unwrap();
    assert_eq!(bad.status(), 400);
    let gone = harness::http()
        .get(format!("{}/sessions/{}/export", api(), uuid::Uuid::new_v4()))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}

#[tokio::test]
async fn forks_are_paced_apart_from_turns() {
    let user = user();
    let first = send_text(api(), &user, "a chat to fork", None).await;
    let id = first.body["session_id"].as_str().unwrap().to_owned();
    wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    // FORKS_PER_MINUTE is 10 by default: ten forks, then a 429 that says when to try again.
    for n in 0..10 {
        let fork = post(format!("/sessions/{id}/fork"), json!({})).await;
        assert_eq!(fork.status, 201, "fork {n}: {}", fork.body);
    }
    let refused = harness::http()
        .post(format!("{}/sessions/{id}/fork", api()))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "fork_rate_limited");
    // Turns are another bucket: the chat still takes a message.
    let next = send_text(api(), &user, "still here", Some(&id)).await;
    assert_eq!(next.status, 202, "{}", next.body);
}
