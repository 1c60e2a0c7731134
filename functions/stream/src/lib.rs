//! The stream function: relays one turn's tokens to a client as Server-Sent Events, and a user's
//! feed of what happens to their sessions ([`feed`]: `GET /users/{user}/events`).
//!
//! It replays the turn from the start (or after `Last-Event-ID`), then follows it live by polling
//! DynamoDB — fast while the turn is generating, slower while it waits — until the turn ends
//! (`message_end` + `commit_done`, or `error`). It closes on its own before the Lambda limit with
//! a `retry:` hint, and stops reading as soon as the client is gone.

mod feed;
pub mod log;
pub mod sse;

use bytes::Bytes;
use chat_auth::{AuthConfig, AuthError, Authenticator};
use chat_core::config::{ConfigError, Env};
use chat_core::{
    Admission, Chunk, Message, Read, ReplyEvent, Role, Session, SessionId, State, Store, StoreError, Turn,
    UserId,
};
use chat_runtime::http_error::ErrorAnswer;
use chat_runtime::metrics;
use futures::stream::{self, BoxStream, StreamExt};
use http_body_util::StreamBody;
use lambda_http::http::{header, StatusCode};
use lambda_http::{Request, RequestExt, Response};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

/// The response body: frames from the relay task.
pub type SseBody = StreamBody<BoxStream<'static, Result<http_body::Frame<Bytes>, Infallible>>>;

/// How often, at most, a relay that finds no new tokens re-reads the session to see whether the
/// turn has ended: ending detection may lag by this much, reads per client drop accordingly.
pub(crate) const SESSION_CHECK_EVERY: Duration = Duration::from_millis(250);

/// A relay whose turn waits for a generator polls every `waited / WAITING_BACKOFF`, between the
/// fast and the slow interval: the first token is late by at most an eighth of the wait, and a
/// crowd of turns queued behind busy generators does not spend the machine polling for them.
const WAITING_BACKOFF: u32 = 8;

/// What a relay knows after a poll, for when to poll next.
#[derive(Debug, Clone, Copy)]
struct PollState {
    /// A chunk of the turn has been read.
    tokens_seen: bool,
    /// The turn is being generated (not waiting for a generator).
    generating: bool,
    /// Polls in a row that found nothing new.
    empty_polls: u32,
    /// When the last chunk read said the next one is due (epoch ms).
    next_due: Option<u64>,
    /// How long after that to read it.
    margin: Duration,
}

/// How long after the time its writer said the next chunk was due (`Chunk::next_at`) a relay
/// reads it: the put itself takes a few milliseconds, more in some places and moments. It starts
/// at 5 ms and learns: a read at the due time that finds the chunk not there yet, when one of the
/// next few reads finds it, adds 2 ms (up to 25 ms), and eight in a row that find it take 1 ms off (down
/// to 2 ms). Too early costs a read (a tenth of a write); too late, lag every reader feels.
#[derive(Debug, Clone, Copy)]
struct DueMargin {
    margin: Duration,
    found_in_a_row: u32,
    /// Reads since one at a due time found nothing (0: none pending).
    reads_after_due: u32,
}

impl Default for DueMargin {
    fn default() -> Self {
        DueMargin { margin: Duration::from_millis(5), found_in_a_row: 0, reads_after_due: 0 }
    }
}

impl DueMargin {
    const MIN: Duration = Duration::from_millis(2);
    const MAX: Duration = Duration::from_millis(25);

    /// A read happened: at a chunk's due time (plus the margin) or not, and it found the chunk
    /// or not. Found at the due time: the margin may shrink. Found within a few reads after a
    /// due time that found nothing: the put was late, the margin grows. Found later: the model's
    /// pace changed, which says nothing about puts.
    fn observe(&mut self, at_due: bool, found: bool) {
        if at_due {
            if found {
                self.found();
            } else {
                self.reads_after_due = 1;
            }
        } else if self.reads_after_due > 0 {
            if found {
                self.missed();
                self.reads_after_due = 0;
            } else if self.reads_after_due == LATE_PUT_READS {
                self.reads_after_due = 0;
            } else {
                self.reads_after_due += 1;
            }
        }
    }

    fn found(&mut self) {
        self.found_in_a_row += 1;
        if self.found_in_a_row == 8 {
            self.found_in_a_row = 0;
            self.margin = self.margin.saturating_sub(Duration::from_millis(1)).max(Self::MIN);
        }
    }

    fn missed(&mut self) {
        self.found_in_a_row = 0;
        self.margin = (self.margin + Duration::from_millis(2)).min(Self::MAX);
    }
}

