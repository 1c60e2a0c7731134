//! The ingest function: accepts a user's message for a session (claim the turn, store the
//! message, enqueue generation) and serves reads, cancel and delete, and the chat page
//! ([`web`]). Every route of the ingest contract in docs/architecture.md lives in [`App::handle`].

mod api;
pub mod web;

pub use api::ApiError;

use api::{json, parse_session};
use chat_auth::{AuthConfig, Authenticator, Caller};
use chat_core::config::{CommonConfig, ConfigError, Env};
use chat_core::job::TurnMessage;
use chat_core::store::SessionCursor;
use chat_core::time::rfc3339_ms;
use chat_core::{
    Admission, BudgetSpent, CancelOutcome, ClientMessageId, DeleteOutcome, Event, GlobalLimits, NewMessage,
    Outcome, Read, Role, SendOutcome, Session, SessionId, State, Store, StoreError, Turn, TurnTicket, UserId,
    UserLimits,
};
use chat_runtime::metrics;
use chat_runtime::queue::Queue;
use chat_tokens::MessageBudget;
use lambda_http::http::{Method, StatusCode};
use lambda_http::{Body, Request, RequestExt, Response};
use serde_json::{json, Value};
use tracing::{error, info, warn, Instrument};

/// Request bodies larger than this get 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A page of history carries whole turns up to about this much text (at least one turn), well
/// under Lambda's 6 MB response limit.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// The newest whole turns of `messages` (oldest first) whose text fits in `max_bytes` (always at
/// least the newest turn), and the oldest turn kept.
fn newest_turns_within(
    messages: Vec<chat_core::Message>,
    max_bytes: usize,
) -> (Vec<chat_core::Message>, Option<Turn>) {
    let mut kept_from = messages.len();
    let mut bytes = 0;
    let mut oldest = None;
    let mut i = messages.len();
    while i > 0 {
        let turn = messages[i - 1].id.turn;
        let start = messages[..i].iter().rposition(|m| m.id.turn != turn).map_or(0, |p| p + 1);
        let size: usize = messages[start..i].iter().map(|m| m.content.len()).sum();
        if oldest.is_some() && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        kept_from = start;
        oldest = Some(turn);
        i = start;
    }
    (messages.into_iter().skip(kept_from).collect(), oldest)
}

/// The generator's prompt budget, which a message must fit alone.
#[derive(Debug, Clone, Default)]
pub struct Budget {
    /// `MEMORY_MAX_TOKENS`.
    pub tokens: usize,
    /// `LLM_SYSTEM_PROMPT`.
    pub system_prompt: Option<String>,
}

/// The ingest function's dependencies, built once per cold start.
pub struct App {
    store: Store,
    auth: Authenticator,
    queue: Queue,
    /// Base of the `stream_url` in answers (`STREAM_URL_BASE`); a relative URL when unset.
    stream_url_base: String,
    /// The chat page, which talks to this origin and the stream's.
    page: web::Page,
    limits: UserLimits,
    /// Limits over every user (`GLOBAL_TURNS_PER_MINUTE`).
    global: GlobalLimits,
    /// A message must fit the generator's prompt budget alone (`MEMORY_MAX_TOKENS` less the
    /// system prompt `LLM_SYSTEM_PROMPT` and framing).
    budget: MessageBudget,
}

impl App {
    /// Reads the configuration and builds the clients.
    pub async fn from_env() -> Result<App, ConfigError> {
        let env = Env::process();
        let common = CommonConfig::from_env(&env)?;
        let queue_url = env.required("QUEUE_URL")?;
        let stream_url_base = env.optional("STREAM_URL_BASE").unwrap_or_default();
        let auth = Authenticator::new(AuthConfig::from_env(&env)?)?;
        let budget = Budget {
            tokens: env.parse_or("MEMORY_MAX_TOKENS", chat_tokens::DEFAULT_BUDGET)?,
            system_prompt: env.optional("LLM_SYSTEM_PROMPT"),
        };
        let aws = chat_runtime::aws::load_config().await;
        let store = Store::new(chat_runtime::aws::dynamodb(&aws), common.table_name, common.store);
        let queue = Queue::new(chat_runtime::queue::sqs(&aws), queue_url);
        let app = App::new(store, auth, queue, common.limits, budget)?;
        Ok(app.with_stream_url_base(&stream_url_base).with_global_limits(common.global))
    }

