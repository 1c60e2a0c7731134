//! The connector for the project's own outbound HTTP calls (a model provider, a token issuer's
//! keys): rustls over the aws-lc-rs the AWS SDK already links, trusting the system's roots. The
//! SDK links these crates too, so this adds nothing to a binary.

pub use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use std::sync::Arc;
use std::time::Duration;

/// HTTPS, or plain HTTP, over one connector.
pub type Connector = HttpsConnector<HttpConnector>;

/// TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The system's root certificates did not load.
    #[error("cannot load the system's root certificates: {0}")]
    Roots(std::io::Error),
    /// The crypto provider refused the protocol versions.
    #[error("cannot set up TLS: {0}")]
    Protocols(rustls::Error),
}

/// HTTPS only (no plain `http`), over `http`: a TCP connector of the caller's, e.g. one whose
/// resolver refuses some addresses. Trusts the system's roots.
pub fn https_only<H>(http: H) -> Result<HttpsConnector<H>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider)
        .map_err(TlsSetupError::Roots)?;
    Ok(tls.https_only().enable_http1().wrap_connector(http))
}

/// A connector with `connect_timeout`. A machine without root certificates can still reach a
/// plain `http` URL (a local server) when `plain_http` says that is what it is for.
pub fn connector(connect_timeout: Duration, plain_http: bool) -> Result<Connector, TlsSetupError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls =
        match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
            Ok(tls) => tls,
            Err(_) if plain_http => {
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(TlsSetupError::Protocols)?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
            Err(e) => return Err(TlsSetupError::Roots(e)),
        };
    Ok(tls.https_or_http().enable_http1().wrap_connector(http))
}
