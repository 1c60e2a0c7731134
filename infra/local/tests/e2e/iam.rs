//! The functions' IAM policies in `template.yaml` against what the functions actually send: every
//! stack records each DynamoDB, SQS, Secrets Manager and Bedrock request a function makes
//! (`chat_local::calls`), and each must be one its function's policy allows, action and resource,
//! with the policy's conditions as that stack's configuration sets them. What a policy grants and
//! no function used is written to `target/e2e-logs/iam.txt`, as information: the template tests
//! hold the grants to exactly the actions the code uses.

use crate::harness::*;
use crate::policies::{grants, logical, template, Grant};
use chat_local::calls::Call;
use serde_norway::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const TURN: Duration = Duration::from_secs(30);

/// Turns of every kind the default stack serves (each function's every route: a reply streamed,
/// a follow-up, the user's sessions listed, a cancel, a failing model, a delivery lost and
/// re-driven by the sweeper, a delete), and the openai stack's start (its generator reads the
/// key's secret); then every stack started so far in this run, theirs included, is checked.
#[tokio::test]
async fn every_aws_call_a_function_sends_is_allowed_by_its_policy() {
    let default = app(&DEFAULT);
    let api = default.api.as_str();
    let someone = user();
    let sent = send_text(api, &someone, "hello, policies", None).await;
    assert_eq!(sent.status, 202, "{}", sent.body);
    let id = sent.body["session_id"].as_str().unwrap().to_owned();
    finish(api, &id, 1).await;
    assert_eq!(send_text(api, &someone, "and again", Some(&id)).await.status, 202);
    finish(api, &id, 2).await;
    let listed = request(reqwest::Method::GET, format!("{api}/users/{someone}/sessions"), None).await;
    assert_eq!(listed.status, 200, "{}", listed.body);

    let long = send_text(api, &user(), "stop me [[reply-tokens:400]]", None).await;
    let long = long.body["session_id"].as_str().unwrap().to_owned();
    let (_, mut reader) = SseReader::open(&format!("{api}/sessions/{long}/stream?turn=1"), None).await;
    while reader.next().await.is_some_and(|e| e.event != "token") {}
    let cancel = request(reqwest::Method::POST, format!("{api}/sessions/{long}/cancel"), None).await;
    assert_eq!(cancel.status, 202, "{}", cancel.body);
    reader.rest().await;

    let failed = send_text(api, &user(), "break [[fail-after:2]]", None).await;
    finish(api, failed.body["session_id"].as_str().unwrap(), 1).await;

    let lost = send_text(api, &user(), "lost [[lose-delivery]]", None).await;
    let lost = chat_core::SessionId::parse(lost.body["session_id"].as_str().unwrap()).unwrap();
    let store = chat_core::Store::new(
        chat_local::dynamodb_client(&default.dynamodb_endpoint),
        default.table.as_str(),
        Default::default(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.get_session(lost, chat_core::Read::Consistent).await.unwrap().is_none_or(|s| s.redrives == 0)
    {
        assert!(Instant::now() < deadline, "the sweeper re-drove no lost delivery in 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let deleted = request(reqwest::Method::DELETE, format!("{api}/sessions/{id}"), None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);

    app(&crate::openai::OPENAI);

    let stacks = started();
    let names: Vec<&str> = stacks.iter().map(|(name, _)| *name).collect();
    // The recording is real: the calls these turns must have made are there.
    let sent_by = |stack: &App, caller: &str, action: &str, resource: &str| {
        stack
            .calls
            .snapshot()
            .keys()
            .any(|c| c.caller == caller && c.action == action && c.resource == resource)
    };
    let table = format!("table/{}", default.table);
    for (caller, action, resource) in [
        ("ingest", "sqs:SendMessage", default.queue_url.as_str()),
        ("ingest", "dynamodb:Query", &format!("{table}/index/by_user")),
        ("generator", "dynamodb:PutItem", &table),
        ("stream", "dynamodb:Query", &table),
        ("sweeper", "dynamodb:Query", &format!("{table}/index/due_by_time")),
        ("sweeper", "sqs:SendMessage", &default.queue_url),
    ] {
        assert!(
            sent_by(default, caller, action, resource),
            "no {action} on {resource} from {caller} recorded"
        );
    }
    let openai = app(&crate::openai::OPENAI);
    let secret = openai.function_var("OPENAI_API_KEY_SECRET_ARN").unwrap();
    assert!(
        sent_by(openai, "generator", "secretsmanager:GetSecretValue", secret),
        "the key's secret was read"
    );

    let template = template();
    let mut refused = Vec::new();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, stack) in &stacks {
        refused.extend(refusals(&template, stack).into_iter().map(|r| format!("{name}: {r}")));
        for call in stack.calls.snapshot().into_keys() {
            used.entry(call.caller).or_default().insert(call.action);
        }
    }
    assert!(
        refused.is_empty(),
        "calls the policies do not allow (stacks {names:?}):\n{}",
        refused.join("\n")
    );

    // Information: what the policies grant and no function sent in this run.
    let mut report = format!("stacks: {names:?}\n");
    for function in chat_local::FUNCTIONS {
        let used = used.remove(function).unwrap_or_default();
        let unused: BTreeSet<String> = grants(&template, &logical(function))
            .into_iter()
            .filter(|g| !used.contains(&g.action))
            .map(|g| match g.condition {
                Some(condition) => format!("{} (if {condition})", g.action),
                None => g.action,
            })
            .collect();
        report.push_str(&format!("{function}: sent {used:?}; granted and not sent {unused:?}\n"));
    }
    let path = default.log.with_file_name("iam.txt");
    std::fs::write(&path, &report).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    eprint!("{report}");
}

/// Waits for a turn's stream to close.
async fn finish(api: &str, id: &str, turn: u64) {
    let (status, mut reader) =
        SseReader::open(&format!("{api}/sessions/{id}/stream?turn={turn}"), None).await;
    assert_eq!(status, 200);
    tokio::time::timeout(TURN, reader.rest()).await.expect("the turn finishes");
}

/// Asserts that every call the stack's functions sent is one their policies allow.
pub fn assert_allowed(stack: &App) {
    let refused = refusals(&template(), stack);
    assert!(refused.is_empty(), "calls the policies do not allow:\n{}", refused.join("\n"));
}

/// The calls of `stack` that no grant of their function's policy allows, in words.
fn refusals(template: &Value, stack: &App) -> Vec<String> {
    let mut refused = Vec::new();
    for call in stack.calls.snapshot().into_keys() {
        if !chat_local::FUNCTIONS.contains(&call.caller.as_str()) {
            refused.push(format!("{call:?}: from a process that is not one of the functions"));
            continue;
        }
        let function = logical(&call.caller);
        if !grants(template, &function).iter().any(|grant| allows(stack, grant, &call)) {
            refused.push(format!(
                "{} sent {} ({} on {}), which {function}'s policy does not grant",
                call.caller, call.operation, call.action, call.resource
            ));
        }
    }
    refused
}

fn allows(stack: &App, grant: &Grant, call: &Call) -> bool {
    grant.condition.as_deref().is_none_or(|condition| holds(stack, condition))
        && grant.action == call.action
        && grant.resources.iter().any(|resource| glob(&pattern(stack, resource), &call.resource))
}

/// Whether a template condition holds for the stack's configuration.
fn holds(stack: &App, condition: &str) -> bool {
    let provider = stack.function_var("LLM_PROVIDER");
    match condition {
        "IsBedrock" => provider == Some("bedrock"),
        "HasApiKeySecret" => {
            provider == Some("openai")
                && stack.function_var("OPENAI_API_KEY_SECRET_ARN").is_some_and(|a| !a.is_empty())
        }
        other => panic!("condition {other}: say here when a local stack's configuration is in it"),
    }
}

/// A statement's resource as the recorded calls name theirs (see `chat_local::calls::Call`),
/// `*` matching anything.
fn pattern(stack: &App, resource: &Value) -> String {
    let table = format!("table/{}", stack.table);
    let Value::Tagged(tagged) = resource else { panic!("a literal resource: {resource:?}") };
    let text = tagged.value.as_str().unwrap_or_else(|| panic!("{resource:?}"));
    match (tagged.tag.to_string().as_str(), text) {
        ("!GetAtt", "Table.Arn") => table,
        ("!GetAtt", "TurnsQueue.Arn") => stack.queue_url.clone(),
        ("!Ref", "OpenAiApiKeySecretArn") => {
            stack.function_var("OPENAI_API_KEY_SECRET_ARN").unwrap_or("").to_owned()
        }
        ("!Sub", text) => {
            let text = text
                .replace("${Table.Arn}", &table)
                .replace("${AWS::Partition}", "aws")
                .replace("${AWS::Region}", "*")
                .replace("${AWS::AccountId}", "*");
            // `arn:aws:bedrock:*::foundation-model/*`: the part after the account.
            match text.strip_prefix("arn:") {
                Some(arn) => arn.splitn(5, ':').nth(4).unwrap_or_else(|| panic!("{text}")).to_owned(),
                None => text,
            }
        }
        _ => panic!("a resource this test cannot match to the local stack's: {resource:?}"),
    }
}

/// `text` matches `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(text) = text.strip_prefix(head) else { return false };
            (0..=text.len()).filter(|&i| text.is_char_boundary(i)).any(|i| glob(rest, &text[i..]))
        }
    }
}

#[test]
fn a_resource_pattern_matches_as_iam_does() {
    assert!(glob("foundation-model/*", "foundation-model/anthropic.fake-v1:0"));
    assert!(!glob("foundation-model/*", "inference-profile/us.anthropic.m"));
    assert!(glob("table/chat", "table/chat"));
    assert!(!glob("table/chat", "table/chat/index/by_user"));
    assert!(glob("a*c*e", "abcde") && !glob("a*c*e", "abcd"));
}
