//! The send path: `POST /sessions/{user}/messages` (the limits, the claim of the turn with its
//! message, the commit and the enqueue, a repeated idempotency key answered as the original);
//! the same for `POST /sessions/{id}/regenerate` and `/edit`, which redo the last turn;
//! `POST /sessions/{id}/fork`; and `POST /sessions/{id}/cancel`.

use crate::api::{self, json, parse_session, ApiError};
use crate::App;
use chat_auth::Caller;
use chat_core::job::TurnMessage;
use chat_core::time::rfc3339_ms;
use chat_core::{
    Admission, BudgetSpent, CancelOutcome, ClientMessageId, Event, ForkOutcome, ForkRequest, NewMessage,
    Outcome, Read, RevisedTurn, Revision, Role, SendOutcome, SessionId, State, StoreError, Turn, TurnTicket,
    UserId,
};
use chat_runtime::metrics;
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, Response};
use serde_json::json;
use tracing::{error, warn};

impl App {
    pub(crate) async fn post_message(
        &self,
        request: &Request,
        user: &str,
        caller: &Caller,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        let user =
            UserId::parse(user).map_err(|e| ApiError::bad_request("invalid_user_id", e.to_string()))?;
        if !caller.may_act_as(&user) {
            return Err(ApiError::forbidden(&user));
        }
        api::require_json(request.headers())?;
        let body = api::SendBody::parse(request.body())?;
        if let Some(body_user) = &body.user_id {
            if body_user != user.as_str() {
                return Err(ApiError::bad_request(
                    "user_mismatch",
                    format!("user_id {body_user:?} in the body does not match {user:?} in the path"),
                ));
            }
        }
        if let Some((tokens, limit)) = self.budget.over(&body.message) {
            return Err(ApiError::MessageTooLong { tokens, limit });
        }
        let slot = body.session_id.unwrap_or_else(SessionId::new);
        let expect = Expected { message: Some(&body.message), session: body.session_id, revision: false };
        let message = NewMessage {
            user: &user,
            session: body.session_id,
            content: &body.message,
            client_message_id: body.client_message_id.as_ref(),
            by: request_id,
        };
        self.start_turn(&user, slot, TurnStart::Send(message), expect, request_id).await
    }

    /// `POST /sessions/{id}/regenerate` and `/edit`: a new turn that redoes the session's last,
    /// with its message again or with the new one; the last turn stays as an earlier version.
    pub(crate) async fn revise(
        &self,
        request: &Request,
        id: &str,
        caller: &Caller,
        request_id: &str,
        edit: bool,
    ) -> Result<Response<Body>, ApiError> {
        let id = parse_session(id)?;
        api::require_json(request.headers())?;
        let body = api::TurnBody::parse(request.body(), edit)?;
        if let Some((tokens, limit)) = body.message.as_deref().and_then(|m| self.budget.over(m)) {
            return Err(ApiError::MessageTooLong { tokens, limit });
        }
        let user = self.owned_session(id, caller).await?.user_id;
        tracing::Span::current().record("session", id.to_string());
        let revision = match &body.message {
            Some(text) => Revision::Edit(text),
            None => Revision::Regenerate,
        };
        let expect = Expected { message: body.message.as_deref(), session: Some(id), revision: true };
        let revised = RevisedTurn {
            user: &user,
            session: id,
            revision,
            expected_last: body.turn,
            client_message_id: body.client_message_id.as_ref(),
            by: request_id,
        };
        self.start_turn(&user, id, TurnStart::Revise(revised), expect, request_id).await
    }

