//! What the store reads and returns, and how items map onto these types.

use crate::error::StoreError;
use crate::fsm::{Event, State};
use crate::ids::{MessageId, Role, SessionId, Turn, UserId};
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;
use std::str::FromStr;

/// A DynamoDB item.
pub type Item = HashMap<String, AttributeValue>;

/// A session as stored: its identity, its FSM position and its current turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// The session id.
    pub id: SessionId,
    /// Its owner.
    pub user_id: UserId,
    /// Where the current turn stands.
    pub state: State,
    /// Bumped by every transition; the fencing token of conditional writes.
    pub version: u64,
    /// The current (latest) turn.
    pub turn: Turn,
    /// Creation time, epoch ms.
    pub created_at: u64,
    /// Time of the last transition, epoch ms.
    pub updated_at: u64,
    /// The generator holding the current turn, while `ai_generating`.
    pub lease: Option<LeaseInfo>,
    /// When the current in-flight step is overdue, epoch ms.
    pub due_at: Option<u64>,
    /// Generation attempts of the current turn.
    pub attempts: u32,
    /// Times the sweeper re-drove the current turn.
    pub redrives: u32,
    /// The client asked to stop the current turn.
    pub cancel_requested: bool,
    /// Why the turn ended in `error` or `timeout`.
    pub reason: Option<String>,
    /// The operation id of the last transition, to recognise a retried write of our own.
    pub last_op: Option<String>,
    /// When DynamoDB may remove the session (its TTL, epoch seconds); `None`: kept forever.
    pub retained_until: Option<u64>,
    /// A summary of the conversation, written after the session went idle.
    pub summary: Option<Summary>,
    /// The session went idle and its summary is still to be written.
    pub summary_pending: bool,
    /// The session and turn this one was forked from: its history up to that turn is a copy.
    pub forked_from: Option<(SessionId, Turn)>,
    /// Its title: the first words of its first message, the small model's, or the user's own.
    pub title: Option<String>,
}

/// Who wrote a session's title; a user's rename is never overwritten by the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TitleBy {
    /// The first words of the first message, when the session was created.
    Words,
    /// The small model, from the first exchange.
    Model,
    /// The user, renaming the session.
    User,
}

impl TitleBy {
    /// The name stored with the title.
    pub fn as_str(self) -> &'static str {
        match self {
            TitleBy::Words => "words",
            TitleBy::Model => "model",
            TitleBy::User => "user",
        }
    }
}

/// The longest title kept, in characters.
pub const TITLE_MAX_CHARS: usize = 120;

/// A title from the first words of a message: whitespace collapsed, markdown's leading marks
/// dropped, at most eight words and 60 characters (cut at a word, with an ellipsis).
pub fn title_from_words(text: &str) -> String {
    let words: Vec<&str> = text
        .split_whitespace()
        .map(|w| w.trim_start_matches(['#', '>', '*', '`', '-']))
        .filter(|w| !w.is_empty())
        .collect();
    let mut title = String::new();
    for (i, word) in words.iter().enumerate() {
        let longer = title.chars().count() + word.chars().count() + usize::from(!title.is_empty());
        if i == 8 || longer > 60 {
            if title.is_empty() {
                title = word.chars().take(59).collect();
            }
            title.push('…');
            return title;
        }
        if !title.is_empty() {
            title.push(' ');
        }
        title.push_str(word);
    }
    if title.is_empty() {
        "New chat".to_owned()
    } else {
        title
    }
}

/// A summary of a conversation up to a turn: the compact memory of what came before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The summary text.
    pub text: String,
    /// The last turn it covers.
    pub through: Turn,
    /// When it was written, epoch ms.
    pub at: u64,
}

/// A generator's hold on a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The lease id of the holder.
    pub owner: String,
    /// When it lapses unless extended, epoch ms.
    pub expires_at: u64,
}

