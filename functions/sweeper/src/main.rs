use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    chat_runtime::aws::init_tracing();
    let sweeper = chat_runtime::aws::started(sweeper::Sweeper::from_env().await)?;
    let sweeper = &sweeper;
    run(service_fn(move |event: LambdaEvent<serde_json::Value>| async move {
        sweeper.handle(event.payload).await
    }))
    .await
}
