//! `AUTH_MODE=iam` through the real handler, against the emulator: a request is served only
//! with the IAM identity the Function URL's `AWS_IAM` auth reports and a user it names
//! (`X-User-Id`); without either there is no caller, never one that owns every session.

use chat_core::{NewMessage, Outcome, SendOutcome, SessionId, StoreOptions, UserId};
use chat_testkit::LocalDynamo;
use lambda_http::aws_lambda_events::apigw::{
    ApiGatewayRequestAuthorizer, ApiGatewayRequestAuthorizerIamDescription, ApiGatewayV2httpRequestContext,
};
use lambda_http::http::Method;
use lambda_http::request::RequestContext;
use lambda_http::{Body, Request, RequestExt};
use serde_json::Value;

const TABLE: &str = "iam";
const BACKEND: &str = "arn:aws:sts::123456789012:assumed-role/ChatBackend/worker-1";

/// An ingest app in `iam` mode; nothing listens for its queue (no test here sends a message).
fn app(store: chat_core::Store, allowed: &[&str]) -> ingest::App {
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new("t", "t", None, None, "t"))
            .endpoint_url("http://127.0.0.1:9")
            .build(),
    );
    let auth = chat_auth::Authenticator::new(chat_auth::AuthConfig {
        mode: chat_auth::Mode::Iam,
        jwt: None,
        iam_allowed_callers: allowed.iter().map(|a| (*a).to_owned()).collect(),
    })
    .unwrap();
    let queue = chat_runtime::queue::Queue::new(sqs, "http://127.0.0.1:9/queue/none");
    let budget = ingest::Budget { tokens: 500, system_prompt: None };
    ingest::App::new(store, auth, queue, chat_core::UserLimits::OFF, budget).unwrap()
}

/// A session of `owner` with its first message stored.
async fn session_of(store: &chat_core::Store, owner: &str) -> SessionId {
    let user = UserId::parse(owner).unwrap();
    let message = NewMessage { user: &user, session: None, content: "hi", client_message_id: None, by: "t" };
    let SendOutcome::Accepted(ticket) = store.send_message(message).await.unwrap() else { panic!() };
    let Outcome::Applied(ticket) = store.commit_user_message(&ticket, "t").await.unwrap() else { panic!() };
    ticket.session_id
}

/// A request as a Function URL delivers it: signed by `signer` (its `AWS_IAM` identity in the
/// request context) or not at all, naming `user` in `X-User-Id` or nobody.
fn request(method: Method, path: &str, signer: Option<&str>, user: Option<&str>) -> Request {
    let mut request =
        lambda_http::http::Request::builder().method(method).uri(path).body(Body::Empty).unwrap();
    if let Some(user) = user {
        request.headers_mut().insert("x-user-id", user.parse().unwrap());
    }
    let mut context = ApiGatewayV2httpRequestContext::default();
    if let Some(arn) = signer {
        let mut iam = ApiGatewayRequestAuthorizerIamDescription::default();
        iam.user_arn = Some(arn.to_owned());
        iam.account_id = Some("123456789012".to_owned());
        let mut authorizer = ApiGatewayRequestAuthorizer::default();
        authorizer.iam = Some(iam);
        context.authorizer = Some(authorizer);
    }
    request.with_request_context(RequestContext::ApiGatewayV2(context))
}

async fn answer(app: &ingest::App, request: Request) -> (u16, Value) {
    let response = app.handle(request).await;
    let status = response.status().as_u16();
    let body = serde_json::from_slice(response.body()).unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn iam_without_the_signers_identity_or_a_named_user_serves_no_session() {
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let alices = session_of(&store, "alice").await;
    let app = app(store, &[]);
    let path = format!("/sessions/{alices}");

    // Signed, but naming no user: a 400, not alice's session.
    let (status, body) = answer(&app, request(Method::GET, &path, Some(BACKEND), None)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("missing_user_id")), "{body}");
    // Not signed at all (a URL whose AuthType drifted to NONE): a 401, even naming the owner.
    for user in [None, Some("alice")] {
        let (status, body) = answer(&app, request(Method::GET, &path, None, user)).await;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("iam_required")), "{user:?}: {body}");
    }
    let response = app.handle(request(Method::GET, &path, None, None)).await;
    assert_eq!(response.headers()["www-authenticate"], "AWS4-HMAC-SHA256");
    // Every route, not just reads.
    for (method, path) in [
        (Method::GET, "/users/alice/sessions".to_owned()),
        (Method::POST, format!("/sessions/{alices}/cancel")),
        (Method::DELETE, format!("/sessions/{alices}")),
    ] {
        let (status, body) = answer(&app, request(method.clone(), &path, Some(BACKEND), None)).await;
        assert_eq!(status, 400, "{method} {path}: {body}");
        let (status, _) = answer(&app, request(method.clone(), &path, None, None)).await;
        assert_eq!(status, 401, "{method} {path}");
    }

    // Signed and naming a user: scoped to that user.
    let (status, body) = answer(&app, request(Method::GET, &path, Some(BACKEND), Some("bob"))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("session_not_found")), "{body}");
    let (status, body) = answer(&app, request(Method::GET, &path, Some(BACKEND), Some("alice"))).await;
    assert_eq!((status, body["session"]["user_id"].as_str()), (200, Some("alice")), "{body}");
    let (status, _) =
        answer(&app, request(Method::GET, "/users/alice/sessions", Some(BACKEND), Some("bob"))).await;
    assert_eq!(status, 403, "a path naming another user than X-User-Id");
    // The page is public; health needs no caller.
    assert_eq!(answer(&app, request(Method::GET, "/health", None, None)).await.0, 200);
}

#[tokio::test]
async fn iam_callers_outside_the_allow_list_are_refused() {
    let dynamo = LocalDynamo::start(0, TABLE).await.unwrap();
    let store = dynamo.store(TABLE, StoreOptions::default());
    let alices = session_of(&store, "alice").await;
    let app = app(store, &["arn:aws:sts::123456789012:assumed-role/ChatBackend/*"]);
    let path = format!("/sessions/{alices}");
    let (status, _) = answer(&app, request(Method::GET, &path, Some(BACKEND), Some("alice"))).await;
    assert_eq!(status, 200);
    let stranger = "arn:aws:iam::123456789012:user/intern";
    let (status, body) = answer(&app, request(Method::GET, &path, Some(stranger), Some("alice"))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("caller_not_allowed")), "{body}");
}
