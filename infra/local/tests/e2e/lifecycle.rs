//! End to end: a session's lifecycle through the local stack. With a 2 s idle timeout, the
//! sweeper (on its schedule) expires a quiet session and queues its summary, the generator
//! writes it, `GET /sessions/{id}` shows it, and the conversation goes on from there.

use crate::harness::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Sessions expire after 2 s of quiet.
const LIFECYCLE: Config = Config {
    name: "lifecycle",
    configure: |settings, _| settings.function_env.extend(env(&[("SESSION_IDLE_TIMEOUT", "2s")])),
};

fn api() -> &'static str {
    &app(&LIFECYCLE).api
}

/// Polls the session until it carries a summary; panics after `timeout`.
async fn wait_for_summary(id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let session = get_session(api(), id).await.body["session"].clone();
        if !session["summary"].is_null() {
            return session;
        }
        assert!(Instant::now() < deadline, "no summary after {timeout:?}: {session}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_quiet_session_is_summarised_and_the_conversation_goes_on_from_its_summary() {
    let user = user();
    let first = send_text(api(), &user, "Remember the word pineapple.", None).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let id = first.body["session_id"].as_str().unwrap().to_owned();

    let session = wait_for_summary(&id, Duration::from_secs(60)).await;
    assert_eq!(session["state"], "timeout", "{session}");
    assert_eq!(session["error"], "the session was idle past its limit");
    assert_eq!(session["summary"]["through_turn"], 1);
    // The demo model quotes what it is given: here, the transcript it was asked to condense.
    let summary = session["summary"]["text"].as_str().unwrap();
    assert!(summary.contains("User: Remember the word pineapple."), "{summary}");
    assert!(reply_of(&session, 1).is_some(), "the reply is kept");
    assert!(session["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{session}");

    // The expired turn still streams as the committed turn it was.
    let (status, mut reader) = SseReader::open(&format!("{}/sessions/{id}/stream?turn=1", api()), None).await;
    assert_eq!(status, 200);
    let events = reader.rest().await;
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("commit_done"), "{events:?}");

    // The user comes back: the message is accepted from `timeout` and answered.
    let second = send_text(api(), &user, "What was the word?", Some(&id)).await;
    assert_eq!(second.status, 202, "{}", second.body);
    assert_eq!(second.body["turn"], 2);
    // Quiet again: a second summary covers turn 2, built on the first.
    let deadline = Instant::now() + Duration::from_secs(60);
    let session = loop {
        let session = get_session(api(), &id).await.body["session"].clone();
        if session["summary"]["through_turn"] == 2 {
            break session;
        }
        assert!(Instant::now() < deadline, "no second summary: {session}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reply_of(&session, 2).is_some(), "turn 2 was answered: {session}");
    let summary = session["summary"]["text"].as_str().unwrap();
    assert!(summary.contains("User: What was the word?"), "{summary}");
    assert!(summary.contains("pineapple"), "the earlier summary carries on: {summary}");
}