/// A stored chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Session, turn and role.
    pub id: MessageId,
    /// The text.
    pub content: String,
    /// When it was committed, epoch ms.
    pub timestamp: u64,
    /// Why an assistant reply was cut short, if it was.
    pub stopped: Option<StopReason>,
    /// Which route and model wrote an assistant reply (response routing).
    pub routing: Option<Routing>,
    /// The tools the model called while writing an assistant reply, in order.
    pub tool_uses: Vec<ToolUse>,
    /// What the model calls of an assistant reply consumed; `None` for user messages and for
    /// replies stored before replies kept it.
    pub usage: Option<Usage>,
    /// What those calls cost in US dollars, by the configured prices (`MODEL_PRICES`); `None`
    /// when a model the reply used has no price.
    pub cost_usd: Option<f64>,
    /// On a turn's user message: the earlier turn this one redoes (a regenerate or an edit).
    pub revises: Option<Turn>,
    /// On a turn's user message: the later turn that redid this one, which makes this turn an
    /// earlier version, left out of prompts.
    pub superseded_by: Option<Turn>,
}

/// One tool call of a reply and what the tool answered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolUse {
    /// The call's id (the same as in the stream's `tool_call` and `tool_result` events).
    pub id: String,
    /// The tool.
    pub name: String,
    /// The arguments, as the JSON text the model wrote.
    pub arguments: String,
    /// What the tool returned, or why it failed.
    pub result: String,
    /// The tool failed.
    pub is_error: bool,
}

/// A reply's token sequence carries more than text: a tool call or a tool result is an entry of
/// its own, with its own index, so a stream replays it in order and resumes after it. It is
/// stored as a token that starts with this character (ASCII record separator, which model text
/// never starts with: the generator replaces it), then `{"event": ..., "data": ...}`.
pub const EVENT_MARK: char = '\u{1e}';

/// A non-text entry of a reply's token sequence.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplyEvent {
    /// The SSE event name: `tool_call` or `tool_result`.
    pub event: String,
    /// Its data.
    pub data: serde_json::Value,
}

impl ReplyEvent {
    /// The token that stores it.
    pub fn encode(&self) -> String {
        format!("{EVENT_MARK}{}", serde_json::to_string(self).expect("an event serialises"))
    }

    /// The event a token stores, or `None` for a text token.
    pub fn decode(token: &str) -> Option<ReplyEvent> {
        serde_json::from_str(token.strip_prefix(EVENT_MARK)?).ok()
    }
}

/// The response route a turn took: the rule's choice and the model that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// The route (`main`, `small`).
    pub route: String,
    /// The model that answered.
    pub model: String,
}

/// Tokens a model consumed, as its provider reports them (or as estimated when it reports
/// none): what a turn costs. Kept by kind, since providers price them differently. Serialised
/// with the wire names of `message_end` and `GET /sessions/{id}` (`input_tokens`, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Prompt tokens read fresh (not from a prompt cache).
    #[serde(rename = "input_tokens")]
    pub input: u64,
    /// Tokens the model generated.
    #[serde(rename = "output_tokens")]
    pub output: u64,
    /// Prompt tokens read from the provider's prompt cache.
    #[serde(rename = "cache_read_tokens")]
    pub cache_read: u64,
    /// Prompt tokens written to the provider's prompt cache.
    #[serde(rename = "cache_write_tokens")]
    pub cache_write: u64,
}

impl Usage {
    /// Every token the model processed: what the daily token budget counts.
    pub fn total(&self) -> u64 {
        self.input
            .saturating_add(self.output)
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_write)
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cache_read = self.cache_read.saturating_add(other.cache_read);
        self.cache_write = self.cache_write.saturating_add(other.cache_write);
    }
}

/// Why a reply ended before the model finished it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The user cancelled the turn.
    Cancelled,
    /// The reply reached the size a stored message may have (`REPLY_MAX_BYTES`).
    ReplyLimit,
}

impl StopReason {
    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Cancelled => "cancelled",
            StopReason::ReplyLimit => "reply_limit",
        }
    }
}

/// A batch of tokens of one turn, written by the lease holder in sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The turn.
    pub turn: Turn,
    /// Position in the turn's chunk sequence, from 0, gap-free.
    pub seq: u32,
    /// Index (within the turn) of the first token.
    pub start: u64,
    /// The tokens; empty for the fence a takeover writes.
    pub tokens: Vec<String>,
    /// The lease id of the writer.
    pub owner: String,
    /// When it was written (epoch ms, the writer's clock); `None` for chunks written before
    /// chunks carried it.
    pub at: Option<u64>,
    /// When the writer expected, as it wrote this chunk, to write the next one
    /// (epoch ms): a relay polls for it then, rather than on a fixed beat. `None` when it gave no
    /// hint (a takeover's fence).
    pub next_at: Option<u64>,
}

