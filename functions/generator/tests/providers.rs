//! The real providers against local servers that speak their wire protocols: OpenAI-style SSE
//! and Bedrock's AWS event stream. First each provider with the retry policy, then the whole
//! generator (embedded DynamoDB) turning their streams into committed replies or error states.

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use chat_core::job::TurnMessage;
use chat_core::{
    NewMessage, Outcome, Read, Role, SendOutcome, SessionId, State, StopReason, Store, StoreOptions, Turn,
    UserId,
};
use chat_testkit::fake_llm::{self, FakeLlm, Reply};
use futures::StreamExt;
use generator::llm::bedrock::{BedrockSettings, CachePoints};
use generator::llm::openai::OpenAiSettings;
use generator::llm::{Bedrock, Exchange, Model, ModelError, OpenAi, Output, Prompt, RetryPolicy, ToolCall};
use generator::tools::Tools;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const API_KEY: &str = "sk-test-3f9a1c";

/// Tokens that must survive the trip byte for byte: newlines, CRLF, unicode, SSE-looking text.
const TRICKY: &[&str] =
    &["Hello", ",\nworld", " ünïcødé ", "🦀", "\r\n", "data: not an event", "\n\n", " end."];

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(5),
        cap: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(5),
    }
}

fn openai(server: &FakeLlm) -> Model {
    let provider = OpenAi::new(OpenAiSettings {
        base_url: format!("{}/v1", server.url),
        api_key: Some(API_KEY.to_owned()),
        model: "fake-model".to_owned(),
        temperature: Some(0.3),
        max_tokens: 256,
        max_tokens_field: "max_tokens",
        connect_timeout: Duration::from_secs(2),
        stream_usage: true,
    })
    .unwrap();
    Model::new(Arc::new(provider), policy())
}

async fn bedrock(server: &FakeLlm) -> Model {
    bedrock_with(server, "anthropic.fake-v1:0", CachePoints::Auto).await
}

async fn bedrock_with(server: &FakeLlm, model: &str, cache_points: CachePoints) -> Model {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&server.url)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "AKIDTEST", "secret", None, None, "test",
        ))
        .load()
        .await;
    let settings =
        BedrockSettings { model: model.to_owned(), temperature: None, max_tokens: 256, cache_points };
    Model::new(Arc::new(Bedrock::new(&config, settings)), policy())
}

fn prompt(text: &str) -> Prompt {
    Prompt {
        system: Some("Answer briefly.".to_owned()),
        messages: vec![
            (Role::User, "earlier".to_owned()),
            (Role::Assistant, "reply".to_owned()),
            (Role::User, text.to_owned()),
        ],
        ..Prompt::default()
    }
}

/// The text a model streams, without its usage (a test here offers no tools, so a tool call is
/// a failure).
async fn collect(model: &Model, text: &str) -> Vec<Result<String, ModelError>> {
    let outputs: Vec<_> = model.stream(prompt(text)).collect().await;
    outputs.into_iter().filter(|o| !matches!(o, Ok(Output::Usage(_)))).map(|o| o.map(text_of)).collect()
}

fn text_of(output: Output) -> String {
    match output {
        Output::Token(token) => token,
        Output::ToolCall(call) => panic!("unexpected tool call {call:?}"),
        Output::Usage(usage) => panic!("usage is not text: {usage:?}"),
    }
}

fn tokens(items: &[Result<String, ModelError>]) -> Vec<String> {
    items.iter().filter_map(|r| r.as_ref().ok().cloned()).collect()
}

fn owned(tokens: &[&str]) -> Vec<String> {
    tokens.iter().map(|t| (*t).to_owned()).collect()
}

#[tokio::test]
async fn openai_tokens_arrive_in_order_byte_for_byte_and_the_request_is_well_formed() {
    let server =
        FakeLlm::start(vec![fake_llm::openai_reply(TRICKY, Duration::from_millis(2))]).await.unwrap();
    let out = collect(&openai(&server), "Say something tricky").await;
    assert_eq!(out, owned(TRICKY).into_iter().map(Ok).collect::<Vec<_>>());

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.header("authorization"), Some(format!("Bearer {API_KEY}").as_str()));
    let body = request.json();
    assert_eq!(body["model"], "fake-model");
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 256);
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "reply"},
            {"role": "user", "content": "Say something tricky"},
        ])
    );
}

