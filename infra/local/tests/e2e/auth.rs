//! Identity, end to end: the local stack with `AUTH_MODE=jwt` against its own token issuer.
//! User B tries every route on user A's session and gets nothing: 0 reads, 0 writes, 0 cancels,
//! 0 deletes; A's session is exactly as A left it.

use crate::harness::*;
use reqwest::Method;
use serde_json::{json, Value};

fn api() -> &'static str {
    &app(&JWT).api
}

async fn token(sub: &str) -> String {
    let answer =
        request(Method::POST, format!("{}/dev/token", api()), Some(json!({"sub": sub}).to_string())).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body["token"].as_str().unwrap().to_owned()
}

/// A request with a bearer token (or none): status, body, and the WWW-Authenticate header.
async fn call(
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut req =
        http().request(method, format!("{}{path}", api())).header("content-type", "application/json");
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.body(body.to_string());
    }
    let response = req.send().await.expect("request");
    let status = response.status().as_u16();
    let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), challenge)
}

#[tokio::test]
async fn without_a_valid_token_nothing_is_served_but_health() {
    let (status, _, _) = call(Method::GET, "/health", None, None).await;
    assert_eq!(status, 200);
    let (status, body, challenge) =
        call(Method::POST, "/sessions/alice/messages", None, Some(json!({"message": "hi"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("missing_token")), "{body}");
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    let (status, body, _) = call(Method::GET, "/users/alice/sessions", Some("not-a-token"), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_token")), "{body}");
    let (status, _) = stream_status("/sessions/00000000-0000-4000-8000-000000000000/stream", None).await;
    assert_eq!(status, 401);
}

async fn stream_status(path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = http().get(format!("{}{path}", api()));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let response = req.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn another_user_can_read_write_cancel_or_delete_nothing_of_a_session() {
    let (alice, bob) = (user(), user());
    let (ta, tb) = (token(&alice).await, token(&bob).await);
    let key = uuid::Uuid::new_v4().to_string();

    // Alice chats; her stream is read with the token in the query, as EventSource must.
    let (status, sent, _) = call(
        Method::POST,
        &format!("/sessions/{alice}/messages"),
        Some(&ta),
        Some(json!({"message": "alice's secret", "client_message_id": key})),
    )
    .await;
    assert_eq!(status, 202, "{sent}");
    let id = sent["session_id"].as_str().unwrap().to_owned();
    let (status, mut reader) =
        SseReader::open(&format!("{}/sessions/{id}/stream?turn=1&access_token={ta}", api()), None).await;
    assert_eq!(status, 200);
    assert_eq!(reader.rest().await.last().map(|e| e.event.clone()).as_deref(), Some("commit_done"));
    let (_, before, _) = call(Method::GET, &format!("/sessions/{id}"), Some(&ta), None).await;
    assert_eq!(before["session"]["messages"].as_array().unwrap().len(), 2, "{before}");

    // Bob, with a valid token of his own, on every route.
    let mut refused = Vec::new();
    for (method, path, body) in [
        (Method::GET, format!("/sessions/{id}"), None),
        (Method::POST, format!("/sessions/{id}/cancel"), None),
        (Method::DELETE, format!("/sessions/{id}"), None),
        (
            Method::POST,
            format!("/sessions/{bob}/messages"),
            Some(json!({"message": "bob writes", "session_id": id})),
        ),
    ] {
        let (status, body, _) = call(method.clone(), &path, Some(&tb), body).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("session_not_found")),
            "{method} {path}: {body}"
        );
        refused.push(path);
    }
    for (method, path, body) in [
        (
            Method::POST,
            format!("/sessions/{alice}/messages"),
            Some(json!({"message": "as alice", "session_id": id})),
        ),
        (
            Method::POST,
            format!("/sessions/{alice}/messages"),
            Some(json!({"message": "alice's secret", "client_message_id": key})),
        ),
        (Method::GET, format!("/users/{alice}/sessions"), None),
        (Method::GET, format!("/sessions/user/{alice}"), None),
    ] {
        let (status, body, _) = call(method.clone(), &path, Some(&tb), body).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}: {body}"
        );
    }
    for path in [format!("/sessions/{id}/stream"), format!("/sessions/{id}/stream?turn=1&access_token={tb}")]
    {
        let token = if path.contains("access_token") { None } else { Some(tb.as_str()) };
        let (status, body) = stream_status(&path, token).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("secret"), "nothing of alice's leaks: {body}");
    }
    // Alice's idempotency key is hers: under Bob it starts Bob's own session, never echoes hers.
    let (status, own, _) = call(
        Method::POST,
        &format!("/sessions/{bob}/messages"),
        Some(&tb),
        Some(json!({"message": "bob's own", "client_message_id": key})),
    )
    .await;
    assert_eq!(status, 202, "{own}");
    assert_ne!(own["session_id"], json!(id));
    assert_eq!(own["message"], "bob's own");
    let (_, listed, _) = call(Method::GET, &format!("/users/{bob}/sessions"), Some(&tb), None).await;
    let ids: Vec<&Value> = listed["sessions"].as_array().unwrap().iter().map(|s| &s["id"]).collect();
    assert!(!ids.contains(&&json!(id)), "bob's list has only his sessions: {listed}");

    // Alice's session is exactly as she left it.
    let (status, after, _) = call(Method::GET, &format!("/sessions/{id}"), Some(&ta), None).await;
    assert_eq!(status, 200);
    assert_eq!(after, before, "0 writes, 0 cancels, 0 deletes by another user");
    let (_, listed, _) = call(Method::GET, &format!("/users/{alice}/sessions"), Some(&ta), None).await;
    assert_eq!(listed["sessions"][0]["id"], json!(id));
    assert_eq!(refused.len(), 4, "read, cancel, delete and write were each tried");
}
