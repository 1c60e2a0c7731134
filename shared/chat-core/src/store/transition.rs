//! The transition writer: every state change is one transaction that moves the session item
//! from the state and version it was read at to the state the table gives, records the
//! transition, and lands the items that belong to it (a message, an idempotency record, the
//! session count), or none of it.

use super::request::{Consumed as _, Request as _};
use super::{backoff, key, number, session_key, string, Conflict, Outcome, Read, Store};
use crate::error::StoreError;
use crate::fsm::{self, Event, State};
use crate::ids::{Role, SessionId, Turn, UserId};
use crate::record::{attr, FeedKind, Item, Session, StopReason};
use crate::table::{self, PK, TTL_ATTRIBUTE};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, CancellationReason, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update,
};
use std::collections::HashMap;
use uuid::Uuid;

/// A transition to write, before it is turned into a transaction.
pub(super) struct TransitionWrite {
    pub session: SessionId,
    /// The session as read (`None`: it must not exist yet).
    pub expected: Option<(State, u64)>,
    pub event: Event,
    pub turn: Turn,
    pub by: String,
    pub set: Vec<(&'static str, AttributeValue)>,
    pub remove: Vec<&'static str>,
    /// Further condition on the session item, with its own `:x` values and `#x` names.
    pub extra_condition: Option<(&'static str, Vec<(&'static str, AttributeValue)>)>,
    /// Items that must land atomically with the transition (message, idempotency record).
    pub extra_items: Vec<TransactWriteItem>,
    /// The session's owner, whose feed is told of the transition when it starts or ends a turn
    /// or creates the session (`None`: a step nobody is told of).
    pub feed: Option<UserId>,
}

/// What a feed event says, before it is written ([`crate::FeedEvent`] once read).
pub(super) struct FeedNote {
    pub kind: FeedKind,
    pub session: SessionId,
    pub turn: Option<Turn>,
    pub state: Option<State>,
    pub event: Option<Event>,
    pub title: Option<String>,
}

/// How long feed events are kept: a tab that was away longer reloads its list.
pub const FEED_RETENTION_S: u64 = 3600;

// Returned once per write and consumed at once (see `Outcome`).
#[allow(clippy::large_enum_variant)]
pub(super) enum WriteResult {
    Applied {
        version: u64,
    },
    /// Some condition failed and nothing was written.
    Rejected(Rejection),
}

/// Which conditions of a rejected transition failed.
pub(super) struct Rejection {
    /// The session was not in the expected state and version.
    pub session_failed: bool,
    /// The session as it is now, when `session_failed`.
    pub current: Option<Session>,
    /// Extra items (by index) whose condition failed, with what they hold.
    pub extras: Vec<(usize, Option<Item>)>,
}

impl Rejection {
    pub fn extra(&self, index: usize) -> Option<&Option<Item>> {
        self.extras.iter().find(|(i, _)| *i == index).map(|(_, item)| item)
    }
}

/// A transition's transaction, ready to send (and resend: it is idempotent by `op`).
struct Transaction {
    items: Vec<TransactWriteItem>,
    /// The session's version once it lands.
    version: u64,
    /// Identifies this logical write across retries, so a retry can recognise its own success.
    op: String,
}

/// How one attempt at a transaction ended, short of landing.
enum Attempt {
    /// Done: landed before a lost response, or rejected by a condition.
    Settled(Box<WriteResult>),
    /// Collided with concurrent transactions or was throttled: back off and retry.
    Contended,
    /// Cancelled for another reason: an error, unless it may have landed.
    Other,
}

