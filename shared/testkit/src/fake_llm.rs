//! Fake model servers on loopback that speak the real wire protocols: OpenAI-style
//! `/chat/completions` Server-Sent Events, and Bedrock `ConverseStream`'s AWS event stream.
//! Each request takes the next scripted [`Reply`] (the last one repeats); every request is
//! recorded, with when its connection ended and which side ended it ([`Ended`]), so a test can
//! time how soon a client that stops reading closes the model's stream.

use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the server answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response with a status (e.g. 429 with `retry-after`).
    Status {
        /// HTTP status.
        status: u16,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// The body.
        body: String,
    },
    /// A 200 whose body is written in parts, a pause before each; the body then ends (the
    /// connection closes, or, kept alive, the last chunk is sent), which cuts it when the
    /// parts were not a whole reply.
    Stream {
        /// The body's content type.
        content_type: String,
        /// Pause, then bytes.
        parts: Vec<(Duration, Vec<u8>)>,
    },
}

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The request path.
    pub path: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Which connection it came on: the server numbers them from 0 as it accepts them.
    pub connection: usize,
    /// When the request was read.
    pub received_at: Instant,
    /// How its connection ended; `None` while it is open.
    pub ended: Option<Ended>,
}

/// How a request's connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it (a FIN or a reset) before the server had written the whole reply:
    /// what a client that stops a stream must do, or the model goes on generating, and billing.
    ByClient(Instant),
    /// The server wrote the whole reply, then closed it.
    ByServer(Instant),
}

impl Recorded {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A running fake model server; dropping it stops it.
pub struct FakeLlm {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    replies: Arc<Mutex<VecDeque<Reply>>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLlm {
    /// Starts a server on 127.0.0.1 that answers with `replies` in order, repeating the last;
    /// each on a connection of its own, which it closes after the reply.
    pub async fn start(replies: Vec<Reply>) -> std::io::Result<FakeLlm> {
        FakeLlm::serve_with(replies, None, Connections::CloseAfterEach).await
    }

    /// [`FakeLlm::start`], but as real model APIs serve: streams are chunked and a connection
    /// is kept for the client's next request, so a client that pools connections could put one
    /// back with its stream unread; the recorded [`Ended`] shows whether it closed it instead.
    pub async fn start_keep_alive(replies: Vec<Reply>) -> std::io::Result<FakeLlm> {
        FakeLlm::serve_with(replies, None, Connections::KeepAlive).await
    }

    /// [`FakeLlm::start`] over TLS with `tls`; the URL is `https://localhost:PORT`.
    pub async fn start_tls(replies: Vec<Reply>, tls: tokio_rustls::TlsAcceptor) -> std::io::Result<FakeLlm> {
        FakeLlm::serve_with(replies, Some(tls), Connections::CloseAfterEach).await
    }

