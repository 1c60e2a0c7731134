//! What the tests and the local stack share, so a function's own tests can use it without the
//! whole local stack: the embedded DynamoDB emulator and local AWS clients ([`emulators`]),
//! fake model servers ([`fake_llm`]) and the one SSE reader ([`sse`]).

pub mod emulators;
pub mod fake_llm;
pub mod sse;

pub use emulators::{dynamodb_client, local_credentials, sqs_client, LocalDynamo};
