//! The sweeper's handler against the embedded emulator, on a hand-driven clock: which overdue
//! turns it ends, in which state and why, and which it leaves alone. The queue points at a port
//! where nothing listens, so a re-drive is recorded but its message is refused (the next sweep
//! after the new deadline tries again).

use chat_core::{
    ClaimOutcome, Clock, NewMessage, Outcome, SendOutcome, Session, SessionId, State, Store, StoreOptions,
    TurnTicket, UserId,
};
use chat_runtime::queue::Queue;
use chat_testkit::LocalDynamo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use sweeper::{SweepReport, Sweeper};

const TABLE: &str = "sweeper";
const START_MS: u64 = 1_800_000_000_000;

struct World {
    _dynamo: LocalDynamo,
    store: Store,
    clock: Arc<AtomicU64>,
    sweeper: Sweeper,
}

impl World {
    async fn start(max_redrives: u32, max_generation_attempts: u32) -> World {
        let dynamo = LocalDynamo::start(0, TABLE).await.expect("emulator");
        let clock = Arc::new(AtomicU64::new(START_MS));
        let store = dynamo.store(TABLE, StoreOptions::default()).with_clock(Clock::Manual(clock.clone()));
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::Config::builder()
                .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
                .region(aws_sdk_sqs::config::Region::new("us-east-1"))
                .credentials_provider(chat_testkit::local_credentials())
                .endpoint_url("http://127.0.0.1:9")
                .retry_config(aws_sdk_sqs::config::retry::RetryConfig::disabled())
                .build(),
        );
        let queue = Queue::new(sqs, "http://127.0.0.1:9/queue/none");
        let sweeper = Sweeper::new(store.clone(), queue, max_redrives, max_generation_attempts);
        World { _dynamo: dynamo, store, clock, sweeper }
    }

    fn advance(&self, by: Duration) {
        self.clock.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    async fn writing(&self) -> TurnTicket {
        let user = UserId::parse("sweeper-user").unwrap();
        let message =
            NewMessage { user: &user, session: None, content: "hi", client_message_id: None, by: "t" };
        match self.store.send_message(message).await.unwrap() {
            SendOutcome::Accepted(ticket) => ticket,
            other => panic!("{other:?}"),
        }
    }

    async fn committed(&self) -> TurnTicket {
        let ticket = self.writing().await;
        match self.store.commit_user_message(&ticket, "t").await.unwrap() {
            Outcome::Applied(ticket) => ticket,
            other => panic!("{other:?}"),
        }
    }

    async fn generating(&self, lease: Duration, attempts: u32) -> SessionId {
        let ticket = self.committed().await;
        match self
            .store
            .claim_generation(ticket.session_id, ticket.turn, "gen", lease, attempts)
            .await
            .unwrap()
        {
            ClaimOutcome::Claimed(_) => ticket.session_id,
            other => panic!("{other:?}"),
        }
    }

    async fn session(&self, id: SessionId) -> Session {
        self.store.get_session(id, true).await.unwrap().expect("session")
    }

    async fn sweep(&self) -> SweepReport {
        self.sweeper.sweep().await.expect("sweep")
    }
}

#[tokio::test]
async fn a_message_that_never_finished_storing_ends_in_error() {
    let world = World::start(3, 3).await;
    let ticket = world.writing().await;
    assert_eq!(world.sweep().await.checked, 0, "not overdue yet");
    world.advance(StoreOptions::default().writing_timeout + Duration::from_millis(1));
    let report = world.sweep().await;
    assert_eq!((report.checked, report.ended, report.redriven), (1, 1, 0));
    let session = world.session(ticket.session_id).await;
    assert_eq!(session.state, State::Error);
    assert_eq!(session.reason.as_deref(), Some("the message was not stored in time"));
    assert_eq!(world.sweep().await.checked, 0, "an ended turn leaves the due index");
}

#[tokio::test]
async fn a_turn_nobody_picked_up_is_redriven_then_timed_out() {
    let world = World::start(1, 3).await;
    let ticket = world.committed().await;
    let pickup = StoreOptions::default().pickup_timeout + Duration::from_millis(1);
    world.advance(pickup);
    // The re-drive is recorded (and its deadline moved) before the message is sent; sending
    // fails here, so it is not counted as re-driven.
    let report = world.sweep().await;
    assert_eq!((report.checked, report.ended, report.redriven), (1, 0, 0));
    let session = world.session(ticket.session_id).await;
    assert_eq!((session.state, session.redrives), (State::UserCommitted, 1));
    assert_eq!(world.sweep().await.checked, 0, "the re-drive moved the deadline");
    // Re-drives spent: the next overdue sweep ends the turn.
    world.advance(pickup);
    let report = world.sweep().await;
    assert_eq!((report.checked, report.ended), (1, 1));
    let session = world.session(ticket.session_id).await;
    assert_eq!(session.state, State::Timeout);
    assert_eq!(session.reason.as_deref(), Some("no generator picked the turn up in time"));
}

#[tokio::test]
async fn a_live_lease_is_left_alone_and_a_spent_one_times_out() {
    let world = World::start(3, 1).await;
    let lease = Duration::from_secs(30);
    let id = world.generating(lease, 1).await;
    world.advance(lease - Duration::from_secs(1));
    assert_eq!(world.sweep().await.checked, 0, "the lease still holds");
    assert_eq!(world.session(id).await.state, State::AiGenerating);
    world.advance(Duration::from_secs(2));
    // Its one attempt is spent: no re-drive, the turn ends.
    let report = world.sweep().await;
    assert_eq!((report.checked, report.ended, report.redriven), (1, 1, 0));
    let session = world.session(id).await;
    assert_eq!(session.state, State::Timeout);
    assert_eq!(session.reason.as_deref(), Some("generation stalled and its retries are spent"));
    let events: Vec<_> = world.store.transitions(id).await.unwrap().into_iter().map(|t| t.event).collect();
    assert_eq!(events.last(), Some(&chat_core::Event::LeaseExpired));
}