#[tokio::test]
async fn openai_429_and_503_before_the_first_token_are_retried() {
    let server = FakeLlm::start(vec![
        fake_llm::status(
            429,
            &[("retry-after", "0")],
            r#"{"error":{"message":"slow down","type":"rate_limit"}}"#,
        ),
        fake_llm::status(503, &[], "upstream busy"),
        fake_llm::openai_reply(&["after", " retries"], Duration::ZERO),
    ])
    .await
    .unwrap();
    let out = collect(&openai(&server), "hi").await;
    assert_eq!(out, vec![Ok("after".to_owned()), Ok(" retries".to_owned())]);
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn openai_rate_limits_that_never_end_give_up_with_a_clear_error() {
    let server = FakeLlm::start(vec![fake_llm::status(429, &[], "{}")]).await.unwrap();
    let out = collect(&openai(&server), "hi").await;
    let [Err(err)] = &out[..] else { panic!("expected one error, got {out:?}") };
    assert_eq!(
        err.message,
        "the model provider is rate limiting requests (HTTP 429) (gave up after 3 attempts)"
    );
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn openai_refusals_are_not_retried_and_leak_neither_key_nor_body() {
    let body = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: {API_KEY}","type":"invalid_request_error"}}}}"#
    );
    let server = FakeLlm::start(vec![fake_llm::status(401, &[], &body)]).await.unwrap();
    let out = collect(&openai(&server), "hi").await;
    let [Err(err)] = &out[..] else { panic!("expected one error, got {out:?}") };
    assert!(err.message.contains("HTTP 401") && err.message.contains("API key"), "{err}");
    assert!(!err.message.contains(API_KEY) && !err.message.contains("Incorrect"), "{err}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn openai_disconnect_mid_reply_is_an_error_after_the_tokens_and_not_retried() {
    let server = FakeLlm::start(vec![fake_llm::openai_partial(&["one", " two"], b"")]).await.unwrap();
    let out = collect(&openai(&server), "hi").await;
    assert_eq!(tokens(&out), owned(&["one", " two"]));
    let Some(Err(err)) = out.last() else { panic!("expected an error last, got {out:?}") };
    assert!(err.message.contains("ended before the reply was complete"), "{err}");
    assert_eq!(server.requests().len(), 1, "a reply already under way is never restarted");
}

#[tokio::test]
async fn openai_malformed_chunks_and_error_events_are_errors_not_panics() {
    for tail in [
        &b"data: {\"choices\": [ not json\n\n"[..],
        b"data: {\"unexpected\": true}\n\n",
        b"data: \xff\xfe\n\n",
    ] {
        let server = FakeLlm::start(vec![fake_llm::openai_partial(&["ok"], tail)]).await.unwrap();
        let out = collect(&openai(&server), "hi").await;
        assert_eq!(tokens(&out), owned(&["ok"]));
        let Some(Err(err)) = out.last() else { panic!("expected an error last, got {out:?}") };
        assert!(err.message.contains("malformed"), "{err}");
    }
    let error_event =
        fake_llm::sse_data(r#"{"error":{"message":"context too long","type":"invalid_request_error"}}"#);
    let server = FakeLlm::start(vec![fake_llm::openai_partial(&[], &error_event)]).await.unwrap();
    let out = collect(&openai(&server), "hi").await;
    let [Err(err)] = &out[..] else { panic!("expected one error, got {out:?}") };
    assert_eq!(err.message, "the model provider reported an error while replying");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn openai_unreachable_is_retried_then_reported() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let model = Model::new(
        Arc::new(
            OpenAi::new(OpenAiSettings {
                base_url: url,
                api_key: None,
                model: "m".to_owned(),
                temperature: None,
                max_tokens: 8,
                max_tokens_field: "max_tokens",
                connect_timeout: Duration::from_secs(1),
                stream_usage: true,
            })
            .unwrap(),
        ),
        policy(),
    );
    let out = collect(&model, "hi").await;
    let [Err(err)] = &out[..] else { panic!("expected one error, got {out:?}") };
    assert_eq!(err.message, "could not reach the model provider (gave up after 3 attempts)");
}

#[tokio::test]
async fn bedrock_tokens_arrive_in_order_byte_for_byte_and_the_request_is_well_formed() {
    let server =
        FakeLlm::start(vec![fake_llm::bedrock_stream(fake_llm::bedrock_frames(TRICKY))]).await.unwrap();
    let out = collect(&bedrock(&server).await, "Say something tricky").await;
    assert_eq!(out, owned(TRICKY).into_iter().map(Ok).collect::<Vec<_>>());

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.path, "/model/anthropic.fake-v1%3A0/converse-stream");
    assert!(
        request.header("authorization").is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256")),
        "SigV4-signed"
    );
    let body = request.json();
    assert_eq!(body["system"], json!([{"text": "Answer briefly."}]));
    assert_eq!(body["inferenceConfig"]["maxTokens"], 256);
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"text": "earlier"}]},
            {"role": "assistant", "content": [{"text": "reply"}]},
            {"role": "user", "content": [{"text": "Say something tricky"}]},
        ])
    );
}

