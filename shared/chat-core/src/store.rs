//! The DynamoDB store that enforces the state machine.
//!
//! Every state change goes through [`Store::write_transition`]: one `TransactWriteItems` whose
//! session update is conditioned on `state = :from AND version = :v`, sets `version + 1` and the
//! state [`fsm::transition`] gives, and records the transition. A failed condition comes back as
//! [`Outcome::Conflict`]; a timeout is resolved by re-reading the session and looking for this
//! operation's id, never by retrying blindly.

use crate::error::StoreError;
use crate::fsm::{self, Event, State};
use crate::ids::{ClientMessageId, Role, SessionId, Turn, UserId};
use crate::model::{attr, Chunk, Fields, Item, Message, Session, StopReason, TransitionRecord};
use crate::table::{self, DUE_AT, DUE_SHARD, GSI1_PK, GSI1_SK, PK, SK, TTL_ATTRIBUTE};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConsumedCapacity, Delete, DeleteRequest, KeysAndAttributes, Put, ReturnConsumedCapacity,
    ReturnValue, ReturnValuesOnConditionCheckFailure, Select, TransactWriteItem, Update, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::Rng as _;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Timing and retention settings of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long a turn may stay in `user_writing` before the sweeper ends it in `error`.
    pub writing_timeout: Duration,
    /// How long a `user_committed` turn may wait for a generator before it is overdue.
    pub pickup_timeout: Duration,
    /// How long token chunks are kept (TTL); the committed message outlives them.
    pub chunk_retention: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_retention: Duration,
    /// Attempts when concurrent transactions collide or a state read goes stale.
    pub max_attempts: u32,
    /// Sessions a user may have (0: no limit); counted whether or not it is enforced.
    pub max_sessions_per_user: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            writing_timeout: Duration::from_secs(30),
            pickup_timeout: Duration::from_secs(60),
            chunk_retention: Duration::from_secs(7 * 24 * 3600),
            idempotency_retention: Duration::from_secs(24 * 3600),
            max_attempts: 8,
            max_sessions_per_user: 0,
        }
    }
}

/// Where the store gets the time: the system clock, or a hand-driven one for tests.
#[derive(Debug, Clone)]
pub enum Clock {
    /// Wall-clock time.
    System,
    /// Time set by the test (epoch ms).
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// Epoch milliseconds now.
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            Clock::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }
}

/// DynamoDB capacity units this store has consumed, as DynamoDB reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Capacity {
    /// Read capacity units.
    pub read_units: f64,
    /// Write capacity units.
    pub write_units: f64,
}

#[derive(Debug, Default)]
struct CapacityMeter {
    read_milli: AtomicU64,
    write_milli: AtomicU64,
}

impl CapacityMeter {
    fn add(&self, write: bool, consumed: Option<&ConsumedCapacity>) {
        let Some(units) = consumed.and_then(ConsumedCapacity::capacity_units) else { return };
        let counter = if write { &self.write_milli } else { &self.read_milli };
        counter.fetch_add((units * 1000.0).round() as u64, Ordering::Relaxed);
    }
}

/// The result of a conditional write: it happened, or the session was not as expected.
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

/// A transition to write, before it is turned into a transaction.
struct TransitionWrite {
    session: SessionId,
    /// The session as read (`None`: it must not exist yet).
    expected: Option<(State, u64)>,
    event: Event,
    turn: Turn,
    by: String,
    set: Vec<(&'static str, AttributeValue)>,
    remove: Vec<&'static str>,
    /// Further condition on the session item, with its own `:x` values and `#x` names.
    extra_condition: Option<(&'static str, Vec<(&'static str, AttributeValue)>)>,
    /// Items that must land atomically with the transition (message, idempotency record).
    extra_items: Vec<TransactWriteItem>,
}

enum WriteResult {
    Applied {
        version: u64,
    },
    /// Some condition failed and nothing was written.
    Rejected(Rejection),
}

/// Which conditions of a rejected transition failed.
struct Rejection {
    /// The session was not in the expected state and version.
    session_failed: bool,
    /// The session as it is now, when `session_failed`.
    current: Option<Session>,
    /// Extra items (by index) whose condition failed, with what they hold.
    extras: Vec<(usize, Option<Item>)>,
}

impl Rejection {
    fn extra(&self, index: usize) -> Option<&Option<Item>> {
        self.extras.iter().find(|(i, _)| *i == index).map(|(_, item)| item)
    }
}

