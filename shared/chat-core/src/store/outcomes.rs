//! What the store's operations take (a new message, a reply) and answer. A failed write
//! condition is one of these outcomes, never an error.

use crate::fsm::State;
use crate::ids::{ClientMessageId, SessionId, Turn, UserId};
use crate::record::{Routing, Session, StopReason, ToolUse, Usage};

/// The result of a conditional write: it happened, or the session was not as expected.
// One is returned per write and consumed at once, never stored in bulk: the session a
// conflict carries is cheaper inline than boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// The write was applied.
    Applied(T),
    /// The condition failed; nothing was written.
    Conflict(Conflict),
}

/// What the session looked like when a conditional write lost.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The session as it is now (`None`: it does not exist).
    pub current: Option<Session>,
}

impl Conflict {
    /// The conflict of a refused session update, from the item it returned as it was.
    pub(crate) fn of_refused(item: Option<&crate::record::Item>) -> Result<Conflict, crate::StoreError> {
        Ok(Conflict { current: item.map(Session::from_item).transpose()? })
    }
}

/// Proof that a turn was claimed, carried to the step that commits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnTicket {
    /// The session.
    pub session_id: SessionId,
    /// The claimed turn.
    pub turn: Turn,
    /// The session version after the claim.
    pub version: u64,
}

/// A user's request to start a turn.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    /// Who sends it.
    pub user: &'a UserId,
    /// The session to continue; `None` creates one.
    pub session: Option<SessionId>,
    /// The message text.
    pub content: &'a str,
    /// The client's idempotency key, if it sent one.
    pub client_message_id: Option<&'a ClientMessageId>,
    /// Who is writing (the request id), recorded with the transition.
    pub by: &'a str,
}

/// How a revision redoes the session's last turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revision<'a> {
    /// Its message again, for a new reply.
    Regenerate,
    /// A rewritten message.
    Edit(&'a str),
}

impl Revision<'_> {
    /// The event of the table it is.
    pub fn event(self) -> crate::fsm::Event {
        match self {
            Revision::Regenerate => crate::fsm::Event::Regenerate,
            Revision::Edit(_) => crate::fsm::Event::Edit,
        }
    }
}

/// A user's request to redo the last turn of a session ([`crate::Store::revise_turn`]).
#[derive(Debug, Clone)]
pub struct RevisedTurn<'a> {
    /// Who asks.
    pub user: &'a UserId,
    /// The session.
    pub session: SessionId,
    /// Regenerate or edit.
    pub revision: Revision<'a>,
    /// The turn the client means to redo, when it says: it must still be the last.
    pub expected_last: Option<Turn>,
    /// The client's idempotency key, if it sent one.
    pub client_message_id: Option<&'a ClientMessageId>,
    /// Who is writing (the request id), recorded with the transition.
    pub by: &'a str,
}

/// A generator's finished reply, handed to [`crate::Store::commit_reply`]: what is stored as the
/// assistant message, and what the turn's model calls consumed (stored with it, and charged in
/// the same transaction).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// The reply's text: the turn's tokens, without its tool entries.
    pub text: String,
    /// Why the reply was cut short, if it was.
    pub stopped: Option<StopReason>,
    /// The route and model that wrote it, when response routing chose one.
    pub routing: Option<Routing>,
    /// The tools called while writing it, with their answers, in order.
    pub tool_uses: Vec<ToolUse>,
    /// What this holder's model calls consumed. (A crashed holder's spend is not charged: at most
    /// `MAX_ATTEMPTS` calls.)
    pub usage: Usage,
    /// What those calls cost in US dollars; `None` when a model they used has no price.
    pub cost_usd: Option<f64>,
}

impl Reply {
    /// A complete reply of `text`, with no route, no tools, nothing consumed and no cost.
    pub fn new(text: impl Into<String>) -> Reply {
        Reply { text: text.into(), ..Reply::default() }
    }
}

/// What became of a send.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// The turn is claimed (`user_writing`) and the user message stored with it.
    Accepted(TurnTicket),
    /// This idempotency key was used before: the original turn, nothing changed.
    Duplicate {
        /// The original session.
        session_id: SessionId,
        /// The original turn.
        turn: Turn,
    },
    /// A turn is in flight; the send was refused.
    InFlight {
        /// The state of the session.
        state: State,
        /// The turn in flight.
        turn: Turn,
    },
    /// No such session for this user.
    NotFound,
    /// A new session was asked for, but the user has `limit` sessions already.
    SessionLimit {
        /// The limit.
        limit: u32,
    },
    /// The user's turns have used up today's token budget; nothing was written.
    BudgetExhausted(super::limits::BudgetSpent),
    /// A revision named a turn that is no longer the session's last.
    NotLastTurn {
        /// The session's last turn.
        last: Turn,
        /// The session's state.
        state: State,
    },
    /// The idempotency key was used for a fork, not a turn; nothing was written.
    KeyUsedByFork,
    /// A regenerate found the last turn's message gone (aged out by its TTL).
    NothingToRevise {
        /// The session's last turn.
        last: Turn,
        /// The session's state.
        state: State,
    },
}

