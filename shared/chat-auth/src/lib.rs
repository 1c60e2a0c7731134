//! Who is calling. Ingest and stream ask an [`Authenticator`] for the [`Caller`] of every request
//! and scope every route to it: a verified user sees and changes only their own sessions.
//!
//! `AUTH_MODE` is one of:
//! - `jwt`: a bearer token (the `Authorization` header, or `?access_token=` where a client such
//!   as `EventSource` cannot set headers) verified against an OIDC issuer's published keys
//!   (Cognito user pools, Auth0 and the like): signature, `iss`, `aud` or `client_id`, `exp`,
//!   `nbf`. The user is the token's `sub`.
//! - `iam`: the Function URL's `AWS_IAM` auth admitted a trusted backend; it acts as the user the
//!   path names, or as the user in an `X-User-Id` header when it sends one.
//! - `none`: as `iam`, with nothing in front: refused unless the process is a function of the
//!   local stack (`chat_runtime::aws::local_stack`: its own signal, no variable only Lambda sets,
//!   the emulator's runtime API), so a deployed function can never run this way.

#[cfg(feature = "dev-issuer")]
pub mod dev_issuer;
mod jwks;

use chat_core::config::{ConfigError, Env};
use chat_core::UserId;
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
    /// The exact `iss` tokens must carry.
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
}

impl AuthConfig {
    /// Reads `AUTH_MODE` and, for `jwt`, `JWT_ISSUER`, `JWT_AUDIENCE` (comma-separated) and
    /// `JWT_JWKS_URL`.
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
                let issuer = env.required("JWT_ISSUER")?.trim_end_matches('/').to_owned();
                let audiences: Vec<String> = env
                    .required("JWT_AUDIENCE")?
                    .split(',')
                    .map(|a| a.trim().to_owned())
                    .filter(|a| !a.is_empty())
                    .collect();
                if audiences.is_empty() {
                    return Err(invalid("JWT_AUDIENCE", "names no audience".to_owned()));
                }
                let jwks_url =
                    env.optional("JWT_JWKS_URL").unwrap_or_else(|| format!("{issuer}/.well-known/jwks.json"));
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
        Ok(AuthConfig { mode, jwt })
    }
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A verified user: every route is scoped to them.
    User(UserId),
    /// A trusted caller (`iam`, `none`), acting as the named user when it names one.
    Trusted(Option<UserId>),
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
            AuthError::KeysUnavailable => (503, "auth_unavailable"),
        }
    }
}

/// The claims read from a token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    aud: Option<OneOrMany>,
    client_id: Option<String>,
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
}

impl Authenticator {
    /// An authenticator for `config`; in `jwt` mode its keys are fetched on first use.
    pub fn new(config: AuthConfig) -> Result<Authenticator, ConfigError> {
        let jwt = match config.jwt {
            Some(settings) => {
                let keys = KeySource::new(&settings).map_err(|e| ConfigError {
                    variable: "JWT_JWKS_URL".to_owned(),
                    problem: e.to_string(),
                })?;
                Some(Arc::new((settings, keys)))
            }
            None => None,
        };
        Ok(Authenticator { mode: config.mode, jwt })
    }

    /// A trusted caller's authenticator (`iam`), for tests and benchmarks that build a function
    /// from parts.
    pub fn trusted() -> Authenticator {
        Authenticator { mode: Mode::Iam, jwt: None }
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
    /// parameter, for clients that cannot set headers.
    pub async fn caller(
        &self,
        headers: &http::HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Caller, AuthError> {
        match (&self.jwt, self.mode) {
            (Some(jwt), Mode::Jwt) => {
                let bearer = headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
                let token = bearer.or(query_token).map(str::trim).filter(|t| !t.is_empty());
                let token = token.ok_or(AuthError::Missing)?;
                self.verify(&jwt.0, &jwt.1, token).await.map(Caller::User)
            }
            _ => {
                let named = headers.get("x-user-id").map(|v| {
                    let raw = v.to_str().map_err(|_| AuthError::BadUserHeader("not text".into()))?;
                    UserId::parse(raw).map_err(|e| AuthError::BadUserHeader(e.to_string()))
                });
                Ok(Caller::Trusted(named.transpose()?))
            }
        }
    }

    async fn verify(
        &self,
        settings: &JwtSettings,
        keys: &KeySource,
        token: &str,
    ) -> Result<UserId, AuthError> {
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
        validation.set_issuer(&[settings.issuer.as_str()]);
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
        let sub = claims.sub.ok_or_else(|| AuthError::Invalid("the token has no subject (sub)".into()))?;
        UserId::parse(&sub).map_err(|e| AuthError::Invalid(format!("its subject is not a user id ({e})")))
    }
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
        assert_eq!(settings.jwks_url, "https://issuer.example/pool/.well-known/jwks.json");
        assert_eq!(settings.audiences, ["app", "web"]);
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
