//! The local front door: the one-origin API on `http://127.0.0.1:9000`, in front of
//! `cargo lambda watch`, with Lambda's concurrency limit as admission control.
//!
//! Why it exists: `cargo lambda watch` 1.9.2 queues each function's pending invocations in a
//! 100-slot channel and pushes into it while holding the lock every instance needs to take its
//! next invocation. Once more than 100 invocations wait for one function (200 chat clients
//! posting at once do it), the push blocks with the lock held, no instance can take work again,
//! and the whole server, `/health` included, hangs until it is restarted.
//!
//! So no more invocations reach it than its instances can take at once: each function has
//! `concurrency` slots; a request waits for one (at most `max_wait`, behind at most `max_waiting` others) and is
//! otherwise shed at once with 429, a JSON error and `Retry-After`, as a throttled Function URL
//! answers on AWS. A slot is held until the function's response starts: a buffered answer is
//! then complete, and a streaming one no longer occupies the instance.
//!
//! It answers only to its own host names (`Host: 127.0.0.1:PORT` or `localhost:PORT`): a page on
//! another name that resolves to loopback (DNS rebinding) would otherwise be same-origin with it
//! and, with `AUTH_MODE=none`, read anyone's sessions; it gets `421` before anything else.
//!
//! With a local token issuer it also stands in for the identity provider: it publishes the
//! issuer's keys (`/.well-known/jwks.json`) and mints tokens (`POST /dev/token {"sub": "alice"}`).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use chat_auth::dev_issuer::DevIssuer;
use futures::StreamExt;
use serde_json::json;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// How long a token from `POST /dev/token` is valid.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// Largest request body forwarded; Lambda's own limit for a buffered invocation is 6 MB.
const MAX_REQUEST_BYTES: usize = 6 * 1024 * 1024;

/// Admission settings for every function behind the gateway.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Invocations of one function running at once: what the instances `cargo lambda watch` may
    /// start can serve together.
    pub concurrency: usize,
    /// Requests that may wait for a slot, per function; more are shed at once.
    pub max_waiting: usize,
    /// Longest wait for a slot before the request is shed.
    pub max_wait: Duration,
}

/// What the gateway has done, for benchmarks and tests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests forwarded to a function.
    pub forwarded: AtomicU64,
    /// Requests shed with 429.
    pub shed: AtomicU64,
}

/// One function's slots.
struct Lane {
    name: &'static str,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

struct Gateway {
    upstream: String,
    /// The `Host` values it answers to: its own address by IP and by `localhost`.
    hosts: Vec<String>,
    /// Origins whose pages may call the API.
    origins: Vec<String>,
    issuer: Option<Arc<DevIssuer>>,
    http: reqwest::Client,
    limits: Limits,
    ingest: Lane,
    stream: Lane,
    counters: Arc<Counters>,
}

/// A running gateway; it stops when `shutdown` turns true.
pub struct Running {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// What it has forwarded and shed.
    pub counters: Arc<Counters>,
}

/// Serves the one-origin API on `listener`, forwarding to `upstream` (`cargo lambda watch`);
/// it answers to the `Host` names `hosts` (`127.0.0.1:PORT`, `localhost:PORT`) only.
pub fn start(
    listener: tokio::net::TcpListener,
    upstream: String,
    hosts: Vec<String>,
    limits: Limits,
    issuer: Option<Arc<DevIssuer>>,
    origins: Vec<String>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(Running, tokio::task::JoinHandle<()>)> {
    let url = format!("http://{}", listener.local_addr()?);
    let lane = |name| Lane { name, slots: Arc::new(Semaphore::new(limits.concurrency)), waiting: 0.into() };
    let counters = Arc::new(Counters::default());
    let gateway = Arc::new(Gateway {
        upstream,
        hosts,
        origins,
        issuer,
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(256)
            .build()
            .expect("a plain HTTP client builds"),
        limits,
        ingest: lane("ingest"),
        stream: lane("stream"),
        counters: counters.clone(),
    });
    let app = axum::Router::new().fallback(forward).with_state(gateway);
    let task = tokio::spawn(async move {
        let stopped = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        // Server-Sent Events are small writes one after another: with Nagle's algorithm on, each
        // would wait for the client's delayed ACK of the one before (40 ms on Linux).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::error!(error = %e, "the local gateway stopped");
        }
    });
    Ok((Running { url, counters }, task))
}

/// Which function serves a path, as `[workspace.metadata.lambda.watch.router]` routes it.
pub fn function_for(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["sessions", _, "stream"] | ["sessions", _, "turns", _, "log"] | ["users", _, "events"] => "stream",
        _ => "ingest",
    }
}