    /// Starts a turn of `user` under the in-flight slot `slot` (its session): the rate limits,
    /// the slot, the claim with its message, then the commit and the enqueue. A refusal changes
    /// nothing and gives back what it took; a repeated idempotency key answers as the original.
    async fn start_turn(
        &self,
        user: &UserId,
        slot: SessionId,
        start: TurnStart<'_>,
        expect: Expected<'_>,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        self.take_turn(user).await?;
        // The turn's slot among the user's turns in flight, under its session (a new session's
        // id is chosen by the caller): taken before anything is written, so a refusal changes
        // nothing.
        if let Err(err) = self.take_turn_slot(user, slot).await {
            self.return_turn(user).await;
            return Err(err);
        }
        let (key, result) = match start {
            TurnStart::Send(message) => {
                (message.client_message_id, self.store.send_message_creating(message, slot).await)
            }
            TurnStart::Revise(revised) => (revised.client_message_id, self.store.revise_turn(revised).await),
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(err) => {
                self.return_turn(user).await;
                self.give_back_turn_slot(user, slot).await;
                return Err(ApiError::store_unavailable(&err));
            }
        };
        if !matches!(outcome, SendOutcome::Accepted(_)) {
            // No turn started: the send does not count against the rates, and the slot goes
            // back, unless it is the slot of the session's turn already in flight.
            self.return_turn(user).await;
            let held_by_another = match &outcome {
                SendOutcome::InFlight { .. } => true,
                SendOutcome::Duplicate { session_id, .. } => *session_id == slot,
                _ => false,
            };
            if !held_by_another {
                self.give_back_turn_slot(user, slot).await;
            }
        }
        match outcome {
            SendOutcome::Accepted(ticket) => {
                tracing::Span::current().record("session", ticket.session_id.to_string());
                let release = key.map(|k| (user, k));
                self.commit_and_enqueue(&ticket, request_id, release).await?;
                metrics::count(metrics::name::TURNS_ACCEPTED, 1, &[]);
                let revises =
                    expect.revision.then(|| Turn::new(u64::from(ticket.turn.get()) - 1).ok()).flatten();
                let message = match (expect.message, revises) {
                    (Some(message), _) => message.to_owned(),
                    // A regenerate's message is the last turn's, read back.
                    (None, _) => self.message_of(ticket.session_id, ticket.turn).await?,
                };
                Ok(self.accepted(ticket.session_id, ticket.turn, &message, revises))
            }
            SendOutcome::Duplicate { session_id, turn } => {
                let key = key.expect("a duplicate has a key");
                self.repeat(session_id, turn, expect, request_id, (user, key)).await
            }
            SendOutcome::InFlight { state, turn } => Err(ApiError::TurnInFlight { state, turn }),
            SendOutcome::NotFound => Err(ApiError::session_not_found()),
            SendOutcome::SessionLimit { limit } => Err(ApiError::TooManyRequests {
                code: "session_limit",
                message: format!("you have {limit} sessions, the most allowed; delete one to start another"),
                retry_after: std::time::Duration::from_secs(60),
                details: None,
            }),
            SendOutcome::BudgetExhausted(spent) => Err(budget_exhausted(spent, self.store.now_ms())),
            SendOutcome::NotLastTurn { last, state } => Err(ApiError::Conflict {
                code: "not_last_turn",
                message: format!(
                    "only the last turn can be redone, and the session's last is now turn {last}; reload it"
                ),
                state,
            }),
            SendOutcome::KeyUsedByFork => Err(key_mismatch(key.expect("a used key was sent"), State::Idle)),
            SendOutcome::NothingToRevise { last, state } => Err(ApiError::Conflict {
                code: "nothing_to_regenerate",
                message: format!("turn {last}'s message is no longer kept; send it again instead"),
                state,
            }),
        }
    }

    /// The user message of a turn, as stored.
    async fn message_of(&self, id: SessionId, turn: Turn) -> Result<String, ApiError> {
        let message = self
            .store
            .get_message(id, turn, Role::User, Read::Consistent)
            .await
            .map_err(|e| ApiError::store_unavailable(&e))?;
        Ok(message.map(|m| m.content).unwrap_or_default())
    }

    /// Takes a slot among the user's turns in flight for a turn of `session`; a 429 when they are
    /// all taken.
    async fn take_turn_slot(&self, user: &UserId, session: SessionId) -> Result<(), ApiError> {
        let max = self.limits.turns_in_flight;
        let admission = self
            .store
            .open_turn_slot(user, session, max)
            .await
            .map_err(|e| ApiError::store_unavailable(&e))?;
        match admission {
            Admission::Admitted => Ok(()),
            Admission::Limited { retry_after } => Err(ApiError::TooManyRequests {
                code: "turn_rate_limited",
                message: format!(
                    "you have {max} turns being answered, the most at once; wait for one to finish"
                ),
                retry_after,
                details: Some(json!({"scope": "in_flight"})),
            }),
        }
    }

    /// Gives back the user's in-flight slot of `session`; a slot that cannot be given back lapses
    /// on its own.
    pub(crate) async fn give_back_turn_slot(&self, user: &UserId, session: SessionId) {
        if let Err(err) = self.store.close_turn_slot(user, session).await {
            warn!(error = %err, "could not give back a turn's slot; it lapses on its own");
        }
    }

