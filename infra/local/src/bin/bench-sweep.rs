//! `make bench-sweep`: the sweeper at scale. `BENCH_SESSIONS` (10,000) sessions whose last turn
//! ended and whose idle deadline has passed, on the embedded DynamoDB emulator: how long the
//! sweeper's own handler takes to expire them all and queue their summary jobs, in how many
//! sweeps (the schedule runs one a minute on AWS, each within a 40 s budget); then what a sweep
//! costs when nothing is due.
//!
//! The queue is a stand-in that accepts every `SendMessageBatch` and counts the jobs
//! (`BENCH_SQS=stub`, the default), or the local stack's moto (`BENCH_SQS=moto`), whose
//! `SendMessage` costs time in proportion to the messages waiting (SQS's does not), so at this
//! scale it measures moto.

use chat_core::config::Env;
use chat_core::{
    ClaimOutcome, Clock, NewMessage, Outcome, Read, Reply, SendOutcome, State, StoreOptions, UserId,
};
use chat_local::{LocalDynamo, LocalSqs, StackSettings};
use chat_runtime::queue::Queue;
use futures::StreamExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TABLE: &str = "bench-sweep";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = Env::process();
    let sessions: usize = env.parse_or("BENCH_SESSIONS", 10_000)?;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dynamo = LocalDynamo::start(0, TABLE).await?;
    let received = Arc::new(AtomicU64::new(0));
    let use_moto = env.optional("BENCH_SQS").as_deref() == Some("moto");
    let (sqs_endpoint, queue_url, _moto) = if use_moto {
        let sqs = LocalSqs::start(&root, 0, Stdio::null(), Stdio::null()).await?;
        let mut settings = StackSettings::new(&root);
        settings.queue = "bench-sweep".to_owned();
        let (queue_url, _) = sqs.create_queues(&settings).await?;
        // The generator's side: every job taken off as it arrives, and counted.
        tokio::spawn(drain(chat_local::sqs_client(&sqs.endpoint), queue_url.clone(), received.clone()));
        (sqs.endpoint.clone(), queue_url, Some(sqs))
    } else {
        let stub = chat_testkit::StubSqs::start().await?;
        let queue_url = format!("{}/000000000000/bench-sweep", stub.endpoint);
        let endpoint = stub.endpoint.clone();
        let (counted, received) = (stub.summaries.clone(), received.clone());
        tokio::spawn(async move {
            // The stand-in counts the summary jobs it took; it lives as long as the benchmark.
            let _stub = stub;
            loop {
                received.store(counted.load(Ordering::SeqCst), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        (endpoint, queue_url, None)
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let clock = Arc::new(AtomicU64::new(now));
    let store = dynamo.store(TABLE, StoreOptions::default()).with_clock(Clock::Manual(clock.clone()));

    eprintln!("==> seeding {sessions} answered sessions (a whole turn each, through the store)");
    let seeding = Instant::now();
    let seeded: Vec<Result<(), String>> = futures::stream::iter(0..sessions)
        .map(|n| {
            let store = store.clone();
            async move {
                // A hundred sessions a user: under the default session limit.
                let user = UserId::parse(&format!("sweep-user-{}", n / 100)).map_err(|e| e.to_string())?;
                let message = NewMessage {
                    user: &user,
                    session: None,
                    content: "hi",
                    client_message_id: None,
                    by: "bench",
                };
                let SendOutcome::Accepted(ticket) =
                    store.send_message(message).await.map_err(|e| e.to_string())?
                else {
                    return Err("the send was refused".to_owned());
                };
                let Outcome::Applied(ticket) =
                    store.commit_user_message(&ticket, "bench").await.map_err(|e| e.to_string())?
                else {
                    return Err("the commit was refused".to_owned());
                };
                let claim = store
                    .claim_generation(ticket.session_id, ticket.turn, "gen", Duration::from_secs(30), 3)
                    .await
                    .map_err(|e| e.to_string())?;
                let ClaimOutcome::Claimed(lease) = claim else {
                    return Err("the claim was refused".to_owned());
                };
                match store.commit_reply(&lease, &Reply::new("hello")).await.map_err(|e| e.to_string())? {
                    Outcome::Applied(_) => Ok(()),
                    Outcome::Conflict(c) => Err(format!("the commit was refused: {c:?}")),
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    if let Some(err) = seeded.iter().find_map(|r| r.as_ref().err()) {
        return Err(format!("seeding failed: {err}").into());
    }
    eprintln!("==> seeded in {:.1?}", seeding.elapsed());

    // Every one of them is now past its idle deadline.
    let idle = store.options().idle_timeout.ok_or("SESSION_IDLE_TIMEOUT is off")?;
    clock.fetch_add((idle + Duration::from_secs(1)).as_millis() as u64, Ordering::SeqCst);
    let queue = Queue::new(chat_local::sqs_client(&sqs_endpoint), queue_url.clone());
    let sweeper = sweeper::Sweeper::new(store.clone(), queue, 3, 3);

    let started = Instant::now();
    let mut sweeps = Vec::new();
    let mut idled = 0;
    while idled < sessions && sweeps.len() < 10 {
        let sweep = Instant::now();
        let report = sweeper.sweep().await.map_err(|e| e.to_string())?;
        eprintln!("==> sweep {}: {:.1?}, {report:?}", sweeps.len() + 1, sweep.elapsed());
        idled += report.idled;
        sweeps.push((sweep.elapsed(), report));
    }
    let total = started.elapsed();

    let waited = Instant::now();
    while (received.load(Ordering::SeqCst) as usize) < idled && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let queued = received.load(Ordering::SeqCst) as usize;

    let before = store.capacity();
    let quiet = sweeper.sweep().await.map_err(|e| e.to_string())?;
    let read = store.capacity().read_units - before.read_units;

    let queue_kind = if use_moto { "moto" } else { "a stand-in queue" };
    println!("bench-sweep: {sessions} sessions past their idle deadline, summaries sent to {queue_kind}\n");
    println!("| sweep | time | checked | expired | summaries queued |");
    println!("|---|---|---|---|---|");
    for (n, (took, report)) in sweeps.iter().enumerate() {
        println!(
            "| {} | {:.1} s | {} | {} | {} |",
            n + 1,
            took.as_secs_f64(),
            report.checked,
            report.idled,
            report.summaries_requested
        );
    }
    println!();
    println!(
        "expired and queued: {idled} of {sessions} in {:.1} s ({:.0} sessions/s); summary jobs received off the queue: {queued}",
        total.as_secs_f64(),
        idled as f64 / total.as_secs_f64()
    );
    println!(
        "a sweep with nothing due: {} checked, {read:.1} read units over {} shards",
        quiet.checked,
        chat_core::table::DUE_SHARDS
    );
    // Spot-check what the sweep left: an expired session waits for its summary.
    let ids = store.overdue_sessions(u64::MAX, 1).await?;
    if let Some(id) = ids.first() {
        let session = store.get_session(*id, Read::Consistent).await?.ok_or("a session vanished")?;
        if !(session.state == State::Timeout && session.summary_pending) {
            return Err(format!("a swept session is {} without a pending summary", session.state).into());
        }
    }
    if idled < sessions || queued < sessions {
        return Err(format!("only {idled} expired and {queued} queued of {sessions}").into());
    }
    Ok(())
}

/// Receives and deletes the queue's summary jobs as they arrive, counting them.
async fn drain(sqs: aws_sdk_sqs::Client, queue_url: String, received: Arc<AtomicU64>) {
    loop {
        let Ok(out) = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
        else {
            continue;
        };
        let messages = out.messages.unwrap_or_default();
        let summaries =
            messages.iter().filter(|m| m.body().is_some_and(|b| b.contains("\"summary\""))).count();
        let entries: Vec<_> = messages
            .iter()
            .enumerate()
            .filter_map(|(n, m)| {
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                    .id(n.to_string())
                    .set_receipt_handle(m.receipt_handle.clone())
                    .build()
                    .ok()
            })
            .collect();
        if !entries.is_empty() {
            let _ = sqs.delete_message_batch().queue_url(&queue_url).set_entries(Some(entries)).send().await;
        }
        received.fetch_add(summaries as u64, Ordering::SeqCst);
    }
}
