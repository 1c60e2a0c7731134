//! What a turn costs: the price table (`MODEL_PRICES`, USD per million tokens by model and kind
//! of token) and a reply's cost, summed over its model calls. A call to a model without a price
//! (or with cache tokens its price does not name) makes the reply's cost unknown: never guessed.

use chat_core::config::ConfigError;
use chat_core::Usage;
use std::collections::HashMap;

/// One model's prices, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Fresh prompt tokens.
    pub input: f64,
    /// Generated tokens.
    pub output: f64,
    /// Prompt tokens read from the provider's cache; `None`: cached reads have no price.
    #[serde(default)]
    pub cache_read: Option<f64>,
    /// Prompt tokens written to the provider's cache; `None`: cache writes have no price.
    #[serde(default)]
    pub cache_write: Option<f64>,
}

impl ModelPrice {
    /// What `usage` costs at these prices, or `None` when it has tokens of a kind with no price.
    pub fn cost(&self, usage: &Usage) -> Option<f64> {
        let priced = |tokens: u64, price: Option<f64>| match (tokens, price) {
            (0, _) => Some(0.0),
            (n, Some(price)) => Some(n as f64 * price),
            (_, None) => None,
        };
        let total = priced(usage.input, Some(self.input))?
            + priced(usage.output, Some(self.output))?
            + priced(usage.cache_read, self.cache_read)?
            + priced(usage.cache_write, self.cache_write)?;
        Some(total / 1e6)
    }
}

/// The least and the most a price may be, USD per million tokens (or exactly 0).
const MIN_PRICE: f64 = 1e-6;
const MAX_PRICE: f64 = 10_000.0;

/// The configured prices, by model id (`MODEL_PRICES`); empty when none are configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prices(HashMap<String, ModelPrice>);

impl Prices {
    /// Parses `MODEL_PRICES`: `{"model-id": {"input": 3.0, "output": 15.0, "cache_read": 0.3,
    /// "cache_write": 3.75}, …}`; blank is no prices.
    pub fn parse(raw: &str) -> Result<Prices, ConfigError> {
        let invalid = |problem: String| ConfigError { variable: "MODEL_PRICES".to_owned(), problem };
        if raw.trim().is_empty() {
            return Ok(Prices::default());
        }
        let table: HashMap<String, ModelPrice> = serde_json::from_str(raw).map_err(|e| {
            invalid(format!(
                "does not parse ({e}); write {{\"model-id\": {{\"input\": 3.0, \"output\": 15.0, \
                 \"cache_read\": 0.3, \"cache_write\": 3.75}}}}, USD per million tokens"
            ))
        })?;
        for (model, price) in &table {
            let prices = [Some(price.input), Some(price.output), price.cache_read, price.cache_write];
            // A cost is stored as a DynamoDB number: prices far outside what any model costs would
            // make costs it cannot hold, and every priced commit would be refused.
            let sane = |p: f64| p == 0.0 && p.is_sign_positive() || (MIN_PRICE..=MAX_PRICE).contains(&p);
            if !prices.into_iter().flatten().all(sane) {
                return Err(invalid(format!(
                    "gives {model:?} a price outside 0 or {MIN_PRICE}..={MAX_PRICE} USD per million tokens"
                )));
            }
        }
        Ok(Prices(table))
    }

    /// Prices for exactly these models.
    pub fn of(table: impl IntoIterator<Item = (String, ModelPrice)>) -> Prices {
        Prices(table.into_iter().collect())
    }

    /// What `usage` of `model` costs, or `None` when it has no price.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        self.0.get(model)?.cost(usage)
    }
}

/// A reply's cost so far, over its model calls.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) enum Cost {
    /// No model call yet.
    #[default]
    Nothing,
    /// Every call so far was priced.
    Usd(f64),
    /// A call had no price: the reply's cost is unknown.
    Unknown,
}

impl Cost {
    /// Adds a call's cost (`None`: it had no price).
    pub(crate) fn add(&mut self, call: Option<f64>) {
        *self = match (*self, call) {
            (Cost::Unknown, _) | (_, None) => Cost::Unknown,
            (Cost::Nothing, Some(usd)) => Cost::Usd(usd),
            (Cost::Usd(sum), Some(usd)) => Cost::Usd(sum + usd),
        };
    }

    /// The cost in US dollars, when every call was priced and there was one.
    pub(crate) fn usd(self) -> Option<f64> {
        match self {
            Cost::Usd(usd) => Some(usd),
            Cost::Nothing | Cost::Unknown => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64, cache_read: u64, cache_write: u64) -> Usage {
        Usage { input, output, cache_read, cache_write }
    }

    #[test]
    fn a_price_table_parses_and_prices_every_kind_of_token_per_million() {
        let prices =
            Prices::parse(r#"{"m": {"input": 3.0, "output": 15.0, "cache_read": 0.3, "cache_write": 3.75}}"#)
                .unwrap();
        let cost = prices.cost("m", &usage(1_000_000, 100_000, 2_000_000, 400_000)).unwrap();
        assert!((cost - (3.0 + 1.5 + 0.6 + 1.5)).abs() < 1e-9, "{cost}");
        assert_eq!(prices.cost("other", &usage(1, 1, 0, 0)), None, "no price for the model: no cost");
    }

    #[test]
    fn cache_tokens_without_a_cache_price_leave_the_cost_unknown() {
        let prices = Prices::parse(r#"{"m": {"input": 1.0, "output": 2.0}}"#).unwrap();
        assert_eq!(prices.cost("m", &usage(1_000_000, 1_000_000, 0, 0)), Some(3.0));
        assert_eq!(prices.cost("m", &usage(10, 10, 5, 0)), None);
        assert_eq!(prices.cost("m", &usage(10, 10, 0, 5)), None);
    }

    #[test]
    fn a_bad_price_table_is_refused_naming_the_variable() {
        assert_eq!(Prices::parse("  ").unwrap(), Prices::default());
        for raw in [
            "not json",
            r#"{"m": {"input": 1.0}}"#,
            r#"{"m": {"input": 1.0, "output": -2.0}}"#,
            r#"{"m": {"input": -0.0, "output": 2.0}}"#,
            r#"{"m": {"input": 1e200, "output": 2.0}}"#,
            r#"{"m": {"input": 1e-200, "output": 2.0}}"#,
            r#"{"m": {"input": 1.0, "output": 2.0, "cache_read": 10001.0}}"#,
            r#"{"m": {"input": 1.0, "output": 2.0, "cached": 0.1}}"#,
        ] {
            let err = Prices::parse(raw).unwrap_err();
            assert_eq!(err.variable, "MODEL_PRICES", "{raw}");
        }
        let free_cache = r#"{"m": {"input": 0.000001, "output": 10000, "cache_read": 0}}"#;
        assert!(Prices::parse(free_cache).is_ok(), "the bounds and zero are prices");
    }

    #[test]
    fn a_replys_cost_is_known_only_when_every_call_was_priced() {
        let mut cost = Cost::default();
        assert_eq!(cost.usd(), None, "no call, no cost");
        cost.add(Some(0.5));
        cost.add(Some(0.25));
        assert_eq!(cost.usd(), Some(0.75));
        cost.add(None);
        cost.add(Some(1.0));
        assert_eq!(cost.usd(), None, "one unpriced call makes the sum unknown");
    }
}
