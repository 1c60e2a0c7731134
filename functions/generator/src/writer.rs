//! The turn writer: a claimed turn's reply as it is written. It buffers the model's tokens and
//! the tool entries, writes them as chunks in sequence, reads the lease back (honouring a
//! cancel) and extends it as it goes, and keeps what is stored with the reply: its text, route,
//! tool uses and what the model calls consumed.

use crate::pricing::Cost;
use crate::GenerationSettings;
use chat_core::record::EVENT_MARK;
use chat_core::{
    AppendOutcome, Lease, LeaseStatus, Read, Reply, ReplyEvent, Routing, StopReason, Store, StoreError,
    ToolUse, Usage,
};
use chat_runtime::metrics;
use std::time::Duration;
use tokio::time::Instant;
use tracing::warn;

/// Tool calls and results are written in chunks of at most about this much.
const EVENT_CHUNK_BYTES: usize = 64 * 1024;

/// While tokens flow, a flush reads the lease back at most this often: a cancel or a lost lease
/// is noticed within this and one flush. A stalled generator notices at its first flush after
/// the stall, before it writes a second chunk, and a flush that ends a step or the turn always
/// reads it.
const LEASE_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Tokens that come this close together came in one burst (one network read).
const SAME_BURST: Duration = Duration::from_millis(2);

/// No token for this long is a pause, not the model's pace.
const PAUSE: Duration = Duration::from_secs(1);

/// Whether a flush reads the lease back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseCheck {
    /// Always: the flush ends a model step or the turn.
    Now,
    /// Mid-reply: when [`LEASE_CHECK_EVERY`] has passed since the last read.
    WhenDue,
}

/// Why the writer must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Halt {
    /// Another holder took the turn over, or it ended, or the session was deleted.
    LeaseLost,
    /// The client asked to stop.
    Cancelled,
    /// The reply reached `REPLY_MAX_BYTES`.
    Capped,
}

/// A claimed turn's reply as it is written.
pub(crate) struct TurnWriter<'a> {
    store: &'a Store,
    settings: &'a GenerationSettings,
    lease: Lease,
    /// When the turn's message was accepted (epoch ms), until its first chunk is written; only
    /// for a turn's first attempt (a takeover's first chunk is not the reply's).
    accepted_at: Option<u64>,
    /// How long after that the first chunk was written (ms), for the turn's log line.
    first_token_ms: Option<u64>,
    /// When the lease was last read back or extended.
    lease_read: Option<Instant>,
    /// When the last token arrived, and the time between tokens, averaged.
    last_token: Option<Instant>,
    token_gap: Option<Duration>,
    /// The time between bursts of tokens, averaged: models often send several tokens in one
    /// network read, then none for a while; the next token comes a burst gap after the last.
    burst_gap: Option<Duration>,
    buffer: Vec<String>,
    /// When the oldest buffered token arrived.
    oldest: Option<Instant>,
    next_seq: u32,
    /// The chunk this attempt started at.
    first_seq: u32,
    next_index: u64,
    /// Everything written so far: the reply's text if it ends now.
    text: String,
    /// Bytes of the tool calls and results written so far (stored with the reply too).
    event_bytes: usize,
    /// The route chosen for the turn.
    routing: Option<Routing>,
    /// The tools called for the turn so far, an earlier holder's included.
    tool_uses: Vec<ToolUse>,
    /// What this holder's model calls consumed so far: stored with the reply and charged when
    /// the turn ends.
    usage: Usage,
    /// What those calls cost so far.
    cost: Cost,
}

