//! Response routing: which model answers a turn, by one rule.
//!
//! The rule: a turn goes to the small model (`ROUTE_SMALL_MODEL`) when one is configured and
//! the user's message is short and simple: at most `ROUTE_SMALL_MAX_CHARS` characters, one
//! paragraph (no blank line), and no code (no ``` fence). Every other turn goes to the main
//! model (`LLM_MODEL`). The choice depends only on the message and the configuration, so a
//! generator that takes a stalled turn over makes the same one. It is stored with the reply
//! (`route`, `model`) and shown by `GET /sessions/{id}`. A session's summary is written by the
//! small model when there is one.

use crate::model::Model;
use chat_core::Routing;

/// The two routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The main model: everything not short and simple.
    Main,
    /// The small model: short, simple messages.
    Small,
}

impl Route {
    /// The stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Main => "main",
            Route::Small => "small",
        }
    }
}

/// When a message counts as short and simple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRule {
    /// The most characters a short message has (`ROUTE_SMALL_MAX_CHARS`).
    pub max_chars: usize,
}

impl Default for RouteRule {
    fn default() -> Self {
        RouteRule { max_chars: 200 }
    }
}

impl RouteRule {
    /// The route of a turn whose user message is `message`.
    pub fn route(&self, message: &str) -> Route {
        let message = message.trim();
        let short = message.chars().count() <= self.max_chars;
        let one_paragraph = !message.contains("\n\n") && !message.contains("\r\n\r\n");
        let no_code = !message.contains("```");
        if short && one_paragraph && no_code {
            Route::Small
        } else {
            Route::Main
        }
    }
}

/// A model with the name it is recorded under.
#[derive(Clone)]
pub struct NamedModel {
    /// The model.
    pub model: Model,
    /// Its name (the provider's model id; `demo` for the built-in one).
    pub name: String,
}

/// The models a generator routes between.
#[derive(Clone)]
pub struct Routes {
    /// The main model.
    pub main: NamedModel,
    /// The small model and the rule that sends turns to it; `None`: every turn goes to main.
    pub small: Option<(NamedModel, RouteRule)>,
}

impl From<Model> for Routes {
    fn from(model: Model) -> Routes {
        Routes::single(model, "model")
    }
}

impl Routes {
    /// Every turn to one model.
    pub fn single(model: Model, name: impl Into<String>) -> Routes {
        Routes { main: NamedModel { model, name: name.into() }, small: None }
    }

    /// The model for a turn whose user message is `message`, and the choice to record.
    pub fn pick(&self, message: &str) -> (&Model, Routing) {
        let (named, route) = match &self.small {
            Some((small, rule)) if rule.route(message) == Route::Small => (small, Route::Small),
            _ => (&self.main, Route::Main),
        };
        (&named.model, Routing { route: route.as_str().to_owned(), model: named.name.clone() })
    }

    /// The model that writes summaries: the small one when there is one.
    pub fn summarizer(&self) -> &Model {
        self.small.as_ref().map_or(&self.main.model, |(small, _)| &small.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_simple_messages_go_small_and_long_multi_paragraph_or_code_go_main() {
        let rule = RouteRule { max_chars: 20 };
        assert_eq!(rule.route("What time is it?"), Route::Small);
        assert_eq!(rule.route("  hi  \n"), Route::Small, "surrounding space is not counted");
        assert_eq!(rule.route("ünïcødé ünïcødé ü"), Route::Small, "characters, not bytes");
        assert_eq!(rule.route("Explain monads to me, slowly."), Route::Main, "over 20 characters");
        assert_eq!(rule.route("Fix:\n\nmy code"), Route::Main, "two paragraphs");
        assert_eq!(rule.route("```ls```"), Route::Main, "code");
        assert_eq!(rule.route("line one\nline two"), Route::Small, "one paragraph of two lines");
    }
}
