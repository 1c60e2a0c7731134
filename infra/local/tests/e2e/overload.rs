//! Overload: a burst far past the local stack's capacity is shed quickly with 429, nothing it
//! accepted is lost, nothing it shed is half-written, and it serves ordinary turns right after.
//!
//! Without the gateway, `cargo lambda watch` wedges for good once more than 100 invocations wait
//! for one function (see `chat_local::gateway`); this burst is three times that.

use crate::harness::*;
use std::time::{Duration, Instant};

const BURST: usize = 300;
/// The gateway's longest wait for a slot in this stack.
const MAX_WAIT: Duration = Duration::from_millis(500);

/// Two slots per function, and a short queue in front of them.
const OVERLOAD: Config = Config {
    name: "overload",
    configure: |settings, _| {
        settings.concurrency = 1;
        settings.invocations_per_instance = 2;
        settings.max_waiting = 16;
        settings.max_wait = MAX_WAIT;
    },
};

fn api() -> &'static str {
    &app(&OVERLOAD).api
}

struct Answered {
    user: String,
    status: u16,
    retry_after: Option<String>,
    body: serde_json::Value,
    took: Duration,
}

#[tokio::test]
async fn a_burst_past_capacity_is_shed_with_429_and_the_stack_serves_again_at_once() {
    let api = api();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Barrier::new(BURST));
    let burst: Vec<_> = (0..BURST)
        .map(|i| {
            let (http, gate, user) = (http.clone(), gate.clone(), user());
            tokio::spawn(async move {
                gate.wait().await;
                let started = Instant::now();
                let response = http
                    .post(format!("{api}/sessions/{user}/messages"))
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"message": "burst {i}"}}"#))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("request {i} got no answer: {e}"));
                let status = response.status().as_u16();
                let retry_after =
                    response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                let body = response.json().await.expect("every answer is JSON");
                Answered { user, status, retry_after, body, took: started.elapsed() }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in burst {
        answers.push(task.await.unwrap());
    }

    let accepted: Vec<&Answered> = answers.iter().filter(|a| a.status == 202).collect();
    let shed: Vec<&Answered> = answers.iter().filter(|a| a.status == 429).collect();
    let other: Vec<(u16, &serde_json::Value)> =
        answers.iter().filter(|a| a.status != 202 && a.status != 429).map(|a| (a.status, &a.body)).collect();
    assert!(other.is_empty(), "only 202 or 429 under overload, got {other:?}");
    assert!(!accepted.is_empty(), "the stack keeps serving at capacity");
    assert!(shed.len() >= BURST / 2, "a burst of {BURST} on 2 slots is mostly shed: {} were", shed.len());
    for answer in &shed {
        assert_eq!(answer.retry_after.as_deref(), Some("1"), "429 says when to retry");
        assert_eq!(answer.body["error"]["code"], "too_many_requests", "{}", answer.body);
        assert!(answer.took < MAX_WAIT + Duration::from_secs(5), "shed quickly, not after {:?}", answer.took);
    }

    // Nothing shed was half-written: those users have no session at all.
    for answer in shed.iter().take(20) {
        let listed =
            request(reqwest::Method::GET, format!("{api}/users/{}/sessions", answer.user), None).await;
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert_eq!(listed.body["sessions"], serde_json::json!([]), "a 429 leaves nothing behind");
    }

    // The stack is not wedged: health answers at once.
    let probe = Instant::now();
    let health = http.get(format!("{api}/health")).timeout(Duration::from_secs(2)).send().await;
    assert!(health.is_ok_and(|r| r.status() == 200), "health answers within 2 s after the burst");
    assert!(probe.elapsed() < Duration::from_secs(2));

    // Law 2: every accepted turn ends in exactly one committed reply.
    for answer in accepted {
        let id = answer.body["session_id"].as_str().unwrap();
        let session = wait_for_state(api, id, Duration::from_secs(60), |s| s == "ai_committed").await;
        assert!(reply_of(&session, 1).is_some(), "accepted turn {id} has its reply");
    }

    // And then an ordinary turn goes through in the time a turn takes.
    let ordinary = Instant::now();
    let user = user();
    let first = send_text(api, &user, "an ordinary turn after the burst", None).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let id = first.body["session_id"].as_str().unwrap().to_owned();
    let (status, mut reader) = SseReader::open(&format!("{api}/sessions/{id}/stream?turn=1"), None).await;
    assert_eq!(status, 200);
    let events = reader.rest().await;
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("commit_done"), "{events:?}");
    assert!(
        ordinary.elapsed() < Duration::from_secs(5),
        "an ordinary turn after the burst took {:?}",
        ordinary.elapsed()
    );
}
