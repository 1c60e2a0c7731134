//! Limits, kept in the table so every instance of every function sees the same count: a turn
//! rate per user and, optionally, for everyone (token buckets), open streams per user and per
//! turn (leased slots) and, in the store's send path, sessions per user (a counter moved in the
//! same transactions that create and delete sessions) and a daily token budget per user (checked
//! in the transaction that claims a turn, charged in the one that ends it).
//!
//! Each check is a conditional write, so two instances racing for the last unit cannot both win.
//!
//! | item | `pk` | `sk` |
//! |---|---|---|
//! | a user's turn bucket | `U#{user}` | `LIMIT#turns` |
//! | a user's open streams | `U#{user}` | `LIMIT#streams` |
//! | a user's session count | `U#{user}` | `LIMIT#sessions` |
//! | a user's tokens of a UTC day | `U#{user}` | `LIMIT#tokens#{YYYY-MM-DD}` (TTL: 2 days after it) |
//! | a charge counted once (`charge_once`) | `U#{user}` | `LIMIT#charged#{YYYY-MM-DD}#{marker}` (TTL as the day's) |
//! | a turn's open streams | `S#{session}` | `STREAMS#{turn:08}` (deleted with its session) |
//! | everyone's turn bucket | `LIMIT` | `TURNS` |

use super::{key, number, Store, Written};
use crate::error::StoreError;
use crate::ids::{SessionId, Turn, UserId};
use crate::record::Item;
use crate::table::{self, TTL_ATTRIBUTE};
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update,
};
use std::collections::HashMap;
use std::time::Duration;

/// The per-user limits; 0 turns a limit off. `UserLimits::from_env` (in [`crate::config`]) reads
/// them from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimits {
    /// Turns a user may start per minute, in bursts of up to this many (`TURNS_PER_MINUTE`).
    pub turns_per_minute: u32,
    /// Streams a user may hold open at once (`MAX_OPEN_STREAMS`).
    pub open_streams: u32,
    /// Streams one turn may have open at once (`MAX_STREAMS_PER_TURN`), so one turn cannot hold
    /// all of its user's.
    pub streams_per_turn: u32,
    /// Sessions a user may have (`MAX_SESSIONS_PER_USER`); deleting one frees its place.
    pub sessions: u32,
    /// Tokens a user's turns may consume per UTC day, as the model reports them
    /// (`DAILY_TOKEN_BUDGET`).
    pub daily_tokens: u64,
    /// Turns one user may have in flight at once, across sessions (`MAX_TURNS_IN_FLIGHT`), so one
    /// account cannot hold the generators every other user waits for.
    pub turns_in_flight: u32,
    /// Feeds (`GET /users/{user}/events`) a user may hold open at once (`MAX_OPEN_FEEDS`): each
    /// also takes one of their stream slots, and this keeps open tabs from taking them all.
    pub open_feeds: u32,
    /// Forks a user may make per minute, in bursts of up to this many (`FORKS_PER_MINUTE`).
    pub forks_per_minute: u32,
}

impl Default for UserLimits {
    fn default() -> Self {
        UserLimits {
            turns_per_minute: 30,
            open_streams: 10,
            streams_per_turn: 2,
            sessions: 1000,
            daily_tokens: 0,
            turns_in_flight: 4,
            open_feeds: 3,
            forks_per_minute: 10,
        }
    }
}

impl UserLimits {
    /// No limits at all.
    pub const OFF: UserLimits = UserLimits {
        turns_per_minute: 0,
        open_streams: 0,
        streams_per_turn: 0,
        sessions: 0,
        daily_tokens: 0,
        turns_in_flight: 0,
        open_feeds: 0,
        forks_per_minute: 0,
    };
}

/// Limits over every user together; 0 turns a limit off. `GlobalLimits::from_env` (in
/// [`crate::config`]) reads them from the environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GlobalLimits {
    /// Turns everyone together may start per minute (`GLOBAL_TURNS_PER_MINUTE`): a ceiling on
    /// spend however many accounts there are.
    pub turns_per_minute: u32,
}

