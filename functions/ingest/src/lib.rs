//! The ingest function: accepts a user's message for a session (claim the turn, store the
//! message, enqueue generation), redoes the last turn (regenerate, edit), forks a session, and
//! serves reads, cancel and delete, and the chat page
//! ([`web`]). Every route of the ingest contract in docs/architecture.md is in [`App::handle`]'s
//! routing; the routes are served by `send.rs` (sending, regenerating, editing, forking,
//! cancelling), `history.rs` (a session's pages, a user's sessions, deleting) and `export.rs`
//! (renaming, exporting), their errors mapped to answers by `api.rs`.

mod api;
mod export;
mod history;
mod send;
pub mod web;

pub use api::ApiError;
pub use history::MAX_PAGE_BYTES;

use api::json;
use chat_auth::{AuthConfig, Authenticator};
use chat_core::config::{CommonConfig, ConfigError, Env};
use chat_core::{GlobalLimits, Store, UserLimits};
use chat_runtime::metrics;
use chat_runtime::queue::Queue;
use chat_tokens::MessageBudget;
use lambda_http::http::{Method, StatusCode};
use lambda_http::{Body, Request, RequestExt, Response};
use serde_json::json;
use tracing::{info, Instrument};

/// Request bodies larger than this get 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The generator's prompt budget, which a message must fit alone.
#[derive(Debug, Clone, Default)]
pub struct Budget {
    /// `MEMORY_MAX_TOKENS`.
    pub tokens: usize,
    /// `LLM_SYSTEM_PROMPT`.
    pub system_prompt: Option<String>,
}

/// The ingest function's dependencies, built once per cold start.
pub struct App {
    store: Store,
    auth: Authenticator,
    queue: Queue,
    /// Base of the `stream_url` in answers (`STREAM_URL_BASE`); a relative URL when unset.
    stream_url_base: String,
    /// The chat page, which talks to this origin and the stream's.
    page: web::Page,
    limits: UserLimits,
    /// Limits over every user (`GLOBAL_TURNS_PER_MINUTE`).
    global: GlobalLimits,
    /// A message must fit the generator's prompt budget alone (`MEMORY_MAX_TOKENS` less the
    /// system prompt `LLM_SYSTEM_PROMPT` and framing).
    budget: MessageBudget,
}

impl App {
    /// Reads the configuration and builds the clients.
    pub async fn from_env() -> Result<App, ConfigError> {
        let env = Env::process();
        let common = CommonConfig::from_env(&env)?;
        let queue_url = env.required("QUEUE_URL")?;
        let stream_url_base = env.optional("STREAM_URL_BASE").unwrap_or_default();
        let auth = Authenticator::new(AuthConfig::from_env(&env)?)?;
        let budget = Budget {
            tokens: env.parse_or("MEMORY_MAX_TOKENS", chat_tokens::DEFAULT_BUDGET)?,
            system_prompt: env.optional("LLM_SYSTEM_PROMPT"),
        };
        let aws = chat_runtime::aws::load_config().await;
        let store = Store::new(chat_runtime::aws::dynamodb(&aws), common.table_name, common.store);
        let queue = Queue::new(chat_runtime::queue::sqs(&aws), queue_url);
        let app = App::new(store, auth, queue, common.limits, budget)?;
        Ok(app.with_stream_url_base(&stream_url_base).with_global_limits(common.global))
    }

    /// An app over explicit parts; `stream_url` answers are relative.
    pub fn new(
        store: Store,
        auth: Authenticator,
        queue: Queue,
        limits: UserLimits,
        budget: Budget,
    ) -> Result<App, ConfigError> {
        let tokens = budget.tokens;
        let budget = MessageBudget::new(tokens, budget.system_prompt).ok_or_else(|| ConfigError {
            variable: "MEMORY_MAX_TOKENS".to_owned(),
            problem: format!("is {tokens}: the system prompt alone does not fit it"),
        })?;
        Ok(App {
            store,
            auth,
            queue,
            stream_url_base: String::new(),
            page: web::Page::new(""),
            limits,
            global: GlobalLimits::default(),
            budget,
        })
    }

    /// The same app holding every user together to `global`.
    pub fn with_global_limits(mut self, global: GlobalLimits) -> App {
        self.global = global;
        self
    }

