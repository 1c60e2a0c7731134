//! `make bench-turn`: what one turn costs and how fast its tokens reach a client.
//!
//! Runs whole turns (500-token demo replies at 50 tokens/s by default) through the real store,
//! generator and stream code against a fresh DynamoDB emulator, with one SSE client per turn, at
//! two chunk-flush settings, and reports:
//! - write and read capacity units per turn, from DynamoDB's own consumed-capacity figures;
//! - relay lag per token: the moment the generator receives it from the model (handed to the
//!   chunk writer) to the moment the SSE client reads it, as percentiles;
//! - what a session's idle expiry costs: the sweeper's transitions and the generator's summary
//!   job (measured on the first session of each setting).

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use chat_core::config::Env;
use chat_core::job::TurnMessage;
use chat_core::{NewMessage, Outcome, Read, Role, SendOutcome, StoreOptions, UserId};
use futures::future::BoxFuture;
use futures::stream::StreamExt;
use generator::llm::{DemoModel, Model, ModelError, ModelProvider, Prompt, RetryPolicy, TokenStream};
use lambda_http::RequestExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Wraps a model and notes when each token leaves it for the generator.
struct TimedModel {
    inner: DemoModel,
    handed: Arc<Mutex<Vec<Instant>>>,
}

impl ModelProvider for TimedModel {
    fn open(&self, prompt: Arc<Prompt>) -> BoxFuture<'static, Result<TokenStream, ModelError>> {
        let handed = self.handed.clone();
        let opened = self.inner.open(prompt);
        Box::pin(async move {
            let tokens = opened.await?;
            Ok(tokens
                .map(move |token| {
                    handed.lock().unwrap().push(Instant::now());
                    token
                })
                .boxed())
        })
    }
}

struct Setting {
    name: &'static str,
    flush_interval: Duration,
    flush_max_tokens: usize,
}

#[derive(Default)]
struct Totals {
    write_units: f64,
    generator_read_units: f64,
    stream_read_units: f64,
    lags_ms: Vec<f64>,
    turns: usize,
    chunks: usize,
    /// The idle expiry (sweeper) and the summary job (generator) of one session.
    idle_write_units: f64,
    idle_read_units: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = Env::process();
    let turns: usize = env.parse_or("BENCH_TURNS", 5)?;
    let reply_tokens: usize = env.parse_or("BENCH_REPLY_TOKENS", 500)?;
    let token_delay = env.millis_or("BENCH_TOKEN_DELAY_MS", Duration::from_millis(20))?;
    let poll_fast = env.millis_or("STREAM_POLL_FAST_MS", Duration::from_millis(50))?;
    let settings = [
        Setting {
            name: "default (flush every 100 ms or 32 tokens)",
            flush_interval: Duration::from_millis(100),
            flush_max_tokens: 32,
        },
        Setting {
            name: "economy (flush every 32 tokens)",
            flush_interval: Duration::from_secs(3600),
            flush_max_tokens: 32,
        },
    ];
    println!(
        "bench-turn: {turns} turns per setting, {reply_tokens}-token replies at {:.0} tokens/s, stream polling every {poll_fast:?} while generating\n",
        1.0 / token_delay.as_secs_f64()
    );
    for setting in &settings {
        let totals = run(setting, turns, reply_tokens, token_delay, poll_fast).await?;
        let mut lags = totals.lags_ms.clone();
        lags.sort_by(f64::total_cmp);
        let n = totals.turns as f64;
        println!("{}", setting.name);
        println!("  write units per turn     {:>8.1}   (one write per token would be ~{reply_tokens}: {:.1}x fewer)", totals.write_units / n, reply_tokens as f64 / (totals.write_units / n));
        println!("  chunks per turn          {:>8.1}", totals.chunks as f64 / n);
        println!("  read units per turn      {:>8.1}   generator", totals.generator_read_units / n);
        println!("                           {:>8.1}   per SSE client", totals.stream_read_units / n);
        println!(
            "  idle expiry + summary    {:>8.1}   write units, {:.1} read units, once per quiet session",
            totals.idle_write_units, totals.idle_read_units
        );
        println!(
            "  relay lag (ms)           p50 {:.0}   p90 {:.0}   p99 {:.0}   max {:.0}   ({} tokens)\n",
            percentile(&lags, 50.0),
            percentile(&lags, 90.0),
            percentile(&lags, 99.0),
            lags.last().copied().unwrap_or(f64::NAN),
            lags.len()
        );
    }
    Ok(())
}