    async fn serve_with(
        replies: Vec<Reply>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        connections: Connections,
    ) -> std::io::Result<FakeLlm> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let url = match tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let replies = Arc::new(Mutex::new(VecDeque::from(replies)));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (r, q) = (replies.clone(), requests.clone());
        let task = tokio::spawn(async move {
            let mut accepted = 0;
            while let Ok((socket, _)) = listener.accept().await {
                let (r, q, tls) = (r.clone(), q.clone(), tls.clone());
                let connection = accepted;
                accepted += 1;
                tokio::spawn(async move {
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(socket).await {
                                serve(stream, connection, r, q, connections).await;
                            }
                        }
                        None => serve(socket, connection, r, q, connections).await,
                    }
                });
            }
        });
        Ok(FakeLlm { url, replies, requests, task })
    }

    /// Replaces the script.
    pub fn script(&self, replies: Vec<Reply>) {
        *self.replies.lock().unwrap() = VecDeque::from(replies);
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// How request `index`'s connection ended, waiting until it has or `deadline` passes
    /// (`None`: still open then, or no such request).
    pub async fn ended_by(&self, index: usize, deadline: Instant) -> Option<Ended> {
        loop {
            let ended = self.requests.lock().unwrap().get(index).and_then(|r| r.ended);
            if ended.is_some() || Instant::now() >= deadline {
                return ended;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Whether a connection carries one request or many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connections {
    /// `connection: close`: a stream's body ends when the connection does.
    CloseAfterEach,
    /// HTTP/1.1 keep-alive: streams are chunked, and the connection waits for the next request.
    KeepAlive,
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    connection: usize,
    replies: Arc<Mutex<VecDeque<Reply>>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    connections: Connections,
) {
    loop {
        let Some(request) = read_request(&mut socket, connection).await else { return };
        let index = {
            let mut requests = requests.lock().unwrap();
            requests.push(request);
            requests.len() - 1
        };
        let reply = {
            let mut replies = replies.lock().unwrap();
            if replies.len() > 1 {
                replies.pop_front()
            } else {
                replies.front().cloned()
            }
        };
        let Some(reply) = reply else { return };
        // The client sends nothing more on this connection until the reply is whole (no
        // client pipelines), so its read side ends meanwhile only when the client closes or
        // resets it, even mid-pause.
        let (mut from_client, mut to_client) = tokio::io::split(socket);
        let ended = tokio::select! {
            written = write_reply(&mut to_client, reply, connections) => match written {
                Ok(()) => Ended::ByServer(Instant::now()),
                Err(_) => Ended::ByClient(Instant::now()),
            },
            () = closed_by_client(&mut from_client) => Ended::ByClient(Instant::now()),
        };
        requests.lock().unwrap()[index].ended = Some(ended);
        socket = from_client.unsplit(to_client);
        if connections == Connections::CloseAfterEach || matches!(ended, Ended::ByClient(_)) {
            let _ = socket.shutdown().await;
            return;
        }
    }
}

async fn write_reply(
    socket: &mut (impl AsyncWrite + Unpin),
    reply: Reply,
    connections: Connections,
) -> std::io::Result<()> {
    let close = match connections {
        Connections::CloseAfterEach => "connection: close\r\n",
        Connections::KeepAlive => "",
    };
    match reply {
        Reply::Status { status, headers, body } => {
            let mut head = format!("HTTP/1.1 {status} Status\r\ncontent-length: {}\r\n{close}", body.len());
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            socket.write_all(head.as_bytes()).await?;
            socket.write_all(body.as_bytes()).await?;
        }
        Reply::Stream { content_type, parts } => {
            let chunked = connections == Connections::KeepAlive;
            let framing = if chunked { "transfer-encoding: chunked\r\n" } else { "" };
            let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n{close}{framing}\r\n");
            socket.write_all(head.as_bytes()).await?;
            for (pause, bytes) in parts {
                tokio::time::sleep(pause).await;
                if chunked {
                    if bytes.is_empty() {
                        continue; // an empty chunk would end the body
                    }
                    socket.write_all(format!("{:x}\r\n", bytes.len()).as_bytes()).await?;
                    socket.write_all(&bytes).await?;
                    socket.write_all(b"\r\n").await?;
                } else {
                    socket.write_all(&bytes).await?;
                }
                socket.flush().await?;
            }
            if chunked {
                socket.write_all(b"0\r\n\r\n").await?;
            }
        }
    }
    socket.flush().await
}

/// Returns when the client has closed or reset its side.
async fn closed_by_client(socket: &mut (impl AsyncRead + Unpin)) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = socket.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

async fn read_request(socket: &mut (impl AsyncRead + Unpin), connection: usize) -> Option<Recorded> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize =
        headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some(Recorded { path, headers, body, connection, received_at: Instant::now(), ended: None })
}

/// A status reply, e.g. `status(429, &[("retry-after", "0")], "{}")`.
pub fn status(code: u16, headers: &[(&str, &str)], body: &str) -> Reply {
    Reply::Status {
        status: code,
        headers: headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect(),
        body: body.to_owned(),
    }
}

/// OpenAI-style SSE bytes for one `data:` event.
pub fn sse_data(data: &str) -> Vec<u8> {
    format!("data: {data}\n\n").into_bytes()
}

/// An OpenAI-style chunk carrying `content`.
pub fn openai_chunk(content: &str) -> Vec<u8> {
    sse_data(
        &json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": "fake",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
        .to_string(),
    )
}

/// The prompt tokens the fake OpenAI server reports in a reply's usage.
pub const FAKE_PROMPT_TOKENS: u64 = 7;

/// A whole OpenAI-style streamed reply of `tokens`, `pause` apart: a role chunk, one chunk per
/// token, a `finish_reason`, a usage chunk ([`FAKE_PROMPT_TOKENS`] in, one token out per token)
/// and `[DONE]`.
pub fn openai_reply(tokens: &[&str], pause: Duration) -> Reply {
    let mut parts = vec![(
        Duration::ZERO,
        sse_data(
            &json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}).to_string(),
        ),
    )];
    parts.extend(tokens.iter().map(|t| (pause, openai_chunk(t))));
    parts.push((
        Duration::ZERO,
        sse_data(&json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).to_string()),
    ));
    let usage = json!({"prompt_tokens": FAKE_PROMPT_TOKENS, "completion_tokens": tokens.len(),
        "total_tokens": FAKE_PROMPT_TOKENS + tokens.len() as u64});
    parts.push((Duration::ZERO, sse_data(&json!({"choices": [], "usage": usage}).to_string())));
    parts.push((Duration::ZERO, sse_data("[DONE]")));
    Reply::Stream { content_type: "text/event-stream".to_owned(), parts }
}