    /// An app over explicit parts; `stream_url` answers are relative.
    pub fn new(
        store: Store,
        auth: Authenticator,
        queue: Queue,
        limits: UserLimits,
        budget: Budget,
    ) -> Result<App, ConfigError> {
        let tokens = budget.tokens;
        let budget = MessageBudget::new(tokens, budget.system_prompt).ok_or_else(|| ConfigError {
            variable: "MEMORY_MAX_TOKENS".to_owned(),
            problem: format!("is {tokens}: the system prompt alone does not fit it"),
        })?;
        Ok(App {
            store,
            auth,
            queue,
            stream_url_base: String::new(),
            page: web::Page::new(""),
            limits,
            global: GlobalLimits::default(),
            budget,
        })
    }

    /// The same app holding every user together to `global`.
    pub fn with_global_limits(mut self, global: GlobalLimits) -> App {
        self.global = global;
        self
    }

    /// The same app answering with absolute `stream_url`s under `base` (`STREAM_URL_BASE`), and
    /// serving the chat page that streams from its origin.
    pub fn with_stream_url_base(mut self, base: &str) -> App {
        self.stream_url_base = base.trim_end_matches('/').to_owned();
        self.page = web::Page::new(&self.stream_url_base);
        self
    }

    /// Serves one request; every outcome, errors included, is a JSON response.
    pub async fn handle(&self, request: Request) -> Response<Body> {
        let request_id = request
            .lambda_context_ref()
            .map_or_else(|| format!("local-{}", uuid::Uuid::new_v4().simple()), |c| c.request_id.clone());
        let span = tracing::info_span!(
            "request",
            %request_id,
            method = %request.method(),
            path = %request.uri().path(),
            session = tracing::field::Empty
        );
        async {
            let response = match self.route(&request, &request_id).await {
                Ok(response) => response,
                Err(err) => {
                    let answer = err.answer();
                    metrics::error_answer(answer.status.as_u16(), answer.code);
                    answer.response().map(Body::Text)
                }
            };
            info!(status = response.status().as_u16(), "answered");
            response
        }
        .instrument(span)
        .await
    }

    async fn route(&self, request: &Request, request_id: &str) -> Result<Response<Body>, ApiError> {
        // The chat page is public: signing in happens on it.
        if matches!(*request.method(), Method::GET | Method::HEAD) {
            if let Some(page) = self.page.response(request.uri().path()) {
                return Ok(page);
            }
        }
        let path = request.uri().path().trim_end_matches('/').to_owned();
        // Segments arrive percent-encoded (`alice%40example.com`); ids are matched decoded.
        let decoded = path
            .split('/')
            .skip(1)
            .map(|segment| {
                percent_encoding::percent_decode_str(segment).decode_utf8().map(|s| s.into_owned())
            })
            .collect::<Result<Vec<String>, _>>()
            .map_err(|_| {
                ApiError::bad_request("invalid_path", "the path is not UTF-8 once percent-decoded")
            })?;
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let method = request.method().clone();
        if segments.as_slice() == ["health"] {
            return match method {
                Method::GET => Ok(json(StatusCode::OK, json!({"status": "ok"}))),
                _ => Err(ApiError::method_not_allowed("GET")),
            };
        }
        let iam = chat_auth::iam_identity(request);
        let caller = self.auth.authenticate(request.headers(), None, iam.as_ref()).await?.caller;
        let caller = &caller;
        match (segments.as_slice(), &method) {
            (["sessions", user, "messages"], &Method::POST) => {
                self.post_message(request, user, caller, request_id).await
            }
            (["sessions", _, "messages"], _) => Err(ApiError::method_not_allowed("POST")),
            (["sessions", "user", user], &Method::GET) | (["users", user, "sessions"], &Method::GET) => {
                self.list_sessions(request, user, caller).await
            }
            (["sessions", "user", _], _) | (["users", _, "sessions"], _) => {
                Err(ApiError::method_not_allowed("GET"))
            }
            (["sessions", id, "cancel"], &Method::POST) => self.cancel(id, caller).await,
            (["sessions", _, "cancel"], _) => Err(ApiError::method_not_allowed("POST")),
            (["sessions", id], &Method::GET) => self.get_session(request, id, caller).await,
            (["sessions", id], &Method::DELETE) => self.delete_session(id, caller).await,
            (["sessions", _], _) => Err(ApiError::method_not_allowed("GET, DELETE")),
            _ => Err(ApiError::NotFound {
                code: "route_not_found",
                message: format!("no route for {method} {path}; see the API in docs/architecture.md"),
            }),
        }
    }

