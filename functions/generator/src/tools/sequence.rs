//! A turn's tool steps in its token sequence: the `tool_call` and `tool_result` entries the
//! generator writes, and reading them back after a takeover.

use super::ToolAnswer;
use crate::llm::{Exchange, ToolCall};
use chat_core::{ReplyEvent, ToolUse};
use serde_json::{json, Value};

/// The stream event of a tool call: `tool_call` with `{id, name, arguments}`.
pub fn call_event(call: &ToolCall) -> ReplyEvent {
    ReplyEvent {
        event: "tool_call".to_owned(),
        data: json!({"id": call.id, "name": call.name, "arguments": call.arguments}),
    }
}

/// The stream event of a tool's answer: `tool_result` with `{id, name, content, is_error}`.
pub fn result_event(call: &ToolCall, answer: &ToolAnswer) -> ReplyEvent {
    ReplyEvent {
        event: "tool_result".to_owned(),
        data: json!({"id": call.id, "name": call.name, "content": answer.content, "is_error": answer.is_error}),
    }
}

/// A call and its answer, as stored with the reply.
pub fn tool_use(call: &ToolCall, answer: &ToolAnswer) -> ToolUse {
    ToolUse {
        id: call.id.clone(),
        name: call.name.clone(),
        arguments: call.arguments.clone(),
        result: answer.content.clone(),
        is_error: answer.is_error,
    }
}

/// How many tool steps `exchanges` hold (each model turn that called tools is one).
pub fn steps(exchanges: &[Exchange]) -> u32 {
    exchanges.iter().filter(|e| matches!(e, Exchange::Assistant { .. })).count() as u32
}

/// A turn's sequence so far, read back after a takeover.
#[derive(Debug, Default, PartialEq)]
pub struct Replayed {
    /// The tool steps, for the prompt.
    pub exchanges: Vec<Exchange>,
    /// The text tokens after the last step: the reply goes on from them.
    pub text_after: Vec<String>,
    /// The calls and their answers, for the stored reply.
    pub tool_uses: Vec<ToolUse>,
}

/// Reads back a turn's token sequence (text tokens, `tool_call` and `tool_result` entries): the
/// steps it took, and the text written since the last one.
pub fn replay(tokens: &[String]) -> Replayed {
    let mut replayed = Replayed::default();
    let mut text = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    let field =
        |data: &Value, name: &str| data.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
    for token in tokens {
        let Some(event) = ReplyEvent::decode(token) else {
            if !calls.is_empty() {
                // Text after calls whose results are missing cannot happen; keep it as text.
                replayed.exchanges.push(Exchange::Assistant {
                    text: std::mem::take(&mut text),
                    calls: std::mem::take(&mut calls),
                });
            }
            text.push_str(token);
            replayed.text_after.push(token.clone());
            continue;
        };
        match event.event.as_str() {
            "tool_call" => {
                calls.push(ToolCall {
                    id: field(&event.data, "id"),
                    name: field(&event.data, "name"),
                    arguments: field(&event.data, "arguments"),
                });
                replayed.text_after.clear();
            }
            "tool_result" => {
                if !calls.is_empty() {
                    replayed.exchanges.push(Exchange::Assistant {
                        text: std::mem::take(&mut text),
                        calls: std::mem::take(&mut calls),
                    });
                }
                let answer = ToolAnswer {
                    content: field(&event.data, "content"),
                    is_error: event.data.get("is_error").and_then(Value::as_bool).unwrap_or(false),
                };
                let call = ToolCall {
                    id: field(&event.data, "id"),
                    name: field(&event.data, "name"),
                    arguments: String::new(),
                };
                let arguments = replayed
                    .exchanges
                    .iter()
                    .rev()
                    .find_map(|e| match e {
                        Exchange::Assistant { calls, .. } => calls.iter().find(|c| c.id == call.id),
                        Exchange::ToolResult { .. } => None,
                    })
                    .map(|c| c.arguments.clone())
                    .unwrap_or_default();
                replayed.tool_uses.push(tool_use(&ToolCall { arguments, ..call.clone() }, &answer));
                replayed.exchanges.push(Exchange::ToolResult {
                    call_id: call.id,
                    name: call.name,
                    content: answer.content,
                    is_error: answer.is_error,
                });
                text.clear();
                replayed.text_after.clear();
            }
            _ => {}
        }
    }
    replayed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_replays_into_its_steps_the_text_after_them_and_the_stored_uses() {
        let call =
            ToolCall { id: "c1".to_owned(), name: "calculator".to_owned(), arguments: "{}".to_owned() };
        let answer = ToolAnswer::ok("42");
        let tokens: Vec<String> = vec![
            "Let ".to_owned(),
            "me.".to_owned(),
            call_event(&call).encode(),
            result_event(&call, &answer).encode(),
            "It ".to_owned(),
            "is".to_owned(),
        ];
        let replayed = replay(&tokens);
        assert_eq!(
            replayed.exchanges,
            vec![
                Exchange::Assistant { text: "Let me.".to_owned(), calls: vec![call.clone()] },
                Exchange::ToolResult {
                    call_id: "c1".to_owned(),
                    name: "calculator".to_owned(),
                    content: "42".to_owned(),
                    is_error: false
                },
            ]
        );
        assert_eq!(replayed.text_after, ["It ", "is"]);
        assert_eq!(replayed.tool_uses, vec![tool_use(&call, &answer)]);
        assert_eq!(steps(&replayed.exchanges), 1);
        // No tools at all: everything is text after no steps.
        let plain = replay(&["a".to_owned(), "b".to_owned()]);
        assert_eq!((plain.exchanges.len(), plain.text_after.len()), (0, 2));
    }
}
