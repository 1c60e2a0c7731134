//! A user's live feed: `GET /users/{user}/events`, Server-Sent Events telling a signed-in user's
//! other tabs that a session was created, renamed or deleted, or that a turn started or ended.
//!
//! The events are items in the user's partition, written in the same transaction as the
//! transition they tell of (a rename and a delete write theirs too), so a tab is told only what
//! happened. The feed polls them (eventually consistent, half a read unit a poll when nothing
//! happened) every `FEED_POLL_MS`, re-reading the last [`LOOKBACK`] each time, since writers'
//! clocks and retries can land an event a little after a later one: ids already sent are
//! skipped. It is a hint to reload, not a log: a tab reloads what it shows when it (re)connects,
//! and events are kept an hour.

use crate::{sse, unavailable, Relay, StreamError};
use chat_core::time::rfc3339_ms;
use chat_core::{Admission, FeedEvent, StoreError, UserId};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

/// How far back each poll reads: an event may land this much after a later one.
pub const LOOKBACK: Duration = Duration::from_secs(10);

/// How long events are kept (`chat_core`'s feed retention): a resume from before it is told to
/// reload (`resync`).
const RETENTION: Duration = Duration::from_secs(chat_core::store::FEED_RETENTION_S);

/// Where a feed starts.
pub(crate) struct FeedStart {
    pub user: UserId,
    /// The last event the client has (its id and time), when it resumes.
    pub resume: Option<(String, u64)>,
    /// This stream's id in the user's stream slots.
    pub stream_id: String,
    /// When the caller's token stops being accepted, epoch ms.
    pub until: Option<u64>,
}

/// A feed event id: `{at:013}#{session}#{unique}`; returns its time.
fn parse_id(raw: &str) -> Option<u64> {
    let (at, rest) = raw.split_once('#')?;
    let (session, unique) = rest.split_once('#')?;
    let valid = at.len() == 13
        && chat_core::SessionId::parse(session).is_ok()
        && !unique.is_empty()
        && unique.len() <= 64
        && unique.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    valid.then(|| at.parse().ok()).flatten()
}

impl Relay {
    /// Checks a feed request: the caller may act as the user it names; a resume id is one of
    /// ours; a slot among the user's open streams is free.
    pub(crate) async fn start_feed(
        &self,
        request: &lambda_http::Request,
        raw_user: &str,
    ) -> Result<FeedStart, StreamError> {
        if request.method() != lambda_http::http::Method::GET {
            return Err(StreamError::MethodNotAllowed);
        }
        let (caller, until, last_event_id) = self.identify(request).await?;
        let decoded = percent_encoding::percent_decode_str(raw_user).decode_utf8_lossy();
        let user = UserId::parse(&decoded).map_err(|e| StreamError::InvalidUser(e.to_string()))?;
        if !caller.may_act_as(&user) {
            return Err(StreamError::Forbidden(user.as_str().to_owned()));
        }
        let resume = match last_event_id {
            None => None,
            Some(raw) => {
                let at = parse_id(&raw).ok_or_else(|| StreamError::InvalidFeedEventId(raw.clone()))?;
                Some((raw, at))
            }
        };
        let stream_id = uuid::Uuid::new_v4().simple().to_string();
        let hold = self.settings.max_duration + Duration::from_secs(60);
        // A feed slot first (feeds may hold only some of the user's streams), then a stream slot.
        let feeds = self.open_feeds;
        if let Admission::Limited { retry_after } =
            self.store.open_feed(&user, &stream_id, feeds, hold).await.map_err(unavailable)?
        {
            return Err(StreamError::TooManyFeeds { max: feeds, retry_after });
        }
        let max = self.settings.max_open_streams;
        let stream_slot = self.store.open_stream(&user, &stream_id, max, hold).await;
        if !matches!(stream_slot, Ok(Admission::Admitted)) {
            if let Err(err) = self.store.close_feed(&user, &stream_id).await {
                warn!(error = %err, "could not give back the feed slot; it lapses on its own");
            }
        }
        match stream_slot.map_err(unavailable)? {
            Admission::Admitted => Ok(FeedStart { user, resume, stream_id, until }),
            Admission::Limited { retry_after } => Err(StreamError::TooManyStreams { max, retry_after }),
        }
    }

