//! A token issuer for the local stack and tests: a fresh ES256 key, its JWKS document, and
//! signed tokens for any user. Never part of a deployed function.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A signing key and the identity it issues under.
pub struct DevIssuer {
    /// The `iss` of its tokens.
    pub issuer: String,
    /// The `aud` of its tokens.
    pub audience: String,
    kid: String,
    encoding: EncodingKey,
    public_point: Vec<u8>,
}

impl DevIssuer {
    /// A new key for `issuer` and `audience`.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> DevIssuer {
        let pair = rcgen::KeyPair::generate().expect("an ES256 key pair generates");
        let public_point = pair.public_key_raw().to_vec();
        let kid = format!("dev-{}", &URL_SAFE_NO_PAD.encode(&public_point[1..9]));
        DevIssuer {
            issuer: issuer.into(),
            audience: audience.into(),
            kid,
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            public_point,
        }
    }

    /// The key id in its tokens' headers.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWKS document that publishes its key.
    pub fn jwks(&self) -> Value {
        // An uncompressed P-256 point: 0x04, then x and y (32 bytes each).
        let (x, y) = self.public_point[1..].split_at(32);
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]})
    }

    /// A token for `sub`, valid for `ttl` from now.
    pub fn token(&self, sub: &str, ttl: Duration) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
        self.sign(json!({
            "iss": self.issuer, "aud": self.audience, "sub": sub,
            "iat": now, "nbf": now, "exp": now + ttl.as_secs(),
        }))
    }

    /// Any claims, signed with its key (for tests of what verification refuses).
    pub fn sign(&self, claims: Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        encode(&header, &claims, &self.encoding).expect("claims encode")
    }
}