/// What a user's other tabs are told about their sessions ([`FeedEvent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeedKind {
    /// A session was created: by a first message (its first turn started) or a fork.
    SessionCreated,
    /// A turn started in an existing session: a message, a regenerate or an edit.
    TurnStarted,
    /// A turn ended: committed, failed or timed out.
    TurnEnded,
    /// The session got a new title.
    SessionRenamed,
    /// The session was deleted.
    SessionDeleted,
}

impl FeedKind {
    /// Every kind.
    pub const ALL: [FeedKind; 5] = [
        FeedKind::SessionCreated,
        FeedKind::TurnStarted,
        FeedKind::TurnEnded,
        FeedKind::SessionRenamed,
        FeedKind::SessionDeleted,
    ];

    /// The name stored, and sent as the SSE event's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedKind::SessionCreated => "session_created",
            FeedKind::TurnStarted => "turn_started",
            FeedKind::TurnEnded => "turn_ended",
            FeedKind::SessionRenamed => "session_renamed",
            FeedKind::SessionDeleted => "session_deleted",
        }
    }

    /// What a transition from `from` (`None`: no session yet) to `to` tells the feed, read off the
    /// state machine: a session created, a turn that started (an ended turn's session moves into
    /// flight) or ended (the reverse); nothing for the steps in between or for settling.
    pub fn of_transition(from: Option<State>, to: State) -> Option<FeedKind> {
        match from {
            None => Some(FeedKind::SessionCreated),
            Some(from) if from.turn_ended() && to.turn_in_flight() => Some(FeedKind::TurnStarted),
            Some(from) if from.turn_in_flight() && to.turn_ended() => Some(FeedKind::TurnEnded),
            Some(_) => None,
        }
    }
}

/// One event of a user's feed: what happened to which session, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEvent {
    /// Its id: sorts by time; a client resumes after it.
    pub id: String,
    /// What happened.
    pub kind: FeedKind,
    /// The session it happened to.
    pub session: SessionId,
    /// The session's last turn then.
    pub turn: Option<Turn>,
    /// The session's state then (`None` for a deleted session, a rename).
    pub state: Option<State>,
    /// The transition's event (`user_send`, `regenerate`, `reply_committed`, …), if one.
    pub event: Option<Event>,
    /// The session's title (created, renamed).
    pub title: Option<String>,
    /// When, epoch ms.
    pub at: u64,
}

impl FeedEvent {
    pub(crate) fn from_item(item: &Item) -> Result<FeedEvent, StoreError> {
        let fields = Fields::new(item);
        let sk = fields.string(crate::table::SK)?;
        let kind = fields.string(attr::EVENT_KIND)?;
        Ok(FeedEvent {
            id: sk.strip_prefix(crate::table::FEED_PREFIX).unwrap_or(sk).to_owned(),
            kind: FeedKind::ALL
                .into_iter()
                .find(|k| k.as_str() == kind)
                .ok_or_else(|| fields.bad(attr::EVENT_KIND, "is not a feed event"))?,
            session: fields.parsed(attr::SESSION_ID, SessionId::parse)?,
            turn: fields.opt_turn(attr::TURN)?,
            state: fields
                .opt_string(attr::TO)?
                .map(State::from_str)
                .transpose()
                .map_err(|_| fields.bad(attr::TO, "is not a state"))?,
            event: fields
                .opt_string(attr::EVENT)?
                .map(Event::from_str)
                .transpose()
                .map_err(|_| fields.bad(attr::EVENT, "is not an event"))?,
            title: fields.opt_string(attr::TITLE)?.map(str::to_owned),
            at: fields.number(attr::AT)?,
        })
    }
}

/// One recorded transition, for audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRecord {
    /// The version the transition produced.
    pub version: u64,
    /// The state it left (`None`: the session was created).
    pub from: Option<State>,
    /// The state it entered.
    pub to: State,
    /// The event that caused it.
    pub event: Event,
    /// The turn after the transition.
    pub turn: Turn,
    /// When, epoch ms.
    pub at: u64,
    /// Who: a request id or lease id.
    pub by: String,
}

