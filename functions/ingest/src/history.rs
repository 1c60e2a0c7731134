//! Sessions and their history: `GET /sessions/{id}` (a page of turns), a user's sessions
//! (`GET /users/{user}/sessions`), and `DELETE /sessions/{id}`.

use crate::api::{self, json, parse_session, ApiError};
use crate::App;
use chat_auth::Caller;
use chat_core::store::SessionCursor;
use chat_core::time::rfc3339_ms;
use chat_core::{DeleteOutcome, Message, Read, Role, Session, SessionId, StoreError, Turn, Usage, UserId};
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, RequestExt, Response};
use serde_json::{json, Value};

/// A page of history carries whole turns up to about this much text (at least one turn), well
/// under Lambda's 6 MB response limit.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// The newest whole turns of `messages` (oldest first) whose text fits in `max_bytes` (always at
/// least the newest turn), and the oldest turn kept.
fn newest_turns_within(messages: Vec<Message>, max_bytes: usize) -> (Vec<Message>, Option<Turn>) {
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

/// The total of a page's replies: `{input_tokens, output_tokens, cache_read_tokens,
/// cache_write_tokens, cost_usd}`; `cost_usd` is absent unless every reply on the page has a cost
/// (a sum with a reply left out would understate it).
fn page_usage(messages: &[Message]) -> Value {
    let replies = messages.iter().filter(|m| m.id.role == Role::Assistant);
    let mut usage = Usage::default();
    let mut cost = Some(0.0);
    for reply in replies {
        usage += reply.usage.unwrap_or_default();
        cost = cost.zip(reply.cost_usd).map(|(sum, c)| sum + c);
    }
    let mut total = json!(usage);
    if let Some(cost) = cost {
        total["cost_usd"] = json!(cost);
    }
    total
}

impl App {
    /// A session and a page of its history: the newest `limit` turns (20 by default, at most
    /// 100) before `cursor`, oldest first, cut to whole turns within [`MAX_PAGE_BYTES`], with the
    /// cursor of the next (older) page.
    pub(crate) async fn get_session(
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
        let session = self.owned_session(id, caller).await?;
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
        // A turn a regenerate or an edit redid is an earlier version: both its messages say so.
        let superseded_by = |turn: Turn| {
            messages
                .iter()
                .find(|m| m.id.turn == turn && m.id.role == Role::User)
                .and_then(|m| m.superseded_by)
        };
        let messages_json: Vec<Value> =
            messages.iter().map(|m| message_json(m, superseded_by(m.id.turn))).collect();
        let page_usage = page_usage(&messages);
        let mut body = session_overview(&session);
        body["messages"] = Value::Array(messages_json);
        body["summary"] = summary_json(&session);
        Ok(json(
            StatusCode::OK,
            json!({ "session": body, "next_cursor": next_cursor, "page_usage": page_usage }),
        ))
    }
}

/// A message as the history shows it; `superseded_by` is its turn's (a redone turn's messages
/// both say so).
pub(crate) fn message_json(m: &Message, superseded_by: Option<Turn>) -> Value {
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
    // What writing this reply consumed and cost, as its message_end said.
    if let Some(usage) = m.usage {
        value["usage"] = json!(usage);
    }
    if let Some(cost) = m.cost_usd {
        value["cost_usd"] = json!(cost);
    }
    if let Some(earlier) = m.revises {
        value["revises"] = json!(earlier);
    }
    if let Some(later) = superseded_by {
        value["superseded_by"] = json!(later);
    }
    value
}

/// The compact memory written after the session went idle; null until then.
pub(crate) fn summary_json(session: &Session) -> Value {
    match &session.summary {
        Some(summary) => json!({
            "text": summary.text,
            "through_turn": summary.through,
            "created_at": rfc3339_ms(summary.at),
        }),
        None => Value::Null,
    }
}

impl App {
    /// Session `id` as it is now, when the caller may see it; else 404 (another user's session
    /// is not found, as an unknown one).
    pub(crate) async fn owned_session(&self, id: SessionId, caller: &Caller) -> Result<Session, ApiError> {
        let session = self
            .store
            .get_session(id, Read::Consistent)
            .await
            .map_err(|e| ApiError::store_unavailable(&e))?;
        session.filter(|s| caller.owns(&s.user_id)).ok_or_else(ApiError::session_not_found)
    }

    pub(crate) async fn list_sessions(
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

    pub(crate) async fn delete_session(&self, id: &str, caller: &Caller) -> Result<Response<Body>, ApiError> {
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

/// A session's identity and position, as both the session and the list answers carry it.
pub(crate) fn session_overview(session: &Session) -> Value {
    let mut value = json!({
        "id": session.id,
        "user_id": session.user_id,
        "title": session.title,
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
    if let Some((source, turn)) = session.forked_from {
        value["forked_from"] = json!({"session_id": source, "turn": turn});
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::{MessageId, Role, SessionId};

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
                usage: None,
                cost_usd: None,
                revises: None,
                superseded_by: None,
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

    #[test]
    fn a_pages_usage_sums_its_replies_and_has_a_cost_only_when_every_reply_has_one() {
        let session = SessionId::new();
        let mut messages: Vec<Message> = (1..=2).flat_map(|t| turn_messages(session, t, (1, 1))).collect();
        let usage = Usage { input: 10, output: 20, cache_read: 30, cache_write: 4 };
        for reply in messages.iter_mut().filter(|m| m.id.role == Role::Assistant) {
            (reply.usage, reply.cost_usd) = (Some(usage), Some(0.25));
        }
        let total = json!({"input_tokens": 20, "output_tokens": 40, "cache_read_tokens": 60,
            "cache_write_tokens": 8, "cost_usd": 0.5});
        assert_eq!(page_usage(&messages), total);
        messages[3].cost_usd = None;
        let unpriced = page_usage(&messages);
        assert_eq!(unpriced.get("cost_usd"), None, "a partial sum would understate the cost");
        assert_eq!(unpriced["output_tokens"], 40);
    }
}
