//! Who is calling. Ingest and stream ask an [`Authenticator`] for the [`Caller`] of every request
//! and scope every route to it: a verified user sees and changes only their own sessions.
//!
//! `AUTH_MODE` is one of:
//! - `jwt`: a bearer token (the `Authorization` header, or `?access_token=` where a client such
//!   as `EventSource` cannot set headers) verified against an OIDC issuer's published keys
//!   (Cognito user pools, Auth0 and the like): signature, `iss`, `aud` or `client_id`, `exp`,
//!   `nbf`. The user is the token's `sub`.
//! - `iam`: the Function URL's `AWS_IAM` auth admitted a signed caller, a trusted backend. The
//!   request must carry that IAM identity (its `requestContext.authorizer.iam`; a URL whose auth
//!   drifted to `NONE` delivers none, and is refused), from an allowed principal when
//!   `IAM_ALLOWED_CALLERS` names some, and must name the user it acts for in `X-User-Id`, on
//!   every route: there is no caller that owns every session.
//! - `none`: as `iam`, with nothing in front: refused unless the process is a function of the
//!   local stack (`chat_runtime::aws::local_stack`: its own signal, no variable only Lambda sets,
//!   the emulator's runtime API), so a deployed function can never run this way.

#[cfg(feature = "dev-issuer")]
pub mod dev_issuer;
mod jwks;
#[cfg(feature = "lambda-http")]
mod lambda;

#[cfg(feature = "lambda-http")]
pub use lambda::iam_identity;

use chat_core::config::{ConfigError, Env};
use chat_core::UserId;
use chat_runtime::http_error::ErrorAnswer;
use jsonwebtoken::{decode, decode_header, Validation};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

pub use jwks::KeySource;

/// How callers are identified (`AUTH_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bearer tokens from an OIDC issuer.
    Jwt,
    /// A trusted caller behind `AWS_IAM`.
    Iam,
    /// A trusted caller on loopback (the local stack).
    None,
}

/// Token checks (`JWT_ISSUER`, `JWT_AUDIENCE`, `JWT_JWKS_URL`).
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The `iss` tokens must carry, exactly (`verify` also takes it with its trailing `/`
    /// added or removed: the same issuer, as Auth0's `https://TENANT.auth0.com/` shows).
    pub issuer: String,
    /// Accepted `aud` (ID tokens) or `client_id` (Cognito access tokens) values.
    pub audiences: Vec<String>,
    /// Where the issuer publishes its keys; `{issuer}/.well-known/jwks.json` by default.
    pub jwks_url: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Unknown key ids trigger a refetch of the keys at most this often.
    pub min_refresh: Duration,
    /// Known keys are refetched after this long, so a removed key stops working.
    pub max_age: Duration,
}

/// The authentication settings, read once per cold start.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `AUTH_MODE`.
    pub mode: Mode,
    /// The token checks, in `jwt` mode.
    pub jwt: Option<JwtSettings>,
    /// In `iam` mode, the principals that may call (`IAM_ALLOWED_CALLERS`): exact ARNs, or
    /// prefixes ending in `/*` (`arn:aws:sts::123456789012:assumed-role/ChatBackend/*`). Empty:
    /// every principal the Function URL's policy admits.
    pub iam_allowed_callers: Vec<String>,
}

