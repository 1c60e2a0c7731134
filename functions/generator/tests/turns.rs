//! The generator's decisions around a turn, against the fake OpenAI server and the embedded
//! emulator: which model answers (response routing, recorded with the reply), the summary of a
//! session that went idle (stored once, used as memory when the user comes back), and a turn
//! whose session is deleted while it streams (nothing is left behind).

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use chat_core::job::TurnMessage;
use chat_core::{
    NewMessage, Outcome, Read, SendOutcome, SessionId, State, Store, StoreOptions, Turn, UserId,
};
use chat_core::{ReplyEvent, Role, ToolUse, Usage};
use chat_testkit::fake_llm::{self, FakeLlm};
use generator::llm::openai::OpenAiSettings;
use generator::llm::{Model, OpenAi, RetryPolicy};
use generator::pricing::{ModelPrice, Prices};
use generator::routing::{NamedModel, RouteRule, Routes};
use generator::tools::Tools;
use std::sync::Arc;
use std::time::Duration;

const USER: &str = "lifecycle-user";

struct Harness {
    _dynamo: chat_testkit::LocalDynamo,
    store: Store,
    generator: Arc<generator::Generator>,
}

async fn harness(server: &FakeLlm) -> Harness {
    harness_routed(server, None, Tools::none()).await
}

fn openai_model(server: &FakeLlm, name: &str) -> Model {
    let provider = OpenAi::new(OpenAiSettings {
        base_url: format!("{}/v1", server.url),
        api_key: Some("sk-test".to_owned()),
        model: name.to_owned(),
        temperature: None,
        max_tokens: 256,
        max_tokens_field: "max_tokens",
        connect_timeout: Duration::from_secs(2),
        stream_usage: true,
    })
    .unwrap();
    let policy = RetryPolicy {
        max_attempts: 1,
        base: Duration::from_millis(1),
        cap: Duration::from_millis(1),
        idle_timeout: Duration::from_secs(5),
    };
    Model::new(Arc::new(provider), policy)
}

/// A harness whose main model is `big-model`, routing short messages to `small-model` by `small`.
async fn harness_routed(server: &FakeLlm, small: Option<RouteRule>, tools: Tools) -> Harness {
    harness_with(server, small, tools, Duration::from_secs(60)).await
}

/// [`harness_routed`], with no tool running past `tool_deadline` into a turn.
async fn harness_with(
    server: &FakeLlm,
    small: Option<RouteRule>,
    tools: Tools,
    tool_deadline: Duration,
) -> Harness {
    harness_with_options(
        server,
        small,
        tools,
        tool_deadline,
        StoreOptions::default(),
        Prices::default(),
        |_| (),
    )
    .await
}

/// [`harness_with`] over a store with `options`, its settings changed by `adjust`.
async fn harness_with_options(
    server: &FakeLlm,
    small: Option<RouteRule>,
    tools: Tools,
    tool_deadline: Duration,
    options: StoreOptions,
    prices: Prices,
    adjust: impl FnOnce(&mut generator::GenerationSettings),
) -> Harness {
    let dynamo = chat_testkit::LocalDynamo::start(0, "turns").await.unwrap();
    let store = dynamo.store("turns", options);
    let routes = Routes {
        main: NamedModel { model: openai_model(server, "big-model"), name: "big-model".to_owned() },
        small: small.map(|rule| {
            (NamedModel { model: openai_model(server, "small-model"), name: "small-model".to_owned() }, rule)
        }),
    };
    let mut settings = generator::GenerationSettings {
        lease: Duration::from_secs(30),
        max_generation_attempts: 3,
        flush_interval: Duration::from_millis(10),
        flush_max_tokens: 1,
        faults: false,
        system_prompt: Some("Be brief.".to_owned()),
        memory: Default::default(),
        reply_max_bytes: 300_000,
        tool_deadline,
    };
    adjust(&mut settings);
    let generator = Arc::new(
        generator::Generator::new(store.clone(), routes, settings).with_tools(tools).with_prices(prices),
    );
    Harness { _dynamo: dynamo, store, generator }
}

