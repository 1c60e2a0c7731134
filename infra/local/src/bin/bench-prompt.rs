//! `make bench-prompt`: what conversation memory costs the generator. The tokenizer's load (once
//! per cold start) and building one prompt (count and select the history) for histories of
//! different sizes, as distributions over many runs in this one process.

use chat_core::{Message, MessageId, Role, SessionId, Turn};
use generator::memory::{self, MemoryLimits, TokenCounter};
use std::time::{Duration, Instant};

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
}
