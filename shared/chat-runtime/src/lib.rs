//! The Lambda plumbing the functions share, kept out of `chat-core` (the domain): AWS
//! configuration and clients, logs, local concurrency ([`aws`]), the connector for the
//! project's own outbound HTTPS ([`https`]), the error answers of the HTTP functions
//! ([`http_error`]) and, with feature `queue`, the SQS sender of turns
//! ([`queue`]).

pub mod aws;
pub mod http_error;
pub mod https;
pub mod metrics;
#[cfg(feature = "queue")]
pub mod queue;
