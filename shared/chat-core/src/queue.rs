//! The generation queue's message: which turn of which session to answer. Sending it is
//! `chat_runtime::queue`'s job.

use crate::ids::{SessionId, Turn};
use serde::{Deserialize, Serialize};

/// The body of a generation request: which turn of which session to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnMessage {
    /// The session.
    pub session_id: SessionId,
    /// The turn to answer.
    pub turn: Turn,
}
