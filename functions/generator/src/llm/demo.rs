//! The built-in demo model: deterministic, offline, with test directives.

use super::{
    estimated_prompt_tokens, Exchange, ModelError, ModelProvider, Output, Prompt, TokenStream, ToolCall,
};
use chat_core::Role;
use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use std::sync::Arc;
use std::time::Duration;

/// The built-in model: deterministic, no network. Its reply quotes the user's message verbatim,
/// then fills up to `reply_tokens` tokens, one every `token_delay`; a call that completes ends
/// with its usage, by its own count: the prompt's bytes over four
/// ([`super::estimated_prompt_tokens`]) and a token per piece it sent.
#[derive(Debug, Clone)]
pub struct DemoModel {
    /// Tokens in a reply (at least those quoting the message).
    pub reply_tokens: usize,
    /// Pause before each token, so streaming is visible.
    pub token_delay: Duration,
    /// Honour test directives in a message: `[[fail-after:N]]` fails after N tokens,
    /// `[[reply-tokens:N]]` makes the reply N tokens long.
    pub faults: bool,
}

const FILLER: &[&str] = &[
    "This", "reply", "comes", "from", "the", "built-in", "demo", "model,", "which", "streams", "one",
    "token", "at", "a", "time", "so", "you", "can", "watch", "the", "relay", "work", "end", "to", "end.",
];

