//! End to end with `LLM_PROVIDER=bedrock`: the generator, configured only by environment (as on
//! Lambda), reaches a fake `ConverseStream` endpoint through `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`,
//! signs with the credentials it finds, and its event-stream tokens reach an SSE client.

use crate::harness::*;
use chat_local::fake_llm;
use serde_json::json;
use std::time::Duration;

const TOKENS: &[&str] = &["Hola", " 🌍", "\nline two", " — fin."];

/// The fake model as Bedrock's runtime endpoint.
const BEDROCK: Config = Config {
    name: "bedrock",
    configure: |settings, model| {
        settings.function_env.extend(env(&[
            ("LLM_PROVIDER", "bedrock"),
            ("LLM_MODEL", "anthropic.fake-v1:0"),
            ("LLM_MAX_TOKENS", "77"),
            ("LLM_RETRY_BASE_MS", "10"),
            ("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", model),
            // Bedrock keeps the caller's credentials; give the functions test ones.
            ("AWS_ACCESS_KEY_ID", "AKIDE2ETEST"),
            ("AWS_SECRET_ACCESS_KEY", "e2e-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]));
    },
};

#[tokio::test]
async fn a_bedrock_reply_streams_through_the_stack_to_an_sse_client() {
    let info = app(&BEDROCK);
    let (api, server) = (&info.api, info.model);

    // Throttled inside the opened stream first: retried before any token.
    server.script(vec![
        fake_llm::bedrock_stream(vec![fake_llm::bedrock_exception("throttlingException")]),
        fake_llm::bedrock_stream(fake_llm::bedrock_frames(TOKENS)),
    ]);
    let sent = send_text(api, &user(), "¿Qué tal?", None).await;
    assert_eq!(sent.status, 202, "{}", sent.body);
    let id = sent.body["session_id"].as_str().unwrap().to_owned();
    let (_, mut reader) = SseReader::open(&format!("{api}/sessions/{id}/stream?turn=1"), None).await;
    let events = reader.rest().await;
    assert_eq!(text_of(&events), TOKENS.concat(), "{events:?}");
    assert_eq!(events.last().unwrap().event, "commit_done");
    let session = wait_for_state(api, &id, Duration::from_secs(10), |s| s == "ai_committed").await;
    assert_eq!(reply_of(&session, 1).unwrap()["content"], TOKENS.concat());
    // The metadata event's usage, stored with the reply; no price is configured, so no cost.
    let usage = json!({"input_tokens": 5, "output_tokens": TOKENS.len(), "cache_read_tokens": 0,
                       "cache_write_tokens": 0});
    assert_eq!(reply_of(&session, 1).unwrap()["usage"], usage);
    assert!(reply_of(&session, 1).unwrap().get("cost_usd").is_none());

    let requests = server.requests();
    assert_eq!(requests.len(), 2, "one throttled attempt, one reply");
    let request = requests.last().unwrap();
    assert_eq!(request.path, "/model/anthropic.fake-v1%3A0/converse-stream");
    let auth = request.header("authorization").unwrap_or_default();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDE2ETEST/"),
        "SigV4 with the function's credentials: {auth}"
    );
    assert!(auth.contains("/bedrock/aws4_request"), "{auth}");
    let body = request.json();
    assert_eq!(body["inferenceConfig"]["maxTokens"], 77);
    assert_eq!(body["messages"], json!([{"role": "user", "content": [{"text": "¿Qué tal?"}]}]));

    // The stack saw the generator's calls to the model, and the template's policy allows them.
    let calls = info.calls.snapshot();
    let model =
        calls.keys().find(|c| c.operation == "bedrock:ConverseStream").expect("the model call recorded");
    assert_eq!(
        (model.caller.as_str(), model.action.as_str(), model.resource.as_str()),
        ("generator", "bedrock:InvokeModelWithResponseStream", "foundation-model/anthropic.fake-v1:0")
    );
    crate::iam::assert_allowed(info);
}
