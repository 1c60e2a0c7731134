//! A stand-in for SQS's sending side on 127.0.0.1 (JSON protocol): `SendMessage` and
//! `SendMessageBatch` accepted and counted, nothing delivered. For tests and benchmarks that need
//! a queue that takes messages, without a whole SQS emulator (moto spends time on every send in
//! proportion to the messages waiting, which SQS does not).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// A running stand-in; dropping it stops it.
pub struct StubSqs {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Messages taken.
    pub messages: Arc<AtomicU64>,
    /// Of those, generation jobs that ask for a summary.
    pub summaries: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for StubSqs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StubSqs {
    /// Starts it on a free port.
    pub async fn start() -> std::io::Result<StubSqs> {
        let (messages, summaries) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (m, s) = (messages.clone(), summaries.clone());
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (m, s) = (m.clone(), s.clone());
                async move {
                    let request: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    let bodies: Vec<&str> = if target.ends_with("SendMessageBatch") {
                        let entries = request["Entries"].as_array().map(Vec::as_slice).unwrap_or_default();
                        entries.iter().filter_map(|e| e["MessageBody"].as_str()).collect()
                    } else {
                        request["MessageBody"].as_str().into_iter().collect()
                    };
                    m.fetch_add(bodies.len() as u64, Ordering::SeqCst);
                    let asked_summaries = bodies.iter().filter(|b| b.contains("\"summary\"")).count();
                    s.fetch_add(asked_summaries as u64, Ordering::SeqCst);
                    let id = || format!("stub-{}", m.load(Ordering::SeqCst));
                    let answer = if target.ends_with("SendMessageBatch") {
                        let entries = request["Entries"].as_array().cloned().unwrap_or_default();
                        let successful: Vec<serde_json::Value> = entries
                            .iter()
                            .map(|e| serde_json::json!({"Id": e["Id"], "MessageId": id(), "MD5OfMessageBody": ""}))
                            .collect();
                        serde_json::json!({"Successful": successful, "Failed": []})
                    } else {
                        serde_json::json!({"MessageId": id(), "MD5OfMessageBody": ""})
                    };
                    ([("content-type", "application/x-amz-json-1.0")], answer.to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(StubSqs { endpoint, messages, summaries, task })
    }
}
