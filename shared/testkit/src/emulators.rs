//! The DynamoDB emulator (dynoxide, embedded in this process, atomic under races) and clients
//! for the local emulators.

use chat_core::{Store, StoreOptions};
use std::net::TcpListener as StdListener;
use tokio::task::JoinHandle;

/// The emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The port is taken, or loopback refused it.
    #[error("port {port} on 127.0.0.1 is not free ({source}); set another port")]
    Port { port: u16, source: std::io::Error },
    /// dynoxide failed to open its database.
    #[error("dynoxide: {0}")]
    Database(String),
    /// Creating the table failed.
    #[error("creating the table: {0}")]
    Table(String),
}

/// Credentials the local emulators accept.
pub fn local_credentials() -> aws_sdk_dynamodb::config::Credentials {
    aws_sdk_dynamodb::config::Credentials::new("local", "local", None, None, "local-stack")
}

/// A DynamoDB client for the local emulator.
pub fn dynamodb_client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(local_credentials())
        .endpoint_url(endpoint)
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// An SQS client for the local emulator.
pub fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(local_credentials())
        .endpoint_url(endpoint)
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// A DynamoDB emulator (dynoxide) in this process on 127.0.0.1 with the table created. Dropping
/// it stops the server.
pub struct LocalDynamo {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    task: JoinHandle<()>,
}

impl Drop for LocalDynamo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalDynamo {
    /// Starts the emulator on `port` (0 picks a free one) and creates `table`.
    pub async fn start(port: u16, table: &str) -> Result<LocalDynamo, EmulatorError> {
        let listener = StdListener::bind(("127.0.0.1", port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| EmulatorError::Port { port, source })?;
        let port = listener.local_addr().map_err(|source| EmulatorError::Port { port, source })?.port();
        let db = dynoxide::Database::memory().map_err(|e| EmulatorError::Database(e.to_string()))?;
        let task = tokio::spawn(async move {
            if let Err(e) = dynoxide::server::serve_with_shutdown(listener, db, std::future::pending()).await
            {
                tracing::error!(error = %e, "DynamoDB emulator stopped");
            }
        });
        let dynamo = LocalDynamo { endpoint: format!("http://127.0.0.1:{port}"), task };
        chat_core::table::create_table(&dynamodb_client(&dynamo.endpoint), table).await.map_err(|e| {
            EmulatorError::Table(aws_sdk_dynamodb::error::DisplayErrorContext(&e).to_string())
        })?;
        Ok(dynamo)
    }

    /// A store on `table` through this emulator.
    pub fn store(&self, table: &str, options: StoreOptions) -> Store {
        Store::new(dynamodb_client(&self.endpoint), table, options)
    }
}
