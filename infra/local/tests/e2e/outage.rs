//! SQS goes down: a send gets a clear 503, and the turn it had claimed ends in `error` (visible to
//! the client, and the session takes a new message) instead of waiting for a generator forever.

use crate::harness::{self, *};
use std::time::Duration;

/// Its own stack: the SQS emulator stays down.
const OUTAGE: Config = Config { name: "outage", configure: |_, _| {} };

/// SIGKILLs the moto server listening on `endpoint`'s port.
fn kill_sqs(endpoint: &str) {
    let port = endpoint.rsplit(':').next().unwrap();
    let mut killed = false;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_moto = args.iter().any(|a| a.ends_with(b"moto_server"));
        let on_port = args.windows(2).any(|w| w[0] == b"-p" && w[1] == port.as_bytes());
        if is_moto && on_port {
            killed |= std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap()
                .success();
        }
    }
    assert!(killed, "found the SQS emulator on port {port}");
}

#[tokio::test]
async fn a_send_while_sqs_is_down_gets_503_and_its_turn_ends_in_error() {
    let info = app(&OUTAGE);
    let api = &info.api;
    let user = user();
    let first = send_text(api, &user, "before the outage", None).await;
    assert_eq!(first.status, 202);
    let id = first.body["session_id"].as_str().unwrap().to_owned();
    wait_for_state(api, &id, Duration::from_secs(30), |s| s == "ai_committed").await;

    kill_sqs(&info.sqs_endpoint);
    let refused = send_text(api, &user, "during the outage", Some(&id)).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "queue_unavailable");
    assert!(!refused.body.to_string().contains("dispatch failure"), "no internals leak: {}", refused.body);

    // The claimed turn ended in an allowed state, and says so.
    let session = get_session(api, &id).await.body["session"].clone();
    assert_eq!(session["state"], "error", "{session}");
    assert_eq!(session["turn"], 2);
    assert!(reply_of(&session, 2).is_none());
    let (_, mut reader) = SseReader::open(&format!("{api}/sessions/{id}/stream?turn=2"), None).await;
    let events = reader.rest().await;
    assert_eq!(events.last().unwrap().event, "error", "{events:?}");

    // A first message (no session yet) is refused the same way.
    let fresh = send_text(api, &harness::user(), "new session during the outage", None).await;
    assert_eq!(fresh.status, 503);

    // Its idempotency key was released with the dead turn: a retry is a new attempt (503 again
    // while SQS is down), never a 202 pointing at the turn that failed.
    let keyed = serde_json::json!({"message": "keyed", "session_id": id, "client_message_id": "k-outage"});
    assert_eq!(send(api, &user, keyed.clone()).await.status, 503);
    let retry = send(api, &user, keyed).await;
    assert_eq!(retry.status, 503, "{}", retry.body);
}