/// CORS for the one origin: a browser page may call the API only from an allowed origin. A
/// request from any other origin is refused before it reaches a function (a form or `text/plain`
/// POST needs no preflight, so leaving it to the browser would let it through); clients that
/// are not browsers send no `Origin` and are not affected.
async fn forward(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    let host = host.or_else(|| request.uri().authority().map(|a| a.as_str()));
    if !host.is_some_and(|host| gateway.hosts.iter().any(|ours| ours.eq_ignore_ascii_case(host))) {
        let body = json!({"error": {
            "code": "misdirected_request",
            "message": format!("this API answers as {} only", gateway.hosts.join(" or ")),
        }});
        return json_response(StatusCode::MISDIRECTED_REQUEST, body, None);
    }
    let origin = request.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let Some(origin) = origin else { return serve(&gateway, request).await };
    if !gateway.origins.contains(&origin) {
        let body = json!({"error": {
            "code": "origin_not_allowed",
            "message": format!("pages from {origin} may not call this API; add it to CORS_ALLOWED_ORIGINS"),
        }});
        return json_response(StatusCode::FORBIDDEN, body, None);
    }
    let preflight = request.method() == axum::http::Method::OPTIONS
        && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let mut response =
            Response::builder().status(StatusCode::NO_CONTENT).body(Body::empty()).expect("valid");
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD, POST, PATCH, DELETE"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, last-event-id, if-none-match"),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("3600"));
        response
    } else {
        serve(&gateway, request).await
    };
    let headers = response.headers_mut();
    if let Ok(origin) = HeaderValue::from_str(&origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    headers.insert(header::VARY, HeaderValue::from_static("origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "retry-after, etag, stream-next-offset, stream-up-to-date, stream-closed, stream-cursor",
        ),
    );
    response
}

async fn serve(gateway: &Gateway, request: Request) -> Response {
    if let Some(issuer) = &gateway.issuer {
        if let Some(response) = identity_provider(issuer, request.uri().path(), request.method()) {
            return match response {
                IdpRoute::Token => mint(issuer, request).await,
                IdpRoute::Ready(response) => response,
            };
        }
    }
    let lane = match function_for(request.uri().path()) {
        "stream" => &gateway.stream,
        _ => &gateway.ingest,
    };
    // The body is read before a slot is taken, so a slow upload holds no function's slot.
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_REQUEST_BYTES).await else {
        let body = json!({"error": {"code": "body_too_large", "message": "the body is over 6 MB"}});
        return json_response(StatusCode::PAYLOAD_TOO_LARGE, body, None);
    };
    let Some(slot) = admit(lane, &gateway.limits).await else {
        gateway.counters.shed.fetch_add(1, Ordering::Relaxed);
        return shed(lane, &gateway.limits);
    };
    gateway.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    relay(gateway, parts, body, slot).await
}

/// Waits for a slot in `lane`, within the limits; `None` means shed.
async fn admit(lane: &Lane, limits: &Limits) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = lane.slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    if lane.waiting.fetch_add(1, Ordering::AcqRel) >= limits.max_waiting {
        lane.waiting.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    let slot = tokio::time::timeout(limits.max_wait, lane.slots.clone().acquire_owned()).await;
    lane.waiting.fetch_sub(1, Ordering::AcqRel);
    slot.ok().map(|s| s.expect("the semaphore is never closed"))
}

fn shed(lane: &Lane, limits: &Limits) -> Response {
    let body = json!({"error": {
        "code": "too_many_requests",
        "message": format!(
            "the {} function is at capacity ({} running, {} waiting); retry after 1 s",
            lane.name, limits.concurrency, lane.waiting.load(Ordering::Relaxed)
        ),
    }});
    json_response(StatusCode::TOO_MANY_REQUESTS, body, Some("1"))
}

/// A JSON response, with `Retry-After` when given.
fn json_response(status: StatusCode, body: serde_json::Value, retry_after: Option<&'static str>) -> Response {
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("a static response is valid");
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
    }
    response
}

