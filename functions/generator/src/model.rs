//! The model seam: anything that turns a conversation into a stream of tokens.

use chat_core::Role;
use futures::stream::{self, BoxStream, StreamExt};
use std::time::Duration;

/// A model failure; `message` is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ModelError {
    /// What went wrong, without secrets or raw upstream bodies.
    pub message: String,
}

/// The conversation so far, oldest first; the last message is the user's new one.
pub type Prompt = Vec<(Role, String)>;

/// A source of reply tokens.
pub trait ModelProvider: Send + Sync {
    /// Streams the reply to `prompt`, leaving out its first `skip` tokens (already streamed by
    /// an earlier attempt that stalled).
    fn stream(&self, prompt: &Prompt, skip: usize) -> BoxStream<'static, Result<String, ModelError>>;
}

/// The built-in model: deterministic, no network. Its reply quotes the user's message verbatim,
/// then fills up to `reply_tokens` tokens, one every `token_delay`.
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
        let last =
            prompt.iter().rev().find(|(role, _)| *role == Role::User).map_or("", |(_, text)| text.as_str());
        let mut tokens = vec!["You ".to_owned(), "said: ".to_owned(), "\"".to_owned()];
        tokens.extend(split_tokens(last));
        tokens.push("\". ".to_owned());
        let length = if self.faults { directive(prompt, "reply-tokens") } else { None };
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
        if !self.faults {
            return None;
        }
        directive(prompt, "fail-after")
    }
}

/// A test directive `[[name:N]]` in the newest message, e.g. `[[fail-after:5]]`.
pub fn directive(prompt: &Prompt, name: &str) -> Option<usize> {
    let text = &prompt.last()?.1;
    let rest = text.split(&format!("[[{name}:")).nth(1)?;
    rest.split("]]").next()?.parse().ok()
}

impl ModelProvider for DemoModel {
    fn stream(&self, prompt: &Prompt, skip: usize) -> BoxStream<'static, Result<String, ModelError>> {
        let tokens = self.reply(prompt);
        let fail_after = self.fail_after(prompt);
        let delay = self.token_delay;
        stream::iter(tokens.into_iter().enumerate().skip(skip))
            .then(move |(index, token)| async move {
                tokio::time::sleep(delay).await;
                match fail_after {
                    Some(n) if index >= n => {
                        Err(ModelError { message: "the demo model was told to fail".to_owned() })
                    }
                    _ => Ok(token),
                }
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

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
        let prompt = vec![(Role::User, "Hello\nworld, ünïcode!".to_owned())];
        let reply = demo(50).reply(&prompt);
        assert_eq!(reply.len(), 50);
        assert!(reply.concat().contains("Hello\nworld, ünïcode!"));
        let long = "w ".repeat(80);
        assert!(demo(50).reply(&vec![(Role::User, long.clone())]).concat().contains(long.trim_end()));
    }

    #[tokio::test]
    async fn a_resumed_stream_continues_where_the_first_left_off() {
        let prompt = vec![(Role::User, "resume me".to_owned())];
        let model = demo(20);
        let all: Vec<String> = model.stream(&prompt, 0).map(Result::unwrap).collect().await;
        let rest: Vec<String> = model.stream(&prompt, 7).map(Result::unwrap).collect().await;
        assert_eq!(all[7..], rest[..]);
    }

    #[tokio::test]
    async fn fault_directive_fails_after_n_tokens() {
        let prompt = vec![(Role::User, "x [[fail-after:4]]".to_owned())];
        let results: Vec<_> = demo(20).stream(&prompt, 0).collect().await;
        assert!(results[..4].iter().all(Result::is_ok));
        assert!(results[4].is_err());
    }
}
