//! The emulators: DynamoDB (dynoxide, embedded in this process) and the clients, queues and
//! secrets the stack creates in SQS and Secrets Manager (a moto server).

use crate::processes::free_port;
use crate::{fail, StackError, StackSettings};
use aws_sdk_sqs::types::QueueAttributeName;
use chat_core::{Store, StoreOptions};
use serde_json::json;
use tokio::task::JoinHandle;

fn local_credentials() -> aws_sdk_dynamodb::config::Credentials {
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
    pub async fn start(port: u16, table: &str) -> Result<LocalDynamo, StackError> {
        let port = free_port(port)?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.map_err(fail)?;
        let db = dynoxide::Database::memory().map_err(|e| fail(format!("dynoxide: {e}")))?;
        let task = tokio::spawn(async move {
            if let Err(e) = dynoxide::server::serve_with_shutdown(listener, db, std::future::pending()).await
            {
                tracing::error!(error = %e, "DynamoDB emulator stopped");
            }
        });
        let dynamo = LocalDynamo { endpoint: format!("http://127.0.0.1:{port}"), task };
        chat_core::table::create_table(&dynamodb_client(&dynamo.endpoint), table).await.map_err(|e| {
            fail(format!("creating the table: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e)))
        })?;
        Ok(dynamo)
    }

    /// A store on `table` through this emulator.
    pub fn store(&self, table: &str, options: StoreOptions) -> Store {
        Store::new(dynamodb_client(&self.endpoint), table, options)
    }
}

pub(crate) fn sqs_err<E: std::error::Error + 'static, R: std::fmt::Debug>(
    e: aws_sdk_sqs::error::SdkError<E, R>,
) -> StackError {
    fail(aws_sdk_sqs::error::DisplayErrorContext(e))
}

/// Creates the secrets in moto's Secrets Manager (the same server as SQS).
pub(crate) async fn create_secrets(endpoint: &str, secrets: &[(String, String)]) -> Result<(), StackError> {
    if secrets.is_empty() {
        return Ok(());
    }
    let config = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
        .region(aws_sdk_secretsmanager::config::Region::new("us-east-1"))
        .credentials_provider(local_credentials())
        .endpoint_url(endpoint)
        .build();
    let client = aws_sdk_secretsmanager::Client::from_conf(config);
    for (name, value) in secrets {
        client.create_secret().name(name).secret_string(value).send().await.map_err(|e| {
            fail(format!(
                "creating secret {name}: {}",
                aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
            ))
        })?;
    }
    Ok(())
}

pub(crate) async fn create_queues(
    sqs: &aws_sdk_sqs::Client,
    settings: &StackSettings,
) -> Result<(String, String), StackError> {
    let dlq_url = sqs
        .create_queue()
        .queue_name(format!("{}-dlq", settings.queue))
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .send()
        .await
        .map_err(sqs_err)?
        .queue_url
        .unwrap_or_default();
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(sqs_err)?;
    let dlq_arn = attributes
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| fail("the dead-letter queue has no ARN"))?;
    let redrive = json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": settings.max_receive_count});
    let queue_url = sqs
        .create_queue()
        .queue_name(&settings.queue)
        .attributes(QueueAttributeName::VisibilityTimeout, settings.visibility_timeout.as_secs().to_string())
        .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
        .send()
        .await
        .map_err(sqs_err)?
        .queue_url
        .unwrap_or_default();
    Ok((queue_url, dlq_url))
}