/// A generator's claim on a turn: the fencing version and what was already streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The session.
    pub session_id: SessionId,
    /// The turn being generated.
    pub turn: Turn,
    /// This generator's lease id.
    pub owner: String,
    /// The session version the lease was taken at; any other transition invalidates it.
    pub version: u64,
    /// When it lapses unless extended, epoch ms.
    pub expires_at: u64,
    /// The client asked to stop before the claim.
    pub cancel_requested: bool,
    /// The next chunk sequence number to write.
    pub next_seq: u32,
    /// Tokens a previous holder already wrote for this turn (empty on a first claim).
    pub resumed_tokens: Vec<String>,
    /// The session's summary of its earlier turns, if it has one: compact memory.
    pub summary: Option<crate::record::Summary>,
    /// The session's owner, whose daily token count the turn's spend is charged to.
    pub user: UserId,
}

/// What became of a generation claim.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// This generator now holds the turn.
    Claimed(Lease),
    /// Nothing to do: the turn is generating under a live lease, finished, superseded or gone.
    Skipped {
        /// The session as found (`None`: it does not exist).
        current: Option<Session>,
    },
    /// This delivery found the turn's lease expired with no attempts left and ended the turn
    /// (`LeaseExpired` into `timeout`), as the sweeper would have: a turn ended, to be counted
    /// and its slot given back.
    Ended {
        /// The session after the write.
        current: Option<Session>,
    },
}

/// What became of a chunk write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored.
    Appended,
    /// Another writer holds that position: this lease was taken over.
    Fenced,
}

/// Whether a lease still holds, and whether the client asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still ours.
    Held {
        /// Stop at the next chunk boundary and commit what there is.
        cancel_requested: bool,
    },
    /// Taken over, ended or deleted: stop writing.
    Lost,
}

/// What became of a cancel request.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The flag is set; the generator will stop at its next chunk.
    Requested {
        /// The turn being cancelled.
        turn: Turn,
        /// Its state.
        state: State,
    },
    /// No turn is in flight.
    NotInFlight {
        /// The session's state.
        state: State,
    },
    /// No such session (for this user).
    NotFound,
}

/// One page of a user's sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPage {
    /// Newest first.
    pub sessions: Vec<Session>,
    /// Pass back to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// A pagination cursor that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cursor is not one this service issued")]
pub struct InvalidCursor;

/// What a delete removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The session and `items` items under it are gone.
    Deleted {
        /// Items removed, the session item included.
        items: usize,
    },
    /// There was no such session.
    NotFound,
}

/// A user's request to fork a session ([`crate::Store::fork_session`]).
#[derive(Debug, Clone)]
pub struct ForkRequest<'a> {
    /// Who asks: the source's owner, and the fork's.
    pub user: &'a UserId,
    /// The session forked.
    pub source: SessionId,
    /// The last turn the fork keeps; `None`: the source's last.
    pub through: Option<Turn>,
    /// The client's idempotency key, if it sent one.
    pub client_message_id: Option<&'a ClientMessageId>,
    /// Who is writing (the request id), recorded with the transition.
    pub by: &'a str,
}

/// What became of a fork.
#[derive(Debug, Clone, PartialEq)]
pub enum ForkOutcome {
    /// The new session exists, `idle`, with the source's history through `through` (also the
    /// answer to a repeated idempotency key).
    Forked {
        /// The new session.
        session_id: SessionId,
        /// The session it was forked from.
        source: SessionId,
        /// Its last turn, the source's turn it was forked at.
        through: Turn,
    },
    /// No such session for this user.
    NotFound,
    /// The source has a turn in flight.
    InFlight {
        /// The source's state.
        state: State,
        /// The turn in flight.
        turn: Turn,
    },
    /// The turn asked for is past the source's last.
    TurnNotFound {
        /// The source's last turn.
        last: Turn,
    },
    /// The user has `limit` sessions already.
    SessionLimit {
        /// The limit.
        limit: u32,
    },
    /// The fork would copy more than [`crate::store::MAX_FORK_TURNS`] turns.
    TooLong {
        /// The turns asked for.
        turns: u32,
        /// The most a fork copies.
        max: u32,
    },
    /// The idempotency key started a turn, not a fork.
    KeyUsed {
        /// The session of that turn.
        session_id: SessionId,
        /// That turn.
        turn: Turn,
    },
}
