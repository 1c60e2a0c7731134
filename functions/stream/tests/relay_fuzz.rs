//! Property tests over the stream's request parsing: arbitrary methods, paths, `Last-Event-ID`,
//! `turn`, tokens and other headers and query parameters go through the real handler, against a
//! real DynamoDB emulator. The answer is never a panic and never a 500: a stream that ends saying
//! how, or a JSON error naming a code. `PROPTEST_CASES` bounds the run (256 by default).

use chat_testkit::requests::{build, check_error_body, config, extras, method, segment, World};
use http_body_util::BodyExt;
use lambda_http::http::{header, Method};
use proptest::prelude::*;
use std::sync::OnceLock;
use std::time::Duration;

const TABLE: &str = "fuzz";
const OWNER: &str = "fuzz-owner";

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| World::start(TABLE, OWNER))
}

fn relay() -> &'static stream::Relay {
    static RELAY: OnceLock<stream::Relay> = OnceLock::new();
    RELAY.get_or_init(|| {
        let settings = stream::RelaySettings {
            poll_fast: Duration::from_millis(10),
            poll_slow: Duration::from_millis(50),
            keepalive: Duration::from_secs(1),
            max_duration: Duration::from_secs(2),
            retry: Duration::from_secs(1),
            max_open_streams: 3,
        };
        stream::Relay::new(world().store.clone(), settings, chat_auth::Authenticator::trusted())
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn stream_answers_any_request_without_panicking_or_500(
        method in prop_oneof![4 => Just(Method::GET), 1 => method()],
        id in prop_oneof![3 => Just(world().vocabulary.session.clone()), 1 => segment(&world().vocabulary)],
        prefix in prop_oneof![4 => Just(vec!["sessions".to_owned()]), 1 => prop::collection::vec(segment(&world().vocabulary), 0..3)],
        suffix in prop_oneof![4 => Just(vec!["stream".to_owned()]), 1 => prop::collection::vec(segment(&world().vocabulary), 0..3)],
        trailing in any::<bool>(),
        extras in extras(&world().vocabulary),
    ) {
        let segments: Vec<String> = prefix.into_iter().chain([id]).chain(suffix).collect();
        let Some(request) = build(method, &segments, trailing, Vec::new(), &extras) else { return Ok(()) };
        let (status, content_type, body) = world().runtime.block_on(async {
            let response = relay().handle(request).await;
            let status = response.status().as_u16();
            let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
            // A stream of the finished turn ends on its own; the bound only catches a hang.
            let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
                .await
                .expect("the stream ends")
                .expect("infallible")
                .to_bytes();
            (status, content_type, body)
        });
        check_error_body(status, &body)?;
        if status == 200 {
            prop_assert_eq!(content_type.as_ref().and_then(|v| v.to_str().ok()), Some("text/event-stream"));
            let text = String::from_utf8(body.to_vec()).expect("SSE is UTF-8");
            prop_assert!(
                text.contains("event: commit_done") || text.contains("event: error") || text.contains("reconnect"),
                "the stream ended without saying how: {}", text
            );
        }
    }
}