impl AuthConfig {
    /// Reads `AUTH_MODE` and, for `jwt`, `JWT_ISSUER`, `JWT_AUDIENCE` (comma-separated) and
    /// `JWT_JWKS_URL`; for `iam`, `IAM_ALLOWED_CALLERS` (comma-separated).
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<AuthConfig, ConfigError> {
        let invalid =
            |variable: &str, problem: String| ConfigError { variable: variable.to_owned(), problem };
        let mode = match env.required("AUTH_MODE")?.as_str() {
            "jwt" => Mode::Jwt,
            "iam" => Mode::Iam,
            "none" => Mode::None,
            other => return Err(invalid("AUTH_MODE", format!("is {other:?}; use jwt, iam or none"))),
        };
        if mode == Mode::None {
            if let Err(not_local) = chat_runtime::aws::local_stack(env) {
                return Err(invalid(
                    "AUTH_MODE",
                    format!("is none, which is for the local stack only ({not_local}); use jwt or iam"),
                ));
            }
        }
        let jwt = match mode {
            Mode::Jwt => {
                // Verbatim: Auth0's `iss` ends in `/`, Cognito's does not.
                let issuer = env.required("JWT_ISSUER")?;
                let audiences: Vec<String> = env
                    .required("JWT_AUDIENCE")?
                    .split(',')
                    .map(|a| a.trim().to_owned())
                    .filter(|a| !a.is_empty())
                    .collect();
                if audiences.is_empty() {
                    return Err(invalid("JWT_AUDIENCE", "names no audience".to_owned()));
                }
                let jwks_url = env
                    .optional("JWT_JWKS_URL")
                    .unwrap_or_else(|| format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/')));
                Some(JwtSettings {
                    issuer,
                    audiences,
                    jwks_url,
                    leeway: env.millis_or("JWT_LEEWAY_MS", Duration::from_secs(30))?,
                    min_refresh: Duration::from_secs(30),
                    max_age: Duration::from_secs(3600),
                })
            }
            Mode::Iam | Mode::None => None,
        };
        let iam_allowed_callers = match mode {
            Mode::Iam => allowed_callers(env.optional("IAM_ALLOWED_CALLERS").as_deref().unwrap_or(""))
                .map_err(|problem| invalid("IAM_ALLOWED_CALLERS", problem))?,
            Mode::Jwt | Mode::None => Vec::new(),
        };
        Ok(AuthConfig { mode, jwt, iam_allowed_callers })
    }
}

/// `IAM_ALLOWED_CALLERS`: ARNs, each exact or a prefix ending in `/*`.
fn allowed_callers(raw: &str) -> Result<Vec<String>, String> {
    let entries: Vec<String> =
        raw.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect();
    for entry in &entries {
        let wildcard_only_at_end =
            entry.find('*').is_none_or(|at| at + 1 == entry.len() && entry.ends_with("/*"));
        if !entry.starts_with("arn:") || !wildcard_only_at_end {
            return Err(format!(
                "names {entry:?}; use ARNs, exact or ending in /* (arn:aws:sts::123456789012:assumed-role/Role/*)"
            ));
        }
    }
    Ok(entries)
}

/// The IAM principal that signed a request, as the Function URL's `AWS_IAM` auth reports it
/// (`requestContext.authorizer.iam`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamIdentity {
    /// `userArn`: `arn:aws:iam::123456789012:user/x`, or
    /// `arn:aws:sts::123456789012:assumed-role/Role/session`.
    pub user_arn: String,
    /// `accountId`.
    pub account_id: Option<String>,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A verified user: every route is scoped to them.
    User(UserId),
    /// A trusted caller acting as the user it names (`iam`, where it must name one; `none`). Only
    /// the local stack's `none` may name nobody, and then acts as anyone.
    Trusted(Option<UserId>),
}

/// A request's caller, and until when its credential holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    /// Who is calling.
    pub caller: Caller,
    /// When a bearer token stops being accepted (its `exp` plus the allowed clock skew), epoch
    /// seconds (`jwt`); `None` for credentials that do not lapse while a request runs. A long
    /// request (a stream) ends there.
    pub expires_at: Option<u64>,
}

impl Caller {
    /// Whether the caller may act as `user` (the user a path names).
    pub fn may_act_as(&self, user: &UserId) -> bool {
        match self {
            Caller::User(me) | Caller::Trusted(Some(me)) => me == user,
            Caller::Trusted(None) => true,
        }
    }

    /// Whether the caller may see and change a session that belongs to `owner`.
    pub fn owns(&self, owner: &UserId) -> bool {
        self.may_act_as(owner)
    }

    /// The user every access is limited to, if any.
    pub fn scope(&self) -> Option<&UserId> {
        match self {
            Caller::User(me) | Caller::Trusted(Some(me)) => Some(me),
            Caller::Trusted(None) => None,
        }
    }
}

