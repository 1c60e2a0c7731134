//! The queues and secrets the stack creates in SQS and Secrets Manager (a moto server). The
//! DynamoDB emulator and the clients are `chat_testkit`'s.

use crate::{fail, StackError, StackSettings};
use aws_sdk_sqs::types::QueueAttributeName;
use chat_testkit::local_credentials;
use serde_json::json;

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