/// The answer of a limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the limit; the unit is taken.
    Admitted,
    /// Over the limit; nothing was taken. Try again after `retry_after`.
    Limited {
        /// When a unit is expected to be free (at least 1 s).
        retry_after: Duration,
    },
}

/// Sort key of a user's turn-rate bucket (partition `U#{user}`).
pub const TURN_RATE_SK: &str = "LIMIT#turns";
/// Sort key (in the user's partition) of the user's fork bucket.
pub const FORK_RATE_SK: &str = "LIMIT#forks";
/// Sort key of a user's open-stream slots.
pub const STREAM_SLOTS_SK: &str = "LIMIT#streams";
/// Sort key of a user's slots of turns in flight, one a session (a session has one turn in
/// flight at most).
pub const TURN_SLOTS_SK: &str = "LIMIT#turns_in_flight";
/// Sort key (in the user's partition) of the user's open feeds, a share of their stream slots.
pub const FEED_SLOTS_SK: &str = "LIMIT#feeds";
/// How long a turn's in-flight slot holds if nothing gives it back: past every deadline a turn
/// can reach (the pickup timeout and the generation lease, with their retries), by which time the
/// sweeper has ended it.
pub const TURN_SLOT_HOLD: Duration = Duration::from_secs(15 * 60);
/// Sort key of a user's session counter.
pub const SESSION_COUNT_SK: &str = "LIMIT#sessions";
/// Sort key prefix of a user's token count of one UTC day (`LIMIT#tokens#2026-12-01`).
pub const DAILY_TOKENS_PREFIX: &str = "LIMIT#tokens#";
/// Sort key prefix of the markers of charges counted once (`LIMIT#charged#2026-12-01#…`).
pub const CHARGED_PREFIX: &str = "LIMIT#charged#";
/// Partition key of the limits over every user.
pub const GLOBAL_PK: &str = "LIMIT";
/// Sort key of everyone's turn bucket.
pub const GLOBAL_TURN_RATE_SK: &str = "TURNS";

/// Sort key of one turn's open-stream slots (partition `S#{session}`, so they go with it).
pub fn turn_stream_slots_sk(turn: Turn) -> String {
    format!("STREAMS#{:08}", turn.get())
}

/// Tokens used that day.
const USED: &str = "used";
/// The day item outlives its day by this much, for late reads.
const DAY_ITEM_KEPT_MS: u64 = 2 * 86_400_000;

/// The UTC day of `now_ms` (`YYYY-MM-DD`) and when it ends, epoch ms.
fn utc_day(now_ms: u64) -> (String, u64) {
    let start = now_ms - now_ms % 86_400_000;
    (crate::time::rfc3339_ms(start)[..10].to_owned(), start + 86_400_000)
}

/// Over the daily token budget: how much was used, and when the day ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSpent {
    /// Tokens used today, as charged.
    pub used: u64,
    /// The budget (`DAILY_TOKEN_BUDGET`).
    pub limit: u64,
    /// When the budget resets: the next 00:00 UTC, epoch ms.
    pub resets_at: u64,
}

