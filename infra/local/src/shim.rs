//! What `cargo lambda watch` does not provide: the SQS event source mapping that feeds the
//! generator, the sweeper's schedule, and DynamoDB's TTL process with the table stream's event
//! source. They invoke the functions through `cargo lambda watch`'s Lambda invoke API, with the
//! events Lambda itself would send.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Why an invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The invoke API could not be reached, or the function never answered.
    #[error("invoking {function}: {source}")]
    Unreachable {
        function: String,
        #[source]
        source: reqwest::Error,
    },
    /// The function answered with an error.
    #[error("{function} answered {status}: {body}")]
    Failed { function: String, status: u16, body: String },
}

/// Invokes a function through `cargo lambda watch`'s Lambda invoke API; its JSON answer (`null`
/// when it answered nothing or not JSON).
pub async fn invoke(
    http: &reqwest::Client,
    api: &str,
    function: &str,
    event: &impl serde::Serialize,
) -> Result<Value, InvokeError> {
    let url = format!("{api}/2015-03-31/functions/{function}/invocations");
    let unreachable = |source| InvokeError::Unreachable { function: function.to_owned(), source };
    // Like Lambda's own timeout: an instance that died mid-invocation never answers.
    let response =
        http.post(&url).json(event).timeout(Duration::from_secs(120)).send().await.map_err(unreachable)?;
    let status = response.status();
    let function_error = response.headers().contains_key("x-amz-function-error");
    let body = response.text().await.map_err(unreachable)?;
    if !status.is_success() || function_error {
        return Err(InvokeError::Failed { function: function.to_owned(), status: status.as_u16(), body });
    }
    Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The event EventBridge sends on a schedule.
pub(crate) fn scheduled_event() -> Value {
    json!({"version": "0", "source": "aws.events", "detail-type": "Scheduled Event", "detail": {}})
}

/// The record Lambda's SQS event source mapping makes of a received message.
fn record(message: &aws_sdk_sqs::types::Message) -> SqsMessage {
    let mut record = SqsMessage::default();
    record.message_id = message.message_id.clone();
    record.receipt_handle = message.receipt_handle.clone();
    record.body = message.body.clone();
    record.md5_of_body = message.md5_of_body.clone();
    record.attributes = message
        .attributes()
        .map(|a| a.iter().map(|(k, v)| (k.as_str().to_owned(), v.clone())).collect())
        .unwrap_or_default();
    record.event_source = Some("aws:sqs".to_owned());
    record.event_source_arn = Some("arn:aws:sqs:us-east-1:000000000000:local".to_owned());
    record.aws_region = Some("us-east-1".to_owned());
    record
}

/// Stand-in for the SQS event source mapping: long-polls the queue, invokes the generator with
/// each batch, deletes the records it did not report as failed, and leaves failures to the
/// visibility timeout (and, past `maxReceiveCount`, the dead-letter queue).
pub(crate) async fn event_source_mapping(
    sqs: aws_sdk_sqs::Client,
    http: reqwest::Client,
    api: String,
    queue_url: String,
    concurrency: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore stays open"),
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let received = tokio::select! {
            r = sqs.receive_message().queue_url(&queue_url).max_number_of_messages(10).wait_time_seconds(20)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All).send() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let messages = match received {
            Ok(out) => out.messages.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "receiving from SQS failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let (sqs, http, api, queue_url) = (sqs.clone(), http.clone(), api.clone(), queue_url.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut event = SqsEvent::default();
            event.records = messages.iter().map(record).collect();
            let answer = match invoke(&http, &api, "generator", &event).await {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::warn!(error = %e, "the generator invocation failed; the batch will be redelivered");
                    return;
                }
            };
            let failed = match serde_json::from_value::<SqsBatchResponse>(answer) {
                Ok(response) => response.batch_item_failures,
                Err(e) => {
                    tracing::warn!(error = %e, "the generator's answer is not a batch response; the batch will be redelivered");
                    return;
                }
            };
            // One batch delete of what succeeded, as Lambda's event source mapping does.
            let done: Vec<_> = messages
                .iter()
                .enumerate()
                .filter(|(_, m)| !failed.iter().any(|f| Some(f.item_identifier.as_str()) == m.message_id()))
                .filter_map(|(n, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(n.to_string())
                        .set_receipt_handle(m.receipt_handle.clone())
                        .build()
                        .ok()
                })
                .collect();
            if done.is_empty() {
                return;
            }
            match sqs.delete_message_batch().queue_url(&queue_url).set_entries(Some(done)).send().await {
                Ok(out) if !out.failed.is_empty() => {
                    tracing::warn!(
                        failed = out.failed.len(),
                        "deleting some messages failed; they will be redelivered"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "deleting messages failed")
                }
            }
        });
    }
}

/// Stand-in for the sweeper's EventBridge schedule.
pub(crate) async fn schedule(
    http: reqwest::Client,
    api: String,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if let Err(e) = invoke(&http, &api, "sweeper", &scheduled_event()).await {
            tracing::warn!(error = %e, "the sweeper failed");
        }
    }
}

/// Stand-in for DynamoDB's TTL process and the sweeper's stream event source: every `every`, the
/// emulator removes the items whose TTL passed, and the removals of session items by TTL (what
/// the template's filter lets through) are delivered to the sweeper, again until it takes them.
/// Owns the emulator, which stops with it.
pub(crate) async fn ttl_process(
    dynamo: chat_testkit::LocalDynamo,
    mut stream: chat_testkit::TableStream,
    http: reqwest::Client,
    api: String,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut undelivered: Vec<Value> = Vec::new();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return drop(dynamo),
        }
        if let Err(e) = dynamo.sweep_ttl() {
            tracing::warn!(error = %e, "the TTL sweep failed");
        }
        match stream.next_event() {
            Ok(Some(event)) => undelivered.extend(
                event["Records"].as_array().into_iter().flatten().filter(|r| removed_by_ttl(r)).cloned(),
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reading the table's stream failed"),
        }
        if undelivered.is_empty() {
            continue;
        }
        // As Lambda's event source with ReportBatchItemFailures: the records from the first
        // failed one on are delivered again, the ones before it are done.
        match invoke(&http, &api, "sweeper", &json!({ "Records": undelivered })).await {
            Ok(answer) => {
                let failed_from =
                    answer["batchItemFailures"][0]["itemIdentifier"].as_str().map(str::to_owned);
                let keep = failed_from
                    .and_then(|seq| {
                        undelivered.iter().position(|r| r["dynamodb"]["SequenceNumber"] == seq.as_str())
                    })
                    .unwrap_or(undelivered.len());
                if keep < undelivered.len() {
                    tracing::warn!(
                        records = undelivered.len() - keep,
                        "the sweeper asked for expired sessions again"
                    );
                }
                undelivered.drain(..keep);
            }
            Err(e) => tracing::warn!(error = %e, "the sweeper failed on expired sessions; retrying"),
        }
    }
}

/// The template's filter on the sweeper's stream event source: a session item removed by TTL.
fn removed_by_ttl(record: &Value) -> bool {
    record["eventName"] == "REMOVE"
        && record["userIdentity"]["type"] == "Service"
        && record["userIdentity"]["principalId"] == "dynamodb.amazonaws.com"
        && record["dynamodb"]["Keys"]["sk"]["S"] == chat_core::table::SESSION_SK
}
