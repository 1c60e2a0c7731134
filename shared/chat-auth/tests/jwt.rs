//! Bearer tokens against a local issuer's JWKS endpoint: what verifies, what is refused and why,
//! and keys that rotate without a restart.

use chat_auth::dev_issuer::DevIssuer;
use chat_auth::{AuthConfig, AuthError, Authenticator, Caller, JwtSettings, Mode};
use chat_core::UserId;
use serde_json::{json, Value};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const AUDIENCE: &str = "chat-app";

/// A JWKS endpoint on loopback serving whatever `published` holds.
async fn jwks_server(published: Arc<RwLock<Value>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let published = published.clone();
            async move { axum::Json(published.read().unwrap().clone()) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn authenticator(issuer: &str, jwks_url: String, min_refresh: Duration) -> Authenticator {
    Authenticator::new(AuthConfig {
        mode: Mode::Jwt,
        jwt: Some(JwtSettings {
            issuer: issuer.to_owned(),
            audiences: vec![AUDIENCE.to_owned(), "other-client".to_owned()],
            jwks_url,
            leeway: Duration::from_secs(5),
            min_refresh,
            max_age: Duration::from_secs(3600),
        }),
        iam_allowed_callers: Vec::new(),
    })
    .unwrap()
}

/// An authenticator configured as a deployment is: through `AUTH_MODE`, `JWT_ISSUER`,
/// `JWT_AUDIENCE` and `JWT_JWKS_URL`.
fn configured(issuer: &str, jwks_url: &str) -> Authenticator {
    let vars = [
        ("AUTH_MODE", "jwt".to_owned()),
        ("JWT_ISSUER", issuer.to_owned()),
        ("JWT_AUDIENCE", AUDIENCE.to_owned()),
        ("JWT_JWKS_URL", jwks_url.to_owned()),
    ];
    let env = chat_core::config::Env::from_fn(move |name| {
        vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    });
    Authenticator::new(AuthConfig::from_env(&env).unwrap()).unwrap()
}

fn user(id: &str) -> Caller {
    Caller::User(UserId::parse(id).unwrap())
}

#[tokio::test]
async fn auth0_tokens_with_their_trailing_slash_issuer_and_piped_subjects_are_accepted() {
    let tenant = "https://tenant.auth0.test/";
    let issuer = DevIssuer::new(tenant, AUDIENCE);
    let url = jwks_server(Arc::new(RwLock::new(issuer.jwks()))).await;
    let auth = configured(tenant, &url);
    let audience = json!([AUDIENCE, "https://tenant.auth0.test/userinfo"]);
    for sub in ["auth0|64f1c2", "google-oauth2|1098", "abc@clients"] {
        let token = issuer.sign(json!({"iss": tenant, "sub": sub, "aud": audience, "exp": now() + 60}));
        assert_eq!(auth.caller(&bearer(&token), None).await.unwrap(), user(sub), "{sub}");
    }
    // The operator wrote the issuer without its slash: the same issuer.
    let auth = configured("https://tenant.auth0.test", &url);
    let token = issuer.sign(json!({"iss": tenant, "sub": "auth0|x", "aud": AUDIENCE, "exp": now() + 60}));
    assert_eq!(auth.caller(&bearer(&token), None).await.unwrap(), user("auth0|x"));
    // Another tenant is still another issuer.
    let other = issuer.sign(
        json!({"iss": "https://other.auth0.test/", "sub": "auth0|x", "aud": AUDIENCE, "exp": now() + 60}),
    );
    assert!(refused(auth.caller(&bearer(&other), None).await).contains("another issuer"));
}

#[tokio::test]
async fn cognito_id_and_access_tokens_are_accepted_and_refresh_tokens_are_not() {
    let pool = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC";
    let issuer = DevIssuer::new(pool, AUDIENCE);
    let url = jwks_server(Arc::new(RwLock::new(issuer.jwks()))).await;
    let auth = configured(pool, &url);
    let sub = "7d3c5c1e-6f1a-4b8e-9a3e-2b1f0c9d8e7f";
    let access = issuer.sign(
        json!({"iss": pool, "sub": sub, "token_use": "access", "client_id": AUDIENCE, "scope": "aws.cognito.signin.user.admin", "exp": now() + 60}),
    );
    assert_eq!(auth.caller(&bearer(&access), None).await.unwrap(), user(sub));
    let id =
        issuer.sign(json!({"iss": pool, "sub": sub, "token_use": "id", "aud": AUDIENCE, "exp": now() + 60}));
    assert_eq!(auth.caller(&bearer(&id), None).await.unwrap(), user(sub));
    let refresh = issuer
        .sign(json!({"iss": pool, "sub": sub, "token_use": "refresh", "aud": AUDIENCE, "exp": now() + 60}));
    assert!(refused(auth.caller(&bearer(&refresh), None).await).contains("refresh"));
}

fn bearer(token: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    headers
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn refused(result: Result<Caller, AuthError>) -> String {
    match result {
        Err(AuthError::Invalid(why)) => why,
        other => panic!("expected an invalid token, got {other:?}"),
    }
}

#[tokio::test]
async fn a_valid_token_names_its_subject_and_every_bad_one_is_refused_with_a_reason() {
    let issuer = DevIssuer::new("https://issuer.test", AUDIENCE);
    let url = jwks_server(Arc::new(RwLock::new(issuer.jwks()))).await;
    let auth = authenticator("https://issuer.test", url, Duration::from_secs(30));
    let alice = UserId::parse("alice").unwrap();

    let token = issuer.token("alice", Duration::from_secs(60));
    assert_eq!(auth.caller(&bearer(&token), None).await.unwrap(), Caller::User(alice.clone()));
    assert_eq!(
        auth.caller(&http::HeaderMap::new(), Some(&token)).await.unwrap(),
        Caller::User(alice.clone())
    );

    let claims = |extra: Value| {
        let mut base =
            json!({"iss": "https://issuer.test", "aud": AUDIENCE, "sub": "alice", "exp": now() + 60});
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        issuer.sign(base)
    };
    // A Cognito access token has client_id instead of aud.
    let access = issuer.sign(
        json!({"iss": "https://issuer.test", "client_id": "other-client", "sub": "alice", "exp": now() + 60}),
    );
    assert_eq!(auth.caller(&bearer(&access), None).await.unwrap(), Caller::User(alice));

    assert!(matches!(auth.caller(&http::HeaderMap::new(), None).await, Err(AuthError::Missing)));
    assert!(
        refused(auth.caller(&bearer(&claims(json!({"exp": now() - 60}))), None).await).contains("expired")
    );
    assert!(refused(auth.caller(&bearer(&claims(json!({"nbf": now() + 600}))), None).await)
        .contains("not valid yet"));
    assert!(refused(auth.caller(&bearer(&claims(json!({"iss": "https://evil.test"}))), None).await)
        .contains("another issuer"));
    assert!(refused(auth.caller(&bearer(&claims(json!({"aud": "someone-else"}))), None).await)
        .contains("another audience"));
    assert!(refused(auth.caller(&bearer(&claims(json!({"sub": "a/b"}))), None).await).contains("subject"));
    assert!(refused(auth.caller(&bearer("not.a.jwt"), None).await).contains("not a JWT"));

    // Same key id, another key: the signature does not verify.
    let forger = DevIssuer::new("https://issuer.test", AUDIENCE);
    let forged = {
        let token = forger.token("alice", Duration::from_secs(60));
        let (_, rest) = token.split_once('.').unwrap();
        let header = base64_url(&json!({"alg": "ES256", "typ": "JWT", "kid": issuer.kid()}).to_string());
        format!("{header}.{rest}")
    };
    assert!(refused(auth.caller(&bearer(&forged), None).await).contains("signature"));

    // Unsigned tokens (alg none) never verify.
    let unsigned = format!(
        "{}.{}.",
        base64_url(&json!({"alg": "none", "kid": issuer.kid()}).to_string()),
        base64_url(
            &json!({"iss": "https://issuer.test", "aud": AUDIENCE, "sub": "alice", "exp": now() + 60})
                .to_string()
        )
    );
    assert!(auth.caller(&bearer(&unsigned), None).await.is_err());
}

fn base64_url(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_a_restart_and_unknown_keys_cannot_force_refetches() {
    let old = DevIssuer::new("https://issuer.test", AUDIENCE);
    let published = Arc::new(RwLock::new(old.jwks()));
    let url = jwks_server(published.clone()).await;
    let auth = authenticator("https://issuer.test", url, Duration::from_millis(300));

    assert!(auth.caller(&bearer(&old.token("alice", Duration::from_secs(60))), None).await.is_ok());
    assert_eq!(auth.key_fetches(), 1);

    // The issuer rotates: a token under the new key makes the cache refetch once.
    let new = DevIssuer::new("https://issuer.test", AUDIENCE);
    *published.write().unwrap() = new.jwks();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let token = new.token("bob", Duration::from_secs(60));
    assert_eq!(
        auth.caller(&bearer(&token), None).await.unwrap(),
        Caller::User(UserId::parse("bob").unwrap())
    );
    assert_eq!(auth.key_fetches(), 2);

    // A flood of tokens naming unknown keys refetches at most once per min_refresh.
    let stranger = DevIssuer::new("https://issuer.test", AUDIENCE);
    for _ in 0..20 {
        assert!(auth.caller(&bearer(&stranger.token("eve", Duration::from_secs(60))), None).await.is_err());
    }
    assert!(auth.key_fetches() <= 3, "{} fetches", auth.key_fetches());
}

#[tokio::test]
async fn an_unreachable_issuer_is_a_503_not_a_401() {
    let issuer = DevIssuer::new("https://issuer.test", AUDIENCE);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let auth = authenticator(
        "https://issuer.test",
        format!("http://127.0.0.1:{port}/jwks.json"),
        Duration::from_secs(30),
    );
    let result = auth.caller(&bearer(&issuer.token("alice", Duration::from_secs(60))), None).await;
    assert!(matches!(result, Err(AuthError::KeysUnavailable)), "{result:?}");
}
