//! The sweeper: runs on a schedule and makes sure no turn stays in flight forever. A turn whose
//! deadline passed is re-driven (sent to the queue again) a bounded number of times, then ended
//! in `timeout` (or `error` for a message that never finished storing).

use chat_core::config::{CommonConfig, ConfigError, Env};
use chat_core::queue::TurnMessage;
use chat_core::{fsm, Outcome, Session, Store, StoreError};
use chat_runtime::queue::{Queue, QueueError};
use serde::Serialize;
use tracing::{info, warn};

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Overdue sessions examined.
    pub checked: usize,
    /// Turns sent to the generator again.
    pub redriven: usize,
    /// Turns ended in `error` or `timeout`.
    pub ended: usize,
}

/// Settling one turn failed; the next sweep tries again.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// DynamoDB failed.
    #[error(transparent)]
    Store(StoreError),
    /// SQS failed.
    #[error(transparent)]
    Queue(QueueError),
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

    /// One pass over the overdue turns.
    pub async fn sweep(&self) -> Result<SweepReport, lambda_runtime::Error> {
        let now = self.store.now_ms();
        let mut report = SweepReport::default();
        let overdue = self.store.overdue_sessions(now, 100).await?;
        for id in overdue {
            // The index is eventually consistent: decide on a fresh read of the session.
            let Some(session) = self.store.get_session(id, true).await? else { continue };
            if session.due_at.is_none_or(|due| due > now) {
                continue;
            }
            report.checked += 1;
            match self.settle(&session, now).await {
                Ok(Action::Redriven) => report.redriven += 1,
                Ok(Action::Ended) => report.ended += 1,
                Ok(Action::None) => {}
                Err(err) => {
                    warn!(session = %id, error = %err, "could not settle an overdue turn; next sweep retries")
                }
            }
        }
        info!(?report, "sweep done");
        Ok(report)
    }

    async fn settle(&self, session: &Session, now: u64) -> Result<Action, SweepError> {
        let lease_live = session.lease.as_ref().is_some_and(|l| l.expires_at > now);
        let Some((event, reason)) = fsm::expiry(session.state).filter(|_| !lease_live) else {
            return Ok(Action::None);
        };
        let can_redrive = fsm::retryable(session.state, session.attempts, self.max_generation_attempts);
        if can_redrive && session.redrives < self.max_redrives {
            if let Outcome::Applied(n) =
                self.store.record_redrive(session).await.map_err(SweepError::Store)?
            {
                self.queue
                    .send(TurnMessage { session_id: session.id, turn: session.turn })
                    .await
                    .map_err(SweepError::Queue)?;
                info!(session = %session.id, turn = %session.turn, redrive = n, state = %session.state, "re-driven");
                return Ok(Action::Redriven);
            }
            return Ok(Action::None);
        }
        match self.store.end_turn(session, event, reason, "sweeper").await.map_err(SweepError::Store)? {
            Outcome::Applied(_) => {
                info!(session = %session.id, turn = %session.turn, %event, "turn ended");
                Ok(Action::Ended)
            }
            Outcome::Conflict(_) => Ok(Action::None),
        }
    }
}

enum Action {
    Redriven,
    Ended,
    None,
}