fn event(message: TurnMessage) -> SqsEvent {
    let mut record = SqsMessage::default();
    record.message_id = Some("m".to_owned());
    record.body = Some(serde_json::to_string(&message).unwrap());
    let mut event = SqsEvent::default();
    event.records = vec![record];
    event
}

impl Harness {
    /// Sends and commits `text`; the turn waits for the generator.
    async fn send(&self, session: Option<SessionId>, text: &str) -> (SessionId, Turn) {
        let user = UserId::parse(USER).unwrap();
        let message = NewMessage { user: &user, session, content: text, client_message_id: None, by: "t" };
        let SendOutcome::Accepted(ticket) = self.store.send_message(message).await.unwrap() else {
            panic!("send refused")
        };
        let Outcome::Applied(ticket) = self.store.commit_user_message(&ticket, "t").await.unwrap() else {
            panic!("commit refused")
        };
        (ticket.session_id, ticket.turn)
    }

    async fn run(&self, message: TurnMessage) {
        let response = self.generator.handle(event(message)).await;
        assert!(response.batch_item_failures.is_empty(), "the generator asked for a redelivery");
    }

    async fn turn(&self, session: Option<SessionId>, text: &str) -> (SessionId, Turn) {
        let (session, turn) = self.send(session, text).await;
        self.run(TurnMessage::reply(session, turn)).await;
        (session, turn)
    }
}

fn system_and_texts(server: &FakeLlm, request: usize) -> (String, Vec<String>) {
    let body = server.requests()[request].json();
    let messages = body["messages"].as_array().unwrap();
    let system = messages[0]["content"].as_str().unwrap().to_owned();
    let texts = messages[1..].iter().map(|m| m["content"].as_str().unwrap().to_owned()).collect();
    (system, texts)
}

#[tokio::test]
async fn an_idle_session_is_summarised_once_and_the_summary_stands_in_for_the_turns_it_covers() {
    let server = FakeLlm::start(vec![
        fake_llm::openai_reply(&["Hello ", "Ada."], Duration::ZERO),
        fake_llm::openai_reply(&["Rust ", "it is."], Duration::ZERO),
        fake_llm::openai_reply(&["Ada ", "is learning ", "Rust."], Duration::ZERO),
        fake_llm::openai_reply(&["Yes."], Duration::ZERO),
    ])
    .await
    .unwrap();
    let h = harness(&server).await;
    let (session, _) = h.turn(None, "My name is Ada.").await;
    let (_, turn2) = h.turn(Some(session), "I want to learn Rust.").await;

    // The sweeper found it idle: IdleExpired (settling first), and the summary is pending.
    let current = h.store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    assert!(matches!(h.store.expire_idle(&current, "sweeper").await.unwrap(), Outcome::Applied(_)));
    let expired = h.store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    assert_eq!((expired.state, expired.summary_pending), (State::Timeout, true));
    let events: Vec<_> = h.store.transitions(session).await.unwrap().into_iter().map(|t| t.event).collect();
    assert_eq!(&events[events.len() - 2..], &[chat_core::Event::Settle, chat_core::Event::IdleExpired]);

    h.run(TurnMessage::summary(session, turn2)).await;
    let (system, texts) = system_and_texts(&server, 2);
    assert!(system.contains("memory of a conversation"), "{system}");
    assert_eq!(
        texts,
        ["User: My name is Ada.\nAssistant: Hello Ada.\nUser: I want to learn Rust.\nAssistant: Rust it is."]
    );
    let summarised = h.store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    let summary = summarised.summary.clone().expect("a summary");
    assert_eq!((summary.text.as_str(), summary.through), ("Ada is learning Rust.", turn2));
    assert!(!summarised.summary_pending);
    assert_eq!(summarised.due_at, None, "nothing left for the sweeper to do");
    assert_eq!(summarised.version, expired.version, "a summary is not a transition");

    // A duplicate job finds nothing pending and asks the model nothing.
    h.run(TurnMessage::summary(session, turn2)).await;
    assert_eq!(server.requests().len(), 3);

    // The user comes back: the summary is in the system prompt, standing in for turn 1; the
    // turn it ends with is still there word for word.
    h.turn(Some(session), "Do you remember me?").await;
    let (system, texts) = system_and_texts(&server, 3);
    assert_eq!(
        system,
        "Be brief.\n\nSummary of the conversation so far (through turn 2): Ada is learning Rust."
    );
    assert_eq!(texts, ["I want to learn Rust.", "Rust it is.", "Do you remember me?"]);
}