/// Whose streams a slot counts against.
#[derive(Debug, Clone, Copy)]
enum SlotsOf<'a> {
    User(&'a UserId),
    Turn(SessionId, Turn),
    TurnsOf(&'a UserId),
    FeedsOf(&'a UserId),
}

impl SlotsOf<'_> {
    fn key(&self) -> Item {
        match self {
            SlotsOf::User(user) => key(table::user_pk(user), STREAM_SLOTS_SK),
            SlotsOf::Turn(session, turn) => key(table::session_pk(*session), turn_stream_slots_sk(*turn)),
            SlotsOf::TurnsOf(user) => key(table::user_pk(user), TURN_SLOTS_SK),
            SlotsOf::FeedsOf(user) => key(table::user_pk(user), FEED_SLOTS_SK),
        }
    }
}

/// Whose turn bucket.
#[derive(Debug, Clone, Copy)]
enum BucketOf<'a> {
    User(&'a UserId),
    ForksOf(&'a UserId),
    Everyone,
}

impl BucketOf<'_> {
    fn key(&self) -> Item {
        match self {
            BucketOf::User(user) => key(table::user_pk(user), TURN_RATE_SK),
            BucketOf::ForksOf(user) => key(table::user_pk(user), FORK_RATE_SK),
            BucketOf::Everyone => key(GLOBAL_PK.to_owned(), GLOBAL_TURN_RATE_SK),
        }
    }
}

/// The theoretical arrival time of the bucket (epoch ms): it is full when this is in the past.
const TAT: &str = "tat";
/// Open streams: stream id → when its slot lapses (epoch ms), should its holder die silently.
const HOLDERS: &str = "holders";
/// Version of the slots item, for compare-and-set.
const SLOTS_VERSION: &str = "v";
/// Sessions the user has.
pub(crate) const SESSION_COUNT: &str = "sessions";

/// How long a client over the stream limit is asked to wait: a slot frees when one of the
/// user's streams ends, which is not known in advance.
const STREAM_RETRY: Duration = Duration::from_secs(5);

/// The bucket's arithmetic (GCRA, in ms): a bucket of `burst` turns that refills one turn every
/// `interval`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    interval: u64,
    /// How far the arrival time may run ahead of now: `(burst - 1) × interval`.
    tolerance: u64,
}

impl Bucket {
    fn per_minute(turns: u32) -> Bucket {
        let interval = 60_000u64.div_ceil(u64::from(turns.max(1)));
        Bucket { interval, tolerance: interval * u64::from(turns.max(1) - 1) }
    }

    /// The new arrival time if a turn starting `now` fits, else how long until it would.
    fn take(&self, tat: Option<u64>, now: u64) -> Result<u64, u64> {
        let tat = tat.unwrap_or(now).max(now);
        if tat - now > self.tolerance {
            Err(tat - now - self.tolerance)
        } else {
            Ok(tat + self.interval)
        }
    }
}

fn retry_after(ms: u64) -> Duration {
    // Whole seconds for the header, rounded up so the retry lands after the refill.
    Duration::from_secs(ms.div_ceil(1000).max(1))
}

impl Store {
    /// Takes one turn from the user's bucket of `per_minute` turns (0: no limit).
    pub async fn take_turn(&self, user: &UserId, per_minute: u32) -> Result<Admission, StoreError> {
        self.take_from(BucketOf::User(user), per_minute).await
    }

    /// Takes one fork from the user's bucket of `per_minute` forks (0: no limit): a fork copies a
    /// history, so it is paced apart from turns.
    pub async fn take_fork(&self, user: &UserId, per_minute: u32) -> Result<Admission, StoreError> {
        self.take_from(BucketOf::ForksOf(user), per_minute).await
    }

    /// Gives back a fork taken by [`Store::take_fork`] that made none.
    pub async fn return_fork(&self, user: &UserId, per_minute: u32) -> Result<(), StoreError> {
        self.return_to(BucketOf::ForksOf(user), per_minute).await
    }

    /// Takes one turn from everyone's bucket of `per_minute` turns (0: no limit).
    pub async fn take_global_turn(&self, per_minute: u32) -> Result<Admission, StoreError> {
        self.take_from(BucketOf::Everyone, per_minute).await
    }

    /// Gives back a turn taken by [`Store::take_turn`] that did not start one (the send was a
    /// repeat, or refused). Best effort: a lost refund only delays the user's next turn.
    pub async fn return_turn(&self, user: &UserId, per_minute: u32) -> Result<(), StoreError> {
        self.return_to(BucketOf::User(user), per_minute).await
    }

    /// Gives back a turn taken by [`Store::take_global_turn`] that did not start one.
    pub async fn return_global_turn(&self, per_minute: u32) -> Result<(), StoreError> {
        self.return_to(BucketOf::Everyone, per_minute).await
    }