/// Why a request has no caller.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// 401: no token.
    #[error("sign in: send a bearer token in the Authorization header")]
    Missing,
    /// 401: a token that does not verify; says why.
    #[error("the token is not accepted: {0}")]
    Invalid(String),
    /// 400: an `X-User-Id` that is not a user id.
    #[error("X-User-Id is not a valid user id: {0}")]
    BadUserHeader(String),
    /// 400: `iam` mode, and the request names no user (`X-User-Id`).
    #[error("name the user this request acts for in the X-User-Id header")]
    MissingUserHeader,
    /// 401: `iam` mode, and the request carries no IAM identity: it was not signed, or the
    /// Function URL does not check signatures (its AuthType is not AWS_IAM).
    #[error(
        "sign the request with SigV4 for the lambda service: this API takes IAM-authenticated callers only"
    )]
    IamRequired,
    /// 403: `iam` mode, and the signing principal is not in `IAM_ALLOWED_CALLERS`.
    #[error("the caller {0} may not use this API")]
    CallerNotAllowed(String),
    /// 503: the issuer's keys could not be fetched.
    #[error("the token issuer's keys are unavailable; try again")]
    KeysUnavailable,
}

impl AuthError {
    /// The HTTP status and error code for the JSON error body.
    pub fn status_and_code(&self) -> (u16, &'static str) {
        match self {
            AuthError::Missing => (401, "missing_token"),
            AuthError::Invalid(_) => (401, "invalid_token"),
            AuthError::BadUserHeader(_) => (400, "invalid_user_id"),
            AuthError::MissingUserHeader => (400, "missing_user_id"),
            AuthError::IamRequired => (401, "iam_required"),
            AuthError::CallerNotAllowed(_) => (403, "caller_not_allowed"),
            AuthError::KeysUnavailable => (503, "auth_unavailable"),
        }
    }

    /// The `WWW-Authenticate` challenge of a 401: how to authenticate instead.
    pub fn challenge(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing | AuthError::Invalid(_) => Some("Bearer"),
            AuthError::IamRequired => Some("AWS4-HMAC-SHA256"),
            _ => None,
        }
    }

    /// The error answer every route sends for it: its status and code, this error's message,
    /// and on a 401 its challenge.
    pub fn answer(&self) -> ErrorAnswer {
        let (status, code) = self.status_and_code();
        let status = http::StatusCode::from_u16(status).expect("a valid status");
        let answer = ErrorAnswer::new(status, code, self.to_string());
        match self.challenge() {
            Some(challenge) => answer.challenge(challenge),
            None => answer,
        }
    }
}

/// The claims read from a token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Checked by the decoder; kept so a long request (a stream) can end when it passes.
    exp: Option<u64>,
    #[serde(default)]
    aud: Option<OneOrMany>,
    client_id: Option<String>,
    /// Cognito's kind of token: `id` or `access` (never a `refresh` token).
    token_use: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Identifies callers; built once per cold start and shared by every request.
#[derive(Clone)]
pub struct Authenticator {
    mode: Mode,
    jwt: Option<Arc<(JwtSettings, KeySource)>>,
    iam_allowed_callers: Arc<[String]>,
}

/// The user an `X-User-Id` header names, if it names one.
fn named_user(headers: &http::HeaderMap) -> Result<Option<UserId>, AuthError> {
    let named = headers.get("x-user-id").map(|v| {
        let raw = v.to_str().map_err(|_| AuthError::BadUserHeader("not text".into()))?;
        UserId::parse(raw).map_err(|e| AuthError::BadUserHeader(e.to_string()))
    });
    named.transpose()
}

/// Whether `arn` is on the allow list: an exact entry, or under an entry ending in `/*`.
fn allowed(list: &[String], arn: &str) -> bool {
    list.iter().any(|entry| match entry.strip_suffix('*') {
        Some(prefix) => arn.starts_with(prefix) && arn.len() > prefix.len(),
        None => arn == entry,
    })
}

impl Authenticator {
    /// An authenticator for `config`; in `jwt` mode its keys are fetched on first use. `jwt`
    /// without its settings, and `none` off the local stack, are refused here too, so no way of
    /// building one trusts callers by mistake.
    pub fn new(config: AuthConfig) -> Result<Authenticator, ConfigError> {
        Authenticator::build(config, &Env::process())
    }

