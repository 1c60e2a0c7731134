//! The user's side of a turn: a send claims the turn and stores the message with it, then the
//! message is committed; a cancel asks the generator to stop.

use super::transition::{Rejection, TransitionWrite, WriteResult};
use super::{
    key, ms, number, session_key, string, CancelOutcome, Conflict, NewMessage, Outcome, Read, RevisedTurn,
    Revision, SendOutcome, Store, TurnTicket, Written,
};
use crate::error::StoreError;
use crate::fsm::{Event, State};
use crate::ids::{ClientMessageId, Role, SessionId, Turn, UserId};
use crate::record::{attr, Fields, Item, Session, TitleBy};
use crate::table::{self, DUE_AT, DUE_SHARD, GSI1_PK, GSI1_SK, PK, TTL_ATTRIBUTE};
use aws_sdk_dynamodb::types::{
    AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update,
};

impl Store {
    async fn find_idempotent(
        &self,
        user: &UserId,
        key_: &ClientMessageId,
    ) -> Result<Option<SendOutcome>, StoreError> {
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
        self.send_message_creating(msg, SessionId::new()).await
    }

    /// [`Store::send_message`], where a message that starts a session starts it with the id
    /// `new_session` (chosen by the caller, which holds a slot under it first).
    pub async fn send_message_creating(
        &self,
        msg: NewMessage<'_>,
        new_session: SessionId,
    ) -> Result<SendOutcome, StoreError> {
        if let Some(idem) = msg.client_message_id {
            if let Some(repeat) = self.find_idempotent(msg.user, idem).await? {
                return Ok(repeat);
            }
        }
        let Some(session_id) = msg.session else {
            return self.claim_turn(&msg, new_session, None, None).await;
        };
        for _ in 0..self.options.max_write_attempts {
            let current = match self.get_session(session_id, Read::Consistent).await? {
                Some(current) if &current.user_id == msg.user => current,
                _ => return Ok(SendOutcome::NotFound),
            };
            if current.state.turn_in_flight() {
                return Ok(SendOutcome::InFlight { state: current.state, turn: current.turn });
            }
            match self.claim_turn(&msg, session_id, Some(&current), None).await? {
                // The session moved between the read and the write but may still accept a turn.
                SendOutcome::InFlight { state, .. } if !state.turn_in_flight() => continue,
                outcome => return Ok(outcome),
            }
        }
        Err(StoreError::Contention { attempts: self.options.max_write_attempts })
    }

    /// Claims a new turn that redoes the session's last one (`Regenerate`: its message again;
    /// `Edit`: a new text), into `user_writing`. The last turn is marked superseded in the same
    /// transaction, so it stays in the history as an earlier version and leaves the prompts.
    /// `expected_last`, when given, must be the session's last turn (else `NotLastTurn`: another
    /// turn came first). Follow with [`Store::commit_user_message`], as a send.
    pub async fn revise_turn(&self, revised: RevisedTurn<'_>) -> Result<SendOutcome, StoreError> {
        let RevisedTurn { user, session: session_id, revision, expected_last, client_message_id, by } =
            revised;
        if let Some(idem) = client_message_id {
            if let Some(repeat) = self.find_idempotent(user, idem).await? {
                return Ok(repeat);
            }
        }
        for _ in 0..self.options.max_write_attempts {
            let current = match self.get_session(session_id, Read::Consistent).await? {
                Some(current) if &current.user_id == user => current,
                _ => return Ok(SendOutcome::NotFound),
            };
            if current.state.turn_in_flight() {
                return Ok(SendOutcome::InFlight { state: current.state, turn: current.turn });
            }
            if expected_last.is_some_and(|turn| turn != current.turn) {
                return Ok(SendOutcome::NotLastTurn { last: current.turn, state: current.state });
            }
            // The message redone must be there to mark (it ages out by its own TTL).
            let earlier = self.get_message(session_id, current.turn, Role::User, Read::Consistent).await?;
            let Some(earlier) = earlier else {
                return Ok(SendOutcome::NothingToRevise { last: current.turn, state: current.state });
            };
            let content = match revision {
                Revision::Edit(text) => text.to_owned(),
                Revision::Regenerate => earlier.content,
            };
            let msg =
                NewMessage { user, session: Some(session_id), content: &content, client_message_id, by };
            match self
                .claim_turn(&msg, session_id, Some(&current), Some((revision.event(), current.turn)))
                .await?
            {
                SendOutcome::InFlight { state, .. } if !state.turn_in_flight() => continue,
                outcome => return Ok(outcome),
            }
        }
        Err(StoreError::Contention { attempts: self.options.max_write_attempts })
    }

