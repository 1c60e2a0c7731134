//! The summary job of a session that went idle: the conversation since the last summary, with
//! that summary, condensed by the model and stored on the session as its compact memory.

use crate::llm::{Output, Spent};
use crate::memory;
use crate::Generator;
use chat_core::job::TurnMessage;
use chat_core::{Outcome, Read, State, StoreError, Turn};
use futures::StreamExt;
use tracing::{info, warn};

impl Generator {
    /// Writes the summary the job asks for. A duplicate or stale job finds nothing pending and
    /// does nothing; a model failure leaves the summary pending, and the sweeper sends the job
    /// again after its deadline.
    pub(crate) async fn summarize(&self, message: &TurnMessage) -> Result<(), StoreError> {
        let Some(session) = self.store.get_session(message.session_id, Read::Consistent).await? else {
            return Ok(());
        };
        if !(session.state == State::Timeout && session.summary_pending && session.turn == message.turn) {
            info!(state = %session.state, "no summary pending");
            return Ok(());
        }
        let first = session.summary.as_ref().map_or(Turn::FIRST, |s| s.through.next());
        let messages =
            memory::current_versions(self.store.messages_between(session.id, first, session.turn).await?);
        if messages.is_empty() {
            self.store.drop_summary(&session).await?;
            return Ok(());
        }
        let prompt = memory::summary_prompt(
            session.summary.as_ref().map(|s| s.text.as_str()),
            &messages,
            self.settings.memory,
            self.counter,
        );
        let mut tokens = self.routes.summarizer().stream(prompt.clone());
        let mut text = String::new();
        let mut spent = Spent::default();
        while let Some(token) = tokens.next().await {
            match token {
                Ok(Output::Token(token)) if text.len() + token.len() > memory::SUMMARY_MAX_BYTES => break,
                Ok(Output::Token(token)) => text.push_str(&token),
                Ok(Output::ToolCall(_)) => {}
                Ok(Output::Usage(usage)) => spent.reported(usage),
                Err(err) => {
                    warn!(error = %err, "the model failed to summarise; the sweeper will ask again");
                    return Ok(());
                }
            }
        }
        spent.streamed.push_str(&text);
        let usage = spent.usage(&prompt, self.counter);
        let text = text.trim();
        match self.store.save_summary(&session, text, session.turn).await? {
            Outcome::Applied(()) => {
                info!(bytes = text.len(), through = %session.turn, "summary stored");
                // Summaries are spent on the user's behalf; counted once per summary.
                let marker = format!("summary#{}#{}", session.id, session.turn);
                if let Err(err) = self.store.charge_once(&session.user_id, &marker, usage.total()).await {
                    warn!(error = %err, "could not count the summary's tokens against the user's day");
                }
            }
            Outcome::Conflict(_) => info!("a newer summary is already stored"),
        }
        Ok(())
    }
}
