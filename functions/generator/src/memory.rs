//! Conversation memory: which messages of a session the model sees. Whole turns, newest first,
//! until the token budget or the turn limit is reached; never part of a message.

use chat_core::{Message, Role, Summary, Turn};
pub use chat_tokens::TokenCounter;

/// How much history a prompt may carry.
#[derive(Debug, Clone, Copy)]
pub struct MemoryLimits {
    /// Tokens for the system prompt and the messages together (`MEMORY_MAX_TOKENS`).
    pub max_tokens: usize,
    /// Turns, the current one included (`MEMORY_MAX_TURNS`).
    pub max_turns: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        MemoryLimits { max_tokens: chat_tokens::DEFAULT_BUDGET, max_turns: 20 }
    }
}

/// The current turn's message does not fit the budget even alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the message needs {needed} tokens with the system prompt, more than the {budget}-token context budget"
)]
pub struct OverBudget {
    /// Tokens the system prompt and the message need.
    pub needed: usize,
    /// The budget.
    pub budget: usize,
}

/// The messages without the turns a regenerate or an edit superseded: those are earlier versions,
/// which the history keeps and the model does not see.
pub fn current_versions(messages: Vec<Message>) -> Vec<Message> {
    let superseded: Vec<Turn> =
        messages.iter().filter(|m| m.superseded_by.is_some()).map(|m| m.id.turn).collect();
    messages.into_iter().filter(|m| !superseded.contains(&m.id.turn)).collect()
}

/// The history for `turn`: the messages of the newest turns up to and including this turn's user
/// message that fit `limits` with `system`, oldest first. Earlier turns are whole (user message
/// and reply) or left out; the current turn's message is always there, or [`OverBudget`].
pub fn select(
    messages: Vec<Message>,
    turn: Turn,
    system: Option<&str>,
    limits: MemoryLimits,
    counter: TokenCounter,
) -> Result<Vec<(Role, String)>, OverBudget> {
    let mut turns: Vec<Vec<Message>> = Vec::new();
    for message in current_versions(messages) {
        if message.id.turn > turn || (message.id.turn == turn && message.id.role != Role::User) {
            continue;
        }
        match turns.last_mut() {
            Some(group) if group[0].id.turn == message.id.turn => group.push(message),
            _ => turns.push(vec![message]),
        }
    }
    // The newest turns the turn limit allows: when even their bytes fit the token budget (a
    // token is at least a byte), they all fit, and nothing needs the encoding.
    let newest = turns.len().saturating_sub(limits.max_turns.max(1));
    let bytes = |text: &str| TokenCounter::upper_bound(text) + chat_tokens::PER_MESSAGE;
    let system_bytes = chat_tokens::PER_PROMPT + system.map_or(0, bytes);
    let all_bytes: usize = turns[newest..].iter().flatten().map(|m| bytes(&m.content)).sum();
    if system_bytes + all_bytes <= limits.max_tokens {
        return Ok(turns.drain(newest..).flatten().map(|m| (m.id.role, m.content)).collect());
    }
    let mut used = counter.base(system);
    let mut kept: Vec<Vec<Message>> = Vec::new();
    for group in turns.into_iter().rev() {
        if kept.len() >= limits.max_turns.max(1) {
            break;
        }
        let cost: usize = group.iter().map(|m| counter.message(&m.content)).sum();
        if used + cost > limits.max_tokens {
            if kept.is_empty() {
                return Err(OverBudget { needed: used + cost, budget: limits.max_tokens });
            }
            break;
        }
        used += cost;
        kept.push(group);
    }
    Ok(kept.into_iter().rev().flatten().map(|m| (m.id.role, m.content)).collect())
}

/// The most a stored summary may hold: it lives on the session item, which every read carries.
pub const SUMMARY_MAX_BYTES: usize = 2_000;

/// What the model is told when it writes a session's summary.
pub const SUMMARY_INSTRUCTIONS: &str = "You write the memory of a conversation between a user and an \
assistant, for the assistant to read when the user comes back. In a few sentences, keep what matters \
later: what the user wants, facts and preferences they gave, answers and decisions reached, and open \
questions. Write only the summary.";

/// The system prompt with the session's summary, which stands in for the turns it covers.
pub fn with_summary(system: Option<&str>, summary: Option<&Summary>) -> Option<String> {
    match (system, summary) {
        (system, Some(summary)) => Some(format!(
            "{}Summary of the conversation so far (through turn {}): {}",
            system.map(|s| format!("{s}\n\n")).unwrap_or_default(),
            summary.through,
            summary.text
        )),
        (system, None) => system.map(str::to_owned),
    }
}