impl<'a> TurnWriter<'a> {
    /// A writer for `lease`, going on after what an earlier holder wrote (its tokens are in the
    /// lease, `tool_uses` its tool calls).
    pub(crate) fn new(
        store: &'a Store,
        settings: &'a GenerationSettings,
        lease: Lease,
        tool_uses: Vec<ToolUse>,
    ) -> TurnWriter<'a> {
        let resumed = &lease.resumed_tokens;
        TurnWriter {
            store,
            settings,
            accepted_at: None,
            first_token_ms: None,
            lease_read: None,
            last_token: None,
            token_gap: None,
            burst_gap: None,
            buffer: Vec::new(),
            oldest: None,
            next_seq: lease.next_seq,
            first_seq: lease.next_seq,
            next_index: resumed.len() as u64,
            text: resumed.iter().filter(|t| ReplyEvent::decode(t).is_none()).cloned().collect(),
            event_bytes: resumed.iter().filter(|t| t.starts_with(EVENT_MARK)).map(String::len).sum(),
            routing: None,
            tool_uses,
            usage: Usage::default(),
            cost: Cost::default(),
            lease,
        }
    }

    /// The lease the turn is written under.
    pub(crate) fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Whether this is the turn's first claim, not a takeover.
    pub(crate) fn first_claim(&self) -> bool {
        self.lease.next_seq == 0
    }

    /// How long after the turn's message was accepted its first chunk was stored (ms), when this
    /// attempt timed it.
    pub(crate) fn first_token_ms(&self) -> Option<u64> {
        self.first_token_ms
    }

    /// Times the reply's first stored token from `accepted_at` (epoch ms), on a first claim.
    pub(crate) fn time_first_token_from(&mut self, accepted_at: Option<u64>) {
        self.accepted_at = accepted_at.filter(|_| self.first_claim());
    }

    /// Tokens (and tool entries) stored so far, an earlier holder's included.
    pub(crate) fn tokens_stored(&self) -> u64 {
        self.next_index
    }

    /// Chunks stored so far, an earlier holder's included.
    pub(crate) fn chunks_stored(&self) -> u32 {
        self.next_seq
    }

    /// The route the turn takes, stored with the reply.
    pub(crate) fn route(&mut self, routing: Routing) {
        self.routing = Some(routing);
    }

    /// The route chosen so far.
    pub(crate) fn routing(&self) -> Option<&Routing> {
        self.routing.as_ref()
    }

    /// A tool called for the turn, stored with the reply.
    pub(crate) fn record_tool_use(&mut self, tool_use: ToolUse) {
        self.tool_uses.push(tool_use);
    }

    /// Bytes of the turn's tool calls and answers so far (`TOOL_MAX_BYTES_PER_TURN` counts them).
    pub(crate) fn tool_bytes(&self) -> usize {
        self.tool_uses.iter().map(|u| u.arguments.len() + u.result.len()).sum()
    }

    /// Adds what a model call consumed, and what it cost (`None`: its model has no price).
    pub(crate) fn spent(&mut self, usage: Usage, cost_usd: Option<f64>) {
        self.usage += usage;
        self.cost.add(cost_usd);
    }

    /// What this holder's model calls cost so far, when every one of them had a price.
    pub(crate) fn cost_usd(&self) -> Option<f64> {
        self.cost.usd()
    }

    /// What this holder's model calls consumed so far.
    pub(crate) fn usage(&self) -> Usage {
        self.usage
    }

    /// The reply if it ends now, `stopped` for why it was cut short.
    pub(crate) fn reply(&self, stopped: Option<StopReason>) -> Reply {
        Reply {
            text: self.text.clone(),
            stopped,
            routing: self.routing.clone(),
            tool_uses: self.tool_uses.clone(),
            usage: self.usage,
            cost_usd: self.cost.usd(),
        }
    }

    /// Whether `bytes` more still fit the reply (`REPLY_MAX_BYTES`, buffered tokens and tool
    /// events included: they are stored with it).
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        self.bytes() + bytes <= self.settings.reply_max_bytes
    }

    /// Bytes of the reply so far, buffered tokens included.
    pub(crate) fn bytes(&self) -> usize {
        self.text.len() + self.event_bytes + self.buffered_bytes()
    }

    /// Bytes waiting to be written.
    fn buffered_bytes(&self) -> usize {
        self.buffer.iter().map(String::len).sum()
    }

    /// Buffers a token of the reply's text.
    pub(crate) fn push(&mut self, mut token: String) {
        if token.is_empty() {
            return;
        }
        // A text token must never read as an event (see `chat_core::record::EVENT_MARK`).
        if token.starts_with(EVENT_MARK) {
            token.replace_range(..EVENT_MARK.len_utf8(), "\u{fffd}");
        }
        let now = Instant::now();
        self.note_token_at(now);
        self.oldest.get_or_insert(now);
        self.buffer.push(token);
    }

    /// A token came at `at`: the pace of tokens, for when the next chunk is due. A gap over
    /// [`PAUSE`] is a pause (a tool step, the model thinking), not the pace.
    fn note_token_at(&mut self, at: Instant) {
        let average =
            |average: Option<Duration>, gap: Duration| Some(average.map_or(gap, |a| (a * 7 + gap) / 8));
        if let Some(previous) = self.last_token.filter(|p| at.saturating_duration_since(*p) <= PAUSE) {
            let gap = at.saturating_duration_since(previous);
            self.token_gap = average(self.token_gap, gap);
            if gap > SAME_BURST {
                self.burst_gap = average(self.burst_gap, gap);
            }
        }
        self.last_token = Some(at);
    }

    /// Whether the buffer should be written now: it is full (`FLUSH_MAX_TOKENS`), or it holds
    /// this attempt's first token, which goes out at once (time to first token is what users
    /// feel; later tokens are batched by time and size).
    pub(crate) fn wants_flush(&self) -> bool {
        self.buffer.len() >= self.settings.flush_max_tokens || self.next_seq == self.first_seq
    }

    /// When the buffered tokens are due to be written (`FLUSH_INTERVAL_MS` after the oldest);
    /// `None` while nothing is buffered.
    pub(crate) fn flush_due(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.settings.flush_interval)
    }

    /// Buffers a tool call or result, flushing first when the buffer would grow past
    /// [`EVENT_CHUNK_BYTES`] (a chunk item stays far under DynamoDB's 400 KB), and halting at
    /// `REPLY_MAX_BYTES`, which counts the tool steps too.
    pub(crate) async fn push_event(&mut self, event: ReplyEvent) -> Result<Option<Halt>, StoreError> {
        let token = event.encode();
        if !self.fits(token.len()) {
            warn!(
                bytes = self.bytes(),
                "the reply and its tool steps reached REPLY_MAX_BYTES; stopping there"
            );
            return Ok(Some(self.flush(LeaseCheck::Now).await?.unwrap_or(Halt::Capped)));
        }
        if self.buffered_bytes() + token.len() > EVENT_CHUNK_BYTES {
            if let Some(halt) = self.flush(LeaseCheck::Now).await? {
                return Ok(Some(halt));
            }
        }
        self.oldest.get_or_insert_with(Instant::now);
        self.buffer.push(token);
        Ok(None)
    }

    /// Writes the buffered tokens as one chunk, then checks the lease and the cancel flag (when
    /// `check` asks for it), and extends the lease once half of it has passed. `Some` says why
    /// writing must stop.
    pub(crate) async fn flush(&mut self, check: LeaseCheck) -> Result<Option<Halt>, StoreError> {
        if !self.buffer.is_empty() {
            // Mid-reply, relays poll for the next chunk when it is due.
            let flushed_at = Instant::now();
            let next_at = (check == LeaseCheck::WhenDue).then(|| {
                self.store.now_ms().saturating_add(self.next_chunk_in(flushed_at).as_millis() as u64)
            });
            let outcome = self
                .store
                .append_chunk_expecting(&self.lease, self.next_seq, self.next_index, &self.buffer, next_at)
                .await?;
            if outcome == AppendOutcome::Fenced {
                return Ok(Some(Halt::LeaseLost));
            }
            if let Some(accepted_at) = self.accepted_at.take() {
                // The reply's first token is stored: what the user waits for.
                let waited = self.store.now_ms().saturating_sub(accepted_at);
                self.first_token_ms = Some(waited);
                metrics::millis(metrics::name::TIME_TO_FIRST_TOKEN, &[waited as f64], &[]);
            }
            self.written();
        }
        let lease_for = self.settings.lease;
        let half_gone = self.store.now_ms() + lease_for.as_millis() as u64 / 2 >= self.lease.expires_at;
        let due = self.lease_read.is_none_or(|at| at.elapsed() >= LEASE_CHECK_EVERY);
        let status = if half_gone {
            self.store.extend_lease(&mut self.lease, lease_for).await?
        } else if check == LeaseCheck::Now || due {
            self.store.lease_status(&self.lease, Read::Eventual).await?
        } else {
            return Ok(None);
        };
        self.lease_read = Some(Instant::now());
        Ok(match status {
            LeaseStatus::Lost => Some(Halt::LeaseLost),
            LeaseStatus::Held { cancel_requested: true } => Some(Halt::Cancelled),
            LeaseStatus::Held { cancel_requested: false } => None,
        })
    }

    /// When, counting from `now` (a chunk being written), the next chunk is due at the earliest:
    /// a flush interval after the next token, or sooner when tokens come fast enough to fill a
    /// chunk first. The next token is expected a burst gap after the last one came (not after
    /// now: the write may have waited for the timer), so a relay polling then finds the chunk
    /// just landed. Unknown before two tokens have been seen: a flush interval.
    fn next_chunk_in(&self, now: Instant) -> Duration {
        let (flush_interval, flush_max_tokens) =
            (self.settings.flush_interval, self.settings.flush_max_tokens);
        let (Some(gap), Some(last)) = (self.token_gap, self.last_token) else { return flush_interval };
        let next_token = last + self.burst_gap.unwrap_or(gap);
        // A chunk fills when enough tokens came, and never before the next one does (a burst of
        // more than a chunk's tokens has just filled this one).
        let full = (last + gap.saturating_mul(flush_max_tokens.clamp(1, 1 << 16) as u32)).max(next_token);
        let due = (next_token + flush_interval).min(full);
        due.saturating_duration_since(now)
    }

    /// The buffer is stored: it becomes part of the reply.
    fn written(&mut self) {
        self.next_seq += 1;
        self.next_index += self.buffer.len() as u64;
        for token in self.buffer.drain(..) {
            if token.starts_with(EVENT_MARK) {
                self.event_bytes += token.len();
            } else {
                self.text.push_str(&token);
            }
        }
        self.oldest = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::{SessionId, StoreOptions, Turn, UserId};

    fn settings(flush_interval_ms: u64) -> GenerationSettings {
        GenerationSettings { flush_interval: Duration::from_millis(flush_interval_ms), ..Default::default() }
    }

    /// A store these tests never send a request to: they check the writer's arithmetic.
    fn offline_store() -> Store {
        Store::new(chat_testkit::dynamodb_client("http://127.0.0.1:9"), "unused", StoreOptions::default())
    }

    fn lease() -> Lease {
        Lease {
            session_id: SessionId::new(),
            turn: Turn::new(1).unwrap(),
            owner: "lease".to_owned(),
            version: 3,
            expires_at: u64::MAX,
            cancel_requested: false,
            next_seq: 0,
            resumed_tokens: vec![],
            summary: None,
            user: UserId::parse("user").unwrap(),
        }
    }

    fn writer_with<'a>(store: &'a Store, settings: &'a GenerationSettings) -> TurnWriter<'a> {
        TurnWriter::new(store, settings, lease(), vec![])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Relays poll when the writer says the next chunk lands: a flush interval after the next
    /// token, which comes a burst gap after the last one, however late the timer fired.
    #[tokio::test]
    async fn the_next_chunk_is_due_a_flush_interval_after_the_next_token() {
        let store = offline_store();
        let settings = settings(175);
        let mut writer = writer_with(&store, &settings);
        let now = Instant::now();
        // The last token came 155 ms ago, 20 ms after the one before: the flush timer fires now,
        // 175 ms after the oldest. The next token is expected 135 ms ago, and the chunk it
        // opens goes 175 ms after it: 40 ms from now (not 20 + 175 from now).
        writer.last_token = Some(now - ms(155));
        writer.token_gap = Some(ms(20));
        assert_eq!(writer.next_chunk_in(now), ms(40));
    }

    /// When tokens come fast, the chunk fills (`FLUSH_MAX_TOKENS`) before the interval ends.
    #[tokio::test]
    async fn a_full_chunk_comes_before_the_interval() {
        let store = offline_store();
        let settings = settings(175);
        let mut writer = writer_with(&store, &settings);
        let now = Instant::now();
        writer.last_token = Some(now);
        writer.token_gap = Some(ms(2));
        // 32 tokens 2 ms apart fill a chunk in 64 ms, before 2 + 175.
        assert_eq!(writer.next_chunk_in(now), ms(64));
        // Before two tokens, a flush interval.
        writer.token_gap = None;
        assert_eq!(writer.next_chunk_in(now), ms(175));
    }

    /// A model that sends tokens in bursts (several in one network read, then a pause) is
    /// expected at its average pace, not at the pace inside a burst (which would tell relays
    /// the next chunk fills at once).
    #[tokio::test]
    async fn the_token_gap_is_an_average() {
        let store = offline_store();
        let settings = settings(150);
        let mut writer = writer_with(&store, &settings);
        let mut at = Instant::now();
        // Bursts of 5 tokens 0.1 ms apart, every 100 ms: 20 ms a token on average.
        for _ in 0..20 {
            for i in 0..5 {
                writer.note_token_at(at + Duration::from_micros(100 * i));
            }
            at += ms(100);
        }
        let gap = writer.token_gap.expect("tokens came");
        assert!(gap >= ms(8) && gap <= ms(40), "{gap:?}");
        assert_eq!(writer.burst_gap.map(|g| g.as_micros()), Some(99_600));
        // The flush timer fires 150 ms after the last burst began: the next burst is due 100 ms
        // after that one, and its chunk 150 ms later, 100 ms from now (not 150 + 20 ms or so).
        let now = at - ms(100) + ms(150);
        let due = writer.next_chunk_in(now);
        assert!(due >= ms(99) && due <= ms(100), "{due:?}");
    }

    /// A burst of more tokens than a chunk holds fills the chunk at once; the next cannot fill
    /// before the next burst comes.
    #[tokio::test]
    async fn a_chunk_filled_by_a_burst_is_followed_by_one_at_the_next_burst() {
        let store = offline_store();
        let settings = settings(150);
        let mut writer = writer_with(&store, &settings);
        let now = Instant::now();
        writer.last_token = Some(now);
        writer.token_gap = Some(Duration::from_micros(10));
        writer.burst_gap = Some(ms(100));
        assert_eq!(writer.next_chunk_in(now), ms(100));
    }

    /// A pause (a tool step, the model thinking) is not the pace of tokens.
    #[tokio::test]
    async fn a_pause_does_not_count_as_the_pace() {
        let store = offline_store();
        let settings = settings(150);
        let mut writer = writer_with(&store, &settings);
        let mut at = Instant::now();
        for _ in 0..10 {
            writer.note_token_at(at);
            at += ms(20);
        }
        writer.note_token_at(at + ms(3000));
        assert_eq!(writer.token_gap, Some(ms(20)));
        assert_eq!(writer.burst_gap, Some(ms(20)));
    }
}
