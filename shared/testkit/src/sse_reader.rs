//! A Server-Sent Events client for tests and benchmarks: parses bytes as they arrive, whole lines
//! at a time, so a multi-byte character split across reads is never mangled.

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use std::collections::VecDeque;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (`message` when absent).
    pub event: String,
    /// `id:`, if the event had one.
    pub id: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// An incremental parser, as the SSE specification describes it.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    event: Option<String>,
    id: Option<String>,
    data: Vec<String>,
    ready: VecDeque<SseEvent>,
    /// The last `retry:` hint, in milliseconds.
    pub retry: Option<u64>,
    /// Comment lines seen (keep-alives).
    pub comments: usize,
}

impl SseParser {
    /// Takes more bytes; complete events become available from [`SseParser::next_event`].
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
        let mut start = 0;
        let mut i = 0;
        while i < self.buffer.len() {
            let byte = self.buffer[i];
            if byte == b'\n' || byte == b'\r' {
                // A `\r` at the very end may be the first half of `\r\n`: wait for the next byte.
                if byte == b'\r' && i + 1 == self.buffer.len() {
                    break;
                }
                let line = String::from_utf8_lossy(&self.buffer[start..i]).into_owned();
                self.line(&line);
                i += if byte == b'\r' && self.buffer[i + 1] == b'\n' { 2 } else { 1 };
                start = i;
            } else {
                i += 1;
            }
        }
        self.buffer.drain(..start);
    }

    /// The next complete event, if any.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            if !self.data.is_empty() {
                self.ready.push_back(SseEvent {
                    event: self.event.take().unwrap_or_else(|| "message".to_owned()),
                    id: self.id.take(),
                    data: std::mem::take(&mut self.data).join("\n"),
                });
            }
            self.event = None;
            self.id = None;
            return;
        }
        if line.starts_with(':') {
            self.comments += 1;
            return;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            "id" => self.id = Some(value.to_owned()),
            "retry" => self.retry = value.parse().ok().or(self.retry),
            _ => {}
        }
    }
}

/// Events read from a body as its bytes arrive: an HTTP response, or a handler's streaming body.
pub struct SseStream<E = reqwest::Error> {
    body: BoxStream<'static, Result<Bytes, E>>,
    /// The parser, for its `retry` hint and comment count.
    pub parser: SseParser,
}

impl SseStream {
    /// Reads the events of `response`.
    pub fn new(response: reqwest::Response) -> SseStream {
        SseStream::from_bytes(response.bytes_stream().boxed())
    }
}

impl<E> SseStream<E> {
    /// Reads the events of a stream of body bytes.
    pub fn from_bytes(body: BoxStream<'static, Result<Bytes, E>>) -> SseStream<E> {
        SseStream { body, parser: SseParser::default() }
    }

    /// The next event; `Ok(None)` when the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, E> {
        loop {
            if let Some(event) = self.parser.next_event() {
                return Ok(Some(event));
            }
            match self.body.next().await {
                Some(bytes) => self.parser.feed(&bytes?),
                None => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(text: &[u8], piece: usize) -> (Vec<SseEvent>, SseParser) {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for chunk in text.chunks(piece) {
            parser.feed(chunk);
            while let Some(event) = parser.next_event() {
                events.push(event);
            }
        }
        (events, parser)
    }

    #[test]
    fn events_survive_any_split_including_inside_a_character_and_a_crlf() {
        let text = "retry: 1000\r\n\r\n: keepalive\n\nevent: token\nid: 1:0\ndata: héllo ✓\ndata: second\n\n\
                    event: commit_done\ndata: abc\r\n\r\n"
            .as_bytes();
        for piece in 1..text.len() {
            let (events, parser) = parse_in_pieces(text, piece);
            assert_eq!(
                events,
                vec![
                    SseEvent {
                        event: "token".into(),
                        id: Some("1:0".into()),
                        data: "héllo ✓\nsecond".into()
                    },
                    SseEvent { event: "commit_done".into(), id: None, data: "abc".into() },
                ],
                "split every {piece} bytes"
            );
            assert_eq!(parser.retry, Some(1000));
            assert_eq!(parser.comments, 1);
        }
    }

    #[test]
    fn an_empty_data_line_is_an_empty_line_of_data() {
        let (events, _) = parse_in_pieces(b"event: token\ndata: end\ndata:\n\n", 4);
        assert_eq!(events[0].data, "end\n");
    }
}