    async fn post_message(
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
        self.take_turn(&user).await?;
        // The turn's slot among the user's turns in flight, under its session (a new session's
        // id is chosen here): taken before anything is written, so a refusal changes nothing.
        let slot = body.session_id.unwrap_or_else(SessionId::new);
        if let Err(err) = self.take_turn_slot(&user, slot).await {
            self.return_turn(&user).await;
            return Err(err);
        }
        let message = NewMessage {
            user: &user,
            session: body.session_id,
            content: &body.message,
            client_message_id: body.client_message_id.as_ref(),
            by: request_id,
        };
        let outcome = match self.store.send_message_creating(message, slot).await {
            Ok(outcome) => outcome,
            Err(err) => {
                self.return_turn(&user).await;
                self.give_back_turn_slot(&user, slot).await;
                return Err(ApiError::store_unavailable(&err));
            }
        };
        if !matches!(outcome, SendOutcome::Accepted(_)) {
            // No turn started: the send does not count against the rates, and the slot goes
            // back, unless it is the slot of the session's turn already in flight.
            self.return_turn(&user).await;
            let held_by_another = match &outcome {
                SendOutcome::InFlight { .. } => true,
                SendOutcome::Duplicate { session_id, .. } => *session_id == slot,
                _ => false,
            };
            if !held_by_another {
                self.give_back_turn_slot(&user, slot).await;
            }
        }
        match outcome {
            SendOutcome::Accepted(ticket) => {
                tracing::Span::current().record("session", ticket.session_id.to_string());
                let release = body.client_message_id.as_ref().map(|k| (&user, k));
                self.commit_and_enqueue(&ticket, request_id, release).await?;
                metrics::count(metrics::name::TURNS_ACCEPTED, 1, &[]);
                Ok(self.accepted(ticket.session_id, ticket.turn, &body.message))
            }
            SendOutcome::Duplicate { session_id, turn } => {
                let key = body.client_message_id.as_ref().expect("a duplicate has a key");
                self.repeat(session_id, turn, &body, request_id, (&user, key)).await
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
        }
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
    async fn give_back_turn_slot(&self, user: &UserId, session: SessionId) {
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
    /// message or session is a client bug, refused rather than answered with the original.
    async fn repeat(
        &self,
        id: SessionId,
        turn: chat_core::Turn,
        body: &api::SendBody,
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
        let same_message = original.as_ref().is_none_or(|m| m.content == body.message);
        if !same_message || body.session_id.is_some_and(|asked| asked != id) {
            return Err(ApiError::Conflict {
                code: "idempotency_key_mismatch",
                message: format!(
                    "client_message_id {:?} was used for another message or session; use a new key for a new message",
                    key.1.as_str()
                ),
                state: session.state,
            });
        }
        if session.turn == turn && session.state == State::UserWriting {
            let ticket = TurnTicket { session_id: id, turn, version: session.version };
            self.commit_and_enqueue(&ticket, request_id, Some(key)).await?;
        }
        Ok(self.accepted(id, turn, original.as_ref().map_or("", |m| m.content.as_str())))
    }

    fn accepted(&self, id: SessionId, turn: chat_core::Turn, message: &str) -> Response<Body> {
        json(
            StatusCode::ACCEPTED,
            json!({
                "session_id": id,
                "turn": turn,
                "status": "ok",
                "message": message,
                "stream_url": format!("{}/sessions/{id}/stream?turn={turn}", self.stream_url_base),
            }),
        )
    }

    /// A session and a page of its history: the newest `limit` turns (20 by default, at most
    /// 100) before `cursor`, oldest first, cut to whole turns within [`MAX_PAGE_BYTES`], with the
    /// cursor of the next (older) page.
    async fn get_session(
        &self,
        request: &Request,
        id: &str,
        caller: &Caller,
    ) -> Result<Response<Body>, ApiError> {
        let id = parse_session(id)?;
        let query = request.query_string_parameters_ref();
        let limit = api::page_limit(query.and_then(|q| q.first("limit")), "turns")?;
        let cursor = match query.and_then(|q| q.first("cursor")) {
            None => None,
            Some(raw) => Some(Turn::parse(raw).map_err(|_| {
                ApiError::bad_request(
                    "invalid_cursor",
                    "cursor is not one this API returned; start without it",
                )
            })?),
        };
        let unavailable = |e: StoreError| ApiError::store_unavailable(&e);
        let session = self
            .store
            .get_session(id, Read::Consistent)
            .await
            .map_err(unavailable)?
            .filter(|session| caller.owns(&session.user_id))
            .ok_or_else(ApiError::session_not_found)?;
        let through = match cursor {
            None => Some(session.turn),
            Some(before) => Turn::new(u64::from(before.get()).saturating_sub(1)).ok(),
        };
        let messages = match through {
            None => Vec::new(),
            Some(through) => {
                let first = Turn::new(u64::from(through.get()).saturating_sub(u64::from(limit) - 1).max(1))
                    .expect("at least 1");
                self.store.messages_between(id, first, through).await.map_err(unavailable)?
            }
        };
        let (messages, oldest) = newest_turns_within(messages, MAX_PAGE_BYTES);
        let next_cursor = oldest.filter(|t| t.get() > 1).map(|t| t.to_string());
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut value = json!({
                    "id": m.id.to_string(),
                    "role": m.id.role,
                    "content": m.content,
                    "timestamp": rfc3339_ms(m.timestamp),
                });
                if let Some(reason) = m.stopped {
                    value["stopped"] = Value::Bool(true);
                    value["stop_reason"] = json!(reason);
                }
                if !m.tool_uses.is_empty() {
                    // The tools called while writing this reply, with what they answered.
                    value["tool_calls"] = json!(m.tool_uses);
                }
                if let Some(routing) = &m.routing {
                    // Which route (ROUTE_SMALL_*) and model wrote this reply.
                    value["route"] = json!(routing.route);
                    value["model"] = json!(routing.model);
                }
                value
            })
            .collect();
        let mut body = session_overview(&session);
        body["messages"] = Value::Array(messages);
        // The compact memory written after the session went idle; null until then.
        body["summary"] = match &session.summary {
            Some(summary) => json!({
                "text": summary.text,
                "through_turn": summary.through,
                "created_at": rfc3339_ms(summary.at),
            }),
            None => Value::Null,
        };
        Ok(json(StatusCode::OK, json!({ "session": body, "next_cursor": next_cursor })))
    }

    async fn list_sessions(
        &self,
        request: &Request,
        user: &str,
        caller: &Caller,
    ) -> Result<Response<Body>, ApiError> {
        let user =
            UserId::parse(user).map_err(|e| ApiError::bad_request("invalid_user_id", e.to_string()))?;
        if !caller.may_act_as(&user) {
            return Err(ApiError::forbidden(&user));
        }
        let query = request.query_string_parameters_ref();
        let limit = api::page_limit(query.and_then(|q| q.first("limit")), "sessions")?;
        let start = query
            .and_then(|q| q.first("cursor"))
            .map(|cursor| SessionCursor::decode(&user, cursor))
            .transpose()
            .map_err(|_| {
                ApiError::bad_request(
                    "invalid_cursor",
                    "cursor is not one this API returned; start without it",
                )
            })?;
        let page = self
            .store
            .list_user_sessions(&user, limit, start)
            .await
            .map_err(|e| ApiError::store_unavailable(&e))?;
        let sessions: Vec<Value> = page.sessions.iter().map(session_overview).collect();
        Ok(json(StatusCode::OK, json!({ "sessions": sessions, "next_cursor": page.next_cursor })))
    }

    async fn cancel(&self, id: &str, caller: &Caller) -> Result<Response<Body>, ApiError> {
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

    async fn delete_session(&self, id: &str, caller: &Caller) -> Result<Response<Body>, ApiError> {
        let id = parse_session(id)?;
        match self
            .store
            .delete_session(id, caller.scope())
            .await
            .map_err(|e| ApiError::store_unavailable(&e))?
        {
            DeleteOutcome::Deleted { items } => {
                // A turn the delete cut short holds no slot any more (the local stack's trusted
                // caller names no user: there the slot lapses).
                if let Some(user) = caller.scope() {
                    self.give_back_turn_slot(user, id).await;
                }
                Ok(json(StatusCode::OK, json!({"session_id": id, "deleted": true, "items": items})))
            }
            DeleteOutcome::NotFound => Err(ApiError::session_not_found()),
        }
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

/// A session's identity and position, as both the session and the list answers carry it.
fn session_overview(session: &Session) -> Value {
    let mut value = json!({
        "id": session.id,
        "user_id": session.user_id,
        "state": session.state,
        "turn": session.turn,
        "created_at": rfc3339_ms(session.created_at),
        "updated_at": rfc3339_ms(session.updated_at),
    });
    if let Some(reason) = &session.reason {
        value["error"] = Value::String(reason.clone());
    }
    if let Some(until) = session.retained_until {
        // When the session is removed unless it is used again (SESSION_TTL_DAYS).
        value["expires_at"] = Value::String(rfc3339_ms(until * 1000));
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::{Message, MessageId};

    fn turn_messages(session: SessionId, turn: u64, sizes: (usize, usize)) -> Vec<Message> {
        let turn = Turn::new(turn).unwrap();
        [(Role::User, sizes.0), (Role::Assistant, sizes.1)]
            .into_iter()
            .map(|(role, size)| Message {
                id: MessageId { session, turn, role },
                content: "x".repeat(size),
                timestamp: 0,
                stopped: None,
                routing: None,
                tool_uses: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_page_keeps_the_newest_whole_turns_that_fit_and_at_least_one() {
        let session = SessionId::new();
        let messages: Vec<Message> = (1..=4).flat_map(|t| turn_messages(session, t, (10, 40))).collect();
        let (page, oldest) = newest_turns_within(messages.clone(), 100);
        assert_eq!(oldest, Turn::new(3).ok(), "turns 4 and 3 (100 bytes) fit, turn 2 would not");
        assert_eq!(page.len(), 4);
        assert!(page.iter().all(|m| m.id.turn.get() >= 3));
        assert_eq!(page[0].id.turn.get(), 3, "oldest first");
        let (page, oldest) = newest_turns_within(messages.clone(), 10);
        assert_eq!((page.len(), oldest), (2, Turn::new(4).ok()), "one turn even over the limit");
        let (page, oldest) = newest_turns_within(Vec::new(), 10);
        assert_eq!((page.len(), oldest), (0, None));
        let (page, _) = newest_turns_within(messages, usize::MAX);
        assert_eq!(page.len(), 8);
    }
}
