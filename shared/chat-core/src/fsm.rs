//! The conversation-turn state machine: states, events and the one transition table.
//!
//! Every state change the store writes is derived from [`transition`]; nothing else in the
//! workspace decides which edges exist.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a session's current turn stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No turn in flight; ready for a message.
    Idle,
    /// A user message is being stored.
    UserWriting,
    /// The user message is durable and queued for generation.
    UserCommitted,
    /// A generator holds the lease and is streaming the reply.
    AiGenerating,
    /// The reply is committed (complete or stopped).
    AiCommitted,
    /// The turn failed; the session accepts a new message.
    Error,
    /// The turn was abandoned (deadline or lease passed); the session accepts a new message.
    Timeout,
}

/// Something that happens to a session; with the current state it selects the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The user sends a message (also creates the session when there is none).
    UserSend,
    /// The user message was stored (synchronous commit).
    UserStored,
    /// Storing or enqueueing the user message failed.
    StoreFailed,
    /// A generator claimed the turn with a lease.
    GenerationClaimed,
    /// The turn was not picked up before its deadline.
    PickupExpired,
    /// Processing failed before generation started.
    ProcessingFailed,
    /// The reply was committed, complete or stopped.
    ReplyCommitted,
    /// Generation failed after its retries.
    GenerationFailed,
    /// The lease expired with retries left: another generator takes the turn over.
    LeaseTakeover,
    /// The lease expired and the retries are exhausted.
    LeaseExpired,
    /// The committed turn settles; the session is ready for the next one.
    Settle,
    /// An errored or timed-out session is reset.
    Recover,
    /// The session stayed idle past its limit.
    IdleExpired,
    /// The user asks for the last reply again: a new turn with the last turn's message, which
    /// it supersedes.
    Regenerate,
    /// The user rewrites the last message: a new turn with the new text, superseding the last.
    Edit,
    /// A new session starts as a copy of another's history up to a turn, with no turn in flight.
    Fork,
}

/// The transition table: the state `event` leads to from `from` (`None`: no session yet),
/// or `None` when the edge does not exist.
pub fn transition(from: Option<State>, event: Event) -> Option<State> {
    use Event as E;
    use State as S;
    match (from, event) {
        (None | Some(S::Idle | S::AiCommitted | S::Error | S::Timeout), E::UserSend) => Some(S::UserWriting),
        (Some(S::UserWriting), E::UserStored) => Some(S::UserCommitted),
        (Some(S::UserWriting), E::StoreFailed) => Some(S::Error),
        (Some(S::UserCommitted), E::GenerationClaimed) => Some(S::AiGenerating),
        (Some(S::UserCommitted), E::PickupExpired) => Some(S::Timeout),
        (Some(S::UserCommitted), E::ProcessingFailed) => Some(S::Error),
        (Some(S::AiGenerating), E::ReplyCommitted) => Some(S::AiCommitted),
        (Some(S::AiGenerating), E::GenerationFailed) => Some(S::Error),
        (Some(S::AiGenerating), E::LeaseTakeover) => Some(S::AiGenerating),
        (Some(S::AiGenerating), E::LeaseExpired) => Some(S::Timeout),
        (Some(S::AiCommitted), E::Settle) => Some(S::Idle),
        (Some(S::Error | S::Timeout), E::Recover) => Some(S::Idle),
        (Some(S::Idle), E::IdleExpired) => Some(S::Timeout),
        // A revision is a send that needs a last turn to supersede: never a new session.
        (Some(S::Idle | S::AiCommitted | S::Error | S::Timeout), E::Regenerate | E::Edit) => {
            Some(S::UserWriting)
        }
        (None, E::Fork) => Some(S::Idle),
        _ => None,
    }
}

impl State {
    /// Every state, for exhaustive checks.
    pub const ALL: [State; 7] = [
        State::Idle,
        State::UserWriting,
        State::UserCommitted,
        State::AiGenerating,
        State::AiCommitted,
        State::Error,
        State::Timeout,
    ];

