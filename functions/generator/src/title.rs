//! A session's title from its first exchange, written by the small model when routing has one
//! (`SESSION_TITLES=model`): one short call after the first reply is committed, off the user's
//! path (the stream has ended by then). Until it lands, and whenever it fails, the session keeps
//! the first words of its first message; a user's rename is never overwritten.

use crate::llm::{Output, Prompt, Spent};
use crate::Generator;
use chat_core::{Lease, Outcome, Read, Role, TitleBy, Turn};
use futures::StreamExt;
use tracing::{info, warn};

/// What the model is told.
pub const TITLE_INSTRUCTIONS: &str = "Write a title of at most six words for a conversation that \
begins with the exchange below. Write only the title, with no quotes and no final full stop.";

/// The most of each message the model sees, and of its answer that is kept, in bytes.
const EXCERPT_BYTES: usize = 2_000;
const TITLE_BYTES: usize = 300;

impl Generator {
    /// Titles the session of `lease`'s first turn from its message and `reply`, when titles come
    /// from the small model. Best effort: a failure is logged and the first words stay.
    pub(crate) async fn write_title(&self, lease: &Lease, reply: &str) {
        if !self.model_titles || lease.turn != Turn::FIRST || self.routes.small.is_none() {
            return;
        }
        let message =
            match self.store.get_message(lease.session_id, lease.turn, Role::User, Read::Consistent).await {
                Ok(Some(message)) => message.content,
                Ok(None) => return,
                Err(err) => {
                    return warn!(error = %err, "could not read the first message to title the session")
                }
            };
        let exchange = format!("User: {}\n\nAssistant: {}", excerpt(&message), excerpt(reply));
        let prompt = Prompt {
            system: Some(TITLE_INSTRUCTIONS.to_owned()),
            messages: vec![(Role::User, exchange)],
            ..Prompt::default()
        };
        let mut tokens = self.routes.summarizer().stream(prompt.clone());
        let (mut text, mut spent) = (String::new(), Spent::default());
        while let Some(token) = tokens.next().await {
            match token {
                Ok(Output::Token(token)) if text.len() + token.len() > TITLE_BYTES => break,
                Ok(Output::Token(token)) => text.push_str(&token),
                Ok(Output::ToolCall(_)) => {}
                Ok(Output::Usage(usage)) => spent.reported(usage),
                Err(err) => return warn!(error = %err, "the model failed to title the session"),
            }
        }
        drop(tokens);
        spent.streamed.push_str(&text);
        let usage = spent.usage(&prompt, self.counter);
        let marker = format!("title#{}", lease.session_id);
        if let Err(err) = self.store.charge_once(&lease.user, &marker, usage.total()).await {
            warn!(error = %err, "could not count the title's tokens against the user's day");
        }
        let Some(title) = clean(&text) else { return };
        match self.store.set_title(lease.session_id, None, &title, TitleBy::Model).await {
            Ok(Outcome::Applied(())) => info!(chars = title.chars().count(), "session titled"),
            Ok(Outcome::Conflict(_)) => info!("the session is gone or its user named it"),
            Err(err) => warn!(error = %err, "could not store the session's title"),
        }
    }
}

/// The start of `text`, at most [`EXCERPT_BYTES`], cut at a character.
fn excerpt(text: &str) -> &str {
    let mut end = text.len().min(EXCERPT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The model's answer as a title: its first line, without quotes, a "Title:" label or a final
/// full stop, its whitespace collapsed; `None` when nothing is left.
pub fn clean(answer: &str) -> Option<String> {
    let line = answer.trim().lines().next().unwrap_or("");
    let line = line.strip_prefix("Title:").unwrap_or(line);
    let line = line.trim().trim_matches(['"', '\'', '“', '”', '*', '#', '`']).trim().trim_end_matches('.');
    let title = line.split_whitespace().collect::<Vec<_>>().join(" ");
    (!title.is_empty()).then_some(title)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_answer_is_cleaned_into_a_title() {
        assert_eq!(
            clean("\"Sorting a list in Rust.\"\n\nHere you go").as_deref(),
            Some("Sorting a list in Rust")
        );
        assert_eq!(clean("Title: **Sea  colours**").as_deref(), Some("Sea colours"));
        assert_eq!(clean("  \n "), None);
        assert_eq!(excerpt("héllo"), "héllo");
        assert_eq!(excerpt(&"é".repeat(2000)).len(), 2000);
    }
}