/// Typed reads of one item, with errors that name the item and attribute.
pub(crate) struct Fields<'a> {
    item: &'a Item,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(item: &'a Item) -> Self {
        Fields { item }
    }

    fn key(&self) -> String {
        let part = |name| self.item.get(name).and_then(|v| v.as_s().ok()).map_or("?", |s| s.as_str());
        format!("{}/{}", part("pk"), part("sk"))
    }

    pub(crate) fn bad(&self, name: &str, why: &str) -> StoreError {
        StoreError::corrupt(self.key(), format!("{name} {why}"))
    }

    pub(crate) fn opt_string(&self, name: &str) -> Result<Option<&'a str>, StoreError> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::S(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad(name, "is not a string")),
        }
    }

    pub(crate) fn string(&self, name: &str) -> Result<&'a str, StoreError> {
        self.opt_string(name)?.ok_or_else(|| self.bad(name, "is missing"))
    }

    pub(crate) fn opt_number<T: FromStr>(&self, name: &str) -> Result<Option<T>, StoreError> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::N(n)) => n.parse().map(Some).map_err(|_| self.bad(name, "is out of range")),
            Some(_) => Err(self.bad(name, "is not a number")),
        }
    }

    pub(crate) fn number<T: FromStr>(&self, name: &str) -> Result<T, StoreError> {
        self.opt_number(name)?.ok_or_else(|| self.bad(name, "is missing"))
    }

    pub(crate) fn flag(&self, name: &str) -> Result<bool, StoreError> {
        match self.item.get(name) {
            None => Ok(false),
            Some(AttributeValue::Bool(b)) => Ok(*b),
            Some(_) => Err(self.bad(name, "is not a boolean")),
        }
    }

    pub(crate) fn parsed<T, E>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<T, StoreError> {
        parse(self.string(name)?).map_err(|_| self.bad(name, "does not parse"))
    }

    pub(crate) fn strings(&self, name: &str) -> Result<Vec<String>, StoreError> {
        match self.item.get(name) {
            None => Ok(Vec::new()),
            Some(AttributeValue::L(list)) => list
                .iter()
                .map(|v| v.as_s().cloned().map_err(|_| self.bad(name, "holds a non-string")))
                .collect(),
            Some(_) => Err(self.bad(name, "is not a list")),
        }
    }

    pub(crate) fn turn(&self, name: &str) -> Result<Turn, StoreError> {
        Turn::new(self.number(name)?).map_err(|_| self.bad(name, "is not a turn number"))
    }

    pub(crate) fn opt_turn(&self, name: &str) -> Result<Option<Turn>, StoreError> {
        self.opt_number(name)?
            .map(|n| Turn::new(n).map_err(|_| self.bad(name, "is not a turn number")))
            .transpose()
    }

    pub(crate) fn state(&self, name: &str) -> Result<State, StoreError> {
        self.parsed(name, State::from_str)
    }
}

impl Session {
    pub(crate) fn from_item(item: &Item) -> Result<Session, StoreError> {
        let fields = Fields::new(item);
        let lease = match (fields.opt_string(attr::LEASE_OWNER)?, fields.opt_number(attr::LEASE_EXPIRES_AT)?)
        {
            (Some(owner), Some(expires_at)) => Some(LeaseInfo { owner: owner.to_owned(), expires_at }),
            _ => None,
        };
        Ok(Session {
            id: fields.parsed(attr::SESSION_ID, SessionId::parse)?,
            user_id: fields.parsed(attr::USER_ID, UserId::parse)?,
            state: fields.state(attr::STATE)?,
            version: fields.number(attr::VERSION)?,
            turn: fields.turn(attr::TURN)?,
            created_at: fields.number(attr::CREATED_AT)?,
            updated_at: fields.number(attr::UPDATED_AT)?,
            lease,
            due_at: fields.opt_number(crate::table::DUE_AT)?,
            attempts: fields.opt_number(attr::ATTEMPTS)?.unwrap_or(0),
            redrives: fields.opt_number(attr::REDRIVES)?.unwrap_or(0),
            cancel_requested: fields.flag(attr::CANCEL_REQUESTED)?,
            reason: fields.opt_string(attr::REASON)?.map(str::to_owned),
            last_op: fields.opt_string(attr::LAST_OP)?.map(str::to_owned),
            retained_until: fields.opt_number(crate::table::TTL_ATTRIBUTE)?,
            summary: match fields.opt_string(attr::SUMMARY)? {
                Some(text) => Some(Summary {
                    text: text.to_owned(),
                    through: fields.turn(attr::SUMMARY_THROUGH)?,
                    at: fields.number(attr::SUMMARY_AT)?,
                }),
                None => None,
            },
            summary_pending: fields.flag(attr::SUMMARY_PENDING)?,
            forked_from: match fields.opt_string(attr::FORKED_FROM)? {
                Some(parent) => Some((
                    SessionId::parse(parent)
                        .map_err(|_| fields.bad(attr::FORKED_FROM, "is not a session id"))?,
                    fields.turn(attr::FORKED_TURN)?,
                )),
                None => None,
            },
            title: fields.opt_string(attr::TITLE)?.map(str::to_owned),
        })
    }
}

