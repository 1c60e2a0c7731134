//! Per-user limits against a real DynamoDB emulator, with racing callers: the conditional
//! writes, not process memory, decide who gets the last unit.

mod common;

use aws_sdk_dynamodb::types::AttributeValue;
use chat_core::*;
use common::TestDb;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

fn new_user() -> UserId {
    UserId::parse(&format!("user-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

/// Runs `n` copies of `f` at once (released together by a barrier) and collects their answers.
async fn race<T, F, Fut>(n: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let work = f(i);
            tokio::spawn(async move {
                barrier.wait().await;
                work.await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    answers
}

fn admitted(answers: &[Admission]) -> usize {
    answers.iter().filter(|a| **a == Admission::Admitted).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_turns_take_exactly_the_bucket_then_wait_for_the_refill() {
    let db = TestDb::start().await;
    let store = db.store();
    for round in 0..5 {
        let user = new_user();
        // 4 per minute: a burst of 4, then one turn every 15 s.
        let answers = race(10, |_| {
            let (store, user) = (store.clone(), user.clone());
            async move { store.take_turn(&user, 4).await.expect("take") }
        })
        .await;
        assert_eq!(admitted(&answers), 4, "round {round}: {answers:?}");
        for answer in &answers {
            if let Admission::Limited { retry_after } = answer {
                assert_eq!(*retry_after, Duration::from_secs(15), "round {round}");
            }
        }
    }
    let user = new_user();
    for _ in 0..4 {
        assert_eq!(store.take_turn(&user, 4).await.unwrap(), Admission::Admitted);
    }
    db.advance_ms(14_000);
    assert_eq!(
        store.take_turn(&user, 4).await.unwrap(),
        Admission::Limited { retry_after: Duration::from_secs(1) }
    );
    db.advance_ms(1_000);
    assert_eq!(store.take_turn(&user, 4).await.unwrap(), Admission::Admitted);
    assert!(matches!(store.take_turn(&user, 4).await.unwrap(), Admission::Limited { .. }));
    // A refund (the send turned out to be a repeat) gives the turn back; a second refund of a
    // full bucket does not make it fuller.
    store.return_turn(&user, 4).await.unwrap();
    assert_eq!(store.take_turn(&user, 4).await.unwrap(), Admission::Admitted);
    // Other users are untouched, and 0 is no limit.
    assert_eq!(store.take_turn(&new_user(), 4).await.unwrap(), Admission::Admitted);
    for _ in 0..50 {
        assert_eq!(store.take_turn(&user, 0).await.unwrap(), Admission::Admitted);
    }
    db.advance_ms(3_600_000);
    let idle = new_user();
    store.return_turn(&idle, 4).await.unwrap();
    let answers = race(8, |_| {
        let (store, idle) = (store.clone(), idle.clone());
        async move { store.take_turn(&idle, 4).await.expect("take") }
    })
    .await;
    assert_eq!(admitted(&answers), 4, "a refund on an empty record must not add room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_streams_get_exactly_the_slots_and_a_dead_streams_slot_lapses() {
    let db = TestDb::start().await;
    let store = db.store();
    let hold = Duration::from_secs(660);
    for round in 0..5 {
        let user = new_user();
        let answers = race(8, |i| {
            let (store, user) = (store.clone(), user.clone());
            async move { (i, store.open_stream(&user, &format!("s{i}"), 3, hold).await.expect("open")) }
        })
        .await;
        let winners: Vec<usize> =
            answers.iter().filter(|(_, a)| *a == Admission::Admitted).map(|(i, _)| *i).collect();
        assert_eq!(winners.len(), 3, "round {round}: {answers:?}");
        assert!(answers.iter().all(|(_, a)| matches!(a, Admission::Admitted | Admission::Limited { .. })));
        // Closing one frees exactly one slot; closing it again (or an unknown id) changes nothing.
        store.close_stream(&user, &format!("s{}", winners[0])).await.unwrap();
        store.close_stream(&user, &format!("s{}", winners[0])).await.unwrap();
        store.close_stream(&user, "never-opened").await.unwrap();
        let answers = race(4, |i| {
            let (store, user) = (store.clone(), user.clone());
            async move { store.open_stream(&user, &format!("again{i}"), 3, hold).await.expect("open") }
        })
        .await;
        assert_eq!(admitted(&answers), 1, "round {round}: {answers:?}");
    }
    // A stream that died without closing holds its slot only until `hold` passes.
    let user = new_user();
    assert_eq!(store.open_stream(&user, "dead", 1, hold).await.unwrap(), Admission::Admitted);
    assert!(matches!(store.open_stream(&user, "next", 1, hold).await.unwrap(), Admission::Limited { .. }));
    db.advance_ms(hold.as_millis() as u64 + 1);
    assert_eq!(store.open_stream(&user, "next", 1, hold).await.unwrap(), Admission::Admitted);
    // Closing a user's stream that was never limited (limits off) is harmless.
    store.close_stream(&new_user(), "x").await.unwrap();
    assert_eq!(store.open_stream(&user, "free", 0, hold).await.unwrap(), Admission::Admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_new_sessions_stop_at_the_cap_and_a_delete_frees_a_place() {
    let db = TestDb::start().await;
    let options = StoreOptions { max_sessions_per_user: 3, ..StoreOptions::default() };
    let store = Store::new(db.client(), common::TABLE, options).with_clock(Clock::Manual(db.clock.clone()));
    let user = new_user();
    let answers = race(10, |i| {
        let (store, user) = (store.clone(), user.clone());
        async move {
            let text = format!("hello {i}");
            let msg =
                NewMessage { user: &user, session: None, content: &text, client_message_id: None, by: "t" };
            store.send_message(msg).await.expect("send")
        }
    })
    .await;
    let mut sessions = Vec::new();
    for answer in answers {
        match answer {
            SendOutcome::Accepted(ticket) => sessions.push(ticket),
            SendOutcome::SessionLimit { limit } => assert_eq!(limit, 3),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sessions.len(), 3);
    assert_eq!(store.session_count(&user).await.unwrap(), 3);
    let page = store.list_user_sessions(&user, 100, None).await.unwrap();
    assert_eq!(page.sessions.len(), 3, "refused sends leave no session behind");

    // A new turn in an existing session is not a new session: the cap does not apply.
    let first = &sessions[0];
    let Outcome::Applied(t) = store.commit_user_message(first, "t").await.unwrap() else { panic!() };
    let current = store.get_session(t.session_id, Read::Consistent).await.unwrap().unwrap();
    store.end_turn(&current, Event::ProcessingFailed, "test", "t").await.unwrap();
    let current = store.get_session(t.session_id, Read::Consistent).await.unwrap().unwrap();
    assert!(!current.state.turn_in_flight());
    let msg = NewMessage {
        user: &user,
        session: Some(t.session_id),
        content: "more",
        client_message_id: None,
        by: "t",
    };
    assert!(matches!(store.send_message(msg).await.unwrap(), SendOutcome::Accepted(_)));

    // Two racing deletes of one session move the count once.
    let gone = sessions[1].session_id;
    let deletes = race(2, |_| {
        let (store, user) = (store.clone(), user.clone());
        async move { store.delete_session(gone, Some(&user)).await.expect("delete") }
    })
    .await;
    assert!(deletes.iter().all(|d| matches!(d, DeleteOutcome::Deleted { .. } | DeleteOutcome::NotFound)));
    assert!(store.get_session(gone, Read::Consistent).await.unwrap().is_none());
    assert_eq!(store.session_count(&user).await.unwrap(), 2);
    let msg = NewMessage { user: &user, session: None, content: "again", client_message_id: None, by: "t" };
    assert!(matches!(store.send_message(msg).await.unwrap(), SendOutcome::Accepted(_)));
    let msg = NewMessage { user: &user, session: None, content: "over", client_message_id: None, by: "t" };
    assert!(matches!(store.send_message(msg).await.unwrap(), SendOutcome::SessionLimit { limit: 3 }));
    // Another user has a place of their own.
    let other = new_user();
    let msg = NewMessage { user: &other, session: None, content: "hi", client_message_id: None, by: "t" };
    assert!(matches!(store.send_message(msg).await.unwrap(), SendOutcome::Accepted(_)));
}

/// One user's burst (a page opening several chats, a script) must not turn into errors: racing
/// takes with room for all are all admitted, without running out of retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_within_the_limits_is_all_admitted() {
    let db = TestDb::start().await;
    let store = db.store();
    for round in 0..3 {
        let user = new_user();
        let turns = race(24, |_| {
            let (store, user) = (store.clone(), user.clone());
            async move { store.take_turn(&user, 30).await }
        })
        .await;
        assert!(turns.iter().all(|t| matches!(t, Ok(Admission::Admitted))), "round {round}: {turns:?}");
        let streams = race(16, |i| {
            let (store, user) = (store.clone(), user.clone());
            async move { store.open_stream(&user, &format!("s{i}"), 16, Duration::from_secs(60)).await }
        })
        .await;
        assert!(streams.iter().all(|s| matches!(s, Ok(Admission::Admitted))), "round {round}: {streams:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_streams_of_one_turn_get_exactly_its_slots() {
    let db = TestDb::start().await;
    let store = db.store();
    let hold = Duration::from_secs(660);
    let (session, turn) = (SessionId::new(), Turn::FIRST);
    let answers =
        race(5, |i| {
            let store = store.clone();
            async move {
                (i, store.open_turn_stream(session, turn, &format!("s{i}"), 2, hold).await.expect("open"))
            }
        })
        .await;
    let winners: Vec<usize> =
        answers.iter().filter(|(_, a)| *a == Admission::Admitted).map(|(i, _)| *i).collect();
    assert_eq!(winners.len(), 2, "{answers:?}");
    // Another turn, and the same turn once a stream closes, have room again.
    assert_eq!(
        store.open_turn_stream(session, turn.next(), "other", 2, hold).await.unwrap(),
        Admission::Admitted
    );
    store.close_turn_stream(session, turn, &format!("s{}", winners[0])).await.unwrap();
    assert_eq!(store.open_turn_stream(session, turn, "late", 2, hold).await.unwrap(), Admission::Admitted);
    assert!(matches!(
        store.open_turn_stream(session, turn, "over", 2, hold).await.unwrap(),
        Admission::Limited { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_turns_of_one_user_get_exactly_their_slots_in_flight_and_a_session_holds_one() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = UserId::parse("busy-user").unwrap();
    let sessions: Vec<SessionId> = (0..8).map(|_| SessionId::new()).collect();
    let answers = race(8, |i| {
        let (store, user, session) = (store.clone(), user.clone(), sessions[i]);
        async move { (session, store.open_turn_slot(&user, session, 3).await.expect("open")) }
    })
    .await;
    let holders: Vec<SessionId> =
        answers.iter().filter(|(_, a)| *a == Admission::Admitted).map(|(s, _)| *s).collect();
    assert_eq!(holders.len(), 3, "{answers:?}");
    // A session that holds a slot takes it again (its one turn); another session waits.
    assert_eq!(store.open_turn_slot(&user, holders[0], 3).await.unwrap(), Admission::Admitted);
    let waiting = answers.iter().find(|(_, a)| *a != Admission::Admitted).map(|(s, _)| *s).unwrap();
    assert!(matches!(store.open_turn_slot(&user, waiting, 3).await.unwrap(), Admission::Limited { .. }));
    // Another user is not held back; a turn that ends gives its slot back.
    let other = UserId::parse("other-user").unwrap();
    assert_eq!(store.open_turn_slot(&other, waiting, 3).await.unwrap(), Admission::Admitted);
    store.close_turn_slot(&user, holders[1]).await.unwrap();
    store.close_turn_slot(&user, holders[1]).await.unwrap();
    assert_eq!(store.open_turn_slot(&user, waiting, 3).await.unwrap(), Admission::Admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_turns_take_exactly_the_global_bucket_and_a_refund_gives_one_back() {
    let db = TestDb::start().await;
    let store = db.store();
    let answers = race(10, |_| {
        let store = store.clone();
        async move { store.take_global_turn(4).await.expect("take") }
    })
    .await;
    assert_eq!(admitted(&answers), 4, "{answers:?}");
    // Every user draws on the one bucket; a refund (the send started no turn) gives one back.
    assert!(matches!(store.take_global_turn(4).await.unwrap(), Admission::Limited { .. }));
    store.return_global_turn(4).await.unwrap();
    assert_eq!(store.take_global_turn(4).await.unwrap(), Admission::Admitted);
    assert_eq!(store.take_global_turn(0).await.unwrap(), Admission::Admitted, "0 is no ceiling");
    db.advance_ms(15_000);
    assert_eq!(store.take_global_turn(4).await.unwrap(), Admission::Admitted, "it refills");
}

/// A store with a daily budget of `budget` tokens per user, on the test clock.
fn budgeted(db: &TestDb, budget: u64) -> Store {
    let options = StoreOptions { daily_token_budget: budget, ..StoreOptions::default() };
    Store::new(db.client(), common::TABLE, options).with_clock(Clock::Manual(db.clock.clone()))
}

/// Sends `text` as `user` (continuing `session`), commits it and claims it for generation.
async fn claimed_turn(store: &Store, user: &UserId, session: Option<SessionId>, owner: &str) -> Lease {
    let msg = NewMessage { user, session, content: "hello", client_message_id: None, by: "t" };
    let SendOutcome::Accepted(ticket) = store.send_message(msg).await.unwrap() else { panic!("refused") };
    let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "t").await.unwrap() else { panic!() };
    let claim = store
        .claim_generation(ticket.session_id, ticket.turn, owner, Duration::from_secs(30), 3)
        .await
        .unwrap();
    let ClaimOutcome::Claimed(lease) = claim else { panic!("{claim:?}") };
    lease
}

fn spent(tokens: u64) -> Usage {
    Usage { input: tokens / 2, output: tokens - tokens / 2, ..Usage::default() }
}

#[tokio::test]
async fn a_user_over_the_daily_token_budget_is_refused_a_turn_until_the_day_ends() {
    let db = TestDb::start().await;
    let store = budgeted(&db, 100);
    let user = new_user();
    let lease = claimed_turn(&store, &user, None, "gen-1").await;
    assert_eq!(lease.user, user);
    let reply = Reply { usage: spent(90), ..Reply::new("reply") };
    assert!(matches!(store.commit_reply(&lease, &reply).await.unwrap(), Outcome::Applied(_)));
    assert_eq!(store.tokens_used_today(&user).await.unwrap(), 90);
    // 90 of 100: the next turn is admitted, and it spends 20 more.
    let session = lease.session_id;
    let lease = claimed_turn(&store, &user, Some(session), "gen-2").await;
    let current = store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    assert!(matches!(
        store.fail_generation(&lease, &current, "the model failed", spent(20)).await.unwrap(),
        Outcome::Applied(_)
    ));
    assert_eq!(store.tokens_used_today(&user).await.unwrap(), 110, "a failed turn's spend counts too");
    // Over it: refused, and nothing is written (no turn, no session, no message).
    let before = store.get_session(session, Read::Consistent).await.unwrap().unwrap();
    let again =
        NewMessage { user: &user, session: Some(session), content: "more", client_message_id: None, by: "t" };
    let SendOutcome::BudgetExhausted(over) = store.send_message(again.clone()).await.unwrap() else {
        panic!("admitted")
    };
    assert_eq!((over.used, over.limit), (110, 100));
    assert_eq!(chat_core::time::rfc3339_ms(over.resets_at), "2027-01-16T00:00:00.000Z", "the next 00:00 UTC");
    assert_eq!(store.get_session(session, Read::Consistent).await.unwrap().unwrap(), before);
    let fresh = NewMessage { session: None, ..again.clone() };
    assert!(matches!(store.send_message(fresh).await.unwrap(), SendOutcome::BudgetExhausted(_)));
    assert_eq!(store.list_user_sessions(&user, 10, None).await.unwrap().sessions.len(), 1, "no new session");
    // Other users have their own budget; the next UTC day starts from zero.
    let other = new_user();
    let msg = NewMessage { user: &other, session: None, content: "hi", client_message_id: None, by: "t" };
    assert!(matches!(store.send_message(msg).await.unwrap(), SendOutcome::Accepted(_)));
    db.advance_ms(over.resets_at - db.clock.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(store.tokens_used_today(&user).await.unwrap(), 0);
    assert!(matches!(store.send_message(again).await.unwrap(), SendOutcome::Accepted(_)));
}

#[tokio::test]
async fn a_turns_spend_is_charged_once_however_its_commit_is_retried_or_fenced() {
    let db = TestDb::start().await;
    let store = budgeted(&db, 1_000);
    let user = new_user();
    let lease = claimed_turn(&store, &user, None, "gen-1").await;
    let reply = Reply { usage: spent(40), ..Reply::new("reply") };
    assert!(matches!(store.commit_reply(&lease, &reply).await.unwrap(), Outcome::Applied(_)));
    // The same commit again (a redelivery, a retry after a lost answer): refused, nothing counted.
    assert!(matches!(store.commit_reply(&lease, &reply).await.unwrap(), Outcome::Conflict(_)));
    assert_eq!(store.tokens_used_today(&user).await.unwrap(), 40);
    // A summary is counted once per marker.
    assert!(store.charge_once(&user, "summary#s#1", 7).await.unwrap());
    assert!(!store.charge_once(&user, "summary#s#1", 7).await.unwrap());
    assert_eq!(store.tokens_used_today(&user).await.unwrap(), 47);
    // Many markers leave the day's count a small item: each marker is an item of its own.
    for n in 0..50 {
        assert!(store.charge_once(&user, &format!("abandoned#gen-{n:040}"), 1).await.unwrap());
    }
    assert_eq!(store.tokens_used_today(&user).await.unwrap(), 97);
    let days = db
        .client()
        .query()
        .table_name(common::TABLE)
        .key_condition_expression("#pk = :pk AND begins_with(#sk, :day)")
        .expression_attribute_names("#pk", chat_core::table::PK)
        .expression_attribute_names("#sk", chat_core::table::SK)
        .expression_attribute_values(":pk", AttributeValue::S(chat_core::table::user_pk(&user)))
        .expression_attribute_values(":day", AttributeValue::S("LIMIT#tokens#".to_owned()))
        .send()
        .await
        .unwrap();
    let [counter] = days.items() else { panic!("one day's item: {days:?}") };
    assert!(counter.len() <= 4, "the day's item holds its count, not markers: {counter:?}");
    // Without a budget nothing is counted (and nothing costs a write).
    let free = budgeted(&db, 0);
    let other = new_user();
    let lease = claimed_turn(&free, &other, None, "gen-2").await;
    assert!(matches!(free.commit_reply(&lease, &reply).await.unwrap(), Outcome::Applied(_)));
    assert_eq!(free.tokens_used_today(&other).await.unwrap(), 0);
}

#[tokio::test]
async fn a_reply_is_stored_with_its_usage_and_cost_in_its_commit_and_a_user_message_with_neither() {
    let db = TestDb::start().await;
    let store = budgeted(&db, 0);
    let user = new_user();
    let lease = claimed_turn(&store, &user, None, "gen-1").await;
    let usage = Usage { input: 12, output: 34, cache_read: 56, cache_write: 7 };
    let reply = Reply { usage, cost_usd: Some(0.00123), ..Reply::new("reply") };
    assert!(matches!(store.commit_reply(&lease, &reply).await.unwrap(), Outcome::Applied(_)));
    let stored = store
        .get_message(lease.session_id, lease.turn, Role::Assistant, Read::Consistent)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stored.usage, stored.cost_usd), (Some(usage), Some(0.00123)));
    let asked = store.get_message(lease.session_id, lease.turn, Role::User, Read::Consistent).await.unwrap();
    assert_eq!(asked.map(|m| (m.usage, m.cost_usd)), Some((None, None)));
    // A reply whose model has no price keeps its usage, and no cost.
    let lease = claimed_turn(&store, &user, Some(lease.session_id), "gen-2").await;
    let reply = Reply { usage, ..Reply::new("unpriced") };
    assert!(matches!(store.commit_reply(&lease, &reply).await.unwrap(), Outcome::Applied(_)));
    let stored = store
        .get_message(lease.session_id, lease.turn, Role::Assistant, Read::Consistent)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stored.usage, stored.cost_usd), (Some(usage), None));
}
