//! A session's name and its whole text: `PATCH /sessions/{id}` renames it, and
//! `GET /sessions/{id}/export?format=json|markdown` returns every turn it keeps, read a hundred
//! turns at a time, as a download.

use crate::api::{self, json, parse_session, ApiError};
use crate::history::{message_json, session_overview, summary_json};
use crate::App;
use chat_auth::Caller;
use chat_core::time::rfc3339_ms;
use chat_core::{Message, Outcome, Role, Session, StoreError, TitleBy, Turn};
use lambda_http::http::{header, StatusCode};
use lambda_http::{Body, Request, RequestExt, Response};
use serde_json::{json, Value};

/// Turns read by one query of an export.
const TURNS_PER_READ: u64 = 100;

/// The most text an export carries: its answer must stay under Lambda's 6 MB response limit.
pub const MAX_EXPORT_BYTES: usize = 5 * 1024 * 1024;

impl App {
    /// `PATCH /sessions/{id}` `{"title"}`: the user's name for the session, which a generated
    /// title never replaces.
    pub(crate) async fn rename(
        &self,
        request: &Request,
        id: &str,
        caller: &Caller,
    ) -> Result<Response<Body>, ApiError> {
        let id = parse_session(id)?;
        api::require_json(request.headers())?;
        let title = api::title_field(request.body())?;
        let owner = self.owned_session(id, caller).await?.user_id;
        let renamed = self
            .store
            .set_title(id, Some(&owner), &title, TitleBy::User)
            .await
            .map_err(|e| ApiError::store_unavailable(&e))?;
        match renamed {
            Outcome::Applied(()) => Ok(json(StatusCode::OK, json!({"session_id": id, "title": title}))),
            // Deleted between the read and the write.
            Outcome::Conflict(_) => Err(ApiError::session_not_found()),
        }
    }

    /// `GET /sessions/{id}/export?format=json|markdown`: every turn the session keeps, oldest
    /// first, with the same fields as its pages (JSON) or as a document (Markdown).
    pub(crate) async fn export(
        &self,
        request: &Request,
        id: &str,
        caller: &Caller,
    ) -> Result<Response<Body>, ApiError> {
        let id = parse_session(id)?;
        let query = request.query_string_parameters_ref();
        let markdown = match query.and_then(|q| q.first("format")) {
            None | Some("json") => false,
            Some("markdown" | "md") => true,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_format",
                    format!("format {other:?} is not one of json, markdown"),
                ))
            }
        };
        let unavailable = |e: StoreError| ApiError::store_unavailable(&e);
        let session = self.owned_session(id, caller).await?;
        let mut messages: Vec<Message> = Vec::new();
        let mut bytes = 0;
        let last = u64::from(session.turn.get());
        let mut first = 1;
        while first <= last {
            let through = (first + TURNS_PER_READ - 1).min(last);
            let (from, to) = (Turn::new(first).expect("from 1"), Turn::new(through).expect("from 1"));
            let page = self.store.messages_between(id, from, to).await.map_err(unavailable)?;
            let tools =
                |m: &Message| m.tool_uses.iter().map(|t| t.arguments.len() + t.result.len()).sum::<usize>();
            bytes += page.iter().map(|m| m.content.len() + tools(m)).sum::<usize>();
            if bytes > MAX_EXPORT_BYTES {
                return Err(too_large(id));
            }
            messages.extend(page);
            first = through + 1;
        }
        let now = self.store.now_ms();
        let (content_type, extension, body) = if markdown {
            ("text/markdown; charset=utf-8", "md", as_markdown(&session, &messages, now))
        } else {
            ("application/json", "json", as_json(&session, &messages, now).to_string())
        };
        // Tool calls, escaping and framing add to the text: the answer itself must fit.
        if body.len() > MAX_EXPORT_BYTES {
            return Err(too_large(id));
        }
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_DISPOSITION, format!("attachment; filename=\"chat-{id}.{extension}\""))
            .body(Body::Text(body))
            .expect("status and headers are valid"))
    }
}

fn too_large(id: chat_core::SessionId) -> ApiError {
    ApiError::ExportTooLarge {
        message: format!(
            "the session's export is over {} MiB, more than one answer carries; read it a page at a time with GET /sessions/{id}",
            MAX_EXPORT_BYTES >> 20
        ),
    }
}

/// `text` as inline code that nothing in it can end: a fence of one more backtick than its
/// longest run, on one line.
fn inline_code(text: &str) -> String {
    let flat = text.replace(['\r', '\n'], " ");
    let longest = flat.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest + 1);
    format!("{fence} {flat} {fence}")
}

/// The turn of `messages` that redid each earlier turn, by the marks on their user messages.
fn superseded(messages: &[Message]) -> impl Fn(Turn) -> Option<Turn> + '_ {
    move |turn| {
        messages.iter().find(|m| m.id.turn == turn && m.id.role == Role::User).and_then(|m| m.superseded_by)
    }
}

fn as_json(session: &Session, messages: &[Message], now: u64) -> Value {
    let later = superseded(messages);
    let mut body = session_overview(session);
    body["summary"] = summary_json(session);
    body["messages"] = messages.iter().map(|m| message_json(m, later(m.id.turn))).collect();
    json!({"session": body, "exported_at": rfc3339_ms(now)})
}

fn as_markdown(session: &Session, messages: &[Message], now: u64) -> String {
    let later = superseded(messages);
    let title = session.title.as_deref().unwrap_or("Chat");
    let mut out = format!("# {title}\n\nSession `{}`, exported {}", session.id, rfc3339_ms(now));
    if let Some((source, turn)) = session.forked_from {
        out.push_str(&format!(", forked from `{source}` at turn {turn}"));
    }
    out.push_str(".\n");
    for m in messages {
        let who = match m.id.role {
            Role::User => "You",
            Role::Assistant => "Assistant",
        };
        out.push_str(&format!("\n## {who} · turn {}", m.id.turn));
        if let Some(by) = later(m.id.turn) {
            out.push_str(&format!(" (earlier version, redone in turn {by})"));
        }
        out.push_str("\n\n");
        for tool in &m.tool_uses {
            let outcome = if tool.is_error { "failed:" } else { "→" };
            let (name, arguments) = (inline_code(&tool.name), inline_code(&tool.arguments));
            out.push_str(&format!("> {name} {arguments} {outcome} {}\n", inline_code(&tool.result)));
        }
        if !m.tool_uses.is_empty() {
            out.push('\n');
        }
        out.push_str(m.content.trim_end());
        out.push('\n');
        if let Some(reason) = m.stopped {
            out.push_str(&format!("\n_Stopped ({})._\n", reason.as_str()));
        }
    }
    out
}