impl Message {
    pub(crate) fn from_item(item: &Item) -> Result<Message, StoreError> {
        let fields = Fields::new(item);
        let role = match fields.string(attr::ROLE)? {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            _ => return Err(StoreError::corrupt(fields.key(), "role is neither user nor assistant")),
        };
        Ok(Message {
            id: MessageId {
                session: fields.parsed(attr::SESSION_ID, SessionId::parse)?,
                turn: fields.turn(attr::TURN)?,
                role,
            },
            content: fields.string(attr::CONTENT)?.to_owned(),
            timestamp: fields.number(attr::TIMESTAMP)?,
            // Replies stopped before reasons were recorded were cancelled.
            stopped: match (fields.flag(attr::STOPPED)?, fields.opt_string(attr::STOP_REASON)?) {
                (false, _) => None,
                (true, Some("reply_limit")) => Some(StopReason::ReplyLimit),
                (true, _) => Some(StopReason::Cancelled),
            },
            routing: match (fields.opt_string(attr::ROUTE)?, fields.opt_string(attr::MODEL)?) {
                (Some(route), Some(model)) => {
                    Some(Routing { route: route.to_owned(), model: model.to_owned() })
                }
                _ => None,
            },
            tool_uses: match fields.opt_string(attr::TOOL_USES)? {
                Some(json) => serde_json::from_str(json)
                    .map_err(|_| StoreError::corrupt(fields.key(), "tool_uses does not parse"))?,
                None => Vec::new(),
            },
            usage: match fields.opt_number(attr::INPUT_TOKENS)? {
                Some(input) => Some(Usage {
                    input,
                    output: fields.number(attr::OUTPUT_TOKENS)?,
                    cache_read: fields.number(attr::CACHE_READ_TOKENS)?,
                    cache_write: fields.number(attr::CACHE_WRITE_TOKENS)?,
                }),
                None => None,
            },
            cost_usd: fields.opt_number(attr::COST_USD)?,
            revises: fields.opt_turn(attr::REVISES)?,
            superseded_by: fields.opt_turn(attr::SUPERSEDED_BY)?,
        })
    }
}

impl Chunk {
    pub(crate) fn from_item(item: &Item) -> Result<Chunk, StoreError> {
        let fields = Fields::new(item);
        Ok(Chunk {
            turn: fields.turn(attr::TURN)?,
            seq: fields.number(attr::SEQ)?,
            start: fields.number(attr::START)?,
            tokens: fields.strings(attr::TOKENS)?,
            owner: fields.string(attr::OWNER)?.to_owned(),
            at: fields.opt_number(attr::AT)?,
            next_at: fields.opt_number(attr::NEXT_AT)?,
        })
    }

    /// Index one past the last token.
    pub fn end(&self) -> u64 {
        self.start + self.tokens.len() as u64
    }
}

impl TransitionRecord {
    pub(crate) fn from_item(item: &Item) -> Result<TransitionRecord, StoreError> {
        let fields = Fields::new(item);
        Ok(TransitionRecord {
            version: fields.number(attr::VERSION)?,
            from: match fields.opt_string(attr::FROM)? {
                Some(_) => Some(fields.state(attr::FROM)?),
                None => None,
            },
            to: fields.state(attr::TO)?,
            event: fields.parsed(attr::EVENT, Event::from_str)?,
            turn: fields.turn(attr::TURN)?,
            at: fields.number(attr::AT)?,
            by: fields.string(attr::BY)?.to_owned(),
        })
    }
}

