//! How turns and sessions end: a turn ended in `error` or `timeout`, a session settled back to
//! `idle`, an overdue turn re-driven, and a session deleted with everything under it.

use super::transition::{FeedNote, TransitionWrite};
use super::{
    backoff, key, ms, number, session_key, string, Conflict, DeleteOutcome, Outcome, Read, Store, Written,
};
use crate::error::StoreError;
use crate::fsm::{self, Event, State};
use crate::ids::{ClientMessageId, SessionId, Turn, UserId};
use crate::record::{attr, FeedKind, Fields, Item, Session, TitleBy};
use crate::table::{self, DUE_AT, DUE_SHARD, PK, SK, TTL_ATTRIBUTE};
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, DeleteRequest, ReturnValue, ReturnValuesOnConditionCheckFailure, Select,
    TransactWriteItem, WriteRequest,
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
        self.end_turn_with(current, event, reason, by, extra_items).await
    }

    /// [`Store::end_turn`], landing `extra_items` in the same transaction.
    pub(super) async fn end_turn_with(
        &self,
        current: &Session,
        event: Event,
        reason: &str,
        by: &str,
        extra_items: Vec<TransactWriteItem>,
    ) -> Result<Outcome<u64>, StoreError> {
        let illegal = StoreError::IllegalTransition { from: Some(current.state), event };
        match fsm::transition(Some(current.state), event) {
            Some(State::Error | State::Timeout) => {}
            _ => return Err(illegal),
        }
        let (mut set, remove) = self.turn_ended_deadline(current.id);
        set.push((attr::REASON, string(reason)));
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
            feed: Some(current.user_id.clone()),
        };
        self.outcome(write).await
    }

    /// What a transition that ends a turn sets and removes: the lease goes, and the deadline
    /// becomes the idle expiry (`idle_timeout` from now), or goes too when there is none.
    pub(super) fn turn_ended_deadline(
        &self,
        session: SessionId,
    ) -> (Vec<(&'static str, AttributeValue)>, Vec<&'static str>) {
        match self.options.idle_timeout {
            Some(idle) => (
                vec![
                    (DUE_SHARD, string(table::due_shard(session))),
                    (DUE_AT, number(self.now_ms() + ms(idle))),
                ],
                vec![attr::LEASE_OWNER, attr::LEASE_EXPIRES_AT],
            ),
            None => (vec![], vec![attr::LEASE_OWNER, attr::LEASE_EXPIRES_AT, DUE_SHARD, DUE_AT]),
        }
    }

    /// `IdleExpired`: a session whose turn ended and which stayed quiet past its idle deadline
    /// is settled (`Settle` or `Recover`, as the table says) and expired into `timeout`, marked
    /// for its summary; the summary's deadline (the pickup timeout) lets the sweeper re-send
    /// the job should it be lost. `Conflict` when the session moved on (a new message).
    pub async fn expire_idle(&self, current: &Session, by: &str) -> Result<Outcome<u64>, StoreError> {
        let mut current = current.clone();
        loop {
            // A turn that failed keeps its reason through the expiry: it is still why that
            // message has no answer.
            let (event, set) = match fsm::settling(current.state) {
                Some(event) => (event, vec![]),
                None if current.state == State::Idle => {
                    let mut set = vec![
                        (attr::SUMMARY_PENDING, AttributeValue::Bool(true)),
                        (attr::REDRIVES, number(0)),
                        (DUE_SHARD, string(table::due_shard(current.id))),
                        (DUE_AT, number(self.now_ms() + ms(self.options.pickup_timeout))),
                    ];
                    if current.reason.is_none() {
                        set.push((attr::REASON, string("the session was idle past its limit")));
                    }
                    (Event::IdleExpired, set)
                }
                None => {
                    return Err(StoreError::IllegalTransition {
                        from: Some(current.state),
                        event: Event::IdleExpired,
                    })
                }
            };
            let write = TransitionWrite {
                session: current.id,
                expected: Some((current.state, current.version)),
                event,
                turn: current.turn,
                by: by.to_owned(),
                set,
                remove: vec![],
                extra_condition: None,
                extra_items: vec![],
                feed: Some(current.user_id.clone()),
            };
            match self.outcome(write).await? {
                Outcome::Applied(version) if event == Event::IdleExpired => {
                    return Ok(Outcome::Applied(version))
                }
                Outcome::Applied(version) => {
                    current.state = State::Idle;
                    current.version = version;
                }
                conflict => return Ok(conflict),
            }
        }
    }

    /// Stores the summary of `current`'s conversation through `through`, written after it went
    /// idle, and clears the pending mark and its deadline. No state change. When the session
    /// moved on meanwhile (a new message), the summary is still kept if it is newer than the
    /// one there; `Conflict` when it was not stored at all.
    pub async fn save_summary(
        &self,
        current: &Session,
        text: &str,
        through: Turn,
    ) -> Result<Outcome<()>, StoreError> {
        let update = |condition: &str| {
            self.client
                .update_item()
                .table_name(&*self.table)
                .set_key(Some(session_key(current.id)))
                .condition_expression(condition)
                .expression_attribute_names("#summary", attr::SUMMARY)
                .expression_attribute_names("#through", attr::SUMMARY_THROUGH)
                .expression_attribute_names("#at", attr::SUMMARY_AT)
                .expression_attribute_values(":summary", string(text))
                .expression_attribute_values(":through", number(through.get()))
                .expression_attribute_values(":at", number(self.now_ms()))
        };
        let pending = update("#state = :timeout AND #version = :v AND #pending = :yes")
            .update_expression(
                "SET #summary = :summary, #through = :through, #at = :at REMOVE #pending, #due, #shard",
            )
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#version", attr::VERSION)
            .expression_attribute_names("#pending", attr::SUMMARY_PENDING)
            .expression_attribute_names("#due", DUE_AT)
            .expression_attribute_names("#shard", DUE_SHARD)
            .expression_attribute_values(":timeout", string(State::Timeout.as_str()))
            .expression_attribute_values(":v", number(current.version))
            .expression_attribute_values(":yes", AttributeValue::Bool(true));
        if let Written::Applied(_) = self.send_conditional(pending).await? {
            return Ok(Outcome::Applied(()));
        }
        // Not over a newer one, and not through a turn the user redid (it would hold what they
        // took back): the last turn redone must lie before the summary's last.
        let newer = update(
            "attribute_exists(#pk) AND (attribute_not_exists(#through) OR #through < :through) \
             AND (attribute_not_exists(#redone) OR #redone < :through)",
        )
        .update_expression("SET #summary = :summary, #through = :through, #at = :at")
        .expression_attribute_names("#pk", PK)
        .expression_attribute_names("#redone", attr::REDONE_THROUGH)
        .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        Ok(match self.send_conditional(newer).await? {
            Written::Applied(_) => Outcome::Applied(()),
            Written::Refused(item) => Outcome::Conflict(Conflict::of_refused(item.as_ref())?),
        })
    }

    /// Sets session `id`'s title, trimmed to [`crate::record::TITLE_MAX_CHARS`]. `User` (a
    /// rename, scoped to `owner` when given) always applies; `Model` never replaces a user's.
    /// Not a transition: the state and version stay. `Conflict` when the session is gone, not
    /// the owner's, or renamed by its user.
    pub async fn set_title(
        &self,
        id: SessionId,
        owner: Option<&UserId>,
        title: &str,
        by: TitleBy,
    ) -> Result<Outcome<()>, StoreError> {
        let title: String = title.trim().chars().take(crate::record::TITLE_MAX_CHARS).collect();
        let mut condition = "attribute_exists(#pk)".to_owned();
        let mut request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(session_key(id)))
            .update_expression("SET #title = :title, #by = :by")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#title", attr::TITLE)
            .expression_attribute_names("#by", attr::TITLE_BY)
            .expression_attribute_values(":title", string(title))
            .expression_attribute_values(":by", string(by.as_str()))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(owner) = owner {
            condition.push_str(" AND #user = :user");
            request = request
                .expression_attribute_names("#user", attr::USER_ID)
                .expression_attribute_values(":user", string(owner.as_str()));
        }
        if by != TitleBy::User {
            condition.push_str(" AND (attribute_not_exists(#by) OR #by <> :renamed)");
            request = request.expression_attribute_values(":renamed", string(TitleBy::User.as_str()));
        }
        let out = match self.send_conditional(request.condition_expression(condition)).await? {
            Written::Applied(out) => out,
            Written::Refused(item) => return Ok(Outcome::Conflict(Conflict::of_refused(item.as_ref())?)),
        };
        // The user's other tabs are told; the title is stored whether or not they can be.
        let renamed = Session::from_item(out.attributes().unwrap_or(&Item::new()))?;
        let note = FeedNote {
            kind: FeedKind::SessionRenamed,
            session: id,
            turn: Some(renamed.turn),
            state: None,
            event: None,
            title: renamed.title.clone(),
        };
        let at = self.now_ms();
        let unique = format!("title-{}", Uuid::new_v4().simple());
        let put = self.client.put_item().table_name(&*self.table).set_item(Some(self.feed_item(
            &renamed.user_id,
            note,
            at,
            &unique,
        )));
        if let Err(err) = self.send(put).await {
            tracing::warn!(error = %err, "could not tell the feed of a rename");
        }
        Ok(Outcome::Applied(()))
    }

    /// Gives up on `current`'s pending summary (its job was re-sent as often as allowed): clears
    /// the mark and the deadline. `Conflict` if the session moved on.
    pub async fn drop_summary(&self, current: &Session) -> Result<Outcome<()>, StoreError> {
        let request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(session_key(current.id)))
            .update_expression("REMOVE #pending, #due, #shard")
            .condition_expression("#version = :v")
            .expression_attribute_names("#pending", attr::SUMMARY_PENDING)
            .expression_attribute_names("#due", DUE_AT)
            .expression_attribute_names("#shard", DUE_SHARD)
            .expression_attribute_names("#version", attr::VERSION)
            .expression_attribute_values(":v", number(current.version))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        Ok(match self.send_conditional(request).await? {
            Written::Applied(_) => Outcome::Applied(()),
            Written::Refused(item) => Outcome::Conflict(Conflict::of_refused(item.as_ref())?),
        })
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
            feed: Some(current.user_id.clone()),
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
            Written::Refused(item) => Outcome::Conflict(Conflict::of_refused(item.as_ref())?),
        })
    }

    /// Removes the session and everything under it, and its user's idempotency records that
    /// point at it. The session item goes first, with the user's session count, so a failure
    /// part-way leaves no visible half-session, and no transition can add to the partition
    /// after the sweep of it has begun (each is conditioned on the session item). A generator
    /// still streaming may add a chunk; it clears the partition once it finds the session gone
    /// ([`Store::clear_if_deleted`]). With `owner`, a session of another user (or none at all)
    /// is `NotFound` and nothing is touched.
    pub async fn delete_session(
        &self,
        id: SessionId,
        owner: Option<&UserId>,
    ) -> Result<DeleteOutcome, StoreError> {
        let session = self.get_session(id, Read::Consistent).await?;
        if let Some(owner) = owner {
            if session.as_ref().is_none_or(|s| &s.user_id != owner) {
                return Ok(DeleteOutcome::NotFound);
            }
        }
        let mut keys = Vec::new();
        if let Some(session) = &session {
            // The count moves with the session item, exactly once: a retry finds the item gone.
            let delete = Delete::builder()
                .table_name(&*self.table)
                .set_key(Some(session_key(id)))
                .condition_expression("attribute_exists(#pk)")
                .expression_attribute_names("#pk", PK)
                .build()
                .expect("delete fields are set");
            let note = FeedNote {
                kind: FeedKind::SessionDeleted,
                session: id,
                turn: Some(session.turn),
                state: None,
                event: None,
                title: None,
            };
            let request = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().delete(delete).build())
                .transact_items(self.count_sessions(&session.user_id, -1))
                .transact_items(self.feed_put(&session.user_id, note, self.now_ms(), "deleted"))
                .client_request_token(Uuid::new_v4().to_string());
            // Refused: a concurrent delete took the session item (and moved the count) first.
            self.send_conditional(request).await?;
            keys.extend(self.idempotency_keys(&session.user_id, id).await?);
        }
        keys.extend(self.partition_keys(table::session_pk(id)).await?);
        keys.retain(|k| k.get(SK).and_then(|v| v.as_s().ok()).map(String::as_str) != Some(table::SESSION_SK));
        let removed = keys.len();
        self.delete_keys(keys).await?;
        Ok(match session {
            Some(_) => DeleteOutcome::Deleted { items: removed + 1 },
            None => DeleteOutcome::NotFound,
        })
    }

    /// Once a session is gone (deleted, or removed by its TTL), removes whatever is left in its
    /// partition: a chunk a generator wrote after the delete swept it, or items whose own TTL
    /// has not come yet. Returns how many it removed; nothing while the session item exists.
    pub async fn clear_if_deleted(&self, id: SessionId) -> Result<usize, StoreError> {
        if self.get_item(session_key(id)).await?.is_some() {
            return Ok(0);
        }
        let keys = self.partition_keys(table::session_pk(id)).await?;
        let removed = keys.len();
        self.delete_keys(keys).await?;
        Ok(removed)
    }

    /// Session `id` of `user` was removed by its TTL (DynamoDB Streams reported it): moves the
    /// user's session count down, exactly once however often the report is delivered (a marker
    /// written in the same transaction refuses a repeat), then clears what is left of the
    /// session. Returns whether this call moved the count.
    pub async fn session_expired(&self, id: SessionId, user: &UserId) -> Result<bool, StoreError> {
        let mut marker = key(table::user_pk(user), table::expired_sk(id));
        marker.insert(attr::KIND.to_owned(), string("expired"));
        marker.insert(attr::SESSION_ID.to_owned(), string(id.to_string()));
        // Stream records live 24 h; a week outlasts every redelivery.
        marker.insert(TTL_ATTRIBUTE.to_owned(), number(self.now_ms() / 1000 + 7 * 86_400));
        let request = self
            .client
            .transact_write_items()
            .transact_items(self.put_new(marker))
            .transact_items(self.count_sessions(user, -1))
            .client_request_token(Uuid::new_v4().to_string());
        let counted = matches!(self.send_conditional(request).await?, Written::Applied(_));
        self.clear_if_deleted(id).await?;
        Ok(counted)
    }

    /// The keys of `user`'s idempotency records that point at session `id`.
    async fn idempotency_keys(&self, user: &UserId, id: SessionId) -> Result<Vec<Item>, StoreError> {
        let prefix = table::IDEMPOTENCY_PREFIX;
        let records = self
            .query_range(table::user_pk(user), prefix.to_owned(), super::prefix_end(prefix), Read::Consistent)
            .await?;
        let mut keys = Vec::new();
        for record in records {
            let fields = Fields::new(&record);
            if fields.opt_string(attr::SESSION_ID)? == Some(id.to_string().as_str()) {
                keys.push(key(fields.string(PK)?.to_owned(), fields.string(SK)?));
            }
        }
        Ok(keys)
    }

    /// Deletes items by key, 25 to a batch, retrying what DynamoDB leaves unprocessed.
    pub(super) async fn delete_keys(&self, keys: Vec<Item>) -> Result<(), StoreError> {
        let deletes = keys
            .into_iter()
            .map(|k| {
                let delete = DeleteRequest::builder().set_key(Some(k)).build().expect("key is set");
                WriteRequest::builder().delete_request(delete).build()
            })
            .collect();
        self.write_batches(deletes).await
    }

    /// Sends write requests 25 to a `BatchWriteItem`, retrying what DynamoDB leaves unprocessed.
    pub(super) async fn write_batches(&self, requests: Vec<WriteRequest>) -> Result<(), StoreError> {
        for batch in requests.chunks(25) {
            let mut requests = batch.to_vec();
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
        Ok(())
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
            .consistent_read(Read::Consistent.consistent());
        self.query_all(query).await
    }
}