    /// [`Authenticator::new`], with `env` telling whether this is the local stack.
    fn build<F: Fn(&str) -> Option<String>>(
        config: AuthConfig,
        env: &Env<F>,
    ) -> Result<Authenticator, ConfigError> {
        let jwt = match (config.mode, config.jwt) {
            (Mode::Jwt, Some(settings)) => {
                let keys = KeySource::new(&settings).map_err(|e| ConfigError {
                    variable: "JWT_JWKS_URL".to_owned(),
                    problem: e.to_string(),
                })?;
                Some(Arc::new((settings, keys)))
            }
            (Mode::Jwt, None) => {
                return Err(ConfigError {
                    variable: "JWT_ISSUER".to_owned(),
                    problem: "is needed with AUTH_MODE=jwt".to_owned(),
                })
            }
            (Mode::None, _) => {
                if let Err(not_local) = chat_runtime::aws::local_stack(env) {
                    return Err(ConfigError {
                        variable: "AUTH_MODE".to_owned(),
                        problem: format!("is none, which is for the local stack only ({not_local})"),
                    });
                }
                None
            }
            (Mode::Iam, _) => None,
        };
        Ok(Authenticator { mode: config.mode, jwt, iam_allowed_callers: config.iam_allowed_callers.into() })
    }

    /// The local stack's authenticator (`none`: callers are trusted, and name a user when they
    /// want one scope), for tests and benchmarks that build a function from parts.
    pub fn trusted() -> Authenticator {
        Authenticator { mode: Mode::None, jwt: None, iam_allowed_callers: Arc::from([]) }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How many times the issuer's keys were fetched.
    pub fn key_fetches(&self) -> u64 {
        self.jwt.as_ref().map_or(0, |jwt| jwt.1.fetches())
    }

    /// The caller of a request with `headers`; `query_token` is an `access_token` query
    /// parameter, for clients that cannot set headers. A request that may carry an IAM
    /// identity goes through [`Authenticator::authenticate`].
    pub async fn caller(
        &self,
        headers: &http::HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Caller, AuthError> {
        self.authenticate(headers, query_token, None).await.map(|identified| identified.caller)
    }

    /// Who is calling, and until when: a bearer token (`jwt`: the header, or `query_token` for
    /// clients that cannot set headers), the IAM principal that signed the request and the user
    /// it names (`iam`), or whoever the local stack's caller names (`none`).
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        query_token: Option<&str>,
        iam: Option<&IamIdentity>,
    ) -> Result<Identified, AuthError> {
        match self.mode {
            Mode::Jwt => {
                // `new` gives jwt mode its settings; without them, refuse rather than trust.
                let Some(jwt) = &self.jwt else { return Err(AuthError::Missing) };
                let bearer = headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
                let token = bearer.or(query_token).map(str::trim).filter(|t| !t.is_empty());
                let token = token.ok_or(AuthError::Missing)?;
                let (user, expires_at) = self.verify(&jwt.0, &jwt.1, token).await?;
                Ok(Identified { caller: Caller::User(user), expires_at })
            }
            Mode::Iam => {
                let Some(iam) = iam else {
                    tracing::error!(
                        "AUTH_MODE is iam, but the request carries no IAM identity: is the Function URL's AuthType AWS_IAM?"
                    );
                    return Err(AuthError::IamRequired);
                };
                if !self.iam_allowed_callers.is_empty() && !allowed(&self.iam_allowed_callers, &iam.user_arn)
                {
                    tracing::warn!(caller = %iam.user_arn, "a caller outside IAM_ALLOWED_CALLERS was refused");
                    return Err(AuthError::CallerNotAllowed(iam.user_arn.clone()));
                }
                let user = named_user(headers)?.ok_or(AuthError::MissingUserHeader)?;
                Ok(Identified { caller: Caller::Trusted(Some(user)), expires_at: None })
            }
            Mode::None => Ok(Identified { caller: Caller::Trusted(named_user(headers)?), expires_at: None }),
        }
    }

    async fn verify(
        &self,
        settings: &JwtSettings,
        keys: &KeySource,
        token: &str,
    ) -> Result<(UserId, Option<u64>), AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Invalid(format!("not a JWT ({e})")))?;
        let kid = header.kid.ok_or_else(|| AuthError::Invalid("the token names no key id (kid)".into()))?;
        let key = keys.key(&kid).await?;
        if key.algorithm != header.alg {
            return Err(AuthError::Invalid(format!(
                "the token's algorithm {:?} is not its key's",
                header.alg
            )));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&issuers(&settings.issuer));
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.validate_nbf = true;
        validation.validate_aud = false; // checked below: `aud`, or Cognito's `client_id`
        validation.leeway = settings.leeway.as_secs();
        let claims = decode::<Claims>(token, &key.decoding, &validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?
            .claims;
        let audiences: Vec<&str> = match &claims.aud {
            Some(OneOrMany::One(aud)) => vec![aud.as_str()],
            Some(OneOrMany::Many(auds)) => auds.iter().map(String::as_str).collect(),
            None => Vec::new(),
        };
        let accepted = audiences
            .into_iter()
            .chain(claims.client_id.as_deref())
            .any(|aud| settings.audiences.iter().any(|a| a == aud));
        if !accepted {
            return Err(AuthError::Invalid("the token is for another audience".into()));
        }
        if let Some(kind) = claims.token_use.as_deref().filter(|k| !matches!(*k, "id" | "access")) {
            return Err(AuthError::Invalid(format!("it is a {kind:?} token, not an ID or access token")));
        }
        let sub = claims.sub.ok_or_else(|| AuthError::Invalid("the token has no subject (sub)".into()))?;
        let user = UserId::parse(&sub)
            .map_err(|e| AuthError::Invalid(format!("its subject is not a user id ({e})")))?;
        Ok((user, claims.exp.map(|exp| exp.saturating_add(settings.leeway.as_secs()))))
    }
}