/// Attribute names of items, in one place.
pub(crate) mod attr {
    pub const KIND: &str = "kind";
    pub const SESSION_ID: &str = "session_id";
    pub const USER_ID: &str = "user_id";
    pub const STATE: &str = "state";
    pub const VERSION: &str = "version";
    pub const TURN: &str = "turn";
    pub const CREATED_AT: &str = "created_at";
    pub const UPDATED_AT: &str = "updated_at";
    pub const LEASE_OWNER: &str = "lease_owner";
    pub const LEASE_EXPIRES_AT: &str = "lease_expires_at";
    pub const ATTEMPTS: &str = "attempts";
    pub const REDRIVES: &str = "redrives";
    pub const CANCEL_REQUESTED: &str = "cancel_requested";
    pub const REASON: &str = "reason";
    pub const LAST_OP: &str = "last_op";
    pub const SUMMARY: &str = "summary";
    pub const SUMMARY_THROUGH: &str = "summary_through";
    pub const SUMMARY_AT: &str = "summary_at";
    pub const SUMMARY_PENDING: &str = "summary_pending";
    pub const ROUTE: &str = "route";
    pub const MODEL: &str = "model";
    pub const TOOL_USES: &str = "tool_uses";
    pub const INPUT_TOKENS: &str = "input_tokens";
    pub const OUTPUT_TOKENS: &str = "output_tokens";
    pub const CACHE_READ_TOKENS: &str = "cache_read_tokens";
    pub const CACHE_WRITE_TOKENS: &str = "cache_write_tokens";
    pub const COST_USD: &str = "cost_usd";
    pub const ROLE: &str = "role";
    pub const CONTENT: &str = "content";
    pub const TIMESTAMP: &str = "timestamp";
    pub const STOPPED: &str = "stopped";
    pub const STOP_REASON: &str = "stop_reason";
    pub const SEQ: &str = "seq";
    pub const START: &str = "start";
    pub const TOKENS: &str = "tokens";
    pub const OWNER: &str = "owner";
    pub const NEXT_AT: &str = "next_at";
    pub const FROM: &str = "from";
    pub const TO: &str = "to";
    pub const EVENT: &str = "event";
    pub const AT: &str = "at";
    pub const BY: &str = "by";
    pub const REVISES: &str = "revises";
    pub const SUPERSEDED_BY: &str = "superseded_by";
    pub const FORKED_FROM: &str = "forked_from";
    pub const FORKED_TURN: &str = "forked_turn";
    pub const TITLE: &str = "title";
    pub const TITLE_BY: &str = "title_by";
    pub const EVENT_KIND: &str = "feed_kind";
    pub const REDONE_THROUGH: &str = "redone_through";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_title_is_the_first_words_cut_at_a_word() {
        assert_eq!(title_from_words("  # How do   I\nsort a *list*?  "), "How do I sort a list*?");
        assert_eq!(
            title_from_words("one two three four five six seven eight nine"),
            "one two three four five six seven eight…"
        );
        let long = "a".repeat(100);
        assert_eq!(title_from_words(&long).chars().count(), 60);
        assert_eq!(title_from_words(" \n "), "New chat");
        let many = "word ".repeat(20);
        assert!(title_from_words(&format!("supercalifragilistic {many}")).chars().count() <= 61);
    }

    #[test]
    fn a_reply_event_round_trips_through_its_token_and_text_is_never_taken_for_one() {
        let event = ReplyEvent {
            event: "tool_call".to_owned(),
            data: serde_json::json!({"id": "c1", "name": "calculator", "arguments": "{\"expression\":\"2+2\"}"}),
        };
        let token = event.encode();
        assert!(token.starts_with(EVENT_MARK));
        assert_eq!(ReplyEvent::decode(&token), Some(event));
        for text in ["hello", "{\"event\": \"tool_call\", \"data\": {}}", "", "\u{1e}not json"] {
            assert_eq!(ReplyEvent::decode(text), None, "{text:?}");
        }
    }
}
