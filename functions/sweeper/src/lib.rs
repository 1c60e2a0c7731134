//! The sweeper: runs on a schedule and keeps every session's lifecycle moving.
//! - No turn stays in flight forever: a turn whose deadline passed is re-driven (sent to the
//!   queue again) a bounded number of times, then ended in `timeout` (or `error` for a message
//!   that never finished storing).
//! - A session whose turn ended and which stayed quiet past `SESSION_IDLE_TIMEOUT` is expired
//!   (`IdleExpired`) and its summary is asked of the generator, re-asked if the job is lost.
//! - A session DynamoDB's TTL removed (`SESSION_TTL_DAYS` after its last activity; the table's
//!   stream reports it) is counted off its user's sessions and cleared.

use chat_core::config::{CommonConfig, ConfigError, Env};
use chat_core::job::TurnMessage;
use chat_core::{fsm, Outcome, Session, State, Store, StoreError};
use chat_core::{table, SessionId, UserId};
use chat_runtime::metrics::{self, Dimension};
use chat_runtime::queue::Queue;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tracing::{info, warn};

/// Due sessions read from each shard at a time.
const PAGE_PER_SHARD: u32 = 100;

/// Due sessions settled at once.
const CONCURRENCY: usize = 16;

/// A sweep starts no new round after this long: the schedule runs it every minute, and the
/// function's timeout is 60 s.
const BUDGET: Duration = Duration::from_secs(40);

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Overdue sessions examined.
    pub checked: usize,
    /// Turns sent to the generator again.
    pub redriven: usize,
    /// Turns ended in `error` or `timeout`.
    pub ended: usize,
    /// Idle sessions expired (`IdleExpired`).
    pub idled: usize,
    /// Summary jobs sent (for sessions just expired, and again for lost jobs).
    pub summaries_requested: usize,
}

/// The sweeper's dependencies, built once per cold start.
pub struct Sweeper {
    store: Store,
    queue: Queue,
    max_redrives: u32,
    max_generation_attempts: u32,
}

impl Sweeper {
    /// Reads the configuration and builds the clients.
    pub async fn from_env() -> Result<Sweeper, ConfigError> {
        let env = Env::process();
        let common = CommonConfig::from_env(&env)?;
        let queue_url = env.required("QUEUE_URL")?;
        let max_redrives = env.parse_or("MAX_REDRIVES", 3)?;
        let aws = chat_runtime::aws::load_config().await;
        let store = Store::new(chat_runtime::aws::dynamodb(&aws), common.table_name, common.store);
        let queue = Queue::new(chat_runtime::queue::sqs(&aws), queue_url);
        Ok(Sweeper::new(store, queue, max_redrives, common.max_generation_attempts))
    }

    /// A sweeper over `store` that re-drives into `queue`: a queued turn at most `max_redrives`
    /// times, a stalled generation while it has made fewer than `max_generation_attempts`.
    pub fn new(store: Store, queue: Queue, max_redrives: u32, max_generation_attempts: u32) -> Sweeper {
        Sweeper { store, queue, max_redrives, max_generation_attempts }
    }