    /// Takes a turn from the user's bucket, then from everyone's; a refusal by either is a 429
    /// and leaves both as they were.
    async fn take_turn(&self, user: &UserId) -> Result<(), ApiError> {
        let per_minute = self.limits.turns_per_minute;
        let admission =
            self.store.take_turn(user, per_minute).await.map_err(|e| ApiError::store_unavailable(&e))?;
        if let Admission::Limited { retry_after } = admission {
            return Err(ApiError::TooManyRequests {
                code: "turn_rate_limited",
                message: format!("you may start {per_minute} turns a minute; wait and send again"),
                retry_after,
                details: Some(json!({"scope": "user"})),
            });
        }
        let everyone = self.global.turns_per_minute;
        let admission = match self.store.take_global_turn(everyone).await {
            Ok(admission) => admission,
            Err(err) => {
                self.return_user_turn(user).await;
                return Err(ApiError::store_unavailable(&err));
            }
        };
        if let Admission::Limited { retry_after } = admission {
            self.return_user_turn(user).await;
            return Err(ApiError::TooManyRequests {
                code: "turn_rate_limited",
                message: "the service is at its turns-per-minute ceiling; wait and send again".to_owned(),
                retry_after,
                details: Some(json!({"scope": "global"})),
            });
        }
        Ok(())
    }

    /// Takes a fork from the user's bucket; a 429 when it is empty.
    async fn take_fork(&self, user: &UserId) -> Result<(), ApiError> {
        let per_minute = self.limits.forks_per_minute;
        let admission =
            self.store.take_fork(user, per_minute).await.map_err(|e| ApiError::store_unavailable(&e))?;
        match admission {
            Admission::Admitted => Ok(()),
            Admission::Limited { retry_after } => Err(ApiError::TooManyRequests {
                code: "fork_rate_limited",
                message: format!("you may fork {per_minute} times a minute; wait and fork again"),
                retry_after,
                details: None,
            }),
        }
    }

    /// Gives back a fork that made none.
    async fn return_fork(&self, user: &UserId) {
        if let Err(err) = self.store.return_fork(user, self.limits.forks_per_minute).await {
            warn!(error = %err, "could not give back an unused fork");
        }
    }

    /// Gives back the turn [`App::take_turn`] took from both buckets (the send started none).
    async fn return_turn(&self, user: &UserId) {
        self.return_user_turn(user).await;
        if let Err(err) = self.store.return_global_turn(self.global.turns_per_minute).await {
            warn!(error = %err, "could not give back an unused turn to the global bucket");
        }
    }

    async fn return_user_turn(&self, user: &UserId) {
        if let Err(err) = self.store.return_turn(user, self.limits.turns_per_minute).await {
            warn!(error = %err, "could not give back an unused turn");
        }
    }

    /// Makes a claimed turn durable and queues it. If queueing fails the turn ends in `error`
    /// (nothing is left waiting for a generator that will never come) and the client gets 503;
    /// the idempotency key it was sent with is released, so a retry starts a new turn.
    async fn commit_and_enqueue(
        &self,
        ticket: &TurnTicket,
        request_id: &str,
        release: Option<(&UserId, &ClientMessageId)>,
    ) -> Result<(), ApiError> {
        let committed = match self.store.commit_user_message(ticket, request_id).await {
            Ok(Outcome::Applied(committed)) => committed,
            Ok(Outcome::Conflict(conflict)) => {
                warn!(?conflict, "turn moved on before its message was committed");
                return Err(ApiError::unavailable(
                    "turn_aborted",
                    "the turn was ended before it could be queued; send again",
                ));
            }
            Err(err) => {
                error!(error = %err, "committing the user message failed");
                self.end_if_unchanged(
                    (ticket.session_id, State::UserWriting, ticket.version),
                    Event::StoreFailed,
                    request_id,
                    release,
                )
                .await;
                return Err(ApiError::store_unavailable(&err));
            }
        };
        let message = TurnMessage::reply(committed.session_id, committed.turn);
        if let Err(err) = self.queue.send(message).await {
            error!(error = %err, "enqueueing the turn failed");
            self.end_if_unchanged(
                (committed.session_id, State::UserCommitted, committed.version),
                Event::ProcessingFailed,
                request_id,
                release,
            )
            .await;
            return Err(ApiError::unavailable(
                "queue_unavailable",
                "the generation queue is unavailable; try again",
            ));
        }
        Ok(())
    }