#[tokio::test]
async fn a_session_deleted_while_its_reply_streams_leaves_nothing_behind_and_is_still_charged() {
    // A slow reply: the delete lands between its chunks.
    let tokens: Vec<String> = (0..40).map(|i| format!("t{i} ")).collect();
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let server =
        FakeLlm::start(vec![fake_llm::openai_reply(&tokens, Duration::from_millis(25))]).await.unwrap();
    let options = StoreOptions { daily_token_budget: 1_000_000, ..StoreOptions::default() };
    let h = harness_with_options(
        &server,
        None,
        Tools::none(),
        Duration::from_secs(60),
        options,
        Prices::default(),
        |_| (),
    )
    .await;
    let (session, turn) = h.send(None, "Tell me a long story.").await;
    let generator = h.generator.clone();
    let running =
        tokio::spawn(async move { generator.handle(event(TurnMessage::reply(session, turn))).await });
    // Wait for the stream to be under way, then delete the session.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.store.read_chunks(session, turn, None, Read::Consistent).await.unwrap().len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the reply never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let user = UserId::parse(USER).unwrap();
    assert!(matches!(
        h.store.delete_session(session, Some(&user)).await.unwrap(),
        chat_core::DeleteOutcome::Deleted { .. }
    ));
    let response = running.await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    // The generator saw the session gone at its next chunk and cleared what it wrote after the
    // delete's sweep: the partition is empty, with no TTL needed to get there.
    assert!(h.store.get_session(session, Read::Consistent).await.unwrap().is_none());
    assert_eq!(h.store.clear_if_deleted(session).await.unwrap(), 0, "nothing was left to clear");
    assert!(h.store.read_chunks(session, turn, None, Read::Consistent).await.unwrap().is_empty());
    assert!(h.store.transitions(session).await.unwrap().is_empty());
    // Deleting the session mid-reply does not make what the model consumed free.
    assert!(h.store.tokens_used_today(&user).await.unwrap() > 0, "the abandoned turn was charged");
}

#[tokio::test]
async fn short_simple_messages_go_to_the_small_model_and_the_choice_is_stored_with_the_reply() {
    let server = FakeLlm::start(vec![
        fake_llm::openai_reply(&["Noon."], Duration::ZERO),
        fake_llm::openai_reply(&["A long answer."], Duration::ZERO),
        fake_llm::openai_reply(&["Fixed."], Duration::ZERO),
    ])
    .await
    .unwrap();
    let h = harness_routed(&server, Some(RouteRule { max_chars: 40 }), Tools::none()).await;
    let (session, t1) = h.turn(None, "What time is it?").await;
    let (_, t2) = h.turn(Some(session), &"Explain the borrow checker in depth, please. ".repeat(3)).await;
    let (_, t3) = h.turn(Some(session), "Fix this:\n\n```fn main() {}```").await;
    let asked: Vec<String> =
        server.requests().iter().map(|r| r.json()["model"].as_str().unwrap().to_owned()).collect();
    assert_eq!(asked, ["small-model", "big-model", "big-model"]);
    let (_, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    let routing = |turn: Turn| {
        let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == chat_core::Role::Assistant);
        reply.and_then(|m| m.routing.clone()).map(|r| (r.route, r.model))
    };
    assert_eq!(routing(t1), Some(("small".to_owned(), "small-model".to_owned())));
    assert_eq!(routing(t2), Some(("main".to_owned(), "big-model".to_owned())));
    assert_eq!(routing(t3), Some(("main".to_owned(), "big-model".to_owned())));
}