    /// Relays the feed until the client goes, its token expires or the stream's time is up; then
    /// gives the slot back.
    pub(crate) async fn relay_feed(&self, start: FeedStart, tx: mpsc::Sender<String>) {
        if let Err(err) = self.follow_feed(&start, &tx).await {
            warn!(error = %err, "feed ended by a DynamoDB fault");
            let data = json!({"code": "store_unavailable", "message": "the session store is unavailable; reconnect to resume"});
            let _ = tx.send(sse::event("error", None, &data.to_string())).await;
            let _ = tx.send(sse::retry(self.settings.retry.as_millis() as u64)).await;
        }
        if let Err(err) = self.store.close_stream(&start.user, &start.stream_id).await {
            warn!(error = %err, "could not give back the stream slot; it lapses on its own");
        }
        if let Err(err) = self.store.close_feed(&start.user, &start.stream_id).await {
            warn!(error = %err, "could not give back the feed slot; it lapses on its own");
        }
    }

    async fn follow_feed(&self, start: &FeedStart, tx: &mpsc::Sender<String>) -> Result<(), StoreError> {
        let settings = &self.settings;
        let started = Instant::now();
        let send = |text: String| async move { tx.send(text).await.is_ok() };
        if !send(sse::retry(settings.retry.as_millis() as u64)).await {
            return Ok(());
        }
        let lookback = LOOKBACK.as_millis() as u64;
        let now = self.store.now_ms();
        let mut resume = start.resume.clone();
        if resume.as_ref().is_some_and(|(_, at)| *at + RETENTION.as_millis() as u64 <= now) {
            // Events since then may be gone: the client reloads instead.
            send(sse::event("resync", None, r#"{"reason": "events this old are no longer kept; reload"}"#))
                .await;
            resume = None;
        }
        let mut from = resume.as_ref().map_or(now, |(_, at)| *at).saturating_sub(lookback);
        // A fresh feed's first read is what the client loaded as it connected: not sent.
        let mut baseline = resume.is_none();
        let mut seen: HashMap<String, u64> = HashMap::new();
        let (mut sent, mut polls) = (0usize, 0usize);
        let mut last_sent = Instant::now();
        loop {
            if tx.is_closed() {
                info!(sent, polls, "feed client went away");
                return Ok(());
            }
            if start.until.is_some_and(|until| self.store.now_ms() >= until) {
                let data = json!({"code": "token_expired", "message": "your sign-in expired; sign in again and reconnect"});
                send(sse::event("error", None, &data.to_string())).await;
                return Ok(());
            }
            let polled_at = self.store.now_ms();
            let events = self.store.feed_since(&start.user, from).await?;
            polls += 1;
            for event in events {
                if seen.insert(event.id.clone(), event.at).is_some() || baseline {
                    continue;
                }
                if resume.as_ref().is_some_and(|(last, _)| event.id.as_str() <= last.as_str()) {
                    continue;
                }
                if !send(sse::event(event.kind.as_str(), Some(&event.id), &data(&event).to_string())).await {
                    return Ok(());
                }
                sent += 1;
                last_sent = Instant::now();
            }
            baseline = false;
            from = polled_at.saturating_sub(lookback);
            seen.retain(|_, at| *at >= from);
            if started.elapsed() >= settings.max_duration {
                send(sse::comment("stream time limit; reconnect with Last-Event-ID to resume")).await;
                send(sse::retry(settings.retry.as_millis() as u64)).await;
                info!(sent, polls, "closing the feed at the stream's time limit");
                return Ok(());
            }
            if last_sent.elapsed() >= settings.keepalive {
                if !send(sse::comment("keepalive")).await {
                    return Ok(());
                }
                last_sent = Instant::now();
            }
            tokio::time::sleep(self.feed_poll).await;
        }
    }
}

/// An event's data: `{"session_id", "turn", "state", "event", "title", "at"}`.
fn data(event: &FeedEvent) -> serde_json::Value {
    json!({
        "session_id": event.session,
        "turn": event.turn,
        "state": event.state,
        "event": event.event.map(|e| e.as_str()),
        "title": event.title,
        "at": rfc3339_ms(event.at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_ids_parse_only_as_the_feed_writes_them() {
        let session = chat_core::SessionId::new();
        assert_eq!(parse_id(&format!("1796162184246#{session}#0000000003")), Some(1_796_162_184_246));
        assert_eq!(parse_id(&format!("1796162184246#{session}#title-ab12")), Some(1_796_162_184_246));
        for bad in [
            "1:2".to_owned(),
            format!("179616218424#{session}#1"),
            "1796162184246#not-a-session#1".to_owned(),
            format!("1796162184246#{session}#"),
            format!("1796162184246#{session}#a b"),
        ] {
            assert_eq!(parse_id(&bad), None, "{bad}");
        }
    }
}