    /// Writes a turn's claim: `UserSend` (`revises` `None`), or the revision `event` of the
    /// session's last turn `revises`.
    async fn claim_turn(
        &self,
        msg: &NewMessage<'_>,
        session_id: SessionId,
        current: Option<&Session>,
        revises: Option<(Event, Turn)>,
    ) -> Result<SendOutcome, StoreError> {
        let now = self.now_ms();
        let turn = current.map_or(Turn::FIRST, |c| c.turn.next());
        let mut set = vec![
            (attr::TURN, number(turn.get())),
            (attr::ATTEMPTS, number(0)),
            (attr::REDRIVES, number(0)),
            (attr::CANCEL_REQUESTED, AttributeValue::Bool(false)),
            (DUE_SHARD, string(table::due_shard(session_id))),
            (DUE_AT, number(now + ms(self.options.writing_timeout))),
        ];
        if current.is_none() {
            set.extend([
                (attr::KIND, string("session")),
                (attr::SESSION_ID, string(session_id.to_string())),
                (attr::USER_ID, string(msg.user.as_str())),
                (attr::CREATED_AT, number(now)),
                (GSI1_PK, string(table::user_pk(msg.user))),
                (GSI1_SK, string(table::by_user_sk(now, session_id))),
                // Until the small model or the user names it, a session is its first words.
                (attr::TITLE, string(crate::record::title_from_words(msg.content))),
                (attr::TITLE_BY, string(TitleBy::Words.as_str())),
            ]);
        }
        let mut message = self.message_item(session_id, turn, Role::User, msg.content, None);
        if let Some((_, earlier)) = revises {
            message.insert(attr::REVISES.to_owned(), number(earlier.get()));
            // No summary through a redone turn may be stored after this (one in the works).
            set.push((attr::REDONE_THROUGH, number(earlier.get())));
        }
        let mut extra_items = vec![self.put_new(message)];
        if let Some(idem) = msg.client_message_id {
            let mut record = key(table::user_pk(msg.user), table::idempotency_sk(idem));
            record.extend([
                (attr::KIND.to_owned(), string("idempotency")),
                (attr::SESSION_ID.to_owned(), string(session_id.to_string())),
                (attr::TURN.to_owned(), number(turn.get())),
                (attr::CREATED_AT.to_owned(), number(now)),
            ]);
            if let Some(ttl) = self.ttl_for(Some(self.options.idempotency_retention)) {
                record.insert(TTL_ATTRIBUTE.to_owned(), ttl);
            }
            extra_items.push(self.put_absent(record, Some(now)));
        }
        // A new session moves the user's session count in the same transaction, up to the limit.
        let count_index = current.is_none().then(|| {
            extra_items.push(self.count_sessions(msg.user, 1));
            extra_items.len() - 1
        });
        // With a daily token budget, the claim holds only while the user is under it.
        let budget = self.options.daily_token_budget;
        let budget_index = (budget > 0).then(|| {
            extra_items.push(self.budget_check(msg.user, budget));
            extra_items.len() - 1
        });
        // A revision marks the turn it redoes, once: the marker's condition refuses a second.
        let marker_index = revises.map(|(_, earlier)| {
            extra_items.push(self.mark_superseded(session_id, earlier, turn));
            extra_items.len() - 1
        });
        let mut remove = vec![attr::LEASE_OWNER, attr::LEASE_EXPIRES_AT, attr::REASON, attr::SUMMARY_PENDING];
        // A summary that covers the turn being redone would keep what the user took back.
        let summarised = current.and_then(|c| c.summary.as_ref()).map(|s| s.through);
        if revises.is_some_and(|(_, earlier)| summarised.is_some_and(|through| through >= earlier)) {
            remove.extend([attr::SUMMARY, attr::SUMMARY_THROUGH, attr::SUMMARY_AT]);
        }
        let write = TransitionWrite {
            session: session_id,
            expected: current.map(|c| (c.state, c.version)),
            event: revises.map_or(Event::UserSend, |(event, _)| event),
            turn,
            by: msg.by.to_owned(),
            set,
            remove,
            extra_condition: None,
            extra_items,
            feed: Some(msg.user.clone()),
        };
        let rejection = match self.write_transition(write).await? {
            WriteResult::Applied { version } => {
                return Ok(SendOutcome::Accepted(TurnTicket { session_id, turn, version }))
            }
            WriteResult::Rejected(rejection) => rejection,
        };
        // A concurrent request with the same key won: answer with its turn.
        if let (Some(idem), Some(item)) = (msg.client_message_id, rejection.extra(1)) {
            return match item {
                Some(item) => idempotent_answer(item),
                None => self.find_idempotent(msg.user, idem).await?.ok_or_else(|| {
                    StoreError::corrupt(table::idempotency_sk(idem), "conflicted but is missing")
                }),
            };
        }
        if count_index.is_some_and(|i| rejection.extra(i).is_some()) && !rejection.session_failed {
            return Ok(SendOutcome::SessionLimit { limit: self.options.max_sessions_per_user });
        }
        if let Some(day) = budget_index.and_then(|i| rejection.extra(i)).filter(|_| !rejection.session_failed)
        {
            return Ok(SendOutcome::BudgetExhausted(self.budget_spent(day.as_ref(), budget)));
        }
        if marker_index.is_some_and(|i| rejection.extra(i).is_some()) && !rejection.session_failed {
            return Err(StoreError::corrupt(
                table::message_sk(revises.map_or(turn, |(_, earlier)| earlier), Role::User),
                "the turn being revised was revised already, or its message is missing",
            ));
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

    /// Marks turn `earlier`'s user message as superseded by `by_turn`: it must exist and not be
    /// marked yet.
    fn mark_superseded(&self, session: SessionId, earlier: Turn, by_turn: Turn) -> TransactWriteItem {
        let update = Update::builder()
            .table_name(&*self.table)
            .set_key(Some(key(table::session_pk(session), table::message_sk(earlier, Role::User))))
            .update_expression("SET #by = :by")
            .condition_expression("attribute_exists(#pk) AND attribute_not_exists(#by)")
            .expression_attribute_names("#by", attr::SUPERSEDED_BY)
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":by", number(by_turn.get()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("update fields are set");
        TransactWriteItem::builder().update(update).build()
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
            set: vec![(DUE_AT, number(due))],
            remove: vec![],
            extra_condition: None,
            extra_items: vec![],
            feed: None,
        };
        Ok(match self.write_transition(write).await? {
            WriteResult::Applied { version } => Outcome::Applied(TurnTicket { version, ..ticket.clone() }),
            WriteResult::Rejected(r) => Outcome::Conflict(Conflict { current: r.current }),
        })
    }

    /// Asks the generator of the current turn to stop; it commits what it has, marked stopped.
    /// Only a turn in flight can be cancelled: the states are read off the transition table.
    pub async fn request_cancel(
        &self,
        session: SessionId,
        user: Option<&UserId>,
    ) -> Result<CancelOutcome, StoreError> {
        let in_flight: Vec<State> = State::ALL.into_iter().filter(|s| s.turn_in_flight()).collect();
        let placeholders: Vec<String> = (0..in_flight.len()).map(|i| format!(":f{i}")).collect();
        let mut condition = format!("attribute_exists(#pk) AND #state IN ({})", placeholders.join(", "));
        let mut request = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(session_key(session)))
            .update_expression("SET #cancel = :yes")
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#cancel", attr::CANCEL_REQUESTED)
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":yes", AttributeValue::Bool(true))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        for (placeholder, state) in placeholders.iter().zip(in_flight) {
            request = request.expression_attribute_values(placeholder, string(state.as_str()));
        }
        if let Some(user) = user {
            condition.push_str(" AND #user = :user");
            request = request
                .expression_attribute_names("#user", attr::USER_ID)
                .expression_attribute_values(":user", string(user.as_str()));
        }
        Ok(match self.send_conditional(request.condition_expression(condition)).await? {
            Written::Applied(out) => {
                let session = Session::from_item(out.attributes().unwrap_or(&Item::new()))?;
                CancelOutcome::Requested { turn: session.turn, state: session.state }
            }
            Written::Refused(item) => match item.as_ref().map(Session::from_item).transpose()? {
                Some(c) if user.is_none_or(|u| u == &c.user_id) => {
                    CancelOutcome::NotInFlight { state: c.state }
                }
                _ => CancelOutcome::NotFound,
            },
        })
    }
}

/// What a repeated key answers: the turn it started, or, for a key that made a fork instead,
/// that the key was used for another kind of request.
fn idempotent_answer(item: &Item) -> Result<SendOutcome, StoreError> {
    let fields = Fields::new(item);
    if fields.opt_string(attr::FORKED_FROM)?.is_some() {
        return Ok(SendOutcome::KeyUsedByFork);
    }
    let (session_id, turn) = (fields.parsed(attr::SESSION_ID, SessionId::parse)?, fields.turn(attr::TURN)?);
    Ok(SendOutcome::Duplicate { session_id, turn })
}
