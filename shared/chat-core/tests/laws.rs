//! The laws of docs/architecture.md, proved against a real DynamoDB emulator with real concurrency.

mod common;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use chat_core::fsm::transition;
use chat_core::store::SessionCursor;
use chat_core::*;
use common::{client_for, store_on, LossyProxy, TestDb};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(30);
const MAX_ATTEMPTS: u32 = 3;

fn new_user() -> UserId {
    UserId::parse(&format!("user-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

fn lease_id() -> String {
    format!("lease-{}", uuid::Uuid::new_v4().simple())
}

fn tokens(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

async fn send(store: &Store, user: &UserId, session: Option<SessionId>, text: &str) -> SendOutcome {
    store
        .send_message(NewMessage { user, session, content: text, client_message_id: None, by: "req-test" })
        .await
        .expect("send")
}

async fn revise(
    store: &Store,
    current: &Session,
    revision: Revision<'_>,
    key: Option<&ClientMessageId>,
) -> SendOutcome {
    let revised = RevisedTurn {
        user: &current.user_id,
        session: current.id,
        revision,
        expected_last: None,
        client_message_id: key,
        by: "req-test",
    };
    store.revise_turn(revised).await.expect("revise")
}

fn accepted(outcome: SendOutcome) -> TurnTicket {
    match outcome {
        SendOutcome::Accepted(ticket) => ticket,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

async fn session(store: &Store, id: SessionId) -> Session {
    store.get_session(id, Read::Consistent).await.unwrap().expect("session exists")
}

/// A new session whose first turn is `user_committed`.
async fn committed_turn(store: &Store, user: &UserId, session_id: Option<SessionId>) -> TurnTicket {
    let ticket = accepted(send(store, user, session_id, "hello").await);
    match store.commit_user_message(&ticket, "req-test").await.unwrap() {
        Outcome::Applied(ticket) => ticket,
        other => panic!("commit_user_message: {other:?}"),
    }
}

async fn claim(store: &Store, id: SessionId, turn: Turn) -> ClaimOutcome {
    store.claim_generation(id, turn, &lease_id(), LEASE, MAX_ATTEMPTS).await.expect("claim")
}

fn claimed(outcome: ClaimOutcome) -> Lease {
    match outcome {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

/// Drives a fresh session into `state` through the store's own operations.
async fn session_in(store: &Store, user: &UserId, state: State) -> Session {
    let ticket = accepted(send(store, user, None, "hello").await);
    let id = ticket.session_id;
    if state == State::UserWriting {
        return session(store, id).await;
    }
    if state == State::Error {
        let s = session(store, id).await;
        assert!(matches!(
            store.end_turn(&s, Event::StoreFailed, "test", "t").await.unwrap(),
            Outcome::Applied(_)
        ));
        return session(store, id).await;
    }
    let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "t").await.unwrap() else { panic!() };
    if state == State::UserCommitted {
        return session(store, id).await;
    }
    if state == State::Timeout {
        let s = session(store, id).await;
        assert!(matches!(
            store.end_turn(&s, Event::PickupExpired, "test", "t").await.unwrap(),
            Outcome::Applied(_)
        ));
        return session(store, id).await;
    }
    let lease = claimed(claim(store, id, ticket.turn).await);
    if state == State::AiGenerating {
        return session(store, id).await;
    }
    assert!(matches!(store.commit_reply(&lease, &Reply::new("reply")).await.unwrap(), Outcome::Applied(_)));
    if state == State::AiCommitted {
        return session(store, id).await;
    }
    assert_eq!(state, State::Idle);
    let s = session(store, id).await;
    assert!(matches!(store.return_to_idle(&s, Event::Settle, "t").await.unwrap(), Outcome::Applied(_)));
    session(store, id).await
}

/// Applies `event` to `current` through the store operation that owns it; returns whether the
/// store accepted it.
async fn apply_through_store(db: &TestDb, store: &Store, current: &Session, event: Event) -> bool {
    let stale_lease = |owner: &str| Lease {
        session_id: current.id,
        turn: current.turn,
        owner: owner.to_owned(),
        version: current.version,
        expires_at: 0,
        cancel_requested: false,
        next_seq: 0,
        resumed_tokens: vec![],
        summary: None,
        user: current.user_id.clone(),
    };
    match event {
        Event::UserSend => {
            matches!(send(store, &current.user_id, Some(current.id), "again").await, SendOutcome::Accepted(_))
        }
        Event::UserStored => {
            let ticket = TurnTicket { session_id: current.id, turn: current.turn, version: current.version };
            matches!(store.commit_user_message(&ticket, "t").await.unwrap(), Outcome::Applied(_))
        }
        Event::GenerationClaimed => {
            matches!(claim(store, current.id, current.turn).await, ClaimOutcome::Claimed(_))
        }
        Event::LeaseTakeover => {
            db.advance_ms(LEASE.as_millis() as u64 + 1);
            let claimed = matches!(claim(store, current.id, current.turn).await, ClaimOutcome::Claimed(_));
            let last = store.transitions(current.id).await.unwrap().pop().unwrap();
            claimed && last.event == Event::LeaseTakeover && last.version == current.version + 1
        }
        Event::ReplyCommitted => {
            let owner = current.lease.as_ref().map_or("nobody".to_owned(), |l| l.owner.clone());
            matches!(
                store.commit_reply(&stale_lease(&owner), &Reply::new("r")).await.unwrap(),
                Outcome::Applied(_)
            )
        }
        Event::Regenerate | Event::Edit => {
            let revision = if event == Event::Edit { Revision::Edit("edited") } else { Revision::Regenerate };
            matches!(revise(store, current, revision, None).await, SendOutcome::Accepted(_))
        }
        Event::Fork => {
            // A fork makes a new session; from an existing one the event has no edge.
            let fork = ForkRequest {
                user: &current.user_id,
                source: current.id,
                through: None,
                client_message_id: None,
                by: "t",
            };
            let forked = store.fork_session(fork).await.unwrap();
            assert!(matches!(forked, ForkOutcome::Forked { .. } | ForkOutcome::InFlight { .. }));
            false
        }
        Event::Settle | Event::Recover => match store.return_to_idle(current, event, "t").await {
            Ok(Outcome::Applied(_)) => true,
            Ok(Outcome::Conflict(c)) => panic!("{event} from {}: unexpected conflict {c:?}", current.state),
            Err(StoreError::IllegalTransition { .. }) => false,
            Err(e) => panic!("{e}"),
        },
        _ => match store.end_turn(current, event, "test", "t").await {
            Ok(Outcome::Applied(_)) => true,
            Ok(Outcome::Conflict(c)) => panic!("{event} from {}: unexpected conflict {c:?}", current.state),
            Err(StoreError::IllegalTransition { .. }) => false,
            Err(e) => panic!("{e}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_accepts_every_table_edge_and_refuses_every_other_pair() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    for from in State::ALL {
        for event in Event::ALL {
            let current = session_in(&store, &user, from).await;
            let before = store.transitions(current.id).await.unwrap().len();
            let accepted = apply_through_store(&db, &store, &current, event).await;
            let expected = transition(Some(from), event);
            assert_eq!(accepted, expected.is_some(), "{event} from {from}");
            if event == Event::LeaseTakeover && from == State::UserCommitted {
                continue; // claim_generation took the legal edge from here instead: GenerationClaimed
            }
            let after = session(&store, current.id).await;
            let records = store.transitions(current.id).await.unwrap();
            match expected {
                Some(to) if event == Event::LeaseTakeover => {
                    assert_eq!(after.state, to);
                    assert_eq!(records.last().unwrap().event, Event::LeaseTakeover);
                }
                Some(to) => {
                    assert_eq!(after.state, to, "{event} from {from}");
                    assert_eq!(after.version, current.version + 1);
                    assert_eq!(records.len(), before + 1);
                    let last = records.last().unwrap();
                    assert_eq!((last.from, last.to, last.event), (Some(from), to, event));
                }
                None => {
                    // A refused edge changes nothing: same state, same version, no record.
                    assert_eq!(
                        (after.state, after.version),
                        (current.state, current.version),
                        "{event} from {from}"
                    );
                    assert_eq!(records.len(), before);
                }
            }
        }
    }
    // And from no session at all, only a send creates one.
    let created = accepted(send(&store, &user, None, "first").await);
    assert_eq!(created.turn, Turn::FIRST);
    assert_eq!(created.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_to_an_idle_session_accept_exactly_one() {
    const ROUNDS: usize = 40;
    const SENDERS: usize = 24;
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let id = session_in(&store, &user, State::Idle).await.id;
    for round in 0..ROUNDS {
        let before = session(&store, id).await;
        assert!(!before.state.turn_in_flight());
        let barrier = Arc::new(tokio::sync::Barrier::new(SENDERS));
        let tasks: Vec<_> = (0..SENDERS)
            .map(|i| {
                let (store, user, barrier) = (store.clone(), user.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let text = format!("round {round} sender {i}");
                    store
                        .send_message(NewMessage {
                            user: &user,
                            session: Some(id),
                            content: &text,
                            client_message_id: None,
                            by: "race",
                        })
                        .await
                        .expect("send")
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                SendOutcome::Accepted(ticket) => winners.push(ticket),
                SendOutcome::InFlight { state, turn } => {
                    assert_eq!(state, State::UserWriting);
                    assert_eq!(turn, before.turn.next());
                }
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one send must win, got {winners:?}");
        let ticket = &winners[0];
        assert_eq!(ticket.turn, before.turn.next());
        // Exactly one user message for the new turn, and the one transition it took.
        let (_, messages) = store.get_conversation(id).await.unwrap().unwrap();
        let this_turn: Vec<_> = messages.iter().filter(|m| m.id.turn == ticket.turn).collect();
        assert_eq!(this_turn.len(), 1, "round {round}");
        // Finish the turn so the next round starts idle again.
        let Outcome::Applied(t) = store.commit_user_message(ticket, "t").await.unwrap() else { panic!() };
        let lease = claimed(claim(&store, id, t.turn).await);
        assert!(matches!(store.commit_reply(&lease, &Reply::new("ok")).await.unwrap(), Outcome::Applied(_)));
        let s = session(&store, id).await;
        assert!(matches!(store.return_to_idle(&s, Event::Settle, "t").await.unwrap(), Outcome::Applied(_)));
    }
    // The audit trail is gap-free: one record per version, each leaving the state the previous entered.
    let records = store.transitions(id).await.unwrap();
    for pair in records.windows(2) {
        assert_eq!(pair[1].version, pair[0].version + 1);
        assert_eq!(pair[1].from, Some(pair[0].to));
    }
    assert_eq!(records.last().unwrap().version, session(&store, id).await.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_messages_with_one_idempotency_key_create_one_session() {
    let db = TestDb::start().await;
    let store = db.store();
    for round in 0..20 {
        let user = new_user();
        let key = ClientMessageId::parse(&format!("key-{round}")).unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(12));
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let (store, user, key, barrier) = (store.clone(), user.clone(), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .send_message(NewMessage {
                            user: &user,
                            session: None,
                            content: "hi",
                            client_message_id: Some(&key),
                            by: "r",
                        })
                        .await
                        .expect("send")
                })
            })
            .collect();
        let mut sessions = HashSet::new();
        let mut accepted_count = 0;
        for task in tasks {
            match task.await.unwrap() {
                SendOutcome::Accepted(t) => {
                    accepted_count += 1;
                    sessions.insert((t.session_id, t.turn));
                }
                SendOutcome::Duplicate { session_id, turn } => {
                    sessions.insert((session_id, turn));
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(accepted_count, 1, "round {round}");
        assert_eq!(sessions.len(), 1, "every retry answers with the original session and turn");
        let page = store.list_user_sessions(&user, 10, None).await.unwrap();
        assert_eq!(page.sessions.len(), 1, "one session created");
    }
}

#[tokio::test]
async fn same_client_message_id_twice_is_one_message_and_the_same_turn() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let id = session_in(&store, &user, State::AiCommitted).await.id;
    let key = ClientMessageId::parse("msg-42").unwrap();
    let msg = NewMessage {
        user: &user,
        session: Some(id),
        content: "second",
        client_message_id: Some(&key),
        by: "r1",
    };
    let first = accepted(store.send_message(msg.clone()).await.unwrap());
    let version_after_first = session(&store, id).await.version;
    // Retried while the turn is still in flight, and again after it is committed.
    let again = store.send_message(NewMessage { by: "r2", ..msg.clone() }).await.unwrap();
    assert_eq!(again, SendOutcome::Duplicate { session_id: id, turn: first.turn });
    assert_eq!(session(&store, id).await.version, version_after_first, "a repeat changes nothing");
    let Outcome::Applied(t) = store.commit_user_message(&first, "r1").await.unwrap() else { panic!() };
    let lease = claimed(claim(&store, id, t.turn).await);
    store.commit_reply(&lease, &Reply::new("answer")).await.unwrap();
    let later = store.send_message(NewMessage { by: "r3", ..msg }).await.unwrap();
    assert_eq!(later, SendOutcome::Duplicate { session_id: id, turn: first.turn });
    let (_, messages) = store.get_conversation(id).await.unwrap().unwrap();
    let users: Vec<_> =
        messages.iter().filter(|m| m.id.role == Role::User).map(|m| m.content.as_str()).collect();
    assert_eq!(users, vec!["hello", "second"]);
}

#[tokio::test]
async fn sends_are_refused_while_a_turn_is_in_flight_and_for_other_users() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    for state in [State::UserWriting, State::UserCommitted, State::AiGenerating] {
        let s = session_in(&store, &user, state).await;
        assert_eq!(send(&store, &user, Some(s.id), "x").await, SendOutcome::InFlight { state, turn: s.turn });
    }
    let s = session_in(&store, &user, State::AiCommitted).await;
    assert_eq!(send(&store, &new_user(), Some(s.id), "x").await, SendOutcome::NotFound);
    assert_eq!(send(&store, &user, Some(SessionId::new()), "x").await, SendOutcome::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_generation_claims_have_one_winner() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    for round in 0..30 {
        let ticket = committed_turn(&store, &user, None).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (store, barrier) = (store.clone(), barrier.clone());
                let (id, turn) = (ticket.session_id, ticket.turn);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.claim_generation(id, turn, &lease_id(), LEASE, MAX_ATTEMPTS).await.expect("claim")
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            match task.await.unwrap() {
                ClaimOutcome::Claimed(_) => winners += 1,
                ClaimOutcome::Skipped { current } => {
                    assert_eq!(current.unwrap().state, State::AiGenerating)
                }
                ended @ ClaimOutcome::Ended { .. } => panic!("a fresh turn was ended: {ended:?}"),
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

#[tokio::test]
async fn a_taken_over_generator_can_neither_append_nor_commit() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let ticket = committed_turn(&store, &user, None).await;
    let id = ticket.session_id;
    let old = claimed(claim(&store, id, ticket.turn).await);
    assert_eq!(
        store.append_chunk(&old, 0, 0, &tokens(&["Hel", "lo"])).await.unwrap(),
        AppendOutcome::Appended
    );
    assert_eq!(store.append_chunk(&old, 1, 2, &tokens(&[","])).await.unwrap(), AppendOutcome::Appended);

    // While the lease is live nobody can take it over.
    assert!(matches!(claim(&store, id, ticket.turn).await, ClaimOutcome::Skipped { .. }));
    db.advance_ms(LEASE.as_millis() as u64 + 1);
    let new = claimed(claim(&store, id, ticket.turn).await);
    assert_eq!(new.resumed_tokens, tokens(&["Hel", "lo", ","]));
    assert_eq!(new.next_seq, 3, "seq 2 is the fence");

    // The stalled generator wakes up: every write it tries is refused.
    assert_eq!(store.append_chunk(&old, 2, 3, &tokens(&[" stale"])).await.unwrap(), AppendOutcome::Fenced);
    assert_eq!(store.lease_status(&old, Read::Consistent).await.unwrap(), LeaseStatus::Lost);
    let mut old_mut = old.clone();
    assert_eq!(store.extend_lease(&mut old_mut, LEASE).await.unwrap(), LeaseStatus::Lost);
    assert!(matches!(
        store.commit_reply(&old, &Reply::new("Hello, stale")).await.unwrap(),
        Outcome::Conflict(_)
    ));

    assert_eq!(store.append_chunk(&new, 3, 3, &tokens(&[" world"])).await.unwrap(), AppendOutcome::Appended);
    assert!(matches!(
        store.commit_reply(&new, &Reply::new("Hello, world")).await.unwrap(),
        Outcome::Applied(_)
    ));
    let chunks = store.read_chunks(id, ticket.turn, None, Read::Consistent).await.unwrap();
    let streamed: String = chunks.iter().flat_map(|c| c.tokens.iter().map(String::as_str)).collect();
    let (_, messages) = store.get_conversation(id).await.unwrap().unwrap();
    let replies: Vec<_> = messages.iter().filter(|m| m.id.role == Role::Assistant).collect();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].content, streamed);

    // A duplicate delivery after the commit is a no-op.
    assert!(
        matches!(claim(&store, id, ticket.turn).await, ClaimOutcome::Skipped { current: Some(s) } if s.state == State::AiCommitted)
    );
    let (_, after) = store.get_conversation(id).await.unwrap().unwrap();
    assert_eq!(after.len(), messages.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_racing_a_live_writer_keeps_the_chunk_sequence_whole() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    for round in 0..15 {
        let ticket = committed_turn(&store, &user, None).await;
        let (id, turn) = (ticket.session_id, ticket.turn);
        let old = claimed(claim(&store, id, turn).await);
        // The old holder keeps writing, unaware its lease has lapsed, until it is fenced.
        let writer = {
            let (store, old) = (store.clone(), old.clone());
            tokio::spawn(async move {
                let mut written = 0u32;
                loop {
                    let token = vec![format!("o{written} ")];
                    match store.append_chunk(&old, written, u64::from(written), &token).await.unwrap() {
                        AppendOutcome::Appended => written += 1,
                        AppendOutcome::Fenced => return written,
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(2 + round % 5)).await;
        db.advance_ms(LEASE.as_millis() as u64 + 1);
        let new = claimed(claim(&store, id, turn).await);
        let old_written = writer.await.unwrap();
        assert_eq!(
            new.resumed_tokens.len() as u32,
            old_written,
            "round {round}: resume point is exactly what the old holder wrote"
        );
        let mut text: String = new.resumed_tokens.concat();
        let first = new.resumed_tokens.len() as u64;
        for (i, word) in ["n1 ", "n2"].iter().enumerate() {
            let (seq, start) = (new.next_seq + i as u32, first + i as u64);
            assert_eq!(
                store.append_chunk(&new, seq, start, &tokens(&[word])).await.unwrap(),
                AppendOutcome::Appended
            );
            text.push_str(word);
        }
        assert!(matches!(store.commit_reply(&new, &Reply::new(&text)).await.unwrap(), Outcome::Applied(_)));
        let chunks = store.read_chunks(id, turn, None, Read::Consistent).await.unwrap();
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.seq as usize, i, "gap-free sequence");
        }
        let mut expected_start = 0;
        for c in &chunks {
            assert_eq!(c.start, expected_start, "tokens tile the turn without gaps or overlaps");
            expected_start = c.end();
        }
        let streamed: String = chunks.iter().flat_map(|c| c.tokens.iter().map(String::as_str)).collect();
        assert_eq!(streamed, text, "round {round}: what is stored is what was streamed");
    }
}

#[tokio::test]
async fn committed_reply_equals_the_chunks_and_reads_after_a_position_return_the_rest() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let ticket = committed_turn(&store, &user, None).await;
    let lease = claimed(claim(&store, ticket.session_id, ticket.turn).await);
    let batches = [tokens(&["Hi", " there"]), tokens(&["!\n", "Line ", "two"]), tokens(&[" ✓ émoji 🦀"])];
    let mut start = 0;
    for (seq, batch) in batches.iter().enumerate() {
        assert_eq!(
            store.append_chunk(&lease, seq as u32, start, batch).await.unwrap(),
            AppendOutcome::Appended
        );
        start += batch.len() as u64;
    }
    let reply: String = batches.concat().concat();
    assert!(matches!(store.commit_reply(&lease, &Reply::new(&reply)).await.unwrap(), Outcome::Applied(_)));
    let all = store.read_chunks(ticket.session_id, ticket.turn, None, Read::Consistent).await.unwrap();
    assert_eq!(all.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>(), batches.to_vec());
    let rest = store.read_chunks(ticket.session_id, ticket.turn, Some(0), Read::Consistent).await.unwrap();
    assert_eq!(rest, all[1..].to_vec());
    assert!(store
        .read_chunks(ticket.session_id, ticket.turn, Some(2), Read::Consistent)
        .await
        .unwrap()
        .is_empty());
    let (s, messages) = store.get_conversation(ticket.session_id).await.unwrap().unwrap();
    assert_eq!(s.state, State::AiCommitted);
    assert_eq!(messages.last().unwrap().content, reply);
    assert_eq!(messages.last().unwrap().stopped, None);
}

#[tokio::test]
async fn recent_messages_read_only_the_last_turns_up_to_the_new_message() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let mut session = None;
    for turn in 1..=6 {
        let ticket = committed_turn(&store, &user, session).await;
        session = Some(ticket.session_id);
        if turn < 6 {
            let lease = claimed(claim(&store, ticket.session_id, ticket.turn).await);
            let reply = format!("reply {turn}");
            assert!(matches!(
                store.commit_reply(&lease, &Reply::new(&reply)).await.unwrap(),
                Outcome::Applied(_)
            ));
        }
    }
    let id = session.unwrap();
    let turn = |n| Turn::new(n).unwrap();
    let shape = |messages: Vec<chat_core::Message>| -> Vec<(u32, Role)> {
        messages.iter().map(|m| (m.id.turn.get(), m.id.role)).collect()
    };
    let last3 = store.recent_messages(id, turn(6), 3).await.unwrap();
    assert_eq!(
        shape(last3),
        [(4, Role::User), (4, Role::Assistant), (5, Role::User), (5, Role::Assistant), (6, Role::User)]
    );
    let all = store.recent_messages(id, turn(6), 100).await.unwrap();
    assert_eq!(all.len(), 11);
    let through3 = store.recent_messages(id, turn(3), 1).await.unwrap();
    assert_eq!(shape(through3), [(3, Role::User)], "a turn's own reply is never part of its prompt");
}

#[tokio::test]
async fn cancel_is_seen_by_the_generator_and_the_partial_reply_is_marked_stopped() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let ticket = committed_turn(&store, &user, None).await;
    let id = ticket.session_id;
    let mut lease = claimed(claim(&store, id, ticket.turn).await);
    store.append_chunk(&lease, 0, 0, &tokens(&["partial"])).await.unwrap();
    assert_eq!(store.request_cancel(id, Some(&new_user())).await.unwrap(), CancelOutcome::NotFound);
    assert_eq!(
        store.request_cancel(id, Some(&user)).await.unwrap(),
        CancelOutcome::Requested { turn: ticket.turn, state: State::AiGenerating }
    );
    assert_eq!(
        store.lease_status(&lease, Read::Consistent).await.unwrap(),
        LeaseStatus::Held { cancel_requested: true }
    );
    assert_eq!(
        store.extend_lease(&mut lease, LEASE).await.unwrap(),
        LeaseStatus::Held { cancel_requested: true }
    );
    assert!(matches!(
        store
            .commit_reply(&lease, &Reply { stopped: Some(StopReason::Cancelled), ..Reply::new("partial") })
            .await
            .unwrap(),
        Outcome::Applied(_)
    ));
    let (s, messages) = store.get_conversation(id).await.unwrap().unwrap();
    assert!(!s.cancel_requested);
    assert_eq!(messages.last().unwrap().stopped, Some(StopReason::Cancelled));
    assert_eq!(
        store.request_cancel(id, None).await.unwrap(),
        CancelOutcome::NotInFlight { state: State::AiCommitted }
    );
    assert_eq!(store.request_cancel(SessionId::new(), None).await.unwrap(), CancelOutcome::NotFound);
    assert!(matches!(send(&store, &user, Some(id), "next").await, SendOutcome::Accepted(_)));
}

#[tokio::test]
async fn an_expired_lease_with_no_attempts_left_ends_the_turn_in_timeout() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let ticket = committed_turn(&store, &user, None).await;
    for _ in 0..MAX_ATTEMPTS {
        claimed(claim(&store, ticket.session_id, ticket.turn).await);
        db.advance_ms(LEASE.as_millis() as u64 + 1);
    }
    let outcome = claim(&store, ticket.session_id, ticket.turn).await;
    assert!(matches!(outcome, ClaimOutcome::Ended { current: Some(s) } if s.state == State::Timeout));
    let s = session(&store, ticket.session_id).await;
    assert!(s.reason.unwrap().contains("stalled"));
    assert!(s.lease.is_none());
}

#[tokio::test]
async fn overdue_turns_are_found_through_the_due_index() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let writing = session_in(&store, &user, State::UserWriting).await;
    let committed = session_in(&store, &user, State::UserCommitted).await;
    let generating = session_in(&store, &user, State::AiGenerating).await;
    let done = session_in(&store, &user, State::AiCommitted).await;
    assert!(store.overdue_sessions(store.now_ms(), 100).await.unwrap().is_empty());
    // Past every in-flight deadline (writing, pickup, lease), short of the idle timeout.
    db.advance_ms(600_000);
    let overdue: HashSet<SessionId> =
        store.overdue_sessions(store.now_ms(), 100).await.unwrap().into_iter().collect();
    assert_eq!(overdue, HashSet::from([writing.id, committed.id, generating.id]));
    assert!(!overdue.contains(&done.id));
    // An answered session's next deadline is its idle expiry.
    let idle = store.options().idle_timeout.expect("an idle timeout").as_millis() as u64;
    db.advance_ms(idle);
    let overdue: HashSet<SessionId> =
        store.overdue_sessions(store.now_ms(), 100).await.unwrap().into_iter().collect();
    assert!(overdue.contains(&done.id));
    let Outcome::Applied(redrives) =
        store.record_redrive(&session(&store, committed.id).await).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(redrives, 1);
    let overdue: HashSet<SessionId> =
        store.overdue_sessions(store.now_ms(), 100).await.unwrap().into_iter().collect();
    assert!(!overdue.contains(&committed.id), "a re-drive pushes the deadline out");
}

#[tokio::test]
async fn a_dependency_failure_between_steps_leaves_an_allowed_state() {
    let mut db = TestDb::start().await;
    let store = store_on(client_for(&db.endpoint(), RetryConfig::standard().with_max_attempts(2)), &db.clock);
    let user = new_user();
    let ticket = accepted(send(&store, &user, None, "hello").await);
    db.stop_server().await;
    let err = store.commit_user_message(&ticket, "r").await.expect_err("DynamoDB is down");
    assert!(matches!(err, StoreError::Dynamo { operation: "TransactWriteItems", .. }), "{err}");
    assert!(
        !err.to_string().contains("service error") || err.to_string().len() > 40,
        "errors carry their cause: {err}"
    );
    db.restart_server().await;
    // The claim landed whole (state, message, record) and the commit not at all.
    let s = session(&store, ticket.session_id).await;
    assert_eq!((s.state, s.version), (State::UserWriting, ticket.version));
    let (_, messages) = store.get_conversation(ticket.session_id).await.unwrap().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(store.transitions(ticket.session_id).await.unwrap().len(), 1);
    // The way out is an edge of the table.
    assert!(matches!(
        store.end_turn(&s, Event::StoreFailed, "enqueue failed", "r").await.unwrap(),
        Outcome::Applied(_)
    ));
    assert!(matches!(send(&store, &user, Some(ticket.session_id), "again").await, SendOutcome::Accepted(_)));

    // Mid-generation: chunks written, then DynamoDB goes away before the commit.
    let ticket = committed_turn(&store, &user, None).await;
    let lease = claimed(claim(&store, ticket.session_id, ticket.turn).await);
    store.append_chunk(&lease, 0, 0, &tokens(&["half"])).await.unwrap();
    db.stop_server().await;
    assert!(store.commit_reply(&lease, &Reply::new("half a reply")).await.is_err());
    db.restart_server().await;
    let s = session(&store, ticket.session_id).await;
    assert_eq!(s.state, State::AiGenerating, "no reply was half-committed");
    let (_, messages) = store.get_conversation(ticket.session_id).await.unwrap().unwrap();
    assert!(messages.iter().all(|m| m.id.role == Role::User));
    // The lease lapses and the next holder resumes from what was streamed.
    db.advance_ms(LEASE.as_millis() as u64 + 1);
    let next = claimed(claim(&store, ticket.session_id, ticket.turn).await);
    assert_eq!(next.resumed_tokens, tokens(&["half"]));
}

#[tokio::test]
async fn a_write_whose_response_was_lost_is_recognised_as_applied() {
    let db = TestDb::start().await;
    let proxy = LossyProxy::start(db.addr).await;
    // No SDK retries: the lost response reaches the store, which must resolve it by re-reading.
    let store = store_on(client_for(&proxy.endpoint(), RetryConfig::disabled()), &db.clock);
    let user = new_user();
    let ticket = accepted(send(&store, &user, None, "hello").await);
    proxy.drop_next_response();
    let outcome = store.commit_user_message(&ticket, "r").await.expect("resolved by re-reading");
    let Outcome::Applied(committed) = outcome else { panic!("expected Applied, got {outcome:?}") };
    assert_eq!(committed.version, ticket.version + 1);
    let s = session(&store, ticket.session_id).await;
    assert_eq!((s.state, s.version), (State::UserCommitted, ticket.version + 1));
    assert_eq!(store.transitions(ticket.session_id).await.unwrap().len(), 2, "applied once, not twice");
}

#[tokio::test]
async fn a_users_sessions_list_newest_first_across_pages() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(accepted(send(&store, &user, None, "hi").await).session_id);
        db.advance_ms(1000);
    }
    accepted(send(&store, &new_user(), None, "someone else").await);
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let start = cursor.as_deref().map(|c| SessionCursor::decode(&user, c).unwrap());
        let page = store.list_user_sessions(&user, 2, start).await.unwrap();
        assert!(page.sessions.len() <= 2);
        seen.extend(page.sessions.iter().map(|s| s.id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    created.reverse();
    assert_eq!(seen, created);
    assert_eq!(SessionCursor::decode(&user, "garbage!"), Err(InvalidCursor));
}

#[tokio::test]
async fn deleting_a_session_removes_everything_under_it() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let key = ClientMessageId::parse("k1").unwrap();
    let first = store
        .send_message(NewMessage {
            user: &user,
            session: None,
            content: "hi",
            client_message_id: Some(&key),
            by: "r",
        })
        .await
        .unwrap();
    let SendOutcome::Accepted(ticket) = first else { panic!() };
    let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "r").await.unwrap() else { panic!() };
    let lease = claimed(claim(&store, ticket.session_id, ticket.turn).await);
    store.append_chunk(&lease, 0, 0, &tokens(&["a"])).await.unwrap();
    store.commit_reply(&lease, &Reply::new("a")).await.unwrap();
    let keep = accepted(send(&store, &user, None, "other").await).session_id;

    assert!(
        matches!(store.delete_session(ticket.session_id, None).await.unwrap(), DeleteOutcome::Deleted { items } if items >= 6)
    );
    assert!(store.get_session(ticket.session_id, Read::Consistent).await.unwrap().is_none());
    assert!(store.transitions(ticket.session_id).await.unwrap().is_empty());
    assert!(store
        .read_chunks(ticket.session_id, ticket.turn, None, Read::Consistent)
        .await
        .unwrap()
        .is_empty());
    let page = store.list_user_sessions(&user, 10, None).await.unwrap();
    assert_eq!(page.sessions.iter().map(|s| s.id).collect::<Vec<_>>(), vec![keep]);
    // The idempotency key went with it: reusing it starts a new session.
    let again = store
        .send_message(NewMessage {
            user: &user,
            session: None,
            content: "hi",
            client_message_id: Some(&key),
            by: "r",
        })
        .await
        .unwrap();
    assert!(matches!(again, SendOutcome::Accepted(t) if t.session_id != ticket.session_id));
    assert_eq!(store.delete_session(ticket.session_id, None).await.unwrap(), DeleteOutcome::NotFound);
}

#[tokio::test]
async fn consumed_capacity_is_counted_from_dynamodbs_own_figures() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let before = store.capacity();
    committed_turn(&store, &user, None).await;
    let after = store.capacity();
    assert!(after.write_units > before.write_units);
    assert!(after.read_units >= before.read_units);
}

#[tokio::test]
async fn a_turn_ended_for_a_failed_enqueue_releases_its_idempotency_key() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let key = ClientMessageId::parse("retry-after-503").unwrap();
    let msg =
        NewMessage { user: &user, session: None, content: "hi", client_message_id: Some(&key), by: "r1" };
    let first = accepted(store.send_message(msg.clone()).await.unwrap());
    let Outcome::Applied(t) = store.commit_user_message(&first, "r1").await.unwrap() else { panic!() };
    let current = session(&store, t.session_id).await;
    let ended =
        store.end_turn_releasing(&current, Event::ProcessingFailed, "queue down", "r1", Some((&user, &key)));
    assert!(matches!(ended.await.unwrap(), Outcome::Applied(_)));
    assert_eq!(session(&store, t.session_id).await.state, State::Error);
    // The retry is a new request: a new session and turn, not the dead one.
    let retry = accepted(store.send_message(NewMessage { by: "r2", ..msg.clone() }).await.unwrap());
    assert_ne!(retry.session_id, first.session_id);
    assert_eq!(
        store.send_message(NewMessage { by: "r3", ..msg }).await.unwrap(),
        SendOutcome::Duplicate { session_id: retry.session_id, turn: retry.turn }
    );
}

#[tokio::test]
async fn an_expired_idempotency_key_is_absent_even_before_dynamodb_removes_it() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let key = ClientMessageId::parse("expiring").unwrap();
    let send = |content: &'static str| {
        let (store, user, key) = (store.clone(), user.clone(), key.clone());
        async move {
            store
                .send_message(NewMessage {
                    user: &user,
                    session: None,
                    content,
                    client_message_id: Some(&key),
                    by: "r",
                })
                .await
                .expect("send")
        }
    };
    let SendOutcome::Accepted(first) = send("first").await else { panic!("the first send is accepted") };
    assert!(
        matches!(send("first").await, SendOutcome::Duplicate { session_id, .. } if session_id == first.session_id)
    );
    // Past the retention the record still exists (the emulator, like DynamoDB, has not swept it),
    // but it no longer answers: the same key starts a new session.
    db.advance_ms(StoreOptions::default().idempotency_retention.as_millis() as u64 + 1000);
    match send("again, a day later").await {
        SendOutcome::Accepted(second) => assert_ne!(second.session_id, first.session_id),
        other => panic!("an expired key must be absent, got {other:?}"),
    }
    assert!(
        matches!(send("again, a day later").await, SendOutcome::Duplicate { .. }),
        "the renewed key is live"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_racing_the_idle_expiry_is_never_refused_and_never_marked_for_a_summary() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let mut expired_first = 0;
    for round in 0..12 {
        let idle = session_in(&store, &user, State::AiCommitted).await;
        let text = format!("back again {round}");
        let (expiry, sent) =
            tokio::join!(store.expire_idle(&idle, "sweeper"), send(&store, &user, Some(idle.id), &text));
        let ticket = accepted(sent);
        let after = session(&store, idle.id).await;
        assert_eq!((after.state, after.turn), (State::UserWriting, ticket.turn), "round {round}");
        assert!(!after.summary_pending, "a turn in flight is not summarised (round {round})");
        let events: Vec<Event> =
            store.transitions(idle.id).await.unwrap().into_iter().map(|t| t.event).collect();
        match expiry.unwrap() {
            // The expiry landed first: the message came in from `timeout`.
            Outcome::Applied(_) => {
                expired_first += 1;
                assert_eq!(
                    &events[events.len() - 3..],
                    &[Event::Settle, Event::IdleExpired, Event::UserSend]
                );
            }
            Outcome::Conflict(_) => assert!(!events.contains(&Event::IdleExpired), "round {round}"),
        }
    }
    eprintln!("the expiry won {expired_first} of 12 rounds");
}

/// Answers the turn `ticket` claimed: commits its message, claims it, commits `reply`.
async fn answer(store: &Store, ticket: &TurnTicket, reply: &str) {
    let Outcome::Applied(t) = store.commit_user_message(ticket, "t").await.unwrap() else { panic!() };
    let lease = claimed(claim(store, t.session_id, t.turn).await);
    assert!(matches!(store.commit_reply(&lease, &Reply::new(reply)).await.unwrap(), Outcome::Applied(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_regenerates_edits_and_sends_start_exactly_one_turn() {
    const ROUNDS: usize = 12;
    const RACERS: usize = 12;
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let id = session_in(&store, &user, State::AiCommitted).await.id;
    for round in 0..ROUNDS {
        let before = session(&store, id).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
        let tasks: Vec<_> = (0..RACERS)
            .map(|i| {
                let (store, user, barrier, before) =
                    (store.clone(), user.clone(), barrier.clone(), before.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let text = format!("round {round} racer {i}");
                    match i % 3 {
                        0 => revise(&store, &before, Revision::Regenerate, None).await,
                        1 => revise(&store, &before, Revision::Edit(&text), None).await,
                        _ => send(&store, &user, Some(id), &text).await,
                    }
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                SendOutcome::Accepted(ticket) => winners.push(ticket),
                SendOutcome::InFlight { state, turn } => {
                    assert_eq!((state, turn), (State::UserWriting, before.turn.next()), "round {round}");
                }
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one must win, got {winners:?}");
        let turn = winners[0].turn;
        assert_eq!(turn, before.turn.next());
        let (_, messages) = store.get_conversation(id).await.unwrap().unwrap();
        let new: Vec<&Message> = messages.iter().filter(|m| m.id.turn == turn).collect();
        assert_eq!(new.len(), 1, "round {round}: one user message for the new turn");
        let earlier = messages.iter().find(|m| m.id.turn == before.turn && m.id.role == Role::User).unwrap();
        let records = store.transitions(id).await.unwrap();
        let event = records.last().unwrap().event;
        // A revision marks the turn it redoes, once; a send marks nothing.
        match event {
            Event::Regenerate => {
                assert_eq!(new[0].content, earlier.content, "a regenerate asks the same again");
                assert_eq!((new[0].revises, earlier.superseded_by), (Some(before.turn), Some(turn)));
            }
            Event::Edit => {
                assert!(new[0].content.contains("racer"));
                assert_eq!((new[0].revises, earlier.superseded_by), (Some(before.turn), Some(turn)));
            }
            Event::UserSend => assert_eq!((new[0].revises, earlier.superseded_by), (None, None)),
            other => panic!("round {round}: the winner recorded {other}"),
        }
        answer(&store, &winners[0], &format!("reply {round}")).await;
    }
    let records = store.transitions(id).await.unwrap();
    for pair in records.windows(2) {
        assert_eq!(pair[1].version, pair[0].version + 1);
        assert_eq!(pair[1].from, Some(pair[0].to));
    }
}

#[tokio::test]
async fn a_regenerate_keeps_the_earlier_reply_and_refuses_a_turn_that_is_no_longer_last() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let first = session_in(&store, &user, State::AiCommitted).await;
    // While a turn is in flight, nothing can be redone.
    let ticket = accepted(revise(&store, &first, Revision::Regenerate, None).await);
    assert_eq!(ticket.turn.get(), 2);
    let writing = session(&store, first.id).await;
    assert_eq!(
        revise(&store, &writing, Revision::Edit("no"), None).await,
        SendOutcome::InFlight { state: State::UserWriting, turn: ticket.turn }
    );
    answer(&store, &ticket, "second reply").await;
    // Both replies are kept: turn 1 is the earlier version, turn 2 redoes it.
    let (_, messages) = store.get_conversation(first.id).await.unwrap().unwrap();
    let texts: Vec<(u32, Role, &str, Option<Turn>)> =
        messages.iter().map(|m| (m.id.turn.get(), m.id.role, m.content.as_str(), m.superseded_by)).collect();
    let two = Some(Turn::new(2).unwrap());
    assert_eq!(
        texts,
        vec![
            (1, Role::User, "hello", two),
            (1, Role::Assistant, "reply", None),
            (2, Role::User, "hello", None),
            (2, Role::Assistant, "second reply", None),
        ]
    );
    // A client that still sees turn 1 as the last is told it is not.
    let now = session(&store, first.id).await;
    let stale = RevisedTurn {
        user: &user,
        session: first.id,
        revision: Revision::Regenerate,
        expected_last: Some(Turn::FIRST),
        client_message_id: None,
        by: "t",
    };
    assert_eq!(
        store.revise_turn(stale).await.unwrap(),
        SendOutcome::NotLastTurn { last: now.turn, state: State::AiCommitted }
    );
    assert_eq!(session(&store, first.id).await.version, now.version, "nothing written");
    // Another user's session is not found, and nothing moves.
    let other = new_user();
    let theirs = Session { user_id: other, ..now.clone() };
    assert_eq!(revise(&store, &theirs, Revision::Regenerate, None).await, SendOutcome::NotFound);
    // A repeated key is the same turn, and changes nothing.
    let key = ClientMessageId::parse("regen-1").unwrap();
    let again = accepted(revise(&store, &now, Revision::Regenerate, Some(&key)).await);
    let repeat = revise(&store, &session(&store, first.id).await, Revision::Regenerate, Some(&key)).await;
    assert_eq!(repeat, SendOutcome::Duplicate { session_id: first.id, turn: again.turn });
}

#[tokio::test]
async fn a_fork_is_a_session_of_its_own_with_the_history_through_its_turn() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let source = session_in(&store, &user, State::AiCommitted).await;
    for text in ["two", "three"] {
        let ticket = accepted(send(&store, &user, Some(source.id), text).await);
        answer(&store, &ticket, &format!("reply {text}")).await;
    }
    // Turn 3 is regenerated as turn 4: the fork at 3 does not carry the mark of a turn it lacks.
    let current = session(&store, source.id).await;
    let ticket = accepted(revise(&store, &current, Revision::Regenerate, None).await);
    answer(&store, &ticket, "reply three again").await;
    let fork_at = |through: Option<u64>, key: Option<&'static str>| {
        let store = store.clone();
        let user = user.clone();
        async move {
            let key = key.map(|k| ClientMessageId::parse(k).unwrap());
            let request = ForkRequest {
                user: &user,
                source: source.id,
                through: through.map(|t| Turn::new(t).unwrap()),
                client_message_id: key.as_ref(),
                by: "fork",
            };
            store.fork_session(request).await.unwrap()
        }
    };
    let ForkOutcome::Forked { session_id: fork, through, .. } = fork_at(Some(3), Some("fork-1")).await else {
        panic!("fork")
    };
    assert_eq!(through.get(), 3);
    let forked = session(&store, fork).await;
    assert_eq!((forked.state, forked.turn, forked.user_id.clone()), (State::Idle, through, user.clone()));
    assert_eq!(forked.forked_from, Some((source.id, through)));
    let (_, copied) = store.get_conversation(fork).await.unwrap().unwrap();
    let (_, original) = store.get_conversation(source.id).await.unwrap().unwrap();
    let texts = |messages: &[Message]| -> Vec<(u32, Role, String)> {
        messages.iter().map(|m| (m.id.turn.get(), m.id.role, m.content.clone())).collect()
    };
    assert_eq!(texts(&copied), texts(&original[..6]));
    assert!(copied.iter().all(|m| m.id.session == fork && m.superseded_by.is_none()));
    // The same key is the same fork; a fork past the last turn, or of a turn in flight, is refused.
    assert!(
        matches!(fork_at(Some(3), Some("fork-1")).await, ForkOutcome::Forked { session_id, .. } if session_id == fork)
    );
    assert_eq!(fork_at(Some(9), None).await, ForkOutcome::TurnNotFound { last: Turn::new(4).unwrap() });
    let in_flight = accepted(send(&store, &user, Some(source.id), "five").await);
    assert_eq!(
        fork_at(None, None).await,
        ForkOutcome::InFlight { state: State::UserWriting, turn: in_flight.turn }
    );
    // The fork lives on its own: the source's deletion leaves it whole, and it takes new turns.
    store.delete_session(source.id, Some(&user)).await.unwrap();
    let (_, after) = store.get_conversation(fork).await.unwrap().unwrap();
    assert_eq!(texts(&after), texts(&copied));
    let next = accepted(send(&store, &user, Some(fork), "four in the fork").await);
    assert_eq!(next.turn.get(), 4);
    let records = store.transitions(fork).await.unwrap();
    assert_eq!((records[0].from, records[0].to, records[0].event), (None, State::Idle, Event::Fork));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_forks_with_one_key_make_one_session_and_a_refused_fork_leaves_nothing() {
    let db = TestDb::start().await;
    let user = new_user();
    let options = StoreOptions { max_sessions_per_user: 2, ..StoreOptions::default() };
    let limited = Store::new(db.client(), common::TABLE, options).with_clock(Clock::Manual(db.clock.clone()));
    let source = session_in(&limited, &user, State::AiCommitted).await;
    let key = ClientMessageId::parse("fork-race").unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, user, key, barrier) = (limited.clone(), user.clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let request = ForkRequest {
                    user: &user,
                    source: source.id,
                    through: None,
                    client_message_id: Some(&key),
                    by: "race",
                };
                store.fork_session(request).await.unwrap()
            })
        })
        .collect();
    let mut forks = HashSet::new();
    for task in tasks {
        match task.await.unwrap() {
            ForkOutcome::Forked { session_id, .. } => forks.insert(session_id),
            other => panic!("unexpected {other:?}"),
        };
    }
    assert_eq!(forks.len(), 1, "one key, one fork: {forks:?}");
    let listed = limited.list_user_sessions(&user, 10, None).await.unwrap().sessions;
    assert_eq!(listed.len(), 2, "the source and one fork");
    // At the session limit the fork is refused, and its copies are gone with it.
    let request =
        ForkRequest { user: &user, source: source.id, through: None, client_message_id: None, by: "over" };
    let before = item_count(&db).await;
    assert_eq!(limited.fork_session(request).await.unwrap(), ForkOutcome::SessionLimit { limit: 2 });
    assert_eq!(item_count(&db).await, before, "the refused fork's copies are removed");
}

/// Every item in the table, by a scan.
async fn item_count(db: &TestDb) -> usize {
    let pages = db.client().scan().table_name(common::TABLE).into_paginator().items().send();
    pages.collect::<Vec<_>>().await.len()
}

#[tokio::test]
async fn redoing_a_turn_a_summary_covers_drops_the_summary_and_a_forks_key_is_no_send() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let first = session_in(&store, &user, State::AiCommitted).await;
    // The session goes quiet and is summarised through turn 1.
    assert!(matches!(store.expire_idle(&first, "sweeper").await.unwrap(), Outcome::Applied(_)));
    let quiet = session(&store, first.id).await;
    let saved = store.save_summary(&quiet, "the user said hello", Turn::FIRST).await.unwrap();
    assert_eq!(saved, Outcome::Applied(()));
    assert!(session(&store, first.id).await.summary.is_some());
    // Editing turn 1 takes back what the summary holds: the summary goes with it.
    let edited =
        accepted(revise(&store, &session(&store, first.id).await, Revision::Edit("goodbye"), None).await);
    assert_eq!(edited.turn.get(), 2);
    assert_eq!(session(&store, first.id).await.summary, None);

    // A key that made a fork is not a send's or a regenerate's.
    answer(&store, &edited, "bye").await;
    let key = ClientMessageId::parse("fork-key").unwrap();
    let request =
        ForkRequest { user: &user, source: first.id, through: None, client_message_id: Some(&key), by: "f" };
    assert!(matches!(store.fork_session(request).await.unwrap(), ForkOutcome::Forked { .. }));
    let send = NewMessage {
        user: &user,
        session: Some(first.id),
        content: "x",
        client_message_id: Some(&key),
        by: "s",
    };
    assert_eq!(store.send_message(send).await.unwrap(), SendOutcome::KeyUsedByFork);
    let current = session(&store, first.id).await;
    assert_eq!(revise(&store, &current, Revision::Regenerate, Some(&key)).await, SendOutcome::KeyUsedByFork);
    assert_eq!(session(&store, first.id).await.version, current.version, "nothing written");
}

#[tokio::test]
async fn a_summary_written_for_a_session_the_user_redid_meanwhile_is_not_stored() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let first = session_in(&store, &user, State::AiCommitted).await;
    assert!(matches!(store.expire_idle(&first, "sweeper").await.unwrap(), Outcome::Applied(_)));
    // The summary job read the quiet session; the user regenerates turn 1 before it saves.
    let quiet = session(&store, first.id).await;
    accepted(revise(&store, &quiet, Revision::Regenerate, None).await);
    let late = store.save_summary(&quiet, "summary of the turn taken back", Turn::FIRST).await.unwrap();
    assert!(matches!(late, Outcome::Conflict(_)), "{late:?}");
    // Redone twice (turn 2 redone as turn 3): the job's summary through turn 1 is still refused.
    let second = session(&store, first.id).await;
    let ticket = TurnTicket { session_id: first.id, turn: second.turn, version: second.version };
    answer(&store, &ticket, "again").await;
    accepted(revise(&store, &session(&store, first.id).await, Revision::Regenerate, None).await);
    let later = store.save_summary(&quiet, "summary of the turn taken back", Turn::FIRST).await.unwrap();
    assert!(matches!(later, Outcome::Conflict(_)), "{later:?}");
    assert_eq!(session(&store, first.id).await.summary, None);
}

#[tokio::test]
async fn a_summary_past_a_turn_redone_earlier_is_stored_when_the_user_moved_on_meanwhile() {
    let db = TestDb::start().await;
    let store = db.store();
    let user = new_user();
    let first = session_in(&store, &user, State::AiCommitted).await;
    // Turn 1 redone as turn 2, answered; the session goes quiet and its job reads it.
    let redo = accepted(revise(&store, &first, Revision::Regenerate, None).await);
    answer(&store, &redo, "the second try").await;
    let answered = session(&store, first.id).await;
    assert!(matches!(store.expire_idle(&answered, "sweeper").await.unwrap(), Outcome::Applied(_)));
    let quiet = session(&store, first.id).await;
    // The user sends again before the job saves: the summary through turn 2 is still kept.
    accepted(send(&store, &user, Some(first.id), "and now?").await);
    let saved = store.save_summary(&quiet, "the user asked twice", redo.turn).await.unwrap();
    assert_eq!(saved, Outcome::Applied(()));
    assert_eq!(session(&store, first.id).await.summary.map(|s| s.through), Some(redo.turn));
}