#[tokio::test]
async fn bedrock_throttling_before_the_first_token_is_retried_in_either_form() {
    // Refused outright (HTTP 429), then throttled inside an opened stream, then a reply.
    let server = FakeLlm::start(vec![
        fake_llm::bedrock_error(429, "ThrottlingException"),
        fake_llm::bedrock_stream(vec![
            fake_llm::bedrock_event("messageStart", json!({"role": "assistant"})),
            fake_llm::bedrock_exception("throttlingException"),
        ]),
        fake_llm::bedrock_stream(fake_llm::bedrock_frames(&["third", " time"])),
    ])
    .await
    .unwrap();
    let out = collect(&bedrock(&server).await, "hi").await;
    assert_eq!(out, vec![Ok("third".to_owned()), Ok(" time".to_owned())]);
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn bedrock_access_denied_is_clear_and_not_retried() {
    let server = FakeLlm::start(vec![fake_llm::bedrock_error(403, "AccessDeniedException")]).await.unwrap();
    let out = collect(&bedrock(&server).await, "hi").await;
    let [Err(err)] = &out[..] else { panic!("expected one error, got {out:?}") };
    assert!(err.message.contains("denied access") && err.message.contains("IAM"), "{err}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn bedrock_cut_streams_and_garbage_frames_are_errors_not_panics() {
    let mut cut = fake_llm::bedrock_frames(&["half", " a"]);
    cut.truncate(3); // messageStart and two deltas; no messageStop
    let garbage = {
        let mut frames = fake_llm::bedrock_frames(&["ok"])[..2].to_vec();
        frames.push(vec![0, 0, 0, 40, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        frames
    };
    let throttled_late = {
        let mut frames = fake_llm::bedrock_frames(&["late"])[..2].to_vec();
        frames.push(fake_llm::bedrock_exception("throttlingException"));
        frames
    };
    for (frames, expected) in
        [(cut, vec!["half", " a"]), (garbage, vec!["ok"]), (throttled_late, vec!["late"])]
    {
        let server = FakeLlm::start(vec![fake_llm::bedrock_stream(frames)]).await.unwrap();
        let out = collect(&bedrock(&server).await, "hi").await;
        assert_eq!(tokens(&out), owned(&expected));
        assert!(matches!(out.last(), Some(Err(_))), "{out:?}");
        assert_eq!(server.requests().len(), 1, "a reply already under way is never restarted");
    }
}

// The whole generator: turns through DynamoDB (embedded), replies from the fake servers.

/// The user every harness turn is sent as.
const TESTER: &str = "provider-tester";

struct Harness {
    _dynamo: chat_testkit::LocalDynamo,
    store: Store,
    generator: generator::Generator,
}

/// Generator settings for these tests: small flushes, a 30 s lease, default memory.
fn settings() -> generator::GenerationSettings {
    generator::GenerationSettings {
        lease: Duration::from_secs(30),
        max_generation_attempts: 3,
        flush_interval: Duration::from_millis(20),
        flush_max_tokens: 3,
        faults: false,
        system_prompt: None,
        memory: Default::default(),
        reply_max_bytes: 300_000,
        tool_deadline: Duration::from_secs(60),
    }
}

async fn harness(model: Model, settings: generator::GenerationSettings) -> Harness {
    let dynamo = chat_testkit::LocalDynamo::start(0, "providers").await.unwrap();
    let store = dynamo.store("providers", StoreOptions::default());
    let generator = generator::Generator::new(store.clone(), model, settings);
    Harness { _dynamo: dynamo, store, generator }
}

impl Harness {
    /// Sends `text` (continuing `session` if given) and runs the generator on it.
    async fn turn(&self, session: Option<SessionId>, text: &str) -> (SessionId, Turn) {
        let user = UserId::parse(TESTER).unwrap();
        let sent = self
            .store
            .send_message(NewMessage {
                user: &user,
                session,
                content: text,
                client_message_id: None,
                by: "test",
            })
            .await
            .unwrap();
        let SendOutcome::Accepted(ticket) = sent else { panic!("send refused: {sent:?}") };
        let Outcome::Applied(ticket) = self.store.commit_user_message(&ticket, "test").await.unwrap() else {
            panic!("commit refused")
        };
        let mut record = SqsMessage::default();
        record.message_id = Some("m".to_owned());
        record.body =
            Some(serde_json::to_string(&TurnMessage::reply(ticket.session_id, ticket.turn)).unwrap());
        let mut event = SqsEvent::default();
        event.records = vec![record];
        let response = self.generator.handle(event).await;
        assert!(response.batch_item_failures.is_empty(), "the generator asked for a redelivery");
        (ticket.session_id, ticket.turn)
    }

    async fn streamed(&self, session: SessionId, turn: Turn) -> String {
        let chunks = self.store.read_chunks(session, turn, None, Read::Consistent).await.unwrap();
        chunks.iter().flat_map(|c| c.tokens.iter()).cloned().collect()
    }
}

#[tokio::test]
async fn the_committed_reply_is_exactly_the_streamed_tokens_and_history_reaches_the_model() {
    let server =
        FakeLlm::start(vec![fake_llm::openai_reply(TRICKY, Duration::from_millis(3))]).await.unwrap();
    let h = harness(
        openai(&server),
        generator::GenerationSettings { system_prompt: Some("You are a test.".to_owned()), ..settings() },
    )
    .await;
    let (session, turn) = h.turn(None, "first question").await;
    let (stored, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    assert_eq!(stored.state, State::AiCommitted);
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.content, TRICKY.concat());
    assert_eq!(h.streamed(session, turn).await, TRICKY.concat());

    // The second turn's request carries the system prompt and the first turn whole.
    server.script(vec![fake_llm::openai_reply(&["second"], Duration::ZERO)]);
    let (_, turn2) = h.turn(Some(session), "second question").await;
    assert_eq!(turn2, turn.next());
    let body = server.requests().last().unwrap().json();
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "You are a test."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": TRICKY.concat()},
            {"role": "user", "content": "second question"},
        ])
    );
}

#[tokio::test]
async fn a_reply_over_the_size_limit_is_committed_up_to_it_and_marked_reply_limit() {
    // 40 tokens of 10 bytes against a 95-byte limit: 9 whole tokens fit.
    let tokens: Vec<String> = (0..40).map(|i| format!("token-{i:03} ")).collect();
    let words: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let server = FakeLlm::start(vec![fake_llm::openai_reply(&words, Duration::ZERO)]).await.unwrap();
    let h =
        harness(openai(&server), generator::GenerationSettings { reply_max_bytes: 95, ..settings() }).await;
    let started = std::time::Instant::now();
    let (session, turn) = h.turn(None, "a very long answer, please").await;
    assert!(started.elapsed() < Duration::from_secs(10), "capped, not retried to a timeout");
    let (stored, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    assert_eq!(stored.state, State::AiCommitted);
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.content, words[..9].concat());
    assert_eq!(reply.stopped, Some(StopReason::ReplyLimit));
    // What was streamed is what was saved, cap included.
    assert_eq!(h.streamed(session, turn).await, reply.content);
    assert_eq!(server.requests().len(), 1, "one model call; the cap is not an error to retry");
}

#[tokio::test]
async fn a_disconnect_mid_reply_ends_the_turn_in_error_with_the_partial_reply_not_committed() {
    let server =
        FakeLlm::start(vec![fake_llm::openai_partial(&["Partial", " answer", " cut"], b"")]).await.unwrap();
    let h = harness(openai(&server), settings()).await;
    let (session, turn) = h.turn(None, "tell me").await;
    let (stored, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    assert_eq!(stored.state, State::Error);
    let reason = stored.reason.unwrap_or_default();
    assert!(reason.contains("ended before the reply was complete"), "{reason}");
    assert!(!messages.iter().any(|m| m.id.role == Role::Assistant), "no reply is presented as complete");
    assert_eq!(h.streamed(session, turn).await, "Partial answer cut", "what was streamed stays readable");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_bedrock_turn_commits_its_reply() {
    let server =
        FakeLlm::start(vec![fake_llm::bedrock_stream(fake_llm::bedrock_frames(TRICKY))]).await.unwrap();
    let h = harness(bedrock(&server).await, settings()).await;
    let (session, turn) = h.turn(None, "hello bedrock").await;
    let (stored, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    assert_eq!(stored.state, State::AiCommitted);
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.content, TRICKY.concat());
}

#[tokio::test]
async fn a_message_over_the_memory_budget_ends_the_turn_with_a_clear_error_without_calling_the_model() {
    let server = FakeLlm::start(vec![fake_llm::openai_reply(&["never"], Duration::ZERO)]).await.unwrap();
    let memory = generator::memory::MemoryLimits { max_tokens: 50, max_turns: 20 };
    let h = harness(openai(&server), generator::GenerationSettings { memory, ..settings() }).await;
    let (session, _) = h.turn(None, &"many words ".repeat(100)).await;
    let stored = h.store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    assert_eq!(stored.state, State::Error);
    assert!(stored.reason.unwrap_or_default().contains("context budget"));
    assert!(server.requests().is_empty());
}

/// The session of the one turn a harness is running (its emulator holds no other).
async fn only_session(store: &Store) -> chat_core::Session {
    let user = UserId::parse(TESTER).unwrap();
    let sessions = store.list_user_sessions(&user, 10, None).await.unwrap().sessions;
    let [session] = &sessions[..] else { panic!("expected one session, got {}", sessions.len()) };
    session.clone()
}

/// A reply whose first token comes after `silence` (a model thinking), then `tokens`.
fn slow_start(silence: Duration, tokens: &[&str]) -> Reply {
    let Reply::Stream { content_type, mut parts } = fake_llm::openai_reply(tokens, Duration::ZERO) else {
        unreachable!("openai_reply streams")
    };
    parts[0].0 = silence;
    Reply::Stream { content_type, parts }
}

#[tokio::test]
async fn a_silent_model_does_not_cost_the_lease() {
    let server = FakeLlm::start(vec![slow_start(Duration::from_millis(1500), &["worth", " the", " wait"])])
        .await
        .unwrap();
    let lease = Duration::from_millis(600);
    let h = harness(openai(&server), generator::GenerationSettings { lease, ..settings() }).await;
    let store = h.store.clone();
    let rival = tokio::spawn(async move {
        // Well past the first lease's expiry, while the model is still silent.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let session = only_session(&store).await;
        store.claim_generation(session.id, session.turn, "rival", Duration::from_secs(30), 3).await.unwrap()
    });
    let (session, turn) = h.turn(None, "think hard").await;
    let rival = rival.await.unwrap();
    assert!(
        matches!(rival, chat_core::ClaimOutcome::Skipped { .. }),
        "the heartbeat kept the lease: {rival:?}"
    );
    let (stored, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    assert_eq!(stored.state, State::AiCommitted);
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.content, "worth the wait");
}

#[tokio::test]
async fn a_cancel_lands_while_the_model_is_still_silent() {
    let server = FakeLlm::start(vec![slow_start(Duration::from_secs(20), &["too", " late"])]).await.unwrap();
    let lease = Duration::from_millis(800);
    let h = harness(openai(&server), generator::GenerationSettings { lease, ..settings() }).await;
    let store = h.store.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.request_cancel(only_session(&store).await.id, None).await.unwrap()
    });
    let started = std::time::Instant::now();
    let (session, turn) = h.turn(None, "never mind").await;
    canceller.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped without waiting for the model: {:?}",
        started.elapsed()
    );
    let (stored, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    assert_eq!(stored.state, State::AiCommitted);
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.stopped, Some(StopReason::Cancelled));
    assert_eq!(reply.content, "");
    // Cut before the model reported anything: the counts known at the stop (the prompt, by
    // o200k_base, and nothing streamed).
    let usage = reply.usage.expect("a stopped reply keeps its usage");
    assert!(usage.input > 0 && usage.output == 0 && usage.cache_read == 0, "{usage:?}");
}

