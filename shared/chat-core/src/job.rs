//! The generation queue's message: which turn of which session to answer, or to summarise.
//! Sending it is `chat_runtime::queue`'s job.

use crate::ids::{SessionId, Turn};
use serde::{Deserialize, Serialize};

/// The body of a generation request: `{"session_id", "turn"}` asks for the turn's reply;
/// `"job": "summary"` asks for the summary of a session that went idle after that turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnMessage {
    /// The session.
    pub session_id: SessionId,
    /// The turn to answer (or the last turn the summary covers).
    pub turn: Turn,
    /// What to produce; a reply when absent, so the body of a reply request is unchanged.
    #[serde(default, skip_serializing_if = "Job::is_reply")]
    pub job: Job,
}

impl TurnMessage {
    /// A request for `turn`'s reply.
    pub fn reply(session_id: SessionId, turn: Turn) -> TurnMessage {
        TurnMessage { session_id, turn, job: Job::Reply }
    }

    /// A request for the summary of `session_id` through `turn`.
    pub fn summary(session_id: SessionId, turn: Turn) -> TurnMessage {
        TurnMessage { session_id, turn, job: Job::Summary }
    }
}

/// What a queued job asks the generator for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Job {
    /// The assistant's reply to the turn.
    #[default]
    Reply,
    /// The summary of the conversation of an idle session.
    Summary,
}

impl Job {
    fn is_reply(&self) -> bool {
        *self == Job::Reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_request_keeps_the_two_field_body_and_a_summary_names_its_job() {
        let session = SessionId::new();
        let reply = serde_json::to_value(TurnMessage::reply(session, Turn::FIRST)).unwrap();
        assert_eq!(reply, serde_json::json!({"session_id": session.to_string(), "turn": 1}));
        let body = format!(r#"{{"session_id":"{session}","turn":1}}"#);
        assert_eq!(serde_json::from_str::<TurnMessage>(&body).unwrap().job, Job::Reply);
        let summary = serde_json::to_string(&TurnMessage::summary(session, Turn::FIRST)).unwrap();
        assert!(summary.contains(r#""job":"summary""#), "{summary}");
        assert_eq!(serde_json::from_str::<TurnMessage>(&summary).unwrap().job, Job::Summary);
    }
}
