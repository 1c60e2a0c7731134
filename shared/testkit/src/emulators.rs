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
    db: dynoxide::Database,
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
        let served = db.clone();
        let task = tokio::spawn(async move {
            if let Err(e) =
                dynoxide::server::serve_with_shutdown(listener, served, std::future::pending()).await
            {
                tracing::error!(error = %e, "DynamoDB emulator stopped");
            }
        });
        let dynamo = LocalDynamo { endpoint: format!("http://127.0.0.1:{port}"), db, task };
        chat_core::table::create_table(&dynamodb_client(&dynamo.endpoint), table).await.map_err(|e| {
            EmulatorError::Table(aws_sdk_dynamodb::error::DisplayErrorContext(&e).to_string())
        })?;
        Ok(dynamo)
    }

    /// A store on `table` through this emulator.
    pub fn store(&self, table: &str, options: StoreOptions) -> Store {
        Store::new(dynamodb_client(&self.endpoint), table, options)
    }

    /// Removes every item whose TTL has passed (by the wall clock), as DynamoDB's TTL process
    /// does some time after expiry; each removal is on the table's stream, by the TTL service.
    /// Returns how many it removed.
    pub fn sweep_ttl(&self) -> Result<usize, EmulatorError> {
        self.db.sweep_ttl().map_err(|e| EmulatorError::Database(e.to_string()))
    }

    /// A reader of `table`'s stream from its start.
    pub fn stream(&self, table: &str) -> Result<TableStream, EmulatorError> {
        let fail = |e: dynoxide::DynoxideError| EmulatorError::Database(e.to_string());
        let streams = self.db.list_streams(request(serde_json::json!({"TableName": table}))).map_err(fail)?;
        let arn = serde_json::to_value(&streams)
            .ok()
            .and_then(|v| v["Streams"].get(0).and_then(|s| s["StreamArn"].as_str()).map(str::to_owned));
        let arn = arn.ok_or_else(|| EmulatorError::Database(format!("table {table} has no stream")))?;
        let described =
            self.db.describe_stream(request(serde_json::json!({"StreamArn": arn}))).map_err(fail)?;
        let shard = serde_json::to_value(&described).ok().and_then(|v| {
            v["StreamDescription"]["Shards"].get(0).and_then(|s| s["ShardId"].as_str()).map(str::to_owned)
        });
        let shard = shard.ok_or_else(|| EmulatorError::Database(format!("stream {arn} has no shard")))?;
        let iterator = self
            .db
            .get_shard_iterator(request(serde_json::json!({
                "StreamArn": arn, "ShardId": shard, "ShardIteratorType": "TRIM_HORIZON"
            })))
            .map_err(fail)?
            .shard_iterator;
        Ok(TableStream { db: self.db.clone(), iterator })
    }
}

/// A dynoxide request from its JSON form (the requests' fields are the API's).
fn request<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a well-formed stream request")
}

/// Reads a table's stream in order, as Lambda's event source mapping does.
pub struct TableStream {
    db: dynoxide::Database,
    iterator: Option<String>,
}

impl TableStream {
    /// The records written since the last call, as the event Lambda would deliver
    /// (`{"Records": [...]}`); `None` when there are none.
    pub fn next_event(&mut self) -> Result<Option<serde_json::Value>, EmulatorError> {
        let Some(iterator) = self.iterator.take() else { return Ok(None) };
        let page = self
            .db
            .get_records(request(serde_json::json!({"ShardIterator": iterator, "Limit": 1000})))
            .map_err(|e| EmulatorError::Database(e.to_string()))?;
        self.iterator = page.next_shard_iterator.clone();
        if page.records.is_empty() {
            return Ok(None);
        }
        let records =
            serde_json::to_value(&page.records).map_err(|e| EmulatorError::Database(e.to_string()))?;
        Ok(Some(serde_json::json!({ "Records": records })))
    }
}
