//! The issuer's signing keys (a JWKS document), fetched on first use and cached. A token signed
//! with a key the cache does not know makes it refetch (at most every `min_refresh`), so keys
//! rotate without a redeploy; known keys are refetched after `max_age`, so a withdrawn key stops
//! working.

use crate::{AuthError, JwtSettings};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;

/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 256 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One verification key.
#[derive(Clone)]
pub struct Key {
    pub(crate) decoding: DecodingKey,
    pub(crate) algorithm: Algorithm,
}

#[derive(Default)]
struct Cached {
    keys: HashMap<String, Key>,
    fetched: Option<Instant>,
}

/// The issuer's keys, cached.
pub struct KeySource {
    url: http::Uri,
    client: Client<chat_runtime::https::Connector, Empty<Bytes>>,
    cached: RwLock<Cached>,
    /// One fetch at a time.
    fetching: Mutex<()>,
    min_refresh: Duration,
    max_age: Duration,
    fetches: std::sync::atomic::AtomicU64,
}

/// The key source cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum KeySourceError {
    /// `jwks_url` does not make a URL.
    #[error("{url:?} is not a URL ({source})")]
    InvalidUrl { url: String, source: http::uri::InvalidUri },
    /// Plain `http` to a host that is not this machine: anyone on the path could hand out keys
    /// and so sign tokens for any user.
    #[error("{url:?} is plain http to another host; an issuer's keys must come over https")]
    PlainHttp { url: String },
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] chat_runtime::https::TlsSetupError),
}

impl KeySource {
    /// A source for `settings.jwks_url`, over HTTPS with the system's roots; plain HTTP only to a
    /// loopback host (the local stack's issuer, a test's).
    pub fn new(settings: &JwtSettings) -> Result<KeySource, KeySourceError> {
        let url: http::Uri = settings
            .jwks_url
            .parse()
            .map_err(|source| KeySourceError::InvalidUrl { url: settings.jwks_url.clone(), source })?;
        let plain_http = url.scheme_str() == Some("http");
        if plain_http && !url.host().is_some_and(loopback) {
            return Err(KeySourceError::PlainHttp { url: settings.jwks_url.clone() });
        }
        let https = chat_runtime::https::connector(FETCH_TIMEOUT, plain_http)?;
        Ok(KeySource {
            url,
            client: Client::builder(TokioExecutor::new()).build(https),
            cached: RwLock::new(Cached::default()),
            fetching: Mutex::new(()),
            min_refresh: settings.min_refresh,
            max_age: settings.max_age,
            fetches: 0.into(),
        })
    }

    /// How many times the keys were fetched (for tests and logs).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The key `kid`, fetching the keys when it is unknown or they are old.
    pub(crate) async fn key(&self, kid: &str) -> Result<Key, AuthError> {
        if let Some(key) = self.fresh(kid).await {
            return Ok(key);
        }
        let _one_fetch = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(key) = self.fresh(kid).await {
            return Ok(key);
        }
        let recently = self.cached.read().await.fetched.is_some_and(|at| at.elapsed() < self.min_refresh);
        if !recently {
            match self.fetch().await {
                Ok(keys) => {
                    *self.cached.write().await = Cached { keys, fetched: Some(Instant::now()) };
                }
                Err(problem) => {
                    tracing::error!(url = %self.url, %problem, "fetching the token issuer's keys failed");
                    // Keep serving the keys already known rather than failing every request.
                    let cached = self.cached.read().await;
                    return match cached.keys.get(kid) {
                        Some(key) => Ok(key.clone()),
                        None if cached.fetched.is_some() => {
                            Err(AuthError::Invalid("its key is unknown".into()))
                        }
                        None => Err(AuthError::KeysUnavailable),
                    };
                }
            }
        }
        self.cached
            .read()
            .await
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| AuthError::Invalid("it is signed with a key the issuer does not publish".into()))
    }

    async fn fresh(&self, kid: &str) -> Option<Key> {
        let cached = self.cached.read().await;
        let young = cached.fetched.is_some_and(|at| at.elapsed() < self.max_age);
        cached.keys.get(kid).filter(|_| young).cloned()
    }

    async fn fetch(&self) -> Result<HashMap<String, Key>, String> {
        self.fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = http::Request::get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(FETCH_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let body =
            tokio::time::timeout(FETCH_TIMEOUT, Limited::new(response.into_body(), MAX_JWKS_BYTES).collect())
                .await
                .map_err(|_| "timed out reading".to_owned())?
                .map_err(|e| format!("reading failed: {e}"))?
                .to_bytes();
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (_, Some(alg)) => match alg.to_string().parse::<Algorithm>() {
                    Ok(alg) => alg,
                    Err(_) => continue,
                },
                (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(ec), None) => match ec.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => continue,
                },
                _ => continue,
            };
            // Symmetric keys have no place in a public key set.
            if matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                continue;
            }
            if let Ok(decoding) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid, Key { decoding, algorithm });
            }
        }
        Ok(keys)
    }
}

/// `localhost`, or a loopback address (`127.0.0.0/8`, `[::1]`).
fn loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}