/// The DynamoDB store. Cheap to clone; build one per cold start.
#[derive(Debug, Clone)]
pub struct Store {
    client: Client,
    table: Arc<str>,
    options: StoreOptions,
    clock: Clock,
    capacity: Arc<CapacityMeter>,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

pub(crate) fn key(pk: String, sk: impl Into<String>) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

fn session_key(session: SessionId) -> Item {
    key(table::session_pk(session), table::SESSION_SK)
}

/// Full-jitter exponential backoff: 0..min(1 s, 25 ms × 2^attempt).
async fn backoff(attempt: u32) {
    let cap = 25u64.saturating_mul(1 << attempt.min(6)).min(1000);
    let wait = rand::rng().random_range(0..=cap);
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

impl Store {
    /// A store over `table`, using the system clock.
    pub fn new(client: Client, table: impl Into<Arc<str>>, options: StoreOptions) -> Self {
        Store { client, table: table.into(), options, clock: Clock::System, capacity: Arc::default() }
    }

    /// The same store reading time from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The store's settings.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Epoch ms by the store's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Capacity units consumed so far by this store (and its clones).
    pub fn capacity(&self) -> Capacity {
        Capacity {
            read_units: self.capacity.read_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            write_units: self.capacity.write_milli.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn meter(&self, write: bool, consumed: Option<&ConsumedCapacity>) {
        self.capacity.add(write, consumed);
    }

    /// One item by key, read consistently.
    pub(crate) async fn get_item(&self, key: Item) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| StoreError::dynamo("GetItem", e))?;
        self.capacity.add(false, out.consumed_capacity());
        Ok(out.item)
    }

    // ----- reads -------------------------------------------------------------------------

    /// Reads a session item; `consistent` for a read that must see the latest write.
    pub async fn get_session(&self, id: SessionId, consistent: bool) -> Result<Option<Session>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(session_key(id)))
            .consistent_read(consistent)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| StoreError::dynamo("GetItem", e))?;
        self.capacity.add(false, out.consumed_capacity());
        out.item().map(Session::from_item).transpose()
    }

    /// Runs a query to its last page; `query` builds each page's request from its start key.
    async fn query_pages(
        &self,
        query: impl Fn(Option<Item>) -> QueryFluentBuilder,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = query(start.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| StoreError::dynamo("Query", e))?;
            self.capacity.add(false, out.consumed_capacity());
            items.extend(out.items().iter().cloned());
            match out.last_evaluated_key() {
                Some(last) if !last.is_empty() => start = Some(last.clone()),
                _ => return Ok(items),
            }
        }
    }

    /// Queries one partition's items whose sort key lies in `[from, to]`, all pages.
    async fn query_range(
        &self,
        pk: String,
        from: String,
        to: String,
        consistent: bool,
    ) -> Result<Vec<Item>, StoreError> {
        self.query_pages(|start| {
            self.client
                .query()
                .table_name(&*self.table)
                .key_condition_expression("#pk = :pk AND #sk BETWEEN :from AND :to")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", s(pk.clone()))
                .expression_attribute_values(":from", s(from.clone()))
                .expression_attribute_values(":to", s(to.clone()))
                .consistent_read(consistent)
                .set_exclusive_start_key(start)
        })
        .await
    }

    /// Reads one message of a turn (one `GetItem`), if it exists.
    pub async fn get_message(
        &self,
        session: SessionId,
        turn: Turn,
        role: Role,
        consistent: bool,
    ) -> Result<Option<Message>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key(table::session_pk(session), table::message_sk(turn, role))))
            .consistent_read(consistent)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| StoreError::dynamo("GetItem", e))?;
        self.capacity.add(false, out.consumed_capacity());
        out.item().map(Message::from_item).transpose()
    }

    /// The messages of the `max_turns` turns up to and including `through`'s user message, oldest
    /// first: one strongly consistent range query, whose cost does not grow with the session.
    pub async fn recent_messages(
        &self,
        session: SessionId,
        through: Turn,
        max_turns: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let first = u64::from(through.get()).saturating_sub(max_turns.max(1) as u64 - 1).max(1);
        let first = Turn::new(first).unwrap_or(through);
        let items = self
            .query_range(
                table::session_pk(session),
                table::message_sk(first, Role::User),
                table::message_sk(through, Role::User),
                true,
            )
            .await?;
        items.iter().map(Message::from_item).collect()
    }

    /// The messages of turns `first..=through`, oldest first: one range query.
    pub async fn messages_between(
        &self,
        session: SessionId,
        first: Turn,
        through: Turn,
    ) -> Result<Vec<Message>, StoreError> {
        if first > through {
            return Ok(Vec::new());
        }
        let items = self
            .query_range(
                table::session_pk(session),
                table::message_sk(first, Role::User),
                table::message_sk(through, Role::Assistant),
                true,
            )
            .await?;
        items.iter().map(Message::from_item).collect()
    }

    /// Reads a session and all its messages, oldest first.
    pub async fn get_conversation(
        &self,
        id: SessionId,
    ) -> Result<Option<(Session, Vec<Message>)>, StoreError> {
        let Some(session) = self.get_session(id, true).await? else { return Ok(None) };
        let prefix = table::MESSAGE_PREFIX;
        let items = self
            .query_range(table::session_pk(id), prefix.to_owned(), format!("{prefix}\u{10FFFF}"), true)
            .await?;
        let messages = items.iter().map(Message::from_item).collect::<Result<_, _>>()?;
        Ok(Some((session, messages)))
    }

    /// Reads a turn's chunks with a sequence number after `after_seq` (all of them for `None`).
    pub async fn read_chunks(
        &self,
        session: SessionId,
        turn: Turn,
        after_seq: Option<u32>,
        consistent: bool,
    ) -> Result<Vec<Chunk>, StoreError> {
        let first = match after_seq {
            Some(seq) => seq.saturating_add(1),
            None => 0,
        };
        let items = self
            .query_range(
                table::session_pk(session),
                table::chunk_sk(turn, first),
                format!("{}\u{10FFFF}", table::chunk_turn_prefix(turn)),
                consistent,
            )
            .await?;
        items.iter().map(Chunk::from_item).collect()
    }

    /// The session's recorded transitions, oldest first.
    pub async fn transitions(&self, session: SessionId) -> Result<Vec<TransitionRecord>, StoreError> {
        let prefix = table::TRANSITION_PREFIX;
        let items = self
            .query_range(table::session_pk(session), prefix.to_owned(), format!("{prefix}\u{10FFFF}"), true)
            .await?;
        items.iter().map(TransitionRecord::from_item).collect()
    }

    /// A user's sessions, newest first, `limit` per page.
    pub async fn list_user_sessions(
        &self,
        user: &UserId,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Result<SessionPage, InvalidCursor>, StoreError> {
        let start = match cursor.map(|c| self.decode_cursor(user, c)).transpose() {
            Ok(start) => start,
            Err(e) => return Ok(Err(e)),
        };
        let out = self
            .client
            .query()
            .table_name(&*self.table)
            .index_name(table::BY_USER_INDEX)
            .key_condition_expression("#g = :g")
            .expression_attribute_names("#g", GSI1_PK)
            .expression_attribute_values(":g", s(table::user_pk(user)))
            .scan_index_forward(false)
            .limit(limit.clamp(1, 100) as i32)
            .set_exclusive_start_key(start)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| StoreError::dynamo("Query", e))?;
        self.capacity.add(false, out.consumed_capacity());
        let keys: Vec<Item> = out
            .items()
            .iter()
            .map(|item| Ok(key(Fields::new(item).s(PK)?.to_owned(), table::SESSION_SK)))
            .collect::<Result<_, StoreError>>()?;
        let sessions = self.batch_get_sessions(keys).await?;
        let next_cursor = match out.last_evaluated_key() {
            Some(last) if !last.is_empty() => {
                let sk = Fields::new(last).s(GSI1_SK)?;
                Some(URL_SAFE_NO_PAD.encode(sk))
            }
            _ => None,
        };
        Ok(Ok(SessionPage { sessions, next_cursor }))
    }

    /// Reads session items by key, in the order given (a session deleted meanwhile is left out).
    async fn batch_get_sessions(&self, keys: Vec<Item>) -> Result<Vec<Session>, StoreError> {
        let mut found: HashMap<String, Session> = HashMap::new();
        let order: Vec<String> =
            keys.iter().filter_map(|k| k.get(PK).and_then(|v| v.as_s().ok()).cloned()).collect();
        let mut pending = keys;
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            if attempt > self.options.max_attempts {
                return Err(StoreError::Contention { attempts: attempt - 1 });
            }
            let request = KeysAndAttributes::builder()
                .set_keys(Some(pending))
                .consistent_read(true)
                .build()
                .expect("keys are set");
            let out = self
                .client
                .batch_get_item()
                .request_items(&*self.table, request)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| StoreError::dynamo("BatchGetItem", e))?;
            for consumed in out.consumed_capacity() {
                self.capacity.add(false, Some(consumed));
            }
            for item in out.responses().and_then(|r| r.get(&*self.table)).into_iter().flatten() {
                let session = Session::from_item(item)?;
                found.insert(table::session_pk(session.id), session);
            }
            pending = out
                .unprocessed_keys()
                .and_then(|u| u.get(&*self.table))
                .map(|k| k.keys().to_vec())
                .unwrap_or_default();
            if !pending.is_empty() {
                backoff(attempt).await;
            }
        }
        Ok(order.into_iter().filter_map(|pk| found.remove(&pk)).collect())
    }

    fn decode_cursor(&self, user: &UserId, cursor: &str) -> Result<Item, InvalidCursor> {
        let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| InvalidCursor)?;
        let gsi_sk = String::from_utf8(raw).map_err(|_| InvalidCursor)?;
        let (created, id) = gsi_sk.split_once('#').ok_or(InvalidCursor)?;
        created.parse::<u64>().map_err(|_| InvalidCursor)?;
        let session = SessionId::parse(id).map_err(|_| InvalidCursor)?;
        let mut start = session_key(session);
        start.insert(GSI1_PK.to_owned(), s(table::user_pk(user)));
        start.insert(GSI1_SK.to_owned(), s(gsi_sk));
        Ok(start)
    }

    /// Sessions whose in-flight step is overdue at `now`, across every `due` shard, at most
    /// `limit` per shard. The index holds only sessions with a turn in flight, so each query
    /// reads just those.
    pub async fn overdue_sessions(&self, now: u64, limit: u32) -> Result<Vec<SessionId>, StoreError> {
        let mut ids = Vec::new();
        for shard in table::due_shards() {
            let mut start: Option<Item> = None;
            let mut found = 0;
            loop {
                let out = self
                    .client
                    .query()
                    .table_name(&*self.table)
                    .index_name(table::DUE_INDEX)
                    .key_condition_expression("#shard = :shard")
                    .filter_expression("#due <= :now")
                    .expression_attribute_names("#shard", DUE_SHARD)
                    .expression_attribute_names("#due", DUE_AT)
                    .expression_attribute_values(":shard", s(shard.clone()))
                    .expression_attribute_values(":now", n(now))
                    .set_exclusive_start_key(start.take())
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
                    .await
                    .map_err(|e| StoreError::dynamo("Query", e))?;
                self.capacity.add(false, out.consumed_capacity());
                for item in out.items() {
                    let pk = Fields::new(item).s(PK)?;
                    let id = pk
                        .strip_prefix("S#")
                        .and_then(|raw| SessionId::parse(raw).ok())
                        .ok_or_else(|| StoreError::corrupt(pk, "due index entry is not a session"))?;
                    ids.push(id);
                    found += 1;
                }
                match out.last_evaluated_key() {
                    Some(last) if !last.is_empty() && found < limit => start = Some(last.clone()),
                    _ => break,
                }
            }
        }
        Ok(ids)
    }

    // ----- the transition writer ---------------------------------------------------------

    /// Writes one transition of the table, atomically with `extra_items`.
    async fn write_transition(&self, w: TransitionWrite) -> Result<WriteResult, StoreError> {
        let from = w.expected.map(|(state, _)| state);
        let to =
            fsm::transition(from, w.event).ok_or(StoreError::IllegalTransition { from, event: w.event })?;
        let version = w.expected.map_or(1, |(_, v)| v + 1);
        let now = self.now_ms();
        // Identifies this logical write across retries, so a retry can recognise its own success.
        let op = Uuid::new_v4().to_string();

        let mut names = HashMap::from([
            ("#state".to_owned(), attr::STATE.to_owned()),
            ("#version".to_owned(), attr::VERSION.to_owned()),
            ("#updated".to_owned(), attr::UPDATED_AT.to_owned()),
            ("#last_op".to_owned(), attr::LAST_OP.to_owned()),
        ]);
        let mut values = HashMap::from([
            (":to".to_owned(), s(to.as_str())),
            (":nv".to_owned(), n(version)),
            (":now".to_owned(), n(now)),
            (":op".to_owned(), s(op.clone())),
        ]);
        let mut sets = vec![
            "#state = :to".to_owned(),
            "#version = :nv".to_owned(),
            "#updated = :now".to_owned(),
            "#last_op = :op".to_owned(),
        ];
        for (i, (name, value)) in w.set.into_iter().enumerate() {
            names.insert(format!("#s{i}"), name.to_owned());
            values.insert(format!(":s{i}"), value);
            sets.push(format!("#s{i} = :s{i}"));
        }
        let mut update = format!("SET {}", sets.join(", "));
        if !w.remove.is_empty() {
            let removes: Vec<String> = (0..w.remove.len()).map(|i| format!("#r{i}")).collect();
            for (i, name) in w.remove.iter().enumerate() {
                names.insert(format!("#r{i}"), (*name).to_owned());
            }
            update.push_str(&format!(" REMOVE {}", removes.join(", ")));
        }
        let mut condition = match w.expected {
            None => {
                names.insert("#pk".to_owned(), PK.to_owned());
                "attribute_not_exists(#pk)".to_owned()
            }
            Some((from, expected_version)) => {
                values.insert(":from".to_owned(), s(from.as_str()));
                values.insert(":v".to_owned(), n(expected_version));
                "#state = :from AND #version = :v".to_owned()
            }
        };
        if let Some((extra, extra_values)) = w.extra_condition {
            condition.push_str(&format!(" AND ({extra})"));
            for (placeholder, value) in extra_values {
                values.insert(placeholder.to_owned(), value);
            }
            for placeholder in extra.split(|c: char| !(c.is_alphanumeric() || c == '#' || c == '_')) {
                if let Some(name) = placeholder.strip_prefix('#') {
                    names.entry(placeholder.to_owned()).or_insert_with(|| name.to_owned());
                }
            }
        }

        let session_update = Update::builder()
            .table_name(&*self.table)
            .set_key(Some(session_key(w.session)))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("update fields are set");
        let mut record = HashMap::from([
            (PK.to_owned(), s(table::session_pk(w.session))),
            (SK.to_owned(), s(table::transition_sk(version))),
            (attr::KIND.to_owned(), s("transition")),
            (attr::VERSION.to_owned(), n(version)),
            (attr::TO.to_owned(), s(to.as_str())),
            (attr::EVENT.to_owned(), s(w.event.as_str())),
            (attr::TURN.to_owned(), n(w.turn.get())),
            (attr::AT.to_owned(), n(now)),
            (attr::BY.to_owned(), s(w.by)),
        ]);
        if let Some(from) = from {
            record.insert(attr::FROM.to_owned(), s(from.as_str()));
        }
        let record_put = Put::builder()
            .table_name(&*self.table)
            .set_item(Some(record))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .expect("put fields are set");
        let mut items = vec![
            TransactWriteItem::builder().update(session_update).build(),
            TransactWriteItem::builder().put(record_put).build(),
        ];
        items.extend(w.extra_items);

        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .client_request_token(Uuid::new_v4().to_string())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await;
            let err = match result {
                Ok(out) => {
                    for consumed in out.consumed_capacity() {
                        self.capacity.add(true, Some(consumed));
                    }
                    return Ok(WriteResult::Applied { version });
                }
                Err(err) => err,
            };
            if let Some(TransactWriteItemsError::TransactionCanceledException(cancel)) =
                err.as_service_error()
            {
                let reasons = cancel.cancellation_reasons();
                let failed =
                    |i: usize| reasons.get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed");
                let session_failed = failed(0) || failed(1);
                let current = if session_failed {
                    match reasons[0].item() {
                        Some(item) if !item.is_empty() => Some(Session::from_item(item)?),
                        _ => self.get_session(w.session, true).await?,
                    }
                } else {
                    None
                };
                // An earlier attempt of this very write may have landed before a lost response.
                if current.as_ref().and_then(|c| c.last_op.as_deref()) == Some(op.as_str()) {
                    return Ok(WriteResult::Applied { version });
                }
                let extras: Vec<(usize, Option<Item>)> = (2..items.len())
                    .filter(|&i| failed(i))
                    .map(|i| (i - 2, reasons[i].item().cloned()))
                    .collect();
                if session_failed || !extras.is_empty() {
                    return Ok(WriteResult::Rejected(Rejection { session_failed, current, extras }));
                }
                let contended = reasons.iter().any(|r| {
                    matches!(
                        r.code(),
                        Some("TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded")
                    )
                });
                if contended && attempt < self.options.max_attempts {
                    backoff(attempt).await;
                    continue;
                }
                if contended {
                    return Err(StoreError::Contention { attempts: attempt });
                }
            }
            let err = StoreError::dynamo("TransactWriteItems", err);
            if !err.is_indeterminate() || attempt >= self.options.max_attempts {
                return Err(err);
            }
            // It may have been applied: the session says whether this operation landed.
            let current = match self.get_session(w.session, true).await {
                Ok(current) => current,
                Err(_) => return Err(err),
            };
            match &current {
                Some(c) if c.last_op.as_deref() == Some(op.as_str()) => {
                    return Ok(WriteResult::Applied { version })
                }
                Some(c) if Some((c.state, c.version)) == w.expected => {}
                None if w.expected.is_none() => {}
                _ => {
                    let rejection = Rejection { session_failed: true, current, extras: vec![] };
                    return Ok(WriteResult::Rejected(rejection));
                }
            }
            backoff(attempt).await;
        }
    }

    /// Builds a conditional `Put` of a new item.
    fn put_new(&self, item: Item) -> TransactWriteItem {
        self.put_absent(item, None)
    }

    /// A conditional `Put` of a new item; with `now_ms`, an item whose TTL has passed by then
    /// (DynamoDB removes expired items only eventually) counts as absent and is replaced.
    fn put_absent(&self, item: Item, now_ms: Option<u64>) -> TransactWriteItem {
        let mut put = Put::builder()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(now_ms) = now_ms {
            put = put
                .condition_expression("attribute_not_exists(#pk) OR #ttl <= :now")
                .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                .expression_attribute_values(":now", n(now_ms / 1000));
        }
        TransactWriteItem::builder().put(put.build().expect("put fields are set")).build()
    }

    /// Moves the user's session count by `delta`; an increase is conditioned on the limit.
    fn count_sessions(&self, user: &UserId, delta: i64) -> TransactWriteItem {
        let mut update = Update::builder()
            .table_name(&*self.table)
            .set_key(Some(key(table::user_pk(user), crate::limits::SESSION_COUNT_SK)))
            .update_expression("ADD #count :delta")
            .expression_attribute_names("#count", crate::limits::SESSION_COUNT)
            .expression_attribute_values(":delta", n(delta));
        let limit = self.options.max_sessions_per_user;
        if delta > 0 && limit > 0 {
            update = update
                .condition_expression("attribute_not_exists(#count) OR #count <= :most")
                .expression_attribute_values(":most", n(i64::from(limit) - delta));
        }
        TransactWriteItem::builder().update(update.build().expect("update fields are set")).build()
    }

    fn message_item(
        &self,
        session: SessionId,
        turn: Turn,
        role: Role,
        content: &str,
        stopped: Option<StopReason>,
    ) -> Item {
        let mut item = key(table::session_pk(session), table::message_sk(turn, role));
        item.extend([
            (attr::KIND.to_owned(), s("message")),
            (attr::SESSION_ID.to_owned(), s(session.to_string())),
            (attr::TURN.to_owned(), n(turn.get())),
            (attr::ROLE.to_owned(), s(role.as_str())),
            (attr::CONTENT.to_owned(), s(content)),
            (attr::TIMESTAMP.to_owned(), n(self.now_ms())),
        ]);
        if let Some(reason) = stopped {
            item.insert(attr::STOPPED.to_owned(), AttributeValue::Bool(true));
            item.insert(attr::STOP_REASON.to_owned(), s(reason.as_str()));
        }
        item
    }

    // ----- user side ---------------------------------------------------------------------

    async fn find_idempotent(
        &self,
        user: &UserId,
        key_: &ClientMessageId,
    ) -> Result<Option<(SessionId, Turn)>, StoreError> {
        let item = self.get_item(key(table::user_pk(user), table::idempotency_sk(key_))).await?;
        // DynamoDB removes expired items only eventually (within days): an expired key is absent.
        let live = item.as_ref().filter(|item| !self.expired(item));
        live.map(idempotent_answer).transpose()
    }

    /// Whether an item's TTL has passed (on this store's clock).
    fn expired(&self, item: &Item) -> bool {
        item.get(TTL_ATTRIBUTE)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|expires_s| expires_s * 1000 <= self.now_ms())
    }

    /// Claims a new turn (creating the session if asked) and stores the user message with it:
    /// `UserSend`, into `user_writing`. Follow with [`Store::commit_user_message`].
    pub async fn send_message(&self, msg: NewMessage<'_>) -> Result<SendOutcome, StoreError> {
        if let Some(idem) = msg.client_message_id {
            if let Some((session_id, turn)) = self.find_idempotent(msg.user, idem).await? {
                return Ok(SendOutcome::Duplicate { session_id, turn });
            }
        }
        let Some(session_id) = msg.session else {
            let session_id = SessionId::new();
            return self.claim_turn(&msg, session_id, None).await;
        };
        for _ in 0..self.options.max_attempts {
            let current = match self.get_session(session_id, true).await? {
                Some(current) if &current.user_id == msg.user => current,
                _ => return Ok(SendOutcome::NotFound),
            };
            if current.state.turn_in_flight() {
                return Ok(SendOutcome::InFlight { state: current.state, turn: current.turn });
            }
            match self.claim_turn(&msg, session_id, Some(&current)).await? {
                // The session moved between the read and the write but may still accept a turn.
                SendOutcome::InFlight { state, .. } if !state.turn_in_flight() => continue,
                outcome => return Ok(outcome),
            }
        }
        Err(StoreError::Contention { attempts: self.options.max_attempts })
    }

    async fn claim_turn(
        &self,
        msg: &NewMessage<'_>,
        session_id: SessionId,
        current: Option<&Session>,
    ) -> Result<SendOutcome, StoreError> {
        let now = self.now_ms();
        let turn = current.map_or(Turn::FIRST, |c| c.turn.next());
        let mut set = vec![
            (attr::TURN, n(turn.get())),
            (attr::ATTEMPTS, n(0)),
            (attr::REDRIVES, n(0)),
            (attr::CANCEL_REQUESTED, AttributeValue::Bool(false)),
            (DUE_SHARD, s(table::due_shard(session_id))),
            (DUE_AT, n(now + ms(self.options.writing_timeout))),
        ];
        if current.is_none() {
            set.extend([
                (attr::KIND, s("session")),
                (attr::SESSION_ID, s(session_id.to_string())),
                (attr::USER_ID, s(msg.user.as_str())),
                (attr::CREATED_AT, n(now)),
                (GSI1_PK, s(table::user_pk(msg.user))),
                (GSI1_SK, s(table::by_user_sk(now, session_id))),
            ]);
        }
        let mut extra_items =
            vec![self.put_new(self.message_item(session_id, turn, Role::User, msg.content, None))];
        if let Some(idem) = msg.client_message_id {
            let mut record = key(table::user_pk(msg.user), table::idempotency_sk(idem));
            record.extend([
                (attr::KIND.to_owned(), s("idempotency")),
                (attr::SESSION_ID.to_owned(), s(session_id.to_string())),
                (attr::TURN.to_owned(), n(turn.get())),
                (attr::CREATED_AT.to_owned(), n(now)),
                (TTL_ATTRIBUTE.to_owned(), n((now + ms(self.options.idempotency_retention)) / 1000)),
            ]);
            extra_items.push(self.put_absent(record, Some(now)));
        }
        // A new session moves the user's session count in the same transaction, up to the limit.
        let count_index = current.is_none().then(|| {
            extra_items.push(self.count_sessions(msg.user, 1));
            extra_items.len() - 1
        });
        let write = TransitionWrite {
            session: session_id,
            expected: current.map(|c| (c.state, c.version)),
            event: Event::UserSend,
            turn,
            by: msg.by.to_owned(),
            set,
            remove: vec![attr::LEASE_OWNER, attr::LEASE_EXPIRES_AT, attr::REASON],
            extra_condition: None,
            extra_items,
        };
        let rejection = match self.write_transition(write).await? {
            WriteResult::Applied { version } => {
                return Ok(SendOutcome::Accepted(TurnTicket { session_id, turn, version }))
            }
            WriteResult::Rejected(rejection) => rejection,
        };
        // A concurrent request with the same key won: answer with its turn.
        if let (Some(idem), Some(item)) = (msg.client_message_id, rejection.extra(1)) {
            let (session_id, turn) = match item {
                Some(item) => idempotent_answer(item)?,
                None => self.find_idempotent(msg.user, idem).await?.ok_or_else(|| {
                    StoreError::corrupt(table::idempotency_sk(idem), "conflicted but is missing")
                })?,
            };
            return Ok(SendOutcome::Duplicate { session_id, turn });
        }
        if count_index.is_some_and(|i| rejection.extra(i).is_some()) && !rejection.session_failed {
            return Ok(SendOutcome::SessionLimit { limit: self.options.max_sessions_per_user });
        }
        Ok(match rejection {
            Rejection { session_failed: true, current: Some(c), .. } if &c.user_id == msg.user => {
                SendOutcome::InFlight { state: c.state, turn: c.turn }
            }
            Rejection { session_failed: true, .. } => SendOutcome::NotFound,
            Rejection { .. } => {
                return Err(StoreError::corrupt(
                    table::message_sk(turn, Role::User),
                    "a message already exists for a turn being claimed",
                ))
            }
        })
    }

    /// `UserStored`: the user message is durable; the turn waits for a generator until its
    /// pickup deadline.
    pub async fn commit_user_message(
        &self,
        ticket: &TurnTicket,
        by: &str,
    ) -> Result<Outcome<TurnTicket>, StoreError> {
        let due = self.now_ms() + ms(self.options.pickup_timeout);
        let write = TransitionWrite {
            session: ticket.session_id,
            expected: Some((State::UserWriting, ticket.version)),
            event: Event::UserStored,
            turn: ticket.turn,
            by: by.to_owned(),
            set: vec![(DUE_AT, n(due))],
            remove: vec![],
            extra_condition: None,
            extra_items: vec![],
        };
        Ok(match self.write_transition(write).await? {
            WriteResult::Applied { version } => Outcome::Applied(TurnTicket { version, ..ticket.clone() }),
            WriteResult::Rejected(r) => Outcome::Conflict(Conflict { current: r.current }),
        })
    }

    /// Asks the generator of the current turn to stop; it commits what it has, marked stopped.
    pub async fn request_cancel(
        &self,
        session: SessionId,
        user: Option<&UserId>,
    ) -> Result<CancelOutcome, StoreError> {
        let mut condition = "#state IN (:w, :c, :g)".to_owned();
        let mut req = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(session_key(session)))
            .update_expression("SET #cancel = :yes")
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#cancel", attr::CANCEL_REQUESTED)
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":yes", AttributeValue::Bool(true))
            .expression_attribute_values(":w", s(State::UserWriting.as_str()))
            .expression_attribute_values(":c", s(State::UserCommitted.as_str()))
            .expression_attribute_values(":g", s(State::AiGenerating.as_str()))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        if let Some(user) = user {
            condition.push_str(" AND #user = :user");
            req = req
                .expression_attribute_names("#user", attr::USER_ID)
                .expression_attribute_values(":user", s(user.as_str()));
        }
        condition = format!("attribute_exists(#pk) AND {condition}");
        match req.condition_expression(condition).send().await {
            Ok(out) => {
                self.capacity.add(true, out.consumed_capacity());
                let session = Session::from_item(out.attributes().unwrap_or(&HashMap::new()))?;
                Ok(CancelOutcome::Requested { turn: session.turn, state: session.state })
            }
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(e)) => {
                    let current = match e.item() {
                        Some(item) if !item.is_empty() => Some(Session::from_item(item)?),
                        _ => None,
                    };
                    Ok(match current {
                        Some(c) if user.is_none_or(|u| u == &c.user_id) => {
                            CancelOutcome::NotInFlight { state: c.state }
                        }
                        _ => CancelOutcome::NotFound,
                    })
                }
                _ => Err(StoreError::dynamo("UpdateItem", err)),
            },
        }
    }

    // ----- generator side ----------------------------------------------------------------

    /// Claims `turn` for generation under lease `owner` for `lease_for`: `GenerationClaimed` from
    /// `user_committed`, or `LeaseTakeover` of an expired lease while attempts remain (then
    /// `LeaseExpired` into `timeout` once they are spent). A takeover fences the previous holder
    /// out of the chunk sequence before it returns.
    pub async fn claim_generation(
        &self,
        session: SessionId,
        turn: Turn,
        owner: &str,
        lease_for: Duration,
        max_attempts: u32,
    ) -> Result<ClaimOutcome, StoreError> {
        for _ in 0..self.options.max_attempts {
            let Some(current) = self.get_session(session, true).await? else {
                return Ok(ClaimOutcome::Skipped { current: None });
            };
            let now = self.now_ms();
            let lease_expired = current.lease.as_ref().is_none_or(|l| l.expires_at <= now);
            let event = match current.state {
                _ if current.turn != turn => None,
                State::UserCommitted => Some(Event::GenerationClaimed),
                State::AiGenerating if lease_expired && current.attempts < max_attempts => {
                    Some(Event::LeaseTakeover)
                }
                State::AiGenerating if lease_expired => {
                    let reason = format!("generation stalled {} times", current.attempts);
                    self.end_turn(&current, Event::LeaseExpired, &reason, owner).await?;
                    return Ok(ClaimOutcome::Skipped { current: self.get_session(session, true).await? });
                }
                _ => None,
            };
            let Some(event) = event else { return Ok(ClaimOutcome::Skipped { current: Some(current) }) };
            let expires_at = now + ms(lease_for);
            let write = TransitionWrite {
                session,
                expected: Some((current.state, current.version)),
                event,
                turn,
                by: owner.to_owned(),
                set: vec![
                    (attr::LEASE_OWNER, s(owner)),
                    (attr::LEASE_EXPIRES_AT, n(expires_at)),
                    (attr::ATTEMPTS, n(current.attempts + 1)),
                    (DUE_AT, n(expires_at)),
                ],
                remove: vec![],
                extra_condition: Some(("#turn = :turn", vec![(":turn", n(turn.get()))])),
                extra_items: vec![],
            };
            let version = match self.write_transition(write).await? {
                WriteResult::Applied { version } => version,
                WriteResult::Rejected(_) => continue,
            };
            let mut lease = Lease {
                session_id: session,
                turn,
                owner: owner.to_owned(),
                version,
                expires_at,
                cancel_requested: current.cancel_requested,
                next_seq: 0,
                resumed_tokens: Vec::new(),
            };
            if event == Event::LeaseTakeover {
                match self.fence(&mut lease).await? {
                    AppendOutcome::Appended => {}
                    AppendOutcome::Fenced => continue,
                }
            }
            return Ok(ClaimOutcome::Claimed(lease));
        }
        Err(StoreError::Contention { attempts: self.options.max_attempts })
    }

    /// After a takeover: fences the previous holder out of the chunk sequence. It writes in
    /// order and learns of the takeover only when a put finds its slot taken, so an empty chunk
    /// placed ahead of it stops it there. The fence goes right after the last chunk if that
    /// slot is free, else ever further ahead of the old holder; the slots it skipped are then
    /// filled in order (each either takes an empty chunk or holds the old holder's), so the
    /// sequence stays gap-free and what the old holder wrote becomes the start of this reply.
    async fn fence(&self, lease: &mut Lease) -> Result<AppendOutcome, StoreError> {
        const MAX_TRIES: u32 = 64;
        let (session, turn) = (lease.session_id, lease.turn);
        let chunks = self.read_chunks(session, turn, None, true).await?;
        let first_open = chunks.last().map_or(0, |c| c.seq + 1);
        let mut stride = 0u32;
        let mut tries = 0;
        let fence_slot = loop {
            let written = self.read_chunks(session, turn, first_open.checked_sub(1), true).await?;
            let slot = written.last().map_or(first_open, |c| c.seq + 1) + stride;
            if self.put_chunk(lease, slot, 0, &[]).await?.is_ok() {
                break slot;
            }
            tries += 1;
            if tries >= MAX_TRIES {
                return Err(StoreError::Contention { attempts: tries });
            }
            if self.lease_status(lease, true).await? == LeaseStatus::Lost {
                return Ok(AppendOutcome::Fenced);
            }
            stride = (stride * 2).max(4);
        };
        // Fill the skipped slots in order; each fill that lands stops the old holder there.
        let mut end = match first_open.checked_sub(1) {
            Some(seq) => {
                self.read_chunks(session, turn, seq.checked_sub(1), true).await?.first().map_or(0, Chunk::end)
            }
            None => 0,
        };
        for slot in first_open..fence_slot {
            match self.put_chunk(lease, slot, end, &[]).await? {
                Ok(()) => {}
                Err(Some(occupant)) if occupant.owner != lease.owner => end = occupant.end(),
                Err(_) => return Err(StoreError::corrupt(table::chunk_sk(turn, slot), "unreadable chunk")),
            }
        }
        self.set_chunk_start(lease, fence_slot, end).await?;
        let chunks = self.read_chunks(session, turn, None, true).await?;
        let mut tokens = Vec::new();
        for (expected_seq, chunk) in chunks.iter().take(fence_slot as usize).enumerate() {
            if chunk.seq as usize != expected_seq {
                return Err(StoreError::corrupt(
                    table::chunk_sk(turn, expected_seq as u32),
                    "gap in the chunk sequence",
                ));
            }
            tokens.extend(chunk.tokens.iter().cloned());
        }
        lease.next_seq = fence_slot + 1;
        lease.resumed_tokens = tokens;
        Ok(AppendOutcome::Appended)
    }

    /// Sets the token index of this lease's own (empty) fence chunk once it is known.
    async fn set_chunk_start(&self, lease: &Lease, seq: u32, start: u64) -> Result<(), StoreError> {
        let out = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key(table::session_pk(lease.session_id), table::chunk_sk(lease.turn, seq))))
            .update_expression("SET #start = :start")
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#start", attr::START)
            .expression_attribute_names("#owner", attr::OWNER)
            .expression_attribute_values(":start", n(start))
            .expression_attribute_values(":owner", s(lease.owner.clone()))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| StoreError::dynamo("UpdateItem", e))?;
        self.capacity.add(true, out.consumed_capacity());
        Ok(())
    }

    /// Writes chunk `seq` of the lease's turn. Sequence numbers are the fence: a position
    /// already taken means another holder wrote there, unless it is this lease's own retry.
    pub async fn append_chunk(
        &self,
        lease: &Lease,
        seq: u32,
        start: u64,
        tokens: &[String],
    ) -> Result<AppendOutcome, StoreError> {
        Ok(match self.put_chunk(lease, seq, start, tokens).await? {
            Ok(()) => AppendOutcome::Appended,
            Err(_) => AppendOutcome::Fenced,
        })
    }

    /// Puts a chunk into a free slot; `Err` carries the chunk already there.
    async fn put_chunk(
        &self,
        lease: &Lease,
        seq: u32,
        start: u64,
        tokens: &[String],
    ) -> Result<Result<(), Option<Chunk>>, StoreError> {
        let expires = (self.now_ms() + ms(self.options.chunk_retention)) / 1000;
        let mut item = key(table::session_pk(lease.session_id), table::chunk_sk(lease.turn, seq));
        item.extend([
            (attr::KIND.to_owned(), s("chunk")),
            (attr::TURN.to_owned(), n(lease.turn.get())),
            (attr::SEQ.to_owned(), n(seq)),
            (attr::START.to_owned(), n(start)),
            (attr::TOKENS.to_owned(), AttributeValue::L(tokens.iter().cloned().map(s).collect())),
            (attr::OWNER.to_owned(), s(lease.owner.clone())),
            (TTL_ATTRIBUTE.to_owned(), n(expires)),
        ]);
        let result = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.capacity.add(true, out.consumed_capacity());
                Ok(Ok(()))
            }
            Err(err) => match err.as_service_error() {
                Some(PutItemError::ConditionalCheckFailedException(e)) => {
                    let existing = e.item().filter(|i| !i.is_empty()).map(Chunk::from_item).transpose()?;
                    // The SDK may have retried a put that had landed: that is our own chunk.
                    Ok(match existing {
                        Some(c) if c.owner == lease.owner && c.start == start && c.tokens == tokens => Ok(()),
                        other => Err(other),
                    })
                }
                _ => Err(StoreError::dynamo("PutItem", err)),
            },
        }
    }

    /// Whether `lease` still holds the turn and whether a cancel was requested.
    pub async fn lease_status(&self, lease: &Lease, consistent: bool) -> Result<LeaseStatus, StoreError> {
        let current = self.get_session(lease.session_id, consistent).await?;
        Ok(lease_status_of(lease, current.as_ref()))
    }

    /// Extends the lease to `now + lease_for` if it still holds.
    pub async fn extend_lease(
        &self,
        lease: &mut Lease,
        lease_for: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let expires_at = self.now_ms() + ms(lease_for);
        let result = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(session_key(lease.session_id)))
            .update_expression("SET #expires = :expires, #due = :expires")
            .condition_expression("#state = :gen AND #version = :v AND #owner = :owner")
            .expression_attribute_names("#expires", attr::LEASE_EXPIRES_AT)
            .expression_attribute_names("#due", DUE_AT)
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#version", attr::VERSION)
            .expression_attribute_names("#owner", attr::LEASE_OWNER)
            .expression_attribute_values(":expires", n(expires_at))
            .expression_attribute_values(":gen", s(State::AiGenerating.as_str()))
            .expression_attribute_values(":v", n(lease.version))
            .expression_attribute_values(":owner", s(lease.owner.clone()))
            .return_values(ReturnValue::AllNew)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.capacity.add(true, out.consumed_capacity());
                lease.expires_at = expires_at;
                let session = out.attributes().map(Session::from_item).transpose()?;
                Ok(lease_status_of(lease, session.as_ref()))
            }
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(_)) => Ok(LeaseStatus::Lost),
                _ => Err(StoreError::dynamo("UpdateItem", err)),
            },
        }
    }

    /// `ReplyCommitted`: stores the assistant message, only while `lease` still holds the turn.
    pub async fn commit_reply(
        &self,
        lease: &Lease,
        content: &str,
        stopped: Option<StopReason>,
    ) -> Result<Outcome<u64>, StoreError> {
        let message = self.message_item(lease.session_id, lease.turn, Role::Assistant, content, stopped);
        let write = TransitionWrite {
            session: lease.session_id,
            expected: Some((State::AiGenerating, lease.version)),
            event: Event::ReplyCommitted,
            turn: lease.turn,
            by: lease.owner.clone(),
            set: vec![(attr::CANCEL_REQUESTED, AttributeValue::Bool(false))],
            remove: vec![attr::LEASE_OWNER, attr::LEASE_EXPIRES_AT, DUE_SHARD, DUE_AT],
            extra_condition: Some((
                "#lease_owner = :owner AND #turn = :turn",
                vec![(":owner", s(lease.owner.clone())), (":turn", n(lease.turn.get()))],
            )),
            extra_items: vec![self.put_new(message)],
        };
        self.outcome(write).await
    }

    /// Ends the current turn of `current` with `event` (`StoreFailed`, `PickupExpired`,
    /// `ProcessingFailed`, `GenerationFailed`, `LeaseExpired`), recording `reason`; or applies
    /// `Settle`, `Recover` or `IdleExpired`. Other events have their own operations.
    pub async fn end_turn(
        &self,
        current: &Session,
        event: Event,
        reason: &str,
        by: &str,
    ) -> Result<Outcome<u64>, StoreError> {
        self.end_turn_releasing(current, event, reason, by, None).await
    }

    /// [`Store::end_turn`], also forgetting the idempotency key the turn was sent with, in the
    /// same transaction: for a turn ended because its message could not be stored or queued,
    /// whose client got a 503, so that retrying with the same key starts a new turn rather than
    /// answering with this dead one.
    pub async fn end_turn_releasing(
        &self,
        current: &Session,
        event: Event,
        reason: &str,
        by: &str,
        release: Option<(&UserId, &ClientMessageId)>,
    ) -> Result<Outcome<u64>, StoreError> {
        let to = fsm::transition(Some(current.state), event)
            .ok_or(StoreError::IllegalTransition { from: Some(current.state), event })?;
        let (set, remove) = match (event, to) {
            (
                Event::StoreFailed
                | Event::PickupExpired
                | Event::ProcessingFailed
                | Event::GenerationFailed
                | Event::LeaseExpired
                | Event::IdleExpired,
                State::Error | State::Timeout,
            ) => (
                vec![(attr::REASON, s(reason))],
                vec![attr::LEASE_OWNER, attr::LEASE_EXPIRES_AT, DUE_SHARD, DUE_AT],
            ),
            (Event::Settle | Event::Recover, State::Idle) => (vec![], vec![attr::REASON, DUE_SHARD, DUE_AT]),
            _ => return Err(StoreError::IllegalTransition { from: Some(current.state), event }),
        };
        let extra_items = release
            .map(|(user, idem)| {
                let delete = Delete::builder()
                    .table_name(&*self.table)
                    .set_key(Some(key(table::user_pk(user), table::idempotency_sk(idem))))
                    .build()
                    .expect("delete fields are set");
                TransactWriteItem::builder().delete(delete).build()
            })
            .into_iter()
            .collect();
        let write = TransitionWrite {
            session: current.id,
            expected: Some((current.state, current.version)),
            event,
            turn: current.turn,
            by: by.to_owned(),
            set,
            remove,
            extra_condition: None,
            extra_items,
        };
        self.outcome(write).await
    }

    /// Records a sweeper re-drive of an overdue `user_committed` turn and pushes its deadline
    /// out; no state change. `Conflict` if the session moved on.
    pub async fn record_redrive(&self, current: &Session) -> Result<Outcome<u32>, StoreError> {
        let due = self.now_ms() + ms(self.options.pickup_timeout);
        let redrives = current.redrives + 1;
        let result = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(session_key(current.id)))
            .update_expression("SET #redrives = :r, #due = :due")
            .condition_expression("#state = :from AND #version = :v")
            .expression_attribute_names("#redrives", attr::REDRIVES)
            .expression_attribute_names("#due", DUE_AT)
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#version", attr::VERSION)
            .expression_attribute_values(":r", n(redrives))
            .expression_attribute_values(":due", n(due))
            .expression_attribute_values(":from", s(current.state.as_str()))
            .expression_attribute_values(":v", n(current.version))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.capacity.add(true, out.consumed_capacity());
                Ok(Outcome::Applied(redrives))
            }
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(e)) => {
                    let current = e.item().filter(|i| !i.is_empty()).map(Session::from_item).transpose()?;
                    Ok(Outcome::Conflict(Conflict { current }))
                }
                _ => Err(StoreError::dynamo("UpdateItem", err)),
            },
        }
    }

    async fn outcome(&self, write: TransitionWrite) -> Result<Outcome<u64>, StoreError> {
        let write_session = write.session;
        Ok(match self.write_transition(write).await? {
            WriteResult::Applied { version } => Outcome::Applied(version),
            WriteResult::Rejected(Rejection { session_failed: true, current, .. }) => {
                Outcome::Conflict(Conflict { current })
            }
            // Only the reply slot was taken: the turn was committed already; report the session.
            WriteResult::Rejected(_) => {
                Outcome::Conflict(Conflict { current: self.get_session(write_session, true).await? })
            }
        })
    }

    // ----- deletion ----------------------------------------------------------------------

    /// Removes the session and everything under it, and its user's idempotency records that
    /// point at it. The session item goes first, so a failure part-way leaves no visible
    /// half-session; a retry sweeps whatever is left. With `owner`, a session of another user
    /// (or none at all) is `NotFound` and nothing is touched.
    pub async fn delete_session(
        &self,
        id: SessionId,
        owner: Option<&UserId>,
    ) -> Result<DeleteOutcome, StoreError> {
        let session = self.get_session(id, true).await?;
        if let Some(owner) = owner {
            if session.as_ref().is_none_or(|s| &s.user_id != owner) {
                return Ok(DeleteOutcome::NotFound);
            }
        }
        let mut keys = self.partition_keys(table::session_pk(id)).await?;
        if let Some(session) = &session {
            let user_pk = table::user_pk(&session.user_id);
            let prefix = table::IDEMPOTENCY_PREFIX;
            let records =
                self.query_range(user_pk, prefix.to_owned(), format!("{prefix}\u{10FFFF}"), true).await?;
            for record in records {
                let fields = Fields::new(&record);
                if fields.opt_s(attr::SESSION_ID)? == Some(id.to_string().as_str()) {
                    keys.push(key(fields.s(PK)?.to_owned(), fields.s(SK)?));
                }
            }
            // The count moves with the session item, exactly once: a retry finds the item gone.
            let delete = Delete::builder()
                .table_name(&*self.table)
                .set_key(Some(session_key(id)))
                .condition_expression("attribute_exists(#pk)")
                .expression_attribute_names("#pk", PK)
                .build()
                .expect("delete fields are set");
            let result = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().delete(delete).build())
                .transact_items(self.count_sessions(&session.user_id, -1))
                .client_request_token(Uuid::new_v4().to_string())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await;
            match result {
                Ok(out) => {
                    for consumed in out.consumed_capacity() {
                        self.capacity.add(true, Some(consumed));
                    }
                }
                // A concurrent delete took the session item (and moved the count) first.
                Err(err) if cancelled_by_condition(&err) => {}
                Err(err) => return Err(StoreError::dynamo("TransactWriteItems", err)),
            }
        }
        keys.retain(|k| k.get(SK).and_then(|v| v.as_s().ok()).map(String::as_str) != Some(table::SESSION_SK));
        let removed = keys.len();
        for batch in keys.chunks(25) {
            let mut requests: Vec<WriteRequest> = batch
                .iter()
                .map(|k| {
                    let delete =
                        DeleteRequest::builder().set_key(Some(k.clone())).build().expect("key is set");
                    WriteRequest::builder().delete_request(delete).build()
                })
                .collect();
            let mut attempt = 0;
            while !requests.is_empty() {
                attempt += 1;
                if attempt > self.options.max_attempts {
                    return Err(StoreError::Contention { attempts: attempt - 1 });
                }
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&*self.table, requests)
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
                    .await
                    .map_err(|e| StoreError::dynamo("BatchWriteItem", e))?;
                for consumed in out.consumed_capacity() {
                    self.capacity.add(true, Some(consumed));
                }
                requests =
                    out.unprocessed_items().and_then(|u| u.get(&*self.table)).cloned().unwrap_or_default();
                if !requests.is_empty() {
                    backoff(attempt).await;
                }
            }
        }
        Ok(match session {
            Some(_) => DeleteOutcome::Deleted { items: removed + 1 },
            None => DeleteOutcome::NotFound,
        })
    }

    async fn partition_keys(&self, pk: String) -> Result<Vec<Item>, StoreError> {
        self.query_pages(|start| {
            self.client
                .query()
                .table_name(&*self.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", s(pk.clone()))
                .projection_expression("#pk, #sk")
                .select(Select::SpecificAttributes)
                .consistent_read(true)
                .set_exclusive_start_key(start)
        })
        .await
    }
}

fn lease_status_of(lease: &Lease, current: Option<&Session>) -> LeaseStatus {
    match current {
        Some(c)
            if c.state == State::AiGenerating
                && c.version == lease.version
                && c.lease.as_ref().is_some_and(|l| l.owner == lease.owner) =>
        {
            LeaseStatus::Held { cancel_requested: c.cancel_requested }
        }
        _ => LeaseStatus::Lost,
    }
}

fn cancelled_by_condition<R>(err: &aws_sdk_dynamodb::error::SdkError<TransactWriteItemsError, R>) -> bool {
    match err.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(cancel)) => {
            cancel.cancellation_reasons().iter().any(|r| r.code() == Some("ConditionalCheckFailed"))
        }
        _ => false,
    }
}

fn idempotent_answer(item: &Item) -> Result<(SessionId, Turn), StoreError> {
    let f = Fields::new(item);
    Ok((f.parsed(attr::SESSION_ID, SessionId::parse)?, f.turn(attr::TURN)?))
}
