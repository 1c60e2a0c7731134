//! `make bench-prompt`: what conversation memory costs the generator. The tokenizer's load (once
//! per cold start) and building one prompt (count and select the history) for histories of
//! different sizes, as distributions over many runs in this one process. Then what a provider's
//! prompt cache can serve over a 10-turn conversation: per turn, the input tokens of the prefix
//! the request shares with the previous turn's (the system prompt and the whole messages before
//! the first that differs), counted with `o200k_base` and OpenAI's framing.

use chat_core::{Message, MessageId, Role, SessionId, Turn};
use generator::memory::{self, MemoryLimits, TokenCounter};
use std::time::{Duration, Instant};

fn message(session: SessionId, turn: u64, role: Role, content: String) -> Message {
    Message {
        id: MessageId { session, turn: Turn::new(turn).expect("turn"), role },
        content,
        timestamp: 0,
        stopped: None,
        routing: None,
        tool_uses: Vec::new(),
        usage: None,
        cost_usd: None,
        revises: None,
        superseded_by: None,
    }
}

/// The start of the system prompt (some 340 tokens with its filler); the conversation is 40-word
/// questions and 150-word replies.
const SYSTEM: &str = "You are the support assistant of a bicycle shop. Answer in plain English, briefly, \
and say so when you do not know. Prices are in euros and include tax. ";

