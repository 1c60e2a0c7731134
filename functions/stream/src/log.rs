//! A turn's text as a durable stream: `GET /sessions/{id}/turns/{turn}/log` serves the read side
//! of the Durable Streams protocol (ElectricSQL, PROTOCOL.md draft 1.0), so a client that cannot
//! hold an SSE connection (a proxy that buffers `text/event-stream`) long-polls, and any client
//! of that protocol reads a reply as it is written.
//!
//! The stream's bytes are the reply's text (`text/plain; charset=utf-8`): the turn's tokens in
//! order, tool entries taking an offset and no bytes, so the text a reader assembles is the
//! committed reply. An offset is the index of the next token, 16 digits, so offsets sort as
//! strings. The stream is closed once the turn has ended (committed, failed or timed out: `GET
//! /sessions/{id}` says how). Reads are catch-up (`offset`), `live=long-poll` (answers `204` after
//! `STREAM_LONG_POLL_MS` with nothing new) and `live=sse` (`data` and `control` events, closed after
//! [`SSE_WINDOW`]). Writes are ours alone: any other method is `405`.

use crate::{sse, unavailable, Relay, SseBody, StreamError};
use bytes::Bytes;
use chat_core::{Read, ReplyEvent, Role, Session, SessionId, Turn};
use futures::stream::{self, StreamExt};
use http_body_util::StreamBody;
use lambda_http::http::{header, Method, StatusCode};
use lambda_http::{Request, RequestExt, Response};
use serde_json::json;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

/// How long a long-poll waits for new text before `204`, by default (`STREAM_LONG_POLL_MS`).
pub const LONG_POLL_WAIT: Duration = Duration::from_secs(20);

/// How long an SSE read lasts before the server closes it (the client reconnects from its last
/// offset), as the protocol recommends for collapsing.
pub const SSE_WINDOW: Duration = Duration::from_secs(60);

/// How long a long-poll waits for text before it holds a stream slot.
const FREE_WAIT: Duration = Duration::from_secs(1);

/// The most text one catch-up or long-poll answer carries; the rest follows at its next offset.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// The protocol's cursor intervals: 20 s from 2024-10-09T00:00:00Z.
const CURSOR_EPOCH_MS: u64 = 1_728_432_000_000;
const CURSOR_INTERVAL_MS: u64 = 20_000;

const CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// How a read asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Live {
    CatchUp,
    LongPoll,
    Sse,
}

/// The turn's text as read so far: each offset's text (empty for a tool entry), the last chunk
/// read, and whether the turn has ended (then the list is final: read consistently).
#[derive(Default)]
struct Snapshot {
    entries: Vec<String>,
    last_seq: Option<u32>,
    closed: bool,
}

impl Snapshot {
    fn tail(&self) -> u64 {
        self.entries.len() as u64
    }

    /// The text from `from`, at most [`MAX_BODY_BYTES`] (at least one entry), and the offset
    /// after it.
    fn text_from(&self, from: u64) -> (String, u64) {
        let mut text = String::new();
        let mut next = from;
        for entry in self.entries.iter().skip(from as usize) {
            if !text.is_empty() && text.len() + entry.len() > MAX_BODY_BYTES {
                break;
            }
            text.push_str(entry);
            next += 1;
        }
        (text, next)
    }
}

/// An offset as the protocol writes it.
pub fn offset(index: u64) -> String {
    format!("{index:016}")
}

/// The protocol's cursor for now, strictly past the client's when it sent one at or beyond it.
fn cursor(now_ms: u64, client: Option<u64>) -> String {
    let interval = now_ms.saturating_sub(CURSOR_EPOCH_MS) / CURSOR_INTERVAL_MS;
    let jitter = 1 + (now_ms % 180);
    match client {
        Some(theirs) if theirs >= interval => theirs.saturating_add(jitter).to_string(),
        _ => interval.to_string(),
    }
}

