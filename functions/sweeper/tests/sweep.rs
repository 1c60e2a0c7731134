//! The sweeper's handler against the embedded emulator, on a hand-driven clock: which overdue
//! turns it ends, in which state and why, and which it leaves alone. The queue points at a port
//! where nothing listens, so a re-drive is recorded but its message is refused (the next sweep
//! after the new deadline tries again).

use chat_core::{
    AppendOutcome, ClaimOutcome, ClientMessageId, Clock, Event, NewMessage, Outcome, Read, Reply,
    SendOutcome, Session, SessionId, State, Store, StoreOptions, TurnTicket, UserId,
};
use chat_runtime::queue::Queue;
use chat_testkit::LocalDynamo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use sweeper::{ExpiryReport, StreamEvent, SweepReport, Sweeper};

const TABLE: &str = "sweeper";
const START_MS: u64 = 1_800_000_000_000;

struct World {
    dynamo: LocalDynamo,
    store: Store,
    clock: Arc<AtomicU64>,
    sweeper: Sweeper,
}

impl World {
    async fn start(max_redrives: u32, max_generation_attempts: u32) -> World {
        World::start_at(START_MS, StoreOptions::default(), max_redrives, max_generation_attempts).await
    }

    async fn start_at(
        start_ms: u64,
        options: StoreOptions,
        max_redrives: u32,
        max_generation_attempts: u32,
    ) -> World {
        let dynamo = LocalDynamo::start(0, TABLE).await.expect("emulator");
        let clock = Arc::new(AtomicU64::new(start_ms));
        let store = dynamo.store(TABLE, options).with_clock(Clock::Manual(clock.clone()));
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
        World { dynamo, store, clock, sweeper }
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

    /// A session whose first turn has a committed reply.
    async fn answered(&self) -> SessionId {
        let ticket = self.committed().await;
        let claim = self
            .store
            .claim_generation(ticket.session_id, ticket.turn, "gen", Duration::from_secs(30), 3)
            .await
            .unwrap();
        let ClaimOutcome::Claimed(lease) = claim else { panic!("{claim:?}") };
        assert_eq!(
            self.store.append_chunk(&lease, 0, 0, &["hello".to_owned()]).await.unwrap(),
            AppendOutcome::Appended
        );
        assert!(matches!(
            self.store.commit_reply(&lease, &Reply::new("hello")).await.unwrap(),
            Outcome::Applied(_)
        ));
        ticket.session_id
    }

    async fn session(&self, id: SessionId) -> Session {
        self.store.get_session(id, Read::Consistent).await.unwrap().expect("session")
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
    assert_eq!(world.sweep().await.checked, 0, "an ended turn's next deadline is its idle expiry");
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

#[tokio::test]
async fn a_quiet_session_is_expired_and_a_lost_summary_job_is_sent_again_then_given_up() {
    let world = World::start(1, 3).await;
    let id = world.answered().await;
    let idle = StoreOptions::default().idle_timeout.expect("an idle timeout by default");
    world.advance(idle - Duration::from_secs(1));
    assert_eq!(world.sweep().await.checked, 0, "not idle long enough yet");
    world.advance(Duration::from_secs(2));
    // Expired; the summary job cannot be sent here (no queue), so none is counted as asked.
    let report = world.sweep().await;
    assert_eq!((report.checked, report.idled, report.summaries_requested), (1, 0, 0));
    let session = world.session(id).await;
    assert_eq!((session.state, session.summary_pending), (State::Timeout, true));
    assert_eq!(session.reason.as_deref(), Some("the session was idle past its limit"));
    let events: Vec<Event> =
        world.store.transitions(id).await.unwrap().into_iter().map(|t| t.event).collect();
    assert_eq!(&events[events.len() - 2..], &[Event::Settle, Event::IdleExpired]);
    assert_eq!(world.sweep().await.checked, 0, "the summary has until the pickup timeout");

    // The job did not arrive: it is sent again (once: max re-drives 1), then given up.
    let pickup = StoreOptions::default().pickup_timeout + Duration::from_millis(1);
    world.advance(pickup);
    assert_eq!(world.sweep().await.checked, 1);
    assert_eq!(world.session(id).await.redrives, 1);
    world.advance(pickup);
    assert_eq!(world.sweep().await.checked, 1);
    let session = world.session(id).await;
    assert_eq!((session.summary_pending, session.due_at, session.summary), (false, None, None));
    world.advance(Duration::from_secs(86_400));
    assert_eq!(world.sweep().await.checked, 0, "nothing further is due");
    // Still a session the user can go on with.
    assert_eq!(session.state, State::Timeout);
}

#[tokio::test]
async fn every_item_of_a_session_expires_and_its_removal_is_counted_off_its_user_exactly_once() {
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let retention = StoreOptions::default().retention.expect("a retention by default");
    let options = StoreOptions { max_sessions_per_user: 1, ..StoreOptions::default() };
    // Everything is written a day more than the retention ago: it has all expired by now.
    let written_at = now_ms - retention.as_millis() as u64 - 86_400_000;
    let world = World::start_at(written_at, options, 3, 3).await;
    let user = UserId::parse("sweeper-user").unwrap();
    let key = ClientMessageId::parse("retry-me").unwrap();
    let send =
        |session, key| NewMessage { user: &user, session, content: "hi", client_message_id: key, by: "t" };
    let SendOutcome::Accepted(ticket) = world.store.send_message(send(None, Some(&key))).await.unwrap()
    else {
        panic!("refused")
    };
    let Outcome::Applied(_) = world.store.commit_user_message(&ticket, "t").await.unwrap() else { panic!() };
    let claim = world
        .store
        .claim_generation(ticket.session_id, ticket.turn, "gen", Duration::from_secs(30), 3)
        .await
        .unwrap();
    let ClaimOutcome::Claimed(lease) = claim else { panic!("{claim:?}") };
    world.store.append_chunk(&lease, 0, 0, &["hello".to_owned()]).await.unwrap();
    world.store.commit_reply(&lease, &Reply::new("hello")).await.unwrap();
    assert!(matches!(
        world.store.send_message(send(None, None)).await.unwrap(),
        SendOutcome::SessionLimit { limit: 1 }
    ));
    let mut stream = world.dynamo.stream(TABLE).unwrap();

    // DynamoDB's TTL process runs: the session, its messages, chunk, transitions and the
    // idempotency key all go (the session counter and the rate bucket are not session data).
    world.clock.store(now_ms, Ordering::SeqCst);
    let removed = world.dynamo.sweep_ttl().unwrap();
    // The session, two messages, a chunk, four transitions and the idempotency key.
    assert!(removed > 1 + 2 + 1 + 4, "removed {removed}");
    let id = ticket.session_id;
    assert!(world.store.get_session(id, Read::Consistent).await.unwrap().is_none());
    assert!(world.store.transitions(id).await.unwrap().is_empty());
    assert!(world.store.read_chunks(id, ticket.turn, None, Read::Consistent).await.unwrap().is_empty());
    assert_eq!(world.store.clear_if_deleted(id).await.unwrap(), 0, "no item outlived the session");

    // The stream carries every write and the removals; only the session's removal by TTL counts,
    // and delivering the batch again counts nothing twice.
    let event: StreamEvent = serde_json::from_value(stream.next_event().unwrap().expect("records")).unwrap();
    assert!(event.records.len() > removed, "writes and removals: {}", event.records.len());
    let report = world.sweeper.expired(event.clone()).await;
    assert_eq!(report, ExpiryReport { expired: 1, counted: 1, retry_from: None });
    assert_eq!(world.sweeper.expired(event).await, ExpiryReport { expired: 1, counted: 0, retry_from: None });

    // The user's place is free again, exactly one: the count is back to 0, not below.
    let SendOutcome::Accepted(fresh) = world.store.send_message(send(None, Some(&key))).await.unwrap() else {
        panic!("the expired session still counts")
    };
    assert_ne!(fresh.session_id, id, "the expired idempotency key starts a new session");
    assert!(matches!(
        world.store.send_message(send(None, None)).await.unwrap(),
        SendOutcome::SessionLimit { limit: 1 }
    ));
}

#[tokio::test]
async fn a_session_whose_last_turn_failed_expires_too_and_keeps_why_it_failed() {
    let world = World::start(3, 3).await;
    let ticket = world.writing().await;
    world.advance(StoreOptions::default().writing_timeout + Duration::from_millis(1));
    assert_eq!(world.sweep().await.ended, 1);
    let idle = StoreOptions::default().idle_timeout.expect("an idle timeout by default");
    world.advance(idle + Duration::from_secs(1));
    assert_eq!(world.sweep().await.checked, 1);
    let session = world.session(ticket.session_id).await;
    assert_eq!((session.state, session.summary_pending), (State::Timeout, true));
    assert_eq!(
        session.reason.as_deref(),
        Some("the message was not stored in time"),
        "still why it has no answer"
    );
    let events: Vec<Event> =
        world.store.transitions(ticket.session_id).await.unwrap().into_iter().map(|t| t.event).collect();
    assert_eq!(&events[events.len() - 2..], &[Event::Recover, Event::IdleExpired]);
}

#[tokio::test]
async fn a_batch_that_cannot_be_handled_is_delivered_again_from_its_first_expired_session() {
    let World { dynamo, sweeper, .. } = World::start(3, 3).await;
    // DynamoDB unreachable: counting the expired session off its user fails.
    drop(dynamo);
    let removed = |seq: &str, sk: &str| {
        serde_json::json!({
            "eventName": "REMOVE",
            "userIdentity": {"type": "Service", "principalId": "dynamodb.amazonaws.com"},
            "dynamodb": {
                "SequenceNumber": seq,
                "Keys": {"pk": {"S": format!("S#{}", SessionId::new())}, "sk": {"S": sk}},
                "OldImage": {"user_id": {"S": "sweeper-user"}},
            },
        })
    };
    // A chunk's removal is not a session's: nothing to do for it, so the batch fails at the next.
    let batch = serde_json::json!({"Records": [removed("100", "CHUNK#00000001#00000000"), removed("200", "SESSION"), removed("300", "SESSION")]});
    let report = sweeper.expired(serde_json::from_value(batch.clone()).unwrap()).await;
    assert_eq!(report, ExpiryReport { expired: 0, counted: 0, retry_from: Some("200".to_owned()) });
    let answer = sweeper.handle(batch).await.unwrap();
    assert_eq!(answer, serde_json::json!({"batchItemFailures": [{"itemIdentifier": "200"}]}));
}

#[tokio::test]
async fn a_handled_batch_asks_for_nothing_again() {
    let world = World::start(3, 3).await;
    let answer = world.sweeper.handle(serde_json::json!({"Records": []})).await.unwrap();
    assert_eq!(answer, serde_json::json!({"batchItemFailures": []}));
}

#[tokio::test]
async fn a_sweep_with_nothing_due_reads_at_most_one_unit_per_shard_however_many_sessions_wait() {
    use futures::StreamExt;
    let world = World::start(3, 3).await;
    // A thousand turns waiting for a generator, each with a deadline a minute away.
    let waiting: Vec<TurnTicket> =
        futures::stream::iter(0..1000).map(|_| world.committed()).buffer_unordered(16).collect().await;
    assert_eq!(waiting.len(), 1000);
    let before = world.store.capacity();
    let report = world.sweep().await;
    let read = world.store.capacity().read_units - before.read_units;
    assert_eq!(report.checked, 0, "nothing is due");
    assert!(read <= f64::from(chat_core::table::DUE_SHARDS), "a sweep read {read} units");
}