#[tokio::test]
async fn a_tool_step_streams_its_call_and_result_and_the_reply_is_stored_with_them() {
    let arguments = r#"{"expression":"6*7"}"#;
    let server = FakeLlm::start(vec![
        fake_llm::openai_tool_calls("Let me check. ", &[("c1", "calculator", arguments)]),
        fake_llm::openai_reply(&["The ", "answer ", "is 42."], Duration::ZERO),
    ])
    .await
    .unwrap();
    let h = harness_routed(&server, None, Tools::builtin()).await;
    let (session, turn) = h.turn(None, "What is six times seven?").await;

    // The sequence: text, the call, the tool's answer, text; each entry its own index.
    let chunks = h.store.read_chunks(session, turn, None, Read::Consistent).await.unwrap();
    let entries: Vec<String> = chunks.iter().flat_map(|c| c.tokens.iter().cloned()).collect();
    let shown: Vec<String> = entries
        .iter()
        .map(|t| match ReplyEvent::decode(t) {
            Some(e) => format!("<{} {}>", e.event, e.data["id"].as_str().unwrap()),
            None => t.clone(),
        })
        .collect();
    assert_eq!(shown, ["Let me check. ", "<tool_call c1>", "<tool_result c1>", "The ", "answer ", "is 42."]);
    let result = ReplyEvent::decode(&entries[2]).unwrap();
    assert_eq!(result.data["content"], "42");
    assert_eq!(result.data["is_error"], false);

    // The committed reply is the text, exactly what the token events carry (law 4), with the
    // tool use stored beside it.
    let (_, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    let text: String = entries.iter().filter(|t| ReplyEvent::decode(t).is_none()).cloned().collect();
    assert_eq!(reply.content, "Let me check. The answer is 42.");
    assert_eq!(reply.content, text);
    assert_eq!(
        reply.tool_uses,
        vec![ToolUse {
            id: "c1".to_owned(),
            name: "calculator".to_owned(),
            arguments: arguments.to_owned(),
            result: "42".to_owned(),
            is_error: false,
        }]
    );
    // The model's second call carried the step: its call and the calculator's answer.
    let messages = server.requests()[1].json()["messages"].clone();
    let tool = messages.as_array().unwrap().iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!((tool["tool_call_id"].as_str(), tool["content"].as_str()), (Some("c1"), Some("42")));
}

#[tokio::test]
async fn a_model_that_keeps_calling_tools_is_made_to_answer_after_the_step_limit() {
    let again = || fake_llm::openai_tool_calls("", &[("c", "current_time", "{}")]);
    let server = FakeLlm::start(vec![again(), again(), fake_llm::openai_reply(&["Done."], Duration::ZERO)])
        .await
        .unwrap();
    let tools = Tools::builtin().with_max_steps(2);
    let h = harness_routed(&server, None, tools).await;
    let (session, turn) = h.turn(None, "Keep checking the time.").await;
    let requests = server.requests();
    assert_eq!(requests.len(), 3, "two tool steps, then the answer");
    assert!(requests[0].json()["tools"].is_array() && requests[1].json()["tools"].is_array());
    assert_eq!(requests[2].json()["tool_choice"], "none", "the model must answer after the limit");
    let (_, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.tool_uses.len(), 2);
    assert_eq!(reply.content, "Done.");
}

#[tokio::test]
async fn a_generator_taking_over_mid_tool_step_goes_on_from_the_stored_call_and_result() {
    let server = FakeLlm::start(vec![fake_llm::openai_reply(&["The ", "answer ", "is 42."], Duration::ZERO)])
        .await
        .unwrap();
    let h = harness_routed(&server, None, Tools::builtin()).await;
    let (session, turn) = h.send(None, "What is six times seven?").await;
    // A first generator took a tool step, stored it, and stalled.
    let claim =
        h.store.claim_generation(session, turn, "gen-first", Duration::from_millis(1), 3).await.unwrap();
    let chat_core::ClaimOutcome::Claimed(first) = claim else { panic!("{claim:?}") };
    let call = generator::llm::ToolCall {
        id: "c1".to_owned(),
        name: "calculator".to_owned(),
        arguments: r#"{"expression":"6*7"}"#.to_owned(),
    };
    let answer = generator::tools::ToolAnswer { content: "42".to_owned(), is_error: false };
    let entries = vec![
        "Let me check. ".to_owned(),
        generator::tools::call_event(&call).encode(),
        generator::tools::result_event(&call, &answer).encode(),
    ];
    h.store.append_chunk(&first, 0, 0, &entries).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    // The redelivery takes the turn over and goes on after the tool step.
    h.run(TurnMessage::reply(session, turn)).await;
    let messages = server.requests()[0].json()["messages"].clone();
    let messages = messages.as_array().unwrap();
    let step = messages.iter().find(|m| m["tool_calls"].is_array()).expect("the call is replayed");
    assert_eq!(step["content"], "Let me check. ");
    assert_eq!(step["tool_calls"][0]["id"], "c1");
    assert_eq!(
        messages.last().unwrap(),
        &serde_json::json!({"role": "tool", "tool_call_id": "c1", "content": "42"})
    );
    assert!(server.requests()[0].json()["tools"].is_array(), "a step is left: tools are still offered");
    let (_, stored) = h.store.get_conversation(session).await.unwrap().unwrap();
    let reply = stored.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.content, "Let me check. The answer is 42.");
    assert_eq!(
        reply.tool_uses.iter().map(|u| (u.id.as_str(), u.result.as_str())).collect::<Vec<_>>(),
        [("c1", "42")]
    );
}