    /// Takes one turn from a bucket of `per_minute` turns (0: no limit).
    ///
    /// Neither write needs the exact value it read, so racing callers do not make each other
    /// retry: a bucket with room moves by `+ interval` under a condition DynamoDB checks against
    /// the value at write time, and a full (refilled) bucket restarts from now.
    async fn take_from(&self, bucket_of: BucketOf<'_>, per_minute: u32) -> Result<Admission, StoreError> {
        if per_minute == 0 {
            return Ok(Admission::Admitted);
        }
        let bucket = Bucket::per_minute(per_minute);
        // The arrival time at the last look; unknown at first, then from each failed write.
        let mut seen: Option<u64> = None;
        for _ in 0..self.options().max_write_attempts {
            let now = self.now_ms();
            let request = self
                .client()
                .update_item()
                .table_name(self.table())
                .set_key(Some(bucket_of.key()))
                .expression_attribute_names("#tat", TAT)
                .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                .expression_attribute_values(":now", number(now))
                // A bucket idle for an hour is full again; DynamoDB may then drop its item.
                .expression_attribute_values(
                    ":ttl",
                    number((now + bucket.tolerance + bucket.interval) / 1000 + 3600),
                )
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
            let request = match seen {
                Some(tat) if tat > now => {
                    if let Err(wait) = bucket.take(Some(tat), now) {
                        return Ok(Admission::Limited { retry_after: retry_after(wait) });
                    }
                    request
                        .update_expression("SET #tat = #tat + :interval, #ttl = :ttl")
                        .condition_expression("#tat > :now AND #tat <= :latest")
                        .expression_attribute_values(":interval", number(bucket.interval))
                        .expression_attribute_values(":latest", number(now + bucket.tolerance))
                }
                _ => request
                    .update_expression("SET #tat = :next, #ttl = :ttl")
                    .condition_expression("attribute_not_exists(#tat) OR #tat <= :now")
                    .expression_attribute_values(":next", number(now + bucket.interval)),
            };
            match self.send_conditional(request).await? {
                Written::Applied(_) => return Ok(Admission::Admitted),
                Written::Refused(item) => seen = item.and_then(|item| number_field(&item, TAT)),
            }
        }
        Err(StoreError::Contention { attempts: self.options().max_write_attempts })
    }

