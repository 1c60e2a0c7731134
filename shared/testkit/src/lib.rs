//! What the tests and the local stack share, so a function's own tests can use it without the
//! whole local stack: the embedded DynamoDB emulator and local AWS clients ([`emulators`]),
//! fake model servers ([`fake_llm`]), the one SSE reader ([`sse_reader`]) and arbitrary HTTP
//! requests for the handlers' property tests ([`requests`]).

pub mod emulators;
pub mod fake_llm;
pub mod requests;
pub mod sse_reader;
pub mod stub_sqs;

pub use emulators::{dynamodb_client, local_credentials, sqs_client, LocalDynamo, TableStream};
pub use stub_sqs::StubSqs;
