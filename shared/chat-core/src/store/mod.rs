//! The DynamoDB store that enforces the state machine.
//!
//! Every state change goes through [`Store::write_transition`] (`transition.rs`): one
//! `TransactWriteItems` whose session update is conditioned on `state = :from AND version = :v`,
//! sets `version + 1` and the state [`crate::fsm::transition`] gives, and records the transition.
//! A failed condition comes back as [`Outcome::Conflict`]; a timeout is resolved by re-reading
//! the session and looking for this operation's id, never by retrying blindly.
//!
//! - `outcomes.rs`: what each operation can answer;
//! - `request.rs`: sending a request (capacity, metering, errors, conditions, pages);
//! - `reads.rs`: sessions, messages, chunks, transitions, a user's sessions, overdue turns;
//! - `transition.rs`: the transition writer and the items written with transitions;
//! - `user_turn.rs`: a user's send, regenerate and edit, the message's commit, and cancel;
//! - `fork.rs`: a new session from another's history up to a turn;
//! - `generation.rs`: a generator's claim, lease, chunks and reply;
//! - `lifecycle.rs`: ending turns, re-drives and deletion;
//! - `limits.rs`: the limits kept in the table (turn buckets, stream and turn slots, the daily
//!   token budget, the session count).

mod fork;
mod generation;
mod lifecycle;
pub mod limits;
mod outcomes;
mod reads;
mod request;
mod transition;
mod user_turn;

pub use fork::MAX_FORK_TURNS;
pub use outcomes::*;
pub use reads::{Read, SessionCursor};
pub(crate) use request::Written;
pub use transition::FEED_RETENTION_S;

use crate::error::StoreError;
use crate::ids::SessionId;
use crate::record::Item;
use crate::table::{self, PK, SK};
use aws_sdk_dynamodb::types::{AttributeValue, ConsumedCapacity};
use aws_sdk_dynamodb::Client;
use rand::Rng as _;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// How long a session's items are kept after they are written (`SESSION_TTL_DAYS`; `None`:
    /// forever). Every transition renews the session item's, so a session lasts this long past
    /// its last activity, while its older messages age out on their own. Chunks and
    /// idempotency keys keep the shorter of this and their own retention.
    pub retention: Option<Duration>,
    /// How long a session whose turn has ended may stay quiet before the sweeper expires it
    /// (`IdleExpired`) and has it summarised (`SESSION_IDLE_TIMEOUT`; `None`: never).
    pub idle_timeout: Option<Duration>,
    /// Attempts at a write when concurrent transactions collide or a state read goes stale.
    pub max_write_attempts: u32,
    /// Sessions a user may have (0: no limit); counted whether or not it is enforced.
    pub max_sessions_per_user: u32,
    /// Tokens a user's turns may consume per UTC day (0: no budget, and nothing counted): a new
    /// turn is refused once today's count reaches it.
    pub daily_token_budget: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            writing_timeout: Duration::from_secs(30),
            pickup_timeout: Duration::from_secs(60),
            chunk_retention: Duration::from_secs(7 * 24 * 3600),
            idempotency_retention: Duration::from_secs(24 * 3600),
            retention: Some(Duration::from_secs(30 * 24 * 3600)),
            idle_timeout: Some(Duration::from_secs(30 * 60)),
            max_write_attempts: 8,
            max_sessions_per_user: 0,
            daily_token_budget: 0,
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
    fn add(&self, write: bool, consumed: &[ConsumedCapacity]) {
        let units: f64 = consumed.iter().filter_map(ConsumedCapacity::capacity_units).sum();
        let counter = if write { &self.write_milli } else { &self.read_milli };
        counter.fetch_add((units * 1000.0).round() as u64, Ordering::Relaxed);
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

/// A string attribute value.
pub(crate) fn string(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// A number attribute value.
pub(crate) fn number(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

pub(crate) fn key(pk: String, sk: impl Into<String>) -> Item {
    HashMap::from([(PK.to_owned(), string(pk)), (SK.to_owned(), string(sk))])
}

fn session_key(session: SessionId) -> Item {
    key(table::session_pk(session), table::SESSION_SK)
}

/// The last key that sorts within a prefix.
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
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

    /// The TTL (epoch seconds) of an item written now and kept for `keep` (capped by the
    /// session retention), or `None` when it is kept forever.
    pub(crate) fn ttl_for(&self, keep: Option<Duration>) -> Option<AttributeValue> {
        let keep = match (keep, self.options.retention) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(number((self.now_ms() + ms(keep)) / 1000))
    }

    /// The TTL of a session item written now: the session retention.
    pub(crate) fn session_ttl(&self) -> Option<AttributeValue> {
        self.options.retention.map(|keep| number((self.now_ms() + ms(keep)) / 1000))
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

    fn meter(&self, write: bool, consumed: &[ConsumedCapacity]) {
        self.capacity.add(write, consumed);
    }

    /// One item by key, read consistently.
    pub(crate) async fn get_item(&self, key: Item) -> Result<Option<Item>, StoreError> {
        let request = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key))
            .consistent_read(Read::Consistent.consistent());
        Ok(self.send(request).await?.item)
    }
}