    async fn return_to(&self, bucket_of: BucketOf<'_>, per_minute: u32) -> Result<(), StoreError> {
        if per_minute == 0 {
            return Ok(());
        }
        let bucket = Bucket::per_minute(per_minute);
        let now = self.now_ms();
        let request = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(bucket_of.key()))
            .update_expression("SET #tat = #tat - :interval")
            // Only while the refund still matters: never rewind the bucket past full.
            .condition_expression("#tat >= :floor")
            .expression_attribute_names("#tat", TAT)
            .expression_attribute_values(":interval", number(bucket.interval))
            .expression_attribute_values(":floor", number(now + bucket.interval));
        self.send_conditional(request).await.map(|_| ())
    }

    /// Takes one of the user's `max` stream slots (0: no limit) for the stream `stream_id`, held
    /// for at most `hold` in case the stream dies without [`Store::close_stream`].
    pub async fn open_stream(
        &self,
        user: &UserId,
        stream_id: &str,
        max: u32,
        hold: Duration,
    ) -> Result<Admission, StoreError> {
        self.open_slot(SlotsOf::User(user), stream_id, max, hold).await
    }

    /// Takes one of a turn's `max` stream slots (0: no limit) for the stream `stream_id`, held
    /// for at most `hold` in case the stream dies without [`Store::close_turn_stream`].
    pub async fn open_turn_stream(
        &self,
        session: SessionId,
        turn: Turn,
        stream_id: &str,
        max: u32,
        hold: Duration,
    ) -> Result<Admission, StoreError> {
        self.open_slot(SlotsOf::Turn(session, turn), stream_id, max, hold).await
    }

    /// Takes one of the user's `max` feed slots (0: no limit) for the feed `stream_id`: feeds may
    /// hold only so many of the user's stream slots, so open tabs never starve their replies.
    pub async fn open_feed(
        &self,
        user: &UserId,
        stream_id: &str,
        max: u32,
        hold: Duration,
    ) -> Result<Admission, StoreError> {
        self.open_slot(SlotsOf::FeedsOf(user), stream_id, max, hold).await
    }

    /// Gives back the user's feed slot of `stream_id`.
    pub async fn close_feed(&self, user: &UserId, stream_id: &str) -> Result<(), StoreError> {
        self.close_slot(SlotsOf::FeedsOf(user), stream_id).await
    }

    /// Gives back the user's slot of `stream_id`; a slot already gone (lapsed, or limits off) is
    /// fine.
    pub async fn close_stream(&self, user: &UserId, stream_id: &str) -> Result<(), StoreError> {
        self.close_slot(SlotsOf::User(user), stream_id).await
    }

    /// Gives back the turn's slot of `stream_id`; a slot already gone is fine, and a deleted
    /// session's slots are not written back.
    pub async fn close_turn_stream(
        &self,
        session: SessionId,
        turn: Turn,
        stream_id: &str,
    ) -> Result<(), StoreError> {
        self.close_slot(SlotsOf::Turn(session, turn), stream_id).await
    }

    /// Takes one of the user's `max` slots of turns in flight (0: no limit) for a turn of
    /// `session`, held until [`Store::close_turn_slot`] or [`TURN_SLOT_HOLD`]. Taking the slot a
    /// session already holds again is admitted: a session has one turn in flight at most.
    pub async fn open_turn_slot(
        &self,
        user: &UserId,
        session: SessionId,
        max: u32,
    ) -> Result<Admission, StoreError> {
        self.open_slot(SlotsOf::TurnsOf(user), &session.to_string(), max, TURN_SLOT_HOLD).await
    }

    /// Gives back the slot a turn of `session` holds; one already gone is fine.
    pub async fn close_turn_slot(&self, user: &UserId, session: SessionId) -> Result<(), StoreError> {
        self.close_slot(SlotsOf::TurnsOf(user), &session.to_string()).await
    }

    /// Takes one of `max` slots (0: no limit) for `stream_id`, held for at most `hold`.
    ///
    /// Usually one write, conditioned on the count of slots: no read, and racing openers do not
    /// make each other retry. Only when the slots look full are lapsed ones pruned, by
    /// compare-and-set on the item's version.
    async fn open_slot(
        &self,
        slots_of: SlotsOf<'_>,
        stream_id: &str,
        max: u32,
        hold: Duration,
    ) -> Result<Admission, StoreError> {
        if max == 0 {
            return Ok(Admission::Admitted);
        }
        let slots_key = || slots_of.key();
        for _ in 0..self.options().max_write_attempts {
            let now = self.now_ms();
            let expires = now + hold.as_millis() as u64;
            let fast = self
                .client()
                .update_item()
                .table_name(self.table())
                .set_key(Some(slots_key()))
                .update_expression("SET #holders.#id = :expires, #ttl = :ttl ADD #v :one")
                .condition_expression("attribute_exists(#holders) AND size(#holders) < :max")
                .expression_attribute_names("#holders", HOLDERS)
                .expression_attribute_names("#id", stream_id)
                .expression_attribute_names("#v", SLOTS_VERSION)
                .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                .expression_attribute_values(":expires", number(expires))
                // Every hold is as long, so the newest outlives the others.
                .expression_attribute_values(":ttl", number(expires / 1000 + 3600))
                .expression_attribute_values(":one", number(1))
                .expression_attribute_values(":max", number(max))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
            let item = match self.send_conditional(fast).await? {
                Written::Applied(_) => return Ok(Admission::Admitted),
                Written::Refused(item) => item,
            };
            // No slots item yet, or every slot taken: look at who holds them.
            let version = item.as_ref().and_then(|i| number_field(i, SLOTS_VERSION));
            let mut holders: HashMap<String, AttributeValue> = item
                .as_ref()
                .and_then(|i| i.get(HOLDERS))
                .and_then(|v| v.as_m().ok())
                .cloned()
                .unwrap_or_default();
            // Slots whose holder died without giving them back have lapsed.
            holders.retain(|_, lapses| lapses.as_n().ok().and_then(|e| e.parse::<u64>().ok()) > Some(now));
            if holders.contains_key(stream_id) {
                // Already held by this id: taken again, not twice.
                return Ok(Admission::Admitted);
            }
            if holders.len() >= max as usize {
                return Ok(Admission::Limited { retry_after: STREAM_RETRY });
            }
            holders.insert(stream_id.to_owned(), number(expires));
            let mut request = self
                .client()
                .update_item()
                .table_name(self.table())
                .set_key(Some(slots_key()))
                .update_expression("SET #holders = :holders, #v = :nv, #ttl = :ttl")
                .expression_attribute_names("#holders", HOLDERS)
                .expression_attribute_names("#v", SLOTS_VERSION)
                .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                .expression_attribute_values(":holders", AttributeValue::M(holders))
                .expression_attribute_values(":nv", number(version.unwrap_or(0) + 1))
                .expression_attribute_values(":ttl", number(expires / 1000 + 3600));
            request = match version {
                Some(v) => {
                    request.condition_expression("#v = :v").expression_attribute_values(":v", number(v))
                }
                None => request.condition_expression("attribute_not_exists(#v)"),
            };
            // Refused: another stream of this user opened or closed in between; look again.
            if let Written::Applied(_) = self.send_conditional(request).await? {
                return Ok(Admission::Admitted);
            }
        }
        Err(StoreError::Contention { attempts: self.options().max_write_attempts })
    }

    async fn close_slot(&self, slots_of: SlotsOf<'_>, stream_id: &str) -> Result<(), StoreError> {
        let request = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(slots_of.key()))
            // The version moves too, so an opener that read the slot still taken retries.
            .update_expression("REMOVE #holders.#id ADD #v :one")
            .condition_expression("attribute_exists(#holders.#id)")
            .expression_attribute_names("#holders", HOLDERS)
            .expression_attribute_names("#id", stream_id)
            .expression_attribute_names("#v", SLOTS_VERSION)
            .expression_attribute_values(":one", number(1));
        self.send_conditional(request).await.map(|_| ())
    }

    /// The key of the user's token count on the day of `now_ms`.
    fn daily_tokens_key(&self, user: &UserId, now_ms: u64) -> Item {
        let (day, _) = utc_day(now_ms);
        key(table::user_pk(user), format!("{DAILY_TOKENS_PREFIX}{day}"))
    }

    /// The condition a turn's claim carries when a daily budget is set: the user has used less
    /// than `budget` tokens today. DynamoDB checks it at write time, in the claim's transaction;
    /// refused, it returns the day's item, to say how much was used.
    pub(crate) fn budget_check(&self, user: &UserId, budget: u64) -> TransactWriteItem {
        let check = ConditionCheck::builder()
            .table_name(self.table())
            .set_key(Some(self.daily_tokens_key(user, self.now_ms())))
            .condition_expression("attribute_not_exists(#used) OR #used < :budget")
            .expression_attribute_names("#used", USED)
            .expression_attribute_values(":budget", number(budget))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("condition check fields are set");
        TransactWriteItem::builder().condition_check(check).build()
    }

    /// What a refused [`Store::budget_check`] means, from the day's item it returned.
    pub(crate) fn budget_spent(&self, item: Option<&Item>, budget: u64) -> BudgetSpent {
        let used = item.and_then(|item| number_field(item, USED)).unwrap_or(budget);
        BudgetSpent { used, limit: budget, resets_at: utc_day(self.now_ms()).1 }
    }

    /// Adds `tokens` to the user's count of today, in the transaction that ends the turn that
    /// spent them (so a retried or fenced write never counts twice); `None` when there is
    /// nothing to count or no budget to count against.
    pub(crate) fn charge(&self, user: &UserId, tokens: u64) -> Option<TransactWriteItem> {
        if tokens == 0 || self.options().daily_token_budget == 0 {
            return None;
        }
        let update = self.charge_update(user, tokens).build().expect("update fields are set");
        Some(TransactWriteItem::builder().update(update).build())
    }

    fn charge_update(&self, user: &UserId, tokens: u64) -> aws_sdk_dynamodb::types::builders::UpdateBuilder {
        let now = self.now_ms();
        let (_, day_ends) = utc_day(now);
        Update::builder()
            .table_name(self.table())
            .set_key(Some(self.daily_tokens_key(user, now)))
            .update_expression("ADD #used :tokens SET #ttl = :ttl")
            .expression_attribute_names("#used", USED)
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_values(":tokens", number(tokens))
            .expression_attribute_values(":ttl", number((day_ends + DAY_ITEM_KEPT_MS) / 1000))
    }

    /// Adds `tokens` to the user's count of today once for `marker` (e.g. a session's summary
    /// through a turn): a second call with the same marker, or a retry of this one, counts
    /// nothing. For spend that ends no turn. Whether it counted.
    ///
    /// The marker is an item of its own, put in the charge's transaction: kept on the day's item,
    /// markers would grow it with every charge (and every charge of it would cost more), until
    /// at DynamoDB's 400 KB a charge could no longer be written at all.
    pub async fn charge_once(&self, user: &UserId, marker: &str, tokens: u64) -> Result<bool, StoreError> {
        if tokens == 0 || self.options().daily_token_budget == 0 {
            return Ok(false);
        }
        let now = self.now_ms();
        let (day, day_ends) = utc_day(now);
        let mut charged = key(table::user_pk(user), format!("{CHARGED_PREFIX}{day}#{marker}"));
        charged.insert(TTL_ATTRIBUTE.to_owned(), number((day_ends + DAY_ITEM_KEPT_MS) / 1000));
        let charge = self.charge_update(user, tokens).build().expect("update fields are set");
        let request = self
            .client()
            .transact_write_items()
            .transact_items(self.put_new(charged))
            .transact_items(TransactWriteItem::builder().update(charge).build())
            .client_request_token(uuid::Uuid::new_v4().to_string());
        Ok(matches!(self.send_conditional(request).await?, Written::Applied(_)))
    }

    /// Tokens the user was charged for today.
    pub async fn tokens_used_today(&self, user: &UserId) -> Result<u64, StoreError> {
        let item = self.get_item(self.daily_tokens_key(user, self.now_ms())).await?;
        Ok(item.as_ref().and_then(|i| number_field(i, USED)).unwrap_or(0))
    }

    /// How many sessions the user has, as counted by the send and delete transactions.
    pub async fn session_count(&self, user: &UserId) -> Result<u64, StoreError> {
        let item = self.get_item(key(table::user_pk(user), SESSION_COUNT_SK)).await?;
        Ok(item.as_ref().and_then(|i| number_field(i, SESSION_COUNT)).unwrap_or(0))
    }
}

