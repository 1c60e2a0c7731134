//! Token counting for the prompt budget. Ingest and the generator count with the same encoding
//! and the same framing, so a message ingest accepts is one the generator can fit.

use std::sync::OnceLock;
use tiktoken_rs::CoreBPE;

mod ranks;

/// The default prompt budget in tokens (`MEMORY_MAX_TOKENS`).
pub const DEFAULT_BUDGET: usize = 8192;

/// Framing a chat API adds around each message (role and separators), as OpenAI counts it.
pub const PER_MESSAGE: usize = 4;
/// Framing around the whole prompt (the reply's priming).
pub const PER_PROMPT: usize = 3;

/// Counts tokens with `o200k_base` (GPT-4o's encoding, bundled, works offline). For other model
/// families it is an estimate; leave headroom in the budget.
///
/// The encoding is built from this crate's compact copy of the ranks (`ranks.rs`), not from the
/// base64 text tiktoken-rs bundles, which is never linked: a megabyte less in every zip.
///
/// Decoding the encoding costs ~300 ms and ~45 MB, so it happens on the first count, once per
/// process: a process that never needs an exact count (bytes decide most budgets: a token is at
/// least one byte) never pays for it, and a cold start never does.
#[derive(Clone, Copy, Default)]
pub struct TokenCounter;

/// The encoding, decoded on first use.
static O200K_BASE: OnceLock<CoreBPE> = OnceLock::new();

impl TokenCounter {
    /// The counter; nothing is decoded until it counts.
    pub fn o200k() -> TokenCounter {
        TokenCounter
    }

    /// Whether this process has decoded the encoding.
    pub fn is_loaded() -> bool {
        O200K_BASE.get().is_some()
    }

    /// Tokens in `text`.
    pub fn count(&self, text: &str) -> usize {
        O200K_BASE.get_or_init(ranks::o200k_base).count_ordinary(text)
    }

    /// At least as many tokens as `text` has, without counting: its bytes (every token of the
    /// encoding is at least one byte).
    pub fn upper_bound(text: &str) -> usize {
        text.len()
    }

    /// Tokens a message costs in a prompt.
    pub fn message(&self, text: &str) -> usize {
        self.count(text) + PER_MESSAGE
    }

    /// Tokens the prompt costs before any history: the framing and the system prompt.
    pub fn base(&self, system: Option<&str>) -> usize {
        PER_PROMPT + system.map_or(0, |s| self.message(s))
    }

    /// The most tokens a user message may have and still fit a `budget`-token prompt alone
    /// with `system`; 0 when even the system prompt does not fit.
    pub fn message_limit(&self, budget: usize, system: Option<&str>) -> usize {
        budget.saturating_sub(self.base(system) + PER_MESSAGE)
    }

    /// The tokens in `text` when they are more than `limit`. Every token of this encoding is at
    /// least one byte, so text of at most `limit` bytes is not even counted.
    pub fn over(&self, text: &str, limit: usize) -> Option<usize> {
        if text.len() <= limit {
            return None;
        }
        Some(self.count(text)).filter(|&tokens| tokens > limit)
    }
}

/// Whether a user message fits a `budget`-token prompt alone with the system prompt. The
/// encoding (about 300 ms to load) is loaded only when byte lengths cannot tell, so a cold start
/// that sees only ordinary messages never pays for it.
pub struct MessageBudget {
    budget: usize,
    system: Option<String>,
    /// The counter and the exact limit, once needed.
    exact: OnceLock<(TokenCounter, usize)>,
}

impl MessageBudget {
    /// The budget, or `None` when even the system prompt leaves no room for a message.
    pub fn new(budget: usize, system: Option<String>) -> Option<MessageBudget> {
        let checked = MessageBudget { budget, system, exact: OnceLock::new() };
        (checked.surely_fitting_bytes() > 0 || checked.limit() > 0).then_some(checked)
    }

    /// The most tokens a message may have.
    pub fn limit(&self) -> usize {
        self.exact().1
    }

    /// `(tokens, limit)` when `text` does not fit.
    pub fn over(&self, text: &str) -> Option<(usize, usize)> {
        if text.len() <= self.surely_fitting_bytes() {
            return None;
        }
        let (counter, limit) = self.exact();
        counter.over(text, *limit).map(|tokens| (tokens, *limit))
    }

    /// Message bytes that fit whatever their tokens: a token is at least a byte, so neither the
    /// message nor the system prompt has more tokens than bytes.
    fn surely_fitting_bytes(&self) -> usize {
        let system = self.system.as_ref().map_or(0, |s| s.len() + PER_MESSAGE);
        self.budget.saturating_sub(PER_PROMPT + system + PER_MESSAGE)
    }

    fn exact(&self) -> &(TokenCounter, usize) {
        self.exact.get_or_init(|| {
            let counter = TokenCounter::o200k();
            (counter, counter.message_limit(self.budget, self.system.as_deref()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokenizer_is_real() {
        let counter = TokenCounter::o200k();
        assert_eq!(counter.count("hello world"), 2);
        assert!(counter.count("ünïcode 🦀 text\nwith lines") > 4);
    }

    #[test]
    fn a_message_at_the_limit_fits_exactly() {
        let counter = TokenCounter::o200k();
        let system = Some("You are terse.");
        let limit = counter.message_limit(100, system);
        // The longest run of words that is within the limit fits the budget exactly…
        let mut fitting = String::from("word");
        while counter.count(&format!("{fitting} word")) <= limit {
            fitting.push_str(" word");
        }
        assert!(counter.base(system) + counter.message(&fitting) <= 100);
        assert_eq!(counter.over(&fitting, limit), None);
        // …and one word more is over it.
        let longer = format!("{fitting} word");
        assert_eq!(counter.over(&longer, limit), Some(limit + 1));
        assert!(counter.base(system) + counter.message(&longer) > 100);
        assert_eq!(counter.message_limit(5, system), 0);
    }

    #[test]
    fn a_budget_counts_only_what_bytes_cannot_decide() {
        let budget = MessageBudget::new(100, Some("You are terse.".to_owned())).unwrap();
        assert_eq!(budget.over("a short message"), None);
        assert!(budget.exact.get().is_none(), "no encoding loaded for a message that surely fits");
        let limit = budget.limit();
        assert_eq!(limit, TokenCounter::o200k().message_limit(100, Some("You are terse.")));
        assert!(budget.surely_fitting_bytes() <= limit);
        // Many bytes, few tokens: counted, and it fits.
        let dense = "aaaa".repeat(40);
        assert!(dense.len() > limit && TokenCounter::o200k().count(&dense) <= limit);
        assert_eq!(budget.over(&dense), None);
        let long = "word ".repeat(200);
        assert_eq!(budget.over(&long), Some((TokenCounter::o200k().count(&long), limit)));
        assert!(MessageBudget::new(5, Some("You are terse.".to_owned())).is_none());
        assert!(
            MessageBudget::new(20, Some("x".repeat(30))).is_some(),
            "bytes overstate the prompt's tokens"
        );
    }
}