/// The prompt that asks for a summary: the previous summary, if any, then as many of the
/// newest `messages` as the budget allows, as one transcript the model condenses.
pub fn summary_prompt(
    previous: Option<&str>,
    messages: &[Message],
    limits: MemoryLimits,
    counter: TokenCounter,
) -> crate::llm::Prompt {
    let line = |m: &Message| {
        let who = match m.id.role {
            Role::User => "User",
            Role::Assistant => "Assistant",
        };
        format!("{who}: {}", m.content)
    };
    let mut budget = limits.max_tokens.saturating_sub(counter.base(Some(SUMMARY_INSTRUCTIONS)));
    if let Some(previous) = previous {
        budget = budget.saturating_sub(counter.message(previous));
    }
    let mut lines: Vec<String> = Vec::new();
    for message in messages.iter().rev() {
        let text = line(message);
        let cost = counter.message(&text);
        if cost > budget {
            break;
        }
        budget -= cost;
        lines.push(text);
    }
    lines.reverse();
    let mut transcript = String::new();
    if let Some(previous) = previous {
        transcript.push_str(&format!("Summary of what came before: {previous}\n\n"));
    }
    transcript.push_str(&lines.join("\n"));
    crate::llm::Prompt {
        system: Some(SUMMARY_INSTRUCTIONS.to_owned()),
        messages: vec![(Role::User, transcript)],
        ..crate::llm::Prompt::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::{MessageId, SessionId};

    fn conversation(turns: u64, words: usize) -> Vec<Message> {
        let session = SessionId::new();
        let mut messages = Vec::new();
        for turn in 1..=turns {
            for role in [Role::User, Role::Assistant] {
                messages.push(Message {
                    id: MessageId { session, turn: Turn::new(turn).unwrap(), role },
                    content: format!("turn {turn} {role:?}: {}", "word ".repeat(words)),
                    timestamp: 0,
                    stopped: None,
                    routing: None,
                    tool_uses: Vec::new(),
                    usage: None,
                    cost_usd: None,
                    revises: None,
                    superseded_by: None,
                });
            }
        }
        messages
    }

    fn cost(counter: TokenCounter, system: Option<&str>, kept: &[(Role, String)]) -> usize {
        counter.base(system) + kept.iter().map(|(_, t)| counter.message(t)).sum::<usize>()
    }

    #[test]
    fn a_long_conversation_stays_within_budget_keeping_the_newest_whole_turns() {
        let counter = TokenCounter::o200k();
        let history = conversation(200, 30);
        let system = Some("You are terse.");
        for budget in [80, 200, 1000, 5000] {
            let limits = MemoryLimits { max_tokens: budget, max_turns: 1000 };
            let kept = select(history.clone(), Turn::new(150).unwrap(), system, limits, counter).unwrap();
            assert!(cost(counter, system, &kept) <= budget, "budget {budget}");
            // Ends with turn 150's user message; before it, whole turns in order, newest kept.
            assert!(kept.last().unwrap().1.starts_with("turn 150 User"));
            assert_eq!(kept.len() % 2, 1);
            let first_turn = 150 - (kept.len() as u64 - 1) / 2;
            for (i, (role, text)) in kept.iter().enumerate() {
                let turn = first_turn + i as u64 / 2;
                let expected_role = if i % 2 == 0 { Role::User } else { Role::Assistant };
                assert_eq!(*role, expected_role);
                assert!(text.starts_with(&format!("turn {turn} {expected_role:?}: ")));
                assert!(text.ends_with("word "), "never split");
            }
            // The next older turn would not have fit.
            if first_turn > 1 {
                let older: usize = history
                    .iter()
                    .filter(|m| m.id.turn == Turn::new(first_turn - 1).unwrap())
                    .map(|m| counter.message(&m.content))
                    .sum();
                assert!(cost(counter, system, &kept) + older > budget);
            }
        }
    }

    #[test]
    fn the_turn_limit_counts_the_current_turn() {
        let counter = TokenCounter::o200k();
        let limits = MemoryLimits { max_tokens: 1_000_000, max_turns: 3 };
        let kept = select(conversation(10, 3), Turn::new(10).unwrap(), None, limits, counter).unwrap();
        let turns: Vec<&str> = kept.iter().map(|(_, t)| &t[..7]).collect();
        assert_eq!(turns, ["turn 8 ", "turn 8 ", "turn 9 ", "turn 9 ", "turn 10"]);
    }

    #[test]
    fn a_superseded_turn_is_left_out_and_its_revision_kept() {
        let counter = TokenCounter::o200k();
        let limits = MemoryLimits { max_tokens: 1_000_000, max_turns: 20 };
        // Turn 2 was regenerated as turn 3: the prompt of turn 4 has turns 1 and 3.
        let mut history = conversation(4, 3);
        history.iter_mut().filter(|m| m.id.turn.get() == 2 && m.id.role == Role::User).for_each(|m| {
            m.superseded_by = Some(Turn::new(3).unwrap());
        });
        let kept = select(history, Turn::new(4).unwrap(), None, limits, counter).unwrap();
        let turns: Vec<&str> = kept.iter().map(|(_, t)| &t[..7]).collect();
        assert_eq!(turns, ["turn 1 ", "turn 1 ", "turn 3 ", "turn 3 ", "turn 4 "]);
    }

    #[test]
    fn a_message_over_the_budget_alone_is_an_error_not_a_cut() {
        let counter = TokenCounter::o200k();
        let limits = MemoryLimits { max_tokens: 50, max_turns: 20 };
        let err = select(conversation(2, 100), Turn::new(2).unwrap(), None, limits, counter).unwrap_err();
        assert!(err.needed > 50);
        assert_eq!(err.budget, 50);
    }
}