/// Forwards the request and relays the answer; the slot is released once the answer starts.
async fn relay(
    gateway: &Gateway,
    parts: axum::http::request::Parts,
    body: bytes::Bytes,
    slot: OwnedSemaphorePermit,
) -> Response {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let upstream = gateway
        .http
        .request(parts.method, format!("{}{path}", gateway.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await;
    drop(slot);
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::warn!(error = %e, "the local Lambda emulator did not answer");
            let body = json!({"error": {
                "code": "function_unavailable",
                "message": "the function did not answer (see the cargo lambda watch log); try again",
            }});
            return json_response(StatusCode::BAD_GATEWAY, body, None);
        }
    };
    let mut response = Response::builder().status(upstream.status());
    if let Some(headers) = response.headers_mut() {
        headers.extend(upstream.headers().iter().map(|(k, v)| (k.clone(), v.clone())));
        strip_hop_by_hop(headers);
    }
    let body = Body::from_stream(upstream.bytes_stream().map(|chunk| chunk.map_err(std::io::Error::other)));
    response.body(body).expect("upstream parts are valid")
}

enum IdpRoute {
    Ready(Response),
    Token,
}

/// The local identity provider's routes, if `path` is one.
fn identity_provider(issuer: &DevIssuer, path: &str, method: &axum::http::Method) -> Option<IdpRoute> {
    let ok = |body: serde_json::Value| {
        let mut response = json_response(StatusCode::OK, body, None);
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=60"));
        IdpRoute::Ready(response)
    };
    match (path, method.as_str()) {
        ("/.well-known/jwks.json", "GET") => Some(ok(issuer.jwks())),
        ("/.well-known/openid-configuration", "GET") => Some(ok(json!({
            "issuer": issuer.issuer,
            "jwks_uri": format!("{}/.well-known/jwks.json", issuer.issuer),
            "id_token_signing_alg_values_supported": ["ES256"],
        }))),
        ("/dev/token", "POST") => Some(IdpRoute::Token),
        _ => None,
    }
}

/// `POST /dev/token {"sub": "alice"}`: a token for that user, signed by the local issuer.
async fn mint(issuer: &DevIssuer, request: Request) -> Response {
    let body = axum::body::to_bytes(request.into_body(), 64 * 1024).await.unwrap_or_default();
    let sub = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["sub"].as_str().map(str::to_owned))
        .filter(|sub| chat_core::UserId::parse(sub).is_ok());
    let Some(sub) = sub else {
        let body = json!({"error": {"code": "invalid_sub", "message": r#"send {"sub": "a user id"}"#}});
        return json_response(StatusCode::BAD_REQUEST, body, None);
    };
    let token = issuer.token(&sub, DEV_TOKEN_TTL);
    let body =
        json!({"token": token, "token_type": "Bearer", "expires_in": DEV_TOKEN_TTL.as_secs(), "sub": sub});
    json_response(StatusCode::OK, body, None)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::CONTENT_LENGTH, header::HOST] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_like_the_watch_router() {
        assert_eq!(function_for("/sessions/abc/stream"), "stream");
        assert_eq!(function_for("/sessions/abc/stream/"), "stream");
        assert_eq!(function_for("/users/alice/events"), "stream");
        assert_eq!(function_for("/sessions/abc/turns/2/log"), "stream");
        assert_eq!(function_for("/users/alice/sessions"), "ingest");
        assert_eq!(function_for("/sessions/abc"), "ingest");
        assert_eq!(function_for("/sessions/alice/messages"), "ingest");
        assert_eq!(function_for("/health"), "ingest");
        // The chat page's files: ingest serves them, so the page's API is its own origin.
        for page in ["/", "/index.html", "/app.js", "/app.css"] {
            assert_eq!(function_for(page), "ingest", "{page}");
        }
        assert_eq!(function_for("/other.js"), "ingest");
    }

    #[tokio::test]
    async fn a_full_lane_sheds_waiters_past_its_queue_and_after_its_wait() {
        let limits = Limits { concurrency: 1, max_waiting: 1, max_wait: Duration::from_millis(50) };
        let lane = Lane { name: "ingest", slots: Arc::new(Semaphore::new(1)), waiting: 0.into() };
        let held = admit(&lane, &limits).await.expect("a free slot is taken at once");
        let (waiter, over) = tokio::join!(admit(&lane, &limits), async {
            tokio::task::yield_now().await;
            admit(&lane, &limits).await
        });
        assert!(over.is_none(), "a second waiter is over max_waiting");
        assert!(waiter.is_none(), "the first waiter gives up after max_wait");
        assert_eq!(lane.waiting.load(Ordering::Relaxed), 0);
        drop(held);
        assert!(admit(&lane, &limits).await.is_some(), "a released slot is taken again");
    }
}