    /// Best effort: ends the turn if it is still where this request left it. If DynamoDB is down
    /// too, the turn keeps its deadline and the sweeper ends it.
    async fn end_if_unchanged(
        &self,
        (id, state, version): (SessionId, State, u64),
        event: Event,
        request_id: &str,
        release: Option<(&UserId, &ClientMessageId)>,
    ) {
        let current = match self.store.get_session(id, Read::Consistent).await {
            Ok(Some(current)) if current.state == state && current.version == version => current,
            Ok(_) => return,
            Err(err) => return warn!(error = %err, "could not end the failed turn; the sweeper will"),
        };
        let reason = match event {
            Event::StoreFailed => "the message could not be stored",
            _ => "the message could not be queued for generation",
        };
        match self.store.end_turn_releasing(&current, event, reason, request_id, release).await {
            Ok(Outcome::Applied(_)) => {
                let why = if event == Event::StoreFailed { "not_stored" } else { "not_queued" };
                metrics::count(metrics::name::TURNS_FAILED, 1, &[metrics::Dimension::Reason(why)]);
                self.give_back_turn_slot(&current.user_id, current.id).await;
            }
            Ok(Outcome::Conflict(_)) => {}
            Err(err) => warn!(error = %err, "could not end the failed turn; the sweeper will"),
        }
    }

    /// A repeated idempotency key: the original answer. If the original request died between
    /// claiming the turn and queueing it, this one finishes the job. The same key with another
    /// message, session or kind of request is a client bug, refused rather than answered with
    /// the original.
    async fn repeat(
        &self,
        id: SessionId,
        turn: Turn,
        expect: Expected<'_>,
        request_id: &str,
        key: (&UserId, &ClientMessageId),
    ) -> Result<Response<Body>, ApiError> {
        let unavailable = |e: StoreError| ApiError::store_unavailable(&e);
        let session = self
            .store
            .get_session(id, Read::Consistent)
            .await
            .map_err(unavailable)?
            .ok_or_else(ApiError::session_not_found)?;
        let original =
            self.store.get_message(id, turn, Role::User, Read::Consistent).await.map_err(unavailable)?;
        let same_message = match (&original, expect.message) {
            (Some(original), Some(message)) => original.content == message,
            _ => true,
        };
        let same_kind = original.as_ref().is_none_or(|m| m.revises.is_some() == expect.revision);
        if !same_message || !same_kind || expect.session.is_some_and(|asked| asked != id) {
            return Err(key_mismatch(key.1, session.state));
        }
        if session.turn == turn && session.state == State::UserWriting {
            let ticket = TurnTicket { session_id: id, turn, version: session.version };
            self.commit_and_enqueue(&ticket, request_id, Some(key)).await?;
        }
        let revises = original.as_ref().and_then(|m| m.revises);
        Ok(self.accepted(id, turn, original.as_ref().map_or("", |m| m.content.as_str()), revises))
    }

    /// `POST /sessions/{id}/fork`: a new session of the same user with this one's history up to
    /// a turn (the last by default), `201`.
    pub(crate) async fn fork(
        &self,
        request: &Request,
        id: &str,
        caller: &Caller,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        let id = parse_session(id)?;
        api::require_json(request.headers())?;
        let body = api::TurnBody::parse(request.body(), false)?;
        let user = self.owned_session(id, caller).await?.user_id;
        tracing::Span::current().record("session", id.to_string());
        // A fork writes a copy of the history: it is paced by a bucket of its own.
        self.take_fork(&user).await?;
        let fork = ForkRequest {
            user: &user,
            source: id,
            through: body.turn,
            client_message_id: body.client_message_id.as_ref(),
            by: request_id,
        };
        let outcome = match self.store.fork_session(fork).await {
            Ok(outcome) => outcome,
            // It may have copied, or even landed: the token is kept.
            Err(err) => return Err(ApiError::store_unavailable(&err)),
        };
        // A fork refused before it copied anything does not count against the rate, as a
        // refused send does not; one refused at the session limit may have copied, and keeps it.
        let before_copying = matches!(
            outcome,
            ForkOutcome::NotFound
                | ForkOutcome::InFlight { .. }
                | ForkOutcome::TurnNotFound { .. }
                | ForkOutcome::TooLong { .. }
                | ForkOutcome::KeyUsed { .. }
        );
        if before_copying {
            self.return_fork(&user).await;
        }
        match outcome {
            ForkOutcome::Forked { session_id, source, through } => {
                if source != id || body.turn.is_some_and(|asked| asked != through) {
                    let key = body.client_message_id.as_ref().expect("only a repeat forks another");
                    return Err(key_mismatch(key, State::Idle));
                }
                Ok(json(
                    StatusCode::CREATED,
                    json!({
                        "session_id": session_id,
                        "turn": through,
                        "state": State::Idle,
                        "forked_from": {"session_id": source, "turn": through},
                    }),
                ))
            }
            ForkOutcome::NotFound => Err(ApiError::session_not_found()),
            ForkOutcome::InFlight { state, turn } => Err(ApiError::TurnInFlight { state, turn }),
            ForkOutcome::TurnNotFound { last } => Err(ApiError::NotFound {
                code: "turn_not_found",
                message: format!("the session's last turn is {last}; fork at it or an earlier one"),
            }),
            ForkOutcome::SessionLimit { limit } => Err(ApiError::TooManyRequests {
                code: "session_limit",
                message: format!("you have {limit} sessions, the most allowed; delete one to fork this one"),
                retry_after: std::time::Duration::from_secs(60),
                details: None,
            }),
            ForkOutcome::KeyUsed { .. } => {
                let key = body.client_message_id.as_ref().expect("a used key was sent");
                Err(key_mismatch(key, State::Idle))
            }
            ForkOutcome::TooLong { turns, max } => Err(ApiError::TooManyTurnsToFork { turns, max }),
        }
    }