/// A chunk not there yet when due is read for again this soon, then after twice as long, and so
/// on: a put that took a little longer is read a few milliseconds late, a model that slowed
/// down or paused costs a handful of reads (a read costs a tenth of a write).
const DUE_RETRY: Duration = Duration::from_millis(5);

/// A chunk found within this many reads after its due time was late by its put (the margin grows);
/// later, by the model's pace (it does not).
const LATE_PUT_READS: u32 = 3;

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Poll interval while the turn is generating (`STREAM_POLL_FAST_MS`).
    pub poll_fast: Duration,
    /// Poll interval while the turn waits for a generator (`STREAM_POLL_SLOW_MS`).
    pub poll_slow: Duration,
    /// Longest silence before a comment line (`STREAM_KEEPALIVE_MS`).
    pub keepalive: Duration,
    /// The stream closes itself after this long (`STREAM_MAX_DURATION_MS`), under the Lambda limit.
    pub max_duration: Duration,
    /// Reconnect delay suggested to clients (`STREAM_RETRY_MS`).
    pub retry: Duration,
    /// Streams one user may hold open at once (`MAX_OPEN_STREAMS`; 0: no limit).
    pub max_open_streams: u32,
}

impl Default for RelaySettings {
    /// What the function runs with when nothing is set.
    fn default() -> Self {
        RelaySettings {
            poll_fast: Duration::from_millis(50),
            poll_slow: Duration::from_millis(500),
            keepalive: Duration::from_secs(15),
            max_duration: Duration::from_secs(600),
            retry: Duration::from_secs(1),
            max_open_streams: chat_core::UserLimits::default().open_streams,
        }
    }
}

/// Why a stream was refused before its first byte; each is one status and error code.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    /// 404: no stream at this path.
    #[error("no stream at {0}")]
    RouteNotFound(String),
    /// 405: streams are read with GET.
    #[error("use GET")]
    MethodNotAllowed,
    /// 400, 401 or 503: who is calling could not be established.
    #[error(transparent)]
    Auth(AuthError),
    /// 404: no such session for this caller (another user's session is not found, too).
    #[error("no session {0:?}")]
    SessionNotFound(String),
    /// 404: the turn asked for has not started.
    #[error("the session has no turn {0} yet")]
    TurnNotFound(Turn),
    /// 400: `Last-Event-ID` (or `last_event_id`) is not one of ours.
    #[error("{0:?} is not an event id of the form turn:index (turn from 1, index at most {max})", max = sse::MAX_EVENT_INDEX)]
    InvalidLastEventId(String),
    /// 400: `turn` is not a turn number.
    #[error("{0}")]
    InvalidTurn(String),
    /// 429: the user has their most streams open.
    #[error("you have {max} streams open, the most allowed; close one and reconnect")]
    TooManyStreams { max: u32, retry_after: Duration },
    /// 429: the user has their most feeds open (feeds may not hold all of a user's streams).
    #[error("you have {max} feeds open (other tabs), the most allowed; close one and reconnect")]
    TooManyFeeds { max: u32, retry_after: Duration },
    /// 429: the turn has its most streams open (one turn may not hold all of a user's).
    #[error("this turn has {max} streams open, the most allowed; close one and reconnect")]
    TooManyStreamsOfTurn { max: u32, retry_after: Duration },
    /// 503: DynamoDB failed (logged where it happened).
    #[error("the session store is unavailable; try again")]
    StoreUnavailable,
    /// 400: the feed's path names no valid user.
    #[error("{0}")]
    InvalidUser(String),
    /// 403: the feed of another user than the caller.
    #[error("you are not signed in as {0:?}; use your own user id")]
    Forbidden(String),
    /// 400: a feed's `Last-Event-ID` is not one of its ids.
    #[error("{0:?} is not an id this feed sent")]
    InvalidFeedEventId(String),
    /// 405: a turn's log is written by the generator alone.
    #[error("a turn's log is read-only: use GET or HEAD")]
    LogIsReadOnly,
    /// 400: `live` is not a read mode of the log.
    #[error("live={0:?} is not long-poll or sse")]
    InvalidLive(String),
    /// 410: the turn's tokens are no longer all kept (a fork's copied turn, or chunks past their
    /// 7 days): the log cannot serve the reply, which `GET /sessions/{id}` has.
    #[error("this turn's tokens are no longer kept; read its reply with GET /sessions/{{id}}")]
    LogGone,
    /// 400: `offset` is not one the log gave, or lies past its end.
    #[error("offset {0:?} is not -1, now, or an offset this log gave")]
    InvalidOffset(String),
}

