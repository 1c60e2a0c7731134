//! A turn's log read by a client nobody here wrote: the npm package `@durable-streams/client`
//! (pinned in infra/local/durable-client, installed by `make node-tools`) reads a live turn by
//! long-poll and by SSE through the stack, resumes from an offset it saved, and the text it
//! assembles is the committed reply byte for byte.

use crate::harness::*;
use serde_json::Value;
use std::time::Duration;

const TURN_TIMEOUT: Duration = Duration::from_secs(30);

fn api() -> &'static str {
    &app(&DEFAULT).api
}

/// Runs the client: reads `url` by `live` from `offset`, stopping after `stop_after` characters
/// when given, else at the stream's end. Answers `{"text", "offset", "closed"}`.
async fn client_read(url: &str, live: &str, offset: Option<&str>, stop_after: Option<usize>) -> Value {
    let script = root().join("infra/local/durable-client/read.mjs");
    let mut command = tokio::process::Command::new("node");
    command.arg(script).arg(url).arg(live).arg(offset.unwrap_or(""));
    if let Some(stop) = stop_after {
        command.arg(stop.to_string());
    }
    let run = tokio::time::timeout(TURN_TIMEOUT, command.output()).await.expect("the client finishes");
    let output = run.expect("node runs (make node-tools installs the client)");
    assert!(output.status.success(), "the client failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stdout)))
}

#[tokio::test]
async fn the_durable_streams_client_reads_a_live_turn_by_long_poll_and_sse_and_resumes_byte_for_byte() {
    let user = user();
    // 150 tokens at the demo model's pace: about three seconds of a live reply.
    let sent = send_text(api(), &user, "[[reply-tokens:150]] tell me about rivers", None).await;
    assert_eq!(sent.status, 202);
    let id = sent.body["session_id"].as_str().unwrap().to_owned();
    let log = format!("{}/sessions/{id}/turns/1/log", api());

    // Mid-reply, by long-poll: part of the text, and the offset to go on from.
    let first = client_read(&log, "long-poll", None, Some(40)).await;
    assert_eq!(first["closed"], false, "{first}");
    let saved = first["offset"].as_str().unwrap().to_owned();
    assert_eq!(saved.len(), 16, "{saved}");
    // The rest by SSE from the saved offset, to the stream's end.
    let rest = client_read(&log, "sse", Some(&saved), None).await;
    assert_eq!(rest["closed"], true, "{rest}");

    let session = wait_for_state(api(), &id, TURN_TIMEOUT, |s| s == "ai_committed").await;
    let committed = reply_of(&session, 1).unwrap()["content"].as_str().unwrap().to_owned();
    let resumed = format!("{}{}", first["text"].as_str().unwrap(), rest["text"].as_str().unwrap());
    assert_eq!(resumed, committed, "resumed across modes: the committed reply, byte for byte");
    assert!(first["text"].as_str().unwrap().len() < committed.len(), "the first read stopped mid-reply");

    // After the commit, each mode from the start reads the same bytes and ends.
    for live in ["long-poll", "sse"] {
        let whole = client_read(&log, live, None, None).await;
        assert_eq!(whole["closed"], true, "{live}: {whole}");
        assert_eq!(whole["text"], committed.as_str(), "{live}");
    }
    // Writes are refused: the log is the generator's.
    let put = http().put(&log).body("x").send().await.unwrap();
    assert_eq!(put.status(), 405);
    assert_eq!(put.headers()["allow"], "GET, HEAD");
}