    /// `202`: the turn is accepted; a revision also names the turn it redoes.
    fn accepted(&self, id: SessionId, turn: Turn, message: &str, revises: Option<Turn>) -> Response<Body> {
        let mut body = json!({
            "session_id": id,
            "turn": turn,
            "status": "ok",
            "message": message,
            "stream_url": format!("{}/sessions/{id}/stream?turn={turn}", self.stream_url_base),
        });
        if let Some(earlier) = revises {
            body["revises"] = json!(earlier);
        }
        json(StatusCode::ACCEPTED, body)
    }

    pub(crate) async fn cancel(&self, id: &str, caller: &Caller) -> Result<Response<Body>, ApiError> {
        let id = parse_session(id)?;
        match self
            .store
            .request_cancel(id, caller.scope())
            .await
            .map_err(|e| ApiError::store_unavailable(&e))?
        {
            CancelOutcome::Requested { turn, state } => Ok(json(
                StatusCode::ACCEPTED,
                json!({"session_id": id, "turn": turn, "state": state, "status": "cancel_requested"}),
            )),
            CancelOutcome::NotInFlight { state } => Err(ApiError::Conflict {
                code: "no_turn_in_flight",
                message: format!("nothing to cancel: the session is {state}"),
                state,
            }),
            CancelOutcome::NotFound => Err(ApiError::session_not_found()),
        }
    }
}

/// What a turn's request was, to tell a repeat of it from another request with the same key.
struct Expected<'a> {
    /// The message sent (`None`: a regenerate, whose message is the last turn's).
    message: Option<&'a str>,
    /// The session named, if one was.
    session: Option<SessionId>,
    /// A regenerate or an edit, rather than a send.
    revision: bool,
}

/// How a turn starts.
enum TurnStart<'a> {
    /// A message sent.
    Send(NewMessage<'a>),
    /// The last turn redone.
    Revise(RevisedTurn<'a>),
}

/// `409 idempotency_key_mismatch`.
fn key_mismatch(key: &ClientMessageId, state: State) -> ApiError {
    ApiError::Conflict {
        code: "idempotency_key_mismatch",
        message: format!(
            "client_message_id {:?} was used for another request; use a new key for a new one",
            key.as_str()
        ),
        state,
    }
}

/// `429 daily_budget_exhausted`: the user's turns used today's tokens; the budget resets at the
/// next 00:00 UTC, which `Retry-After` and `resets_at` say.
fn budget_exhausted(spent: BudgetSpent, now_ms: u64) -> ApiError {
    let wait = std::time::Duration::from_millis(spent.resets_at.saturating_sub(now_ms));
    let resets_at = rfc3339_ms(spent.resets_at);
    ApiError::TooManyRequests {
        code: "daily_budget_exhausted",
        message: format!(
            "your turns used {} of today's {} tokens; the budget resets at {resets_at}",
            spent.used, spent.limit
        ),
        retry_after: wait,
        details: Some(json!({"resets_at": resets_at, "used": spent.used, "limit": spent.limit})),
    }
}