#[tokio::test]
async fn a_rejected_key_is_reloaded_from_its_secret_and_the_request_retried() {
    let server = FakeLlm::start(vec![
        fake_llm::status(
            401,
            &[],
            r#"{"error":{"message":"Incorrect API key","type":"invalid_request_error"}}"#,
        ),
        fake_llm::openai_reply(&["rotated", " fine"], Duration::ZERO),
    ])
    .await
    .unwrap();
    let loads = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = loads.clone();
    let provider = OpenAi::new(OpenAiSettings {
        base_url: format!("{}/v1", server.url),
        api_key: Some("sk-old".to_owned()),
        model: "m".to_owned(),
        temperature: None,
        max_tokens: 16,
        max_tokens_field: "max_tokens",
        connect_timeout: Duration::from_secs(2),
        stream_usage: true,
    })
    .unwrap()
    .with_key_loader(Arc::new(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok("sk-new".to_owned()) })
    }));
    let model = Model::new(Arc::new(provider), policy());
    let out = collect(&model, "hi").await;
    assert_eq!(out, vec![Ok("rotated".to_owned()), Ok(" fine".to_owned())]);
    let keys: Vec<_> =
        server.requests().iter().map(|r| r.header("authorization").unwrap().to_owned()).collect();
    assert_eq!(keys, ["Bearer sk-old", "Bearer sk-new"]);

    // A key that is simply wrong is not reloaded again within the interval, nor retried.
    server.script(vec![fake_llm::status(401, &[], "{}")]);
    let out = collect(&model, "hi").await;
    assert!(matches!(&out[..], [Err(e)] if !e.retryable && e.message.contains("HTTP 401")), "{out:?}");
    assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn a_bedrock_stream_cut_mid_reply_ends_the_turn_in_error() {
    let mut frames = fake_llm::bedrock_frames(&["Cut", " short", " here"]);
    frames.truncate(4); // messageStart and three deltas; no messageStop
    let server = FakeLlm::start(vec![fake_llm::bedrock_stream(frames)]).await.unwrap();
    let h = harness(bedrock(&server).await, settings()).await;
    let (session, turn) = h.turn(None, "go").await;
    let (stored, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    assert_eq!(stored.state, State::Error);
    assert!(stored.reason.unwrap_or_default().contains("ended before the reply was complete"));
    assert!(!messages.iter().any(|m| m.id.role == Role::Assistant));
    assert_eq!(h.streamed(session, turn).await, "Cut short here");
    assert_eq!(server.requests().len(), 1);
}

/// A tool step of the prompt: the model's text and calls, then the tools' answers.
fn tool_step(text: &str, calls: &[ToolCall], answers: &[&str]) -> Vec<Exchange> {
    let mut exchanges = vec![Exchange::Assistant { text: text.to_owned(), calls: calls.to_vec() }];
    for (call, answer) in calls.iter().zip(answers) {
        exchanges.push(Exchange::ToolResult {
            call_id: call.id.clone(),
            name: call.name.clone(),
            content: (*answer).to_owned(),
            is_error: false,
        });
    }
    exchanges
}

fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
    ToolCall { id: id.to_owned(), name: name.to_owned(), arguments: arguments.to_owned() }
}

