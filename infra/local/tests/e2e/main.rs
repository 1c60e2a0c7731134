//! End to end, in one test binary: HTTP clients (and a headless Chromium) against the local
//! stack, the one-origin API served by `cargo lambda watch` (the real Lambda runtime API) with
//! SQS (moto) and DynamoDB (dynoxide) behind it. Each configuration's stack starts once, on first
//! use, and the tests that name it share it ([`harness::app`]).

mod harness;
mod policies;

mod alarms;
mod auth;
mod bedrock;
mod browser;
mod chat;
mod crash;
mod dev;
mod durable;
mod iam;
mod lifecycle;
mod limits;
mod openai;
mod outage;
mod overload;
mod revisions;