fn words(seed: u64, count: usize) -> String {
    const WORDS: &[&str] = &[
        "wheel", "brake", "chain", "gear", "saddle", "frame", "tyre", "pedal", "the", "a", "with", "for",
        "front", "rear", "adjust", "replace", "cost", "week", "warranty", "carbon", "steel", "light",
    ];
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            WORDS[(state >> 33) as usize % WORDS.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The fewest tokens a cached prefix holds: OpenAI's, and most Bedrock models' (Claude 3.5
/// Haiku wants 2048).
const CACHE_MINIMUM: usize = 1024;

/// One turn's request: its input tokens, the prefix it shares with the previous turn's request,
/// and what of it a cache can serve: OpenAI (any shared prefix of at least [`CACHE_MINIMUM`]) and
/// Bedrock (the prefix up to the previous request's history cache point, or its system prompt's,
/// whichever reaches the minimum).
struct Row {
    total: usize,
    shared: usize,
    openai: usize,
    bedrock: usize,
}

/// The 10 turns, each turn's prompt as `memory::select` builds it.
fn conversation(limits: MemoryLimits, counter: TokenCounter) -> Vec<Row> {
    let session = SessionId::new();
    let system = format!("{SYSTEM}{}", words(0, 300));
    let base = counter.base(Some(&system));
    let tokens =
        |messages: &[(Role, String)]| base + messages.iter().map(|(_, t)| counter.message(t)).sum::<usize>();
    let mut stored = Vec::new();
    let mut previous: Option<Vec<(Role, String)>> = None;
    let mut rows = Vec::new();
    for turn in 1..=10u64 {
        stored.push(message(session, turn, Role::User, words(turn * 2, 40)));
        let last = Turn::new(turn).expect("turn");
        let prompt = memory::select(stored.clone(), last, Some(&system), limits, counter).expect("fits");
        let total = tokens(&prompt);
        let (shared, bedrock) = match &previous {
            None => (0, 0),
            Some(previous) => {
                let same = prompt.iter().zip(previous).take_while(|(a, b)| a == b).count();
                // The previous request's history point: before its last message (that turn's).
                let point = previous.len() - 1;
                let bedrock = if same >= point && tokens(&previous[..point]) >= CACHE_MINIMUM {
                    tokens(&previous[..point])
                } else if base >= CACHE_MINIMUM {
                    base
                } else {
                    0
                };
                (tokens(&prompt[..same]), bedrock)
            }
        };
        let openai = if shared >= CACHE_MINIMUM { shared } else { 0 };
        rows.push(Row { total, shared, openai, bedrock });
        previous = Some(prompt);
        stored.push(message(session, turn, Role::Assistant, words(turn * 2 + 1, 150)));
    }
    rows
}

fn history(turns: u32, words: usize) -> Vec<Message> {
    let session = SessionId::new();
    let text = "The quick brown fox jumps over the lazy dog, ünïcode 🦀 included. ".repeat(words / 12 + 1);
    (1..=turns)
        .flat_map(|turn| {
            let turn = Turn::new(u64::from(turn)).expect("turn");
            [Role::User, Role::Assistant]
                .into_iter()
                .map(move |role| (turn, role))
                .filter(move |(t, role)| t.get() < turns || *role == Role::User)
        })
        .map(|(turn, role)| Message {
            id: MessageId { session, turn, role },
            content: text.clone(),
            timestamp: 0,
            stopped: None,
            routing: None,
            tool_uses: Vec::new(),
            usage: None,
            cost_usd: None,
            revises: None,
            superseded_by: None,
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let started = Instant::now();
    let counter = TokenCounter::o200k();
    let load = started.elapsed();
    println!("bench-prompt: {runs} runs per history, o200k_base, debug build with optimised dependencies\n");
    println!("  tokenizer load (once per cold start)   {:.1} ms\n", load.as_secs_f64() * 1000.0);
    println!("  history (MEMORY_MAX_TURNS=20 turns read)     tokens kept   turns kept     p50        p99");
    let limits = MemoryLimits::default();
    for words in [20, 200, 1000] {
        let messages = history(20, words);
        let last = Turn::new(20).expect("turn");
        let mut times = Vec::with_capacity(runs);
        let mut kept = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            kept = memory::select(messages.clone(), last, Some("Be brief."), limits, counter).expect("fits");
            times.push(start.elapsed());
        }
        times.sort();
        let tokens: usize = kept.iter().map(|(_, text)| counter.message(text)).sum();
        println!(
            "  20 turns of ~{words:>4}-word messages            {tokens:>6}       {:>4}      {:>6.2} ms  {:>6.2} ms",
            kept.len().div_ceil(2),
            percentile(&times, 50.0).as_secs_f64() * 1000.0,
            percentile(&times, 99.0).as_secs_f64() * 1000.0,
        );
    }

    println!("\n  prompt cache: a 10-turn conversation (~340-token system prompt, 40-word questions, 150-word replies)");
    println!(
        "  shared = the prefix this turn's request shares with the previous turn's, in o200k_base tokens;"
    );
    println!("  served = what a cache can serve of it: OpenAI from {CACHE_MINIMUM} tokens, Bedrock up to the previous");
    println!("  request's cache point (before that turn's message) when that reaches {CACHE_MINIMUM} tokens");
    let windows = [
        ("MEMORY_MAX_TURNS=20 (default)", limits),
        ("MEMORY_MAX_TURNS=4", MemoryLimits { max_turns: 4, ..limits }),
    ];
    for (name, window) in windows {
        println!("\n  {name}\n  turn   input tokens   shared   served: OpenAI   Bedrock");
        let rows = conversation(window, counter);
        for (turn, row) in rows.iter().enumerate() {
            println!(
                "  {:>4}   {:>12}   {:>6}   {:>14}   {:>7}",
                turn + 1,
                row.total,
                row.shared,
                row.openai,
                row.bedrock
            );
        }
        let sum = |f: fn(&Row) -> usize| rows.iter().map(f).sum::<usize>();
        let (total, shared, openai, bedrock) =
            (sum(|r| r.total), sum(|r| r.shared), sum(|r| r.openai), sum(|r| r.bedrock));
        let pct = |n: usize| n as f64 * 100.0 / total as f64;
        println!(
            "   all   {total:>12}   {shared:>6}   {openai:>14}   {bedrock:>7}\n  share of the input   {:>9.0}%   {:>13.0}%   {:>6.0}%",
            pct(shared),
            pct(openai),
            pct(bedrock)
        );
    }
}