    /// The name stored in DynamoDB and shown to clients.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::UserWriting => "user_writing",
            State::UserCommitted => "user_committed",
            State::AiGenerating => "ai_generating",
            State::AiCommitted => "ai_committed",
            State::Error => "error",
            State::Timeout => "timeout",
        }
    }

    /// A turn is in flight: another send must be refused (law 1).
    pub fn turn_in_flight(self) -> bool {
        transition(Some(self), Event::UserSend).is_none()
    }

    /// The turn has ended; a stream following it can close.
    pub fn turn_ended(self) -> bool {
        !self.turn_in_flight()
    }
}

/// The event that ends a turn whose deadline (or generation lease) passed in `state`, and the
/// reason recorded; `None` for a state without a deadline. The sweeper and a generator finding an
/// expired lease both decide by this and [`retryable`].
pub fn expiry(state: State) -> Option<(Event, &'static str)> {
    match state {
        State::UserWriting => Some((Event::StoreFailed, "the message was not stored in time")),
        State::UserCommitted => Some((Event::PickupExpired, "no generator picked the turn up in time")),
        State::AiGenerating => Some((Event::LeaseExpired, "generation stalled and its retries are spent")),
        _ => None,
    }
}

/// The event that returns a session whose turn has ended to `idle` from `state` (`Settle` from
/// `ai_committed`, `Recover` from `error` or `timeout`), read off the table; `None` from `idle`
/// itself and from the in-flight states.
pub fn settling(state: State) -> Option<Event> {
    Event::ALL.into_iter().find(|event| transition(Some(state), *event) == Some(State::Idle))
}

/// Whether a turn overdue in `state` may be tried again rather than ended: a queued turn can be
/// delivered again, and a stalled generation taken over while it has attempts left; a message
/// that never finished storing cannot.
pub fn retryable(state: State, attempts: u32, max_attempts: u32) -> bool {
    match state {
        State::UserCommitted => true,
        State::AiGenerating => attempts < max_attempts,
        _ => false,
    }
}

impl Event {
    /// Every event, for exhaustive checks.
    pub const ALL: [Event; 16] = [
        Event::UserSend,
        Event::UserStored,
        Event::StoreFailed,
        Event::GenerationClaimed,
        Event::PickupExpired,
        Event::ProcessingFailed,
        Event::ReplyCommitted,
        Event::GenerationFailed,
        Event::LeaseTakeover,
        Event::LeaseExpired,
        Event::Settle,
        Event::Recover,
        Event::IdleExpired,
        Event::Regenerate,
        Event::Edit,
        Event::Fork,
    ];

    /// The name stored in transition records.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::UserSend => "user_send",
            Event::UserStored => "user_stored",
            Event::StoreFailed => "store_failed",
            Event::GenerationClaimed => "generation_claimed",
            Event::PickupExpired => "pickup_expired",
            Event::ProcessingFailed => "processing_failed",
            Event::ReplyCommitted => "reply_committed",
            Event::GenerationFailed => "generation_failed",
            Event::LeaseTakeover => "lease_takeover",
            Event::LeaseExpired => "lease_expired",
            Event::Settle => "settle",
            Event::Recover => "recover",
            Event::IdleExpired => "idle_expired",
            Event::Regenerate => "regenerate",
            Event::Edit => "edit",
            Event::Fork => "fork",
        }
    }

    /// The states this event leaves from, read off the table (`None`: no session yet).
    pub fn sources(self) -> Vec<Option<State>> {
        std::iter::once(None)
            .chain(State::ALL.into_iter().map(Some))
            .filter(|from| transition(*from, self).is_some())
            .collect()
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored state or event name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown name {0:?}")]
pub struct UnknownName(pub String);

impl FromStr for State {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| UnknownName(s.to_owned()))
    }
}

