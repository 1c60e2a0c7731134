//! Response routing: which model answers a turn, by one rule.
//!
//! The rule: a turn goes to the small model (`ROUTE_SMALL_MODEL`) when one is configured and
//! the user's message is short and simple: at most `ROUTE_SMALL_MAX_CHARS` characters, one
//! paragraph (no blank line), and no code (no ``` fence). Every other turn goes to the main
//! model (`LLM_MODEL`). A turn that needs tools is the main model's too: when the small model
//! asks for one, the tool step and the rest of the turn go to the main model (route
//! `escalated`). The choice depends only on the message, the configuration and whether the turn
//! has taken a tool step, so a generator that takes a stalled turn over makes the same one. It
//! is stored with the reply (`route`, `model`) and shown by `GET /sessions/{id}`. A session's
//! summary is written by the small model when there is one.

use crate::llm::Model;
use chat_core::Routing;

/// The two routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The main model: everything not short and simple.
    Main,
    /// The small model: short, simple messages.
    Small,
    /// Started on the small model, which asked for a tool: the main model goes on.
    Escalated,
}

impl Route {
    /// The stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Main => "main",
            Route::Small => "small",
            Route::Escalated => "escalated",
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

    /// The model for a turn whose user message is `message` (and which has already taken a tool
    /// step, after a takeover), and the choice to record.
    pub fn pick(&self, message: &str, took_tool_step: bool) -> (&Model, Routing) {
        let (named, route) = match &self.small {
            Some((_, rule)) if rule.route(message) == Route::Small && took_tool_step => {
                (&self.main, Route::Escalated)
            }
            Some((small, rule)) if rule.route(message) == Route::Small => (small, Route::Small),
            _ => (&self.main, Route::Main),
        };
        (&named.model, Routing { route: route.as_str().to_owned(), model: named.name.clone() })
    }

    /// When the small model has the turn and asked for a tool: the main model and the new
    /// choice to record; `None` when the main model has it already.
    pub fn escalate(&self, current: Option<&Routing>) -> Option<(&Model, Routing)> {
        let on_small = current.is_some_and(|r| r.route == Route::Small.as_str());
        on_small.then(|| {
            let routing =
                Routing { route: Route::Escalated.as_str().to_owned(), model: self.main.name.clone() };
            (&self.main.model, routing)
        })
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

    #[test]
    fn a_turn_that_needs_tools_is_the_main_models() {
        use crate::llm::{DemoModel, RetryPolicy};
        let demo = || {
            let provider =
                DemoModel { reply_tokens: 1, token_delay: std::time::Duration::ZERO, faults: false };
            Model::new(std::sync::Arc::new(provider), RetryPolicy::default())
        };
        let routes = Routes {
            main: NamedModel { model: demo(), name: "big".to_owned() },
            small: Some((
                NamedModel { model: demo(), name: "small".to_owned() },
                RouteRule { max_chars: 20 },
            )),
        };
        let long = "x".repeat(30);
        let small = routes.pick("hi", false).1;
        assert_eq!((small.route.as_str(), small.model.as_str()), ("small", "small"));
        let escalated = routes.escalate(Some(&small)).expect("the small model hands over").1;
        assert_eq!((escalated.route.as_str(), escalated.model.as_str()), ("escalated", "big"));
        assert_eq!(routes.pick("hi", true).1, escalated, "a takeover after a tool step decides the same");
        assert_eq!(routes.pick(&long, true).1.route, "main");
        assert!(routes.escalate(Some(&routes.pick(&long, false).1)).is_none());
        assert!(routes.escalate(Some(&escalated)).is_none());
    }
}
