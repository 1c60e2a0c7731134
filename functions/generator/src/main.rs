use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{run_concurrent, service_fn, Error, LambdaEvent};
use std::sync::Arc;

fn main() -> Result<(), Error> {
    chat_runtime::aws::apply_local_concurrency();
    serve()
}

#[tokio::main]
async fn serve() -> Result<(), Error> {
    chat_runtime::aws::init_tracing();
    let generator = Arc::new(chat_runtime::aws::started(generator::Generator::from_env().await)?);
    run_concurrent(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let generator = generator.clone();
        async move { Ok::<_, Error>(generator.handle(event.payload).await) }
    }))
    .await
}
