//! Hello world on Lambda: lambda_runtime, tokio and serde_json, answering each event with it.
//! `make bench-coldstart` measures the functions' cold starts against this one's.

use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    run(service_fn(|event: LambdaEvent<Value>| async move { Ok::<Value, Error>(event.payload) })).await
}