/// [`openai_reply`] after `silence`: a model that thinks before its first token.
pub fn openai_reply_after(silence: Duration, tokens: &[&str], pause: Duration) -> Reply {
    let Reply::Stream { content_type, mut parts } = openai_reply(tokens, pause) else {
        unreachable!("openai_reply streams")
    };
    parts[0].0 = silence;
    Reply::Stream { content_type, parts }
}

/// `reply` (an OpenAI-style stream ending in `[DONE]`) reporting `usage` (an OpenAI `usage`
/// object) in a chunk of its own just before `[DONE]`, in place of any usage chunk it had.
pub fn with_openai_usage(reply: Reply, usage: Value) -> Reply {
    let Reply::Stream { content_type, mut parts } = reply else { panic!("not a stream") };
    parts.retain(|(_, bytes)| !String::from_utf8_lossy(bytes).contains("\"usage\""));
    let done = parts.pop().expect("a stream ends in [DONE]");
    parts.push((Duration::ZERO, sse_data(&json!({"choices": [], "usage": usage}).to_string())));
    parts.push(done);
    Reply::Stream { content_type, parts }
}

/// OpenAI-style chunks of `tokens`, then whatever `tail` holds raw (e.g. nothing: the
/// connection just closes mid-reply).
pub fn openai_partial(tokens: &[&str], tail: &[u8]) -> Reply {
    let mut parts: Vec<(Duration, Vec<u8>)> =
        tokens.iter().map(|t| (Duration::ZERO, openai_chunk(t))).collect();
    parts.push((Duration::from_millis(20), tail.to_vec()));
    Reply::Stream { content_type: "text/event-stream".to_owned(), parts }
}

/// One AWS event-stream frame.
pub fn event_frame(message_type: &str, type_header: (&str, &str), payload: &Value) -> Vec<u8> {
    let message = Message::new(payload.to_string().into_bytes())
        .add_header(Header::new(":message-type", HeaderValue::String(message_type.to_owned().into())))
        .add_header(Header::new(
            type_header.0.to_owned(),
            HeaderValue::String(type_header.1.to_owned().into()),
        ))
        .add_header(Header::new(":content-type", HeaderValue::String("application/json".into())));
    let mut bytes = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut bytes).expect("frame encodes");
    bytes
}

/// A Bedrock `ConverseStream` event.
pub fn bedrock_event(event_type: &str, payload: Value) -> Vec<u8> {
    event_frame("event", (":event-type", event_type), &payload)
}

