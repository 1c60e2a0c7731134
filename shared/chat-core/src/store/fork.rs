//! Forking: a new session of the same user whose history up to a turn is a copy of another's.
//! The messages are copied first, under the new session's key, where nothing reads them until
//! the session item exists; then one transition (`Fork`, into `idle`) creates the session item
//! with the user's session count and the idempotency record, or none of them.

use super::transition::{TransitionWrite, WriteResult};
use super::{key, number, string, ForkOutcome, ForkRequest, Read, Store};
use crate::error::StoreError;
use crate::fsm::Event;
use crate::ids::{ClientMessageId, Role, SessionId, Turn, UserId};
use crate::record::{attr, Fields, Item, TitleBy};
use crate::table::{self, GSI1_PK, GSI1_SK, PK, SK, TTL_ATTRIBUTE};
use aws_sdk_dynamodb::types::{ConditionCheck, PutRequest, TransactWriteItem, WriteRequest};

/// The most turns a fork copies: a write each, so a fork's cost and time stay bounded.
pub const MAX_FORK_TURNS: u32 = 1000;

impl Store {
    /// Forks `request.source` at `request.through` (its last turn when `None`) into a new
    /// session of the same user, in `idle` with `through` as its last turn. A turn in flight in
    /// the source refuses it; a repeated idempotency key answers with the first fork. The copy
    /// costs a write per message: it grows with the history forked.
    pub async fn fork_session(&self, request: ForkRequest<'_>) -> Result<ForkOutcome, StoreError> {
        let ForkRequest { user, source, through, client_message_id, by } = request;
        if let Some(idem) = client_message_id {
            if let Some(outcome) = self.find_fork(user, idem).await? {
                return Ok(outcome);
            }
        }
        let parent = match self.get_session(source, Read::Consistent).await? {
            Some(parent) if &parent.user_id == user => parent,
            _ => return Ok(ForkOutcome::NotFound),
        };
        if parent.state.turn_in_flight() {
            return Ok(ForkOutcome::InFlight { state: parent.state, turn: parent.turn });
        }
        let through = through.unwrap_or(parent.turn);
        if through > parent.turn {
            return Ok(ForkOutcome::TurnNotFound { last: parent.turn });
        }
        if through.get() > MAX_FORK_TURNS {
            return Ok(ForkOutcome::TooLong { turns: through.get(), max: MAX_FORK_TURNS });
        }
        // Refused before any copy at the session limit (the transaction still decides a race).
        let limit = self.options.max_sessions_per_user;
        if limit > 0 && self.session_count(user).await? >= u64::from(limit) {
            // The same key's fork may be what just reached the limit: answer with it.
            if let Some(idem) = client_message_id {
                if let Some(outcome) = self.find_fork(user, idem).await? {
                    return Ok(outcome);
                }
            }
            return Ok(ForkOutcome::SessionLimit { limit });
        }
        let fork = SessionId::new();
        let messages = self
            .query_range(
                table::session_pk(source),
                table::message_sk(Turn::FIRST, Role::User),
                table::message_sk(through, Role::Assistant),
                Read::Consistent,
            )
            .await?;
        let ttl = self.session_ttl();
        let copies: Vec<Item> = messages
            .into_iter()
            .map(|mut item| {
                item.insert(PK.to_owned(), string(table::session_pk(fork)));
                item.insert(attr::SESSION_ID.to_owned(), string(fork.to_string()));
                // A later turn of the source is no part of the fork.
                let superseded = Fields::new(&item).opt_turn(attr::SUPERSEDED_BY).ok().flatten();
                if superseded.is_some_and(|turn| turn > through) {
                    item.remove(attr::SUPERSEDED_BY);
                }
                match &ttl {
                    Some(ttl) => item.insert(TTL_ATTRIBUTE.to_owned(), ttl.clone()),
                    None => item.remove(TTL_ATTRIBUTE),
                };
                item
            })
            .collect();
        let copied: Vec<Item> = copies.iter().map(|c| key(table::session_pk(fork), sk_of(c))).collect();
        let puts = copies
            .into_iter()
            .map(|item| {
                let put = PutRequest::builder().set_item(Some(item)).build().expect("item is set");
                WriteRequest::builder().put_request(put).build()
            })
            .collect();
        self.write_batches(puts).await?;

        let now = self.now_ms();
        let mut set = vec![
            (attr::KIND, string("session")),
            (attr::SESSION_ID, string(fork.to_string())),
            (attr::USER_ID, string(user.as_str())),
            (attr::CREATED_AT, number(now)),
            (attr::TURN, number(through.get())),
            (attr::ATTEMPTS, number(0)),
            (attr::REDRIVES, number(0)),
            (attr::CANCEL_REQUESTED, aws_sdk_dynamodb::types::AttributeValue::Bool(false)),
            (attr::FORKED_FROM, string(source.to_string())),
            (attr::FORKED_TURN, number(through.get())),
            (GSI1_PK, string(table::user_pk(user))),
            (GSI1_SK, string(table::by_user_sk(now, fork))),
        ];
        if let Some(title) = &parent.title {
            set.extend([
                (attr::TITLE, string(title.clone())),
                (attr::TITLE_BY, string(TitleBy::User.as_str())),
            ]);
        }
        // The source's summary covers turns the fork has too: it stands in for them as well.
        if let Some(summary) = parent.summary.as_ref().filter(|s| s.through <= through) {
            set.extend([
                (attr::SUMMARY, string(summary.text.clone())),
                (attr::SUMMARY_THROUGH, number(summary.through.get())),
                (attr::SUMMARY_AT, number(summary.at)),
            ]);
        }
        // The source must still exist as the fork lands: a fork racing a delete of its source
        // is refused, not left with part of a history.
        let source_exists = ConditionCheck::builder()
            .table_name(&*self.table)
            .set_key(Some(super::session_key(source)))
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .expect("condition fields are set");
        let mut extra_items = vec![
            self.count_sessions(user, 1),
            TransactWriteItem::builder().condition_check(source_exists).build(),
        ];
        if let Some(idem) = client_message_id {
            let mut record = key(table::user_pk(user), table::idempotency_sk(idem));
            record.extend([
                (attr::KIND.to_owned(), string("idempotency")),
                (attr::SESSION_ID.to_owned(), string(fork.to_string())),
                (attr::TURN.to_owned(), number(through.get())),
                (attr::FORKED_FROM.to_owned(), string(source.to_string())),
                (attr::CREATED_AT.to_owned(), number(now)),
            ]);
            if let Some(ttl) = self.ttl_for(Some(self.options.idempotency_retention)) {
                record.insert(TTL_ATTRIBUTE.to_owned(), ttl);
            }
            extra_items.push(self.put_absent(record, Some(now)));
        }
        let write = TransitionWrite {
            session: fork,
            expected: None,
            event: Event::Fork,
            turn: through,
            by: by.to_owned(),
            set,
            remove: vec![],
            extra_condition: None,
            extra_items,
            feed: Some(user.clone()),
        };
        let written = self.write_transition(write).await;
        let rejection = match written {
            Ok(WriteResult::Applied { .. }) => {
                return Ok(ForkOutcome::Forked { session_id: fork, source, through });
            }
            Ok(WriteResult::Rejected(rejection)) => rejection,
            Err(err) => {
                // Not landed (as far as anyone can tell): nothing may point at the copies.
                if matches!(self.get_session(fork, Read::Consistent).await, Ok(None)) {
                    let _ = self.delete_keys(copied).await;
                }
                return Err(err);
            }
        };
        // Nothing points at the copies: remove them.
        self.delete_keys(copied).await?;
        if rejection.extra(1).is_some() {
            return Ok(ForkOutcome::NotFound);
        }
        if let (Some(idem), Some(_)) = (client_message_id, rejection.extra(2)) {
            // A concurrent fork with the same key won: answer with it.
            if let Some(outcome) = self.find_fork(user, idem).await? {
                return Ok(outcome);
            }
        }
        if rejection.extra(0).is_some() {
            return Ok(ForkOutcome::SessionLimit { limit: self.options.max_sessions_per_user });
        }
        Err(StoreError::corrupt(table::session_pk(fork), "a new session's id was taken"))
    }

    /// The fork a repeated idempotency key made, or `Duplicate`'s answer for a key that started a
    /// turn instead (a client bug the caller refuses).
    async fn find_fork(
        &self,
        user: &UserId,
        idem: &ClientMessageId,
    ) -> Result<Option<ForkOutcome>, StoreError> {
        let Some(record) = self.get_item(key(table::user_pk(user), table::idempotency_sk(idem))).await?
        else {
            return Ok(None);
        };
        let fields = Fields::new(&record);
        if fields.opt_number::<u64>(TTL_ATTRIBUTE)?.is_some_and(|s| s * 1000 <= self.now_ms()) {
            return Ok(None);
        }
        let session_id = fields.parsed(attr::SESSION_ID, SessionId::parse)?;
        let turn = fields.turn(attr::TURN)?;
        Ok(Some(match fields.opt_string(attr::FORKED_FROM)? {
            Some(source) => ForkOutcome::Forked {
                session_id,
                source: SessionId::parse(source)
                    .map_err(|_| fields.bad(attr::FORKED_FROM, "is not a session id"))?,
                through: turn,
            },
            None => ForkOutcome::KeyUsed { session_id, turn },
        }))
    }
}

fn sk_of(item: &Item) -> String {
    item.get(SK).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default()
}