impl Store {
    /// Writes one transition of the table, atomically with `extra_items`.
    pub(super) async fn write_transition(&self, w: TransitionWrite) -> Result<WriteResult, StoreError> {
        let (session, expected) = (w.session, w.expected);
        let tx = self.transaction(w)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = self
                .client
                .transact_write_items()
                .set_transact_items(Some(tx.items.clone()))
                .client_request_token(Uuid::new_v4().to_string());
            let err = match request.send_reporting().await {
                Ok(out) => {
                    self.meter(true, out.consumed());
                    return Ok(WriteResult::Applied { version: tx.version });
                }
                Err(err) => err,
            };
            let err = match err.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(cancel)) => {
                    match self.cancelled(&tx, session, cancel.cancellation_reasons()).await? {
                        Attempt::Settled(result) => return Ok(*result),
                        Attempt::Contended if attempt < self.options.max_write_attempts => {
                            backoff(attempt).await;
                            continue;
                        }
                        Attempt::Contended => return Err(StoreError::Contention { attempts: attempt }),
                        Attempt::Other => StoreError::dynamo("TransactWriteItems", err),
                    }
                }
                _ => StoreError::dynamo("TransactWriteItems", err),
            };
            if !err.is_indeterminate() || attempt >= self.options.max_write_attempts {
                return Err(err);
            }
            // It may have been applied: the session says whether this operation landed.
            let Ok(current) = self.get_session(session, Read::Consistent).await else { return Err(err) };
            match &current {
                Some(c) if c.last_op.as_deref() == Some(tx.op.as_str()) => {
                    return Ok(WriteResult::Applied { version: tx.version })
                }
                Some(c) if Some((c.state, c.version)) == expected => {}
                None if expected.is_none() => {}
                _ => {
                    let rejection = Rejection { session_failed: true, current, extras: vec![] };
                    return Ok(WriteResult::Rejected(rejection));
                }
            }
            backoff(attempt).await;
        }
    }

    /// Reads a cancelled transaction's reasons: which conditions failed, or whether it merely
    /// collided.
    async fn cancelled(
        &self,
        tx: &Transaction,
        session: SessionId,
        reasons: &[CancellationReason],
    ) -> Result<Attempt, StoreError> {
        let failed = |i: usize| reasons.get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed");
        let session_failed = failed(0) || failed(1);
        let current = if session_failed {
            match reasons[0].item() {
                Some(item) if !item.is_empty() => Some(Session::from_item(item)?),
                _ => self.get_session(session, Read::Consistent).await?,
            }
        } else {
            None
        };
        // An earlier attempt of this very write may have landed before a lost response.
        if current.as_ref().and_then(|c| c.last_op.as_deref()) == Some(tx.op.as_str()) {
            return Ok(Attempt::Settled(Box::new(WriteResult::Applied { version: tx.version })));
        }
        let extras: Vec<(usize, Option<Item>)> =
            (2..tx.items.len()).filter(|&i| failed(i)).map(|i| (i - 2, reasons[i].item().cloned())).collect();
        if session_failed || !extras.is_empty() {
            let rejection = Rejection { session_failed, current, extras };
            return Ok(Attempt::Settled(Box::new(WriteResult::Rejected(rejection))));
        }
        let contended = reasons.iter().any(|r| {
            matches!(
                r.code(),
                Some("TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded")
            )
        });
        Ok(if contended { Attempt::Contended } else { Attempt::Other })
    }

    /// The transaction for a transition: the conditional session update, the transition record,
    /// then the extra items, in that order (cancellation reasons are read by position).
    fn transaction(&self, w: TransitionWrite) -> Result<Transaction, StoreError> {
        let from = w.expected.map(|(state, _)| state);
        let to =
            fsm::transition(from, w.event).ok_or(StoreError::IllegalTransition { from, event: w.event })?;
        let version = w.expected.map_or(1, |(_, v)| v + 1);
        let now = self.now_ms();
        let op = Uuid::new_v4().to_string();

        let mut record = key(table::session_pk(w.session), table::transition_sk(version));
        record.extend([
            (attr::KIND.to_owned(), string("transition")),
            (attr::VERSION.to_owned(), number(version)),
            (attr::TO.to_owned(), string(to.as_str())),
            (attr::EVENT.to_owned(), string(w.event.as_str())),
            (attr::TURN.to_owned(), number(w.turn.get())),
            (attr::AT.to_owned(), number(now)),
            (attr::BY.to_owned(), string(w.by.clone())),
        ]);
        if let Some(from) = from {
            record.insert(attr::FROM.to_owned(), string(from.as_str()));
        }

        // The feed's event rides in the same transaction: a tab is told only what happened.
        let feed = w.feed.as_ref().and_then(|user| {
            let kind = FeedKind::of_transition(from, to)?;
            let title = w.set.iter().find(|(name, _)| *name == attr::TITLE).and_then(|(_, v)| v.as_s().ok());
            let note = FeedNote {
                kind,
                session: w.session,
                turn: Some(w.turn),
                state: Some(to),
                event: Some(w.event),
                title: title.cloned(),
            };
            Some(self.feed_put(user, note, now, &format!("{version:010}")))
        });
        let mut names = HashMap::from([
            ("#state".to_owned(), attr::STATE.to_owned()),
            ("#version".to_owned(), attr::VERSION.to_owned()),
            ("#updated".to_owned(), attr::UPDATED_AT.to_owned()),
            ("#last_op".to_owned(), attr::LAST_OP.to_owned()),
        ]);
        let mut values = HashMap::from([
            (":to".to_owned(), string(to.as_str())),
            (":nv".to_owned(), number(version)),
            (":now".to_owned(), number(now)),
            (":op".to_owned(), string(op.clone())),
        ]);
        let mut sets = vec![
            "#state = :to".to_owned(),
            "#version = :nv".to_owned(),
            "#updated = :now".to_owned(),
            "#last_op = :op".to_owned(),
        ];
        // Every transition is activity: the session lives `retention` past the latest one.
        if let Some(ttl) = self.session_ttl() {
            names.insert("#ttl".to_owned(), TTL_ATTRIBUTE.to_owned());
            values.insert(":ttl".to_owned(), ttl.clone());
            sets.push("#ttl = :ttl".to_owned());
            record.insert(TTL_ATTRIBUTE.to_owned(), ttl);
        }
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
                values.insert(":from".to_owned(), string(from.as_str()));
                values.insert(":v".to_owned(), number(expected_version));
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

        let mut items =
            vec![TransactWriteItem::builder().update(session_update).build(), self.put_new(record)];
        items.extend(w.extra_items);
        items.extend(feed);
        Ok(Transaction { items, version, op })
    }

    /// A feed event of `user` as a transaction's put; `unique` tells apart events of one session
    /// in the same millisecond (a transition's version).
    pub(super) fn feed_put(&self, user: &UserId, note: FeedNote, at: u64, unique: &str) -> TransactWriteItem {
        let put = Put::builder()
            .table_name(&*self.table)
            .set_item(Some(self.feed_item(user, note, at, unique)))
            .build()
            .expect("put fields are set");
        TransactWriteItem::builder().put(put).build()
    }

    pub(super) fn feed_item(&self, user: &UserId, note: FeedNote, at: u64, unique: &str) -> Item {
        let mut item = key(table::user_pk(user), table::feed_sk(at, note.session, unique));
        item.extend([
            (attr::KIND.to_owned(), string("feed")),
            (attr::EVENT_KIND.to_owned(), string(note.kind.as_str())),
            (attr::SESSION_ID.to_owned(), string(note.session.to_string())),
            (attr::AT.to_owned(), number(at)),
            (TTL_ATTRIBUTE.to_owned(), number(at / 1000 + FEED_RETENTION_S)),
        ]);
        if let Some(turn) = note.turn {
            item.insert(attr::TURN.to_owned(), number(turn.get()));
        }
        if let Some(state) = note.state {
            item.insert(attr::TO.to_owned(), string(state.as_str()));
        }
        if let Some(event) = note.event {
            item.insert(attr::EVENT.to_owned(), string(event.as_str()));
        }
        if let Some(title) = note.title {
            item.insert(attr::TITLE.to_owned(), string(title));
        }
        item
    }

    /// Builds a conditional `Put` of a new item.
    pub(super) fn put_new(&self, item: Item) -> TransactWriteItem {
        self.put_absent(item, None)
    }

    /// A conditional `Put` of a new item; with `now_ms`, an item whose TTL has passed by then
    /// (DynamoDB removes expired items only eventually) counts as absent and is replaced.
    pub(super) fn put_absent(&self, item: Item, now_ms: Option<u64>) -> TransactWriteItem {
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
                .expression_attribute_values(":now", number(now_ms / 1000));
        }
        TransactWriteItem::builder().put(put.build().expect("put fields are set")).build()
    }

    /// Moves the user's session count by `delta`; an increase is conditioned on the limit.
    pub(super) fn count_sessions(&self, user: &UserId, delta: i64) -> TransactWriteItem {
        let mut update = Update::builder()
            .table_name(&*self.table)
            .set_key(Some(key(table::user_pk(user), super::limits::SESSION_COUNT_SK)))
            .update_expression("ADD #count :delta")
            .expression_attribute_names("#count", super::limits::SESSION_COUNT)
            .expression_attribute_values(":delta", number(delta));
        let limit = self.options.max_sessions_per_user;
        if delta > 0 && limit > 0 {
            update = update
                .condition_expression("attribute_not_exists(#count) OR #count <= :most")
                .expression_attribute_values(":most", number(i64::from(limit) - delta));
        }
        TransactWriteItem::builder().update(update.build().expect("update fields are set")).build()
    }

    pub(super) fn message_item(
        &self,
        session: SessionId,
        turn: Turn,
        role: Role,
        content: &str,
        stopped: Option<StopReason>,
    ) -> Item {
        let mut item = key(table::session_pk(session), table::message_sk(turn, role));
        item.extend([
            (attr::KIND.to_owned(), string("message")),
            (attr::SESSION_ID.to_owned(), string(session.to_string())),
            (attr::TURN.to_owned(), number(turn.get())),
            (attr::ROLE.to_owned(), string(role.as_str())),
            (attr::CONTENT.to_owned(), string(content)),
            (attr::TIMESTAMP.to_owned(), number(self.now_ms())),
        ]);
        if let Some(ttl) = self.session_ttl() {
            item.insert(TTL_ATTRIBUTE.to_owned(), ttl);
        }
        if let Some(reason) = stopped {
            item.insert(attr::STOPPED.to_owned(), AttributeValue::Bool(true));
            item.insert(attr::STOP_REASON.to_owned(), string(reason.as_str()));
        }
        item
    }

    pub(super) async fn outcome(&self, write: TransitionWrite) -> Result<Outcome<u64>, StoreError> {
        let write_session = write.session;
        Ok(match self.write_transition(write).await? {
            WriteResult::Applied { version } => Outcome::Applied(version),
            WriteResult::Rejected(Rejection { session_failed: true, current, .. }) => {
                Outcome::Conflict(Conflict { current })
            }
            // Only the reply slot was taken: the turn was committed already; report the session.
            WriteResult::Rejected(_) => Outcome::Conflict(Conflict {
                current: self.get_session(write_session, Read::Consistent).await?,
            }),
        })
    }
}
