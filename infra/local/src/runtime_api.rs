//! A Lambda Runtime API on loopback, for timing a function process from the outside: when it
//! first asks for an invocation (its init is over), when it answers each one, and what it
//! answered. It serves one function at `http://127.0.0.1:PORT/.rt/<name>`, the form `cargo lambda
//! watch` gives its functions (so a function that checks it runs locally sees the same).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode};
use axum::routing::{get, post};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// An invocation's answer, as the runtime posted it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The body (for a streamed response: the prelude, eight null bytes, then the stream).
    pub body: Vec<u8>,
    /// Whether the function reported an error instead.
    pub error: bool,
    /// When the answer arrived in full.
    pub at: Instant,
}

/// An invocation waiting for the function: its event, where to say when it was handed over, and
/// where to send the answer.
type Invocation = (String, oneshot::Sender<Instant>, oneshot::Sender<Answer>);

struct Shared {
    events: tokio::sync::Mutex<mpsc::Receiver<Invocation>>,
    /// When the function first asked for an invocation.
    first_ask: Mutex<Option<Instant>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
}

/// A running Runtime API; dropping it stops it.
pub struct RuntimeApi {
    /// The value for `AWS_LAMBDA_RUNTIME_API`.
    pub address: String,
    events: mpsc::Sender<Invocation>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RuntimeApi {
    /// Starts it for the function `name` on a free loopback port.
    pub async fn start(name: &str) -> std::io::Result<RuntimeApi> {
        let (events, receiver) = mpsc::channel(16);
        let shared = Arc::new(Shared {
            events: tokio::sync::Mutex::new(receiver),
            first_ask: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
        });
        let app = axum::Router::new()
            .route("/.rt/{function}/2018-06-01/runtime/invocation/next", get(next))
            .route("/.rt/{function}/2018-06-01/runtime/invocation/{id}/response", post(response))
            .route("/.rt/{function}/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/.rt/{function}/2018-06-01/runtime/init/error", post(init_error))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}/.rt/{name}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(RuntimeApi { address, events, shared, task })
    }

    /// When the function first asked for an invocation, if it has.
    pub fn first_ask(&self) -> Option<Instant> {
        *self.shared.first_ask.lock().expect("not poisoned")
    }

    /// Hands `event` to the function and waits for its answer; when it was handed over, and the
    /// answer.
    pub async fn invoke(&self, event: &serde_json::Value) -> Option<(Instant, Answer)> {
        let (handed_tx, handed_rx) = oneshot::channel();
        let (answer_tx, answer_rx) = oneshot::channel();
        self.events.send((event.to_string(), handed_tx, answer_tx)).await.ok()?;
        let handed = handed_rx.await.ok()?;
        Some((handed, answer_rx.await.ok()?))
    }
}

async fn next(State(shared): State<Arc<Shared>>) -> Response<Body> {
    shared.first_ask.lock().expect("not poisoned").get_or_insert_with(Instant::now);
    let received = shared.events.lock().await.recv().await;
    let Some((event, handed, reply)) = received else {
        return Response::builder().status(StatusCode::GONE).body(Body::empty()).expect("a response");
    };
    let id = uuid::Uuid::new_v4().to_string();
    shared.pending.lock().expect("not poisoned").insert(id.clone(), reply);
    let _ = handed.send(Instant::now());
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        + 300_000;
    let mut response = Response::builder().status(StatusCode::OK);
    let headers = response.headers_mut().expect("a builder");
    headers.insert("lambda-runtime-aws-request-id", HeaderValue::from_str(&id).expect("a UUID"));
    headers.insert("lambda-runtime-deadline-ms", HeaderValue::from(deadline));
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        HeaderValue::from_static("arn:aws:lambda:us-east-1:000000000000:function:bench"),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        HeaderValue::from_static("Root=1-00000000-000000000000000000000000"),
    );
    response.body(Body::from(event)).expect("a response")
}

async fn answer(shared: &Shared, id: &str, body: axum::body::Bytes, error: bool) -> StatusCode {
    let reply = shared.pending.lock().expect("not poisoned").remove(id);
    if let Some(reply) = reply {
        let _ = reply.send(Answer { body: body.to_vec(), error, at: Instant::now() });
    }
    StatusCode::ACCEPTED
}

async fn response(
    State(shared): State<Arc<Shared>>,
    Path((_, id)): Path<(String, String)>,
    _headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    answer(&shared, &id, body, false).await
}

async fn error(
    State(shared): State<Arc<Shared>>,
    Path((_, id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> StatusCode {
    answer(&shared, &id, body, true).await
}

async fn init_error(body: axum::body::Bytes) -> StatusCode {
    tracing::warn!(body = %String::from_utf8_lossy(&body), "a function failed its init");
    StatusCode::ACCEPTED
}