impl StreamError {
    /// The answer: status, code, this error's message, and the header the status calls for.
    fn answer(self) -> ErrorAnswer {
        let answer = |status, code| ErrorAnswer::new(status, code, self.to_string());
        match &self {
            StreamError::RouteNotFound(_) => answer(StatusCode::NOT_FOUND, "route_not_found"),
            StreamError::MethodNotAllowed => {
                answer(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").allow("GET")
            }
            StreamError::Auth(err) => err.answer(),
            StreamError::SessionNotFound(_) => answer(StatusCode::NOT_FOUND, "session_not_found"),
            StreamError::TurnNotFound(_) => answer(StatusCode::NOT_FOUND, "turn_not_found"),
            StreamError::InvalidLastEventId(_) => answer(StatusCode::BAD_REQUEST, "invalid_last_event_id"),
            StreamError::InvalidTurn(_) => answer(StatusCode::BAD_REQUEST, "invalid_turn"),
            StreamError::TooManyStreams { retry_after, .. }
            | StreamError::TooManyFeeds { retry_after, .. }
            | StreamError::TooManyStreamsOfTurn { retry_after, .. } => {
                answer(StatusCode::TOO_MANY_REQUESTS, "too_many_streams").retry_after(*retry_after)
            }
            StreamError::StoreUnavailable => answer(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            StreamError::InvalidUser(_) => answer(StatusCode::BAD_REQUEST, "invalid_user_id"),
            StreamError::Forbidden(_) => answer(StatusCode::FORBIDDEN, "forbidden"),
            StreamError::InvalidFeedEventId(_) => answer(StatusCode::BAD_REQUEST, "invalid_last_event_id"),
            StreamError::LogIsReadOnly => {
                answer(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").allow("GET, HEAD")
            }
            StreamError::InvalidLive(_) => answer(StatusCode::BAD_REQUEST, "invalid_live"),
            StreamError::InvalidOffset(_) => answer(StatusCode::BAD_REQUEST, "invalid_offset"),
            StreamError::LogGone => answer(StatusCode::GONE, "log_gone"),
        }
    }
}

/// The stream function's dependencies, built once per cold start.
#[derive(Clone)]
pub struct Relay {
    store: Store,
    auth: Authenticator,
    settings: Arc<RelaySettings>,
    /// Streams one turn may have open at once (`MAX_STREAMS_PER_TURN`; 0: no limit).
    streams_per_turn: u32,
    /// How often a user's feed is read (`FEED_POLL_MS`).
    feed_poll: Duration,
    /// How long a long-poll of a turn's log waits for text (`STREAM_LONG_POLL_MS`).
    long_poll_wait: Duration,
    /// Feeds one user may hold open at once (`MAX_OPEN_FEEDS`; 0: no limit besides the
    /// user's stream slots).
    open_feeds: u32,
}

/// Where a relay starts.
struct Position {
    session: SessionId,
    /// The session's owner, whose stream slot this relay holds.
    owner: UserId,
    /// This stream's id in the owner's slots.
    stream_id: String,
    turn: Turn,
    /// Index of the last token the client has; tokens after it are sent.
    after_index: Option<u64>,
    /// When the caller's token stops being accepted, epoch ms: the stream ends there.
    until: Option<u64>,
}

impl Relay {
    /// Reads the configuration and builds the clients.
    pub async fn from_env() -> Result<Relay, ConfigError> {
        let env = Env::process();
        let table = env.required("TABLE_NAME")?;
        let limits = chat_core::UserLimits::from_env(&env)?;
        let defaults = RelaySettings::default();
        let settings = RelaySettings {
            poll_fast: env.millis_or("STREAM_POLL_FAST_MS", defaults.poll_fast)?,
            poll_slow: env.millis_or("STREAM_POLL_SLOW_MS", defaults.poll_slow)?,
            keepalive: env.millis_or("STREAM_KEEPALIVE_MS", defaults.keepalive)?,
            max_duration: env.millis_or("STREAM_MAX_DURATION_MS", defaults.max_duration)?,
            retry: env.millis_or("STREAM_RETRY_MS", defaults.retry)?,
            max_open_streams: limits.open_streams,
        };
        let auth = Authenticator::new(AuthConfig::from_env(&env)?)?;
        let aws = chat_runtime::aws::load_config().await;
        let store = Store::new(chat_runtime::aws::dynamodb(&aws), table, Default::default());
        let feed_poll = env.millis_or("FEED_POLL_MS", DEFAULT_FEED_POLL)?;
        let long_poll_wait = env.millis_or("STREAM_LONG_POLL_MS", log::LONG_POLL_WAIT)?;
        Ok(Relay::new(store, settings, auth)
            .with_streams_per_turn(limits.streams_per_turn)
            .with_feed_poll(feed_poll)
            .with_long_poll_wait(long_poll_wait)
            .with_open_feeds(limits.open_feeds))
    }

    /// A relay over explicit parts, with the default streams per turn.
    pub fn new(store: Store, settings: RelaySettings, auth: Authenticator) -> Relay {
        let streams_per_turn = chat_core::UserLimits::default().streams_per_turn;
        Relay {
            store,
            auth,
            settings: Arc::new(settings),
            streams_per_turn,
            feed_poll: DEFAULT_FEED_POLL,
            long_poll_wait: log::LONG_POLL_WAIT,
            open_feeds: chat_core::UserLimits::default().open_feeds,
        }
    }

    /// The same relay letting one user hold at most `max` feeds open (0: no limit of its own).
    pub fn with_open_feeds(mut self, max: u32) -> Relay {
        self.open_feeds = max;
        self
    }

    /// The same relay answering a long-poll of a turn's log with `204` after `wait` without text.
    pub fn with_long_poll_wait(mut self, wait: Duration) -> Relay {
        self.long_poll_wait = wait;
        self
    }

    /// The same relay reading users' feeds every `every`.
    pub fn with_feed_poll(mut self, every: Duration) -> Relay {
        self.feed_poll = every;
        self
    }

    /// The same relay letting one turn have at most `max` streams open (0: no limit).
    pub fn with_streams_per_turn(mut self, max: u32) -> Relay {
        self.streams_per_turn = max;
        self
    }

    /// Answers `GET /sessions/{id}/stream` (a turn) or `GET /users/{user}/events` (a feed): an SSE
    /// stream, or a JSON error.
    pub async fn handle(&self, request: Request) -> Response<SseBody> {
        let path = request.uri().path().trim_end_matches('/').to_owned();
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        if let ["sessions", session, "turns", turn, "log"] = segments.as_slice() {
            return self.serve_log(&request, session, turn).await;
        }
        if let ["users", user, "events"] = segments.as_slice() {
            return match self.start_feed(&request, user).await {
                Ok(start) => {
                    let (tx, rx) = mpsc::channel::<String>(64);
                    let relay = self.clone();
                    let span = tracing::info_span!("feed");
                    tokio::spawn(async move { relay.relay_feed(start, tx).await }.instrument(span));
                    sse_response(rx)
                }
                Err(err) => refused(err),
            };
        }
        match self.start(&request).await {
            Ok((position, session)) => {
                let (tx, rx) = mpsc::channel::<String>(64);
                let relay = self.clone();
                let span = tracing::info_span!("stream", session = %position.session, turn = %position.turn);
                tokio::spawn(async move { relay.relay(position, session, tx).await }.instrument(span));
                sse_response(rx)
            }
            Err(err) => refused(err),
        }
    }

    /// Who is calling (the token may come as `?access_token=`, since EventSource cannot set
    /// headers), until when, and the `Last-Event-ID` (or `?last_event_id=`) they sent.
    async fn identify(
        &self,
        request: &Request,
    ) -> Result<(chat_auth::Caller, Option<u64>, Option<String>), StreamError> {
        let query = request.query_string_parameters_ref();
        let iam = chat_auth::iam_identity(request);
        let identified = self
            .auth
            .authenticate(request.headers(), query.and_then(|q| q.first("access_token")), iam.as_ref())
            .await
            .map_err(StreamError::Auth)?;
        let last_event_id = request
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| query.and_then(|q| q.first("last_event_id")).map(str::to_owned))
            .filter(|v| !v.trim().is_empty());
        Ok((identified.caller, identified.expires_at.map(|s| s.saturating_mul(1000)), last_event_id))
    }

    async fn start(&self, request: &Request) -> Result<(Position, Session), StreamError> {
        let path = request.uri().path().trim_end_matches('/');
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let raw_id = match segments.as_slice() {
            ["sessions", id, "stream"] => *id,
            _ => return Err(StreamError::RouteNotFound(path.to_owned())),
        };
        if request.method() != lambda_http::http::Method::GET {
            return Err(StreamError::MethodNotAllowed);
        }
        let (caller, until, last_event_id) = self.identify(request).await?;
        let query = request.query_string_parameters_ref();
        let not_found = || StreamError::SessionNotFound(raw_id.to_owned());
        let id = SessionId::parse(raw_id).map_err(|_| not_found())?;
        let resume = match &last_event_id {
            None => None,
            Some(raw) => {
                Some(sse::parse_id(raw).ok_or_else(|| StreamError::InvalidLastEventId(raw.clone()))?)
            }
        };
        let requested_turn = match query.and_then(|q| q.first("turn")) {
            None => None,
            Some(raw) => Some(Turn::parse(raw).map_err(|e| StreamError::InvalidTurn(e.to_string()))?),
        };
        let session = self
            .store
            .get_session(id, Read::Consistent)
            .await
            .map_err(unavailable)?
            .filter(|s| caller.owns(&s.user_id))
            .ok_or_else(not_found)?;
        let turn =
            requested_turn.or_else(|| resume.and_then(|(t, _)| Turn::new(t).ok())).unwrap_or(session.turn);
        if turn > session.turn {
            return Err(StreamError::TurnNotFound(turn));
        }
        let after_index = resume.filter(|(t, _)| *t == u64::from(turn.get())).map(|(_, i)| i);
        // The slot outlives the longest stream, in case this one dies without giving it back.
        let stream_id = uuid::Uuid::new_v4().simple().to_string();
        let hold = self.settings.max_duration + Duration::from_secs(60);
        // The turn's slot first, then the user's: a turn cannot take every stream of its user.
        let per_turn = self.streams_per_turn;
        match self.store.open_turn_stream(id, turn, &stream_id, per_turn, hold).await.map_err(unavailable)? {
            Admission::Admitted => {}
            Admission::Limited { retry_after } => {
                return Err(StreamError::TooManyStreamsOfTurn { max: per_turn, retry_after })
            }
        }
        let max = self.settings.max_open_streams;
        let user_slot = self.store.open_stream(&session.user_id, &stream_id, max, hold).await;
        if !matches!(user_slot, Ok(Admission::Admitted)) {
            if let Err(err) = self.store.close_turn_stream(id, turn, &stream_id).await {
                warn!(error = %err, "could not give back the turn's stream slot; it lapses on its own");
            }
        }
        if let Admission::Limited { retry_after } = user_slot.map_err(unavailable)? {
            return Err(StreamError::TooManyStreams { max, retry_after });
        }
        let owner = session.user_id.clone();
        Ok((Position { session: id, owner, stream_id, turn, after_index, until }, session))
    }

    async fn relay(&self, position: Position, first_read: Session, tx: mpsc::Sender<String>) {
        let mut lags = Vec::new();
        let followed = self.follow(&position, first_read, &tx, &mut lags).await;
        metrics::millis(metrics::name::RELAY_LAG, &lags, &[]);
        // Give the slots back before the last frames go out, so a client that reconnects at once
        // finds them free.
        if let Err(err) = self.store.close_stream(&position.owner, &position.stream_id).await {
            warn!(error = %err, "could not give back the stream slot; it lapses on its own");
        }
        if self.streams_per_turn > 0 {
            let (session, turn) = (position.session, position.turn);
            if let Err(err) = self.store.close_turn_stream(session, turn, &position.stream_id).await {
                warn!(error = %err, "could not give back the turn's stream slot; it lapses on its own");
            }
        }
        match followed {
            Ok(()) => {}
            Err(err) => {
                warn!(error = %err, "stream ended by a DynamoDB fault");
                let data = json!({
                    "code": "store_unavailable",
                    "message": "the session store is unavailable; reconnect to resume",
                    "state": null,
                    "turn": position.turn,
                });
                let _ = tx.send(sse::event("error", None, &data.to_string())).await;
                let _ = tx.send(sse::retry(self.settings.retry.as_millis() as u64)).await;
            }
        }
    }

    async fn follow(
        &self,
        position: &Position,
        first_read: Session,
        tx: &mpsc::Sender<String>,
        lags: &mut Vec<f64>,
    ) -> Result<(), StoreError> {
        let settings = &self.settings;
        let started = Instant::now();
        // Chunks written since this relay started are relayed live: their lag is measured.
        let live_from = self.store.now_ms();
        let mut last_sent = Instant::now();
        let mut last_seq: Option<u32> = None;
        let mut next_index = position.after_index.map_or(0, |i| i + 1);
        let mut generating = first_read.state == State::AiGenerating;
        let mut empty_polls = 0u32;
        let mut next_due = None;
        let mut margin = DueMargin::default();
        // This read is at a chunk's due time (plus the margin).
        let mut polled_at_due = false;
        let mut state = first_read.state;
        let mut session_read = Instant::now() - SESSION_CHECK_EVERY;
        let mut sent_tokens = 0usize;
        let send = |text: String| async move { tx.send(text).await.is_ok() };
        if !send(sse::retry(settings.retry.as_millis() as u64)).await {
            return Ok(());
        }
        loop {
            if tx.is_closed() {
                info!(sent_tokens, "client went away");
                return Ok(());
            }
            // A stream lasts no longer than the token it was opened with: the client signs in
            // again and reconnects (no `retry:` first, since reconnecting with it would fail).
            if position.until.is_some_and(|until| self.store.now_ms() >= until) {
                let data = json!({"code": "token_expired", "message": "your sign-in expired; sign in again and reconnect",
                    "state": state, "turn": position.turn});
                send(sse::event("error", None, &data.to_string())).await;
                info!(sent_tokens, "the caller's token expired; stream closed");
                return Ok(());
            }
            let chunks =
                self.store.read_chunks(position.session, position.turn, last_seq, Read::Eventual).await?;
            let mut progressed = false;
            // An eventually consistent read may miss the newest chunk; stop at any gap and re-poll.
            for chunk in chunks {
                if chunk.seq != last_seq.map_or(0, |s| s + 1) {
                    break;
                }
                last_seq = Some(chunk.seq);
                next_due = chunk.next_at;
                let Some(sent) = send_tokens(position.turn, &chunk, &mut next_index, tx).await else {
                    return Ok(());
                };
                if let Some(at) = chunk.at.filter(|at| sent > 0 && *at >= live_from) {
                    lags.push(self.store.now_ms().saturating_sub(at) as f64);
                }
                sent_tokens += sent;
                progressed |= sent > 0;
            }
            // The margin learns how long a put takes.
            margin.observe(std::mem::take(&mut polled_at_due), progressed);
            if progressed {
                last_sent = Instant::now();
                // Tokens are flowing: the turn is generating, whatever the last session read said.
                generating = true;
            } else if session_read.elapsed() >= SESSION_CHECK_EVERY {
                session_read = Instant::now();
                let session = match self.store.get_session(position.session, Read::Eventual).await? {
                    None => {
                        let data = json!({
                            "code": "session_deleted",
                            "message": "the session was deleted",
                            "state": null,
                            "turn": position.turn,
                        });
                        send(sse::event("error", None, &data.to_string())).await;
                        return Ok(());
                    }
                    Some(current) => current,
                };
                generating = session.state == State::AiGenerating;
                state = session.state;
                let turn_over = session.turn > position.turn || session.state.turn_ended();
                if turn_over {
                    return self.finish(position, &session, last_seq, next_index, tx).await;
                }
            }
            if started.elapsed() >= settings.max_duration {
                send(sse::comment("stream time limit; reconnect with Last-Event-ID to resume")).await;
                send(sse::retry(settings.retry.as_millis() as u64)).await;
                info!(sent_tokens, "closing at the stream's time limit");
                return Ok(());
            }
            if last_sent.elapsed() >= settings.keepalive {
                if !send(sse::comment("keepalive")).await {
                    return Ok(());
                }
                last_sent = Instant::now();
            }
            empty_polls = if progressed { 0 } else { empty_polls + 1 };
            let tokens_seen = last_seq.is_some();
            let poll = PollState { tokens_seen, generating, empty_polls, next_due, margin: margin.margin };
            // A wait cut short by the slow interval reads before the due time: not a lesson.
            let before_slow = |due: u64| {
                Duration::from_millis(due.saturating_sub(self.store.now_ms())) + margin.margin
                    <= settings.poll_slow
            };
            polled_at_due = empty_polls == 0 && tokens_seen && next_due.is_some_and(before_slow);
            let wait = self.next_poll(poll, started.elapsed());
            tokio::time::sleep(wait).await;
        }
    }

    /// How long to wait before the next poll:
    /// - after new tokens, until the writer's next chunk is due (its `next_at`) and the margin
    ///   after it, or the fast interval when it gave no time;
    /// - before the first chunk, an eighth of the wait so far, between the fast interval and four
    ///   times it while the turn generates (the model is thinking), or the slow interval while it
    ///   waits for a generator: the first token is late by at most an eighth of its wait, and a
    ///   crowd of turns queued behind busy generators does not spend the machine polling;
    /// - when polls find nothing after tokens flowed: after a due time, `DUE_RETRY` doubling
    ///   (the chunk's put took longer, or the model's pace changed); else (the model paused) half
    ///   the fast interval doubling; both up to four times the fast interval.
    fn next_poll(&self, poll: PollState, waited: Duration) -> Duration {
        let settings = &self.settings;
        // Never a busy loop, whatever `STREAM_POLL_FAST_MS` says.
        let fast = settings.poll_fast.max(DUE_RETRY * 2);
        if poll.empty_polls == 0 && poll.tokens_seen {
            return match poll.next_due {
                Some(due) => {
                    let until = Duration::from_millis(due.saturating_sub(self.store.now_ms())) + poll.margin;
                    until.min(settings.poll_slow).max(poll.margin)
                }
                None => fast,
            };
        }
        if !poll.tokens_seen {
            let most = if poll.generating { fast * 4 } else { settings.poll_slow.max(fast) };
            return (waited / WAITING_BACKOFF).clamp(fast, most);
        }
        let due_passed = poll.next_due.is_some_and(|due| due <= self.store.now_ms());
        let first = if due_passed { DUE_RETRY } else { fast / 2 };
        let doubled = first.saturating_mul(1 << poll.empty_polls.saturating_sub(1).min(8));
        doubled.min((fast * 4).max(first))
    }

    /// The turn is over: sends what is left (read consistently, so nothing written before the
    /// commit is missed), then how it ended.
    async fn finish(
        &self,
        position: &Position,
        session: &Session,
        last_seq: Option<u32>,
        mut next_index: u64,
        tx: &mpsc::Sender<String>,
    ) -> Result<(), StoreError> {
        let chunks =
            self.store.read_chunks(position.session, position.turn, last_seq, Read::Consistent).await?;
        for chunk in chunks {
            if send_tokens(position.turn, &chunk, &mut next_index, tx).await.is_none() {
                return Ok(());
            }
        }
        let reply = self
            .store
            .get_message(position.session, position.turn, Role::Assistant, Read::Consistent)
            .await?;
        let turn = position.turn;
        let events = match reply {
            Some(reply) => vec![
                sse::event("message_end", None, &message_end(turn, &reply).to_string()),
                // The bare session id, as seed-compatible clients expect; the turn is in the ids.
                sse::event("commit_done", None, &position.session.to_string()),
            ],
            None => {
                let (code, state) = match (session.turn == turn, session.state) {
                    (true, State::Timeout) => ("timeout", State::Timeout),
                    (true, state) => ("error", state),
                    (false, _) => ("error", State::Error),
                };
                let message = if session.turn == turn {
                    session.reason.clone().unwrap_or_else(|| "the turn ended without a reply".to_owned())
                } else {
                    "the turn ended without a reply".to_owned()
                };
                let data = json!({"code": code, "message": message, "state": state, "turn": turn});
                vec![sse::event("error", None, &data.to_string())]
            }
        };
        for event in events {
            if tx.send(event).await.is_err() {
                break;
            }
        }
        info!(tokens = next_index, "turn over; stream closed");
        Ok(())
    }
}

/// The `message_end` data of a committed reply: how it ended, and what it consumed and cost as
/// stored with it (`usage` absent for replies stored before replies kept it; `cost_usd` absent
/// when a model it used has no price).
fn message_end(turn: Turn, reply: &Message) -> serde_json::Value {
    let mut data = json!({"turn": turn, "stopped": reply.stopped.is_some(), "reason": reply.stopped});
    if let Some(usage) = reply.usage {
        data["usage"] = json!(usage);
    }
    if let Some(cost) = reply.cost_usd {
        data["cost_usd"] = json!(cost);
    }
    data
}

/// Sends the chunk's tokens from `next_index` on, as `token` events with ids `{turn}:{index}`;
/// how many it sent, or `None` once the client is gone.
async fn send_tokens(
    turn: Turn,
    chunk: &Chunk,
    next_index: &mut u64,
    tx: &mpsc::Sender<String>,
) -> Option<usize> {
    // A chunk's events go out as one frame: one write for each hop instead of one per token.
    let mut frame = String::new();
    let mut sent = 0;
    for (offset, token) in chunk.tokens.iter().enumerate() {
        let index = chunk.start + offset as u64;
        if index < *next_index {
            continue;
        }
        let id = format!("{turn}:{index}");
        // A tool call or result has its own event name and index, so resuming after it works
        // like resuming after a token.
        let event = match ReplyEvent::decode(token) {
            Some(event) => sse::event(&event.event, Some(&id), &event.data.to_string()),
            None => sse::event("token", Some(&id), token),
        };
        frame.push_str(&event);
        *next_index = index + 1;
        sent += 1;
    }
    if !frame.is_empty() {
        tx.send(frame).await.ok()?;
    }
    Some(sent)
}

/// How often a user's feed is read by default: a tab hears of a change within a second, at half a
/// read unit a poll.
const DEFAULT_FEED_POLL: Duration = Duration::from_millis(500);

/// A `200 text/event-stream` answer whose frames come from `rx`.
pub(crate) fn sse_response(rx: mpsc::Receiver<String>) -> Response<SseBody> {
    let frames = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|text| (Ok(http_body::Frame::data(Bytes::from(text))), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(StreamBody::new(frames.boxed()))
        .expect("valid response")
}

/// A JSON error answer, before any event.
pub(crate) fn refused(err: StreamError) -> Response<SseBody> {
    let answer = err.answer();
    metrics::error_answer(answer.status.as_u16(), answer.code);
    answer.response().map(|body| {
        let frames = stream::once(async move { Ok(http_body::Frame::data(Bytes::from(body))) });
        StreamBody::new(frames.boxed())
    })
}

fn unavailable(err: StoreError) -> StreamError {
    tracing::error!(error = %err, "DynamoDB request failed");
    StreamError::StoreUnavailable
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::{Clock, StoreOptions};
    use std::sync::atomic::AtomicU64;

    const NOW: u64 = 1_000_000;

    /// A relay whose clock stands at `NOW` (no request is sent).
    fn relay() -> Relay {
        let client = chat_testkit::emulators::dynamodb_client("http://127.0.0.1:9");
        let store = Store::new(client, "unused", StoreOptions::default())
            .with_clock(Clock::Manual(Arc::new(AtomicU64::new(NOW))));
        Relay::new(store, RelaySettings::default(), Authenticator::trusted())
    }

    const MARGIN: Duration = Duration::from_millis(7);

    fn after_tokens(empty_polls: u32, next_due: Option<u64>) -> PollState {
        PollState { tokens_seen: true, generating: true, empty_polls, next_due, margin: MARGIN }
    }

    #[test]
    fn a_relay_polls_when_the_next_chunk_is_due() {
        let relay = relay();
        let wait = relay.next_poll(after_tokens(0, Some(NOW + 170)), Duration::ZERO);
        assert_eq!(wait, Duration::from_millis(170) + MARGIN);
    }

    #[test]
    fn the_margin_learns_from_chunks_a_put_made_late_not_from_a_changed_pace() {
        // Puts land 12 ms after the due time: found on the second read after it (5 + 10 ms).
        let mut margin = DueMargin::default();
        for _ in 0..3 {
            margin.observe(true, false);
            margin.observe(false, false);
            margin.observe(false, true);
        }
        assert_eq!(margin.margin, Duration::from_millis(11));
        // A chunk found only after the third read since its due time: the model slowed down.
        let before = margin.margin;
        margin.observe(true, false);
        for _ in 0..LATE_PUT_READS {
            margin.observe(false, false);
        }
        margin.observe(false, true);
        assert_eq!(margin.margin, before);
        // Reads that are not at a due time, with nothing pending, teach nothing.
        margin.observe(false, true);
        margin.observe(false, false);
        assert_eq!(margin.margin, before);
    }

    #[test]
    fn the_margin_after_a_due_time_grows_when_chunks_are_late_and_shrinks_when_they_are_not() {
        let mut margin = DueMargin::default();
        assert_eq!(margin.margin, Duration::from_millis(5));
        margin.missed();
        assert_eq!(margin.margin, Duration::from_millis(7));
        for _ in 0..20 {
            margin.missed();
        }
        assert_eq!(margin.margin, DueMargin::MAX);
        for _ in 0..7 {
            margin.found();
        }
        assert_eq!(margin.margin, DueMargin::MAX, "seven found in a row change nothing");
        margin.found();
        assert_eq!(margin.margin, DueMargin::MAX - Duration::from_millis(1));
        for _ in 0..8 * 30 {
            margin.found();
        }
        assert_eq!(margin.margin, DueMargin::MIN);
        // A miss starts the count of found reads again.
        for _ in 0..7 {
            margin.found();
        }
        margin.missed();
        margin.found();
        assert_eq!(margin.margin, DueMargin::MIN + Duration::from_millis(2));
    }

    #[test]
    fn a_due_chunk_not_there_yet_is_read_again_soon_then_less_and_less_often() {
        let relay = relay();
        let due = Some(NOW - 5);
        let waits: Vec<u64> = (1..=9)
            .map(|empty| relay.next_poll(after_tokens(empty, due), Duration::ZERO).as_millis() as u64)
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 200, 200, 200]);
    }

    #[test]
    fn a_slow_interval_under_the_margin_cannot_make_a_relay_read_before_it() {
        let mut relay = relay();
        Arc::get_mut(&mut relay.settings).unwrap().poll_slow = Duration::from_millis(3);
        assert_eq!(relay.next_poll(after_tokens(0, Some(NOW + 170)), Duration::ZERO), MARGIN);
    }

    #[test]
    fn without_a_due_time_empty_polls_back_off_at_once() {
        let relay = relay();
        let waits: Vec<u64> = (1..=4)
            .map(|empty| relay.next_poll(after_tokens(empty, None), Duration::ZERO).as_millis() as u64)
            .collect();
        assert_eq!(waits, [25, 50, 100, 200]);
        assert_eq!(relay.next_poll(after_tokens(9, None), Duration::ZERO), Duration::from_millis(200));
        // A chunk due later than now is not late: no quick re-poll.
        assert_eq!(
            relay.next_poll(after_tokens(1, Some(NOW + 100)), Duration::ZERO),
            Duration::from_millis(25)
        );
    }
}