    /// Settles every session whose deadline has passed: each due shard is read at once, up to
    /// [`PAGE_PER_SHARD`] a shard, and the sessions are settled [`CONCURRENCY`] at a time, their
    /// generation jobs sent ten to an SQS call; then again, until a read finds nothing new or
    /// [`BUDGET`] is spent (the next sweep goes on).
    pub async fn sweep(&self) -> Result<SweepReport, lambda_runtime::Error> {
        let started = std::time::Instant::now();
        let mut report = SweepReport::default();
        let mut seen = HashSet::new();
        loop {
            let now = self.store.now_ms();
            let due = self.store.overdue_sessions(now, PAGE_PER_SHARD).await?;
            let fresh: Vec<SessionId> = due.into_iter().filter(|id| seen.insert(*id)).collect();
            if fresh.is_empty() {
                break;
            }
            // The index is eventually consistent: decide on fresh reads, a hundred to a call.
            let due: Vec<Session> = self
                .store
                .get_sessions(&fresh)
                .await?
                .into_iter()
                .filter(|s| s.due_at.is_some_and(|due| due <= now))
                .collect();
            let actions: Vec<Action> = futures::stream::iter(&due)
                .map(|session| self.settle_due(session, now))
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            report.checked += actions.len();
            let jobs: Vec<TurnMessage> = actions.iter().filter_map(Action::job).collect();
            let refused: HashSet<SessionId> = self
                .queue
                .send_all(&jobs)
                .await
                .into_iter()
                .map(|(job, err)| {
                    warn!(session = %job.session_id, error = %err, "could not queue a job; the next sweep after its deadline sends it again");
                    job.session_id
                })
                .collect();
            for action in actions {
                match action {
                    Action::Ended(state) => {
                        report.ended += 1;
                        match state {
                            State::Timeout => metrics::count(metrics::name::TURNS_TIMED_OUT, 1, &[]),
                            _ => metrics::count(
                                metrics::name::TURNS_FAILED,
                                1,
                                &[Dimension::Reason("not_stored")],
                            ),
                        }
                    }
                    Action::Redriven(job) if !refused.contains(&job.session_id) => report.redriven += 1,
                    Action::Idled(job) if !refused.contains(&job.session_id) => {
                        report.idled += 1;
                        report.summaries_requested += 1;
                    }
                    Action::SummaryResent(job) if !refused.contains(&job.session_id) => {
                        report.summaries_requested += 1
                    }
                    _ => {}
                }
            }
            if started.elapsed() >= BUDGET {
                break;
            }
        }
        metrics::count(metrics::name::SWEEP_BACKLOG, report.checked as u64, &[]);
        if report.redriven > 0 {
            metrics::count(metrics::name::REDRIVES, report.redriven as u64, &[]);
        }
        if report != SweepReport::default() {
            info!(?report, "sweep done");
        }
        Ok(report)
    }

    /// Settles one due session. One that could not be settled is examined, and left to the next
    /// sweep.
    async fn settle_due(&self, session: &Session, now: u64) -> Action {
        match self.settle(session, now).await {
            Ok(action) => action,
            Err(err) => {
                warn!(session = %session.id, error = %err, "could not settle an overdue session; next sweep retries");
                Action::None
            }
        }
    }

    async fn settle(&self, session: &Session, now: u64) -> Result<Action, StoreError> {
        if session.state.turn_in_flight() {
            return self.settle_turn(session, now).await;
        }
        if session.state == State::Timeout && session.summary_pending {
            return self.resend_summary(session).await;
        }
        // The turn ended and the session stayed quiet past its idle deadline.
        match self.store.expire_idle(session, "sweeper").await? {
            Outcome::Applied(_) => {
                info!(session = %session.id, turn = %session.turn, "idle session expired");
                Ok(Action::Idled(TurnMessage::summary(session.id, session.turn)))
            }
            Outcome::Conflict(_) => Ok(Action::None),
        }
    }

    /// A turn in flight past its deadline: re-driven while it may be, else ended.
    async fn settle_turn(&self, session: &Session, now: u64) -> Result<Action, StoreError> {
        let lease_live = session.lease.as_ref().is_some_and(|l| l.expires_at > now);
        let Some((event, reason)) = fsm::expiry(session.state).filter(|_| !lease_live) else {
            return Ok(Action::None);
        };
        let can_redrive = fsm::retryable(session.state, session.attempts, self.max_generation_attempts);
        if can_redrive && session.redrives < self.max_redrives {
            // The re-drive is recorded (and the deadline moved) before the job is sent: a job
            // that fails to send is sent again by the sweep after the new deadline.
            if let Outcome::Applied(n) = self.store.record_redrive(session).await? {
                info!(session = %session.id, turn = %session.turn, redrive = n, state = %session.state, "re-driven");
                return Ok(Action::Redriven(TurnMessage::reply(session.id, session.turn)));
            }
            return Ok(Action::None);
        }
        match self.store.end_turn(session, event, reason, "sweeper").await? {
            Outcome::Applied(_) => {
                let ended = fsm::transition(Some(session.state), event).unwrap_or(State::Error);
                info!(session = %session.id, turn = %session.turn, %event, outcome = %ended, "turn ended");
                if let Err(err) = self.store.close_turn_slot(&session.user_id, session.id).await {
                    warn!(session = %session.id, error = %err, "could not give back the turn's slot; it lapses on its own");
                }
                Ok(Action::Ended(ended))
            }
            Outcome::Conflict(_) => Ok(Action::None),
        }
    }

