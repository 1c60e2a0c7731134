//! The one way the store sends a DynamoDB request: ask for the capacity it consumes, meter it,
//! and turn an SDK error into a [`StoreError`] that names the operation. A conditional write's
//! failed condition is an outcome ([`Written::Refused`]), not an error.

use super::Store;
use crate::error::StoreError;
use crate::record::Item;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::batch_get_item::{
    builders::BatchGetItemFluentBuilder, BatchGetItemError, BatchGetItemOutput,
};
use aws_sdk_dynamodb::operation::batch_write_item::{
    builders::BatchWriteItemFluentBuilder, BatchWriteItemError, BatchWriteItemOutput,
};
use aws_sdk_dynamodb::operation::get_item::{builders::GetItemFluentBuilder, GetItemError, GetItemOutput};
use aws_sdk_dynamodb::operation::put_item::{builders::PutItemFluentBuilder, PutItemError, PutItemOutput};
use aws_sdk_dynamodb::operation::query::{builders::QueryFluentBuilder, QueryError, QueryOutput};
use aws_sdk_dynamodb::operation::transact_write_items::{
    builders::TransactWriteItemsFluentBuilder, TransactWriteItemsError, TransactWriteItemsOutput,
};
use aws_sdk_dynamodb::operation::update_item::{
    builders::UpdateItemFluentBuilder, UpdateItemError, UpdateItemOutput,
};
use aws_sdk_dynamodb::types::{ConsumedCapacity, ReturnConsumedCapacity};
use std::error::Error as StdError;
use std::future::Future;

/// A request the store sends.
pub(crate) trait Request: Sized {
    type Output: Consumed;
    type Error: ProvideErrorMetadata + StdError + Send + Sync + 'static;
    /// The API call, named in errors.
    const OPERATION: &'static str;
    /// Whether it consumes write capacity (else read).
    const WRITES: bool;
    /// Sends it, asking DynamoDB to report the capacity it consumed.
    fn send_reporting(
        self,
    ) -> impl Future<Output = Result<Self::Output, SdkError<Self::Error, HttpResponse>>> + Send;
}

/// The capacity a response reports (one entry per table touched).
pub(crate) trait Consumed {
    fn consumed(&self) -> &[ConsumedCapacity];
}

/// An error that may be a failed write condition.
pub(crate) trait ConditionFailure {
    /// `Some` when a condition failed, with the item as it was when DynamoDB returns it.
    fn refused_item(&self) -> Option<Option<&Item>>;
}

/// How a conditional write ended.
#[derive(Debug)]
pub(crate) enum Written<O> {
    /// Applied; DynamoDB's answer.
    Applied(O),
    /// The condition failed and nothing was written: the item as it was, if returned.
    Refused(Option<Item>),
}

fn one(consumed: Option<&ConsumedCapacity>) -> &[ConsumedCapacity] {
    consumed.map(std::slice::from_ref).unwrap_or_default()
}

fn many(consumed: &[ConsumedCapacity]) -> &[ConsumedCapacity] {
    consumed
}

macro_rules! request {
    ($builder:ty => $output:ty, $error:ty, $operation:literal, writes: $writes:literal, $consumed:ident) => {
        impl Request for $builder {
            type Output = $output;
            type Error = $error;
            const OPERATION: &'static str = $operation;
            const WRITES: bool = $writes;
            fn send_reporting(
                self,
            ) -> impl Future<Output = Result<$output, SdkError<$error, HttpResponse>>> + Send {
                self.return_consumed_capacity(ReturnConsumedCapacity::Total).send()
            }
        }

        impl Consumed for $output {
            fn consumed(&self) -> &[ConsumedCapacity] {
                $consumed(self.consumed_capacity())
            }
        }
    };
}

request!(GetItemFluentBuilder => GetItemOutput, GetItemError, "GetItem", writes: false, one);
request!(QueryFluentBuilder => QueryOutput, QueryError, "Query", writes: false, one);
request!(BatchGetItemFluentBuilder => BatchGetItemOutput, BatchGetItemError, "BatchGetItem", writes: false, many);
request!(PutItemFluentBuilder => PutItemOutput, PutItemError, "PutItem", writes: true, one);
request!(UpdateItemFluentBuilder => UpdateItemOutput, UpdateItemError, "UpdateItem", writes: true, one);
request!(BatchWriteItemFluentBuilder => BatchWriteItemOutput, BatchWriteItemError, "BatchWriteItem", writes: true, many);
request!(
    TransactWriteItemsFluentBuilder => TransactWriteItemsOutput,
    TransactWriteItemsError,
    "TransactWriteItems",
    writes: true,
    many
);

impl ConditionFailure for UpdateItemError {
    fn refused_item(&self) -> Option<Option<&Item>> {
        match self {
            UpdateItemError::ConditionalCheckFailedException(e) => Some(e.item()),
            _ => None,
        }
    }
}

impl ConditionFailure for PutItemError {
    fn refused_item(&self) -> Option<Option<&Item>> {
        match self {
            PutItemError::ConditionalCheckFailedException(e) => Some(e.item()),
            _ => None,
        }
    }
}

/// A transaction whose item conditions failed (which ones, [`Store::write_transition`] reads off
/// the cancellation reasons itself).
impl ConditionFailure for TransactWriteItemsError {
    fn refused_item(&self) -> Option<Option<&Item>> {
        match self {
            TransactWriteItemsError::TransactionCanceledException(cancel)
                if cancel
                    .cancellation_reasons()
                    .iter()
                    .any(|r| r.code() == Some("ConditionalCheckFailed")) =>
            {
                Some(None)
            }
            _ => None,
        }
    }
}

impl Store {
    /// Sends `request` and meters it; any failure is an error.
    pub(crate) async fn send<R: Request>(&self, request: R) -> Result<R::Output, StoreError> {
        let out = request.send_reporting().await.map_err(|e| StoreError::dynamo(R::OPERATION, e))?;
        self.meter(R::WRITES, out.consumed());
        Ok(out)
    }

    /// Sends a conditional write and meters it; a failed condition is [`Written::Refused`].
    pub(crate) async fn send_conditional<R>(&self, request: R) -> Result<Written<R::Output>, StoreError>
    where
        R: Request,
        R::Error: ConditionFailure,
    {
        match request.send_reporting().await {
            Ok(out) => {
                self.meter(R::WRITES, out.consumed());
                Ok(Written::Applied(out))
            }
            Err(err) => match err.as_service_error().and_then(ConditionFailure::refused_item) {
                Some(item) => Ok(Written::Refused(item.filter(|item| !item.is_empty()).cloned())),
                None => Err(StoreError::dynamo(R::OPERATION, err)),
            },
        }
    }

    /// Every item a query matches, through all its pages.
    pub(crate) async fn query_all(&self, query: QueryFluentBuilder) -> Result<Vec<Item>, StoreError> {
        self.query_at_least(query, usize::MAX).await
    }

    /// A query's items, page after page until there are `enough` (the last page may bring more)
    /// or the query ends.
    pub(crate) async fn query_at_least(
        &self,
        query: QueryFluentBuilder,
        enough: usize,
    ) -> Result<Vec<Item>, StoreError> {
        let mut pages = query.return_consumed_capacity(ReturnConsumedCapacity::Total).into_paginator().send();
        let mut items = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| StoreError::dynamo("Query", e))?;
            self.meter(false, page.consumed());
            items.extend(page.items.unwrap_or_default());
            if items.len() >= enough {
                break;
            }
        }
        Ok(items)
    }
}