#[tokio::test]
async fn a_short_message_that_needs_a_tool_is_handed_from_the_small_model_to_the_main_one() {
    let server = FakeLlm::start(vec![
        fake_llm::openai_tool_calls("", &[("c1", "calculator", r#"{"expression":"6*7"}"#)]),
        fake_llm::openai_reply(&["42."], Duration::ZERO),
    ])
    .await
    .unwrap();
    let h = harness_routed(&server, Some(RouteRule { max_chars: 40 }), Tools::builtin()).await;
    let (session, turn) = h.turn(None, "What is 6*7?").await;
    let asked: Vec<String> =
        server.requests().iter().map(|r| r.json()["model"].as_str().unwrap().to_owned()).collect();
    assert_eq!(asked, ["small-model", "big-model"], "the tool step and the answer are the main model's");
    let (_, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    let routing = reply.routing.clone().unwrap();
    assert_eq!((routing.route.as_str(), routing.model.as_str()), ("escalated", "big-model"));
    assert_eq!(reply.content, "42.");
}

#[tokio::test]
async fn a_flood_of_tool_calls_runs_only_the_steps_cap_and_every_stored_item_fits() {
    // A step of 40 calls of 3 KB each, then a step of 40 calls of 10 KB each: 400 KB of calls,
    // which once went into one chunk item, over DynamoDB's 400 KB, and failed the turn.
    let small = format!("{{\"expression\":\"1+1\",\"note\":\"{}\"}}", "x".repeat(3_000));
    let big = format!("{{\"expression\":\"2+2\",\"note\":\"{}\"}}", "y".repeat(10_000));
    let ids: Vec<String> = (0..80).map(|i| format!("call_{i}")).collect();
    let step = |ids: &[String], arguments: &str| -> Vec<(String, String, String)> {
        ids.iter().map(|id| (id.clone(), "calculator".to_owned(), arguments.to_owned())).collect()
    };
    let (first, second) = (step(&ids[..40], &small), step(&ids[40..], &big));
    fn borrow(calls: &[(String, String, String)]) -> Vec<(&str, &str, &str)> {
        calls.iter().map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())).collect()
    }
    let server = FakeLlm::start(vec![
        fake_llm::openai_tool_calls("Many. ", &borrow(&first)),
        fake_llm::openai_tool_calls("Huge. ", &borrow(&second)),
        fake_llm::openai_reply(&["Done."], Duration::ZERO),
    ])
    .await
    .unwrap();
    let h = harness_routed(&server, None, Tools::builtin()).await;
    let (session, turn) = h.turn(None, "Calculate a lot.").await;
    let (stored, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    assert_eq!(stored.state, State::AiCommitted, "{stored:?}");
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.content, "Many. Huge. Done.");
    assert_eq!(reply.tool_uses.len(), 80, "every call is answered");
    let ran: Vec<&ToolUse> = reply.tool_uses.iter().filter(|u| !u.is_error).collect();
    assert_eq!(ran.len(), 8, "TOOL_MAX_CALLS_PER_STEP (8) of the first step ran, none of the second");
    assert!(ran.iter().all(|u| u.result == "2" && u.arguments == small));
    for refused in &reply.tool_uses[8..40] {
        assert!(refused.result.contains("too many tool calls") && refused.arguments == "{}", "{refused:?}");
    }
    for refused in &reply.tool_uses[40..48] {
        assert!(refused.result.contains("over 4096 bytes") && refused.arguments == "{}", "{refused:?}");
    }
    for refused in &reply.tool_uses[48..] {
        assert!(refused.result.contains("too many tool calls") && refused.arguments == "{}", "{refused:?}");
    }
    let chunks = h.store.read_chunks(session, turn, None, Read::Consistent).await.unwrap();
    let largest = chunks.iter().map(|c| c.tokens.iter().map(String::len).sum::<usize>()).max().unwrap();
    assert!(largest < 100_000, "a chunk of {largest} bytes");
    // The model was told, in its own format, which calls ran and which did not.
    let messages = server.requests()[1].json()["messages"].clone();
    let answers: Vec<&serde_json::Value> =
        messages.as_array().unwrap().iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(answers.len(), 40);
    assert_eq!(answers[0]["content"], "2");
    assert!(answers[39]["content"].as_str().unwrap().contains("too many tool calls"));
}

#[tokio::test]
async fn no_tool_runs_past_the_turns_tool_deadline() {
    // The model takes longer than the turn's tool deadline to ask for the calculator.
    let mut slow =
        fake_llm::openai_tool_calls("Let me see. ", &[("c1", "calculator", r#"{"expression":"6*7"}"#)]);
    if let fake_llm::Reply::Stream { parts, .. } = &mut slow {
        parts[0].0 = Duration::from_millis(600);
    }
    let server =
        FakeLlm::start(vec![slow, fake_llm::openai_reply(&["Out of time."], Duration::ZERO)]).await.unwrap();
    let h = harness_with(&server, None, Tools::builtin(), Duration::from_millis(300)).await;
    let (session, turn) = h.turn(None, "What is six times seven?").await;
    let (_, messages) = h.store.get_conversation(session).await.unwrap().unwrap();
    let reply = messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.tool_uses.len(), 1);
    let answer = &reply.tool_uses[0];
    assert!(answer.is_error && answer.result.contains("ran out of time"), "the tool did not run: {answer:?}");
    assert_eq!(server.requests()[1].json()["tool_choice"], "none", "and the model must answer");
}

/// An OpenAI `usage` object: `prompt` tokens, `cached` of them read from the prompt cache.
fn openai_usage(prompt: u64, cached: u64, completion: u64) -> serde_json::Value {
    serde_json::json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}})
}

#[tokio::test]
async fn a_tool_turns_usage_is_the_sum_of_its_model_calls_with_cached_tokens_apart_and_priced() {
    let arguments = r#"{"expression":"6*7"}"#;
    let server = FakeLlm::start(vec![
        fake_llm::with_openai_usage(
            fake_llm::openai_tool_calls("Let me check. ", &[("c1", "calculator", arguments)]),
            openai_usage(100, 60, 10),
        ),
        fake_llm::with_openai_usage(
            fake_llm::openai_reply(&["It ", "is 42."], Duration::ZERO),
            openai_usage(150, 100, 5),
        ),
    ])
    .await
    .unwrap();
    let price = ModelPrice { input: 3.0, output: 15.0, cache_read: Some(0.3), cache_write: Some(3.75) };
    let prices = Prices::of([("big-model".to_owned(), price)]);
    let h = harness_with_options(
        &server,
        None,
        Tools::builtin(),
        Duration::from_secs(60),
        StoreOptions::default(),
        prices,
        |_| (),
    )
    .await;
    let (session, turn) = h.turn(None, "What is six times seven?").await;

    // Both calls asked for their usage.
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "a tool step, then the answer");
    for request in &requests {
        assert_eq!(request.json()["stream_options"], serde_json::json!({"include_usage": true}));
    }
    // Fresh input is the prompt less its cached part; every kind is summed over both calls.
    let reply = h.store.get_message(session, turn, Role::Assistant, Read::Consistent).await.unwrap().unwrap();
    let usage =
        Usage { input: (100 - 60) + (150 - 100), output: 10 + 5, cache_read: 60 + 100, cache_write: 0 };
    assert_eq!(reply.usage, Some(usage));
    let cost = reply.cost_usd.expect("big-model has a price");
    let expected = (90.0 * 3.0 + 15.0 * 15.0 + 160.0 * 0.3) / 1e6;
    assert!((cost - expected).abs() < 1e-12, "cost {cost}, expected {expected}");
}

