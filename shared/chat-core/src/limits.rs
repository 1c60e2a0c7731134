//! Per-user limits, kept in the table so every instance of every function sees the same count:
//! a turn rate (a token bucket), open streams per user and per turn (leased slots) and, in the
//! store's send path, sessions per user (a counter moved in the same transactions that create
//! and delete sessions).
//!
//! Each check is a conditional write, so two instances racing for the last unit cannot both win.
//!
//! | item | `pk` | `sk` |
//! |---|---|---|
//! | a user's turn bucket | `U#{user}` | `LIMIT#turns` |
//! | a user's open streams | `U#{user}` | `LIMIT#streams` |
//! | a user's session count | `U#{user}` | `LIMIT#sessions` |
//! | a turn's open streams | `S#{session}` | `STREAMS#{turn:08}` (deleted with its session) |

use crate::config::{ConfigError, Env};
use crate::error::StoreError;
use crate::ids::{SessionId, Turn, UserId};
use crate::model::Item;
use crate::store::{key, number, Store, Written};
use crate::table::{self, TTL_ATTRIBUTE};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use std::collections::HashMap;
use std::time::Duration;

/// The per-user limits; 0 turns a limit off.
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
}

impl Default for UserLimits {
    fn default() -> Self {
        UserLimits { turns_per_minute: 30, open_streams: 10, streams_per_turn: 2, sessions: 1000 }
    }
}

impl UserLimits {
    /// No limits at all.
    pub const OFF: UserLimits =
        UserLimits { turns_per_minute: 0, open_streams: 0, streams_per_turn: 0, sessions: 0 };

    /// Reads `TURNS_PER_MINUTE`, `MAX_OPEN_STREAMS`, `MAX_STREAMS_PER_TURN` and
    /// `MAX_SESSIONS_PER_USER`.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let defaults = UserLimits::default();
        Ok(UserLimits {
            turns_per_minute: env.parse_or("TURNS_PER_MINUTE", defaults.turns_per_minute)?,
            open_streams: env.parse_or("MAX_OPEN_STREAMS", defaults.open_streams)?,
            streams_per_turn: env.parse_or("MAX_STREAMS_PER_TURN", defaults.streams_per_turn)?,
            sessions: env.parse_or("MAX_SESSIONS_PER_USER", defaults.sessions)?,
        })
    }
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
/// Sort key of a user's open-stream slots.
pub const STREAM_SLOTS_SK: &str = "LIMIT#streams";
/// Sort key of a user's session counter.
pub const SESSION_COUNT_SK: &str = "LIMIT#sessions";
/// Sort key of one turn's open-stream slots (partition `S#{session}`, so they go with it).
pub fn turn_stream_slots_sk(turn: Turn) -> String {
    format!("STREAMS#{:08}", turn.get())
}

/// Whose streams a slot counts against.
#[derive(Debug, Clone, Copy)]
enum SlotsOf<'a> {
    User(&'a UserId),
    Turn(SessionId, Turn),
}

impl SlotsOf<'_> {
    fn key(&self) -> Item {
        match self {
            SlotsOf::User(user) => key(table::user_pk(user), STREAM_SLOTS_SK),
            SlotsOf::Turn(session, turn) => key(table::session_pk(*session), turn_stream_slots_sk(*turn)),
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
    ///
    /// Neither write needs the exact value it read, so racing callers do not make each other
    /// retry: a bucket with room moves by `+ interval` under a condition DynamoDB checks against
    /// the value at write time, and a full (refilled) bucket restarts from now.
    pub async fn take_turn(&self, user: &UserId, per_minute: u32) -> Result<Admission, StoreError> {
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
                .set_key(Some(key(table::user_pk(user), TURN_RATE_SK)))
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

    /// Gives back a turn taken by [`Store::take_turn`] that did not start one (the send was a
    /// repeat, or refused). Best effort: a lost refund only delays the user's next turn.
    pub async fn return_turn(&self, user: &UserId, per_minute: u32) -> Result<(), StoreError> {
        if per_minute == 0 {
            return Ok(());
        }
        let bucket = Bucket::per_minute(per_minute);
        let now = self.now_ms();
        let request = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(key(table::user_pk(user), TURN_RATE_SK)))
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
    fn limits_read_from_the_environment() {
        let env = Env::from_fn(|name| match name {
            "TURNS_PER_MINUTE" => Some("5".to_owned()),
            "MAX_OPEN_STREAMS" => Some("0".to_owned()),
            _ => None,
        });
        let limits = UserLimits::from_env(&env).unwrap();
        assert_eq!(limits, UserLimits { turns_per_minute: 5, open_streams: 0, ..UserLimits::default() });
        assert_eq!(limits.streams_per_turn, 2, "default");
        let bad = Env::from_fn(|name| (name == "MAX_SESSIONS_PER_USER").then(|| "many".to_owned()));
        assert_eq!(UserLimits::from_env(&bad).unwrap_err().variable, "MAX_SESSIONS_PER_USER");
    }
}