/// A Bedrock exception inside the stream, e.g. `throttlingException`.
pub fn bedrock_exception(exception_type: &str) -> Vec<u8> {
    event_frame("exception", (":exception-type", exception_type), &json!({"message": "fake"}))
}

/// Bedrock event-stream frames for a whole reply of `tokens`.
pub fn bedrock_frames(tokens: &[&str]) -> Vec<Vec<u8>> {
    let mut frames = vec![bedrock_event("messageStart", json!({"role": "assistant"}))];
    frames.extend(
        tokens.iter().map(|t| {
            bedrock_event("contentBlockDelta", json!({"contentBlockIndex": 0, "delta": {"text": t}}))
        }),
    );
    frames.push(bedrock_event("contentBlockStop", json!({"contentBlockIndex": 0})));
    frames.push(bedrock_event("messageStop", json!({"stopReason": "end_turn"})));
    frames.push(bedrock_event(
        "metadata",
        json!({"usage": {"inputTokens": 5, "outputTokens": tokens.len(), "totalTokens": 5 + tokens.len()},
               "metrics": {"latencyMs": 10}}),
    ));
    frames
}

/// A 200 `ConverseStream` response made of `frames`.
pub fn bedrock_stream(frames: Vec<Vec<u8>>) -> Reply {
    Reply::Stream {
        content_type: "application/vnd.amazon.eventstream".to_owned(),
        parts: frames.into_iter().map(|f| (Duration::ZERO, f)).collect(),
    }
}

/// A Bedrock error response before the stream, e.g. `bedrock_error(429, "ThrottlingException")`.
pub fn bedrock_error(code: u16, error_type: &str) -> Reply {
    status(
        code,
        &[("content-type", "application/json"), ("x-amzn-errortype", error_type)],
        &json!({"message": "fake refusal"}).to_string(),
    )
}

/// An OpenAI-style streamed reply that writes `text` then calls tools: each call's id and name
/// come first, then its arguments in two pieces, as real servers stream them; then
/// `finish_reason: "tool_calls"` and `[DONE]`. A call is `(id, name, arguments)`.
pub fn openai_tool_calls(text: &str, calls: &[(&str, &str, &str)]) -> Reply {
    let chunk = |delta: Value, finish: Option<&str>| {
        (
            Duration::ZERO,
            sse_data(
                &json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).to_string(),
            ),
        )
    };
    let mut parts = vec![chunk(json!({"role": "assistant", "content": text}), None)];
    for (index, (id, name, arguments)) in calls.iter().enumerate() {
        parts.push(chunk(
            json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
            None,
        ));
        let (first, second) = arguments.split_at(arguments.len() / 2);
        for piece in [first, second] {
            parts.push(chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
                None,
            ));
        }
    }
    parts.push(chunk(json!({}), Some("tool_calls")));
    parts.push((Duration::ZERO, sse_data("[DONE]")));
    Reply::Stream { content_type: "text/event-stream".to_owned(), parts }
}

/// Bedrock event-stream frames that write `text` then call one tool (`toolUse`), its input in
/// two pieces, ending with `stopReason: "tool_use"`.
pub fn bedrock_tool_use_frames(text: &str, id: &str, name: &str, input: &str) -> Vec<Vec<u8>> {
    let mut frames = vec![bedrock_event("messageStart", json!({"role": "assistant"}))];
    frames.push(bedrock_event("contentBlockDelta", json!({"contentBlockIndex": 0, "delta": {"text": text}})));
    frames.push(bedrock_event("contentBlockStop", json!({"contentBlockIndex": 0})));
    frames.push(bedrock_event(
        "contentBlockStart",
        json!({"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": id, "name": name}}}),
    ));
    let (first, second) = input.split_at(input.len() / 2);
    for piece in [first, second] {
        frames.push(bedrock_event(
            "contentBlockDelta",
            json!({"contentBlockIndex": 1, "delta": {"toolUse": {"input": piece}}}),
        ));
    }
    frames.push(bedrock_event("contentBlockStop", json!({"contentBlockIndex": 1})));
    frames.push(bedrock_event("messageStop", json!({"stopReason": "tool_use"})));
    frames
}