    /// An expired session whose summary did not arrive by its deadline: the job is sent again,
    /// at most `max_redrives` times, then the summary is given up.
    async fn resend_summary(&self, session: &Session) -> Result<Action, StoreError> {
        if session.redrives >= self.max_redrives {
            self.store.drop_summary(session).await?;
            warn!(session = %session.id, redrives = session.redrives, "no summary arrived; giving it up");
            return Ok(Action::None);
        }
        match self.store.record_redrive(session).await? {
            Outcome::Applied(_) => Ok(Action::SummaryResent(TurnMessage::summary(session.id, session.turn))),
            Outcome::Conflict(_) => Ok(Action::None),
        }
    }
}

/// What settling one due session did.
enum Action {
    /// Re-driven: its reply job is to be sent.
    Redriven(TurnMessage),
    /// Its turn ended, in this state.
    Ended(State),
    /// Expired; its summary job is to be sent.
    Idled(TurnMessage),
    /// Its summary job is to be sent again.
    SummaryResent(TurnMessage),
    None,
}

impl Action {
    /// The generation job this action sends.
    fn job(&self) -> Option<TurnMessage> {
        match self {
            Action::Redriven(job) | Action::Idled(job) | Action::SummaryResent(job) => Some(*job),
            Action::Ended(_) | Action::None => None,
        }
    }
}

/// DynamoDB Streams records, as Lambda delivers them: only what the sweeper reads. (The
/// `aws_lambda_events` type would bring chrono and serde_dynamo for these four fields.)
#[derive(Debug, Clone, Deserialize)]
pub struct StreamEvent {
    /// The records of the batch.
    #[serde(rename = "Records")]
    pub records: Vec<StreamRecord>,
}

/// One change to the table.
#[derive(Debug, Clone, Deserialize)]
pub struct StreamRecord {
    /// `INSERT`, `MODIFY` or `REMOVE`.
    #[serde(rename = "eventName")]
    pub event_name: String,
    /// Who made the change: the TTL service, for removals by TTL.
    #[serde(rename = "userIdentity", default)]
    pub user_identity: Option<UserIdentity>,
    /// The item's keys and its image before the change.
    pub dynamodb: StreamChange,
}

/// Who made a change.
#[derive(Debug, Clone, Deserialize)]
pub struct UserIdentity {
    /// `Service` for TTL removals.
    #[serde(rename = "type")]
    pub kind: String,
    /// `dynamodb.amazonaws.com` for TTL removals.
    #[serde(rename = "principalId")]
    pub principal_id: String,
}

/// The keys and old image of a changed item (string attributes only are read).
#[derive(Debug, Clone, Deserialize)]
pub struct StreamChange {
    /// The record's place in its shard.
    #[serde(rename = "SequenceNumber", default)]
    pub sequence_number: String,
    /// The item's keys.
    #[serde(rename = "Keys", default)]
    pub keys: HashMap<String, serde_json::Value>,
    /// The item before the change (the table's stream carries old images).
    #[serde(rename = "OldImage", default)]
    pub old_image: HashMap<String, serde_json::Value>,
}