#[tokio::test]
async fn openai_tool_calls_arrive_whole_and_the_steps_go_back_in_its_format() {
    let calc = call("call_a", "calculator", r#"{"expression":"6*7"}"#);
    let clock = call("call_b", "current_time", r#"{"utc_offset":"+02:00"}"#);
    let server = FakeLlm::start(vec![fake_llm::openai_tool_calls(
        "Checking. ",
        &[("call_a", "calculator", &calc.arguments), ("call_b", "current_time", &clock.arguments)],
    )])
    .await
    .unwrap();
    let model = openai(&server);
    let mut asked = prompt("What is 6*7, and the time?");
    asked.tools = Tools::builtin().specs();
    let out: Vec<Output> = model.stream(asked.clone()).map(Result::unwrap).collect().await;
    assert_eq!(
        out,
        vec![
            Output::Token("Checking. ".to_owned()),
            Output::ToolCall(calc.clone()),
            Output::ToolCall(clock.clone())
        ]
    );
    let body = server.requests()[0].json();
    let offered: Vec<&str> =
        body["tools"].as_array().unwrap().iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(offered, ["calculator", "current_time"]);
    assert_eq!(body["tools"][0]["type"], "function");
    assert_eq!(body["tools"][0]["function"]["parameters"]["required"], json!(["expression"]));

    server.script(vec![fake_llm::openai_reply(&["42, at noon."], Duration::ZERO)]);
    asked.exchanges = tool_step("Checking. ", &[calc, clock], &["42", "2026-11-30T12:00:00.000+02:00"]);
    let _: Vec<_> = model.stream(asked).collect().await;
    let messages = server.requests()[1].json()["messages"].clone();
    assert_eq!(
        messages[4],
        json!({"role": "assistant", "content": "Checking. ", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\":\"6*7\"}"}},
            {"id": "call_b", "type": "function", "function": {"name": "current_time", "arguments": "{\"utc_offset\":\"+02:00\"}"}},
        ]})
    );
    assert_eq!(messages[5], json!({"role": "tool", "tool_call_id": "call_a", "content": "42"}));
    assert_eq!(messages[6]["tool_call_id"], "call_b");
    assert_eq!(messages.as_array().unwrap().len(), 7);
}