/// A number attribute of an item.
fn number_field(item: &Item, name: &str) -> Option<u64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_one_turn_per_interval() {
        let bucket = Bucket::per_minute(6); // one turn every 10 s, 6 at once
        let mut tat = None;
        for _ in 0..6 {
            tat = Some(bucket.take(tat, 0).expect("within the burst"));
        }
        assert_eq!(bucket.take(tat, 0), Err(10_000), "the 7th waits for one refill");
        assert_eq!(bucket.take(tat, 9_999), Err(1));
        assert!(bucket.take(tat, 10_000).is_ok());
        // An idle bucket is full again, never fuller.
        assert_eq!(bucket.take(tat, 1_000_000), Ok(1_010_000));
        assert_eq!(retry_after(1), Duration::from_secs(1));
        assert_eq!(retry_after(10_001), Duration::from_secs(11));
    }

    #[test]
    fn a_day_is_a_utc_calendar_day() {
        // 2027-01-15T08:00:00Z
        let (day, ends) = utc_day(1_800_000_000_000);
        assert_eq!(day, "2027-01-15");
        assert_eq!(crate::time::rfc3339_ms(ends), "2027-01-16T00:00:00.000Z");
        assert_eq!(utc_day(ends).0, "2027-01-16", "midnight starts the next day");
        assert_eq!(utc_day(ends - 1).0, "2027-01-15");
    }
}