impl Relay {
    /// Answers a read of a turn's text log.
    pub(crate) async fn serve_log(
        &self,
        request: &Request,
        raw_session: &str,
        raw_turn: &str,
    ) -> Response<SseBody> {
        match self.log(request, raw_session, raw_turn).await {
            Ok(response) => response,
            Err(err) => crate::refused(err),
        }
    }

    async fn log(
        &self,
        request: &Request,
        raw_session: &str,
        raw_turn: &str,
    ) -> Result<Response<SseBody>, StreamError> {
        let head = match *request.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Err(StreamError::LogIsReadOnly),
        };
        let (caller, until, _) = self.identify(request).await?;
        let not_found = || StreamError::SessionNotFound(raw_session.to_owned());
        let id = SessionId::parse(raw_session).map_err(|_| not_found())?;
        let turn = Turn::parse(raw_turn).map_err(|e| StreamError::InvalidTurn(e.to_string()))?;
        let session = self
            .store
            .get_session(id, Read::Consistent)
            .await
            .map_err(unavailable)?
            .filter(|s| caller.owns(&s.user_id))
            .ok_or_else(not_found)?;
        if turn > session.turn {
            return Err(StreamError::TurnNotFound(turn));
        }
        let query = request.query_string_parameters_ref();
        let param = |name: &str| query.and_then(|q| q.first(name)).map(str::to_owned);
        let live = match param("live").as_deref() {
            None => Live::CatchUp,
            Some("long-poll") => Live::LongPoll,
            Some("sse") => Live::Sse,
            Some(other) => return Err(StreamError::InvalidLive(other.to_owned())),
        };
        let client_cursor = param("cursor").and_then(|c| c.parse::<u64>().ok());
        let mut snapshot = Snapshot::default();
        self.advance(id, turn, &mut snapshot, Some(&session)).await.map_err(unavailable)?;
        let offset_param = param("offset");
        let asked = match offset_param.as_deref() {
            None | Some("-1") => Some(0),
            Some("now") => Some(snapshot.tail()),
            Some(raw) if raw.len() == 16 => raw.parse::<u64>().ok(),
            Some(_) => None,
        };
        // An offset this log gave may lie past an eventually consistent read: read it whole.
        if asked.is_some_and(|n| n > snapshot.tail()) && !snapshot.closed {
            snapshot = Snapshot::default();
            self.advance_with(id, turn, &mut snapshot, Some(&session), Read::Consistent)
                .await
                .map_err(unavailable)?;
        }
        let from = match asked {
            Some(n) if n <= snapshot.tail() => n,
            _ => return Err(StreamError::InvalidOffset(offset_param.unwrap_or_default())),
        };
        if snapshot.closed && !self.whole(id, turn, &snapshot).await.map_err(unavailable)? {
            return Err(StreamError::LogGone);
        }
        if head {
            let mut response = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, CONTENT_TYPE)
                .header("stream-next-offset", offset(snapshot.tail()))
                .header(header::CACHE_CONTROL, "no-store");
            if snapshot.closed {
                response = response.header("stream-closed", "true");
            }
            return Ok(response.body(empty()).expect("valid response"));
        }
        match live {
            Live::CatchUp => Ok(self.chunk_answer(request, id, turn, &snapshot, from, None)),
            Live::LongPoll => {
                self.long_poll(request, (id, turn), &session.user_id, snapshot, (from, client_cursor)).await
            }
            Live::Sse => self.log_sse(&session, turn, snapshot, (from, client_cursor), until).await,
        }
    }

    /// Reads the turn's chunks after what `snapshot` has, with the session (`Some`: as read, or
    /// `None`: not read this time, so the turn is taken as still going): once the turn has ended
    /// the read is consistent, so the closed list is whole.
    async fn advance(
        &self,
        id: SessionId,
        turn: Turn,
        snapshot: &mut Snapshot,
        session: Option<&Session>,
    ) -> Result<(), chat_core::StoreError> {
        let closed = session.is_some_and(|s| s.turn > turn || s.state.turn_ended());
        let read = if closed { Read::Consistent } else { Read::Eventual };
        self.advance_with(id, turn, snapshot, session, read).await
    }

    async fn advance_with(
        &self,
        id: SessionId,
        turn: Turn,
        snapshot: &mut Snapshot,
        session: Option<&Session>,
        read: Read,
    ) -> Result<(), chat_core::StoreError> {
        let closed = session.is_some_and(|s| s.turn > turn || s.state.turn_ended());
        let chunks = self.store.read_chunks(id, turn, snapshot.last_seq, read).await?;
        // An eventually consistent read may miss the newest chunk: stop at any gap. A token
        // before the next offset was had already (a takeover's chunks overlap), as in the relay.
        for chunk in chunks {
            if chunk.seq != snapshot.last_seq.map_or(0, |s| s + 1) {
                break;
            }
            snapshot.last_seq = Some(chunk.seq);
            for (i, token) in chunk.tokens.iter().enumerate() {
                if chunk.start + i as u64 == snapshot.tail() {
                    let text =
                        if ReplyEvent::decode(token).is_some() { String::new() } else { token.clone() };
                    snapshot.entries.push(text);
                }
            }
        }
        snapshot.closed = closed;
        Ok(())
    }

    /// Whether a closed log holds the whole reply: a fork's copied turns and turns older than
    /// their chunks' 7 days have a reply but not all of its tokens.
    async fn whole(
        &self,
        id: SessionId,
        turn: Turn,
        snapshot: &Snapshot,
    ) -> Result<bool, chat_core::StoreError> {
        let reply = self.store.get_message(id, turn, Role::Assistant, Read::Consistent).await?;
        Ok(reply.is_none_or(|reply| snapshot.entries.concat() == reply.content))
    }

    /// Waits for the log to move: polls its chunks, from every `poll_fast` doubling to
    /// `poll_slow` while nothing comes, and the session (has the turn ended?) at most every
    /// [`crate::SESSION_CHECK_EVERY`]. Returns once there is text past `from`, the turn has
    /// ended, or `deadline` passed; `false` when the session is gone.
    async fn wait_for_text(
        &self,
        id: SessionId,
        turn: Turn,
        snapshot: &mut Snapshot,
        from: u64,
        deadline: Instant,
    ) -> Result<bool, chat_core::StoreError> {
        let (fast, slow) = (self.settings.poll_fast.max(Duration::from_millis(20)), self.settings.poll_slow);
        let mut wait = fast;
        let mut session_read = Instant::now();
        while from >= snapshot.tail() && !snapshot.closed && Instant::now() < deadline {
            tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
            let session = if session_read.elapsed() >= crate::SESSION_CHECK_EVERY {
                session_read = Instant::now();
                match self.store.get_session(id, Read::Eventual).await? {
                    Some(session) => Some(session),
                    None => return Ok(false),
                }
            } else {
                None
            };
            self.advance(id, turn, snapshot, session.as_ref()).await?;
            wait = if from < snapshot.tail() { fast } else { (wait * 2).min(slow.max(fast)) };
        }
        Ok(true)
    }

    /// A catch-up answer (also a long-poll's with data): the text from `from`, its next offset,
    /// whether it is up to date or closed, and its ETag (`304` when the client has it).
    fn chunk_answer(
        &self,
        request: &Request,
        id: SessionId,
        turn: Turn,
        snapshot: &Snapshot,
        from: u64,
        cursor: Option<String>,
    ) -> Response<SseBody> {
        let (text, next) = snapshot.text_from(from);
        let up_to_date = next == snapshot.tail();
        let closed = up_to_date && snapshot.closed;
        let etag = format!("\"{id}:{turn}:{from}:{next}{}\"", if closed { ":c" } else { "" });
        let mut response = Response::builder()
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .header(header::ETAG, &etag)
            .header("stream-next-offset", offset(next))
            // Text at an offset never changes; the tail of an open stream does.
            .header(header::CACHE_CONTROL, if next > from { "private, max-age=60" } else { "no-store" })
            // A browser's cache is keyed by the URL: a cached answer is one caller's.
            .header(header::VARY, "authorization");
        if up_to_date {
            response = response.header("stream-up-to-date", "true");
        }
        if closed {
            response = response.header("stream-closed", "true");
        }
        if let Some(cursor) = cursor {
            response = response.header("stream-cursor", cursor);
        }
        let matches =
            request.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(&etag);
        if matches {
            return response.status(StatusCode::NOT_MODIFIED).body(empty()).expect("valid response");
        }
        response.status(StatusCode::OK).body(full(text)).expect("valid response")
    }

    /// `live=long-poll`: new text as soon as there is some, else `204` at the timeout, at once when
    /// the stream is closed and the client has all of it.
    async fn long_poll(
        &self,
        request: &Request,
        (id, turn): (SessionId, Turn),
        owner: &chat_core::UserId,
        mut snapshot: Snapshot,
        (from, client_cursor): (u64, Option<u64>),
    ) -> Result<Response<SseBody>, StreamError> {
        let deadline = Instant::now() + self.long_poll_wait;
        // The short waits between a live reply's chunks hold no slot; a wait past
        // [`FREE_WAIT`] holds one of the user's stream slots, so idle long-polls are bounded like
        // streams (`MAX_OPEN_STREAMS`).
        let free_until = (Instant::now() + FREE_WAIT).min(deadline);
        let mut found =
            self.wait_for_text(id, turn, &mut snapshot, from, free_until).await.map_err(unavailable)?;
        if found && from >= snapshot.tail() && !snapshot.closed && Instant::now() < deadline {
            let stream_id = uuid::Uuid::new_v4().simple().to_string();
            let (max, hold) = (self.settings.max_open_streams, self.long_poll_wait + Duration::from_secs(5));
            if let chat_core::Admission::Limited { retry_after } =
                self.store.open_stream(owner, &stream_id, max, hold).await.map_err(unavailable)?
            {
                return Err(StreamError::TooManyStreams { max, retry_after });
            }
            let waited = self.wait_for_text(id, turn, &mut snapshot, from, deadline).await;
            if let Err(err) = self.store.close_stream(owner, &stream_id).await {
                warn!(error = %err, "could not give back the stream slot; it lapses on its own");
            }
            found = waited.map_err(unavailable)?;
        }
        if !found {
            return Err(StreamError::SessionNotFound(id.to_string()));
        }
        if snapshot.closed && !self.whole(id, turn, &snapshot).await.map_err(unavailable)? {
            return Err(StreamError::LogGone);
        }
        let cursor = cursor(self.store.now_ms(), client_cursor);
        if from < snapshot.tail() {
            return Ok(self.chunk_answer(request, id, turn, &snapshot, from, Some(cursor)));
        }
        let mut response = Response::builder()
            .status(StatusCode::NO_CONTENT)
            .header("stream-next-offset", offset(snapshot.tail()))
            .header("stream-up-to-date", "true")
            .header(header::CACHE_CONTROL, "no-store");
        response = if snapshot.closed {
            response.header("stream-closed", "true")
        } else {
            response.header("stream-cursor", cursor)
        };
        Ok(response.body(empty()).expect("valid response"))
    }

    /// `live=sse`: `data` events with the text as it is written, each followed by a `control`
    /// event with the next offset; the last says `streamClosed`. Holds a slot among the user's
    /// open streams while it lasts.
    async fn log_sse(
        &self,
        session: &Session,
        turn: Turn,
        snapshot: Snapshot,
        (from, client_cursor): (u64, Option<u64>),
        until: Option<u64>,
    ) -> Result<Response<SseBody>, StreamError> {
        let stream_id = uuid::Uuid::new_v4().simple().to_string();
        let max = self.settings.max_open_streams;
        let hold = SSE_WINDOW + Duration::from_secs(60);
        match self.store.open_stream(&session.user_id, &stream_id, max, hold).await.map_err(unavailable)? {
            chat_core::Admission::Admitted => {}
            chat_core::Admission::Limited { retry_after } => {
                return Err(StreamError::TooManyStreams { max, retry_after })
            }
        }
        let (tx, rx) = mpsc::channel::<String>(64);
        let relay = self.clone();
        let (id, owner) = (session.id, session.user_id.clone());
        tokio::spawn(async move {
            if let Err(err) = relay.follow_log((id, turn), snapshot, (from, client_cursor), until, &tx).await
            {
                warn!(error = %err, "log stream ended by a DynamoDB fault");
            }
            if let Err(err) = relay.store.close_stream(&owner, &stream_id).await {
                warn!(error = %err, "could not give back the stream slot; it lapses on its own");
            }
        });
        Ok(crate::sse_response(rx))
    }

    async fn follow_log(
        &self,
        (id, turn): (SessionId, Turn),
        mut snapshot: Snapshot,
        (mut from, client_cursor): (u64, Option<u64>),
        until: Option<u64>,
        tx: &mpsc::Sender<String>,
    ) -> Result<(), chat_core::StoreError> {
        let started = Instant::now();
        let mut announced = false;
        loop {
            if tx.is_closed() {
                return Ok(());
            }
            let tail = snapshot.tail();
            // A turn that ends with nothing more to send is told too (the reader is waiting).
            if from < tail || !announced || snapshot.closed {
                let mut frame = String::new();
                if from < tail {
                    let (text, next) = snapshot.text_from(from);
                    frame.push_str(&sse::event("data", None, &text));
                    from = next;
                }
                let up_to_date = from == snapshot.tail();
                let mut control = json!({"streamNextOffset": offset(from)});
                if up_to_date && snapshot.closed {
                    control["streamClosed"] = json!(true);
                    control["upToDate"] = json!(true);
                } else {
                    control["streamCursor"] = json!(cursor(self.store.now_ms(), client_cursor));
                    if up_to_date {
                        control["upToDate"] = json!(true);
                    }
                }
                frame.push_str(&sse::event("control", None, &control.to_string()));
                if tx.send(frame).await.is_err() {
                    return Ok(());
                }
                announced = true;
                if up_to_date && snapshot.closed {
                    return Ok(());
                }
                if from < snapshot.tail() {
                    continue;
                }
            }
            if started.elapsed() >= SSE_WINDOW || until.is_some_and(|until| self.store.now_ms() >= until) {
                // The client reconnects from the last control event's offset (signed in again
                // if its token is what ran out).
                return Ok(());
            }
            let deadline = (Instant::now() + self.settings.keepalive).min(started + SSE_WINDOW);
            if !self.wait_for_text(id, turn, &mut snapshot, from, deadline).await? {
                return Ok(());
            }
            if snapshot.closed && !self.whole(id, turn, &snapshot).await? {
                let data = json!({"code": "log_gone", "message": "this turn's tokens are no longer kept"});
                let _ = tx.send(sse::event("error", None, &data.to_string())).await;
                return Ok(());
            }
            if from >= snapshot.tail()
                && !snapshot.closed
                && tx.send(sse::comment("keepalive")).await.is_err()
            {
                return Ok(());
            }
        }
    }
}

fn empty() -> SseBody {
    StreamBody::new(stream::empty().boxed())
}

fn full(text: String) -> SseBody {
    let frame = Ok(http_body::Frame::data(Bytes::from(text)));
    StreamBody::new(stream::once(async move { frame }).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_sort_as_strings_and_cursors_only_move_forward() {
        let mut offsets: Vec<String> = [0, 9, 10, 123, 99_999].into_iter().map(offset).collect();
        let sorted = offsets.clone();
        offsets.sort();
        assert_eq!(offsets, sorted);
        let now = CURSOR_EPOCH_MS + 1000 * CURSOR_INTERVAL_MS + 5;
        assert_eq!(cursor(now, None), "1000");
        assert_eq!(cursor(now, Some(999)), "1000");
        let next: u64 = cursor(now, Some(1000)).parse().unwrap();
        assert!(next > 1000 && next <= 1180, "{next}");
    }
}