#[tokio::test]
async fn a_reply_of_a_model_without_a_price_keeps_its_usage_and_has_no_cost() {
    let server = FakeLlm::start(vec![fake_llm::with_openai_usage(
        fake_llm::openai_reply(&["Hi", "!"], Duration::ZERO),
        openai_usage(20, 0, 2),
    )])
    .await
    .unwrap();
    let price = ModelPrice { input: 1.0, output: 1.0, cache_read: None, cache_write: None };
    let prices = Prices::of([("some-other-model".to_owned(), price)]);
    let h = harness_with_options(
        &server,
        None,
        Tools::none(),
        Duration::from_secs(60),
        StoreOptions::default(),
        prices,
        |_| (),
    )
    .await;
    let (session, turn) = h.turn(None, "hello").await;
    let reply = h.store.get_message(session, turn, Role::Assistant, Read::Consistent).await.unwrap().unwrap();
    assert_eq!(reply.usage, Some(Usage { input: 20, output: 2, ..Usage::default() }));
    assert_eq!(reply.cost_usd, None, "never guessed");
}

/// A tool slower than the turn's lease keeps the turn: the lease is extended while the tool
/// runs, so a re-drive cannot hand the turn to a second generator that would run it again.
#[tokio::test]
async fn a_tool_slower_than_the_lease_keeps_the_turn_for_its_generator() {
    let server = FakeLlm::start(vec![
        fake_llm::openai_tool_calls("Let me check. ", &[("c1", "calculator", r#"{"expression":"6*7"}"#)]),
        fake_llm::openai_reply(&["It is 42."], Duration::ZERO),
    ])
    .await
    .unwrap();
    let lease = Duration::from_millis(400);
    let tools = Tools::builtin().with_call_delay(Duration::from_millis(1500));
    let h = harness_with_options(
        &server,
        None,
        tools,
        Duration::from_secs(60),
        StoreOptions::default(),
        Prices::default(),
        |s| s.lease = lease,
    )
    .await;
    let (session, turn) = h.send(None, "What is six times seven?").await;
    let rival = async {
        // Mid-call, more than two leases after the tool started: a re-drive's claim.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        h.store.claim_generation(session, turn, "gen-rival", lease, 3).await.unwrap()
    };
    let ((), rival) = tokio::join!(h.run(TurnMessage::reply(session, turn)), rival);
    assert!(matches!(rival, chat_core::ClaimOutcome::Skipped { .. }), "the turn was taken over: {rival:?}");
    let (_, stored) = h.store.get_conversation(session).await.unwrap().unwrap();
    let reply = stored.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant).unwrap();
    assert_eq!(reply.content, "Let me check. It is 42.");
    assert_eq!(reply.tool_uses.len(), 1, "the call ran once");
    assert_eq!(server.requests().len(), 2);
}

/// Ingest admits a message against the system prompt alone, so a session's summary must not
/// turn an admitted message into a failed turn: when the message leaves it no room, the turn is
/// answered without the summary.
#[tokio::test]
async fn a_message_that_leaves_the_summary_no_room_is_answered_without_it() {
    let long_summary: Vec<&str> = vec!["Ada is learning Rust. "; 30];
    let server = FakeLlm::start(vec![
        fake_llm::openai_reply(&["Hello ", "Ada."], Duration::ZERO),
        fake_llm::openai_reply(&long_summary, Duration::ZERO),
        fake_llm::openai_reply(&["Noted."], Duration::ZERO),
    ])
    .await
    .unwrap();
    let h = harness_with_options(
        &server,
        None,
        Tools::none(),
        Duration::from_secs(60),
        StoreOptions::default(),
        Prices::default(),
        |s| s.memory.max_tokens = 200,
    )
    .await;
    let (session, turn1) = h.turn(None, "My name is Ada.").await;
    let current = h.store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    assert!(matches!(h.store.expire_idle(&current, "sweeper").await.unwrap(), Outcome::Applied(_)));
    h.run(TurnMessage::summary(session, turn1)).await;
    let summary = h.store.get_session(session, Read::Consistent).await.unwrap().unwrap().summary;
    assert!(summary.is_some_and(|s| s.text.len() > 500), "a summary of ~150 tokens");

    // ~150 tokens: within the budget beside the system prompt, not beside the summary too.
    let message = "please remember this word ".repeat(30);
    let (_, turn) = h.turn(Some(session), message.trim()).await;
    let (_, stored) = h.store.get_conversation(session).await.unwrap().unwrap();
    let reply = stored.iter().find(|m| m.id.turn == turn && m.id.role == Role::Assistant);
    assert_eq!(reply.map(|m| m.content.as_str()), Some("Noted."), "the turn was answered");
    let (system, texts) = system_and_texts(&server, 2);
    assert_eq!(system, "Be brief.", "without the summary");
    assert_eq!(texts, [message.trim()]);
}

#[tokio::test]
async fn the_first_exchange_titles_the_session_with_the_small_model_and_a_rename_stands() {
    let server = FakeLlm::start(vec![
        fake_llm::openai_reply(&["Noon."], Duration::ZERO),
        fake_llm::openai_reply(&["\"Telling", " the time.\"", "\nMore"], Duration::ZERO),
        fake_llm::openai_reply(&["Later."], Duration::ZERO),
    ])
    .await
    .unwrap();
    let mut h = harness_routed(&server, Some(RouteRule { max_chars: 40 }), Tools::none()).await;
    let generator = Arc::try_unwrap(h.generator).ok().expect("one owner").with_model_titles(true);
    h.generator = Arc::new(generator);
    let (session, _) = h.turn(None, "What time is it?").await;
    let stored = h.store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    assert_eq!(stored.title.as_deref(), Some("Telling the time"));
    let (system, texts) = system_and_texts(&server, 1);
    assert!(system.starts_with("Write a title"), "{system}");
    assert_eq!(texts, ["User: What time is it?\n\nAssistant: Noon."]);
    assert_eq!(server.requests()[1].json()["model"], "small-model");
    // Later turns ask for no title; a user's name stands against the model's.
    h.turn(Some(session), "And now?").await;
    assert_eq!(server.requests().len(), 3);
    let user = UserId::parse(USER).unwrap();
    let renamed =
        h.store.set_title(session, Some(&user), "  My chat  ", chat_core::TitleBy::User).await.unwrap();
    assert_eq!(renamed, Outcome::Applied(()));
    let model = h.store.set_title(session, None, "Another", chat_core::TitleBy::Model).await.unwrap();
    assert!(matches!(model, Outcome::Conflict(_)));
    let other = UserId::parse("someone-else").unwrap();
    let theirs = h.store.set_title(session, Some(&other), "Theirs", chat_core::TitleBy::User).await.unwrap();
    assert!(matches!(theirs, Outcome::Conflict(_)));
    let stored = h.store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    assert_eq!(stored.title.as_deref(), Some("My chat"));
}

#[tokio::test]
async fn without_a_small_model_a_session_is_titled_by_its_first_words() {
    let server = FakeLlm::start(vec![fake_llm::openai_reply(&["Hi."], Duration::ZERO)]).await.unwrap();
    let mut h = harness(&server).await;
    let generator = Arc::try_unwrap(h.generator).ok().expect("one owner").with_model_titles(true);
    h.generator = Arc::new(generator);
    let (session, _) = h.turn(None, "## Hello   there, how are you today my good friend?").await;
    assert_eq!(server.requests().len(), 1, "no title call without a small model");
    let stored = h.store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    assert_eq!(stored.title.as_deref(), Some("Hello there, how are you today my good…"));
}