async fn run(
    setting: &Setting,
    turns: usize,
    reply_tokens: usize,
    token_delay: Duration,
    poll_fast: Duration,
) -> Result<Totals, Box<dyn std::error::Error>> {
    let table = "bench";
    let dynamo = chat_local::LocalDynamo::start(0, table).await?;
    let store = || dynamo.store(table, StoreOptions::default());
    let (ingest_store, generator_store, stream_store) = (store(), store(), store());
    let handed = Arc::new(Mutex::new(Vec::new()));
    let model =
        TimedModel { inner: DemoModel { reply_tokens, token_delay, faults: false }, handed: handed.clone() };
    let generator = generator::Generator::new(
        generator_store.clone(),
        Model::new(Arc::new(model), RetryPolicy::default()),
        generator::GenerationSettings {
            lease: Duration::from_secs(30),
            max_generation_attempts: 3,
            flush_interval: setting.flush_interval,
            flush_max_tokens: setting.flush_max_tokens,
            faults: false,
            system_prompt: None,
            memory: Default::default(),
            reply_max_bytes: 300_000,
            tool_deadline: Duration::from_secs(60),
        },
    );
    let relay = stream::Relay::new(
        stream_store.clone(),
        stream::RelaySettings {
            poll_fast,
            poll_slow: Duration::from_millis(500),
            keepalive: Duration::from_secs(15),
            max_duration: Duration::from_secs(600),
            retry: Duration::from_secs(1),
            max_open_streams: 0,
        },
        chat_auth::Authenticator::trusted(),
    );
    let mut totals = Totals::default();
    for turn in 0..turns {
        handed.lock().unwrap().clear();
        let before = (ingest_store.capacity(), generator_store.capacity(), stream_store.capacity());
        let user = UserId::parse(&format!("bench-{turn}"))?;
        let SendOutcome::Accepted(ticket) = ingest_store
            .send_message(NewMessage {
                user: &user,
                session: None,
                content: "How fast is this?",
                client_message_id: None,
                by: "bench",
            })
            .await?
        else {
            return Err("send was not accepted".into());
        };
        let Outcome::Applied(ticket) = ingest_store.commit_user_message(&ticket, "bench").await? else {
            return Err("commit was refused".into());
        };
        // The SSE client connects first, as a browser would right after the 202.
        let request = lambda_http::http::Request::builder()
            .uri(format!("/sessions/{}/stream", ticket.session_id))
            .body(lambda_http::Body::Empty)?
            .with_query_string_parameters(HashMap::from([("turn".to_owned(), "1".to_owned())]));
        let response = relay.handle(request).await;
        let reader = tokio::spawn(async move {
            let body = http_body_util::BodyDataStream::new(response.into_body()).boxed();
            let mut events = chat_local::sse_reader::SseStream::from_bytes(body);
            let mut received = Vec::new();
            while let Ok(Some(event)) = events.next().await {
                if event.event == "token" {
                    let id = event.id.unwrap_or_default();
                    let index: usize =
                        id.split_once(':').and_then(|(_, i)| i.parse().ok()).unwrap_or(usize::MAX);
                    received.push((index, Instant::now()));
                }
            }
            received
        });
        let mut message = SqsMessage::default();
        message.message_id = Some(format!("bench-{turn}"));
        message.body = Some(serde_json::to_string(&TurnMessage::reply(ticket.session_id, ticket.turn))?);
        let mut event = SqsEvent::default();
        event.records = vec![message];
        let response = generator.handle(event).await;
        if !response.batch_item_failures.is_empty() {
            return Err("the generator reported a failure".into());
        }
        let received = reader.await?;
        let handed = handed.lock().unwrap().clone();
        if received.len() != handed.len() || handed.len() != reply_tokens {
            return Err(format!("{} tokens handed over, {} received", handed.len(), received.len()).into());
        }
        for (index, at) in received {
            totals.lags_ms.push(at.duration_since(handed[index]).as_secs_f64() * 1000.0);
        }
        let (_, messages) =
            ingest_store.get_conversation(ticket.session_id).await?.ok_or("session vanished")?;
        if !messages.iter().any(|m| m.id.role == Role::Assistant) {
            return Err("no reply was committed".into());
        }
        totals.chunks +=
            ingest_store.read_chunks(ticket.session_id, ticket.turn, None, Read::Consistent).await?.len();
        let after = (ingest_store.capacity(), generator_store.capacity(), stream_store.capacity());
        totals.write_units +=
            (after.0.write_units - before.0.write_units) + (after.1.write_units - before.1.write_units);
        totals.generator_read_units += after.1.read_units - before.1.read_units;
        totals.stream_read_units += after.2.read_units - before.2.read_units;
        totals.turns += 1;
        if turn == 0 {
            // The session goes quiet: the sweeper expires it, the generator writes its summary.
            let before = (ingest_store.capacity(), generator_store.capacity());
            let session = ingest_store
                .get_session(ticket.session_id, Read::Consistent)
                .await?
                .ok_or("session vanished")?;
            let Outcome::Applied(_) = ingest_store.expire_idle(&session, "bench").await? else {
                return Err("the idle expiry was refused".into());
            };
            let mut message = SqsMessage::default();
            message.message_id = Some("bench-summary".to_owned());
            message.body =
                Some(serde_json::to_string(&TurnMessage::summary(ticket.session_id, ticket.turn))?);
            let mut event = SqsEvent::default();
            event.records = vec![message];
            if !generator.handle(event).await.batch_item_failures.is_empty() {
                return Err("the summary job failed".into());
            }
            let summarised = ingest_store
                .get_session(ticket.session_id, Read::Consistent)
                .await?
                .ok_or("session vanished")?;
            if summarised.summary.is_none() {
                return Err("no summary was stored".into());
            }
            let after = (ingest_store.capacity(), generator_store.capacity());
            totals.idle_write_units =
                (after.0.write_units - before.0.write_units) + (after.1.write_units - before.1.write_units);
            totals.idle_read_units =
                (after.0.read_units - before.0.read_units) + (after.1.read_units - before.1.read_units);
        }
    }
    Ok(totals)
}