/// Splits text into tokens that concatenate back to it exactly: each word with the whitespace
/// that follows it.
pub fn split_tokens(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_space = false;
    for c in text.chars() {
        if !c.is_whitespace() && in_space {
            tokens.push(std::mem::take(&mut current));
        }
        in_space = c.is_whitespace();
        current.push(c);
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

impl DemoModel {
    /// The whole reply to `prompt`, as tokens.
    pub fn reply(&self, prompt: &Prompt) -> Vec<String> {
        let last = prompt
            .messages
            .iter()
            .rev()
            .find(|(role, _)| *role == Role::User)
            .map_or("", |(_, text)| text.as_str());
        let mut tokens = Vec::new();
        // After a tool step, the reply starts with what the tool answered.
        if let Some(Exchange::ToolResult { name, content, .. }) = prompt.exchanges.last() {
            tokens.extend(["The ".to_owned(), format!("{name} "), "says: ".to_owned()]);
            tokens.extend(split_tokens(content));
            tokens.push(". ".to_owned());
        }
        tokens.extend(["You ".to_owned(), "said: ".to_owned(), "\"".to_owned()]);
        tokens.extend(split_tokens(last));
        tokens.push("\". ".to_owned());
        let length =
            if crate::FAULTS_BUILT && self.faults { directive(prompt, "reply-tokens") } else { None };
        let mut filler = FILLER.iter().cycle();
        while tokens.len() < length.unwrap_or(self.reply_tokens) {
            tokens.push(format!("{} ", filler.next().expect("cycle never ends")));
        }
        if let Some(last) = tokens.last_mut() {
            *last = last.trim_end().to_owned();
        }
        tokens
    }

    fn fail_after(&self, prompt: &Prompt) -> Option<usize> {
        if !(crate::FAULTS_BUILT && self.faults) {
            return None;
        }
        directive(prompt, "fail-after")
    }
}

/// A test directive `[[name:N]]` in the newest message, e.g. `[[fail-after:5]]`.
pub fn directive(prompt: &Prompt, name: &str) -> Option<usize> {
    let text = &prompt.messages.last()?.1;
    let rest = text.split(&format!("[[{name}:")).nth(1)?;
    rest.split("]]").next()?.parse().ok()
}

/// The `[[calc:EXPR]]` test directive: with the calculator offered and no tool step yet, the demo
/// model asks it to evaluate `EXPR` before replying.
fn calculator_call(prompt: &Prompt) -> Option<ToolCall> {
    if !prompt.exchanges.is_empty() || !prompt.tools.iter().any(|t| t.name == "calculator") {
        return None;
    }
    let text = &prompt.messages.last()?.1;
    let expression = text.split("[[calc:").nth(1)?.split("]]").next()?;
    Some(ToolCall {
        id: "demo-call-1".to_owned(),
        name: "calculator".to_owned(),
        arguments: serde_json::json!({ "expression": expression }).to_string(),
    })
}

impl ModelProvider for DemoModel {
    /// Resumes after the tokens an earlier attempt streamed: the reply is deterministic.
    fn open(&self, prompt: Arc<Prompt>) -> BoxFuture<'static, Result<TokenStream, ModelError>> {
        // Its own count, as a provider reports its own: a token per piece it sends, and the
        // prompt's bytes over four (decoding `o200k_base` would cost a cold start ~300 ms).
        let input = estimated_prompt_tokens(&prompt);
        let usage = move |pieces: usize| {
            Output::Usage(chat_core::Usage { input, output: pieces as u64, ..Default::default() })
        };
        if let Some(call) = calculator_call(&prompt).filter(|_| crate::FAULTS_BUILT && self.faults) {
            let text = "Let me calculate. ";
            let spent = usage(2);
            let items = vec![Output::Token(text.to_owned()), Output::ToolCall(call)];
            let items: Vec<_> = items.into_iter().skip(prompt.resumed.len()).chain([spent]).map(Ok).collect();
            let stream = stream::iter(items).boxed();
            return Box::pin(async move { Ok(stream) });
        }
        let tokens: Vec<String> = self.reply(&prompt).into_iter().skip(prompt.resumed.len()).collect();
        let spent = usage(tokens.len());
        let fail_after = self.fail_after(&prompt);
        let delay = self.token_delay;
        let first = prompt.resumed.len();
        let stream = stream::iter(tokens.into_iter().enumerate())
            .then(move |(offset, token)| async move {
                tokio::time::sleep(delay).await;
                match fail_after {
                    Some(n) if first + offset >= n => {
                        Err(ModelError::fatal("the demo model was told to fail"))
                    }
                    _ => Ok(Output::Token(token)),
                }
            })
            .chain(stream::once(async move { Ok(spent) }))
            .boxed();
        Box::pin(async move { Ok(stream) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Prompt {
        Prompt { messages: vec![(Role::User, text.to_owned())], ..Prompt::default() }
    }

    async fn collect(model: &DemoModel, prompt: Prompt) -> Vec<Result<String, ModelError>> {
        let outputs: Vec<_> = model.open(Arc::new(prompt)).await.unwrap().collect().await;
        outputs
            .into_iter()
            .filter_map(|o| match o {
                Ok(Output::Token(t)) => Some(Ok(t)),
                Ok(Output::ToolCall(c)) => panic!("unexpected tool call {c:?}"),
                Ok(Output::Usage(_)) => None,
                Err(e) => Some(Err(e)),
            })
            .collect()
    }

    fn demo(reply_tokens: usize) -> DemoModel {
        DemoModel { reply_tokens, token_delay: Duration::ZERO, faults: true }
    }

    #[test]
    fn tokens_concatenate_back_to_the_text() {
        for text in ["", "one", "two words", "  lead\nand\ttrail  ", "émoji 🦀 ok"] {
            assert_eq!(split_tokens(text).concat(), text);
        }
    }

    #[test]
    fn the_reply_quotes_the_message_verbatim_and_has_the_configured_length() {
        let prompt = user("Hello\nworld, ünïcode!");
        let reply = demo(50).reply(&prompt);
        assert_eq!(reply.len(), 50);
        assert!(reply.concat().contains("Hello\nworld, ünïcode!"));
        let long = "w ".repeat(80);
        assert!(demo(50).reply(&user(&long)).concat().contains(long.trim_end()));
    }

    #[tokio::test]
    async fn a_resumed_stream_continues_where_the_first_left_off() {
        let model = demo(20);
        let all: Vec<String> =
            collect(&model, user("resume me")).await.into_iter().map(Result::unwrap).collect();
        let resumed = Prompt { resumed: all[..7].to_vec(), ..user("resume me") };
        let rest: Vec<String> = collect(&model, resumed).await.into_iter().map(Result::unwrap).collect();
        assert_eq!(all[7..], rest[..]);
    }

    #[tokio::test]
    async fn a_completed_reply_ends_with_its_own_count_of_what_it_used() {
        let prompt = user("count me");
        let outputs: Vec<_> = demo(12).open(Arc::new(prompt.clone())).await.unwrap().collect().await;
        let Some(Ok(Output::Usage(usage))) = outputs.last() else { panic!("{outputs:?}") };
        assert_eq!(usage.input, estimated_prompt_tokens(&prompt));
        assert_eq!(usage.output, demo(12).reply(&prompt).len() as u64, "a token per piece sent");
        assert!(usage.input > 0 && usage.output > 0);
    }

    #[tokio::test]
    async fn fault_directive_fails_after_n_tokens() {
        let results = collect(&demo(20), user("x [[fail-after:4]]")).await;
        assert!(results[..4].iter().all(Result::is_ok));
        assert!(results[4].is_err());
    }
}
