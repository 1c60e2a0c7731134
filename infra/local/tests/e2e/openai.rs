//! End to end with a real provider: the local stack configured with `LLM_PROVIDER=openai`
//! against a fake OpenAI-compatible server, the API key read from a Secrets Manager secret (moto).
//! The fake server's tokens reach an SSE client in order; a reply cut mid-stream reaches it as
//! tokens then an `error` event, and the session ends in `error`.

use crate::harness::*;
use chat_local::fake_llm;
use serde_json::json;
use std::time::Duration;

const SECRET_NAME: &str = "chat-e2e-openai-key";
const API_KEY: &str = "sk-e2e-0b5e7d";
/// Streamed a few ms apart; SSE carries line breaks as `\n` (it has no way to send a bare `\r`).
const TOKENS: &[&str] = &["Bonjour", " 👋", ", here is\na list:\n", "- ünïcødé", "\n- done", "."];

/// The fake model as an OpenAI-compatible server, its key in a secret.
pub(crate) const OPENAI: Config = Config {
    name: "openai",
    configure: |settings, model| {
        settings.function_env.extend(env(&[
            ("LLM_PROVIDER", "openai"),
            ("LLM_MODEL", "fake-model"),
            ("OPENAI_BASE_URL", &format!("{model}/v1")),
            ("OPENAI_API_KEY_SECRET_ARN", SECRET_NAME),
            ("LLM_SYSTEM_PROMPT", "You are the e2e test."),
            ("LLM_MAX_ATTEMPTS", "3"),
            ("LLM_RETRY_BASE_MS", "10"),
            ("MODEL_PRICES", r#"{"fake-model": {"input": 1.0, "output": 2.0}}"#),
        ]));
        settings.secrets = vec![(SECRET_NAME.to_owned(), API_KEY.to_owned())];
    },
};

#[tokio::test]
async fn an_openai_compatible_server_streams_through_the_stack_to_an_sse_client() {
    let info = app(&OPENAI);
    let (api, server) = (&info.api, info.model);

    // A rate limit first: retried before any token, invisible to the client.
    server.script(vec![
        fake_llm::status(429, &[("retry-after", "0")], "{}"),
        fake_llm::openai_reply(TOKENS, Duration::from_millis(30)),
    ]);
    let sent = send_text(api, &user(), "Hello, model ✨", None).await;
    assert_eq!(sent.status, 202, "{}", sent.body);
    let id = sent.body["session_id"].as_str().unwrap().to_owned();
    let (status, mut reader) = SseReader::open(&format!("{api}/sessions/{id}/stream?turn=1"), None).await;
    assert_eq!(status, 200);
    let events = reader.rest().await;
    assert_eq!(text_of(&events), TOKENS.concat(), "{events:?}");
    assert_eq!(indexes_of(&events), (0..TOKENS.len() as u64).collect::<Vec<_>>());
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).filter(|k| *k != "token").collect();
    assert_eq!(kinds, ["message_end", "commit_done"]);
    let session = wait_for_state(api, &id, Duration::from_secs(10), |s| s == "ai_committed").await;
    assert_eq!(reply_of(&session, 1).unwrap()["content"], TOKENS.concat());
    // The usage the server reported, priced by MODEL_PRICES, in message_end and stored alike.
    let end = events.iter().find(|e| e.event == "message_end").unwrap();
    let end: serde_json::Value = serde_json::from_str(&end.data).unwrap();
    let (input, output) = (fake_llm::FAKE_PROMPT_TOKENS, TOKENS.len() as u64);
    assert_eq!(
        end["usage"],
        json!({"input_tokens": input, "output_tokens": output, "cache_read_tokens": 0, "cache_write_tokens": 0})
    );
    let cost = (input as f64 * 1.0 + output as f64 * 2.0) / 1e6;
    assert!((end["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12, "{end}");
    let reply = reply_of(&session, 1).unwrap();
    assert_eq!((&reply["usage"], &reply["cost_usd"]), (&end["usage"], &end["cost_usd"]));

    let requests = server.requests();
    let request = requests.last().unwrap();
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {API_KEY}").as_str()),
        "key from the secret"
    );
    let body = request.json();
    assert_eq!(body["model"], "fake-model");
    assert_eq!(body["stream_options"], json!({"include_usage": true}), "the usage is asked for");
    let offered: Vec<&str> =
        body["tools"].as_array().unwrap().iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(offered, ["calculator", "current_time"], "the built-in tools are offered by default");
    assert_eq!(body["messages"][0]["content"], "You are the e2e test.");
    assert_eq!(body["messages"][1]["content"], "Hello, model ✨");

    // Turn 2 is cut off mid-reply: the client gets the tokens, then an error; nothing is committed.
    server.script(vec![fake_llm::openai_partial(&["Half", " an", " answer"], b"")]);
    let sent = send_text(api, &user_of(&session), "And now?", Some(&id)).await;
    assert_eq!(sent.status, 202, "{}", sent.body);
    let (_, mut reader) = SseReader::open(&format!("{api}/sessions/{id}/stream?turn=2"), None).await;
    let events = reader.rest().await;
    assert_eq!(text_of(&events), "Half an answer");
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    assert!(!events.iter().any(|e| e.event == "message_end"), "a cut reply is not presented as complete");
    let error: serde_json::Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(error["state"], "error");
    assert!(error["message"].as_str().unwrap().contains("ended before the reply was complete"), "{error}");
    let session = get_session(api, &id).await.body["session"].clone();
    assert_eq!(session["state"], "error");
    assert!(reply_of(&session, 2).is_none());
    // The history sent for turn 2 had turn 1 whole.
    let body = server.requests().last().unwrap().json();
    assert_eq!(body["messages"][2]["content"], TOKENS.concat());
    assert_eq!(body["messages"][3]["content"], "And now?");
}

fn user_of(session: &serde_json::Value) -> String {
    session["user_id"].as_str().expect("session has a user").to_owned()
}
