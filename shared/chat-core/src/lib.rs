//! The shared core of the chat backend: the conversation-turn state machine ([`fsm`]), the
//! identifiers that parse at the edge ([`ids`]), the one DynamoDB table ([`table`]) and the
//! store that enforces the state machine with conditional writes ([`store`]).

pub mod config;
pub mod error;
pub mod fsm;
pub mod ids;
pub mod job;
pub mod record;
pub mod store;
pub mod table;
pub mod time;

pub use error::StoreError;
pub use fsm::{Event, State};
pub use ids::{ClientMessageId, InvalidId, MessageId, Role, SessionId, Turn, UserId};
pub use record::{
    Chunk, FeedEvent, FeedKind, LeaseInfo, Message, ReplyEvent, Routing, Session, StopReason, Summary,
    TitleBy, ToolUse, TransitionRecord, Usage,
};
pub use store::limits::{Admission, BudgetSpent, GlobalLimits, UserLimits};
pub use store::{
    AppendOutcome, CancelOutcome, Capacity, ClaimOutcome, Clock, Conflict, DeleteOutcome, ForkOutcome,
    ForkRequest, InvalidCursor, Lease, LeaseStatus, NewMessage, Outcome, Read, Reply, RevisedTurn, Revision,
    SendOutcome, SessionPage, Store, StoreOptions, TurnTicket,
};