/// The issuer as configured, and with its trailing `/` toggled: the same authority, written
/// the way some issuers (Auth0) put it in `iss` and operators may not.
fn issuers(issuer: &str) -> [String; 2] {
    let toggled = match issuer.strip_suffix('/') {
        Some(bare) => bare.to_owned(),
        None => format!("{issuer}/"),
    };
    [issuer.to_owned(), toggled]
}

fn describe(err: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match err.kind() {
        ErrorKind::ExpiredSignature => "it has expired".into(),
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "it is from another issuer".into(),
        ErrorKind::InvalidSignature => "its signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim} claim"),
        _ => format!("it does not verify ({err})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::from_fn(move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    /// What `cargo lambda watch` gives a function of the local stack.
    const LOCAL: [(&str, &str); 3] = [
        ("AUTH_MODE", "none"),
        ("CHAT_LOCAL_STACK", "1"),
        ("AWS_LAMBDA_RUNTIME_API", "http://127.0.0.1:9000/.rt/ingest"),
    ];

    /// What Lambda gives a deployed function, with `AUTH_MODE=none` set by its deployer.
    const ON_LAMBDA: [(&str, &str); 8] = [
        ("AUTH_MODE", "none"),
        ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand"),
        ("_HANDLER", "bootstrap"),
        ("LAMBDA_TASK_ROOT", "/var/task"),
        ("AWS_LAMBDA_FUNCTION_NAME", "chat-IngestFunction-x"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/x"),
        ("AWS_REGION", "us-east-1"),
    ];

    #[test]
    fn none_is_refused_on_real_lambda_even_with_the_local_signal_copied_into_it() {
        let err = AuthConfig::from_env(&env(&ON_LAMBDA)).unwrap_err();
        assert_eq!(err.variable, "AUTH_MODE");
        assert!(err.problem.contains("local stack only"), "{err}");
        let mut copied = ON_LAMBDA.to_vec();
        copied.push(("CHAT_LOCAL_STACK", "1"));
        let err = AuthConfig::from_env(&env(&copied)).unwrap_err();
        assert!(err.problem.contains("AWS_LAMBDA_INITIALIZATION_TYPE"), "names what decided: {err}");
        assert_eq!(AuthConfig::from_env(&env(&LOCAL)).unwrap().mode, Mode::None);
        let unsignalled: Vec<_> = LOCAL.into_iter().filter(|(k, _)| *k != "CHAT_LOCAL_STACK").collect();
        assert!(AuthConfig::from_env(&env(&unsignalled)).unwrap_err().problem.contains("CHAT_LOCAL_STACK"));
        let mut bare = LOCAL.to_vec();
        bare[2].1 = "127.0.0.1:9001";
        assert!(AuthConfig::from_env(&env(&bare)).is_err(), "Lambda's runtime API is not the emulator's");
    }

    #[test]
    fn modes_are_named_and_jwt_needs_its_settings() {
        assert!(AuthConfig::from_env(&env(&[])).is_err(), "AUTH_MODE must be set");
        assert!(AuthConfig::from_env(&env(&[("AUTH_MODE", "basic")])).is_err());
        let err =
            AuthConfig::from_env(&env(&[("AUTH_MODE", "jwt"), ("JWT_ISSUER", "https://i")])).unwrap_err();
        assert_eq!(err.variable, "JWT_AUDIENCE");
        let jwt = AuthConfig::from_env(&env(&[
            ("AUTH_MODE", "jwt"),
            ("JWT_ISSUER", "https://issuer.example/pool/"),
            ("JWT_AUDIENCE", "app, web"),
        ]))
        .unwrap();
        let settings = jwt.jwt.unwrap();
        assert_eq!(settings.issuer, "https://issuer.example/pool/", "kept verbatim");
        assert_eq!(settings.jwks_url, "https://issuer.example/pool/.well-known/jwks.json");
        assert_eq!(settings.audiences, ["app", "web"]);
        assert_eq!(issuers("https://t.auth0.com/"), ["https://t.auth0.com/", "https://t.auth0.com"]);
        assert_eq!(issuers("https://cognito/p"), ["https://cognito/p", "https://cognito/p/"]);
    }

    #[tokio::test]
    async fn an_authenticator_built_wrongly_refuses_rather_than_trusts() {
        let config = |mode, jwt| AuthConfig { mode, jwt, iam_allowed_callers: Vec::new() };
        let err = Authenticator::build(config(Mode::Jwt, None), &env(&LOCAL)).err().unwrap();
        assert_eq!(err.variable, "JWT_ISSUER", "jwt mode without its settings: {err}");
        let err = Authenticator::build(config(Mode::None, None), &env(&ON_LAMBDA)).err().unwrap();
        assert_eq!(err.variable, "AUTH_MODE", "none off the local stack: {err}");
        let local = Authenticator::build(config(Mode::None, None), &env(&LOCAL)).unwrap();
        assert_eq!(local.mode(), Mode::None);
        // A jwt authenticator whose settings went missing another way refuses every caller.
        let broken = Authenticator { mode: Mode::Jwt, jwt: None, iam_allowed_callers: Arc::from([]) };
        assert!(matches!(broken.caller(&headers(Some("alice")), None).await, Err(AuthError::Missing)));
    }

    #[test]
    fn the_keys_come_over_https_or_from_this_machine() {
        let source = |url: &str| {
            KeySource::new(&JwtSettings {
                issuer: "https://issuer.example".to_owned(),
                audiences: vec!["app".to_owned()],
                jwks_url: url.to_owned(),
                leeway: Duration::ZERO,
                min_refresh: Duration::from_secs(30),
                max_age: Duration::from_secs(3600),
            })
        };
        let refused = source("http://issuer.example/.well-known/jwks.json").err().unwrap();
        assert!(matches!(refused, jwks::KeySourceError::PlainHttp { .. }), "{refused}");
        assert!(matches!(source("http://10.0.0.1/jwks.json"), Err(jwks::KeySourceError::PlainHttp { .. })));
        for fine in [
            "https://issuer.example/.well-known/jwks.json",
            "http://127.0.0.1:4000/jwks.json",
            "http://localhost:4000/jwks.json",
            "http://[::1]:4000/jwks.json",
        ] {
            assert!(source(fine).is_ok(), "{fine}");
        }
    }

    fn iam(allowed: &[&str]) -> Authenticator {
        let config = AuthConfig {
            mode: Mode::Iam,
            jwt: None,
            iam_allowed_callers: allowed.iter().map(|a| (*a).to_owned()).collect(),
        };
        Authenticator::new(config).unwrap()
    }

    fn headers(user: Option<&str>) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(user) = user {
            headers.insert("x-user-id", user.parse().unwrap());
        }
        headers
    }

    fn signed_by(arn: &str) -> IamIdentity {
        IamIdentity { user_arn: arn.to_owned(), account_id: Some("123456789012".to_owned()) }
    }

    const BACKEND: &str = "arn:aws:sts::123456789012:assumed-role/ChatBackend/worker-1";

    #[tokio::test]
    async fn iam_needs_the_signers_identity_and_a_named_user_on_every_request() {
        let auth = iam(&[]);
        let alice = UserId::parse("alice").unwrap();
        let unsigned = auth.authenticate(&headers(Some("alice")), None, None).await;
        assert!(matches!(unsigned, Err(AuthError::IamRequired)), "{unsigned:?}");
        assert_eq!(AuthError::IamRequired.status_and_code(), (401, "iam_required"));
        let nameless = auth.authenticate(&headers(None), None, Some(&signed_by(BACKEND))).await;
        assert!(matches!(nameless, Err(AuthError::MissingUserHeader)), "{nameless:?}");
        assert_eq!(AuthError::MissingUserHeader.status_and_code(), (400, "missing_user_id"));
        let named =
            auth.authenticate(&headers(Some("alice")), None, Some(&signed_by(BACKEND))).await.unwrap();
        assert_eq!(named, Identified { caller: Caller::Trusted(Some(alice)), expires_at: None });
        // The convenience form has no identity to offer: refused, never all-powerful.
        assert!(matches!(auth.caller(&headers(None), None).await, Err(AuthError::IamRequired)));
    }

    #[tokio::test]
    async fn iam_callers_are_held_to_the_allow_list_exactly_or_by_prefix() {
        let auth = iam(&[
            "arn:aws:sts::123456789012:assumed-role/ChatBackend/*",
            "arn:aws:iam::123456789012:user/ops",
        ]);
        let ok = |arn: &'static str| {
            let auth = auth.clone();
            async move { auth.authenticate(&headers(Some("alice")), None, Some(&signed_by(arn))).await }
        };
        assert!(ok(BACKEND).await.is_ok());
        assert!(ok("arn:aws:iam::123456789012:user/ops").await.is_ok());
        for refused in [
            "arn:aws:iam::123456789012:user/ops2",
            "arn:aws:sts::123456789012:assumed-role/ChatBackendX/s",
            "arn:aws:sts::123456789012:assumed-role/ChatBackend/",
            "arn:aws:sts::999999999999:assumed-role/ChatBackend/s",
        ] {
            let err = ok(refused).await.unwrap_err();
            assert!(matches!(&err, AuthError::CallerNotAllowed(arn) if arn == refused), "{refused}: {err:?}");
            assert_eq!(err.status_and_code(), (403, "caller_not_allowed"));
        }
    }

    #[test]
    fn the_allow_list_is_read_and_checked_in_iam_mode() {
        let read =
            |list: &str| AuthConfig::from_env(&env(&[("AUTH_MODE", "iam"), ("IAM_ALLOWED_CALLERS", list)]));
        assert_eq!(read("").unwrap().iam_allowed_callers, Vec::<String>::new());
        let list =
            read(" arn:aws:iam::1:user/a , arn:aws:sts::1:assumed-role/R/* ").unwrap().iam_allowed_callers;
        assert_eq!(list, ["arn:aws:iam::1:user/a", "arn:aws:sts::1:assumed-role/R/*"]);
        for bad in ["*", "ChatBackend", "arn:aws:iam::*:user/a", "arn:aws:sts::1:assumed-role/R*"] {
            assert_eq!(read(bad).unwrap_err().variable, "IAM_ALLOWED_CALLERS", "{bad}");
        }
    }

    #[tokio::test]
    async fn only_the_local_stacks_caller_may_name_nobody() {
        let local = Authenticator::trusted();
        assert_eq!(local.mode(), Mode::None);
        assert_eq!(local.caller(&headers(None), None).await.unwrap(), Caller::Trusted(None));
        let bob = UserId::parse("bob").unwrap();
        assert_eq!(local.caller(&headers(Some("bob")), None).await.unwrap(), Caller::Trusted(Some(bob)));
        assert!(matches!(local.caller(&headers(Some("a/b")), None).await, Err(AuthError::BadUserHeader(_))));
    }

    #[test]
    fn a_trusted_caller_is_scoped_only_when_it_names_a_user() {
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        assert!(Caller::Trusted(None).owns(&alice));
        assert!(Caller::Trusted(Some(alice.clone())).owns(&alice));
        assert!(!Caller::Trusted(Some(alice.clone())).owns(&bob));
        assert!(!Caller::User(bob.clone()).may_act_as(&alice));
        assert!(Caller::User(bob.clone()).may_act_as(&bob));
    }
}