#[tokio::test]
async fn bedrock_tool_use_arrives_whole_and_the_steps_go_back_as_content_blocks() {
    let calc = call("tooluse_1", "calculator", r#"{"expression":"6*7"}"#);
    let frames = fake_llm::bedrock_tool_use_frames("Checking.", "tooluse_1", "calculator", &calc.arguments);
    let server = FakeLlm::start(vec![fake_llm::bedrock_stream(frames)]).await.unwrap();
    let model = bedrock(&server).await;
    let mut asked = prompt("What is 6*7?");
    asked.tools = Tools::builtin().specs();
    let out: Vec<Output> = model.stream(asked.clone()).map(Result::unwrap).collect().await;
    assert_eq!(out, vec![Output::Token("Checking.".to_owned()), Output::ToolCall(calc.clone())]);
    let body = server.requests()[0].json();
    let spec = &body["toolConfig"]["tools"][0]["toolSpec"];
    assert_eq!(spec["name"], "calculator");
    assert_eq!(spec["inputSchema"]["json"]["required"], json!(["expression"]));

    server.script(vec![fake_llm::bedrock_stream(fake_llm::bedrock_frames(&["42."]))]);
    asked.exchanges = tool_step("Checking.", &[calc], &["42"]);
    let _: Vec<_> = model.stream(asked).collect().await;
    let messages = server.requests()[1].json()["messages"].clone();
    assert_eq!(
        messages[3],
        json!({"role": "assistant", "content": [
            {"text": "Checking."},
            {"toolUse": {"toolUseId": "tooluse_1", "name": "calculator", "input": {"expression": "6*7"}}},
        ]})
    );
    assert_eq!(
        messages[4],
        json!({"role": "user", "content": [
            {"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "42"}], "status": "success"}},
        ]})
    );
    assert_eq!(messages.as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn each_provider_reports_what_a_call_consumed_and_openai_is_asked_to() {
    let server =
        FakeLlm::start(vec![fake_llm::openai_reply(&["a", "b", "c"], Duration::ZERO)]).await.unwrap();
    let out: Vec<Output> = openai(&server).stream(prompt("hi")).map(Result::unwrap).collect().await;
    let expected = chat_core::Usage { input: fake_llm::FAKE_PROMPT_TOKENS, output: 3, ..Default::default() };
    assert_eq!(out.last(), Some(&Output::Usage(expected)));
    assert_eq!(server.requests()[0].json()["stream_options"], json!({"include_usage": true}));

    let server =
        FakeLlm::start(vec![fake_llm::bedrock_stream(fake_llm::bedrock_frames(&["a", "b"]))]).await.unwrap();
    let out: Vec<Output> = bedrock(&server).await.stream(prompt("hi")).map(Result::unwrap).collect().await;
    assert_eq!(
        out.last(),
        Some(&Output::Usage(chat_core::Usage { input: 5, output: 2, ..Default::default() }))
    );
}

#[tokio::test]
async fn bedrock_cache_reads_and_writes_are_read_from_the_metadata_usage() {
    let mut frames = fake_llm::bedrock_frames(&["a", "b"]);
    *frames.last_mut().unwrap() = fake_llm::bedrock_event(
        "metadata",
        json!({"usage": {"inputTokens": 5, "outputTokens": 2, "totalTokens": 1207,
                         "cacheReadInputTokens": 1000, "cacheWriteInputTokens": 200},
               "metrics": {"latencyMs": 10}}),
    );
    let server = FakeLlm::start(vec![fake_llm::bedrock_stream(frames)]).await.unwrap();
    let out: Vec<Output> = bedrock(&server).await.stream(prompt("hi")).map(Result::unwrap).collect().await;
    let expected = chat_core::Usage { input: 5, output: 2, cache_read: 1000, cache_write: 200 };
    assert_eq!(out.last(), Some(&Output::Usage(expected)));
}

/// A harness whose store counts each user's tokens against a daily budget.
async fn budgeted_harness(model: Model) -> Harness {
    let dynamo = chat_testkit::LocalDynamo::start(0, "providers").await.unwrap();
    let options = StoreOptions { daily_token_budget: 1_000_000, ..StoreOptions::default() };
    let store = dynamo.store("providers", options);
    let generator = generator::Generator::new(store.clone(), model, settings());
    Harness { _dynamo: dynamo, store, generator }
}

#[tokio::test]
async fn a_turns_reported_usage_is_charged_to_its_user_and_an_unreported_one_is_estimated() {
    let server =
        FakeLlm::start(vec![fake_llm::openai_reply(&["one ", "two"], Duration::ZERO)]).await.unwrap();
    let h = budgeted_harness(openai(&server)).await;
    let user = UserId::parse(TESTER).unwrap();
    h.turn(None, "count me").await;
    assert_eq!(h.store.tokens_used_today(&user).await.unwrap(), fake_llm::FAKE_PROMPT_TOKENS + 2);

    // A server that reports no usage: the prompt and the reply are counted with o200k_base.
    let mut parts = vec![(Duration::ZERO, fake_llm::openai_chunk("three words here"))];
    let finish = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).to_string();
    parts.push((Duration::ZERO, fake_llm::sse_data(&finish)));
    parts.push((Duration::ZERO, fake_llm::sse_data("[DONE]")));
    server.script(vec![fake_llm::Reply::Stream { content_type: "text/event-stream".to_owned(), parts }]);
    h.turn(None, "and me").await;
    let used = h.store.tokens_used_today(&user).await.unwrap() - (fake_llm::FAKE_PROMPT_TOKENS + 2);
    // "three words here" is 3 tokens; the prompt is the message and its framing.
    assert!((3 + 5..=3 + 20).contains(&used), "estimated {used}");
}

/// A system prompt past every caching model's minimum (2048 tokens for Claude 3.5 Haiku): 2,100
/// bytes, which need not be as many tokens, but may be.
fn long_system_prompt() -> String {
    "Answer briefly and exactly. ".repeat(75)
}

/// The Bedrock request's system and messages for `prompt`, from a model with `cache_points`.
async fn bedrock_request(model: &str, cache_points: CachePoints, prompt: Prompt) -> serde_json::Value {
    let server =
        FakeLlm::start(vec![fake_llm::bedrock_stream(fake_llm::bedrock_frames(&["ok"]))]).await.unwrap();
    let out: Vec<_> = bedrock_with(&server, model, cache_points).await.stream(prompt).collect().await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let body = server.requests()[0].json();
    json!({"system": body["system"], "messages": body["messages"]})
}

const CACHE_POINT: &str = r#"{"cachePoint":{"type":"default"}}"#;

#[tokio::test]
async fn bedrock_cache_points_follow_the_system_prompt_and_the_history_before_this_turns_message() {
    let system = long_system_prompt();
    let cache = serde_json::from_str::<serde_json::Value>(CACHE_POINT).unwrap();
    let long = Prompt { system: Some(system.clone()), ..prompt("now") };
    let marked = json!({
        "system": [{"text": system}, cache],
        "messages": [
            {"role": "user", "content": [{"text": "earlier"}]},
            {"role": "assistant", "content": [{"text": "reply"}, cache]},
            {"role": "user", "content": [{"text": "now"}]},
        ],
    });
    for model in ["us.anthropic.claude-sonnet-4-20250514-v1:0", "amazon.nova-lite-v1:0"] {
        assert_eq!(bedrock_request(model, CachePoints::Auto, long.clone()).await, marked, "{model}");
    }
    // `on` marks any model; `auto` only the known ones; `off` none.
    assert_eq!(
        bedrock_request("meta.llama3-1-70b-instruct-v1:0", CachePoints::On, long.clone()).await,
        marked
    );
    let plain = json!({
        "system": [{"text": system}],
        "messages": [
            {"role": "user", "content": [{"text": "earlier"}]},
            {"role": "assistant", "content": [{"text": "reply"}]},
            {"role": "user", "content": [{"text": "now"}]},
        ],
    });
    assert_eq!(
        bedrock_request("meta.llama3-1-70b-instruct-v1:0", CachePoints::Auto, long.clone()).await,
        plain
    );
    assert_eq!(
        bedrock_request("anthropic.claude-opus-4-20250514-v1:0", CachePoints::Off, long.clone()).await,
        plain
    );
}

#[tokio::test]
async fn bedrock_cache_points_skip_a_prefix_too_short_to_be_cached() {
    let model = "anthropic.claude-3-7-sonnet-20250219-v1:0";
    // 15 bytes of system prompt and 12 of history: surely under 1024 tokens.
    let body = bedrock_request(model, CachePoints::Auto, prompt("now")).await;
    assert!(!body.to_string().contains("cachePoint"), "{body}");

    // A short system prompt, but a long history: only the history's point is worth it.
    let history = "word ".repeat(300);
    let prompt = Prompt {
        system: Some("Be brief.".to_owned()),
        messages: vec![
            (Role::User, history.clone()),
            (Role::Assistant, "reply".to_owned()),
            (Role::User, "now".to_owned()),
        ],
        ..Prompt::default()
    };
    let body = bedrock_request(model, CachePoints::Auto, prompt).await;
    assert_eq!(body["system"], json!([{"text": "Be brief."}]));
    assert_eq!(
        body["messages"][1]["content"][1],
        serde_json::from_str::<serde_json::Value>(CACHE_POINT).unwrap()
    );
    assert_eq!(body.to_string().matches("cachePoint").count(), 1, "{body}");
}

/// The messages of a recorded request exactly as they went on the wire.
fn wire_messages(request: &fake_llm::Recorded) -> String {
    let raw = String::from_utf8(request.body.clone()).unwrap();
    let messages = serde_json::to_string(&request.json()["messages"]).unwrap();
    assert!(raw.contains(&messages), "the messages re-serialise to their wire bytes");
    messages
}

/// `earlier`'s messages, without the closing bracket, start `later`'s: the provider's prompt
/// cache can serve all of them.
fn assert_byte_prefix(earlier: &str, later: &str) {
    let open = earlier.strip_suffix(']').unwrap();
    assert!(later.starts_with(open), "not a byte prefix:\n{earlier}\n{later}");
    assert!(later.len() > earlier.len());
}

#[tokio::test]
async fn consecutive_turns_of_a_conversation_send_openai_a_byte_stable_prefix() {
    let server =
        FakeLlm::start(vec![fake_llm::openai_reply(&["One ", "reply."], Duration::ZERO)]).await.unwrap();
    let h = harness(
        openai(&server),
        generator::GenerationSettings { system_prompt: Some(long_system_prompt()), ..settings() },
    )
    .await;
    let (session, _) = h.turn(None, "first question").await;
    for (i, text) in ["second question", "third question"].into_iter().enumerate() {
        server.script(vec![fake_llm::openai_reply(&["Another ", "reply."], Duration::ZERO)]);
        h.turn(Some(session), text).await;
        let requests = server.requests();
        let (earlier, later) = (&requests[i], &requests[i + 1]);
        assert_byte_prefix(&wire_messages(earlier), &wire_messages(later));
        // Nothing else in the request differs between the turns (the tools, the settings).
        let rest = |r: &fake_llm::Recorded| {
            let mut body = r.json();
            body.as_object_mut().unwrap().remove("messages");
            body
        };
        assert_eq!(rest(earlier), rest(later));
    }
}

#[tokio::test]
async fn consecutive_turns_of_a_conversation_send_bedrock_a_stable_prefix_with_moving_cache_points() {
    let frames = || fake_llm::bedrock_stream(fake_llm::bedrock_frames(&["One ", "reply."]));
    let server = FakeLlm::start(vec![frames()]).await.unwrap();
    let model = bedrock_with(&server, "anthropic.claude-3-7-sonnet-20250219-v1:0", CachePoints::Auto).await;
    let h = harness(
        model,
        generator::GenerationSettings { system_prompt: Some(long_system_prompt()), ..settings() },
    )
    .await;
    let (session, _) = h.turn(None, "first question").await;
    for text in ["second question", "third question"] {
        server.script(vec![frames()]);
        h.turn(Some(session), text).await;
    }
    let requests = server.requests();
    let bodies: Vec<serde_json::Value> = requests.iter().map(fake_llm::Recorded::json).collect();
    for body in &bodies {
        assert_eq!(body["system"][1], serde_json::from_str::<serde_json::Value>(CACHE_POINT).unwrap());
    }
    // Each turn's point is after the reply before its message: the first turn has none.
    let points = |body: &serde_json::Value| -> Vec<usize> {
        let messages = body["messages"].as_array().unwrap();
        (0..messages.len()).filter(|&i| messages[i]["content"].to_string().contains("cachePoint")).collect()
    };
    assert_eq!(bodies.iter().map(points).collect::<Vec<_>>(), vec![vec![], vec![1], vec![3]]);
    // Without the cache points (markers, not content), each turn's messages start the next's.
    let content = |body: &serde_json::Value| {
        let messages = serde_json::to_string(&body["messages"]).unwrap();
        messages.replace(&format!(",{CACHE_POINT}"), "")
    };
    for pair in bodies.windows(2) {
        assert_byte_prefix(&content(&pair[0]), &content(&pair[1]));
    }
}

#[tokio::test]
async fn a_bedrock_turns_cache_reads_and_writes_reach_the_reply_usage_and_are_priced_by_kind() {
    let mut frames = fake_llm::bedrock_frames(&["Cached", " answer."]);
    *frames.last_mut().unwrap() = fake_llm::bedrock_event(
        "metadata",
        json!({"usage": {"inputTokens": 12, "outputTokens": 2, "totalTokens": 2014,
                         "cacheReadInputTokens": 1500, "cacheWriteInputTokens": 500},
               "metrics": {"latencyMs": 10}}),
    );
    let server = FakeLlm::start(vec![fake_llm::bedrock_stream(frames)]).await.unwrap();
    let model = bedrock_with(&server, "anthropic.claude-3-7-sonnet-20250219-v1:0", CachePoints::Auto).await;
    let dynamo = chat_testkit::LocalDynamo::start(0, "providers").await.unwrap();
    let store = dynamo.store("providers", StoreOptions::default());
    let price = generator::pricing::ModelPrice {
        input: 3.0,
        output: 15.0,
        cache_read: Some(0.3),
        cache_write: Some(3.75),
    };
    let generator = generator::Generator::new(store.clone(), model, settings())
        .with_prices(generator::pricing::Prices::of([("model".to_owned(), price)]));
    let h = Harness { _dynamo: dynamo, store, generator };
    let (session, turn) = h.turn(None, "hello").await;
    let reply = h.store.get_message(session, turn, Role::Assistant, Read::Consistent).await.unwrap().unwrap();
    assert_eq!(
        reply.usage,
        Some(chat_core::Usage { input: 12, output: 2, cache_read: 1500, cache_write: 500 })
    );
    let cost = reply.cost_usd.expect("the model has a price for every kind");
    let expected = (12.0 * 3.0 + 2.0 * 15.0 + 1500.0 * 0.3 + 500.0 * 3.75) / 1e6;
    assert!((cost - expected).abs() < 1e-12, "cost {cost}, expected {expected}");
}
