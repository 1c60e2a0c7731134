//! How turns and sessions end: a turn ended in `error` or `timeout`, a session settled back to
//! `idle`, an overdue turn re-driven, and a session deleted with everything under it.

use super::transition::TransitionWrite;
use super::{
    backoff, key, ms, number, session_key, string, Conflict, DeleteOutcome, Outcome, Store, Written,
};
use crate::error::StoreError;
use crate::fsm::{self, Event, State};
use crate::ids::{ClientMessageId, SessionId, UserId};
use crate::model::{attr, Fields, Item, Session};
use crate::table::{self, DUE_AT, DUE_SHARD, PK, SK};
use aws_sdk_dynamodb::types::{
    Delete, DeleteRequest, ReturnValuesOnConditionCheckFailure, Select, TransactWriteItem, WriteRequest,
};
use uuid::Uuid;

impl Store {
    /// Ends the current turn of `current` with `event`, one of the table's edges into `error` or
    /// `timeout` (`StoreFailed`, `PickupExpired`, `ProcessingFailed`, `GenerationFailed`,
    /// `LeaseExpired`, `IdleExpired`), recording `reason`.
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
        let illegal = StoreError::IllegalTransition { from: Some(current.state), event };
        match fsm::transition(Some(current.state), event) {
            Some(State::Error | State::Timeout) => {}
            _ => return Err(illegal),
        }
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
            set: vec![(attr::REASON, string(reason))],
            remove: vec![attr::LEASE_OWNER, attr::LEASE_EXPIRES_AT, DUE_SHARD, DUE_AT],
            extra_condition: None,
            extra_items,
        };
        self.outcome(write).await
    }

    /// Returns a session whose turn has ended to `idle` by `event`, one of the table's edges into
    /// `idle` (`Settle` from `ai_committed`, `Recover` from `error` or `timeout`).
    pub async fn return_to_idle(
        &self,
        current: &Session,
        event: Event,
        by: &str,
    ) -> Result<Outcome<u64>, StoreError> {
        if fsm::transition(Some(current.state), event) != Some(State::Idle) {
            return Err(StoreError::IllegalTransition { from: Some(current.state), event });
        }
        let write = TransitionWrite {
            session: current.id,
            expected: Some((current.state, current.version)),
            event,
            turn: current.turn,
            by: by.to_owned(),
            set: vec![],
            remove: vec![attr::REASON, DUE_SHARD, DUE_AT],
            extra_condition: None,
            extra_items: vec![],
        };
        self.outcome(write).await
    }

    /// Records a sweeper re-drive of an overdue `user_committed` turn and pushes its deadline
    /// out; no state change. `Conflict` if the session moved on.
    pub async fn record_redrive(&self, current: &Session) -> Result<Outcome<u32>, StoreError> {
        let due = self.now_ms() + ms(self.options.pickup_timeout);
        let redrives = current.redrives + 1;
        let request = self
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
            .expression_attribute_values(":r", number(redrives))
            .expression_attribute_values(":due", number(due))
            .expression_attribute_values(":from", string(current.state.as_str()))
            .expression_attribute_values(":v", number(current.version))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        Ok(match self.send_conditional(request).await? {
            Written::Applied(_) => Outcome::Applied(redrives),
            Written::Refused(item) => {
                Outcome::Conflict(Conflict { current: item.as_ref().map(Session::from_item).transpose()? })
            }
        })
    }

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
                self.query_range(user_pk, prefix.to_owned(), super::prefix_end(prefix), true).await?;
            for record in records {
                let fields = Fields::new(&record);
                if fields.opt_string(attr::SESSION_ID)? == Some(id.to_string().as_str()) {
                    keys.push(key(fields.string(PK)?.to_owned(), fields.string(SK)?));
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
            let request = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().delete(delete).build())
                .transact_items(self.count_sessions(&session.user_id, -1))
                .client_request_token(Uuid::new_v4().to_string());
            // Refused: a concurrent delete took the session item (and moved the count) first.
            self.send_conditional(request).await?;
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
                if attempt > self.options.max_write_attempts {
                    return Err(StoreError::Contention { attempts: attempt - 1 });
                }
                let out =
                    self.send(self.client.batch_write_item().request_items(&*self.table, requests)).await?;
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

    /// The keys of every item in a partition.
    async fn partition_keys(&self, pk: String) -> Result<Vec<Item>, StoreError> {
        let query = self
            .client
            .query()
            .table_name(&*self.table)
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", string(pk))
            .projection_expression("#pk, #sk")
            .select(Select::SpecificAttributes)
            .consistent_read(true);
        self.query_all(query).await
    }
}
