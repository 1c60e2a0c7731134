// The relay's request future nests deeply (streaming body, store calls, conditional writes);
// computing its layout needs more than the default query depth.
#![recursion_limit = "256"]

use lambda_http::{run_with_streaming_response_concurrent, service_fn, Error, Request};

fn main() -> Result<(), Error> {
    chat_runtime::aws::apply_local_concurrency();
    serve()
}

#[tokio::main]
async fn serve() -> Result<(), Error> {
    chat_runtime::aws::init_tracing();
    let relay = chat_runtime::aws::started(stream::Relay::from_env().await)?;
    run_with_streaming_response_concurrent(service_fn(move |request: Request| {
        let relay = relay.clone();
        async move { Ok::<_, Error>(relay.handle(request).await) }
    }))
    .await
}