impl FromStr for Event {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Event::ALL.into_iter().find(|event| event.as_str() == s).ok_or_else(|| UnknownName(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of docs/architecture.md (The state machine), written out independently of `transition`.
    const EXPECTED: &[(Option<State>, Event, State)] = &[
        (None, Event::UserSend, State::UserWriting),
        (Some(State::Idle), Event::UserSend, State::UserWriting),
        (Some(State::AiCommitted), Event::UserSend, State::UserWriting),
        (Some(State::Error), Event::UserSend, State::UserWriting),
        (Some(State::Timeout), Event::UserSend, State::UserWriting),
        (Some(State::UserWriting), Event::UserStored, State::UserCommitted),
        (Some(State::UserWriting), Event::StoreFailed, State::Error),
        (Some(State::UserCommitted), Event::GenerationClaimed, State::AiGenerating),
        (Some(State::UserCommitted), Event::PickupExpired, State::Timeout),
        (Some(State::UserCommitted), Event::ProcessingFailed, State::Error),
        (Some(State::AiGenerating), Event::ReplyCommitted, State::AiCommitted),
        (Some(State::AiGenerating), Event::GenerationFailed, State::Error),
        (Some(State::AiGenerating), Event::LeaseTakeover, State::AiGenerating),
        (Some(State::AiGenerating), Event::LeaseExpired, State::Timeout),
        (Some(State::AiCommitted), Event::Settle, State::Idle),
        (Some(State::Error), Event::Recover, State::Idle),
        (Some(State::Timeout), Event::Recover, State::Idle),
        (Some(State::Idle), Event::IdleExpired, State::Timeout),
        (Some(State::Idle), Event::Regenerate, State::UserWriting),
        (Some(State::AiCommitted), Event::Regenerate, State::UserWriting),
        (Some(State::Error), Event::Regenerate, State::UserWriting),
        (Some(State::Timeout), Event::Regenerate, State::UserWriting),
        (Some(State::Idle), Event::Edit, State::UserWriting),
        (Some(State::AiCommitted), Event::Edit, State::UserWriting),
        (Some(State::Error), Event::Edit, State::UserWriting),
        (Some(State::Timeout), Event::Edit, State::UserWriting),
        (None, Event::Fork, State::Idle),
    ];

    #[test]
    fn every_listed_edge_is_accepted_and_every_other_pair_rejected() {
        let froms = std::iter::once(None).chain(State::ALL.into_iter().map(Some));
        let mut checked = 0;
        for from in froms {
            for event in Event::ALL {
                let expected =
                    EXPECTED.iter().find(|(f, e, _)| *f == from && *e == event).map(|(_, _, to)| *to);
                assert_eq!(transition(from, event), expected, "{from:?} --{event:?}-->");
                checked += 1;
            }
        }
        assert_eq!(checked, 8 * 16);
    }

    #[test]
    fn in_flight_states_are_exactly_user_writing_through_ai_generating() {
        let in_flight: Vec<State> = State::ALL.into_iter().filter(|s| s.turn_in_flight()).collect();
        assert_eq!(in_flight, vec![State::UserWriting, State::UserCommitted, State::AiGenerating]);
    }

    #[test]
    fn an_overdue_turn_ends_by_an_edge_of_the_table() {
        for state in State::ALL {
            match expiry(state) {
                Some((event, _)) => {
                    assert!(state.turn_in_flight(), "{state} has a deadline");
                    let to = transition(Some(state), event).expect("an edge of the table");
                    assert!(to.turn_ended(), "{state} --{event}--> {to} ends the turn");
                }
                None => assert!(!state.turn_in_flight(), "{state} is in flight but has no deadline"),
            }
        }
        // A stalled generation is taken over (an edge back into ai_generating) while attempts last.
        assert!(retryable(State::AiGenerating, 1, 2) && !retryable(State::AiGenerating, 2, 2));
        assert_eq!(transition(Some(State::AiGenerating), Event::LeaseTakeover), Some(State::AiGenerating));
        assert!(!retryable(State::UserWriting, 0, 9));
    }

    #[test]
    fn names_round_trip_through_strings_and_serde() {
        for state in State::ALL {
            assert_eq!(state.as_str().parse::<State>(), Ok(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
        for event in Event::ALL {
            assert_eq!(event.as_str().parse::<Event>(), Ok(event));
        }
        assert!("generating".parse::<State>().is_err());
    }

    #[test]
    fn sources_are_read_off_the_table() {
        assert_eq!(
            Event::UserSend.sources(),
            vec![None, Some(State::Idle), Some(State::AiCommitted), Some(State::Error), Some(State::Timeout)]
        );
        assert_eq!(Event::ReplyCommitted.sources(), vec![Some(State::AiGenerating)]);
    }
}
