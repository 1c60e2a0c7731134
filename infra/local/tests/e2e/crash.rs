//! A generator killed mid-turn: the turn is recovered by lease expiry and re-drive (or ends in
//! timeout), never stuck, and the stream a client holds open sees it through.
//!
//! The generator process aborts itself (`[[crash-after:N]]`, honoured only with `DEMO_FAULTS`)
//! once N tokens are stored: exactly the instance running the turn dies, with no cleanup, as a
//! SIGKILL would. (Killing every instance from outside is not survivable under `cargo lambda
//! watch` 1.9.2, which keeps routing to dead idle instances; Lambda itself starts new ones.)

use crate::harness::*;
use std::time::Duration;

/// Its own stack: the crash takes every turn on the aborted instance with it.
const CRASH: Config = Config { name: "crash", configure: |_, _| {} };

#[tokio::test]
async fn a_generator_killed_mid_turn_is_recovered_and_never_leaves_the_turn_stuck() {
    let info = app(&CRASH);
    let api = &info.api;
    let user = user();
    let answer = send_text(api, &user, "survive a crash [[crash-after:10]]", None).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = answer.body["session_id"].as_str().unwrap().to_owned();
    let (_, mut reader) = SseReader::open(&format!("{api}/sessions/{id}/stream?turn=1"), None).await;
    // The open stream keeps following the turn through the crash and the recovery.
    let events = reader.rest().await;
    let session =
        wait_for_state(api, &id, Duration::from_secs(60), |s| s == "ai_committed" || s == "timeout").await;
    match session["state"].as_str().unwrap() {
        "ai_committed" => {
            let transitions = chat_local::dynamodb_client(&info.dynamodb_endpoint);
            let store = chat_core::Store::new(transitions, info.table.as_str(), Default::default());
            let id = chat_core::SessionId::parse(&id).unwrap();
            let events_seen: Vec<chat_core::Event> =
                store.transitions(id).await.unwrap().into_iter().map(|t| t.event).collect();
            assert!(
                events_seen.contains(&chat_core::Event::LeaseTakeover),
                "recovered by a takeover: {events_seen:?}"
            );
            let indexes = indexes_of(&events);
            assert_eq!(indexes, (0..indexes.len() as u64).collect::<Vec<_>>(), "no gap, no duplicate");
            assert_eq!(
                reply_of(&session, 1).unwrap()["content"],
                text_of(&events),
                "what was streamed is what was saved"
            );
            assert_eq!(events.last().unwrap().event, "commit_done");
        }
        _ => assert_eq!(events.last().unwrap().event, "error"),
    }
    // The session takes the next message either way.
    assert_eq!(send_text(api, &user, "still there?", Some(&id)).await.status, 202);
    let (_, mut next) = SseReader::open(&format!("{api}/sessions/{id}/stream?turn=2"), None).await;
    let after = next.rest().await;
    assert_eq!(after.last().unwrap().event, "commit_done", "{after:?}");
}