    /// The same app answering with absolute `stream_url`s under `base` (`STREAM_URL_BASE`), and
    /// serving the chat page that streams from its origin.
    pub fn with_stream_url_base(mut self, base: &str) -> App {
        self.stream_url_base = base.trim_end_matches('/').to_owned();
        self.page = web::Page::new(&self.stream_url_base);
        self
    }

    /// Serves one request; every outcome, errors included, is a JSON response.
    pub async fn handle(&self, request: Request) -> Response<Body> {
        let request_id = request
            .lambda_context_ref()
            .map_or_else(|| format!("local-{}", uuid::Uuid::new_v4().simple()), |c| c.request_id.clone());
        let span = tracing::info_span!(
            "request",
            %request_id,
            method = %request.method(),
            path = %request.uri().path(),
            session = tracing::field::Empty
        );
        async {
            let response = match self.route(&request, &request_id).await {
                Ok(response) => response,
                Err(err) => {
                    let answer = err.answer();
                    metrics::error_answer(answer.status.as_u16(), answer.code);
                    answer.response().map(Body::Text)
                }
            };
            info!(status = response.status().as_u16(), "answered");
            response
        }
        .instrument(span)
        .await
    }

    async fn route(&self, request: &Request, request_id: &str) -> Result<Response<Body>, ApiError> {
        // The chat page is public: signing in happens on it.
        if matches!(*request.method(), Method::GET | Method::HEAD) {
            if let Some(page) = self.page.response(request.uri().path()) {
                return Ok(page);
            }
        }
        let path = request.uri().path().trim_end_matches('/').to_owned();
        // Segments arrive percent-encoded (`alice%40example.com`); ids are matched decoded.
        let decoded = path
            .split('/')
            .skip(1)
            .map(|segment| {
                percent_encoding::percent_decode_str(segment).decode_utf8().map(|s| s.into_owned())
            })
            .collect::<Result<Vec<String>, _>>()
            .map_err(|_| {
                ApiError::bad_request("invalid_path", "the path is not UTF-8 once percent-decoded")
            })?;
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let method = request.method().clone();
        if segments.as_slice() == ["health"] {
            return match method {
                Method::GET => Ok(json(StatusCode::OK, json!({"status": "ok"}))),
                _ => Err(ApiError::method_not_allowed("GET")),
            };
        }
        let iam = chat_auth::iam_identity(request);
        let caller = self.auth.authenticate(request.headers(), None, iam.as_ref()).await?.caller;
        let caller = &caller;
        match (segments.as_slice(), &method) {
            (["sessions", user, "messages"], &Method::POST) => {
                self.post_message(request, user, caller, request_id).await
            }
            (["sessions", _, "messages"], _) => Err(ApiError::method_not_allowed("POST")),
            (["sessions", "user", user], &Method::GET) | (["users", user, "sessions"], &Method::GET) => {
                self.list_sessions(request, user, caller).await
            }
            (["sessions", "user", _], _) | (["users", _, "sessions"], _) => {
                Err(ApiError::method_not_allowed("GET"))
            }
            (["sessions", id, "cancel"], &Method::POST) => self.cancel(id, caller).await,
            (["sessions", id, "regenerate"], &Method::POST) => {
                self.revise(request, id, caller, request_id, false).await
            }
            (["sessions", id, "edit"], &Method::POST) => {
                self.revise(request, id, caller, request_id, true).await
            }
            (["sessions", id, "fork"], &Method::POST) => self.fork(request, id, caller, request_id).await,
            (["sessions", _, "cancel" | "regenerate" | "edit" | "fork"], _) => {
                Err(ApiError::method_not_allowed("POST"))
            }
            (["sessions", id, "export"], &Method::GET) => self.export(request, id, caller).await,
            (["sessions", _, "export"], _) => Err(ApiError::method_not_allowed("GET")),
            (["sessions", id], &Method::GET) => self.get_session(request, id, caller).await,
            (["sessions", id], &Method::PATCH) => self.rename(request, id, caller).await,
            (["sessions", id], &Method::DELETE) => self.delete_session(id, caller).await,
            (["sessions", _], _) => Err(ApiError::method_not_allowed("GET, PATCH, DELETE")),
            _ => Err(ApiError::NotFound {
                code: "route_not_found",
                message: format!("no route for {method} {path}; see the API in docs/architecture.md"),
            }),
        }
    }
}
