//! The store's error type: faults only. A failed write condition is an outcome, not an error.

use crate::fsm::{Event, State};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use std::error::Error as StdError;

/// A DynamoDB fault, or a programming error caught before anything was sent.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// DynamoDB or the network failed. `indeterminate` means the write may have happened.
    #[error("DynamoDB {operation} failed: {detail}")]
    Dynamo {
        /// The API call, e.g. `TransactWriteItems`.
        operation: &'static str,
        /// The error with its whole source chain (`DisplayErrorContext`), safe to log.
        detail: String,
        /// A timeout or dropped connection: the request may have been applied.
        indeterminate: bool,
        /// DynamoDB kept throttling after the SDK's retries with backoff.
        throttled: bool,
        /// The SDK error itself.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The transition table has no such edge; nothing was sent.
    #[error("illegal transition: no edge for {event} from {}", from.map_or("no session", State::as_str))]
    IllegalTransition {
        /// The state the write would have left from.
        from: Option<State>,
        /// The event.
        event: Event,
    },
    /// Concurrent transactions kept colliding past the retry budget.
    #[error("gave up after {attempts} attempts that collided with concurrent transactions")]
    Contention {
        /// How many times it tried.
        attempts: u32,
    },
    /// An item in the table does not have the shape this code writes.
    #[error("malformed item {key}: {reason}")]
    Corrupt {
        /// The item's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl StoreError {
    /// The request may have been applied (timeout, dropped connection).
    pub fn is_indeterminate(&self) -> bool {
        matches!(self, StoreError::Dynamo { indeterminate: true, .. })
    }

    /// DynamoDB throttled the request past the SDK's retries.
    pub fn is_throttled(&self) -> bool {
        matches!(self, StoreError::Dynamo { throttled: true, .. })
    }

    pub(crate) fn dynamo<E, R>(operation: &'static str, err: SdkError<E, R>) -> StoreError
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let indeterminate = matches!(
            err,
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
        );
        let throttled = matches!(
            err.code(),
            Some("ThrottlingException" | "ProvisionedThroughputExceededException" | "RequestLimitExceeded")
        );
        StoreError::Dynamo {
            operation,
            detail: DisplayErrorContext(&err).to_string(),
            indeterminate,
            throttled,
            source: Box::new(err),
        }
    }

    pub(crate) fn corrupt(key: impl Into<String>, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt { key: key.into(), reason: reason.into() }
    }
}