impl StreamRecord {
    /// The session and owner of a session item that DynamoDB's TTL removed; `None` for any other
    /// change (the event source's filter should let only these through).
    pub fn expired_session(&self) -> Option<(SessionId, UserId)> {
        let by_ttl = self
            .user_identity
            .as_ref()
            .is_some_and(|who| who.kind == "Service" && who.principal_id == "dynamodb.amazonaws.com");
        let string = |map: &HashMap<String, serde_json::Value>, name: &str| {
            map.get(name).and_then(|v| v.get("S")).and_then(|v| v.as_str()).map(str::to_owned)
        };
        if self.event_name != "REMOVE" || !by_ttl || string(&self.dynamodb.keys, "sk")? != table::SESSION_SK {
            return None;
        }
        let session = SessionId::parse(string(&self.dynamodb.keys, "pk")?.strip_prefix("S#")?).ok()?;
        let user = UserId::parse(&string(&self.dynamodb.old_image, "user_id")?).ok()?;
        Some((session, user))
    }
}

/// What one batch of expiry reports did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ExpiryReport {
    /// Sessions removed by TTL in the batch, handled.
    pub expired: usize,
    /// Of those, the ones counted off their user's sessions by this call (the others were
    /// counted by an earlier delivery of the same record).
    pub counted: usize,
    /// The sequence number of the first record that failed: it and the records after it are
    /// delivered again (Lambda's partial batch response); `None` when all were handled.
    pub retry_from: Option<String>,
}

/// A stream batch's answer to Lambda (`ReportBatchItemFailures`): the first record that failed;
/// Lambda delivers it and every later record again, and the earlier ones are done.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct StreamBatchResponse {
    /// At most one entry: the first failed record's sequence number.
    #[serde(rename = "batchItemFailures")]
    pub batch_item_failures: Vec<StreamItemFailure>,
}

/// A record to deliver again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamItemFailure {
    /// Its sequence number.
    #[serde(rename = "itemIdentifier")]
    pub item_identifier: String,
}

impl Sweeper {
    /// Sessions DynamoDB's TTL removed: each is counted off its user's sessions, exactly once,
    /// and what is left of it is cleared, in the stream's order. At the first record that fails
    /// the batch stops, and that record and the rest are delivered again (the records already
    /// handled are no-ops the second time); a batch that keeps failing is halved by Lambda
    /// (`BisectBatchOnFunctionError`) and, after its retries, its position goes to the on-failure
    /// queue.
    pub async fn expired(&self, event: StreamEvent) -> ExpiryReport {
        let mut report = ExpiryReport::default();
        for record in &event.records {
            let Some((session, user)) = record.expired_session() else { continue };
            match self.store.session_expired(session, &user).await {
                Ok(counted) => {
                    report.expired += 1;
                    if counted {
                        report.counted += 1;
                        info!(%session, %user, "session expired by its TTL; counted off its user");
                    }
                }
                Err(err) => {
                    warn!(%session, error = %err, "could not count an expired session off its user; the stream delivers it again");
                    report.retry_from = Some(record.dynamodb.sequence_number.clone());
                    break;
                }
            }
        }
        report
    }

    /// Handles whichever event invoked the sweeper: the schedule's, or the table stream's.
    pub async fn handle(&self, event: serde_json::Value) -> Result<serde_json::Value, lambda_runtime::Error> {
        let from_stream = event.get("Records").is_some();
        Ok(if from_stream {
            let event: StreamEvent = serde_json::from_value(event)?;
            let report = self.expired(event).await;
            if report.expired > 0 || report.retry_from.is_some() {
                info!(?report, "expiry reports handled");
            }
            let batch_item_failures = report
                .retry_from
                .map(|item_identifier| vec![StreamItemFailure { item_identifier }])
                .unwrap_or_default();
            serde_json::to_value(StreamBatchResponse { batch_item_failures })?
        } else {
            serde_json::to_value(self.sweep().await?)?
        })
    }
}
