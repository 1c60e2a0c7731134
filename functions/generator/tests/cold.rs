//! A cold generator does not decode the tokenizer (~300 ms and ~45 MB) when bytes decide: a
//! history whose bytes fit the prompt budget is kept whole without counting, and the demo model
//! reports its usage by its own count. Alone in its process, so nothing else loads it first.

use chat_core::{Message, MessageId, Role, SessionId, Turn};
use generator::memory::{self, MemoryLimits, TokenCounter};

fn message(turn: u64, role: Role, content: &str) -> Message {
    Message {
        id: MessageId { session: SessionId::new(), turn: Turn::new(turn).unwrap(), role },
        content: content.to_owned(),
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

#[test]
fn a_history_whose_bytes_fit_the_budget_is_kept_without_decoding_the_tokenizer() {
    let history = vec![
        message(1, Role::User, "Hello there"),
        message(1, Role::Assistant, "Hi! How can I help?"),
        message(2, Role::User, "What is a byte-pair encoding?"),
    ];
    let limits = MemoryLimits { max_tokens: 8192, max_turns: 20 };
    let kept =
        memory::select(history, Turn::new(2).unwrap(), Some("Be brief."), limits, TokenCounter::o200k())
            .unwrap();
    assert_eq!(kept.len(), 3);
    assert!(!TokenCounter::is_loaded(), "bytes decided; nothing was counted");

    // Over the budget by bytes: now it counts (and loads the encoding) to decide exactly.
    let long = "word ".repeat(2000);
    let history = vec![
        message(1, Role::User, &long),
        message(1, Role::Assistant, &long),
        message(2, Role::User, "and?"),
    ];
    let kept = memory::select(history, Turn::new(2).unwrap(), None, limits, TokenCounter::o200k()).unwrap();
    assert_eq!(kept.len(), 3, "2,000 words are about 2,000 tokens: they fit 8,192");
    assert!(TokenCounter::is_loaded());
}
